"""Every CLI case in ../shared/reference/cases.json, through the real CLI, within the case's tolerance.

The cases are enumerated from the file, so new cases are picked up without code changes. Each runs
`restore INPUT -o OUT ARGS...` from the reference folder (paths in the cases are relative to it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import REFERENCE
from restorecli.cli.app import main


def _cases():
    path = REFERENCE / "cases.json"
    if not path.is_file():
        return [pytest.param(None, id="no-reference-data")]
    return [pytest.param(case, id=case["name"]) for case in json.loads(path.read_text())["cases"]]


def compare(actual: np.ndarray, expected: np.ndarray, tol: dict) -> tuple[bool, str]:
    """The reference README's rule: shape equal, fraction within max_diff, PSNR >= min_psnr."""
    if actual.shape != expected.shape:
        return False, f"shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    fraction = float((diff <= tol["max_diff"]).mean())
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    ok = fraction >= tol["min_fraction"] and psnr >= tol["min_psnr"]
    return ok, f"max diff {diff.max()}, fraction within {tol['max_diff']}: {fraction:.5f}, PSNR {psnr:.2f} dB"


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases())
def test_cli_case(case, reference_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(reference_dir)
    out = tmp_path / f"{case['name']}.png"
    code = main([case["input"], "-o", str(out), *case["args"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "", "stdout must stay clean when writing to a file"
    actual = np.asarray(Image.open(out).convert("RGB"))
    expected = np.asarray(Image.open(reference_dir / case["expected"]).convert("RGB"))
    ok, detail = compare(actual, expected, case["tolerance"])
    assert ok, f"{case['name']}: {detail} (tolerance {case['tolerance']})"


def test_compare_rule_rejects_a_shifted_image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    tol = {"max_diff": 2, "min_fraction": 0.998, "min_psnr": 50.0}
    assert compare(img, img, tol)[0]
    assert not compare(np.roll(img, 1, axis=1), img, tol)[0]
    assert not compare(img[:-1], img, tol)[0]
