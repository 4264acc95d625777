"""Trust on first use: the hash of each checkpoint that weights.toml pins without a sha256.

Files on a branch (``revision = "main"``) have no published hash. The first time one is used its
sha256 is recorded in ``<weights_home>/weights.lock.json`` with the file and source it came from; a
later file under that name that differs is refused until the user deletes the record. A record
whose file or source no longer matches weights.toml is ignored (the table now pins something else).
"""

from __future__ import annotations

import datetime
import logging

from .jsonfile import read_json, write_json_atomic
from .paths import lock_path
from .table import WeightEntry

logger = logging.getLogger("restorecli.weights")


def lock_source(entry: WeightEntry) -> str:
    """Where the recorded file came from: its URL, or ``hf://repo@revision``."""
    return entry.url if entry.url is not None else f"hf://{entry.repo}@{entry.revision}"


def lock_record(entry: WeightEntry) -> dict | None:
    """The record for `entry`, or None if it was never recorded (or recorded for another file)."""
    rec = read_json(lock_path()).get("files", {}).get(entry.name)
    if isinstance(rec, dict) and rec.get("file") == entry.file and rec.get("source") == lock_source(entry):
        return rec
    return None  # never recorded, or weights.toml now pins another file under this name


def record_first_use(entry: WeightEntry, sha: str, size: int, seen_at: str) -> None:
    """Record `sha` as the hash of `entry`; a lock that cannot be written is logged, not fatal."""
    path = lock_path()
    data = read_json(path)
    data["about"] = (
        "restorecli trust-on-first-use record: the sha256 of each checkpoint that weights.toml pins "
        "without a hash, as first seen. A later file that differs is refused; delete an entry to accept a new file."
    )
    data.setdefault("files", {})[entry.name] = {
        "file": entry.file,
        "source": lock_source(entry),
        "sha256": sha,
        "size": size,
        "seen_at": seen_at,
        "recorded": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        write_json_atomic(path, data)
    except OSError as exc:
        logger.warning("cannot record the sha256 of %s in %s (%s); it will be checked against nothing", entry.name, path, exc)
