"""Where each output goes, and the refusals that keep inputs and finished work safe.

Rules (README "Output files"):
* `restore photo.png` writes `photo_restored.png` beside the input (`--suffix` changes `_restored`).
* `-o FILE` names the output of a single input; `-o DIR/` (an existing folder, or a path ending in `/`)
  collects `<stem><suffix>.<ext>` files; `-o -` writes the image to stdout.
* The extension is `--format`'s, else the input's when it is png/jpg/jpeg/webp/tif/tiff, else png.
* An input is never overwritten (not even with --overwrite); an existing output is kept unless
  `--overwrite`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError, UsageError
from ..images.formats import FORMAT_EXTENSIONS, WRITABLE_EXTENSIONS

STDIO = "-"
DEFAULT_SUFFIX = "_restored"


def format_of(path: str | os.PathLike) -> str | None:
    """'png' | 'jpg' | 'webp' | 'tif' from an extension (case-insensitive), else None."""
    return WRITABLE_EXTENSIONS.get(Path(path).suffix.lower())


def output_name(input_path: str | os.PathLike, suffix: str = DEFAULT_SUFFIX, fmt: str | None = None) -> str:
    """`photo.JPG` -> `photo_restored.JPG`; with fmt='png' -> `photo_restored.png`."""
    p = Path(input_path)
    if fmt is not None:
        ext = FORMAT_EXTENSIONS[fmt.lower()]
    elif p.suffix.lower() in WRITABLE_EXTENSIONS:
        ext = p.suffix
    else:
        ext = ".png"
    stem = p.stem if str(input_path) != STDIO else "stdin"
    return f"{stem}{suffix}{ext}"


def is_directory_target(output: str) -> bool:
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


@dataclass(frozen=True)
class OutputPlan:
    input: str
    output: str  # a path, or "-" for stdout


def plan_outputs(
    inputs: list[str], output: str | None, *, suffix: str = DEFAULT_SUFFIX, fmt: str | None = None
) -> list[OutputPlan]:
    """Map each input to its output path. Raises UsageError for impossible combinations."""
    if fmt is not None and fmt.lower() not in FORMAT_EXTENSIONS:
        raise UsageError(f"`--format` must be png, jpg, webp or tif; got {fmt!r}")
    if not inputs:
        raise UsageError("no input images given")
    if inputs.count(STDIO) > 1:
        raise UsageError("`-` (stdin) can be given only once")
    if output == STDIO:
        if len(inputs) != 1:
            raise UsageError(f"-o - takes one input, got {len(inputs)}; use -o DIR")
        return [OutputPlan(inputs[0], STDIO)]
    if output is not None and not is_directory_target(output):
        if len(inputs) != 1:
            raise UsageError(f"-o FILE takes one input, got {len(inputs)}; use -o DIR/")
        if fmt is None and format_of(output) is None:
            raise UsageError(f"cannot tell the image format of {output!r} from its extension; use --format or .png/.jpg/.webp/.tif")
        return [OutputPlan(inputs[0], output)]
    plans = []
    for inp in inputs:
        if output is not None:
            folder = Path(output)
        elif inp == STDIO:
            folder = Path(".")
        else:
            folder = Path(inp).parent
        plans.append(OutputPlan(inp, str(folder / output_name(inp, suffix, fmt))))
    seen: dict[str, str] = {}
    for plan in plans:
        key = os.path.normcase(os.path.abspath(plan.output))
        if key in seen:
            raise UsageError(f"{seen[key]} and {plan.input} would both be written to {plan.output}; use --suffix or separate runs")
        seen[key] = plan.input
    return plans


def check_output(plan: OutputPlan, *, overwrite: bool, all_inputs: list[str] | None = None) -> None:
    """Refuse to overwrite an input (ever) or an existing output (unless overwrite)."""
    if plan.output == STDIO:
        return
    out = Path(plan.output)
    for inp in all_inputs or [plan.input]:
        if inp == STDIO:
            continue
        if os.path.abspath(inp) == os.path.abspath(out) or (out.exists() and Path(inp).exists() and os.path.samefile(inp, out)):
            raise OutputError(plan.output, "is an input; refusing to overwrite it (choose another -o or --suffix)")
    if out.exists() and not overwrite:
        raise OutputError(plan.output, "already exists; use --overwrite to replace it")
    if out.is_dir():
        raise OutputError(plan.output, "is a directory")
