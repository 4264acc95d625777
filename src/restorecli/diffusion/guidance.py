"""Region-adaptive restoration guidance: pull every denoising step toward the stage-1 image.

DiffBIR's training-free guidance (arXiv 2308.15070, sec. 3.3), exactly as the v2-era official code
computes it (official 70c0944 ``utils/cond_fn.py`` ``MSEGuidance`` /
``WeightedMSEGuidance`` and ``utils/sampler.py`` ``SpacedSampler.apply_cond_fn``). HEAD no longer applies
it , so the v2-era code is the reference; golden data: reference ``golden/guidance``.

At the first model evaluation of every solver step whose ``t_now = model_t + 1`` lies strictly inside
``(stop, start)``, ``repeat`` times::

    latent space  tgt = scale_factor * (mu + std * z)   posterior SAMPLE of the target, z ~ N(0, I)
                  pred = x0                            (one draw per repeat; which stream: see below)
    rgb space     tgt = target;  pred = D(x0 / scale_factor), with autograd through the VAE decoder
    L  = sum_batch mean_{C,H,W}( W * (pred - tgt)^2 )   W = 1 (mse) or the region weight map (w_mse)
    g  = -dL/dpred * scale * 3000
    x0 = x0 + (g                     ) / c   latent space
    x0 = x0 + (g back-propagated to x0) / c  rgb space

``target = 2 * pad(stage-1 image) - 1`` with the stage-2 zero padding, so the padded border is pulled
toward black as upstream does. ``c`` is the weight of x0 in the sampler step's update
(:class:`~restorecli.diffusion.hooks.X0HookContext` ``coefficient``; posterior_mean_coef1 for the spaced
sampler), so each guidance iteration moves the sampler's next state by ``g`` itself. The loss is a
MEAN over elements (upstream's), so a given scale pulls each pixel less on a larger image.

Per sampler family (all of them act on the predicted clean latent x0, for eps and v models alike):

============  =========================  ==========================================================
family        c (weight of x0)           what the guided step does
============  =========================  ==========================================================
spaced        posterior_mean_coef1_i     x_{i-1} = coef1 (x0 + dx0) + coef2 x_i + sigma z: moves by g
                                         (the official v2 SpacedSampler.apply_cond_fn, exactly)
ddim          sqrt(abar_prev)            x_prev = sqrt(abar_prev)(x0 + dx0) + dir(eps): moves by g;
                                         eps (the direction) is kept, as a DDIM "x0 correction"
dpm++_m2      -alpha_next expm1(-h)      the first-order (DDIM-like) part moves by g; the guided x0
                                         is also what the second-order difference uses, now and next step
edm_*         1 - sigma_next / sigma     the step's denoised D is shifted by dx0; Euler moves by g.
                                         A step's later evaluations (Heun end point, DPM-2 / DPM++(2S)
                                         / DPM++ SDE midpoints) get the SAME shift: a constant shift of
                                         D over the step, which every solver integrates exactly, so
                                         the step moves by g for all of them (ancestral steps: by
                                         g (1 - sigma_down / sigma) / c, then their noise).
                                         Multistep solvers (lms, dpm++_2m, 2m/3m_sde) keep the guided
                                         D in their history.
============  =========================  ==========================================================

(dx0 = g / c.)

Where the posterior samples come from (latent space; rgb space draws nothing). ``spaced``: from the
image's generator when the hook runs, before the step's own draw: the v2-era order its golden runs fix.
Every other sampler (upstream never guided them, so the behaviour is ours to define): from a SEPARATE
stream, ``GeneratorNoise.derived("guidance")`` (a second CPU generator seeded from ``--seed`` by
:func:`restorecli.diffusion.noise.derived_seed`), so the sampler's own fresh noise is the same at every
scale: a scale s > 0 differs from 0 only by the pull toward the stage-1 image, and that pull (target
noise included) is proportional to s, so ``--guidance 0`` is the limit of small scales instead of a jump
to a new noise realisation. The samples are kept rather than replaced by the posterior mode: the loss
then stays the v2-era one on every sampler, and on a VAE whose posterior is not narrow (the tiny test
VAEs) the mode would be a different target, which nothing here could show harmless for every checkpoint.

Beyond upstream (which only had the spaced sampler, eps models, no tiling):

* Every sampler family, eps and v models: the table above.
* ``w_mse`` in latent space (upstream crashes: 3-channel grey kernel on a 4-channel latent): the weight
  map is computed on the rgb target and average-pooled by 8 onto the latent grid (:func:`latent_weight_map`).
* Tiled sampling (upstream asserts): the hook sees the x0 of the WHOLE latent, after the tiles' outputs
  were blended, so the loss, the weight map and the gradient are those of the whole image and tiles
  cannot disagree at their overlaps; nothing is computed per tile. rgb space then decodes the whole
  latent with autograd (the exact tiled VAE of ``tiled_vae`` has no backward pass); the pipeline turns
  on gradient checkpointing of the decoder for it.
* The target's posterior (mean, std) is encoded once per image instead of once per repeat and step
  (the encoder is deterministic, so the samples are the same).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..settings.choices import GUIDANCE_LOSSES, GUIDANCE_SPACES
from ..settings.tree import GuidanceSettings
from .hooks import X0HookContext
from .noise import GUIDANCE_STREAM, GeneratorNoise, NoiseSource
from ..vae import VAE_SCALE

__all__ = [
    "GUIDANCE_LOSSES",
    "GUIDANCE_SPACES",
    "GRADIENT_SCALE",
    "V2_DRAW_ORDER",
    "GuidanceSettings",
    "RestorationGuidance",
    "weight_map",
    "latent_weight_map",
    "guidance_loss",
    "guidance_gradient",
]

log = logging.getLogger("restorecli.guidance")

#: Upstream multiplies the user's scale by 3000 (``Guidance.__init__``: ``self.scale = scale * 3000``).
GRADIENT_SCALE = 3000.0
#: ITU-R BT.601 luma weights as ``WeightedMSEGuidance._get_weight`` writes them.
GRAY = (0.2989, 0.5870, 0.1140)
#: Sobel kernels, applied as cross-correlation (``F.conv2d``).
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))
#: Side of the non-overlapping blocks whose gradient magnitudes are SUMMED (upstream's "block_mean").
BLOCK = 2
#: Sampler families whose guided runs keep the v2-era draw order (posterior samples from the image's
#: generator, interleaved with the sampler's draws): only the one upstream guided, pinned by golden runs.
V2_DRAW_ORDER = frozenset({"spaced"})




# --------------------------------------------------------------------------------------------------
# the maths (pure functions; golden parity in tests/test_guidance.py)


def weight_map(image: torch.Tensor) -> torch.Tensor:
    """Weight ``1 - tanh(S)`` per 2x2 block, S = SUM of the Sobel magnitude over the block.

    ``image``: (N, 3, H, W) RGB in [0, 1] (upstream passes ``(target + 1) / 2``; values are not clamped),
    H and W even. Returns (N, 1, H, W) float32 in [0, 1]: near 1 in flat regions, near 0 on edges and
    texture. Steps (``WeightedMSEGuidance._get_weight``): grey = 0.2989 R + 0.5870 G + 0.1140 B,
    replicate-pad 1, cross-correlate with Sobel Gx and Gy, magnitude sqrt(gx^2 + gy^2), sum over
    non-overlapping 2x2 blocks (the official variable is named ``block_mean`` but holds a sum), tanh,
    1 - tanh, each block's value broadcast to its 4 pixels.
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"weight_map needs an (N, 3, H, W) RGB image, got shape {tuple(image.shape)}")
    n, _, h, w = image.shape
    if h % BLOCK or w % BLOCK:
        raise ValueError(f"weight_map needs even height and width (2x2 blocks), got {h}x{w}")
    image = image.float()
    gray_kernel = torch.tensor(GRAY, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    gray = torch.sum(image * gray_kernel, dim=1, keepdim=True)
    sobel = torch.stack((torch.tensor(SOBEL_X), torch.tensor(SOBEL_Y)))[:, None].to(image.device, image.dtype)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), sobel)
    magnitude = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    blocks = magnitude.view(n, 1, h // BLOCK, BLOCK, w // BLOCK, BLOCK).sum(dim=(3, 5))
    weight = 1 - blocks.tanh()
    return weight.repeat_interleave(BLOCK, dim=2).repeat_interleave(BLOCK, dim=3)


def latent_weight_map(weight: torch.Tensor, factor: int = VAE_SCALE) -> torch.Tensor:
    """The rgb weight map averaged over each ``factor`` x ``factor`` cell: (N, 1, H/8, W/8).

    Our definition of ``w_mse`` in latent space (upstream crashes there): every latent pixel decodes
    to an 8x8 pixel cell, and gets the mean weight of that cell (the mean of its 16 2x2-block weights).
    A uniform map stays uniform, so on a flat image w_mse equals mse in both spaces.
    """
    h, w = weight.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"the weight map ({h}x{w}) must be a multiple of {factor} to pool onto the latent grid")
    return F.avg_pool2d(weight, factor)


