"""A Hugging Face Hub look-alike on 127.0.0.1 for download tests (no network, ever).

It answers `hf_hub_download`'s requests the way the Hub does for an LFS file (huggingface_hub 2.x,
file_download.get_hf_file_metadata / http_get):

- ``HEAD /{repo}/resolve/{revision}/{filename}``: 200 with ``X-Repo-Commit``, ``X-Linked-Etag`` (the
  sha256), ``X-Linked-Size``, ``ETag``, ``Content-Length``; 404 with ``X-Error-Code: EntryNotFound``.
- ``GET`` of the same path, with ``Range: bytes=N-`` answered by 206 + ``Content-Range``.

Plain-URL files (``/releases/{name}``) get an ``ETag`` and honour ``If-Range``. A file can be set to
drop the connection after some bytes on its next GETs, to test resuming.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    data: bytes
    etag: str  # what the server announces: the sha256 for LFS files
    commit: str = COMMIT
    drop_after: int | None = None  # on the next `drops` GETs, close the connection after this many body bytes
    drops: int = 0


class FakeHub:
    def __init__(self):
        self.files: dict[str, Served] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- set-up ------------------------------------------------------------------------------
    def add_hub_file(self, repo: str, filename: str, data: bytes, *, revision: str = "main", announce: str | None = None, commit: str = COMMIT) -> Served:
        """Serve `data` as `repo`/`filename` at `revision`; `announce` overrides the sha256 in the headers."""
        served = Served(data, announce or hashlib.sha256(data).hexdigest(), commit)
        self.files[f"/{repo}/resolve/{revision}/{filename}"] = served
        if revision != commit:  # the Hub also answers at the commit hash
            self.files[f"/{repo}/resolve/{commit}/{filename}"] = served
        return served

    def add_url_file(self, name: str, data: bytes, *, etag: str | None = None) -> tuple[str, Served]:
        served = Served(data, etag or hashlib.md5(data).hexdigest())
        self.files[f"/releases/{name}"] = served
        return f"{self.url}/releases/{name}", served

    def reset(self) -> None:
        self.files.clear()
        self.requests.clear()

    def gets(self, path_part: str = "") -> list[dict[str, str]]:
        """Headers of the GET requests whose path contains `path_part`."""
        return [h for m, p, h in self.requests if m == "GET" and path_part in p]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- answering ---------------------------------------------------------------------------
    def _answer(self, req: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = req.path.split("?")[0]
        headers = {k.lower(): v for k, v in req.headers.items()}
        self.requests.append((req.command, path, headers))
        served = self.files.get(path)
        if served is None:
            req.send_response(404)
            if "/resolve/" in path:
                req.send_header("X-Error-Code", "EntryNotFound")
                req.send_header("X-Repo-Commit", COMMIT)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        data, start = served.data, 0
        rng = re.fullmatch(r"bytes=(\d+)-", headers.get("range", ""))
        if_range = headers.get("if-range")
        if rng and (if_range is None or if_range.strip('"') == served.etag):
            start = int(rng.group(1))
        if start >= len(data) and data:
            req.send_response(416)
            req.send_header("Content-Range", f"bytes */{len(data)}")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        req.send_response(206 if start else 200)
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.send_header("Content-Length", str(len(data) - start))
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("ETag", f'"{served.etag}"')
        if "/resolve/" in path:
            req.send_header("X-Repo-Commit", served.commit)
            req.send_header("X-Linked-Etag", f'"{served.etag}"')
            req.send_header("X-Linked-Size", str(len(data)))
        req.end_headers()
        if not body:
            return
        chunk = data[start:]
        if served.drops > 0 and served.drop_after is not None:
            served.drops -= 1
            req.wfile.write(chunk[: served.drop_after])
            req.wfile.flush()
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)
            return
        req.wfile.write(chunk)


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- fixtures and helpers shared by test_weights.py and test_cli_weights.py ---------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def weights_env(tmp_path, monkeypatch, hub):
    """Every cache in tmp_path, HF_ENDPOINT at the fake hub, no offline flags; a fresh registry after."""
    import huggingface_hub.constants

    from restorecli import weights

    monkeypatch.setenv("RESTORE_HOME", str(tmp_path / "restore-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RESTORE_WEIGHTS_DIR", "HF_TOKEN", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.reset()
    previous = weights.set_registry(None)
    yield tmp_path
    weights.set_registry(previous)


def payload(seed: int, size: int = 200_000) -> bytes:
    """Deterministic bytes, different per seed."""
    import random

    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def use_registry(*files: dict, versions: dict | None = None, groups: dict | None = None):
    """Install a registry of tiny test files; each dict is a [[file]] (kind/description/license filled in)."""
    from restorecli import weights

    data = {
        "file": [{"kind": "cleaner", "description": "a tiny test file", "license": "MIT", **f} for f in files],
        "groups": groups or {},
        "versions": versions or {},
    }
    registry = weights.Registry.from_dict(data)
    weights.set_registry(registry)
    return registry


def hub_file(hub: FakeHub, name: str, data: bytes, *, filename: str | None = None, pin_sha: bool = True,
             revision: str = COMMIT, repo: str = "test-org/tiny", announce: str | None = None, commit: str = COMMIT) -> dict:
    """Serve `data` on the fake hub and return its [[file]] dict (sha256/size pinned unless pin_sha=False)."""
    filename = filename or f"{name}.pth"
    hub.add_hub_file(repo, filename, data, revision=revision, announce=announce, commit=commit)
    entry = {"name": name, "repo": repo, "file": filename, "revision": revision}
    if pin_sha:
        entry |= {"sha256": sha(data), "size": len(data)}
    return entry


def url_file(hub: FakeHub, name: str, data: bytes, *, pin_sha: bool = True, etag: str | None = None) -> dict:
    url, _ = hub.add_url_file(f"{name}.pth", data, etag=etag)
    entry = {"name": name, "url": url, "file": f"{name}.pth"}
    if pin_sha:
        entry |= {"sha256": sha(data), "size": len(data)}
    return entry
