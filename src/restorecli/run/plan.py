"""Where each input of a run goes, and what need not run.

The naming rule (README "Output files") lives here, shared by `restore batch` (`plan_batch`) and
`restore IMAGE...` (`plan_outputs`), and by the guidance maps of both: an output is
`<stem><suffix>.<ext>` when no other input going into its folder has the same stem; when several do
(`IMG_0001.jpg` beside `IMG_0001.tif`, `logo.gif` beside `logo.png`), each of them carries its source
extension (`IMG_0001_jpg_restored.jpg`, `logo_gif_restored.png`), and names that still coincide are
numbered. Names depend only on the set of inputs, never on their order or on what exists on disk, so
a rerun (resume) and `--from-list` find the same names. Names are compared ignoring letter case, so
the outputs stay distinct on any file system.

`plan_batch` then settles up front what need not run: an output that exists is *skipped* (a rerun
resumes); an output that would overwrite an input, or an input that is the same file as another, is a
*failure* of that file. The rest become `Job`s for `run.loop`. Also here: the lock that keeps two runs
out of one output folder, and the removal of the temp files a killed run left there.
"""

from __future__ import annotations

import contextlib
import os
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Union

from ..errors import SetupError, UsageError
from .discovery import Source
from .outputs import DEFAULT_SUFFIX, FORMAT_EXTENSIONS, STDIO, OutputPlan, format_of, is_directory_target, output_name
from .steps import FileResult

#: `--save-guidance-map DIR` names each map like an output with this suffix, always PNG.
GUIDANCE_SUFFIX = "_guidance"


# -- the naming rule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NameRequest:
    """One input to name: its path ("-": stdin), the folder its output goes into, and the file name the
    output's name is made from (the input's own; `-` gives `stdin`)."""

    input: str
    folder: str | os.PathLike
    name: str


@dataclass(frozen=True)
class Named:
    """An input's output path, or with `error` the one line saying why it cannot have one."""

    output: str
    error: str | None = None


def name_key(path: str | os.PathLike) -> str:
    """What a path is called on any file system: absolute, letter case and Unicode normalisation ignored
    (macOS, Windows and FAT/exFAT drives ignore case; macOS also normalisation), so that two names with
    different keys are two files everywhere."""
    return unicodedata.normalize("NFC", os.path.abspath(path)).casefold()


def unique_outputs(
    requests: Sequence[NameRequest],
    *,
    suffix: str = DEFAULT_SUFFIX,
    fmt: str | None = None,
    taken: Mapping[str, str] | None = None,
) -> list[Named]:
    """The output of each request by the naming rule; the same set of requests, in any order, gets the
    same names. Names are "the same" when their `name_key`s are (letter case ignored).

    1. `<stem><suffix>.<ext>` in the request's folder (`outputs.output_name`).
    2. Requests that share their stem with another request of the same folder, or whose name is
       another input's path, carry their source extension after the stem: `IMG_0001.jpg` +
       `IMG_0001.tif` -> `IMG_0001_jpg_restored.jpg`, `IMG_0001_tif_restored.tif`; `x.png` beside an
       input `x_restored.png` -> `x_png_restored.png`. (An input without an extension keeps the plain
       name.)
    3. Requests of step 2 whose name is still shared or still an input's path (names that differ only
       in letter case, `a.PNG` + `a.png`; same-named files of several folders into one) are numbered in
       the order of their input paths: `a_PNG-1_restored.PNG`, `a_png-2_restored.png`.
    4. What remains is refused: an output that is an input (its own included: never overwritten) or a
       path of `taken` (path -> what it is, e.g. "the restored image of a.png"), and an output already
       given to another request (the first in path order keeps it).
    """
    count = len(requests)
    own = [name_key(r.input) if r.input != STDIO else None for r in requests]
    inputs = Counter(key for key in own if key is not None)
    others = {name_key(path): what for path, what in (taken or {}).items()}

    def foreign(i: int, key: str) -> bool:  # another input's path, or one of `taken`
        return inputs[key] > (key == own[i]) or key in others

    def named(i: int, decoration: str) -> str:
        request = requests[i]
        return str(Path(request.folder) / output_name(request.name, decoration + suffix, fmt))

    order = sorted(range(count), key=lambda i: (os.path.abspath(requests[i].input), i))
    tags = [_extension_tag(r.name) for r in requests]
    names = [named(i, "") for i in range(count)]
    stems = [name_key(Path(r.folder) / _stem(r.name)) for r in requests]
    shared_stems = Counter(stems)
    tagged = {i for i in range(count) if shared_stems[stems[i]] > 1 or foreign(i, name_key(names[i]))}  # step 2
    for i in tagged:
        names[i] = named(i, tags[i])
    keys = [name_key(name) for name in names]
    shared = Counter(keys)
    groups: dict[str, list[int]] = defaultdict(list)  # step 3
    for i in order:
        if i in tagged and (shared[keys[i]] > 1 or foreign(i, keys[i])):
            groups[keys[i]].append(i)
    for members in groups.values():
        for number, i in enumerate(members, 1):
            names[i] = named(i, f"{tags[i]}-{number}")

    results: dict[int, Named] = {}  # step 4
    owner: dict[str, str] = {}
    for i in order:
        output, key = names[i], name_key(names[i])
        if key in inputs:
            results[i] = Named(output, f"{output}: is an input; refusing to overwrite it (choose another -o or --suffix)")
        elif key in others:
            results[i] = Named(output, f"{output}: would overwrite {others[key]}; choose another folder")
        elif key in owner:
            results[i] = Named(output, f"{output}: is also the output of {owner[key]}, even with the source extension "
                                       "and a number in the name; rename one of them or restore them in separate runs")
        else:
            owner[key] = requests[i].input
            results[i] = Named(output)
    return [results[i] for i in range(count)]


