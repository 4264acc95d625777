"""The 14 samplers of the official DiffBIR CLI behind one call: ``sample(name, model, x_T, ...) -> z``.

Name -> family -> solver (official ``diffbir/pipeline.py Pipeline.apply_cldm``):

=================  ============  =============================================================
name               family        solver (module)
=================  ============  =============================================================
spaced             spaced        ancestral DDPM on respaced timesteps (``spaced``)
ddim               ddim          DDIM, eta fixed to 0 (``ddim``)
dpm++_m2           dpm_solver    DPM-Solver++(2M), continuous time (``dpm_solver``)
edm_<solver>       edm           k-diffusion ``sample_<solver>`` on the EDM denoiser (``k_samplers``, ``edm``)
=================  ============  =============================================================

The model interface is ``model(x_t, t, cond) -> eps or v`` (``t``: int64 labels, float32 for dpm++_m2).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import UsageError
from . import k_samplers as ks
from .cfg import GuidedModel, Model
from .ddim import sample_ddim
from .dpm_solver import sample_dpmpp_multistep
from .edm import EDMDenoiser
from .hooks import OnStep, X0Hook
from .noise import GeneratorNoise, NoiseSource
from .schedules import DDIMSchedule, DPMSolverSchedule, EDMSchedule, NoiseSchedule, SpacedSchedule
from .spaced import sample_spaced
from .tiled_sampling import TiledModel

__all__ = ["SAMPLERS", "SamplerSpec", "sample", "sample_schedule_timesteps"]

log = logging.getLogger("restorecli.diffusion")


@dataclass(frozen=True)
class SamplerSpec:
    """One CLI sampler: its family, its solver (edm only) and the knobs that change its result."""

    name: str
    family: str  # "spaced" | "ddim" | "dpm_solver" | "edm"
    knobs: tuple[str, ...]  # which of s_churn, s_tmin, s_tmax, s_noise, eta, order it reads
    draws: str  # fresh noise per run of n steps 
    solver: Callable[..., torch.Tensor] | None = None


_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_ANCESTRAL = ("eta", "s_noise")

SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("spaced", "spaced", (), "n (every step; the last is multiplied by 0)"),
        SamplerSpec("ddim", "ddim", (), "n (every step, multiplied by sigma = 0)"),
        SamplerSpec("dpm++_m2", "dpm_solver", (), "none"),
        SamplerSpec("edm_euler", "edm", _CHURN, "n (every step, used only with churn)", ks.sample_euler),
        SamplerSpec("edm_euler_a", "edm", _ANCESTRAL, "n - 1", ks.sample_euler_ancestral),
        SamplerSpec("edm_heun", "edm", _CHURN, "n (every step, used only with churn)", ks.sample_heun),
        SamplerSpec("edm_dpm_2", "edm", _CHURN, "n (every step, used only with churn)", ks.sample_dpm_2),
        SamplerSpec("edm_dpm_2_a", "edm", _ANCESTRAL, "n - 1", ks.sample_dpm_2_ancestral),
        SamplerSpec("edm_lms", "edm", ("order",), "none", ks.sample_lms),
        SamplerSpec("edm_dpm++_2s_a", "edm", _ANCESTRAL, "n - 1", ks.sample_dpmpp_2s_ancestral),
        SamplerSpec("edm_dpm++_sde", "edm", _ANCESTRAL, "2 (n - 1)", ks.sample_dpmpp_sde),
        SamplerSpec("edm_dpm++_2m", "edm", (), "none", ks.sample_dpmpp_2m),
        SamplerSpec("edm_dpm++_2m_sde", "edm", _ANCESTRAL, "n - 1 (none with eta = 0)", ks.sample_dpmpp_2m_sde),
        SamplerSpec("edm_dpm++_3m_sde", "edm", _ANCESTRAL, "n - 1 (none with eta = 0)", ks.sample_dpmpp_3m_sde),
    )
}


def _check(name: str, steps: int, s_churn: float, s_noise: float, eta: float, order: int) -> SamplerSpec:
    if name not in SAMPLERS:
        raise UsageError(f"`sampler` must be one of {', '.join(SAMPLERS)}; got {name!r}")
    if steps < 1:
        raise UsageError(f"`steps` must be >= 1, got {steps}")
    if order < 1:
        raise UsageError(f"`order` must be >= 1, got {order}")
    for flag, value in (("eta", eta), ("s_churn", s_churn), ("s_noise", s_noise)):
        if not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"`{flag}` must be a finite number >= 0, got {value}")
    return SAMPLERS[name]


@torch.no_grad()
def sample(
    name: str,
    model: Model,
    x_T: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    steps: int,
    cond: Any,
    uncond: Any | None = None,
    cfg: float = 1.0,
    rescale_cfg: bool = False,
    noise: NoiseSource | torch.Generator,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 300.0,
    s_noise: float = 1.0,
    eta: float = 1.0,
    order: int = 1,
    tile: tuple[int, int] | None = None,
    batch_cfg: bool | None = None,
    on_step: OnStep | None = None,
    x0_hook: X0Hook | None = None,
) -> torch.Tensor:
    """Run sampler ``name`` from x_T (unit variance, already drawn by the caller) to the final latent z.

    ``noise`` supplies every draw after x_T: a :class:`NoiseSource`, or the image's CPU generator (wrapped
    in :class:`GeneratorNoise`). ``tile = (size, stride)`` in LATENT units turns on the official tiled
    denoiser (``cond`` must then offer ``crop``). ``batch_cfg``: True runs cond and uncond in one batched
    model call (when ``cond`` offers ``cat``), False in two calls; None (default) does what upstream does
    (batched for ddim / dpm++_m2, two calls for spaced / edm_*), which reproduces the official runs
    bit for bit on CPU. Batching is faster but changes kernel rounding, which the blown-up tiny-model
    runs of edm_heun / edm_dpm_2 / edm_dpm_2_a amplify to ~4e-3 relative. EDM samplers scale x_T by
    sqrt(1 + sigma_max^2) themselves. Knob defaults are the official CLI's (s_tmax 300, eta 1, order 1);
    DDIM ignores eta as upstream does.
    """
    spec = _check(name, steps, s_churn, s_noise, eta, order)
    if isinstance(noise, torch.Generator):
        noise = GeneratorNoise(noise)
    par = schedule.parameterization
    if par not in ("eps", "v"):
        raise UsageError(f"parameterization must be 'eps' or 'v', got {par!r}")
    if tile is not None:
        model = TiledModel(model, *tile)
    batch = spec.family in ("ddim", "dpm_solver") if batch_cfg is None else batch_cfg
    guided = GuidedModel(model, cond, uncond, cfg, rescale=rescale_cfg, gated=spec.family != "dpm_solver", batch=batch)
    log.debug("sampling %s: %d steps, cfg %s%s, latent %s%s", name, steps, cfg, " (rescaled)" if rescale_cfg else "",
              tuple(x_T.shape), f", tiles {tile}" if tile else "")

    if spec.family == "spaced":
        return sample_spaced(guided, x_T, SpacedSchedule.build(schedule, steps), par,
                             noise=noise, x0_hook=x0_hook, on_step=on_step)
    if spec.family == "ddim":
        return sample_ddim(guided, x_T, DDIMSchedule.build(schedule, steps), par,
                           noise=noise, x0_hook=x0_hook, on_step=on_step)
    if spec.family == "dpm_solver":
        return sample_dpmpp_multistep(guided, x_T, DPMSolverSchedule(schedule), par, steps=steps, order=2,
                                      x0_hook=x0_hook, on_step=on_step)

    edm = EDMSchedule.build(schedule, steps)
    sigmas = edm.sigmas.to(x_T.device)
    denoise = EDMDenoiser(guided, edm, par, x0_hook=x0_hook)
    knobs = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise, "eta": eta, "order": order}
    return spec.solver(denoise, edm.start(x_T), sigmas, noise=noise, on_step=on_step,
                       **{k: knobs[k] for k in spec.knobs})


def sample_schedule_timesteps(name: str, schedule: NoiseSchedule, steps: int) -> list[float]:
    """The timestep labels of the solver's grid, first model call first (for logs and docs).

    Second-order EDM solvers also evaluate off-grid sigmas, snapped to these labels.
    """
    family = _check(name, steps, 0.0, 1.0, 1.0, 1).family
    if family == "spaced":
        return [float(t) for t in reversed(SpacedSchedule.build(schedule, steps).timesteps)]
    if family == "ddim":
        return [float(t) for t in reversed(DDIMSchedule.build(schedule, steps).timesteps)]
    if family == "dpm_solver":
        ns = DPMSolverSchedule(schedule)
        return [float(t) for t in ns.model_time(ns.time_grid(steps)[:-1])]
    return [float(t) for t in EDMSchedule.build(schedule, steps).timesteps[:-1]]
