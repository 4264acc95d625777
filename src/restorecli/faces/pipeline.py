"""`FacePipeline`: whole photos with faces, as DiffBIR's unaligned-face loop
(`diffbir/inference/unaligned_bfr_loop.py`, UnAlignedBFRInferenceLoop), composed of two restorers.

    from restorecli import FacePipeline
    pipe = FacePipeline.from_version("v2.1")           # or .from_description("model.json"), .from_settings(load)
    out = pipe(photo, upscale=2)
    out.images[0], out.faces[0]        # the result; each face's crop before/after, box, landmarks

Per image (8-bit inputs reproduce the official arithmetic; 16-bit and float inputs keep their depth):

1. The input, bicubic-upscaled by `upscale` (PIL), and enlarged with cv2 INTER_LINEAR to a short side
   of 512 if smaller (FaceRestoreHelper.read_image), is the image faces are found in.
2. RetinaFace finds the faces (`restorecli.faces.detection`); each is warped to the 512x512 FFHQ
   template (`restorecli.faces.alignment`).
3. Each crop is restored by `face` (a DiffBIRPipeline with the face SwinIR, upscale 1, its own caption),
   one after another, each its own image for the memory plan and the out-of-memory retry. A face whose
   restoration fails is left out (a warning): the background keeps its own restoration there.
4. `background` (the version's cleaner and pipeline: v2 BSRNet, v2.1 Real-ESRGAN SwinIR) restores the
   whole input.
5. The restored faces are pasted into the restored background (LANCZOS4-resized to the detection image)
   with the parsing mask (`restorecli.faces.paste`); 8 bits: the official `astype(uint8)`.
6. Fixed here: with no face the background restoration is the result (upstream writes nothing), and the
   result has the requested size int(H*upscale) x int(W*upscale) (upstream returns the detection image's
   size, larger when its short side was below 512; we shrink it back with cv2 INTER_AREA).

Why a composition, not a flag on DiffBIRPipeline: the two restorers differ only in their cleaner and
share every stage-2 module (one copy of the weights, one placement, one prompt cache), and each face is
exactly an aligned-face restoration, so `face` is the same object a `task` face run uses and every
guarantee of DiffBIRPipeline (seeds, tiles, memory plan, retry) holds per face without a second code path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import RestoreError, UsageError, brief
from ..pipeline.diffbir import DiffBIROutput, DiffBIRPipeline, _as_rgb_array
from ..settings import RestoreSettings
from ..stage1.run import output_size_for, pre_upscale
from .alignment import align_face, estimate_affine, helper_image, invert_affine
from .detection import DetectedFace, detect_faces
from .parsing import FaceParser, no_parser
from .paste import paste_faces, resize_background

log = logging.getLogger("restorecli.faces")


@dataclass
class RestoredFace:
    """One detected face: where it is (in the detection image: the input upscaled, short side >= 512),
    its aligned 512x512 crop before (`lq`) and after (`restored`, None when it failed: `error`), at the
    input's depth (uint8, uint16 or float32 HWC), and its caption and prompt."""

    index: int
    box: np.ndarray
    score: float
    landmarks: np.ndarray
    affine: np.ndarray
    lq: np.ndarray
    restored: np.ndarray | None = None
    error: str | None = None
    caption: str | None = None
    prompt: str | None = None


@dataclass
class FaceOutput(DiffBIROutput):
    """DiffBIROutput plus `faces` (per image: its RestoredFace list, detection order), `background` (the
    restored background before pasting, same type as `images`) and `pixels` (the result at the input's
    depth: uint8 / uint16 / float32 HWC, exactly what a file gets). `stage1` is the background's stage-1
    image with output_type "pt" only (None otherwise); guidance maps, captions and prompts are the
    background's (each face's caption and prompt are on its RestoredFace)."""

    faces: list[list[RestoredFace]] = field(default_factory=list)
    background: Any = None
    pixels: list[np.ndarray] = field(default_factory=list)


def _top(dtype) -> float:
    return 255.0 if dtype == np.uint8 else 65535.0 if dtype == np.uint16 else 1.0


