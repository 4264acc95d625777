"""Our tiled VAE equals the untiled VAE (tiny AutoencoderKLs with random weights, images several tiles
wide and tall, odd sizes), while diffusers' enable_tiling does not."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from conftest import assert_close_rel
from restorecli.vae.tiled import (
    SpillError,
    UnsupportedVAEError,
    _compile_decoder,
    _infer_shapes,
    _Moments,
    _plan_grids,
    _simulate,
    estimate,
    estimate_peak_bytes,
    posterior_mode,
    tiled_decode,
    tiled_encode,
)
from restorecli.models.configs import full_size_configs

diffusers = pytest.importorskip("diffusers")
AutoencoderKL = diffusers.AutoencoderKL

SD_VAE = full_size_configs().vae  # the SD 2.1 VAE architecture (only ever built on the meta device here)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(layers_per_block: int, block_out=(8, 16, 16, 16), groups: int = 4, seed: int = 0):
    """A tiny AutoencoderKL (with mid-block attention); GroupNorm affines and biases are random too."""
    torch.manual_seed(seed)
    n = len(block_out)
    vae = AutoencoderKL(
        block_out_channels=block_out,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        latent_channels=4,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return vae.eval()


@pytest.fixture(scope="module", params=[1, 2], ids=["layers1", "layers2"])
def vae(request):
    return tiny_vae(request.param)


def image(h: int, w: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Noise on a colour ramp: GroupNorm statistics differ strongly between tiles."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.stack([
        torch.linspace(-0.6, 0.6, w).expand(h, w),
        torch.linspace(0.5, -0.5, h)[:, None].expand(h, w),
        torch.full((h, w), 0.3),
    ])
    return (torch.rand(batch, 3, h, w, generator=g) - 0.5) + ramp


def latent(h: int, w: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=g) + torch.linspace(-1, 1, w)


@torch.no_grad()
def untiled_encode(vae, x):
    return vae.quant_conv(vae.encoder(x))


@torch.no_grad()
def untiled_decode(vae, z):
    return vae.decoder(vae.post_quant_conv(z))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def multi_tile_everywhere(info: dict) -> None:
    """Every resolution was cut into several tiles, across and down."""
    assert not info["fast_path"]
    for hw, (rows, cols) in info["grids"].items():
        assert rows >= 2 and cols >= 2, f"{hw}: only {rows}x{cols} tiles"


# -- exactness, fp32 ------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, tile, batch", [(200, 328, 24, 1), (203, 331, 24, 1), (192, 256, 64, 2)])
def test_tiled_encode_equals_untiled(vae, h, w, tile, batch):
    x = image(h, w, batch)
    info: dict = {}
    got = tiled_encode(vae, x, tile_size=tile, info=info)
    assert_close_rel(got, untiled_encode(vae, x), 1e-4, f"encode {h}x{w} tile {tile}")
    assert info["grids"][(h, w)][0] >= 3 and info["grids"][(h, w)][1] >= 4
    if tile == 24:
        multi_tile_everywhere(info)


@pytest.mark.parametrize("h, w, tile, batch", [(25, 41, 3, 1), (24, 32, 8, 2), (25, 41, 8, 1)])
def test_tiled_decode_equals_untiled(vae, h, w, tile, batch):
    z = latent(h, w, batch)
    info: dict = {}
    got = tiled_decode(vae, z, tile_size=tile, info=info)
    assert_close_rel(got, untiled_decode(vae, z), 1e-4, f"decode {h}x{w} tile {tile}")
    assert info["grids"][(8 * h, 8 * w)][0] >= 3 and info["grids"][(8 * h, 8 * w)][1] >= 4
    if tile == 3:
        multi_tile_everywhere(info)


def test_encode_mode_is_the_posterior_mean(vae):
    x = image(120, 136)
    moments = tiled_encode(vae, x, tile_size=32)
    mode = tiled_encode(vae, x, tile_size=32, return_mode=True)
    dist = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(moments)
    assert torch.equal(mode, dist.mode()) and torch.equal(mode, posterior_mode(moments))


def test_recompute_gives_the_same_result(vae):
    x, z = image(136, 200), latent(17, 25)
    assert_close_rel(tiled_encode(vae, x, tile_size=32, recompute=True), untiled_encode(vae, x), 1e-4, "encode")
    assert_close_rel(tiled_decode(vae, z, tile_size=4, recompute=True), untiled_decode(vae, z), 1e-4, "decode")


def test_one_tile_runs_the_untiled_modules(vae):
    x, z = image(64, 48), latent(8, 6)
    info: dict = {}
    assert torch.equal(tiled_encode(vae, x, tile_size=64, info=info), untiled_encode(vae, x))
    assert info["fast_path"]
    assert torch.equal(tiled_decode(vae, z, tile_size=8), untiled_decode(vae, z))


# -- exactness is the algorithm's, not a tolerance: float64 agrees to 1e-12 ------------------------


def test_float64_tiled_equals_untiled_to_rounding():
    vae = tiny_vae(2).double()
    x, z = image(203, 331).double(), latent(25, 41).double()
    assert rel_err(tiled_encode(vae, x, tile_size=24), untiled_encode(vae, x)) < 1e-12
    assert rel_err(tiled_decode(vae, z, tile_size=3), untiled_decode(vae, z)) < 1e-12


def test_receptive_field_is_derived_from_the_modules():
    """A 5x5 conv_in and a dilated conv_out need wider halos; nothing is hard-coded."""
    vae = tiny_vae(1)
    torch.manual_seed(3)
    vae.encoder.conv_in = nn.Conv2d(3, 8, 5, padding=2)
    vae.decoder.conv_out = nn.Conv2d(8, 3, 3, padding=2, dilation=2)
    vae.double()
    x, z = image(150, 170).double(), latent(19, 21).double()
    assert rel_err(tiled_encode(vae, x, tile_size=24), untiled_encode(vae, x)) < 1e-12
    assert rel_err(tiled_decode(vae, z, tile_size=3), untiled_decode(vae, z)) < 1e-12


def test_tiles_smaller_than_the_halo():
    """1-pixel tiles: a tile's halo spans several neighbours; still exact (float64)."""
    vae = tiny_vae(1).double()
    x, z = image(11, 19, 2).double(), latent(3, 5, 2).double()
    assert rel_err(tiled_encode(vae, x, tile_size=1), untiled_encode(vae, x)) < 1e-12
    assert rel_err(tiled_decode(vae, z, tile_size=1, recompute=True), untiled_decode(vae, z)) < 1e-12


