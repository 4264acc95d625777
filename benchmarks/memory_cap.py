"""Does `--max-memory` hold? Working memory of whole restorations with the tiny reference model, and the
cost of the exact tiled VAE's disk spill.

    python benchmarks/memory_cap.py                                   # 512 and 2048, then the spill (~25 min, 2 idle cores)
    python benchmarks/memory_cap.py --sizes 512,2048,4096 --max-memory 1GB
    python benchmarks/memory_cap.py --sizes 4096 --no-sampling --no-stage1 --parts restore   # the VAE and colour fix at 4096
    python benchmarks/memory_cap.py --parts spill --spill-size 2048

`restore` part: the model step of the CLI (`restorecli.run.files.run_model`: the pipeline, then the
conversion to 8-bit pixels) on a random (S/4) x (S/4) input, x4 (the v2.1 defaults but 1 step and cfg 1:
the peaks do not depend on them, except that cfg above 1 batches cond and uncond in half precision), with the reference model `../shared/reference/model_v.json` (tiny
SwinIR, UNet, ControlNet; its VAE has 32 channels at full resolution: a 2048^2 feature map is 512 MiB
in float32). Each size runs in its own process. Working memory = the resident set's high-water mark
(VmHWM, benchmarks/common.py) over the resident set after loading the models, with glibc's allocator as
`restore` runs it (`--malloc restore`; the figures before issue 16's allocator fix were taken with
`--malloc lean`, which hid that glibc keeps freed memory by default); it is read at the end
of every stage and of every gap between stages, so the gaps count too (the last column: from the end
of the colour fix to the 8-bit pixels, whose estimate is the plan's "output"). "est" is the plan's
estimate of the stage (the stage-1 image and the other image-sized buffers included). `--no-sampling` replaces the
denoiser by the identity (x_T is decoded), `--no-stage1` the cleaner by a bicubic upscale (stage 1 then
shows "-"): the stages around them are the real ones, for sizes where the tiny UNet (attention at the
full latent resolution) and the tiled stage 1 would take hours on a small CPU.

`spill` part: the tiled decoder (and encoder) of that VAE at `--spill-size`, each in its own process,
with the tile the planner picks under `--max-memory`: all paused tiles in memory; in memory with the
inner ResNet activations recomputed (the planner's choice at 2048^2 under 1 GB); at most 256 MiB in
memory and the rest on disk; everything on disk. Peak working memory, wall time, bytes written to disk, and the largest difference
from the in-memory result (it must be 0: the spill changes where tiles wait, not what is computed).
The temporary files go to `--spill-dir` (default $RESTORE_HOME/tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    GLIBC_TUNABLES, GLIBC_UNTOUCHED, SHARED, child_env, fixed_mmap_threshold, hwm_bytes, load_average, reset_hwm,
    rss_bytes, run_child,
)

MODEL = SHARED / "reference" / "model_v.json"
STAGES = ("stage 1", "prompt", "encode", "sampling", "decode", "colour fix")
SPILL_MODES = ("memory", "recompute", "256 MiB in memory", "all on disk")


# ------------------------------------------------------------------------------------------ children


class _Watch:
    """`DiffBIRPipeline.stage_monitor`: the high-water mark at every stage boundary, reset at each, so that
    the peak of every stage and of every gap between stages is seen ("after X": from the end of stage X
    to the start of the next; "after colour fix": to the 8-bit pixels)."""

    def __init__(self, base: int):
        self.base = base
        self.stages: dict[str, dict] = {}
        self.gaps: dict[str, int] = {}
        self.last = "the start"
        self.peak = 0

    def mark(self, where: str) -> None:
        """The mark since the last reset (the last stage and the gap after it), as `where`."""
        top = hwm_bytes() - self.base
        self.peak = max(self.peak, top)
        self.gaps[where] = max(self.gaps.get(where, 0), top)

    def __call__(self, name: str):
        watch = self

        class Block:
            def __enter__(self):
                watch.mark(f"after {watch.last}")
                reset_hwm()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                top = hwm_bytes() - watch.base
                watch.peak = max(watch.peak, top)
                row = watch.stages.setdefault(name, {"s": 0.0, "peak": 0})
                row["s"] += time.perf_counter() - self.t0
                row["peak"] = max(row["peak"], top)
                watch.last = name
                reset_hwm()
                return False

        return Block()


def restore_child(args) -> dict:
    import numpy as np
    import torch

    from restorecli.pipeline.diffbir import DiffBIRPipeline
    from restorecli.run.steps import run_model
    from restorecli.settings import default_settings

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    pipe = DiffBIRPipeline.from_description(MODEL, device="cpu", captioner="none", torch_dtype=dtype)
    if args.spill_dir:
        pipe.spill_dir = args.spill_dir
    if args.no_sampling:
        pipe.denoise = lambda x_T, *a, **k: x_T
    if args.no_stage1:  # the condition: the input upscaled (bicubic), at stage 1's output size
        from restorecli.stage1.run import Stage1Result, image_to_tensor, resize_to

        def stage1(rgb, *, upscale, **k):
            size = (int(rgb.shape[0] * upscale), int(rgb.shape[1] * upscale))
            return Stage1Result(resize_to(image_to_tensor(rgb), size), size, "swinir")

        pipe.run_stage1 = stage1
    size = args.size
    rng = np.random.default_rng(size)

    class Image:  # what run_model reads of an imageio.LoadedImage
        rgb = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        bit_depth, is_gray, alpha, output_icc_profile, exif = 8, False, None, None, None

    settings = default_settings("custom", "sr").replace(upscale=4, steps=1, cfg=args.cfg, max_memory=args.max_memory)
    plans = []
    real_plan = pipe.plan_memory

    def plan_memory(*a, **k):
        plans.append(real_plan(*a, **k))
        return plans[-1]

    pipe.plan_memory = plan_memory
    firsts = []  # (tile, condition size) of stage 1; not the result itself, which would keep its image alive
    real_stage1 = pipe.run_stage1

    def run_stage1(*a, **k):
        result = real_stage1(*a, **k)
        firsts.append((result.tile, tuple(result.cond_img.shape[-2:])))
        return result

    pipe.run_stage1 = run_stage1
    import gc

    gc.collect()
    base = rss_bytes()
    watch = _Watch(base)
    pipe.stage_monitor = watch
    reset_hwm()
    t0 = time.perf_counter()
    restored = run_model(pipe, Image, settings, source=f"random_{size // 4}.png")
    seconds = time.perf_counter() - t0
    watch.mark(f"after {watch.last}")
    assert restored.pixels.shape == (size, size, 3)
    plan = plans[-1]
    from restorecli.stage1.memory import stage1_peak_bytes
    from restorecli.stage1.run import SWINIR_MULTIPLE

    tile, cond_size = firsts[-1]  # the stage-1 estimate for the tiles stage 1 chose (SwinIR: the padded condition)
    ph, pw = (-(-n // SWINIR_MULTIPLE) * SWINIR_MULTIPLE for n in cond_size)
    estimates = {"stage 1": stage1_peak_bytes(pipe.cleaner.kind, ph, pw, dtype=pipe.cleaner.dtype, tile=tile[0] if tile else None),
                 **plan.estimates}
    if args.no_stage1:
        del estimates["stage 1"]
    return {"size": size, "base": base, "peak": watch.peak, "seconds": seconds, "stages": watch.stages, "gaps": watch.gaps,
            "plan": plan.describe(), "estimates": estimates, "budget": plan.budget,
            "spill": plan.spill, "no_sampling": args.no_sampling, "no_stage1": args.no_stage1,
            "precision": args.precision, "cfg_batch": plan.cfg_batch, "stage1_tile": tile[0] if tile else None}


def spill_child(args) -> dict:
    import torch

    from restorecli.pipeline.diffbir import DiffBIRPipeline
    from restorecli.pipeline.planning import plan_stage2
    from restorecli.memory import trim_freed_memory
    from restorecli.vae.tiled import tiled_decode, tiled_encode

    torch.set_num_threads(args.threads)
    pipe = DiffBIRPipeline.from_description(MODEL, device="cpu", captioner="none", torch_dtype=torch.float32)
    s = args.size
    budget = int(0.8 * args.max_memory)
    plan = plan_stage2(s, s, vae_config=pipe.vae.config, unet_config=pipe.unet.config, budget=budget)
    choice = getattr(plan, args.part)
    g = torch.Generator().manual_seed(s)
    if args.part == "encode":
        inp = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    else:
        inp = torch.randn(1, 4, s // 8, s // 8, generator=g)
    # the planner's tile; its paused tiles in memory, or recomputed, or beyond 256 MiB on disk, or all on disk
    limit = {"memory": None, "recompute": None, "256 MiB in memory": 256 << 20, "all on disk": 0}[args.mode]
    recompute = args.mode == "recompute"
    tile = choice.tile or (512 if args.part == "encode" else 64)
    info: dict = {}
    import gc

    gc.collect()
    trim_freed_memory()  # what loading freed, as the pipeline gives it back after each stage
    base = rss_bytes()
    reset_hwm()
    t0 = time.perf_counter()
    run = tiled_encode if args.part == "encode" else tiled_decode
    out = run(pipe.vae, inp, tile_size=tile, recompute=recompute, max_stored_bytes=limit, spill_dir=args.spill_dir,
              info=info)
    seconds = time.perf_counter() - t0
    peak = hwm_bytes() - base
    ref = Path(args.ref)
    if args.mode == "memory":
        torch.save(out, ref)
        diff = 0.0
    else:
        diff = (out - torch.load(ref)).abs().max().item()
    return {"part": args.part, "size": s, "mode": args.mode, "tile": tile, "limit": limit, "peak": peak,
            "seconds": seconds, "spilled": info.get("spilled_bytes", 0), "disk_peak": info.get("peak_disk_bytes", 0),
            "diff": diff, "estimate": choice.estimate}


# ------------------------------------------------------------------------------------------ the parent

#: glibc settings for the children (`--malloc`): None = benchmarks/common.py's MALLOC_ENV (a 128 KiB fixed
#: threshold, no trim threshold), else these variables over the environment as it is.
MALLOC_MODES = {
    "restore": {},  # what `restore` runs with: glibc as it comes, trimmed after each stage (restorecli.memory)
    "glibc": GLIBC_UNTOUCHED,
    "lean": None,
    "tunables": {"GLIBC_TUNABLES": GLIBC_TUNABLES},
    "mmap-1m": fixed_mmap_threshold(1 << 20),
    "mmap-4m": fixed_mmap_threshold(4 << 20),
    "mmap-32m": fixed_mmap_threshold(32 << 20),
}


def _malloc_env(mode: str) -> dict[str, str]:
    if MALLOC_MODES[mode] is None:
        return child_env()
    env = child_env(keep_malloc=True)
    env.update(MALLOC_MODES[mode])
    return env


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,2048", help="output sides, comma-separated")
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--parts", default="restore,spill", help="restore, spill or both")
    ap.add_argument("--spill-size", type=int, default=2048)
    ap.add_argument("--spill-parts", default="decode,encode")
    ap.add_argument("--spill-dir", default=None)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="the networks' dtype in the restore part (bf16: the CPU default where it is native; with "
                         "--cfg above 1 cond and uncond are then batched)")
    ap.add_argument("--no-sampling", action="store_true", help="decode x_T instead of sampling (the tiny UNet is slow at 4096)")
    ap.add_argument("--no-stage1", action="store_true", help="the condition is the input upscaled (bicubic), no cleaner")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=list(MALLOC_MODES), default="restore",
                    help="glibc's allocator in the children: restore (as `restore` runs: glibc's defaults, trimmed "
                         "after each stage), glibc (left as glibc ships it, no trims), lean (128 KiB, no trim threshold), "
                         "tunables (the README's GLIBC_TUNABLES: freed memory kept), mmap-1m/4m/32m (fixed thresholds)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=["restore", "spill"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from restorecli.settings import parse_size

    if args.child:
        args.max_memory = parse_size(args.max_memory)
        result = restore_child(args) if args.child == "restore" else spill_child(args)
        print(json.dumps(result))
        return 0

    cap = parse_size(args.max_memory)
    print(f"# --max-memory {args.max_memory} ({cap / 2**30:.2f} GiB); tiny reference model, {args.precision}; malloc {args.malloc}; CPU, {args.threads} threads; "
          f"load {load_average()}", flush=True)
    common = [sys.executable, __file__, "--max-memory", args.max_memory, "--threads", str(args.threads),
              "--cfg", str(args.cfg), "--precision", args.precision] + (["--spill-dir", args.spill_dir] if args.spill_dir else [])
    results: dict = {"restore": [], "spill": []}
    parts = args.parts.split(",")
    if "restore" in parts:
        for size in (int(s) for s in args.sizes.split(",")):
            cmd = (common + ["--child", "restore", "--size", str(size)] + (["--no-sampling"] if args.no_sampling else [])
                   + (["--no-stage1"] if args.no_stage1 else []))
            row = run_child(cmd, env=_malloc_env(args.malloc))
            row.setdefault("size", size)
            results["restore"].append(row)
            print(json.dumps(row), flush=True)
    if "spill" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            for part in args.spill_parts.split(","):
                ref = os.path.join(tmp, f"{part}.pt")
                for mode in SPILL_MODES:
                    cmd = common + ["--child", "spill", "--size", str(args.spill_size), "--part", part, "--mode", mode,
                                    "--ref", ref]
                    row = run_child(cmd, env=_malloc_env(args.malloc))
                    row.update(part=part, mode=mode)
                    results["spill"].append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print(_restore_table(results["restore"], cap))
    print()
    print(_spill_table(results["spill"]))
    return 0


def _restore_table(rows, cap) -> str:
    if not rows:
        return ""
    head = (["output", "working peak MiB", "within cap"] + [f"{s} MiB (est)" for s in STAGES]
            + ["after the colour fix MiB (est)", "seconds", "plan"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['size']}² | {r['error']} |" + " |" * (len(head) - 2))
            continue
        skipped = [what for what, on in (("stage 1", r.get("no_stage1")), ("sampling", r.get("no_sampling"))) if on]
        cells = [f"{r['size']}²" + (f" (no {', no '.join(skipped)})" if skipped else ""), _mib(r["peak"]),
                 "yes" if r["peak"] <= cap else "NO"]
        est = dict(r["estimates"])
        est["prompt"] = None
        for name in STAGES:
            st = r["stages"].get(name)
            cells.append("-" if st is None else f"{_mib(st['peak'])} ({_mib(est.get(name))})")
        last = r.get("gaps", {}).get("after colour fix")
        cells.append("-" if last is None else f"{_mib(last)} ({_mib(est.get('output'))})")
        first = "" if r.get("no_stage1") else (f"stage 1 tiles of {r['stage1_tile']} px; " if r.get("stage1_tile")
                                                else "stage 1 untiled; ")
        cells += [f"{r['seconds']:.0f}", first + r["plan"].split(": ", 1)[-1]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _spill_table(rows) -> str:
    if not rows:
        return ""
    head = ["part", "size", "paused tiles", "tile", "working peak MiB", "wall s", "written to disk MiB",
            "disk peak MiB", "max diff"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['part']} | | {r['mode']} | {r['error']} |" + " |" * (len(head) - 4))
            continue
        where = {"memory": "all in memory", "recompute": "in memory, inner activations recomputed",
                 "256 MiB in memory": "256 MiB in memory, the rest on disk", "all on disk": "all on disk"}[r["mode"]]
        out.append("| " + " | ".join([r["part"], f"{r['size']}²", where, str(r["tile"]), _mib(r["peak"]),
                                      f"{r['seconds']:.1f}", _mib(r["spilled"]), _mib(r["disk_peak"]),
                                      f"{r['diff']:.1g}"]) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
