"""Pasting restored faces back (FaceRestoreHelper.paste_faces_to_input_image of facexlib 0.3.0, as in
DiffBIR `diffbir/utils/face.py`, with upscale_factor 1, no face upsampler, no boxes drawn).

For each face, in detection order, over the background resized (cv2 INTER_LANCZOS4) to the image the
faces were found in:

    inv_face  = warpAffine(face, inverse_affine, (w, h))                       # bilinear, border 0
    square    = erode(warpAffine(ones(512, 512), inverse_affine, (w, h)), ones(2, 2))
    w_edge    = int(sqrt(sum(square))) // 20
    soft      = GaussianBlur(erode(square, ones(2 w_edge, 2 w_edge)), (2 w_edge + 1,) * 2, 0)
    parse     = warpAffine(parse_mask, inverse_affine, (w, h), flags=INTER_AREA)
    mask      = min(parse, soft)
    image     = mask * square * inv_face + (1 - mask) * image

Values stay in the image's units (0..255 for 8-bit images) in float64; the caller rounds (8 bits: the
official `astype(uint8)` truncation).
"""

from __future__ import annotations

import numpy as np


def resize_background(background: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(background, (w, h), INTER_LANCZOS4) to `size` = (h, w) (the official always resizes;
    to the same size it is the identity)."""
    import cv2

    h, w = size
    src = background if background.dtype in (np.uint8, np.uint16) else background.astype(np.float32)
    if src.shape[:2] == (h, w):
        return src
    return cv2.resize(src, (w, h), interpolation=cv2.INTER_LANCZOS4)


def soft_square_mask(inverse_affine: np.ndarray, size: tuple[int, int], face_size: int = 512):
    """(square, soft): the eroded warped square and its eroded, blurred version (float32, HxW)."""
    import cv2

    h, w = size
    inv_mask = cv2.warpAffine(np.ones((face_size, face_size), dtype=np.float32), inverse_affine, (w, h))
    square = cv2.erode(inv_mask, np.ones((2, 2), np.uint8))
    w_edge = int(np.sum(square) ** 0.5) // 20
    center = cv2.erode(square, np.ones((w_edge * 2, w_edge * 2), np.uint8))
    soft = cv2.GaussianBlur(center, (w_edge * 2 + 1, w_edge * 2 + 1), 0)
    return square, soft


def paste_face(image: np.ndarray, face: np.ndarray, inverse_affine: np.ndarray, parse_mask: np.ndarray) -> np.ndarray:
    """One face blended into `image` (HWC, any numeric dtype; returns float64 in the same units)."""
    import cv2

    h, w = image.shape[:2]
    src = face if face.dtype in (np.uint8, np.uint16) else face.astype(np.float32)
    inv_face = cv2.warpAffine(src, inverse_affine, (w, h))
    square, soft = soft_square_mask(inverse_affine, (h, w), face.shape[0])
    pasted = square[:, :, None] * inv_face
    parse = cv2.warpAffine(parse_mask, inverse_affine, (w, h), flags=3)[:, :, None]
    soft = soft[:, :, None]
    mask = np.where(parse < soft, parse, soft)
    return mask * pasted + (1 - mask) * image


def paste_faces(background: np.ndarray, faces, inverse_affines, parse_masks) -> np.ndarray:
    """Every face pasted in turn into `background` (already at the detection image's size)."""
    image = background
    for face, inverse, mask in zip(faces, inverse_affines, parse_masks):
        image = paste_face(image, face, inverse, mask)
    return np.asarray(image, dtype=np.float64)
