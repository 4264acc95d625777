"""Tiled model evaluation: the official gaussian-blended sliding-window denoiser .

Official ``diffbir/utils/common.py make_tiled_fn`` wrapped around ``ControlLDM.forward`` by every HEAD
sampler when ``--cldm_tiled`` is on: at EVERY model evaluation each latent window of x_t runs with the
condition latent cropped to the same window (full text embedding), and the outputs (eps or v) are
blended ``sum(w * out) / sum(w)`` with ``gaussian_weights(tile, tile)`` (asymmetric).
Tiling changes neither the schedule nor the noise draws (noise is always drawn on the whole latent).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError
from ..windows import gaussian_weights, sliding_windows
from .cfg import Model

__all__ = ["TiledModel"]


class TiledModel:
    """``model(x, t, cond)`` evaluated window by window (latent units) and blended.

    ``cond`` must offer ``cond.crop(top, bottom, left, right)`` (the condition latent cropped, text
    unchanged). Falls back to one whole evaluation when the latent is smaller than a tile, as the
    official pipeline disables tiling then.
    """

    def __init__(self, model: Model, tile: int, stride: int):
        if tile <= 0 or not 0 < stride <= tile:
            raise UsageError(f"latent tile size must be > 0 and stride in (0, tile]; got tile {tile}, stride {stride}")
        self.model = model
        self.tile = tile
        self.stride = stride

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < self.tile or w < self.tile:
            return self.model(x, t, cond)
        out = torch.zeros_like(x)
        count = torch.zeros_like(x, dtype=torch.float32)
        weights = gaussian_weights(self.tile, self.tile, dtype=x.dtype).to(x.device)
        for top, bottom, left, right in sliding_windows(h, w, self.tile, self.stride):
            tile_out = self.model(x[..., top:bottom, left:right], t, cond.crop(top, bottom, left, right))
            out[..., top:bottom, left:right] += tile_out * weights
            count[..., top:bottom, left:right] += weights
        return out / count
