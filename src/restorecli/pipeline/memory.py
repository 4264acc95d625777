"""How much memory a device has free, and how much stage 1 needs, for choosing automatic tiling.

Stage-1 peak estimates are bytes per pixel of the model input, measured, not derived:

    For each architecture at its official full size (random weights shaped by
    ../shared/reference/manifest_full.json), a fresh process builds the model, resets the kernel's
    high-water mark of its resident set (``echo 5 > /proc/self/clear_refs``), runs one forward pass
    under ``torch.no_grad()`` on CPU (torch 2.14, 2 threads) and reads ``VmHWM`` from
    /proc/self/status. The figure below is the slope of (peak - resident before) over input pixels
    between two sizes, rounded up by ~10% (``python benchmarks/stage1.py --measure`` repeats it).

    ==========  ==================  ============================  ==================
    kind        measured (fp32)     sizes                         used here
    ==========  ==================  ============================  ==================
    swinir      ~910-935 B/px       512^2, 768^2                  1000 B/px
    bsrnet      ~10.3 KB per LQ px  64^2, 128^2 LQ (x4 output)    12000 B/px
    scunet      ~5.0 KB/px          128^2, 256^2                  5500 B/px
    ==========  ==================  ============================  ==================

Autocast in fp16/bf16 measured ~0.55x of fp32 (SwinIR 512^2, BSRNet 128^2): `HALF_FACTOR`. GPU kernels
(cuDNN workspaces, the caching allocator) add to this; `SAFETY` leaves room for them. Models of other
architectures get `GENERIC_BYTES_PER_OUTPUT_PIXEL` per output pixel (a deliberately generous guess:
attention-heavy super-resolution models such as HAT or DAT need several KB per output pixel).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("restorecli.stage1.run")

STAGE1_BYTES_PER_PIXEL = {"swinir": 1000, "bsrnet": 12000, "scunet": 5500}
GENERIC_BYTES_PER_OUTPUT_PIXEL = 6000
HALF_FACTOR = 0.6
#: Image-sized buffers around the model (input, tiled output and weight sums, the 512 resize), per output pixel.
BUFFER_BYTES_PER_OUTPUT_PIXEL = 64
#: Fraction of the available memory that stage 1 plans to use.
SAFETY = 0.8
_FALLBACK_BYTES = 4 << 30


def available_memory(device: str | torch.device, cap_bytes: int | None = None) -> int:
    """Bytes stage 1 may use on `device` now, at most `cap_bytes` (e.g. from ``--max-memory``).

    CUDA: free device memory (``torch.cuda.mem_get_info``) plus what the caching allocator holds but
    does not use. CPU: ``MemAvailable`` from /proc/meminfo, lowered to a cgroup v2/v1 limit when the
    process runs in one; without /proc, ``sysconf(SC_AVPHYS_PAGES)``; failing that 4 GiB. MPS: Metal's
    recommended working set minus what torch has allocated, or half of system memory.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        found = int(free + max(cached, 0))
    elif device.type == "mps":
        found = _mps_available()
    else:
        found = _cpu_available()
    return found if cap_bytes is None else int(min(found, cap_bytes))


def _cpu_available() -> int:
    found = _meminfo_available()
    if found is None:
        try:
            found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            found = _FALLBACK_BYTES
    limit = _cgroup_headroom()
    return int(found if limit is None else min(found, limit))


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """limit - usage of this process's memory cgroup (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1 reports "no limit" as a huge number
            return None
        return max(limit - usage, 0)
    return None


def _mps_available() -> int:
    try:
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    except (AttributeError, RuntimeError):
        total = _meminfo_available() or _FALLBACK_BYTES * 2
        return total // 2


def stage1_peak_bytes(
    kind: str,
    in_h: int,
    in_w: int,
    *,
    scale: int = 1,
    dtype: torch.dtype = torch.float32,
    tile: int | None = None,
) -> int:
    """Estimated peak bytes of stage 1 on an in_h x in_w model input (see the module docstring).

    With `tile`, the model runs on tile x tile pieces while the image-sized buffers stay whole.
    """
    model_pixels = (tile * tile) if tile else (in_h * in_w)
    if kind in STAGE1_BYTES_PER_PIXEL:
        model = STAGE1_BYTES_PER_PIXEL[kind] * model_pixels
    else:
        model = GENERIC_BYTES_PER_OUTPUT_PIXEL * model_pixels * scale * scale
    if dtype in (torch.float16, torch.bfloat16):
        model = model * HALF_FACTOR
    return int(model + BUFFER_BYTES_PER_OUTPUT_PIXEL * in_h * in_w * scale * scale)
