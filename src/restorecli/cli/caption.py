"""`restore caption IMAGE...|DIR`: what the captioner says about each image, and `--captions` for the
restoring commands (your own or edited captions instead of the captioner's).

Parsing and printing only: `restorecli.captions` loads the captioner and reads caption files,
`restorecli.run.loop` finds the images (the same discovery as `restore batch`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError, RestoreError, UsageError, brief
from .terminal import NORMAL, Output, QuietOpt, VerboseOpt, use_verbosity

CAPTIONS_HELP = ("Use these captions instead of running the captioner: a JSON-lines file as `restore caption --json` "
                 "writes it (keyed by input path), or a folder of `<stem>.txt` files. An image without an entry is "
                 "described by the captioner, with a warning.")

CAPTION_HELP = ("This caption for every input instead of running the captioner (\"\" for none); it leads the "
                "positive prompt as a captioner's would. The web app's \"restore again with this caption\" writes it.")

HELP = (
    "Print what the captioner says about each image: one line `IMAGE: CAPTION` per image, or with `--json` one "
    "JSON object per image (`input`, `caption`, `captioner`, `revision`) - the format `--captions` reads back.\n\n"
    "Folders are searched as `restore batch` searches them (`-r`, `--glob`); a bad file is reported and the "
    "others go on (exit 1 at the end).\n\n"
    "Example: `restore caption scans/ --json > captions.jsonl`, edit it, then "
    "`restore batch scans/ --captions captions.jsonl`"
)


def caption_command(
    inputs: Annotated[list[str], typer.Argument(metavar="IMAGE...|DIR", help="Image files and/or folders.", show_default=False)],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Include the subfolders of folders.")] = False,
    glob: Annotated[Optional[str], typer.Option("--glob", help="In folders, only files whose name (or, with a `/`, relative path) matches.", show_default=False)] = None,
    captioner: Annotated[str, typer.Option("--captioner", metavar="NAME|DIR|HUB_ID", help="florence2, llava, a model folder or a Hub id of an image-text-to-text model.")] = "florence2",
    llava_bit: Annotated[str, typer.Option("--llava-bit", help="llava's weights: 4, 8 (bitsandbytes on CUDA) or 16 bits.")] = "4",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda (or cuda:N) or mps.")] = "auto",
    weights_dir: Annotated[Optional[str], typer.Option("--weights-dir", envvar="RESTORE_WEIGHTS_DIR", help="Folder of checkpoint files you already have.", show_default=False)] = None,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    out = use_verbosity(quiet, verbose)
    raise typer.Exit(caption_files(inputs, out=out, recursive=recursive, pattern=glob, captioner=captioner,
                                   llava_bit=llava_bit, device=device, weights_dir=weights_dir, json_lines=json_lines))


def caption_files(inputs: list[str], *, out: Output, recursive: bool = False, pattern: str | None = None,
                  captioner: str = "florence2", llava_bit: str = "4", device: str = "auto", weights_dir: str | None = None,
                  json_lines: bool = False) -> int:
    """Caption every image of `inputs`; returns the exit code (0 all captioned, 1 some failed)."""
    from ..captions.loading import check_captioner, load_captioner
    from ..pipeline.precision import resolve_device
    from ..run import loop
    from ..run.steps import read_input

    if check_captioner(captioner, llava_bit) == "none":
        raise UsageError("`restore caption` needs a captioner; `--captioner none` describes nothing")
    paths, failures = _images(inputs, recursive=recursive, pattern=pattern)
    if not paths and not failures:
        out.warning(f"no images found in {', '.join(inputs)}")
        return 0
    start = time.perf_counter()
    out.detail(f"loading the {captioner} captioner...")
    model = load_captioner(captioner, device=resolve_device(device), llava_bit=llava_bit, weights_dir=weights_dir)
    ok = 0
    for failure in failures:
        _report_failure(out, failure.input, failure.error, json_lines)
    with model.held():
        for path in paths:
            try:
                text = model.caption(read_input(path).rgb)
            except InputError as exc:
                _report_failure(out, path, loop._with_plugin_hint(path, exc), json_lines)
                continue
            except RestoreError:
                raise
            except Exception as exc:  # noqa: BLE001 - one image's failure must not end the run
                _report_failure(out, path, f"{path}: captioning failed ({brief(exc)})", json_lines)
                continue
            ok += 1
            if json_lines:
                out.json_line({"input": path, "caption": text, "captioner": model.name, "revision": model.revision})
            else:
                out.result(f"{path}: {text}")
    failed = len(paths) + len(failures) - ok
    if out.level >= NORMAL:
        out.info(f"{ok} captioned, {failed} failed in {time.perf_counter() - start:.1f} s ({model.name})")
    return 1 if failed else 0


def _images(inputs: list[str], *, recursive: bool, pattern: str | None):
    """Files as given, folders searched like `restore batch` (sorted, images only); listing failures."""
    from ..run import discovery

    paths, failures = [], []
    for item in inputs:
        if item != "-" and Path(item).is_dir():
            found = discovery.discover(item, recursive=recursive, pattern=pattern)
            paths += [s.path for s in found.sources]
            failures += found.failures
        else:
            paths.append(item)
    return paths, failures


def _report_failure(out: Output, path: str, error: str, json_lines: bool) -> None:
    out.error(error)
    if json_lines:  # `--captions` skips these: no caption
        out.json_line({"input": path, "caption": None, "error": error})


# -- `--captions FILE|DIR` of `restore` and `restore batch` ---------------------------------------------


def with_captions(entries: list, captions: str | None, *, out: Output, captioner: str,
                  relative: dict[str, str] | None = None) -> list:
    """The jobs of `entries` with their caption from `captions` (read now: a bad file stops the run before
    any image); images without an entry keep None, so the captioner describes them, with one warning."""
    import dataclasses

    from ..captions import read_captions
    from ..run.plan import Job

    if captions is None:
        return entries
    table = read_captions(captions)
    missing: list[str] = []
    result = []
    for entry in entries:
        if isinstance(entry, Job):
            text = table.lookup(entry.input, relative=(relative or {}).get(entry.input))
            if text is None:
                missing.append(entry.input)
            else:
                entry = dataclasses.replace(entry, caption=text, caption_source=os.fspath(captions))
        result.append(entry)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        then = f"the {captioner} captioner describes them" if captioner != "none" else "they get no caption"
        out.warning(f"{captions} has no caption for {len(missing)} of {sum(isinstance(e, Job) for e in entries)} "
                    f"images ({shown}); {then}")
    return result


def with_caption(entries: list, caption: str) -> list:
    """The jobs of `entries` with `caption` (`--caption TEXT`) as every image's caption."""
    import dataclasses

    from ..run.plan import Job

    return [dataclasses.replace(e, caption=caption.strip(), caption_source="--caption") if isinstance(e, Job) else e
            for e in entries]


def load_for(request, entries: list, captions: str | None):
    """The LoadSettings to build the pipeline with: without a captioner when `captions` gave every image
    its caption and no tile needs one (a 14 GB llava is not loaded for nothing)."""
    from ..run.plan import Job

    jobs = [e for e in entries if isinstance(e, Job)]
    if captions is not None and jobs and all(j.caption is not None for j in jobs) and not request.settings.prompts.tile_captions:
        return request.load.replace(captioner="none")
    return request.load


def print_caption(out: Output, result) -> None:
    """`-v`: the caption each restored image was conditioned on."""
    if result.status == "ok" and result.caption is not None:
        source = f" (from {result.caption_source})" if result.caption_source else ""
        out.detail(f"  caption{source}: {result.caption}")


def prompt_record(result, negative_prompt: str) -> dict:
    """One line of `restore batch`'s prompts.jsonl (upstream writes prompt.csv)."""
    return {"input": result.input, "output": result.output, "caption": result.caption, "prompt": result.prompt,
            "negative_prompt": negative_prompt, "captioner": result.caption_source,
            "revision": result.captioner_revision}
