"""CLI contract: default-command fall-through, output naming, no overwriting, exit codes, streams."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from restorecli.cli.app import main
from restorecli.errors import UsageError
from restorecli.run.outputs import OutputPlan, check_output, output_name, plan_outputs


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- output naming -------------------------------------------------------------------------


@pytest.mark.parametrize("name, fmt, expected", [
    ("photo.png", None, "photo_restored.png"),
    ("scan.JPG", None, "scan_restored.JPG"),
    ("old.tiff", None, "old_restored.tiff"),
    ("frame.gif", None, "frame_restored.png"),  # not a writable format: png
    ("photo.png", "jpg", "photo_restored.jpg"),
    ("archive.tar.png", None, "archive.tar_restored.png"),
])
def test_output_name(name, fmt, expected):
    assert output_name(name, fmt=fmt) == expected


def test_default_output_goes_beside_the_input(tmp_path):
    (plan,) = plan_outputs([str(tmp_path / "a" / "photo.png")], None)
    assert plan.output == str(tmp_path / "a" / "photo_restored.png")


def test_output_folder_collects_outputs(tmp_path):
    plans = plan_outputs(["x/a.png", "y/b.jpg"], str(tmp_path) + "/")
    assert [p.output for p in plans] == [str(tmp_path / "a_restored.png"), str(tmp_path / "b_restored.jpg")]


def test_output_file_with_several_inputs_is_a_usage_error():
    with pytest.raises(UsageError, match="takes one input, got 2"):
        plan_outputs(["a.png", "b.png"], "out.png")
    with pytest.raises(UsageError, match="-o - takes one input"):
        plan_outputs(["a.png", "b.png"], "-")


def test_two_inputs_mapping_to_one_output_is_refused(tmp_path):
    with pytest.raises(UsageError, match="would both be written"):
        plan_outputs(["x/a.png", "y/a.png"], str(tmp_path) + "/")


def test_never_overwrite_an_input_even_with_overwrite(tmp_path):
    img = tmp_path / "photo.png"
    img.write_bytes(b"x")
    from restorecli.errors import OutputError

    with pytest.raises(OutputError, match="is an input"):
        check_output(OutputPlan(str(img), str(img)), overwrite=True)
    # a hard link to the input is the same file
    link = tmp_path / "link.png"
    os.link(img, link)
    with pytest.raises(OutputError, match="is an input"):
        check_output(OutputPlan(str(img), str(link)), overwrite=True)


# -- the command line ----------------------------------------------------------------------


def test_existing_output_is_kept_without_overwrite(tmp_path, capsys):
    img = tmp_path / "photo.png"
    img.write_bytes(b"not really")
    existing = tmp_path / "photo_restored.png"
    existing.write_bytes(b"finished work")
    code, out, err = run([str(img)], capsys)
    assert code == 1
    assert out == ""
    assert f"error: {existing}: already exists; use --overwrite" in err
    assert existing.read_bytes() == b"finished work"


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    img = tmp_path / "photo.png"
    img.write_bytes(b"data")
    code, _, err = run([str(img), "-o", str(img), "--overwrite"], capsys)
    assert code == 1
    assert "is an input; refusing to overwrite it" in err
    assert img.read_bytes() == b"data"


def test_subcommand_names_are_not_taken_as_files(capsys):
    """`restore weights --help` is the weights group's help, not the image command's help for a file
    named "weights"."""
    code, out, err = run(["weights", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "Usage: restore weights" in text
    for sub in ("list", "fetch", "verify", "path"):
        assert f"│ {sub} " in out or f" {sub} " in text
    assert "Image files" not in text and "--sampler" not in text  # the image command's arguments and options


def test_file_named_like_a_subcommand_needs_a_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("batch").write_bytes(b"x")
    Path("batch_restored.png").write_bytes(b"done")
    # `./batch` falls through to the default command (and is refused here only because its output exists)
    code, _, err = run(["./batch", "-o", "batch_restored.png"], capsys)
    assert code == 1 and "already exists" in err


def test_bad_option_value_is_a_usage_error(capsys):
    code, out, err = run(["photo.png", "--sampler", "nope"], capsys)
    assert code == 2
    assert "--sampler" in err and "nope" in err
    assert out == ""


@pytest.mark.parametrize("args, fragment", [
    (["--guidance", "-1"], "`--guidance` must be >= 0"),
    (["--guidance-start", "100", "--guidance-stop", "200"], "`--guidance-start` must be greater"),
    (["--tile-size", "100"], "multiple of 64"),
    (["--max-memory", "lots"], "--max-memory"),
])
def test_usage_errors_exit_2(args, fragment, capsys):
    code, out, err = run(["photo.png", *args], capsys)
    assert code == 2, err
    assert fragment in err
    assert out == ""


def test_unknown_option_exits_2(capsys):
    code, _, err = run(["photo.png", "--no-such-flag"], capsys)
    assert code == 2
    assert "no-such-flag" in err


def test_version_on_stdout(capsys):
    code, out, err = run(["--version"], capsys)
    assert code == 0
    assert out.startswith("restorecli ")


def test_console_script_runs_and_keeps_stdout_clean(tmp_path):
    """The installed `restore` entry point: help on stdout, errors on stderr with exit 2."""
    exe = Path(sys.executable).with_name("restore")
    if not exe.exists():
        pytest.skip("console script not installed in this environment (pip install -e .)")
    help_run = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "batch" in help_run.stdout and "weights" in help_run.stdout
    bad = subprocess.run([str(exe), "x.png", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "error:" in bad.stderr and "--steps" in bad.stderr


@pytest.mark.parametrize("flag", ["--guidance", "--cfg", "--strength", "--eta"])
def test_non_finite_numbers_are_usage_errors(flag, capsys):
    code, out, err = run(["photo.png", flag, "nan"], capsys)
    assert code == 2 and f"`{flag}` must be a finite number" in err and out == ""
