"""``ddim``: deterministic DDIM (Song et al. 2021), as the official DiffBIR pipeline runs it.

Official ``diffbir/sampler/ddim_sampler.py`` (DDIMSampler.p_sample / sample).
Quirks kept because published results depend on them: eta is always 0 (the pipeline hard-codes it, so
``--eta`` does not apply), timesteps are ``range(0, T, T // N) + 1`` (more than N steps when T % N != 0),
the first model call is at 1 + k*(T // N) (901 for N=10, never 999), sampling ends at the acp[0] noise
level, and a noise tensor is drawn every step and multiplied by sigma_t = 0. diffusers' ``DDIMScheduler``
(``timestep_spacing="leading"``, ``steps_offset=1``, ``set_alpha_to_one=False``) makes the same update
when T % N == 0, but it makes exactly N steps where upstream makes more (N=30: 30 vs 31), draws no
noise, and has no point between the x0 prediction and the update for restoration guidance, so the
update is written here.
"""

from __future__ import annotations

import torch

from .cfg import GuidedModel
from .discrete_cfg import guided_output
from .hooks import OnStep, X0Hook, X0HookContext
from .noise import NoiseSource
from .schedules import DDIMSchedule

__all__ = ["sample_ddim"]


def sample_ddim(
    model: GuidedModel,
    x: torch.Tensor,
    schedule: DDIMSchedule,
    parameterization: str,
    *,
    noise: NoiseSource,
    x0_hook: X0Hook | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """x_T -> x_0 with ``x = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z`` (sigma = 0).

    CFG combines the raw outputs (a v output is turned into eps afterwards); skipped when the current
    scale is exactly 1.
    """
    sched = schedule
    total = len(sched.timesteps)
    for step in range(total):
        index = total - 1 - step
        tau = int(sched.timesteps[index])
        out = guided_output(model, x, tau)
        if parameterization == "eps":
            eps = out
        else:
            eps = sched.sqrt_alphas[index] * out + sched.sqrt_one_minus_alphas[index] * x

        a_t, a_prev, sigma_t = sched.alphas[index], sched.alphas_prev[index], sched.sigmas[index]
        x0 = (x - sched.sqrt_one_minus_alphas[index] * eps) / a_t.sqrt()
        if x0_hook is not None:
            ctx = X0HookContext("ddim", step, total, 0, index, float(tau), float(a_t), float(a_prev.sqrt()), x)
            x0 = x0_hook(x0, ctx)
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * eps
        x = a_prev.sqrt() * x0 + dir_xt + sigma_t * noise(x)
        if on_step is not None:
            on_step(step + 1, total)
    return x
