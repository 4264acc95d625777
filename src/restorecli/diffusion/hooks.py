"""Callbacks a sampler offers its caller: progress, and a hook on every predicted x0.

``on_step(done, total)`` is called after each solver step (the library's only progress report).

``x0_hook(x0, ctx) -> x0`` sees every clean-latent prediction a solver is about to use, after
classifier-free guidance, and may return a modified one. This is where restoration guidance acts: the
v2-era spaced sampler changes the predicted x0 between the CFG-combined prediction and the posterior
mean (official 70c0944 ``utils/sampler.py SpacedSampler.apply_cond_fn``). The same point
exists in every family:

===========  ==========================================  ===========================================
family       x0 the hook sees                            ``coefficient`` (weight of x0 in the update)
===========  ==========================================  ===========================================
spaced       pred_x0 before the posterior mean           posterior_mean_coef1[index] (v2 divides the
                                                         guidance gradient by it)
ddim         pred_x0 before ``sqrt(a_prev) x0 + dir_xt``   sqrt(a_prev) (eps / dir_xt are kept)
dpm_solver   the data prediction (DPM-Solver's            -alpha_next * expm1(-h), h = lambda_next -
             ``correcting_x0_fn`` point)                  lambda_t (first-order DPM-Solver++ weight)
edm          the denoised D(x; sigma), every evaluation  1 - sigma_next / sigma (first-order Euler
             (substep 1 = Heun / DPM-2 / DPM++ second     weight of D towards the step's target)
             evaluation)
===========  ==========================================  ===========================================

x0 is always in scaled-latent units (the VAE latent times the latent scale factor) for every family,
including EDM (in the VE frame x = x0 + sigma * eps, so D is x0). ``x_t`` is the sampler's own state:
VP-normalised for spaced/ddim/dpm_solver, VE (x_vp * sqrt(1 + sigma^2)) for edm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["OnStep", "X0Hook", "X0HookContext"]

OnStep = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class X0HookContext:
    """Where in the run a predicted x0 was made. Fields may be added; none will be removed."""

    family: str  # "spaced" | "ddim" | "dpm_solver" | "edm"
    step: int  # 0-based solver step, in sampling order
    total: int  # number of solver steps
    substep: int  # 0 = the step's first model evaluation, 1 = a second-order / midpoint evaluation
    index: int  # schedule index (spaced/ddim: position in the ascending timestep table; edm: snapped grid index)
    model_t: float  # timestep label the model saw (v2 guidance uses t_now = model_t + 1)
    alpha_cumprod: float  # VP noise level of this evaluation (abar; sigma^2 = (1 - abar) / abar)
    coefficient: float  # weight of x0 in this step's first-order update (see the module table)
    x_t: torch.Tensor  # the state the prediction was made from (sampler units, see module doc)

    @property
    def sigma(self) -> float:
        """VE noise level sqrt((1 - abar) / abar) (inf at a zero-SNR terminal step)."""
        a = self.alpha_cumprod
        return math.inf if a <= 0 else math.sqrt((1.0 - a) / a)


X0Hook = Callable[[torch.Tensor, X0HookContext], torch.Tensor]
