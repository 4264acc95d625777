"""`--captions FILE|DIR`: captions you wrote or edited, used instead of running a captioner.

* a JSON-lines file as `restore caption --json` writes it: one object per line with the image path
  under ``"input"`` and its text under ``"caption"`` (other keys are ignored). Paths match as written
  (normalised, relative to the working folder) or as the same file on disk; lines of images it could not
  read (``"caption": null`` with an ``"error"``) are no entry;
* a folder of UTF-8 ``<stem>.txt`` files: ``DIR/<path below the batch folder>.txt`` first (for
  recursive batches with repeated names), then ``DIR/<stem>.txt``.

Captions are stripped of surrounding whitespace; an empty one is a valid entry (no caption). Problems
with the file are one `UsageError` line naming the file and line, found before any image is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from ..errors import UsageError

__all__ = ["CaptionFile", "read_captions"]

#: The largest caption file read (a caption is a sentence; this is far beyond any real file).
MAX_BYTES = 64 << 20


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


@dataclass
class CaptionFile:
    """Captions by image, from a JSON-lines file or a folder of .txt files."""

    source: Path
    by_path: dict[str, str] = field(default_factory=dict)  # normalised path as written -> caption
    by_real: dict[str, str] = field(default_factory=dict)  # real absolute path -> caption
    by_stem: dict[str, str] = field(default_factory=dict)  # folder mode: relative path without .txt -> caption

    def __len__(self) -> int:
        return len(self.by_stem) if self.source.is_dir() else len(self.by_path)

    def lookup(self, image: str | os.PathLike, relative: str | os.PathLike | None = None) -> str | None:
        """The caption of `image` (as the batch names it; `relative`: its path below the batch folder), or
        None when there is no entry."""
        if self.source.is_dir():
            candidates = []
            if relative is not None:
                candidates.append(PurePath(relative).with_suffix("").as_posix())
            candidates.append(PurePath(image).stem)
            return next((self.by_stem[c] for c in candidates if c in self.by_stem), None)
        key = os.path.normpath(os.fspath(image))
        if key in self.by_path:
            return self.by_path[key]
        return self.by_real.get(_real(key))


def read_captions(path: str | os.PathLike) -> CaptionFile:
    """Read `--captions`; raises UsageError naming the file (and line) on any problem."""
    source = Path(path).expanduser()
    if source.is_dir():
        return _read_folder(source)
    if not source.exists():
        raise UsageError(f"{source}: no such caption file or folder")
    try:
        if source.stat().st_size > MAX_BYTES:
            raise UsageError(f"{source}: larger than {MAX_BYTES >> 20} MB; not a caption file")
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{source}: cannot read it ({exc.strerror or exc})") from None
    out = CaptionFile(source)
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not a JSON object ({exc.msg}); one object per line, as `restore caption` writes them") from None
        if isinstance(record, dict) and (record.get("summary") is True or (record.get("caption") is None and "error" in record)):
            continue  # a summary line, or an image `restore caption` could not read: no entry
        if not isinstance(record, dict) or not isinstance(record.get("input"), str) or not isinstance(record.get("caption"), str):
            raise UsageError(f'{where}: each line needs "input" and "caption" strings, as `restore caption` writes them')
        key = os.path.normpath(record["input"])
        caption = record["caption"].strip()
        if key in first_line and out.by_path[key] != caption:
            raise UsageError(f"{where}: a second, different caption for {record['input']} (first on line {first_line[key]})")
        first_line.setdefault(key, number)
        out.by_path[key] = caption
        out.by_real.setdefault(_real(key), caption)
    return out


def _read_folder(source: Path) -> CaptionFile:
    out = CaptionFile(source)
    for path in sorted(source.rglob("*.txt")):
        if not path.is_file():
            continue
        rel = path.relative_to(source).with_suffix("").as_posix()
        try:
            if path.stat().st_size > MAX_BYTES:
                raise UsageError(f"{path}: larger than {MAX_BYTES >> 20} MB; not a caption")
            out.by_stem[rel] = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return out
