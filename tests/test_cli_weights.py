"""`restore weights list|fetch|verify|path` end to end, in-process, against the fake Hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import time

import pytest
from _fake_hub import COMMIT, closed_port_url, hub, hub_file, payload, sha, url_file, use_registry, weights_env  # noqa: F401

from restorecli import weights
from restorecli.cli.app import main

pytestmark = pytest.mark.usefixtures("weights_env")


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich tables on one line each, for the asserts


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["weights", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", ["list", "fetch", "verify", "path"])
def test_every_command_documents_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "Example" in out and "--weights-dir" in out


def test_list_shows_the_shipped_table(capsys):
    code, out, err = run(capsys, "list")
    assert code == 0 and out == ""
    for text in ("sd_v2.1", "CreativeML Open RAIL++-M", "5.21 GB", "scunet_psnr", "Download per model version", "v2.1 ~6.99 GB"):
        assert text in err


def test_list_table_and_json(capsys, hub):
    use_registry(hub_file(hub, "tiny", payload(1)), url_file(hub, "bsr", payload(2), pin_sha=False))
    assert run(capsys, "fetch", "tiny")[0] == 0
    code, out, err = run(capsys, "list")
    assert code == 0 and out == ""
    rows = {line.split()[1]: line for line in err.splitlines() if line.startswith("│")}
    assert "HF cache" in rows["tiny"] and "yes" in rows["tiny"] and "200 kB" in rows["tiny"]
    assert rows["bsr"].count("-") >= 2  # not present, not verified
    code, out, err = run(capsys, "list", "--json")
    assert code == 0 and err == ""
    objects = {o["name"]: o for o in map(json.loads, out.splitlines())}
    assert objects["tiny"]["present"] and objects["tiny"]["verified"] and objects["tiny"]["location"] == "hf-cache"
    assert objects["tiny"]["sha256"] == sha(payload(1)) and objects["tiny"]["path"].endswith("tiny.pth")
    assert objects["bsr"] | {"present": False, "verified": None, "state": "missing"} == objects["bsr"]


def test_fetch_downloads_verifies_and_summarises(capsys, hub):
    use_registry(hub_file(hub, "tiny", payload(3)), url_file(hub, "bsr", payload(4)))
    code, out, err = run(capsys, "fetch", "tiny", "bsr")
    assert code == 0 and out == ""
    assert "2 of 2 files ready: 2 downloaded (400 kB), 0 already here" in err
    code, out, err = run(capsys, "fetch", "tiny", "bsr")
    assert code == 0 and "2 of 2 files ready: 0 downloaded (0 B), 2 already here" in err
    assert len(hub.gets()) == 2


def test_fetch_a_model_version_and_task(capsys, hub):
    files = [hub_file(hub, n, payload(10 + i, 1000)) for i, n in enumerate(["cl", "cn", "cn_face", "sd", "tok_a", "tok_b"])]
    versions = {"v9": {"sd": "sd", "tokenizer": "tok", "sr": {"cleaner": "cl", "controlnet": "cn"}, "face": {"cleaner": "cl", "controlnet": "cn_face"}}}
    use_registry(*files, versions=versions, groups={"tok": ["tok_a", "tok_b"]})
    code, _, err = run(capsys, "fetch", "--model", "v9", "--task", "sr")
    assert code == 0 and "5 of 5 files ready" in err
    assert sorted(p.rsplit("/", 1)[1] for m, p, _ in hub.requests if m == "GET") == ["cl.pth", "cn.pth", "sd.pth", "tok_a.pth", "tok_b.pth"]
    code, _, err = run(capsys, "fetch", "--model", "v9")
    assert code == 0 and "6 of 6 files ready: 1 downloaded" in err


def test_fetch_refuses_a_corrupt_download_with_exit_2(capsys, hub, weights_env):
    good, bad = payload(5), payload(6)
    use_registry(hub_file(hub, "tiny", bad, announce=sha(good)) | {"sha256": sha(good)})
    code, out, err = run(capsys, "fetch", "tiny")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[-2].startswith(f"error: tiny (tiny.pth) downloaded from {hub.url}/test-org/tiny (revision {COMMIT[:12]}): sha256 {sha(bad)}")
    assert lines[-1].startswith("hint: ")
    assert not any(p.is_file() for p in (weights_env / "hf-cache").rglob("blobs/*"))


def test_fetch_with_the_server_down_is_fast_and_clear(capsys, hub, monkeypatch):
    use_registry(hub_file(hub, "tiny", payload(7)))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    start = time.monotonic()
    code, out, err = run(capsys, "fetch", "tiny")
    assert time.monotonic() - start < 5
    assert code == 2 and out == ""
    error = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "tiny (tiny.pth) from http://127.0.0.1:" in error[0] and "cannot connect" in error[0]
    assert "hint: check your connection, set HF_ENDPOINT" in err


def test_fetch_goes_on_after_a_failure(capsys, hub):
    missing = hub_file(hub, "gone", payload(8))
    hub.reset()
    use_registry(missing, hub_file(hub, "tiny", payload(9)))
    code, out, err = run(capsys, "fetch", "gone", "tiny")
    assert code == 2 and out == ""
    assert "error: gone (gone.pth) from " in err and "file not found at this revision (HTTP 404)" in err
    assert "1 of 2 files ready: 1 downloaded (200 kB), 0 already here; 1 failed" in err


def test_fetch_offline_with_a_missing_file(capsys, hub, monkeypatch):
    use_registry(hub_file(hub, "tiny", payload(10)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "fetch", "tiny")
    assert code == 2 and out == "" and hub.requests == []
    assert "error: tiny (tiny.pth): not found locally" in err and "HF_HUB_OFFLINE is set" in err


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "say what to fetch"),
        (["tiny", "--model", "v9"], "not both"),
        (["--task", "sr"], "`--task` needs `--model`"),
        (["nope"], "unknown checkpoint 'nope'"),
        (["--model", "v7"], "unknown model version 'v7'"),
        (["--all", "tiny"], "`--all` takes no names"),
    ],
)
def test_fetch_usage_errors(capsys, hub, args, message):
    use_registry(hub_file(hub, "tiny", payload(11)), versions={"v9": {"sr": {"cleaner": "tiny"}}})
    code, out, err = run(capsys, "fetch", *args)
    assert code == 2 and out == "" and message in err and hub.requests == []


def test_path_prints_only_the_path(capsys, hub):
    use_registry(hub_file(hub, "tiny", payload(12)))
    code, out, err = run(capsys, "path", "tiny")
    assert code == 2 and out == ""
    assert "error: tiny (tiny.pth): not downloaded" in err and "hint: run `restore weights fetch tiny`" in err
    assert hub.requests == []
    path = weights.resolve("tiny")
    code, out, err = run(capsys, "path", "tiny")
    assert code == 0 and out == f"{path}\n"


def test_path_and_verify_use_the_weights_dir_from_the_environment(capsys, hub, tmp_path, monkeypatch):
    data = payload(13)
    use_registry(hub_file(hub, "tiny", data))
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "tiny.pth").write_bytes(data)
    monkeypatch.setenv("RESTORE_WEIGHTS_DIR", str(folder))
    code, out, _ = run(capsys, "path", "tiny")
    assert code == 0 and out == f"{folder / 'tiny.pth'}\n"
    (folder / "tiny.pth").write_bytes(payload(14))
    code, out, err = run(capsys, "path", "tiny")
    assert code == 2 and out == "" and "(from --weights-dir): sha256" in err
    code, out, err = run(capsys, "verify")
    assert code == 2 and f"error: tiny: {folder / 'tiny.pth'}: sha256" in err
    assert hub.requests == []


def test_verify_rehashes_what_is_present(capsys, hub):
    use_registry(hub_file(hub, "tiny", payload(15)), hub_file(hub, "absent", payload(16)))
    path = weights.resolve("tiny")
    code, out, err = run(capsys, "verify")
    assert code == 0 and out == ""
    assert "ok  tiny: " in err and "1 of 1 files here verified; 1 not here" in err
    blob = path.resolve()
    st = blob.stat()
    blob.chmod(0o644)
    blob.write_bytes(payload(17))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, out, err = run(capsys, "verify", "--json")
    assert code == 2
    states = {o["name"]: o["state"] for o in map(json.loads, out.splitlines())}
    assert states == {"tiny": "mismatch", "absent": "missing"}


def test_fetch_and_list_a_captioner(capsys, hub):
    files = [hub_file(hub, f"cap_{i}", payload(40 + i, 300), filename=name, repo="test-org/Tiny-Captioner")
             for i, name in enumerate(("config.json", "model.safetensors"))]
    use_registry(*[{**f, "kind": "captioner"} for f in files], hub_file(hub, "tiny", payload(43)),
                 groups={"tinycap": ["cap_0", "cap_1"]})
    code, out, err = run(capsys, "fetch", "--captioner", "tinycap")
    assert code == 0 and out == "" and "2 of 2 files ready: 2 downloaded" in err
    assert hub.gets("tiny.pth") == []  # only the captioner's files
    code, out, err = run(capsys, "list", "--captioner", "tinycap", "--json")
    assert code == 0 and [json.loads(line)["name"] for line in out.splitlines()] == ["cap_0", "cap_1"]
    code, out, err = run(capsys, "list")
    assert code == 0 and "Download per captioner: tinycap 600 B." in " ".join(err.split())
    code, out, err = run(capsys, "fetch", "--captioner", "florence3")
    assert code == 2 and "not a pinned captioner; pinned: tinycap" in err
