"""The work behind the web app's Restore button, without Gradio: the loaded models, and one job.

A job restores the uploaded files with the CLI's own batch loop (`restorecli.run.loop.run_batch`: per
file `read_input` -> `run_model` -> `write_output`, the same error handling), so a downloaded file is
byte for byte what `restore` writes for the same settings: the input's format and bit depth, alpha,
colour profile and EXIF kept, named `<stem>_restored.<ext>` as the CLI names it. Around that it keeps
what the page shows: 8-bit PNG previews of the input (resized to the output size) and of the result,
the stage-1 image and the guidance weight map, and for several files one zip of the results.

`Models` holds the pipelines of one server: loaded once, at start, and kept. Another task of the same
model reuses the loaded stage 2 and loads only that task's cleaner (on its first use), unless its
stage-2 weights differ (v1 `face`), which loads a second pipeline.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import RestoreError
from ..run.loop import BatchEvents, BatchInterrupted, run_batch
from ..run.outputs import output_name
from ..run.plan import Job
from ..run.steps import FileResult
from ..settings import LoadSettings, RestoreSettings, default_settings

#: progress(text, done, total): done/total are the sampling steps of the current image (None before)
Progress = Callable[[str, "int | None", "int | None"], None]


class Stopping(RestoreError):
    """The server is shutting down; the job was abandoned."""


@dataclass(frozen=True)
class Upload:
    """An uploaded file: where the server keeps it, and its name on the user's machine."""

    path: str
    name: str


@dataclass
class ImageResult:
    name: str
    status: str  # ok | failed
    error: str | None = None
    output: str | None = None  # the restored file, as `restore` writes it
    before: str | None = None  # 8-bit RGB PNG previews at the output size
    after: str | None = None
    stage1: str | None = None
    guidance_map: str | None = None  # 8-bit grayscale PNG (as --save-guidance-map writes it)
    caption: str | None = None  # what the image was described as (the captioner's, or the one given)
    prompt: str | None = None  # the positive prompt it was conditioned on (caption, prompt)
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None


@dataclass
class Outcome:
    results: list[ImageResult] = field(default_factory=list)
    download: str | None = None  # the one restored file, or a zip of several

    @property
    def ok(self) -> list[ImageResult]:
        return [r for r in self.results if r.status == "ok"]

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.results if r.status != "ok"]


# -- the models ---------------------------------------------------------------------------------------


def _load_pipeline(load: LoadSettings):
    from ..pipeline.build import load_pipeline

    return load_pipeline(load)


