"""Finding a checkpoint on this machine, without checking it and without any network.

The order: a ``--weights-dir`` / ``RESTORE_WEIGHTS_DIR`` folder of files the user already has
(DiffBIR's own ``weights/``, an air-gapped copy), matched by file name, also in subfolders; then the
local copy, the Hugging Face cache for Hub files (``HF_HUB_CACHE``) and ``<weights_home>/downloads``
for plain-URL files. `Resolved` is what a look-up or a download ends with once the file is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import WeightsError
from .check import WeightCheck
from .paths import downloads_dir, hub_cache_dir
from .table import Variant, WeightEntry, registry


class FolderIndex:
    """The files under a --weights-dir folder (3 levels deep, hidden folders skipped), by file name."""

    MAX_DEPTH = 3

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise WeightsError(
                f"--weights-dir {self.root}: not a folder",
                hint="pass the folder that holds the checkpoint files (e.g. DiffBIR's weights/), or unset RESTORE_WEIGHTS_DIR",
            )
        self.by_name: dict[str, list[Path]] = {}
        base_depth = len(self.root.parts)
        for dirpath, dirnames, filenames in os.walk(self.root):
            depth = len(Path(dirpath).parts) - base_depth
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < self.MAX_DEPTH else []
            for fn in filenames:
                self.by_name.setdefault(fn, []).append(Path(dirpath) / fn)

    def find(self, entry: WeightEntry) -> tuple[Path, Variant] | None:
        """The shallowest file matching the pinned file or an alternative (`also`).

        A file with folders in its name (tokenizer/vocab.json) must sit in a folder of that name, a
        captioner's file in a folder named after its repo (`WeightEntry.local_parts`)."""
        for variant in entry.variants:
            parts = entry.local_parts(variant.file)
            hits = [
                p for p in self.by_name.get(parts[-1], [])
                if p.is_file() and p.parts[-len(parts):] == parts
            ]
            if hits:
                return min(hits, key=lambda p: (len(p.parts), str(p))), variant
        return None


def weights_dir_setting(weights_dir: str | os.PathLike | None) -> str | None:
    """The folder to search first: `weights_dir` if given, else $RESTORE_WEIGHTS_DIR, else None."""
    if weights_dir is not None and str(weights_dir) != "":
        return str(weights_dir)
    return os.environ.get("RESTORE_WEIGHTS_DIR") or None


def local_copy(entry: WeightEntry) -> Path | None:
    """The file in the Hub cache (hub files) or in downloads/ (URL files), without any network."""
    if entry.url is not None:
        path = downloads_dir() / entry.basename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(entry.repo, entry.file, cache_dir=str(hub_cache_dir()), revision=entry.revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


@dataclass(frozen=True)
class Located:
    """A checkpoint found on this machine, not yet checked."""

    entry: WeightEntry
    path: Path
    where: str  # "weights-dir" | "hf-cache" | "downloads"
    variant: Variant


def locate(
    name: str | WeightEntry, *, weights_dir: str | os.PathLike | None = None, index: FolderIndex | None = None
) -> Located | None:
    """Where a checkpoint is on this machine (nothing verified, nothing downloaded), or None.

    `index`: the `FolderIndex` of `weights_dir`, when the caller looks up many files in it."""
    entry = name if isinstance(name, WeightEntry) else registry().get(name)
    wdir = weights_dir_setting(weights_dir)
    if wdir is not None:
        found = (index or FolderIndex(wdir)).find(entry)
        if found is not None:
            return Located(entry, found[0], "weights-dir", found[1])
    local = local_copy(entry)
    if local is not None:
        return Located(entry, local, "downloads" if entry.url else "hf-cache", entry.variants[0])
    return None


@dataclass(frozen=True)
class Resolved:
    """A checkpoint found or downloaded, and checked."""

    entry: WeightEntry
    path: Path
    where: str
    downloaded: int = 0  # bytes transferred by this call (0: the file was already here)
    check: WeightCheck | None = None
