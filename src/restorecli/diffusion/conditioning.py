"""The conditioning object the samplers pass through to the model: text embedding, condition latent, strength.

Samplers treat it as opaque except for two operations: ``cat`` (cond + uncond in one batched model
call for CFG) and ``crop`` (tiled sampling crops the condition latent to each window). Upstream's tiled
denoiser (DiffBIR ``diffbir/utils/common.py make_tiled_fn``) keeps the whole-image text embedding for
every window; a condition built with ``tile_txt`` instead gives each latent window its own positive
text embedding (per-tile captions), computed before sampling, while the uncond side and CFG stay as
they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

__all__ = ["ControlCondition", "ControlledModel", "Window"]

#: A latent window (top, bottom, left, right), as `restorecli.windows.sliding_windows` yields them.
Window = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class ControlCondition:
    """One IRControlNet conditioning: ``c_txt`` (B, 77, D), ``c_img`` (B, 4, h, w), control strength.

    The uncond branch uses the negative-prompt embedding and the SAME ``c_img``.
    ``tile_txt`` (optional): the text embedding of each latent window of tiled sampling, used instead of
    ``c_txt`` when the tiled denoiser crops to that window; a window it does not list is an error (the
    tiles were planned for other windows). Untiled calls, and tiling that falls back to one whole call
    on a small latent, use ``c_txt``.
    """

    c_txt: torch.Tensor
    c_img: torch.Tensor
    control_scale: float = 1.0
    tile_txt: Mapping[Window, torch.Tensor] | None = None

    def text_for(self, window: Window) -> torch.Tensor:
        """The text embedding the model sees in `window`."""
        if self.tile_txt is None:
            return self.c_txt
        try:
            return self.tile_txt[tuple(window)]
        except KeyError:
            raise ValueError(f"no tile text embedding for latent window {tuple(window)}; "
                             f"the condition has {len(self.tile_txt)} windows") from None

    def with_tile_text(self, tile_txt: Mapping[Window, torch.Tensor] | None) -> "ControlCondition":
        """This condition with its own text embedding per latent window (None: the whole-image one everywhere)."""
        return replace(self, tile_txt=None if tile_txt is None else {tuple(w): t for w, t in tile_txt.items()})

    def cat(self, other: "ControlCondition") -> "ControlCondition":
        if other.control_scale != self.control_scale:
            raise ValueError("cannot batch conditions with different control strengths")
        c_txt, c_img = torch.cat([self.c_txt, other.c_txt]), torch.cat([self.c_img, other.c_img])
        tile_txt = None
        if self.tile_txt is not None or other.tile_txt is not None:
            windows = dict.fromkeys([*(self.tile_txt or {}), *(other.tile_txt or {})])
            tile_txt = {w: torch.cat([self.text_for(w), other.text_for(w)]) for w in windows}
        return ControlCondition(c_txt, c_img, self.control_scale, tile_txt)

    def crop(self, top: int, bottom: int, left: int, right: int) -> "ControlCondition":
        window = (top, bottom, left, right)
        return ControlCondition(self.text_for(window), self.c_img[..., top:bottom, left:right], self.control_scale)


class ControlledModel:
    """``model(x_t, t, cond)`` over a network called as ``net(x_t, t, c_txt, c_img, control_scale)``.

    Adapts :class:`restorecli.models.cldm.ControlledUNet` (ControlLDM.forward) to the samplers' interface.
    """

    def __init__(self, net):
        self.net = net

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: ControlCondition) -> torch.Tensor:
        return self.net(x_t, t, cond.c_txt, cond.c_img, cond.control_scale)
