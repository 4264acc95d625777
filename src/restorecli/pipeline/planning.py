"""Memory planning: what each stage of a restoration needs, and which tiles make it fit the budget.

The stages of one image run one after another and free their work in between, so each is planned on
its own against the same budget, with the image-sized buffers alive through it counted in:

    budget = SAFETY x available_memory(device, --max-memory)        (restorecli.memory)

read after the models are loaded, so their weights are not part of it. Stage 1 tiles itself
(`restorecli.stage1.run`); this module plans the VAE (exact tiles, then paused feature maps on disk),
sampling (the official latent tiles, a different result, only when untiled sampling cannot fit) and
the colour fix (exact bands), and, when even the leanest plan exceeds the budget, says how much would
do (`MemoryPlan.needed`, `smallest_budget`). The per-pixel figures are measured on the real
architectures; docs/memory.md has the measurements and the commands that repeat them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..memory import SAFETY, available_memory
from ..stage1.memory import stage1_peak_bytes
from ..vae import VAE_SCALE

log = logging.getLogger("restorecli.pipeline.planning")

SAMPLING_BYTES_PER_SKIP_FLOAT = 28
#: Bytes per channel-pixel of the widest transformer level's feed-forward (16 x its channels: the GEGLU
#: projection, its halves and product), for UNets whose attention, not their skips, dominates.
SAMPLING_BYTES_PER_FF_FLOAT = 8
SAMPLING_FIXED_BYTES = 160 << 20
SD21_SKIP_FLOATS = 1620
#: x, the start latent, the condition, the solver's history (up to 3 earlier outputs), the tiled
#: accumulators: whole-latent float32 tensors of 4 channels alive while sampling.
SAMPLER_LATENT_BUFFERS = 16
HALF_FACTOR = 0.6
VAE_CPU_FACTOR = 1.35
#: One UNet + IRControlNet call on the CPU over its live tensors: glibc's heap slack. SD 2.1, fp32, batch 1,
#: one call after a warm-up (`benchmarks/run.py --measure-child N`): 249 / 530 / 903 MB at 64^2 / 96^2 /
#: 128^2 latents with glibc as `restore` runs it, against 207 / 422 / 722 MB with the lean allocator the
#: per-pixel figures were fitted under (1.20 / 1.26 / 1.25 x); `SAFETY` alone left no room for it.
SAMPLING_CPU_ALLOCATOR_FACTOR = 1.25
#: The stage-1 image (float32 RGB): the condition and the colour-fix reference, alive through stage 2.
COND_BYTES_PER_PIXEL = 12
#: The encoder's input is made as `pad(cond) * 2 - 1`: two padded float32 copies at once.
ENCODE_INPUT_BYTES_PER_PIXEL = 24
#: The decoded image (float32 RGB), alive from the decoder's output through the colour fix.
DECODED_BYTES_PER_PIXEL = 12
#: Whole-image colour fix and final resize, over the stage-1 and decoded images (wavelet, measured).
POST_BYTES_PER_PIXEL = 232
#: The colour fix in bands (`colorfix.color_fix_in_bands`), per pixel of a band with its halo (measured
#: 223 at 2048^2 in bands of 1024 rows).
POST_BAND_BYTES_PER_PIXEL = 240
#: Band heights tried (rows), largest first.
POST_BANDS = (1024, 512, 256, 128, 64, 32, 16)
#: After the colour fix, per output pixel: the restored image, the stage-1 copy the result carries,
#: the stage-1 image, then the caller's conversion to integers (float32 RGB each) and the integers.
OUTPUT_BYTES_PER_PIXEL = 40
GUIDANCE_RGB_BYTES_PER_PIXEL = 11_500
#: Tile sides tried, largest first: encoder (image pixels), decoder (latent pixels).
ENCODE_TILES = (2048, 1024, 512, 256, 128, 64)
DECODE_TILES = (256, 128, 64, 32, 16, 8)
#: Automatic sampling tiles are multiples of 8 latent pixels (64 image pixels, the official rule),
#: never below this.
MIN_SAMPLE_TILE = 16
#: The stages a plan budgets, in the order they run.
STAGES = ("stage 1", "encode", "sampling", "decode", "colour fix", "output")


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


def ff_floats_per_latent_pixel(unet_config) -> float:
    """16 x channels x area of the largest transformer level: the GEGLU feed-forward's activations per
    latent pixel (5120 for SD 2.1's first level)."""
    channels = list(unet_config["block_out_channels"])
    kinds = list(unet_config.get("down_block_types") or ())
    levels = [i for i, kind in enumerate(kinds) if "CrossAttn" in kind]
    return max((16 * channels[i] / 4**i for i in levels), default=0.0)


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def sampling_peak_bytes(unet_config, h: int, w: int, *, batch: int = 1, dtype=torch.float32,
                        device: torch.device | str = "cpu") -> int:
    """One UNet + IRControlNet call on a (batch, 4, h, w) latent: max(a fixed part, per latent pixel the
    larger of bytes per skip float x skip floats and bytes per feed-forward float x its floats), plus the
    quadratic attention matrix where SDPA may fall back to the math kernel (docs/memory.md); on the CPU
    x SAMPLING_CPU_ALLOCATOR_FACTOR for glibc's heap."""
    skip = skip_floats_per_latent_pixel(unet_config)
    per_pixel = max(SAMPLING_BYTES_PER_SKIP_FLOAT * skip, SAMPLING_BYTES_PER_FF_FLOAT * ff_floats_per_latent_pixel(unet_config))
    model = max(per_pixel * batch * h * w, SAMPLING_FIXED_BYTES * skip / SD21_SKIP_FLOATS)
    if torch.device(device).type not in ("cpu", "cuda"):  # SDPA may use the math kernel: q k^T in memory
        heads = unet_config.get("attention_head_dim") or 8
        heads = heads[0] if isinstance(heads, (list, tuple)) else heads
        model += 4 * int(heads) * batch * (h * w) ** 2
    if _is_half(dtype):
        model *= HALF_FACTOR
    if torch.device(device).type == "cpu":
        model *= SAMPLING_CPU_ALLOCATOR_FACTOR
    return int(model)


def sampler_buffer_bytes(h: int, w: int) -> int:
    return SAMPLER_LATENT_BUFFERS * 4 * 4 * h * w


def vae_peak_bytes(vae_config, h: int, w: int, tile: int | None, *, part: str, dtype=torch.float32,
                   device: torch.device | str = "cpu", offload: bool = False, recompute: bool = False,
                   max_stored: int | None = None) -> int:
    """The exact tiled VAE's (or, tile None, the plain VAE's) peak on an h x w image (pixels)."""
    return vae_estimate(vae_config, h, w, tile, part=part, dtype=dtype, device=device, offload=offload,
                        recompute=recompute, max_stored=max_stored).peak


def vae_estimate(vae_config, h: int, w: int, tile: int | None, *, part: str, dtype=torch.float32,
                 device: torch.device | str = "cpu", offload: bool = False, recompute: bool = False,
                 max_stored: int | None = None):
    """`restorecli.vae.tiled.estimate` (peak, paused tiles in memory, on disk), the plain module's
    peak x VAE_CPU_FACTOR on the CPU (oneDNN's reordered weight and activation copies)."""
    from ..vae.tiled import estimate

    est = estimate(vae_config, h, w, tile, dtype, part=part, offload=offload, recompute=recompute,
                   max_stored_bytes=max_stored)
    if torch.device(device).type == "cpu" and tile is None:
        est = est._replace(peak=int(est.peak * VAE_CPU_FACTOR))
    return est


def post_peak_bytes(h: int, w: int, rows: int | None) -> int:
    """The colour fix's own bytes on an h x w image, whole (`rows` None) or in bands of `rows` rows."""
    if rows is None or rows >= h:
        return POST_BYTES_PER_PIXEL * h * w
    from .colorfix import WAVELET_HALO

    return POST_BAND_BYTES_PER_PIXEL * (rows + 2 * WAVELET_HALO) * w


@dataclass(frozen=True)
class VaeChoice:
    """How the VAE runs one pass: `tile` None = the plain module; else the exact tiled one, with
    `recompute` (inner ResNet activations recomputed, ~+35% time), `offload` (paused tiles in host
    memory, CUDA) and `max_stored` (at most that many bytes of paused tiles in memory, the rest in a
    temporary file: about `spill` bytes) when the tiles alone do not fit."""

    tile: int | None = None
    recompute: bool = False
    offload: bool = False
    estimate: int = 0
    untiled: int = 0
    max_stored: int | None = None
    spill: int = 0

    def describe(self, unit: str) -> str:
        if self.tile is None:
            return "untiled"
        extra = [x for x, on in (("recompute", self.recompute), ("tiles in host memory", self.offload)) if on]
        if self.max_stored is not None and self.spill > 0:
            extra.append(f"~{self.spill / 2**30:.1f} GiB of paused tiles on disk")
        return f"tiles of {self.tile} {unit}" + (f" ({', '.join(extra)})" if extra else "")


# -- the plan ----------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Stage-2 choices for one image: `encode` / `decode` (a VaeChoice each; tiles in image pixels for the
    encoder, latent pixels for the decoder), `sample_tile` = (size, stride) in latent pixels (the official
    tiled sampling; None = untiled; `sample_tile_auto` when the planner chose it), `cfg_batch` (2: cond
    and uncond in one call; 1: two calls, also when batching was asked for but only one call fits),
    `post_rows` (the colour fix in bands of that many rows; None: whole), `post_on_cpu` (the colour fix
    in host memory). `estimates`: bytes per stage as planned, the image-sized buffers alive through the
    stage included (`STAGES`); `untiled`: the plain stage's estimate where a tiled one was chosen."""

    budget: int
    size: tuple[int, int]  # (h0, w0) of the stage-1 image
    encode: VaeChoice = field(default_factory=VaeChoice)
    sample_tile: tuple[int, int] | None = None
    sample_tile_auto: bool = False
    cfg_batch: int = 1
    unbatched_cfg: bool = False
    decode: VaeChoice = field(default_factory=VaeChoice)
    post_rows: int | None = None
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
        """The stage-2 padding: 8 with tiled sampling, else 64 (VAE tiling is exact and does not count)."""
        return 8 if self.sample_tile is not None else 64

    @property
    def spill(self) -> int:
        """Bytes of paused VAE tiles planned on disk (encode and decode do not overlap)."""
        return max(self.encode.spill, self.decode.spill)

    @property
    def needed(self) -> int:
        """The largest stage estimate: what the plan needs. When it exceeds the budget, every stage that
        does not fit already took its leanest option, so this is the least any budget must give."""
        return max(self.estimates.values(), default=0)

    @property
    def fits(self) -> bool:
        return self.needed <= self.budget

    def over_budget(self) -> list[str]:
        return [name for name in STAGES if self.estimates.get(name, 0) > self.budget]

    def describe(self) -> str:
        def gib(n: int) -> str:
            return f"{n / 2**30:.1f} GiB" if n >= 2**30 // 10 else f"{n / 2**20:.0f} MiB"

        def part(name: str, what: str) -> str:
            est = self.estimates.get(name)
            text = f"{name} {what}" + (f" ~{gib(est)}" if est is not None else "")
            return text + (f" (untiled ~{gib(self.untiled[name])})" if name in self.untiled else "")

        sample = self.sample_tile
        parts = [
            part("encode", self.encode.describe("px")),
            part("sampling", f"tiles of {sample[0] * VAE_SCALE}/{sample[1] * VAE_SCALE} px" if sample else "untiled"),
            part("decode", self.decode.describe("latent px")),
            part("colour fix", f"in bands of {self.post_rows} rows" if self.post_rows else "whole")
            + (" on the CPU" if self.post_on_cpu else ""),
        ]
        if "guidance" in self.estimates:
            parts.append(f"guidance ~{gib(self.estimates['guidance'])}")
        return f"{self.size[1]}x{self.size[0]}, budget {gib(self.budget)}: " + "; ".join(parts)


