"""`restore IMAGE...`: plan where each output goes, refuse unsafe writes, run the batch loop, report.

The files go through the same loop as `restore batch` (`restorecli.run.loop.run_batch`: models loaded
once, I/O overlapped with the model, per-file failures reported and the run goes on); this module words
the results for the terminal (stderr lines, or JSON lines on stdout).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated, Optional

import typer

from ..errors import RestoreError, UsageError
from ..run.loop import run_batch
from ..run.outputs import STDIO, OutputPlan, check_output, is_directory_target
from ..run.plan import Job, file_guidance_maps, plan_outputs
from ..run.steps import FileResult
from ..settings import default_captioner
from .caption import CAPTION_HELP, CAPTIONS_HELP, load_for, print_caption, with_caption, with_captions
from .options import RunRequest, restore_options
from .terminal import QuietOpt, VerboseOpt, Output, faces_note, use_verbosity

HELP = (
    "Restore one or more images (the default command: `restore photo.png` = `restore image photo.png`).\n\n"
    "Writes `photo_restored.png` beside each input unless `-o` says otherwise; never overwrites an input, "
    "and keeps an existing output unless `--overwrite`. `-` reads stdin; `-o -` writes stdout.\n\n"
    "Example: `restore old_scan.jpg --task sr --upscale 2 --guidance 0.5 -o restored.png`"
)


@restore_options
def image_command(
    inputs: Annotated[list[str], typer.Argument(help="Image files (or `-` for stdin).", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output file, folder (DIR/), or `-` for stdout.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    suffix: Annotated[str, typer.Option("--suffix", help="Appended to the input's stem to name the output.")] = "_restored",
    fmt: Annotated[Optional[str], typer.Option("--format", help="Output format: png, jpg, webp, tif. [default: from the output's extension, else the input's]", show_default=False)] = None,
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality.")] = 95,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    save_guidance_map: Annotated[Optional[str], typer.Option("--save-guidance-map", help="Also write the region-adaptive guidance weight map (grayscale image) here.", show_default=False)] = None,
    captions: Annotated[Optional[str], typer.Option("--captions", metavar="FILE|DIR", help=CAPTIONS_HELP, show_default=False)] = None,
    caption: Annotated[Optional[str], typer.Option("--caption", metavar="TEXT", help=CAPTION_HELP, show_default=False)] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    *,
    request: RunRequest,
) -> None:
    out = use_verbosity(quiet, verbose)
    code = restore_files(
        inputs, output, request, out=out, overwrite=overwrite, suffix=suffix, fmt=fmt, quality=quality,
        json_lines=json_lines, save_guidance_map=save_guidance_map, captions=captions,
        caption=caption,
    )
    raise typer.Exit(code)


def restore_files(
    inputs: list[str],
    output: str | None,
    request: RunRequest,
    *,
    out: Output,
    overwrite: bool = False,
    suffix: str = "_restored",
    fmt: str | None = None,
    quality: int = 95,
    json_lines: bool = False,
    save_guidance_map: str | None = None,
    overlap: bool = True,
    captions: str | None = None,
    caption: str | None = None,
) -> int:
    """Returns the exit code: 0 all done, 1 some inputs failed. Usage/setup errors raise (exit 2);
    Ctrl-C raises `BatchInterrupted` after the outputs already computed are written."""
    from ..pipeline.build import load_pipeline

    settings = request.settings
    if caption is not None and captions is not None:
        raise UsageError("--caption and --captions both give captions; use one")
    plans = plan_outputs(inputs, output, suffix=suffix, fmt=fmt)
    to_stdout = any(p.output == STDIO for p in plans)
    if json_lines and to_stdout:
        raise UsageError("--json writes JSON lines to stdout; it cannot be combined with -o -")
    make_folders = output is not None and output != STDIO and is_directory_target(output)
    maps = {}
    if save_guidance_map is not None:
        if settings.stage1_only:
            raise UsageError("--save-guidance-map needs stage 2; it cannot be combined with --stage1-only")
        maps = file_guidance_maps(save_guidance_map, plans)
    entries: list = []
    for plan in plans:
        map_error = maps[plan.input].error if plan.input in maps else None
        unnamed = plan.error or (map_error and f"guidance map {map_error}")
        if unnamed is not None:
            entries.append(FileResult(plan.input, plan.output, "failed", error=unnamed))
            continue
        map_path = maps[plan.input].output if plan.input in maps else None
        try:
            check_output(plan, overwrite=overwrite, all_inputs=inputs)
            _check_guidance_map(plan, map_path, overwrite=overwrite, all_inputs=inputs)
            entries.append(Job(plan.input, plan.output, make_folders=make_folders, guidance_map=map_path))
        except RestoreError as exc:
            entries.append(FileResult(plan.input, plan.output, "failed", error=str(exc)))

    if captions is not None and not settings.stage1_only:
        entries = with_captions(entries, captions, out=out, captioner=default_captioner(request.load))
    if caption is not None and not settings.stage1_only:
        entries = with_caption(entries, caption)
        captions = "--caption"
    load = load_for(request, entries, captions)
    events = ImageEvents(out, json_lines)
    with _stdout_kept_for_image(to_stdout) as image_stream:
        summary = run_batch(
            entries, lambda: load_pipeline(load, stage1_only=settings.stage1_only), settings,
            overwrite=overwrite, fmt=fmt, quality=quality, overlap=overlap, events=events, stdout=image_stream,
        )
    if json_lines:
        out.json_line(summary.as_json())
    return summary.exit_code


def _check_guidance_map(plan: OutputPlan, path: str | None, *, overwrite: bool, all_inputs: list[str]) -> None:
    """The map obeys the output rules (never an input, kept unless --overwrite) and is not the image."""
    if path is None:
        return
    if plan.output != STDIO and os.path.abspath(path) == os.path.abspath(plan.output):
        raise UsageError(f"--save-guidance-map {path} would overwrite the restored image; choose another path")
    check_output(OutputPlan(plan.input, path), overwrite=overwrite, all_inputs=all_inputs)


class ImageEvents:
    """`restore IMAGE...` reporting: a step bar per image on a terminal, one line per file."""

    def __init__(self, out: Output, json_lines: bool):
        self.out = out
        self.json_lines = json_lines
        self._progress = None
        self.on_step = None

    def loading(self) -> None:
        self.out.detail("loading models...")

    def started(self, index: int, job) -> None:
        self._progress = self.out.step_progress(job.input)
        self.on_step = self._progress.__enter__()

    def step(self, done: int, total: int) -> None:
        if self.on_step is not None:
            self.on_step(done, total)

    def computed(self, index: int, job) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
        self._progress = self.on_step = None

    def result(self, index: int, result: FileResult) -> None:
        if self.json_lines:
            self.out.json_line(result.as_json())
        if result.status == "failed":
            self.out.error(result.error)
        elif result.status == "ok" and result.output != STDIO:
            self.out.info(f"{result.input} -> {result.output} ({result.width}x{result.height}{faces_note(result)}, "
                          f"{result.seconds:.1f} s)")
        print_caption(self.out, result)


@contextlib.contextmanager
def _stdout_kept_for_image(active: bool):
    """With `-o -`, stdout carries the image bytes only: anything else that Python code would print to
    stdout while models load and run (a stray print in a dependency) goes to stderr instead."""
    if not active:
        yield None
        return
    image_stream = sys.stdout.buffer
    with contextlib.redirect_stdout(sys.stderr):
        yield image_stream
