"""CLI contract: default-command fall-through, output naming, no overwriting, exit codes, streams."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from restorecli.cli.app import main
from restorecli.errors import UsageError
from restorecli.run.outputs import OutputPlan, check_output, output_name
from restorecli.run.plan import NameRequest, name_key, plan_outputs, unique_outputs


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


def names(plans) -> dict[str, str]:
    return {Path(p.input).name: Path(p.output).name for p in plans}


def test_inputs_sharing_a_stem_carry_their_source_extension(tmp_path):
    """The README examples: the plain name when the stem is unique in its folder, else the source
    extension after the stem (and the output format rules as usual: gif -> png)."""
    inputs = ["IMG_0001.jpg", "IMG_0001.tif", "logo.gif", "logo.png", "x.png", "scan0001", "scan0001.png"]
    plans = plan_outputs([f"in/{n}" for n in inputs], f"{tmp_path}/")
    assert names(plans) == {
        "IMG_0001.jpg": "IMG_0001_jpg_restored.jpg",
        "IMG_0001.tif": "IMG_0001_tif_restored.tif",
        "logo.gif": "logo_gif_restored.png",
        "logo.png": "logo_png_restored.png",
        "x.png": "x_restored.png",
        "scan0001": "scan0001_restored.png",  # no extension: nothing to add
        "scan0001.png": "scan0001_png_restored.png",
    }
    assert all(p.error is None and Path(p.output).parent == tmp_path for p in plans)
    # --format and --suffix change the extension and the suffix, not which names carry a tag
    assert names(plan_outputs(["in/logo.gif", "in/logo.png"], f"{tmp_path}/", fmt="webp", suffix="_x")) == {
        "logo.gif": "logo_gif_x.webp", "logo.png": "logo_png_x.webp"}


def test_names_that_differ_only_in_letter_case_are_numbered(tmp_path):
    """`a.PNG` + `a.png` (possible on a case-sensitive file system) must not become two names that a
    case-insensitive one (macOS, Windows, a FAT/exFAT drive) takes for one: numbered in path order."""
    plans = plan_outputs(["d/a.png", "d/a.PNG", "d/A.gif", "d/b.png"], f"{tmp_path}/")
    assert names(plans) == {
        "a.PNG": "a_PNG-1_restored.PNG", "a.png": "a_png-2_restored.png", "A.gif": "A_gif_restored.png",
        "b.png": "b_restored.png"}
    assert len({p.output.lower() for p in plans}) == 4


def test_same_named_files_of_several_folders_into_one(tmp_path):
    plans = plan_outputs(["y/a.png", "x/a.png", "x/b.png"], str(tmp_path) + "/")
    assert [(p.input, Path(p.output).name, p.error) for p in plans] == [
        ("y/a.png", "a_png-2_restored.png", None), ("x/a.png", "a_png-1_restored.png", None),
        ("x/b.png", "b_restored.png", None)]
    # beside the inputs, the folders keep them apart: plain names
    assert [p.output for p in plan_outputs(["y/a.png", "x/a.png"], None)] == ["y/a_restored.png", "x/a_restored.png"]


def test_an_input_named_like_another_inputs_output(tmp_path):
    """`x_restored.png` beside `x.png`: both are restored, neither output is an input."""
    x, xr = str(tmp_path / "x.png"), str(tmp_path / "x_restored.png")
    for order in ([x, xr], [xr, x]):
        assert names(plan_outputs(order, None)) == {"x.png": "x_png_restored.png", "x_restored.png": "x_restored_restored.png"}


def test_the_same_file_twice_is_restored_once(tmp_path):
    img = tmp_path / "photo.png"
    img.write_bytes(b"x")
    os.link(img, tmp_path / "hard.png")
    os.symlink(img, tmp_path / "soft.jpg")
    inputs = [str(img), str(tmp_path / "soft.jpg"), str(img), str(tmp_path / "hard.png")]
    for order in (inputs, inputs[::-1]):
        plans = {(p.input, p.output, p.error and p.error.split(": ", 1)[1]) for p in plan_outputs(order, None)}
        # kept: the first in path order that is not a symbolic link (hard.png), whatever the order given
        assert plans == {
            (str(tmp_path / "hard.png"), str(tmp_path / "hard_restored.png"), None),
            (str(img), None, f"the same file as {tmp_path / 'hard.png'} (a link); it is restored once, as that one"),
            (str(img), None, "given more than once; it is restored once"),
            (str(tmp_path / "soft.jpg"), None, f"the same file as {tmp_path / 'hard.png'} (a link); it is restored once, as that one"),
        }


def test_an_own_input_is_never_an_output_even_ignoring_case(tmp_path):
    (plan,) = plan_outputs([str(tmp_path / "A.PNG")], None, suffix="", fmt="png")
    assert plan.output == str(tmp_path / "A.png") and "is an input; refusing to overwrite it" in plan.error


@pytest.mark.parametrize("seed", range(20))
def test_naming_rule_properties(seed):
    """Random folders of names built to collide (stems, extensions and case from a few letters): every
    output is distinct from every other and from every input ignoring letter case, the names do not
    depend on the order of the inputs, a unique stem keeps the plain name, and refusals are rare."""
    rng = random.Random(seed)
    pool = ["".join(c) for c in itertools.product("aA", "bB", ["", "_restored"], ["", ".png", ".PNG", ".jpg", ".gif"])]
    names_ = rng.sample(pool, rng.randint(2, 24))
    folders = ["in", "in/sub"]
    requests = [NameRequest(f"{rng.choice(folders)}/{n}", "out" if rng.random() < 0.5 else "in", n) for n in names_]
    named = unique_outputs(requests)
    shuffled = rng.sample(range(len(requests)), len(requests))
    again = unique_outputs([requests[i] for i in shuffled])
    assert [again[k] for k in sorted(range(len(shuffled)), key=lambda k: shuffled[k])] == named
    inputs = {name_key(r.input) for r in requests}
    given = [name_key(n.output) for n in named if n.error is None]
    assert len(given) == len(set(given)) and not inputs & set(given)
    stems = [name_key(Path(r.folder) / Path(r.name).stem) for r in requests]
    for r, n, stem in zip(requests, named, stems):
        if stems.count(stem) == 1 and name_key(Path(r.folder) / output_name(r.name)) not in inputs:
            assert Path(n.output).name == output_name(r.name)
    assert sum(n.error is not None for n in named) <= 1


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
