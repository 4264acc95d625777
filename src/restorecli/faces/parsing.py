"""Face-parsing masks: where a restored face replaces the background when it is pasted back.

`parsenet` is DiffBIR's (FaceRestoreHelper.paste_faces_to_input_image with `use_parse=True`, facexlib
0.3.0): ParseNet (`facexlib/parsing/parsenet.py`, 19 classes) on the restored 512x512 face, classes
mapped to 0/255 by MASK_COLORMAP, blurred twice (GaussianBlur 101, sigma 11), a 10-pixel border zeroed,
/255. `bisenet` is facexlib's BiSeNet (face-parsing.PyTorch labels, ImageNet normalisation as
facexlib's inference_parsing.py) with the same face classes kept; `none` is a soft ellipse over the
template face, blurred the same way, for when no parsing network may be used.

As the detector, the networks see the channels swapped (DiffBIR passes RGB where facexlib expects BGR
and converts with `bgr2rgb=True`); this module does the same.
"""

from __future__ import annotations

import numpy as np
import torch

from .alignment import FACE_SIZE

#: ParseNet (PSFRGAN) labels -> mask: 0 background, 14 hat, 16 necklace, 17 neck, 18 cloth are not face
#: (DiffBIR diffbir/utils/face.py MASK_COLORMAP).
PARSENET_COLORMAP = (0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0)
#: BiSeNet (CelebAMask-HQ) labels -> the same face parts: 0 background, 14 neck, 15 necklace, 16 cloth,
#: 18 hat are not face; skin, brows, eyes, glasses, ears, earrings, nose, mouth, lips and hair are.
BISENET_COLORMAP = (0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 0, 255, 0)
BLUR_SIZE, BLUR_SIGMA, BORDER = 101, 11, 10


def build_parser(name: str) -> torch.nn.Module:
    """facexlib's ParseNet(512, 512, 19) or BiSeNet(19), randomly initialised, in eval mode."""
    try:
        if name == "parsenet":
            from facexlib.parsing.parsenet import ParseNet

            return ParseNet(in_size=512, out_size=512, parsing_ch=19).eval()
        if name == "bisenet":
            from facexlib.parsing.bisenet import BiSeNet

            return BiSeNet(num_class=19).eval()
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from ..errors import SetupError

        raise SetupError("`task` unaligned_face needs facexlib: pip install 'restorecli[faces]'") from exc
    raise ValueError(f"unknown face parser {name!r}; one of parsenet, bisenet")


def load_parser(path, name: str = "parsenet", device: torch.device | str = "cpu") -> "FaceParser":
    """A FaceParser from an official-layout file (facexlib's release assets), loaded safely and strictly."""
    from ..models.safe_load import load_state_dict

    net = build_parser(name)
    net.load_state_dict(load_state_dict(path), strict=True)
    return FaceParser(net.to(device).eval(), name)


class FaceParser:
    """`mask(face)`: the soft parsing mask (FACE_SIZE x FACE_SIZE float64 in [0, 1]) of a restored face."""

    def __init__(self, net: torch.nn.Module | None, name: str):
        self.net = net
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device if self.net is not None else torch.device("cpu")

    def to(self, device) -> "FaceParser":
        if self.net is not None:
            self.net.to(device)
        return self

    def labels(self, face: np.ndarray) -> np.ndarray:
        """Per-pixel class of a face (HWC, uint8/uint16/float), resized to 512 with cv2 INTER_LINEAR."""
        import cv2

        top = 255.0 if face.dtype == np.uint8 else 65535.0 if face.dtype == np.uint16 else 1.0
        x = cv2.resize(face, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32) / top
        x = torch.from_numpy(np.ascontiguousarray(x[..., ::-1].transpose(2, 0, 1))).float()  # img2tensor(bgr2rgb=True)
        if self.name == "bisenet":
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        else:
            mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5])
        x = ((x - mean[:, None, None]) / std[:, None, None]).unsqueeze(0).to(self.device)
        with torch.no_grad():
            out = self.net(x)[0]
        return out.argmax(dim=1).squeeze().cpu().numpy()

    def mask(self, face: np.ndarray) -> np.ndarray:
        if self.net is None:
            return ellipse_mask()
        colormap = BISENET_COLORMAP if self.name == "bisenet" else PARSENET_COLORMAP
        labels = self.labels(face)
        raw = np.zeros(labels.shape)
        for index, value in enumerate(colormap):
            raw[labels == index] = value
        return soften(raw)


def soften(raw: np.ndarray) -> np.ndarray:
    """The official treatment of a 0/255 mask: GaussianBlur(101, sigma 11) twice, the 10-pixel border
    zeroed, /255, resized to the face size (cv2 default, bilinear)."""
    import cv2

    mask = cv2.GaussianBlur(raw, (BLUR_SIZE, BLUR_SIZE), BLUR_SIGMA)
    mask = cv2.GaussianBlur(mask, (BLUR_SIZE, BLUR_SIZE), BLUR_SIGMA)
    mask[:BORDER, :] = 0
    mask[-BORDER:, :] = 0
    mask[:, :BORDER] = 0
    mask[:, -BORDER:] = 0
    mask = mask / 255.0
    return cv2.resize(mask, (FACE_SIZE, FACE_SIZE))


def ellipse_mask() -> np.ndarray:
    """`face_parser` none: an ellipse over the template face (centre (256, 288), semi-axes 180 x 225 px:
    brows to chin, ear to ear at 512x512), softened like a parsing mask."""
    import cv2

    raw = np.zeros((512, 512), dtype=np.float64)
    cv2.ellipse(raw, (256, 288), (180, 225), 0, 0, 360, 255.0, thickness=-1)
    return soften(raw)


def no_parser() -> FaceParser:
    return FaceParser(None, "none")