class Models:
    """The pipelines of one server, for `load` (its model, device, precision...) and any task."""

    def __init__(self, load: LoadSettings, loader: Callable[[LoadSettings], object] | None = None):
        self.load = load
        self._loader = loader or _load_pipeline
        self._pipe = None
        self._stage1: dict[str, tuple] = {}  # task -> (cleaner, official stage-1 pipeline, defaults)
        self._separate: dict[str, object] = {}  # task -> its own pipeline (different stage-2 weights)
        self._lock = threading.Lock()
        #: held while a job runs on the device (one at a time; Gradio's queue keeps the others waiting)
        self.busy = threading.Lock()

    @property
    def version(self) -> str:
        return self.load.version

    @property
    def loaded(self):
        """The pipeline of `load`'s task once `start` has loaded it, else None."""
        return self._pipe

    def defaults(self, task: str) -> RestoreSettings:
        return default_settings(self.version, task)

    def start(self):
        """Load the pipeline of `load` (its task) now; SetupError / UsageError when it cannot load."""
        with self._lock:
            return self._start()

    def _start(self):
        if self._pipe is None:
            pipe = self._loader(self.load)
            self._stage1[self.load.task] = (pipe.cleaner, pipe.stage1_pipeline, pipe.default_settings)
            self._pipe = pipe
        return self._pipe

    def pipeline(self, task: str):
        """The pipeline for `task`, loading what that task needs on its first use."""
        with self._lock:
            pipe = self._start()
            if task in self._separate:
                return self._separate[task]
            if task not in self._stage1:
                load = self.load.replace(task=task)
                if not _same_stage2(self.load, task):
                    self._separate[task] = self._loader(load)
                    return self._separate[task]
                from ..pipeline.loading import load_components

                parts = load_components(load, stage1_only=True)
                self._stage1[task] = (parts.cleaner, parts.stage1_pipeline, parts.default_settings)
            pipe.cleaner, pipe.stage1_pipeline, pipe.default_settings = self._stage1[task]
            return pipe


    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the job on the device (if any) to end; True when none runs."""
        if not self.busy.acquire(timeout=timeout):
            return False
        self.busy.release()
        return True


def _same_stage2(load: LoadSettings, task: str) -> bool:
    """Whether `task` runs on the stage-2 weights already loaded for `load.task`."""
    if load.version == "custom":
        return True  # a description file has one stage 2 for every task
    from ..weights import wiring

    ours, theirs = wiring(load.version, load.task), wiring(load.version, task)
    return all(ours.get(role) == theirs.get(role) for role in ("sd", "controlnet"))


# -- the work folder ----------------------------------------------------------------------------------


class Workspace:
    """A private temp folder for the server's files, one subfolder per job; folders older than
    `max_age` seconds are removed when a new job starts, everything when the server stops."""

    def __init__(self, root: str | Path | None = None, *, max_age: float = 3600.0):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="restorecli-ui-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_age = max_age

    def new_job(self) -> Path:
        now = time.time()
        for old in self.root.iterdir():
            try:
                if old.is_dir() and now - old.stat().st_mtime > self.max_age:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        folder = self.root / uuid.uuid4().hex[:12]
        folder.mkdir()
        return folder

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# -- one job ------------------------------------------------------------------------------------------


def restore_uploads(models: Models, uploads: list[Upload], task: str, settings: RestoreSettings, folder: Path, *,
                    captions: list[str | None] | None = None, progress: Progress | None = None,
                    stop: threading.Event | None = None) -> Outcome:
    """Restore `uploads` with `settings` on the pipeline of `task`, writing into `folder`. `captions`
    (one per upload; None: the captioner's) are the page's edited captions, as `--caption` gives them.
    Every file is settled (ok or failed with its one-line reason, naming the file by its uploaded name);
    the run's own errors (bad settings for this model, weights missing for the task) raise RestoreError."""
    progress = progress or (lambda text, done, total: None)
    jobs = []
    for index, upload in enumerate(uploads):
        place = folder / str(index)
        place.mkdir()
        output = place / output_name(upload.name)
        guidance_map = None if settings.stage1_only else place / "guidance_map.png"
        caption = captions[index] if captions is not None else None
        jobs.append(Job(upload.path, str(output), make_folders=False,
                        guidance_map=None if guidance_map is None else str(guidance_map),
                        caption=None if caption is None else caption.strip(),
                        caption_source=None if caption is None else "--caption"))

    recorder: _Recorder | None = None

    def loader():
        nonlocal recorder
        if task != models.load.task:
            progress(f"loading what {task} needs (once)...", None, None)
        recorder = _Recorder(models.pipeline(task), {job.input: Path(job.output).parent for job in jobs})
        return recorder

    events = _Events(uploads, progress, stop)
    try:
        with models.busy:
            summary = run_batch(jobs, loader, settings, overlap=len(jobs) > 1, events=events)
    except BatchInterrupted:
        raise Stopping("the server is stopping; this job was abandoned") from None
    outcome = Outcome()
    for upload, job, result in zip(uploads, jobs, summary.results):
        outcome.results.append(_image_result(upload, job, result, recorder, Path(job.output).parent))
    ok = outcome.ok
    if len(uploads) == 1 and ok:
        outcome.download = ok[0].output
    elif ok:
        outcome.download = str(_zip(folder / "restored.zip", [r.output for r in ok]))
    return outcome


class _Recorder:
    """The pipeline as `run_model` calls it, keeping the previews of what only the call returns (the
    stage-1 image; the input as decoded)."""

    def __init__(self, pipe, places: dict[str, Path]):
        self.pipe = pipe
        self.places = places  # input path -> the folder of its files
        self.previews: dict[str, tuple[str, str | None]] = {}  # input path -> (before, stage 1)

    def __call__(self, image, settings, **kwargs):
        out = self.pipe(image, settings, **kwargs)
        source = kwargs.get("source")
        place = self.places[source]
        result = out.images[0]  # (3, H, W) float: the output size
        height, width = int(result.shape[-2]), int(result.shape[-1])
        before = _save_preview(place / "before.png", _resized_preview(image, (width, height)))
        stage1 = None
        if getattr(out, "stage1", None) is not None:
            stage1 = _save_preview(place / "stage1.png", _float_preview(out.stage1[0]))
        self.previews[source] = (before, stage1)
        return out


def _image_result(upload: Upload, job: Job, result: FileResult, recorder, place: Path) -> ImageResult:
    if result.status != "ok":
        error = (result.error or "failed").replace(job.input, upload.name).replace(job.output, Path(job.output).name)
        return ImageResult(upload.name, "failed", error=error, seconds=result.seconds)
    before, stage1 = recorder.previews.get(job.input, (None, None)) if recorder is not None else (None, None)
    after = _save_preview(place / "after.png", _file_preview(job.output))
    guidance_map = job.guidance_map if job.guidance_map and Path(job.guidance_map).is_file() else None
    return ImageResult(upload.name, "ok", output=job.output, before=before, after=after, stage1=stage1,
                       guidance_map=guidance_map, caption=result.caption, prompt=result.prompt, seconds=result.seconds,
                       width=result.width, height=result.height)


class _Events(BatchEvents):
    """Progress for the page, and the stop check (between sampling steps) when the server shuts down."""

    def __init__(self, uploads: list[Upload], progress: Progress, stop: threading.Event | None):
        self.uploads = uploads
        self.progress = progress
        self.stop = stop
        self.current = ""

    def started(self, index: int, job) -> None:
        self._check()
        name = self.uploads[index].name
        self.current = f"{name} ({index + 1} of {len(self.uploads)})" if len(self.uploads) > 1 else name
        self.progress(f"{self.current}: stage 1", None, None)

    def step(self, done: int, total: int) -> None:
        self._check()
        self.progress(f"{self.current}: sampling", done, total)

    def _check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise KeyboardInterrupt


# -- previews -----------------------------------------------------------------------------------------


def _eight_bit(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint16:
        return ((rgb.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return rgb.astype(np.uint8)


def _resized_preview(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The input as the model saw it (upright sRGB) at the output size, 8-bit, for the comparison slider."""
    from PIL import Image

    arr = np.asarray(rgb)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)
    image = Image.fromarray(_eight_bit(arr))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image)


def _float_preview(chw) -> np.ndarray:
    """A (3, H, W) float tensor in [0, 1] as 8-bit HWC, with the official truncation."""
    from ..images import from_float

    return from_float(chw.permute(1, 2, 0).float().cpu().numpy(), 8)


def _file_preview(path: str) -> np.ndarray:
    """The written file as the browser will show it: 8-bit RGB (16-bit scaled, alpha left out)."""
    from ..images import read_image

    return _eight_bit(read_image(path).rgb)


def _save_preview(path: Path, rgb: np.ndarray) -> str:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="PNG", compress_level=1)
    return str(path)


def _zip(path: Path, files: list[str]) -> Path:
    """The files in one zip (stored: images are compressed already), under unique names."""
    used: set[str] = set()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, file in enumerate(files):
            name = Path(file).name
            if name in used:
                name = f"{index + 1}_{name}"
            used.add(name)
            archive.write(file, arcname=name)
    return path
