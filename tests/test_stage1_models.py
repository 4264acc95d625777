"""Stage-1 model loading through spandrel: official layouts, wrappers, description cross-check, dtypes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from restorecli.errors import SetupError
from restorecli.models.description import load_model_description
from restorecli.stage1.cleaners import (
    check_swinir_params,
    descriptor_from_state_dict,
    load_cleaner,
)


@pytest.fixture(scope="module")
def description(reference_dir):
    return load_model_description(reference_dir / "model_eps.json")


@pytest.fixture(scope="module")
def tiny_swinir(description):
    return load_cleaner(description.cleaner)


def test_tiny_swinir_from_description_is_diffbirs_swinir(tiny_swinir):
    assert tiny_swinir.kind == tiny_swinir.pipeline == "swinir"
    assert tiny_swinir.architecture == "SwinIR"
    assert tiny_swinir.scale == 1
    assert tiny_swinir.size_requirements.multiple_of == 64
    assert not tiny_swinir.supports_half and tiny_swinir.supports_bfloat16
    assert not any(p.requires_grad for p in tiny_swinir.model.parameters())


def test_wrapped_pth_and_safetensors_load_the_same_weights(reference_dir, tiny_swinir):
    """swinir.pth is {"state_dict": {"module.<key>": ...}}; checkpoints.load_state_dict unwraps it."""
    from_pth = load_cleaner(reference_dir / "swinir.pth")
    a, b = from_pth.model.state_dict(), tiny_swinir.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _changed(description, **params):
    spec = description.cleaner
    return dataclasses.replace(spec, params={**spec.params, **params})


@pytest.mark.parametrize(
    "change, words",
    [
        ({"embed_dim": 32}, "embed_dim: description 32, weights 16"),
        ({"depths": [2, 2, 2], "num_heads": [2, 2, 2]}, "depths"),
        ({"num_heads": [4, 4]}, "num_heads"),
        ({"window_size": 4}, "window_size"),
        ({"mlp_ratio": 4}, "mlp_ratio"),
        ({"img_size": 32}, "img_size"),
        ({"upsampler": "pixelshuffle"}, "upsampler"),
        ({"unshuffle": False}, "unshuffle"),
        ({"sf": 4, "unshuffle_scale": 4}, "sf"),
        ({"unshuffle_scale": 4}, "must equal"),
        ({"resi_connection": "3conv"}, "resi_connection"),
        ({"embed_dims": 16}, "unknown SwinIR parameter"),
    ],
)
def test_description_mismatch_is_a_setup_error(description, change, words):
    with pytest.raises(SetupError, match=words.replace("[", r"\[")):
        load_cleaner(_changed(description, **change))


def test_img_range_comes_from_the_description(description):
    """img_range is not in the weights (spandrel guesses it from the window size): the description wins."""
    cleaner = load_cleaner(_changed(description, img_range=255.0))
    assert cleaner.model.img_range == 255.0


def test_unknown_arch_and_unknown_model(description, tmp_path):
    with pytest.raises(SetupError, match='"swinir" or "spandrel"'):
        load_cleaner(dataclasses.replace(description.cleaner, arch="hat"))
    with pytest.raises(SetupError, match="not a model architecture spandrel"):
        load_cleaner({"foo.weight": torch.zeros(3, 3)})
    with pytest.raises(SetupError, match="no such file"):
        load_cleaner(tmp_path / "missing.pth")


# -- full-size official layouts ----------------------------------------------------------------------------

FULL_LAYOUTS = {
    # layout: (spandrel arch, kind, scale, supports fp16)
    "swinir_general_v1": ("SwinIR", "swinir", 1, False),
    "swinir_realesrgan_s4": ("SwinIR", "swinir", 1, False),
    "bsrnet": ("ESRGAN", "bsrnet", 4, True),
    "scunet_psnr": ("SCUNet", "scunet", 1, True),
}


@pytest.mark.parametrize("layout", sorted(FULL_LAYOUTS))
def test_full_size_manifest_loads_into_the_spandrel_model(reference_dir, layout):
    """Every key/shape of the real checkpoints loads strictly into the spandrel-built model.

    Zero tensors rather than meta tensors: spandrel copies the state dict into a model it builds on
    the CPU (load_state_dict without assign), and the SwinIR/SCUNet constructors call .item(), so
    neither side can live on the meta device. spandrel renames keys on the way (conv_first.1 ->
    conv_first, KAIR's RRDB_trunk -> model.1.sub), hence the count and shape multiset comparison on
    top of spandrel's strict load.
    """
    entry = json.loads((reference_dir / "manifest_full.json").read_text())["layouts"][layout]
    keys = entry["keys"]
    descriptor = descriptor_from_state_dict({k: torch.zeros(shape) for k, shape in keys.items()}, layout)
    arch, kind, scale, half = FULL_LAYOUTS[layout]
    assert descriptor.architecture.id == arch
    assert descriptor.scale == scale and descriptor.supports_half == half
    model_shapes = sorted(tuple(t.shape) for t in descriptor.model.state_dict().values())
    assert model_shapes == sorted(tuple(s) for s in keys.values())
    from restorecli.stage1.cleaners import cleaner_kind

    assert cleaner_kind(descriptor) == kind
    if arch == "SwinIR":  # the official swinir.yaml kwargs match what spandrel read off the shapes
        check_swinir_params(descriptor, entry["config"], layout)


# -- BSRNet: spandrel's ESRGAN on KAIR's layout computes the official RRDBNet ---------------------------


def _kair_rrdbnet(nf=8, gc=32, nb=2, seed=0) -> dict[str, torch.Tensor]:
    """A small BSRNet in KAIR's key layout (spandrel's ESRGAN always uses the growth channel gc=32)."""
    g = torch.Generator().manual_seed(seed)

    def conv(cin, cout):
        return {"weight": torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5),
                "bias": 0.02 * torch.randn(cout, generator=g)}

    parts = {"conv_first": conv(3, nf), "trunk_conv": conv(nf, nf), "upconv1": conv(nf, nf),
             "upconv2": conv(nf, nf), "HRconv": conv(nf, nf), "conv_last": conv(nf, 3)}
    for b in range(nb):
        for r in (1, 2, 3):
            for i in range(1, 6):
                parts[f"RRDB_trunk.{b}.RDB{r}.conv{i}"] = conv(nf + (i - 1) * gc, nf if i == 5 else gc)
    return {f"{name}.{p}": t for name, d in parts.items() for p, t in d.items()}


def _official_rrdbnet(sd, x, nb=2):
    """PIPELINE.md 3.2 (diffbir/model/bsrnet.py RRDBNet.forward), written out with F.conv2d."""

    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.2)

    def rdb(prefix, t):
        feats = [t]
        for i in range(1, 5):
            feats.append(lrelu(conv(f"{prefix}.conv{i}", torch.cat(feats, 1))))
        return conv(f"{prefix}.conv5", torch.cat(feats, 1)) * 0.2 + t

    fea = conv("conv_first", x)
    trunk = fea
    for b in range(nb):
        out = trunk
        for r in (1, 2, 3):
            out = rdb(f"RRDB_trunk.{b}.RDB{r}", out)
        trunk = out * 0.2 + trunk
    fea = fea + conv("trunk_conv", trunk)
    fea = lrelu(conv("upconv1", F.interpolate(fea, scale_factor=2, mode="nearest")))
    fea = lrelu(conv("upconv2", F.interpolate(fea, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("HRconv", fea)))


def test_kair_bsrnet_layout_runs_the_official_rrdbnet():
    sd = _kair_rrdbnet()
    cleaner = load_cleaner(sd, name="tiny_bsrnet")
    assert (cleaner.kind, cleaner.scale, cleaner.supports_half) == ("bsrnet", 4, True)
    x = torch.rand(1, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cleaner.run(x), _official_rrdbnet(sd, x), rtol=1e-5, atol=1e-5)


# -- precision --------------------------------------------------------------------------------------------


def test_half_precision_only_where_spandrel_supports_it(description):
    assert load_cleaner(description.cleaner, dtype=torch.float16).dtype == torch.float32  # SwinIR: no fp16
    assert load_cleaner(description.cleaner, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load_cleaner(_kair_rrdbnet(), dtype=torch.float16).dtype == torch.float16


def test_bfloat16_runs_under_autocast_and_returns_float32():
    sd = _kair_rrdbnet()
    fp32 = load_cleaner(sd)
    bf16 = load_cleaner(sd, dtype=torch.bfloat16)
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    y32, y16 = fp32.run(x), bf16.run(x)
    assert y16.dtype == torch.float32
    assert next(bf16.model.parameters()).dtype == torch.float32  # weights stay fp32, as under official autocast
    assert 0 < (y16 - y32).abs().max() < 0.05 * y32.abs().max()
