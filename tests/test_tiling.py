"""Tile geometry and weights against the official helpers' outputs (golden metadata and tensors)."""

import json

import pytest
import torch

from conftest import load_golden
from restorecli.windows import gaussian_weights, sliding_windows


def test_gaussian_weights_match_official(reference_dir):
    golden, _ = load_golden(reference_dir, "tiled")
    assert torch.equal(gaussian_weights(8, 8), golden["gaussian_weights"])


@pytest.mark.parametrize("name, key, h, w, size, stride", [
    ("tiled", "windows", 8, 22, 8, 4),
    ("stage1", "tile_windows", 100, 150, 64, 48),
])
def test_sliding_windows_match_official(reference_dir, name, key, h, w, size, stride):
    _, meta = load_golden(reference_dir, name)
    assert [list(win) for win in sliding_windows(h, w, size, stride)] == json.loads(meta[key])


def test_windows_cover_every_pixel_and_stay_inside():
    h, w, tile, stride = 37, 101, 16, 10
    covered = torch.zeros(h, w, dtype=torch.int32)
    for top, bottom, left, right in sliding_windows(h, w, tile, stride):
        assert bottom - top == tile and right - left == tile
        assert 0 <= top and bottom <= h and 0 <= left and right <= w
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1


def test_gaussian_is_asymmetric_in_y_like_upstream():
    g = gaussian_weights(6, 6)
    assert torch.allclose(g[0, :], g[0, :].flip(0))  # x-centre (W-1)/2: symmetric left-right
    assert not torch.allclose(g[:, 0], g[:, 0].flip(0))  # y-centre H/2: not symmetric top-bottom
