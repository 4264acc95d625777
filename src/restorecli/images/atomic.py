"""All-or-nothing outputs: a written file is either complete or not there at all.

A file is encoded into a temp file in the destination folder (``.<name>.<8 hex>.restoring.tmp``),
fsynced and renamed into place; without `overwrite` the rename cannot clobber a file that appeared
meanwhile (a hard link + unlink, or a checked rename where links fail). A stream gets the whole
encoded file in one write, after encoding succeeded. `remove_stale_temp_files` deletes the temp
files a killed run left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputError
from .formats import STDIO
from .reasons import error_detail

logger = logging.getLogger("restorecli.images")

#: Temp files of unfinished writes: ``.<name>.<8 hex>.restoring.tmp`` beside the destination.
TEMP_FILE_SUFFIX = ".restoring.tmp"
TEMP_FILE_GLOB = ".*" + TEMP_FILE_SUFFIX
TEMP_FILE_PATTERN = re.compile(r"^\..+\.[0-9a-f]{8}\.restoring\.tmp$", re.DOTALL)


def write_to_stream(stream: BinaryIO, encode: Callable[[BinaryIO], None], image_format: str) -> None:
    buffer = io.BytesIO()
    try:
        encode(buffer)
    except Exception as e:  # noqa: BLE001
        raise OutputError(STDIO, f"could not encode {image_format} ({error_detail(e)})") from e
    try:
        stream.write(buffer.getbuffer())
        stream.flush()
    except OSError as e:
        raise OutputError(STDIO, f"cannot write ({e.strerror or error_detail(e)})") from None


def write_file_atomically(
    dest: Path, encode: Callable[[BinaryIO], None], image_format: str, *, overwrite: bool
) -> None:
    """Encode into a temp file beside `dest`, fsync, rename into place; remove the temp on any failure."""
    if dest.is_dir():
        raise OutputError(dest, "is a directory")
    if not overwrite and os.path.lexists(dest):
        raise OutputError(dest, "already exists; use --overwrite to replace it")
    folder = dest.parent
    if not folder.is_dir():
        raise OutputError(dest, f"folder {str(folder)!r} does not exist")
    temp, fd = _create_temp_file(dest)
    try:
        with os.fdopen(fd, "wb") as fp:
            try:
                encode(fp)
            except OSError as e:
                if e.errno is None:  # Pillow reports encoder failures as errno-less OSError
                    raise OutputError(dest, f"could not encode {image_format} ({error_detail(e)})") from e
                raise
            except Exception as e:  # noqa: BLE001
                raise OutputError(dest, f"could not encode {image_format} ({error_detail(e)})") from e
            fp.flush()
            os.fsync(fp.fileno())
        _move_into_place(temp, dest, overwrite=overwrite)
    except OSError as e:
        _remove_quietly(temp)
        raise OutputError(dest, f"cannot write ({e.strerror or error_detail(e)})") from None
    except BaseException:
        _remove_quietly(temp)
        raise
    _fsync_folder(folder)


def _create_temp_file(dest: Path) -> tuple[Path, int]:
    """`.<name>.<8 hex>.restoring.tmp` in dest's folder, created exclusively with the umask's mode."""
    for _ in range(100):
        temp = dest.parent / f".{dest.name[:180]}.{secrets.token_hex(4)}{TEMP_FILE_SUFFIX}"
        try:
            return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or error_detail(e))
            raise OutputError(dest, f"cannot create a file in {str(dest.parent)!r} ({reason})") from None
    raise OutputError(dest, "cannot find a free temp file name")


_NO_HARD_LINKS = {errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP}


def _move_into_place(temp: Path, dest: Path, *, overwrite: bool) -> None:
    """os.replace with overwrite; else a no-clobber link + unlink, or a checked rename where links fail."""
    if overwrite:
        try:
            os.replace(temp, dest)
        except IsADirectoryError:
            raise OutputError(dest, "is a directory") from None
        return
    try:
        os.link(temp, dest)
    except FileExistsError:
        raise OutputError(dest, "already exists; use --overwrite to replace it") from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(dest):  # no hard links here (FAT, some network shares): check, then rename
            raise OutputError(dest, "already exists; use --overwrite to replace it") from None
        os.rename(temp, dest)
        return
    _remove_quietly(temp)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; not every platform can open a folder, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    """True for a temp file of an unfinished `write_image` (``.<name>.<8 hex>.restoring.tmp``)."""
    return bool(TEMP_FILE_PATTERN.match(Path(path).name))


def remove_stale_temp_files(folder: str | os.PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Delete the temp files that interrupted writes left in `folder` (and below, if recursive).

    Call it before a run starts writing into the folder, not while another run writes there.
    Returns the paths removed; files that cannot be removed are logged and left.
    """
    root = Path(folder)
    candidates = root.rglob(TEMP_FILE_GLOB) if recursive else root.glob(TEMP_FILE_GLOB)
    removed = []
    for path in sorted(candidates):
        if not is_temp_file(path) or not path.is_file():
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.warning("%s: cannot remove stale temp file (%s)", path, e.strerror or error_detail(e))
            continue
        removed.append(path)
    return removed
