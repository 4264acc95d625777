"""Exact, seam-free tiled encode and decode for diffusers' ``AutoencoderKL`` (tiled == untiled).

The VAE's full-resolution feature maps dominate a large restoration's memory, and the tilers at hand
change the result (diffusers' ``enable_tiling`` normalises every tile with its own GroupNorm
statistics and blends the seams; the official DiffBIR tiled VAE averages per-tile statistics). Here
the network is cut at every GroupNorm into stages run tile by tile with exactly the halo their
convolutions need; each stage collects the exact moments of its whole output while producing it, and
the next normalises every tile with them, so tiles agree with the untiled network to float rounding.
The mid-block attention runs on the whole 1/8-scale map. Between stages the paused tiles wait on the
device, in host memory (`offload`), or, beyond `max_stored_bytes`, in temporary files (read back through
short-lived memory maps), so memory need not hold whole feature maps. docs/memory.md explains the
algorithm, the memory model behind :func:`estimate` and the measurements.
"""

from __future__ import annotations

import bisect
import logging
import math
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import trim_freed_memory

logger = logging.getLogger("restorecli.vae")

__all__ = [
    "SpillError",
    "UnsupportedVAEError",
    "VaeEstimate",
    "check_spill_space",
    "default_spill_dir",
    "estimate",
    "estimate_peak_bytes",
    "posterior_mode",
    "tiled_decode",
    "tiled_encode",
]

DEFAULT_ENCODE_TILE = 512  # image pixels
DEFAULT_DECODE_TILE = 64  # latent pixels (512 image pixels)


class UnsupportedVAEError(NotImplementedError):
    """The VAE contains a block this tiler does not know how to split exactly (it names the block)."""


# --------------------------------------------------------------------------------------------------
# The program: the encoder or decoder cut at every GroupNorm into stages.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    """[GroupNorm with global statistics] -> [activation] -> [nearest x`up`] -> convolution."""

    conv: nn.Conv2d
    norm: nn.GroupNorm | None = None
    stats_key: str | None = None  # whose global moments the norm uses
    act: nn.Module | None = None
    up: int = 1
    # per axis (H, W): effective kernel, stride, zero padding before and after
    k: tuple[int, int] = (1, 1)
    s: tuple[int, int] = (1, 1)
    p_lo: tuple[int, int] = (0, 0)
    p_hi: tuple[int, int] = (0, 0)

    def out_len(self, n_in: int, axis: int) -> int:
        n = n_in * self.up + self.p_lo[axis] + self.p_hi[axis] - self.k[axis]
        return n // self.s[axis] + 1


@dataclass
class _Stage:
    name: str
    src: str
    key: str  # name of the output (a stored map, or only its statistics)
    layers: tuple[_Layer, ...] = ()
    residual: str | None = None  # output += shortcut(residual) (same resolution, core only)
    shortcut: nn.Conv2d | None = None
    out_scale: float = 1.0
    attn: nn.Module | None = None  # a global stage: the whole map through this module
    store: bool = True
    stats: bool = False  # accumulate the output's moments (a later GroupNorm needs them)


@dataclass
class _Program:
    input_key: str
    stages: list[_Stage] = field(default_factory=list)

    @property
    def output_key(self) -> str:
        return self.stages[-1].key


def _unsupported(what: str) -> UnsupportedVAEError:
    return UnsupportedVAEError(f"tiled VAE: {what} is not supported; use the untiled VAE for this model")


def _conv_layer(conv: nn.Module, where: str, *, extra_hi: int = 0, **kw) -> _Layer:
    if not isinstance(conv, nn.Conv2d):
        raise _unsupported(f"{where} ({type(conv).__name__}, expected Conv2d)")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise _unsupported(f"{where} (padding {conv.padding!r}, mode {conv.padding_mode!r})")
    k = tuple(d * (kk - 1) + 1 for d, kk in zip(conv.dilation, conv.kernel_size))
    p = tuple(conv.padding)
    return _Layer(conv=conv, k=k, s=tuple(conv.stride), p_lo=p, p_hi=(p[0] + extra_hi, p[1] + extra_hi), **kw)


class _Builder:
    def __init__(self, prefix: str, input_key: str, recompute: bool):
        self.prog = _Program(input_key)
        self.prefix = prefix
        self.recompute = recompute

    def chain(self, name: str, src: str, layers, **kw) -> str:
        key = f"{self.prefix}.{name}"
        self.prog.stages.append(_Stage(name=key, src=src, key=key, layers=tuple(layers), **kw))
        return key

    def resnet(self, name: str, src: str, r: nn.Module) -> str:
        from diffusers.models.resnet import ResnetBlock2D

        if type(r) is not ResnetBlock2D:
            raise _unsupported(f"{name} ({type(r).__name__})")
        if r.upsample is not None or r.downsample is not None:
            raise _unsupported(f"{name} (a ResnetBlock2D that resamples)")
        if r.time_emb_proj is not None:
            raise _unsupported(f"{name} (a ResnetBlock2D with a time embedding)")
        for n in ("norm1", "norm2"):
            if type(getattr(r, n)) is not nn.GroupNorm:
                raise _unsupported(f"{name}.{n} ({type(getattr(r, n)).__name__})")
        if r.training and r.dropout.p > 0:
            logger.warning("%s: dropout is active in training mode; the tiled VAE ignores it", name)
        l1 = _conv_layer(r.conv1, f"{name}.conv1", norm=r.norm1, stats_key=src, act=r.nonlinearity)
        sc = r.conv_shortcut
        if sc is not None and (tuple(sc.kernel_size) != (1, 1) or tuple(sc.stride) != (1, 1) or sc.padding != (0, 0)):
            raise _unsupported(f"{name}.conv_shortcut (not a 1x1 convolution)")
        res = dict(residual=src, shortcut=sc, out_scale=float(r.output_scale_factor))
        if self.recompute:
            # statistics of conv1's output only; conv2's stage recomputes conv1 from the block input
            h = self.chain(f"{name}.conv1", src, [l1], store=False)
            l2 = _conv_layer(r.conv2, f"{name}.conv2", norm=r.norm2, stats_key=h, act=r.nonlinearity)
            return self.chain(f"{name}.conv2", src, [l1, l2], **res)
        h = self.chain(f"{name}.conv1", src, [l1])
        l2 = _conv_layer(r.conv2, f"{name}.conv2", norm=r.norm2, stats_key=h, act=r.nonlinearity)
        return self.chain(f"{name}.conv2", h, [l2], **res)

    def attention(self, name: str, src: str, a: nn.Module) -> str:
        if getattr(a, "spatial_norm", None) is not None:
            raise _unsupported(f"{name} (attention with a spatial norm)")
        key = f"{self.prefix}.{name}"
        self.prog.stages.append(_Stage(name=key, src=src, key=key, attn=a))
        return key

    def mid(self, name: str, src: str, mb: nn.Module) -> str:
        if type(mb).__name__ != "UNetMidBlock2D":
            raise _unsupported(f"{name} ({type(mb).__name__})")
        cur = self.resnet(f"{name}.resnets.0", src, mb.resnets[0])
        for i, (a, r) in enumerate(zip(mb.attentions, mb.resnets[1:])):
            if a is not None:
                cur = self.attention(f"{name}.attentions.{i}", cur, a)
            cur = self.resnet(f"{name}.resnets.{i + 1}", cur, r)
        return cur

    def finish(self) -> _Program:
        needed = {lay.stats_key for st in self.prog.stages for lay in st.layers if lay.norm is not None}
        for st in self.prog.stages:
            st.stats = st.key in needed
        return self.prog


