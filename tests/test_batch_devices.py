"""`restore batch --devices cpu,cpu`: one worker process per device, with the guarantees of one process.

The tiny reference model checks that the workers write the same bytes as one process; the stand-in
pipeline of `_fake_pipeline.py` (in worker processes too: its loader pickles) drives the signal
tests, where a real `restore` process is interrupted or has a worker killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from restorecli.errors import UsageError
from restorecli.images import is_temp_file
from restorecli.run.workers import parse_devices
from test_batch import (  # noqa: F401 (fake: a fixture)
    BROKEN_FILES as BROKEN,
    FAKE_RESTORE,
    all_files,
    fake,
    fake_env,
    json_lines,
    make_images,
    run,
    temp_files,
    wait_for,
    reference_inputs_and_broken_files,
    write_broken_files,
)


def folder_with_bad_files(src: Path, good: int) -> list[Path]:
    images = make_images(src, good)
    write_broken_files(src)
    return images


def same_bytes(a: Path, b: Path) -> None:
    assert all_files(a) == all_files(b)
    for name in all_files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_parse_devices():
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices(" cuda:0, cuda:1 ") == ["cuda:0", "cuda:1"]
    for bad in ("", "cpu,", "gpu0", "auto", "cuda:x"):
        with pytest.raises(UsageError, match="--devices"):
            parse_devices(bad)
    import torch

    if torch.cuda.is_available():
        assert parse_devices("all") == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        with pytest.raises(UsageError, match="no CUDA device found"):
            parse_devices("all")


def test_devices_and_device_are_one_or_the_other(tmp_path, capsys):
    make_images(tmp_path / "in", 1)
    code, _, err = run(["batch", tmp_path / "in", "--devices", "cpu,cpu", "--device", "cpu"], capsys)
    assert code == 2 and "give one of them" in err


def test_two_cpu_workers_write_what_one_process_writes(tmp_path, capsys, reference_dir, one_thread):
    """The tiny reference model (stage 1 only) in two workers: the same bytes as one process (one torch
    thread each, as the workers have on this 2-core runner), every bad file reported once, a JSON line
    per file with its device."""
    src = tmp_path / "in"
    reference_inputs_and_broken_files(src, reference_dir)
    flags = ["--model", reference_dir / "model_v.json", "--stage1-only", "--upscale", "2", "--device", "cpu"]
    code, _, err = run(["batch", src, "-o", tmp_path / "one", *flags], capsys)
    assert code == 1, err
    flags = flags[:-2]  # --devices instead of --device
    code, out, err = run(["batch", src, "-o", tmp_path / "two", *flags, "--devices", "cpu,cpu", "--json"], capsys)
    assert code == 1, err
    same_bytes(tmp_path / "one", tmp_path / "two")
    assert len(all_files(tmp_path / "two")) == 4
    for name in BROKEN:
        assert err.count(f"error: {src / name}: ") == 1, err
    records = json_lines(out)
    assert sorted(Path(r["input"]).name for r in records[:-1]) == sorted(p.name for p in src.iterdir())
    assert {r["device"] for r in records[:-1]} == {"cpu"} and {r["worker"] for r in records[:-1]} <= {0, 1}
    assert records[-1] == {**records[-1], "summary": True, "ok": 4, "failed": 3, "not_done": 0, "interrupted": False}


def worker_pids(pid_dir: Path, parent: int) -> list[int]:
    return [int(p.name) for p in pid_dir.iterdir() if int(p.name) != parent]


def test_kill_9_of_a_worker_requeues_its_file_and_the_run_completes(tmp_path, capsys, fake):
    """A worker killed from outside: its file goes back to the queue, a new worker takes its place, the
    file is restored once. A file that kills every worker restoring it (FAKE_CRASH) fails after one
    retry. Everything else is restored, byte for byte as one process does, and reported once."""
    src = tmp_path / "in"
    folder_with_bad_files(src, 7)
    reference = tmp_path / "reference"
    assert run(["batch", src, "-o", reference], capsys)[0] == 1  # one process, uninterrupted, no crash

    out, pids = tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([*FAKE_RESTORE, "batch", str(src), "-o", str(out), "--devices", "cpu,cpu", "--json"],
                            env=fake_env(FAKE_DELAY=0.5, FAKE_PIDS=pids, FAKE_CRASH="img05"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def restoring() -> dict[int, str]:  # worker pid -> the file it is on (not the crashing one)
        current = {pid: (pids / str(pid)).read_text().splitlines()[-1] for pid in worker_pids(pids, proc.pid)}
        return {pid: name for pid, name in current.items() if "img05" not in name}

    try:
        wait_for(lambda: len(list(out.glob("*_restored.png"))) >= 2 and restoring(), 120, "the first outputs")
        victim, on = next(iter(restoring().items()))
        os.kill(victim, signal.SIGKILL)
        stdout, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err  # the bad files and the crashing one
    # the victim was on `on` when picked; it may have finished that file (written and reported it) in
    # the moment before the signal, and then died between files
    assert (f"died (killed by SIGKILL) while restoring {on}; the file goes back to the queue" in err
            or "died (killed by SIGKILL) between files" in err), err
    crashing = str(src / "img05.png")
    assert err.count(f"died (killed by SIGKILL) while restoring {crashing}") == 2
    assert f"error: {crashing}: the worker on cpu died twice while restoring it (killed by SIGKILL); skipped" in err
    records = json_lines(stdout)
    by_input = {}
    for r in records[:-1]:
        assert r["input"] not in by_input, f"{r['input']} reported twice"
        by_input[r["input"]] = r
    assert sorted(by_input) == sorted(str(p) for p in src.iterdir())
    assert by_input[on]["status"] == "ok" and by_input[crashing]["status"] == "failed"
    assert records[-1]["ok"] == 6 and records[-1]["failed"] == 4
    (reference / "img05_restored.png").unlink()
    same_bytes(reference, out)


def test_ctrl_c_stops_every_worker_and_a_rerun_completes(tmp_path):
    """SIGINT to the `restore` process (the workers ignore SIGINT: the parent stops them with SIGTERM;
    SIGTERM to the parent takes the same path, exit 143, as tests/test_batch.py checks for one process)."""
    signum, code = signal.SIGINT, 130
    src = tmp_path / "in"
    make_images(src, 8)
    out, pids = tmp_path / "out", tmp_path / "pids"
    pids.mkdir()
    argv = [*FAKE_RESTORE, "batch", str(src), "-o", str(out), "--devices", "cpu,cpu", "--json"]
    proc = subprocess.Popen(argv, env=fake_env(FAKE_DELAY=0.3, FAKE_PIDS=pids), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(out.glob("*_restored.png"))) >= 2, 120, "the first outputs")
        proc.send_signal(signum)
        stdout, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "interrupted: " in err and "run the same command again" in err
    for pid in worker_pids(pids, proc.pid):  # every worker has stopped
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    records = json_lines(stdout)
    assert records[-1]["interrupted"] is True and records[-1]["not_done"] > 0
    written = all_files(out)
    assert temp_files(out) == []
    assert sorted(Path(r["output"]).name for r in records[:-1] if r["status"] == "ok") == written
    rerun = subprocess.run(argv, env=fake_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - len(written)} to restore, {len(written)} already done" in rerun.stderr
    assert len(all_files(out)) == 8 and not any(is_temp_file(f) for f in all_files(out))
    assert json.loads(rerun.stdout.splitlines()[-1])["ok"] == 8 - len(written)
