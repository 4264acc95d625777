"""Memory planning for stage 2: what each stage needs, and which tiles make it fit the device.

The stages of one image run one after another and free their work in between, so each is planned on
its own against the same budget, plus the image-sized buffers that live through all of them:

    budget = SAFETY x available_memory(device, --max-memory)        (restorecli.pipeline.memory)

(CUDA: free device memory plus the allocator's unused cache; CPU: MemAvailable or the cgroup's headroom.)
It is read after the models are loaded, so their weights are not part of it. Stage 1 plans its own
tiles the same way (`restorecli.stage1.run`); this module plans the rest:

============  ==================================================  ======================================
stage         estimate (bytes)                                    when it does not fit
============  ==================================================  ======================================
VAE encode    `tiled_vae.estimate_peak_bytes` (a model of the      exact tiled encoder (tiled == untiled,
              allocations), x VAE_CPU_FACTOR on the CPU            so nothing changes): the largest tile
                                                                   of ENCODE_TILES that fits
sampling      one UNet + IRControlNet call: batch x latent px x    the official gaussian latent tiles
              per-pixel bytes + fixed; plus the sampler's          (changes the result: logged as a
              whole-latent buffers                                 warning): the largest tile that fits
guidance      latent: the target's posterior encode (tiled like    - (rgb space cannot be tiled; a
              the condition); rgb: decode + backward, checkpointed warning says it may not fit)
VAE decode    as VAE encode                                        exact tiled decoder, DECODE_TILES
colour fix    POST_BYTES_PER_PIXEL x output pixels                 runs on the CPU instead
============  ==================================================  ======================================

Where the numbers come from (full-size architectures, random weights, ``benchmarks/run.py --measure``
repeats the measurements; CPU: peak resident set over the resident set before the call, torch 2.14,
glibc told to return freed memory at once, see benchmarks/common.py):

* UNet + IRControlNet, fp32, PyTorch SDPA attention (flash kernels on CPU and CUDA keep attention
  linear in the number of tokens), one call, batch 1, over the resident set after a warm-up call:

      latent     32x32    64x64    96x96    128x128
      measured   144 MB   192 MB   404 MB   708 MB

  Beyond a fixed ~150 MB (oneDNN's weight copies and scratch, reached at small sizes) the cost is
  42.5 KB per latent pixel (96^2 -> 128^2; the GEGLU feed-forward of the first level alone holds 2560
  channels per pixel) = 26.2 bytes per "skip float" (the channel-pixels of the skip activations a
  diffusers UNet keeps per latent pixel, 1620 for SD 2.1; other UNets - tiny test models, custom
  descriptions - are scaled by their own). Used: max(SAMPLING_FIXED_BYTES = 160 MiB, 28 bytes per skip
  float = 45.4 KB per latent pixel, x batch): within 5% from 64x64 up (above at 96^2 and 128^2),
  17% above at 32x32.
  Batched cfg (cond + uncond in one call) doubles the per-pixel part; when only the unbatched call fits,
  the planner turns batching off before it resorts to tiles (same result up to float rounding).
* Half precision: activations take half the bytes; HALF_FACTOR = 0.6 as for stage 1 (memory.py).
* Devices whose SDPA may fall back to the math kernel (MPS) add the quadratic attention matrix of the
  first transformer level (heads x tokens^2).
* The VAE: ``estimate_peak_bytes`` models the device allocations (within about +-30%, tested in
  tests/test_tiled_vae.py). On the CPU the plain module's oneDNN copies add about 30% (benchmarks/
  tiled_vae.py, resident set over base / estimate: untiled encode 1024^2 1.25, decode 512^2 1.29), hence
  VAE_CPU_FACTOR = 1.35 for it; the tiled one measured 0.92 of its estimate (encode 1024^2, 512 px).
  The exact tiled VAE keeps each GroupNorm stage's whole output (as paused tiles) until the next
  stage has its statistics, so its peak has a floor of about two feature maps however small the
  tiles: 9 GiB for a 2048^2 fp32 decode. The planner therefore tries, cheapest first: plain; tiled;
  tiled with the paused tiles in host memory (CUDA); tiled with recomputation (about one feature map,
  ~+35% time); both.
* Colour fix and final resize (wavelet): 212 and 205 bytes per pixel measured at 512^2 and 1024^2
  (benchmarks/run.py, "colour fix"; content, style, high, low, the padded blur inputs, the sum, the
  resized copy): POST_BYTES_PER_PIXEL = 232.
* Stage 1 (its own plan, memory.py) and the VAE estimates agree with benchmarks/run.py within 15%:
  stage 1 231 / 866 MiB measured at 512^2 / 1024^2 (262 MB / 1.05 GB estimated), plain encode 641 /
  2561 MiB (0.7 / 2.7 GiB), plain decode 962 / 3842 MiB (1.0 / 4.1 GiB).
* rgb-space guidance: about 3 GB per 512x512 pixels in float32 with a checkpointed decoder
  (benchmarks/guidance.py): 11.5 KB per pixel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .memory import SAFETY, available_memory

log = logging.getLogger("restorecli.pipeline.planning")

VAE_SCALE = 8
SAMPLING_BYTES_PER_SKIP_FLOAT = 28
SAMPLING_FIXED_BYTES = 160 << 20
SD21_SKIP_FLOATS = 1620
#: x, the start latent, the condition, the solver's history (up to 3 earlier outputs), the tiled
#: accumulators: whole-latent float32 tensors of 4 channels alive while sampling.
SAMPLER_LATENT_BUFFERS = 16
HALF_FACTOR = 0.6
VAE_CPU_FACTOR = 1.35
POST_BYTES_PER_PIXEL = 232
#: cond_img, its padded copy for the encoder, the decoded image: float32 RGB, alive through stage 2.
IMAGE_BYTES_PER_PIXEL = 36
GUIDANCE_RGB_BYTES_PER_PIXEL = 11_500
#: Tile sides tried, largest first: encoder (image pixels), decoder (latent pixels).
ENCODE_TILES = (2048, 1024, 512, 256, 128, 64)
DECODE_TILES = (256, 128, 64, 32, 16, 8)
#: Automatic sampling tiles are multiples of 8 latent pixels (64 image pixels, the official rule),
#: never below this.
MIN_SAMPLE_TILE = 16


# -- what each stage needs ---------------------------------------------------------------------------------


def skip_floats_per_latent_pixel(unet_config) -> float:
    """Channel-pixels per latent pixel of the skip activations a diffusers UNet2DConditionModel keeps for
    its up blocks: conv_in, every down-block ResNet, every downsampler (1620 for SD 2.1)."""
    channels = list(unet_config["block_out_channels"])
    layers = int(unet_config["layers_per_block"])
    total, area = float(channels[0]), 1.0
    for i, c in enumerate(channels):
        total += layers * c * area
        if i < len(channels) - 1:
            area /= 4
            total += c * area
    return total


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def sampling_peak_bytes(unet_config, h: int, w: int, *, batch: int = 1, dtype=torch.float32,
                        device: torch.device | str = "cpu") -> int:
    """One UNet + IRControlNet call on a (batch, 4, h, w) latent (see the module docstring)."""
    skip = skip_floats_per_latent_pixel(unet_config)
    model = max(SAMPLING_BYTES_PER_SKIP_FLOAT * skip * batch * h * w, SAMPLING_FIXED_BYTES * skip / SD21_SKIP_FLOATS)
    if torch.device(device).type not in ("cpu", "cuda"):  # SDPA may use the math kernel: q k^T in memory
        heads = unet_config.get("attention_head_dim") or 8
        heads = heads[0] if isinstance(heads, (list, tuple)) else heads
        model += 4 * int(heads) * batch * (h * w) ** 2
    if _is_half(dtype):
        model *= HALF_FACTOR
    return int(model)


def sampler_buffer_bytes(h: int, w: int) -> int:
    return SAMPLER_LATENT_BUFFERS * 4 * 4 * h * w


def vae_peak_bytes(vae_config, h: int, w: int, tile: int | None, *, part: str, dtype=torch.float32,
                   device: torch.device | str = "cpu", offload: bool = False, recompute: bool = False) -> int:
    """The exact tiled VAE's (or, tile None, the plain VAE's) peak on an h x w image (pixels)."""
    from ..vae.tiled import estimate_peak_bytes

    est = estimate_peak_bytes(vae_config, h, w, tile, dtype, part=part, offload=offload, recompute=recompute)
    if torch.device(device).type == "cpu" and tile is None:
        est *= VAE_CPU_FACTOR
    return int(est)


@dataclass(frozen=True)
class VaeChoice:
    """How the VAE runs one pass: `tile` None = the plain module; else the exact tiled one, with
    `recompute` (inner ResNet activations recomputed, ~+35% time) and `offload` (paused tiles in host
    memory, CUDA) when the tiles alone do not fit."""

    tile: int | None = None
    recompute: bool = False
    offload: bool = False
    estimate: int = 0
    untiled: int = 0

    def describe(self, unit: str) -> str:
        if self.tile is None:
            return "untiled"
        extra = [x for x, on in (("recompute", self.recompute), ("tiles in host memory", self.offload)) if on]
        return f"tiles of {self.tile} {unit}" + (f" ({', '.join(extra)})" if extra else "")


# -- the plan ----------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Stage-2 choices for one image: `encode` / `decode` (a VaeChoice each; tiles in image pixels for the
    encoder, latent pixels for the decoder), `sample_tile` = (size, stride) in latent pixels (the official
    tiled sampling; None = untiled; `sample_tile_auto` when the planner chose it), `cfg_batch` (2: cond
    and uncond in one call; 1: two calls, also when batching was asked for but only one call fits), `post_on_cpu` (the
    colour fix in host memory). `estimates`: bytes per stage as planned; `untiled`: the plain stage's
    estimate where a tiled one was chosen."""

    budget: int
    size: tuple[int, int]  # (h0, w0) of the stage-1 image
    encode: VaeChoice = field(default_factory=VaeChoice)
    sample_tile: tuple[int, int] | None = None
    sample_tile_auto: bool = False
    cfg_batch: int = 1
    unbatched_cfg: bool = False
    decode: VaeChoice = field(default_factory=VaeChoice)
    post_on_cpu: bool = False
    estimates: dict[str, int] = field(default_factory=dict)
    untiled: dict[str, int] = field(default_factory=dict)

    @property
    def encode_tile(self) -> int | None:
        return self.encode.tile

    @property
    def decode_tile(self) -> int | None:
        return self.decode.tile

    @property
    def pad(self) -> int:
        """The stage-2 padding: 8 with tiled sampling, else 64 (PIPELINE.md 2.4; VAE tiling is exact and
        does not count)."""
        return 8 if self.sample_tile is not None else 64

    def describe(self) -> str:
        def gib(n: int) -> str:
            return f"{n / 2**30:.1f} GiB"

        def part(name: str, what: str) -> str:
            est = self.estimates.get(name)
            text = f"{name} {what}" + (f" ~{gib(est)}" if est is not None else "")
            return text + (f" (untiled ~{gib(self.untiled[name])})" if name in self.untiled else "")

        sample = self.sample_tile
        parts = [
            part("encode", self.encode.describe("px")),
            part("sampling", f"tiles of {sample[0] * VAE_SCALE}/{sample[1] * VAE_SCALE} px" if sample else "untiled"),
            part("decode", self.decode.describe("latent px")),
        ]
        if "guidance" in self.estimates:
            parts.append(f"guidance ~{gib(self.estimates['guidance'])}")
        if self.post_on_cpu:
            parts.append("colour fix on the CPU")
        return f"{self.size[1]}x{self.size[0]}, budget {gib(self.budget)}: " + "; ".join(parts)


