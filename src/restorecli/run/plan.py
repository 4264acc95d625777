"""Where each input of a run goes, and what need not run: the plan of `restore batch`.

`plan_batch` maps each `Source` to `OUTDIR/<relative folder>/<stem><suffix>.<ext>` and settles up front
what need not run: an output that exists is *skipped* (a rerun resumes), an output that would
overwrite an input or another input's output is a *failure* of that file. The rest become `Job`s for
`run.loop`. Also here: the lock that keeps two runs out of one output folder, and the removal of the
temp files a killed run left there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union
from dataclasses import dataclass

from ..errors import SetupError, UsageError
from .discovery import Source
from .outputs import FORMAT_EXTENSIONS, STDIO, output_name
from .steps import FileResult


@dataclass(frozen=True)
class Job:
    """One image to restore: read `input`, write `output` ("-": stdout)."""

    input: str
    output: str
    make_folders: bool = True  # create the output's folder when missing


Entry = Union[Job, FileResult]


def plan_batch(
    sources: Sequence[Source],
    outdir: str | os.PathLike,
    *,
    suffix: str = "_restored",
    fmt: str | None = None,
    overwrite: bool = False,
) -> list[Entry]:
    """A Job per source, or the FileResult that settles it without running: `skipped` when the output
    exists (and not `overwrite`), `failed` when the output would replace an input (never allowed) or
    the output of an earlier source (e.g. `a.png` and `a.gif` both -> `a_restored.png`)."""
    if fmt is not None and fmt.lower() not in FORMAT_EXTENSIONS:
        raise UsageError(f"`--format` must be png, jpg, webp or tif; got {fmt!r}")
    if os.sep in suffix or "/" in suffix:
        raise UsageError(f"`--suffix` must not contain a path separator; got {suffix!r}")
    input_keys = {_key(s.path) for s in sources}
    input_ids = {_file_id(s.path) for s in sources} - {None}
    claimed: dict[str, str] = {}
    entries: list[Entry] = []
    for source in sources:
        output = str(Path(outdir) / source.relative.parent / output_name(source.relative.name, suffix, fmt))
        key = _key(output)
        if key in input_keys or (_file_id(output) in input_ids and os.path.lexists(output)):
            reason = "is an input; refusing to overwrite it (choose another -o or --suffix)"
            entries.append(FileResult(source.path, output, "failed", error=f"{output}: {reason}"))
        elif key in claimed:
            reason = f"is also the output of {claimed[key]}; use --format, --suffix or separate runs"
            entries.append(FileResult(source.path, output, "failed", error=f"{output}: {reason}"))
        else:
            claimed[key] = source.path
            if os.path.lexists(output) and not overwrite:
                entries.append(FileResult(source.path, output, "skipped"))
            else:
                entries.append(Job(source.path, output))
    return entries


def _key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def output_folders(entries: Iterable[Entry]) -> list[Path]:
    """The folders the jobs write into (where a killed run may have left temp files)."""
    return sorted({Path(e.output).parent for e in entries if isinstance(e, Job) and e.output != STDIO})


def remove_stale_temp_files(entries: Iterable[Entry]) -> list[Path]:
    """Delete the temp files a killed run left in the folders these jobs write into."""
    from ..imageio import remove_stale_temp_files as remove_in

    removed = []
    for folder in output_folders(entries):
        if folder.is_dir():
            removed += remove_in(folder)
    return removed


@contextlib.contextmanager
def output_folder_lock(folder: str | os.PathLike):
    """Hold an exclusive lock on `folder` for a run, so that two runs cannot write into one folder and
    delete each other's temp files. It is a `flock` of the folder itself: no lock file is left behind,
    and the kernel drops it when the process dies, even by `kill -9`. Where there is no flock (Windows,
    some network file systems), the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetupError(
                f"{os.fspath(folder)}: another `restore batch` is writing into this folder",
                hint="wait for it to finish, or choose another -o",
            ) from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)
