"""The web app's form, generated from the settings: one field per `RestoreSettings` leaf.

Each leaf of `restorecli.settings.leaves(RestoreSettings)` becomes one `Field` whose kind follows its
declaration (choices -> a dropdown, bool -> a checkbox, int / float -> a number box, a setting parsed
from text such as `max_memory` -> a text box, str -> a text area); its label comes from the flat name,
its help from the setting. The main settings (`MAIN`) go up front, every other leaf under "Advanced".
Values come from `default_settings(version, task)` of the loaded model, the one defaults table, and
go back through `RestoreSettings.replace`, so the settings' own checks apply. `command_line` writes
the `restore ...` invocation that reproduces a result (only what differs from the defaults).

Nothing here imports Gradio: `restorecli.webapp.app` turns the fields into widgets.
"""

from __future__ import annotations

import re
import shlex
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..settings import LoadSettings, RestoreSettings, SettingError, default_settings, flat_settings, leaves
from ..settings.spec import Leaf

#: The settings shown up front, in this order (the task and the captioner, load settings, come with them
#: on the page); every other leaf of RestoreSettings goes under "Advanced".
MAIN = ("upscale", "restoration_guidance", "seed", "steps", "sampler", "cfg", "prompt", "negative_prompt")
#: The restoration-guidance slider: (minimum, maximum, step) of the official scale (README
#: "Restoration guidance"; 0 = off, about 0.5 typical).
GUIDANCE_RANGE = (0.0, 2.0, 0.05)
#: Labels where the flat name alone reads poorly.
LABELS = {
    "cfg": "CFG scale",
    "restoration_guidance": "Restoration guidance",
    "stage1_only": "Stage 1 only",
    "s_churn": "S churn", "s_tmin": "S tmin", "s_tmax": "S tmax", "s_noise": "S noise",
    "noise_aug": "Noise augmentation",
    "max_memory": "Max memory",
}
#: The help under the restoration-guidance slider (README "Restoration guidance").
GUIDANCE_HELP = ("Pulls every sampling step toward the stage-1 image: 0 = off (the most generated detail), higher "
                 "= closer to the input (fidelity over realness), about 0.5 is typical. Region-adaptive with the "
                 "w_mse loss: strong in flat areas, weak on edges and texture. Not the CFG scale.")


@dataclass(frozen=True)
class Field:
    """One setting of the form."""

    leaf: Leaf
    kind: str  # choice | bool | int | float | text | size | slider
    optional: bool  # None is a value (automatic tiles, no memory cap): an empty box means it

    @property
    def name(self) -> str:
        return self.leaf.name

    @property
    def label(self) -> str:
        return LABELS.get(self.name) or self.name.replace("_", " ").capitalize()

    @property
    def info(self) -> str:
        return GUIDANCE_HELP if self.name == "restoration_guidance" else self.leaf.spec.help

    @property
    def choices(self) -> tuple[str, ...]:
        return self.leaf.spec.choices.values() if self.leaf.spec.choices is not None else ()

    @property
    def main(self) -> bool:
        return self.name in MAIN

    def shown(self, value: Any) -> Any:
        """A setting's value as its widget shows it (sizes as text, e.g. 8GB)."""
        if self.kind == "size":
            return "" if value is None else size_text(value)
        if self.optional:
            return "" if value is None else str(value)
        return value

    def parse(self, raw: Any) -> Any:
        """A widget's value as a setting value; None = not given (the default applies). Numbers that
        arrive as floats (JSON) become ints where the setting is an int; the settings check the rest."""
        if raw is None or (isinstance(raw, str) and not raw.strip() and (self.kind != "text" or self.optional)):
            return None  # (an empty prompt is a value; an empty optional text, e.g. `save_faces`, is not given)
        if self.kind == "int" and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str) and self.kind in ("size", "int", "float"):
            return raw.strip()  # the settings parse and check the text
        return raw


def _kind(leaf: Leaf) -> tuple[str, bool]:
    kind = leaf.type
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if leaf.name == "restoration_guidance":
        return "slider", optional
    if leaf.spec.choices is not None:
        return "choice", optional
    if leaf.spec.parse is not None:
        return "size", optional
    if kind is bool:
        return "bool", optional
    if kind is int:
        return "int", optional
    if kind is float:
        return "float", optional
    return "text", optional


def fields() -> list[Field]:
    """Every RestoreSettings leaf as a field: the main ones in `MAIN` order, then the others in
    declaration order."""
    all_fields = [Field(leaf, *_kind(leaf)) for leaf in leaves(RestoreSettings)]
    by_name = {f.name: f for f in all_fields}
    return [by_name[name] for name in MAIN] + [f for f in all_fields if not f.main]


def field_defaults(version: str, task: str) -> dict[str, Any]:
    """{flat name: widget value} of the defaults of `version` (v1, v2, v2.1, custom) and `task`."""
    defaults = flat_settings(default_settings(version, task))
    return {f.name: f.shown(defaults[f.name]) for f in fields()}


def settings_from_form(version: str, task: str, values: dict[str, Any]) -> RestoreSettings:
    """The settings of the form's values ({flat name: widget value}), on the defaults of `version` and
    `task`. A bad value raises `SettingError` (word it for the page with `form_wording`)."""
    by_name = {f.name: f for f in fields()}
    overrides = {}
    for name, raw in values.items():
        value = by_name[name].parse(raw)
        if value is not None:
            overrides[name] = value
    return default_settings(version, task).replace(**overrides)


def form_wording(error: SettingError | str) -> str:
    """A settings message in the page's words: `steps` -> "Steps", `restoration_guidance` -> "Restoration
    guidance" (the labels of the fields)."""
    labels = {f.name: f.label for f in fields()}
    labels["task"] = "Task"
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: f'"{labels[m.group(1)]}"' if m.group(1) in labels else m.group(0),
                  str(error))


# -- the equivalent command line -----------------------------------------------------------------------


def size_text(size: int) -> str:
    """Bytes as the shortest exact `max_memory` text: 8589934592 -> 8GB (powers of 1024, as parse_size)."""
    for power, unit in ((4, "TB"), (3, "GB"), (2, "MB"), (1, "KB")):
        if size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def _argument(leaf: Leaf, value: Any) -> list[str]:
    flag = leaf.flag
    if isinstance(value, bool):
        return [flag] if value else [f"{flag[:2]}no-{flag[2:]}"]
    if leaf.spec.parse is not None and isinstance(value, int):
        return [flag, size_text(value)]
    if isinstance(value, float):
        return [flag, str(int(value)) if value.is_integer() else repr(value)]
    return [flag, str(value)]


def command_line(inputs: Sequence[str], load: LoadSettings, settings: RestoreSettings,
                 caption: str | None = None) -> str:
    """The `restore` invocation that gives the same result: the inputs, then the load settings and the
    restoration settings that differ from their defaults (those of `load`'s version and task), each
    with its flag, then `--caption` when the page's own caption replaced the captioner's; quoted for a
    POSIX shell."""
    words = ["restore", *inputs]
    words += _differences(leaves(LoadSettings), flat_settings(load), flat_settings(LoadSettings()))
    defaults = flat_settings(default_settings(load.version, load.task))
    words += _differences(leaves(RestoreSettings), flat_settings(settings), defaults)
    if caption is not None:
        words += ["--caption", caption]
    return shlex.join(words)


def _differences(all_leaves: Iterable[Leaf], values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    words: list[str] = []
    for leaf in all_leaves:
        value = values[leaf.name]
        if value != defaults[leaf.name] and value is not None:
            words += _argument(leaf, value)
    return words
