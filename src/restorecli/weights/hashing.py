"""sha256 of checkpoint files, and the one hash cache.

Hashing a 5 GB checkpoint takes tens of seconds, so every hash is remembered in
``<weights_home>/hashes.json`` under the file's resolved path with its size and mtime; a file that
still has both is not hashed again. Verification (`resolve`, `fetch`) and the conversion cache
(restorecli.models.convert) both ask `sha256` here, so a new checkpoint is hashed once, not once
per user of the hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

from .jsonfile import read_json, write_json_atomic
from .paths import hash_cache_path

logger = logging.getLogger("restorecli.weights")

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, always computed (no cache); `on_bytes(done)` is called after each chunk."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[str, int, int]:
    real = Path(path).resolve()
    st = real.stat()
    return str(real), st.st_size, st.st_mtime_ns


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The cached hash of `path` if the file still has the size and mtime it had when hashed."""
    key, size, mtime = _stat_key(Path(path))
    rec = read_json(hash_cache_path()).get(key)
    if isinstance(rec, dict) and rec.get("size") == size and rec.get("mtime_ns") == mtime:
        return rec.get("sha256")
    return None


def remember_sha256(path: str | os.PathLike, sha: str) -> None:
    """Record `sha` as the hash of `path` as it is now (entries of files that are gone are dropped)."""
    key, size, mtime = _stat_key(Path(path))
    cache_file = hash_cache_path()
    try:
        data = {k: v for k, v in read_json(cache_file).items() if os.path.exists(k)}
        data[key] = {"size": size, "mtime_ns": mtime, "sha256": sha}
        write_json_atomic(cache_file, data)
    except OSError as exc:  # a read-only home only costs a re-hash next time
        logger.debug("cannot update the hash cache %s: %s", cache_file, exc)


def sha256(path: str | os.PathLike, *, on_bytes: Callable[[int], None] | None = None, rehash: bool = False) -> str:
    """Hex sha256 of a file, from the cache when the file is unchanged since it was hashed.

    `rehash` ignores the cache (and refreshes it). When the file is hashed, `on_bytes(done)` is called
    with 0 first and then after each chunk. Raises OSError when the file cannot be read."""
    sha = None if rehash else cached_sha256(path)
    if sha is None:
        if on_bytes is not None:
            on_bytes(0)
        sha = sha256_file(path, on_bytes)
        remember_sha256(path, sha)
    return sha
