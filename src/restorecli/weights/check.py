"""Checking one file: its size and sha256 against the pin, the Hub's announcement or the lock.

A file passes when it matches weights.toml's sha256 (verified), the hash recorded the first time it
was used (trusted), or, for a file without a pinned hash seen for the first time, once its hash is
recorded (recorded). A mismatch is a result, not an exception, so `status`/`verify` can list it;
`mismatch_hint` says what to do about one. Hashes come from the hash cache unless asked to re-hash.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from . import hashing
from .lock import lock_record, record_first_use
from .messages import WEIGHTS_DIR_HINT
from .paths import lock_path
from .progress import ProgressCallback, ProgressEvent
from .table import Variant, WeightEntry


@dataclass(frozen=True)
class WeightCheck:
    """The state of one checkpoint on this machine (`status`, `verify`)."""

    entry: WeightEntry
    path: Path | None = None
    where: str | None = None  # "weights-dir" | "hf-cache" | "downloads"
    #: verified (matches the pinned sha256) | trusted (matches the hash recorded on first use) |
    #: recorded (first use: hash just recorded) | mismatch | unchecked (present, not hashed yet) | missing
    state: str = "missing"
    sha256: str | None = None
    detail: str = ""
    #: what the file was checked against: "pin" (sha256/size in weights.toml), "server" (the sha256
    #: the Hub announced), "lock" (the hash recorded on first use), or None (not checked)
    against: str | None = None

    @property
    def ok(self) -> bool:
        return self.state in ("verified", "trusted", "recorded")


def check_file(
    entry: WeightEntry,
    path: Path,
    variant: Variant,
    *,
    where: str,
    progress: ProgressCallback | None = None,
    rehash: bool = False,
    announced_sha256: str | None = None,
    hash_only_if_cached: bool = False,
) -> WeightCheck:
    """Check size and sha256 of `path` against the pin, the server's announcement, or the lock.

    Never raises on a mismatch: returns state "mismatch" with the reason in `detail`."""
    check = functools.partial(WeightCheck, entry, path, where)
    size = path.stat().st_size
    if variant.size is not None and size != variant.size:
        return check("mismatch", None, f"size {size} bytes, expected {variant.size}", "pin")
    if hash_only_if_cached:
        sha = hashing.cached_sha256(path)
        if sha is None:
            return check("unchecked", None, "not hashed yet (`restore weights verify` checks it)")
    else:
        sha = hashing.sha256(path, on_bytes=_verify_progress(entry.name, size, progress), rehash=rehash)
    if variant.sha256 is not None:
        if sha != variant.sha256:
            return check("mismatch", sha, f"sha256 {sha} does not match the pinned {variant.sha256}", "pin")
        return check("verified", sha, "sha256 matches the pin", "pin")
    if announced_sha256 is not None and sha != announced_sha256:
        return check("mismatch", sha, f"sha256 {sha} does not match the {announced_sha256} the server announced", "server")
    rec = lock_record(entry)
    if rec is not None:
        if sha != rec.get("sha256"):
            return check(
                "mismatch",
                sha,
                f"sha256 {sha} differs from {rec.get('sha256')} recorded on first use ({rec.get('recorded')}, in {lock_path()})",
                "lock",
            )
        return check("trusted", sha, f"matches the sha256 recorded on first use, {rec.get('recorded')}", "lock")
    if hash_only_if_cached:
        return check("unchecked", sha, "no pinned sha256; recorded on first use")
    record_first_use(entry, sha, size, str(path))
    return check("recorded", sha, f"no pinned sha256; recorded on first use in {lock_path()}", "lock")


def mismatch_hint(check: WeightCheck, *, fresh: bool = False) -> str:
    """What to do about a file that failed its check (`fresh`: it was just downloaded)."""
    entry = check.entry
    if check.against == "lock":
        return (
            f"if the new file is intended, delete the \"{entry.name}\" entry from {lock_path()} and run again; "
            "otherwise replace the file with the one you used before"
        )
    if fresh:
        return (
            "the server sent another file than the pinned one (a stale mirror? check HF_ENDPOINT), "
            f"or the transfer was corrupted: run `restore weights fetch {entry.name}` again, or {WEIGHTS_DIR_HINT}"
        )
    if check.where == "weights-dir":
        return (
            f"replace it with the published file ({entry.source()}), or move it out of the folder "
            "so that restore downloads the pinned one"
        )
    return f"run `restore weights fetch {entry.name} --force` to download it again"


def _verify_progress(name: str, total: int, progress: ProgressCallback | None):
    """`on_bytes` for hashing that reports "verify" events of a file of `total` bytes (None: no callback)."""
    if progress is None:
        return None
    return lambda done: progress(ProgressEvent(name, "verify", done, total))
