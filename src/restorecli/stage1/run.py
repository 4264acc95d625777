"""Stage 1 as the official pipelines run it: pre-upscale, the 512 rule, padding, tiling, precision.

Sources: DiffBIR HEAD 3f8b530 ``diffbir/pipeline.py`` (``SwinIRPipeline`` / ``BSRNetPipeline`` /
``SCUNetPipeline.apply_cleaner``, ``resize_short_edge_to``, ``pad_to_multiples_of``), the
``after_load_lq`` functions of ``diffbir/inference/*_loop.py`` and ``utils/common.py`` ``make_tiled_fn``;
In short (H x W input, ``--upscale u``):

=========  ======================  ===============================================  =====================
pipeline   before the cleaner      cleaner                                          after
=========  ======================  ===============================================  =====================
swinir     PIL bicubic x u         short side < 512: resize to 512; zero-pad to 64;  -
                                   run; crop.  Tiled: tiles of the input as is      tiled: 512 rule
bsrnet     -                       x4 (tiles on the LQ, x4 weight maps)             short side 512 if
                                                                                    min(out) < 512, else
                                                                                    exactly out size
scunet     PIL bicubic x u         replicate-pad to 64 (inside the official model)  512 rule
generic    PIL bicubic x u/s if    pad to spandrel's size requirements, run, crop   as bsrnet
           u > s (s: model scale)
=========  ======================  ===============================================  =====================

The output size is always ``(int(H*u), int(W*u))``; ``--stage1-only`` resizes the condition back to it
(bicubic, antialias). Nothing here clamps: the stage-1 output is the stage-2 condition and the
colour-fix reference as is.

Automatic tiling (not official): when `restorecli.stage1.memory` estimates that the untiled model pass would
not fit, the same pass (same resize and padding) is split into gaussian-weighted tiles with half-tile
overlap. Small images never take this path, so they keep the official results.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, SetupError, UsageError
from ..memory import SAFETY, available_memory
from .memory import stage1_peak_bytes
from .cleaners import Cleaner
from ..windows import gaussian_weights, sliding_windows

log = logging.getLogger("restorecli.stage1.run")

PIPELINES = ("swinir", "bsrnet", "scunet", "generic")
#: Short side the stage-2 condition needs (Pipeline.run asserts it).
CONDITION_MIN_SIDE = 512
#: Longest side the 512 rule may stretch a thin image to. Beyond it the image is refused: a 1x300 strip
#: at x4 would become a 512x153600 condition (78.6 MP of diffusion for a 4x1200 output).
MAX_STRETCHED_SIDE = 16384
#: DiffBIR's SwinIR works on 64-pixel units (8x unshuffle x 8-token windows).
SWINIR_MULTIPLE = 64
#: The official SCUNet pads to a multiple of 64 with replicate padding (diffbir/model/scunet.py, forward).
SCUNET_MULTIPLE = 64


# -- wiring per version and task ---------------------------------------------------------------------------


class Stage1Plan(NamedTuple):
    cleaner: str  # a weights.toml entry name ("description" for a --model JSON: its own cleaner)
    pipeline: str  # one of PIPELINES
    pre_upscale: bool  # PIL bicubic resize before the cleaner: by --upscale (generic: upscale/scale if larger)


#:.2 (InferenceLoop.load_cleaner/load_pipeline of bsr_loop, bid_loop, bfr_loop,
#: unaligned_bfr_loop). For unaligned_face this is the background; faces use FACE_CLEANER.
_PLANS = {
    ("v1", "sr"): Stage1Plan("swinir_general", "swinir", True),
    ("v1", "denoise"): Stage1Plan("swinir_general", "swinir", True),
    ("v1", "face"): Stage1Plan("swinir_face", "swinir", True),
    ("v2", "sr"): Stage1Plan("bsrnet", "bsrnet", False),
    ("v2", "denoise"): Stage1Plan("scunet_psnr", "scunet", True),
    ("v2", "face"): Stage1Plan("swinir_face", "swinir", True),
    ("v2", "unaligned_face"): Stage1Plan("bsrnet", "bsrnet", False),
    ("v2.1", "sr"): Stage1Plan("swinir_realesrgan", "swinir", True),
    ("v2.1", "denoise"): Stage1Plan("swinir_realesrgan", "swinir", True),
    ("v2.1", "face"): Stage1Plan("swinir_face", "swinir", True),
    ("v2.1", "unaligned_face"): Stage1Plan("swinir_realesrgan", "swinir", True),
}
FACE_CLEANER = "swinir_face"


def stage1_plan(version: str, task: str) -> Stage1Plan:
    """Which cleaner and pipeline the official code uses for a model version and task.

    ``custom`` (a --model JSON) always runs its own SwinIR with the SwinIR pipeline, whatever the task
    .
    """
    if version == "custom":
        return Stage1Plan("description", "swinir", True)
    if (version, task) == ("v1", "unaligned_face"):
        raise UsageError("`task` unaligned_face needs v2 or v2.1 (v1 has no model for it)")
    try:
        return _PLANS[(version, task)]
    except KeyError:
        raise UsageError(f"no stage-1 model for version {version!r} and task {task!r}") from None


def plan_for_cleaner(cleaner: Cleaner) -> Stage1Plan:
    """The plan for a cleaner chosen with --cleaner: the pipeline its architecture implies."""
    return Stage1Plan(cleaner.name, cleaner.pipeline, cleaner.pipeline in ("swinir", "scunet", "generic"))


# -- image helpers -----------------------------------------------------------------------------------------


def output_size_for(h: int, w: int, upscale: float) -> tuple[int, int]:
    """(int(H*u), int(W*u)): the official output size (truncation)."""
    return int(h * upscale), int(w * upscale)


def pre_upscale(rgb: np.ndarray, upscale: float) -> np.ndarray:
    """PIL ``resize((int(W*u), int(H*u)), BICUBIC)`` of an HWC image (InferenceLoop.after_load_lq).

    uint8 goes through PIL's RGB path and is bit-exact with the official code. uint16 (16-bit files)
    and float images are resized per channel in PIL's 32-bit float mode ("F") with the same bicubic
    filter (a = -0.5, antialiased when shrinking) and the same clipping, then rounded back to 16
    bits, so 16-bit inputs keep their depth instead of being cut to 8 bits first.
    """
    h, w = rgb.shape[:2]
    oh, ow = output_size_for(h, w, upscale)
    if (oh, ow) == (h, w):
        return rgb.copy()
    if oh < 1 or ow < 1:
        raise ValueError(f"`upscale` {upscale} turns {w}x{h} into {ow}x{oh}")
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(rgb).resize((ow, oh), Image.BICUBIC))
    top = 65535.0 if rgb.dtype == np.uint16 else 1.0
    planes = [_resize_plane_float(rgb[..., c], (ow, oh), top) for c in range(rgb.shape[2])]
    out = np.stack(planes, axis=-1)
    if rgb.dtype == np.uint16:
        return np.rint(out).astype(np.uint16)
    return out.astype(rgb.dtype)


def _resize_plane_float(plane: np.ndarray, size: tuple[int, int], top: float) -> np.ndarray:
    """PIL bicubic on one channel in float ("F"), horizontal then vertical pass, each clipped to
    [0, top] as PIL's 8-bit path clips its intermediate image (Resample.c), so 16-bit results follow
    the 8-bit ones (within 1/257 of a level-and-a-bit) instead of overshooting on hard edges."""
    ow, oh = size
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    if ow != img.width:
        img = Image.fromarray(np.clip(np.asarray(img.resize((ow, img.height), Image.BICUBIC)), 0, top))
    if oh != img.height:
        img = img.resize((ow, oh), Image.BICUBIC)
    return np.clip(np.asarray(img), 0, top)


def image_to_tensor(rgb: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """HWC uint8/uint16/float array -> (1, 3, H, W) float32 in [0, 1] (Pipeline.run: /255, clamp)."""
    if rgb.dtype == np.uint8:
        scale = 255.0
    elif rgb.dtype == np.uint16:
        scale = 65535.0
    elif np.issubdtype(rgb.dtype, np.floating):
        scale = 1.0
    else:
        raise ValueError(f"stage 1 takes uint8, uint16 or float images, got {rgb.dtype}")
    x = torch.tensor(np.ascontiguousarray(rgb), dtype=torch.float32, device=device)
    return x.div(scale).clamp(0, 1).permute(2, 0, 1).unsqueeze(0).contiguous()


def resize_short_edge_to(x: torch.Tensor, size: int = CONDITION_MIN_SIDE) -> torch.Tensor:
    """Short side -> `size`, long side int(l*size/s); size x size if square (pipeline.py, bicubic antialias)."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=short_edge_size(h, w, size), mode="bicubic", antialias=True)


