"""Memory planning, the out-of-memory retry, model placement and the speed settings (issue 7).

Planner decisions are pure functions of sizes and budgets (fast). The pipeline tests run the tiny
reference model (../shared/reference/model_v.json) on a 45x45 input (stage 1 lifts it to 512x512, a
64x64 latent) a few times, sharing one untiled reference run.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close_rel, force_tiles
from restorecli.pipeline import planning
from restorecli.errors import InputError
from restorecli.oom import is_out_of_memory
from restorecli.models.configs import full_size_configs
from restorecli.pipeline.planning import (
    MIN_SAMPLE_TILE,
    plan_stage2,
    sample_tile_for,
    sampling_peak_bytes,
    VaeChoice,
    leaner_vae_choice,
    smaller_sample_tile,
    smaller_vae_tile,
    vae_peak_bytes,
)

GiB = 2**30
SD21 = full_size_configs()
SD_UNET, SD_VAE = SD21.unet, SD21.vae


@pytest.fixture(scope="module")
def tiny(reference_dir):
    """The reference model's (model_v.json) diffusers configs: its VAE has 32 channels at every level, so
    a 2048^2 feature map is 512 MiB in float32."""
    from restorecli.models import configs as cfgs
    from restorecli.models.description import load_model_description

    return cfgs.stage2_configs(load_model_description(reference_dir / "model_v.json").cldm)


pytestmark = pytest.mark.usefixtures("one_thread")


def plan(h, w, budget, **kw):
    return plan_stage2(h, w, vae_config=SD_VAE, unet_config=SD_UNET, budget=budget, **kw)


# -- the planner ---------------------------------------------------------------------------------------


def test_sd21_sampling_estimate_is_the_measured_one(tiny):
    """Measured one-call peaks at 64^2, 96^2, 128^2 latents (docs/memory.md): the live tensors (the lean
    allocator; the model without the CPU's allocator factor, as on CUDA) within 5%, and on the CPU with
    glibc as `restore` runs it (249 / 530 / 903 MB) within 8%; the tiny reference UNet (attention at the
    full latent resolution: its feed-forward, not its skips, dominates) measured 3.8 KB per latent pixel
    at 128^2 (lean)."""
    for side, measured in ((64, 192e6), (96, 404e6), (128, 708e6)):
        assert abs(sampling_peak_bytes(SD_UNET, side, side, device="cuda") / measured - 1) < 0.05
    for side, measured in ((64, 249e6), (96, 530e6), (128, 903e6)):
        assert abs(sampling_peak_bytes(SD_UNET, side, side) / measured - 1) < 0.08
    assert abs(sampling_peak_bytes(tiny.unet, 128, 128, device="cuda") / (3812 * 128**2) - 1) < 0.1
    assert sampling_peak_bytes(SD_UNET, 64, 64, batch=2) > sampling_peak_bytes(SD_UNET, 64, 64)
    assert sampling_peak_bytes(SD_UNET, 64, 64, dtype=torch.float16) < sampling_peak_bytes(SD_UNET, 64, 64)


def test_a_large_budget_keeps_everything_untiled():
    p = plan(2048, 2048, 1 << 50)
    assert (p.encode_tile, p.sample_tile, p.decode_tile) == (None, None, None)
    assert p.pad == 64 and not p.sample_tile_auto and not p.untiled


def test_a_small_budget_tiles_the_vae_and_then_sampling():
    # CPU, 6 GiB: the plain 2048^2 VAE needs 11-16 GiB; its exact tiles fit (the decoder recomputing its
    # inner activations), untiled sampling (~1.2 GiB at a 256x256 latent) fits too
    p = plan(2048, 2048, 6 * GiB)
    assert p.encode.tile and p.decode.tile and p.decode.recompute and not p.decode.offload
    assert p.sample_tile is None and p.pad == 64
    for name in ("encode", "decode"):
        assert p.estimates[name] <= 6 * GiB < p.untiled[name]
    # CUDA, 2 GiB: the paused tiles wait in host memory instead (no recomputation)
    p = plan(2048, 2048, 2 * GiB, device="cuda")
    assert p.decode.tile and p.decode.offload and not p.decode.recompute and p.estimates["decode"] <= 2 * GiB
    # 600 MiB: sampling must tile too, with the largest latent tile that fits, stride half of it
    p = plan(2048, 2048, 600 << 20)
    assert p.sample_tile_auto and p.pad == 8
    size, stride = p.sample_tile
    assert size % 8 == 0 and stride == size // 2 and MIN_SAMPLE_TILE <= size <= 256
    assert p.estimates["sampling"] <= (600 << 20) < p.untiled["sampling"]
    # the largest that fits: 8 latent pixels more would not
    grown = p.estimates["sampling"] - sampling_peak_bytes(SD_UNET, size, size) + sampling_peak_bytes(SD_UNET, size + 8, size + 8)
    assert grown > 600 << 20
    assert "tiles of" in p.describe()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", [512, 2048, 4096])
def test_the_plan_keeps_a_1gb_cap_at_any_size(tiny, side, dtype):
    """--max-memory 1GB with the tiny reference model, x4 from (side/4)^2: every stage, stage 1 and the
    image buffers included, is planned within the budget (SAFETY of the cap). At 2048^2 one of its
    feature maps is 512 MiB; at 4096^2 2 GiB: the VAE keeps what does not fit on disk. In half precision
    (the CPU default where bf16 is native: cond and uncond batched) too."""
    budget = int(planning.SAFETY * GiB)
    first = planning.stage1_floor("swinir", "swinir", (side // 4, side // 4), 4)
    cfg_batch = 1 if dtype == torch.float32 else 2
    p = plan_stage2(side, side, vae_config=tiny.vae, unet_config=tiny.unet, budget=budget, stage1=first,
                    dtype=dtype, cfg_batch=cfg_batch)
    assert p.fits and not p.over_budget(), p.describe()
    assert set(p.estimates) >= set(planning.STAGES)
    for name in planning.STAGES:
        assert 0 < p.estimates[name] <= budget, (name, p.describe())
    if side >= 2048:
        assert p.encode.tile and p.decode.tile and p.post_rows  # exact tiles and bands, no seams
    if side == 4096:
        for vae in (p.encode, p.decode):
            assert vae.max_stored is not None and vae.max_stored < 2 * GiB < vae.spill  # the maps are on disk
            stored = planning.vae_estimate(tiny.vae, side, side, vae.tile, part="encode" if vae is p.encode else "decode",
                                           max_stored=vae.max_stored).stored
            assert stored <= vae.max_stored


@pytest.mark.parametrize("side, gib", [(2048, 3.2), (4096, 3.2), (4096, 4.7)])
def test_half_precision_fits_wherever_float32_does(side, gib):
    """Half-precision activations are half the bytes, so a budget that holds the fp32 plan holds the
    bf16 one. The float32 copy a half decoder's image comes back as must be inside the decoder's own
    plan: added after it (as before), SD 2.1 at 2048^2 within 3.2 GiB picked decoder tiles for the whole
    3.2 GiB and then needed 3.3 (refused where fp32 fitted)."""
    budget = int(gib * GiB)
    full = plan(side, side, budget)
    for dtype in (torch.bfloat16, torch.float16):
        half = plan(side, side, budget, dtype=dtype, cfg_batch=2)
        assert half.fits or not full.fits, half.describe()
        assert half.fits and not half.over_budget(), half.describe()
        assert half.estimates["decode"] <= budget


def test_an_impossible_budget_names_the_smallest_that_works(tiny):
    budget = int(planning.SAFETY * GiB)
    p = plan_stage2(8192, 8192, vae_config=tiny.vae, unet_config=tiny.unet, budget=budget)
    assert not p.fits and p.over_budget()
    smallest = planning.smallest_budget(p.needed)
    assert planning.SAFETY * smallest >= p.needed > budget
    again = plan_stage2(8192, 8192, vae_config=tiny.vae, unet_config=tiny.unet, budget=int(planning.SAFETY * smallest))
    assert again.fits, again.describe()
    assert planning.format_size(smallest) == f"{smallest / GiB:.1f}GB"
    assert planning.format_size(48 << 20) == "48MB"


def test_the_colour_fix_runs_in_bands_when_the_whole_image_does_not_fit():
    assert planning.post_rows_for(512, 512, 1 << 40) is None
    rows = planning.post_rows_for(4096, 4096, 600 << 20)
    assert rows in planning.POST_BANDS and planning.post_peak_bytes(4096, 4096, rows) <= 600 << 20
    assert planning.post_peak_bytes(4096, 4096, rows * 2) > 600 << 20 or rows == planning.POST_BANDS[0]


@pytest.mark.parametrize("kind", ["wavelet", "adain", "none"])
def test_the_colour_fix_in_bands_is_the_whole_image_fix(kind):
    """Bands of 1, 7 and 40 rows (below, at and above the wavelet's 31-row halo) give the whole-image fix:
    wavelet and none bit for bit, adain (float64 statistics over the bands) within float rounding."""
    from restorecli.pipeline.colorfix import color_fix, color_fix_in_bands

    g = torch.Generator().manual_seed(0)
    decoded = torch.randn(1, 3, 100, 37, generator=g) * 1.2
    style = torch.rand(1, 3, 100, 37, generator=g)
    whole = color_fix(kind, (decoded + 1) / 2, style)
    for rows in (1, 7, 40, 100):
        banded = color_fix_in_bands(kind, decoded.clone(), style, rows)
        if kind == "adain":
            assert_close_rel(banded, whole, 1e-6, what=f"adain in bands of {rows}")
        else:
            assert torch.equal(banded, whole), (kind, rows)


def test_explicit_tiles_win():
    p = plan(1024, 1024, 1 << 50, tile_size=512, tile_stride=256)
    assert p.sample_tile == (64, 32) and not p.sample_tile_auto and p.pad == 8
    p = plan(1024, 1024, 100 << 20, tile_size=384)
    assert p.sample_tile == (48, 24) and not p.sample_tile_auto
    # an image smaller than the tile samples untiled (upstream's fallback), and pads to 64 again
    p = plan(512, 512, 1 << 50, tile_size=1024)
    assert p.sample_tile is None and p.pad == 64


def test_unbatched_cfg_comes_before_tiles():
    """When only one branch per call fits, cfg runs in two calls (same result) instead of in tiles."""
    p = plan(2048, 2048, 4 * GiB, cfg_batch=2)
    assert p.unbatched_cfg and p.cfg_batch == 1 and p.sample_tile is None
    p = plan(2048, 2048, 1 << 50, cfg_batch=2)
    assert not p.unbatched_cfg and p.cfg_batch == 2


def test_batched_cfg_and_guidance_are_planned_for():
    one = plan(2048, 2048, 1 << 50, cfg_batch=1).estimates["sampling"]
    two = plan(2048, 2048, 1 << 50, cfg_batch=2).estimates["sampling"]
    assert two > 1.8 * one - (200 << 20)
    p = plan(1024, 1024, 1 << 50, guidance_space="latent")
    assert p.estimates["guidance"] == p.estimates["encode"]
    p = plan(1024, 1024, 1 << 50, guidance_space="rgb")
    assert p.estimates["guidance"] > 10 * GiB


def test_vae_estimates_shrink_with_the_tile():
    untiled = vae_peak_bytes(SD_VAE, 2048, 2048, None, part="decode")
    tiled = [vae_peak_bytes(SD_VAE, 2048, 2048, t, part="decode") for t in (128, 64, 32)]
    assert untiled > tiled[0] > tiled[1] > tiled[2]
    assert vae_peak_bytes(SD_VAE, 512, 512, None, part="encode", device="cpu") > vae_peak_bytes(
        SD_VAE, 512, 512, None, part="encode", device="cuda")  # oneDNN's copies on the CPU


def test_sample_tile_bounds():
    assert sample_tile_for(SD_UNET, 64, 64, 1) is None  # an 8x8 latent cannot be tiled
    assert sample_tile_for(SD_UNET, 2048, 600, 1 << 50) == (72, 36)  # the latent's short side, a multiple of 8
    assert sample_tile_for(SD_UNET, 2048, 2048, 1) == (MIN_SAMPLE_TILE, MIN_SAMPLE_TILE // 2)


def test_smaller_tiles_after_out_of_memory():
    assert smaller_vae_tile(None, 1024, part="encode") == 512
    assert smaller_vae_tile(256, 1024, part="encode") == 128
    assert smaller_vae_tile(64, 1024, part="encode") is None
    assert smaller_vae_tile(None, 128, part="decode") == 64
    assert smaller_vae_tile(8, 128, part="decode") is None
    assert leaner_vae_choice(VaeChoice(), 1024, part="encode", device="cpu") == VaeChoice(512, True, False)
    assert leaner_vae_choice(VaeChoice(64), 1024, part="encode", device="cuda") == VaeChoice(64, True, True)
    assert leaner_vae_choice(VaeChoice(64, True), 1024, part="encode", device="cpu") is None
    spilled = leaner_vae_choice(VaeChoice(256, max_stored=100 << 20, spill=1 << 30), 1024, part="encode", device="cpu")
    assert spilled == VaeChoice(128, True, False, 0, 0, 50 << 20, 1 << 30)  # keeps spilling, with less in memory
    assert leaner_vae_choice(VaeChoice(64, True, max_stored=0), 1024, part="encode", device="cpu") is None
    assert smaller_sample_tile(None, 1024, 768) == (48, 24)
    assert smaller_sample_tile((64, 32), 1024, 1024) == (32, 16)
    assert smaller_sample_tile((8, 4), 1024, 1024) is None


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# -- the pipeline ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(reference_dir):
    from restorecli.pipeline.diffbir import DiffBIRPipeline

    # fp32: the plans below are the float32 ones (auto would pick bf16 on CPUs with bf16 instructions)
    return DiffBIRPipeline.from_description(reference_dir / "model_v.json", device="cpu", captioner="none",
                                            torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def photo(reference_dir):
    return np.asarray(Image.open(reference_dir / "inputs" / "blur_45x45.png").convert("RGB"))


CALL = dict(upscale=1, steps=2, sampler="edm_euler_a", cfg=3.0, prompt="a photo", negative_prompt="blurry",
            seed=5, output_type="pt")


@pytest.fixture(scope="module")
def reference(pipe, photo):
    """The untiled run (the tiny model fits any budget)."""
    out = pipe(photo, **CALL)
    assert (out.plan.encode_tile, out.plan.sample_tile, out.plan.decode_tile) == (None, None, None)
    return out.images




def test_what_each_stage_freed_is_given_back_before_the_next(pipe, photo, reference, monkeypatch):
    """The plans budget each stage as if the ones before had given their memory back: the allocator is
    trimmed after every stage (restorecli.memory; tests/test_memory.py checks the trim itself)."""
    import restorecli.pipeline.diffbir as diffbir

    events = []

    class Monitor:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(("start", self.name))

        def __exit__(self, *exc):
            events.append(("end", self.name))

    monkeypatch.setattr(diffbir, "trim_freed_memory", lambda: events.append(("trim", None)))
    monkeypatch.setattr(pipe, "stage_monitor", Monitor)
    out = pipe(photo, **CALL)
    torch.testing.assert_close(out.images, reference, rtol=0, atol=0)
    stages = [name for kind, name in events if kind == "start"]
    assert {"stage 1", "encode", "sampling", "decode", "colour fix"} <= set(stages)
    for k, (kind, name) in enumerate(events):
        if kind == "end":
            assert events[k + 1] == ("trim", None), events


@pytest.mark.slow
def test_tiled_vae_in_the_pipeline_gives_the_untiled_image(pipe, photo, reference, monkeypatch, tmp_path):
    """Exact VAE tiles (the encoder's paused tiles all on disk) and the colour fix in bands: the
    untiled image within rounding, and no temporary file left."""
    from restorecli.pipeline.planning import VaeChoice

    force_tiles(monkeypatch, encode=VaeChoice(128, max_stored=0, spill=1), decode=VaeChoice(16, recompute=True),
                 post_rows=48)
    monkeypatch.setattr(pipe, "spill_dir", str(tmp_path))
    out = pipe(photo, **CALL)
    assert (out.plan.encode_tile, out.plan.decode_tile, out.plan.post_rows) == (128, 16, 48)
    assert_close_rel(out.images, reference, 1e-4, what="tiled VAE vs untiled")
    assert list(tmp_path.iterdir()) == []


def test_an_image_that_cannot_fit_is_refused_before_any_work(pipe, monkeypatch):
    """x16 of 512^2 under --max-memory 1GB: one InputError naming the file and the smallest budget, raised
    by the check before stage 1; that budget then plans within itself."""
    import re

    monkeypatch.setattr(pipe, "run_stage1", lambda *a, **k: pytest.fail("stage 1 ran"))
    with pytest.raises(InputError) as e:
        pipe(np.zeros((512, 512, 3), np.uint8), upscale=16, max_memory=GiB, source="big.png", steps=1)
    message = str(e.value)
    assert "\n" not in message
    found = re.fullmatch(r"big\.png: cannot be restored within `max_memory` 1\.0GB: (.+) needs about ([\d.]+GB) even with "
                         r"the leanest tiles \(a 8192x8192 stage-2 image\); the smallest budget that works is "
                         r"`max_memory` ([\d.]+)GB", message)
    assert found, message
    smallest = int(float(found.group(3)) * GiB)
    plan = pipe.check_memory((512, 512), upscale=16, max_memory=smallest, source="big.png")
    assert plan.fits and plan.needed <= planning.SAFETY * smallest
    assert pipe.check_memory((512, 512), upscale=16, max_memory=None) is None  # no cap: only the free memory tiles


def test_a_disk_too_small_for_the_spill_is_refused_before_any_work(pipe, monkeypatch, tmp_path):
    """4096^2 under 1GB puts ~6 GiB of paused VAE tiles on disk: with 1 MiB free, one line names the folder."""
    import shutil

    monkeypatch.setattr(pipe, "spill_dir", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(InputError, match=rf"^big\.png: the tiled VAE needs about [\d.]+ GiB of free disk in {tmp_path} "):
        pipe.check_memory((1024, 1024), upscale=4, max_memory=GiB, source="big.png")


@pytest.mark.slow
def test_decode_out_of_memory_is_retried_with_tiles(pipe, photo, reference, monkeypatch, caplog):
    import restorecli.pipeline.diffbir as pl

    calls = []
    real = pl.vae_decode

    def failing_once(models, z):
        calls.append(tuple(z.shape))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(models, z)

    monkeypatch.setattr(pl, "vae_decode", failing_once)
    encoded = []
    monkeypatch.setattr(pl, "encode_prompt", lambda models, prompts: encoded.append(prompts) or torch.zeros(1))
    with caplog.at_level(logging.WARNING, logger="restorecli"):
        out = pipe(photo, **CALL, source="photo.png")
    assert len(calls) == 1  # the retry ran the tiled decoder (32-latent-pixel tiles), not vae_decode
    assert "out of memory in decode" in caplog.text and "tiles of 32 latent px (recompute) VAE" in caplog.text
    assert_close_rel(out.images, reference, 1e-4, what="decode after the retry")
    assert encoded == [], "the prompt embeddings are cached: no text encoding on a second image"


@pytest.mark.slow
def test_sampling_retry_draws_the_same_noise(pipe, photo, reference, monkeypatch, caplog):
    """An out-of-memory error in the middle of sampling; the retry starts from the same generator state
    (a retry 'tile' larger than the latent samples untiled, so it must give the reference exactly)."""
    import restorecli.pipeline.diffbir as pl
    from restorecli.models.cldm import ControlledUNet

    monkeypatch.setattr(pl, "smaller_sample_tile", lambda tile, h, w: (512, 256))
    real_forward = ControlledUNet.forward
    count = [0]

    def failing_third_call(self, *a, **k):  # step 2, after the draw of step 1
        count[0] += 1
        if count[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_forward(self, *a, **k)

    monkeypatch.setattr(ControlledUNet, "forward", failing_third_call)
    with caplog.at_level(logging.WARNING, logger="restorecli"):
        out = pipe(photo, **CALL)
    assert "out of memory in sampling" in caplog.text
    assert torch.equal(out.images, reference)


def test_latent_guidance_can_encode_its_target_in_exact_tiles(pipe):
    """The pipeline hands latent-space guidance the tiled encoder when the condition was tiled."""
    from restorecli.diffusion.guidance import GuidanceSettings, RestorationGuidance
    from restorecli.diffusion.noise import GeneratorNoise
    from restorecli.vae.tiled import tiled_encode

    target = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def guide(encode=None):
        return RestorationGuidance(GuidanceSettings(0.1, "mse", "latent"), target, vae=pipe.vae,
                                   latent_scale_factor=pipe.latent_scale_factor, noise=GeneratorNoise.from_seed(0),
                                   encode=encode)

    plain = guide().posterior()
    tiled = guide(lambda x: tiled_encode(pipe.vae, x, tile_size=32)).posterior()
    for a, b, what in zip(tiled, plain, ("mean", "std")):
        assert_close_rel(a, b, 1e-4, what=what)


def test_a_second_out_of_memory_error_fails_this_image_only(pipe):
    """`_run_stage`: one retry with the smaller setting, then an InputError naming the file."""
    seen = []

    def always(setting):
        seen.append(setting)
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(InputError, match=r"^big\.png: too large for the available memory: decode ran out of memory even with 32"):
        pipe._run_stage("decode", always, None, lambda t: 32, lambda t: f"{t} tiles", "big.png")
    assert seen == [None, 32]
    with pytest.raises(InputError, match="no smaller tiles"):
        pipe._run_stage("decode", always, 8, lambda t: None, str, "big.png")
    with pytest.raises(ValueError):  # other errors are not retried
        pipe._run_stage("decode", lambda s: (_ for _ in ()).throw(ValueError("bad")), None, lambda t: 1, str, None)


def _recording_placement(pipe, offload: bool):
    """A Placement on a pretend accelerator: no real moves, but where each model is, is recorded."""
    from restorecli.pipeline.placement import Placement

    names = {id(pipe.cleaner): "cleaner", id(pipe.text_encoder): "text_encoder", id(pipe.vae): "vae",
             id(pipe.unet): "unet", id(pipe.controlnet): "controlnet"}
    where = {n: "device" for n in names.values()}

    class Recording(Placement):
        active = True

        def to_device(self, *modules):
            where.update({names[id(m)]: "device" for m in modules if m is not None})

        def to_host(self, *modules):
            where.update({names[id(m)]: "host" for m in modules if m is not None})

    return Recording("cpu", offload=offload), where


@pytest.mark.slow
def test_idle_models_leave_the_device_and_offload_gives_the_same_image(pipe, photo, reference, monkeypatch):
    import restorecli.pipeline.diffbir as pl

    placement, where = _recording_placement(pipe, offload=False)
    monkeypatch.setattr(pipe, "placement", placement)
    monkeypatch.setattr(pipe, "_prompt_cache", {})  # encode the prompts again
    pipe.set_offload(True)
    assert where == {"cleaner": "device", "text_encoder": "host", "vae": "host", "unet": "host", "controlnet": "host"}
    during = {}
    real_sample = pl.sample

    def sample(*args, **kwargs):
        during.update(where)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(pl, "sample", sample)
    out = pipe(photo, **CALL)
    assert torch.equal(out.images, reference)
    assert during == {"cleaner": "host", "text_encoder": "host", "vae": "host", "unet": "device", "controlnet": "device"}
    assert set(where.values()) == {"host"}  # after the image, everything waits in host memory


def test_cfg_is_batched_except_on_the_cpu_in_float32(pipe, monkeypatch):
    assert pipe.cfg_batching() is None  # CPU, fp32: upstream's call pattern (bit for bit)
    from restorecli.pipeline.placement import Placement

    with monkeypatch.context() as m:  # CPU in half precision: exactness is gone, one batched call is faster
        m.setattr(type(pipe.unet), "dtype", property(lambda self: torch.bfloat16))
        assert pipe.cfg_batching() is True

    monkeypatch.setattr(pipe, "placement", Placement("cuda"))
    assert pipe.cfg_batching() is True
    monkeypatch.setattr(pipe, "batch_cfg", False)
    assert pipe.cfg_batching() is False


def test_load_uses_sdpa_attention_and_compiles_on_request(reference_dir, monkeypatch):
    from restorecli.pipeline.build import load_pipeline
    from restorecli.pipeline.loading import use_sdpa
    from restorecli.settings import LoadSettings

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    p = load_pipeline(LoadSettings(model=str(reference_dir / "model_v.json"), device="cpu", compile=True, offload=True,
                                   captioner="none"))
    assert sorted(compiled) == ["IRControlNetModel", "UNet2DConditionModel"]
    for module in (p.unet, p.controlnet, p.vae):
        assert use_sdpa(module) == {"AttnProcessor2_0"}
    assert p.placement.offload and not p.placement.active  # offload is a no-op on the CPU
    assert p.unet.conv_in.weight.is_contiguous()  # channels-last only on CUDA


# -- the CLI -----------------------------------------------------------------------------------------------


def test_max_memory_reaches_the_pipeline(tmp_path, monkeypatch, capsys):
    import _fake_pipeline

    built = _fake_pipeline.install(monkeypatch)
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    from restorecli.cli.app import main

    assert main([str(src), "-o", str(tmp_path / "b.png"), "--max-memory", "1.5GB"]) == 0, capsys.readouterr().err
    assert built and [s.tiles.max_memory for s in built[0].settings] == [int(1.5 * 2**30)]
    assert main([str(src), "-o", str(tmp_path / "c.png"), "--max-memory", "lots"]) == 2
    assert "--max-memory` must look like 8GB" in capsys.readouterr().err


@pytest.mark.slow
def test_max_memory_end_to_end_tiles_and_says_so(reference_dir, tmp_path, monkeypatch, capsys):
    """A real run through the CLI with the smallest budget that fits: stage 1, the VAE and the colour fix
    tile (the plan says so with -v), and the image is written."""
    from restorecli.cli.app import main

    monkeypatch.chdir(reference_dir)
    out = tmp_path / "out.png"
    code = main(["-v", "inputs/blur_45x45.png", "-o", str(out), "--model", "model_v.json", "--upscale", "1", "--steps", "1",
                 "--cfg", "1", "--device", "cpu", "--precision", "fp32", "--captioner", "none", "--max-memory", "48MB"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    assert "stage 1: 512x512 does not fit" in err and "encode tiles of" in err and "decode tiles of" in err
    assert "colour fix in bands of" in err
    assert Image.open(out).size == (45, 45)


def test_max_memory_too_small_is_one_line_and_exit_1(reference_dir, tmp_path, monkeypatch, capsys):
    """--max-memory below what even the leanest plan needs: `error: FILE: ...` with the smallest budget,
    exit 1, nothing written, refused before the image is worked on."""
    from restorecli.cli.app import main

    monkeypatch.chdir(reference_dir)
    out = tmp_path / "out.png"
    code = main(["inputs/blur_45x45.png", "-o", str(out), "--model", "model_v.json", "--upscale", "1", "--steps", "1",
                 "--device", "cpu", "--precision", "fp32", "--captioner", "none", "--max-memory", "16MB"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and not out.exists()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: inputs/blur_45x45.png: cannot be restored within `--max-memory` 16MB: ")
    assert errors[0].endswith("the smallest budget that works is `--max-memory` 48MB")  # 26 MiB / SAFETY, rounded up
