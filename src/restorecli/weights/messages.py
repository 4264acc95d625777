"""Text shared by the weights error messages: the `--weights-dir` hint, sizes, one-line reasons.

Every failure names the file, where it came from and why, and ends with a hint; these pieces keep
the wording the same across lookup, Hub downloads and plain-URL downloads.
"""

from __future__ import annotations

WEIGHTS_DIR_HINT = "put the file in a folder and pass `--weights-dir DIR` (or set RESTORE_WEIGHTS_DIR)"


def format_size(n: int | None, approx: bool = False) -> str:
    """1_450_000_000 -> '1.45 GB' (decimal units, as download pages show them)."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)):
        if n >= 0.9995 * scale or unit == "B":  # 999_999 is "1 MB", not "1e+03 kB"
            return ("~" if approx else "") + f"{n / scale:.3g} {unit}"
    raise AssertionError  # pragma: no cover


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 200 characters), else its class name.

    huggingface_hub's messages run over several lines (the URL, a request id); the first says why."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
