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

Two more modes (stage 1 only, the same photos) measure the engines of `restore batch --devices` and
`--ray` against that loop:

* workers: images per minute of `run.workers.run_on_devices` with 1 worker (`--devices cpu`) and 2
  (`--devices cpu,cpu`), the CPUs shared out between them, next to the in-process loop. The wall time
  includes starting the workers and loading the models in each (`first s`: when the first result came);
  `steady img/min` counts from the first result to the last.
* ray: the same images through `run.ray_batch.run_on_ray` on a local Ray (`ray.init(num_cpus=N)`, started
  and warmed up before timing; each run still starts its actor and loads the model), one CPU actor, next
  to the in-process loop; `overhead s/file` = (Ray wall - loop wall) / N.

Usage: python benchmarks/batch.py [--images 50] [--size 128x96] [--modes stage1,full,workers,ray] [--repeats 1]
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


def bench_workers(photos: list[Path], work: Path) -> list[dict]:
    """1 and 2 CPU workers (`--devices cpu` / `cpu,cpu`) against the in-process loop, stage 1 only."""
    from restorecli.pipeline.build import load_pipeline
    from restorecli.run.loader import PipelineLoader
    from restorecli.run.loop import BatchEvents
    from restorecli.run.plan import Job
    from restorecli.run.workers import run_on_devices
    from restorecli.settings import LoadSettings, default_settings

    opts = default_settings("custom", "sr").replace(stage1_only=True)
    load = LoadSettings(model=str(MODEL), device="cpu")
    rows = []

    class Clock(BatchEvents):
        def __init__(self):
            self.start, self.times = time.perf_counter(), []

        def result(self, index, result):
            self.times.append(time.perf_counter() - self.start)

    pipe = load_pipeline(load, stage1_only=True)
    run_loop(pipe, opts, photos[:1], work / "warmup-loop", overlap=False)
    loop = run_loop(pipe, opts, photos, work / "loop", overlap=True)
    rows.append({"engine": "loop (1 process)", "wall": loop["wall"], "rate": loop["rate"], "first": None, "steady": None})
    del pipe
    for devices in (["cpu"], ["cpu", "cpu"]):
        outdir = work / f"workers-{len(devices)}"
        outdir.mkdir()
        entries = [Job(str(p), str(outdir / f"{p.stem}_restored.png")) for p in photos]
        clock = Clock()
        summary = run_on_devices(entries, PipelineLoader(load, True), opts, devices, fmt="png", overwrite=True,
                                 events=clock)
        assert summary.ok == len(photos), [r.error for r in summary.failures]
        first, last = clock.times[0], clock.times[-1]
        steady = (len(photos) - 1) / (last - first) * 60 if last > first else None
        rows.append({"engine": f"--devices {','.join(devices)}", "wall": summary.seconds,
                     "rate": len(photos) / summary.seconds * 60, "first": first, "steady": steady})
        print(f"  workers {len(devices)}: {summary.seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def bench_ray(photos: list[Path], work: Path, cpus: int) -> list[dict]:
    """`run_on_ray` (one CPU actor, local Ray of `cpus` CPUs) against the in-process loop, stage 1 only."""
    import logging

    import ray

    from restorecli.pipeline.build import load_pipeline
    from restorecli.run.loader import PipelineLoader
    from restorecli.run.plan import Job
    from restorecli.run.ray_batch import run_on_ray
    from restorecli.settings import LoadSettings, default_settings

    opts = default_settings("custom", "sr").replace(stage1_only=True)
    load = LoadSettings(model=str(MODEL), device="cpu")
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    init_s = time.perf_counter() - t0

    def ray_run(subset, name):
        outdir = work / name
        outdir.mkdir()
        entries = [Job(str(p), str(outdir / f"{p.stem}_restored.png")) for p in subset]
        summary = run_on_ray(entries, PipelineLoader(load, True), opts, workers=1, fmt="png", overwrite=True)
        assert summary.ok == len(subset), [r.error for r in summary.failures]
        return summary.seconds

    one = ray_run(photos[:1], "ray-warmup")  # imports on the Ray workers, actor start, model load
    wall = ray_run(photos, "ray")
    ray.shutdown()
    torch_threads = max(1, cpus // 2)
    import torch

    torch.set_num_threads(torch_threads)
    pipe = load_pipeline(load, stage1_only=True)
    run_loop(pipe, opts, photos[:1], work / "warmup-loop-ray", overlap=False)
    loop = run_loop(pipe, opts, photos, work / "loop-ray", overlap=True)
    n = len(photos)
    return [{"engine": f"loop, {torch_threads} thread(s)", "wall": loop["wall"], "per_file": loop["wall"] / n,
             "overhead": None, "init": None, "one": None},
            {"engine": "ray, 1 CPU actor", "wall": wall, "per_file": wall / n, "overhead": (wall - loop["wall"]) / n,
             "init": init_s, "one": one}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--full-images", type=int, default=None, help="images for the full mode [default: --images]")
    parser.add_argument("--size", default="128x96")
    parser.add_argument("--modes", default="stage1,full", help="stage1, full, workers, ray (comma-separated)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray in the ray mode")
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
    threads = torch.get_num_threads()  # the loop's (the ray mode lowers it for its own loop)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="restore-bench-") as tmp:
        work = Path(tmp)
        photos = make_photos(work / "in", max(args.images, args.full_images or 0), size)
        modes = args.modes.split(",")
        for mode in [m for m in modes if m in ("stage1", "full")]:
            n = args.full_images if mode == "full" and args.full_images else args.images
            print(f"{mode}: {n} images of {size[0]}x{size[1]} ...", file=sys.stderr, flush=True)
            rows += bench_mode(mode, photos[:n], work, args.repeats)
        workers = bench_workers(photos[: args.images], work) if "workers" in modes else []
        rays = bench_ray(photos[: args.images], work, args.ray_cpus) if "ray" in modes else []
    print(f"\nrestore batch loop, tiny model ({MODEL.name}), CPU, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, {args.repeats} run(s) each (median)\n")
    header = f"{'mode':<8} {'overlap':<8} {'images':>6} {'load s':>7} {'wall s':>8} {'img/min':>8} {'model s/img':>12} {'outside s/img':>14}"
    if rows:
        print(header)
        print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<8} {r['overlap']:<8} {r['images']:>6} {r['load']:>7.1f} {r['wall']:>8.1f} {r['rate']:>8.1f} "
              f"{r['model']:>12.3f} {r['outside']:>14.3f}")
    if workers:
        print(f"\nworkers, stage 1 only, {args.images} images, the CPUs shared out between the workers\n")
        header = f"{'engine':<20} {'wall s':>8} {'img/min':>8} {'first s':>8} {'steady img/min':>15}"
        print(header)
        print("-" * len(header))
        for r in workers:
            first = f"{r['first']:.1f}" if r["first"] is not None else "-"
            steady = f"{r['steady']:.1f}" if r["steady"] is not None else "-"
            print(f"{r['engine']:<20} {r['wall']:>8.1f} {r['rate']:>8.1f} {first:>8} {steady:>15}")
    if rays:
        print(f"\nRay Data path against the loop, stage 1 only, {args.images} images, local Ray of {args.ray_cpus} CPUs "
              f"(ray.init {rays[1]['init']:.1f} s, a 1-image run {rays[1]['one']:.1f} s)\n")
        header = f"{'engine':<20} {'wall s':>8} {'s/file':>8} {'overhead s/file':>16}"
        print(header)
        print("-" * len(header))
        for r in rays:
            overhead = f"{r['overhead']:.3f}" if r["overhead"] is not None else "-"
            print(f"{r['engine']:<20} {r['wall']:>8.1f} {r['per_file']:>8.3f} {overhead:>16}")


if __name__ == "__main__":
    main()
