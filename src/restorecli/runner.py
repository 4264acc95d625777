"""Restore a list of files: plan outputs, refuse unsafe writes, run each image, report per file."""

from __future__ import annotations

from .errors import RestoreError, SetupError
from .options import RestoreOptions
from .outputs import check_output, plan_outputs
from .ui import Output


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
    """Returns the exit code: 0 all done, 1 some inputs failed. Usage/setup errors raise."""
    opts = opts.resolve()
    plans = plan_outputs(inputs, output, suffix=suffix, fmt=fmt)
    failed = 0
    runnable = []
    for plan in plans:
        try:
            check_output(plan, overwrite=overwrite, all_inputs=inputs)
            runnable.append(plan)
        except RestoreError as exc:
            out.error(str(exc), hint=exc.hint)
            failed += 1
    if runnable:
        raise SetupError("restoring images is not implemented yet (the pipeline lands with the stage-1/stage-2 issues)")
    return 1 if failed else 0
