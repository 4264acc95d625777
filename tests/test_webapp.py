"""`restore ui`: the form generated from the settings, the command line it writes, and the app itself
through Gradio's Python client and in a real browser (headless Chromium driven by Selenium).

The app runs in-process on a free localhost port with the tiny reference model; every result it
serves is compared byte for byte with what the CLI writes for the same settings. The tests that need
Gradio (or the browser) are marked `ui` (`pytest -m "not ui"` skips them) and skip, saying why, when
the `ui` extra (gradio, selenium) or the system chromium / chromedriver is missing. Set
RESTORE_SCREENSHOT=path to also keep the browser test's screenshot of the finished page there
(docs/webapp.png was taken that way).
"""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REFERENCE, REPO
from restorecli.cli.app import main
from restorecli.settings import LoadSettings, RestoreSettings, default_settings, leaves
from restorecli.settings.spec import SettingError
from restorecli.webapp.form import MAIN, command_line, field_defaults, fields, form_wording, settings_from_form

MODEL = REFERENCE / "model_v.json"
INPUTS = REFERENCE / "inputs"
SIGN = INPUTS / "sign_37x53.png"
#: The load settings of every app test (and the CLI runs they are compared with).
#: (`captioner` none: the tiny model has no captioner weights; the page's own captions are tested below.)
LOAD = LoadSettings(model=str(MODEL), device="cpu", precision="fp32", captioner="none")
LOAD_FLAGS = ["--model", str(MODEL), "--device", "cpu", "--precision", "fp32", "--captioner", "none"]

needs_gradio = pytest.mark.skipif(find_spec("gradio") is None or find_spec("gradio_client") is None,
                                  reason="gradio is not installed (pip install -e '.[test,ui]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    find_spec("selenium") is None or CHROMIUM is None or CHROMEDRIVER is None,
    reason="the browser test needs selenium (the ui extra) and Debian's chromium and chromium-driver packages "
           "(.ci/run installs them)")


# -- the form and the command line (no Gradio) ----------------------------------------------------------


def test_every_restore_setting_has_one_field_main_ones_first():
    names = [f.name for f in fields()]
    assert sorted(names) == sorted(leaf.name for leaf in leaves(RestoreSettings))
    assert names[: len(MAIN)] == list(MAIN)
    kinds = {f.name: f.kind for f in fields()}
    assert kinds["sampler"] == kinds["color_fix"] == "choice"
    assert kinds["rescale_cfg"] == kinds["stage1_only"] == "bool"
    assert kinds["steps"] == kinds["tile_size"] == "int"
    assert kinds["cfg"] == "float" and kinds["restoration_guidance"] == "slider"
    assert kinds["max_memory"] == "size" and kinds["prompt"] == "text"


@pytest.mark.parametrize("version, task", [("v2", "sr"), ("v2.1", "denoise"), ("custom", "face")])
def test_form_defaults_are_the_defaults_table(version, task):
    expected = default_settings(version, task)
    values = field_defaults(version, task)
    assert values["steps"] == expected.sampler.steps and values["sampler"] == expected.sampler.sampler
    assert values["upscale"] == expected.upscale and values["prompt"] == expected.prompts.prompt
    assert values["tile_size"] == "" and values["max_memory"] == ""  # None: automatic
    assert settings_from_form(version, task, values) == expected


def test_form_values_become_settings_with_the_settings_checks():
    values = field_defaults("custom", "sr") | {"steps": 3.0, "tile_size": "512", "max_memory": "2GB",
                                               "restoration_guidance": 0.3}
    s = settings_from_form("custom", "sr", values)
    assert (s.sampler.steps, s.tiles.tile_size, s.tiles.max_memory, s.guidance.scale) == (3, 512, 2 * 2**30, 0.3)
    with pytest.raises(SettingError) as info:
        settings_from_form("custom", "sr", values | {"steps": 0})
    assert form_wording(info.value) == '"Steps" must be >= 1, got 0'
    with pytest.raises(SettingError, match="multiple of 64"):
        settings_from_form("custom", "sr", values | {"tile_size": "100"})


