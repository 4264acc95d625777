"""Restore a list of files: plan outputs, refuse unsafe writes, load the models once, run each image,
report per file (stderr lines, or JSON lines on stdout), and return the exit code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError, OutputError, RestoreError
from .options import RestoreOptions
from .outputs import STDIO, OutputPlan, check_output, plan_outputs
from .ui import Output


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


def restore_image(pipe, plan: OutputPlan, opts: RestoreOptions, *, overwrite: bool, fmt: str | None, quality: int,
                  on_step=None) -> FileResult:
    """Read -> restore -> write one image. InputError / OutputError propagate for the caller to report."""
    from .imageio import from_float, read_image, resize_alpha, write_image

    t0 = time.perf_counter()
    image = read_image(plan.input)
    out = pipe(image.rgb, output_type="pt", on_step=on_step, source=plan.input, **call_kwargs(opts))
    restored = out.images[0].permute(1, 2, 0).float().cpu().numpy()
    pixels = from_float(restored, image.bit_depth)
    height, width = pixels.shape[:2]
    alpha = resize_alpha(image.alpha, (width, height)) if image.alpha is not None else None
    write_image(
        plan.output, pixels, alpha=alpha, fmt=fmt, quality=quality, icc_profile=image.output_icc_profile,
        exif=image.exif, overwrite=overwrite,
    )
    return FileResult(plan.input, plan.output, "ok", seconds=time.perf_counter() - t0, width=width, height=height,
                      seed=opts.seed)


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
) -> int:
    """Returns the exit code: 0 all done, 1 some inputs failed. Usage/setup errors raise (exit 2)."""
    from .loading import load_pipeline

    opts = opts.resolve()
    plans = plan_outputs(inputs, output, suffix=suffix, fmt=fmt)
    if json_lines and any(p.output == STDIO for p in plans):
        from .errors import UsageError

        raise UsageError("--json writes JSON lines to stdout; it cannot be combined with -o -")
    results: list[FileResult] = []

    def report(result: FileResult) -> None:
        results.append(result)
        if json_lines:
            out.json_line(result.as_json())
        if result.status == "failed":
            out.error(result.error)
        elif result.status == "ok" and result.output != STDIO:
            out.info(f"{result.input} -> {result.output} ({result.width}x{result.height}, {result.seconds:.1f} s)")

    runnable = []
    for plan in plans:
        try:
            check_output(plan, overwrite=overwrite, all_inputs=inputs)
            runnable.append(plan)
        except RestoreError as exc:
            report(FileResult(plan.input, plan.output, "failed", error=str(exc)))
    if runnable:
        pipe = load_pipeline(opts)
        for plan in runnable:
            try:
                with out.step_progress(plan.input) as on_step:
                    report(restore_image(pipe, plan, opts, overwrite=overwrite, fmt=fmt, quality=quality, on_step=on_step))
            except (InputError, OutputError) as exc:
                report(FileResult(plan.input, plan.output, "failed", error=str(exc)))
    failed = sum(r.status == "failed" for r in results)
    if json_lines:
        out.json_line({"summary": True, "ok": sum(r.status == "ok" for r in results), "skipped": 0, "failed": failed})
    return 1 if failed else 0
