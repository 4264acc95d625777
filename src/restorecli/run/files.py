"""`restore IMAGE...`: the files named on the command line, through the loop of `restore batch`.

`restore_files` plans outputs, refuses unsafe writes, then hands the files to the same loop as
`restore batch` (`run.loop.run_batch`: models loaded once, I/O overlapped with the model, per-file
failures reported and the run goes on) and reports each file (stderr lines, or JSON lines on stdout).
It returns the exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

from ..cli.terminal import Output
from ..errors import RestoreError, UsageError
from ..settings.defaults import RestoreOptions
from .loop import run_batch
from .outputs import STDIO, OutputPlan, check_output, is_directory_target
from .plan import Job, file_guidance_maps, plan_outputs
from .steps import GUIDANCE_MAPS, FileResult


# -- `restore IMAGE...` ----------------------------------------------------------------------------


def restore_files(
    inputs: list[str],
    output: str | None,
    opts: RestoreOptions,
    *,
    out: Output,
    overwrite: bool = False,
    suffix: str = "_restored",
    fmt: str | None = None,
    quality: int = 95,
    json_lines: bool = False,
    save_guidance_map: str | None = None,
    overlap: bool = True,
) -> int:
    """Returns the exit code: 0 all done, 1 some inputs failed. Usage/setup errors raise (exit 2);
    Ctrl-C raises `run.loop.BatchInterrupted` after the outputs already computed are written."""
    from ..pipeline.loading import load_pipeline

    opts = opts.resolve()
    plans = plan_outputs(inputs, output, suffix=suffix, fmt=fmt)
    to_stdout = any(p.output == STDIO for p in plans)
    if json_lines and to_stdout:
        raise UsageError("--json writes JSON lines to stdout; it cannot be combined with -o -")
    make_folders = output is not None and output != STDIO and is_directory_target(output)
    maps = {}
    if save_guidance_map is not None:
        if opts.stage1_only:
            raise UsageError("--save-guidance-map needs stage 2; it cannot be combined with --stage1-only")
        maps = file_guidance_maps(save_guidance_map, plans)
        paths = {inp: m.output for inp, m in maps.items() if m.error is None}
        opts = dataclasses.replace(opts, extra={**opts.extra, GUIDANCE_MAPS: paths})
    entries: list = []
    for plan in plans:
        map_error = maps[plan.input].error if plan.input in maps else None
        unnamed = plan.error or (map_error and f"guidance map {map_error}")
        if unnamed is not None:
            entries.append(FileResult(plan.input, plan.output, "failed", error=unnamed))
            continue
        try:
            check_output(plan, overwrite=overwrite, all_inputs=inputs)
            _check_guidance_map(plan, opts, overwrite=overwrite, all_inputs=inputs)
            entries.append(Job(plan.input, plan.output, make_folders=make_folders))
        except RestoreError as exc:
            entries.append(FileResult(plan.input, plan.output, "failed", error=str(exc)))

    events = _ImageEvents(out, json_lines)
    with _stdout_kept_for_image(to_stdout) as image_stream:
        summary = run_batch(
            entries, lambda: load_pipeline(opts), opts, overwrite=overwrite, fmt=fmt, quality=quality,
            overlap=overlap, events=events, stdout=image_stream,
        )
    if json_lines:
        out.json_line(summary.as_json())
    return summary.exit_code


def _check_guidance_map(plan: OutputPlan, opts: RestoreOptions, *, overwrite: bool, all_inputs: list[str]) -> None:
    """The map obeys the output rules (never an input, kept unless --overwrite) and is not the image."""
    path = opts.extra.get(GUIDANCE_MAPS, {}).get(plan.input)
    if path is None:
        return
    if plan.output != STDIO and os.path.abspath(path) == os.path.abspath(plan.output):
        raise UsageError(f"--save-guidance-map {path} would overwrite the restored image; choose another path")
    check_output(OutputPlan(plan.input, path), overwrite=overwrite, all_inputs=all_inputs)


class _ImageEvents:
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
            self.out.info(f"{result.input} -> {result.output} ({result.width}x{result.height}, {result.seconds:.1f} s)")


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
