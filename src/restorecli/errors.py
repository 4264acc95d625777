"""Typed errors of the library. The CLI maps each to one stderr line and an exit code.

Library code raises these; it never prints and never calls sys.exit.
"""

from __future__ import annotations

import os


class RestoreError(Exception):
    """Base class. `exit_code` is what the CLI exits with when this ends the run."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(RestoreError, ValueError):
    """A bad option or option combination (exit 2). Also a ValueError, as Python code expects of a bad argument."""

    exit_code = 2


class SetupError(RestoreError):
    """The run cannot start: missing or corrupt weights, a bad model description (exit 2)."""

    exit_code = 2


class WeightsError(SetupError):
    """A checkpoint could not be found, downloaded, verified or loaded safely."""


class InputError(RestoreError):
    """One input file is bad (corrupt, empty, not an image, too large...). A batch goes on (exit 1).

    The message always names the file: ``photos/cat.jpg: not an image (unknown format)``.
    """

    exit_code = 1

    def __init__(self, path: str | os.PathLike | None, reason: str, *, hint: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        where = "<stdin>" if self.path in (None, "-") else self.path
        super().__init__(f"{where}: {reason}", hint=hint)


class OutputError(RestoreError):
    """An output cannot be written (exists without --overwrite, would overwrite an input, unwritable)."""

    exit_code = 1

    def __init__(self, path: str | os.PathLike, reason: str, *, hint: str | None = None):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}", hint=hint)


def brief(exc: BaseException, width: int = 160, *, with_type: bool = True) -> str:
    """One line about `exc` for an error message: ``Type: first words...`` (whitespace folded), at most
    `width` characters. `with_type=False` leaves the class name out when there is a message."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    text = f"{type(exc).__name__}: {text}" if with_type else text
    return text if len(text) <= width else text[: width - 3] + "..."
