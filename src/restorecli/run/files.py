"""Restore images one by one: the per-file steps (read -> model -> write) and `restore IMAGE...`.

`restore_files` plans outputs, refuses unsafe writes, then hands the files to the same loop as
`restore batch` (`restorecli.run.loop.run_batch`: models loaded once, I/O overlapped with the model,
per-file failures reported and the run goes on) and reports each file (stderr lines, or JSON lines on
stdout). It returns the exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import RestoreError, UsageError
from ..settings.defaults import RestoreOptions
from .outputs import STDIO, OutputPlan, check_output, format_of, is_directory_target, output_name, plan_outputs
from ..cli.terminal import Output


def call_kwargs(opts: RestoreOptions) -> dict:
    """The DiffBIRPipeline.__call__ arguments of resolved options."""
    return dict(
        upscale=opts.upscale, stage1_only=opts.stage1_only, prompt=opts.prompt, negative_prompt=opts.negative_prompt,
        sampler=opts.sampler, steps=opts.steps, cfg=opts.cfg, rescale_cfg=opts.rescale_cfg, strength=opts.strength,
        start_point=opts.start_point, noise_aug=opts.noise_aug, s_churn=opts.s_churn, s_tmin=opts.s_tmin,
        s_tmax=opts.s_tmax, s_noise=opts.s_noise, eta=opts.eta, order=opts.order, seed=opts.seed,
        color_fix=opts.color_fix, guidance=opts.guidance, guidance_loss=opts.guidance_loss,
        guidance_space=opts.guidance_space, guidance_start=opts.guidance_start, guidance_stop=opts.guidance_stop,
        guidance_repeat=opts.guidance_repeat, tile_size=opts.tile_size, tile_stride=opts.tile_stride,
        cleaner_tile_size=opts.cleaner_tile_size, cleaner_tile_stride=opts.cleaner_tile_stride,
        max_memory=opts.max_memory,
    )


@dataclass
class FileResult:
    input: str
    output: str | None
    status: str  # ok | skipped | failed
    error: str | None = None
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None
    seed: int | None = None

    def as_json(self) -> dict:
        return {
            "input": self.input, "output": self.output, "status": self.status, "error": self.error,
            "seconds": round(self.seconds, 3), "width": self.width, "height": self.height, "seed": self.seed,
        }


@dataclass
class Restored:
    """The model's result for one image, ready to encode: pixels at the input's bit depth, alpha
    resized to match, and the colour profile and EXIF the output keeps."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    icc_profile: bytes | None
    exif: bytes | None
    seed: int
    guidance_map: np.ndarray | None = None  # HxW in [0, 1], with `--save-guidance-map`
    guidance_map_path: str | None = None

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


# -- the three steps of one file -----------------------------------------------------------------


def read_input(path: str):
    """Step 1: the decoded image (`images.LoadedImage`); InputError for a bad file."""
    from ..images import read_image

    return read_image(path)


def run_model(pipe, image, opts: RestoreOptions, *, on_step=None, source: str | None = None) -> Restored:
    """Step 2: the pipeline on one decoded image (the only step that uses the device).

    With `--save-guidance-map`, `opts.extra["guidance_maps"]` maps each input to its map's path; the
    map comes back in the result for `write_output`."""
    from ..images import from_float, resize_alpha, to_gray

    map_path = opts.extra.get(GUIDANCE_MAPS, {}).get(source)
    out = pipe(image.rgb, output_type="pt", on_step=on_step, source=source, return_guidance_map=map_path is not None,
               **call_kwargs(opts))
    restored = out.images[0].permute(1, 2, 0).float().cpu().numpy()
    pixels = from_float(restored, image.bit_depth)
    if image.is_gray:  # a grayscale scan comes back grayscale (the model's three channels, as luminance)
        pixels = to_gray(pixels)
    height, width = pixels.shape[:2]
    alpha = resize_alpha(image.alpha, (width, height)) if image.alpha is not None else None
    weights = None if map_path is None else out.guidance_maps[0, 0].float().cpu().numpy()
    return Restored(pixels, alpha, image.output_icc_profile, image.exif, int(opts.seed), weights, map_path)


def write_output(dest: str | BinaryIO, restored: Restored, *, fmt: str | None, quality: int, overwrite: bool) -> None:
    """Step 3: encode and write atomically (a path) or in one piece (a stream); OutputError on failure."""
    from ..images import write_image

    write_image(
        dest, restored.pixels, alpha=restored.alpha, fmt=fmt, quality=quality, icc_profile=restored.icc_profile,
        exif=restored.exif, overwrite=overwrite,
    )
    if restored.guidance_map_path is not None and restored.guidance_map is not None:
        write_guidance_map(restored.guidance_map_path, restored.guidance_map, overwrite=overwrite)


#: `RestoreOptions.extra` key: {input path: where to write its guidance weight map}.
GUIDANCE_MAPS = "guidance_maps"


def guidance_map_path(save_guidance_map: str, input_path: str, n_inputs: int) -> str:
    """Where `--save-guidance-map PATH` writes an input's map: PATH itself for one input; in a folder (an
    existing one, or PATH ending in `/`) as `<stem>_guidance.png`, which several inputs need."""
    if is_directory_target(save_guidance_map):
        return str(Path(save_guidance_map) / output_name(input_path, "_guidance", "png"))
    if n_inputs != 1:
        raise UsageError(f"--save-guidance-map FILE takes one input, got {n_inputs}; use --save-guidance-map DIR/")
    if format_of(save_guidance_map) is None:
        raise UsageError(
            f"cannot tell the image format of {save_guidance_map!r} from its extension; use .png/.jpg/.webp/.tif"
        )
    return save_guidance_map


def write_guidance_map(path: str, weight: np.ndarray, *, overwrite: bool) -> None:
    """The region weight map (HxW in [0, 1]) as an 8-bit grayscale image (rounded), atomically."""
    from ..images import write_image

    gray = np.clip(np.rint(weight * 255.0), 0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_image(path, gray, overwrite=overwrite)


def restore_image(pipe, plan: OutputPlan, opts: RestoreOptions, *, overwrite: bool, fmt: str | None, quality: int,
                  on_step=None) -> FileResult:
    """Read -> restore -> write one image. InputError / OutputError propagate for the caller to report."""
    t0 = time.perf_counter()
    image = read_input(plan.input)
    restored = run_model(pipe, image, opts, on_step=on_step, source=plan.input)
    write_output(plan.output, restored, fmt=fmt, quality=quality, overwrite=overwrite)
    return FileResult(plan.input, plan.output, "ok", seconds=time.perf_counter() - t0, width=restored.width,
                      height=restored.height, seed=restored.seed)


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
    Ctrl-C raises `batch.BatchInterrupted` after the outputs already computed are written."""
    from .loop import Job, run_batch
    from ..pipeline.loading import load_pipeline

    opts = opts.resolve()
    plans = plan_outputs(inputs, output, suffix=suffix, fmt=fmt)
    to_stdout = any(p.output == STDIO for p in plans)
    if json_lines and to_stdout:
        raise UsageError("--json writes JSON lines to stdout; it cannot be combined with -o -")
    make_folders = output is not None and output != STDIO and is_directory_target(output)
    if save_guidance_map is not None:
        if opts.stage1_only:
            raise UsageError("--save-guidance-map needs stage 2; it cannot be combined with --stage1-only")
        maps = {p.input: guidance_map_path(save_guidance_map, p.input, len(plans)) for p in plans}
        opts = dataclasses.replace(opts, extra={**opts.extra, GUIDANCE_MAPS: maps})
    entries: list = []
    for plan in plans:
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
