"""The Gradio page of `restore ui`: upload, settings, before/after, downloads (needs `restorecli[ui]`).

The widgets are generated from the settings (`restorecli.webapp.form`): the main settings up front,
every other `RestoreSettings` leaf under "Advanced", their values from the loaded model's defaults.
The Restore button runs `restorecli.webapp.jobs.restore_uploads`, the CLI's per-file steps, through
Gradio's queue with one job at a time for the device (others wait with their position shown); its API
endpoint `/restore` takes the same values by their setting names (`gradio_client`). The caption each
result was conditioned on is shown, editable; "Restore again with this caption" (`/restore_again`)
restores the shown image with the edited text in place of the captioner's, as `--caption` does. Problems with an
upload or a setting, and out-of-memory, come back as one-line `gr.Error` messages; the server goes on.
"""

from __future__ import annotations

import inspect
import os
import random
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls of its own

import gradio as gr  # noqa: E402

from ..errors import InputError, RestoreError  # noqa: E402
from ..settings import SettingError, Task, default_captioner  # noqa: E402
from .form import GUIDANCE_RANGE, MAIN, Field, command_line, field_defaults, fields, form_wording, settings_from_form  # noqa: E402
from .jobs import ImageResult, Models, Outcome, Upload, Workspace, restore_uploads  # noqa: E402

TITLE = "restore: DiffBIR photo restoration"
#: Seeds the "random" button draws from.
SEED_RANGE = 2**31
#: System fonts only: the default theme would fetch web fonts, and the app must work offline.
FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(models: Models, workspace: Workspace, *, stop: threading.Event | None = None) -> gr.Blocks:
    """The page for `models` (loaded or not: the first job loads them), writing into `workspace`."""
    load = models.load
    form = fields()
    by_name = {f.name: f for f in form}
    defaults = field_defaults(models.version, load.task)
    widgets: dict[str, Any] = {}

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"## {TITLE}\n{_describe(models)}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                images = gr.File(label="Images", file_count="multiple", file_types=["image"], height=150,
                                 elem_id="images")
                upload_notes = gr.Markdown(elem_id="upload-notes")
                run = gr.Button("Restore", variant="primary", elem_id="restore")
                with gr.Row():
                    task = gr.Dropdown(list(Task.values()), value=load.task, label="Task", elem_id="task",
                                       info="sr: super-resolution; denoise; face: aligned 512x512 faces.")
                    widgets["upscale"] = _widget(by_name["upscale"], defaults["upscale"])
                captioner_name = default_captioner(load)
                captioner = gr.Dropdown(list(dict.fromkeys([captioner_name, "none"])), value=captioner_name,
                                        label="Captioner", elem_id="captioner",
                                        info="Describes each image; the caption leads the positive prompt. "
                                             "Another model: start `restore ui --captioner NAME`.")
                widgets["restoration_guidance"] = _widget(by_name["restoration_guidance"],
                                                          defaults["restoration_guidance"])
                with gr.Row(equal_height=True):
                    widgets["seed"] = _widget(by_name["seed"], defaults["seed"], info=False)
                    random_seed = gr.Button("random", scale=0, min_width=80, elem_id="random-seed")
                    widgets["steps"] = _widget(by_name["steps"], defaults["steps"], info=False)
                with gr.Row():
                    widgets["sampler"] = _widget(by_name["sampler"], defaults["sampler"], info=False)
                    widgets["cfg"] = _widget(by_name["cfg"], defaults["cfg"], info=False)
                for name in MAIN:
                    if name not in widgets:
                        widgets[name] = _widget(by_name[name], defaults[name])
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    for f in form:
                        if not f.main:
                            widgets[f.name] = _widget(f, defaults[f.name])
            with gr.Column(scale=3, min_width=400, elem_id="restore-results"):
                status = gr.Markdown(label="Status", elem_id="status")
                shown = gr.Dropdown(label="Showing", choices=[], visible=False, interactive=True, elem_id="shown")
                with gr.Tabs():
                    with gr.Tab("Before / after"):
                        compare = gr.ImageSlider(label="Before / after", type="filepath", format="png",
                                                 interactive=False, elem_id="compare")
                    with gr.Tab("Stage 1"):
                        stage1 = gr.Image(label="Stage 1 (degradation removed, before diffusion)", type="filepath",
                                          format="png", interactive=False, elem_id="stage1")
                    with gr.Tab("Guidance map"):
                        guidance_map = gr.Image(
                            label="Restoration guidance weight map (white: fidelity enforced, dark: free detail)",
                            type="filepath", format="png", interactive=False, elem_id="guidance-map")
                download = gr.File(label="Download (the input's format and bit depth; several images: one zip)",
                                   interactive=False, elem_id="download")
                command = gr.Textbox(label="As a command line", interactive=False, buttons=["copy"], lines=2,
                                     elem_id="command")
                caption = gr.Textbox(label="Caption (of the image shown; edit it and restore again)",
                                     interactive=True, lines=2, elem_id="caption")
                again = gr.Button("Restore again with this caption", elem_id="restore-again")
        results = gr.State([])

        names = [f.name for f in form]
        settings_inputs = [task, captioner, *(widgets[name] for name in names)]
        outputs = [compare, stage1, guidance_map, download, command, status, shown, caption, results]
        run.click(_restore_function(models, workspace, names, stop), [images, *settings_inputs], outputs,
                  api_name="restore", concurrency_id="device", concurrency_limit=1, show_progress="full")
        again.click(_restore_function(models, workspace, names, stop, again=True),
                    [images, shown, caption, *settings_inputs], outputs, api_name="restore_again",
                    concurrency_id="device", concurrency_limit=1, show_progress="full")
        random_seed.click(lambda: random.randrange(SEED_RANGE), None, widgets["seed"], queue=False,
                          api_visibility="private")
        task.change(lambda t: models.defaults(t).upscale, task, widgets["upscale"], queue=False,
                    api_visibility="private")
        images.upload(_check_uploads, images, upload_notes, queue=False, api_visibility="private")
        shown.change(_show, [shown, results], [compare, stage1, guidance_map, caption], queue=False,
                     api_visibility="private")
    demo.queue(default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, workspace: Workspace, *, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False) -> str:
    """Start serving `demo` in the background; returns the local URL. `close()` the demo to stop."""
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                show_error=True, allowed_paths=[str(workspace.root)], ssr_mode=False, mcp_server=False,
                theme=gr.themes.Default(**FONTS))
    return demo.local_url


