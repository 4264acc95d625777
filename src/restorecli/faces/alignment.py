"""Face alignment: five landmarks -> the 512x512 FFHQ crop, and back (facexlib 0.3.0
`utils/face_restoration_helper.py`, FaceRestoreHelper.read_image / align_warp_face / get_inverse_affine,
as copied into DiffBIR `diffbir/utils/face.py`)."""

from __future__ import annotations

import numpy as np

#: The aligned face crop is FACE_SIZE x FACE_SIZE (DiffBIR: `face_size=512`).
FACE_SIZE = 512
#: facexlib's five-point template of FFHQ at 512x512 (left eye, right eye, nose, left and right mouth
#: corners), in pixels of the crop.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float64,
)
#: The crop's fill outside the photo (`borderValue=(135, 133, 132)`, 8-bit units).
BORDER_VALUE_8BIT = (135, 133, 132)
#: read_image enlarges a photo whose short side is below this (cv2 INTER_LINEAR, f = 512 / short side).
MIN_SHORT_SIDE = 512


def _cv2():
    import cv2

    return cv2


def helper_image(rgb: np.ndarray) -> np.ndarray:
    """The image faces are detected in, cropped from and pasted into: `rgb` as is, or, when its short
    side is below 512, ``cv2.resize(rgb, (0, 0), fx=f, fy=f, INTER_LINEAR)`` with f = 512 / short side
    (FaceRestoreHelper.read_image; cv2 rounds the size)."""
    short = min(rgb.shape[:2])
    if short >= MIN_SHORT_SIDE:
        return rgb
    f = MIN_SHORT_SIDE / short
    return _cv2().resize(rgb, (0, 0), fx=f, fy=f, interpolation=_cv2().INTER_LINEAR)


def estimate_affine(landmarks: np.ndarray, template: np.ndarray = FFHQ_TEMPLATE_512) -> np.ndarray:
    """The 2x3 similarity transform (rotation, uniform scale, translation) taking the five `landmarks`
    to the template: ``cv2.estimateAffinePartial2D(landmarks, template, method=cv2.LMEDS)`` (align_warp_face)."""
    cv2 = _cv2()
    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(landmarks, dtype=np.float64), template, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("the five landmarks do not determine a similarity transform (degenerate points)")
    return matrix


def border_value(dtype) -> tuple[float, float, float]:
    """The crop's fill in the units of `dtype` (8-bit values scaled to 16 bits or to [0, 1])."""
    if dtype == np.uint8:
        return tuple(float(v) for v in BORDER_VALUE_8BIT)
    scale = 257.0 if dtype == np.uint16 else 1.0 / 255.0
    return tuple(v * scale for v in BORDER_VALUE_8BIT)


def align_face(image: np.ndarray, affine: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """``cv2.warpAffine(image, affine, (size, size), borderMode=BORDER_CONSTANT, borderValue=(135, 133, 132))``:
    bilinear, the image's own dtype (uint8 and uint16 rounded by cv2; float kept)."""
    cv2 = _cv2()
    src = image if image.dtype in (np.uint8, np.uint16) else image.astype(np.float32)
    return cv2.warpAffine(src, affine, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=border_value(src.dtype))


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """``cv2.invertAffineTransform(affine)`` (get_inverse_affine with upscale_factor 1: no extra offset)."""
    return _cv2().invertAffineTransform(affine)