# -- half precision: as accurate as the untiled module in that dtype -------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_accurate_as_untiled(dtype):
    vae32 = tiny_vae(1)
    vae = copy.deepcopy(vae32).to(dtype)
    x, z = image(104, 136), latent(13, 17)
    for name, tiled, untiled, inp, tile in [
        ("encode", tiled_encode, untiled_encode, x, 32),
        ("decode", tiled_decode, untiled_decode, z, 4),
    ]:
        ref = untiled(vae32, inp)
        got = tiled(vae, inp, tile_size=tile)
        assert got.dtype == dtype
        err_tiled = rel_err(got, ref)
        err_untiled = rel_err(untiled(vae, inp.to(dtype)), ref)
        assert err_tiled <= 1.5 * err_untiled + 1e-3, f"{name}: tiled {err_tiled:.3g} vs untiled {err_untiled:.3g}"


# -- the naive path is not exact -------------------------------------------------------------------


def test_diffusers_enable_tiling_is_orders_of_magnitude_worse():
    vae = tiny_vae(2)
    x, z = image(200, 328), latent(25, 41)
    ref_e, ref_d = untiled_encode(vae, x), untiled_decode(vae, z)
    ours_e = rel_err(tiled_encode(vae, x, tile_size=64), ref_e)
    ours_d = rel_err(tiled_decode(vae, z, tile_size=8), ref_d)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8  # the same tiles as ours
    try:
        with torch.no_grad():
            theirs_e = rel_err(vae.encode(x).latent_dist.parameters, ref_e)
            theirs_d = rel_err(vae.decode(z).sample, ref_d)
    finally:
        vae.disable_tiling()
    assert theirs_e > 1e-2 and theirs_d > 1e-2  # seams and per-tile colour shifts
    assert ours_e < 1e-3 * theirs_e and ours_d < 1e-3 * theirs_d, (ours_e, theirs_e, ours_d, theirs_d)


