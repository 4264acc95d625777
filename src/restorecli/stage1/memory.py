"""How much memory stage 1 needs, for choosing its automatic tiles (`restorecli.stage1.run`) and for
budgeting it beside stage 2 (`restorecli.pipeline.planning`).

Peaks are bytes per pixel of the model input, measured per architecture at its official full size
(docs/memory.md has the figures and `python benchmarks/stage1.py --measure` repeats them), plus the
image-sized buffers around the model. Models of other architectures get a deliberately generous guess
per output pixel.
"""

from __future__ import annotations

import torch

STAGE1_BYTES_PER_PIXEL = {"swinir": 1000, "bsrnet": 12000, "scunet": 5500}
GENERIC_BYTES_PER_OUTPUT_PIXEL = 6000
HALF_FACTOR = 0.6
#: Image-sized buffers around the model, per output pixel: the pre-upscaled 8-bit image, its float32 copy
#: (made through two temporaries), the tiled output and its weight sum (measured ~36; docs/memory.md).
BUFFER_BYTES_PER_OUTPUT_PIXEL = 40


def stage1_peak_bytes(
    kind: str,
    in_h: int,
    in_w: int,
    *,
    scale: int = 1,
    dtype: torch.dtype = torch.float32,
    tile: int | None = None,
) -> int:
    """Estimated peak bytes of stage 1 on an in_h x in_w model input (see the module docstring).

    With `tile`, the model runs on tile x tile pieces while the image-sized buffers stay whole.
    """
    model_pixels = (tile * tile) if tile else (in_h * in_w)
    if kind in STAGE1_BYTES_PER_PIXEL:
        model = STAGE1_BYTES_PER_PIXEL[kind] * model_pixels
    else:
        model = GENERIC_BYTES_PER_OUTPUT_PIXEL * model_pixels * scale * scale
    if dtype in (torch.float16, torch.bfloat16):
        model = model * HALF_FACTOR
    return int(model + BUFFER_BYTES_PER_OUTPUT_PIXEL * in_h * in_w * scale * scale)