def short_edge_size(h: int, w: int, size: int = CONDITION_MIN_SIDE) -> tuple[int, int]:
    """(h, w) with the short side set to `size`, the long side int(l*size/s); size x size if square."""
    if h == w:
        return size, size
    if h < w:
        return size, int(w * (size / h))
    return int(h * (size / w)), size


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize (the official resize back to the output size)."""
    return F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True)


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "constant") -> torch.Tensor:
    """Pad bottom/right to a multiple (zeros by default, as pipeline.py pad_to_multiples_of)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not ph and not pw:
        return x
    return F.pad(x, (0, pw, 0, ph), mode=mode) if mode != "constant" else F.pad(x, (0, pw, 0, ph), value=0.0)


def pad_to_size_requirements(x: torch.Tensor, req) -> torch.Tensor:
    """Pad bottom/right to spandrel's SizeRequirements: reflect as far as it reaches, then replicate.

    The same padding spandrel's descriptor call applies; done here because that call also clamps.
    """
    h, w = x.shape[-2:]
    pad_w, pad_h = req.get_padding(w, h)
    if not pad_w and not pad_h:
        return x
    rw, rh = min(pad_w, w - 1), min(pad_h, h - 1)
    if rw or rh:
        x = F.pad(x, (0, rw, 0, rh), mode="reflect")
    if pad_w - rw or pad_h - rh:
        x = F.pad(x, (0, pad_w - rw, 0, pad_h - rh), mode="replicate")
    return x