def _parsed(command: str) -> tuple[list[str], LoadSettings, RestoreSettings]:
    """What `restore`'s own parser makes of a command line: (inputs, load settings, settings)."""
    import typer

    from restorecli.cli.app import app
    from restorecli.cli.options import request_from_flags

    words = shlex.split(command)
    assert words[0] == "restore"
    image = typer.main.get_command(app).commands["image"]
    ctx = image.make_context("image", words[1:])
    request = request_from_flags(ctx.params)
    return ctx.params["inputs"], request.load, request.settings


def test_command_line_has_only_what_differs_and_parses_back_to_the_same_settings():
    load = LOAD.replace(task="denoise")
    settings = default_settings("custom", "denoise").replace(
        steps=3, restoration_guidance=0.30000000000000004, prompt="a 'quoted' street sign", rescale_cfg=True,
        max_memory=3 * 2**30, tile_size=512)
    line = command_line(["my photo.png"], load, settings)
    assert line == ("restore 'my photo.png' --model " + str(MODEL) + " --task denoise --device cpu --precision fp32"
                    " --captioner none --steps 3 --rescale-cfg --prompt 'a '\"'\"'quoted'\"'\"' street sign'"
                    " --guidance 0.30000000000000004 --tile-size 512 --max-memory 3GB")
    assert _parsed(line) == (["my photo.png"], load, settings)
    assert command_line(["a.png"], LoadSettings(), default_settings()) == "restore a.png"


