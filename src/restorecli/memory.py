"""How much memory a device has free: what every automatic plan (stage 1's tiles, stage 2's memory plan)
budgets against. `SAFETY` leaves room for what no estimate sees (GPU workspaces, allocator slack).

At the bottom of the layers (beside `oom`), so that stage 1 and the pipeline both read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: Fraction of the available memory that a plan uses.
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