# -- widgets ------------------------------------------------------------------------------------------


def _widget(f: Field, value: Any, *, info: bool = True):
    """The widget of one field, with its help under the label unless `info` is False (the compact boxes
    of a row, whose labels say enough)."""
    common = dict(label=f.label, info=f.info if info else None, elem_id=f"setting-{f.name.replace('_', '-')}")
    if f.kind == "slider":
        low, high, step = GUIDANCE_RANGE
        return gr.Slider(low, high, value=value, step=step, **common)
    if f.kind == "choice":
        return gr.Dropdown(list(f.choices), value=value, **common)
    if f.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if f.kind == "int" and f.optional:  # a text box: empty is a value (automatic), and the API's default
        return gr.Textbox(value="" if value is None else str(value), placeholder="automatic", **common)
    if f.kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if f.kind == "float":
        return gr.Number(value=value, **common)
    if f.kind == "size":
        return gr.Textbox(value=value, placeholder="what the device has free, e.g. 8GB", **common)
    return gr.Textbox(value=value, lines=2 if "prompt" in f.name else 1, **common)


def _describe(models: Models) -> str:
    load = models.load
    model = load.model if load.version != "custom" else Path(load.model).name
    parts = [f"model **{model}**"]
    pipe = models.loaded
    if pipe is not None:
        device = pipe.execution_device
        dtype = getattr(getattr(pipe, "unet", None), "dtype", None)
        parts.append(f"device **{device}**" + (f", {str(dtype).removeprefix('torch.')}" if dtype is not None else ""))
    else:
        parts.append(f"device **{load.device}**")
    return " · ".join(parts) + ". One job at a time; others wait their turn."


# -- events -------------------------------------------------------------------------------------------


def _restore_function(models: Models, workspace: Workspace, names: list[str], stop: threading.Event | None, *,
                      again: bool = False):
    """The Restore button's function (with `again`: the "restore again with this caption" button's, which
    also takes the shown image's name and the edited caption), with a signature that names its inputs
    after the settings (the API's parameter names)."""

    def restore(*args):
        *values, progress = args
        if again:
            images, shown, caption, task, captioner, *setting_values = values
            images = _only(images, shown)
        else:
            (images, task, captioner, *setting_values), caption = values, None
        return _restore(models, workspace, images, task, captioner, caption, dict(zip(names, setting_values)),
                        progress, stop)

    leading = ("images", "shown", "caption") if again else ("images",)
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                  for name in (*leading, "task", "captioner", *names)]
    parameters.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    restore.__signature__ = inspect.Signature(parameters)
    return restore


