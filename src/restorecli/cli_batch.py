"""`restore batch DIR`: restore a folder of images (filled in by the batch issue)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .cli_options import restore_options
from .errors import SetupError
from .options import RestoreOptions


@restore_options
def batch_command(
    directory: Annotated[str, typer.Argument(help="Folder of images.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output folder. [default: DIR_restored/ beside DIR]", show_default=False)] = None,
    *,
    opts: RestoreOptions,
) -> None:
    """Restore every image in a folder.

    Example: `restore batch scans/ -o scans_restored/`
    """
    raise SetupError("`restore batch` is not implemented yet")