def _compile_encoder(vae: nn.Module, recompute: bool) -> _Program:
    """encoder -> quant_conv, as stages (diffusers' Encoder.forward and AutoencoderKL._encode)."""
    from diffusers.models.downsampling import Downsample2D

    enc = vae.encoder
    b = _Builder("encoder", "<image>", recompute)
    cur = b.chain("conv_in", "<image>", [_conv_layer(enc.conv_in, "encoder.conv_in")])
    for i, blk in enumerate(enc.down_blocks):
        name = f"down_blocks.{i}"
        if type(blk).__name__ != "DownEncoderBlock2D":
            raise _unsupported(f"encoder.{name} ({type(blk).__name__})")
        for j, r in enumerate(blk.resnets):
            cur = b.resnet(f"{name}.resnets.{j}", cur, r)
        for j, d in enumerate(blk.downsamplers or []):
            where = f"encoder.{name}.downsamplers.{j}"
            if type(d) is not Downsample2D or not d.use_conv or d.norm is not None:
                raise _unsupported(f"{where} ({type(d).__name__} without a plain strided conv)")
            # Downsample2D with padding=0 pads (0, 1, 0, 1) itself: asymmetric, after the image only
            extra = 1 if d.padding == 0 else 0
            cur = b.chain(f"{name}.downsamplers.{j}", cur, [_conv_layer(d.conv, where, extra_hi=extra)])
    cur = b.mid("mid_block", cur, enc.mid_block)
    if type(enc.conv_norm_out) is not nn.GroupNorm:
        raise _unsupported("encoder.conv_norm_out")
    layers = [_conv_layer(enc.conv_out, "encoder.conv_out", norm=enc.conv_norm_out, stats_key=cur, act=enc.conv_act)]
    if vae.quant_conv is not None:
        layers.append(_conv_layer(vae.quant_conv, "quant_conv"))
    b.chain("conv_out", cur, layers)
    return b.finish()


def _compile_decoder(vae: nn.Module, recompute: bool) -> _Program:
    """post_quant_conv -> decoder, as stages (diffusers' AutoencoderKL._decode and Decoder.forward)."""
    from diffusers.models.upsampling import Upsample2D

    dec = vae.decoder
    b = _Builder("decoder", "<latent>", recompute)
    layers = []
    if vae.post_quant_conv is not None:
        layers.append(_conv_layer(vae.post_quant_conv, "post_quant_conv"))
    layers.append(_conv_layer(dec.conv_in, "decoder.conv_in"))
    cur = b.chain("conv_in", "<latent>", layers)
    cur = b.mid("mid_block", cur, dec.mid_block)
    for i, blk in enumerate(dec.up_blocks):
        name = f"up_blocks.{i}"
        if type(blk).__name__ != "UpDecoderBlock2D":
            raise _unsupported(f"decoder.{name} ({type(blk).__name__})")
        for j, r in enumerate(blk.resnets):
            cur = b.resnet(f"{name}.resnets.{j}", cur, r)
        for j, u in enumerate(blk.upsamplers or []):
            where = f"decoder.{name}.upsamplers.{j}"
            conv = getattr(u, "conv", None) or getattr(u, "Conv2d_0", None)
            if type(u) is not Upsample2D or u.use_conv_transpose or not u.interpolate or u.norm is not None or conv is None:
                raise _unsupported(f"{where} (only nearest x2 followed by a conv)")
            cur = b.chain(f"{name}.upsamplers.{j}", cur, [_conv_layer(conv, where, up=2)])
    if type(dec.conv_norm_out) is not nn.GroupNorm:
        raise _unsupported(f"decoder.conv_norm_out ({type(dec.conv_norm_out).__name__})")
    b.chain(
        "conv_out",
        cur,
        [_conv_layer(dec.conv_out, "decoder.conv_out", norm=dec.conv_norm_out, stats_key=cur, act=dec.conv_act)],
    )
    return b.finish()


# --------------------------------------------------------------------------------------------------
# Geometry: shapes, grids, and the input region each output tile needs.
# --------------------------------------------------------------------------------------------------


def _stage_channels(st: _Stage, shapes: dict[str, tuple[int, int, int]]) -> int:
    return shapes[st.src][0] if st.attn is not None else st.layers[-1].conv.out_channels


def _infer_shapes(prog: _Program, in_shape: tuple[int, int, int]) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every map, from the layers' geometry."""
    shapes = {prog.input_key: in_shape}
    for st in prog.stages:
        c, h, w = shapes[st.src]
        if st.attn is None:
            for lay in st.layers:
                h, w = lay.out_len(h, 0), lay.out_len(w, 1)
                if h <= 0 or w <= 0:
                    raise ValueError(f"tiled VAE: input {in_shape[1]}x{in_shape[2]} is too small for {st.name}")
        shapes[st.key] = (_stage_channels(st, shapes), h, w)
    return shapes