def _only(images, shown: str | None) -> list:
    """The upload named `shown` (the image on display), or the only upload."""
    paths = [] if not images else [images] if isinstance(images, str) else list(images)
    if len(paths) > 1:
        paths = [p for p in paths if Path(p).name == shown][:1]
        if not paths:
            raise _error(f"{shown or 'the shown image'} is no longer among the uploads; restore it first.")
    return paths


def _restore(models: Models, workspace: Workspace, images, task: str, captioner: str | None, caption: str | None,
             values: dict[str, Any], progress, stop: threading.Event | None):
    if not images:
        raise _error("Add one or more images first.")
    paths = [images] if isinstance(images, str) else list(images)
    uploads = [Upload(path, Path(path).name) for path in dict.fromkeys(paths)]
    loaded_captioner = default_captioner(models.load)
    if captioner not in (None, "", loaded_captioner, "none"):
        raise _error(f'Captioner "{captioner}" is not loaded: start `restore ui --captioner {captioner}` for it.')
    try:
        load = models.load.replace(task=task)
        if captioner == "none":
            load = load.replace(captioner="none")
        settings = settings_from_form(models.version, load.task, values)
    except SettingError as exc:
        raise _error(form_wording(exc)) from None
    # no captioner: every image's caption is empty, which is what `--captioner none` conditions on
    captions = [caption] * len(uploads) if caption is not None else [""] * len(uploads) if captioner == "none" else None

    def report(text: str, done: int | None, total: int | None) -> None:
        progress((done or 0, total), desc=text, unit="steps")

    try:
        outcome = restore_uploads(models, uploads, load.task, settings, workspace.new_job(), captions=captions,
                                  progress=report, stop=stop)
    except RestoreError as exc:
        raise _error(form_wording(str(exc))) from None
    if not outcome.ok:
        raise _error("; ".join(r.error or r.name for r in outcome.failed))
    for failure in outcome.failed:
        gr.Warning(failure.error, duration=None)
    first = outcome.ok[0]
    choices = [r.name for r in outcome.ok]
    return (
        *_views(first),
        outcome.download,
        command_line([u.name for u in uploads], load, settings, caption=caption),
        _status(outcome),
        gr.update(choices=choices, value=first.name, visible=len(choices) > 1),
        first.caption or "",
        [_as_state(r) for r in outcome.ok],
    )


def _error(message: str) -> gr.Error:
    return gr.Error(message, print_exception=False)


def _views(result: ImageResult | dict) -> tuple:
    r = result if isinstance(result, dict) else _as_state(result)
    compare = (r["before"], r["after"]) if r["before"] and r["after"] else None
    return compare, r["stage1"], r["guidance_map"]


def _as_state(result: ImageResult) -> dict:
    return {"name": result.name, "before": result.before, "after": result.after, "stage1": result.stage1,
            "guidance_map": result.guidance_map, "caption": result.caption}


def _show(name: str, results: list[dict]):
    for r in results or []:
        if r["name"] == name:
            return (*_views(r), r.get("caption") or "")
    return gr.update(), gr.update(), gr.update(), gr.update()


def _status(outcome: Outcome) -> str:
    lines = []
    for r in outcome.results:
        if r.status == "ok":
            lines.append(f"- **{r.name}** → `{Path(r.output).name}` ({r.width}×{r.height}, {r.seconds:.1f} s)")
            if r.prompt:
                lines.append(f"    - prompt: *{r.prompt}*")
        else:
            lines.append(f"- **{r.name}**: failed: {r.error}")
    return "\n".join(lines)


def _check_uploads(images) -> str:
    """Say at once which uploads are not images (the Restore button would fail them too)."""
    from ..images import probe

    notes = []
    for path in [images] if isinstance(images, str) else list(images or []):
        try:
            probe(path)
        except InputError as exc:
            notes.append(f"{Path(path).name}: {exc.reason}")
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not break the page
            notes.append(f"{Path(path).name}: cannot read ({type(exc).__name__})")
    for note in notes:
        gr.Warning(note)
    return "\n".join(f"- {note}" for note in notes)
