"""`--captioner NAME|HUB_ID|FOLDER` -> a loaded captioner, every kind through one local-folder path.

* ``none``: no captioner (the prompt alone, as upstream's ``--captioner none``);
* ``florence2`` (the default), ``llava``: pinned in weights.toml; `restorecli.weights.captioner_dir`
  finds, verifies or downloads their files into one folder;
* a folder: a model saved by transformers (``save_pretrained``);
* a Hub id (``owner/name``): ``huggingface_hub.snapshot_download`` of its model and processor files
  (not pinned: the revision used is reported).

The folder's ``config.json`` picks the recipe: ``llava`` -> upstream's LLaVA prompt
(`restorecli.captions.llava`), ``florence2`` -> the ``<CAPTION>`` task (`restorecli.captions.florence`),
anything else -> its chat template (`restorecli.captions.generic`). Failures are one-line
`SetupError`/`WeightsError`/`UsageError` (exit 2) naming the captioner.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import SetupError, UsageError, WeightsError, brief
from .base import Captioner, quiet_transformers
from .names import DEFAULT_CAPTIONER, LLAVA_BITS, PINNED_CAPTIONERS

__all__ = ["DEFAULT_CAPTIONER", "LLAVA_BITS", "PINNED_CAPTIONERS", "CaptionerSource", "check_captioner", "load_captioner",
           "load_from_folder", "locate_captioner"]

log = logging.getLogger("restorecli.captions")

#: What a Hub snapshot of a captioner needs (weights, configs, tokenizer, chat template), nothing else.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_captioner(choice: str, llava_bit: str = "4") -> str:
    """Validate `captioner` / `llava_bit` without loading anything; returns the kind of choice:
    "none", "pinned", "folder" or "hub". Raises UsageError."""
    if str(llava_bit) not in LLAVA_BITS:
        raise UsageError(f"`llava_bit` must be one of {', '.join(LLAVA_BITS)}; got {llava_bit!r}")
    if not choice:
        raise UsageError("`captioner` needs a value: none, florence2, llava, a model folder or a Hub id")
    if choice == "none":
        return "none"
    if choice in PINNED_CAPTIONERS:
        return "pinned"
    path = Path(choice).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        raise UsageError(f"`captioner` {choice}: not a folder; give a transformers model folder (with config.json)")
    if _HUB_ID.fullmatch(choice) and not choice.startswith((".", "/", "~")):
        return "hub"
    raise UsageError(
        f"`captioner` {choice}: no such folder, and not a captioner name or a Hub id",
        hint=f"use none, {', '.join(PINNED_CAPTIONERS)}, a model folder, or a Hub id such as Qwen/Qwen2.5-VL-3B-Instruct",
    )


@dataclass(frozen=True)
class CaptionerSource:
    """Where a captioner's files are: a local folder, with what `captioner` named and the weights' commit."""

    name: str
    folder: Path
    revision: str | None = None


def locate_captioner(choice: str, *, weights_dir=None, download: bool = True,
                     progress: Callable | None = None) -> CaptionerSource | None:
    """The folder of the captioner `choice` names, its pinned files verified (and downloaded if needed
    and allowed) first; None for "none". Nothing is loaded: a missing file fails here, in seconds."""
    kind = check_captioner(choice)
    if kind == "none":
        return None
    if kind == "pinned":
        from .. import weights

        folder = weights.captioner_dir(choice, weights_dir=weights_dir, download=download, progress=progress)
        return CaptionerSource(choice, folder, weights.registry().expand([choice])[0].revision)
    if kind == "folder":
        return CaptionerSource(choice, Path(choice).expanduser())
    folder, revision = _hub_snapshot(choice, download=download)
    return CaptionerSource(choice, folder, revision)


def load_captioner(
    choice: str = DEFAULT_CAPTIONER,
    *,
    device: torch.device | str = "cpu",
    llava_bit: str = "4",
    weights_dir=None,
    download: bool = True,
    progress: Callable | None = None,
) -> Captioner | None:
    """The captioner `choice` names, in host memory (it comes to `device` while it captions); None for "none"."""
    check_captioner(choice, llava_bit)
    source = locate_captioner(choice, weights_dir=weights_dir, download=download, progress=progress)
    if source is None:
        return None
    return load_from_folder(source.folder, name=source.name, revision=source.revision, device=device, llava_bit=llava_bit)


def load_from_folder(folder: Path, *, name: str, revision: str | None = None, device: torch.device | str = "cpu",
                     llava_bit: str = "4") -> Captioner:
    """A captioner from a transformers model folder; its config's model_type picks the recipe."""
    folder = Path(folder)
    device = torch.device(device)
    model_type = _model_type(folder, name)
    try:
        with quiet_transformers():
            if model_type == "llava":
                from .llava import LlavaCaptioner

                return LlavaCaptioner.from_folder(folder, name=name, revision=revision, device=device, bits=llava_bit)
            if model_type == "florence2":
                from .florence import FlorenceCaptioner

                return FlorenceCaptioner.from_folder(folder, name=name, revision=revision, device=device)
            from .generic import ChatCaptioner

            return ChatCaptioner.from_folder(folder, name=name, revision=revision, device=device)
    except (SetupError, UsageError):
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        raise SetupError(f"`captioner` {name}: cannot load the {model_type} model in {folder} ({brief(exc, 200)})",
                         hint="check that the folder holds a complete model saved by transformers") from exc


def _model_type(folder: Path, name: str) -> str:
    config = folder / "config.json"
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SetupError(f"`captioner` {name}: {folder} has no config.json; give a model folder saved by transformers") from None
    except (OSError, ValueError) as exc:
        raise SetupError(f"`captioner` {name}: cannot read {config} ({brief(exc, 120)})") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if not isinstance(model_type, str):
        raise SetupError(f"`captioner` {name}: {config} names no model_type; not a transformers model folder")
    return model_type


def _hub_snapshot(repo_id: str, *, download: bool) -> tuple[Path, str | None]:
    """The local snapshot of a Hub model (downloaded unless offline or `download=False`) and its commit."""
    from huggingface_hub import snapshot_download

    from .. import weights

    local_only = not download or weights.is_offline()
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS, cache_dir=str(weights.hub_cache_dir()),
                                      local_files_only=local_only))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many kinds; one line for all
        reason = "not downloaded, and HF_HUB_OFFLINE is set" if local_only else brief(exc, 160)
        raise WeightsError(
            f"`captioner` {repo_id}: cannot get the model from {weights.hub_endpoint()} ({reason})",
            hint="check the id and your connection (HF_ENDPOINT, HF_TOKEN for gated models), or pass a local folder",
        ) from exc
    return path, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
