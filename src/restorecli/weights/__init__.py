"""Pinned checkpoints (weights.toml) -> verified local files.

`resolve(name)` finds a checkpoint in ``--weights-dir`` / ``RESTORE_WEIGHTS_DIR``, then in the local
copy (the Hugging Face cache, ``<weights_home>/downloads``), then downloads it unless told not to, and
returns it only after checking its size and sha256 against the pin, or against the hash recorded on
first use. Hashes are cached by (path, size, mtime), so a 5 GB checkpoint is hashed once, also for
the conversion cache. Nothing here prints; failures raise `WeightsError` naming the file, where it
came from and why, with a hint.

The modules, each importing only those listed before it: `jsonfile` (atomic JSON state files),
`paths` (where things live), `messages`, `progress`, `table` (weights.toml), `hashing` (the hash
cache), `lock` (trust on first use), `check` (one file's verdict), `lookup` (finding files), `hub`
and `url` (downloads), `resolver` (resolve / fetch / verify / status / tokenizer_dir / captioner_dir).
"""

from __future__ import annotations

from .check import WeightCheck, mismatch_hint
from .lookup import Located, Resolved, locate
from .messages import WEIGHTS_DIR_HINT, format_size
from .paths import cache_dir, downloads_dir, hub_cache_dir, hub_endpoint, is_offline, lock_path, weights_home
from .progress import ProgressCallback, ProgressEvent
from .resolver import captioner_dir, captioner_names, fetch, resolve, status, tokenizer_dir, verify
from .table import (
    DEFAULT_TOML,
    KINDS,
    ROLES,
    Registry,
    Variant,
    WeightEntry,
    all_entries,
    download_size,
    files_for,
    get_entry,
    registry,
    set_registry,
    wiring,
)

__all__ = [
    "DEFAULT_TOML", "KINDS", "ROLES", "WEIGHTS_DIR_HINT",
    "Located", "ProgressCallback", "ProgressEvent", "Registry", "Resolved", "Variant", "WeightCheck", "WeightEntry",
    "all_entries", "cache_dir", "captioner_dir", "captioner_names", "download_size", "downloads_dir", "fetch", "files_for", "format_size", "get_entry",
    "hub_cache_dir", "hub_endpoint", "is_offline", "locate", "lock_path", "mismatch_hint", "registry", "resolve",
    "set_registry", "status", "tokenizer_dir", "verify", "weights_home", "wiring",
]  # fmt: skip
