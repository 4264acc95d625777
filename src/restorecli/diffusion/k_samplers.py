"""The eleven ``edm_*`` solvers, k-diffusion style: ``sample_x(denoise, x, sigmas, *, noise, knobs, on_step)``.

Semantics of crowsonkb/k-diffusion ``k_diffusion/sampling.py`` as vendored by DiffBIR
(``diffbir/sampler/k_diffusion.py`` @3f8b530), with two deliberate differences:

* Every noise tensor comes from the injected :class:`~restorecli.diffusion.noise.NoiseSource` (the image's
  generator), never from ``torch.randn_like`` and the global RNG.
* The SDE solvers (``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``) take one plain standard-normal draw
  per call of the noise sampler instead of a normalised Brownian-tree increment. Upstream seeds its
  ``torchsde.BrownianTree`` with ``torch.randint`` from the global CPU generator AFTER every module's
  random initialisation, so its results depend on the captioner, the cleaner architecture, library
  versions, the image's position in the folder and the batch size ; a defect no result
  should depend on. Plain draws keep the marginal distribution of each increment (N(0, 1) after
  normalisation) and make the seed alone determine the output; they are what the golden runs and CLI
  cases of the reference data use. For 2M/3M SDE the tree is queried on disjoint intervals, whose
  increments are independent anyway, so the joint distribution is unchanged. ``dpmpp_sde`` queries
  [sigma_i, sigma_mid] and then [sigma_i, sigma_next], which overlap: the tree's two normalised increments
  are correlated (coefficient sqrt(|sigma_mid - sigma_i| / |sigma_next - sigma_i|)), the plain draws are not.

Quirks kept: euler / heun / dpm_2 draw a noise tensor at the top of EVERY step even when there is no churn
(it advances the generator); the ancestral solvers draw only while sigma_next > 0 (dpm_2_a: sigma_down != 0);
``dpmpp_sde`` draws twice per non-final step; the 2M/3M SDE solvers once per non-final step when eta != 0.

``denoise(x, sigma, step) -> D`` is :class:`~restorecli.diffusion.edm.EDMDenoiser`; sigmas are float32
0-d tensors and all arithmetic stays in float32, as upstream.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .hooks import OnStep
from .noise import NoiseSource

__all__ = [
    "Denoiser",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_lms",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "lms_coefficient",
]

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float):
    """(sigma_down, sigma_up) of an ancestral step.

    sigma_up = min(sigma_to, eta sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2).
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _churn(x, sigma, n_steps, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Algorithm 2 lines 4-6: raise sigma by gamma and add matching noise.

    The noise is drawn unconditionally (upstream draws it before testing gamma > 0).
    """
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = noise(x) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _dpm_2_step(
    denoise: Denoiser, x: torch.Tensor, d: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, i: int
) -> torch.Tensor:
    """DPM-Solver-2 step from sigma to sigma_next > 0 (Lu et al. 2022): Euler to the midpoint in log sigma,
    then the whole step with the derivative there. ``d`` is dx/dsigma at (x, sigma)."""
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = _to_d(x_2, sigma_mid, denoise(x_2, sigma_mid, i))
    return x + d_2 * (sigma_next - sigma)


def _done(on_step: OnStep | None, i: int, n: int) -> None:
    if on_step is not None:
        on_step(i + 1, n)


def sample_euler(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 with Euler steps (optional churn)."""
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = _to_d(x, sigma_hat, denoise(x, sigma_hat, i))
        x = x + d * (sigmas[i + 1] - sigma_hat)
        _done(on_step, i, n)
    return x


def sample_heun(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 2 (Heun's 2nd-order method; Euler on the step to sigma = 0)."""
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = _to_d(x, sigma_hat, denoise(x, sigma_hat, i))
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1], i))
            x = x + (d + d_2) / 2 * dt
        _done(on_step, i, n)
    return x


