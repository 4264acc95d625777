"""How much memory a device has free: what every automatic plan (stage 1's tiles, stage 2's memory plan)
budgets against. `SAFETY` leaves room for what no estimate sees (GPU workspaces, allocator slack).
And `trim_freed_memory`: the plans assume that what a stage frees leaves the process, which glibc's
allocator does not do by itself.

At the bottom of the layers (beside `oom`), so that stage 1 and the pipeline both read it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

#: Fraction of the available memory that a plan uses.
SAFETY = 0.8
_FALLBACK_BYTES = 4 << 30
#: glibc's own malloc options, set by the user in the environment (then restorecli leaves them alone)
_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")


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


def trim_freed_memory() -> bool:
    """Give the memory freed so far back to the system: glibc's `malloc_trim(0)`, which returns every free
    page of every arena. Called after each stage of a restoration (and each tiled-VAE stage and colour-fix
    band); a no-op (False) off glibc, and where the user has set glibc's malloc options (GLIBC_TUNABLES'
    glibc.malloc.*, MALLOC_*_).

    Every plan counts on a stage's memory leaving the process when the stage ends; glibc's default does
    not do that. Its mmap threshold is dynamic: each freed mapped block up to 32 MiB raises it to that
    block's size, blocks below it then come from the heap, and the heap keeps what is freed in its middle.
    Measured (benchmarks/memory_cap.py --malloc, the tiny model, bf16, cond and uncond batched, 2048^2
    under --max-memory 1GB, a plan of 0.8 GiB): glibc as it comes 1225 MiB of working memory (over the
    cap); these trims 806 MiB; a fixed 4 MiB mmap threshold 718 MiB, but the full-size default restoration
    24% slower (benchmarks/cpu.py: every block above it is mapped and faulted in afresh), where the trims
    cost nothing measurable (33.4 vs 33.6 s). docs/memory.md has the table."""
    libc = _libc() if _glibc_is_ours() else None
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc_is_ours() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    return not ("glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(name in os.environ for name in _USER_MALLOC_ENV))


@functools.cache
def _libc():
    """The C library when it is glibc (musl has no malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
