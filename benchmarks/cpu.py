"""The default CPU restoration against the official DiffBIR code, side by side, on the same weights
(issue 16: "the default CPU run takes at most half the official restore time").

    python benchmarks/cpu.py --official /tmp/DiffBIR            # official rows + every restorecli row
    python benchmarks/cpu.py --official /tmp/DiffBIR --runs 2 --variants official-fp32,fp32,auto
    python benchmarks/cpu.py --official /tmp/DiffBIR --variants auto,auto-compile

`--official DIR` is a fetched copy of github.com/XPixelGroup/DiffBIR (HEAD, v2.1 code; never committed)
with its Python dependencies importable (omegaconf, einops, timm, ftfy, regex, accelerate, pandas,
polars, torchsde: `pip install` them next to torch). Its CUDA-only calls (the VRAM monitors, which call
`torch.cuda.max_memory_allocated`) are replaced by no-ops, `torch.Tuple` (an annotation of
edm_sampler.py that newer torch no longer has) is given back as `typing.Tuple`, and its `load_model_from_url` reads the
benchmark's local files instead of downloading; nothing else of it is changed.

The weights. The first run builds the FULL-SIZE v2.1 architecture with the official classes and their
own random initialisation (`configs/inference/cldm.yaml`, `swinir.yaml`), saves it in the official
checkpoint layouts (`sd.ckpt`, `controlnet.pth`, `swinir.pth`, about 7 GB) with a restorecli model
description (`model.json`) in `--weights` (default `$RESTORE_HOME/bench-cpu`), so both programs load the
same files. restorecli's first load converts them to its cached layout; that one-off conversion is
done (and timed) before the rows, so each row's load is the everyday load.

The rows (each in its own process, `--runs` interleaved rounds; `--threads` threads each):

    official-fp32   the official `BSRInferenceLoop` (v2.1, sr, x4, captioner none), --precision fp32
    official-bf16   the same with --precision bf16 (torch.autocast)
    fp32            restorecli --precision fp32 (upstream's call pattern: bit for bit the official code)
    bf16-unbatched  restorecli --precision bf16, cond and uncond in two calls (upstream's pattern)
    auto            restorecli's default: `--precision auto` (bf16 on a CPU with AVX512-BF16/AMX, cond +
                    uncond in one batched call)
    bf16-nchw-vae   the default with the VAE in NCHW (before the channels-last bf16 VAE)
    auto-tunables   the default in a process started with GLIBC_TUNABLES (below): freed memory reused
    auto-compile    the default + `--compile` (torch.compile of the UNet and IRControlNet): one image to
                    compile, then the same image again warm
    auto-glibc      the default without its trim of glibc's heap after each stage (a malloc option set by
                    the user, here glibc's own default, makes restorecli leave glibc alone:
                    `restorecli.memory.trim_freed_memory`)
    auto-mmap-128k, auto-mmap-1m, auto-mmap-4m
                    the default with glibc's mmap and trim thresholds fixed at that size (MALLOC_*_ at start):
                    freed memory goes back at once, at the price of faulting in every block above it

The input is a synthetic 128x128 photo-like image (gradients, discs, text-like stripes, mild noise),
restored to 512x512 with v2.1's defaults: edm_dpm++_3m_sde, 10 steps, cfg 6, the official prompts.
Columns: wall seconds of the whole restoration (stage 1 -> PNG-ready pixels, after the models are
loaded; memory-mapped weights are read during loading), of the sampler, of the VAE decode, of loading,
and the process's peak resident memory; PSNR of the 8-bit result against the same program's fp32 one.
The two programs' outputs are not compared with each other: the official SDE samplers draw their noise
from a k-diffusion Brownian tree, restorecli from the seeded generator (`../shared/reference/README.md`,
"Randomness contract"); that the fp32 arithmetic is the official one is what the parity tests check.

Why upstream's fp32 decode looked faster: glibc maps every block above 32 MiB afresh and unmaps it on
free, so each new feature map is pages the kernel faults in and zeroes (2-3 s of system time in a
10 s decode here). The official process reuses the 16 GB heap its `torch.load`s freed instead. The
`auto-tunables` row shows what reusing freed memory is worth (GLIBC_TUNABLES, set before the process
starts; glibc offers no way to drop its per-thread cache later, and without that the heap grows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    GLIBC_TUNABLES, GLIBC_UNTOUCHED, REPO, TOKENIZER, child_env, fixed_mmap_threshold, hwm_bytes, load_average, run_child,
)

sys.path.insert(0, str(REPO / "src"))

VARIANTS = ("official-fp32", "official-bf16", "fp32", "bf16-unbatched", "bf16-nchw-vae", "auto", "auto-tunables",
            "auto-compile", "auto-glibc", "auto-mmap-128k", "auto-mmap-1m", "auto-mmap-4m")
DEFAULT_VARIANTS = ("official-fp32", "fp32", "bf16-unbatched", "bf16-nchw-vae", "auto", "auto-tunables")
SEED = 231
SIZE = 128


def default_weights_dir() -> Path:
    from restorecli.weights.paths import weights_home

    return weights_home() / "bench-cpu"


# ------------------------------------------------------------------------------------------ the input


def synthetic_photo(size: int = SIZE):
    """A deterministic, photo-like RGB image (smooth gradients, shapes, fine stripes, a little noise)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.6 * x + 0.2, 0.4 + 0.3 * np.sin(6 * y), 0.8 - 0.5 * x * y], -1)
    img = Image.fromarray((base * 255).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((size * 0.15, size * 0.2, size * 0.5, size * 0.55), fill=(200, 60, 40))
    draw.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.85), fill=(30, 90, 160))
    for i in range(8):
        draw.line((size * 0.1, size * (0.65 + 0.03 * i), size * 0.45, size * (0.65 + 0.03 * i)), fill=(20, 20, 20))
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    noise = np.random.default_rng(0).normal(0, 4, (size, size, 3))
    return Image.fromarray((np.asarray(img, dtype=np.float64) + noise).clip(0, 255).astype(np.uint8))


