"""Noise schedules and the per-sampler timestep tables of the official DiffBIR samplers.

Everything here reproduces the official tables exactly, quirks included, because the published results
depend on them. Tables are built in float64 with numpy, as upstream
does, and handed to the samplers as float32 tensors (upstream's ``Sampler.register`` buffers).

Official files (XPixelGroup/DiffBIR @3f8b530): ``diffbir/model/gaussian_diffusion.py`` (betas, zero-SNR,
``Diffusion.q_sample``), ``diffbir/sampler/spaced_sampler.py``, ``ddim_sampler.py``, ``edm_sampler.py``,
``dpm_solver_pytorch.py`` (``NoiseScheduleVP``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from ..errors import SetupError, UsageError
from ..models.description import DiffusionSpec

__all__ = [
    "NoiseSchedule",
    "make_betas",
    "space_timesteps",
    "SpacedSchedule",
    "ddim_timesteps",
    "DDIMSchedule",
    "EDMSchedule",
    "DPMSolverSchedule",
]


def make_betas(spec: DiffusionSpec) -> np.ndarray:
    """Training betas in float64 (official ``make_beta_schedule`` + ``enforce_zero_terminal_snr``).

    ``linear`` (the only schedule DiffBIR uses): ``linspace(sqrt(start), sqrt(end), T, float64) ** 2``.
    With ``zero_snr`` the schedule is rescaled so that alphas_cumprod[-1] == 0 (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1). The rescale is
    diffusers' ``rescale_zero_terminal_snr``: the same float64 torch operations as the official
    ``enforce_zero_terminal_snr`` (tests check bit-equality with the golden betas).
    """
    T, start, end = spec.timesteps, spec.linear_start, spec.linear_end
    if spec.beta_schedule == "linear":
        betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    elif spec.beta_schedule == "sqrt_linear":
        betas = np.linspace(start, end, T, dtype=np.float64)
    elif spec.beta_schedule == "sqrt":
        betas = np.linspace(start, end, T, dtype=np.float64) ** 0.5
    else:
        # upstream's "cosine" branch cannot run (it calls .pow on a numpy array), so no model uses it
        raise SetupError(f"unsupported beta_schedule {spec.beta_schedule!r} (expected linear, sqrt_linear or sqrt)")
    if spec.zero_snr:
        betas = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()
    return betas


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The training schedule of one model: float64 betas and alphas_cumprod, plus its parameterization."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    parameterization: str  # "eps" | "v"
    zero_snr: bool = False

    @classmethod
    def from_spec(cls, spec: DiffusionSpec) -> "NoiseSchedule":
        betas = make_betas(spec)
        return cls(betas, np.cumprod(1.0 - betas, axis=0), spec.parameterization, spec.zero_snr)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def q_sample(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion ``sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise`` with float32 coefficients.

        As the official ``Diffusion.q_sample``: both square roots are taken in float64 and stored as
        float32. Used for ``--start-point cond`` (t = T - 1) and ``--noise-aug t``.
        """
        if not 0 <= t < self.num_timesteps:
            raise UsageError(f"q_sample timestep must be in [0, {self.num_timesteps - 1}], got {t}")
        a = torch.tensor(np.sqrt(self.alphas_cumprod[t]), dtype=torch.float32, device=x0.device)
        s = torch.tensor(np.sqrt(1.0 - self.alphas_cumprod[t]), dtype=torch.float32, device=x0.device)
        return a * x0 + s * noise


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# spaced (IDDPM respacing)
# ----------------------------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Ascending timesteps of IDDPM's ``space_timesteps(T, str(N))`` (one section).

    Official ``spaced_sampler.space_timesteps`` (from openai/guided-diffusion respace.py): stride
    (T-1)/(N-1), Python ``round`` (half to even) of the ACCUMULATED float, so N=50 gives
    0, 20, 41, 61, 82, ... . Always includes 0 and T-1.
    """
    if not 1 <= steps <= num_timesteps:
        raise UsageError(f"`steps` must be in [1, {num_timesteps}] for the spaced sampler, got {steps}")
    stride = 1 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    taken, cur = set(), 0.0
    for _ in range(steps):
        taken.add(round(cur))
        cur += stride
    return sorted(taken)


@dataclass(frozen=True, eq=False)
class SpacedSchedule:
    """Respaced DDPM tables (official ``SpacedSampler.make_schedule``), index i = position in ``timesteps``.

    beta'_i = 1 - acp[tau_i] / acp[tau_{i-1}] (acp[tau_-1] = 1); posterior "fixed small" variance and
    mean coefficients of q(x_{i-1} | x_i, x0) (Ho et al. 2020, eq. 7), all float64 -> float32.
    """

    timesteps: np.ndarray  # ascending int64 training timesteps tau_i
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def build(cls, schedule: NoiseSchedule, steps: int) -> "SpacedSchedule":
        timesteps = np.array(space_timesteps(schedule.num_timesteps, steps), dtype=np.int64)
        acp = schedule.alphas_cumprod[timesteps]
        acp_prev = np.append(1.0, acp[:-1])
        betas = 1.0 - acp / acp_prev
        alphas = 1.0 - betas
        with np.errstate(divide="ignore"):  # zero-SNR: acp[999] == 0 (only the v formulas are then used)
            recip = np.sqrt(1.0 / acp)
            recipm1 = np.sqrt(1.0 / acp - 1.0)
        return cls(
            timesteps=timesteps,
            sqrt_alphas_cumprod=_f32(np.sqrt(acp)),
            sqrt_one_minus_alphas_cumprod=_f32(np.sqrt(1.0 - acp)),
            sqrt_recip_alphas_cumprod=_f32(recip),
            sqrt_recipm1_alphas_cumprod=_f32(recipm1),
            posterior_variance=_f32(betas * (1.0 - acp_prev) / (1.0 - acp)),
            posterior_mean_coef1=_f32(betas * np.sqrt(acp_prev) / (1.0 - acp)),
            posterior_mean_coef2=_f32((1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)),
        )


# ----------------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------------


def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """Ascending DDIM timesteps ``range(0, T, T // N) + 1`` (official ``make_ddim_timesteps("uniform")``).

    The +1 is upstream's ("to get the final alpha values right"): N=4 gives 1, 251, 501, 751, N=10 gives
    1, 101, ..., 901, and when T % N != 0 there are MORE than N steps (N=30 -> 31)..
    """
    if not 1 <= steps <= num_timesteps:
        raise UsageError(f"`steps` must be in [1, {num_timesteps}] for the ddim sampler, got {steps}")
    timesteps = np.arange(0, num_timesteps, num_timesteps // steps, dtype=np.int64) + 1
    if timesteps[-1] >= num_timesteps:
        # the +1 lands on T when T - 1 is a multiple of T // N (N = 3, 9, 27, 37, 101-111, 251-333, > 500
        # for T = 1000); upstream then fails with an IndexError
        raise UsageError(
            f"the ddim sampler cannot run {steps} steps: its timesteps range(0, {num_timesteps}, "
            f"{num_timesteps // steps}) + 1 would reach {num_timesteps}; choose another `steps`"
        )
    return timesteps


@dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """DDIM tables (official ``make_ddim_sampling_parameters`` with eta = 0; the pipeline hard-codes 0).

    a_prev of the first (smallest) timestep is acp[0], so sampling ends at the acp[0] noise level.
    """

    timesteps: np.ndarray  # ascending
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_alphas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor

    @classmethod
    def build(cls, schedule: NoiseSchedule, steps: int) -> "DDIMSchedule":
        timesteps = ddim_timesteps(schedule.num_timesteps, steps)
        acp = schedule.alphas_cumprod
        alphas = acp[timesteps]
        alphas_prev = np.append(acp[0], acp[timesteps[:-1]])
        eta = 0.0  #: DDIM ignores --eta
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        return cls(
            timesteps=timesteps,
            alphas=_f32(alphas),
            alphas_prev=_f32(alphas_prev),
            sigmas=_f32(sigmas),
            sqrt_alphas=_f32(np.sqrt(alphas)),
            sqrt_one_minus_alphas=_f32(np.sqrt(1.0 - alphas)),
        )


# ----------------------------------------------------------------------------------------------------
# EDM (k-diffusion solvers on a VP -> VE conversion)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EDMSchedule:
    """Sigmas and timesteps of the official ``EDMSampler.make_schedule``.

    tau = int(linspace(T-1, 0, N, endpoint=False)) (truncation; t = 0 is never evaluated), acp[tau[0]]
    is forced to 1e-8 for EVERY model (so sigma_max = 1e4, also for eps models whose true value is
    14.6), sigma = sqrt((1 - acp) / acp), then sigma 0 / timestep 0 appended. float32 buffers.
    No Karras rho schedule.
    """

    sigmas: torch.Tensor  # float32, N + 1, descending, last 0
    timesteps: torch.Tensor  # int64, N + 1

    @classmethod
    def build(cls, schedule: NoiseSchedule, steps: int) -> "EDMSchedule":
        if steps < 1:
            raise UsageError(f"`steps` must be >= 1, got {steps}")
        tau = np.linspace(schedule.num_timesteps - 1, 0, steps, endpoint=False).astype(int)
        acp = schedule.alphas_cumprod[tau].copy()
        acp[0] = 1e-8
        sigmas = np.append(((1 - acp) / acp) ** 0.5, 0)
        return cls(_f32(sigmas), torch.tensor(np.append(tau, 0), dtype=torch.long))

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[0]

    def timestep_for(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timestep of each sigma: the timestep of the NEAREST schedule sigma (ties -> first).

        Upstream's ``convert_to_denoiser`` snaps every sigma a solver evaluates (churned sigma_hat, Heun
        end points, DPM-2 / DPM++ midpoints) to a grid entry, while c_in / c_out use the true sigma.
        """
        idx = (sigma.reshape(1, -1) - self.sigmas.to(sigma.device)[:, None]).abs().argmin(dim=0)
        return self.timesteps.to(sigma.device)[idx].view(sigma.shape)

    def start(self, x_T: torch.Tensor) -> torch.Tensor:
        """VE start point ``x_T * sqrt(1 + sigma_max^2)`` (float32, = 1e4 * x_T)."""
        return x_T * torch.sqrt(1.0 + self.sigma_max.to(x_T.device) ** 2.0)


# ----------------------------------------------------------------------------------------------------
# DPM-Solver (continuous-time wrapper of the discrete schedule)
# ----------------------------------------------------------------------------------------------------


class DPMSolverSchedule:
    """``NoiseScheduleVP('discrete', betas)`` of the official dpm_solver_pytorch.py, in float32.

    log alpha_n = 1/2 sum_{k<=n} log(1 - beta_k) from the float32 betas; trailing entries whose
    half-log-SNR lambda < -5.1 are dropped (``numerical_clip_alpha``): nothing for a plain linear schedule,
    14 entries for zero-SNR (total_N = 986). Continuous time t_n = (n + 1) / total_N, log alpha(t)
    piecewise linear in t. Model time is ``(t - 1/total_N) * 1000`` even when total_N = 986, so on
    zero-SNR models the labels are stretched by 1000/986 relative to the noise level.
    """

    CLIPPED_LAMBDA = -5.1

    def __init__(self, schedule: NoiseSchedule):
        betas = torch.tensor(schedule.betas, dtype=torch.float32)
        log_alphas = 0.5 * torch.log(1 - betas).cumsum(dim=0)
        log_sigmas = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alphas))
        lambdas = log_alphas - log_sigmas
        n_clipped = int(torch.searchsorted(torch.flip(lambdas, [0]), self.CLIPPED_LAMBDA))
        if n_clipped > 0:
            log_alphas = log_alphas[:-n_clipped]
        self.total_N = int(log_alphas.shape[0])
        self.log_alpha_array = log_alphas.to(torch.float32)
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:].to(torch.float32)

    @property
    def t_end(self) -> float:
        return 1.0 / self.total_N

    def time_grid(self, steps: int) -> torch.Tensor:
        """``skip_type='time_uniform'``: linspace(1, 1/total_N, steps + 1) in float32."""
        return torch.linspace(1.0, self.t_end, steps + 1)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The float timestep label handed to the model (official ``get_model_input_time``)."""
        return (t - 1.0 / self.total_N) * 1000.0

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Piecewise-linear interpolation of log alpha at continuous times t (float32, any shape)."""
        xp, yp = self.t_array.to(t.device), self.log_alpha_array.to(t.device)
        flat = t.reshape(-1)
        # segment k covers [xp[k], xp[k+1]]; outside the table the end segments extrapolate, as upstream
        k = (torch.searchsorted(xp, flat) - 1).clamp(0, xp.shape[0] - 2)
        x0, x1, y0, y1 = xp[k], xp[k + 1], yp[k], yp[k + 1]
        return (y0 + (flat - x0) * (y1 - y0) / (x1 - x0)).reshape(t.shape)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half-log-SNR lambda(t) = log alpha_t - log sigma_t."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

