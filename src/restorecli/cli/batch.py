"""`restore batch DIR`: restore a folder of images. Parsing and printing only; `restorecli.run` works
(discovery: which files; plan: where each output goes; loop: the run)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..settings import default_captioner
from .caption import CAPTIONS_HELP, load_for, print_caption, prompt_record, with_captions
from .options import RunRequest, restore_options
from ..errors import SetupError, UsageError
from ..run.outputs import STDIO
from .terminal import NORMAL, Output, faces_note, use_verbosity

#: Without a terminal, a progress line at most this often (seconds).
PLAIN_PROGRESS_INTERVAL = 15.0
#: Written beside the outputs: one JSON line per restored image with its caption and prompts.
PROMPTS_FILE = "prompts.jsonl"


@restore_options
def batch_command(
    directory: Annotated[Optional[str], typer.Argument(metavar="DIR", help="Folder of images (optional with --from-list).", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output folder. [default: DIR_restored/ beside DIR]", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Include subfolders; their structure is kept under the output folder.")] = False,
    glob: Annotated[Optional[str], typer.Option("--glob", help="Only files whose name (or, with a `/`, relative path) matches, e.g. `*.jpg` or `album*/*`. Case-insensitive.", show_default=False)] = None,
    from_list: Annotated[Optional[str], typer.Option("--from-list", help="Restore the files listed in FILE, one path per line (`-`: stdin).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo outputs that already exist (default: skip them, so a rerun resumes).")] = False,
    suffix: Annotated[str, typer.Option("--suffix", help="Appended to each input's stem to name its output.")] = "_restored",
    fmt: Annotated[Optional[str], typer.Option("--format", help="Output format: png, jpg, webp, tif. [default: the input's when writable, else png]", show_default=False)] = None,
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality.")] = 95,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per file on stdout, then a summary object.")] = False,
    overlap: Annotated[bool, typer.Option("--io-overlap/--no-io-overlap", help="Read the next image and write the previous one while the model runs.")] = True,
    save_guidance_map: Annotated[Optional[str], typer.Option("--save-guidance-map", metavar="DIR", help="Also write each image's restoration-guidance weight map into DIR as `<name>_guidance.png` (subfolders mirrored).", show_default=False)] = None,
    captions: Annotated[Optional[str], typer.Option("--captions", metavar="FILE|DIR", help=CAPTIONS_HELP, show_default=False)] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run as a Ray Data pipeline on a Ray cluster (`pip install 'restorecli[ray]'`): DIR and -o may then be URLs (s3://, gs://, file://).")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDRESS", help="The cluster for --ray, e.g. `ray://head:10001` or `auto`. [default: RAY_ADDRESS, a local `ray start`, else a new local Ray]", show_default=False)] = None,
    ray_workers: Annotated[Optional[str], typer.Option("--ray-workers", metavar="N|MIN-MAX", help="Restoring actors for --ray: N, or MIN-MAX to autoscale. [default: one per GPU of the cluster; without GPUs, one per two CPUs]", show_default=False)] = None,
    devices: Annotated[Optional[str], typer.Option("--devices", metavar="LIST", help="One worker process per device, all pulling from one queue: `cuda:0,cuda:1`, `all` (every CUDA device), or `cpu,cpu`. Each loads the models once; same outputs as one process.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr (a line per file).")] = False,
    *,
    request: RunRequest,
) -> None:
    """Restore every image in a folder; a rerun skips what is done.

    Writes `<name>_restored.<ext>` for each image of DIR into `DIR_restored/` (or `-o OUTDIR`), never
    into DIR unless `-o DIR` says so, and never over an input. A bad file is reported with one line and
    the batch goes on (exit 1 at the end); an output that exists is skipped, so after Ctrl-C or a crash
    the same command finishes the set. Progress and messages go to stderr; `--json` puts one JSON line
    per file on stdout.

    Examples:

    `restore batch scans/ -o scans_restored/`

    `restore batch photos/ -r --glob '*.jpg' --format png`

    `find. -name '*.tif' | restore batch --from-list - -o out/ --json`

    `restore batch scans/ --captions captions.jsonl`   # captions from `restore caption scans/ --json`

    Beside the outputs, `prompts.jsonl` gets one line per restored image: input, output, caption,
    positive and negative prompt, captioner and its revision.
    """
    out = use_verbosity(quiet, verbose)
    code = run_batch_command(
        directory, output, request, out=out, recursive=recursive, pattern=glob, from_list=from_list,
        overwrite=overwrite, suffix=suffix, fmt=fmt, quality=quality, json_lines=json_lines, overlap=overlap,
        save_guidance_map=save_guidance_map, captions=captions, devices=devices,
        ray=ray or ray_address is not None or ray_workers is not None, ray_address=ray_address, ray_workers=ray_workers,
    )
    raise typer.Exit(code)


def run_batch_command(
    directory: str | None,
    output: str | None,
    request: RunRequest,
    *,
    out: Output,
    recursive: bool = False,
    pattern: str | None = None,
    from_list: str | None = None,
    overwrite: bool = False,
    suffix: str = "_restored",
    fmt: str | None = None,
    quality: int = 95,
    json_lines: bool = False,
    overlap: bool = True,
    save_guidance_map: str | None = None,
    captions: str | None = None,
    devices: str | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_workers: str | None = None,
) -> int:
    from ..pipeline.build import load_pipeline
    from ..run import discovery, plan, storage

    settings = request.settings
    urls = storage.is_url(directory) or storage.is_url(output)
    outdir = _url_output(directory, output, from_list, save_guidance_map, ray) if urls else _output_dir(directory, output, from_list)
    local = isinstance(outdir, Path)  # else a URL: no lock, no prompts.jsonl, writes by run.storage
    device_list = _devices(devices, request)
    if ray and device_list is not None:
        raise UsageError("--ray and --devices: give one of them (--ray runs on the devices of the Ray cluster)")
    workers = _ray_workers(ray_workers) if ray else None

    # 1. What to restore
    failures = []
    ignored: list[str] = []
    if from_list is not None:
        sources = discovery.listed_sources(discovery.read_list(from_list), directory)
        if pattern is not None:
            sources = [s for s in sources if discovery.matches_pattern(s.relative, pattern)]
    elif storage.is_url(directory):
        sources = storage.list_sources(directory, recursive=recursive, pattern=pattern)
    else:
        same_folder = local and outdir.exists() and os.path.samefile(outdir, directory)
        found = discovery.discover(
            directory, recursive=recursive, pattern=pattern,
            exclude=([outdir] if local else []) + ([save_guidance_map] if save_guidance_map is not None else []),
            skip_suffix=suffix if same_folder and suffix else None,
        )
        sources, ignored, failures = found.sources, found.ignored, found.failures
    if local:
        entries = failures + plan.plan_batch(sources, outdir, suffix=suffix, fmt=fmt, overwrite=overwrite)
    else:
        entries = failures + storage.plan_urls(sources, outdir, suffix=suffix, fmt=fmt, overwrite=overwrite)
    if save_guidance_map is not None:
        entries = _with_guidance_maps(settings, entries, outdir, Path(save_guidance_map))
    if captions is not None and not settings.stage1_only:
        entries = with_captions(entries, captions, out=out, captioner=default_captioner(request.load),
                                relative={s.path: s.relative.as_posix() for s in sources})
    load = load_for(request, entries, captions)
    jobs = sum(isinstance(e, plan.Job) for e in entries)
    skipped = sum(getattr(e, "status", None) == "skipped" for e in entries)
    where = f"{directory} -> {outdir}" if directory is not None else f"-> {outdir}"
    others = f"; {_count(len(ignored), 'other file')} ignored" if ignored else ""
    renamed = _renamed(entries, suffix, fmt)
    if renamed:
        others += f"; {len(renamed)} share a name with another, so their outputs carry the source extension"
    if entries:
        out.info(f"{_count(len(entries), 'image')} ({where}): {jobs} to restore, {skipped} already done{others}")
    else:
        out.warning(f"no images found ({where}){others}")
    for path in ignored:
        out.detail(f"ignored (not an image): {path}")

    # 2. Lock the output folder, clean what a killed run left there, run
    if jobs and local:
        try:
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SetupError(f"-o {outdir}: cannot create the folder ({e.strerror or e})") from None
    prompts = None if settings.stage1_only or not local else outdir / PROMPTS_FILE
    stdout = sys.stdout  # the JSON lines' stream; with --ray everything else printed there goes to stderr
    view = BatchView(out, entries, json_lines=json_lines, renamed=renamed, prompts=prompts,
                     negative_prompt=settings.prompts.negative_prompt, stdout=stdout)
    # Ray's driver prints its cluster's notices (an actor lost, a task retried) to stdout: stderr they go
    with contextlib.redirect_stdout(sys.stderr) if ray else contextlib.nullcontext():
        summary = _run(view, entries, outdir, local, jobs, ray, ray_address, workers, device_list, load, settings,
                       load_pipeline, overwrite=overwrite, fmt=fmt, quality=quality, overlap=overlap)
        view.print_summary(summary)
        if json_lines:
            out.json_line(summary.as_json(), stream=stdout)
    return summary.exit_code


def _run(view, entries, outdir, local, jobs, ray, ray_address, workers, device_list, load, settings, load_pipeline, *,
         overwrite, fmt, quality, overlap):
    """Lock the output folder, remove an earlier run's temp files, run the entries in the mode asked for."""
    from ..run import plan
    from ..run.loop import BatchInterrupted, run_batch

    out = view.out
    with plan.output_folder_lock(outdir) if jobs and local else contextlib.nullcontext():
        for path in plan.remove_stale_temp_files(entries):
            out.detail(f"removed an unfinished temp file of an earlier run: {path}")
        try:
            with view:
                if ray:
                    from ..run.loader import PipelineLoader
                    from ..run.ray_batch import run_on_ray

                    summary = run_on_ray(
                        entries, PipelineLoader(load, settings.stage1_only, factory=load_pipeline), settings,
                        address=ray_address, workers=workers, overwrite=overwrite, fmt=fmt, quality=quality,
                        events=view,
                    )
                elif device_list is not None:
                    from ..run.loader import PipelineLoader
                    from ..run.workers import run_on_devices

                    summary = run_on_devices(
                        entries, PipelineLoader(load, settings.stage1_only, factory=load_pipeline), settings,
                        device_list, overwrite=overwrite, fmt=fmt, quality=quality, events=view,
                    )
                else:
                    summary = run_batch(
                        entries, lambda: load_pipeline(load, stage1_only=settings.stage1_only), settings,
                        overwrite=overwrite, fmt=fmt, quality=quality,
                        overlap=overlap, events=view,
                    )
        except BatchInterrupted as stop:
            summary = stop.summary
    return summary


