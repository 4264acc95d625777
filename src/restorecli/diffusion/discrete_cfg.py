"""CFG on the raw model output at one integer timestep, as the official ``spaced`` and ``ddim`` samplers do it.

Both (``diffbir/sampler/spaced_sampler.py``, ``ddim_sampler.py``;) feed the whole batch the
label tau, take the scale at tau, skip the uncond branch when that scale is exactly 1, and combine the raw
outputs (eps or v) before any conversion to x0. EDM combines the denoised D and DPM-Solver combines eps,
so they do not use this.
"""

from __future__ import annotations

import torch

from .cfg import GuidedModel

__all__ = ["guided_output"]


def guided_output(model: GuidedModel, x: torch.Tensor, tau: int) -> torch.Tensor:
    """``uncond + s (cond - uncond)`` of the raw outputs at label tau, s = ``model.scale_at(tau)``."""
    model_t = torch.full((x.shape[0],), tau, device=x.device, dtype=torch.long)
    scale = model.scale_at(tau)
    out_cond, out_uncond = model.branches(x, model_t, model.needs_uncond(scale))
    return GuidedModel.combine(out_cond, out_uncond, scale)
