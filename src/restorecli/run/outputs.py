"""Output names and formats, and the refusals that keep inputs and finished work safe.

Rules (README "Output files"):
* `restore photo.png` writes `photo_restored.png` beside the input (`--suffix` changes `_restored`).
* `-o FILE` names the output of a single input; `-o DIR/` (an existing folder, or a path ending in `/`)
  collects `<stem><suffix>.<ext>` files; `-o -` writes the image to stdout.
* The extension is `--format`'s, else the input's when it is png/jpg/jpeg/webp/tif/tiff, else png.
* An input is never overwritten (not even with --overwrite); an existing output is kept unless
  `--overwrite`.
The rule for inputs that share a name (`a.jpg` + `a.tif`) is `run.plan`'s, which builds on
`output_name` here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputError
from ..images.formats import FORMAT_EXTENSIONS, STDIO, WRITABLE_EXTENSIONS

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
    output: str | None  # a path, or "-" for stdout; None: no output (see error)
    error: str | None = None  # why this input gets no output of its own (one line)


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
