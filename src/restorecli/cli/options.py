"""The restoration options of `restore IMAGE...` and `restore batch DIR`, generated from the settings.

Every leaf of `LoadSettings` and `RestoreSettings` (restorecli.settings) becomes one option: its flag,
help, panel and default come from the field, enumerated settings are real choices (``--help`` lists
them, shell completion completes them). `restore_options` appends them to a command and hands it one
`RunRequest` instead of forty keyword arguments; `load_options` appends only the `LoadSettings` ones
(`restore ui`). The flag names are a contract (the reference CLI cases call them): add settings
freely, never rename a flag.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import typer

from ..errors import UsageError
from ..settings import LoadSettings, RestoreSettings, SettingError, default_settings, leaves
from ..settings.spec import FACES, GUIDANCE, HARDWARE, MODEL, SAMPLING

LOAD_LEAVES = leaves(LoadSettings)
RUN_LEAVES = leaves(RestoreSettings)
#: --help shows the panels in this order (each panel's options in declaration order)
PANELS = (MODEL, SAMPLING, GUIDANCE, FACES, HARDWARE)
#: flat setting name -> its CLI flag
FLAG_OF = {leaf.name: leaf.flag for leaf in LOAD_LEAVES + RUN_LEAVES}


@dataclass(frozen=True)
class RunRequest:
    """What the restoration flags asked for: how to load the pipeline, and the settings of every image
    (the version's and task's defaults with the flags that were given)."""

    load: LoadSettings = field(default_factory=LoadSettings)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> RestoreSettings:
        return default_settings(self.load.version, self.load.task).replace(**self.overrides)


def cli_wording(text: str) -> str:
    """A library message in the CLI's words: every backticked setting name becomes its flag
    (`steps` -> `--steps`, `restoration_guidance` -> `--guidance`)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: f"`{FLAG_OF[m.group(1)]}`" if m.group(1) in FLAG_OF else m.group(0),
                  text)


def _value_type(leaf) -> Any:
    kind = leaf.type
    if typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if leaf.spec.choices is not None:
        return leaf.spec.choices
    if leaf.spec.parse is not None:
        return str
    return kind


def _help(leaf) -> str:
    text = leaf.spec.help
    if leaf.spec.choices is not None and leaf.spec.choices.__name__ == "Sampler":
        text += " One of: " + ", ".join(leaf.spec.choices.values()) + "."
    default = leaf.spec.default_text
    if default is None and leaf.default is not None and leaf.default is not False:
        default = leaf.default.value if hasattr(leaf.default, "value") else leaf.default
        if isinstance(default, float) and default.is_integer():
            default = int(default)
    return f"{text} [default: {default}]" if default is not None else text


def _parameter(leaf) -> inspect.Parameter:
    option = typer.Option(
        *leaf.spec.flags, help=_help(leaf), rich_help_panel=leaf.spec.panel, show_default=False,
        envvar=leaf.spec.envvar, metavar=leaf.spec.metavar,
    )
    annotation = Annotated[Optional[_value_type(leaf)], option]
    return inspect.Parameter(leaf.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None)


def _given(leaf, value) -> Any:
    if hasattr(value, "value") and leaf.spec.choices is not None:
        value = value.value
    if leaf.spec.parse is not None and isinstance(value, str):
        value = leaf.spec.parse(value)
    return value


def request_from_flags(values: dict[str, Any]) -> RunRequest:
    """The RunRequest of parsed flag values ({flat name: value or None}); bad values are UsageErrors
    worded with the flags."""
    try:
        load = LoadSettings(**{leaf.name: _given(leaf, values[leaf.name]) for leaf in LOAD_LEAVES
                               if values.get(leaf.name) is not None})
        overrides = {leaf.name: _given(leaf, values[leaf.name]) for leaf in RUN_LEAVES
                     if values.get(leaf.name) is not None}
        request = RunRequest(load, overrides)
        request.settings  # validate now, before any model loads
    except SettingError as exc:
        raise UsageError(cli_wording(str(exc))) from None
    return request


def restore_options(command):
    """Append one option per setting to `command`'s signature; call it with `request=RunRequest(...)`."""
    return _with_setting_options(command, LOAD_LEAVES + RUN_LEAVES, "request", request_from_flags)


def load_options(command):
    """Append one option per `LoadSettings` leaf (model, task, cleaner, weights, hardware) to `command`'s
    signature; call it with `load=LoadSettings(...)`. For commands that load a pipeline and take the
    per-image settings elsewhere (`restore ui` takes them from its form)."""
    return _with_setting_options(command, LOAD_LEAVES, "load", lambda values: request_from_flags(values).load)


def _with_setting_options(command, setting_leaves, keyword: str, build):
    """`command` with one keyword-only option per leaf after its own parameters; the wrapper collects
    their values ({flat name: value or None}) and passes `build(values)` as `keyword`."""
    own = inspect.signature(command, eval_str=True)
    own_params = [p for name, p in own.parameters.items() if name != keyword]
    own_params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind != p.KEYWORD_ONLY else p for p in own_params]
    ordered = sorted(setting_leaves, key=lambda leaf: PANELS.index(leaf.spec.panel))
    extra = [_parameter(leaf) for leaf in ordered]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {leaf.name: kwargs.pop(leaf.name) for leaf in setting_leaves}
        return command(**{keyword: build(values)}, **kwargs)

    del wrapper.__wrapped__
    wrapper.__signature__ = own.replace(parameters=own_params + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own_params + extra}
    return wrapper