def sample_dpm_2(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 midpoint steps in log sigma (Lu et al. 2022) inside Karras Algorithm 2."""
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = _to_d(x, sigma_hat, denoise(x, sigma_hat, i))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            x = _dpm_2_step(denoise, x, d, sigma_hat, sigmas[i + 1], i)
        _done(on_step, i, n)
    return x


def sample_euler_ancestral(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    eta: float = 1.0, s_noise: float = 1.0, on_step: OnStep | None = None,
) -> torch.Tensor:
    """Ancestral sampling with Euler steps: Euler to sigma_down, then add sigma_up of fresh noise."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i], i)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(x) * s_noise * sigma_up
        _done(on_step, i, n)
    return x


def sample_dpm_2_ancestral(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    eta: float = 1.0, s_noise: float = 1.0, on_step: OnStep | None = None,
) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver-2 steps to sigma_down (Euler when sigma_down = 0)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i], i)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm_2_step(denoise, x, d, sigmas[i], sigma_down, i)
            x = x + noise(x) * s_noise * sigma_up
        _done(on_step, i, n)
    return x


def lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial l_j on the nodes t_i, ..., t_{i-order+1}.

    Upstream (k-diffusion ``linear_multistep_coeff``) integrates numerically with
    ``scipy.integrate.quad(epsrel=1e-4)``; the integrand is a polynomial of degree order-1, so it is
    integrated exactly here with numpy polynomials, in a variable shifted to t_i to avoid cancellation.
    """
    if order - 1 > i:
        raise ValueError(f"LMS order {order} too high for step {i}")
    t = np.asarray(t, dtype=np.float64)
    node = t[i - j]
    others = [t[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial.fromroots([r - t[i] for r in others]) if others else np.polynomial.Polynomial([1.0])
    basis = basis / float(np.prod([node - r for r in others])) if others else basis
    return float(basis.integ()(t[i + 1] - t[i]))


def sample_lms(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    order: int = 4, on_step: OnStep | None = None,
) -> torch.Tensor:
    """Linear multistep in sigma with Lagrange-polynomial coefficients (order 1 = Euler). No noise."""
    n = len(sigmas) - 1
    nodes = sigmas.detach().cpu().numpy().astype(np.float64)
    history: list[torch.Tensor] = []
    for i in range(n):
        history.append(_to_d(x, sigmas[i], denoise(x, sigmas[i], i)))
        history = history[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(cur_order, nodes, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(history)))
        _done(on_step, i, n)
    return x


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def sample_dpmpp_2s_ancestral(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    eta: float = 1.0, s_noise: float = 1.0, on_step: OnStep | None = None,
) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, singlestep, r = 1/2)."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i], i)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = denoise(x_2, _sigma(s), i)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(x) * s_noise * sigma_up
        _done(on_step, i, n)
    return x


def sample_dpmpp_sde(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, on_step: OnStep | None = None,
) -> torch.Tensor:
    """DPM-Solver++ SDE (stochastic singlestep, midpoint ratio r): two noise draws per non-final step."""
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoise(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            # half step to sigma(s), ancestral
            sd, su = _ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = _t(sd)
            x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(x) * s_noise * su
            denoised_2 = denoise(x_2, _sigma(s), i)
            # full step to sigma_next, ancestral
            sd, su = _ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise(x) * s_noise * su
        _done(on_step, i, n)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2); first order on the first and the last step."""
    n = len(sigmas) - 1
    old_denoised = None
    for i in range(n):
        denoised = denoise(x, sigmas[i], i)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        _done(on_step, i, n)
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    eta: float = 1.0, s_noise: float = 1.0, on_step: OnStep | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant; the step to sigma = 0 returns D."""
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoise(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / (h_last / h)) * (denoised - old_denoised)
            if eta:
                x = x + noise(x) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
        _done(on_step, i, n)
    return x


def sample_dpmpp_3m_sde(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource,
    eta: float = 1.0, s_noise: float = 1.0, on_step: OnStep | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (third-order multistep in log sigma); the step to sigma = 0 returns D."""
    n = len(sigmas) - 1
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(n):
        denoised = denoise(x, sigmas[i], i)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(x) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
        _done(on_step, i, n)
    return x
