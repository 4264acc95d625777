"""`restore batch` throughput with a tiny model: images per minute with I/O overlap on and off, and the
time per image spent outside the model.

N small JPEG photos (default 50 of 128 x 96, smooth gradients plus noise) are restored into PNG with the
tiny reference model (../shared/reference/model_v.json) through `restorecli.run.loop.run_batch`, the loop
of `restore batch` and `restore IMAGE...`, in two modes:

* stage1: `--stage1-only` (SwinIR only; the 512 rule makes it run at 683 x 512 internally),
* full: stage 1 + stage 2 with 1 sampling step (`--steps 1`), the default sampler and cfg.

Default upscale (sr x4), so each output is 512 x 384. The models are loaded once per mode (not timed in
the rates) and one warm-up image runs first. For each mode the two loop variants alternate
(off, on, off, on... `--repeats` times) so that drift in machine load hits both alike; the table shows
the median over repeats:

  wall s       the loop's time for N images (the reading, model and writing of all of them)
  img/min      N / wall * 60
  model s/img  time inside the pipeline call, per image
  outside s/img (wall - model time) / N: reading, decoding, encoding, writing that the model waited for
               (with overlap on this should go toward zero: the disk work hides behind the model)

Usage: python benchmarks/batch.py [--images 50] [--size 128x96] [--modes stage1,full] [--repeats 1]
       [--full-images N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESTORE_SHARED_DIR", REPO.parent / "shared"))
MODEL = SHARED / "reference" / "model_v.json"


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=2) * 200 + 20 * (i % 5)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def run_loop(pipe, opts, photos: list[Path], outdir: Path, overlap: bool) -> dict:
    from restorecli.run.loop import run_batch
    from restorecli.run.plan import Job

    outdir.mkdir(parents=True, exist_ok=True)
    entries = [Job(str(p), str(outdir / f"{p.stem}_restored.png")) for p in photos]
    summary = run_batch(entries, lambda: pipe, opts, fmt="png", overwrite=True, overlap=overlap)
    assert summary.ok == len(photos), [r.error for r in summary.failures]
    n = len(photos)
    return {
        "wall": summary.seconds,
        "rate": n / summary.seconds * 60,
        "model": summary.model_seconds / n,
        "outside": (summary.seconds - summary.model_seconds) / n,
    }


def bench_mode(mode: str, photos: list[Path], work: Path, repeats: int) -> list[dict]:
    from restorecli.pipeline.build import load_pipeline
    from restorecli.settings import LoadSettings, default_settings

    opts = default_settings("custom", "sr").replace(stage1_only=(mode == "stage1"), steps=1)
    t0 = time.perf_counter()
    pipe = load_pipeline(LoadSettings(model=str(MODEL), device="cpu", captioner="none"), stage1_only=opts.stage1_only)
    load_s = time.perf_counter() - t0
    run_loop(pipe, opts, photos[:1], work / "warmup", overlap=False)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(repeats):
        for overlap in (False, True):
            runs[overlap].append(run_loop(pipe, opts, photos, work / f"{mode}-{overlap}-{r}", overlap))
            print(f"  {mode} overlap={'on' if overlap else 'off'} run {r + 1}: {runs[overlap][-1]['wall']:.1f} s",
                  file=sys.stderr, flush=True)
    rows = []
    for overlap in (False, True):
        med = {k: statistics.median(run[k] for run in runs[overlap]) for k in runs[overlap][0]}
        rows.append({"mode": mode, "overlap": "on" if overlap else "off", "images": len(photos), "load": load_s, **med})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--full-images", type=int, default=None, help="images for the full mode [default: --images]")
    parser.add_argument("--size", default="128x96")
    parser.add_argument("--modes", default="stage1,full")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not MODEL.is_file():
        sys.exit(f"tiny model not found at {MODEL}")
    import warnings

    warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="restore-bench-") as tmp:
        work = Path(tmp)
        photos = make_photos(work / "in", max(args.images, args.full_images or 0), size)
        for mode in args.modes.split(","):
            n = args.full_images if mode == "full" and args.full_images else args.images
            print(f"{mode}: {n} images of {size[0]}x{size[1]} ...", file=sys.stderr, flush=True)
            rows += bench_mode(mode, photos[:n], work, args.repeats)
    print(f"\nrestore batch loop, tiny model ({MODEL.name}), CPU, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, {args.repeats} run(s) each (median)\n")
    header = f"{'mode':<8} {'overlap':<8} {'images':>6} {'load s':>7} {'wall s':>8} {'img/min':>8} {'model s/img':>12} {'outside s/img':>14}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<8} {r['overlap']:<8} {r['images']:>6} {r['load']:>7.1f} {r['wall']:>8.1f} {r['rate']:>8.1f} "
              f"{r['model']:>12.3f} {r['outside']:>14.3f}")


if __name__ == "__main__":
    main()
