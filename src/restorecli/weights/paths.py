"""Where checkpoints and their records live, read from the environment at each call.

restorecli's own folder (``RESTORE_HOME``) holds the lock, the hash cache, plain-URL downloads and
derived caches; Hub files stay in the Hugging Face cache. The Hub settings (``HF_HUB_CACHE``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) are read here rather than from huggingface_hub's constants, which
it fixes at import time, so a change after import (tests, a long-lived process) still counts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}


def weights_home() -> Path:
    """restorecli's own folder: $RESTORE_HOME, else $XDG_CACHE_HOME/restorecli, else ~/.cache/restorecli.

    Holds the trust-on-first-use lock (weights.lock.json), the hash cache (hashes.json), plain-URL
    downloads (downloads/) and derived caches (cache/<kind>/, see `cache_dir`)."""
    if os.environ.get("RESTORE_HOME"):
        return Path(os.environ["RESTORE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "restorecli"


def cache_dir(kind: str) -> Path:
    """A folder for derived data of one kind (e.g. converted weights), created on demand."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", kind) or kind in (".", ".."):
        raise ValueError(f"`kind` must be a plain folder name, got {kind!r}")
    path = weights_home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock_path() -> Path:
    """The trust-on-first-use record of hashes (see `restorecli.weights.lock`)."""
    return weights_home() / "weights.lock.json"


def hash_cache_path() -> Path:
    """The hash cache (see `restorecli.weights.hashing`)."""
    return weights_home() / "hashes.json"


def downloads_dir() -> Path:
    """Where plain-URL files (BSRNet, SCUNet) are downloaded."""
    return weights_home() / "downloads"


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment now (huggingface_hub reads it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now, else huggingface_hub's endpoint."""
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub saw it at import."""
    if any((os.environ.get(v) or "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
