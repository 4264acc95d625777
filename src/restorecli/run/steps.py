"""The three steps of restoring one file: read (decode), run the model, write (encode, atomically).

`run.loop` chains them for every file of a run (reads and writes on a small thread pool, the model in
the calling thread); they know nothing of folders, naming or reporting. `FileResult` is what a file's
run comes to (ok, skipped, failed with a one-line reason); `Restored` is the model's result for one
image with what its output keeps (alpha, ICC profile, EXIF) and, with `--save-guidance-map`, the
region weight map of restoration guidance (DiffBIR utils/cond_fn.py) to write beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..settings import RestoreSettings


@dataclass
class FileResult:
    input: str
    output: str | None
    status: str  # ok | skipped | failed
    error: str | None = None
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    caption: str | None = None  # the image's caption (None: no captioner, or not restored)
    prompt: str | None = None  # the positive prompt it was conditioned on
    caption_source: str | None = None  # the captioner's name, or the captions file the caption came from
    captioner_revision: str | None = None
    device: str | None = None  # where it was restored, in a run over several devices or a cluster
    worker: int | None = None  # which of that run's workers (devices listed twice, Ray actors)
    faces: int | None = None  # `task` unaligned_face: faces detected (None for the other tasks)
    face_crops: list[str] | None = None  # with `save_faces`: the crop files written

    def as_json(self) -> dict:
        record = {
            "input": self.input, "output": self.output, "status": self.status, "error": self.error,
            "seconds": round(self.seconds, 3), "width": self.width, "height": self.height, "seed": self.seed,
            "caption": self.caption, "prompt": self.prompt,
        }
        if self.faces is not None:
            record["faces"] = self.faces
        if self.face_crops is not None:
            record["face_crops"] = self.face_crops
        if self.device is not None:
            record.update(device=self.device, worker=self.worker)
        return record


@dataclass
class Restored:
    """The model's result for one image, ready to encode: pixels at the input's bit depth, alpha
    resized to match, and the colour profile and EXIF the output keeps."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    icc_profile: bytes | None
    exif: bytes | None
    seed: int
    guidance_map: np.ndarray | None = None  # HxW in [0, 1], with `--save-guidance-map`
    guidance_map_path: str | None = None
    caption: str | None = None
    prompt: str | None = None
    caption_source: str | None = None
    captioner_revision: str | None = None
    faces: int | None = None  # unaligned_face: faces detected
    face_crops: list[tuple[str, np.ndarray]] | None = None  # with `save_faces`: (path, crop) to write

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


# -- the three steps of one file -----------------------------------------------------------------


def read_input(path: str):
    """Step 1: the decoded image (`images.LoadedImage`); InputError for a bad file."""
    from ..images import read_image

    return read_image(path)


def run_model(pipe, image, settings: RestoreSettings, *, on_step=None, source: str | None = None,
              guidance_map: str | None = None, caption: str | None = None, caption_source: str | None = None) -> Restored:
    """Step 2: the pipeline on one decoded image (the only step that uses the device). With
    `guidance_map` (where `--save-guidance-map` writes this image's map) the map comes back too.
    `caption` (from `caption_source`, a captions file) replaces the pipeline's captioner for this image."""
    from ..images import from_float, resize_alpha, to_gray

    map_path = guidance_map
    out = pipe(image.rgb, settings, output_type="pt", on_step=on_step, source=source,
               return_guidance_map=map_path is not None, caption=caption)
    exact = getattr(out, "pixels", None)  # a FacePipeline's result at the input's depth
    if exact and exact[0].dtype == (np.uint8 if image.bit_depth == 8 else np.uint16):
        pixels = exact[0]
    else:
        pixels = from_float(out.images[0].permute(1, 2, 0).float().cpu().numpy(), image.bit_depth)
    if image.is_gray:  # a grayscale scan comes back grayscale (the model's three channels, as luminance)
        pixels = to_gray(pixels)
    height, width = pixels.shape[:2]
    alpha = resize_alpha(image.alpha, (width, height)) if image.alpha is not None else None
    weights = None if map_path is None else out.guidance_maps[0, 0].float().cpu().numpy()
    captioner = getattr(pipe, "captioner", None)
    if caption is None and captioner is not None:
        caption_source, revision = captioner.name, captioner.revision
    else:
        revision = None
    used = out.captions[0] if getattr(out, "captions", None) else None
    if used is None:
        caption_source = None
    prompt = out.prompts[0] if getattr(out, "prompts", None) else None
    faces = getattr(out, "faces", None)
    crops = None
    if faces is not None and settings.faces.save_faces is not None:
        crops = face_crop_files(settings.faces.save_faces, source or "stdin", faces[0], image.is_gray)
    return Restored(pixels, alpha, image.output_icc_profile, image.exif, settings.sampler.seed, weights, map_path,
                    used, prompt, caption_source, revision, len(faces[0]) if faces is not None else None, crops)


def face_crop_files(folder: str, source: str, faces, gray: bool = False) -> list[tuple[str, np.ndarray]]:
    """`<stem>_face<k>_lq.png` and `<stem>_face<k>_restored.png` in `folder` for each face k (detection
    order, from 0; a face that failed has no `_restored`)."""
    from ..images import to_gray

    stem = Path(source).stem if source != "-" else "stdin"
    files = []
    for face in faces:
        for tag, crop in (("lq", face.lq), ("restored", face.restored)):
            if crop is None:
                continue
            if crop.dtype not in (np.uint8, np.uint16):
                crop = np.clip(np.rint(crop * 65535.0), 0, 65535).astype(np.uint16)
            files.append((str(Path(folder) / f"{stem}_face{face.index}_{tag}.png"), to_gray(crop) if gray else crop))
    return files


def write_output(dest: str | BinaryIO, restored: Restored, *, fmt: str | None, quality: int, overwrite: bool) -> None:
    """Step 3: encode and write atomically (a path) or in one piece (a stream); OutputError on failure."""
    from ..images import write_image

    for path, crop in restored.face_crops or ():
        # before the image itself, so a finished output means its crops are there (resume); a rerun
        # rewrites them (they belong to this input only)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_image(path, crop, overwrite=True)
    write_image(
        dest, restored.pixels, alpha=restored.alpha, fmt=fmt, quality=quality, icc_profile=restored.icc_profile,
        exif=restored.exif, overwrite=overwrite,
    )
    if restored.guidance_map_path is not None and restored.guidance_map is not None:
        write_guidance_map(restored.guidance_map_path, restored.guidance_map, overwrite=overwrite)


def write_guidance_map(path: str, weight: np.ndarray, *, overwrite: bool) -> None:
    """The region weight map (HxW in [0, 1]) as an 8-bit grayscale image (rounded), atomically."""
    from ..images import write_image

    gray = np.clip(np.rint(weight * 255.0), 0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_image(path, gray, overwrite=overwrite)
