"""Out-of-memory errors: recognise them on every device, and free what a failed attempt held."""

from __future__ import annotations

import gc
import sys


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, and the RuntimeErrors the CPU and MPS allocators raise."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def release_memory() -> None:
    """Collect garbage and hand the CUDA allocator's cached blocks back (before a retry, or after a
    failed image)."""
    sys.last_traceback = sys.last_value = None  # an interactive session's last error keeps its frames alive
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
