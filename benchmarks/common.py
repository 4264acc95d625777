"""Helpers the benchmarks share: peak memory of a block (CPU resident set or CUDA allocations), child
processes that report one JSON line, the machine's load, and the full-size models with random weights.

Peak memory. CPU: the kernel's high-water mark of the resident set is reset (``5 > /proc/self/clear_refs``)
before the block and ``VmHWM`` is read after it; "over base" subtracts the resident size at the reset.
Children run with glibc told to return freed memory at once (``MALLOC_MMAP_THRESHOLD_=131072
MALLOC_TRIM_THRESHOLD_=0``, see benchmarks/stage1.py) so that the resident set follows live tensors.
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (allocations, not the
caching allocator's reserve).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESTORE_SHARED_DIR", REPO.parent / "shared"))
TOKENIZER = SHARED / "sd2-tokenizer"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
#: glibc tunables (read at process start) under which freed memory is reused without page faults:
#: no mmap for large blocks, no trimming below 2 GiB, no per-thread cache (whose small chunks would pin
#: freed blocks in place and grow the heap). The README's speed opt-in.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:glibc.malloc.tcache_count=0"
#: A malloc option of the user's, set to glibc's own default: restorecli then leaves glibc alone (no trims).
GLIBC_UNTOUCHED = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}


def fixed_mmap_threshold(nbytes: int) -> dict[str, str]:
    """glibc's mmap and trim thresholds fixed at `nbytes` (its dynamic threshold off): freed blocks above
    it go back at once, at the price of faulting in every such block afresh."""
    return {"MALLOC_MMAP_THRESHOLD_": str(nbytes), "MALLOC_TRIM_THRESHOLD_": str(nbytes)}


# -- CPU resident set -------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The resident set now (VmRSS), or ru_maxrss where /proc is missing."""
    kib = _status_kib("VmRSS:")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def hwm_bytes() -> int:
    """The resident set's high-water mark since the last reset (VmHWM), or the process's ru_maxrss."""
    kib = _status_kib("VmHWM:")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Peak:
    """``with Peak(device) as p: ...`` -> p.seconds, p.bytes (peak over the memory at entry), p.total
    (absolute peak: CPU resident set, CUDA allocated)."""

    def __init__(self, device="cpu"):
        self.cuda = str(device).startswith("cuda")
        self.seconds = 0.0
        self.bytes = self.total = 0

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
            if not reset_hwm():
                raise RuntimeError("peak memory per block needs Linux /proc/self/clear_refs")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated()
        else:
            self.total = hwm_bytes()
        self.seconds = time.perf_counter() - self.t0
        self.bytes = self.total - self.base
        return False


# -- child processes --------------------------------------------------------------------------------------


def child_env(keep_malloc: bool = False, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if not keep_malloc:
        env.update(MALLOC_ENV)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run a child that prints one JSON object as its last stdout line; {'error': ...} if it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env or child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


# -- full-size models with random weights ----------------------------------------------------------------


def full_size_stage2(version: str = "v2.1", *, device="cpu", dtype=None, seed: int = 0):
    """``restorecli.models.stage2.Stage2Models`` of the official full-size architecture
    (``restorecli.models.configs.full_size_cldm_spec``: SD 2.1 UNet, IRControlNet, VAE, 23-layer OpenCLIP
    text tower) with diffusers' random initialisation, nothing downloaded or read from disk but the
    SD 2 tokenizer (../shared/sd2-tokenizer)."""
    import torch

    from restorecli.models.configs import PINNED_DIFFUSION, full_size_cldm_spec, stage2_configs
    from restorecli.models.stage2 import Stage2Models, _load_tokenizer, new_controlnet, new_text_encoder, new_unet, new_vae

    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    spec = full_size_cldm_spec("random.ckpt", "random.pth")
    configs = stage2_configs(spec)
    nets = {}
    for name, factory, cfg in (("unet", new_unet, configs.unet), ("controlnet", new_controlnet, configs.controlnet),
                               ("vae", new_vae, configs.vae), ("text_encoder", new_text_encoder, configs.text)):
        nets[name] = factory(cfg).eval().requires_grad_(False).to(device=device, dtype=dtype)
    diffusion = PINNED_DIFFUSION[version]
    return Stage2Models(
        **nets, tokenizer=_load_tokenizer(TOKENIZER, configs.text.max_position_embeddings),
        latent_scale_factor=float(spec.latent_scale_factor), parameterization=diffusion.parameterization,
        zero_snr=bool(diffusion.zero_snr), diffusion=diffusion,
    )


def full_size_cleaner(arch: str = "swinir", *, device="cpu", dtype=None):
    """A `restorecli.stage1.cleaners.Cleaner` of DiffBIR's full-size SwinIR (or bsrnet / scunet), random weights."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stage1 import _full_size_state_dict  # benchmarks/stage1.py

    from restorecli.stage1.cleaners import load_cleaner

    return load_cleaner(_full_size_state_dict(arch), device=device, dtype=dtype or torch.float32, name=f"{arch}_full")


def full_size_pipeline(version: str = "v2.1", *, device="cpu", dtype=None):
    """A `DiffBIRPipeline` of the full-size architecture with random weights (stage 1 + stage 2)."""
    from restorecli.pipeline.diffbir import DiffBIRPipeline
    from restorecli.stage1.run import stage1_plan

    models = full_size_stage2(version, device=device, dtype=dtype)
    cleaner = full_size_cleaner("swinir", device=device, dtype=dtype)
    return DiffBIRPipeline.from_stage2_models(models, cleaner=cleaner, stage1_pipeline=stage1_plan(version, "sr").pipeline)