def _to_8bit(image: np.ndarray) -> np.ndarray:
    """What the detector sees: the image in 8 bits (16-bit and float images rounded)."""
    if image.dtype == np.uint8:
        return image
    top = _top(image.dtype)
    return np.clip(np.rint(image.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)


def _units(restored: torch.Tensor, dtype) -> np.ndarray:
    """A pipeline's (1, 3, H, W) float result in the input's units: 8 bits the official truncation
    (uint8), 16 bits and float unrounded (float32 in 0..65535 / 0..1)."""
    x = restored[0].permute(1, 2, 0).float().cpu().numpy()
    if dtype == np.uint8:
        from ..images import from_float

        return from_float(x, 8)
    return np.clip(x, 0, 1) * np.float32(_top(dtype))


def _finish(image: np.ndarray, dtype) -> np.ndarray:
    """The pasted float image -> the input's depth (8 bits: `astype(uint8)` as upstream)."""
    if dtype == np.uint8:
        return np.clip(image, 0, 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.clip(np.rint(image), 0, 65535).astype(np.uint16)
    return np.clip(image, 0, 1).astype(np.float32)


class FacePipeline:
    """`background` restores the whole photo, `face` each aligned face; `detector` finds the faces
    (facexlib's RetinaFace or anything with its `detect_faces`), `parser` masks the paste-back."""

    def __init__(self, background: DiffBIRPipeline, face: DiffBIRPipeline, detector, parser: FaceParser | None = None,
                 default_settings: RestoreSettings | None = None):
        self.background = background
        self.face = face
        self.detector = detector
        self.parser = parser if parser is not None else no_parser()
        self.default_settings = default_settings or getattr(background, "default_settings", None) or RestoreSettings()

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, load, *, stage1_only: bool = False, torch_dtype: torch.dtype | None = None,
                      progress: Callable | None = None) -> "FacePipeline":
        """The pipeline a `LoadSettings` with `task` unaligned_face describes (CLI, batch, library)."""
        from ..pipeline.loading import load_components

        if load.task != "unaligned_face":
            raise UsageError(f"FacePipeline is for `task` unaligned_face, got {load.task!r}")
        parts = load_components(load, stage1_only=stage1_only, torch_dtype=torch_dtype, progress=progress)
        background = DiffBIRPipeline.from_components(parts, load)
        face = background.sharing_stage2(parts.face_cleaner, "swinir")
        return cls(background, face, parts.face_detector, parts.face_parser)

    @classmethod
    def from_version(cls, version: str = "v2.1", **options) -> "FacePipeline":
        """The pinned `version` (v2 or v2.1; v1 has no unaligned-face model) with `task` unaligned_face;
        `options` as DiffBIRPipeline.from_version plus `face_detector`, `face_parser`."""
        if version not in ("v1", "v2", "v2.1"):
            raise UsageError(f"`version` must be v2 or v2.1, got {version!r} (a description file: from_description)")
        return cls._load(version, **options)

    @classmethod
    def from_description(cls, path, **options) -> "FacePipeline":
        """A `restorecli-model/1` JSON file: its cleaner restores the background and the faces."""
        return cls._load(str(path), **options)

    @classmethod
    def _load(cls, model: str, *, stage1_only: bool = False, torch_dtype: torch.dtype | None = None, task=None,
              device="auto", **options) -> "FacePipeline":
        from ..settings import LoadSettings

        if task not in (None, "unaligned_face"):
            raise UsageError(f"FacePipeline is for `task` unaligned_face, got {task!r}")
        load = LoadSettings(model=model, task="unaligned_face", device=str(device), **options)
        return cls.from_settings(load, stage1_only=stage1_only, torch_dtype=torch_dtype)

    @classmethod
    def from_pipeline(cls, pipe: DiffBIRPipeline, face_cleaner, detector, parser: FaceParser | None = None) -> "FacePipeline":
        """Around a loaded DiffBIRPipeline (the background restorer) and a face cleaner (a
        `restorecli.stage1.cleaners.Cleaner`): the face restorer shares its stage-2 models."""
        return cls(pipe, pipe.sharing_stage2(face_cleaner, "swinir"), detector, parser)

    @property
    def captioner(self):
        return self.background.captioner

    @property
    def has_stage2(self) -> bool:
        return self.background.has_stage2

    @property
    def execution_device(self) -> torch.device:
        return self.background.execution_device

    def to(self, *args, **kwargs) -> "FacePipeline":
        self.background.to(*args, **kwargs)
        if self.face.cleaner is not self.background.cleaner and self.face.cleaner is not None:
            self.face.cleaner.to(*args, **kwargs)
        self.face.placement = self.background.placement
        device = self.background.execution_device
        if isinstance(self.detector, torch.nn.Module):
            from .detection import move_detector

            self.detector = move_detector(self.detector, device)
        self.parser.to(device)
        return self

    # -- the call -------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, image, settings: RestoreSettings | None = None, *, output_type: str = "np",
                 return_guidance_map: bool = False, on_step: Callable[[int, int], None] | None = None,
                 source: str | None = None, caption: str | None = None, **overrides) -> FaceOutput:
        """Restore one photo with faces (PIL image, or HWC RGB uint8/uint16/float array); the settings and
        keywords are DiffBIRPipeline's (`caption` is the background's; each face is captioned by the
        pipeline's captioner), plus `only_center_face`. `output_type` np | pt | pil as DiffBIRPipeline."""
        settings = (settings if settings is not None else self.default_settings).replace(**overrides)
        # 1. Check inputs
        if not isinstance(settings, RestoreSettings):
            raise UsageError(f"`settings` must be a restorecli.settings.RestoreSettings, got {type(settings).__name__}")
        if output_type not in ("np", "pt", "pil"):
            raise UsageError(f"`output_type` must be np, pt or pil; got {output_type!r}")
        rgb = _as_rgb_array(image)
        dtype = rgb.dtype if rgb.dtype in (np.uint8, np.uint16) else np.float32
        if dtype == np.float32:
            rgb = np.clip(rgb.astype(np.float32), 0, 1)
        # 2. The detection image: the input upscaled (PIL bicubic), short side >= 512 (cv2 INTER_LINEAR)
        work = helper_image(pre_upscale(rgb, settings.upscale))
        # 3. Detect and align
        found = detect_faces(self.detector, _to_8bit(work), only_center_face=settings.faces.only_center_face)
        faces = []
        for index, det in enumerate(found):
            affine = estimate_affine(det.landmarks)
            faces.append(RestoredFace(index, det.box, det.score, det.landmarks, affine, align_face(work, affine)))
        log.info("%s: faces: %d", source or "image", len(faces))
        parts = len(faces) + 1
        # 4. Restore each face (upscale 1, its own caption), one after another; a failure skips the face
        face_settings = settings.replace(upscale=1.0)
        for k, face in enumerate(faces):
            self._restore_face(face, face_settings, dtype, _part_progress(on_step, k, parts), source)
        # 5. Restore the background
        bg = self.background(rgb, settings, output_type="pt", return_guidance_map=return_guidance_map,
                             on_step=_part_progress(on_step, len(faces), parts), source=source, caption=caption)
        bg_units = _units(bg.images, dtype)
        # 6. Paste the faces into the background at the detection image's size, then the output size
        done = [f for f in faces if f.restored is not None]
        pasted = bg_units
        if done:
            with _monitor(self.background, "paste faces"):
                canvas = resize_background(bg_units, work.shape[:2])
                masks = [self.parser.mask(self._parse_input(f.restored, dtype)) for f in done]
                inverse = [invert_affine(f.affine) for f in done]
                pasted = _finish(paste_faces(canvas, [f.restored for f in done], inverse, masks), dtype)
                pasted = _to_size(pasted, output_size_for(*rgb.shape[:2], settings.upscale))
        pixels = _finish(pasted, dtype) if pasted.dtype != dtype else pasted
        return FaceOutput(
            images=_postprocess(pixels, output_type), stage1=bg.stage1 if output_type == "pt" else None,
            seeds=bg.seeds, guidance_maps=bg.guidance_maps, plan=bg.plan, captions=bg.captions, prompts=bg.prompts,
            tile_captions=bg.tile_captions, faces=[faces], background=[_postprocess(_finish(bg_units, dtype), output_type)[0]],
            pixels=[pixels],
        )

    def _restore_face(self, face: RestoredFace, settings: RestoreSettings, dtype, on_step, source) -> None:
        where = f"{source or 'image'} face {face.index}"
        try:
            out = self.face(face.lq, settings, output_type="pt", on_step=on_step, source=where)
        except (RestoreError, RuntimeError, ValueError) as exc:
            face.error = brief(exc, 160, with_type=False)
            log.warning("%s: restoring it failed (%s); the background is kept there", where, face.error)
            return
        face.restored = _units(out.images, dtype)
        face.caption = out.captions[0] if out.captions else None
        face.prompt = out.prompts[0] if out.prompts else None

    @staticmethod
    def _parse_input(face: np.ndarray, dtype) -> np.ndarray:
        if dtype == np.uint8:
            return face
        return (face / np.float32(_top(dtype))).astype(np.float32)


def _monitor(pipe, name: str):
    """The restorer's stage monitor (benchmarks time the paste with it), if it has one."""
    import contextlib

    monitor = getattr(pipe, "stage_monitor", None)
    return monitor(name) if monitor is not None else contextlib.nullcontext()


def _part_progress(on_step, part: int, parts: int):
    """`on_step` for part `part` of `parts` (each face, then the background) as one bar."""
    if on_step is None:
        return None

    def report(done: int, total: int) -> None:
        on_step(part * total + done, parts * total)

    return report


def _to_size(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The result at the requested size (cv2 INTER_AREA when the detection image was enlarged)."""
    import cv2

    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def _postprocess(pixels: np.ndarray, output_type: str):
    top = _top(pixels.dtype)
    x = torch.from_numpy(np.ascontiguousarray(pixels.astype(np.float32) / np.float32(top))).permute(2, 0, 1)[None]
    if output_type == "pt":
        return x
    if output_type == "np":
        return [x[0].permute(1, 2, 0).numpy()]
    from PIL import Image

    return [Image.fromarray(pixels if pixels.dtype == np.uint8 else _to_8bit(pixels))]


__all__ = ["DetectedFace", "FaceOutput", "FacePipeline", "RestoredFace"]
