"""restorecli.models.safe_load: safe loading of the official checkpoint layouts; arbitrary pickles refused."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from restorecli.models.safe_load import load_state_dict
from restorecli.errors import WeightsError


def _same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["swinir", "sd", "controlnet"])
def test_reference_checkpoints_load_like_their_safetensors(reference_dir, name):
    pickled = next(p for p in reference_dir.glob(f"{name}.*") if p.suffix in (".pth", ".ckpt"))
    loaded = load_state_dict(pickled)
    _same_tensors(loaded, load_state_dict(reference_dir / f"{name}.safetensors"))
    assert not any(k.startswith("module.") for k in loaded)


def test_swinir_module_prefix_and_state_dict_wrapper_are_removed(reference_dir):
    raw = torch.load(reference_dir / "swinir.pth", map_location="cpu", weights_only=True)
    assert list(raw) == ["state_dict"] and next(iter(raw["state_dict"])).startswith("module.")
    loaded = load_state_dict(reference_dir / "swinir.pth")
    assert "conv_first.1.weight" in loaded and len(loaded) == len(raw["state_dict"])


def test_basicsr_wrappers_and_legacy_format(tmp_path):
    w = {"module.conv.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"params_ema": w, "params": {"other": torch.zeros(1)}}, tmp_path / "ema.pth")
    torch.save({"params": w}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "legacy.pth")
    for name in ("ema.pth", "legacy.pth"):
        loaded = load_state_dict(tmp_path / name)
        assert list(loaded) == ["conv.weight"] and torch.equal(loaded["conv.weight"], w["module.conv.weight"])


def test_safetensors_content_is_detected_whatever_the_name(tmp_path):
    save_file({"a": torch.ones(3)}, tmp_path / "model.ckpt")
    assert torch.equal(load_state_dict(tmp_path / "model.ckpt")["a"], torch.ones(3))


class Payload:
    """A pickle that would run code when unpickled unsafely (it writes a marker file)."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Config:
    def __init__(self):
        self.lr = 1e-4


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickles_that_need_arbitrary_objects_are_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    Payload.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Payload()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError) as err:
        load_state_dict(path)
    assert str(err.value).startswith(f"{path}: refusing to unpickle arbitrary objects (it needs ")
    assert str(err.value).endswith("); convert it to safetensors")
    assert not marker.exists()

    custom = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": Config()}, custom, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError, match=r"refusing to unpickle arbitrary objects \(it needs .*Config\)"):
        load_state_dict(custom)


def test_corrupt_truncated_and_empty_files_get_clear_errors(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(b"definitely not a checkpoint")
    (tmp_path / "empty.pth").write_bytes(b"")
    save_file({"w": torch.ones(1000)}, tmp_path / "good.safetensors")
    st = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) - 100])
    for name in ("truncated.pth", "garbage.ckpt"):
        with pytest.raises(WeightsError, match=rf"^{tmp_path / name}: not a readable checkpoint, corrupt or truncated \("):
            load_state_dict(tmp_path / name)
    with pytest.raises(WeightsError, match=r"garbage.ckpt: .* \(Unsupported operand \d+\)$"):
        load_state_dict(tmp_path / "garbage.ckpt")
    with pytest.raises(WeightsError, match=r"truncated.safetensors: not a readable safetensors file, corrupt or truncated"):
        load_state_dict(tmp_path / "truncated.safetensors")
    with pytest.raises(WeightsError, match=r"empty.pth: empty file$"):
        load_state_dict(tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match=r"missing.pth: no such file$"):
        load_state_dict(tmp_path / "missing.pth")


def test_files_without_tensors_are_refused(tmp_path):
    torch.save({"epoch": 3, "model": {"w": torch.ones(1)}}, tmp_path / "nested.pth")
    with pytest.raises(WeightsError, match=r"nested.pth: no tensors found \(top-level keys: epoch, model\)"):
        load_state_dict(tmp_path / "nested.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match=r"list.pth: not a state dict \(the file holds a list\)"):
        load_state_dict(tmp_path / "list.pth")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"w": 1}, f, protocol=2)
    with pytest.raises(WeightsError):
        load_state_dict(tmp_path / "plain.pkl")
