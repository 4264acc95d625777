"""Half precision end to end (issue 16): the whole pipeline in bf16 and fp16 on the CPU with the tiny models.

Only the networks run in half precision; every hand-off between stages is in the dtype this table says
(checked at every call by `HandOffs`):

=====================================================  =============  ===========================================
hand-off                                                dtype          where
=====================================================  =============  ===========================================
image -> cleaner, cleaner -> stage-1 result             float32        autocast computes the cleaner in half
cleaner convolutions / linears                          half (*)       (the official Pipeline.run autocast)
condition image -> VAE encoder / decoder latent -> VAE  half           `vae_encode` / `tiled_encode` cast it
VAE encoder -> condition latent c_img                   float32        `encode_condition`
text encoder -> cached prompt embedding                 float32        `encode_prompt`
x_T and every noise draw                                float32        `GeneratorNoise`
sampler state -> UNet + IRControlNet (x, c_txt, c_img)  half           `ControlledUNet` casts on entry
UNet output -> sampler; x0 to / from the guidance hook  float32        `ControlledUNet` casts back
final latent z; decoder -> colour fix; output           float32        `_decode`, `color_correct`
=====================================================  =============  ===========================================

(*) where spandrel says the architecture supports it: SwinIR runs bf16 but not fp16 (float32 then), so
the fp16 runs that need a half-precision cleaner use a tiny RRDB (BSRNet's architecture).

Each configuration (`CONFIGS`) covers one sampler family and a share of the rest: latent and rgb
guidance, the exact tiled VAE, tiled sampling, the three colour fixes, eps and v models; 2 steps, cfg 4,
512x512 (the smallest image stage 2 takes). The float32 fallback of an overflowing VAE pass is forced
with weights that overflow fp16 only (and a hook for bf16).

PSNR bounds (vs the float32 run of the same configuration, output in [0, 1]) were set from measurement
on a 2-core AMD EPYC with AVX512-BF16 (torch 2.14.1): see `BOUNDS`. The tiny models are random and
amplify rounding far more than the real ones (the full-size v2.1 model is 42 dB from fp32 in bf16).

fp16 on this kind of CPU has no convolution or matmul kernels worth the name (a 512x512 fp16 decode of the
tiny VAE takes three minutes); bf16 has none on CPUs without AVX512 (oneDNN's bf16 needs it). For those,
`half_kernels` computes convolutions, matmuls and attention in float32 and rounds each result to the half
dtype - what GPU tensor cores do (half inputs, float32 accumulation, half output), overflow to inf
included; every other op runs torch's own half-precision CPU kernel.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from conftest import REFERENCE, force_tiles
from restorecli.errors import UsageError
from restorecli.pipeline import precision
from restorecli.pipeline.precision import auto_dtype, cpu_bf16_flags, cpu_runs_bf16_natively, cpuinfo_flags, resolve_dtype

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
aten = torch.ops.aten

pytestmark = pytest.mark.usefixtures("one_thread")


# -- precision choice ------------------------------------------------------------------------------------

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx512f avx512bw amx_tile amx_int8 amx_bf16 avx512_fp16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512dq avx512vl\n"
ZEN3 = "processor\t: 0\nflags\t\t: sse4_2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_cpuinfo_flags_are_read_per_processor():
    assert {"avx512_bf16", "avx2", "fpu"} <= cpuinfo_flags(EPYC)
    assert cpuinfo_flags(ARM) == set()  # aarch64 lists "Features", and bf16 there is not AVX512-BF16
    assert cpu_bf16_flags(EPYC) == {"avx512_bf16"} and cpu_bf16_flags(SAPPHIRE_RAPIDS) == {"amx_bf16"}
    assert cpu_bf16_flags(SKYLAKE) == set()


@pytest.mark.parametrize("text, capability, native", [
    (EPYC, "AVX512", True),
    (SAPPHIRE_RAPIDS, "AVX512", True),
    (SKYLAKE, "AVX512", False),  # AVX512 without its bf16 extension: bf16 is emulated, slower than fp32
    (ZEN3, "AVX2", False),
    (ARM, "SVE256", False),
    (EPYC, "AVX2", False),  # torch held to AVX2 (ATEN_CPU_CAPABILITY=avx2): its bf16 kernels are not used
    (EPYC, "DEFAULT", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(text, capability, native):
    assert cpu_runs_bf16_natively(text, capability) is native


def test_detection_here_agrees_with_torchs_own_cpuinfo():
    """On this machine: our /proc/cpuinfo reading gives what torch's cpuinfo library reports."""
    flags = cpu_bf16_flags()
    if flags is None or not hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        pytest.skip("no /proc/cpuinfo or no torch cpuinfo probes here")
    theirs = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bool(flags) == bool(theirs)


