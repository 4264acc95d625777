"""`restore batch DIR`: discovery, output planning, per-file failures, resume, kill -9, Ctrl-C, JSON lines.

Most tests run the real CLI and loop with the stand-in pipeline of `_fake_pipeline.py` (the batch
machinery does not depend on the model, and the tiny reference model costs seconds per image on a
shared CPU); `test_real_tiny_model_batch_matches_the_golden_output` runs the reference model once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import _fake_pipeline
from conftest import permissions_enforced
from restorecli.cli.app import main
from restorecli.images import is_temp_file
from restorecli.run.discovery import Source, default_output_dir, discover, read_list
from restorecli.run.loop import BatchEvents, run_batch
from restorecli.run.plan import Job, plan_batch
from restorecli.run.steps import FileResult
from restorecli.settings import RestoreSettings

FAKE_RESTORE = [sys.executable, str(Path(__file__).with_name("_fake_pipeline.py"))]
RNG = np.random.default_rng(8)


# -- helpers -----------------------------------------------------------------------------------------


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png(path: Path, size=(12, 8), seed: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = RNG if seed is None else np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def make_images(folder: Path, n: int) -> list[Path]:
    return [png(folder / f"img{i:02d}.png", seed=i) for i in range(n)]


#: Files a batch must report one line each for and go on: empty, text named .jpg, a PNG signature alone.
BROKEN_FILES = {"empty.png": b"", "text.jpg": b"this is not a picture\n", "signature_only.png": b"\x89PNG\r\n\x1a\n"}


def write_broken_files(folder: Path) -> list[str]:
    """BROKEN_FILES written into `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in BROKEN_FILES.items():
        (folder / name).write_bytes(data)
    return list(BROKEN_FILES)


def reference_inputs_and_broken_files(folder: Path, reference_dir: Path) -> None:
    """`folder` with the reference inputs (odd sizes and modes) and BROKEN_FILES: a batch's worst day."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((reference_dir / "inputs").glob("*.png")):
        shutil.copy(path, folder / path.name)
    write_broken_files(folder)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path) -> Path:
    """A 100000 x 100000 PNG header (10 gigapixels) with almost no data: a decompression bomb."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + png_chunk(b"IEND", b""))
    return path


def all_files(folder: Path) -> list[str]:
    """The files under `folder`, but the batch's prompts.jsonl record (tests/test_captions_cli.py checks it)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "prompts.jsonl")


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temp_file(p)]


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def image(path: Path, seed: int, size=(12, 8)) -> Path:
    """A random image in the format its extension names (PNG without one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=None if path.suffix else "PNG")
    return path


def assert_restored_from(output: Path, source: Path, scale: int = 1) -> None:
    """`output` is the fake pipeline's result of `source` (inverted, enlarged), not of another input."""
    expected = 255 - np.asarray(Image.open(source).convert("RGB")).repeat(scale, axis=0).repeat(scale, axis=1)
    with Image.open(output) as im:
        actual = np.asarray(im.convert("RGB")).astype(int)
    tolerance = 12 if output.suffix.lower() in (".jpg", ".jpeg") else 1  # JPEG: lossy, still far from any other
    assert np.abs(actual - expected).mean() <= tolerance, (output, source)


def case_sensitive(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case.probe").write_bytes(b"")
    try:
        return not (folder / "CASE.PROBE").exists()
    finally:
        (folder / "case.probe").unlink()


@pytest.fixture()
def fake(monkeypatch):
    monkeypatch.delenv("FAKE_DELAY", raising=False)
    return _fake_pipeline.install(monkeypatch)


def fake_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return env


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- discovery and planning --------------------------------------------------------------------------


def test_discovery_by_extension_and_content(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "B.JPG")  # upper-case extension (PNG content: read by content)
    png(tmp_path / "scan0001")  # no extension, image content: taken
    (tmp_path / "notes.txt").write_text("hello")  # not an image: ignored
    (tmp_path / "README").write_text("hello")  # no extension, not an image: ignored
    (tmp_path / "fake.jpg").write_text("text")  # named like an image: taken (fails when read)
    png(tmp_path / ".hidden.png")  # hidden: left out
    png(tmp_path / ".a.png.0123abcd.restoring.tmp")  # our temp file: left out
    png(tmp_path / "sub" / "c.png")
    os.mkfifo(tmp_path / "pipe.png")  # reading a FIFO would block: left out
    found = discover(tmp_path)
    assert [s.relative.as_posix() for s in found.sources] == ["B.JPG", "a.png", "fake.jpg", "scan0001"]
    assert sorted(Path(p).name for p in found.ignored) == ["README", "notes.txt"]
    deep = discover(tmp_path, recursive=True)
    assert "sub/c.png" in [s.relative.as_posix() for s in deep.sources]


def test_glob_matches_names_or_relative_paths_case_insensitively(tmp_path):
    for name in ["a.jpg", "b.JPG", "c.png", "x/d.jpg", "y/e.jpg"]:
        png(tmp_path / name)
    names = lambda found: [s.relative.as_posix() for s in found.sources]  # noqa: E731
    assert names(discover(tmp_path, pattern="*.jpg")) == ["a.jpg", "b.JPG"]
    assert names(discover(tmp_path, pattern="*.jpg", recursive=True)) == ["a.jpg", "b.JPG", "x/d.jpg", "y/e.jpg"]
    assert names(discover(tmp_path, pattern="x/*", recursive=True)) == ["x/d.jpg"]


def test_default_output_dir_is_beside_the_folder(tmp_path, monkeypatch):
    assert default_output_dir("scans/") == Path("scans_restored")
    assert default_output_dir(tmp_path / "a" / "scans") == tmp_path / "a" / "scans_restored"
    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path / "photos")
    assert default_output_dir(".") == tmp_path / "photos_restored"


def test_plan_skips_existing_outputs_and_names_shared_stems(tmp_path):
    sources = [Source(str(tmp_path / n), Path(n)) for n in ["a.png", "a.gif", "b.png", "c.png"]]
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_restored.png").write_bytes(b"done before")
    entries = plan_batch(sources, out, fmt="png")
    assert isinstance(entries[0], Job) and entries[0].output == str(out / "a_png_restored.png")
    assert isinstance(entries[1], Job) and entries[1].output == str(out / "a_gif_restored.png")
    assert entries[2].status == "skipped" and entries[2].output == str(out / "b_restored.png")
    assert isinstance(entries[3], Job)
    assert isinstance(plan_batch(sources, out, fmt="png", overwrite=True)[2], Job)
    # the same names whatever the order of the sources
    assert {e.input: e.output for e in plan_batch(sources[::-1], out, fmt="png")} == {e.input: e.output for e in entries}
    # an output that would be an input is refused, even with overwrite
    same = plan_batch([Source(str(tmp_path / "a.png"), Path("a.png"))], tmp_path, suffix="", overwrite=True)
    assert same[0].status == "failed" and "is an input" in same[0].error


def test_read_list_from_file_and_stdin(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.png\r\n\n  \nsub/b.png\na.png\n")
    assert read_list(listing) == ["a.png", "sub/b.png"]
    import io

    assert read_list("-", stdin=io.BytesIO(b"x.png\ny.png")) == ["x.png", "y.png"]


# -- the batch through the CLI -------------------------------------------------------------------------


def test_thirty_images_with_broken_ones(tmp_path, capsys, fake):
    """25 good images and 5 broken ones of different kinds: every good one restored, every bad one
    reported with its reason (stderr line, JSON line, summary), exit 1, nothing else written."""
    src = tmp_path / "scans"
    good = make_images(src, 25)
    broken = {
        "empty.png": "empty file (0 bytes)",
        "truncated.png": "truncated or corrupt PNG data",
        "text.jpg": "not an image (unknown format)",
        "bomb.png": "it could be a decompression bomb",
    }
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.png").write_bytes(good[0].read_bytes()[:-40])
    (src / "text.jpg").write_text("this is not a picture\n")
    bomb_png(src / "bomb.png")
    locked = None
    if permissions_enforced(tmp_path):
        locked = png(src / "locked.png")
        locked.chmod(0)
        broken["locked.png"] = "permission denied"
    else:
        (src / "zero.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # root: a fifth kind, a bare signature
        broken["zero.png"] = "unreadable PNG file"
    (src / "notes.txt").write_text("ignored, not reported")
    try:
        code, out, err = run(["batch", src, "--json", "--upscale", "2"], capsys)
    finally:
        if locked is not None:
            locked.chmod(0o644)
    assert code == 1
    outdir = tmp_path / "scans_restored"
    assert all_files(outdir) == sorted(f"{p.stem}_restored.png" for p in good)
    for path in good:
        restored = np.asarray(Image.open(outdir / f"{path.stem}_restored.png"))
        assert restored.shape == (16, 24, 3)
        expected = 255 - np.asarray(Image.open(path)).repeat(2, axis=0).repeat(2, axis=1)
        assert np.abs(restored.astype(int) - expected).max() <= 1
    records = json_lines(out)
    summary = records.pop()
    assert summary["summary"] is True and (summary["ok"], summary["skipped"], summary["failed"]) == (25, 0, 5)
    by_name = {Path(r["input"]).name: r for r in records}
    assert len(records) == 30 and "notes.txt" not in by_name
    for name, reason in broken.items():
        record = by_name[name]
        assert record["status"] == "failed" and reason in record["error"], record
        assert f"error: {src / name}: " in err and reason in err
    assert all(by_name[p.name]["status"] == "ok" and by_name[p.name]["width"] == 24 for p in good)
    assert "done: 25 restored, 0 skipped, 5 failed" in err
    assert err.count("error: ") == 5
    assert temp_files(tmp_path) == []
    assert all_files(src) == sorted([p.name for p in good] + list(broken) + ["notes.txt"])  # DIR untouched


def test_rerun_skips_finished_outputs_and_overwrite_redoes_them(tmp_path, capsys, fake):
    src = tmp_path / "in"
    make_images(src, 3)
    out = tmp_path / "out"
    assert run(["batch", src, "-o", out], capsys)[0] == 0
    assert len(fake) == 1 and len(fake[0].calls) == 3
    (out / "img01_restored.png").unlink()
    stamp = (out / "img00_restored.png").stat().st_mtime_ns
    code, stdout, err = run(["batch", src, "-o", out, "--json"], capsys)
    assert code == 0 and "1 to restore, 2 already done" in err
    assert [r["status"] for r in json_lines(stdout)[:-1]] == ["skipped", "ok", "skipped"]
    assert fake[1].calls == [str(src / "img01.png")]
    assert (out / "img00_restored.png").stat().st_mtime_ns == stamp
    code, stdout, _ = run(["batch", src, "-o", out, "--json", "--overwrite"], capsys)
    assert code == 0 and [r["status"] for r in json_lines(stdout)[:-1]] == ["ok"] * 3
    # everything done: the models are not even loaded
    code, _, err = run(["batch", src, "-o", out], capsys)
    assert code == 0 and len(fake) == 3 and "done: 0 restored, 3 skipped, 0 failed" in err


def test_recursive_keeps_the_folder_structure(tmp_path, capsys, fake):
    src = tmp_path / "album"
    for rel in ["a.png", "2019/b.png", "2019/summer/c.jpg", "2020/d.tif"]:
        png(src / rel)
    out = tmp_path / "out"
    code, _, _ = run(["batch", src, "-o", out, "-r", "--upscale", "1"], capsys)
    assert code == 0
    assert all_files(out) == ["2019/b_restored.png", "2019/summer/c_restored.jpg", "2020/d_restored.tif", "a_restored.png"]
    assert Image.open(out / "2019/summer/c_restored.jpg").format == "JPEG"
    code, _, _ = run(["batch", src, "-o", tmp_path / "flat", "--upscale", "1"], capsys)
    assert all_files(tmp_path / "flat") == ["a_restored.png"]


def test_guidance_maps_mirror_the_output_folders(tmp_path, capsys, fake):
    src = tmp_path / "album"
    inputs = {rel: png(src / rel, seed=k) for k, rel in enumerate(["a.png", "2019/b.jpg"])}
    out, maps = tmp_path / "out", tmp_path / "maps"
    code, _, err = run(["batch", src, "-o", out, "-r", "--upscale", "2", "--guidance", "0.5", "--save-guidance-map", maps], capsys)
    assert code == 0, err
    assert all_files(maps) == ["2019/b_guidance.png", "a_guidance.png"]
    for rel, name in (("a.png", "a_guidance.png"), ("2019/b.jpg", "2019/b_guidance.png")):
        # the fake's map is its output's first channel: 255 - red, 2x nearest; written as rounded 8-bit gray
        red = np.asarray(Image.open(inputs[rel]).convert("RGB"))[..., 0].repeat(2, 0).repeat(2, 1)
        with Image.open(maps / name) as im:
            assert im.mode == "L" and im.size == (24, 16)
            np.testing.assert_array_equal(np.asarray(im), 255 - red)
    # a rerun skips the images, so it writes no maps and touches none
    before = {name: (maps / name).stat().st_mtime_ns for name in all_files(maps)}
    assert run(["batch", src, "-o", out, "-r", "--guidance", "0.5", "--save-guidance-map", maps], capsys)[0] == 0
    assert {name: (maps / name).stat().st_mtime_ns for name in all_files(maps)} == before

    code, _, err = run(["batch", src, "-o", tmp_path / "o2", "--stage1-only", "--save-guidance-map", maps], capsys)
    assert code == 2 and "needs stage 2" in err
    clash = tmp_path / "clash"
    png(clash / "x.png"), png(clash / "x_guidance.png")  # x.png's plain map name is the input x_guidance.png
    code, _, err = run(["batch", clash, "-o", tmp_path / "o3", "--upscale", "1", "--save-guidance-map", clash], capsys)
    assert code == 0, err
    assert all_files(clash) == ["x.png", "x_guidance.png", "x_guidance_guidance.png", "x_png_guidance.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(clash / "x_png_guidance.png")),
                                  255 - np.asarray(Image.open(clash / "x.png"))[..., 0])
    code, _, err = run(["batch", src, "-o", tmp_path / "o4", "--save-guidance-map", src / "a.png"], capsys)
    assert code == 2 and "not a folder" in err


# -- inputs that share a name --------------------------------------------------------------------------


def test_every_input_is_restored_when_stems_collide(tmp_path, capsys, fake):
    """Same picture in several formats, names differing only in case, an extensionless scan beside its
    PNG, and an input named like another's output: every one restored in one run, to the README's names,
    each output from its own input; the JSON lines name those files; a rerun finds the same names."""
    src = tmp_path / "photos"
    expected = {
        "IMG_0001.jpg": "IMG_0001_jpg_restored.jpg", "IMG_0001.tif": "IMG_0001_tif_restored.tif",
        "logo.gif": "logo_gif_restored.png", "logo.png": "logo_png_restored.png",
        "scan0001": "scan0001_restored.png", "scan0001.png": "scan0001_png_restored.png",
        "x.png": "x_restored.png", "x_restored.png": "x_restored_restored.png", "plain.jpg": "plain_restored.jpg",
    }
    if case_sensitive(src):
        expected.update({"a.PNG": "a_PNG-1_restored.PNG", "a.png": "a_png-2_restored.png"})
    for seed, name in enumerate(expected):
        image(src / name, seed)
    code, out, err = run(["batch", src, "--json", "--upscale", "1"], capsys)
    assert code == 0, err
    outdir = tmp_path / "photos_restored"
    assert all_files(outdir) == sorted(expected.values())
    records = json_lines(out)
    assert records[-1]["ok"] == len(expected)
    assert {Path(r["input"]).name: r["output"] for r in records[:-1]} == {
        name: str(outdir / output) for name, output in expected.items()}
    for name, output in expected.items():
        assert_restored_from(outdir / output, src / name)
    renamed = len(expected) - 4  # all but scan0001, x.png, x_restored.png and plain.jpg
    assert f"{renamed} share a name with another, so their outputs carry the source extension" in err
    assert f"{renamed} outputs named with the source extension" in err
    code, _, err = run(["batch", src], capsys)
    assert code == 0 and f"done: 0 restored, {len(expected)} skipped, 0 failed" in err


def test_shared_stems_in_subfolders_and_their_guidance_maps(tmp_path, capsys, fake):
    """With -r the rule works per output folder; folders whose names differ only in case (one folder on
    a case-insensitive output drive) count as one; guidance maps carry the same names."""
    src = tmp_path / "album"
    expected = {"2019/a.jpg": "2019/a_jpg_restored.jpg", "2019/a.png": "2019/a_png_restored.png",
                "2020/a.jpg": "2020/a_restored.jpg", "a.gif": "a_restored.png"}
    if case_sensitive(src):
        expected.update({"Trip/b.png": "Trip/b_png-1_restored.png", "trip/b.png": "trip/b_png-2_restored.png"})
    for seed, rel in enumerate(expected):
        image(src / rel, seed)
    out, maps = tmp_path / "out", tmp_path / "maps"
    code, _, err = run(["batch", src, "-o", out, "-r", "--upscale", "1", "--guidance", "0.5", "--save-guidance-map", maps], capsys)
    assert code == 0, err
    assert all_files(out) == sorted(expected.values())
    assert all_files(maps) == sorted(v.replace("_restored.jpg", "_guidance.png").replace("_restored.png", "_guidance.png")
                                     for v in expected.values())
    for rel, output in expected.items():
        assert_restored_from(out / output, src / rel)


def test_from_list_finds_the_names_of_the_folder_run(tmp_path, capsys, fake, monkeypatch):
    """The same files listed in another order, as relative paths, get the names of the folder run, so a
    list can resume a folder run; same-named files from outside DIR meet in OUTDIR and are numbered."""
    src = tmp_path / "photos"
    for seed, name in enumerate(["p.jpg", "p.tif", "q.png", "sub/q.png", "sub/q.gif"]):
        image(src / name, seed)
    code, out, _ = run(["batch", src, "-r", "-o", tmp_path / "scan", "--json", "--upscale", "1"], capsys)
    assert code == 0
    by_scan = {Path(r["input"]).relative_to(src).as_posix(): Path(r["output"]).relative_to(tmp_path / "scan").as_posix()
               for r in json_lines(out)[:-1]}
    assert by_scan == {"p.jpg": "p_jpg_restored.jpg", "p.tif": "p_tif_restored.tif", "q.png": "q_restored.png",
                       "sub/q.gif": "sub/q_gif_restored.png", "sub/q.png": "sub/q_png_restored.png"}
    monkeypatch.chdir(src)
    (tmp_path / "list.txt").write_text("sub/q.png\np.tif\nq.png\nsub/q.gif\np.jpg\n")
    code, out, _ = run(["batch", src, "--from-list", tmp_path / "list.txt", "-o", tmp_path / "scan", "--json", "--upscale", "1"], capsys)
    assert code == 0 and [r["status"] for r in json_lines(out)[:-1]] == ["skipped"] * 5
    assert {r["input"]: Path(r["output"]).relative_to(tmp_path / "scan").as_posix() for r in json_lines(out)[:-1]} == by_scan

    for seed, name in enumerate(["x/a.png", "y/a.png"]):
        image(tmp_path / "elsewhere" / name, 10 + seed)
    (tmp_path / "list2.txt").write_text(f"{tmp_path / 'elsewhere/y/a.png'}\n{tmp_path / 'elsewhere/x/a.png'}\n")
    code, _, err = run(["batch", "--from-list", tmp_path / "list2.txt", "-o", tmp_path / "flat", "--upscale", "1"], capsys)
    assert code == 0, err
    assert all_files(tmp_path / "flat") == ["a_png-1_restored.png", "a_png-2_restored.png"]
    assert_restored_from(tmp_path / "flat" / "a_png-1_restored.png", tmp_path / "elsewhere/x/a.png")


def test_into_the_input_folder_tagged_outputs_are_not_taken_for_inputs(tmp_path, capsys, fake):
    src = tmp_path / "in"
    image(src / "a.jpg", 1), image(src / "a.png", 2)
    assert run(["batch", src, "-o", src], capsys)[0] == 0
    assert all_files(src) == ["a.jpg", "a.png", "a_jpg_restored.jpg", "a_png_restored.png"]
    code, _, err = run(["batch", src, "-o", src], capsys)
    assert code == 0 and "2 images" in err and "0 restored, 2 skipped" in err


def test_links_to_one_file_are_restored_once(tmp_path, capsys, fake):
    src = tmp_path / "in"
    image(src / "photo.png", 1)
    os.link(src / "photo.png", src / "copy.png")
    os.symlink("photo.png", src / "latest.png")
    code, out, err = run(["batch", src, "--json"], capsys)
    assert code == 1
    assert {Path(r["input"]).name: r["status"] for r in json_lines(out)[:-1]} == {
        "copy.png": "ok", "latest.png": "failed", "photo.png": "failed"}
    assert f"error: {src / 'photo.png'}: the same file as {src / 'copy.png'} (a link); it is restored once" in err
    assert all_files(tmp_path / "in_restored") == ["copy_restored.png"]


def test_ctrl_c_then_rerun_with_shared_stems_skips_exactly_the_finished(tmp_path, capsys, fake):
    """Interrupted, then resumed: the rerun names every input as the first run did, skips exactly the
    outputs the first run finished and restores the rest, ending with the uninterrupted run's files."""
    src = tmp_path / "in"
    for i in range(6):
        image(src / f"img{i}.png", 2 * i), image(src / f"img{i}.jpg", 2 * i + 1)
    reference = tmp_path / "reference"
    assert run(["batch", src, "-o", reference], capsys)[0] == 0
    assert len(all_files(reference)) == 12 and "img0_jpg_restored.jpg" in all_files(reference)

    out = tmp_path / "out"
    proc = subprocess.Popen([*FAKE_RESTORE, "batch", str(src), "-o", str(out), "--json"], env=fake_env(FAKE_DELAY=0.4),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(out.glob("*_restored.*"))) >= 2, 120, "the first outputs")
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    first = json_lines(stdout)[:-1]
    finished = {r["output"] for r in first if r["status"] == "ok"}
    assert 2 <= len(finished) < 12 and sorted(Path(p).name for p in finished) == all_files(out)

    rerun = subprocess.run([*FAKE_RESTORE, "batch", str(src), "-o", str(out), "--json"], env=fake_env(),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    second = json_lines(rerun.stdout)[:-1]
    assert {r["output"] for r in second if r["status"] == "skipped"} == finished
    assert {r["output"] for r in second if r["status"] == "ok"} == {str(out / n) for n in all_files(reference)} - finished
    assert all_files(out) == all_files(reference)
    for name in all_files(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_glob_and_format_and_suffix(tmp_path, capsys, fake):
    src = tmp_path / "in"
    png(src / "a.png")
    png(src / "b.PNG")
    png(src / "c.jpg")
    code, _, _ = run(["batch", src, "--glob", "*.png", "--format", "webp", "--suffix", "_x", "--upscale", "1"], capsys)
    assert code == 0
    assert all_files(tmp_path / "in_restored") == ["a_x.webp", "b_x.webp"]


def test_from_list_file_and_stdin(tmp_path, capsys, fake, monkeypatch):
    src = tmp_path / "photos"
    png(src / "a.png")
    png(src / "sub" / "b.png")
    png(tmp_path / "elsewhere.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src / 'a.png'}\n{src / 'sub' / 'b.png'}\n{tmp_path / 'elsewhere.png'}\n{tmp_path / 'gone.png'}\n")
    code, out, err = run(["batch", src, "--from-list", listing, "--upscale", "1"], capsys)
    assert code == 1 and "gone.png: no such file" in err
    # inside DIR: the relative folder is kept; outside: straight into OUTDIR
    assert all_files(tmp_path / "photos_restored") == ["a_restored.png", "elsewhere_restored.png", "sub/b_restored.png"]

    import io

    monkeypatch.chdir(src)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a.png\nsub/b.png\n")))
    code, out, _ = run(["batch", "--from-list", "-", "-o", tmp_path / "fromstdin", "--json", "--upscale", "1"], capsys)
    assert code == 0
    assert all_files(tmp_path / "fromstdin") == ["a_restored.png", "b_restored.png"]
    assert [r["input"] for r in json_lines(out)[:-1]] == ["a.png", "sub/b.png"]


def test_output_folder_equal_to_input_folder_only_when_asked(tmp_path, capsys, fake):
    src = tmp_path / "in"
    make_images(src, 2)
    code, _, _ = run(["batch", src, "-o", src, "--upscale", "1"], capsys)
    assert code == 0
    assert all_files(src) == ["img00.png", "img00_restored.png", "img01.png", "img01_restored.png"]
    # a rerun does not take our outputs for inputs (no img00_restored_restored.png)
    code, _, err = run(["batch", src, "-o", src, "--upscale", "1"], capsys)
    assert code == 0 and "2 images" in err and len(all_files(src)) == 4
    # an empty suffix would overwrite the inputs: refused per file, inputs untouched
    before = {p: (src / p).read_bytes() for p in all_files(src)}
    code, _, err = run(["batch", src, "-o", src, "--suffix", "", "--overwrite"], capsys)
    assert code == 1 and "is an input; refusing to overwrite it" in err
    assert {p: (src / p).read_bytes() for p in all_files(src)} == before


def test_output_folder_inside_the_input_folder_is_not_an_input(tmp_path, capsys, fake):
    src = tmp_path / "in"
    make_images(src, 2)
    assert run(["batch", src, "-o", src / "restored", "-r", "--upscale", "1"], capsys)[0] == 0
    code, _, err = run(["batch", src, "-o", src / "restored", "-r", "--upscale", "1"], capsys)
    assert code == 0 and "2 images" in err and "2 skipped" in err


def test_stale_temp_files_are_removed_at_start(tmp_path, capsys, fake):
    src = tmp_path / "in"
    make_images(src, 1)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".img00_restored.png.0123abcd.restoring.tmp"
    stale.write_bytes(b"half an image")
    assert run(["batch", src, "-o", out], capsys)[0] == 0
    assert all_files(out) == ["img00_restored.png"]


def test_a_file_that_vanishes_mid_run_is_reported(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    make_images(src, 4)

    def delete_the_last(source):
        (src / "img03.png").unlink(missing_ok=True)

    _fake_pipeline.install(monkeypatch, on_call=delete_the_last, delay=0)
    code, out, err = run(["batch", src, "--json", "--no-io-overlap"], capsys)
    assert code == 1
    assert f"error: {src / 'img03.png'}: no such file" in err
    assert [r["status"] for r in json_lines(out)[:-1]] == ["ok", "ok", "ok", "failed"]


def test_out_of_memory_is_that_files_failure(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    make_images(src, 2)
    png(src / "big.png", size=(40, 30))
    _fake_pipeline.install(monkeypatch, oom="big", delay=0)
    code, out, err = run(["batch", src, "--json"], capsys)
    assert code == 1
    assert f"error: {src / 'big.png'}: too large for the available memory even tiled (40 x 30" in err
    assert [r["status"] for r in json_lines(out)[:-1]] == ["failed", "ok", "ok"]
    assert all_files(tmp_path / "in_restored") == ["img00_restored.png", "img01_restored.png"]


def test_json_lines_match_the_files_written(tmp_path, capsys, fake):
    src = tmp_path / "in"
    make_images(src, 3)
    (src / "bad.png").write_text("no")
    code, out, err = run(["batch", src, "--json", "--seed", "7"], capsys)
    assert code == 1
    records = json_lines(out)  # every stdout line is JSON
    assert records[-1] == {**records[-1], "summary": True, "ok": 3, "skipped": 0, "failed": 1, "interrupted": False}
    for record in records[:-1]:
        assert set(record) == {"input", "output", "status", "error", "seconds", "width", "height", "seed", "caption", "prompt"}
        if record["status"] == "ok":
            with Image.open(record["output"]) as im:
                assert im.size == (record["width"], record["height"]) == (48, 32)
            assert record["seed"] == 7 and record["error"] is None and record["seconds"] >= 0
        else:
            assert record["error"].startswith(f"{src / 'bad.png'}: ") and not Path(record["output"]).exists()


def test_json_lines_keep_file_names_that_are_not_utf8(tmp_path, capsys, fake):
    """A Latin-1 file name (byte 0xE9) is written as a \\udce9 escape: valid JSON, and the path it
    decodes to opens the file."""
    src = tmp_path / "in"
    png(src / os.fsdecode(b"caf\xe9.png"))
    code, out, _ = run(["batch", src, "--json"], capsys)
    record = json.loads(out.splitlines()[0])
    assert code == 0 and "\\udce9" in out.splitlines()[0]
    assert os.fsencode(record["input"]).endswith(b"caf\xe9.png") and Path(record["output"]).is_file()


def test_usage_errors(tmp_path, capsys, fake):
    png(tmp_path / "one.png")
    cases = [
        (["batch", tmp_path / "missing"], "no such folder"),
        (["batch", tmp_path / "one.png"], "is not a folder; use `restore"),
        (["batch", tmp_path, "-o", "-"], "for a pipe use `restore - -o -`"),
        (["batch", "--from-list", tmp_path / "list.txt"], "needs -o OUTDIR"),
        (["batch"], "give a folder"),
        (["batch", tmp_path, "--format", "gif"], "`--format` must be"),
    ]
    for argv, fragment in cases:
        code, out, err = run(argv, capsys)
        assert code == 2 and fragment in err and out == "", (argv, err)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys, fake):
    fcntl = pytest.importorskip("fcntl")
    src = tmp_path / "in"
    make_images(src, 1)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run(["batch", src, "-o", out], capsys)
    finally:
        os.close(fd)
    assert code == 2 and "another `restore batch` is writing into this folder" in err
    assert all_files(out) == []


