"""Schedules and timestep sequences against golden/schedules.safetensors (official DiffBIR @3f8b530).

Every tensor of the golden file is checked: the training betas / alphas_cumprod, each sampler's buffers
after ``make_schedule(4)``, and ``{par}/{sampler}/steps{4,10}/model_t``, the timestep handed to the
model at every call, recorded with a fake model (no weights needed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_golden
from restorecli.diffusion.conditioning import ControlCondition
from restorecli.diffusion.k_samplers import lms_coefficient
from restorecli.diffusion.noise import GeneratorNoise
from restorecli.diffusion.sampling import SAMPLERS, sample, sample_schedule_timesteps
from restorecli.diffusion.schedules import (
    DDIMSchedule,
    DPMSolverSchedule,
    EDMSchedule,
    NoiseSchedule,
    SpacedSchedule,
    ddim_timesteps,
    space_timesteps,
)
from restorecli.errors import UsageError
from restorecli.models.description import DiffusionSpec, load_model_description

PARS = ("eps", "v")
TWO_CALLS_PER_EVAL = ("spaced",) + tuple(n for n in SAMPLERS if n.startswith("edm_"))  # official cond, then uncond


@pytest.fixture(scope="module")
def golden(reference_dir):
    return load_golden(reference_dir, "schedules")[0]


@pytest.fixture(scope="module")
def schedules(reference_dir):
    files = {"eps": "model_eps.json", "v": "model_v.json"}
    return {par: NoiseSchedule.from_spec(load_model_description(reference_dir / f).diffusion) for par, f in files.items()}


class RecordingModel:
    """Fake model: records the timestep of every call, returns a harmless finite output."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, t, cond):
        self.calls.append(t.detach().clone())
        return 0.1 * x + 0.01 * cond.c_img


def _record(name, schedule, steps, cfg, *, batch_cfg=True):
    model = RecordingModel()
    cond = ControlCondition(torch.zeros(1, 77, 8), torch.full((1, 4, 4, 4), 0.5))
    uncond = ControlCondition(torch.ones(1, 77, 8), cond.c_img)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sample(name, model, x_T, schedule=schedule, steps=steps, cond=cond, uncond=uncond, cfg=cfg,
           noise=GeneratorNoise.from_seed(1), batch_cfg=batch_cfg)
    return model.calls


def _buffers(par, sampler, schedule):
    """Our table for each buffer name the golden file stores after make_schedule(4)."""
    if sampler == "spaced":
        s = SpacedSchedule.build(schedule, 4)
        names = ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance", "sqrt_alphas_cumprod")
        return {n: getattr(s, n) for n in names}
    if sampler == "ddim":
        s = DDIMSchedule.build(schedule, 4)
        return {"ddim_alphas": s.alphas, "ddim_alphas_prev": s.alphas_prev, "ddim_sigmas": s.sigmas}
    s = EDMSchedule.build(schedule, 4)
    return {"sigmas": s.sigmas, "timesteps": s.timesteps}


@pytest.mark.parametrize("par", PARS)
def test_training_schedule_is_bit_identical(golden, schedules, par):
    """Bit-identical on the CPU the golden data were made on (AMD EPYC). The zero-SNR rescale of the v
    model is the official float64 torch arithmetic, which on an Intel Xeon (AVX512-FP16) rounds 24 of
    the 1000 betas one ulp differently (measured 2026-12-02: torch, numpy and a Python loop agree with
    each other there, 3.5 eps at most); so within 4 eps absolute (betas are 1 - alpha with alpha near
    1: they inherit its absolute rounding), which no formula mistake stays inside."""
    for name in ("betas", "alphas_cumprod"):
        ours, official = torch.from_numpy(getattr(schedules[par], name)), golden[f"{par}/{name}"]
        assert (ours - official).abs().max() <= 4 * torch.finfo(torch.float64).eps, name
        if par == "eps":
            assert torch.equal(ours, official)  # no rescale: exactly upstream's numpy on every CPU


