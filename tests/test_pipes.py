"""Shell pipelines: `restore - -o -` (image in on stdin, image out on stdout, nothing else there),
chains of restores, several files into a new folder, JSON lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _fake_pipeline
from restorecli.cli.app import main

FAKE_RESTORE = [sys.executable, str(Path(__file__).with_name("_fake_pipeline.py"))]
PNG_END = b"IEND\xaeB`\x82"


def fake_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def png_bytes(size=(10, 6), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_stdin_to_stdout_through_the_console_script(reference_dir):
    """The installed `restore`, the reference model: stdout is exactly one PNG, the golden result."""
    exe = Path(sys.executable).with_name("restore")
    if not exe.exists():
        pytest.skip("console script not installed in this environment (pip install -e .)")
    case = next(c for c in json.loads((reference_dir / "cases.json").read_text())["cases"] if c["name"] == "stage1_only_x2")
    result = subprocess.run(
        [str(exe), "-", "-o", "-", *case["args"]], input=(reference_dir / case["input"]).read_bytes(),
        capture_output=True, cwd=reference_dir, timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b"\x89PNG\r\n\x1a\n") and result.stdout.endswith(PNG_END)  # nothing else
    assert PNG_END not in result.stdout[:-len(PNG_END)]
    assert b"\x89PNG" not in result.stderr
    actual = np.asarray(Image.open(io.BytesIO(result.stdout)).convert("RGB")).astype(int)
    expected = np.asarray(Image.open(reference_dir / case["expected"]).convert("RGB")).astype(int)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= case["tolerance"]["max_diff"]


def test_a_chain_of_restores_with_a_noisy_dependency(tmp_path):
    """`restore - -o - | restore - -o - --format jpg`: each stage passes only the image on, even when
    something inside prints to stdout (it lands on stderr)."""
    source = png_bytes()
    stage = [*FAKE_RESTORE, "-", "-o", "-", "--upscale", "2"]
    first = subprocess.Popen(stage, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=fake_env(FAKE_PRINT=1))
    second = subprocess.Popen([*stage, "--format", "jpg", "--quality", "90"], stdin=first.stdout,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=fake_env(FAKE_PRINT=1))
    first.stdout.close()
    first.stdin.write(source)
    first.stdin.close()
    out, err2 = second.communicate(timeout=300)
    err1 = first.stderr.read()
    first.wait(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert b"a stray line from a dependency" in err1 and b"a stray line from a dependency" in err2
    assert out.startswith(b"\xff\xd8") and out.endswith(b"\xff\xd9")
    with Image.open(io.BytesIO(out)) as im:
        assert im.format == "JPEG" and im.size == (40, 24)
        # inverted twice: close to the original, enlarged 4x
        original = np.asarray(Image.open(io.BytesIO(source))).repeat(4, axis=0).repeat(4, axis=1)
        assert np.abs(np.asarray(im).astype(int) - original).mean() < 12


def test_empty_stdin_is_one_error_line_and_no_output():
    result = subprocess.run([*FAKE_RESTORE, "-", "-o", "-"], input=b"", capture_output=True, env=fake_env(),
                            timeout=300)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().strip().splitlines() == ["error: <stdin>: empty input (0 bytes)"]


def test_several_files_into_a_new_folder_with_json(tmp_path, capsys, monkeypatch):
    _fake_pipeline.install(monkeypatch, delay=0)
    paths = []
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        (tmp_path / name).write_bytes(png_bytes(seed=i))
        paths.append(str(tmp_path / name))
    (tmp_path / "d.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main([*paths, str(tmp_path / "d.png"), "-o", f"{out}/", "--json", "--upscale", "1"])
    captured = capsys.readouterr()
    assert code == 1
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["status"] for r in records[:-1]] == ["ok", "ok", "ok", "failed"]
    assert records[-1]["summary"] is True and records[-1]["ok"] == 3 and records[-1]["failed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_restored.png", "b_restored.png", "c_restored.png"]
    for record in records[:3]:
        assert Path(record["output"]).is_file() and record["width"] == 10
    assert f"error: {tmp_path / 'd.png'}: not an image (unknown format)" in captured.err


def test_json_with_stdout_image_is_a_usage_error(capsys):
    code = main(["-", "-o", "-", "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and "cannot be combined with -o -" in captured.err


def test_files_sharing_a_stem_each_get_an_output(tmp_path, capsys, monkeypatch):
    """`restore IMAGE...` names outputs by the rule of `restore batch`: into a folder and beside the inputs,
    every input restored, the JSON lines name the files written."""
    _fake_pipeline.install(monkeypatch, delay=0)
    for i, name in enumerate(["a.png", "a.gif", "x.png", "x_restored.png"]):
        (tmp_path / name).write_bytes(png_bytes(seed=i))
    inputs = [str(tmp_path / n) for n in ["a.png", "a.gif", "x.png", "x_restored.png"]]
    stems = ["a_gif_restored.png", "a_png_restored.png", "x_restored_restored.png"]
    # into another folder x.png gets the plain name; beside the inputs that is the input x_restored.png
    for target, folder, x in ((f"{tmp_path / 'out'}/", tmp_path / "out", "x_restored.png"),
                              (None, tmp_path, "x_png_restored.png")):
        expected = sorted([*stems, x])
        code = main([*inputs, *(["-o", target] if target else []), "--json", "--upscale", "1"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        records = [json.loads(line) for line in captured.out.splitlines()][:-1]
        assert sorted(Path(r["output"]).name for r in records) == expected
        assert all(Path(r["output"]).parent == folder and Path(r["output"]).is_file() for r in records)
        for record in records:  # each output is its own input's (the fake inverts)
            source = np.asarray(Image.open(record["input"]).convert("RGB")).astype(int)
            assert np.abs(np.asarray(Image.open(record["output"])).astype(int) - (255 - source)).max() <= 1
        assert f"{tmp_path / 'a.gif'} -> {folder / 'a_gif_restored.png'}" in captured.err
