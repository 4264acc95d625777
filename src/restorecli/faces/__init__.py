"""Whole photos with faces (`task` unaligned_face): detect, align, restore each face, paste it back.

DiffBIR's `diffbir/inference/unaligned_bfr_loop.py` with its `diffbir/utils/face.py` (a copy of
facexlib 0.3.0's FaceRestoreHelper), one job per module:

* `detection`: RetinaFace (facexlib's network, our verified weights) -> five landmarks per face;
* `alignment`: the FFHQ five-point template, the similarity transform and the 512x512 warp;
* `parsing`: the face-parsing mask (ParseNet, BiSeNet, or a soft ellipse);
* `paste`: the inverse warp and the official soft-mask blend into the restored background;
* `pipeline`: `FacePipeline`, a background restorer and a face restorer around the steps above.

The networks come from facexlib (the `faces` extra); only `detection` and `parsing` import it.
"""

from .alignment import FACE_SIZE, FFHQ_TEMPLATE_512, align_face, estimate_affine, invert_affine

__all__ = ["FACE_SIZE", "FFHQ_TEMPLATE_512", "align_face", "estimate_affine", "invert_affine"]