def test_zero_snr_facts(schedules):
    acp = schedules["v"].alphas_cumprod
    assert acp[-1] == 0 and schedules["v"].betas[-1] == 1
    assert acp[-2] == pytest.approx(1.97e-7, rel=1e-2)
    acp_eps = schedules["eps"].alphas_cumprod[-1]
    assert np.sqrt((1 - acp_eps) / acp_eps) == pytest.approx(14.6146, abs=1e-4)


def test_every_golden_tensor_is_checked(golden, schedules):
    """Walk the whole golden file; buffers must match exactly, model_t rows per evaluation."""
    checked = set()
    recorded = {}
    for key, want in golden.items():
        parts = key.split("/")
        if len(parts) == 2:
            checked.add(key)  # betas / alphas_cumprod: test_training_schedule_is_bit_identical
            continue
        par, sampler, steps_tag, name = parts
        steps = int(steps_tag.removeprefix("steps"))
        if name != "model_t":
            assert steps == 4, key
            ours = _buffers(par, sampler, schedules[par])[name]
            assert ours.dtype == want.dtype and torch.equal(ours, want), key
        else:
            # steps10 rows come from cfg = 1 runs (one call per evaluation), steps4 rows from cfg-4 runs
            cfg = 1.0 if steps == 10 else 4.0
            ident = (par, sampler, steps)
            if ident not in recorded:
                # upstream's call pattern: spaced / edm call cond then uncond, ddim / dpm batch them
                recorded[ident] = _record(sampler, schedules[par], steps, cfg, batch_cfg=sampler not in TWO_CALLS_PER_EVAL)
            got = torch.stack([t[0].double() for t in recorded[ident]])
            want_rows = want
            assert got.shape == want_rows.shape, f"{key}: {got.tolist()} vs {want_rows.tolist()}"
            assert torch.equal(got, want_rows), f"{key}: {got.tolist()} vs {want_rows.tolist()}"
        checked.add(key)
    assert checked == set(golden)
    assert len([k for k in golden if k.count("/") == 3]) == 114


@pytest.mark.parametrize("sampler", ["spaced", "ddim", "dpm++_m2", "edm_heun", "edm_dpm++_sde", "edm_lms"])
@pytest.mark.parametrize("par", PARS)
def test_batched_cfg_keeps_per_evaluation_timesteps(golden, schedules, par, sampler):
    """With cond+uncond batched (our default) each call carries the official evaluation's timestep twice."""
    calls = _record(sampler, schedules[par], 4, 4.0, batch_cfg=True)
    want = golden[f"{par}/{sampler}/steps4/model_t"]
    if sampler in TWO_CALLS_PER_EVAL:
        assert torch.equal(want[0::2], want[1::2])
        want = want[0::2]
    assert all(t.shape == (2,) and t[0] == t[1] for t in calls)
    assert torch.equal(torch.stack([t[0].double() for t in calls]), want)


def test_model_time_dtypes(schedules):
    assert all(t.dtype == torch.long for t in _record("spaced", schedules["eps"], 4, 1.0))
    assert all(t.dtype == torch.long for t in _record("edm_euler", schedules["eps"], 4, 1.0))
    assert all(t.dtype == torch.float32 for t in _record("dpm++_m2", schedules["v"], 4, 1.0))


def test_space_timesteps_rounds_the_accumulated_stride():
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(1000, 10) == list(range(0, 1000, 111))
    assert space_timesteps(1000, 50)[:8] == [0, 20, 41, 61, 82, 102, 122, 143]
    assert space_timesteps(1000, 1) == [0]


def test_ddim_timesteps_offset_and_extra_steps():
    assert ddim_timesteps(1000, 4).tolist() == [1, 251, 501, 751]
    assert ddim_timesteps(1000, 10)[-1] == 901
    assert len(ddim_timesteps(1000, 30)) == 31 and ddim_timesteps(1000, 30)[-1] == 991
    for steps in (3, 9, 27, 37, 105, 300, 501):  # upstream: IndexError (timestep 1000)
        with pytest.raises(UsageError, match="ddim"):
            ddim_timesteps(1000, steps)


