"""How much memory a device has free, and how much stage 1 needs, for choosing automatic tiling.

Stage-1 peaks are bytes per pixel of the model input, measured per architecture at its official full
size (docs/memory.md has the figures and `python benchmarks/stage1.py --measure` repeats them), plus the
image-sized buffers around the model. Models of other architectures get a deliberately generous guess
per output pixel. `SAFETY` leaves room for what no estimate sees (GPU workspaces, allocator slack).
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
#: Image-sized buffers around the model, per output pixel: the pre-upscaled 8-bit image, its float32 copy
#: (made through two temporaries), the tiled output and its weight sum (measured ~36; docs/memory.md).
BUFFER_BYTES_PER_OUTPUT_PIXEL = 40
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
