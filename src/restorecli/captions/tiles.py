"""Per-tile captions: each tiled-sampling window captioned on its own region of the input.

Upstream conditions every tile of its tiled sampler on the whole-image caption, so tiles grow objects
that belong elsewhere in the picture (DiffBIR issue #138). Here a latent window (top, bottom, left,
right) is mapped back to the input image: latent rows/columns x 8 are pixels of the stage-1 condition
image, which is the input scaled by (cond h / input h, cond w / input w), so the region is the window
scaled back, widened to whole pixels and kept inside the image (padding below/right of the condition
image is dropped). Each distinct region is captioned once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from .base import Captioner
from .images import as_rgb_image
from .prompt import assemble_prompt

__all__ = ["caption_tiles", "tile_boxes", "tile_prompts"]

Window = tuple[int, int, int, int]
Box = tuple[int, int, int, int]  # PIL order: left, upper, right, lower


def tile_boxes(windows: Sequence[Window], *, cond_size: tuple[int, int], input_size: tuple[int, int],
               latent_scale: int = 8) -> dict[Window, Box]:
    """Input-pixel box of each latent window. `cond_size` = (h, w) of the stage-1 condition image
    (unpadded), `input_size` = (h, w) of the image as read."""
    (ch, cw), (ih, iw) = cond_size, input_size
    sy, sx = ih / ch, iw / cw

    def span(start: int, stop: int, cond: int, scale: float, limit: int) -> tuple[int, int]:
        a, b = min(start * latent_scale, cond), min(stop * latent_scale, cond)
        lo = min(max(math.floor(a * scale + 1e-9), 0), limit - 1)
        hi = max(min(math.ceil(b * scale - 1e-9), limit), lo + 1)
        return lo, hi

    out = {}
    for top, bottom, left, right in windows:
        y0, y1 = span(top, bottom, ch, sy, ih)
        x0, x1 = span(left, right, cw, sx, iw)
        out[(top, bottom, left, right)] = (x0, y0, x1, y1)
    return out


def caption_tiles(captioner: Captioner, image, boxes: dict[Window, Box]) -> dict[Window, str]:
    """The caption of each window's region, the model on the device once for all of them."""
    rgb: Image.Image = as_rgb_image(image)
    regions: dict[Box, str] = {}
    with captioner.held():
        for box in boxes.values():
            if box not in regions:
                regions[box] = captioner.caption(rgb.crop(box))
    return {window: regions[box] for window, box in boxes.items()}


def tile_prompts(captioner: Captioner, image, windows: Sequence[Window], *, cond_size: tuple[int, int],
                 prompt: str, latent_scale: int = 8) -> tuple[dict[Window, str], dict[Window, str]]:
    """(caption, positive prompt) of each latent window: its region of `image` (the input as read)
    captioned, then joined with `prompt` as the whole-image caption is."""
    rgb = as_rgb_image(image)
    boxes = tile_boxes(windows, cond_size=cond_size, input_size=(rgb.height, rgb.width), latent_scale=latent_scale)
    captions = caption_tiles(captioner, rgb, boxes)
    return captions, {w: assemble_prompt(c, prompt) for w, c in captions.items()}
