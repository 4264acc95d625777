"""Which device and which precision the networks run on."""

from __future__ import annotations

import torch

from ..errors import UsageError

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else mps if available, else cpu. An unavailable choice is a usage error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device` cuda: no CUDA device is available here; use `device` cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("`device` mps: MPS is not available here; use `device` cpu")
    return device


def resolve_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless `--precision` says otherwise (half precision on the CPU is refused)."""
    if precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = PRECISION_DTYPES[precision]
    if device.type == "cpu" and dtype == torch.float16:
        raise UsageError("`precision` fp16 needs a GPU; on the CPU use fp32 (or bf16)")
    return dtype
