"""Tiled model evaluation: the official gaussian-blended sliding-window denoiser.

Official ``diffbir/utils/common.py make_tiled_fn`` wrapped around ``ControlLDM.forward`` by every HEAD
sampler when ``--cldm_tiled`` is on: at EVERY model evaluation each latent window of x_t runs with the
condition latent cropped to the same window (full text embedding), and the outputs (eps or v) are
blended ``sum(w * out) / sum(w)`` with ``gaussian_weights(tile, tile)`` (asymmetric).
Tiling changes neither the schedule nor the noise draws (noise is always drawn on the whole latent).
A condition with per-window text embeddings (``ControlCondition.tile_txt``, per-tile captions) gives
each window's calls its own positive text; the crop is the condition's business, not this loop's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError
from ..windows import gaussian_weights, sliding_windows
from .cfg import Model

__all__ = ["TiledModel", "sampling_windows"]


def sampling_windows(h: int, w: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The latent windows :class:`TiledModel` evaluates on an h x w latent, in its order; none when the
    latent is smaller than a tile (one whole evaluation then)."""
    if h < tile or w < tile:
        return []
    return sliding_windows(h, w, tile, stride)


class TiledModel:
    """``model(x, t, cond)`` evaluated window by window (latent units) and blended.

    ``cond`` must offer ``cond.crop(top, bottom, left, right)`` (the condition latent cropped, and the
    window's own text embedding where the condition has one). Falls back to one whole evaluation when
    the latent is smaller than a tile, as the official pipeline disables tiling then.
    """

    def __init__(self, model: Model, tile: int, stride: int):
        if tile <= 0 or not 0 < stride <= tile:
            raise UsageError(f"latent tile size must be > 0 and stride in (0, tile]; got tile {tile}, stride {stride}")
        self.model = model
        self.tile = tile
        self.stride = stride

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        h, w = x.shape[-2:]
        windows = sampling_windows(h, w, self.tile, self.stride)
        if not windows:
            return self.model(x, t, cond)
        out = torch.zeros_like(x)
        count = torch.zeros_like(x, dtype=torch.float32)
        weights = gaussian_weights(self.tile, self.tile, dtype=x.dtype).to(x.device)
        for top, bottom, left, right in windows:
            tile_out = self.model(x[..., top:bottom, left:right], t, cond.crop(top, bottom, left, right))
            out[..., top:bottom, left:right] += tile_out * weights
            count[..., top:bottom, left:right] += weights
        return out / count