def stage2_budget(device: torch.device | str, max_memory: int | None) -> int:
    """Bytes stage 2 plans for: SAFETY of what the device has free, at most `max_memory`."""
    return int(SAFETY * available_memory(device, max_memory))


def _latent_size(h0: int, w0: int, pad: int) -> tuple[int, int]:
    """(h1, w1) and the sampled latent: the condition padded to `pad`, over 8; untiled the latent is then
    padded to 8 (PIPELINE.md 2.4)."""
    return math.ceil(h0 / pad) * pad // VAE_SCALE, math.ceil(w0 / pad) * pad // VAE_SCALE


def plan_stage2(
    h0: int,
    w0: int,
    *,
    vae_config,
    unet_config,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    budget: int,
    tile_size: int | None = None,
    tile_stride: int | None = None,
    cfg_batch: int = 1,
    guidance_space: str | None = None,
    output_size: tuple[int, int] | None = None,
) -> MemoryPlan:
    """Tiles for stage 2 of an h0 x w0 stage-1 image within `budget` bytes.

    `dtype` is the UNet's, `vae_dtype` the VAE's (default: the same).
    `tile_size`/`tile_stride` (pixels, --tile-size/--tile-stride) fix the sampling tiles; otherwise
    sampling is untiled unless that would not fit, and then the largest latent tile (a multiple of 8,
    no larger than the latent's short side) that fits, with half-tile stride. The VAE is tiled whenever
    the plain one would not fit; its tiles are exact, so that never changes the result. `cfg_batch`: 2
    when cond and uncond go through one batched call. `guidance_space`: "latent"/"rgb" when restoration
    guidance is on.
    """
    device = torch.device(device)
    vae_dtype = vae_dtype or dtype
    output_size = output_size or (h0, w0)
    plan = MemoryPlan(budget=int(budget), size=(int(h0), int(w0)))
    resident = IMAGE_BYTES_PER_PIXEL * h0 * w0
    room = plan.budget - resident

    # sampling first: it decides the padding, which the encoder and decoder see
    if tile_size:
        size = tile_size // VAE_SCALE
        stride = (tile_stride or tile_size // 2) // VAE_SCALE
        h1, w1 = _latent_size(h0, w0, 8)
        if h1 >= size and w1 >= size:
            plan.sample_tile = (size, max(1, stride))
    h, w = _latent_size(h0, w0, 64)

    def untiled_sampling(batch: int) -> int:
        return sampling_peak_bytes(unet_config, h, w, batch=batch, dtype=dtype, device=device) + sampler_buffer_bytes(h, w)

    whole = untiled_sampling(cfg_batch)
    if cfg_batch > 1 and whole > room and plan.sample_tile is None and untiled_sampling(1) <= room:
        cfg_batch, whole = 1, untiled_sampling(1)  # two calls instead of tiles: the same result
        plan.unbatched_cfg = True
    plan.cfg_batch = cfg_batch
    plan.untiled["sampling"] = whole
    if plan.sample_tile is None and not tile_size and whole > room:
        plan.sample_tile = sample_tile_for(unet_config, h0, w0, room, batch=cfg_batch, dtype=dtype, device=device)
        plan.sample_tile_auto = plan.sample_tile is not None
    if plan.sample_tile is not None:
        h, w = _latent_size(h0, w0, 8)
        size = plan.sample_tile[0]
        plan.estimates["sampling"] = (sampling_peak_bytes(unet_config, size, size, batch=cfg_batch, dtype=dtype, device=device)
                                      + sampler_buffer_bytes(h, w))
    else:
        plan.estimates["sampling"] = whole
    ph, pw = h * VAE_SCALE, w * VAE_SCALE  # the padded condition the VAE sees

    for name, tiles in (("encode", ENCODE_TILES), ("decode", DECODE_TILES)):
        choice = vae_choice(vae_config, ph, pw, tiles, part=name, room=room, dtype=vae_dtype, device=device)
        setattr(plan, name, choice)
        plan.estimates[name], plan.untiled[name] = choice.estimate, choice.untiled

    if guidance_space == "latent":
        plan.estimates["guidance"] = plan.estimates["encode"]
    elif guidance_space == "rgb":
        plan.estimates["guidance"] = int(GUIDANCE_RGB_BYTES_PER_PIXEL * ph * pw * (HALF_FACTOR if _is_half(vae_dtype) else 1))
        if plan.estimates["guidance"] > room:
            log.warning("rgb-space guidance needs about %.1f GiB at %dx%d (budget %.1f GiB) and cannot be tiled; "
                        "it may run out of memory (latent space needs far less)",
                        plan.estimates["guidance"] / 2**30, pw, ph, plan.budget / 2**30)

    out_pixels = max(h0 * w0, output_size[0] * output_size[1])
    plan.estimates["post"] = POST_BYTES_PER_PIXEL * out_pixels
    plan.post_on_cpu = device.type != "cpu" and plan.estimates["post"] > room
    for name in ("encode", "decode", "sampling"):
        if plan.untiled.get(name) == plan.estimates.get(name) or plan.untiled.get(name) == 0:
            plan.untiled.pop(name, None)
    return plan


def sample_tile_for(unet_config, h0: int, w0: int, room: int, *, batch: int = 1, dtype=torch.float32,
                    device: torch.device | str = "cpu", largest: int | None = None) -> tuple[int, int] | None:
    """(size, stride) in latent pixels: the largest multiple of 8 (>= MIN_SAMPLE_TILE, <= `largest` and
    the latent's short side) whose call fits `room`, stride size / 2; the smallest if none fits; None
    when the latent is too small to tile."""
    h, w = _latent_size(h0, w0, 8)
    top = min(h, w) // 8 * 8
    if largest is not None:
        top = min(top, largest // 8 * 8)
    if top < MIN_SAMPLE_TILE:
        return None
    buffers = sampler_buffer_bytes(h, w)
    size = top
    while size > MIN_SAMPLE_TILE and sampling_peak_bytes(unet_config, size, size, batch=batch, dtype=dtype, device=device) + buffers > room:
        size -= 8
    return size, size // 2


def vae_choice(vae_config, h: int, w: int, tiles, *, part: str, room: int, dtype=torch.float32,
               device: torch.device | str = "cpu") -> VaeChoice:
    """How to run the VAE over an h x w image within `room` bytes: the plain module if it fits, else
    the exact tiled one, cheapest option first (module docstring); the leanest when nothing fits."""
    device = torch.device(device)
    untiled = vae_peak_bytes(vae_config, h, w, None, part=part, dtype=dtype, device=device)
    if untiled <= room:
        return VaeChoice(estimate=untiled, untiled=untiled)
    side = max(h, w) if part == "encode" else max(h, w) // VAE_SCALE
    candidates = [t for t in tiles if t < side] or [tiles[-1]]
    modes = [(False, False)] + ([(False, True)] if device.type == "cuda" else []) + [(True, False)]
    modes += [(True, True)] if device.type == "cuda" else []
    choice = None
    for recompute, offload in modes:
        for tile in candidates:
            est = vae_peak_bytes(vae_config, h, w, tile, part=part, dtype=dtype, device=device,
                                 offload=offload, recompute=recompute)
            choice = VaeChoice(tile, recompute, offload, est, untiled)
            if est <= room:
                return choice
    return choice




def smaller_vae_tile(tile: int | None, side: int, *, part: str) -> int | None:
    """Half the tile (untiled: half the side), at least the smallest of ENCODE_TILES / DECODE_TILES;
    None when it cannot get smaller."""
    floor = (ENCODE_TILES if part == "encode" else DECODE_TILES)[-1]
    current = side if tile is None else min(tile, side)
    smaller = max(floor, current // 2)
    return smaller if smaller < current else None


def leaner_vae_choice(choice: VaeChoice, side: int, *, part: str, device: torch.device | str) -> VaeChoice | None:
    """The VAE's retry after an out-of-memory error: half the tile, recomputation on, and on CUDA the
    paused tiles in host memory; None when nothing is left to shrink."""
    tile = smaller_vae_tile(choice.tile, side, part=part)
    offload = torch.device(device).type == "cuda"
    if tile is None and choice.tile is not None and choice.recompute and choice.offload == offload:
        return None
    return VaeChoice(tile or choice.tile or side, True, offload, 0, choice.untiled)


def smaller_sample_tile(tile: tuple[int, int] | None, h0: int, w0: int) -> tuple[int, int] | None:
    """Sampling tiles after an out-of-memory error: half the tile (multiple of 8, stride half of it);
    untiled: half the latent's short side. None when they cannot get smaller."""
    h, w = _latent_size(h0, w0, 8)
    current = tile[0] if tile is not None else min(h, w)
    size = current // 2 // 8 * 8
    if size < 8 or size >= current:
        return None
    return size, max(1, size // 2)
