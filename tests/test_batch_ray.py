"""`restore batch --ray` on a local Ray cluster that this module starts once (2 CPUs, shared by its tests).

The tiny reference model checks that the Ray pipeline writes what the local batch writes and that a
rerun schedules nothing that is done; the stand-in pipeline (its loader pickles, and PYTHONPATH
reaches the Ray workers) has an actor killed mid-run. Skipped only where Ray is not installed
(`pip install -e '.[test]'` installs it); `pytest -m 'not ray'` leaves these out of the inner loop.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from test_batch import BROKEN_FILES as BROKEN
from test_batch import reference_inputs_and_broken_files
from test_batch import all_files, fake, json_lines, make_images, run, temp_files  # noqa: F401 (fake: a fixture)

ray = pytest.importorskip("ray", reason="Ray is not installed (the test extra installs it: pip install -e '.[test]')")
pytestmark = pytest.mark.ray

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A 2-CPU local Ray for the module; FAKE_* knobs reach the actors through the runtime env."""
    import logging

    pids = tmp_path_factory.mktemp("actor-pids")
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "FAKE_DELAY": "0.3", "FAKE_PIDS": str(pids), "RESTORE_HOME": os.environ["RESTORE_HOME"]}
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": env})
    yield pids
    ray.shutdown()


def test_ray_writes_what_the_local_batch_writes_and_a_rerun_skips_it(tmp_path, capsys, reference_dir, one_thread,
                                                                     local_ray):
    src = tmp_path / "in"
    reference_inputs_and_broken_files(src, reference_dir)
    flags = ["--model", reference_dir / "model_v.json", "--stage1-only", "--upscale", "2"]
    code, _, err = run(["batch", src, "-o", tmp_path / "local", *flags, "--device", "cpu"], capsys)
    assert code == 1, err
    code, out, err = run(["batch", src, "-o", tmp_path / "ray", *flags, "--ray", "--ray-workers", "1", "--json"], capsys)
    assert code == 1, err
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert all_files(local) == all_files(remote) and len(all_files(remote)) == 4
    for name in all_files(local):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    for name in BROKEN:
        assert err.count(f"error: {src / name}: ") == 1, err
    records = json_lines(out)
    assert sorted(Path(r["input"]).name for r in records[:-1]) == sorted(p.name for p in src.iterdir())
    assert all(r["device"].endswith("/cpu") for r in records[:-1])
    assert (records[-1]["ok"], records[-1]["failed"], records[-1]["not_done"]) == (4, len(BROKEN), 0)

    stamps = {p: p.stat().st_mtime_ns for p in remote.iterdir()}
    code, out, err = run(["batch", src, "-o", remote, *flags, "--ray", "--json"], capsys)
    assert code == 1, err  # the broken files fail again; nothing else is scheduled
    assert f"{len(BROKEN)} to restore, 4 already done" in err
    assert {p: p.stat().st_mtime_ns for p in remote.iterdir()} == stamps
    assert sorted(r["status"] for r in json_lines(out)[:-1]) == ["failed"] * len(BROKEN) + ["skipped"] * 4


def test_file_urls_go_through_pyarrow_and_resume(tmp_path, capsys, fake, local_ray):
    src = tmp_path / "in"
    make_images(src, 3)
    url = (tmp_path / "out").as_uri()
    code, out, err = run(["batch", src.as_uri(), "-o", url, "--ray", "--ray-workers", "1", "--json"], capsys)
    assert code == 0, err
    assert all_files(tmp_path / "out") == ["img00_restored.png", "img01_restored.png", "img02_restored.png"]
    assert {r["output"] for r in json_lines(out)[:-1]} == {f"{url}/img0{i}_restored.png" for i in range(3)}
    code, out, err = run(["batch", src.as_uri(), "-o", url, "--ray"], capsys)
    assert code == 0 and "0 to restore, 3 already done" in err


def test_an_actor_killed_mid_run_is_replaced_and_the_run_completes(tmp_path, capsys, fake, local_ray):
    src = tmp_path / "in"
    make_images(src, 10)
    reference = tmp_path / "reference"
    assert run(["batch", src, "-o", reference], capsys)[0] == 0
    out = tmp_path / "out"
    me = os.getpid()
    for stale in local_ray.iterdir():  # actors of earlier tests' runs
        stale.unlink()
    killed: list[tuple[int, str]] = []

    def kill_an_actor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            actors = [p for p in local_ray.iterdir() if int(p.name) != me]
            if actors and len(list(out.glob("*_restored.png"))) >= 2:
                victim = actors[0]
                killed.append((int(victim.name), victim.read_text().splitlines()[-1]))
                os.kill(int(victim.name), signal.SIGKILL)
                victim.unlink()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor, daemon=True)
    killer.start()
    code, stdout, err = run(["batch", src, "-o", out, "--ray", "--ray-workers", "1", "--json"], capsys)
    killer.join(5)
    assert killed, "no actor was killed"
    assert code == 0, err
    records = json_lines(stdout)
    assert sorted(r["input"] for r in records[:-1]) == sorted(str(p) for p in src.iterdir())  # each once
    assert records[-1]["ok"] == 10
    assert all_files(out) == all_files(reference)
    for name in all_files(reference):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    survivors = [int(p.name) for p in local_ray.iterdir() if int(p.name) != me]
    assert survivors and killed[0][0] not in survivors  # a new actor finished the run


def test_ctrl_c_keeps_what_is_written_reports_it_and_a_rerun_completes(tmp_path, capsys, fake, local_ray):
    import _thread

    src = tmp_path / "in"
    make_images(src, 8)
    out = tmp_path / "out"

    def ctrl_c():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("*_restored.png"))) < 2:
            time.sleep(0.05)
        _thread.interrupt_main()  # KeyboardInterrupt in the main thread, as Ctrl-C gives

    threading.Thread(target=ctrl_c, daemon=True).start()
    code, stdout, err = run(["batch", src, "-o", out, "--ray", "--ray-workers", "1", "--json"], capsys)
    assert code == 130, err
    assert "interrupted: " in err and "run the same command again" in err
    records = json_lines(stdout)
    assert records[-1]["interrupted"] is True and records[-1]["not_done"] > 0
    assert temp_files(out) == []  # the writes cut off left nothing half-way
    written = all_files(out)
    assert sorted(Path(r["output"]).name for r in records[:-1] if r["status"] == "ok") == written
    code, stdout, err = run(["batch", src, "-o", out, "--ray", "--ray-workers", "1", "--json"], capsys)
    assert code == 0, err
    assert f"{8 - len(written)} to restore, {len(written)} already done" in err
    assert len(all_files(out)) == 8
