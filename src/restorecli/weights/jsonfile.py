"""Small JSON state files: the hash cache, the trust-on-first-use lock, URL download state.

They are caches and records that can be rebuilt, so a missing or damaged file reads as ``{}``
(damage is logged). Writes go to a temporary file in the same folder that is then renamed into
place, so a crash or a concurrent writer never leaves half a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path

logger = logging.getLogger("restorecli.weights")


def read_json(path: Path) -> dict:
    """The object in `path`, or {} when the file is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s (%s)", path, exc)
        return {}


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (temporary file + rename); raises OSError if it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer, created like any file (the umask decides its mode, as for the target)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
