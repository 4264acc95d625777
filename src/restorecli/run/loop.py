"""Folder runs: find the images, plan where each output goes, restore them all, lose nothing.

The library half of `restore batch DIR` (and of `restore a.png b.png -o out/`, which runs the same loop):

* `discover` lists the images of a folder (`--recursive`, `--glob`); `read_list` reads `--from-list`.
* `plan_batch` maps each input to `OUTDIR/<relative folder>/<stem><suffix>.<ext>` and decides up front
  what need not run: an output that exists is *skipped* (a rerun resumes), an output that would
  overwrite an input or another input's output is a *failure* of that file.
* `run_batch` restores the planned files with the models loaded once. Reading/decoding the next image
  and encoding/writing the previous one run in a small thread pool while the current image is on the
  device (at most `prefetch` decoded images ahead and `MAX_PENDING_WRITES` results waiting for the
  disk, so memory stays bounded). Results are reported in input order whatever finishes first.

Nothing is lost: every output is written to a temp file beside it and renamed into place
(`images.write_image`), so a kill at any moment leaves complete outputs plus temp files, which
`remove_stale_temp_files` deletes when the next run starts. A bad file (unreadable, empty, truncated,
not an image, a decompression bomb, gone since it was listed, out of memory even tiled) becomes one
failed `FileResult` and the run goes on. Ctrl-C stops before the next image, lets the outputs already
computed finish writing, and raises `BatchInterrupted` carrying the summary so far.

Reports go through `BatchEvents` callbacks and the returned `BatchSummary`; nothing here prints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import BinaryIO, Union

from ..errors import InputError, OutputError, RestoreError, SetupError, UsageError, brief
from ..oom import is_out_of_memory, release_memory
from ..settings import RestoreSettings
from .outputs import FORMAT_EXTENSIONS, STDIO, output_name
from .files import FileResult, Restored, read_input, run_model, write_output

log = logging.getLogger("restorecli.run.loop")

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
#: Results computed but not yet written that the loop lets wait for the disk before it waits itself.
MAX_PENDING_WRITES = 2


# -- discovery ---------------------------------------------------------------------------------------


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


# -- planning ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One image to restore: read `input`, write `output` ("-": stdout)."""

    input: str
    output: str
    make_folders: bool = True  # create the output's folder when missing
    guidance_map: str | None = None  # where --save-guidance-map writes this image's map


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
    from ..images import remove_stale_temp_files as remove_in

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


# -- running -----------------------------------------------------------------------------------------


class BatchEvents:
    """What `run_batch` reports; override what you need. Every call comes from the calling thread."""

    def loading(self) -> None:
        """The models are about to load (once, before the first image that needs them)."""

    def started(self, index: int, job: Job) -> None:
        """The model starts on entry `index`."""

    def step(self, done: int, total: int) -> None:
        """Sampling progress of the current image."""

    def computed(self, index: int, job: Job) -> None:
        """The model is done with entry `index` (its output may still be on its way to the disk)."""

    def result(self, index: int, result: FileResult) -> None:
        """Entry `index` is settled. Called in entry order, exactly once per entry reached."""


