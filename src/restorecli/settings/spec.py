"""How a setting is declared: one dataclass field carries its default, its help, its CLI flag and panel.

`setting(...)` makes such a field; `leaves(cls)` walks a settings tree and returns every leaf with its
flat name (the keyword of `DiffBIRPipeline.__call__` overrides, unique across the tree) and its path
(``("sampler", "steps")``). The CLI generates its options from the leaves, so a new setting is one
field here and appears everywhere: the library, ``--help``, the web app's form, validation messages.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UsageError

SPEC_KEY = "restorecli.setting"

# --help panels
MODEL = "Model"
SAMPLING = "Sampling"
GUIDANCE = "Restoration guidance"
HARDWARE = "Tiling and hardware"
FACES = "Faces (--task unaligned_face)"


class SettingError(UsageError):
    """A setting with a bad value. `setting` is its flat name; the CLI words the message with the flag."""

    def __init__(self, setting: str, problem: str):
        self.setting = setting
        self.problem = problem
        super().__init__(f"`{setting}` {problem}")


@dataclass(frozen=True)
class SettingSpec:
    help: str
    panel: str
    flags: tuple[str, ...]  # CLI names, long first: ("--model", "-m")
    name: str | None = None  # flat name when it differs from the field name
    choices: type | None = None  # a `choices.Choice` enum: --help lists it, shell completion completes it
    default_text: str | None = None  # --help's "[default: ...]" when the default depends on the model
    parse: Callable[[str], Any] | None = None  # CLI text -> value (e.g. "8GB" -> bytes)
    envvar: str | None = None
    metavar: str | None = None


def setting(default: Any, *, help: str, panel: str, flags: tuple[str, ...] | list[str] | str, **spec: Any):
    """A dataclass field that is a user-facing setting."""
    flags = (flags,) if isinstance(flags, str) else tuple(flags)
    return field(default=default, metadata={SPEC_KEY: SettingSpec(help=help, panel=panel, flags=flags, **spec)})


@dataclass(frozen=True)
class Leaf:
    name: str
    path: tuple[str, ...]
    spec: SettingSpec
    type: Any
    default: Any

    @property
    def flag(self) -> str:
        return self.spec.flags[0]


def leaves(cls: type) -> list[Leaf]:
    """Every setting of the dataclass tree `cls`, depth first, in declaration order."""
    found: list[Leaf] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found += [dataclasses.replace(leaf, path=(f.name, *leaf.path)) for leaf in leaves(kind)]
            continue
        spec = f.metadata.get(SPEC_KEY)
        if spec is None:
            raise TypeError(f"{cls.__name__}.{f.name} is neither a setting nor a settings group")
        found.append(Leaf(spec.name or f.name, (f.name,), spec, kind, f.default))
    return found


# -- checks used by the settings' __post_init__ ------------------------------------------------------


def finite(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingError(name, f"must be a finite number, got {value}")
    return number


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (isinstance(value, float) and not value.is_integer()):
        raise SettingError(name, f"must be a whole number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise SettingError(name, f"must be a whole number, got {value!r}") from None


def one_of(name: str, value, choices: type) -> str:
    allowed = choices.values()
    text = value.value if isinstance(value, choices) else value
    if text not in allowed:
        raise SettingError(name, f"must be one of {', '.join(allowed)}; got {text!r}")
    return text
