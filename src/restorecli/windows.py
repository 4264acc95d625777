"""Sliding windows and gaussian tile weights, shared by tiled stage 1 and tiled sampling.

The official helpers (DiffBIR utils/common.py `sliding_windows`, `gaussian_weights`)
define the published tiled results, quirks included, so they are matched exactly here.
"""

from __future__ import annotations

import math

import torch


def sliding_windows(h: int, w: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Row-major (top, bottom, left, right) windows of exactly tile x tile; the last one snaps to the border.

    Rows start at range(0, h - tile + 1, stride), plus h - tile when the stride does not land on it;
    columns likewise. Requires h, w >= tile.
    """
    if h < tile or w < tile:
        raise ValueError(f"sliding_windows needs h, w >= tile; got {h}x{w}, tile {tile}")

    def starts(n: int) -> list[int]:
        s = list(range(0, n - tile + 1, stride))
        if (n - tile) % stride != 0:
            s.append(n - tile)
        return s

    return [(top, top + tile, left, left + tile) for top in starts(h) for left in starts(w)]


def gaussian_weights(tile_width: int, tile_height: int, dtype=torch.float32) -> torch.Tensor:
    """(H, W) blending weights, variance 0.01 of the tile size (official gaussian_weights, from CCSR).

    x is centred at (W - 1) / 2 but y at H / 2: the asymmetry is upstream's and is kept because the
    official tiled results depend on it.
    """
    var = 0.01

    def profile(n: int, mid: float) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)

    x_w = profile(tile_width, (tile_width - 1) / 2)
    y_w = profile(tile_height, tile_height / 2)
    return torch.outer(y_w, x_w).to(dtype)
