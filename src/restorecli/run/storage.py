"""Inputs and outputs at URLs (`s3://bucket/scans`, `gs://...`, `hdfs://...`, `file:///mnt/nfs/...`) for
`restore batch --ray`, through pyarrow's file systems (the ones Ray Data itself uses).

A local path needs none of this (`run.discovery` lists it, `images` writes it atomically). For a URL:
`list_sources` lists a folder like `discovery.discover` (image extensions, hidden names left out, `-r`,
`--glob`), `plan_urls` names the outputs by the rule of `run.plan` and skips those that exist,
`read_bytes` fetches a file, `write_bytes` stores one all or nothing: on a file system (`file://`,
`hdfs://`) through a temp file renamed into place, on an object store (s3, gs, abfs) in a single put,
which the store makes visible whole or not at all. Credentials and regions come from the usual
environment of each store (AWS_*, GOOGLE_APPLICATION_CREDENTIALS...), as pyarrow reads them.

The naming rule works on paths: a URL `s3://bucket/a/b.png` is named as the path `/bucket/a/b.png` and
turned back (`_as_path`, `_as_url`).
"""

from __future__ import annotations

import fnmatch
import os
import secrets
from collections.abc import Sequence
from pathlib import PurePosixPath

from ..errors import InputError, OutputError, UsageError
from .discovery import IMAGE_EXTENSIONS, Source
from .outputs import DEFAULT_SUFFIX
from .plan import Entry, Job, NameRequest, check_naming_options, unique_outputs
from .steps import FileResult


def is_url(path: str | None) -> bool:
    return path is not None and "://" in str(path)


def filesystem(url: str):
    """(pyarrow FileSystem, the path inside it) of `url`."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(url)
    except (ValueError, OSError) as e:
        raise UsageError(f"{url}: not a URL pyarrow can open ({e})") from None
    return fs, path


def _as_path(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return "/" + rest.lstrip("/") if scheme else url


def _as_url(scheme: str, path: str) -> str:
    return f"{scheme}://{path.lstrip('/')}" if scheme != "file" else f"file:///{path.lstrip('/')}"


def list_sources(url: str, *, recursive: bool = False, pattern: str | None = None) -> list[Source]:
    """The image files under the folder `url`, sorted by relative path (extension only: content checks
    would download every file)."""
    from pyarrow.fs import FileSelector, FileType

    fs, root = filesystem(url)
    scheme = url.partition("://")[0]
    try:
        infos = fs.get_file_info(FileSelector(root, recursive=recursive))
    except (OSError, FileNotFoundError) as e:
        raise UsageError(f"{url}: cannot list it ({e})") from None
    sources = []
    for info in infos:
        if info.type != FileType.File:
            continue
        relative = PurePosixPath(info.path).relative_to(PurePosixPath(root))
        if any(part.startswith(".") for part in relative.parts):
            continue
        if relative.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if pattern is not None and not _matches(relative, pattern):
            continue
        sources.append(Source(_as_url(scheme, info.path), relative))
    return sorted(sources, key=lambda s: s.relative.as_posix())


def _matches(relative: PurePosixPath, pattern: str) -> bool:
    target = relative.as_posix() if "/" in pattern else relative.name
    return fnmatch.fnmatchcase(target.lower(), pattern.lower())


def exists(urls: Sequence[str]) -> list[bool]:
    from pyarrow.fs import FileType

    out = []
    for url in urls:
        fs, path = filesystem(url)
        out.append(fs.get_file_info(path).type != FileType.NotFound)
    return out


def plan_urls(sources: Sequence[Source], outdir: str, *, suffix: str = DEFAULT_SUFFIX, fmt: str | None = None,
              overwrite: bool = False) -> list[Entry]:
    """`run.plan.plan_batch` for URLs: a Job per source, or `skipped` when its output exists."""
    check_naming_options(suffix, fmt)
    scheme = outdir.partition("://")[0] if is_url(outdir) else None
    base = _as_path(outdir)
    requests = [NameRequest(_as_path(s.path), PurePosixPath(base) / s.relative.parent, s.relative.name) for s in sources]
    named = unique_outputs(requests, suffix=suffix, fmt=fmt)
    outputs = [_as_url(scheme, n.output) if scheme else n.output for n in named]
    present = exists(outputs) if scheme else [os.path.lexists(o) for o in outputs]
    entries: list[Entry] = []
    for source, name, output, there in zip(sources, named, outputs, present):
        if name.error is not None:
            entries.append(FileResult(source.path, output, "failed", error=name.error))
        elif there and not overwrite:
            entries.append(FileResult(source.path, output, "skipped"))
        else:
            entries.append(Job(source.path, output))
    return entries


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(url, "no such file") from None
    except OSError as e:
        raise InputError(url, f"cannot read ({e})") from None
    if not data:
        raise InputError(url, "empty file (0 bytes)")
    return data


def write_bytes(url: str, data: bytes, *, overwrite: bool) -> None:
    """Store `data` at `url` all or nothing (see the module docstring); OutputError on failure."""
    from pyarrow.fs import FileType, LocalFileSystem

    fs, path = filesystem(url)
    if not overwrite and fs.get_file_info(path).type != FileType.NotFound:
        raise OutputError(url, "already exists; use --overwrite to replace it")
    parent = str(PurePosixPath(path).parent)
    try:
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, LocalFileSystem) or fs.type_name == "hdfs":
            temp = f"{parent}/.{PurePosixPath(path).name[:180]}.{secrets.token_hex(4)}.restoring.tmp"
            with fs.open_output_stream(temp) as f:
                f.write(data)
            fs.move(temp, path)
        else:
            with fs.open_output_stream(path) as f:  # one object, visible when the put completes
                f.write(data)
    except OSError as e:
        raise OutputError(url, f"cannot write ({e})") from None


def write_restored(url: str, restored, *, fmt: str | None, quality: int, overwrite: bool) -> None:
    """`steps.write_output` for a URL: encode in memory, then `write_bytes`."""
    from ..images import encode_image
    from .outputs import format_of

    kind = fmt or format_of(PurePosixPath(_as_path(url)).name) or "png"
    data = encode_image(restored.pixels, alpha=restored.alpha, fmt=kind, quality=quality,
                        icc_profile=restored.icc_profile, exif=restored.exif)
    write_bytes(url, data, overwrite=overwrite)