def psnr(a_path: str, b_path: str) -> float | None:
    import numpy as np
    from PIL import Image

    try:
        a = np.asarray(Image.open(a_path).convert("RGB"), dtype=np.float64)
        b = np.asarray(Image.open(b_path).convert("RGB"), dtype=np.float64)
    except OSError:
        return None
    if a.shape != b.shape:
        return None
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# ------------------------------------------------------------------------------------------ official code


def _official_imports(official: Path):
    os.chdir(official)  # its loops read configs/inference/*.yaml by relative path
    sys.path.insert(0, str(official))
    import typing

    import torch
    from omegaconf import OmegaConf

    if not hasattr(torch, "Tuple"):  # edm_sampler.py annotates with `torch.Tuple`, gone from newer torch
        torch.Tuple = typing.Tuple
    return torch, OmegaConf


def make_weights_child(args) -> dict:
    """Build the official full-size modules (their own random init), save them in the official layouts."""
    torch, OmegaConf = _official_imports(Path(args.official))
    from diffbir.utils.common import instantiate_from_config

    out = Path(args.weights)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cldm = instantiate_from_config(OmegaConf.load("configs/inference/cldm.yaml"))
    sd = {}
    for prefix, module in (("model.diffusion_model", cldm.unet), ("first_stage_model", cldm.vae),
                           ("cond_stage_model", cldm.clip)):
        sd.update({f"{prefix}.{k}": v.contiguous() for k, v in module.state_dict().items()})
    torch.save({"state_dict": sd}, out / "sd.ckpt.part")
    torch.save({k: v.contiguous() for k, v in cldm.controlnet.state_dict().items()}, out / "controlnet.pth.part")
    cleaner = instantiate_from_config(OmegaConf.load("configs/inference/swinir.yaml"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in cleaner.state_dict().items()}}, out / "swinir.pth.part")

    cldm_params = OmegaConf.to_container(OmegaConf.load("configs/inference/cldm.yaml").params)
    diffusion = OmegaConf.to_container(OmegaConf.load("configs/inference/diffusion_v2.1.yaml").params)
    swinir = OmegaConf.to_container(OmegaConf.load("configs/inference/swinir.yaml").params)
    description = {
        "format": "restorecli-model/1",
        "cleaner": {"arch": "swinir", "params": swinir, "checkpoint": "swinir.pth"},
        "cldm": {"params": cldm_params, "sd_checkpoint": "sd.ckpt", "controlnet_checkpoint": "controlnet.pth"},
        "diffusion": {"params": diffusion},
        "tokenizer": str(TOKENIZER),
    }
    for name in ("sd.ckpt", "controlnet.pth", "swinir.pth"):
        (out / f"{name}.part").replace(out / name)
    (out / "model.json").write_text(json.dumps(description, indent=1))
    return {"seconds": time.perf_counter() - t0, "bytes": sum((out / n).stat().st_size
                                                              for n in ("sd.ckpt", "controlnet.pth", "swinir.pth"))}


