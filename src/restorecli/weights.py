"""Pinned checkpoints (weights.toml) -> verified local files.

`resolve(name)` looks for a file in this order and returns the first one that verifies:

1. ``--weights-dir`` / ``RESTORE_WEIGHTS_DIR``: a folder of files the user already has (DiffBIR's own
   ``weights/``, an air-gapped copy), found by file name, also in subfolders;
2. the local copy: the Hugging Face cache for Hub files (``HF_HUB_CACHE``), ``<weights_home>/downloads``
   for plain-URL files;
3. a download, unless ``download=False`` or ``HF_HUB_OFFLINE`` is set. Hub files go through
   ``hf_hub_download`` at the pinned revision, so ``HF_ENDPOINT`` (mirrors), ``HF_TOKEN`` and the shared
   cache work as everywhere else; URL files are fetched here with the same guarantees (temp file in the
   target folder, HTTP Range resume, sha256 check, progress).

Every file is checked before use: its size and sha256 against the pin where weights.toml has them;
otherwise against the hash recorded the first time it was used (trust on first use, kept in
``<weights_home>/weights.lock.json``). Hashes of big files are cached by (path, size, mtime) so a 5 GB
checkpoint is hashed once, not on every start. A file that fails its check right after a download is
deleted; a file the user provided is never deleted, only refused.

Library code: nothing here prints. Failures raise `WeightsError` (exit code 2) whose message names the
file, where it came from and why, with a hint saying what to do.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping, Sequence

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from . import __version__
from .errors import UsageError, WeightsError

logger = logging.getLogger("restorecli.weights")

DEFAULT_TOML = Path(__file__).with_name("weights.toml")
KINDS = ("cleaner", "controlnet", "sd", "tokenizer")
#: Roles a version/task maps to files, in the order `files_for` lists them.
ROLES = ("cleaner", "face_cleaner", "controlnet", "sd", "tokenizer")

#: Seconds to wait for the Hub's metadata answer (HEAD) and, per read, for download data.
METADATA_TIMEOUT = 10.0
DOWNLOAD_TIMEOUT = 10.0
#: How often a plain-URL download resumes within one call after the connection drops mid-file
#: (only while each try makes progress). After that the partial file stays for the next run.
URL_RETRIES = 3

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHUNK = 8 * 1024 * 1024
_TRUE = {"1", "ON", "YES", "TRUE"}

WEIGHTS_DIR_HINT = "put the file in a folder and pass `--weights-dir DIR` (or set RESTORE_WEIGHTS_DIR)"


# --------------------------------------------------------------------------------------------------
# The registry: weights.toml
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One published file with given contents: the pinned file, or an `also` alternative."""

    file: str
    sha256: str | None
    size: int | None


@dataclass(frozen=True)
class WeightEntry:
    """One pinned checkpoint (a `[[file]]` of weights.toml)."""

    name: str
    kind: str
    description: str
    file: str  # path inside the Hub repo ("tokenizer/vocab.json"), or the URL's file name
    license: str
    repo: str | None = None
    revision: str | None = None
    url: str | None = None
    sha256: str | None = None
    size: int | None = None
    approx_size: int | None = None
    also: tuple[Variant, ...] = ()

    @property
    def is_hub(self) -> bool:
        return self.repo is not None

    @property
    def basename(self) -> str:
        return PurePosixPath(self.file).name

    @property
    def variants(self) -> tuple[Variant, ...]:
        return (Variant(self.file, self.sha256, self.size), *self.also)

    @property
    def download_size(self) -> int | None:
        """Exact size where pinned, else the public listing's rounded size, else None."""
        return self.size if self.size is not None else self.approx_size

    def source(self, endpoint: str | None = None) -> str:
        """Where a download comes from, for messages: the Hub repo and revision, or the URL."""
        if self.url is not None:
            return self.url
        rev = self.revision if not _COMMIT.fullmatch(self.revision or "") else self.revision[:12]
        return f"{endpoint or hub_endpoint()}/{self.repo} (revision {rev})"


