"""`restore batch --devices`: the same per-file steps, in one worker process per device.

The caller of `run_on_devices` (the parent) keeps the queue of Jobs, gives each worker the next one
as soon as it is free, and reports every result through the `run.loop.BatchEvents` as it arrives
(completion order, each with its device). A worker is a `spawn`ed process (so that CUDA starts
cleanly in each), loads the pipeline once, on its device, and runs `run.loop.run_batch` on one Job at
a time: reading, the model, out-of-memory handling, the atomic write and every per-file failure are
those of a single-process run, so the bytes are the same as one process's on the same device type.

Each worker has a pipe of its own, so a killed worker breaks nothing but its pipe. A worker that dies
(kill -9, a crashed driver, the kernel's OOM killer) is reported; its file goes back to the queue
once (a second death on the same file fails that file) and the worker is replaced, at most
`MAX_RESTARTS` times per worker. Ctrl-C or SIGTERM in the parent: every worker gets SIGTERM, which
drops the image it is on (a write in progress removes its temp file, as in one process), the results
that arrive meanwhile are reported, and `BatchInterrupted` is raised as `run_batch` raises it.
Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and the parent decides.
Nothing here prints; the parent's events say everything.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait

from ..errors import RestoreError, SetupError, UsageError
from ..settings import LoadSettings, RestoreSettings, SettingError
from .loader import PipelineLoader
from .loop import BatchEvents, BatchInterrupted, BatchSummary, run_batch, timed_run
from .plan import Entry, Job
from .steps import FileResult

log = logging.getLogger("restorecli.run.workers")

#: A worker that died is started again on its device at most this many times.
MAX_RESTARTS = 2
#: After Ctrl-C, how long the workers get to stop before they are killed (seconds).
STOP_TIMEOUT = 30.0


class DeviceEvents(BatchEvents):
    """`BatchEvents` plus what only a run over several workers has."""

    def worker_lost(self, device: str, worker: int, job: Job | None, reason: str, *, requeued: bool,
                    restarted: bool) -> None:
        """Worker `worker` (on `device`) died, `reason` (e.g. "killed by signal 9"), while on `job`
        (None: between files). `requeued`: the file went back to the queue; `restarted`: a new worker
        replaces it."""


def parse_devices(text: str) -> list[str]:
    """`cuda:0,cuda:1`, `cpu,cpu` or `all` (every CUDA device) -> the device of each worker."""
    text = text.strip()
    if text.lower() == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UsageError("--devices all: no CUDA device found; list the devices instead, e.g. --devices cpu,cpu")
        return [f"cuda:{i}" for i in range(count)]
    devices = [part.strip() for part in text.split(",")]
    if not text or not all(devices):
        raise UsageError(f"--devices must be a comma-separated list of devices (cuda:0,cuda:1, cpu,cpu) or all; got {text!r}")
    for device in devices:
        if device == "auto":
            raise UsageError("--devices lists devices (cuda:0,cuda:1, cpu,cpu) or is all; `auto` is not one")
        try:
            LoadSettings(device=device)
        except SettingError:
            raise UsageError(f"--devices: {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    return devices


def run_on_devices(
    entries: Sequence[Entry],
    loader: PipelineLoader,
    settings: RestoreSettings,
    devices: Sequence[str],
    *,
    overwrite: bool = False,
    fmt: str | None = None,
    quality: int = 95,
    events: BatchEvents | None = None,
) -> BatchSummary:
    """Restore every Job of `entries` with one worker per device (FileResults are reported first, as
    they are); returns the summary, or raises `BatchInterrupted` on Ctrl-C/SIGTERM. A worker's setup
    error (missing weights, a device that does not exist) ends the run with that error."""
    return _DeviceRun(list(entries), loader, settings, list(devices), events or DeviceEvents(),
                      dict(overwrite=overwrite, fmt=fmt, quality=quality)).run()


# -- the parent ------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    number: int  # position in the device list (stays when the worker is replaced)
    device: str
    process: multiprocessing.process.BaseProcess
    conn: object
    current: int | None = None  # entry index it is restoring
    restarts: int = 0
    alive: bool = True


class _DeviceRun:
    def __init__(self, entries, loader, settings, devices, events, options):
        self.entries = entries
        self.loader = loader
        self.settings = settings
        self.devices = devices
        self.events = events
        self.options = options
        self.summary = BatchSummary(total=len(entries))
        self.queue: deque[int] = deque()
        self.deaths: dict[int, int] = {}  # entry index -> workers that died on it
        self.workers: list[_Worker] = []
        self.context = multiprocessing.get_context("spawn")
        cpus = os.cpu_count() or 1
        self.threads = max(1, cpus // len(devices))  # the CPU shared out, so that N workers do not fight

    def run(self) -> BatchSummary:
        try:
            with timed_run(self.summary, self._wind_down):
                for index, entry in enumerate(self.entries):
                    if isinstance(entry, Job):
                        self.queue.append(index)
                    else:
                        self._report(index, entry)
                if self.queue:
                    starting = self.devices[: len(self.queue)]  # 2 files: no third worker to start for nothing
                    self.workers = [self._start(number, device) for number, device in enumerate(starting)]
                    self._loop()
        finally:
            self._close()
        return self.summary

    def _start(self, number: int, device: str, restarts: int = 0) -> _Worker:
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(
            # not daemonic: a worker may start processes of its own (torch.compile's compile workers); it
            # exits when its pipe closes, so it does not outlive this process by more than its image
            target=_worker_main, name=f"restore-{device}-{number}", daemon=False,
            args=(child_end, self.loader.on(device), self.settings, self.options, self.threads),
        )
        process.start()
        child_end.close()
        return _Worker(number, device, process, parent_end, restarts=restarts)

    def _loop(self) -> None:
        while True:
            live = [w for w in self.workers if w.alive]
            for worker in live:
                if worker.current is None and self.queue:
                    worker.current = self.queue.popleft()
                    self._send(worker, (worker.current, self.entries[worker.current]))
            busy = [w for w in live if w.current is not None]
            if not busy:
                if self.queue:  # every worker is gone for good
                    for index in list(self.queue):
                        self._fail(index, "not restored: every worker died (see the lines above)")
                    self.queue.clear()
                return
            self._receive(live)

    def _receive(self, live: list[_Worker], timeout: float | None = None) -> None:
        ready = set(wait([w.conn for w in live] + [w.process.sentinel for w in live], timeout))
        for worker in live:
            if worker.conn in ready:
                self._drain(worker)
            if worker.alive and worker.process.sentinel in ready:
                self._drain(worker)
                if worker.alive:
                    self._lost(worker)

    def _drain(self, worker: _Worker) -> None:
        """Handle every message waiting on this worker's pipe (a dead worker's last ones included)."""
        try:
            while worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            worker.process.join(5)
            self._lost(worker)

    def _handle(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "loading":
            self.events.loading()
        elif kind == "started":
            self.events.started(message[1], self.entries[message[1]])
        elif kind == "step":
            self.events.step(message[2], message[3])
        elif kind == "result":
            _, index, result, model_seconds = message
            self.summary.model_seconds += model_seconds
            if worker.current == index:
                worker.current = None
            self.events.computed(index, self.entries[index])
            self._report(index, dataclasses.replace(result, device=worker.device, worker=worker.number))
        elif kind == "fatal":
            _, name, text, hint, code = message
            error = (UsageError if name == "UsageError" else SetupError)(text, hint=hint)
            error.exit_code = code
            raise error

    def _lost(self, worker: _Worker) -> None:
        """A worker died: report it, put its file back once (fail it the second time), replace the worker."""
        if not worker.alive:
            return
        worker.alive = False
        worker.process.join(5)
        reason = _death(worker.process.exitcode)
        index, worker.current = worker.current, None
        requeued = False
        if index is not None:
            self.deaths[index] = self.deaths.get(index, 0) + 1
            if self.deaths[index] == 1:
                self.queue.appendleft(index)
                requeued = True
            else:
                self._fail(index, f"the worker on {worker.device} died twice while restoring it ({reason}); skipped")
        restart = worker.restarts < MAX_RESTARTS and bool(self.queue)
        job = self.entries[index] if index is not None else None
        log.debug("worker %d on %s died (%s) on %s", worker.number, worker.device, reason, job)
        report = getattr(self.events, "worker_lost", None)  # a DeviceEvents, or any object with the method
        if report is not None:
            report(worker.device, worker.number, job, reason, requeued=requeued, restarted=restart)
        worker.conn.close()
        if restart:
            replacement = self._start(worker.number, worker.device, worker.restarts + 1)
            self.workers[self.workers.index(worker)] = replacement

    def _fail(self, index: int, reason: str) -> None:
        job = self.entries[index]
        self._report(index, FileResult(job.input, job.output, "failed", error=f"{job.input}: {reason}"))

    def _report(self, index: int, result: FileResult) -> None:
        self.summary.results.append(result)
        self.events.result(index, result)

    def _send(self, worker: _Worker, message) -> None:
        try:
            worker.conn.send(message)
        except (OSError, EOFError):
            self._lost(worker)

    def _wind_down(self) -> None:
        """Ctrl-C/SIGTERM: SIGTERM every worker, report what they finish, kill those that do not stop."""
        live = [w for w in self.workers if w.alive]
        for worker in live:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        try:
            while live and time.monotonic() < deadline:
                for worker in live:
                    gone = not worker.process.is_alive()  # before draining: what it sent before dying is read
                    try:
                        while worker.conn.poll():
                            message = worker.conn.recv()
                            if message[0] == "result":
                                self._handle(worker, message)
                    except (EOFError, OSError):
                        pass
                    if gone:
                        worker.alive = False
                live = [w for w in live if w.alive]
                if live:
                    wait([w.process.sentinel for w in live] + [w.conn for w in live], 0.2)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting
        for worker in live:
            worker.process.kill()

    def _close(self) -> None:
        for worker in self.workers:
            if worker.alive and worker.process.is_alive():
                try:
                    worker.conn.send(None)
                except (OSError, EOFError):
                    pass
        for worker in self.workers:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
            worker.conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with code {exitcode}"


# -- the worker ------------------------------------------------------------------------------------------


class _WorkerEvents(BatchEvents):
    def __init__(self, conn, index: int, stop: _StopRequest):
        self.conn, self.index, self.stop = conn, index, stop

    def started(self, index: int, job: Job) -> None:
        self.conn.send(("started", self.index))

    def step(self, done: int, total: int) -> None:
        self.conn.send(("step", self.index, done, total))

    def computed(self, index: int, job: Job) -> None:
        self.stop.writing = True  # from here on the file is finished and reported, whatever comes


class _StopRequest:
    """SIGTERM in a worker: drops the image being read or restored (KeyboardInterrupt, as Ctrl-C in one
    process), but not one being written: that one is finished and reported, then the worker stops."""

    def __init__(self):
        self.writing = False
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True
        if not self.writing:
            raise KeyboardInterrupt


def _worker_main(conn, loader: PipelineLoader, settings: RestoreSettings, options: dict, threads: int) -> None:
    """One worker: take a Job from the pipe, restore it with `run_batch`, send its FileResult back;
    None or a closed pipe ends it, SIGTERM ends it (see `_StopRequest`)."""
    stop = _StopRequest()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    import warnings

    warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")
    import torch

    torch.set_num_threads(threads)
    pipe = None

    def load():
        nonlocal pipe
        if pipe is None:
            conn.send(("loading",))
            pipe = loader()
        return pipe

    try:
        while not stop.requested:
            message = conn.recv()
            if message is None:
                return
            index, job = message
            stop.writing = False
            try:
                summary = run_batch([job], load, settings, overlap=False, events=_WorkerEvents(conn, index, stop),
                                    **options)
            except BatchInterrupted as interrupted:
                summary = interrupted.summary
            except RestoreError as e:
                conn.send(("fatal", type(e).__name__, str(e), e.hint, e.exit_code))
                return
            stop.writing = True
            for result in summary.results:
                conn.send(("result", index, result, summary.model_seconds))
            stop.writing = False
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return
    finally:
        conn.close()
