"""`restore weights list|fetch|verify|path`: the pinned checkpoints from the shell.

Parsing and printing only; `restorecli.weights` does the work. Tables and progress go to stderr;
stdout carries only `--json` lines and the paths `restore weights path` prints.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import weights
from ..errors import RestoreError, UsageError, WeightsError
from .terminal import current

weights_app = typer.Typer(
    help="List, download and verify the pinned checkpoints (weights.toml).\n\n"
    "Example: `restore weights fetch --model v2.1` downloads everything v2.1 needs (~6.7 GB).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

WeightsDirOpt = Annotated[
    Optional[str],
    typer.Option(
        "--weights-dir",
        envvar="RESTORE_WEIGHTS_DIR",
        help="Folder of checkpoint files you already have (found by file name, also in subfolders; verified by sha256).",
        show_default=False,
    ),
]
ModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help="The files of one model version: v1, v2 or v2.1.", show_default=False)
]
TaskOpt = Annotated[
    Optional[str],
    typer.Option("--task", help="With `--model`: only one task's files (sr, denoise, face, unaligned_face).", show_default=False),
]
CaptionerOpt = Annotated[
    Optional[str],
    typer.Option("--captioner", help="The files of one pinned captioner: florence2 (the default, ~463 MB) or llava (~14.1 GB).",
                 show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON lines on stdout (one object per file) instead of the table.")]
NamesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Checkpoint names from `restore weights list` (or file names, or `sd2_tokenizer`).", show_default=False),
]

WHERE = {"weights-dir": "weights dir", "hf-cache": "HF cache", "downloads": "downloads", None: "-"}
STATE = {
    "verified": "yes",
    "trusted": "yes (first-use hash)",
    "recorded": "yes (hash recorded)",
    "mismatch": "NO",
    "unchecked": "not yet",
    "missing": "-",
}


def _out():
    return current()


def _select(names: list[str] | None, model: str | None, task: str | None, *, default_all: bool, verb: str,
            captioner: str | None = None) -> list[weights.WeightEntry]:
    if names and model:
        raise UsageError(f"give checkpoint names or `--model`, not both; e.g. `restore weights {verb} --model v2.1`")
    if task and not model:
        raise UsageError(f"`--task` needs `--model`; e.g. `restore weights {verb} --model v2.1 --task {task}`")
    if captioner is not None and captioner not in weights.captioner_names():
        raise UsageError(f"`--captioner {captioner}`: not a pinned captioner; pinned: {', '.join(weights.captioner_names())}",
                         hint="a Hub id or a folder is used as it is, with nothing to fetch here")
    if captioner is not None and names:
        raise UsageError(f"give checkpoint names or `--captioner`, not both; e.g. `restore weights {verb} --captioner {captioner}`")
    extra = weights.registry().expand([captioner]) if captioner else []
    if model:
        return [*weights.files_for(model, task), *extra]
    if extra:
        return extra
    if names:
        return weights.registry().expand(names)
    if default_all:
        return weights.all_entries()
    raise UsageError(
        f"say what to {verb}: checkpoint names, `--model v1|v2|v2.1`, `--captioner florence2|llava`, or `--all`",
        hint="`restore weights list` shows the names",
    )


class _Bars:
    """A rich progress display on stderr, fed by the library's ProgressEvent callbacks."""

    def __init__(self, out):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from .terminal import NORMAL

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=out.err,
            disable=out.level < NORMAL,
        )
        self.tasks: dict[tuple[str, str], object] = {}

    def __call__(self, event: weights.ProgressEvent) -> None:
        key = (event.name, event.phase)
        if key not in self.tasks:
            verb = "downloading" if event.phase == "download" else "verifying"
            self.tasks[key] = self.progress.add_task(f"{verb} {event.name}", total=event.total)
        self.progress.update(self.tasks[key], completed=event.done, total=event.total)

    def __enter__(self) -> "_Bars":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _size_text(entry: weights.WeightEntry) -> str:
    return weights.format_size(entry.download_size, approx=entry.size is None)


