"""`restore batch --ray`: the planned Jobs as a Ray Data pipeline, on a local Ray or a cluster.

    rows (one per Job) -> read + decode (CPU tasks) -> restore (a pool of actors, one GPU each, or one
    CPU each on a cluster without GPUs, that load the models once) -> encode + write (CPU tasks) ->
    one result row per file, streamed back to the caller in completion order

The three stages run the functions of `run.loop` (`read_job`, `restore_job`, `write_job`), so a bad
file fails exactly as in a local batch and becomes a row, never a crash of the pipeline. What is
done already was settled before (the caller's plan skips existing outputs), so no work is scheduled
for it. Writes are atomic: local paths through `images`' temp file + rename, URLs through
`run.storage`. Scheduling is Ray's: the queue, back-pressure, the restart of a lost actor and the retry
of its file (Ray Data's actors have `max_restarts=-1`, `max_task_retries=-1`), and autoscaling between
the bounds of `workers=(min, max)`.

Between stages the data travels pickled in binary columns (a decoded image, a restored one): Ray Data's
own tensor columns would not keep the ICC profile, EXIF and alpha of each file.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import RestoreError, SetupError, UsageError
from ..settings import RestoreSettings
from .loader import PipelineLoader
from .loop import BatchEvents, BatchSummary, Read, read_job, restore_job, timed_run, write_job
from .plan import Entry, Job
from .steps import FileResult

log = logging.getLogger("restorecli.run.ray_batch")


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` (None: the one `ray.init` finds: RAY_ADDRESS, a local `ray
    start`, else a new local one), unless this process is connected already."""
    try:
        import ray
    except ImportError:
        raise SetupError("--ray needs Ray Data on this machine and the cluster's",
                         hint="pip install 'restorecli[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    _quiet_ray()


def _quiet_ray() -> None:
    """Ray's notices (INFO on every dataset, deprecations) would interleave with our progress on stderr."""
    import ray.data  # noqa: F401 - configures its loggers on import; set ours after

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def default_workers() -> int:
    """One actor per GPU of the cluster; without GPUs, one per two CPUs (the rest reads and writes)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2)


def run_on_ray(
    entries: Sequence[Entry],
    loader: PipelineLoader,
    settings: RestoreSettings,
    *,
    address: str | None = None,
    workers: int | tuple[int, int] | None = None,
    overwrite: bool = False,
    fmt: str | None = None,
    quality: int = 95,
    events: BatchEvents | None = None,
) -> BatchSummary:
    """Restore every Job of `entries` on Ray (FileResults are reported first, as they are). `workers`:
    the size of the actor pool, or (min, max) for an autoscaling one [default: `default_workers()`].
    Raises `BatchInterrupted` on Ctrl-C, SetupError when the pipeline itself fails (models that do not
    load on the actors, a cluster that cannot be reached)."""
    events = events or BatchEvents()
    summary = BatchSummary(total=len(entries))
    jobs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, Job):
            jobs.append((index, entry))
        else:
            summary.results.append(entry)
            events.result(index, entry)
    if not jobs:
        return summary
    events.loading()
    reported: set[int] = set()
    rows = iter(())

    def wind_down() -> None:
        _stop(rows, jobs)
        _report_written(jobs, reported, summary, events)

    try:
        with timed_run(summary, wind_down):
            connect(address)
            dataset = _pipeline(jobs, loader, settings, workers, dict(overwrite=overwrite, fmt=fmt, quality=quality))
            rows = iter(dataset.iter_rows())
            for row in rows:
                index, result = int(row["index"]), pickle.loads(row["result"])
                if isinstance(result, _Fatal):
                    raise result.error()
                summary.model_seconds += float(row["model_seconds"])
                events.computed(index, entries[index])
                summary.results.append(result)
                events.result(index, result)
                reported.add(index)
    except RestoreError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps what failed on a node; say what it was
        raise SetupError(f"the Ray pipeline failed: {_cause(e)}") from e
    return summary


def _stop(rows, jobs) -> None:
    """After Ctrl-C: shut the pipeline down (Ray Data cancels its tasks and actors when its iterator is
    closed), then remove the temp files of the local writes it cut off."""
    from .plan import remove_stale_temp_files

    try:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    except Exception:  # noqa: BLE001 - stopping anyway
        log.debug("closing the Ray pipeline failed", exc_info=True)
    local = [job for _, job in jobs if not _is_url(job.output)]
    _settle(local)
    remove_stale_temp_files(local)


def _settle(jobs: list[Job], quiet: float = 1.0, timeout: float = 10.0) -> None:
    """Wait (at most `timeout` s) until the local outputs and temp files have not changed for `quiet` s:
    a write that Ray's cancellation reached too late finishes (or is removed) before we report."""
    import os

    from .plan import output_folders

    def snapshot():
        found = set()
        for folder in output_folders(jobs):
            with contextlib.suppress(OSError):
                found.update(os.listdir(folder))
        return found

    deadline = time.monotonic() + timeout
    last, since = snapshot(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()


def _report_written(jobs, reported: set[int], summary: BatchSummary, events: BatchEvents) -> None:
    """After Ctrl-C: files whose write finished but whose row had not reached us yet are there, complete
    (writes are atomic); report them as restored, so that the report matches what is on disk."""
    import os

    from .storage import exists

    for index, job in jobs:
        if index in reported:
            continue
        try:
            there = exists([job.output])[0] if _is_url(job.output) else os.path.lexists(job.output)
        except Exception:  # noqa: BLE001 - a store we cannot ask now: the rerun will tell
            there = False
        if there:
            result = FileResult(job.input, job.output, "ok")
            summary.results.append(result)
            events.result(index, result)


def _pipeline(jobs, loader: PipelineLoader, settings: RestoreSettings, workers, options: dict):
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller draws progress from the result rows
    context.print_on_execution_start = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rows = [{"index": index, "job": pickle.dumps(job)} for index, job in jobs]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # a file per block: fine-grained retries
    dataset = dataset.map(_read_row)
    size = workers or default_workers()
    pool = (ray.data.ActorPoolStrategy(min_size=size[0], max_size=size[1]) if isinstance(size, tuple)
            else ray.data.ActorPoolStrategy(size=size))
    dataset = dataset.map_batches(
        _Restorer, batch_size=1, compute=pool,
        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
        fn_constructor_kwargs=dict(loader=loader, settings=settings, device="cuda" if gpus else "cpu"),
    )
    return dataset.map(_write_row, fn_kwargs=options)


# -- the stages (module-level, so that Ray pickles them by reference) ------------------------------------


def _read_row(row: dict) -> dict:
    """Read + decode (a CPU task): the `Read`, or the file's failure."""
    job: Job = pickle.loads(row["job"])
    read = _read_url(job) if _is_url(job.input) else read_job(job)
    return {"index": row["index"], "job": row["job"], "state": pickle.dumps(read)}


def _read_url(job: Job) -> Read | FileResult:
    import io

    from ..errors import InputError
    from ..images import read_image
    from .storage import read_bytes

    t0 = time.perf_counter()
    try:
        image = read_image(io.BytesIO(read_bytes(job.input)))
    except InputError as e:
        return FileResult(job.input, job.output, "failed", error=f"{job.input}: {e.reason}")
    except Exception as e:  # noqa: BLE001
        return FileResult(job.input, job.output, "failed", error=f"{job.input}: cannot read ({e})")
    return Read(image, time.perf_counter() - t0)


@dataclass(frozen=True)
class _Fatal:
    """A usage or setup error on an actor (models that do not load there): it ends the run, as in a local
    batch. It travels as a result row, so that the caller gets the one line of the error, not a
    crashed actor that Ray would restart and retry."""

    kind: str
    message: str
    hint: str | None
    exit_code: int

    @classmethod
    def of(cls, error: RestoreError) -> _Fatal:
        return cls(type(error).__name__, str(error), error.hint, error.exit_code)

    def error(self) -> RestoreError:
        error = (UsageError if self.kind == "UsageError" else SetupError)(self.message, hint=self.hint)
        error.exit_code = self.exit_code
        return error


class _Restorer:
    """The actor: loads the pipeline once, restores one file per call."""

    def __init__(self, loader: PipelineLoader, settings: RestoreSettings, device: str):
        import warnings

        warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")
        self.settings = settings
        self.device = device
        self.fatal: _Fatal | None = None
        try:
            self.pipe = loader.on(device)()
        except RestoreError as e:
            self.pipe, self.fatal = None, _Fatal.of(e)
        self.where = f"{socket.gethostname()}/{device}"
        if device == "cuda":
            import ray

            ids = ray.get_gpu_ids()
            self.where = f"{socket.gethostname()}/cuda:{ids[0]}" if ids else self.where

    def __call__(self, batch: dict) -> dict:
        states, seconds = [], []
        for job_bytes, state in zip(batch["job"], batch["state"]):
            job, read = pickle.loads(job_bytes), pickle.loads(state)
            t0 = time.perf_counter()
            if self.fatal is not None:
                restored = self.fatal
            elif isinstance(read, Read):
                try:
                    restored = restore_job(self.pipe, job, read, self.settings)
                except RestoreError as e:
                    restored = self.fatal = _Fatal.of(e)
                if not isinstance(restored, (FileResult, _Fatal)):
                    restored = (restored, read.seconds + time.perf_counter() - t0)
            else:
                restored = read
            seconds.append(time.perf_counter() - t0 if isinstance(read, Read) else 0.0)
            states.append(pickle.dumps((restored, self.where)))
        return {"index": batch["index"], "job": batch["job"], "state": states, "model_seconds": seconds}


def _write_row(row: dict, *, overwrite: bool, fmt: str | None, quality: int) -> dict:
    """Encode + write (a CPU task): the file's FileResult, with where it was restored."""
    job: Job = pickle.loads(row["job"])
    restored, where = pickle.loads(row["state"])
    if isinstance(restored, _Fatal):
        return {"index": row["index"], "result": pickle.dumps(restored), "model_seconds": row["model_seconds"]}
    if isinstance(restored, FileResult):
        result = restored
    else:
        image, spent = restored
        if _is_url(job.output):
            from .storage import write_restored

            result = write_job(job, image, spent, fmt=fmt, quality=quality, overwrite=overwrite, write=write_restored)
        else:
            result = write_job(job, image, spent, fmt=fmt, quality=quality, overwrite=overwrite)
    result.device = where
    return {"index": row["index"], "result": pickle.dumps(result), "model_seconds": row["model_seconds"]}


def _is_url(path: str) -> bool:
    return "://" in path


def _cause(error: BaseException) -> str:
    """The innermost message of a Ray error (a task's exception arrives wrapped, with its traceback)."""
    from ..errors import brief

    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    while error.__cause__ is not None:
        error = error.__cause__
    return brief(error)