# -- tiling ------------------------------------------------------------------------------------------------


def tiled_forward(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int, scale: int = 1
) -> torch.Tensor:
    """Gaussian-weighted tiles, sum(w*fn(tile)) / sum(w) (utils/common.py make_tiled_fn).

    Tiles of tile x tile input pixels at `sliding_windows` positions; outputs are `scale` times larger
    and weighted by gaussian_weights(tile*scale). Accumulated in float32. One weight-sum channel is
    kept instead of the official per-channel copy (same values).
    """
    b, c, h, w = x.shape
    out = torch.zeros((b, c, h * scale, w * scale), dtype=torch.float32, device=x.device)
    count = torch.zeros((1, 1, h * scale, w * scale), dtype=torch.float32, device=x.device)
    weights = gaussian_weights(tile * scale, tile * scale).to(x.device)[None, None]
    for top, bottom, left, right in sliding_windows(h, w, tile, stride):
        y = fn(x[..., top:bottom, left:right])
        rows, cols = slice(top * scale, bottom * scale), slice(left * scale, right * scale)
        out[..., rows, cols] += y * weights
        count[..., rows, cols] += weights
    return out.div_(count)


# -- the pipelines -----------------------------------------------------------------------------------------


@dataclass
class Stage1Result:
    """`cond_img`: (1, 3, h, w) float32, short side >= 512, unclamped: the stage-2 condition and the
    colour-fix reference. `output_size`: (H, W) of the final image. `tile`: (size, stride) when tiled.
    """

    cond_img: torch.Tensor
    output_size: tuple[int, int]
    pipeline: str
    tile: tuple[int, int] | None = None
    auto_tiled: bool = False


