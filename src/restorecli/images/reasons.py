"""How this package words the detail of a failure, the part in parentheses after the reason.

``could not encode PNG (encoder error -2)``, ``truncated or corrupt PNG data (image file is truncated)``.
Unlike `errors.brief` it leaves out the exception's class name and keeps the text as the exception
wrote it, cut at 120 characters.
"""

from __future__ import annotations


def error_detail(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
