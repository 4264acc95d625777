"""resolve / fetch / verify / status: pinned checkpoint names -> verified local files (and the folders
`tokenizer_dir` and `captioner_dir` assemble from them).

`resolve(name)` returns the first copy that passes its check, looking in this order:

1. ``--weights-dir`` / ``RESTORE_WEIGHTS_DIR``, then the local copy (Hugging Face cache, our
   downloads folder): see `restorecli.weights.lookup`;
2. a download, unless ``download=False`` or ``HF_HUB_OFFLINE`` is set: Hub files through
   huggingface_hub (`restorecli.weights.hub`), plain URLs with resume (`restorecli.weights.url`).

A file the user provided that fails its check is refused, never deleted; a fresh download that fails
is deleted. `verify` re-hashes what is here; `status` reports without hashing anything new.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Sequence

from ..errors import WeightsError
from . import hub, url
from .check import WeightCheck, check_file, mismatch_hint
from .lookup import FolderIndex, Resolved, locate, weights_dir_setting
from .messages import WEIGHTS_DIR_HINT, format_size
from .paths import cache_dir, downloads_dir, hub_cache_dir, is_offline
from .progress import ProgressCallback
from .table import WeightEntry, all_entries, registry


def resolve(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
    force_download: bool = False,
) -> Path:
    """The local path of a verified checkpoint, downloading it if needed and allowed.

    Raises WeightsError when it is missing (and may not or cannot be downloaded) or fails its check."""
    return fetch(name, weights_dir=weights_dir, download=download, progress=progress, force_download=force_download).path


def fetch(
    name: str | WeightEntry,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
    force_download: bool = False,
) -> Resolved:
    """`resolve` with the details the CLI reports: where the file was found and what was downloaded."""
    entry = name if isinstance(name, WeightEntry) else registry().get(name)
    if not force_download:
        found = locate(entry, weights_dir=weights_dir)
        if found is not None:
            check = check_file(entry, found.path, found.variant, where=found.where, progress=progress)
            if not check.ok:
                origin = {"weights-dir": "from --weights-dir", "hf-cache": "in the Hugging Face cache", "downloads": "downloaded earlier"}[found.where]
                raise WeightsError(
                    f"{entry.name}: {found.path} ({origin}): {check.detail}",
                    hint=mismatch_hint(check),
                )
            return Resolved(entry, found.path, found.where, 0, check)
    if not download:
        raise _missing_error(entry, weights_dir, offline=False)
    if is_offline():
        raise _missing_error(entry, weights_dir, offline=True)
    if entry.url is not None:
        return url.download(entry, progress=progress, force=force_download)
    return hub.download(entry, progress=progress, force=force_download)


def _missing_error(entry: WeightEntry, weights_dir, *, offline: bool) -> WeightsError:
    wdir = weights_dir_setting(weights_dir)
    local = downloads_dir() if entry.url else hub_cache_dir()
    looked = f"{'--weights-dir ' + wdir + ', ' if wdir else ''}{local}"
    size = format_size(entry.download_size, approx=entry.size is None)
    if offline:
        return WeightsError(
            f"{entry.name} ({entry.basename}): not found locally (looked in {looked}) and HF_HUB_OFFLINE is set",
            hint=f"unset HF_HUB_OFFLINE and run `restore weights fetch {entry.name}` ({size}), or {WEIGHTS_DIR_HINT}",
        )
    return WeightsError(
        f"{entry.name} ({entry.basename}): not downloaded (looked in {looked})",
        hint=f"run `restore weights fetch {entry.name}` ({size} from {entry.source()}), or {WEIGHTS_DIR_HINT}",
    )


def verify(
    names: Sequence[str] | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
) -> list[WeightCheck]:
    """Re-hash every present checkpoint (all, or `names`), ignoring the hash cache. Never raises on a
    mismatch: see each result's `state` ("mismatch") and `detail`."""
    return _survey(names, weights_dir=weights_dir, progress=progress, rehash=True)


def status(names: Sequence[str] | None = None, *, weights_dir: str | os.PathLike | None = None) -> list[WeightCheck]:
    """Presence and verification state of each checkpoint, without hashing anything new: a file
    hashed before (resolve, fetch, verify) shows verified/mismatch, others "unchecked"."""
    return _survey(names, weights_dir=weights_dir, progress=None, rehash=False)


def _survey(names, *, weights_dir, progress, rehash: bool) -> list[WeightCheck]:
    entries = registry().expand(names) if names else all_entries()
    wdir = weights_dir_setting(weights_dir)
    index = FolderIndex(wdir) if wdir is not None else None
    out = []
    for entry in entries:
        found = locate(entry, weights_dir=wdir, index=index)
        if found is None:
            out.append(WeightCheck(entry))
            continue
        out.append(
            check_file(entry, found.path, found.variant, where=found.where, progress=progress, rehash=rehash, hash_only_if_cached=not rehash)
        )
    return out


def tokenizer_dir(
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
    group: str = "sd2_tokenizer",
) -> Path:
    """A folder holding the pinned tokenizer files under their usual names (for `from_pretrained`).

    The Hub cache already keeps them together; files from --weights-dir in different folders are
    linked into `cache_dir("tokenizer")/<digest>`."""
    paths = {
        PurePosixPath(e.file).name: resolve(e.name, weights_dir=weights_dir, download=download, progress=progress)
        for e in registry().expand([group])
    }
    return _as_one_folder(paths, cache_dir("tokenizer"), prefix="")


def captioner_names() -> list[str]:
    """The pinned captioners: groups of weights.toml whose files are all of kind captioner."""
    reg = registry()
    return [g for g, members in reg.groups.items() if members and all(reg.entries[m].kind == "captioner" for m in members)]


def captioner_dir(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
) -> Path:
    """A folder holding every file of pinned captioner `name` under its repo path (for `from_pretrained`).

    Each file is resolved (verified, downloaded if allowed) like any checkpoint. The Hub cache keeps a
    repo's files of one revision in one snapshot folder; files from elsewhere are linked into
    `cache_dir("captioner")/<name>-<digest>`."""
    from ..errors import UsageError

    if name not in captioner_names():
        raise UsageError(f"unknown captioner {name!r}; pinned: {', '.join(captioner_names())}")
    paths = {e.file: resolve(e.name, weights_dir=weights_dir, download=download, progress=progress)
             for e in registry().expand([name])}
    return _as_one_folder(paths, cache_dir("captioner"), prefix=f"{name}-")


def _as_one_folder(paths: dict[str, Path], cache: Path, *, prefix: str) -> Path:
    """A folder in which each relative path of `paths` names its file: the files' own folder when they
    already lie that way (one Hub snapshot), else `cache/<prefix><digest>` with each file linked (or,
    where links are refused, copied) in; the digest of the sources keeps different sets apart."""
    roots = {path.parents[len(PurePosixPath(rel).parts) - 1] for rel, path in paths.items()}
    if len(roots) == 1 and all(path == next(iter(roots)) / rel for rel, path in paths.items()):
        return roots.pop()
    digest = hashlib.sha256("\n".join(str(p) for p in paths.values()).encode()).hexdigest()[:16]
    folder = cache / f"{prefix}{digest}"
    for rel, src in paths.items():
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            try:
                dst.symlink_to(src.resolve())
            except OSError:
                shutil.copyfile(src, dst)
    return folder