# -- pieces ------------------------------------------------------------------------------------------


def test_merged_tile_moments_match_group_norm_without_cancellation():
    """Far-from-zero activations (mean 300, std 1): merging per-tile moments must not cancel like sum(x^2)."""
    g = torch.Generator().manual_seed(0)
    x = 300 + torch.randn(2, 8, 37, 53, generator=g)
    gn = nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.normal_()
    m = _Moments(torch.device("cpu"))
    for r0, r1 in [(0, 10), (10, 37)]:
        for c0, c1 in [(0, 20), (20, 21), (21, 53)]:
            m.add(x[:, :, r0:r1, c0:c1])
    scale, shift = m.affine(gn, torch.device("cpu"), torch.float32)
    got = x * scale + shift
    ref = nn.functional.group_norm(x.double(), 4, gn.weight.double(), gn.bias.double(), 1e-6)
    assert rel_err(got, ref) < 1e-4


def test_unsupported_blocks_are_refused():
    vae = tiny_vae(1)
    vae.decoder.conv_norm_out = nn.Identity()
    with pytest.raises(UnsupportedVAEError, match="conv_norm_out"):
        tiled_decode(vae, latent(20, 20), tile_size=4)


def test_bad_arguments():
    vae = tiny_vae(1)
    with pytest.raises(ValueError, match="tile_size"):
        tiled_encode(vae, image(64, 64), tile_size=0)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        tiled_decode(vae, torch.zeros(1, 3, 8, 8))


# -- memory ------------------------------------------------------------------------------------------


def test_stored_maps_are_freed_and_estimated():
    vae = tiny_vae(2)
    z = latent(25, 41)
    info: dict = {}
    tiled_decode(vae, z, tile_size=3, info=info)
    prog = _compile_decoder(vae, False)
    shapes = _infer_shapes(prog, (4, 25, 41))
    predicted = _simulate(prog, shapes, _plan_grids(shapes, 24), 4, 1, offload=False).stored
    largest = max(c * h * w for c, h, w in shapes.values()) * 4
    # progressive release: never much more than the largest map plus the block's inner activation
    assert info["peak_stored_bytes"] < 2.0 * largest
    assert info["peak_stored_bytes"] <= predicted <= 1.5 * info["peak_stored_bytes"]


def test_estimate_peak_bytes_for_the_sd_vae():
    """The planner's estimate (meta device: nothing is allocated) for the full-size SD VAE."""
    est = lambda s, tile, **kw: estimate_peak_bytes(SD_VAE, s, s, tile, torch.float16, **kw)  # noqa: E731
    # untiled grows with the pixel count
    assert est(2048, None) > 14 * est(512, None)
    # on the device, tiled keeps one or two feature maps; recompute keeps about one; offload none
    assert est(2048, 32) < est(2048, 64) < est(2048, None)
    assert est(2048, 32, recompute=True) < 0.5 * est(2048, None)
    assert est(4096, 64, offload=True) < 0.25 * 16 * est(1024, 64, offload=True)
    assert est(4096, 64, offload=True) < 12 * 2**30 < est(4096, None)
    # an input that fits one tile runs untiled
    assert est(512, 64) == est(512, None)
    enc = lambda s, tile, **kw: estimate_peak_bytes(SD_VAE, s, s, tile, torch.float32, part="encode", **kw)  # noqa: E731
    assert enc(2048, 256, offload=True) < enc(2048, 256) < enc(2048, None)


# -- the project's tiny reference VAE against the official (untiled) golden outputs -----------------