def _url_output(directory, output, from_list, save_guidance_map, ray: bool) -> str | Path:
    from ..run.storage import is_url

    if not ray:
        raise UsageError("URLs (s3://, gs://, file://...) are read and written by the Ray pipeline; add --ray")
    if output is None:
        raise UsageError("a URL to restore needs -o OUTDIR (a URL or a local folder)")
    if from_list is not None or save_guidance_map is not None:
        raise UsageError("--from-list and --save-guidance-map take local paths, not URLs")
    if directory is None:
        raise UsageError("give a folder or URL to restore (`restore batch s3://bucket/scans -o ... --ray`)")
    return output if is_url(output) else Path(output)


def _ray_workers(text: str | None) -> int | tuple[int, int] | None:
    if text is None:
        return None
    low, dash, high = text.partition("-")
    try:
        bounds = (int(low), int(high)) if dash else (int(low), int(low))
    except ValueError:
        raise UsageError(f"--ray-workers must be N or MIN-MAX, e.g. 4 or 1-8; got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise UsageError(f"--ray-workers must be at least 1 (and MIN <= MAX); got {text!r}")
    return bounds if dash else bounds[0]


def _devices(devices: str | None, request: RunRequest) -> list[str] | None:
    if devices is None:
        return None
    from ..run.workers import parse_devices

    if request.load.device != "auto":
        raise UsageError(f"--device {request.load.device} and --devices {devices}: give one of them "
                         "(--devices for several workers)")
    return parse_devices(devices)


def _with_guidance_maps(settings, entries, outdir: Path, map_dir: Path) -> list:
    """`--save-guidance-map DIR`: each image's map at DIR/<its output's subfolder>/<name>_guidance.png, named
    by the output-naming rule. A map is written right after its image, by the same rules (never over an
    input; kept unless --overwrite); an image skipped because its output exists gets no map."""
    import dataclasses

    from ..run.plan import Job, plan_guidance_maps

    if settings.stage1_only:
        raise UsageError("--save-guidance-map needs stage 2; it cannot be combined with --stage1-only")
    if map_dir.exists() and not map_dir.is_dir():
        raise UsageError(f"--save-guidance-map {map_dir}: not a folder (`restore batch` writes one map per image)")
    entries, maps = plan_guidance_maps(entries, outdir, map_dir)
    return [dataclasses.replace(e, guidance_map=maps[e.input]) if isinstance(e, Job) else e for e in entries]


def _renamed(entries, suffix: str, fmt: str | None) -> list[tuple[str, str]]:
    """(input, output) of the entries whose output the naming rule did not give the plain name."""
    from ..run.outputs import output_name

    return [(e.input, e.output) for e in entries if e.output is not None and getattr(e, "status", None) != "failed"
            and Path(e.output).name != output_name(Path(e.input).name, suffix, fmt)]


def _output_dir(directory: str | None, output: str | None, from_list: str | None) -> Path:
    from ..run.discovery import default_output_dir

    if directory is None and from_list is None:
        raise UsageError("give a folder (`restore batch DIR`) or a list of files (`--from-list FILE`)")
    if directory is not None and not Path(directory).is_dir():
        if Path(directory).exists():
            raise UsageError(f"{directory} is not a folder; use `restore {directory}` for one image")
        raise UsageError(f"{directory}: no such folder")
    if output == STDIO:
        raise UsageError("`restore batch` writes files; for a pipe use `restore - -o -`")
    if output is None:
        if directory is None:
            raise UsageError("--from-list without DIR needs -o OUTDIR")
        outdir = default_output_dir(directory)
    else:
        outdir = Path(output)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir}: exists and is not a folder")
    return outdir