def stage2_budget(device: torch.device | str, max_memory: int | None) -> int:
    """Bytes stage 2 plans for: SAFETY of what the device has free, at most `max_memory`."""
    return int(SAFETY * available_memory(device, max_memory))


def smallest_budget(needed: int) -> int:
    """The least --max-memory whose plan gives `needed` bytes (SAFETY of it), rounded up to a tenth of a
    GiB (below 1 GiB: to 16 MiB)."""
    cap = int(math.ceil(needed / SAFETY))
    step = 2**30 // 10 if cap > 2**30 else 16 << 20
    return -(-cap // step) * step


def format_size(n: int) -> str:
    """A --max-memory value: ``1.3GB``, or ``48MB`` below 1 GiB (powers of 1024, as the option reads them)."""
    return f"{n / 2**30:.1f}GB" if n >= 2**30 else f"{math.ceil(n / 2**20)}MB"


def _latent_size(h0: int, w0: int, pad: int) -> tuple[int, int]:
    """(h1, w1) and the sampled latent: the condition padded to `pad`, over 8; untiled the latent is then
    padded to 8."""
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
    spill: bool = True,
    host_room: int | None = None,
    stage1: int | None = None,
) -> MemoryPlan:
    """Tiles for stage 2 of an h0 x w0 stage-1 image within `budget` bytes.

    `dtype` is the UNet's, `vae_dtype` the VAE's (default: the same).
    `tile_size`/`tile_stride` (pixels, --tile-size/--tile-stride) fix the sampling tiles; otherwise
    sampling is untiled unless that would not fit, and then the largest latent tile (a multiple of 8,
    no larger than the latent's short side) that fits, with half-tile stride. The VAE is tiled whenever
    the plain one would not fit; its tiles are exact, so that never changes the result, and with
    `spill` the paused tiles that still do not fit go to disk. `cfg_batch`: 2 when cond and uncond go
    through one batched call. `guidance_space`: "latent"/"rgb" when restoration guidance is on.
    `host_room`: on an accelerator, the host memory paused tiles may take (beyond it they go to disk).
    `stage1`: stage 1's estimate, to budget it alongside (`stage1_floor`).
    """
    device = torch.device(device)
    vae_dtype = vae_dtype or dtype
    output_size = output_size or (h0, w0)
    plan = MemoryPlan(budget=int(budget), size=(int(h0), int(w0)))
    cond = COND_BYTES_PER_PIXEL * h0 * w0
    room = plan.budget - cond
    if stage1 is not None:
        plan.estimates["stage 1"] = int(stage1)

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
    plan.untiled["sampling"] = cond + whole
    if plan.sample_tile is None and not tile_size and whole > room:
        plan.sample_tile = sample_tile_for(unet_config, h0, w0, room, batch=cfg_batch, dtype=dtype, device=device)
        plan.sample_tile_auto = plan.sample_tile is not None
    if plan.sample_tile is not None:
        h, w = _latent_size(h0, w0, 8)
        size = plan.sample_tile[0]
        sampling = (sampling_peak_bytes(unet_config, size, size, batch=cfg_batch, dtype=dtype, device=device)
                    + sampler_buffer_bytes(h, w))
    else:
        sampling = whole
    plan.estimates["sampling"] = cond + sampling
    ph, pw = h * VAE_SCALE, w * VAE_SCALE  # the padded condition the VAE sees

    # the VAE: the encoder's input and the decoder's output are part of its estimate
    floor_in = ENCODE_INPUT_BYTES_PER_PIXEL * ph * pw  # pad(cond) * 2 - 1, before the encoder runs
    # a half-precision decoder's image comes back as float32 beside the half one: room the decoder's
    # own plan must leave (chosen without it, a tight budget got a plan that then did not fit)
    outside = {"encode": 0, "decode": (DECODED_BYTES_PER_PIXEL + DECODED_BYTES_PER_PIXEL // 2) * ph * pw
               if _is_half(vae_dtype) else 0}
    for name, tiles in (("encode", ENCODE_TILES), ("decode", DECODE_TILES)):
        choice = vae_choice(vae_config, ph, pw, tiles, part=name, room=room - outside[name], dtype=vae_dtype,
                            device=device, spill=spill, host_room=host_room)
        setattr(plan, name, choice)
        plan.estimates[name] = cond + outside[name] + choice.estimate
        plan.untiled[name] = cond + outside[name] + choice.untiled
    plan.estimates["encode"] = max(plan.estimates["encode"], cond + floor_in)

    if guidance_space == "latent":
        plan.estimates["guidance"] = plan.estimates["encode"]
    elif guidance_space == "rgb":
        plan.estimates["guidance"] = cond + int(GUIDANCE_RGB_BYTES_PER_PIXEL * ph * pw * (HALF_FACTOR if _is_half(vae_dtype) else 1))
        if plan.estimates["guidance"] > plan.budget:
            log.warning("rgb-space guidance needs about %.1f GiB at %dx%d (budget %.1f GiB) and cannot be tiled; "
                        "it may run out of memory (latent space needs far less)",
                        plan.estimates["guidance"] / 2**30, pw, ph, plan.budget / 2**30)

    # the colour fix on the decoded (padded-size) image, then the resize to the output size
    post_room = room - DECODED_BYTES_PER_PIXEL * ph * pw
    plan.post_rows = post_rows_for(ph, pw, post_room)
    resize = COND_BYTES_PER_PIXEL * output_size[0] * output_size[1] if tuple(output_size) != (h0, w0) else 0
    plan.estimates["colour fix"] = (cond + DECODED_BYTES_PER_PIXEL * ph * pw
                                    + max(post_peak_bytes(ph, pw, plan.post_rows), resize))
    plan.untiled["colour fix"] = cond + DECODED_BYTES_PER_PIXEL * ph * pw + post_peak_bytes(ph, pw, None)
    plan.post_on_cpu = device.type != "cpu" and plan.estimates["colour fix"] > plan.budget
    plan.estimates["output"] = OUTPUT_BYTES_PER_PIXEL * max(h0 * w0, output_size[0] * output_size[1])
    for name in ("encode", "decode", "sampling", "colour fix"):
        if plan.untiled.get(name) == plan.estimates.get(name) or plan.untiled.get(name, 0) <= cond:
            plan.untiled.pop(name, None)
    return plan


def post_rows_for(h: int, w: int, room: int) -> int | None:
    """None when the whole-image colour fix fits `room`; else the tallest band of POST_BANDS that fits
    (the smallest when none does)."""
    if post_peak_bytes(h, w, None) <= room:
        return None
    bands = [r for r in POST_BANDS if r < h] or [POST_BANDS[-1]]
    for rows in bands:
        if post_peak_bytes(h, w, rows) <= room:
            return rows
    return bands[-1]


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
               device: torch.device | str = "cpu", spill: bool = True, host_room: int | None = None) -> VaeChoice:
    """How to run the VAE over an h x w image within `room` bytes, cheapest first: the plain module;
    the exact tiled one with its paused tiles in memory (on CUDA then in host memory), then recomputing
    the inner ResNet activations; then (`spill`) the largest tile whose working set fits, keeping as
    many paused tiles in memory as the rest of `room` holds and the others on disk. The leanest when
    nothing fits. On CUDA, offloaded tiles beyond `host_room` go to disk."""
    device = torch.device(device)
    cuda = device.type == "cuda"

    def est(tile, recompute=False, offload=False, max_stored=None):
        return vae_estimate(vae_config, h, w, tile, part=part, dtype=dtype, device=device, offload=offload,
                            recompute=recompute, max_stored=max_stored)

    untiled = est(None).peak
    if untiled <= room:
        return VaeChoice(estimate=untiled, untiled=untiled)
    side = max(h, w) if part == "encode" else max(h, w) // VAE_SCALE
    candidates = [t for t in tiles if t < side] or [tiles[-1]]

    def with_host(choice: VaeChoice, stored: int) -> VaeChoice:
        """Offloaded tiles beyond host_room: on disk."""
        if not choice.offload or host_room is None or stored <= host_room or not spill:
            return choice
        e = est(choice.tile, choice.recompute, True, max(0, host_room))
        return VaeChoice(choice.tile, choice.recompute, True, choice.estimate, untiled, max(0, host_room), e.disk)

    modes = [(False, False)] + ([(False, True)] if cuda else []) + [(True, False)] + ([(True, True)] if cuda else [])
    for recompute, offload in modes:
        for tile in candidates:
            e = est(tile, recompute, offload)
            if e.peak <= room:
                return with_host(VaeChoice(tile, recompute, offload, e.peak, untiled), e.stored)
    leanest = None
    if spill:
        for recompute in (False, True):
            for tile in candidates:
                floor = est(tile, recompute, cuda, 0)
                if floor.peak <= room:
                    limit = room - floor.peak if not cuda else (host_room if host_room is not None else None)
                    e = est(tile, recompute, cuda, limit)
                    return VaeChoice(tile, recompute, cuda, max(e.peak, floor.peak), untiled, limit, e.disk)
                if leanest is None or floor.peak < leanest.estimate:
                    leanest = VaeChoice(tile, recompute, cuda, floor.peak, untiled, 0, floor.disk)
        return leanest
    tile = candidates[-1]
    e = est(tile, True, cuda)
    return VaeChoice(tile, True, cuda, e.peak, untiled)


