"""Which files a run restores: the images of a folder (`restore batch DIR`, `-r`, `--glob`) or a list.

`discover` walks a folder and keeps what looks like an image (by extension, or by content for files
without one); `read_list` reads `--from-list`; `listed_sources` places listed files under OUTDIR. Each
input becomes a `Source`: its path and the path its output keeps under OUTDIR (its folder relative to
DIR, and its name), which `run.plan` turns into an output path. Folders that cannot be listed become
failed `FileResult`s, so the run reports them and goes on.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import BinaryIO

from ..errors import UsageError
from .outputs import STDIO
from .steps import FileResult

#: File extensions (lower case) taken as images: the raster formats Pillow reads, plus photo formats it
#: reads only with a plugin (HEIC, JPEG XL), which are reported as failures rather than silently left
#: out. Everything else (sidecars, RAW files, videos, documents) is ignored, except files without any
#: extension, which are taken when their content is an image.
IMAGE_EXTENSIONS = frozenset(
    ".png .apng .jpg .jpeg .jpe .jfif .jif .gif .bmp .dib .tif .tiff .webp .avif .avifs .jp2 .j2k .jpx .jpf "
    ".jpc .j2c .ico .cur .icns .psd .tga .pcx .ppm .pgm .pbm .pnm .pfm .qoi .sgi .rgb .rgba .bw .ras .dds "
    ".xbm .xpm .msp .pcd .blp .mpo .heic .heif .jxl".split()
)
#: Image formats this Pillow cannot decode without a plugin: their failure says so.
NEEDS_PLUGIN = {".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL"}
#: `restore batch DIR` writes to `DIR_restored/` beside DIR unless -o says otherwise.
DEFAULT_DIR_SUFFIX = "_restored"

@dataclass(frozen=True)
class Source:
    """An input and the path its output keeps under OUTDIR (its folder relative to DIR, and its name)."""

    path: str
    relative: PurePath


@dataclass
class Discovery:
    sources: list[Source] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # not images (by extension and content)
    failures: list[FileResult] = field(default_factory=list)  # folders that could not be listed


def looks_like_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def discover(
    directory: str | os.PathLike,
    *,
    recursive: bool = False,
    pattern: str | None = None,
    exclude: Iterable[str | os.PathLike] = (),
    skip_suffix: str | None = None,
) -> Discovery:
    """The images in `directory`, sorted by relative path.

    Taken: regular files (or links to them) whose extension is in IMAGE_EXTENSIONS (case-insensitive;
    their content is checked when they are read, so a text file named .jpg becomes a failure), and
    files with no extension whose content Pillow recognises. Left out: hidden files and folders (names
    starting with "."; this includes our temp files `.<name>.<hex>.restoring.tmp`), folders in `exclude`
    (an OUTDIR inside DIR), files whose stem ends with `skip_suffix` (our outputs, when OUTDIR is DIR),
    and, with `pattern`, files whose relative path (when the pattern has a "/") or name does not match
    it (fnmatch, case-insensitive). `recursive` descends into subfolders (symlinked folders are not
    followed, so a link loop cannot trap the walk).
    """
    from ..images import is_image_file

    root = Path(directory)
    excluded = {os.path.realpath(p) for p in exclude}
    found = Discovery()

    def unlistable(err: OSError) -> None:
        where = err.filename or str(root)
        reason = "permission denied" if isinstance(err, PermissionError) else (err.strerror or str(err))
        found.failures.append(FileResult(where, None, "failed", error=f"{where}: cannot list folder ({reason})"))

    for folder, dirnames, filenames in os.walk(root, onerror=unlistable):
        here = Path(folder)
        if recursive:
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and os.path.realpath(here / d) not in excluded
            )
        else:
            dirnames[:] = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            relative = path.relative_to(root)
            if pattern is not None and not matches_pattern(relative, pattern):
                continue
            if skip_suffix and Path(name).stem.endswith(skip_suffix):
                continue
            if not (os.path.isfile(path) or os.path.islink(path)):
                continue  # FIFOs, sockets, devices: reading one could block forever
            if looks_like_image_name(name) or (not Path(name).suffix and is_image_file(path)):
                found.sources.append(Source(str(path), relative))
            else:
                found.ignored.append(str(path))
    found.sources.sort(key=lambda s: s.relative.as_posix())
    return found


def matches_pattern(relative: PurePath, pattern: str) -> bool:
    """`--glob`: fnmatch, case-insensitive, on the relative path when the pattern has a "/", else the name."""
    pattern = pattern.lower()
    target = relative.as_posix() if "/" in pattern else relative.name
    return fnmatch.fnmatchcase(target.lower(), pattern)


def read_list(source: str | os.PathLike, *, stdin: BinaryIO | None = None) -> list[str]:
    """`--from-list`: one path per line (`-` reads stdin); blank lines are skipped, duplicates dropped.

    Paths are as given (relative ones relative to the current folder); bytes that are not UTF-8 are kept
    as the file system's own (surrogate escapes), so any file name can be listed.
    """
    if os.fspath(source) == STDIO:
        data = (stdin or sys.stdin.buffer).read()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise UsageError(f"--from-list {os.fspath(source)}: cannot read ({e.strerror or e})") from None
    paths, seen = [], set()
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        path = os.fsdecode(line)
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            paths.append(path)
    return paths


def listed_sources(paths: Sequence[str], directory: str | os.PathLike | None) -> list[Source]:
    """Sources of `--from-list` paths, in list order: a file inside `directory` keeps its relative
    folder under OUTDIR, any other file goes to OUTDIR itself."""
    root = os.path.abspath(directory) if directory is not None else None
    sources = []
    for path in paths:
        relative = PurePath(Path(path).name)
        if root is not None:
            full = os.path.abspath(path)
            if os.path.commonpath([root, full]) == root and full != root:
                relative = PurePath(os.path.relpath(full, root))
        sources.append(Source(path, relative))
    return sources


def default_output_dir(directory: str | os.PathLike) -> Path:
    """`scans/` -> `scans_restored` beside it; `.` -> `../<name>_restored`."""
    path = Path(directory)
    if path.name in ("", ".", ".."):
        path = Path(os.path.abspath(directory))
    return path.with_name(path.name + DEFAULT_DIR_SUFFIX)
