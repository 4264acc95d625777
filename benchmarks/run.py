"""The whole restoration on the FULL-SIZE architectures (random weights, nothing downloaded): time and
peak memory per stage, per output size, with the memory planner's automatic tiling.

    python benchmarks/run.py                         # CPU default: 512^2 and 1024^2, 1 step (~15 min on 2 idle cores)
    python benchmarks/run.py --sizes 512,2048 --modes auto,capped      # the 2048^2 target (long on a CPU)
    python benchmarks/run.py --device cuda --sizes 512,1024,2048,4096 --steps 10 --max-memory 10GB --speed --compile

What runs. `DiffBIRPipeline` with DiffBIR's full-size SwinIR and SD 2.1 UNet + IRControlNet + VAE + the
23-layer OpenCLIP text tower, diffusers' random initialisation (benchmarks/common.py). The v2.1 defaults
(sr x4, edm_dpm++_3m_sde, cfg 6, the official prompts): an output of S x S is restored from a random
(S/4) x (S/4) input. v1 has the same architectures (only the schedule differs), so it runs at the first
size only unless `--versions` says otherwise. Each configuration runs in its own process.

Modes: `auto` plans with what the device has free (the user's default); `capped` with `--max-memory`
(default 6GB) as the cap; `untiled` forces every stage untiled (only where it fits; not in the default
set: where auto already plans no tiles it is the same run, marked "= auto"). A capped run whose plan is
the same as auto's (the planner is asked first) is not repeated.

Per stage: wall seconds (sampling: seconds per step = sampling time / steps) and peak memory over
the memory at the stage's start; "process peak": the absolute peak of the run (CPU: resident set,
including Python, torch and all weights; CUDA: max allocated, weights included). On a GPU each
configuration runs twice in its process and the second (warm) run is reported (`--repeat`).

`--speed` adds one UNet + IRControlNet evaluation at a 64x64 latent (512^2 image) with cfg: two batch-1
calls (upstream's CPU pattern) vs one batch-2 call, each with contiguous and channels-last weights.
`--compile` adds the torch.compile'd networks (first call = compilation, then warm). `--vae-compare`
runs benchmarks/tiled_vae.py (our exact tiled VAE vs diffusers' enable_tiling vs untiled: time, memory,
seam error). `--measure` repeats the UNet + IRControlNet memory figures of restorecli/planning.py.

Targets (issue 7): process peak at 2048^2 within 1.5x of 512^2 (with the planner's tiling, under
`--max-memory` if need be); on a GPU with fp16: 4096^2 within 12 GB (run it capped with `--max-memory
10GB` on a larger card) and 512^2 in under 1.5 s warm for 10 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, Peak, child_env, describe_device, load_average, run_child  # noqa: E402

sys.path.insert(0, str(REPO / "src"))

STAGES = ("stage 1", "prompt", "encode", "sampling", "decode", "colour fix")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _parse_size(text: str) -> int:
    from restorecli.settings.tree import parse_size

    return parse_size(text)


# ------------------------------------------------------------------------------------------ the child


class StageRecorder:
    """`DiffBIRPipeline.stage_monitor`: seconds and peak memory of every stage (common.Peak)."""

    def __init__(self, device: str):
        self.device = device
        self.stages: dict[str, dict] = {}

    def __call__(self, name: str):
        recorder = self

        class Block:
            def __enter__(self):
                self.peak = Peak(recorder.device).__enter__()
                return self

            def __exit__(self, *exc):
                self.peak.__exit__(*exc)
                row = recorder.stages.setdefault(name, {"s": 0.0, "over_base": 0, "total": 0})
                row["s"] += self.peak.seconds
                row["over_base"] = max(row["over_base"], self.peak.bytes)
                row["total"] = max(row["total"], self.peak.total)
                return False

        return Block()


def child(args) -> dict:
    import numpy as np
    import torch

    from common import full_size_pipeline

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    t0 = time.perf_counter()
    pipe = full_size_pipeline(args.version, device=args.device, dtype=dtype)
    from restorecli.pipeline.loading import prepare_for_speed

    prepare_for_speed(pipe, torch.device(args.device), compile=args.compile)
    attention = sorted({type(m.processor).__name__ for net in (pipe.unet, pipe.controlnet, pipe.vae)
                        for m in net.modules() if hasattr(m, "set_processor")})
    build_s = time.perf_counter() - t0
    size = args.size
    rng = np.random.default_rng(size)
    lq = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)

    call = dict(upscale=4, steps=args.steps, output_type="pt", seed=231)
    if args.mode == "capped":
        call["max_memory"] = args.max_memory
    elif args.mode == "untiled":
        import restorecli.pipeline.diffbir as pl
        import restorecli.stage1.run as s1

        never = 1 << 60
        pl.stage2_budget = lambda device, cap: never
        s1.available_memory = lambda device, cap=None: never

    runs = []
    for _ in range(args.repeat):
        recorder = StageRecorder(args.device)
        pipe.stage_monitor = recorder
        import gc

        gc.collect()
        base = Peak(args.device).__enter__().base
        start = time.perf_counter()
        out = pipe(lq, **call)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total_s = time.perf_counter() - start
        assert torch.isfinite(out.images).all()
        runs.append((recorder.stages, total_s, base, out.plan))
    stages, total_s, base, plan = runs[-1]
    return {
        "version": args.version, "size": size, "mode": args.mode, "device": args.device, "dtype": args.dtype,
        "steps": args.steps, "build_s": build_s, "total_s": total_s, "base": base, "stages": stages,
        "first_total_s": runs[0][1], "plan": plan.describe(), "budget": plan.budget, "attention": attention,
        "estimates": plan.estimates, "process_peak": max(r["total"] for r in stages.values()),
        "threads": torch.get_num_threads(), "compiled": args.compile,
    }


def speed_child(args) -> dict:
    """One cfg evaluation at a 64x64 latent: 2 x batch 1 vs batch 2, contiguous vs channels-last."""
    import torch

    from common import full_size_stage2

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    models = full_size_stage2("v2.1", device=args.device, dtype=dtype)
    net = models.controlled_unet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g).to(args.device)
    c_txt, c_neg = (torch.randn(1, 77, 1024, generator=g).to(args.device) for _ in range(2))
    c_img = torch.randn(1, 4, 64, 64, generator=g).to(args.device)
    t = torch.tensor([500], device=args.device)

    def two_calls():
        return torch.cat([net(x, t, c_txt, c_img), net(x, t, c_neg, c_img)])

    def batched():
        return net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c_txt, c_neg]), c_img)

    rows = {}
    layouts = [("contiguous", torch.contiguous_format), ("channels-last", torch.channels_last)]
    if args.compile:
        layouts.append(("compiled", None))
    reference = None
    for layout, fmt in layouts:
        if fmt is not None:
            for m in (models.unet, models.controlnet):
                m.to(memory_format=fmt)
        else:
            models.unet.compile()
            models.controlnet.compile()
        for name, fn in (("2 x batch 1", two_calls), ("batch 2", batched)):
            with Peak(args.device) as first:
                out = fn()
            timings = []
            for _ in range(args.speed_repeat):
                with Peak(args.device) as p:
                    out = fn()
                timings.append(p.seconds)
            if reference is None:
                reference = out.float()
            err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            rows[f"{layout}, {name}"] = {"first_s": first.seconds, "s": min(timings), "rel_err": err}
    return {"rows": rows, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()}


def measure_child(args) -> dict:
    """Peak memory of one UNet + IRControlNet call, batch 1, at a `size` x `size` latent (after a warm-up)."""
    import torch

    from common import full_size_stage2

    torch.set_num_threads(args.threads)
    net = full_size_stage2("v2.1", device=args.device).controlled_unet()
    g = torch.Generator().manual_seed(0)
    s = args.size
    x, c_img = torch.randn(1, 4, s, s, generator=g).to(args.device), torch.randn(1, 4, s, s, generator=g).to(args.device)
    c_txt, t = torch.randn(1, 77, 1024, generator=g).to(args.device), torch.tensor([500], device=args.device)
    net(x[..., :16, :16], t, c_txt, c_img[..., :16, :16])
    with Peak(args.device) as p:
        net(x, t, c_txt, c_img)
    return {"size": s, "bytes": p.bytes, "seconds": p.seconds}


# ------------------------------------------------------------------------------------------ the parent


def _cmd(args, *extra) -> list[str]:
    return [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
            "--steps", str(args.steps), "--repeat", str(args.repeat), "--max-memory", str(args.max_memory),
            "--speed-repeat", str(args.speed_repeat)] + (["--compile"] if args.compile else []) + list(extra)


def _same_plan(args, size: int) -> bool:
    """Whether the capped budget plans exactly what the auto budget plans (then one run shows both)."""
    import torch

    from restorecli.memory import available_memory
    from restorecli.models.configs import full_size_cldm_spec, stage2_configs
    from restorecli.pipeline.planning import SAFETY, plan_stage2

    configs = stage2_configs(full_size_cldm_spec("random.ckpt", "random.pth"))
    free = available_memory(args.device) - _weights_bytes(args)
    dtype = getattr(torch, DTYPES[args.dtype])

    def plan(budget):
        p = plan_stage2(size, size, vae_config=configs.vae, unet_config=configs.unet, dtype=dtype, device=args.device,
                        budget=int(SAFETY * budget), cfg_batch=2 if args.device.startswith("cuda") else 1)
        return (p.encode, p.sample_tile, p.decode, p.post_on_cpu)

    return plan(free) == plan(min(free, args.max_memory))


def _weights_bytes(args) -> int:
    """UNet 865M + ControlNet 364M + VAE 84M + text 340M + SwinIR 16M parameters (in host or device memory)."""
    per = 2 if args.dtype in ("fp16", "bf16") else 4
    return int(1.67e9 * per)


def _fmt_s(x) -> str:
    return "-" if x is None else (f"{x:.1f}" if x >= 1 else f"{x:.2f}")


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--sizes", default=None, help="output sides (default 512,1024 on cpu; 512,1024,2048,4096 on cuda)")
    p.add_argument("--versions", default=None, help="default: v2.1 at every size, v1 at the first")
    p.add_argument("--modes", default="auto,capped", help="auto, capped, untiled ('' for none)")
    p.add_argument("--max-memory", default="6GB", help="the cap of the capped mode (e.g. 10GB on a GPU)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 on cuda, 1 on cpu)")
    p.add_argument("--repeat", type=int, default=None, help="runs per process, the last reported (default 2 on cuda)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--speed", action="store_true", help="also: batched cfg and channels-last, one evaluation")
    p.add_argument("--speed-repeat", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and ControlNet")
    p.add_argument("--vae-compare", action="store_true", help="also run benchmarks/tiled_vae.py at the first size")
    p.add_argument("--measure", action="store_true", help="UNet + ControlNet peak memory at 32^2 and 64^2 latents")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration")
    p.add_argument("--json", help="also write all rows here")
    p.add_argument("--child", nargs=3, metavar=("VERSION", "SIZE", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--speed-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("fp16" if on_gpu else "fp32")
    args.steps = args.steps or (10 if on_gpu else 1)
    args.repeat = args.repeat or (2 if on_gpu else 1)
    args.max_memory = _parse_size(str(args.max_memory))

    if args.child:
        args.version, args.size, args.mode = args.child[0], int(args.child[1]), args.child[2]
        print(json.dumps(child(args)))
        return
    if args.speed_child:
        print(json.dumps(speed_child(args)))
        return
    if args.measure_child:
        args.size = args.measure_child
        print(json.dumps(measure_child(args)))
        return

    env = child_env(threads=args.threads)
    print(f"# benchmarks/run.py: {describe_device(args.device)}, {args.dtype}, {args.threads} threads; "
          f"load average at start {load_average()}", flush=True)
    results: dict = {"rows": []}

    if args.measure:
        points = []
        for s in (32, 64):
            r = run_child(_cmd(args, "--measure-child", str(s)), env, args.timeout)
            print(f"  UNet + IRControlNet, batch 1, {s}x{s} latent: {r}", flush=True)
            points.append(r)
        if all("bytes" in r for r in points):
            slope = (points[1]["bytes"] - points[0]["bytes"]) / (64 * 64 - 32 * 32)
            print(f"slope {slope:.0f} bytes per latent pixel (compare restorecli/planning.py's module docstring)")
        results["measure"] = points

    sizes = [int(s) for s in (args.sizes or ("512,1024,2048,4096" if on_gpu else "512,1024")).split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"auto", "capped", "untiled"}
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))} (auto, capped, untiled)")
    rows = results["rows"]
    for i, size in enumerate(sizes):
        versions = args.versions.split(",") if args.versions else (["v2.1", "v1"] if i == 0 else ["v2.1"])
        for version in versions:
            for mode in modes:
                if mode == "capped" and _same_plan(args, size):
                    rows.append({"version": version, "size": size, "mode": "capped", "same_as": "auto"})
                    print(f"  {version} {size} capped: the same plan as auto", flush=True)
                    continue
                if version != "v2.1" and mode != "auto":
                    continue
                r = run_child(_cmd(args, "--child", version, str(size), mode), env, args.timeout)
                r.setdefault("version", version), r.setdefault("size", size), r.setdefault("mode", mode)
                rows.append(r)
                print(f"  {version} {size} {mode}: " + (r.get("error") or
                      f"{r['total_s']:.0f} s, process peak {r['process_peak'] / 2**30:.2f} GiB; {r['plan']}"), flush=True)

    speed = None
    if args.speed:
        speed = run_child(_cmd(args, "--speed-child"), env, args.timeout)
        results["speed"] = speed

    print(f"\nload average at the end: {load_average()}\n")
    print(_stage_table(rows, args))
    print()
    print(_target_lines(rows, args))
    if speed is not None:
        print()
        print(_speed_table(speed))
    if args.vae_compare:
        print("\n## our exact tiled VAE vs diffusers' enable_tiling (benchmarks/tiled_vae.py)\n", flush=True)
        import subprocess

        subprocess.run([sys.executable, str(Path(__file__).with_name("tiled_vae.py")), "--sizes", str(sizes[0]),
                        "--tile", str(max(64, sizes[0] // 2)), "--device", args.device,
                        "--dtype", DTYPES[args.dtype]], env=env, check=False)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


def _stage_table(rows, args) -> str:
    head = ["version", "output", "mode", "budget GiB", "stage 1 s", "encode s", "sampling s/step", "decode s",
            "total s" + (" (warm)" if args.repeat > 1 else ""), "peak over base MiB: stage 1 / encode / sampling / decode / colour fix", "process peak GiB", "plan"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = [r["version"], f"{r['size']}²", r["mode"]]
        if "same_as" in r:
            out.append("| " + " | ".join(label + [f"same plan as {r['same_as']}"] + [""] * (len(head) - 4)) + " |")
            continue
        if "error" in r:
            out.append("| " + " | ".join(label + [r["error"]] + [""] * (len(head) - 4)) + " |")
            continue
        st = r["stages"]

        def sec(name, per_step=False):
            if name not in st:
                return None
            return st[name]["s"] / (r["steps"] if per_step else 1)

        peaks = " / ".join(_mib(st.get(n, {}).get("over_base")) for n in ("stage 1", "encode", "sampling", "decode", "colour fix"))
        out.append("| " + " | ".join(label + [
            f"{r['budget'] / 2**30:.1f}", _fmt_s(sec("stage 1")), _fmt_s(sec("encode")), _fmt_s(sec("sampling", True)),
            _fmt_s(sec("decode")), _fmt_s(r["total_s"]) + (f" (first {_fmt_s(r['first_total_s'])})" if args.repeat > 1 else ""),
            peaks, f"{r['process_peak'] / 2**30:.2f}",
            r["plan"].split(": ", 1)[-1],
        ]) + " |")
    steps = next((r["steps"] for r in rows if "steps" in r), args.steps)
    out.append(f"\n{args.device}, {args.dtype}, {steps} sampling step(s) per run (edm_dpm++_3m_sde, cfg 6), "
               f"capped = --max-memory {args.max_memory / 2**30:.1f} GiB; attention: "
               f"{', '.join(next((r['attention'] for r in rows if 'attention' in r), []))}")
    return "\n".join(out)


def _target_lines(rows, args) -> str:
    ok = {(r["version"], r["size"], r["mode"]): r for r in rows if "process_peak" in r}
    lines = []
    for mode in ("auto", "capped"):
        def get(size):
            r = ok.get(("v2.1", size, mode))
            if r is None and mode == "capped":  # a capped run with auto's plan
                same = any(x.get("same_as") for x in rows if (x["version"], x["size"], x["mode"]) == ("v2.1", size, "capped"))
                r = ok.get(("v2.1", size, "auto")) if same else None
            return r

        small, big = get(512), get(2048)
        if small and big:
            ratio = big["process_peak"] / small["process_peak"]
            act = max(s["over_base"] for s in big["stages"].values()) / max(s["over_base"] for s in small["stages"].values())
            lines.append(f"{mode}: process peak 2048² / 512² = {ratio:.2f} (target <= 1.5: {'PASS' if ratio <= 1.5 else 'FAIL'}); "
                         f"largest stage peak over base 2048² / 512² = {act:.2f}")
    if args.device.startswith("cuda"):
        r = ok.get(("v2.1", 4096, "capped")) or ok.get(("v2.1", 4096, "auto"))
        if r:
            gb = r["process_peak"] / 1e9
            lines.append(f"4096² ({r['mode']}): CUDA peak {gb:.1f} GB (target <= 12 GB: {'PASS' if gb <= 12 else 'FAIL'})")
        r = ok.get(("v2.1", 512, "auto"))
        if r:
            lines.append(f"512² warm, {r['steps']} steps: {r['total_s']:.2f} s (target < 1.5 s: {'PASS' if r['total_s'] < 1.5 else 'FAIL'})")
    return "\n".join(lines) or "(targets need the 512² and 2048² rows: --sizes 512,2048)"


def _speed_table(speed) -> str:
    if "error" in speed:
        return f"speed: {speed['error']}"
    out = [f"One cfg evaluation (cond + uncond) of UNet + IRControlNet at a 64x64 latent (512² image), {speed['device']}, "
           f"{speed['dtype']}, {speed['threads']} threads:", "",
           "| weights | calls | first s | s | max rel. diff vs contiguous 2 x batch 1 |", "|---|---|---|---|---|"]
    for name, r in speed["rows"].items():
        layout, calls = name.split(", ", 1)
        out.append(f"| {layout} | {calls} | {_fmt_s(r['first_s'])} | {_fmt_s(r['s'])} | {r['rel_err']:.1e} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