def _stem(name: str) -> str:
    return "stdin" if name == STDIO else PurePath(name).stem


def _extension_tag(name: str) -> str:
    """`IMG_0001.JPG` -> `_JPG`; no extension (or stdin) -> ``."""
    extension = PurePath(name).suffix[1:] if name != STDIO else ""
    return f"_{extension}" if extension else ""


def same_files(inputs: Sequence[str]) -> dict[int, str]:
    """Inputs that are the same file as another one (a path given twice, a hard or symbolic link): the
    index of each but one, with the line saying so. The one kept is not a symbolic link if one of them
    is not, and the first in path order among those (so the set of inputs decides, not their order)."""
    first: dict[object, str] = {}
    given: set[str] = set()
    repeated = {}
    for i in sorted(range(len(inputs)), key=lambda i: (os.path.islink(inputs[i]), os.path.abspath(inputs[i]), i)):
        path = inputs[i]
        if path == STDIO:
            continue
        identity = _file_id(path) or os.path.abspath(path)
        if os.path.abspath(path) in given:
            repeated[i] = f"{path}: given more than once; it is restored once"
        elif identity in first:
            repeated[i] = f"{path}: the same file as {first[identity]} (a link); it is restored once, as that one"
        else:
            first[identity] = path
        given.add(os.path.abspath(path))
    return repeated


def check_naming_options(suffix: str, fmt: str | None) -> None:
    if fmt is not None and fmt.lower() not in FORMAT_EXTENSIONS:
        raise UsageError(f"`--format` must be png, jpg, webp or tif; got {fmt!r}")
    if os.sep in suffix or "/" in suffix:
        raise UsageError(f"`--suffix` must not contain a path separator; got {suffix!r}")


# -- restore batch -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One image to restore: read `input`, write `output` ("-": stdout)."""

    input: str
    output: str
    make_folders: bool = True  # create the output's folder when missing
    guidance_map: str | None = None  # where --save-guidance-map writes this image's map
    caption: str | None = None  # this image's caption from a captions file (None: the pipeline's captioner)
    caption_source: str | None = None  # the captions file it came from


Entry = Union[Job, FileResult]


def plan_batch(
    sources: Sequence[Source],
    outdir: str | os.PathLike,
    *,
    suffix: str = DEFAULT_SUFFIX,
    fmt: str | None = None,
    overwrite: bool = False,
) -> list[Entry]:
    """A Job per source, in order, or the FileResult that settles it without running: `skipped` when its
    output exists (and not `overwrite`); `failed` when it is the same file as another source, or when its
    output would replace an input (never allowed) or cannot be told apart from another's."""
    check_naming_options(suffix, fmt)
    repeated = same_files([s.path for s in sources])
    kept = [i for i in range(len(sources)) if i not in repeated]
    requests = [NameRequest(sources[i].path, Path(outdir) / sources[i].relative.parent, sources[i].relative.name)
                for i in kept]
    named = dict(zip(kept, unique_outputs(requests, suffix=suffix, fmt=fmt,
                                          taken={sources[i].path: "an input" for i in repeated})))
    input_ids = {_file_id(s.path) for s in sources} - {None}
    entries: list[Entry] = []
    for i, source in enumerate(sources):
        if i in repeated:
            entries.append(FileResult(source.path, None, "failed", error=repeated[i]))
            continue
        output, error = named[i].output, named[i].error
        if error is None and os.path.lexists(output) and _file_id(output) in input_ids:
            error = f"{output}: is an input; refusing to overwrite it (choose another -o or --suffix)"  # a link
        if error is not None:
            entries.append(FileResult(source.path, output, "failed", error=error))
        elif os.path.lexists(output) and not overwrite:
            entries.append(FileResult(source.path, output, "skipped"))
        else:
            entries.append(Job(source.path, output))
    return entries


