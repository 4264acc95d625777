"""`restorecli.memory.trim_freed_memory` (run after each stage): memory a stage freed leaves the process (the
memory plans count on it), checked on the resident set of fresh interpreters (the allocator is process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                reason="glibc's allocator (Linux) only")

# Free a 16 MiB block (glibc then serves blocks up to that size from its heap), fill 512 MiB in 8 MiB
# tensors, free all but the last (which keeps the heap's top in use), trim or not, and print the resident set.
PROGRAM = textwrap.dedent("""
    import sys, torch
    from restorecli.memory import trim_freed_memory
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    big = torch.ones(4 << 20)  # 16 MiB
    del big
    base = rss()
    blocks = [torch.ones(2 << 20) for _ in range(64)]  # 64 x 8 MiB
    full = rss()
    del blocks[:-1]
    on = trim_freed_memory() if sys.argv[1] == "on" else False
    print(on, (full - base) >> 20, (rss() - base) >> 20)
""")


def _run(mode: str, **env) -> tuple[bool, int, int]:
    run = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    on, full, kept = run.stdout.split()
    return on == "True", int(full), int(kept)


def test_freed_memory_leaves_the_process_after_a_trim():
    clean = {"GLIBC_TUNABLES": None, "MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None}
    on, full, kept = _run("on", **clean)
    assert on and full >= 500 and kept < 64, (full, kept)
    # glibc's default keeps what was freed resident: the plans would be off by that much
    on, full, kept = _run("off", **clean)
    assert not on and full >= 500 and kept > 400, (full, kept)


def test_the_users_own_malloc_options_are_left_alone():
    on, _, kept = _run("on", GLIBC_TUNABLES="glibc.malloc.tcache_count=0", MALLOC_MMAP_THRESHOLD_=None)
    assert not on and kept > 400
    on, _, _ = _run("on", MALLOC_MMAP_THRESHOLD_="131072", GLIBC_TUNABLES=None)
    assert not on