def stage1_only_output(result: Stage1Result) -> torch.Tensor:
    """The --stage1-only image: the condition resized to the output size (bicubic, antialias), float.

    Convert with truncation, ``(x*255).clamp(0, 255).to(torch.uint8)``, as the official Pipeline.run.
    """
    return resize_to(result.cond_img, result.output_size)


def run_stage1(
    image: np.ndarray,
    cleaner: Cleaner,
    *,
    upscale: float,
    pipeline: str | None = None,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    max_memory: int | None = None,
    source: str | None = None,
) -> Stage1Result:
    """Stage 1 on an HWC RGB image (uint8, uint16 or float in [0, 1]) as the official pipelines do.

    `pipeline` defaults to the one the cleaner implies. `tile_size`/`tile_stride` reproduce the official
    tiled stage 1 (--cleaner-tile-size/--cleaner-tile-stride); without them, stage 1 tiles itself only
    when the untiled pass would not fit `max_memory` (bytes) or the memory the device has free.
    `source` names the image in InputError messages.
    """
    pipeline = pipeline or cleaner.pipeline
    _check_pipeline(pipeline)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"stage 1 takes HWC RGB arrays, got shape {image.shape}")
    h, w = image.shape[:2]
    output_size = output_size_for(h, w, upscale)
    if min(h, w) < 1 or min(output_size) < 1:
        raise InputError(source, f"{w}x{h} image is too small for `upscale` {upscale:g} (output {output_size[1]}x{output_size[0]})")
    _check_not_too_thin(output_size, source)
    pre = _pre_upscale_factor(pipeline, upscale, cleaner.scale)
    if pre is not None:
        image = pre_upscale(image, pre)
    x = image_to_tensor(image, cleaner.device)
    return apply_cleaner(
        x, cleaner, pipeline=pipeline, output_size=output_size,
        tile_size=tile_size, tile_stride=tile_stride, max_memory=max_memory,
    )


