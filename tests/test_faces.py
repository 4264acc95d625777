"""`task` unaligned_face: detection logic, alignment geometry, paste-back, the FacePipeline, the CLI and
batch runs, and the detector / parser files in their official layouts.

The detector is a stand-in returning known five-point landmarks (`_face_standins.FixedDetector`), so
the geometry is checked against hand-computed transforms; the networks themselves are facexlib's,
built full size with random weights and saved in the official layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("facexlib")
cv2 = pytest.importorskip("cv2")

from _face_standins import FixedDetector, ResizingRestorer, synthetic_photo, template_face  # noqa: E402
from conftest import REFERENCE  # noqa: E402
from restorecli.cli.app import main  # noqa: E402
from restorecli.faces import alignment, detection, parsing, paste  # noqa: E402
from restorecli.faces.alignment import FFHQ_TEMPLATE_512  # noqa: E402
from restorecli.faces.pipeline import FacePipeline  # noqa: E402
from restorecli.settings import RestoreSettings  # noqa: E402

MODEL = str(REFERENCE / "model_v.json")


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


# -- alignment geometry ---------------------------------------------------------------------------


def test_the_affine_maps_the_landmarks_onto_the_ffhq_template():
    # landmarks = the template moved by a known similarity T; the crop's affine must be T^-1 (LMEDS
    # refines iteratively: within 1e-5 in the linear part, 1e-3 crop pixels in the translation)
    t = similarity(0.25, 17.0, 40.0, 55.0)
    landmarks = apply(t, FFHQ_TEMPLATE_512)
    m = alignment.estimate_affine(landmarks)
    expected = cv2.invertAffineTransform(t)
    assert np.abs(m[:, :2] - expected[:, :2]).max() < 1e-5 and np.abs(m[:, 2] - expected[:, 2]).max() < 1e-3
    assert np.abs(apply(m, landmarks) - FFHQ_TEMPLATE_512).max() < 1e-3
    # the inverse takes the template back to the photo (round trip)
    inv = alignment.invert_affine(m)
    assert np.abs(apply(inv, FFHQ_TEMPLATE_512) - landmarks).max() < 1e-4
    assert np.abs(apply(inv, apply(m, landmarks)) - landmarks).max() < 1e-4


def test_the_crop_is_the_warp_of_the_photo_with_the_official_border():
    photo = synthetic_photo(300, 400)
    m = alignment.estimate_affine(apply(similarity(0.3, -8.0, 120.0, 60.0), FFHQ_TEMPLATE_512))
    crop = alignment.align_face(photo, m)
    assert crop.shape == (512, 512, 3) and crop.dtype == np.uint8
    # a pixel of the crop is the photo sampled at the inverse-mapped point (bilinear)
    inv = alignment.invert_affine(m)
    for x, y in [(256, 256), (200, 300), (320, 240)]:
        sx, sy = apply(inv, np.array([[x, y]], float))[0]
        x0, y0 = int(np.floor(sx)), int(np.floor(sy))
        fx, fy = sx - x0, sy - y0
        p = photo.astype(float)
        want = ((1 - fx) * (1 - fy) * p[y0, x0] + fx * (1 - fy) * p[y0, x0 + 1] + (1 - fx) * fy * p[y0 + 1, x0]
                + fx * fy * p[y0 + 1, x0 + 1])
        assert np.abs(crop[y, x] - want).max() <= 1.01
    # outside the photo: facexlib's grey (135, 133, 132); 16-bit crops keep their depth
    far = alignment.align_face(photo, alignment.estimate_affine(apply(similarity(0.3, 0, -150, -150), FFHQ_TEMPLATE_512)))
    assert tuple(far[2, 2]) == (135, 133, 132)
    deep = alignment.align_face(photo.astype(np.uint16) * 257, m)
    assert deep.dtype == np.uint16 and np.abs(deep.astype(int) // 257 - crop.astype(int)).max() <= 1


def test_the_detection_image_has_a_short_side_of_at_least_512():
    assert alignment.helper_image(np.zeros((600, 700, 3), np.uint8)).shape == (600, 700, 3)
    # cv2 rounds: 100x150 * 5.12 -> 512x768
    assert alignment.helper_image(np.zeros((100, 150, 3), np.uint8)).shape == (512, 768, 3)
    assert alignment.helper_image(np.zeros((192, 256, 3), np.uint8)).shape == (512, 683, 3)


def test_pasting_an_unchanged_crop_back_reproduces_the_image_inside_the_mask():
    photo = cv2.GaussianBlur(synthetic_photo(600, 640), (0, 0), 3)
    m = alignment.estimate_affine(apply(similarity(0.9, 12.0, 150.0, 40.0), FFHQ_TEMPLATE_512))  # inside the photo
    crop = alignment.align_face(photo, m)
    inv = alignment.invert_affine(m)
    ones = np.ones((512, 512))
    out = paste.paste_face(np.zeros_like(photo, dtype=np.float64), crop, inv, ones)
    square, soft = paste.soft_square_mask(inv, photo.shape[:2])
    inside = soft >= 0.999
    assert inside.sum() > 0.3 * 512 * 512 * 0.81
    diff = np.abs(out[inside] - photo[inside].astype(float))
    assert diff.mean() < 1.0 and diff.max() <= 6
    # outside the face the background stays exactly as it was
    outside = square == 0
    assert np.all(out[outside] == 0)


def test_paste_follows_the_official_mask_formula():
    rng = np.random.default_rng(3)
    bg = rng.integers(0, 256, (520, 530, 3)).astype(np.uint8)
    face = rng.integers(0, 256, (512, 512, 3)).astype(np.uint8)
    inv = alignment.invert_affine(alignment.estimate_affine(apply(similarity(0.8, 5, 30, 20), FFHQ_TEMPLATE_512)))
    parse_mask = parsing.ellipse_mask()
    out = paste.paste_face(bg, face, inv, parse_mask)
    # the formula written out once more, step by step as facexlib's paste_faces_to_input_image
    h, w = bg.shape[:2]
    inv_restored = cv2.warpAffine(face, inv, (w, h))
    inv_mask = cv2.warpAffine(np.ones((512, 512), np.float32), inv, (w, h))
    erosion = cv2.erode(inv_mask, np.ones((2, 2), np.uint8))
    edge = int(np.sum(erosion) ** 0.5) // 20
    soft = cv2.GaussianBlur(cv2.erode(erosion, np.ones((2 * edge, 2 * edge), np.uint8)), (2 * edge + 1, 2 * edge + 1), 0)
    parse_w = cv2.warpAffine(parse_mask, inv, (w, h), flags=3)[:, :, None]
    fuse = (parse_w < soft[:, :, None]).astype("int")
    mask = parse_w * fuse + soft[:, :, None] * (1 - fuse)
    want = mask * (erosion[:, :, None] * inv_restored) + (1 - mask) * bg
    assert np.array_equal(out, want)


# -- detection logic ------------------------------------------------------------------------------


def test_detection_enlarges_to_640_scales_back_and_drops_small_eye_distances():
    det = FixedDetector([(0.3, 0.5, 0.1, 0.0), (0.7, 0.5, 0.004, 0.0)])  # eye distances 51 px and 2 px
    photo = np.zeros((512, 512, 3), np.uint8)
    faces = detection.detect_faces(det, photo)
    assert det.seen == [(640, 640)]  # short side 512 < 640: enlarged (INTER_LINEAR) before detection
    assert len(faces) == 1
    pts, centre = template_face(0.3, 0.5, 0.1 * 512 / np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0]))
    assert np.abs(faces[0].landmarks - (pts + centre * 512)).max() < 1e-3  # back in the photo's pixels
    assert faces[0].eye_distance == pytest.approx(51.2, abs=1e-3)
    assert detection.detect_faces(FixedDetector([]), photo) == []


def test_only_center_face_keeps_the_face_nearest_the_centre():
    det = FixedDetector([(0.2, 0.2, 0.05, 0), (0.55, 0.45, 0.05, 0), (0.9, 0.8, 0.05, 0)])
    faces = detection.detect_faces(det, np.zeros((700, 800, 3), np.uint8), only_center_face=True)
    assert len(faces) == 1 and faces[0].landmarks[:, 0].mean() == pytest.approx(0.55 * 800, abs=2)


# -- the FacePipeline with stand-in restorers (fast) ----------------------------------------------


def _pipeline(det, *, face=None, parser=None):
    return FacePipeline(ResizingRestorer(), face or ResizingRestorer(), det, parser)


def test_no_face_gives_the_background_restoration():
    photo = synthetic_photo(48, 64)
    pipe = _pipeline(FixedDetector([]))
    out = pipe(photo, RestoreSettings(upscale=2.0))
    assert out.faces == [[]]
    bg = ResizingRestorer()(photo, RestoreSettings(upscale=2.0))
    assert np.array_equal(out.pixels[0], (bg.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    assert out.pixels[0].shape == (96, 128, 3)


def test_identity_faces_leave_the_photo_nearly_unchanged_and_keep_the_requested_size():
    photo = cv2.GaussianBlur(synthetic_photo(150, 200), (0, 0), 2)
    det = FixedDetector([(0.3, 0.4, 0.12, 10.0), (0.72, 0.55, 0.1, -5.0), (0.98, 0.5, 0.1, 0.0)])  # last: cut by the border
    pipe = _pipeline(det)
    out = pipe(photo, RestoreSettings(upscale=2.0), output_type="np")
    faces = out.faces[0]
    assert [f.index for f in faces] == [0, 1, 2] and all(f.restored is not None for f in faces)
    assert det.seen == [(640, 853)]  # 300x400 -> short side 512 (683 wide) -> 640 for the detector
    result = out.pixels[0]
    assert result.shape == (300, 400, 3) and result.dtype == np.uint8  # int(H*2) x int(W*2), not 512x683
    background = np.asarray(out.background[0] * 255).astype(np.uint8) if False else None  # noqa: F841
    reference = ResizingRestorer()(photo, RestoreSettings(upscale=2.0)).images[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(result.astype(float) - reference).mean() < 1.5  # identity faces: only resampling differences
    assert out.images[0].shape == (300, 400, 3)


def test_a_face_that_fails_is_left_out_with_a_warning(caplog):
    photo = synthetic_photo(120, 160)
    det = FixedDetector([(0.3, 0.4, 0.12, 0.0), (0.7, 0.5, 0.12, 0.0)])
    pipe = _pipeline(det, face=ResizingRestorer(fail_on="face 1"))
    with caplog.at_level("WARNING", logger="restorecli.faces"):
        out = pipe(photo, RestoreSettings(upscale=2.0), source="p.png")
    faces = out.faces[0]
    assert faces[0].restored is not None and faces[1].restored is None and "out of memory" in faces[1].error
    assert "p.png face 1: restoring it failed" in caplog.text
    assert out.pixels[0].shape == (240, 320, 3)


def test_sixteen_bit_and_float_inputs_keep_their_depth():
    photo = synthetic_photo(120, 160).astype(np.uint16) * 257
    det = FixedDetector([(0.5, 0.5, 0.15, 0.0)])
    out = _pipeline(det)(photo, RestoreSettings(upscale=1.0))
    assert out.pixels[0].dtype == np.uint16 and out.faces[0][0].lq.dtype == np.uint16
    assert out.pixels[0].shape == (120, 160, 3)
    out = _pipeline(FixedDetector([(0.5, 0.5, 0.15, 0.0)]))(photo / 65535.0, RestoreSettings(upscale=1.0))
    assert out.pixels[0].dtype == np.float32 and 0 <= out.pixels[0].min() and out.pixels[0].max() <= 1


def test_progress_counts_every_face_and_the_background():
    seen = []
    det = FixedDetector([(0.3, 0.5, 0.1, 0.0), (0.7, 0.5, 0.1, 0.0)])
    _pipeline(det)(synthetic_photo(64, 64), RestoreSettings(upscale=1.0), on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


# -- the networks in the official layouts ---------------------------------------------------------


@pytest.mark.parametrize("name,entry", [("retinaface_resnet50", "retinaface_resnet50"),
                                        ("retinaface_mobile0.25", "retinaface_mobile0.25")])
def test_detector_files_in_the_official_layout_load(name, entry, tmp_path):
    from facexlib.detection.retinaface import RetinaFace

    from restorecli import weights

    torch.manual_seed(0)
    official = RetinaFace(network_name=detection.NETWORKS[name], half=False, device="cpu")  # facexlib's definition
    state = official.state_dict()
    # the release files hold a bare state dict; the ResNet-50 one with DataParallel's `module.` prefix
    path = tmp_path / "det.pth"
    torch.save({("module." + k if name.endswith("resnet50") else k): v for k, v in state.items()}, path)
    net = detection.load_detector(path, name)
    mine = net.state_dict()
    assert list(mine) == list(state) and all(mine[k].shape == state[k].shape and torch.equal(mine[k], state[k]) for k in state)
    pinned = weights.get_entry(entry).size
    assert abs(path.stat().st_size - pinned) / pinned < 0.01  # full size: the pinned file has these tensors
    dets = detection.detect_faces(net, np.zeros((64, 64, 3), np.uint8))  # runs end to end (random weights)
    assert isinstance(dets, list)


@pytest.mark.parametrize("name", ["parsenet", "bisenet"])
def test_parser_files_in_the_official_layout_load_and_mask(name, tmp_path):
    from restorecli import weights

    torch.manual_seed(1)
    reference = parsing.build_parser(name)
    path = tmp_path / "parse.pth"
    torch.save(reference.state_dict(), path)
    parser = parsing.load_parser(path, name)
    assert all(torch.equal(a, b) for a, b in zip(parser.net.state_dict().values(), reference.state_dict().values()))
    pinned = weights.get_entry(name).size
    assert abs(path.stat().st_size - pinned) / pinned < 0.01
    if name == "parsenet":
        return  # the network's forward costs ~10 s on a shared CPU; bisenet runs the same mask path below
    mask = parser.mask(synthetic_photo(512, 512))
    assert mask.shape == (512, 512) and 0 <= mask.min() and mask.max() <= 1
    assert np.all(mask[:10] == 0) and np.all(mask[:, -10:] == 0)


def test_parse_mask_keeps_face_classes_only():
    class Labels:  # a parser network answering fixed classes: left half skin (1), right half cloth (18)
        def __call__(self, x):
            out = torch.zeros(1, 19, 512, 512)
            out[:, 1, :, :256] = 1
            out[:, 18, :, 256:] = 1
            return out, None

        def parameters(self):
            return iter([torch.zeros(1)])

    mask = parsing.FaceParser(Labels(), "parsenet").mask(np.zeros((512, 512, 3), np.uint8))
    assert mask[256, 100] > 0.99 and mask[256, 400] < 0.01


def test_the_pinned_face_files():
    from restorecli import weights

    for name, size in [("retinaface_resnet50", 109_497_761), ("retinaface_mobile0.25", 1_789_735),
                       ("parsenet", 85_331_193), ("bisenet", 53_289_463)]:
        entry = weights.get_entry(name)
        assert entry.size == size and entry.sha256 and entry.url.startswith("https://github.com/xinntao/facexlib/")
    assert "CC BY-NC-SA" in weights.get_entry("parsenet").license
    assert weights.wiring("v2.1", "unaligned_face")["face_parser"] == "parsenet"


# -- the CLI and batch runs on the tiny reference model -------------------------------------------


@pytest.fixture
def standin_faces(monkeypatch):
    """Loading with a stand-in detector and no weight downloads (the face cleaner: the model file's)."""
    import restorecli.pipeline.loading as loading

    det = FixedDetector([(0.3, 0.45, 0.12, 8.0), (0.72, 0.5, 0.1, -4.0)])
    monkeypatch.setattr(loading, "_face_files", lambda opts, version, description, progress: {
        "face_cleaner": description.cleaner, "face_detector": "stand-in", "face_parser": None})
    monkeypatch.setattr(detection, "load_detector", lambda path, name, device: det)
    return det


def _write(path: Path, array, mode=None, **kw) -> Path:
    (Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)).save(path, **kw)
    return path