def test_auto_precision_per_device():
    assert auto_dtype("cuda") == torch.float16
    assert auto_dtype("cpu", native_bf16=True) == torch.bfloat16
    assert auto_dtype("cpu", native_bf16=False) == torch.float32
    assert auto_dtype("mps") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), native_bf16=True) == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.float16


def test_explicit_precisions_and_refusals(caplog):
    assert resolve_dtype("fp32", "cuda") == torch.float32
    assert resolve_dtype("fp16", "cuda") == torch.float16
    assert resolve_dtype("bf16", "cpu", native_bf16=True) == torch.bfloat16
    # None is the default, auto
    assert resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype(None, "cpu", native_bf16=False) == torch.float32
    assert resolve_dtype(None, "cpu", native_bf16=True) == torch.bfloat16
    with pytest.raises(UsageError, match="`precision` fp16 needs a GPU"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(UsageError, match="auto, fp32, fp16, bf16"):
        resolve_dtype("fp8", "cpu")
    with caplog.at_level(logging.WARNING, logger="restorecli"):
        assert resolve_dtype("bf16", "cpu", native_bf16=False) == torch.bfloat16
    assert "slower than fp32" in caplog.text


def test_loading_uses_the_precision_module():
    from restorecli.pipeline import loading

    assert loading.resolve_dtype is precision.resolve_dtype


# -- half-precision kernels on a CPU that lacks them ----------------------------------------------------

_ACCUMULATING = {
    aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
    aten.bmm.default, aten.baddbmm.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
}


class Float32Accumulation(TorchDispatchMode):
    """Convolutions, matmuls and attention on `dtype` CPU tensors compute in float32, and each result is
    rounded to the dtype the real kernel returns (found on the meta device)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if func not in _ACCUMULATING or not any(isinstance(t, torch.Tensor) and t.dtype == self.dtype
                                                and t.device.type == "cpu" for t in flat):
            return func(*args, **kwargs)
        self.calls += 1

        def meta(t):
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t

        def up(t):
            return t.float() if isinstance(t, torch.Tensor) and t.dtype == self.dtype else t

        wanted, _ = tree_flatten(func(*tree_map(meta, args), **tree_map(meta, kwargs)))
        out, spec = tree_flatten(func(*tree_map(up, args), **tree_map(up, kwargs)))
        return tree_unflatten([o.to(w.dtype) if isinstance(o, torch.Tensor) else o for o, w in zip(out, wanted)], spec)


def has_fast_kernels(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def half_kernels(dtype: torch.dtype):
    """`Float32Accumulation` where this CPU has no fast kernels for `dtype`, else nothing."""
    return contextlib.nullcontext() if has_fast_kernels(dtype) else Float32Accumulation(dtype)


@torch.no_grad()
def test_float32_accumulation_rounds_like_the_half_kernel():
    """Same dtypes as torch's own kernels, values within half-precision rounding, overflow to inf kept."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 12, 12, generator=gen)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    a = torch.randn(16, 8, generator=gen)
    for dtype in HALF.values():
        ref_conv = conv.to(dtype)(x.to(dtype))
        ref_mm = a.to(dtype) @ a.T.to(dtype)
        with Float32Accumulation(dtype) as mode:
            got_conv = conv.to(dtype)(x.to(dtype))
            got_mm = a.to(dtype) @ a.T.to(dtype)
            # 72 products of 1000 * 1: 72000, past fp16's largest finite value (65504)
            big = F.conv2d(torch.full((1, 8, 3, 3), 1000.0, dtype=dtype), torch.ones(1, 8, 3, 3, dtype=dtype))
        assert mode.calls == 3
        eps = torch.finfo(dtype).eps
        for got, ref in ((got_conv, ref_conv), (got_mm, ref_mm)):
            assert got.dtype == ref.dtype == dtype
            assert (got.float() - ref.float()).abs().max() <= 8 * eps * ref.float().abs().max()
        assert torch.isinf(big).all() if dtype == torch.float16 else torch.isfinite(big).all()
    conv.float()


# -- stage hand-offs ------------------------------------------------------------------------------------


@dataclass
class HandOffs:
    """Every dtype seen at a stage boundary, per boundary name (a set per name)."""

    seen: dict[str, set] = field(default_factory=dict)

    def add(self, name: str, *values) -> None:
        for v in values:
            for t in tree_flatten(v)[0]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.seen.setdefault(name, set()).add(t.dtype)

    def expect(self, expected: dict[str, torch.dtype]) -> None:
        missing = [name for name in expected if name not in self.seen]
        assert not missing, f"hand-offs never reached: {missing}"
        wrong = {n: sorted(map(str, self.seen[n])) for n, d in expected.items() if self.seen[n] != {d}}
        assert not wrong, f"hand-offs in the wrong dtype: {wrong}"


@contextlib.contextmanager
def watching(pipe):
    """Record the dtypes at every hand-off of `pipe`'s calls in the block (forward hooks on the networks,
    wrappers around the pipeline module's stage functions); all removed afterwards."""
    import restorecli.pipeline.diffbir as pl
    from restorecli.diffusion.noise import GeneratorNoise

    rec = HandOffs()
    handles = []

    def hook(module, name):
        def pre(mod, args, kwargs):
            if name in ("unet", "controlnet"):
                args = args[:1] + args[2:]  # the timestep is a label (long, or float32 for dpm++_m2)
            rec.add(f"{name} in", args, kwargs)

        def post(mod, args, kwargs, out):
            rec.add(f"{name} out", out)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    for name in ("unet", "controlnet", "text_encoder"):
        hook(getattr(pipe, name), name)
    hook(pipe.vae.encoder, "vae encoder")
    hook(pipe.vae.decoder, "vae decoder")
    hook(pipe.cleaner.model, "cleaner")  # its output: float32 (SwinIR) or the autocast dtype (RRDB), made float32 by Cleaner.run
    hook(next(m for m in pipe.cleaner.model.modules() if isinstance(m, torch.nn.Conv2d)), "cleaner conv")

    with pytest.MonkeyPatch.context() as mp:
        def wrap(owner, attr, name, record_args=True):
            real = getattr(owner, attr)

            def wrapped(*args, **kwargs):
                out = real(*args, **kwargs)
                if record_args:
                    rec.add(f"{name} in", [a for a in args if isinstance(a, torch.Tensor)])
                rec.add(f"{name} out", out)
                return out

            mp.setattr(owner, attr, wrapped)

        for fn in ("tiled_encode", "tiled_decode", "vae_encode", "vae_decode"):
            wrap(pl, fn, fn)
        wrap(pl, "apply_color_fix", "colour fix")
        wrap(type(pipe.cleaner), "run", "Cleaner.run")
        wrap(GeneratorNoise, "randn", "noise", record_args=False)
        real_stage1 = pl.run_stage1

        def stage1(*args, **kwargs):
            result = real_stage1(*args, **kwargs)
            rec.add("stage-1 result", result.cond_img)
            return result

        mp.setattr(pl, "run_stage1", stage1)
        real_sample = pl.sample

        def sample(name, model, x_T, *, x0_hook=None, **kw):
            rec.add("x_T", x_T)

            def net(x, t, cond):
                rec.add("sampler -> network", x, cond.c_txt, cond.c_img)
                out = model(x, t, cond)
                rec.add("network -> sampler", out)
                return out

            def x0(x0, ctx):
                rec.add("x0 -> guidance", x0, ctx.x_t)
                out = x0_hook(x0, ctx)
                rec.add("guidance -> sampler", out)
                return out

            z = real_sample(name, net, x_T, x0_hook=None if x0_hook is None else x0, **kw)
            rec.add("final latent", z)
            return z

        mp.setattr(pl, "sample", sample)
        pipe._prompt_cache.clear()  # so that the text encoder runs
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()
            rec.add("cached prompt", list(pipe._prompt_cache.values()))


def expected_handoffs(half: torch.dtype, *, cleaner: torch.dtype, tiled_vae: bool, guidance: str | None):
    """The table of the module docstring; `cleaner`: the cleaner's compute dtype (half where spandrel
    says the architecture supports it: SwinIR runs bf16 but not fp16)."""
    f32 = torch.float32
    vae = ("tiled_encode", "tiled_decode") if tiled_vae else ("vae_encode", "vae_decode")
    out = {
        "cleaner in": f32, "cleaner conv out": cleaner, "Cleaner.run out": f32, "stage-1 result": f32,
        "text_encoder out": half, "cached prompt": f32,
        f"{vae[0]} in": f32, f"{vae[0]} out": half, f"{vae[1]} in": f32, f"{vae[1]} out": half,
        "noise out": f32, "x_T": f32,
        "sampler -> network": f32, "controlnet in": half, "controlnet out": half, "unet in": half,
        "unet out": half, "network -> sampler": f32, "final latent": f32,
        "colour fix in": f32, "colour fix out": f32,
    }
    if not tiled_vae:
        out.update({"vae encoder in": half, "vae encoder out": half, "vae decoder in": half, "vae decoder out": half})
    if guidance is not None:
        out.update({"x0 -> guidance": f32, "guidance -> sampler": f32})
    return out


# -- the pipeline in bf16 and fp16 ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One pipeline run: model, sampler, colour fix and the optional parts it exercises."""

    name: str
    model: str  # "v" | "eps"
    sampler: str
    color_fix: str = "wavelet"
    guidance: str | None = None  # guidance space, or None for no guidance
    tiled_vae: bool = False
    tile_size: int | None = None  # tiled sampling (pixels)
    cleaner: str = "swinir"  # or "bsrnet": a tiny x4 RRDB that runs fp16 too (spandrel's SwinIR does not)
    slow: bool = False

    def call(self) -> dict:
        kw = dict(upscale=4, sampler=self.sampler, steps=2, cfg=4.0, seed=7, color_fix=self.color_fix,
                  prompt="a sharp photo of a street sign", negative_prompt="blurry")
        if self.guidance:
            kw.update(restoration_guidance=0.5, guidance_space=self.guidance, guidance_loss="w_mse")
        if self.tile_size:
            kw.update(tile_size=self.tile_size, tile_stride=self.tile_size - 128)
        return kw


CONFIGS = [
    Config("spaced", "eps", "spaced", color_fix="wavelet", cleaner="bsrnet"),
    Config("ddim-latent-guidance", "v", "ddim", color_fix="adain", guidance="latent"),
    Config("dpm-rgb-guidance", "eps", "dpm++_m2", color_fix="none", guidance="rgb", slow=True),
    Config("edm-ode-tiled-vae", "v", "edm_dpm++_2m", color_fix="adain", tiled_vae=True),
    Config("edm-sde-tiled-sampling", "v", "edm_dpm++_3m_sde", color_fix="wavelet", tile_size=320, slow=True),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def photo() -> np.ndarray:
    """A reference input at 128x128 (x4: stage 1 restores it at 512x512, a 64x64 latent)."""
    img = Image.open(REFERENCE / "inputs" / "mixed_96x70.png").convert("RGB").resize((128, 128), Image.BICUBIC)
    return np.asarray(img)




def tiny_bsrnet(dtype: torch.dtype):
    """spandrel's ESRGAN (BSRNet's RRDB) x4 with 8 filters and one block, fixed random weights."""
    from spandrel.architectures.ESRGAN import ESRGAN

    from restorecli.stage1.cleaners import load_cleaner

    g = torch.Generator().manual_seed(3)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    state = {k: (torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    return load_cleaner(state, dtype=dtype, name="tiny_bsrnet")


class Pipelines:
    """The tiny pipelines per (model, dtype, cleaner), loaded once per module."""

    def __init__(self):
        self.cache = {}

    def get(self, model: str, dtype: torch.dtype, cleaner: str = "swinir"):
        key = (model, dtype, cleaner)
        if key not in self.cache:
            from restorecli import DiffBIRPipeline

            pipe = DiffBIRPipeline.from_description(REFERENCE / f"model_{model}.json", device="cpu", torch_dtype=dtype,
                                                        captioner="none")
            if cleaner == "bsrnet":
                pipe.cleaner, pipe.stage1_pipeline = tiny_bsrnet(dtype), "bsrnet"
            self.cache[key] = pipe
        return self.cache[key]


def run(pipes: Pipelines, cfg: Config, dtype: torch.dtype, image: np.ndarray, *, watch: bool = False):
    """(output image, HandOffs or None) of one configuration in `dtype`."""
    from restorecli.pipeline.planning import VaeChoice

    pipe = pipes.get(cfg.model, dtype, cfg.cleaner)
    with pytest.MonkeyPatch.context() as mp:
        if cfg.tiled_vae:
            force_tiles(mp, encode=VaeChoice(256), decode=VaeChoice(32, recompute=True))
        with watching(pipe) if watch else contextlib.nullcontext() as rec, half_kernels(dtype):
            out = pipe(image, **cfg.call())
    return out, rec


#: Lowest PSNR (dB) of each configuration's output against its float32 run: the value measured on the
#: 2-core EPYC (bf16: its AVX512-BF16 kernels; fp16: `half_kernels`), in the comment, less 4 dB (bf16)
#: or 5 dB (fp16) for other CPUs' kernels and thread counts (1 vs 2 threads moved them by up to 0.2 dB).
#: eps models lose more than v models: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies the
#: network's rounding by up to 1 / sqrt(abar_999) = 14.6 in the first steps.
BOUNDS = {
    "spaced": {"bf16": 20.0, "fp16": 36.0},  # measured 23.8 / 40.7
    "ddim-latent-guidance": {"bf16": 26.0, "fp16": 42.0},  # 30.4 / 47.3
    "dpm-rgb-guidance": {"bf16": 18.0, "fp16": 34.0},  # 21.9 / 39.0
    "edm-ode-tiled-vae": {"bf16": 27.0, "fp16": 44.0},  # 31.4 / 48.7
    "edm-sde-tiled-sampling": {"bf16": 18.0, "fp16": 34.0},  # 21.6 / 38.7
}


@pytest.fixture(scope="module")
def pipes(reference_dir, tokenizer_dir) -> Pipelines:
    return Pipelines()


@pytest.fixture(scope="module")
def image(reference_dir) -> np.ndarray:
    return photo()


@pytest.fixture(scope="module")
def fp32_runs(pipes, image):
    """The float32 output of each configuration, computed once."""
    cache = {}

    def get(cfg: Config):
        if cfg.name not in cache:
            cache[cfg.name] = run(pipes, cfg, torch.float32, image)[0]
        return cache[cfg.name]

    return get


def _configs():
    for cfg in CONFIGS:
        for half in HALF:
            yield pytest.param(cfg, half, id=f"{cfg.name}-{half}", marks=[pytest.mark.slow] if cfg.slow else [])


@pytest.mark.parametrize("cfg, half", list(_configs()))
def test_the_pipeline_in_half_precision(pipes, image, fp32_runs, cfg, half, caplog):
    """Finite, close to the float32 output, every hand-off in its dtype, the planned tiles used."""
    dtype = HALF[half]
    reference = fp32_runs(cfg)
    with caplog.at_level(logging.WARNING, logger="restorecli"):
        out, handoffs = run(pipes, cfg, dtype, image, watch=True)
    restored = out.images[0]
    assert restored.dtype == np.float32 and np.isfinite(restored).all()
    assert "overflowed" not in caplog.text  # these runs need no float32 fallback
    cleaner = pipes.get(cfg.model, dtype, cfg.cleaner).cleaner
    assert cleaner.dtype == (torch.float32 if (half, cfg.cleaner) == ("fp16", "swinir") else dtype)
    handoffs.expect(expected_handoffs(dtype, cleaner=cleaner.dtype, tiled_vae=cfg.tiled_vae, guidance=cfg.guidance))
    if cfg.tiled_vae:
        assert (out.plan.encode_tile, out.plan.decode_tile) == (256, 32)
    if cfg.tile_size:
        assert out.plan.sample_tile == (cfg.tile_size // 8, (cfg.tile_size - 128) // 8)
    value = psnr(restored, reference.images[0])
    assert value < 100, "the half-precision run gave the float32 output: did it run in half precision?"
    assert value >= BOUNDS[cfg.name][half], f"{cfg.name} in {half}: {value:.2f} dB from float32"


# -- rgb-space guidance through a half-precision decoder ---------------------------------------------------


def _rgb_guidance_shift(pipe, scale: float) -> torch.Tensor:
    from restorecli.diffusion.guidance import GuidanceSettings, RestorationGuidance
    from restorecli.diffusion.noise import GeneratorNoise

    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    x0 = torch.randn(1, 4, 32, 32, generator=g) * 0.5
    guide = RestorationGuidance(GuidanceSettings(scale, "w_mse", "rgb"), target, vae=pipe.vae,
                                latent_scale_factor=pipe.latent_scale_factor, noise=GeneratorNoise.from_seed(0))
    with half_kernels(pipe.vae.dtype):
        return guide.step(x0, 1.0) - x0


@pytest.mark.parametrize("half", list(HALF))
def test_rgb_guidance_keeps_small_gradients_in_half_precision(pipes, half):
    """The gradient of a mean over the image is tiny; fp16 would flush most of it to zero (91% error at
    scale 1e-4 before the backward pass was scaled, against 0.2% at 0.5). Measured now: fp16 0.2-0.5%,
    bf16 1.7-1.9% at scales 0.5, 0.01 and 1e-4."""
    for scale in (0.5, 1e-4):
        ours = _rgb_guidance_shift(pipes.get("v", HALF[half]), scale)
        exact = _rgb_guidance_shift(pipes.get("v", torch.float32), scale)
        err = float((ours - exact).norm() / exact.norm())
        assert err < 0.04, f"{half}, scale {scale}: guidance shift {err:.1%} from float32"


def test_backward_scale_is_an_exact_power_of_two():
    from restorecli.diffusion.guidance import backward_scale

    g = torch.tensor([3e-6, -1.5e-5])
    k = backward_scale(g, torch.float16)
    assert 1.0 <= float((g * k).abs().max()) < 2.0 and math.log2(k) == int(math.log2(k))
    assert torch.equal(g * k / k, g)
    assert backward_scale(g, torch.float32) == backward_scale(g, torch.bfloat16) == 1.0
    assert backward_scale(torch.zeros(2), torch.float16) == 1.0


def test_an_overflowing_guidance_gradient_is_skipped_with_a_warning(pipes, monkeypatch, caplog):
    import restorecli.diffusion.guidance as guidance

    monkeypatch.setattr(guidance, "backward_scale", lambda g, dtype: 2.0**60)  # fp16's range ends at 2^16
    with caplog.at_level(logging.WARNING, logger="restorecli"):
        shift = _rgb_guidance_shift(pipes.get("v", torch.float16), 0.5)
    assert torch.equal(shift, torch.zeros_like(shift))
    assert "gradient overflowed; skipping" in caplog.text


# -- the float32 fallback of an overflowing VAE pass ----------------------------------------------------------


def _scale_before_groupnorm(conv: torch.nn.Conv2d, largest: float = 30000.0) -> None:
    """Multiply a ResnetBlock's conv1 (whose only consumer is GroupNorm norm2, which is scale-invariant)
    so that its largest weight or bias is `largest`: still finite in fp16, but its outputs pass 65504
    (inf), while in float32 the block - and the VAE - compute what they computed before."""
    with torch.no_grad():
        k = largest / max(conv.weight.abs().max().item(), conv.bias.abs().max().item())
        conv.weight.mul_(k)
        conv.bias.mul_(k)


def _snapshot(module: torch.nn.Module):
    return [(name, p, p.dtype, p.device, p.detach().clone()) for name, p in module.named_parameters()]


def _unchanged(module: torch.nn.Module, before) -> None:
    after = list(module.named_parameters())
    assert [n for n, *_ in before] == [n for n, _ in after]
    for (name, p, dtype, device, value), (_, q) in zip(before, after):
        assert q is p and q.dtype == dtype and q.device == device and torch.equal(q.detach(), value), name


@pytest.mark.parametrize("part, half", [("decode", "fp16"), ("tiled decode", "fp16"), ("encode", "fp16"), ("decode", "bf16")])
def test_an_overflowing_vae_pass_is_redone_in_float32_by_a_copy(pipes, part, half, caplog):
    """A half-precision VAE pass made to overflow (inf) is computed again in float32: the result is the
    float32 VAE's, a warning says so, and the pipeline's VAE keeps its dtype, parameters and values."""
    from restorecli import DiffBIRPipeline
    from restorecli.models.cldm import vae_decode, vae_encode
    from restorecli.pipeline.planning import VaeChoice
    from restorecli.vae.tiled import tiled_decode

    dtype = HALF[half]
    plain32, shared = pipes.get("v", torch.float32), pipes.get("v", dtype)
    pipe = DiffBIRPipeline(unet=shared.unet, controlnet=shared.controlnet, vae=copy.deepcopy(shared.vae),
                           text_encoder=shared.text_encoder, tokenizer=shared.tokenizer, cleaner=shared.cleaner,
                           diffusion=shared.diffusion, latent_scale_factor=shared.latent_scale_factor)
    coder = pipe.vae.encoder if part == "encode" else pipe.vae.decoder
    conv = coder.mid_block.resnets[0].conv1
    if dtype == torch.float16:
        _scale_before_groupnorm(conv)
    else:  # bf16 has float32's range, so nothing finite in float32 overflows it: force the inf with a hook
        conv.register_forward_hook(lambda m, a, out: out * math.inf if out.dtype == torch.bfloat16 else None)
    before = _snapshot(pipe.vae)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
    z = torch.randn(1, 4, 16, 16, generator=g)
    choice = VaeChoice(8) if part == "tiled decode" else VaeChoice()
    vae32 = copy.deepcopy(pipe.vae).float()  # the float32 VAE, made independently of the pipeline's copy

    with half_kernels(dtype):
        if part == "encode":
            overflowed = vae_encode(pipe, image)
            with caplog.at_level(logging.WARNING, logger="restorecli"):
                got = pipe._encode(image, choice)
            expected = vae_encode(_View(vae32, pipe.latent_scale_factor), image)
            unscaled = vae_encode(plain32, image)
        else:
            overflowed = vae_decode(pipe, z) if choice.tile is None else tiled_decode(pipe.vae, z / pipe.latent_scale_factor, tile_size=8)
            with caplog.at_level(logging.WARNING, logger="restorecli"):
                got = pipe._decode(z, choice)
            if choice.tile is None:
                expected = vae_decode(_View(vae32, pipe.latent_scale_factor), z)
            else:
                expected = tiled_decode(vae32, z / pipe.latent_scale_factor, tile_size=8)
            unscaled = vae_decode(plain32, z)

    assert overflowed.dtype == dtype and not torch.isfinite(overflowed).all()  # the overflow is real
    assert f"the {'float16' if half == 'fp16' else 'bfloat16'} VAE {part.split()[-1]} overflowed" in caplog.text
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    _unchanged(pipe.vae, before)
    assert pipe.vae.dtype == dtype
    if dtype == torch.float16:  # scaling before GroupNorm changed nothing in float32: the float32 image
        assert (got - unscaled).abs().max() <= 2e-2 * unscaled.abs().max()


@dataclass(frozen=True)
class _View:
    vae: torch.nn.Module
    latent_scale_factor: float
