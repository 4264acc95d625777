"""The pinned checkpoints: parsing weights.toml into entries, groups and per-version wiring.

weights.toml lists each file once (`[[file]]`: Hub repo + revision, or a URL; license; sha256 and
size where published), names groups of files (the tokenizer), and says which file fills each role
(cleaner, controlnet, sd, tokenizer) for every model version and task. The table is checked when it
is read, so a bad reference fails at start-up with the table's path, not halfway through a run.
`registry()` is the table in use (the packaged one unless `set_registry` chose another).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..errors import UsageError, WeightsError
from .paths import hub_endpoint

DEFAULT_TOML = Path(__file__).with_name("weights.toml")
KINDS = ("cleaner", "controlnet", "sd", "tokenizer", "captioner", "face")
#: Roles a version/task maps to files, in the order `files_for` lists them.
ROLES = ("cleaner", "face_cleaner", "face_detector", "face_parser", "controlnet", "sd", "tokenizer")

#: A sha256 as weights.toml (and the Hub's LFS ETag) writes it.
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")

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

    def local_parts(self, file: str) -> tuple[str, ...]:
        """The trailing path parts a --weights-dir copy of `file` must have. A captioner's files have
        generic names (config.json), so they must sit in a folder named after the repo."""
        parts = PurePosixPath(file).parts
        if self.kind == "captioner" and self.repo is not None:
            return (PurePosixPath(self.repo).name, *parts)
        return parts

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
        if value is not None and not SHA256_HEX.fullmatch(value):
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
