"""Stage-1 time and peak memory of the FULL-SIZE DiffBIR SwinIR (random weights, no download).

The model is spandrel's SwinIR class with the official hyperparameters of configs/inference/swinir.yaml
(PIPELINE.md 3.1: embed_dim 180, depths/heads [6]*8, window 8, mlp_ratio 2, 8x unshuffle, nearest+conv),
loaded back through `restorecli.stage1.cleaners.load_cleaner` like a real checkpoint. Each configuration
runs in a fresh process, `restorecli.stage1.run.apply_cleaner` on a random size x size image:

* untiled: the official untiled path (the image is >= 512, so no resize; zero-pad to 64);
* tiled: the official tiled path, --cleaner-tile-size 512 --cleaner-tile-stride 256.

Peak memory. CPU: the process's peak resident set (``ru_maxrss``: imports + model + stage 1), and the
stage-1 part alone: the kernel's high-water mark is reset just before the call (``5 > /proc/self/clear_refs``)
and ``VmHWM`` minus the resident size at that moment is reported. The children run with glibc told to
give freed memory back at once (``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=0``; ``--keep-malloc``
turns this off) so that the resident set follows live tensors: with the default allocator, the same
512^2 pass measured 230-300 MiB from run to run, depending on what the heap kept from model loading. CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` (the weights are counted in "process").

Acceptance (issue 4): peak memory at 2048^2 tiled within 1.5x of 512^2.

Usage: python benchmarks/stage1.py [--sizes 512,1024,2048] [--modes untiled,tiled] [--devices cpu[,cuda]]
       [--dtype fp32|bf16|fp16] [--skip-untiled-above N] [--threads N]
       python benchmarks/stage1.py --measure   # bytes per pixel of swinir, bsrnet, scunet (restorecli/stage1/memory.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import hwm_bytes, reset_hwm, rss_bytes  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TILE, STRIDE = 512, 256


def _full_size_state_dict(arch: str):
    """Random weights in the official full-size layout, built by spandrel's classes (no manifest needed)."""
    import torch

    torch.manual_seed(0)
    if arch == "swinir":
        from spandrel.architectures.SwinIR import SwinIR

        model = SwinIR(img_size=64, patch_size=1, in_chans=3, embed_dim=180, depths=[6] * 8, num_heads=[6] * 8,
                       window_size=8, mlp_ratio=2.0, upscale=8, img_range=1.0, upsampler="nearest+conv",
                       resi_connection="1conv", start_unshuffle=8)
    elif arch == "bsrnet":
        from spandrel.architectures.ESRGAN import ESRGAN

        model = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4)
    elif arch == "scunet":
        from spandrel.architectures.SCUNet import SCUNet

        model = SCUNet(in_nc=3, config=[4] * 7, dim=64)
    else:
        raise ValueError(arch)
    sd = model.state_dict()
    if arch == "swinir":  # the official file stores the unshuffle conv as conv_first.1 (Sequential(unshuffle, conv))
        sd = {("conv_first.1." + k.split(".", 1)[1]) if k.startswith("conv_first.") else k: v for k, v in sd.items()}
    return sd