def plan_guidance_maps(entries: Sequence[Entry], outdir: str | os.PathLike, map_dir: str | os.PathLike
                       ) -> tuple[list[Entry], dict[str, str]]:
    """`restore batch --save-guidance-map DIR`: each Job's map at DIR/<its output's subfolder>/, named by
    the rule with `_guidance.png` and kept off the restored images. Names come from every entry that
    has an output (so a rerun that skips some finds the same); a Job whose map has no name of its own
    becomes that file's failure. Returns the entries and {input: map path} for the Jobs."""
    with_output = [i for i, e in enumerate(entries) if e.output is not None]
    requests = [NameRequest(entries[i].input, Path(map_dir) / os.path.relpath(Path(entries[i].output).parent, outdir),
                            Path(entries[i].input).name) for i in with_output]
    taken = {entries[i].output: f"the restored image of {entries[i].input}" for i in with_output}
    maps = dict(zip(with_output, unique_outputs(requests, suffix=GUIDANCE_SUFFIX, fmt="png", taken=taken)))
    planned: list[Entry] = []
    paths: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if isinstance(entry, Job) and maps[i].error is not None:
            entry = FileResult(entry.input, entry.output, "failed", error=f"guidance map {maps[i].error}")
        elif isinstance(entry, Job):
            paths[entry.input] = maps[i].output
        planned.append(entry)
    return planned, paths


# -- restore IMAGE... ----------------------------------------------------------------------------------


def plan_outputs(
    inputs: list[str], output: str | None, *, suffix: str = DEFAULT_SUFFIX, fmt: str | None = None
) -> list[OutputPlan]:
    """Map each input to its output path (README "Output files"): beside the input, into `-o DIR/`, to
    `-o FILE` (one input) or stdout (`-o -`, one input). Raises UsageError for impossible combinations;
    an input that gets no output of its own carries the reason in `error`."""
    check_naming_options(suffix, fmt)
    if not inputs:
        raise UsageError("no input images given")
    if inputs.count(STDIO) > 1:
        raise UsageError("`-` (stdin) can be given only once")
    if output == STDIO:
        if len(inputs) != 1:
            raise UsageError(f"-o - takes one input, got {len(inputs)}; use -o DIR")
        return [OutputPlan(inputs[0], STDIO)]
    if output is not None and not is_directory_target(output):
        if len(inputs) != 1:
            raise UsageError(f"-o FILE takes one input, got {len(inputs)}; use -o DIR/")
        if fmt is None and format_of(output) is None:
            raise UsageError(f"cannot tell the image format of {output!r} from its extension; use --format or .png/.jpg/.webp/.tif")
        return [OutputPlan(inputs[0], output)]
    repeated = same_files(inputs)
    kept = [i for i in range(len(inputs)) if i not in repeated]

    def folder(path: str) -> str | Path:
        return output if output is not None else ("." if path == STDIO else Path(path).parent)

    requests = [NameRequest(inputs[i], folder(inputs[i]), inputs[i]) for i in kept]
    named = dict(zip(kept, unique_outputs(requests, suffix=suffix, fmt=fmt, taken={inputs[i]: "an input" for i in repeated})))
    return [OutputPlan(inp, None, repeated[i]) if i in repeated else OutputPlan(inp, named[i].output, named[i].error)
            for i, inp in enumerate(inputs)]


def file_guidance_maps(target: str, plans: Sequence[OutputPlan]) -> dict[str, Named]:
    """`restore IMAGE... --save-guidance-map PATH`: {input: its map}. PATH itself for one input; in a
    folder (an existing one, or PATH ending in `/`) named by the rule with `_guidance.png`, off the
    restored images."""
    if is_directory_target(target):
        planned = [p for p in plans if p.output is not None]
        requests = [NameRequest(p.input, target, p.input) for p in planned]
        maps = unique_outputs(requests, suffix=GUIDANCE_SUFFIX, fmt="png",
                              taken={p.output: f"the restored image of {p.input}" for p in planned if p.output != STDIO})
        return {p.input: m for p, m in zip(planned, maps)}
    if len(plans) != 1:
        raise UsageError(f"--save-guidance-map FILE takes one input, got {len(plans)}; use --save-guidance-map DIR/")
    if format_of(target) is None:
        raise UsageError(f"cannot tell the image format of {target!r} from its extension; use .png/.jpg/.webp/.tif")
    return {plans[0].input: Named(target)}


# -- the output folders ----------------------------------------------------------------------------------


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def output_folders(entries: Iterable[Entry]) -> list[Path]:
    """The folders the jobs write into (where a killed run may have left temp files)."""
    return sorted({Path(e.output).parent for e in entries if isinstance(e, Job) and e.output != STDIO})


def remove_stale_temp_files(entries: Iterable[Entry]) -> list[Path]:
    """Delete the temp files a killed run left in the folders these jobs write into."""
    from ..images import remove_stale_temp_files as remove_in

    removed = []
    for folder in output_folders(entries):
        if folder.is_dir():
            removed += remove_in(folder)
    return removed


@contextlib.contextmanager
def output_folder_lock(folder: str | os.PathLike):
    """Hold an exclusive lock on `folder` for a run, so that two runs cannot write into one folder and
    delete each other's temp files. It is a `flock` of the folder itself: no lock file is left behind,
    and the kernel drops it when the process dies, even by `kill -9`. Where there is no flock (Windows,
    some network file systems), the run goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetupError(
                f"{os.fspath(folder)}: another `restore batch` is writing into this folder",
                hint="wait for it to finish, or choose another -o",
            ) from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)
