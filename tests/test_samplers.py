"""All 14 samplers against the official DiffBIR runs (golden/sampling_{eps,v}.safetensors, golden/tiled).

Tiny models from model_eps.json / model_v.json; 4 steps, cfg 4, every other knob at its default. Final
latents are compared relative to the tensor's scale (several eps EDM runs end at |z| ~ 1e4 and some v runs
blow up, as the reference README notes). The noise each sampler consumes must be exactly the recorded
draws, regenerated from the run's seed. Fast properties of the interfaces use a fake model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_close_rel, load_golden
from restorecli.diffusion.cfg import GuidedModel, rescaled_cfg_scale
from restorecli.diffusion.conditioning import ControlCondition, ControlledModel
from restorecli.diffusion.noise import GeneratorNoise
from restorecli.diffusion.sampling import SAMPLERS, sample
from restorecli.diffusion.schedules import NoiseSchedule
from restorecli.diffusion.tiled_sampling import TiledModel
from restorecli.errors import UsageError
from restorecli.models.description import DiffusionSpec, load_model_description

PARS = ("eps", "v")


class RecordingNoise(GeneratorNoise):
    """The image's generator, keeping every tensor it hands out."""

    def __init__(self, seed: int):
        super().__init__(torch.Generator("cpu").manual_seed(seed))
        self.handed_out: list[torch.Tensor] = []

    def __call__(self, like):
        z = super().__call__(like)
        self.handed_out.append(z.clone())
        return z


@pytest.fixture(scope="module")
def stage2(reference_dir):
    """Per parameterization: the tiny Stage2Models, loaded once."""
    from restorecli.models.stage2 import load_stage2

    return {par: load_stage2(load_model_description(reference_dir / f"model_{par}.json"), use_cache=False) for par in PARS}


@pytest.fixture(scope="module")
def tiny(stage2):
    """Per parameterization: (sampler model, training schedule)."""
    return {par: (ControlledModel(m.controlled_unet()), NoiseSchedule.from_spec(m.diffusion)) for par, m in stage2.items()}


def _golden_run(reference_dir, tiny, par, name, **overrides):
    golden, meta = load_golden(reference_dir, f"sampling_{par}")
    run = json.loads(meta["runs"])[name]
    model, schedule = tiny[par]
    noise = RecordingNoise(run["seed"])
    x_T = noise.randn((1, 4, 8, 12))
    z = sample(
        name, model, x_T, schedule=schedule, steps=4, noise=noise, cfg=float(meta["cfg"]),
        cond=ControlCondition(golden["c_txt"], golden["c_img"]),
        uncond=ControlCondition(golden["c_txt_neg"], golden["c_img"]),
        **overrides,
    )
    return z, x_T, noise, golden, run


#: The final latents after 4 steps of the tiny random model are chaotic (the eps model's reach 2e4): on
#: the AMD EPYC the golden data were made on they match to 1e-4, but another CPU's fp32 kernels (an
#: Intel Xeon with AVX512-FP16, measured 2026-12-02) or one thread instead of two move them by up to
#: 2.9e-3 of their scale (v/edm_heun; eps/edm_heun 2.2e-4), rounding-sized changes amplified. The
#: mistakes this test is for (a wrong sigma, timestep or cfg order) move them by O(1).
FINAL_LATENT_RTOL = 5e-3


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("par", PARS)
def test_final_latent_matches_official(reference_dir, tiny, par, name):
    z, x_T, noise, golden, run = _golden_run(reference_dir, tiny, par, name)
    assert torch.equal(x_T, golden[f"{name}/x_T"])
    assert torch.isfinite(z).all()
    assert_close_rel(z, golden[f"{name}/z"], FINAL_LATENT_RTOL, what=f"{par}/{name}/z")

    # exactly the recorded draws, in order: x_T + the sampler's own
    recorded = sorted(k for k in golden if k.startswith(f"{name}/noise_"))
    assert noise.draws == run["n_draws"] == len(recorded) + 1
    for k, ours in zip(recorded, noise.handed_out, strict=True):
        assert torch.equal(ours, golden[k]), k
    # ... and those draws are the seed's stream: x_T first, then noise_00, noise_01, ...
    regen = torch.Generator("cpu").manual_seed(run["seed"])
    stream = [torch.randn((1, 4, 8, 12), generator=regen, dtype=torch.float32) for _ in range(run["n_draws"])]
    assert torch.equal(stream[0], golden[f"{name}/x_T"])
    assert all(torch.equal(a, golden[k]) for a, k in zip(stream[1:], recorded))