def child(size: int, mode: str, device: str, dtype_name: str, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from restorecli.stage1.cleaners import load_cleaner
    from restorecli.stage1.run import apply_cleaner

    torch.set_num_threads(threads)
    cleaner = load_cleaner(_full_size_state_dict("swinir"), device=device, dtype=getattr(torch, DTYPES[dtype_name]),
                           name="swinir_full")
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
    tile = dict(tile_size=TILE, tile_stride=STRIDE) if mode == "tiled" else {}
    if device == "cuda":
        apply_cleaner(x[..., :64, :64], cleaner)  # warm-up (cuDNN, kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    import gc

    gc.collect()
    before = rss_bytes()
    reset = reset_hwm()
    start = time.perf_counter()
    result = apply_cleaner(x, cleaner, max_memory=1 << 50, **tile)  # huge budget: never auto-tile here
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {
        "size": size, "mode": mode, "device": device, "dtype": str(cleaner.dtype).removeprefix("torch."),
        "seconds": round(seconds, 2), "tile": result.tile, "cond": list(result.cond_img.shape[-2:]),
        "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device == "cuda":
        out["stage1_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    elif reset:
        out["stage1_peak_mib"] = round((hwm_bytes() - before) / 2**20, 1)
    return out


def measure(threads: int) -> None:
    """Bytes per input pixel of one forward pass (slope between two sizes), as in restorecli/stage1/memory.py."""
    sizes = {"swinir": (512, 768), "bsrnet": (64, 128), "scunet": (128, 256)}
    for arch, (small, large) in sizes.items():
        peaks = []
        for size in (small, large):
            proc = subprocess.run([sys.executable, __file__, "--measure-child", arch, str(size), "--threads", str(threads)],
                                  capture_output=True, text=True, check=True, env=_child_env(False))
            peaks.append(json.loads(proc.stdout.strip().splitlines()[-1])["delta_bytes"])
        slope = (peaks[1] - peaks[0]) / (large**2 - small**2)
        print(f"{arch:7s} {slope:8.0f} bytes per input pixel  (peaks {peaks[0] / 2**20:.0f} MiB at {small}^2, "
              f"{peaks[1] / 2**20:.0f} MiB at {large}^2)")


def measure_child(arch: str, size: int, threads: int) -> None:
    import gc

    import spandrel
    import torch

    torch.set_num_threads(threads)
    model = spandrel.ModelLoader().load_from_state_dict(_full_size_state_dict(arch)).model.eval()
    x = torch.rand(1, 3, size, size)
    gc.collect()
    before = rss_bytes()
    if not reset_hwm():
        raise SystemExit("--measure needs Linux /proc/self/clear_refs")
    with torch.no_grad():
        model(x)
    print(json.dumps({"delta_bytes": hwm_bytes() - before}))


def _child_env(keep_malloc: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not keep_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="0")
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--modes", default="untiled,tiled")
    p.add_argument("--devices", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--skip-untiled-above", type=int, default=4096, help="skip untiled runs of larger sizes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--measure", action="store_true")
    p.add_argument("--keep-malloc", action="store_true", help="do not tune glibc malloc in the children")
    p.add_argument("--child", nargs=3, metavar=("SIZE", "MODE", "DEVICE"), help=argparse.SUPPRESS)
    p.add_argument("--measure-child", nargs=2, metavar=("ARCH", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        size, mode, device = args.child
        print(json.dumps(child(int(size), mode, device, args.dtype, args.threads)))
        return
    if args.measure_child:
        measure_child(args.measure_child[0], int(args.measure_child[1]), args.threads)
        return
    if args.measure:
        measure(args.threads)
        return

    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    rows = []
    print(f"full-size SwinIR, {args.dtype}, {args.threads} threads, tiles {TILE}/{STRIDE}", flush=True)
    header = f"{'device':6s} {'size':>6s} {'mode':8s} {'seconds':>8s} {'stage-1 peak MiB':>17s} {'process peak MiB':>17s}"
    print(header, flush=True)
    for device in devices:
        for size in sizes:
            for mode in modes:
                if mode == "untiled" and size > args.skip_untiled_above:
                    continue
                cmd = [sys.executable, __file__, "--child", str(size), mode, device, "--dtype", args.dtype,
                       "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(args.keep_malloc))
                if proc.returncode != 0:
                    print(f"{device:6s} {size:6d} {mode:8s} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{device:6s} {size:6d} {mode:8s} {row['seconds']:8.2f} {row.get('stage1_peak_mib', float('nan')):17.1f} "
                      f"{row['process_peak_mib']:17.1f}", flush=True)
    for device in devices:
        def peak(size, mode, key):
            return next((r[key] for r in rows if (r["device"], r["size"], r["mode"]) == (device, size, mode) and key in r), None)

        small = peak(512, "tiled", "stage1_peak_mib") or peak(512, "untiled", "stage1_peak_mib")
        big = peak(2048, "tiled", "stage1_peak_mib")
        if small and big:
            verdict = "PASS" if big <= 1.5 * small else "FAIL"
            print(f"{device}: stage-1 peak 2048^2 tiled / 512^2 = {big / small:.2f} (limit 1.5): {verdict}")
        small_p, big_p = peak(512, "tiled", "process_peak_mib"), peak(2048, "tiled", "process_peak_mib")
        if small_p and big_p and device == "cpu":
            print(f"{device}: process peak 2048^2 tiled / 512^2 = {big_p / small_p:.2f}")


if __name__ == "__main__":
    main()
