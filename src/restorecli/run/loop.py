"""The run itself: restore planned files with the models loaded once, lose nothing.

`run_batch` is the loop of `restore batch DIR` and of `restore a.png b.png -o out/`: it takes the
entries of `run.plan` (a `Job` per image to restore, a `FileResult` for what is settled already) and
runs the three steps of `run.steps` on each Job. Reading/decoding the next image and encoding/writing
the previous one run in a small thread pool while the current image is on the device (at most
`prefetch` decoded images ahead and `MAX_PENDING_WRITES` results waiting for the disk, so memory
stays bounded). Results are reported in input order whatever finishes first.

Nothing is lost: every output is written to a temp file beside it and renamed into place
(`images.write_image`), so a kill at any moment leaves complete outputs plus temp files, which
`run.plan.remove_stale_temp_files` deletes when the next run starts. A bad file (unreadable, empty,
truncated, not an image, a decompression bomb, gone since it was listed, out of memory even tiled)
becomes one failed `FileResult` and the run goes on. Ctrl-C stops before the next image, lets the
outputs already computed finish writing, and raises `BatchInterrupted` carrying the summary so far.

Reports go through `BatchEvents` callbacks and the returned `BatchSummary`; nothing here prints.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError, OutputError, RestoreError, brief
from ..oom import is_out_of_memory, release_memory
from ..settings import RestoreSettings
from .discovery import NEEDS_PLUGIN
from .outputs import STDIO
from .plan import Entry, Job
from .steps import FileResult, Restored, read_input, run_model, write_output

log = logging.getLogger("restorecli.run.loop")

#: Results computed but not yet written that the loop lets wait for the disk before it waits itself.
MAX_PENDING_WRITES = 2


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


@contextlib.contextmanager
def timed_run(summary: BatchSummary, wind_down: Callable[[], None]) -> Iterator[BatchSummary]:
    """The frame every engine (this loop, `run.workers`, `run.ray_batch`) runs its batch in: the block's
    time goes to `summary.seconds`; on Ctrl-C `wind_down()` settles what can still be settled, then the
    summary is marked interrupted and raised as `BatchInterrupted`."""
    start = time.perf_counter()
    try:
        yield summary
    except KeyboardInterrupt:
        wind_down()
        summary.interrupted = True
        raise BatchInterrupted(summary) from None
    finally:
        summary.seconds = time.perf_counter() - start


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
class Read:
    """Step 1's result: the decoded image and the seconds it took."""

    image: object
    seconds: float


# -- the three steps of one Job, each turning its failures into that file's FileResult --------------------
# (`run.workers` and `run.ray_batch` run the same functions, so every mode fails a file the same way)


def read_job(job: Job) -> Read | FileResult:
    """Step 1 (`steps.read_input`): the decoded image, or the file's failure."""
    t0 = time.perf_counter()
    try:
        image = read_input(job.input)
    except InputError as e:
        return FileResult(job.input, job.output, "failed", error=_with_plugin_hint(job.input, e))
    except Exception as e:  # noqa: BLE001 - a decoder bug in one file must not end the run
        log.debug("%s: reading failed", job.input, exc_info=True)
        return FileResult(job.input, job.output, "failed", error=f"{job.input}: cannot read ({brief(e)})")
    return Read(image, time.perf_counter() - t0)


def restore_job(pipe, job: Job, read: Read, settings: RestoreSettings, *, on_step=None) -> Restored | FileResult:
    """Step 2 (`steps.run_model`): the restored image, or the file's failure (out of memory even tiled,
    a model error). Usage and setup errors (RestoreError but Input/OutputError) are the run's: raised."""
    try:
        return run_model(pipe, read.image, settings, on_step=on_step, source=job.input,
                         guidance_map=job.guidance_map, caption=job.caption, caption_source=job.caption_source)
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


def write_job(job: Job, restored: Restored, spent: float, *, fmt: str | None, quality: int, overwrite: bool,
              stdout: BinaryIO | None = None, write=write_output) -> FileResult:
    """Step 3 (`steps.write_output`, or `write(dest, restored, fmt=, quality=, overwrite=)`): the file's
    FileResult, ok with its size and timing, or failed."""
    t0 = time.perf_counter()
    try:
        if job.output == STDIO:
            dest = stdout or sys.stdout.buffer
        else:
            dest = job.output
            if job.make_folders and write is write_output:
                _make_folder(Path(job.output).parent)
        write(dest, restored, fmt=fmt, quality=quality, overwrite=overwrite)
    except OutputError as e:
        return FileResult(job.input, job.output, "failed", error=str(e))
    except Exception as e:  # noqa: BLE001
        log.debug("%s: writing failed", job.output, exc_info=True)
        return FileResult(job.input, job.output, "failed", error=f"{job.output}: cannot write ({brief(e)})")
    return FileResult(job.input, job.output, "ok", seconds=spent + time.perf_counter() - t0,
                      width=restored.width, height=restored.height, seed=restored.seed, caption=restored.caption,
                      prompt=restored.prompt, caption_source=restored.caption_source,
                      captioner_revision=restored.captioner_revision, faces=restored.faces,
                      face_crops=[path for path, _ in restored.face_crops] if restored.face_crops is not None else None)


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
        try:
            with timed_run(self.summary, self._wind_down):
                for position, (index, entry) in self._ordered():
                    if isinstance(entry, FileResult):
                        self.pending.append((index, entry))
                    else:
                        self._prefetch(position)
                        self.pending.append((index, self._restore(index, entry)))
                    self._flush()
                    self._bound_pending_writes()
                self._flush(wait=True)
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
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
            restored = restore_job(self.pipe, job, read, self.settings, on_step=self.events.step)
        finally:
            model_seconds = time.perf_counter() - t0
            self.summary.model_seconds += model_seconds
            self.events.computed(index, job)
        if isinstance(restored, FileResult):
            return restored
        spent = read.seconds + model_seconds
        if self.pool is None:
            return self._write(job, restored, spent)
        return self.pool.submit(self._write, job, restored, spent)

    def _read(self, job: Job) -> Read | FileResult:
        return read_job(job)

    def _write(self, job: Job, restored: Restored, spent: float) -> FileResult:
        return write_job(job, restored, spent, fmt=self.fmt, quality=self.quality, overwrite=self.overwrite,
                         stdout=self.stdout)

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