def test_tiled_sampling_matches_official(reference_dir, tiny):
    golden, meta = load_golden(reference_dir, "tiled")
    assert meta["sampler"] == "edm_euler_a" and meta["parameterization"] == "v"
    model, schedule = tiny["v"]
    size, stride = int(meta["tile_size_latent"]), int(meta["tile_stride_latent"])
    noise = RecordingNoise(int(meta["seed"]))
    x_T = noise.randn(golden["x_T"].shape)
    assert torch.equal(x_T, golden["x_T"])
    z = sample(
        "edm_euler_a", model, x_T, schedule=schedule, steps=4, cfg=4.0, noise=noise, tile=(size, stride),
        cond=ControlCondition(golden["c_txt"], golden["c_img"]),
        uncond=ControlCondition(golden["c_txt_neg"], golden["c_img"]),
    )
    assert_close_rel(z, golden["z"], 1e-4, what="tiled z")
    drawn = sorted(k for k in golden if k.startswith("noise_"))
    assert len(noise.handed_out) == len(drawn) == 3
    assert all(torch.equal(a, golden[k]) for a, k in zip(noise.handed_out, drawn))


@pytest.mark.parametrize("par, name", [("v", "edm_dpm++_3m_sde"), ("eps", "spaced")])
def test_same_seed_same_bytes_other_seed_differs(reference_dir, tiny, par, name):
    model, schedule = tiny[par]
    golden, _ = load_golden(reference_dir, f"sampling_{par}")
    cond = ControlCondition(golden["c_txt"], golden["c_img"])
    uncond = ControlCondition(golden["c_txt_neg"], golden["c_img"])

    def run(seed):
        g = torch.Generator("cpu").manual_seed(seed)
        x_T = torch.randn((1, 4, 8, 12), generator=g, dtype=torch.float32)
        return sample(name, model, x_T, schedule=schedule, steps=3, cond=cond, uncond=uncond, cfg=4.0, noise=g)

    a, b, c = run(231), run(231), run(232)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# --------------------------------------------------------------------------------------------------
# interface properties on a fake model (no weights)


def _fake_model(x, t, cond):
    t = t.to(torch.float32).view(-1, 1, 1, 1)
    return torch.tanh(0.8 * x + 0.5 * cond.c_img) * (1 + t / 1500) + 0.1 * cond.c_txt.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def _fake_run(name, par="v", steps=4, cfg=3.0, seed=7, **kw):
    schedule = NoiseSchedule.from_spec(DiffusionSpec(parameterization=par, zero_snr=par == "v"))
    g = torch.Generator().manual_seed(99)
    c_img = 0.3 * torch.randn(1, 4, 6, 10, generator=g)
    cond = ControlCondition(torch.randn(1, 5, 3, generator=g), c_img)
    uncond = ControlCondition(torch.randn(1, 5, 3, generator=g), c_img)
    noise = kw.pop("noise", None) or GeneratorNoise.from_seed(seed)
    x_T = noise.randn((1, 4, 6, 10))
    z = sample(name, kw.pop("model", _fake_model), x_T, schedule=schedule, steps=steps, cond=cond, uncond=uncond,
               cfg=cfg, noise=noise, **kw)
    return z, noise


