"""Downloads from the Hugging Face Hub, and one clear line for each way they fail.

Files go through ``hf_hub_download`` at the pinned revision, so ``HF_ENDPOINT`` (mirrors),
``HF_TOKEN`` and the shared cache work as everywhere else. A metadata request comes first, once and
without retries, so a dead network or a 404 fails in seconds and a file whose announced size or
sha256 differs from the pin is refused before the transfer. Failures are recognised by their types
(``huggingface_hub.errors``, the HTTP library's transport errors, OSError) and become a
`WeightsError` that names the file, the source and the reason, with a hint.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

from ..errors import WeightsError
from .check import check_file, mismatch_hint
from .lookup import Resolved
from .messages import WEIGHTS_DIR_HINT, first_line
from .paths import hub_cache_dir, hub_endpoint
from .progress import ProgressCallback, ProgressEvent
from .table import SHA256_HEX, WeightEntry

#: Seconds to wait for the Hub's metadata answer (HEAD).
METADATA_TIMEOUT = 10.0


def _progress_bar_class(name: str, progress: ProgressCallback | None):
    """A tqdm class for hf_hub_download that draws nothing and forwards byte counts to `progress`."""
    from tqdm import tqdm

    class _Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # never draw: the library does not print
            super().__init__(*args, **kwargs)
            self.n = kwargs.get("initial", 0) or 0
            self._emit()

        def update(self, n=1):
            self.n += n or 0
            self._emit()

        def update_transfer(self, n=1):  # network bytes (xet); `update` already counts file bytes
            pass

        def _emit(self):
            if progress is not None:
                progress(ProgressEvent(name, "download", max(0, int(self.n)), self.total))

    return _Forward


def download(entry: WeightEntry, *, progress: ProgressCallback | None, force: bool) -> Resolved:
    """Download one Hub file into the Hugging Face cache and check it; a file that fails is deleted."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = hub_endpoint()
    # Ask for the file's metadata first, once and without retries: a dead network, a blocked or
    # wrong endpoint and a 404 fail here in seconds (hf_hub_download would retry with back-off for
    # up to a minute), and the announced size/sha256 let us refuse a wrong file before the transfer.
    url = hf_hub_url(entry.repo, entry.file, revision=entry.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, timeout=METADATA_TIMEOUT, endpoint=endpoint)
    except Exception as exc:
        raise _hub_error(entry, exc, endpoint) from exc
    source = entry.source(endpoint)
    if meta.commit_hash is None:
        raise WeightsError(
            f"{entry.name} ({entry.basename}) from {source}: the endpoint does not answer like a Hugging Face Hub (no X-Repo-Commit header)",
            hint="check HF_ENDPOINT and your proxy settings, or " + WEIGHTS_DIR_HINT,
        )
    announced = meta.etag if meta.etag and SHA256_HEX.fullmatch(meta.etag) else None  # LFS etag = sha256
    for what, got, pinned in (("sha256", announced, entry.sha256), ("size", meta.size, entry.size)):
        if got is not None and pinned is not None and got != pinned:
            raise WeightsError(
                f"{entry.name} ({entry.basename}) from {source}: the server offers a file with {what} {got}, pinned {pinned}; not downloaded",
                hint="a mirror (HF_ENDPOINT) may serve another version; " + WEIGHTS_DIR_HINT,
            )
    try:
        path = Path(
            hf_hub_download(
                entry.repo,
                entry.file,
                revision=entry.revision,
                cache_dir=str(hub_cache_dir()),
                endpoint=endpoint,
                etag_timeout=METADATA_TIMEOUT,
                force_download=force,
                tqdm_class=_progress_bar_class(entry.name, progress),
            )
        )
    except Exception as exc:
        raise _hub_error(entry, exc, endpoint) from exc
    check = check_file(entry, path, entry.variants[0], where="hf-cache", progress=progress, rehash=True, announced_sha256=announced)
    if not check.ok:
        _discard_hub_file(path)
        raise WeightsError(
            f"{entry.name} ({entry.basename}) downloaded from {source}: {check.detail}; the download was deleted",
            hint=mismatch_hint(check, fresh=True),
        )
    return Resolved(entry, path, "hf-cache", path.stat().st_size, check)