def guidance_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_batch mean_{C,H,W}((pred - target)^2 [* weight])`` (``MSEGuidance._forward`` /
    ``WeightedMSEGuidance._forward``); ``weight`` (N, 1, H, W) broadcasts over the channels."""
    err = (pred - target).pow(2)
    if weight is not None:
        err = err * weight
    return err.mean((1, 2, 3)).sum()


def guidance_gradient(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, float]:
    """``(g, loss)`` with ``g = -dL/dpred * scale * 3000`` (``Guidance.__call__``), pred detached.

    ``scale`` is the user's scale (the official ``--g_scale``); the factor 3000 is applied here.
    """
    with torch.enable_grad():
        leaf = pred.detach().clone().requires_grad_(True)
        loss = guidance_loss(leaf, target.detach(), None if weight is None else weight.detach())
        (grad,) = torch.autograd.grad(loss, leaf)
    return -grad * (scale * GRADIENT_SCALE), float(loss.detach())


# --------------------------------------------------------------------------------------------------
# the x0 hook


class RestorationGuidance:
    """The x0 hook of :func:`restorecli.diffusion.sampling.sample` that applies restoration guidance.

    ``target``: (N, 3, H, W) in [-1, 1], the stage-1 image zero-padded exactly like the stage-2 input, so
    that H, W = 8 x the latent's (``2 * pad(stage1) - 1``). ``vae``: the pipeline's ``AutoencoderKL``
    (rgb space decodes through it with autograd; latent space encodes the target once). ``noise``: the
    image's noise source; latent space draws one posterior sample per repeat from it on the ``spaced``
    sampler, when the hook runs (before the step's own draw, the v2-era order). ``posterior_noise``: the
    separate stream every other sampler's posterior samples come from (module doc); by default
    ``noise.derived()`` when ``noise`` is a :class:`GeneratorNoise` (another latent-space NoiseSource must
    pass it). ``checkpoint``: rgb space only, recompute the
    decoder's up blocks in the backward pass instead of storing their activations (diffusers' gradient
    checkpointing): same numbers, less memory, about one more decoder forward per guidance iteration.
    ``encode``: latent space only, ``target -> posterior moments (mean, logvar)`` used instead of
    ``vae.encode`` (the pipeline passes the exact tiled encoder for large images: same numbers).

    After a run, ``applied`` counts guidance iterations and ``losses`` holds each iteration's loss.
    """

    def __init__(
        self,
        settings: GuidanceSettings,
        target: torch.Tensor,
        *,
        vae,
        latent_scale_factor: float,
        noise: NoiseSource,
        posterior_noise: NoiseSource | None = None,
        checkpoint: bool = False,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if target.dim() != 4 or target.shape[1] != 3:
            raise ValueError(f"the guidance target must be (N, 3, H, W), got shape {tuple(target.shape)}")
        if target.shape[-2] % VAE_SCALE or target.shape[-1] % VAE_SCALE:
            raise ValueError(f"the guidance target must be padded to a multiple of {VAE_SCALE}, got {tuple(target.shape)}")
        self.settings = settings
        self.vae = vae
        self.latent_scale_factor = float(latent_scale_factor)
        self.noise = noise
        if posterior_noise is None and isinstance(noise, GeneratorNoise):
            posterior_noise = noise.derived(GUIDANCE_STREAM)
        if posterior_noise is None and settings.space == "latent":
            raise ValueError("latent-space guidance needs `posterior_noise` (a stream separate from the sampler's) "
                             "unless `noise` is a GeneratorNoise, which derives one")
        self.posterior_noise = posterior_noise
        self.checkpoint = bool(checkpoint)
        self.encode = encode
        self.target = target.float()
        self.weight = weight_map((self.target + 1) / 2)  # rgb resolution, used for w_mse and for saving
        self.applied = 0
        self.losses: list[float] = []
        self._posterior: tuple[torch.Tensor, torch.Tensor] | None = None
        self._shift: tuple[tuple[str, int], torch.Tensor] | None = None  # (step, x0 shift) of the last guided step
        self._warned = False

    # -- what the loss compares ---------------------------------------------------------------------

    def loss_weight(self, space: str) -> torch.Tensor | None:
        """None for mse; the weight map (rgb) or its 8x8 mean (latent) for w_mse."""
        if self.settings.loss == "mse":
            return None
        return self.weight if space == "rgb" else latent_weight_map(self.weight)

    @torch.no_grad()
    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior q(z | target), unscaled, float32; encoded once. A
        half-precision VAE's moments are taken to float32 before the std is computed from them."""
        if self._posterior is None:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            vae = self.vae
            if self.encode is not None:
                moments = self.encode(self.target)
            else:
                moments = vae.encode(self.target.to(device=vae.device, dtype=vae.dtype)).latent_dist.parameters
            dist = DiagonalGaussianDistribution(moments.float())
            self._posterior = (dist.mean, dist.std)
        return self._posterior

    def noise_for(self, family: str) -> NoiseSource:
        """The stream a sampler family's posterior samples come from: the image's for ``spaced`` (the
        v2-era draw order), the separate ``posterior_noise`` for every other family."""
        return self.noise if family in V2_DRAW_ORDER else self.posterior_noise

    def latent_target(self, noise: NoiseSource | None = None) -> torch.Tensor:
        """A posterior SAMPLE of the target latent, scaled: ``(mean + std * z) * scale_factor``.

        ``ControlLDM.vae_encode(target, sample=True)`` of the v2-era code; z is one draw of ``noise``
        (default: the image's generator, as the v2-era code draws it).
        """
        mean, std = self.posterior()
        source = self.noise if noise is None else noise
        return (mean + std * source(mean)) * self.latent_scale_factor

    def decode_with_grad(self, x0: torch.Tensor) -> torch.Tensor:
        """``vae.decode(x0 / scale_factor)`` keeping the graph back to x0 (``ControlLDM.vae_decode``
        without no_grad), output float32. The VAE's own parameters get no gradients."""
        vae = self.vae
        z = x0.to(device=vae.device, dtype=vae.dtype) / self.latent_scale_factor
        if not self.checkpoint:
            return vae.decode(z).sample.float()
        was = getattr(vae, "is_gradient_checkpointing", False)
        if not was:
            vae.enable_gradient_checkpointing()
        try:
            return vae.decode(z).sample.float()
        finally:
            if not was:
                vae.disable_gradient_checkpointing()

    # -- one guidance iteration ---------------------------------------------------------------------

    def step(self, x0: torch.Tensor, coefficient: float, noise: NoiseSource | None = None) -> torch.Tensor:
        """One iteration: x0 + (g, taken to the latent) / coefficient. ``noise``: where latent space draws
        the target's posterior sample (default: the image's generator)."""
        s = self.settings
        rescale = torch.reciprocal(torch.tensor(coefficient, dtype=torch.float32))  # 1 / coef1, in float32 as upstream
        if s.space == "latent":
            target = self.latent_target(noise).to(x0.device)
            g, loss = guidance_gradient(x0.float(), target, _to(self.loss_weight("latent"), x0), s.scale)
            delta = g
        else:
            with torch.enable_grad():
                leaf = x0.detach().float().clone().requires_grad_(True)
                pred = self.decode_with_grad(leaf)
                g, loss = guidance_gradient(pred, self.target.to(pred.device), _to(self.loss_weight("rgb"), pred), s.scale)
                k = backward_scale(g, _dtype(self.vae))
                (delta,) = torch.autograd.grad(pred, leaf, grad_outputs=g * k)
                delta = delta / k
            if not torch.isfinite(delta).all():
                if not self._warned:
                    log.warning("rgb-space guidance: the %s decoder's gradient overflowed; skipping those guidance "
                                "steps (`precision` fp32 avoids it)", str(_dtype(self.vae)).removeprefix("torch."))
                    self._warned = True
                delta = torch.zeros_like(delta)
        self.applied += 1
        self.losses.append(loss)
        return (x0 + delta.to(x0.device, x0.dtype) * rescale.to(x0.device, x0.dtype))

    def __call__(self, x0: torch.Tensor, ctx: X0HookContext) -> torch.Tensor:
        if ctx.substep > 0:
            # A later evaluation of the same solver step (Heun's end point, a DPM-2 / DPM++(2S) / DPM++ SDE
            # midpoint) gets the same shift as the step's first one: a constant shift of the denoiser over
            # the step, which every solver integrates exactly, so the step still moves by g (see module doc).
            shift = self._shift if self._shift is not None and self._shift[0] == (ctx.family, ctx.step) else None
            return x0 if shift is None else x0 + shift[1].to(x0.device, x0.dtype)
        self._shift = None
        s = self.settings
        if not s.enabled or not s.active_at(ctx.model_t):
            return x0
        c = ctx.coefficient
        if not (math.isfinite(c) and c > 0):
            log.debug("guidance skipped at %s step %d: x0 weight %s", ctx.family, ctx.step, c)
            return x0
        guided, noise = x0, self.noise_for(ctx.family)
        for _ in range(int(s.repeat)):
            guided = self.step(guided, c, noise)
        self._shift = ((ctx.family, ctx.step), guided - x0)
        log.debug("guidance %s step %d/%d (t=%s): loss %.6f", ctx.family, ctx.step + 1, ctx.total, ctx.model_t,
                  self.losses[-1])
        return guided


def backward_scale(g: torch.Tensor, dtype: torch.dtype) -> float:
    """The power of two that brings max |g| into [1, 2) before back-propagating it through a float16
    network, 1.0 for any other dtype.

    The gradient of a mean over the image is tiny (about 2 scale * 3000 / (3 H W) per pixel: 4e-5 at
    512x512 with scale 0.01) and float16 flushes values below 6e-8 to zero and keeps few bits below
    6e-5, so an unscaled fp16 backward loses most of it (measured: 4% error at scale 0.01, 91% at
    1e-4, against 0.2% at 0.5). The backward pass is linear in `g`, and scaling by a power of two is
    exact in binary floating point, so the result is the same but for the underflow (AMP's loss
    scaling). bf16 has float32's exponent range and needs none.
    """
    if dtype != torch.float16:
        return 1.0
    peak = float(g.detach().abs().max())
    if not (math.isfinite(peak) and peak > 0):
        return 1.0
    return 2.0 ** -math.floor(math.log2(peak))


def _dtype(module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(module.parameters()).dtype


def _to(weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if weight is None else weight.to(device=like.device, dtype=like.dtype)