DRAWS = {  # sampler draws for n steps (reference README table), eps / knobs at defaults
    "spaced": lambda n: n, "ddim": lambda n: n, "dpm++_m2": lambda n: 0,
    "edm_euler": lambda n: n, "edm_heun": lambda n: n, "edm_dpm_2": lambda n: n,
    "edm_euler_a": lambda n: n - 1, "edm_dpm++_2s_a": lambda n: n - 1, "edm_dpm_2_a": lambda n: n - 1,
    "edm_lms": lambda n: 0, "edm_dpm++_2m": lambda n: 0, "edm_dpm++_sde": lambda n: 2 * (n - 1),
    "edm_dpm++_2m_sde": lambda n: n - 1, "edm_dpm++_3m_sde": lambda n: n - 1,
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_draw_pattern_and_progress(name):
    assert set(DRAWS) == set(SAMPLERS)
    for steps in (4, 10):  # (ddim makes more than n steps when 1000 % n != 0)
        seen = []
        z, noise = _fake_run(name, steps=steps, on_step=lambda i, n: seen.append((i, n)))
        assert torch.isfinite(z).all()
        assert noise.draws == 1 + DRAWS[name](steps)
        assert seen == [(i, steps) for i in range(1, steps + 1)]


@pytest.mark.parametrize("name, draws", [("edm_dpm++_2m_sde", 0), ("edm_dpm++_3m_sde", 0), ("edm_dpm++_sde", 6),
                                         ("edm_euler_a", 3), ("edm_euler", 4)])
def test_eta_zero_draws(name, draws):
    """eta = 0: the 2M/3M SDE solvers stop drawing; DPM++ SDE and the ancestral ones still draw (x 0)."""
    _, noise = _fake_run(name, eta=0.0)
    assert noise.draws == 1 + draws


def test_churn_changes_euler_but_not_the_draw_count():
    a, na = _fake_run("edm_euler", steps=6)
    b, nb = _fake_run("edm_euler", steps=6, s_churn=3.0)
    assert na.draws == nb.draws == 7 and not torch.allclose(a, b)


def test_identity_x0_hook_changes_nothing_and_sees_every_prediction():
    for name, family, evals in (("spaced", "spaced", 4), ("ddim", "ddim", 4), ("dpm++_m2", "dpm_solver", 4),
                                ("edm_heun", "edm", 7), ("edm_dpm++_3m_sde", "edm", 4)):
        seen = []

        def hook(x0, ctx):
            seen.append(ctx)
            return x0

        plain, _ = _fake_run(name)
        hooked, _ = _fake_run(name, x0_hook=hook)
        assert torch.equal(plain, hooked), name
        assert len(seen) == evals and all(c.family == family and c.total == 4 for c in seen), name
        assert [c.step for c in seen if c.substep == 0] == [0, 1, 2, 3], name
        assert all(math.isfinite(c.coefficient) and 0 <= c.alpha_cumprod <= 1 for c in seen), name
        assert seen[0].model_t > seen[-1].model_t, name
    # spaced: v2 guidance divides by posterior_mean_coef1, which is 1 on the final step (t = 0)
    seen = []
    _fake_run("spaced", x0_hook=lambda x0, ctx: seen.append(ctx) or x0)
    assert [c.model_t for c in seen] == [999, 666, 333, 0] and seen[-1].coefficient == 1.0
    assert [c.index for c in seen] == [3, 2, 1, 0]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_x0_hook_steers_every_sampler(name):
    """Replacing x0 by a constant pulls the final latent toward that constant in every family."""
    target = torch.full((1, 4, 6, 10), 0.25)
    base, _ = _fake_run(name, par="eps", steps=6)
    steered, _ = _fake_run(name, par="eps", steps=6, x0_hook=lambda x0, ctx: target)
    assert (steered - target).abs().mean() < (base - target).abs().mean()


def test_rescaled_cfg_schedule():
    assert rescaled_cfg_scale(6.0, 999) == 1.0  # exactly: CFG is then skipped by spaced / ddim
    assert rescaled_cfg_scale(6.0, 0) == pytest.approx(7.0)
    assert [round(rescaled_cfg_scale(6.0, t), 2) for t in (399, 299, 199, 99)] == [1.09, 1.41, 2.47, 4.87]
    gated = GuidedModel(None, None, None, 0.5, rescale=True, gated=True)
    ungated = GuidedModel(None, None, None, 0.5, rescale=True, gated=False)
    assert gated.scale_at(100) == 0.5 and ungated.scale_at(100) == pytest.approx(rescaled_cfg_scale(0.5, 100))


def test_cfg_one_runs_the_conditional_branch_only():
    calls = []

    def model(x, t, cond):
        calls.append(cond)
        return _fake_model(x, t, cond)

    _fake_run("edm_euler", cfg=1.0, model=model)
    assert len(calls) == 4 and len({id(c) for c in calls}) == 1
    calls.clear()
    _fake_run("edm_euler", cfg=2.0, model=model)
    assert len(calls) == 8


@pytest.mark.parametrize("name", ["spaced", "edm_dpm++_2m", "dpm++_m2"])
def test_batched_cfg_agrees_with_two_passes(name):
    a, _ = _fake_run(name, batch_cfg=True)
    b, _ = _fake_run(name, batch_cfg=False)
    assert_close_rel(a, b, 1e-5, what=name)


def test_tiled_model_blends_windows_and_skips_small_latents():
    cond = ControlCondition(torch.zeros(1, 5, 3), torch.randn(1, 4, 8, 22))
    x, t = torch.randn(1, 4, 8, 22), torch.tensor([500])
    pointwise = lambda x, t, c: 2 * x + c.c_img  # noqa: E731 - a per-pixel model is unchanged by tiling
    assert_close_rel(TiledModel(pointwise, 8, 4)(x, t, cond), pointwise(x, t, cond), 1e-6)
    small = ControlCondition(cond.c_txt, cond.c_img[..., :6, :6])
    assert torch.equal(TiledModel(pointwise, 8, 4)(x[..., :6, :6], t, small), pointwise(x[..., :6, :6], t, small))


def test_bad_settings_are_usage_errors():
    for kw in ({"steps": 0}, {"eta": -1.0}, {"s_churn": -0.5}, {"order": 0}, {"s_noise": math.nan}):
        with pytest.raises(UsageError):
            _fake_run("edm_euler", **kw)
    with pytest.raises(UsageError, match="`sampler` must be one of"):
        _fake_run("euler")
    with pytest.raises(UsageError, match="ddim"):
        _fake_run("ddim", steps=3)


def test_the_samplers_are_the_settings_choices():
    """One list of sampler names: the settings' enum (CLI choices, validation) and the sampler table agree."""
    from restorecli.diffusion.sampling import SAMPLERS
    from restorecli.settings import Sampler

    assert tuple(SAMPLERS) == Sampler.values()


def test_start_point_and_noise_augmentation_draw_order():
    from restorecli.diffusion.start import augment_condition, initial_latent

    schedule = NoiseSchedule.from_spec(DiffusionSpec())
    c_img = torch.full((1, 4, 2, 3), 0.4)
    noise = GeneratorNoise.from_seed(5)
    x_T = initial_latent((1, 4, 2, 3), noise=noise, schedule=schedule, start_point="cond", c_img=c_img)
    c_aug = augment_condition(c_img, 200, noise=noise, schedule=schedule)
    ref = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn((1, 4, 2, 3), generator=ref) for _ in range(2))
    assert torch.equal(x_T, schedule.q_sample(c_img, 999, z1))
    assert torch.equal(c_aug, schedule.q_sample(c_img, 200, z2))
    assert augment_condition(c_img, 0, noise=noise, schedule=schedule) is c_img and noise.draws == 2
    zsnr = NoiseSchedule.from_spec(DiffusionSpec(parameterization="v", zero_snr=True))
    n1, n2 = GeneratorNoise.from_seed(3), GeneratorNoise.from_seed(3)
    assert torch.equal(initial_latent((1, 4, 2, 3), noise=n1, schedule=zsnr, start_point="cond", c_img=c_img),
                       initial_latent((1, 4, 2, 3), noise=n2, schedule=zsnr))
    with pytest.raises(UsageError):
        initial_latent((1, 4, 2, 3), noise=n1, schedule=zsnr, start_point="latent")