def test_edm_sigma_max_is_forced_for_every_model(schedules):
    for par, first in (("eps", 8.3028), ("v", 18.13005)):
        s = EDMSchedule.build(schedules[par], 10)
        assert float(s.sigmas[0]) == pytest.approx(1e4)
        assert float(s.sigmas[1]) == pytest.approx(first, rel=1e-5)
        assert s.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, 0]
    s = EDMSchedule.build(schedules["eps"], 4)
    assert torch.equal(s.start(torch.ones(1)), torch.tensor([1e4]))
    # any sigma gets the timestep of the nearest grid sigma; ties go to the first
    assert s.timestep_for(torch.tensor([6000.0, 3.0, 1.2, 0.1])).tolist() == [999, 749, 499, 0]


def test_dpm_solver_clips_the_zero_snr_table(schedules):
    assert DPMSolverSchedule(schedules["eps"]).total_N == 1000
    ns = DPMSolverSchedule(schedules["v"])
    assert ns.total_N == 986
    assert float(ns.lambda_(ns.t_array[-1])) == pytest.approx(-5.052, abs=2e-3)  # lambda_985 >= -5.1: kept
    # model time is still (t - 1/986) * 1000: labels stretched by 1000/986
    assert float(ns.model_time(torch.tensor(1.0))) == pytest.approx(998.9858, abs=1e-3)


def test_schedule_timesteps_helper(schedules):
    assert sample_schedule_timesteps("spaced", schedules["eps"], 4) == [999, 666, 333, 0]
    assert sample_schedule_timesteps("ddim", schedules["eps"], 4) == [751, 501, 251, 1]
    assert sample_schedule_timesteps("edm_euler", schedules["eps"], 4) == [999, 749, 499, 249]
    assert sample_schedule_timesteps("dpm++_m2", schedules["eps"], 4) == pytest.approx([999, 749.25, 499.5, 249.75])


def test_q_sample_uses_float32_coefficients(schedules):
    s = schedules["eps"]
    x0, z = torch.full((1, 4, 2, 2), 0.3), torch.full((1, 4, 2, 2), -1.2)
    a = torch.tensor(np.sqrt(s.alphas_cumprod[200]), dtype=torch.float32)
    b = torch.tensor(np.sqrt(1 - s.alphas_cumprod[200]), dtype=torch.float32)
    assert torch.equal(s.q_sample(x0, 200, z), a * x0 + b * z)
    assert torch.equal(schedules["v"].q_sample(x0, 999, z), z)  # zero SNR: --start-point cond is pure noise
    with pytest.raises(UsageError):
        s.q_sample(x0, 1000, z)


def test_unsupported_beta_schedule_is_a_setup_error():
    from restorecli.errors import SetupError

    with pytest.raises(SetupError, match="cosine"):
        NoiseSchedule.from_spec(DiffusionSpec(beta_schedule="cosine"))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_are_exact_integrals(order):
    """Exact polynomial integrals; official scipy quad(epsrel=1e-4) differs far below the tolerance."""
    sig = np.array([1e4, 4.0817294, 1.6128862, 0.6932049, 0.3, 0.0], dtype=np.float32).astype(np.float64)
    i = 4
    coeffs = [lms_coefficient(order, sig, i, j) for j in range(order)]
    # the Lagrange weights integrate every polynomial of degree < order exactly
    for p in range(order):
        exact = (sig[i + 1] ** (p + 1) - sig[i] ** (p + 1)) / (p + 1)
        assert sum(c * sig[i - j] ** p for j, c in enumerate(coeffs)) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    # independent cross-check: Gauss-Legendre quadrature (exact for these polynomial integrands), not the
    # closed form above; the official code uses scipy's adaptive quad, which is not a dependency here
    nodes, weights = np.polynomial.legendre.leggauss(8)
    a, b = sig[i], sig[i + 1]
    taus = (b - a) / 2 * nodes + (a + b) / 2

    def basis(tau, j):
        return np.prod([(tau - sig[i - k]) / (sig[i - j] - sig[i - k]) for k in range(order) if k != j])

    for j, c in enumerate(coeffs):
        q = (b - a) / 2 * sum(w * basis(t, j) for w, t in zip(weights, taus))
        assert abs(q - c) <= 1e-9 * max(1.0, abs(c))