def test_restore_ui_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import restorecli.cli.ui as ui

    monkeypatch.setattr(ui, "find_spec", lambda name: None)
    assert main(["ui", *LOAD_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "needs Gradio" in err and "pip install 'restorecli[ui]'" in err


# -- the app through Gradio's Python client ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, reference_dir):
    """The app on a free localhost port, models loaded once for the module."""
    if find_spec("gradio") is None:
        pytest.skip("gradio is not installed (pip install -e '.[test,ui]')")
    import torch

    from restorecli.webapp.app import build_app, launch
    from restorecli.webapp.jobs import Models, Workspace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: thread start-up would dominate
    models = Models(LOAD)
    models.start()
    workspace = Workspace(tmp_path_factory.mktemp("ui-work"))
    demo = build_app(models, workspace)
    url = launch(demo, workspace, port=_free_port())
    yield url
    demo.close()
    workspace.remove()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def cli_bytes(tmp_path: Path, inputs: list[Path], *args: str) -> dict[str, bytes]:
    """{output name: bytes} that `restore INPUTS -o DIR/ ARGS` writes."""
    out = Path(tempfile.mkdtemp(prefix="cli-", dir=tmp_path))
    code = main([*map(str, inputs), "-o", f"{out}/", *args])
    assert code == 0
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def restore(client, images: list[Path], **settings):
    from gradio_client import handle_file

    return client.predict(images=[handle_file(str(p)) for p in images], api_name="/restore", **settings)


SMALL = dict(upscale=2, steps=2, cfg=4.0, seed=404, sampler="edm_dpm++_2m")
SMALL_FLAGS = ["--upscale", "2", "--steps", "2", "--cfg", "4", "--seed", "404", "--sampler", "edm_dpm++_2m"]


@pytest.mark.ui
@needs_gradio
def test_api_restores_the_reference_input_like_the_cli(client, tmp_path):
    compare, stage1, guidance_map, download, command, status, shown, caption = restore(client, [SIGN], **SMALL)
    expected = cli_bytes(tmp_path, [SIGN], *LOAD_FLAGS, *SMALL_FLAGS)
    assert Path(download).name == "sign_37x53_restored.png"
    assert Path(download).read_bytes() == expected["sign_37x53_restored.png"]
    assert command == ("restore sign_37x53.png " + shlex.join(LOAD_FLAGS) +
                       " --upscale 2 --sampler edm_dpm++_2m --steps 2 --seed 404 --cfg 4")
    # before/after at the output size, the stage-1 image and the guidance map beside it
    sizes = {Image.open(p).size for p in (*compare, stage1, guidance_map)}
    assert sizes == {(74, 106)}
    assert Image.open(guidance_map).mode == "L"
    assert "sign_37x53_restored.png" in status and "74×106" in status
    assert caption == ""  # captioner none


@pytest.mark.ui
@needs_gradio
def test_api_restore_again_with_an_edited_caption_is_the_cli_with_that_caption(client, tmp_path):
    from gradio_client import handle_file

    text = "a red street sign, 'stop'"
    images = [handle_file(str(SIGN)), handle_file(str(INPUTS / "noisy_61x40.png"))]
    *_, download, command, status, shown, caption = client.predict(
        images=images, shown="sign_37x53.png", caption=f"  {text} ", api_name="/restore_again", **SMALL)
    assert caption == text and f"- prompt: *{text}, " in status
    assert Path(download).name == "sign_37x53_restored.png"  # only the shown image, restored again
    words = shlex.split(command)
    assert words[:2] == ["restore", "sign_37x53.png"] and words[-2:] == ["--caption", f"  {text} "]
    expected = cli_bytes(tmp_path, [SIGN], *words[2:])
    assert Path(download).read_bytes() == expected["sign_37x53_restored.png"]
    # the caption conditions the result: another caption, another image
    *_, other, _, _, _, _ = client.predict(images=images[:1], shown="sign_37x53.png", caption="a cat",
                                          api_name="/restore_again", **SMALL)
    assert Path(other).read_bytes() != Path(download).read_bytes()
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="llava is not in the list of choices"):  # Gradio checks the dropdown
        restore(client, [SIGN], captioner="llava", **SMALL)


@pytest.mark.ui
@needs_gradio
def test_api_errors_come_back_as_messages_and_the_app_goes_on(client, tmp_path):
    from gradio_client.exceptions import AppError

    text = tmp_path / "notes.png"
    text.write_text("shopping list: milk, eggs\n")
    with pytest.raises(AppError, match=r"^notes.png: not an image \(unknown format\)$"):
        restore(client, [text], stage1_only=True)
    with pytest.raises(AppError, match='"Steps" must be >= 1, got 0'):
        restore(client, [SIGN], steps=0)
    with pytest.raises(AppError, match="Add one or more images"):
        client.predict(images=[], api_name="/restore")
    with pytest.raises(AppError, match=r"^retinaface_resnet50 \(detection_Resnet50_Final\.pth\)"):  # no face weights
        restore(client, [SIGN], task="unaligned_face")
    # still serving: one good image beside the bad one is restored, the bad one reported
    *_, download, _, status, _, _ = restore(client, [SIGN, text], stage1_only=True, upscale=1)
    with zipfile.ZipFile(download) as archive:
        assert archive.namelist() == ["sign_37x53_restored.png"]
    assert "notes.png**: failed: notes.png: not an image" in status


@pytest.mark.ui
@needs_gradio
def test_api_several_images_give_one_zip_and_16_bit_alpha_stays(client, tmp_path):
    rgb = np.asarray(Image.open(INPUTS / "noisy_61x40.png").convert("RGB")).astype(np.uint16) * 257
    alpha = np.tile(np.linspace(0, 65535, rgb.shape[1], dtype=np.uint16), (rgb.shape[0], 1))
    deep = tmp_path / "deep.png"
    from restorecli.images import read_image, write_image

    write_image(str(deep), rgb, alpha=alpha)
    inputs = [SIGN, deep]
    *_, download, command, _, shown, _ = restore(client, inputs, stage1_only=True, upscale=2, task="denoise")
    expected = cli_bytes(tmp_path, inputs, *LOAD_FLAGS, "--stage1-only", "--upscale", "2", "--task", "denoise")
    with zipfile.ZipFile(download) as archive:
        got = {name: archive.read(name) for name in archive.namelist()}
    assert got == expected
    again = read_image(io.BytesIO(got["deep_restored.png"]))
    assert again.bit_depth == 16 and again.alpha is not None and again.alpha.dtype == np.uint16
    assert command.startswith("restore sign_37x53.png deep.png ") and "--task denoise" in command
    assert shown["choices"] == [["sign_37x53.png", "sign_37x53.png"], ["deep.png", "deep.png"]]


# -- the command --------------------------------------------------------------------------------------


@pytest.mark.ui
@needs_gradio
def test_restore_ui_fails_before_serving_when_the_model_cannot_load(tmp_path, capsys):
    assert main(["ui", "--model", str(tmp_path / "missing.json"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "serving" not in err


@pytest.mark.ui
@needs_gradio
def test_restore_ui_serves_on_localhost_and_ctrl_c_stops_it_during_a_job(reference_dir):
    import urllib.request

    from gradio_client import Client, handle_file

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from restorecli.cli import main; sys.exit(main())", "ui", *LOAD_FLAGS,
         "--port", str(port)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving on" in line:
                break
        assert f"serving on http://127.0.0.1:{port}" in "".join(lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200 and b"restore" in page.read()
        # a long job, stopped while it samples: the server ends at its next step, no crash
        job = Client(f"http://127.0.0.1:{port}/", verbose=False).submit(
            images=[handle_file(str(SIGN))], steps=200, upscale=1, api_name="/restore")
        while not any("sampling" in (p.desc or "") for p in job.status().progress_data or []):
            assert not job.done(), job.result()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "stopping" in rest and "Traceback" not in rest and "terminate" not in rest


# -- in a real browser --------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1250", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _toast_texts(driver) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(t.text for t in driver.find_elements(By.CSS_SELECTOR, ".toast-wrap"))


@pytest.mark.ui
@needs_gradio
@needs_browser
def test_browser_restore_download_and_bad_upload(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def css(selector):  # the page renders its components as their code arrives: wait for each
        return _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, selector), timeout=60)[0]

    def set_number(selector, value):
        box = css(f"{selector} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    browser.get(server)
    for selector in ("#images input[type=file]", "#setting-upscale input", "#setting-steps input",
                     "#setting-restoration-guidance input[type=range]", "#restore", "#command textarea"):
        css(selector)  # the whole form is there (and its upload handler with it)
    css("#images input[type=file]").send_keys(str(SIGN))
    css("#images [aria-label='sign_37x53.png']")  # uploaded: listed by name
    set_number("#setting-upscale", 2)
    set_number("#setting-steps", 2)
    slider = css("#setting-restoration-guidance input[type=range]")
    slider.click()  # the thumb jumps to the click (the middle: 1.0); the arrow keys then move it in steps
    for _ in range(14):
        slider.send_keys(Keys.ARROW_LEFT)
    _wait(browser, lambda d: css("#setting-restoration-guidance input[type=number]").get_attribute("value") == "0.3")
    css("#restore").click()
    link = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#download a[download]"))[0]
    assert link.get_attribute("download") == "sign_37x53_restored.png"
    command = css("#command textarea").get_attribute("value")
    assert "--guidance 0.3" in command and "--steps 2" in command and "--upscale 2" in command

    link.click()
    downloaded = browser.downloads / "sign_37x53_restored.png"
    _wait(browser, lambda d: downloaded.is_file(), timeout=30)
    # the command line the page offers, run by the CLI, writes the same bytes
    words = shlex.split(command)
    assert words[:2] == ["restore", "sign_37x53.png"]
    expected = cli_bytes(tmp_path, [SIGN], *words[2:])
    assert downloaded.read_bytes() == expected["sign_37x53_restored.png"]
    assert css("#compare img").is_displayed()

    # edit the caption and restore again: the command line gains it, the result changes
    box = css("#caption textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("a red street sign")
    first = downloaded.read_bytes()
    css("#restore-again").click()
    _wait(browser, lambda d: "--caption 'a red street sign'" in css("#command textarea").get_attribute("value"))
    assert "prompt: a red street sign, " in css("#status").text

    shot = tmp_path / "webapp.png"
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1200
    if os.environ.get("RESTORE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["RESTORE_SCREENSHOT"])

    # a text file named .png: said at once under the upload, and again as the Restore button's error
    text = tmp_path / "notes.png"
    text.write_text("shopping list: milk, eggs\n")
    css("#images button[aria-label='Clear']").click()
    _wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#images [aria-label='sign_37x53.png']"))
    css("#images input[type=file]").send_keys(str(text))
    _wait(browser, lambda d: "notes.png: not an image (unknown format)" in css("#upload-notes").text)
    css("#restore").click()
    _wait(browser, lambda d: "notes.png: not an image (unknown format)" in _toast_texts(d), timeout=60)
    assert "Error" in _toast_texts(browser)


# -- jobs without Gradio: out of memory ------------------------------------------------------------------


def test_out_of_memory_is_one_clear_line_and_the_other_image_is_restored(tmp_path):
    from _fake_pipeline import FakePipeline

    from restorecli.webapp.jobs import Models, Upload, Workspace, restore_uploads

    fake = FakePipeline(oom="big")
    fake.cleaner = fake.stage1_pipeline = fake.default_settings = None
    models = Models(LOAD, loader=lambda load: fake)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for name in ("big.png", "small.png"):
        shutil.copyfile(SIGN, uploads / name)
    outcome = restore_uploads(models, [Upload(str(uploads / n), n) for n in ("big.png", "small.png")], "sr",
                              default_settings("custom", "sr"), Workspace(tmp_path / "work").new_job())
    (failed,) = outcome.failed
    assert failed.error == ("big.png: too large for the available memory even tiled (37 x 53, out of memory); "
                            "try a smaller --upscale, --tile-size or --max-memory")
    (ok,) = outcome.ok
    assert ok.name == "small.png" and Path(ok.output).name == "small_restored.png"
    assert Image.open(ok.after).size == Image.open(ok.before).size == (37 * 4, 53 * 4)
    assert zipfile.ZipFile(outcome.download).namelist() == ["small_restored.png"]


def test_jobs_keep_each_images_caption_and_prompt_and_take_the_pages_own(tmp_path):
    from _fake_pipeline import FakePipeline
    from _tiny_captioners import StubCaptioner

    from restorecli.webapp.jobs import Models, Upload, Workspace, restore_uploads

    fake = FakePipeline(captioner=StubCaptioner("stub"))
    fake.cleaner = fake.stage1_pipeline = fake.default_settings = None
    models = Models(LOAD, loader=lambda load: fake)
    uploads = [Upload(str(SIGN), "sign.png"), Upload(str(INPUTS / "noisy_61x40.png"), "noisy.png")]
    settings = default_settings("custom", "sr").replace(prompt="sharp")
    outcome = restore_uploads(models, uploads, "sr", settings, Workspace(tmp_path / "work").new_job())
    first, second = outcome.ok
    assert first.caption.startswith("an image of 37 x 53") and second.caption.startswith("an image of 61 x 40")
    assert first.prompt == first.caption + ", sharp"
    outcome = restore_uploads(models, uploads[:1], "sr", settings, Workspace(tmp_path / "work").new_job(),
                              captions=[" my own words "])
    assert (outcome.ok[0].caption, outcome.ok[0].prompt) == ("my own words", "my own words, sharp")


@needs_gradio
def test_restore_ui_refuses_a_port_in_use_before_loading_models(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--model", "nonexistent.json", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port} (address already in use)" in err and "loading" not in err