# -- the loop as a library -------------------------------------------------------------------------------


def test_overlap_gives_the_same_results_in_the_same_order(tmp_path):
    """Reads and writes in threads finish in any order; results are reported in input order, and the
    files are the same bytes as without overlap."""
    src = tmp_path / "in"
    paths = [png(src / f"{i}.png", size=(8 + 7 * (i % 3), 8), seed=i) for i in range(8)]
    (src / "x.png").write_text("bad")
    paths.insert(3, src / "x.png")
    opts = RestoreSettings(upscale=2.0)
    outputs = {}
    for overlap in (True, False):
        out = tmp_path / f"out{overlap}"
        entries = [Job(str(p), str(out / f"{p.stem}.png")) for p in paths]
        entries.insert(5, FileResult("skipped.png", "s.png", "skipped"))
        seen = []

        class Events(BatchEvents):
            def result(self, index, result):
                seen.append((index, result.input, result.status))

        summary = run_batch(entries, lambda: _fake_pipeline.FakePipeline(delay=0.01), opts, overlap=overlap,
                            events=Events())
        assert [i for i, _, _ in seen] == list(range(len(entries)))
        assert [r.input for r in summary.results] == [e.input for e in entries]
        assert (summary.ok, summary.skipped, len(summary.failures)) == (8, 1, 1)
        outputs[overlap] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert outputs[True] == outputs[False]


