"""Classifier-free guidance around the model (Ho & Salimans 2022), with DiffBIR's rescaled variant.

``model(x_t, t, cond) -> raw output (eps or v)`` is the model interface of every sampler; ``cond`` is an
opaque conditioning object the caller builds (text embedding, condition latent, control strength).
:class:`GuidedModel` evaluates the conditional and unconditional branches and combines them as
``uncond + s * (cond - uncond)``. Where the combination happens (on raw outputs, on
eps, on the denoised x0) is each sampler family's business and follows the official sampler.

With ``batch=True`` both branches go through ONE batched model call when ``cond`` can concatenate itself
with ``uncond`` (``cond.cat(uncond)``); otherwise two calls, cond first. Upstream batches for ddim / dpm
and makes two calls for spaced / edm ; the difference is kernel-level rounding, which
some tiny-model runs amplify beyond 1e-4, so the samplers follow upstream's pattern by default.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

__all__ = ["Model", "GuidedModel", "rescaled_cfg_scale"]

Model = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def rescaled_cfg_scale(scale: float, model_t: float) -> float:
    """``1 + s (1 - cos(pi ((1000 - t) / 1000)^5)) / 2`` (official ``Sampler.get_cfg_scale``).

    Ramps from 1 at t = 1000 to 1 + s at t = 0, so it ends at cfg + 1, not cfg, and stays near 1 for most
    of the trajectory. At t = 999 it is exactly 1.0 in float64.
    """
    return 1 + scale * ((1 - math.cos(math.pi * ((1000 - model_t) / 1000) ** 5.0)) / 2)


class GuidedModel:
    """The model with its two conditionings and the guidance scale of one run.

    ``rescale``: use :func:`rescaled_cfg_scale` of the model timestep. ``gated``: only when ``scale > 1``
    (spaced, ddim, edm); the DPM-Solver wrapper rescales whenever the flag is on.
    """

    def __init__(
        self,
        model: Model,
        cond: Any,
        uncond: Any | None,
        scale: float,
        *,
        rescale: bool = False,
        gated: bool = True,
        batch: bool = True,
    ):
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.rescale = rescale
        self.gated = gated
        self.batch = batch

    def scale_at(self, model_t: float) -> float:
        """The guidance scale used at model timestep ``model_t``."""
        if self.rescale and (self.scale > 1 or not self.gated):
            return rescaled_cfg_scale(self.scale, model_t)
        return self.scale

    def needs_uncond(self, scale: float) -> bool:
        """CFG is skipped (cond branch only) when the scale is exactly 1 or there is no uncond."""
        return self.uncond is not None and scale != 1.0

    def branches(self, x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond output, uncond output or None) of ``model`` at (x, t)."""
        if not with_uncond:
            return self.model(x, t, self.cond), None
        if self.batch and hasattr(self.cond, "cat"):
            out = self.model(torch.cat([x, x]), torch.cat([t, t]), self.cond.cat(self.uncond))
            out_cond, out_uncond = out.chunk(2)
            return out_cond, out_uncond
        return self.model(x, t, self.cond), self.model(x, t, self.uncond)

    @staticmethod
    def combine(cond_value: torch.Tensor, uncond_value: torch.Tensor | None, scale: float) -> torch.Tensor:
        """``uncond + scale * (cond - uncond)``, or ``cond`` when there is no uncond value."""
        if uncond_value is None:
            return cond_value
        return uncond_value + scale * (cond_value - uncond_value)