def condition_size(output_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the stage-2 condition for an output of `output_size`: the output itself, or with the
    short side stretched to 512 when it is shorter (`resize_short_edge_to`'s arithmetic)."""
    h, w = output_size
    return (h, w) if min(h, w) >= CONDITION_MIN_SIDE else short_edge_size(h, w)


def _check_not_too_thin(output_size: tuple[int, int], source: str | None) -> None:
    """Refuse an image the 512 rule would stretch past MAX_STRETCHED_SIDE (hours of work, or out of memory,
    for a thin strip); outputs whose short side is already 512 or more are never refused here."""
    ch, cw = condition_size(output_size)
    if max(ch, cw) > MAX_STRETCHED_SIDE and min(output_size) < CONDITION_MIN_SIDE:
        oh, ow = output_size
        raise InputError(
            source,
            f"too thin to restore: stage 2 needs a short side of {CONDITION_MIN_SIDE} px, which would stretch "
            f"the {ow}x{oh} output to {cw}x{ch} (more than {MAX_STRETCHED_SIDE} px); crop it or pad it first",
        )


def _pre_upscale_factor(pipeline: str, upscale: float, scale: int) -> float | None:
    if pipeline in ("swinir", "scunet"):
        return upscale
    if pipeline == "generic" and upscale > scale:
        return upscale / scale
    return None


@torch.no_grad()
def apply_cleaner(
    x: torch.Tensor,
    cleaner: Cleaner,
    *,
    pipeline: str | None = None,
    output_size: tuple[int, int] | None = None,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    max_memory: int | None = None,
) -> Stage1Result:
    """The official ``apply_cleaner`` on a (1, 3, H, W) float tensor that is already pre-upscaled.

    `output_size` is required for ``bsrnet`` and ``generic`` (int(H*u), int(W*u) of the original LQ);
    for ``swinir`` and ``scunet`` it is the size of `x`.
    """
    pipeline = pipeline or cleaner.pipeline
    _check_pipeline(pipeline)
    x = x.to(cleaner.device, torch.float32)
    if output_size is None:
        if pipeline in ("bsrnet", "generic"):
            raise ValueError(f"apply_cleaner: the {pipeline} pipeline needs output_size")
        output_size = tuple(x.shape[-2:])
    output_size = (int(output_size[0]), int(output_size[1]))
    if pipeline in ("swinir", "scunet") and cleaner.scale != 1:
        raise SetupError(f"{cleaner.name}: the {pipeline} pipeline needs a 1x model, {cleaner.architecture} is x{cleaner.scale}")
    tile = _explicit_tile(pipeline, x, tile_size, tile_stride)
    run = {"swinir": _swinir, "bsrnet": _bsrnet, "scunet": _scunet, "generic": _generic}[pipeline]
    cond, used_tile, auto = run(x, cleaner, output_size, tile, max_memory)
    if min(cond.shape[-2:]) < CONDITION_MIN_SIDE:  # cannot happen with the rules above; guards stage 2
        raise SetupError(f"stage 1 produced {tuple(cond.shape[-2:])}, below the {CONDITION_MIN_SIDE} short side stage 2 needs")
    return Stage1Result(cond, output_size, pipeline, used_tile, auto)


def _check_pipeline(pipeline: str) -> None:
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown stage-1 pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")


def _explicit_tile(pipeline: str, x: torch.Tensor, size: int | None, stride: int | None) -> tuple[int, int] | None:
    """(size, stride) for the official tiled path, or None (untiled; too-small images fall back, as upstream)."""
    if size is None:
        if stride is not None:
            raise UsageError("`cleaner_tile_stride` needs `cleaner_tile_size`")
        return None
    stride = size // 2 if stride is None else stride
    if size <= 0 or not 0 < stride <= size:
        raise UsageError(f"cleaner tiles need 0 < stride <= size, got size {size}, stride {stride}")
    if pipeline == "swinir" and size % SWINIR_MULTIPLE:
        raise UsageError(f"`cleaner_tile_size` must be a multiple of {SWINIR_MULTIPLE} for SwinIR, got {size}")
    h, w = x.shape[-2:]
    if h < size or w < size:
        log.info("stage 1: the %dx%d input is smaller than the %d tile; not tiling", w, h, size)
        return None
    return size, stride


# Each pipeline returns (cond_img, (tile, stride) or None, auto_tiled).


def _swinir(x, cleaner, output_size, tile, max_memory):
    forward = _padded_forward(cleaner, SWINIR_MULTIPLE, "constant")
    if tile is not None:  # SwinIRPipeline tiled: tiles of the input as is, 512 rule after
        y = tiled_forward(forward, x, *tile)
        return _short_side_rule(y), tile, False
    if min(x.shape[-2:]) < CONDITION_MIN_SIDE:  # untiled: resize first ("for backward capability")
        x = resize_short_edge_to(x)
    h0, w0 = x.shape[-2:]
    padded = pad_to_multiple(x, SWINIR_MULTIPLE)
    auto = _auto_tile(cleaner, padded, SWINIR_MULTIPLE, max_memory)
    y = tiled_forward(cleaner.run, padded, *auto) if auto else cleaner.run(padded)
    return y[..., :h0, :w0], auto, auto is not None


def _scunet(x, cleaner, output_size, tile, max_memory):
    forward = _padded_forward(cleaner, SCUNET_MULTIPLE, "replicate")
    if tile is not None:
        y = tiled_forward(forward, x, *tile)
        return _short_side_rule(y), tile, False
    h0, w0 = x.shape[-2:]
    padded = pad_to_multiple(x, SCUNET_MULTIPLE, "replicate")
    auto = _auto_tile(cleaner, padded, SCUNET_MULTIPLE, max_memory)
    y = tiled_forward(cleaner.run, padded, *auto)[..., :h0, :w0] if auto else forward(x)
    return _short_side_rule(y), auto, auto is not None


def _bsrnet(x, cleaner, output_size, tile, max_memory):
    scale = cleaner.scale
    if tile is None:
        tile = auto = _auto_tile(cleaner, x, 64, max_memory)
    else:
        auto = None
    y = tiled_forward(cleaner.run, x, *tile, scale=scale) if tile else cleaner.run(x)
    return _resize_after_upscaler(y, output_size), tile, auto is not None


def _generic(x, cleaner, output_size, tile, max_memory):
    scale = cleaner.scale
    forward = _requirement_forward(cleaner)
    if tile is None:
        multiple = math.lcm(64, max(1, cleaner.size_requirements.multiple_of))
        tile = auto = _auto_tile(cleaner, x, multiple, max_memory)
    else:
        auto = None
    y = tiled_forward(forward, x, *tile, scale=scale) if tile else forward(x)
    return _resize_after_upscaler(y, output_size), tile, auto is not None


def _short_side_rule(y: torch.Tensor) -> torch.Tensor:
    """If the short side is below 512, resize it to 512 (pipeline.py, after tiled SwinIR and SCUNet)."""
    return resize_short_edge_to(y) if min(y.shape[-2:]) < CONDITION_MIN_SIDE else y


def _resize_after_upscaler(y: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """BSRNetPipeline: short side 512 if min(output_size) < 512, else exactly output_size."""
    if min(output_size) < CONDITION_MIN_SIDE:
        return resize_short_edge_to(y)
    if tuple(y.shape[-2:]) == tuple(output_size):
        return y
    return resize_to(y, output_size)


def _padded_forward(cleaner: Cleaner, multiple: int, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        return cleaner.run(pad_to_multiple(t, multiple, mode))[..., :h, :w]

    return forward


def _requirement_forward(cleaner: Cleaner) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = cleaner.scale

    def forward(t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        y = cleaner.run(pad_to_size_requirements(t, cleaner.size_requirements))
        if y.shape[-2] < h * scale or y.shape[-1] < w * scale:
            raise SetupError(
                f"{cleaner.name}: {cleaner.architecture} returned {tuple(y.shape[-2:])} for a {h}x{w} input "
                f"(expected x{scale})"
            )
        return y[..., : h * scale, : w * scale]

    return forward


def _auto_tile(cleaner: Cleaner, x: torch.Tensor, multiple: int, max_memory: int | None) -> tuple[int, int] | None:
    """(tile, stride) when the untiled pass would not fit the memory at hand, else None.

    The largest tile that is a multiple of 2*`multiple` (so the half-tile stride stays on the model's
    grid), no larger than the short side, whose estimated peak fits SAFETY of the available memory.
    """
    h, w = x.shape[-2:]
    budget = SAFETY * available_memory(cleaner.device, max_memory)

    def peak(tile: int | None) -> int:
        return stage1_peak_bytes(cleaner.kind, h, w, scale=cleaner.scale, dtype=cleaner.dtype, tile=tile)

    if peak(None) <= budget:
        return None
    step = 2 * multiple
    largest = min(h, w) // step * step
    if largest < step:
        log.warning("stage 1: a %dx%d input may not fit in memory but is too small to tile", w, h)
        return None
    tile = largest
    while tile > step and peak(tile) > budget:
        tile -= step
    if peak(tile) > budget:
        log.warning("stage 1: even %d-pixel tiles may not fit the memory budget; trying anyway", tile)
    log.info("stage 1: %dx%d does not fit %.1f GiB untiled; tiling %d/%d", w, h, budget / 2**30, tile, tile // 2)
    return tile, tile // 2
