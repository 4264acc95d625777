"""Untiled VAE vs our exact tiled VAE vs diffusers' enable_tiling, on the full-size SD VAE architecture.

    python benchmarks/tiled_vae.py                  # 512^2 and 1024^2, encode and decode (~10 min, 2 idle cores)
    python benchmarks/tiled_vae.py --sizes 2048 --parts decode
    python benchmarks/tiled_vae.py --dtype float16         # on a GPU

The VAE is AutoencoderKL with SD 2.1's architecture (block_out_channels 128/256/512/512, two layers per
block, 32 groups) and random weights: nothing is downloaded. Every configuration runs in its own
subprocess so that its peak memory is its own: CPU peak RSS during the call (VmHWM after clearing it,
or ru_maxrss; "over base" subtracts the RSS before the call: Python, torch and the model), CUDA
max_memory_allocated. Wall and process CPU time of the call alone (on a shared machine the CPU time
is the steadier of the two). "est" is restorecli's estimate_peak_bytes for the same call.
The seam error is max|out - untiled| / max|untiled| (and the mean absolute error), measured where the
untiled run fits in memory. Tiles: ours and diffusers' both get `--tile` image pixels (decoder: tile/8
latent pixels); diffusers overlaps its tiles by 25% and blends them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import hwm_bytes, reset_hwm, rss_bytes  # noqa: E402
from restorecli.models.configs import full_size_configs  # noqa: E402

SD_VAE = {**full_size_configs().vae, "sample_size": 512}  # sample_size: diffusers' enable_tiling tile, 512 px
METHODS = ("untiled", "ours", "diffusers")


# ------------------------------------------------------------------------------------------ worker


def worker(cfg: dict) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from restorecli.vae.tiled import estimate_peak_bytes, tiled_decode, tiled_encode

    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval().to(device=device, dtype=dtype)
    s, part, method, tile = cfg["size"], cfg["part"], cfg["method"], cfg["tile"]
    g = torch.Generator().manual_seed(1)
    if part == "encode":
        ramp = torch.linspace(-0.5, 0.5, s)
        inp = (torch.rand(1, 3, s, s, generator=g) * 1.5 - 0.75 + ramp).clamp(-1, 1)
    else:
        inp = torch.randn(1, 4, s // 8, s // 8, generator=g)
    inp = inp.to(device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            if method == "untiled":
                if part == "encode":
                    return vae.quant_conv(vae.encoder(inp))
                return vae.decoder(vae.post_quant_conv(inp))
            if method == "ours":
                if part == "encode":
                    return tiled_encode(vae, inp, tile_size=tile, offload=cfg["offload"])
                return tiled_decode(vae, inp, tile_size=tile // 8, offload=cfg["offload"])
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
            if part == "encode":
                return vae.encode(inp).latent_dist.parameters
            return vae.decode(inp).sample

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated()
    reset_hwm()
    base_rss = rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {"time_s": dt, "cpu_s": cpu, "rss_peak": hwm_bytes(), "rss_base": base_rss}
    if device.type == "cuda":
        res["dev_peak"] = torch.cuda.max_memory_allocated() - base_dev
    est_tile = None if method == "untiled" else (tile if part == "encode" else tile // 8)
    if method != "diffusers":
        res["est"] = estimate_peak_bytes(
            vae.config, s, s, est_tile, dtype, part=part, offload=bool(cfg["offload"]) and method == "ours"
        )
    out = out.float().cpu()
    ref_path = Path(cfg["ref"])
    if method == "untiled":
        torch.save(out, ref_path)
    elif ref_path.is_file():
        ref = torch.load(ref_path)
        diff = (out - ref).abs()
        res["rel_err"] = (diff.max() / ref.abs().max()).item()
        res["mean_abs_err"] = diff.mean().item()
    return res


# ------------------------------------------------------------------------------------------ driver


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square image sides (pixels)")
    ap.add_argument("--parts", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tile", type=int, default=256, help="tile side in image pixels (decoder: /8 latent)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--offload", action="store_true", help="ours: paused tiles in host memory (GPU)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    from restorecli.vae.tiled import estimate_peak_bytes

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
        free_b = torch.cuda.mem_get_info()[0]
        where = f"{gpu}, {args.dtype}"
    else:
        free_b = _available_bytes()
        where = f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), {args.dtype}"
    print(f"# tiled VAE benchmark: SD VAE architecture, random weights; {where}; tile {args.tile} px", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            for s in args.sizes:
                ref = os.path.join(tmp, f"{part}{s}.pt")
                for method in args.methods:
                    cfg = dict(size=s, part=part, method=method, tile=args.tile, device=device,
                               dtype=args.dtype, offload=args.offload, ref=ref)
                    row = dict(part=part, size=s, method=method)
                    if method == "untiled":
                        need = estimate_peak_bytes(SD_VAE, s, s, None, dtype, part=part)
                        if device == "cpu":
                            need = int(need * 1.5)  # oneDNN's reordered copies, measured ~1.4x here
                        if need > 0.8 * free_b:
                            row["note"] = f"skipped: needs ~{need / 2**30:.0f} GiB"
                            rows.append(row)
                            print(_line(row), flush=True)
                            continue
                    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                                          capture_output=True, text=True)
                    if proc.returncode != 0:
                        row["note"] = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
                    else:
                        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                    rows.append(row)
                    print(_line(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print()
    print(_table(rows, device == "cuda"))
    return 0


def _line(r) -> str:
    return f"  {r['part']} {r['size']} {r['method']}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in ("part", "size", "method")
    )


def _table(rows, cuda: bool) -> str:
    head = ["part", "size", "method", "wall s", "CPU s", "peak RSS GiB", "RSS over base GiB"]
    if cuda:
        head.append("CUDA peak GiB")
    head += ["est GiB", "seam err (rel max)", "mean abs err"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "note" in r:
            cells = [r["part"], f"{r['size']}²", r["method"], r["note"]] + [""] * (len(head) - 4)
        else:
            cells = [
                r["part"], f"{r['size']}²", r["method"], f"{r['time_s']:.1f}", f"{r['cpu_s']:.1f}",
                _fmt_bytes(r["rss_peak"]),
                _fmt_bytes(r["rss_peak"] - r["rss_base"]),
            ]
            if cuda:
                cells.append(_fmt_bytes(r.get("dev_peak")))
            cells += [
                _fmt_bytes(r.get("est")),
                "ref" if r["method"] == "untiled" else (f"{r['rel_err']:.2e}" if "rel_err" in r else "-"),
                "" if r["method"] == "untiled" else (f"{r['mean_abs_err']:.2e}" if "mean_abs_err" in r else "-"),
            ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