def test_cli_stage1_saves_faces_and_reports_them_in_json(standin_faces, tmp_path, capsys):
    src = _write(tmp_path / "family.png", synthetic_photo(64, 80))
    crops = tmp_path / "crops"
    code = main([str(src), "-o", str(tmp_path / "out.png"), "--task", "unaligned_face", "--model", MODEL,
                 "--stage1-only", "--upscale", "2", "--device", "cpu", "--save-faces", str(crops), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    line = json.loads(captured.out.splitlines()[0])
    assert line["faces"] == 2 and line["status"] == "ok" and (line["width"], line["height"]) == (160, 128)
    names = sorted(Path(p).name for p in line["face_crops"])
    assert names == ["family_face0_lq.png", "family_face0_restored.png", "family_face1_lq.png",
                     "family_face1_restored.png"]
    assert all(Image.open(crops / n).size == (512, 512) for n in names)
    assert Image.open(tmp_path / "out.png").size == (160, 128)


def test_cli_no_face_writes_the_background_and_says_faces_0(standin_faces, tmp_path, capsys):
    standin_faces.faces = []
    src = _write(tmp_path / "landscape.png", synthetic_photo(40, 56))
    code = main([str(src), "-o", str(tmp_path / "out.png"), "--task", "unaligned_face", "--model", MODEL,
                 "--stage1-only", "--upscale", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "faces: 0" in err and Image.open(tmp_path / "out.png").size == (56, 40)


def test_cli_gray_alpha_and_exif_rotated_inputs(standin_faces, tmp_path, capsys):
    standin_faces.faces = standin_faces.faces[:1]
    gray = _write(tmp_path / "gray.png", synthetic_photo(48, 64), "L")
    rgba = np.dstack([synthetic_photo(48, 64), np.full((48, 64), 200, np.uint8)])
    alpha = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(alpha)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(synthetic_photo(48, 64)).save(rotated, exif=exif, quality=95)
    out = tmp_path / "out"
    code = main([str(gray), str(alpha), str(rotated), "-o", f"{out}/", "--task", "unaligned_face", "--model", MODEL,
                 "--stage1-only", "--upscale", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert Image.open(out / "gray_restored.png").mode == "L"
    a = Image.open(out / "alpha_restored.png")
    assert a.mode == "RGBA" and np.asarray(a)[..., 3].min() >= 199
    assert Image.open(out / "rotated_restored.jpg").size == (48, 64)  # upright: 48 wide, 64 high
    assert standin_faces.seen[-1] == (853, 640)  # the detector saw the upright photo


def test_batch_with_faces_resumes(standin_faces, tmp_path, capsys):
    standin_faces.faces = standin_faces.faces[:1]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        _write(folder / f"p{i}.png", synthetic_photo(40, 48, seed=i))
    args = ["batch", str(folder), "-o", str(tmp_path / "out"), "--task", "unaligned_face", "--model", MODEL,
            "--stage1-only", "--upscale", "1", "--device", "cpu", "--json", "--save-faces", str(tmp_path / "crops")]
    assert main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"input"')]
    assert [x["faces"] for x in lines] == [1, 1] and all(len(x["face_crops"]) == 2 for x in lines)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0_restored.png", "p1_restored.png"]
    assert sorted(p.name for p in (tmp_path / "crops").iterdir()) == [
        "p0_face0_lq.png", "p0_face0_restored.png", "p1_face0_lq.png", "p1_face0_restored.png"]
    assert main(args) == 0  # the rerun skips both
    assert [json.loads(x)["status"] for x in capsys.readouterr().out.splitlines() if x.startswith('{"input"')] == [
        "skipped", "skipped"]


def test_v1_has_no_unaligned_face_model(tmp_path, capsys):
    src = _write(tmp_path / "x.png", synthetic_photo(16, 16))
    assert main([str(src), "-o", str(tmp_path / "y.png"), "--task", "unaligned_face", "--model", "v1"]) == 2
    assert "needs v2 or v2.1" in capsys.readouterr().err


def test_library_entry_points_name_the_face_pipeline():
    from restorecli import DiffBIRPipeline, FacePipeline as Exported
    from restorecli.errors import UsageError
    from restorecli.settings import LoadSettings

    assert Exported is FacePipeline
    with pytest.raises(UsageError, match="FacePipeline"):
        DiffBIRPipeline.from_settings(LoadSettings(task="unaligned_face"))


@pytest.mark.slow
def test_cli_full_restoration_matches_the_official_helper_around_our_pipeline(monkeypatch, tmp_path, capsys):
    """Stage 2 too, through the CLI: the golden image is DiffBIR's FaceRestoreHelper (geometry, paste)
    around our parity-tested DiffBIRPipeline on the tiny model (tests/data/faces/README.md, "e2e")."""
    import restorecli.pipeline.loading as loading
    from _face_standins import FixedParser
    from test_cases import compare

    monkeypatch.setattr(loading, "_face_files", lambda opts, version, description, progress: {
        "face_cleaner": description.cleaner, "face_detector": "stand-in", "face_parser": "stand-in"})
    monkeypatch.setattr(detection, "load_detector", lambda path, name, device: FixedDetector([(0.36, 0.42, 0.14, 7.0)]))
    monkeypatch.setattr(parsing, "load_parser", lambda path, name, device: parsing.FaceParser(FixedParser(), "parsenet"))
    folder = Path(__file__).with_name("data") / "faces"
    out = tmp_path / "out.png"
    code = main([str(folder / "e2e_input.png"), "-o", str(out), "--task", "unaligned_face", "--model", MODEL,
                 "--upscale", "4", "--steps", "2", "--sampler", "edm_dpm++_2m", "--cfg", "1", "--prompt",
                 "a photo of a face", "--seed", "231", "--captioner", "none", "--device", "cpu", "--precision",
                 "fp32", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.splitlines()[0])["faces"] == 1
    actual = np.asarray(Image.open(out).convert("RGB"))
    expected = np.asarray(Image.open(folder / "e2e_expected.png").convert("RGB"))
    ok, detail = compare(actual, expected, {"max_diff": 2, "min_fraction": 0.998, "min_psnr": 50.0})
    assert ok, detail


# -- golden data from DiffBIR's own FaceRestoreHelper (tests/data/faces/README.md) ---------------


@pytest.mark.parametrize("case", ["x4", "x1"])
def test_paste_back_matches_the_official_helper(case):
    from _face_standins import FixedParser, InvertingRestorer

    folder = Path(__file__).with_name("data") / "faces"
    meta = json.loads((folder / "official.json").read_text())
    info = meta["cases"][case]
    lq = np.asarray(Image.open(folder / f"{case}_input.png").convert("RGB"))
    expected = np.asarray(Image.open(folder / f"{case}_official.png").convert("RGB"))
    pipe = FacePipeline(ResizingRestorer(), InvertingRestorer(), FixedDetector(meta["faces"]),
                        parsing.FaceParser(FixedParser(), "parsenet"))
    out = pipe(lq, RestoreSettings(upscale=info["upscale"]))
    faces = out.faces[0]
    assert len(faces) == info["faces"]
    assert np.array_equal(np.array([f.landmarks for f in faces]), np.array(info["landmarks"]))  # float32 as upstream
    got = out.pixels[0]
    assert got.shape == expected.shape
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() == 0, f"{(diff > 0).sum()} pixels differ, by at most {diff.max()}"  # bit-exact