def test_reference_vae_tiled_matches_official_golden(reference_dir):
    """model_v.json's VAE (32 channels in 32 groups: one channel per group) loaded from the official
    checkpoint, tiled 4x6 and 3x4: the same numbers as the official untiled code (PIPELINE.md 4.1, 9.1)."""
    from conftest import load_golden
    from restorecli.models import configs as cfgs
    from restorecli.models import convert as cv
    from restorecli.models.description import load_model_description
    from restorecli.models.stage2 import new_vae

    desc = load_model_description(reference_dir / "model_v.json")
    config = cfgs.stage2_configs(desc.cldm).vae
    vae = new_vae(config).eval()
    vae.load_state_dict(cv.convert_vae(cv.read_checkpoint(reference_dir / "sd.safetensors"), config))
    golden, _ = load_golden(reference_dir, "vae")
    x = golden["vae_in_u8"].float() / 255 * 2 - 1  # 64x96
    info: dict = {}
    mean = tiled_encode(vae, x, tile_size=16, return_mode=True, info=info)
    assert info["grids"][(64, 96)] == (4, 6)
    assert_close_rel(mean, golden["posterior_mean"], 1e-4, "tiled posterior mean")
    decoded = tiled_decode(vae, golden["latent"] / desc.cldm.latent_scale_factor, tile_size=3, info=info)
    assert info["grids"][(64, 96)] == (3, 4)
    assert_close_rel(decoded, golden["decoded"], 1e-4, "tiled decode")


# -- paused tiles on disk ------------------------------------------------------------------------------


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return None


@pytest.fixture(scope="module")
def vae1():
    return tiny_vae(1)


@pytest.mark.parametrize("limit", [0, 60_000], ids=["all-on-disk", "part-on-disk"])
def test_spilled_tiles_give_the_untiled_result(vae1, limit, tmp_path):
    """A memory limit far below the paused feature maps: they go to temporary files, and the result is
    the in-memory tiled one bit for bit (hence the untiled one within rounding); the files are gone."""
    vae = vae1
    x, z = image(104, 136), latent(13, 17)
    for run, inp, tile, untiled in ((tiled_encode, x, 32, untiled_encode), (tiled_decode, z, 4, untiled_decode)):
        info: dict = {}
        got = run(vae, inp, tile_size=tile, max_stored_bytes=limit, spill_dir=tmp_path, info=info)
        in_memory = run(vae, inp, tile_size=tile)
        assert torch.equal(got, in_memory)
        assert_close_rel(got, untiled(vae, inp), 1e-4, f"{run.__name__} spilled")
        assert info["spilled_bytes"] > 0 and info["peak_stored_bytes"] <= limit + 20_000  # + the 1/8-scale attention
        assert list(tmp_path.iterdir()) == []


def test_the_disk_estimate_covers_the_spill(vae1, tmp_path):
    z = latent(13, 17)
    info: dict = {}
    tiled_decode(vae1, z, tile_size=4, max_stored_bytes=100_000, spill_dir=tmp_path, info=info)
    est = estimate(vae1, 13 * 8, 17 * 8, 4, part="decode", max_stored_bytes=100_000)
    assert est.stored <= 100_000 < estimate(vae1, 13 * 8, 17 * 8, 4, part="decode").stored
    # page rounding of these tiny tiles is within the margin the free-space check keeps
    assert info["peak_disk_bytes"] <= 1.25 * est.disk


def test_spill_files_are_removed_after_an_error(vae1, tmp_path, monkeypatch):
    """An exception (or Ctrl-C) in the middle of a spilled decode leaves no file and no open descriptor."""
    import restorecli.vae.tiled as tv

    vae = vae1
    z = latent(13, 17)
    fds = _open_fds()
    real_chain, calls = tv._Engine._chain, []

    def failing(self, *args):
        calls.append(self.spill.written)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_chain(self, *args)

    monkeypatch.setattr(tv._Engine, "_chain", failing)
    with pytest.raises(KeyboardInterrupt):
        tiled_decode(vae, z, tile_size=4, max_stored_bytes=0, spill_dir=tmp_path)
    assert calls[-1] > 0, "the failure came after tiles were on disk"
    assert list(tmp_path.iterdir()) == []
    assert _open_fds() == fds


def test_free_disk_is_checked_before_any_work(vae1, tmp_path, monkeypatch):
    import shutil

    import restorecli.vae.tiled as tv

    vae = vae1
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with monkeypatch.context() as m:
        m.setattr(tv._Engine, "run", lambda *a: pytest.fail("computed before checking the disk"))
        with pytest.raises(SpillError, match=rf"free disk in {tmp_path}.*0\.0 GiB is free"):
            tiled_decode(vae, latent(13, 17), tile_size=4, max_stored_bytes=0, spill_dir=tmp_path)
    tiled_decode(vae, latent(13, 17), tile_size=4, spill_dir=tmp_path)  # nothing to spill: no check