def test_x0_hook_reproduces_the_v2_latent_guidance_run(reference_dir, stage2, tiny):
    """The hook sits where the v2-era spaced sampler applies restoration guidance (PIPELINE.md 7.2).

    golden/guidance.safetensors run1: MSE in latent space, scale 0.05, every step, one repeat; the target
    latent is a posterior SAMPLE drawn from the run's generator before that step's sampler draw.
    """
    from restorecli.models.cldm import encode_prompt, vae_encode

    golden, meta = load_golden(reference_dir, "guidance")
    run = json.loads(meta["runs"])["run1"]
    assert (run["loss"], run["space"], run["repeat"]) == ("mse", "latent", 1)
    models = stage2["eps"]
    model, schedule = tiny["eps"]
    target = golden["run/cond_img_u8"].float() / 255 * 2 - 1
    c_img = vae_encode(models, target)
    c_txt, c_neg = encode_prompt(models, [meta["prompt"]]), encode_prompt(models, [meta["neg_prompt"]])
    noise = GeneratorNoise.from_seed(run["seed"])
    x_T = noise.randn((1, 4, 8, 12))

    def guidance(x0, ctx):
        if not run["stop"] < ctx.model_t + 1 < run["start"]:
            return x0
        posterior = models.vae.encode(target).latent_dist
        tgt = (posterior.mean + posterior.std * noise(posterior.mean)) * models.latent_scale_factor
        grad = 2 * (x0 - tgt) / x0[0].numel()  # d/dx0 of mean((x0 - tgt)^2)
        return x0 - grad * run["scale"] * 3000 / ctx.coefficient

    z = sample("spaced", model, x_T, schedule=schedule, steps=4, cfg=float(meta["cfg"]), noise=noise,
               cond=ControlCondition(c_txt, c_img), uncond=ControlCondition(c_neg, c_img), x0_hook=guidance)
    assert noise.draws == len(run["labels"]) == 9
    assert_close_rel(z, golden["run1/z"], 1e-4, what="guided z")


