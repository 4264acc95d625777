"""The EDM denoiser: a VP eps / v model seen as D(x; sigma) in the VE frame (Karras et al. 2022, Table 1).

Official ``diffbir/sampler/edm_sampler.py`` (``EDMSampler.convert_to_denoiser``):

eps model  ``D = x - sigma F(c_in x, t(sigma))``
v model    ``D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) F(c_in x, t(sigma))``
           ``c_in = 1 / sqrt(sigma^2 + 1)``

``t(sigma)`` is the timestep of the NEAREST schedule sigma (:meth:`EDMSchedule.timestep_for`), not an
interpolated one: off-grid sigmas (churn, Heun end points, midpoints) reuse a neighbour's timestep. This
snapping, the forced sigma_max = 1e4 and the truncated ``linspace`` timesteps are why diffusers'
k-diffusion ports (``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``, ``KDPM2...``, ``LMSDiscrete...``,
``DPMSolverSDEScheduler``) do not reproduce the official runs: they map sigma to a fractional timestep
by log-sigma interpolation and build their own sigma tables.

CFG combines the two branches' denoised D (algebraically the same as combining raw outputs); it is
skipped when the BASE scale is 1, and the rescaled scale uses the snapped integer timestep.
"""

from __future__ import annotations

import torch

from .cfg import GuidedModel
from .hooks import X0Hook, X0HookContext
from .schedules import EDMSchedule

__all__ = ["EDMDenoiser"]


class EDMDenoiser:
    """``denoise(x, sigma, step) -> D``: the k-diffusion denoiser with the step it serves.

    ``sigma`` is a 0-d (or per-sample) float32 tensor, ``step`` the solver step index (used for the x0
    hook's context only; the maths depends on sigma alone).
    """

    def __init__(
        self,
        model: GuidedModel,
        schedule: EDMSchedule,
        parameterization: str,
        *,
        x0_hook: X0Hook | None = None,
    ):
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization
        self.x0_hook = x0_hook
        self._last_step = -1
        self._substep = 0

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) of the parameterization."""
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        if self.parameterization == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        return 1.0 / (sigma**2 + 1.0), -sigma / (sigma**2 + 1.0) ** 0.5, c_in

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, step: int) -> torch.Tensor:
        sigma = sigma * x.new_ones([x.shape[0]]) if sigma.dim() == 0 else sigma
        model_t = self.schedule.timestep_for(sigma)
        scale = self.model.scale_at(int(model_t[0]))
        shape = (-1,) + (1,) * (x.dim() - 1)
        c_skip, c_out, c_in = (c.view(shape) for c in self.scalings(sigma))
        out_cond, out_uncond = self.model.branches(x * c_in, model_t, self.model.needs_uncond(self.model.scale))
        denoised_cond = out_cond * c_out + x * c_skip
        denoised_uncond = None if out_uncond is None else out_uncond * c_out + x * c_skip
        denoised = GuidedModel.combine(denoised_cond, denoised_uncond, scale)
        if self.x0_hook is not None:
            denoised = self.x0_hook(denoised, self._context(x, sigma, model_t, step))
        return denoised

    def _context(self, x: torch.Tensor, sigma: torch.Tensor, model_t: torch.Tensor, step: int) -> X0HookContext:
        self._substep = self._substep + 1 if step == self._last_step else 0
        self._last_step = step
        sigmas = self.schedule.sigmas
        s = float(sigma[0])
        index = int((sigmas.to(sigma.device) - sigma[0]).abs().argmin())
        target = float(sigmas[min(step + 1, len(sigmas) - 1)])
        total = len(sigmas) - 1
        acp, coefficient = 1.0 / (1.0 + s * s), 1.0 - target / s
        return X0HookContext("edm", step, total, self._substep, index, float(model_t[0]), acp, coefficient, x)
