"""Progress reports of downloads and verification, for callers that draw them (the CLI).

The library never prints; it calls a `ProgressCallback` with byte counts instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ProgressEvent:
    """What `progress` callbacks receive: bytes done of total for one file and phase."""

    name: str
    phase: str  # "download" | "verify"
    done: int
    total: int | None


ProgressCallback = Callable[[ProgressEvent], None]