class _Timer:
    """Accumulated wall seconds of the wrapped callables, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str):
        original = getattr(owner, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def official_child(args, precision: str) -> dict:
    torch, _ = _official_imports(Path(args.official))
    torch.set_num_threads(args.threads)
    import diffbir.inference.bsr_loop as bsr_loop
    import diffbir.inference.loop as loop_mod
    import diffbir.model.cldm as cldm_mod
    import diffbir.pipeline as pipeline_mod
    import diffbir.sampler as sampler_mod
    import diffbir.utils.common as common_mod
    import inference as official_cli
    from accelerate.utils import set_seed

    weights = Path(args.weights)
    files = {"sd2.1-base-zsnr-laionaes5.ckpt": "sd.ckpt", "DiffBIR_v2.1.pt": "controlnet.pth",
             "realesrgan_s4_swinir_100k.pth": "swinir.pth"}

    def local_weights(url: str):
        sd = torch.load(weights / files[url.rsplit("/", 1)[-1]], map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        if next(iter(sd)).startswith("module"):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        return sd

    for mod in (loop_mod, bsr_loop):
        mod.load_model_from_url = local_weights
    # the VRAM monitors (used by the loop and the pipeline) call torch.cuda: no-ops on the CPU
    common_mod.VRAMPeakMonitor.__enter__ = lambda self: self
    common_mod.VRAMPeakMonitor.__exit__ = lambda self, *exc: False

    timer = _Timer()
    timer.wrap(pipeline_mod.SwinIRPipeline, "apply_cleaner", "stage 1")
    timer.wrap(cldm_mod.ControlLDM, "vae_encode", "encode")
    timer.wrap(cldm_mod.ControlLDM, "vae_decode", "decode")
    for name in dir(sampler_mod):
        cls = getattr(sampler_mod, name)
        if isinstance(cls, type) and "sample" in cls.__dict__:
            timer.wrap(cls, "sample", "sampling")

    inputs, outputs = Path(args.work) / "in", Path(args.work) / f"out-{args.variant}"
    sys.argv = ["inference.py", "--task", "sr", "--upscale", "4", "--version", "v2.1", "--captioner", "none",
                "--steps", str(args.steps), "--input", str(inputs), "--output", str(outputs), "--device", "cpu",
                "--precision", precision, "--seed", str(SEED)]
    cli_args = official_cli.parse_args()
    set_seed(cli_args.seed)
    t0 = time.perf_counter()
    loop = bsr_loop.BSRInferenceLoop(cli_args)
    load_s = time.perf_counter() - t0
    timer.seconds.clear()
    t0 = time.perf_counter()
    loop.run()
    restore_s = time.perf_counter() - t0
    return {"load_s": load_s, "restore_s": restore_s, "stages": dict(timer.seconds), "peak_rss": hwm_bytes(),
            "output": str(outputs / "photo.png"), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ restorecli


def read_every_page(pipe) -> None:
    """Touch one element per 4 KiB page of every weight, so a row's restore never reads the disk (safetensors
    maps the cached files; what another row's 16 GB evicted from the page cache would be read mid-sampling)."""
    import torch

    modules = [getattr(pipe, name, None) for name in ("unet", "controlnet", "vae", "text_encoder")]
    modules.append(getattr(getattr(pipe, "cleaner", None), "model", None))
    with torch.no_grad():
        for module in (m for m in modules if isinstance(m, torch.nn.Module)):
            for t in list(module.parameters()) + list(module.buffers()):
                flat = t.detach().reshape(-1)
                flat[:: max(1, 4096 // t.element_size())].sum()


def restorecli_child(args) -> dict:
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    from restorecli import DiffBIRPipeline
    from restorecli.pipeline.precision import resolve_dtype

    variant = args.variant
    precision = {"fp32": "fp32", "bf16-unbatched": "bf16"}.get(variant, "auto")
    dtype = resolve_dtype(precision, torch.device("cpu"))
    t0 = time.perf_counter()
    pipe = DiffBIRPipeline.from_description(Path(args.weights) / "model.json", device="cpu", torch_dtype=dtype,
                                            captioner="none", compile=variant.endswith("compile"))
    read_every_page(pipe)  # memory-mapped weights are read lazily: count the reading as loading, as upstream's
    load_s = time.perf_counter() - t0
    if variant == "bf16-unbatched":
        pipe.batch_cfg = False
    if variant == "bf16-nchw-vae":
        pipe.vae.to(memory_format=torch.contiguous_format)
    lq = Image.open(Path(args.work) / "in" / "photo.png")

    def once():
        stages: dict[str, float] = {}

        class Monitor:
            def __init__(self, name):
                self.name = name

            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stages[self.name] = stages.get(self.name, 0.0) + time.perf_counter() - self.t
                return False

        pipe.stage_monitor = Monitor
        t = time.perf_counter()
        out = pipe(lq, seed=SEED, output_type="pil", steps=args.steps, upscale=4)
        return out, time.perf_counter() - t, stages

    out, restore_s, stages = once()
    row = {"load_s": load_s, "restore_s": restore_s, "stages": stages, "dtype": str(dtype).removeprefix("torch."),
           "batched_cfg": pipe.cfg_batching(), "threads": torch.get_num_threads()}
    if variant.endswith("compile"):  # the first image compiled; the same image again, warm
        out, restore_s, stages = once()
        row.update(first_restore_s=row["restore_s"], restore_s=restore_s, stages=stages)
    path = Path(args.work) / f"out-{variant}" / "photo.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(path)
    row.update(output=str(path), peak_rss=hwm_bytes())
    return row


def warm_cache_child(args) -> dict:
    """The one-off conversion of the official checkpoints into restorecli's cache (timed, not a row)."""
    import torch

    torch.set_num_threads(args.threads)
    from restorecli import DiffBIRPipeline

    t0 = time.perf_counter()
    DiffBIRPipeline.from_description(Path(args.weights) / "model.json", device="cpu", torch_dtype=torch.float32,
                                     captioner="none")
    return {"seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ the parent


def _cmd(args, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--weights", str(args.weights), "--work", str(args.work), "--threads",
            str(args.threads), "--steps", str(args.steps)] + (["--official", str(args.official)] if args.official
                                                             else []) + list(extra)


def _fmt(values: list[float | None], digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _gb(values) -> str:
    return _fmt([v / 1e9 for v in values if v], 1) + " GB" if any(values) else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--official", type=Path, help="a fetched copy of the official DiffBIR code (its repository root)")
    p.add_argument("--weights", type=Path, default=None, help="where the official-layout random weights live")
    p.add_argument("--work", type=Path, default=None, help="input and outputs (default: a folder in --weights)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--runs", type=int, default=2, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    p.add_argument("--json", help="also write all rows here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.weights = (args.weights or default_weights_dir()).resolve()
    args.work = (args.work or args.weights / "work").resolve()
    if args.official:
        args.official = args.official.resolve()

    if args.child:
        row = {"make-weights": make_weights_child, "warm-cache": warm_cache_child,
               "official": lambda a: official_child(a, a.variant.split("-", 1)[1]),
               "restorecli": restorecli_child}[args.child](args)
        print(json.dumps(row))
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not (args.weights / "model.json").exists():
        if not args.official:
            p.error(f"no weights in {args.weights}: the first run needs --official DIR to build them")
        print(f"building the full-size official modules with random weights in {args.weights} ...", flush=True)
        made = run_child(_cmd(args, "--child", "make-weights"), env=child_env(keep_malloc=True), timeout=args.timeout)
        if "error" in made:
            sys.exit(f"building the weights failed: {made['error']}")
        print(f"  {made['bytes'] / 1e9:.1f} GB in {made['seconds']:.0f} s", flush=True)
    if any(v.startswith("official") for v in variants) and not args.official:
        p.error("the official rows need --official DIR")
    (args.work / "in").mkdir(parents=True, exist_ok=True)
    synthetic_photo().save(args.work / "in" / "photo.png")

    print("restorecli's one-off conversion of the official checkpoints ...", flush=True)
    warm = run_child(_cmd(args, "--child", "warm-cache"), env=child_env(keep_malloc=True), timeout=args.timeout)
    print(f"  {warm.get('seconds', float('nan')):.0f} s" if "error" not in warm else f"  failed: {warm['error']}",
          flush=True)

    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.runs):
        for variant in variants:
            kind = "official" if variant.startswith("official") else "restorecli"
            print(f"round {round_ + 1}/{args.runs}: {variant} ...", end=" ", flush=True)
            env = child_env(keep_malloc=True)
            if variant == "auto-tunables":
                env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
            if variant == "auto-glibc":
                env.update(GLIBC_UNTOUCHED)
            if variant.startswith("auto-mmap-"):
                size = variant.removeprefix("auto-mmap-")
                env.update(fixed_mmap_threshold(int(size[:-1]) << (10 if size.endswith("k") else 20)))
            row = run_child(_cmd(args, "--child", kind, "--variant", variant), env=env, timeout=args.timeout)
            rows[variant].append(row)
            print(row.get("error") or f"{row['restore_s']:.1f} s", flush=True)

    def outputs(variant):
        return [r["output"] for r in rows.get(variant, []) if "output" in r]

    reference_official = (outputs("official-fp32") or [None])[0]
    reference_ours = (outputs("fp32") or [None])[0]
    official_restore = [r["restore_s"] for r in rows.get("official-fp32", []) if "restore_s" in r]

    print(f"\nCPU: {os.cpu_count()} cores, {args.threads} threads per row; load {load_average()} at the end")
    print(f"{SIZE}x{SIZE} -> {4 * SIZE}x{4 * SIZE}, v2.1 defaults (edm_dpm++_3m_sde, {args.steps} steps, cfg 6), "
          f"full-size architectures, random weights; {args.runs} interleaved rounds\n")
    head = ("| | restore (s) | vs official fp32 | sampling (s) | decode (s) | load (s) | peak RSS "
            "| PSNR vs its fp32 |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for variant in variants:
        ok = [r for r in rows[variant] if "error" not in r]
        if not ok:
            print(f"| {variant} | failed: {rows[variant][0].get('error') if rows[variant] else '-'} |")
            continue
        restore = [r["restore_s"] for r in ok]
        ratio = (f"{statistics.mean(restore) / statistics.mean(official_restore):.2f}x" if official_restore else "-")
        extra = ""
        if "first_restore_s" in ok[0]:
            extra = f" (first image {_fmt([r['first_restore_s'] for r in ok], 0)})"
        reference = reference_official if variant.startswith("official") else reference_ours
        same = psnr(ok[0]["output"], reference) if reference else None
        print(f"| {variant} | {_fmt(restore)}{extra} | {ratio} | {_fmt([r['stages'].get('sampling') for r in ok])} "
              f"| {_fmt([r['stages'].get('decode') for r in ok])} | {_fmt([r['load_s'] for r in ok])} "
              f"| {_gb([r['peak_rss'] for r in ok])} | {_fmt([same], 1) if same is not None else '-'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
