"""`--precision` -> the dtype the networks run in: fp16 on CUDA, bf16 on CPUs that run it natively.

Only the networks (UNet, IRControlNet, VAE, text encoder, cleaner) take this dtype; the sampler state,
the noise, the guidance arithmetic and the colour fix stay float32 (`restorecli.pipeline.diffbir`).

`auto` picks, per device:

* CUDA: fp16, as the official inference does (DiffBIR ``inference.py --precision fp16``).
* CPU: bf16 where the processor has bf16 instructions (x86 AVX512-BF16 or AMX-BF16, read from the
  CPU's flags), which oneDNN uses for bf16 convolutions and matmuls: sampling about 1.6x faster than
  fp32 on the 2-core EPYC of the speed notes and 3.3x on a 2-core Xeon with AMX (benchmarks/cpu.py),
  42-49 dB from the fp32 output. Without them bf16 runs through slow fallback kernels (many times
  slower than fp32), so `auto` keeps fp32 there.
* MPS: fp32. Apple GPUs run fp16, but diffusers' own MPS guide runs Stable Diffusion in float32, this
  path has never run on an MPS device here, and fp32 is what `restorecli` has always done on MPS;
  `--precision fp16` opts in.

`--precision fp16` on the CPU is refused (no fp16 kernels worth the name: one 512x512 fp16 decode of
the tiny test model takes minutes); the library still accepts `dtype=torch.float16` on any device
(`DiffBIRPipeline.from_description(torch_dtype=...)`), which the tests use.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch

from ..errors import UsageError

log = logging.getLogger("restorecli.pipeline.precision")

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: `--precision` values: the three dtypes and `auto` (the per-device choice above).
PRECISION_CHOICES = ("auto", *PRECISION_DTYPES)
#: /proc/cpuinfo flags (Linux names) of x86 instructions that compute in bf16 natively.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_flags(text: str) -> set[str]:
    """The CPU flags of /proc/cpuinfo text: the union of every processor's ``flags`` line (x86 Linux)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags.update(value.split())
    return flags


def cpu_bf16_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The bf16 flags (``BF16_FLAGS``) this CPU reports, or None where there is no cpuinfo to read.

    `cpuinfo`: /proc/cpuinfo text (tests pass their own); None reads the file.
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    return cpuinfo_flags(cpuinfo) & set(BF16_FLAGS)


def cpu_runs_bf16_natively(cpuinfo: str | None = None, capability: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16) and torch uses it.

    The flags come from /proc/cpuinfo (`cpuinfo`, for tests); where it cannot be read (macOS, Windows),
    from torch's own cpuinfo probes. `capability` is ``torch.backends.cpu.get_cpu_capability()`` (read
    when None): torch must dispatch to its AVX512 (or AMX) kernels, so a build or an
    ``ATEN_CPU_CAPABILITY`` that holds it to AVX2 or less counts as not native.
    """
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if not any(word in capability.upper() for word in ("AVX512", "AMX")):
        return False
    flags = cpu_bf16_flags(cpuinfo)
    if flags is None:
        return _torch_reports_bf16()
    return bool(flags)


def _torch_reports_bf16() -> bool:
    """torch's cpuinfo probes (private, present in torch 2.x), False where they are missing."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


@functools.lru_cache(maxsize=1)
def _native_bf16_here() -> bool:
    native = cpu_runs_bf16_natively()
    log.debug("CPU %s (torch capability %s): bf16 %s", platform.processor() or platform.machine(),
              torch.backends.cpu.get_cpu_capability(), "native" if native else "not native")
    return native


def auto_dtype(device: torch.device | str, *, native_bf16: bool | None = None) -> torch.dtype:
    """`--precision auto`: fp16 on CUDA, bf16 on a CPU with bf16 instructions, fp32 elsewhere (MPS too).

    `native_bf16`: the CPU's answer (None: detected once per process).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.float16
    if kind == "cpu":
        native = _native_bf16_here() if native_bf16 is None else native_bf16
        return torch.bfloat16 if native else torch.float32
    return torch.float32


def resolve_dtype(precision: str | None, device: torch.device | str, *, native_bf16: bool | None = None) -> torch.dtype:
    """The networks' dtype for `--precision` (auto, fp32, fp16, bf16) on `device`.

    None means `auto` (the default). fp16 on the CPU is a usage error (see the module docstring; the library's
    `dtype=` is not refused); bf16 on a CPU without bf16 instructions runs, with a warning that it is
    slower than fp32 there.
    """
    device = torch.device(device)
    if precision is None or precision == "auto":
        return auto_dtype(device, native_bf16=native_bf16)
    if precision not in PRECISION_DTYPES:
        raise UsageError(f"`precision` must be one of {', '.join(PRECISION_CHOICES)}; got {precision!r}")
    dtype = PRECISION_DTYPES[precision]
    if device.type == "cpu" and dtype == torch.float16:
        raise UsageError("`precision` fp16 needs a GPU; on the CPU use auto, fp32 or bf16")
    if device.type == "cpu" and dtype == torch.bfloat16:
        native = _native_bf16_here() if native_bf16 is None else native_bf16
        if not native:
            log.warning("this CPU has no bf16 instructions (AVX512-BF16 / AMX): `precision` bf16 runs on slow "
                        "fallback kernels here, slower than fp32")
    return dtype


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


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / fp16 / bf16 (the `--precision` word) of a dtype."""
    for name, value in PRECISION_DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")