@dataclass(frozen=True)
class Registry:
    """The parsed weights.toml: entries by name, groups, and what each version/task needs."""

    entries: Mapping[str, WeightEntry]
    groups: Mapping[str, tuple[str, ...]]
    versions: Mapping[str, Mapping[str, object]]
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Registry":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise WeightsError(f"{path}: cannot read the weights table ({exc})") from exc
        return cls.from_dict(data, path=path)

    @classmethod
    def from_dict(cls, data: Mapping, *, path: Path | None = None) -> "Registry":
        where = str(path) if path else "weights table"

        def bad(reason: str) -> WeightsError:
            return WeightsError(f"{where}: {reason}")

        entries: dict[str, WeightEntry] = {}
        for raw in data.get("file", []):
            entry = _parse_entry(dict(raw), bad)
            if entry.name in entries:
                raise bad(f"file {entry.name!r} is listed twice")
            entries[entry.name] = entry
        groups = {name: tuple(members) for name, members in data.get("groups", {}).items()}
        for name, members in groups.items():
            if name in entries:
                raise bad(f"group {name!r} has the name of a file")
            unknown = [m for m in members if m not in entries]
            if unknown:
                raise bad(f"group {name!r} names unknown files: {', '.join(unknown)}")
        versions = {str(v): dict(spec) for v, spec in data.get("versions", {}).items()}
        reg = cls(entries=entries, groups=groups, versions=versions, path=path)
        for version in versions:  # every reference must name a file or group
            for task in reg.tasks(version):
                for role, ref in reg.wiring(version, task).items():
                    if role not in ROLES:
                        raise bad(f"versions.{version}.{task}: unknown role {role!r} (roles: {', '.join(ROLES)})")
                    for name in (ref,) if isinstance(ref, str) else ref:
                        if name not in entries:
                            raise bad(f"versions.{version}.{task}.{role}: unknown file {name!r}")
        return reg

    # -- look-ups --------------------------------------------------------------------------------
    def get(self, name: str) -> WeightEntry:
        """An entry by its name, or by its file name (`v2.pth`, `DiffBIR_v2.1.pt`)."""
        if name in self.entries:
            return self.entries[name]
        for entry in self.entries.values():
            if name in (entry.file, entry.basename):
                return entry
        raise UsageError(
            f"unknown checkpoint {name!r}; known: {', '.join([*self.entries, *self.groups])}",
            hint="`restore weights list` shows every pinned checkpoint",
        )

    def expand(self, names: Iterable[str]) -> list[WeightEntry]:
        """Entries for names, file names or group names, each once, in the given order."""
        out: dict[str, WeightEntry] = {}
        for name in names:
            for member in self.groups.get(name, (name,)):
                entry = self.get(member)
                out.setdefault(entry.name, entry)
        return list(out.values())

    def tasks(self, version: str) -> list[str]:
        spec = self._version(version)
        return [task for task, value in spec.items() if isinstance(value, Mapping)]

    def wiring(self, version: str, task: str) -> dict[str, str | tuple[str, ...]]:
        """Role -> file name (tokenizer: a tuple of names) for one version and task, in ROLES order."""
        spec = self._version(version)
        per_task = spec.get(task)
        if not isinstance(per_task, Mapping):
            raise UsageError(
                f"model {version} has no task {task!r}; its tasks: {', '.join(self.tasks(version))}"
            )
        roles: dict[str, object] = {**{k: v for k, v in spec.items() if not isinstance(v, Mapping)}, **per_task}
        out: dict[str, str | tuple[str, ...]] = {}
        for role in [*ROLES, *(r for r in roles if r not in ROLES)]:
            if role in roles:
                ref = str(roles[role])
                out[role] = self.groups[ref] if ref in self.groups else ref
        return out

    def files_for(self, version: str, task: str | None = None) -> list[WeightEntry]:
        """The files one version needs for one task (or for all its tasks when task is None)."""
        tasks = [task] if task is not None else self.tasks(version)
        names: list[str] = []
        for t in tasks:
            for ref in self.wiring(version, t).values():
                names.extend((ref,) if isinstance(ref, str) else ref)
        return self.expand(names)

    def _version(self, version: str) -> Mapping[str, object]:
        if version not in self.versions:
            raise UsageError(f"unknown model version {version!r}; pinned versions: {', '.join(self.versions)}")
        return self.versions[version]