# --------------------------------------------------------------------------------------------------
# per-tile text conditioning (per-tile captions)


def _tile_run(name, *, tile, tile_txt, batch_cfg, cfg=3.0, x0_hook=None, size=(10, 14)):
    """Sample on a fake model that records, per call, the window (read off the cropped c_img, whose value
    at (i, j) is 100 i + j) and the text embedding of each batch row."""
    schedule = NoiseSchedule.from_spec(DiffusionSpec(parameterization="v", zero_snr=True))
    h, w = size
    c_img = (100 * torch.arange(h).view(h, 1) + torch.arange(w).view(1, w)).float().expand(1, 4, h, w).contiguous()
    whole, negative = torch.full((1, 5, 3), 1.0), torch.full((1, 5, 3), -1.0)
    cond = ControlCondition(whole, c_img)
    if tile_txt is not None:
        cond = cond.with_tile_text(tile_txt)
    calls = []

    def model(x, t, c):
        corner = int(c.c_img[0, 0, 0, 0])
        calls.append(((corner // 100, corner % 100), tuple(c.c_img.shape[-2:]), [float(row[0, 0]) for row in c.c_txt]))
        return torch.tanh(0.5 * x) + 0.01 * c.c_txt.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    noise = GeneratorNoise.from_seed(3)
    z = sample(name, model, noise.randn((1, 4, h, w)), schedule=schedule, steps=2, cond=cond,
               uncond=ControlCondition(negative, c_img), cfg=cfg, noise=noise, tile=tile, batch_cfg=batch_cfg,
               x0_hook=x0_hook)
    return z, calls


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_tile_is_conditioned_on_its_own_text(name, batch_cfg):
    """Every model call of a window gets that window's positive embedding; the uncond rows keep the
    negative one; every sampler, batched or two-pass CFG."""
    from restorecli.diffusion.tiled_sampling import sampling_windows

    windows = sampling_windows(10, 14, 8, 4)
    assert windows == [(0, 8, 0, 8), (0, 8, 4, 12), (0, 8, 6, 14), (2, 10, 0, 8), (2, 10, 4, 12), (2, 10, 6, 14)]
    texts = {w: torch.full((1, 5, 3), 10.0 + i) for i, w in enumerate(windows)}
    _, calls = _tile_run(name, tile=(8, 4), tile_txt=texts, batch_cfg=batch_cfg)
    assert calls and all(shape == (8, 8) for _, shape, _ in calls)
    seen = set()
    for (top, left), _, rows in calls:
        window = (top, top + 8, left, left + 8)
        own = 10.0 + windows.index(window)
        seen.add(window)
        if batch_cfg:
            assert rows == [own, -1.0], (name, window)
        else:
            assert rows in ([own], [-1.0]), (name, window)
    assert seen == set(windows)
    if not batch_cfg:  # as many cond calls as uncond calls, per window
        assert sum(r == [-1.0] for _, _, r in calls) == sum(r != [-1.0] for _, _, r in calls)


def test_tile_texts_equal_to_the_whole_caption_change_nothing():
    """Per-tile conditioning with every tile given the whole-image embedding is the plain run, bit for
    bit, with and without guidance; with cfg 1 only cond calls are made."""
    from restorecli.diffusion.tiled_sampling import sampling_windows

    same = {w: torch.full((1, 5, 3), 1.0) for w in sampling_windows(10, 14, 8, 4)}
    hook = lambda x0, ctx: 0.9 * x0  # noqa: E731 - stands in for restoration guidance
    for name in ("spaced", "dpm++_m2", "edm_dpm++_3m_sde"):
        for x0_hook in (None, hook):
            plain, _ = _tile_run(name, tile=(8, 4), tile_txt=None, batch_cfg=False, x0_hook=x0_hook)
            tiled, _ = _tile_run(name, tile=(8, 4), tile_txt=same, batch_cfg=False, x0_hook=x0_hook)
            assert torch.equal(plain, tiled), name
    _, calls = _tile_run("edm_euler", tile=(8, 4), tile_txt=same, batch_cfg=True, cfg=1.0)
    assert all(rows == [1.0] for _, _, rows in calls)


def test_without_tiles_the_whole_image_text_is_used():
    texts = {(0, 8, 0, 8): torch.full((1, 5, 3), 7.0)}
    for tile, size in ((None, (10, 14)), ((16, 8), (10, 14))):  # untiled; latent smaller than a tile
        _, calls = _tile_run("edm_euler", tile=tile, tile_txt=texts, batch_cfg=True, size=size)
        assert calls and all(rows == [1.0, -1.0] and shape == size for _, shape, rows in calls)


def test_a_window_without_its_text_is_an_error():
    cond = ControlCondition(torch.zeros(1, 5, 3), torch.zeros(1, 4, 8, 8)).with_tile_text({(0, 4, 0, 4): torch.ones(1, 5, 3)})
    assert torch.equal(cond.crop(0, 4, 0, 4).c_txt, torch.ones(1, 5, 3))
    with pytest.raises(ValueError, match=r"no tile text embedding for latent window \(4, 8, 0, 4\)"):
        cond.crop(4, 8, 0, 4)