# -- signals: kill -9 and Ctrl-C in a real process -------------------------------------------------------


def test_kill_9_then_rerun_completes_the_set_byte_for_byte(tmp_path, capsys, fake):
    src = tmp_path / "in"
    make_images(src, 12)
    reference = tmp_path / "reference"
    assert run(["batch", src, "-o", reference], capsys)[0] == 0  # an uninterrupted run

    out = tmp_path / "out"
    proc = subprocess.Popen([*FAKE_RESTORE, "batch", str(src), "-o", str(out)], env=fake_env(FAKE_DELAY=0.3),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(list(out.glob("*_restored.png"))) >= 3, 120, "the first outputs")
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    finished = all_files(out)
    # only complete outputs (the same bytes as the uninterrupted run's), plus at most temp files
    assert 3 <= len([f for f in finished if not is_temp_file(f)]) < 12
    for name in finished:
        if not is_temp_file(name):
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name

    rerun = subprocess.run([*FAKE_RESTORE, "batch", str(src), "-o", str(out)], env=fake_env(),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stderr
    assert all_files(out) == all_files(reference)  # no temp files left, nothing missing
    for name in all_files(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_prints_the_summary_and_keeps_finished_outputs(tmp_path, signum, code):
    src = tmp_path / "in"
    make_images(src, 12)
    out = tmp_path / "out"
    proc = subprocess.Popen([*FAKE_RESTORE, "batch", str(src), "-o", str(out), "--json"],
                            env=fake_env(FAKE_DELAY=0.4), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(out.glob("*_restored.png"))) >= 2, 120, "the first outputs")
        proc.send_signal(signum)
        stdout, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "interrupted: " in err and "not processed" in err and "run the same command again" in err
    records = json_lines(stdout)
    summary = records[-1]
    assert summary["interrupted"] is True and summary["not_done"] > 0
    written = all_files(out)
    assert temp_files(out) == []  # nothing half-way
    assert sorted(Path(r["output"]).name for r in records[:-1] if r["status"] == "ok") == written
    assert summary["ok"] == len(written) < 12
    for name in written:
        with Image.open(out / name) as im:
            im.load()  # complete files


# -- the real tiny model ---------------------------------------------------------------------------------


def test_real_tiny_model_batch_matches_the_golden_output(tmp_path, capsys, reference_dir):
    """`restore batch` with the reference model (stage 1 only): the four reference inputs restored (one
    checked against the golden stage1_only_x2 result), five broken files of different kinds reported
    one line each without stopping the batch, exit 1, nothing else written."""
    case = next(c for c in json.loads((reference_dir / "cases.json").read_text())["cases"] if c["name"] == "stage1_only_x2")
    src = tmp_path / "in"
    src.mkdir()
    for path in (reference_dir / "inputs").glob("*.png"):
        shutil.copy(path, src / path.name)
    broken = {
        "empty.png": "empty file (0 bytes)",
        "signature_only.png": "unreadable PNG file",
        "text.jpg": "not an image (unknown format)",
        "bomb.png": "it could be a decompression bomb",
        "truncated.png": "truncated or corrupt PNG data",
    }
    (src / "empty.png").write_bytes(b"")
    (src / "signature_only.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (src / "text.jpg").write_text("this is not a picture\n")
    bomb_png(src / "bomb.png")
    (src / "truncated.png").write_bytes((src / "mixed_96x70.png").read_bytes()[:-60])
    args = [a if not a.endswith(".json") else str(reference_dir / a) for a in case["args"]]
    code, out, err = run(["batch", src, "-o", tmp_path / "out", *args], capsys)
    assert code == 1 and out == ""
    for name, reason in broken.items():
        assert f"error: {src / name}: " in err and reason in err, name
    assert err.count("error: ") == len(broken)
    good = sorted(p.name for p in (reference_dir / "inputs").glob("*.png"))
    assert all_files(tmp_path / "out") == sorted(name.replace(".png", "_restored.png") for name in good)
    for name in good:
        with Image.open(src / name) as im, Image.open(tmp_path / "out" / name.replace(".png", "_restored.png")) as res:
            assert res.size == (im.width * 2, im.height * 2)
    actual = np.asarray(Image.open(tmp_path / "out" / "noisy_61x40_restored.png").convert("RGB")).astype(int)
    expected = np.asarray(Image.open(reference_dir / case["expected"]).convert("RGB")).astype(int)
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= case["tolerance"]["max_diff"]
