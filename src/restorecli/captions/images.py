"""Images as the captioners get them: 8-bit RGB PIL images, LLaVA's square padding, tile crops.

``expand2square`` is upstream LLaVA's (``llava/mm_utils.py``, used by ``process_images`` when
``image_aspect_ratio == "pad"``, as for LLaVA-1.5): the image pasted centred (offset rounded down)
on a square canvas of the image processor's mean colour, ``tuple(int(x * 255) for x in image_mean)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["as_rgb_image", "expand2square", "mean_colour"]


def as_rgb_image(image) -> Image.Image:
    """A PIL image or HWC array (uint8, uint16, float in [0, 1]; gray or RGB; alpha dropped) -> 8-bit RGB PIL."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"`image` must be a PIL image or an HWC array with 1, 3 or 4 channels, got shape {arr.shape}")
    arr = arr[..., :3] if arr.shape[2] != 1 else np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"`image` must be uint8, uint16 or float, got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def mean_colour(image_mean) -> tuple[int, ...]:
    """The padding colour upstream derives from the image processor's normalisation mean."""
    return tuple(int(x * 255) for x in image_mean)


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square of side max(w, h) with `background`, the image centred (offset rounded down)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
