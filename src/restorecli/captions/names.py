"""The `captioner` and `llava_bit` choices, from the settings' one list (kept free of torch)."""

from __future__ import annotations

from ..settings.choices import Captioner, LlavaBit
from ..settings.defaults import HEAD_DEFAULTS

__all__ = ["DEFAULT_CAPTIONER", "LLAVA_BITS", "PINNED_CAPTIONERS"]

#: The default captioner: Florence-2 base (upstream's default is llava; `--captioner llava` reproduces it).
DEFAULT_CAPTIONER = HEAD_DEFAULTS.captioner
#: Captioners pinned in weights.toml (group names there).
PINNED_CAPTIONERS = tuple(name for name in Captioner.values() if name != Captioner.NONE.value)
#: `--llava-bit`: bitsandbytes 4-bit NF4 (upstream's default), 8-bit, or 16-bit weights.
LLAVA_BITS = LlavaBit.values()
