"""``spaced``: ancestral DDPM sampling on IDDPM-respaced timesteps (Ho et al. 2020; Nichol & Dhariwal 2021).

Official ``diffbir/sampler/spaced_sampler.py`` (SpacedSampler.p_sample / sample). The
diffusers ``DDPMScheduler`` with custom timesteps computes the same posterior, but it draws no noise on
the last step (upstream draws it and multiplies it by 0, which advances the generator), works on
float32 tables instead of float64 ones cast to float32, and offers no point between the x0 prediction
and the posterior mean for restoration guidance; hence this small loop.
"""

from __future__ import annotations

import torch

from .cfg import GuidedModel
from .discrete_cfg import guided_output
from .hooks import OnStep, X0Hook, X0HookContext
from .noise import NoiseSource
from .schedules import SpacedSchedule

__all__ = ["sample_spaced"]


def sample_spaced(
    model: GuidedModel,
    x: torch.Tensor,
    schedule: SpacedSchedule,
    parameterization: str,
    *,
    noise: NoiseSource,
    x0_hook: X0Hook | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """x_T -> x_0. Per step i (model fed tau_i, from T-1 down to 0):

    ``x0 = predict(model output)``; ``x = coef1_i x0 + coef2_i x + [i > 0] sqrt(var_i) z``. One z is drawn
    EVERY step, including the last where it is multiplied by 0. The last step returns x0 (coef1_0 = 1).
    CFG (rescaled if asked, gated on scale > 1) combines the raw outputs; it is skipped when the current
    scale is exactly 1 (as upstream, also when rescaling gives 1.0 at t = 999).
    """
    sched = schedule
    total = len(sched.timesteps)
    for step in range(total):
        index = total - 1 - step
        tau = int(sched.timesteps[index])
        out = guided_output(model, x, tau)

        if parameterization == "eps":
            x0 = sched.sqrt_recip_alphas_cumprod[index] * x - sched.sqrt_recipm1_alphas_cumprod[index] * out
        else:
            x0 = sched.sqrt_alphas_cumprod[index] * x - sched.sqrt_one_minus_alphas_cumprod[index] * out
        coef1 = sched.posterior_mean_coef1[index]
        if x0_hook is not None:
            acp = float(sched.sqrt_alphas_cumprod[index].double() ** 2)
            ctx = X0HookContext("spaced", step, total, 0, index, float(tau), acp, float(coef1), x)
            x0 = x0_hook(x0, ctx)

        mean = coef1 * x0 + sched.posterior_mean_coef2[index] * x
        z = noise(x)
        x = mean + torch.sqrt(sched.posterior_variance[index]) * z if index > 0 else mean
        if on_step is not None:
            on_step(step + 1, total)
    return x
