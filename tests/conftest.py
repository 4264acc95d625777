"""Shared fixtures. Parity tests read ../shared/reference/ (golden data of the official DiffBIR code)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Converted-weight caches, locks and downloads of the test session go to a throwaway folder, never to
# the user's ~/.cache/restorecli. Tests that need their own folder monkeypatch RESTORE_HOME again.
os.environ["RESTORE_HOME"] = tempfile.mkdtemp(prefix="restorecli-tests-")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESTORE_SHARED_DIR", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
TOKENIZER = SHARED / "sd2-tokenizer"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """../shared/reference, or a skip that says why (the only allowed reason to skip a parity test)."""
    if not (REFERENCE / "cases.json").is_file():
        pytest.skip(f"parity data not found at {REFERENCE} (../shared/reference is absent)")
    return REFERENCE


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if not (TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"tokenizer files not found at {TOKENIZER} (../shared/sd2-tokenizer is absent)")
    return TOKENIZER


def load_golden(reference_dir: Path, name: str):
    """(tensors, metadata) of golden/<name>.safetensors."""
    from safetensors import safe_open

    path = reference_dir / "golden" / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def assert_close_rel(actual, expected, rtol: float = 1e-4, what: str = "") -> None:
    """|actual - expected| <= rtol * max|expected| elementwise (relative to the tensor's scale)."""
    import torch

    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: hundreds of small ops, where thread start-up
    dominates, worst on a busy 2-core runner. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def permissions_enforced(folder: Path) -> bool:
    """Whether chmod 000 stops reads here: it does not stop root (CAP_DAC_OVERRIDE), so probe instead of
    checking the uid. The probe is a hidden file, removed again."""
    probe = folder / ".permission-probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        with open(probe, "rb"):
            return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()


def force_tiles(monkeypatch, **tiles):
    """Make the pipeline's planner return these tiles (everything else as planned)."""
    import restorecli.pipeline.diffbir as pl

    original = pl.plan_stage2

    def forced(*args, **kw):
        p = original(*args, **kw)
        for k, v in tiles.items():
            setattr(p, k, v)
        return p

    monkeypatch.setattr(pl, "plan_stage2", forced)