@dataclass
class BatchSummary:
    total: int
    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0  # time spent in the model (step 2), summed over images
    interrupted: bool = False

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> int:
        return self.count("ok")

    @property
    def skipped(self) -> int:
        return self.count("skipped")

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def not_done(self) -> int:
        return self.total - len(self.results)

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failures else 0)

    def as_json(self) -> dict:
        return {
            "summary": True, "ok": self.ok, "skipped": self.skipped, "failed": len(self.failures),
            "not_done": self.not_done, "interrupted": self.interrupted, "seconds": round(self.seconds, 3),
        }


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_batch`; `summary` holds what was settled (computed outputs were written)."""

    def __init__(self, summary: BatchSummary):
        super().__init__("interrupted")
        self.summary = summary


def run_batch(
    entries: Sequence[Entry],
    load_pipeline: Callable[[], object],
    settings: RestoreSettings,
    *,
    overwrite: bool = False,
    fmt: str | None = None,
    quality: int = 95,
    overlap: bool = True,
    prefetch: int = 1,
    events: BatchEvents | None = None,
    stdout: BinaryIO | None = None,
) -> BatchSummary:
    """Restore every Job of `entries` (FileResults pass through as they are) and report each entry.

    `load_pipeline()` is called once, when the first image is ready, and only if some image is.
    `overlap=False` does everything in the calling thread, one step after the other.
    Outputs named "-" go to `stdout` (default sys.stdout.buffer). Usage and setup errors raised by
    the pipeline (bad options, missing weights) end the run; everything else is one file's failure.
    """
    return _BatchRun(entries, load_pipeline, settings, overwrite=overwrite, fmt=fmt, quality=quality,
                     overlap=overlap, prefetch=max(0, prefetch), events=events or BatchEvents(),
                     stdout=stdout).run()


@dataclass
class _Read:
    image: object
    seconds: float


class _BatchRun:
    def __init__(self, entries, load_pipeline, settings, *, overwrite, fmt, quality, overlap, prefetch, events, stdout):
        self.entries = list(entries)
        self.load_pipeline = load_pipeline
        self.settings = settings
        self.overwrite, self.fmt, self.quality = overwrite, fmt, quality
        self.events = events
        self.stdout = stdout
        self.prefetch = prefetch if overlap else 0
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="restore-io") if overlap else None
        self.jobs = [i for i, e in enumerate(self.entries) if isinstance(e, Job)]
        self.reads: dict[int, Future] = {}
        self.pending: deque[tuple[int, Future | FileResult]] = deque()
        self.summary = BatchSummary(total=len(self.entries))
        self.pipe = None

    def run(self) -> BatchSummary:
        start = time.perf_counter()
        try:
            for position, (index, entry) in self._ordered():
                if isinstance(entry, FileResult):
                    self.pending.append((index, entry))
                else:
                    self._prefetch(position)
                    self.pending.append((index, self._restore(index, entry)))
                self._flush()
                self._bound_pending_writes()
            self._flush(wait=True)
        except KeyboardInterrupt:
            self._wind_down()
            self.summary.interrupted = True
            self.summary.seconds = time.perf_counter() - start
            raise BatchInterrupted(self.summary) from None
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    def _ordered(self):
        job_position = {index: k for k, index in enumerate(self.jobs)}
        for index, entry in enumerate(self.entries):
            yield job_position.get(index, -1), (index, entry)

    # -- the three steps -------------------------------------------------------------------------

    def _prefetch(self, position: int) -> None:
        """Start reading the next `prefetch` images while this one is on the device."""
        if self.pool is None:
            return
        for index in self.jobs[position : position + 1 + self.prefetch]:
            if index not in self.reads:
                self.reads[index] = self.pool.submit(self._read, self.entries[index])

    def _restore(self, index: int, job: Job) -> Future | FileResult:
        read = self.reads.pop(index).result() if index in self.reads else self._read(job)
        if isinstance(read, FileResult):
            return read
        if self.pipe is None:
            self.events.loading()
            self.pipe = self.load_pipeline()
        self.events.started(index, job)
        t0 = time.perf_counter()
        try:
            restored = run_model(self.pipe, read.image, self.settings, on_step=self.events.step, source=job.input,
                                 guidance_map=job.guidance_map)
        except (InputError, OutputError) as e:
            return FileResult(job.input, job.output, "failed", error=str(e))
        except RestoreError:
            raise  # usage and setup errors are the run's, not this file's
        except Exception as e:  # noqa: BLE001 - one image's failure must not end a 10,000-file run
            if is_out_of_memory(e):
                release_memory()
                return FileResult(job.input, job.output, "failed", error=f"{job.input}: {_oom_reason(read.image)}")
            log.debug("%s: the model failed", job.input, exc_info=True)
            return FileResult(job.input, job.output, "failed", error=f"{job.input}: restoration failed ({brief(e)})")
        finally:
            model_seconds = time.perf_counter() - t0
            self.summary.model_seconds += model_seconds
            self.events.computed(index, job)
        spent = read.seconds + model_seconds
        if self.pool is None:
            return self._write(job, restored, spent)
        return self.pool.submit(self._write, job, restored, spent)

    def _read(self, job: Job) -> _Read | FileResult:
        t0 = time.perf_counter()
        try:
            image = read_input(job.input)
        except InputError as e:
            return FileResult(job.input, job.output, "failed", error=_with_plugin_hint(job.input, e))
        except Exception as e:  # noqa: BLE001 - a decoder bug in one file must not end the run
            log.debug("%s: reading failed", job.input, exc_info=True)
            return FileResult(job.input, job.output, "failed", error=f"{job.input}: cannot read ({brief(e)})")
        return _Read(image, time.perf_counter() - t0)

    def _write(self, job: Job, restored: Restored, spent: float) -> FileResult:
        t0 = time.perf_counter()
        try:
            if job.output == STDIO:
                dest = self.stdout or sys.stdout.buffer
            else:
                dest = job.output
                if job.make_folders:
                    _make_folder(Path(job.output).parent)
            write_output(dest, restored, fmt=self.fmt, quality=self.quality, overwrite=self.overwrite)
        except OutputError as e:
            return FileResult(job.input, job.output, "failed", error=str(e))
        except Exception as e:  # noqa: BLE001
            log.debug("%s: writing failed", job.output, exc_info=True)
            return FileResult(job.input, job.output, "failed", error=f"{job.output}: cannot write ({brief(e)})")
        return FileResult(job.input, job.output, "ok", seconds=spent + time.perf_counter() - t0,
                          width=restored.width, height=restored.height, seed=restored.seed)

    # -- reporting in order ----------------------------------------------------------------------

    def _flush(self, wait: bool = False) -> None:
        while self.pending:
            index, item = self.pending[0]
            if isinstance(item, Future):
                if not (wait or item.done()):
                    return
                item = item.result()
            self.pending.popleft()
            self.summary.results.append(item)
            self.events.result(index, item)

    def _bound_pending_writes(self) -> None:
        """Wait for the disk when more than MAX_PENDING_WRITES results are queued for it."""
        while True:
            waiting = [item for _, item in self.pending if isinstance(item, Future) and not item.done()]
            if len(waiting) <= MAX_PENDING_WRITES:
                return
            waiting[0].result()
            self._flush()

    def _wind_down(self) -> None:
        """After Ctrl-C: no new reads; the outputs already computed are written and reported."""
        for future in self.reads.values():
            future.cancel()
        self.reads.clear()
        while self.pending:
            index, item = self.pending[0]
            if isinstance(item, Future):
                if item.cancelled():
                    break
                item = item.result()
            self.pending.popleft()
            self.summary.results.append(item)
            self.events.result(index, item)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e))
        raise OutputError(folder, f"cannot create the folder ({reason})") from None



def _oom_reason(image) -> str:
    size = f"{image.width} x {image.height}"
    return (f"too large for the available memory even tiled ({size}, out of memory); "
            "try a smaller --upscale, --tile-size or --max-memory")


def _with_plugin_hint(path: str, error: InputError) -> str:
    name = NEEDS_PLUGIN.get(Path(path).suffix.lower())
    if name and "unknown format" in error.reason:
        return f"{error.path}: {name} is not supported by this Pillow installation (no plugin); convert it first"
    return str(error)