def _parse_entry(raw: dict, bad: Callable[[str], WeightsError]) -> WeightEntry:
    name = raw.pop("name", None)
    if not isinstance(name, str) or not name:
        raise bad("a [[file]] has no name")

    def take(key: str, typ: type, required: bool = False):
        value = raw.pop(key, None)
        if value is None:
            if required:
                raise bad(f"file {name!r}: missing `{key}`")
            return None
        if not isinstance(value, typ) or isinstance(value, bool):
            raise bad(f"file {name!r}: `{key}` must be a {typ.__name__}, got {value!r}")
        return value

    def sha(value: str | None, what: str) -> str | None:
        if value is not None and not _SHA256.fullmatch(value):
            raise bad(f"file {name!r}: {what} must be 64 lowercase hex digits, got {value!r}")
        return value

    also = []
    for alt in take("also", list) or []:
        alt = dict(alt)
        if not isinstance(alt.get("file"), str) or not isinstance(alt.get("sha256"), str):
            raise bad(f"file {name!r}: each `also` needs a file and its sha256")
        also.append(Variant(alt["file"], sha(alt["sha256"], "also.sha256"), alt.get("size")))
    entry = WeightEntry(
        name=name,
        kind=take("kind", str, required=True),
        description=take("description", str, required=True),
        file=take("file", str, required=True),
        license=take("license", str, required=True),
        repo=take("repo", str),
        revision=take("revision", str),
        url=take("url", str),
        sha256=sha(take("sha256", str), "sha256"),
        size=take("size", int),
        approx_size=take("approx_size", int),
        also=tuple(also),
    )
    if raw:
        raise bad(f"file {name!r}: unknown keys {', '.join(sorted(raw))}")
    if entry.kind not in KINDS:
        raise bad(f"file {name!r}: kind must be one of {', '.join(KINDS)}, got {entry.kind!r}")
    if (entry.repo is None) == (entry.url is None):
        raise bad(f"file {name!r}: give either `repo` (+ `revision`) or `url`")
    if entry.repo is not None and not entry.revision:
        raise bad(f"file {name!r}: a Hub file needs a `revision` (a full commit hash, or a branch + sha256)")
    if entry.url is not None and entry.revision is not None:
        raise bad(f"file {name!r}: `revision` only applies to Hub files")
    return entry


_registry: Registry | None = None


def registry() -> Registry:
    """The registry in use: the packaged weights.toml unless `set_registry` chose another."""
    global _registry
    if _registry is None:
        _registry = Registry.load(DEFAULT_TOML)
    return _registry


def set_registry(source: Registry | str | os.PathLike | None) -> Registry | None:
    """Use another weights table (tests, private pins); None goes back to the packaged one.

    Returns the registry that was in use, so a caller can put it back."""
    global _registry
    previous = _registry
    _registry = source if isinstance(source, Registry) or source is None else Registry.load(source)
    return previous


def all_entries() -> list[WeightEntry]:
    return list(registry().entries.values())


def get_entry(name: str) -> WeightEntry:
    return registry().get(name)


def files_for(version: str, task: str | None = None) -> list[WeightEntry]:
    """The files `version` needs for `task` (all its tasks when None): cleaners, controlnet, sd, tokenizer."""
    return registry().files_for(version, task)


def wiring(version: str, task: str) -> dict[str, str | tuple[str, ...]]:
    """Role -> entry name for one version and task, e.g. {"cleaner": "bsrnet", "controlnet": "v2", ...}."""
    return registry().wiring(version, task)


# --------------------------------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------------------------------