def _discard_hub_file(pointer: Path) -> None:
    """Remove a snapshot file and the blob it points to."""
    blob = pointer.resolve()
    for p in {pointer, blob}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _connection_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(failures to reach the server, the timeouts among them) of the HTTP libraries huggingface_hub
    is built on: httpx (huggingface_hub 1.x), httpx2 (2.x), requests (before 1.0), and the OSErrors
    below them. Only libraries already imported are asked: an exception of any other cannot occur."""
    network: list[type[BaseException]] = [ConnectionError, TimeoutError, ssl.SSLError]
    timeouts: list[type[BaseException]] = [TimeoutError]
    for name in ("httpx", "httpx2"):
        httpx = sys.modules.get(name)
        if httpx is not None:
            network.append(httpx.TransportError)  # connect/read/write/pool timeouts, network, proxy, protocol
            timeouts.append(httpx.TimeoutException)
    requests = sys.modules.get("requests")
    if requests is not None:
        network += [requests.ConnectionError, requests.Timeout]  # ConnectionError covers ProxyError, SSLError
        timeouts.append(requests.Timeout)
    return tuple(network), tuple(timeouts)


def _hub_error(entry: WeightEntry, exc: BaseException, endpoint: str) -> WeightsError:
    """One line for a huggingface_hub failure, naming the file, the source and the reason."""
    from huggingface_hub import errors as hf

    status = getattr(getattr(exc, "response", None), "status_code", None)
    net_hint = f"check your connection, set HF_ENDPOINT to a reachable mirror, or {WEIGHTS_DIR_HINT}"
    network, timeouts = _connection_errors()
    if isinstance(exc, hf.LocalEntryNotFoundError) and exc.__cause__ is not None:
        return _hub_error(entry, exc.__cause__, endpoint)  # "not in the cache" because the request failed
    if isinstance(exc, hf.OfflineModeIsEnabled):
        reason, hint = "offline mode is on (HF_HUB_OFFLINE)", f"unset HF_HUB_OFFLINE, or {WEIGHTS_DIR_HINT}"
    elif isinstance(exc, hf.GatedRepoError):  # before RepositoryNotFoundError, its base class
        reason, hint = f"the repository is gated (HTTP {status})", f"accept its terms on the Hub and set HF_TOKEN, or {WEIGHTS_DIR_HINT}"
    elif isinstance(exc, hf.RepositoryNotFoundError):
        reason = f"repository not found (HTTP {status}: removed, private, or not on this endpoint)"
        hint = f"if it is private, set HF_TOKEN; if HF_ENDPOINT is a mirror, it may not have {entry.repo}; or {WEIGHTS_DIR_HINT}"
    elif isinstance(exc, hf.RevisionNotFoundError):
        reason, hint = f"revision {entry.revision} not found (HTTP {status})", WEIGHTS_DIR_HINT
    elif isinstance(exc, hf.EntryNotFoundError):
        reason = f"file not found at this revision (HTTP {status or 404})"
        hint = f"if HF_ENDPOINT is a mirror, it may not have the file; or {WEIGHTS_DIR_HINT}"
    elif isinstance(exc, hf.FileMetadataError):
        reason = "the endpoint does not answer like a Hugging Face Hub (missing file metadata)"
        hint = "check HF_ENDPOINT and your proxy settings, or " + WEIGHTS_DIR_HINT
    elif status is not None:
        reason, hint = f"HTTP {status} ({first_line(exc)})", net_hint
    elif isinstance(exc, network):
        what = "timed out" if isinstance(exc, timeouts) else "cannot connect"
        reason, hint = f"{what} ({first_line(exc)})", net_hint
    elif "Consistency check failed" in str(exc):  # huggingface_hub raises a plain OSError for a short body
        reason, hint = "the transfer ended early (size mismatch)", f"run `restore weights fetch {entry.name}` again"
    else:
        reason, hint = f"{type(exc).__name__}: {first_line(exc)}", net_hint
    return WeightsError(f"{entry.name} ({entry.basename}) from {entry.source(endpoint)}: {reason}", hint=hint)
