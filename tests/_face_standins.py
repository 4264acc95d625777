"""Stand-ins for the face tests: a detector that "finds" faces at known places, and a synthetic photo.

`FixedDetector(faces)` returns facexlib's RetinaFace.detect_faces layout, (N, 15): box, score, five
landmarks, for faces given as fractions of the image it is handed (so the same faces come back whether
the pipeline enlarged the image first or not).
"""

from __future__ import annotations

import numpy as np
import torch

from restorecli.faces.alignment import FFHQ_TEMPLATE_512


def template_face(cx: float, cy: float, scale: float, angle_deg: float = 0.0) -> np.ndarray:
    """Five landmarks: the FFHQ template scaled by `scale`, rotated by `angle_deg` about its centre and
    centred at (cx, cy) (fractions of the width and height)."""
    t = FFHQ_TEMPLATE_512 - FFHQ_TEMPLATE_512.mean(axis=0)
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (t @ rot.T) * scale, np.array([cx, cy])


class FixedDetector:
    """`faces`: list of (cx, cy, size, angle) with cx, cy fractions of the image and size the eye
    distance as a fraction of the image width."""

    def __init__(self, faces, score: float = 0.99):
        self.faces = list(faces)
        self.score = score
        self.seen: list[tuple[int, int]] = []

    def detect_faces(self, image, conf_threshold=0.8, nms_threshold=0.4, use_origin_size=True):
        h, w = image.shape[:2]
        self.seen.append((h, w))
        rows = []
        for cx, cy, size, angle in self.faces:
            eye = np.linalg.norm(FFHQ_TEMPLATE_512[1] - FFHQ_TEMPLATE_512[0])
            pts, centre = template_face(cx, cy, size * w / eye, angle)
            pts = pts + centre * [w, h]
            x1, y1 = pts.min(axis=0) - size * w
            x2, y2 = pts.max(axis=0) + size * w
            rows.append([x1, y1, x2, y2, self.score, *pts.reshape(-1)])
        return np.array(rows, dtype=np.float32).reshape(-1, 15)


def synthetic_photo(h: int = 96, w: int = 128, seed: int = 0, noise: float = 8.0) -> np.ndarray:
    """A smooth colourful RGB uint8 image with some texture (no real face: the detector is a stand-in)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), 128 + 60 * np.sin((x + y) / 13)], -1)
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


class ResizingRestorer:
    """A restorer stand-in with DiffBIRPipeline's call: the image PIL-bicubic resized by `upscale`
    (identity at upscale 1), so a face "restored" by it is its own crop. `fail_on` names sources
    (substrings) whose call raises, as an out-of-memory restoration would."""

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.calls: list[str | None] = []
        self.captioner = None

    def __call__(self, rgb, settings, *, output_type="pt", on_step=None, source=None, caption=None,
                 return_guidance_map=False):
        import torch

        from restorecli.pipeline.diffbir import DiffBIROutput
        from restorecli.stage1.run import pre_upscale

        self.calls.append(source)
        if self.fail_on and source and self.fail_on in source:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        out = pre_upscale(rgb, settings.upscale)
        top = 255.0 if out.dtype == np.uint8 else 65535.0 if out.dtype == np.uint16 else 1.0
        x = torch.from_numpy(out.astype(np.float32) / top).permute(2, 0, 1)[None]
        if on_step is not None:
            on_step(1, 1)
        return DiffBIROutput(images=x, seeds=[settings.sampler.seed], captions=[caption], prompts=[None])


def label_map() -> np.ndarray:
    """A fixed 512x512 ParseNet label map: hair (13) on top, skin (1) in an ellipse with eyes (4, 5),
    nose (2) and mouth (10), neck (17) and cloth (18) below, background (0) elsewhere."""
    import cv2

    labels = np.zeros((512, 512), np.uint8)
    cv2.ellipse(labels, (256, 200), (200, 150), 0, 180, 360, 13, -1)
    cv2.rectangle(labels, (190, 380), (322, 470), 17, -1)
    cv2.rectangle(labels, (60, 470), (452, 512), 18, -1)
    cv2.ellipse(labels, (256, 290), (170, 210), 0, 0, 360, 1, -1)
    for (x, y), c in (((193, 240), 4), ((319, 240), 5)):
        cv2.ellipse(labels, (x, y), (28, 14), 0, 0, 360, c, -1)
    cv2.ellipse(labels, (256, 314), (22, 30), 0, 0, 360, 2, -1)
    cv2.ellipse(labels, (257, 371), (56, 18), 0, 0, 360, 10, -1)
    return labels


class FixedParser(torch.nn.Module):
    """A parsing network stand-in: one-hot logits of `label_map()` whatever the face (ParseNet's
    output layout: (mask logits, image))."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("onehot", torch.nn.functional.one_hot(torch.from_numpy(label_map()).long(), 19)
                             .permute(2, 0, 1)[None].float())

    def forward(self, x):
        return self.onehot.to(x.device) + 0 * self.anchor, None


def invert_face(face: np.ndarray) -> np.ndarray:
    """The "restoration" the golden data uses for faces: the crop's negative (8-bit)."""
    return 255 - face


class InvertingRestorer(ResizingRestorer):
    """`invert_face` with DiffBIRPipeline's call (float result whose official 8-bit truncation is exact)."""

    def __call__(self, rgb, settings, **kw):
        out = super().__call__(rgb, settings, **kw)
        out.images = (torch.from_numpy(invert_face(rgb).astype(np.float32) + 0.5) / 255).permute(2, 0, 1)[None]
        return out