def weights_home() -> Path:
    """restorecli's own folder: $RESTORE_HOME, else $XDG_CACHE_HOME/restorecli, else ~/.cache/restorecli.

    Holds the trust-on-first-use lock (weights.lock.json), the hash cache (hashes.json), plain-URL
    downloads (downloads/) and derived caches (cache/<kind>/, see `cache_dir`)."""
    if os.environ.get("RESTORE_HOME"):
        return Path(os.environ["RESTORE_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "restorecli"


def cache_dir(kind: str) -> Path:
    """A folder for derived data of one kind (e.g. converted weights), created on demand."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", kind) or kind in (".", ".."):
        raise ValueError(f"`kind` must be a plain folder name, got {kind!r}")
    path = weights_home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock_path() -> Path:
    return weights_home() / "weights.lock.json"


def downloads_dir() -> Path:
    """Where plain-URL files (BSRNet, SCUNet) are downloaded."""
    return weights_home() / "downloads"


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment now (huggingface_hub reads it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now, else huggingface_hub's endpoint."""
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub saw it at import."""
    if any((os.environ.get(v) or "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def format_size(n: int | None, approx: bool = False) -> str:
    """1_450_000_000 -> '1.45 GB' (decimal units, as download pages show them)."""
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)):
        if n >= 0.9995 * scale or unit == "B":  # 999_999 is "1 MB", not "1e+03 kB"
            return ("~" if approx else "") + f"{n / scale:.3g} {unit}"
    raise AssertionError  # pragma: no cover


def download_size(entries: Iterable[WeightEntry]) -> tuple[int, bool, int]:
    """(bytes, some sizes approximate, number of files of unknown size) of a set of files."""
    total, approx, unknown = 0, False, 0
    for entry in entries:
        if entry.download_size is None:
            unknown += 1
        else:
            total += entry.download_size
            approx |= entry.size is None
    return total, approx, unknown


# --------------------------------------------------------------------------------------------------
# Hashes: computing, caching, trust on first use
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """What `progress` callbacks receive: bytes done of total for one file and phase."""

    name: str
    phase: str  # "download" | "verify"
    done: int
    total: int | None


ProgressCallback = Callable[[ProgressEvent], None]


def sha256_file(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file; `on_bytes(done)` is called after each chunk."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if on_bytes is not None:
                on_bytes(done)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s (%s)", path, exc)
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Atomically (temp file + rename), so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _stat_key(path: Path) -> tuple[str, int, int]:
    real = path.resolve()
    st = real.stat()
    return str(real), st.st_size, st.st_mtime_ns


def _cached_sha256(path: Path) -> str | None:
    """The cached hash of `path` if the file still has the size and mtime it had when hashed."""
    key, size, mtime = _stat_key(path)
    rec = _read_json(weights_home() / "hashes.json").get(key)
    if isinstance(rec, dict) and rec.get("size") == size and rec.get("mtime_ns") == mtime:
        return rec.get("sha256")
    return None


def _remember_sha256(path: Path, sha: str) -> None:
    key, size, mtime = _stat_key(path)
    cache_file = weights_home() / "hashes.json"
    try:
        data = {k: v for k, v in _read_json(cache_file).items() if os.path.exists(k)}
        data[key] = {"size": size, "mtime_ns": mtime, "sha256": sha}
        _write_json(cache_file, data)
    except OSError as exc:  # a read-only home only costs a re-hash next time
        logger.debug("cannot update the hash cache %s: %s", cache_file, exc)


def _sha256(path: Path, name: str, progress: ProgressCallback | None, *, rehash: bool = False) -> str:
    sha = None if rehash else _cached_sha256(path)
    if sha is None:
        total = path.stat().st_size
        report = None if progress is None else (lambda done: progress(ProgressEvent(name, "verify", done, total)))
        if report is not None:
            report(0)
        sha = sha256_file(path, report)
        _remember_sha256(path, sha)
    return sha


def _lock_record(entry: WeightEntry) -> dict | None:
    rec = _read_json(lock_path()).get("files", {}).get(entry.name)
    if isinstance(rec, dict) and rec.get("file") == entry.file and rec.get("source") == _lock_source(entry):
        return rec
    return None  # never recorded, or weights.toml now pins another file under this name


def _lock_source(entry: WeightEntry) -> str:
    return entry.url if entry.url is not None else f"hf://{entry.repo}@{entry.revision}"


def _record_first_use(entry: WeightEntry, sha: str, size: int, seen_at: str) -> None:
    path = lock_path()
    data = _read_json(path)
    data["about"] = (
        "restorecli trust-on-first-use record: the sha256 of each checkpoint that weights.toml pins "
        "without a hash, as first seen. A later file that differs is refused; delete an entry to accept a new file."
    )
    data.setdefault("files", {})[entry.name] = {
        "file": entry.file,
        "source": _lock_source(entry),
        "sha256": sha,
        "size": size,
        "seen_at": seen_at,
        "recorded": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        _write_json(path, data)
    except OSError as exc:
        logger.warning("cannot record the sha256 of %s in %s (%s); it will be checked against nothing", entry.name, path, exc)


@dataclass(frozen=True)
class WeightCheck:
    """The state of one checkpoint on this machine (`status`, `verify`)."""

    entry: WeightEntry
    path: Path | None = None
    where: str | None = None  # "weights-dir" | "hf-cache" | "downloads"
    #: verified (matches the pinned sha256) | trusted (matches the hash recorded on first use) |
    #: recorded (first use: hash just recorded) | mismatch | unchecked (present, not hashed yet) | missing
    state: str = "missing"
    sha256: str | None = None
    detail: str = ""
    #: what the file was checked against: "pin" (sha256/size in weights.toml), "server" (the sha256
    #: the Hub announced), "lock" (the hash recorded on first use), or None (not checked)
    against: str | None = None

    @property
    def ok(self) -> bool:
        return self.state in ("verified", "trusted", "recorded")


def _check(
    entry: WeightEntry,
    path: Path,
    variant: Variant,
    *,
    where: str,
    progress: ProgressCallback | None = None,
    rehash: bool = False,
    announced_sha256: str | None = None,
    hash_only_if_cached: bool = False,
) -> WeightCheck:
    """Check size and sha256 of `path` against the pin, the server's announcement, or the lock.

    Never raises on a mismatch: returns state "mismatch" with the reason in `detail`."""
    check = functools.partial(WeightCheck, entry, path, where)
    size = path.stat().st_size
    if variant.size is not None and size != variant.size:
        return check("mismatch", None, f"size {size} bytes, expected {variant.size}", "pin")
    if hash_only_if_cached:
        sha = _cached_sha256(path)
        if sha is None:
            return check("unchecked", None, "not hashed yet (`restore weights verify` checks it)")
    else:
        sha = _sha256(path, entry.name, progress, rehash=rehash)
    if variant.sha256 is not None:
        if sha != variant.sha256:
            return check("mismatch", sha, f"sha256 {sha} does not match the pinned {variant.sha256}", "pin")
        return check("verified", sha, "sha256 matches the pin", "pin")
    if announced_sha256 is not None and sha != announced_sha256:
        return check("mismatch", sha, f"sha256 {sha} does not match the {announced_sha256} the server announced", "server")
    rec = _lock_record(entry)
    if rec is not None:
        if sha != rec.get("sha256"):
            return check(
                "mismatch",
                sha,
                f"sha256 {sha} differs from {rec.get('sha256')} recorded on first use ({rec.get('recorded')}, in {lock_path()})",
                "lock",
            )
        return check("trusted", sha, f"matches the sha256 recorded on first use, {rec.get('recorded')}", "lock")
    if hash_only_if_cached:
        return check("unchecked", sha, "no pinned sha256; recorded on first use")
    _record_first_use(entry, sha, size, str(path))
    return check("recorded", sha, f"no pinned sha256; recorded on first use in {lock_path()}", "lock")


def mismatch_hint(check: WeightCheck, *, fresh: bool = False) -> str:
    """What to do about a file that failed its check (`fresh`: it was just downloaded)."""
    entry = check.entry
    if check.against == "lock":
        return (
            f"if the new file is intended, delete the \"{entry.name}\" entry from {lock_path()} and run again; "
            "otherwise replace the file with the one you used before"
        )
    if fresh:
        return (
            "the server sent another file than the pinned one (a stale mirror? check HF_ENDPOINT), "
            f"or the transfer was corrupted: run `restore weights fetch {entry.name}` again, or {WEIGHTS_DIR_HINT}"
        )
    if check.where == "weights-dir":
        return (
            f"replace it with the published file ({entry.source()}), or move it out of the folder "
            "so that restore downloads the pinned one"
        )
    return f"run `restore weights fetch {entry.name} --force` to download it again"


# --------------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------------


class _FolderIndex:
    """The files under a --weights-dir folder (3 levels deep, hidden folders skipped), by file name."""

    MAX_DEPTH = 3

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise WeightsError(
                f"--weights-dir {self.root}: not a folder",
                hint="pass the folder that holds the checkpoint files (e.g. DiffBIR's weights/), or unset RESTORE_WEIGHTS_DIR",
            )
        self.by_name: dict[str, list[Path]] = {}
        base_depth = len(self.root.parts)
        for dirpath, dirnames, filenames in os.walk(self.root):
            depth = len(Path(dirpath).parts) - base_depth
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < self.MAX_DEPTH else []
            for fn in filenames:
                self.by_name.setdefault(fn, []).append(Path(dirpath) / fn)

    def find(self, entry: WeightEntry) -> tuple[Path, Variant] | None:
        """The shallowest file matching the pinned file or an alternative (`also`).

        A file with folders in its name (tokenizer/vocab.json) must sit in a folder of that name."""
        for variant in entry.variants:
            parts = PurePosixPath(variant.file).parts
            hits = [
                p for p in self.by_name.get(parts[-1], [])
                if p.is_file() and p.parts[-len(parts):] == parts
            ]
            if hits:
                return min(hits, key=lambda p: (len(p.parts), str(p))), variant
        return None


def _weights_dir(weights_dir: str | os.PathLike | None) -> str | None:
    if weights_dir is not None and str(weights_dir) != "":
        return str(weights_dir)
    return os.environ.get("RESTORE_WEIGHTS_DIR") or None


def _local_copy(entry: WeightEntry) -> Path | None:
    """The file in the Hub cache (hub files) or in downloads/ (URL files), without any network."""
    if entry.url is not None:
        path = downloads_dir() / entry.basename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(entry.repo, entry.file, cache_dir=str(hub_cache_dir()), revision=entry.revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


@dataclass(frozen=True)
class Located:
    entry: WeightEntry
    path: Path
    where: str  # "weights-dir" | "hf-cache" | "downloads"
    variant: Variant


def locate(name: str | WeightEntry, *, weights_dir: str | os.PathLike | None = None, _index: _FolderIndex | None = None) -> Located | None:
    """Where a checkpoint is on this machine (nothing verified, nothing downloaded), or None."""
    entry = name if isinstance(name, WeightEntry) else registry().get(name)
    wdir = _weights_dir(weights_dir)
    if wdir is not None:
        found = (_index or _FolderIndex(wdir)).find(entry)
        if found is not None:
            return Located(entry, found[0], "weights-dir", found[1])
    local = _local_copy(entry)
    if local is not None:
        return Located(entry, local, "downloads" if entry.url else "hf-cache", entry.variants[0])
    return None


# --------------------------------------------------------------------------------------------------
# resolve / fetch / verify / status
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    entry: WeightEntry
    path: Path
    where: str
    downloaded: int = 0  # bytes transferred by this call (0: the file was already here)
    check: WeightCheck | None = None


def resolve(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
    force_download: bool = False,
) -> Path:
    """The local path of a verified checkpoint, downloading it if needed and allowed.

    Raises WeightsError when it is missing (and may not or cannot be downloaded) or fails its check."""
    return fetch(name, weights_dir=weights_dir, download=download, progress=progress, force_download=force_download).path


def fetch(
    name: str | WeightEntry,
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
    force_download: bool = False,
) -> Resolved:
    """`resolve` with the details the CLI reports: where the file was found and what was downloaded."""
    entry = name if isinstance(name, WeightEntry) else registry().get(name)
    if not force_download:
        found = locate(entry, weights_dir=weights_dir)
        if found is not None:
            check = _check(entry, found.path, found.variant, where=found.where, progress=progress)
            if not check.ok:
                origin = {"weights-dir": "from --weights-dir", "hf-cache": "in the Hugging Face cache", "downloads": "downloaded earlier"}[found.where]
                raise WeightsError(
                    f"{entry.name}: {found.path} ({origin}): {check.detail}",
                    hint=mismatch_hint(check),
                )
            return Resolved(entry, found.path, found.where, 0, check)
    if not download:
        raise _missing_error(entry, weights_dir, offline=False)
    if is_offline():
        raise _missing_error(entry, weights_dir, offline=True)
    if entry.url is not None:
        return _download_url(entry, progress=progress, force=force_download)
    return _download_hub(entry, progress=progress, force=force_download)


def _missing_error(entry: WeightEntry, weights_dir, *, offline: bool) -> WeightsError:
    wdir = _weights_dir(weights_dir)
    local = downloads_dir() if entry.url else hub_cache_dir()
    looked = f"{'--weights-dir ' + wdir + ', ' if wdir else ''}{local}"
    size = format_size(entry.download_size, approx=entry.size is None)
    if offline:
        return WeightsError(
            f"{entry.name} ({entry.basename}): not found locally (looked in {looked}) and HF_HUB_OFFLINE is set",
            hint=f"unset HF_HUB_OFFLINE and run `restore weights fetch {entry.name}` ({size}), or {WEIGHTS_DIR_HINT}",
        )
    return WeightsError(
        f"{entry.name} ({entry.basename}): not downloaded (looked in {looked})",
        hint=f"run `restore weights fetch {entry.name}` ({size} from {entry.source()}), or {WEIGHTS_DIR_HINT}",
    )


def verify(
    names: Sequence[str] | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
) -> list[WeightCheck]:
    """Re-hash every present checkpoint (all, or `names`), ignoring the hash cache. Never raises on a
    mismatch: see each result's `state` ("mismatch") and `detail`."""
    return _survey(names, weights_dir=weights_dir, progress=progress, rehash=True)


def status(names: Sequence[str] | None = None, *, weights_dir: str | os.PathLike | None = None) -> list[WeightCheck]:
    """Presence and verification state of each checkpoint, without hashing anything new: a file
    hashed before (resolve, fetch, verify) shows verified/mismatch, others "unchecked"."""
    return _survey(names, weights_dir=weights_dir, progress=None, rehash=False)


def _survey(names, *, weights_dir, progress, rehash: bool) -> list[WeightCheck]:
    entries = registry().expand(names) if names else all_entries()
    wdir = _weights_dir(weights_dir)
    index = _FolderIndex(wdir) if wdir is not None else None
    out = []
    for entry in entries:
        found = locate(entry, weights_dir=wdir, _index=index)
        if found is None:
            out.append(WeightCheck(entry))
            continue
        out.append(
            _check(entry, found.path, found.variant, where=found.where, progress=progress, rehash=rehash, hash_only_if_cached=not rehash)
        )
    return out


def tokenizer_dir(
    *,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: ProgressCallback | None = None,
    group: str = "sd2_tokenizer",
) -> Path:
    """A folder holding the pinned tokenizer files under their usual names (for `from_pretrained`).

    The Hub cache already keeps them together; files from --weights-dir in different folders are
    linked into `cache_dir("tokenizer")/<digest>`."""
    paths = {
        PurePosixPath(e.file).name: resolve(e.name, weights_dir=weights_dir, download=download, progress=progress)
        for e in registry().expand([group])
    }
    parents = {p.parent for p in paths.values()}
    if len(parents) == 1 and all(p.name == name for name, p in paths.items()):
        return parents.pop()
    digest = hashlib.sha256("\n".join(str(p) for p in paths.values()).encode()).hexdigest()[:16]
    folder = cache_dir("tokenizer") / digest
    folder.mkdir(exist_ok=True)
    for name, src in paths.items():
        dst = folder / name
        if not dst.exists():
            try:
                dst.symlink_to(src.resolve())
            except OSError:
                import shutil

                shutil.copyfile(src, dst)
    return folder


# --------------------------------------------------------------------------------------------------
# Downloads: Hub files
# --------------------------------------------------------------------------------------------------


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


def _download_hub(entry: WeightEntry, *, progress: ProgressCallback | None, force: bool) -> Resolved:
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
    announced = meta.etag if meta.etag and _SHA256.fullmatch(meta.etag) else None  # LFS etag = sha256
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
    check = _check(entry, path, entry.variants[0], where="hf-cache", progress=progress, rehash=True, announced_sha256=announced)
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


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


_NETWORK_ERRORS = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
    "NetworkError", "ReadError", "WriteError", "RemoteProtocolError", "ProxyError", "TransportError",
    "ConnectionError", "Timeout", "SSLError",
}


def _hub_error(entry: WeightEntry, exc: BaseException, endpoint: str) -> WeightsError:
    """One line for a huggingface_hub failure, naming the file, the source and the reason."""
    kinds = {c.__name__ for c in type(exc).__mro__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    net_hint = f"check your connection, set HF_ENDPOINT to a reachable mirror, or {WEIGHTS_DIR_HINT}"
    if "LocalEntryNotFoundError" in kinds and exc.__cause__ is not None:
        return _hub_error(entry, exc.__cause__, endpoint)
    if "OfflineModeIsEnabled" in kinds:
        reason, hint = "offline mode is on (HF_HUB_OFFLINE)", f"unset HF_HUB_OFFLINE, or {WEIGHTS_DIR_HINT}"
    elif "GatedRepoError" in kinds:
        reason, hint = f"the repository is gated (HTTP {status})", f"accept its terms on the Hub and set HF_TOKEN, or {WEIGHTS_DIR_HINT}"
    elif "RepositoryNotFoundError" in kinds:
        reason = f"repository not found (HTTP {status}: removed, private, or not on this endpoint)"
        hint = f"if it is private, set HF_TOKEN; if HF_ENDPOINT is a mirror, it may not have {entry.repo}; or {WEIGHTS_DIR_HINT}"
    elif "RevisionNotFoundError" in kinds:
        reason, hint = f"revision {entry.revision} not found (HTTP {status})", WEIGHTS_DIR_HINT
    elif "EntryNotFoundError" in kinds:
        reason = f"file not found at this revision (HTTP {status or 404})"
        hint = f"if HF_ENDPOINT is a mirror, it may not have the file; or {WEIGHTS_DIR_HINT}"
    elif "FileMetadataError" in kinds:
        reason = "the endpoint does not answer like a Hugging Face Hub (missing file metadata)"
        hint = "check HF_ENDPOINT and your proxy settings, or " + WEIGHTS_DIR_HINT
    elif status is not None:
        reason, hint = f"HTTP {status} ({_first_line(exc)})", net_hint
    elif kinds & _NETWORK_ERRORS or isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        what = "timed out" if "Timeout" in "".join(kinds) else "cannot connect"
        reason, hint = f"{what} ({_first_line(exc)})", net_hint
    elif "Consistency check failed" in str(exc):
        reason, hint = "the transfer ended early (size mismatch)", f"run `restore weights fetch {entry.name}` again"
    else:
        reason, hint = f"{type(exc).__name__}: {_first_line(exc)}", net_hint
    return WeightsError(f"{entry.name} ({entry.basename}) from {entry.source(endpoint)}: {reason}", hint=hint)


# --------------------------------------------------------------------------------------------------
# Downloads: plain URLs (GitHub release assets)
# --------------------------------------------------------------------------------------------------


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


def _download_url(entry: WeightEntry, *, progress: ProgressCallback | None, force: bool) -> Resolved:
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
            check = _check(entry, dest, entry.variants[0], where="downloads", progress=progress)
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
        check = _check(entry, part, entry.variants[0], where="downloads", progress=progress, rehash=True)
        if not check.ok:
            for p in (part, state_file):
                p.unlink(missing_ok=True)
            raise WeightsError(
                f"{entry.name} ({entry.basename}) downloaded from {entry.url}: {check.detail}; the download was deleted",
                hint=mismatch_hint(check, fresh=True),
            )
        os.replace(part, dest)
        state_file.unlink(missing_ok=True)
        _remember_sha256(dest, check.sha256)
        return Resolved(entry, dest, "downloads", transferred, check)


def _transfer(entry: WeightEntry, part: Path, state_file: Path, progress: ProgressCallback | None) -> int:
    """One HTTP GET into `part`, resuming what is there when safe. Returns the bytes received.

    Raises _Interrupted(reason, bytes received) when the connection drops mid-body, WeightsError for
    anything a retry cannot fix (HTTP errors, no connection, a different file)."""
    import http.client  # plain-URL downloads only: kept off `import restorecli`
    import urllib.error
    import urllib.request
    state = _read_json(state_file)
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
            _write_json(state_file, {"url": entry.url, "etag": _strong_etag(response.headers.get("ETag")),
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
                raise _Interrupted(_first_line(exc) or type(exc).__name__, received) from None
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
