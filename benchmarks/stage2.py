"""Stage-2 start-up and step cost for the FULL-SIZE architecture with random weights (no download).

Writes an SD 2.1 ldm checkpoint ({"state_dict": ...}, .ckpt) and an IRControlNet (bare, .pth) with the
key names and shapes of ``../shared/reference/manifest_full.json`` into a temporary folder (about
6.7 GB, plus as much again for the conversion cache), then measures, each in a fresh process:

1. first start: ``load_stage2`` = hash + read + convert + write the conversion cache,
2. second start: ``load_stage2`` from the cache,
3. seconds per ControlledUNet call (64x64 latent, batch 2, fp32) on the models of the second start.

Usage: python benchmarks/stage2.py [--workdir DIR] [--keep] [--calls N] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESTORE_SHARED_DIR", REPO.parent / "shared"))
MANIFEST = SHARED / "reference" / "manifest_full.json"
TOKENIZER = SHARED / "sd2-tokenizer"
NEEDED_BYTES = 15 * 10**9


def _random_tensor(key: str, shape: list[int]):
    import torch

    if len(shape) == 0:
        return torch.tensor(4.6052)  # logit_scale
    if len(shape) == 1:
        return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.empty(shape).normal_(0.0, fan_in**-0.5)


def make_checkpoints(workdir: Path) -> tuple[Path, Path]:
    import torch

    torch.manual_seed(0)
    layouts = json.loads(MANIFEST.read_text())["layouts"]
    sd_path, cn_path = workdir / "sd21_random.ckpt", workdir / "ircontrolnet_random.pth"
    if not sd_path.exists():
        sd = {k: _random_tensor(k, s) for k, s in layouts["sd2.1_ldm_ckpt"]["keys"].items()}
        torch.save({"state_dict": sd}, sd_path)
        del sd
    if not cn_path.exists():
        cn = {k: _random_tensor(k, s) for k, s in layouts["irControlNet"]["keys"].items()}
        torch.save(cn, cn_path)
    return sd_path, cn_path


def child(args: argparse.Namespace) -> None:
    """One start in this process; prints one JSON line."""
    t_start = time.perf_counter()
    import torch

    from restorecli.models.configs import full_size_description
    from restorecli.models.stage2 import load_stage2

    t_import = time.perf_counter() - t_start
    desc = full_size_description(
        "v2.1", sd_checkpoint=args.sd, controlnet_checkpoint=args.cn, tokenizer=TOKENIZER
    )
    t0 = time.perf_counter()
    models = load_stage2(desc, device=args.device, cache_dir=args.cache, use_cache=not args.no_cache)
    t_load = time.perf_counter() - t0
    # memory-mapped weights are read on first use: touch every tensor to count that I/O too
    t0 = time.perf_counter()
    with torch.no_grad():
        for net in (models.unet, models.controlnet, models.vae, models.text_encoder):
            for p in net.parameters():
                p.sum()
    t_touch = time.perf_counter() - t0
    result = {
        "import_s": t_import,
        "load_s": t_load,
        "touch_s": t_touch,
        "report": models.load_report,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    if args.calls:
        unet = models.controlled_unet()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 64, 64, generator=g)
        c_txt = torch.randn(2, 77, 1024, generator=g)
        c_img = torch.randn(1, 4, 64, 64, generator=g)
        t = torch.tensor([500, 500])
        unet(x, t, c_txt, c_img)  # warm-up
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            out = unet(x, t, c_txt, c_img)
            times.append(time.perf_counter() - t0)
        result["call_s"] = times
        result["finite"] = bool(torch.isfinite(out).all())
        result["threads"] = torch.get_num_threads()
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(result))


def run_child(sd: Path, cn: Path, cache: Path, *, calls: int = 0, no_cache: bool = False, device: str = "cpu") -> dict:
    cmd = [sys.executable, __file__, "--child", "--sd", str(sd), "--cn", str(cn), "--cache", str(cache)]
    cmd += ["--calls", str(calls), "--device", device] + (["--no-cache"] if no_cache else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoints and the cache")
    ap.add_argument("--calls", type=int, default=3, help="timed ControlledUNet calls (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sd", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cn", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="restorecli-stage2-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < NEEDED_BYTES:
        sys.exit(f"{workdir}: {free / 1e9:.1f} GB free, the benchmark needs about {NEEDED_BYTES / 1e9:.0f} GB")
    cache = workdir / "converted"
    try:
        t0 = time.perf_counter()
        sd, cn = make_checkpoints(workdir)
        print(
            f"random full-size checkpoints: {sd.stat().st_size / 1e9:.2f} GB + {cn.stat().st_size / 1e9:.2f} GB "
            f"in {time.perf_counter() - t0:.0f} s ({workdir})",
            file=sys.stderr,
        )
        shutil.rmtree(cache, ignore_errors=True)
        rows = [
            ("convert only (no cache)", run_child(sd, cn, cache, no_cache=True, device=args.device)),
            ("first start (convert + write cache)", run_child(sd, cn, cache, device=args.device)),
            ("second start (from cache)", run_child(sd, cn, cache, calls=args.calls, device=args.device)),
        ]
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nStage-2 start-up, full-size SD 2.1 + IRControlNet, fp32, device {args.device}, "
          f"{os.cpu_count()} CPUs, torch threads {rows[-1][1].get('threads')}")
    print("| start | import s | load_stage2 s | of which SD ckpt s | of which ControlNet s "
          "| read all weights s | process wall s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        rep = r["report"]
        print(
            f"| {name} | {r['import_s']:.1f} | {r['load_s']:.1f} | {rep['sd']['seconds']:.1f} | "
            f"{rep['controlnet']['seconds']:.1f} | {r['touch_s']:.1f} | {r['process_wall_s']:.1f} | "
            f"{r['peak_rss_gb']:.1f} |"
        )
    calls = rows[-1][1].get("call_s") or []
    if calls:
        print(f"\nControlledUNet call, latent 64x64 (512x512 image), batch 2 (cond+uncond), fp32 {args.device}: "
              f"{min(calls):.2f} s min, {sum(calls) / len(calls):.2f} s mean over {len(calls)} calls "
              f"(output finite: {rows[-1][1]['finite']})")


if __name__ == "__main__":
    main()
