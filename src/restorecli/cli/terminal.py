"""Terminal output for the CLI: results on stdout, everything else on stderr.

Only the `restorecli.cli` package uses this module; the library reports through `logging` (logger
"restorecli") and callbacks, and never prints. Library messages name settings by their Python names in
backticks; here they are worded with the CLI's flags (`cli_wording`).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated

import typer

from rich.console import Console
from rich.logging import RichHandler

QUIET, NORMAL, VERBOSE = 0, 1, 2

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")]


def _wording(text: str) -> str:
    from .options import cli_wording

    return cli_wording(text)


class Output:
    """One object that knows where each kind of message goes (after huggingface_hub's CLI `out`)."""

    def __init__(self, level: int = NORMAL):
        self.level = level
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    # -- stderr ---------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if self.level >= NORMAL:
            self.err.print(message, markup=False)

    def detail(self, message: str) -> None:
        if self.level >= VERBOSE:
            self.err.print(message, markup=False, style="dim")

    def warning(self, message: str) -> None:
        self.err.print(f"warning: {_wording(message)}", markup=False, style="yellow")

    def error(self, message: str, hint: str | None = None) -> None:
        self.err.print(f"error: {_wording(message)}", markup=False, style="bold red")
        if hint:
            self.err.print(f"hint: {_wording(hint)}", markup=False, style="dim")

    def step_progress(self, label: str):
        """A context manager yielding an `on_step(done, total)` callback that draws a rich bar on stderr
        (only on a terminal, and not with --quiet); otherwise the callback does nothing."""
        return _StepProgress(self, label)

    # -- stdout ---------------------------------------------------------------------------
    def result(self, text: str) -> None:
        """A plain result line for scripts (e.g. `restore weights path NAME`)."""
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def json_line(self, obj, stream=None) -> None:
        """One JSON object on stdout (or `stream`: the real stdout while a dependency's prints are sent to stderr)."""
        text = json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A file name that is not valid UTF-8 (Python keeps its bytes as lone surrogates): write it
            # as \udcXX escapes, valid JSON that json.loads + os.fsencode turn back into the name.
            text = json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))
        stream = stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()


class _Current:
    """The Output of this invocation (the app callback or a subcommand's -q/-v sets it); `main` reports
    errors through it."""

    out = Output(NORMAL)


def current() -> Output:
    return _Current.out


def use_verbosity(quiet: bool = False, verbose: bool = False) -> Output:
    """-q / -v given to the app or to a subcommand: the Output (and log level) they ask for."""
    if quiet or verbose:
        level = QUIET if quiet else VERBOSE
        _Current.out = Output(level)
        setup_logging(level)
    return _Current.out


class _FlagWording(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _wording(record.getMessage())
        record.args = None
        return True


def setup_logging(level: int) -> None:
    """Route the library's `logging` records to stderr through rich, at the CLI's verbosity."""
    logger = logging.getLogger("restorecli")
    logger.handlers.clear()
    handler = RichHandler(
        console=Console(stderr=True), show_time=False, show_path=False, markup=False, rich_tracebacks=False
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_FlagWording())
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel({QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.DEBUG}[level])


class _StepProgress:
    def __init__(self, output: Output, label: str):
        self.output = output
        self.label = label
        self.progress = None
        self.task = None

    def __enter__(self):
        if self.output.level >= NORMAL and self.output.err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.output.err, transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=None)
        return self.on_step

    def on_step(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def faces_note(result) -> str:
    """", faces: 2" in a result line of `task` unaligned_face (and where the crops went); "" otherwise."""
    if getattr(result, "faces", None) is None:
        return ""
    crops = f", {len(result.face_crops)} crop files" if result.face_crops else ""
    return f", faces: {result.faces}{crops}"
