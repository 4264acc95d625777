"""Resumable downloads of plain-URL files (BSRNet, SCUNet: GitHub release assets).

These files are not on the Hub, so they get its guarantees here: the transfer goes to a temporary
file beside the target in ``<weights_home>/downloads``, an interrupted transfer resumes with an HTTP
Range request guarded by If-Range (a changed file restarts from zero), only a file that passes its
check is renamed into place, and a lock keeps two processes from downloading the same file.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import time
from pathlib import Path

from .. import __version__
from ..errors import WeightsError
from .check import check_file, mismatch_hint
from .hashing import remember_sha256
from .jsonfile import read_json, write_json_atomic
from .lookup import Resolved
from .messages import WEIGHTS_DIR_HINT, first_line, format_size
from .paths import downloads_dir
from .progress import ProgressCallback, ProgressEvent
from .table import WeightEntry

logger = logging.getLogger("restorecli.weights")

#: Seconds to wait, per read, for download data.
DOWNLOAD_TIMEOUT = 10.0
#: How often a plain-URL download resumes within one call after the connection drops mid-file
#: (only while each try makes progress). After that the partial file stays for the next run.
URL_RETRIES = 3


def _url_opener():
    import ssl
    import urllib.request

    try:  # the CA bundle huggingface_hub/httpx use, where installed; else the system's
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover
        context = ssl.create_default_context()
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


class _Interrupted(Exception):
    """A transfer stopped early; the partial file holds what arrived. Worth another try only if it
    `progressed` (received bytes, or cleared a partial file that could not be resumed)."""

    def __init__(self, reason: str, received: int, *, progressed: bool | None = None):
        super().__init__(reason)
        self.reason = reason
        self.received = received
        self.progressed = received > 0 if progressed is None else progressed


def download(entry: WeightEntry, *, progress: ProgressCallback | None, force: bool) -> Resolved:
    """Download a plain-URL file into downloads/ with resume, verification and atomic placement.

    The transfer goes to `<file>.part` beside the target (with `<file>.part.json` holding the URL and
    the server's ETag/Last-Modified); an interrupted transfer resumes with an HTTP Range request,
    guarded by If-Range so a changed file restarts from zero. Only a verified file is renamed into place."""
    from huggingface_hub.utils import WeakFileLock

    dest = downloads_dir() / entry.basename
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    state_file = dest.with_name(dest.name + ".part.json")
    lock = dest.parent / ".locks" / (dest.name + ".lock")
    lock.parent.mkdir(exist_ok=True)
    with WeakFileLock(str(lock)):
        if force:  # start over, but keep the old file until the new one is verified
            for p in (part, state_file):
                p.unlink(missing_ok=True)
        elif dest.is_file():  # another process finished it while we waited for the lock
            check = check_file(entry, dest, entry.variants[0], where="downloads", progress=progress)
            if check.ok:
                return Resolved(entry, dest, "downloads", 0, check)
        transferred = 0
        tries = 0
        while True:
            try:
                transferred += _transfer(entry, part, state_file, progress)
                break
            except _Interrupted as exc:
                transferred += exc.received
                if tries >= URL_RETRIES or not exc.progressed:
                    have = part.stat().st_size if part.exists() else 0
                    raise WeightsError(
                        f"{entry.name} ({entry.basename}) from {entry.url}: the transfer was interrupted after "
                        f"{format_size(have)} ({exc.reason})",
                        hint=f"run `restore weights fetch {entry.name}` again to resume, or {WEIGHTS_DIR_HINT}",
                    ) from None
                tries += 1
                logger.warning("%s: %s; resuming", entry.name, exc.reason)
                time.sleep(0.5)
        check = check_file(entry, part, entry.variants[0], where="downloads", progress=progress, rehash=True)
        if not check.ok:
            for p in (part, state_file):
                p.unlink(missing_ok=True)
            raise WeightsError(
                f"{entry.name} ({entry.basename}) downloaded from {entry.url}: {check.detail}; the download was deleted",
                hint=mismatch_hint(check, fresh=True),
            )
        os.replace(part, dest)
        state_file.unlink(missing_ok=True)
        remember_sha256(dest, check.sha256)
        return Resolved(entry, dest, "downloads", transferred, check)


def _transfer(entry: WeightEntry, part: Path, state_file: Path, progress: ProgressCallback | None) -> int:
    """One HTTP GET into `part`, resuming what is there when safe. Returns the bytes received.

    Raises _Interrupted(reason, bytes received) when the connection drops mid-body, WeightsError for
    anything a retry cannot fix (HTTP errors, no connection, a different file)."""
    import http.client  # plain-URL downloads only: kept off `import restorecli`
    import urllib.error
    import urllib.request
    state = read_json(state_file)
    have = part.stat().st_size if part.exists() else 0
    validator = (state.get("etag") or state.get("last_modified")) if state.get("url") == entry.url else None
    if validator is None and entry.sha256 is None:
        have = 0  # unknown server version and no hash to catch a mix-up: start over
    if entry.size is not None and have > entry.size:
        have = 0
    if entry.size is not None and have == entry.size:
        return 0  # complete already; the sha256 check decides
    headers = {"User-Agent": f"restorecli/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator is not None:
            headers["If-Range"] = validator
    fail = functools.partial(_url_error, entry)
    try:
        response = _url_opener().open(urllib.request.Request(entry.url, headers=headers), timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our partial file is no prefix of what the server has
            part.unlink(missing_ok=True)
            raise _Interrupted("the server refused to resume; starting over", 0, progressed=True) from None
        raise fail(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        what = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else "cannot connect"
        raise fail(f"{what} ({reason})") from None
    with response:
        resumed = response.status == 206
        if resumed:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                raise _Interrupted("the server answered the resume with another range; starting over", 0, progressed=True)
            total = int(m.group(2)) if m.group(2) != "*" else None
        else:
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            write_json_atomic(state_file, {"url": entry.url, "etag": _strong_etag(response.headers.get("ETag")),
                                     "last_modified": response.headers.get("Last-Modified")})
        if total is not None and entry.size is not None and total != entry.size:
            raise fail(f"the server offers {total} bytes, pinned {entry.size}; not downloaded")
        received = 0
        report = (lambda: progress(ProgressEvent(entry.name, "download", have + received, total))) if progress else (lambda: None)
        report()
        with open(part, "ab" if resumed else "wb") as f:
            try:
                while chunk := response.read(1024 * 1024):
                    f.write(chunk)
                    received += len(chunk)
                    report()
            except (OSError, http.client.HTTPException) as exc:
                raise _Interrupted(first_line(exc) or type(exc).__name__, received) from None
        if total is not None and have + received < total:
            raise _Interrupted(f"got {have + received} of {total} bytes", received)
    return received


def _strong_etag(etag: str | None) -> str | None:
    return etag if etag and not etag.startswith("W/") else None


def _url_error(entry: WeightEntry, reason: str) -> WeightsError:
    return WeightsError(
        f"{entry.name} ({entry.basename}) from {entry.url}: {reason}",
        hint="check your connection (HF_ENDPOINT does not apply to this file), or download it by other means "
        "into a folder and pass `--weights-dir DIR` (or set RESTORE_WEIGHTS_DIR)",
    )