# -- stage 1 ------------------------------------------------------------------------------------------------


def stage1_floor(kind: str, pipeline: str, lq_size: tuple[int, int], upscale: float, *, scale: int = 1,
                 dtype=torch.float32, multiple_of: int = 1, tile: int | None = None) -> int:
    """Stage 1's leanest estimate for an lq_size = (h, w) input (`restorecli.stage1.run`'s geometry):
    its smallest automatic tile (2 x the model's multiple), or the explicit `tile`, plus the image-sized
    buffers. The model input is the pre-upscaled image (swinir: the condition size, padded to 64;
    bsrnet: the input itself; generic: pre-upscaled by upscale / scale when that is above 1)."""
    from ..stage1.run import SWINIR_MULTIPLE, condition_size, output_size_for

    h, w = lq_size
    out = output_size_for(h, w, upscale)
    step, model_scale = 2 * SWINIR_MULTIPLE, 1
    if pipeline == "swinir":
        size = out if tile else condition_size(out)
        size = size if tile else tuple(-(-s // SWINIR_MULTIPLE) * SWINIR_MULTIPLE for s in size)
    elif pipeline == "scunet":
        size = tuple(-(-s // SWINIR_MULTIPLE) * SWINIR_MULTIPLE for s in out)
    elif pipeline == "bsrnet":
        size, model_scale = (h, w), scale
    else:
        size, model_scale = (h, w), scale
        if upscale > scale:
            size = output_size_for(h, w, upscale / scale)
        step = 2 * math.lcm(SWINIR_MULTIPLE, max(1, multiple_of))
    in_h, in_w = size
    if tile is None and min(in_h, in_w) >= step:
        tile = step
    return stage1_peak_bytes(kind, in_h, in_w, scale=model_scale, dtype=dtype, tile=tile)


def smaller_vae_tile(tile: int | None, side: int, *, part: str) -> int | None:
    """Half the tile (untiled: half the side), at least the smallest of ENCODE_TILES / DECODE_TILES;
    None when it cannot get smaller."""
    floor = (ENCODE_TILES if part == "encode" else DECODE_TILES)[-1]
    current = side if tile is None else min(tile, side)
    smaller = max(floor, current // 2)
    return smaller if smaller < current else None


def leaner_vae_choice(choice: VaeChoice, side: int, *, part: str, device: torch.device | str) -> VaeChoice | None:
    """The VAE's retry after an out-of-memory error: half the tile, recomputation on, on CUDA the paused
    tiles in host memory, and a planned memory limit for them halved (the rest on disk); None when
    nothing is left to shrink."""
    tile = smaller_vae_tile(choice.tile, side, part=part)
    offload = torch.device(device).type == "cuda"
    stored = None if choice.max_stored is None else choice.max_stored // 2
    if (tile is None and choice.tile is not None and choice.recompute and choice.offload == offload
            and not choice.max_stored):
        return None
    return VaeChoice(tile or choice.tile or side, True, offload, 0, choice.untiled, stored, choice.spill)


def smaller_sample_tile(tile: tuple[int, int] | None, h0: int, w0: int) -> tuple[int, int] | None:
    """Sampling tiles after an out-of-memory error: half the tile (multiple of 8, stride half of it);
    untiled: half the latent's short side. None when they cannot get smaller."""
    h, w = _latent_size(h0, w0, 8)
    current = tile[0] if tile is not None else min(h, w)
    size = current // 2 // 8 * 8
    if size < 8 or size >= current:
        return None
    return size, max(1, size // 2)
