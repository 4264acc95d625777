"""Safe checkpoint loading: safetensors, or `torch.load(weights_only=True)`; never arbitrary pickles.

`load_state_dict(path)` returns a flat ``{key: tensor}`` in the file's own (official) key layout,
normalised the way DiffBIR's loader does it (utils/common.py load_model_from_url):
a top-level ``state_dict`` wrapper is unwrapped (also BasicSR's ``params_ema`` / ``params``, as
spandrel does), and a leading ``module.`` (DataParallel) is stripped from every key. Renaming official
keys to diffusers' layout is `models/convert*.py`'s job, not this module's.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..errors import WeightsError, brief

#: Wrappers around the weights, tried in this order (DiffBIR: state_dict; BasicSR: params_ema, params).
WRAPPER_KEYS = ("state_dict", "params_ema", "params")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (.safetensors, .ckpt, .pth, .pt, .bin), on the CPU.

    Raises WeightsError when the file is missing, corrupt or truncated, or would need arbitrary
    Python objects unpickled."""
    path = Path(path)
    raw = _load_safetensors(path) if _is_safetensors(path) else _load_pickle(path)
    return normalize_state_dict(raw, path)


def normalize_state_dict(obj: object, path: str | os.PathLike = "<state dict>") -> dict[str, torch.Tensor]:
    """Unwrap `state_dict`/`params_ema`/`params`, strip a leading `module.`, keep only tensors."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a state dict (the file holds a {type(obj).__name__})")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {
        (k[len("module."):] if k.startswith("module.") else k): v
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, torch.Tensor)
    }
    if not tensors:
        raise WeightsError(
            f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:8])) or 'none'})"
        )
    return tensors


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_readable(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file, corrupt or truncated ({brief(exc)})") from exc


def _load_pickle(path: Path) -> object:
    _check_readable(path)
    # mmap keeps a 5 GB checkpoint out of RAM until its tensors are used; it needs torch's zip format.
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        needs = _unsafe_globals(path, exc)
        if not needs:  # the weights-only unpickler also fails on bytes that are no pickle at all
            m = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            reason = m.group(1).strip() if m else brief(exc)
            raise WeightsError(f"{path}: not a readable checkpoint, corrupt or truncated ({reason})") from exc
        shown = ", ".join(needs[:4]) + (f" and {len(needs) - 4} more" if len(needs) > 4 else "")
        raise WeightsError(
            f"{path}: refusing to unpickle arbitrary objects (it needs {shown}); convert it to safetensors",
            hint="load it once where you trust it and save its tensors with safetensors.torch.save_file",
        ) from None
    except Exception as exc:  # zip/pickle/EOF errors of a corrupt or truncated file
        raise WeightsError(f"{path}: not a readable checkpoint, corrupt or truncated ({brief(exc)})") from exc


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file")


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """The Python objects (module.name) a pickle needs beyond tensors; empty if it is no valid pickle."""
    names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    try:
        names += [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in names]
    except Exception:  # legacy (non-zip) format, or unreadable
        pass
    return names