def _total_text(entries) -> str:
    total, approx, unknown = weights.download_size(entries)
    text = ("~" if approx else "") + weights.format_size(total)
    return text + (f" + {unknown} file{'s' * (unknown > 1)} of unknown size" if unknown else "")


def _json_row(check: weights.WeightCheck) -> dict:
    e = check.entry
    return {
        "name": e.name,
        "kind": e.kind,
        "description": e.description,
        "file": e.file,
        "repo": e.repo,
        "revision": e.revision,
        "url": e.url,
        "sha256": e.sha256,
        "size": e.size,
        "approx_size": e.approx_size,
        "license": e.license,
        "present": check.path is not None,
        "path": None if check.path is None else str(check.path),
        "location": check.where,
        "state": check.state,
        "verified": check.ok if check.state not in ("missing", "unchecked") else None,
        "detail": check.detail,
    }


@weights_app.command(
    "list",
    help="Show every pinned checkpoint: name, what it is, size, licence, whether it is here and verified.\n\n"
    "Nothing is hashed or downloaded: `verified` shows what earlier runs checked (`restore weights verify` re-checks).\n\n"
    "Examples:\n\n"
    "`restore weights list`\n\n"
    "`restore weights list --model v2.1 --task face`\n\n"
    "`restore weights list --json | jq -r 'select(.present) | .path'`",
)
def list_command(
    model: ModelOpt = None,
    task: TaskOpt = None,
    captioner: CaptionerOpt = None,
    weights_dir: WeightsDirOpt = None,
    json_lines: JsonOpt = False,
) -> None:
    out = _out()
    entries = _select(None, model, task, default_all=True, verb="list", captioner=captioner)
    checks = weights.status([e.name for e in entries], weights_dir=weights_dir)
    if json_lines:
        for check in checks:
            out.json_line(_json_row(check))
        return
    from rich.table import Table

    table = Table(title=f"Pinned checkpoints{f' for {model}' if model else ''}{f' ({task})' if task else ''}", title_justify="left")
    for column in ("name", "what it is", "size", "licence", "present", "verified"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for check in checks:
        e = check.entry
        table.add_row(e.name, e.description, _size_text(e), e.license, WHERE[check.where], STATE[check.state])
    # In a pipe or a log file rich would fold the table into 80 columns; give it the room it needs.
    if out.err.is_terminal:
        out.err.print(table)
    else:
        from rich.console import Console

        Console(file=out.err.file, width=240, highlight=False).print(table)
    if model is None and captioner is None:
        totals = ", ".join(f"{v} {_total_text(weights.files_for(v))}" for v in weights.registry().versions)
        if totals:
            out.info(f"Download per model version (all tasks): {totals}.")
        captioners = ", ".join(f"{c} {_total_text(weights.registry().expand([c]))}" for c in weights.captioner_names())
        if captioners:
            out.info(f"Download per captioner: {captioners}.")
    elif model is None:
        out.info(f"Download for the {captioner} captioner: {_total_text(entries)}.")
    else:
        out.info(f"Download for {model}{f' {task}' if task else ''}: {_total_text(entries)}.")
    fetch = f"--captioner {captioner}" if captioner and not model else "--model VERSION"
    out.info(f"Get them with `restore weights fetch {fetch}`; see where they go with `restore weights path NAME`.")


@weights_app.command(
    "fetch",
    help="Download checkpoints (pinned revision, resumable, sha256-verified) into the Hugging Face cache "
    "(plain-URL files into restorecli's downloads folder). Files already here are only verified.\n\n"
    "Examples:\n\n"
    "`restore weights fetch --model v2.1`               # everything v2.1 needs\n\n"
    "`restore weights fetch --model v2 --task denoise`\n\n"
    "`restore weights fetch v2 sd_v2.1`\n\n"
    "`restore weights fetch --model v2.1 --captioner florence2`   # what `restore photo.png` needs\n\n"
    "`HF_ENDPOINT=https://hf-mirror.com restore weights fetch --all`",
)
def fetch_command(
    names: NamesArg = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    captioner: CaptionerOpt = None,
    all_files: Annotated[bool, typer.Option("--all", help="Every pinned checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Download again even if a copy is here.")] = False,
    weights_dir: WeightsDirOpt = None,
) -> None:
    out = _out()
    if all_files and (names or model or captioner):
        raise UsageError("`--all` takes no names, no `--model` and no `--captioner`")
    entries = _select(names, model, task, default_all=all_files, verb="fetch", captioner=captioner)
    out.detail(f"fetching {len(entries)} files ({_total_text(entries)})")
    done: list[weights.Resolved] = []
    failed: list[RestoreError] = []
    with _Bars(out) as bars:
        for entry in entries:
            try:
                done.append(weights.fetch(entry, weights_dir=weights_dir, progress=bars, force_download=force))
            except WeightsError as exc:
                if len(entries) == 1:
                    raise
                failed.append(exc)
    for exc in failed:
        out.error(str(exc), hint=exc.hint)
    fetched = [r for r in done if r.downloaded]
    summary = f"{len(done)} of {len(entries)} files ready: {len(fetched)} downloaded ({weights.format_size(sum(r.downloaded for r in fetched))}), {len(done) - len(fetched)} already here"
    out.info(summary + (f"; {len(failed)} failed" if failed else ""))
    for r in done:
        out.detail(f"  {r.entry.name}: {r.path} ({r.check.detail if r.check else ''})")
    if failed:
        raise typer.Exit(2)


@weights_app.command(
    "verify",
    help="Re-hash the checkpoints that are here (all, or the ones named) and compare with the pinned sha256, "
    "or with the hash recorded on first use. Exit code 2 if any differs.\n\n"
    "Examples:\n\n"
    "`restore weights verify`\n\n"
    "`restore weights verify v2.1 --weights-dir ~/DiffBIR/weights`",
)
def verify_command(
    names: NamesArg = None,
    model: ModelOpt = None,
    task: TaskOpt = None,
    weights_dir: WeightsDirOpt = None,
    json_lines: JsonOpt = False,
) -> None:
    out = _out()
    entries = _select(names, model, task, default_all=True, verb="verify")
    with _Bars(out) as bars:
        checks = weights.verify([e.name for e in entries], weights_dir=weights_dir, progress=None if json_lines else bars)
    present = [c for c in checks if c.path is not None]
    bad = [c for c in present if not c.ok]
    if json_lines:
        for check in checks:
            out.json_line(_json_row(check))
    else:
        for check in present:
            if check.ok:
                out.info(f"ok  {check.entry.name}: {check.path} ({check.detail})")
        for check in bad:
            out.error(f"{check.entry.name}: {check.path}: {check.detail}", hint=weights.mismatch_hint(check))
        out.info(f"{len(present) - len(bad)} of {len(present)} files here verified; {len(checks) - len(present)} not here")
    if bad:
        raise typer.Exit(2)


@weights_app.command(
    "path",
    help="Print the local path of verified checkpoints on stdout, one per line (for scripts). "
    "Downloads nothing: exit code 2 with a clear line if a file is not here or fails its check.\n\n"
    "Examples:\n\n"
    "`restore weights path v2.1`\n\n"
    "`python convert.py \"$(restore weights path sd_v2.1)\"`",
)
def path_command(
    names: Annotated[list[str], typer.Argument(help="Checkpoint names (or file names, or `sd2_tokenizer`).", show_default=False)],
    weights_dir: WeightsDirOpt = None,
) -> None:
    out = _out()
    entries = weights.registry().expand(names)
    with _Bars(out) as bars:
        paths = [weights.resolve(e.name, weights_dir=weights_dir, download=False, progress=bars) for e in entries]
    for path in paths:
        out.result(str(path))