def _split(n: int, t: int) -> tuple[tuple[int, int], ...]:
    """[0, n) in ceil(n / t) nearly equal parts."""
    k = max(1, -(-n // max(1, t)))
    return tuple(((i * n) // k, ((i + 1) * n) // k) for i in range(k))


@dataclass(frozen=True)
class _Grid:
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]

    def cells(self):
        for i, r in enumerate(self.rows):
            for j, c in enumerate(self.cols):
                yield (i, j), r, c

    @staticmethod
    def _hits(parts, lo: int, hi: int) -> range:
        starts = [a for a, _ in parts]
        first = bisect.bisect_right(starts, lo) - 1
        last = bisect.bisect_left(starts, hi) - 1
        return range(max(first, 0), last + 1)

    def covering(self, r: tuple[int, int], c: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """Tiles overlapping rows r x cols c: (index, row range, col range) of each intersection."""
        out = []
        for i in self._hits(self.rows, *r):
            r0, r1 = max(r[0], self.rows[i][0]), min(r[1], self.rows[i][1])
            for j in self._hits(self.cols, *c):
                c0, c1 = max(c[0], self.cols[j][0]), min(c[1], self.cols[j][1])
                if r1 > r0 and c1 > c0:
                    out.append(((i, j), (r0, r1), (c0, c1)))
        return out


def _plan_grids(shapes: dict[str, tuple[int, int, int]], top_tile: int) -> dict[tuple[int, int], _Grid]:
    """One grid per resolution, with the element budget of a top_tile^2 tile at the top resolution."""
    cmax: dict[tuple[int, int], int] = {}
    for c, h, w in shapes.values():
        cmax[(h, w)] = max(cmax.get((h, w), 0), c)
    top = max(cmax, key=lambda hw: hw[0] * hw[1])
    budget = top_tile * top_tile * cmax[top]
    grids = {}
    for (h, w), c in cmax.items():
        side = top_tile if (h, w) == top else max(1, math.isqrt(budget // c))
        grids[(h, w)] = _Grid(_split(h, side), _split(w, side))
    return grids


@dataclass(frozen=True)
class _Step:
    """How one layer turns its input region into its output region, along one axis."""

    src: tuple[int, int]  # region of the layer input that is read (inside the map)
    crop: tuple[int, int]  # after upsampling, the part of [up*src0, up*src1) that is kept
    pad: tuple[int, int]  # zeros added before / after (the convolution's padding at the border)


def _regions(layers: tuple[_Layer, ...], n_in: list[tuple[int, int]], out: tuple[tuple[int, int], tuple[int, int]]):
    """Backward through the chain: per layer and axis, the steps that produce `out` (rows, cols)."""
    steps: list[tuple[_Step, _Step]] = [None] * len(layers)  # type: ignore[list-item]
    need = list(out)
    for li in range(len(layers) - 1, -1, -1):
        lay = layers[li]
        per_axis = []
        for ax in (0, 1):
            a, b = need[ax]
            lo = a * lay.s[ax] - lay.p_lo[ax]
            hi = (b - 1) * lay.s[ax] - lay.p_lo[ax] + lay.k[ax]
            n_conv = n_in[li][ax] * lay.up
            c0, c1 = max(lo, 0), min(hi, n_conv)
            s0, s1 = c0 // lay.up, (c1 - 1) // lay.up + 1
            per_axis.append(_Step((s0, s1), (c0 - s0 * lay.up, c1 - s0 * lay.up), (c0 - lo, hi - c1)))
            need[ax] = (s0, s1)
        steps[li] = (per_axis[0], per_axis[1])
    return steps


def _layer_inputs(st: _Stage, shapes) -> list[tuple[int, int]]:
    _, h, w = shapes[st.src]
    n = [(h, w)]
    for lay in st.layers[:-1]:
        h, w = lay.out_len(h, 0), lay.out_len(w, 1)
        n.append((h, w))
    return n


# --------------------------------------------------------------------------------------------------
# Global GroupNorm statistics.
# --------------------------------------------------------------------------------------------------


def _tile_moments(x: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) mean and sum of squared deviations of one tile, in `acc`.

    Both are two-pass (the mean first, then the squared deviations from it), so nothing cancels when
    the mean is large against the spread, unlike sum(x) with sum(x^2). CUDA: one var_mean kernel. CPU:
    var_mean is a slow scalar Welford loop there, so batch-norm's statistics kernel (vectorised two
    passes, no temporaries) runs over the (1, B*C, h, w) view; without it, chunks of channels.
    """
    b, c, h, w = x.shape
    if x.device.type != "cpu":
        var, mean = torch.var_mean(x.to(acc), dim=(2, 3), correction=0)
        return mean, var * (h * w)
    xa = x.to(acc)
    try:
        mean, var = torch.batch_norm_update_stats(xa.reshape(1, b * c, h, w), None, None, 0.0)
        return mean.view(b, c), var.view(b, c) * (h * w)  # biased variance
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without the CPU op
        pass
    xv = xa.reshape(b, c, h * w)
    mean = xv.mean(2)
    m2 = torch.empty_like(mean)
    step = max(1, (1 << 20) // max(1, h * w))
    for c0 in range(0, c, step):
        d = xv[:, c0 : c0 + step] - mean[:, c0 : c0 + step, None]
        m2[:, c0 : c0 + step] = torch.linalg.vector_norm(d, dim=2).square()
    return mean, m2


class _Moments:
    """Per (sample, channel): count, mean and sum of squared deviations, merged across tiles.

    Each tile's moments are taken in fp32 (fp64 for fp64 models) by two passes over the tile; tiles are
    merged in float64 with the parallel-variance update of Chan, Golub and LeVeque (1979). Unlike
    sum(x) and sum(x^2), neither step cancels when the mean is large against the deviation.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        cnt = x.shape[-1] * x.shape[-2]
        if cnt == 0:
            return
        mean, m2 = _tile_moments(x, _acc_dtype(x.dtype))
        mean = mean.to(self.device, torch.float64)
        m2 = m2.to(self.device, torch.float64)
        if self.n == 0:
            self.n, self.mean, self.m2 = cnt, mean, m2
            return
        n = self.n + cnt
        delta = mean - self.mean
        self.mean = self.mean + delta * (cnt / n)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * cnt / n)
        self.n = n

    def affine(self, gn: nn.GroupNorm, device: torch.device, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of shape (B, C, 1, 1), in `acc`, so that GroupNorm(x) = x * scale + shift."""
        bsz, c = self.mean.shape
        g = gn.num_groups
        mean_c = self.mean.view(bsz, g, c // g)
        mean_g = mean_c.mean(-1, keepdim=True)
        m2_g = self.m2.view(bsz, g, c // g).sum(-1, keepdim=True) + self.n * ((mean_c - mean_g) ** 2).sum(-1, keepdim=True)
        rstd = (m2_g / (self.n * (c // g)) + gn.eps).rsqrt()  # biased variance, like torch
        rstd = rstd.expand(bsz, g, c // g).reshape(bsz, c)
        mean = mean_g.expand(bsz, g, c // g).reshape(bsz, c)
        scale = rstd
        shift = -mean * rstd
        if gn.affine:
            w = gn.weight.detach().to(self.device, torch.float64)
            b = gn.bias.detach().to(self.device, torch.float64)
            scale = rstd * w
            shift = b - mean * scale
        return (
            scale.to(device, acc)[:, :, None, None],
            shift.to(device, acc)[:, :, None, None],
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """GroupNorm arithmetic: fp32 for fp32 and half types (as torch's kernels), fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Stored maps.
# --------------------------------------------------------------------------------------------------


class _Counter:
    def __init__(self):
        self.live = 0
        self.peak = 0

    def add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def sub(self, n: int) -> None:
        self.live -= n


class _FullMap:
    """A whole tensor (the caller's input, the attention's output, the final output)."""

    def __init__(self, t: torch.Tensor, counter: _Counter | None = None):
        self.t = t
        self.counter = counter
        if counter is not None:
            counter.add(t.numel() * t.element_size())

    @property
    def shape(self):
        return tuple(self.t.shape)

    def read(self, r, c, device, dtype) -> torch.Tensor:
        return self.t[:, :, r[0] : r[1], c[0] : c[1]].to(device=device, dtype=dtype)

    def read_into(self, r, c, out: torch.Tensor) -> None:
        out.copy_(self.t[:, :, r[0] : r[1], c[0] : c[1]])

    def put(self, r, c, x: torch.Tensor) -> None:
        self.t[:, :, r[0] : r[1], c[0] : c[1]].copy_(x)

    def drop_all(self) -> None:
        if self.counter is not None:
            self.counter.sub(self.t.numel() * self.t.element_size())
        self.t = None  # type: ignore[assignment]


class SpillError(OSError):
    """The paused feature maps that do not fit in memory cannot go to disk either (no room, unwritable)."""


#: Free disk kept beyond the estimated spill, and the estimate's margin.
SPILL_MARGIN_BYTES = 64 << 20
SPILL_MARGIN = 1.1
_PAGE = 4096


def default_spill_dir() -> Path:
    """Where paused tiles go by default: ``tmp/`` in restorecli's own folder ($RESTORE_HOME), a disk
    (the system temporary folder is often a RAM-backed tmpfs, which would defeat the point)."""
    from ..weights import weights_home

    return weights_home() / "tmp"


class _Spill:
    """Paused tiles beyond `limit` bytes of memory, in temporary files under a private folder of `root`.

    One file per feature map, tiles appended at page-aligned offsets; a region is read back through a
    memory map of just the tile it lies in, unmapped once copied, so only the pages a read touches are
    resident and only while it copies (a long-lived mapping would keep every page it ever touched in the
    resident set). A map's file is closed, and its space returned, when the map is dropped. `close()`
    (the engine calls it in a ``finally``: errors and Ctrl-C too) closes every file and removes the
    folder; on POSIX each file is unlinked the moment it is created, so not even a killed process
    leaves data behind.
    """

    def __init__(self, root: str | os.PathLike, limit: int):
        self.root = Path(root)
        self.limit = max(0, int(limit))
        self.folder: str | None = None
        self.files: list[_SpillFile] = []
        self.live = 0  # bytes in open files
        self.peak = 0
        self.written = 0

    def open(self) -> "_SpillFile":
        try:
            if self.folder is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self.folder = tempfile.mkdtemp(prefix="restorecli-vae-", dir=self.root)
            f = tempfile.TemporaryFile(dir=self.folder, buffering=0)
        except OSError as e:
            raise SpillError(f"cannot create the tiled VAE's temporary file in {self.root}: {e.strerror or e}") from e
        sf = _SpillFile(self, f)
        self.files.append(sf)
        return sf

    def grow(self, n: int) -> None:
        self.live += n
        self.written += n
        self.peak = max(self.peak, self.live)

    def close(self) -> None:
        for sf in self.files:
            sf.close()
        self.files.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class _SpillFile:
    """The spilled tiles of one feature map: {cell: (offset, shape, dtype)} in one temporary file."""

    def __init__(self, spill: _Spill, f):
        self.spill = spill
        self.f = f
        self.end = 0
        self.tiles: dict[tuple[int, int], tuple[int, tuple[int, ...], torch.dtype]] = {}

    def put(self, ij, x: torch.Tensor) -> None:
        data = x.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        offset = self.end
        try:
            self.f.seek(offset)
            view = memoryview(raw)
            while view.nbytes:
                view = view[self.f.write(view):]
        except OSError as e:
            raise SpillError(f"cannot write the tiled VAE's paused tiles to {self.spill.root}: "
                             f"{e.strerror or e}; free disk space there or raise `max_memory`") from e
        n = raw.nbytes
        self.end = offset + -(-n // _PAGE) * _PAGE
        self.spill.grow(self.end - offset)
        self.tiles[ij] = (offset, tuple(data.shape), data.dtype)

    def __contains__(self, ij) -> bool:
        return ij in self.tiles

    def copy_region(self, ij, rows: slice, cols: slice, out: torch.Tensor) -> None:
        """out.copy_(tile[:, :, rows, cols]) through a memory map of that tile alone, unmapped at once."""
        offset, shape, dtype = self.tiles[ij]
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(self.f.fileno(), n + offset - start, offset=start, access=mmap.ACCESS_COPY)
        try:
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=offset - start)
            out.copy_(raw.view(dtype).view(shape)[:, :, rows, cols])
            del raw
        finally:
            mm.close()

    def drop(self, ij) -> None:
        self.tiles.pop(ij, None)
        if not self.tiles:
            self.close()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
            self.spill.live -= self.end
            self.end = 0


class _TiledMap:
    """A feature map kept as one tensor per grid cell: on the compute device, offloaded to host memory,
    or (beyond the spill's memory limit) in a temporary file."""

    def __init__(self, shape, grid: _Grid, device: torch.device, counter: _Counter, spill: _Spill | None = None):
        self.shape = shape
        self.grid = grid
        self.device = device
        self.counter = counter
        self.spill = spill
        self.disk: _SpillFile | None = None
        self.tiles: dict[tuple[int, int], torch.Tensor] = {}

    def put_tile(self, ij, x: torch.Tensor) -> None:
        n = x.numel() * x.element_size()
        if self.spill is not None and self.counter.live + n > self.spill.limit:
            if self.disk is None or self.disk.f.closed:
                self.disk = self.spill.open()
            self.disk.put(ij, x)
            return
        x = x.to(self.device)
        self.tiles[ij] = x
        self.counter.add(n)

    def read(self, r, c, device, dtype) -> torch.Tensor:
        parts = self.grid.covering(r, c)
        if len(parts) == 1 and parts[0][0] in self.tiles:
            ij, _, _ = parts[0]
            (r0, _), (c0, _) = self.grid.rows[ij[0]], self.grid.cols[ij[1]]
            t = self.tiles[ij][:, :, r[0] - r0 : r[1] - r0, c[0] - c0 : c[1] - c0]
            return t.to(device=device, dtype=dtype)
        out = torch.empty((*self.shape[:2], r[1] - r[0], c[1] - c[0]), device=device, dtype=dtype)
        self.read_into(r, c, out, parts)
        return out

    def read_into(self, r, c, out: torch.Tensor, parts=None) -> None:
        for ij, (a, b), (cc, d) in parts or self.grid.covering(r, c):
            (r0, _), (c0, _) = self.grid.rows[ij[0]], self.grid.cols[ij[1]]
            rows, cols = slice(a - r0, b - r0), slice(cc - c0, d - c0)
            dst = out[:, :, a - r[0] : b - r[0], cc - c[0] : d - c[0]]
            if ij in self.tiles:
                dst.copy_(self.tiles[ij][:, :, rows, cols])
            else:
                self.disk.copy_region(ij, rows, cols, dst)

    def drop(self, ij) -> None:
        t = self.tiles.pop(ij, None)
        if t is not None:
            self.counter.sub(t.numel() * t.element_size())
        elif self.disk is not None and ij in self.disk:
            self.disk.drop(ij)

    def drop_all(self) -> None:
        for ij in list(self.tiles):
            self.drop(ij)
        if self.disk is not None:
            self.disk.close()


# --------------------------------------------------------------------------------------------------
# The engine.
# --------------------------------------------------------------------------------------------------


class _Engine:
    def __init__(self, prog: _Program, grids, *, device, dtype, store_device, shapes, spill: _Spill | None = None):
        self.prog = prog
        self.spill = spill
        self.grids = grids
        self.device = device
        self.dtype = dtype
        self.store_device = store_device
        self.shapes = shapes
        self.counter = _Counter()
        self.moments_device = torch.device("cpu") if device.type == "mps" else device
        self.moments: dict[str, _Moments] = {}
        self.affines: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_use: dict[str, int] = {}
        for i, st in enumerate(prog.stages):
            for k in (st.src, st.residual):
                if k is not None:
                    self.last_use[k] = i

    def _affine(self, lay: _Layer):
        key = (lay.stats_key, id(lay.norm))
        if key not in self.affines:
            self.affines[key] = self.moments[lay.stats_key].affine(lay.norm, self.device, _acc_dtype(self.dtype))
        return self.affines[key]

    def run(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        try:
            return self._run(x, batch)
        finally:
            if self.spill is not None:
                self.spill.close()

    def _run(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        maps: dict[str, Any] = {self.prog.input_key: _FullMap(x)}
        for i, st in enumerate(self.prog.stages):
            last = i == len(self.prog.stages) - 1
            c, h, w = self.shapes[st.key]
            if st.attn is not None:
                out = self._global(st, maps)
            else:
                if last:
                    target = _FullMap(torch.empty((batch, c, h, w), device=self.device, dtype=self.dtype))
                elif st.store:
                    target = _TiledMap((batch, c, h, w), self.grids[(h, w)], self.store_device, self.counter, self.spill)
                else:
                    target = None
                out = self._chain(st, maps, target, i)
            if out is not None:
                maps[st.key] = out
            for k in {st.src, st.residual} - {None}:
                if self.last_use[k] == i and k != self.prog.input_key:
                    maps.pop(k).drop_all()
            trim_freed_memory()  # the stage's tiles, below glibc's mmap threshold, would otherwise stay resident
            logger.debug("%s done; stored %.1f MiB in memory, %.1f MiB on disk", st.name, self.counter.live / 2**20,
                         self.spill.live / 2**20 if self.spill is not None else 0.0)
        return maps[self.prog.output_key].t

    def _global(self, st: _Stage, maps) -> _FullMap:
        src = maps[st.src]
        _, h, w = self.shapes[st.src]
        x = src.read((0, h), (0, w), self.device, self.dtype)
        y = st.attn(x)
        del x
        if st.stats:
            m = self.moments[st.key] = _Moments(self.moments_device)
            m.add(y)
        return _FullMap(y.to(self.store_device), self.counter)

    def _chain(self, st: _Stage, maps, target, index: int):
        src = maps[st.src]
        res = maps[st.residual] if st.residual is not None else None
        _, h, w = self.shapes[st.key]
        grid = self.grids[(h, w)]
        n_in = _layer_inputs(st, self.shapes)
        cells = list(grid.cells())
        plans = [_regions(st.layers, n_in, (r, c)) for _, r, c in cells]
        if st.stats:
            self.moments[st.key] = _Moments(self.moments_device)

        # release each input tile right after the last output tile that reads it
        release: dict[int, list[tuple[Any, tuple[int, int]]]] = {}
        for k in {st.src, st.residual} - {None}:
            m = maps[k]
            if self.last_use[k] != index or not isinstance(m, _TiledMap):
                continue
            last: dict[tuple[int, int], int] = {}
            for n, ((_, r, c), plan) in enumerate(zip(cells, plans)):
                reads = []
                if k == st.src:
                    reads.append((plan[0][0].src, plan[0][1].src))
                if k == st.residual:
                    reads.append((r, c))
                for rr, cc in reads:
                    for ij, _, _ in m.grid.covering(rr, cc):
                        last[ij] = n
            for ij, n in last.items():
                release.setdefault(n, []).append((m, ij))

        for n, ((ij, r, c), plan) in enumerate(zip(cells, plans)):
            y = src
            for lay, (sr, sc) in zip(st.layers, plan):
                y = self._conv_input(lay, sr, sc, y)
                conv = lay.conv
                y = F.conv2d(y, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
            if res is not None:
                x_res = res.read(r, c, self.device, self.dtype)
                if st.shortcut is not None:
                    x_res = st.shortcut(x_res)
                y.add_(x_res)  # (input_tensor + hidden_states) / output_scale_factor, as ResnetBlock2D
                del x_res
                if st.out_scale != 1.0:
                    y.div_(st.out_scale)
            if st.stats:
                self.moments[st.key].add(y)
            if isinstance(target, _FullMap):
                target.put(r, c, y)
            elif target is not None:
                target.put_tile(ij, y)
            del y
            for m, tij in release.get(n, ()):
                m.drop(tij)
        return target

    def _conv_input(self, lay: _Layer, sr: _Step, sc: _Step, source) -> torch.Tensor:
        """The zero-padded input of a layer's convolution for one tile.

        `source` is a stored map (the stage's first layer reads its region from it) or the previous
        layer's output. The region goes straight into the interior of the padded buffer, where the
        GroupNorm and the activation are applied in place: no separate padded copy.
        """
        region = (sr.src, sc.src)
        pads = (sc.pad[0], sc.pad[1], sr.pad[0], sr.pad[1])
        if lay.up == 1 and lay.norm is None and lay.act is None and not any(pads):
            return source.read(*region, self.device, self.dtype) if not torch.is_tensor(source) else source
        hh, ww = sr.crop[1] - sr.crop[0], sc.crop[1] - sc.crop[0]
        bsz, ch = (source.shape[0], source.shape[1])
        buf = torch.empty((bsz, ch, hh + pads[2] + pads[3], ww + pads[0] + pads[1]), device=self.device, dtype=self.dtype)
        if any(pads):
            buf[:, :, : pads[2]].zero_()
            buf[:, :, hh + pads[2] :].zero_()
            buf[:, :, :, : pads[0]].zero_()
            buf[:, :, :, ww + pads[0] :].zero_()
        inner = buf[:, :, pads[2] : pads[2] + hh, pads[0] : pads[0] + ww]
        if lay.up != 1:
            x = source if torch.is_tensor(source) else source.read(*region, self.device, self.dtype)
            x = F.interpolate(x, scale_factor=float(lay.up), mode="nearest")
            inner.copy_(x[:, :, sr.crop[0] : sr.crop[1], sc.crop[0] : sc.crop[1]])
            del x
        elif torch.is_tensor(source):
            inner.copy_(source)
        else:
            source.read_into(*region, inner)
        if lay.norm is not None:
            scale, shift = self._affine(lay)
            if inner.dtype == scale.dtype:
                torch.addcmul(shift, inner, scale, out=inner)
            else:
                inner.copy_(torch.addcmul(shift, inner.to(scale.dtype), scale))
        if lay.act is not None:
            if type(lay.act) is nn.SiLU:
                F.silu(inner, inplace=True)
            else:
                inner.copy_(lay.act(inner))
        return buf


# --------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------


def _vae_device_dtype(vae: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = vae.decoder.conv_in.weight
    return p.device, p.dtype


def _check_input(name: str, t: torch.Tensor, channels: int, tile_size: int) -> None:
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"`{name}` must be (B, {channels}, H, W), got {tuple(t.shape)}")
    if int(tile_size) < 1:
        raise ValueError(f"`tile_size` must be >= 1, got {tile_size}")


def _resolve_offload(offload: bool | None, device: torch.device, est_bytes: int) -> bool:
    if offload is not None:
        return bool(offload)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return est_bytes > 0.5 * free


def check_spill_space(folder: str | os.PathLike, need: int) -> None:
    """SpillError unless `folder` (created if missing) has room for `need` bytes of paused tiles, with
    SPILL_MARGIN and SPILL_MARGIN_BYTES to spare."""
    if need <= 0:
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise SpillError(f"cannot use {folder} for the tiled VAE's temporary files: {e.strerror or e}") from e
    want = int(need * SPILL_MARGIN) + SPILL_MARGIN_BYTES
    if free < want:
        raise SpillError(
            f"the tiled VAE needs about {want / 2**30:.1f} GiB of free disk in {folder} for the feature maps "
            f"that do not fit in memory, and {free / 2**30:.1f} GiB is free; free some space, set RESTORE_HOME "
            "to a larger disk or raise `max_memory`",
        )


def _run(
    vae: nn.Module,
    x: torch.Tensor,
    prog: _Program,
    top_tile: int,
    offload: bool | None,
    info: dict | None,
    what: str,
    max_stored_bytes: int | None = None,
    spill_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    device, dtype = _vae_device_dtype(vae)
    bsz, c, h, w = x.shape
    shapes = _infer_shapes(prog, (c, h, w))
    grids = _plan_grids(shapes, top_tile)
    elem = torch.empty((), dtype=dtype).element_size()
    stored_est = _simulate(prog, shapes, grids, elem, bsz, offload=False).stored
    use_offload = _resolve_offload(offload, device, stored_est) and device.type != "cpu"
    store_device = torch.device("cpu") if use_offload else device
    spill = None
    if max_stored_bytes is not None:
        folder = Path(spill_dir) if spill_dir is not None else default_spill_dir()
        disk = _simulate(prog, shapes, grids, elem, bsz, offload=use_offload, store_limit=max_stored_bytes).disk
        check_spill_space(folder, disk)
        spill = _Spill(folder, max_stored_bytes)
    logger.debug(
        "tiled %s %dx%d: %s; offload=%s (stored maps ~%.0f MiB, at most %s in memory)",
        what, h, w,
        ", ".join(f"{hw[0]}x{hw[1]}: {len(g.rows)}x{len(g.cols)}" for hw, g in grids.items()),
        use_offload, stored_est / 2**20, "all" if spill is None else f"{spill.limit / 2**20:.0f} MiB",
    )
    eng = _Engine(prog, grids, device=device, dtype=dtype, store_device=store_device, shapes=shapes, spill=spill)
    y = eng.run(x, bsz)
    if info is not None:
        info.update(
            fast_path=False,
            offload=use_offload,
            stages=len(prog.stages),
            grids={hw: (len(g.rows), len(g.cols)) for hw, g in grids.items()},
            peak_stored_bytes=eng.counter.peak,
            spilled_bytes=spill.written if spill is not None else 0,
            peak_disk_bytes=spill.peak if spill is not None else 0,
        )
    return y


@torch.no_grad()
def tiled_encode(
    vae: nn.Module,
    x: torch.Tensor,
    *,
    tile_size: int = DEFAULT_ENCODE_TILE,
    offload: bool | None = None,
    recompute: bool = False,
    max_stored_bytes: int | None = None,
    spill_dir: str | os.PathLike | None = None,
    return_mode: bool = False,
    info: dict | None = None,
) -> torch.Tensor:
    """Encode images x (B, 3, H, W), in [-1, 1], with an AutoencoderKL; equal to the untiled encoder.

    Returns the posterior moments (B, 2 * latent_channels, h, w) = quant_conv(encoder(x)) (wrap them in
    diffusers' ``DiagonalGaussianDistribution`` if needed), or with ``return_mode=True`` the posterior mode
    (the mean, the first half of the channels). The latent scale factor is the caller's.

    tile_size: tile side in image pixels at the full-resolution stages (any H, W are fine; multiples of
        8 waste least). An image with H, W <= tile_size runs the plain untiled modules.
    offload: keep the paused tile states in host memory instead of on the device (None: automatic,
        when they would take more than half of the free CUDA memory). No effect on CPU.
    recompute: recompute each ResNet block's inner activation instead of storing it (less memory,
        about +35% time).
    max_stored_bytes: keep at most this many bytes of paused tiles in memory (device, or host with
        offload); the rest go to temporary files in `spill_dir` (default: ``$RESTORE_HOME/tmp``), whose
        free space is checked first (SpillError) and which are removed afterwards, also on errors.
        None: everything in memory. The result is the same either way.
    info: if a dict is given, it is filled with what was done (grids, stages, peak stored bytes, bytes
        spilled to disk).
    """
    _check_input("x", x, vae.encoder.conv_in.in_channels, tile_size)
    device, dtype = _vae_device_dtype(vae)
    if x.shape[-2] <= tile_size and x.shape[-1] <= tile_size:
        moments = vae.encoder(x.to(device=device, dtype=dtype))
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
        if info is not None:
            info.update(fast_path=True, spilled_bytes=0)
    else:
        prog = _compile_encoder(vae, recompute)
        moments = _run(vae, x, prog, int(tile_size), offload, info, "encode", max_stored_bytes, spill_dir)
    return posterior_mode(moments) if return_mode else moments


@torch.no_grad()
def tiled_decode(
    vae: nn.Module,
    z: torch.Tensor,
    *,
    tile_size: int = DEFAULT_DECODE_TILE,
    offload: bool | None = None,
    recompute: bool = False,
    max_stored_bytes: int | None = None,
    spill_dir: str | os.PathLike | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """Decode latents z (B, latent_channels, h, w), already divided by the scale factor, to images.

    Equal to ``decoder(post_quant_conv(z))``, in the VAE's dtype; no clamping.

    tile_size: tile side in latent pixels (x8 image pixels at the full-resolution stages). Latents with
        h, w <= tile_size run the plain untiled modules.
    offload, recompute, max_stored_bytes, spill_dir, info: as in :func:`tiled_encode`.
    """
    _check_input("z", z, vae.decoder.conv_in.in_channels, tile_size)
    device, dtype = _vae_device_dtype(vae)
    if z.shape[-2] <= tile_size and z.shape[-1] <= tile_size:
        z = z.to(device=device, dtype=dtype)
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        if info is not None:
            info.update(fast_path=True, spilled_bytes=0)
        return vae.decoder(z)
    prog = _compile_decoder(vae, recompute)
    scale = _upscale(prog, z.shape[-2:])
    return _run(vae, z, prog, int(tile_size) * scale, offload, info, "decode", max_stored_bytes, spill_dir)


def _upscale(prog: _Program, hw) -> int:
    shapes = _infer_shapes(prog, (1, int(hw[0]), int(hw[1])))
    return max(1, shapes[prog.output_key][1] // int(hw[0]))


def posterior_mode(moments: torch.Tensor) -> torch.Tensor:
    """The mean half of the moments (DiagonalGaussianDistribution.mode())."""
    return moments.chunk(2, dim=1)[0]


# --------------------------------------------------------------------------------------------------
# Memory estimate (for the automatic tile planner).
# --------------------------------------------------------------------------------------------------


def _chain_working_set(st: _Stage, plan, shapes, elem: int, core: tuple[int, int], *, untiled: bool) -> int:
    """Bytes alive while one tile of a chain stage is computed, at its worst op.

    Tiles (see _Engine._conv_input): per layer the padded input buffer, normalised and activated in
    place (half precision: two fp32 temporaries), then the convolution's output; nearest x2 first
    reads the region and upsamples it; the residual is added in place. The untiled modules allocate
    each op's output anew (GroupNorm, activation, convolution, shortcut, sum) and hold their input
    until they return.
    """
    seq: list[int] = []  # successive tensors, in bytes; an op holds its input and output
    spikes: list[int] = []  # moments with more alive
    held = 0
    c_prev = shapes[st.src][0]
    for li, (lay, (sr, sc)) in enumerate(zip(st.layers, plan)):
        n_in = (sr.src[1] - sr.src[0]) * (sc.src[1] - sc.src[0]) * c_prev * elem
        n_buf = (sr.crop[1] - sr.crop[0] + sum(sr.pad)) * (sc.crop[1] - sc.crop[0] + sum(sc.pad)) * c_prev * elem
        hh = (sr.crop[1] - sr.crop[0] + sum(sr.pad) - lay.k[0]) // lay.s[0] + 1
        ww = (sc.crop[1] - sc.crop[0] + sum(sc.pad) - lay.k[1]) // lay.s[1] + 1
        c_prev = lay.conv.out_channels
        n_out = hh * ww * c_prev * elem
        if untiled:
            if li == 0:
                held = n_in
                seq.append(0)
            for present in (lay.norm is not None, lay.act is not None):
                if present:
                    seq.append(n_in)
            if lay.up != 1:
                seq.append(n_in * lay.up * lay.up)
        else:
            if lay.up != 1:
                spikes.append((seq[-1] if seq else 0) + n_in + n_in * lay.up * lay.up + n_buf)
            if lay.norm is not None and elem < 4:
                spikes.append((seq[-1] if seq else 0) + n_buf + 2 * (n_buf // elem) * 4)
            if lay.s != (1, 1):  # oneDNN reorders a strided convolution's input into a blocked copy
                spikes.append(2 * n_buf + n_out)
            seq.append(n_buf)
        seq.append(n_out)
    if st.residual is not None:
        n_out = seq[-1]
        n_res = core[0] * core[1] * shapes[st.residual][0] * elem
        if untiled:  # shortcut(input) and the sum are new tensors; the input is held
            spikes.append(n_out + (n_out if st.shortcut is not None else 0) + n_out)
        else:  # the residual region read and its shortcut; the add is in place
            spikes.append(n_out + n_res + (n_out if st.shortcut is not None else 0))
    pairs = [a + b for a, b in zip(seq, seq[1:])] or seq
    return held + max(pairs + spikes)


def _attn_working_set(c: int, h: int, w: int, elem: int, bsz: int) -> int:
    # input (= residual), group-norm output, q, k, v, attention output and its reshaped copy
    return 7 * bsz * c * h * w * elem


class _Sim(NamedTuple):
    dev: int  # peak device bytes (on the CPU: all of it)
    stored: int  # peak bytes of paused tiles held in memory (device, or host with offload)
    disk: int  # peak bytes of paused tiles in temporary files


def _simulate(prog: _Program, shapes, grids, elem: int, bsz: int, *, offload: bool, untiled: bool = False,
              store_limit: int | None = None) -> _Sim:
    """Peaks of a run, by walking the stages. With `store_limit`, paused tiles beyond it are on disk:
    memory holds at most that much of them (plus one spilled tile mapped while it is read), and the
    disk holds the rest as whole maps (a map's file is freed when the map dies)."""
    last_use: dict[str, int] = {}
    for i, st in enumerate(prog.stages):
        for k in (st.src, st.residual):
            if k is not None:
                last_use[k] = i

    def nbytes(k):
        c, h, w = shapes[k]
        return bsz * c * h * w * elem

    in_bytes = nbytes(prog.input_key)
    alive: dict[str, int] = {}
    peak_dev = peak_store = peak_disk = 0
    for i, st in enumerate(prog.stages):
        last = i == len(prog.stages) - 1
        c, h, w = shapes[st.key]
        fixed = in_bytes + (nbytes(st.key) if last else 0)
        out_b = nbytes(st.key) if (st.store and not last) else 0
        dying = sum(alive[k] for k in {st.src, st.residual} - {None} if k in alive and last_use[k] == i)
        others = sum(alive.values())
        mapped = 0  # a spilled tile mapped while it is copied out
        if st.attn is not None:
            stored = others + out_b
            ws = _attn_working_set(c, h, w, elem, bsz)
        elif untiled:
            # the untiled forward: the source map is the "tile"; the output replaces it
            plan = _regions(st.layers, _layer_inputs(st, shapes), ((0, h), (0, w)))
            ws = bsz * _chain_working_set(st, plan, shapes, elem, (h, w), untiled=True)
            stored = others
            ws -= alive.get(st.src, 0)  # the source is the held input in ws
        else:
            g = grids[(h, w)]
            # an interior cell: the largest halo
            ri, ci = min(1, len(g.rows) - 1), min(1, len(g.cols) - 1)
            plan = _regions(st.layers, _layer_inputs(st, shapes), (g.rows[ri], g.cols[ci]))
            core = (g.rows[ri][1] - g.rows[ri][0], g.cols[ci][1] - g.cols[ci][0])
            ws = bsz * _chain_working_set(st, plan, shapes, elem, core, untiled=False)
            # input tiles are released as the output fills: input row k once output row k + 1 (whose halo
            # reads it) is done, so with R rows up to (R + 2) / R of a map is alive
            rows = len(g.rows)
            stored = others - dying + min(dying + out_b, max(dying + 2 * out_b / rows, out_b + 2 * dying / rows))
            if st.src in alive:
                sc, sh, sw = shapes[st.src]
                sg = grids[(sh, sw)]
                mapped = bsz * sc * (sg.rows[0][1] - sg.rows[0][0]) * (sg.cols[0][1] - sg.cols[0][0]) * elem
        in_mem = stored
        if store_limit is not None and not untiled:
            in_mem = min(stored, store_limit)
            if stored > store_limit:
                ws += mapped
                peak_disk = max(peak_disk, others + out_b - store_limit)
        dev = fixed + ws + (0 if offload else in_mem)
        peak_store = max(peak_store, in_mem)
        peak_dev = max(peak_dev, dev)
        for k in {st.src, st.residual} - {None}:
            if k in alive and last_use[k] == i:
                del alive[k]
        if out_b:
            alive[st.key] = out_b
    return _Sim(int(peak_dev), int(peak_store), int(max(peak_disk, 0)))


_META_CACHE: dict[str, nn.Module] = {}


def _meta_vae(vae_config) -> nn.Module:
    """The AutoencoderKL of a config (or the model itself), built on the meta device: no memory."""
    if isinstance(vae_config, nn.Module):
        return vae_config
    from diffusers import AutoencoderKL

    cfg = dict(vae_config)
    key = repr(sorted((k, repr(v)) for k, v in cfg.items() if not k.startswith("_")))
    if key not in _META_CACHE:
        with torch.device("meta"):
            _META_CACHE[key] = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    return _META_CACHE[key]


class VaeEstimate(NamedTuple):
    """`peak`: device bytes (activations, input and output; on the CPU the paused tiles kept in memory
    too); `stored`: paused tiles kept in memory; `disk`: paused tiles in temporary files."""

    peak: int
    stored: int
    disk: int


def estimate(
    vae_config,
    h: int,
    w: int,
    tile: int | None,
    dtype: torch.dtype = torch.float32,
    *,
    part: str = "decode",
    offload: bool = False,
    recompute: bool = False,
    max_stored_bytes: int | None = None,
    batch: int = 1,
) -> VaeEstimate:
    """Estimated peaks of encoding or decoding an h x w (image pixels) image (see `estimate_peak_bytes`).

    `max_stored_bytes` as in :func:`tiled_encode`: paused tiles beyond it count on disk, not in memory.
    """
    if part not in ("encode", "decode"):
        raise ValueError(f"`part` must be 'encode' or 'decode', got {part!r}")
    vae = _meta_vae(vae_config)
    elem = torch.empty((), dtype=dtype).element_size()
    if part == "encode":
        prog = _compile_encoder(vae, recompute)
        in_shape = (vae.encoder.conv_in.in_channels, int(h), int(w))
        top = tile
    else:
        prog = _compile_decoder(vae, recompute)
        f = 2 ** sum(1 for b in vae.decoder.up_blocks if b.upsamplers)
        in_shape = (vae.decoder.conv_in.in_channels, -(-int(h) // f), -(-int(w) // f))
        top = None if tile is None else int(tile) * f
    untiled = tile is None or (in_shape[1] <= tile and in_shape[2] <= tile)
    if untiled and recompute:
        prog = _compile_encoder(vae, False) if part == "encode" else _compile_decoder(vae, False)
    shapes = _infer_shapes(prog, in_shape)
    grids = {} if untiled else _plan_grids(shapes, top)
    sim = _simulate(prog, shapes, grids, elem, batch, offload=offload and not untiled, untiled=untiled,
                    store_limit=None if untiled else max_stored_bytes)
    return VaeEstimate(sim.dev, sim.stored, sim.disk)


def estimate_peak_bytes(
    vae_config,
    h: int,
    w: int,
    tile: int | None,
    dtype: torch.dtype = torch.float32,
    *,
    part: str = "decode",
    offload: bool = False,
    recompute: bool = False,
    max_stored_bytes: int | None = None,
    batch: int = 1,
) -> int:
    """Estimated peak device memory, in bytes, of encoding or decoding an h x w (image pixels) image.

    Activations only (excluding the VAE's parameters), with the caller's input and output tensors.
    ``vae_config`` is an AutoencoderKL config (dict / FrozenDict) or the model itself. ``tile`` is
    tiled_encode's or tiled_decode's ``tile_size`` (pixels for part="encode", latent pixels for
    part="decode"), or None for the untiled module. Without offload the stored feature maps count (at
    most `max_stored_bytes` of them); with offload only the tile working set, the 1/8-scale attention
    and the input/output do. A model of the allocations, not a measurement: expect it within about +-30%.
    """
    return estimate(vae_config, h, w, tile, dtype, part=part, offload=offload, recompute=recompute,
                    max_stored_bytes=max_stored_bytes, batch=batch).peak
