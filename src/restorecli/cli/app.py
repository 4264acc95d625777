"""The `restore` command line: parsing and printing only; the work happens in the library.

`restore photo.png` runs the default command `image` (Typer has no default command: `DefaultGroup`
inserts its name when the first argument is not a subcommand name). A file literally named like a
subcommand is restored with a path: `restore ./batch`.
"""

from __future__ import annotations

import signal
import sys
import warnings
from typing import Annotated, Optional

import typer
import typer.core
from typer.core import TyperGroup

from .. import __version__
from ..errors import RestoreError
from .terminal import NORMAL, QuietOpt, VerboseOpt, current, setup_logging, use_verbosity

# Newer Typer vendors click as typer._click (with its own exception classes); older releases use the
# click package. Take the one in use. typer.Exit/typer.Abort are the right classes in both.
click = getattr(typer.core, "_click", None) or getattr(typer.core, "click")
ClickException = click.exceptions.ClickException
ClickUsageError = click.exceptions.UsageError

DEFAULT_COMMAND = "image"
GLOBAL_FLAGS = {"--version", "-q", "--quiet", "-v", "--verbose", "--help", "-h", "--install-completion",
                "--show-completion"}

EXAMPLES = """
Examples:

  restore photo.png                      # writes photo_restored.png (v2.1, x4)

  restore scan.jpg --task denoise --guidance 0.5 -o clean.png

  restore batch scans/ -o scans_restored/

  restore caption scans/ --json > captions.jsonl

  restore weights fetch --model v2.1
"""


class DefaultGroup(TyperGroup):
    """A group whose first non-global argument falls through to `image` unless it names a subcommand."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        args = list(args)
        for i, arg in enumerate(args):
            if arg in GLOBAL_FLAGS:
                continue
            if arg not in self.commands:
                args.insert(i, DEFAULT_COMMAND)
            break
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultGroup,
    name="restore",
    help="Restore degraded photos (blur, noise, JPEG, low resolution, old scans) with DiffBIR.\n\n"
    "`restore IMAGE...` is short for `restore image IMAGE...`." + EXAMPLES,
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"restorecli {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    setup_logging(NORMAL)
    use_verbosity(quiet, verbose)


def _mount_subcommands() -> None:
    from .batch import batch_command
    from .caption import HELP as CAPTION_HELP
    from .caption import caption_command
    from .image import HELP, image_command
    from .ui import ui_command
    from .weights import weights_app

    app.command(DEFAULT_COMMAND, help=HELP)(image_command)
    app.command("batch", help=batch_command.__doc__)(batch_command)
    app.command("caption", help=CAPTION_HELP)(caption_command)
    app.add_typer(weights_app, name="weights")
    app.command("ui", help=ui_command.__doc__)(ui_command)


_mount_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: map library errors to one stderr line and an exit code."""
    # Pillow's DecompressionBombWarning would print a stray line; restorecli.images turns bombs into InputError.
    warnings.filterwarnings("ignore", message=".*decompression bomb", module="PIL")
    # spandrel's SwinIR calls torch.meshgrid without `indexing`; torch warns on every load.
    warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release")
    terminated: list[int] = []
    previous = _stop_on_sigterm(terminated)
    try:
        code = app(args=argv, standalone_mode=False, prog_name="restore")
        code = code if isinstance(code, int) else 0
        return 128 + signal.SIGTERM if terminated and code == 130 else code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        current().error("terminated" if terminated else "interrupted")
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except ClickUsageError as exc:
        hint = exc.ctx.command_path + " --help" if exc.ctx else "restore --help"
        current().error(exc.format_message(), hint=f"see `{hint}`")
        return 2
    except ClickException as exc:
        current().error(exc.format_message())
        return exc.exit_code
    except RestoreError as exc:
        current().error(str(exc), hint=exc.hint)
        return exc.exit_code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm(received: list[int]):
    """SIGTERM (`kill`, `timeout`, `docker stop`, a job scheduler) stops like Ctrl-C: the image in flight
    is dropped, finished outputs are kept, the summary is printed; exit code 143. Returns the previous
    handler (None where signals cannot be set: not the main thread)."""

    def stop(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