class BatchView:
    """Progress on stderr (a rich bar on a terminal, a plain line every 15 s otherwise), one `error:`
    line per failed file as it happens, JSON lines on stdout with --json, and the final summary."""

    def __init__(self, out: Output, entries, *, json_lines: bool, renamed=(), prompts: Path | None = None,
                 negative_prompt: str = "", stdout=None):
        from ..run.plan import Job

        self.out = out
        self.json_lines = json_lines
        self.stdout = stdout  # where the JSON lines go (None: sys.stdout)
        self.renamed = list(renamed)
        self.prompts = prompts  # prompts.jsonl, appended to per restored image (a rerun adds the new ones)
        self.negative_prompt = negative_prompt
        self.total = len(entries)
        self.jobs_left = sum(isinstance(e, Job) for e in entries)
        self.done = self.ok = self.skipped = self.failed = 0
        self.computed_count = 0
        self.per_worker: dict[str, int] = {}  # with --devices: files restored by each worker
        self.first_start: float | None = None
        self.start = time.perf_counter()
        self.last_line = self.start
        self.current = ""
        self.progress = None
        self.task = None

    # -- context: the live bar -------------------------------------------------------------------
    def __enter__(self):
        if self.out.level >= NORMAL and self.out.err.is_terminal and self.total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("restoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[current]}"),
                console=self.out.err, transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("restoring", total=self.total, eta="-:--", rate="", current="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- BatchEvents ------------------------------------------------------------------------------
    def loading(self) -> None:
        self._show("loading models...")

    def started(self, index: int, job) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter()
        self.current = job.input
        self._show(job.input)

    def step(self, done: int, total: int) -> None:
        self._show(f"{self.current} (step {done}/{total})")

    def computed(self, index: int, job) -> None:
        self.computed_count += 1
        self.jobs_left -= 1

    def worker_lost(self, device: str, worker: int, job, reason: str, *, requeued: bool, restarted: bool) -> None:
        what = f"while restoring {job.input}" if job is not None else "between files"
        then = "; the file goes back to the queue" if requeued else ""
        then += "; a new worker takes its place" if restarted else ""
        self.out.error(f"the worker on {device} (#{worker}) died ({reason}) {what}{then}")

    def result(self, index: int, result) -> None:
        self.done += 1
        if result.device is not None and result.status == "ok":
            label = _worker_label(result.device, result.worker)
            self.per_worker[label] = self.per_worker.get(label, 0) + 1
        if result.status == "ok":
            self.ok += 1
            self.out.detail(f"{result.input} -> {result.output} ({result.width}x{result.height}{faces_note(result)}, "
                            f"{result.seconds:.1f} s)")
            print_caption(self.out, result)
            self._record_prompts(result)
        elif result.status == "skipped":
            self.skipped += 1
            self.out.detail(f"{result.input}: {result.output} exists; skipped")
        else:
            self.failed += 1
            self.out.error(result.error)
        if self.json_lines:
            self.out.json_line(result.as_json(), stream=self.stdout)
        if self.progress is not None:
            self.progress.update(self.task, completed=self.done, eta=self._eta(), rate=self._rate())
        elif self.out.level >= NORMAL and time.perf_counter() - self.last_line >= PLAIN_PROGRESS_INTERVAL:
            self.last_line = time.perf_counter()
            self.out.info(self._plain_line())

    def _record_prompts(self, result) -> None:
        if self.prompts is None:
            return
        import json

        line = json.dumps(prompt_record(result, self.negative_prompt), ensure_ascii=False)
        try:
            with open(self.prompts, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(line + "\n")
        except OSError as e:
            self.out.warning(f"{self.prompts}: cannot record the prompts ({e.strerror or e}); the images are written")
            self.prompts = None

    # -- text -----------------------------------------------------------------------------------
    def _show(self, current: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, current=_shorten(current))

    def _per_image(self) -> float | None:
        if not self.computed_count or self.first_start is None:
            return None
        return (time.perf_counter() - self.first_start) / self.computed_count

    def _rate(self) -> str:
        per_image = self._per_image()
        if not per_image:
            return ""
        text = f"{60 / per_image:.1f} images/min"
        if len(self.per_worker) > 1 and self.first_start is not None:  # --devices: each worker's share
            minutes = (time.perf_counter() - self.first_start) / 60
            text += " (" + ", ".join(f"{label} {n / minutes:.1f}" for label, n in sorted(self.per_worker.items())) + ")"
        return text

    def _eta(self) -> str:
        per_image = self._per_image()
        return _duration(per_image * self.jobs_left) if per_image else "-:--"

    def _plain_line(self) -> str:
        text = (f"[{self.done}/{self.total}] {self.ok} restored, {self.skipped} skipped, {self.failed} failed; "
                f"elapsed {_duration(time.perf_counter() - self.start)}")
        if self._per_image():
            text += f", ETA {self._eta()}, {self._rate()}"
        return text

    def print_summary(self, summary) -> None:
        if self.out.level < NORMAL:
            return
        head = "interrupted" if summary.interrupted else "done"
        text = f"{head}: {summary.ok} restored, {summary.skipped} skipped, {len(summary.failures)} failed"
        if summary.interrupted:
            text += f", {summary.not_done} not processed"
        text += f" in {_duration(summary.seconds)}"
        if summary.ok and summary.seconds > 0:
            text += f" ({summary.ok / summary.seconds * 60:.1f} images/min)"
        self.out.info(text)
        if self.renamed:
            source, output = self.renamed[0]
            self.out.info(f"{_count(len(self.renamed), 'output')} named with the source extension (several inputs share "
                          f"the name), e.g. {source} -> {output}")
        if summary.failures:
            self.out.info("failed:")
            for failure in summary.failures:
                self.out.info(f"  {failure.error}")
        if summary.interrupted:
            self.out.info("finished outputs are kept; run the same command again to do the rest")


def _worker_label(device: str, worker: int | None) -> str:
    return device if worker is None else f"{device}#{worker}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
