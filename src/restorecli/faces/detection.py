"""Face detection: RetinaFace -> boxes, scores and five landmarks per face.

The network is facexlib's `RetinaFace` (`facexlib/detection/retinaface.py`), built here and loaded from
a verified file through `restorecli.models.safe_load` (facexlib's own `init_detection_model` would
download into its package folder and unpickle without `weights_only`). Detection follows
FaceRestoreHelper.get_face_landmarks_5 with DiffBIR's arguments (`resize=640, eye_dist_threshold=5`)
and RetinaFace.detect_faces' defaults (confidence 0.8, NMS 0.4, the image's own size).

Channel order: facexlib expects BGR arrays; DiffBIR hands it RGB ones, so the detector sees the
channels swapped. This module does the same (the landmarks are the official ones).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

#: DiffBIR's get_face_landmarks_5(resize=640, eye_dist_threshold=5)
DETECT_SHORT_SIDE = 640
EYE_DIST_THRESHOLD = 5.0
CONF_THRESHOLD = 0.8
NMS_THRESHOLD = 0.4
#: facexlib's RetinaFace network names per detector choice
NETWORKS = {"retinaface_resnet50": "resnet50", "retinaface_mobile0.25": "mobile0.25"}


class FaceDetector(Protocol):
    """What `detect_faces` needs: facexlib's RetinaFace.detect_faces signature, returning an (N, 15)
    array per detection: x1, y1, x2, y2, score, then five (x, y) landmarks."""

    def detect_faces(self, image: np.ndarray, conf_threshold: float = CONF_THRESHOLD,
                     nms_threshold: float = NMS_THRESHOLD, use_origin_size: bool = True) -> np.ndarray: ...


@dataclass(frozen=True)
class DetectedFace:
    """One face in the coordinates of the image it was detected in."""

    box: np.ndarray  # (4,) x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2): left eye, right eye, nose, left and right mouth corners

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks[0] - self.landmarks[1]))


def detect_faces(detector: FaceDetector, image: np.ndarray, *, only_center_face: bool = False,
                 resize: int = DETECT_SHORT_SIDE, eye_dist_threshold: float = EYE_DIST_THRESHOLD) -> list[DetectedFace]:
    """FaceRestoreHelper.get_face_landmarks_5: the image (8-bit HWC) enlarged with cv2 INTER_LINEAR so
    its short side is at least `resize`, detected, the boxes and landmarks scaled back; faces whose eyes
    are closer than `eye_dist_threshold` pixels dropped (side views, tiny faces); with
    `only_center_face` the one whose box centre is nearest the image centre."""
    import cv2

    h, w = image.shape[:2]
    scale = max(1.0, resize / min(h, w))
    if scale > 1:
        image = cv2.resize(image, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_LINEAR)
    with torch.no_grad():
        found = detector.detect_faces(image)
    if found is None or len(found) == 0:
        return []
    found = np.asarray(found)
    scaled = found / scale  # in the detector's float32, as upstream (the landmarks are then bit-identical)
    faces = []
    for row, raw in zip(scaled, found):
        face = DetectedFace(box=row[0:4], score=float(raw[4]), landmarks=row[5:15].reshape(5, 2))
        if eye_dist_threshold is not None and face.eye_distance < eye_dist_threshold:
            continue
        faces.append(face)
    if only_center_face and faces:
        faces = [center_face(faces, h, w)]
    return faces


def center_face(faces: list[DetectedFace], h: int, w: int) -> DetectedFace:
    """facexlib get_center_face: the face whose box centre is nearest (w/2, h/2) (first of ties)."""
    centre = np.array([w / 2, h / 2])
    dists = [np.linalg.norm(np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2]) - centre) for f in faces]
    return faces[int(np.argmin(dists))]


# -- the network --------------------------------------------------------------------------------------


def build_retinaface(name: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """facexlib's RetinaFace for `name` (retinaface_resnet50 | retinaface_mobile0.25), randomly initialised,
    in eval mode on `device` (its input mean lives on the device it was built for)."""
    try:
        from facexlib.detection.retinaface import RetinaFace
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from ..errors import SetupError

        raise SetupError("`task` unaligned_face needs facexlib: pip install 'restorecli[faces]'") from exc
    if name not in NETWORKS:
        raise ValueError(f"unknown face detector {name!r}; one of {', '.join(NETWORKS)}")
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        # torchvision deprecates the `pretrained=False` that facexlib passes to resnet50 (no weights either way)
        warnings.simplefilter("ignore", UserWarning)
        net = RetinaFace(network_name=NETWORKS[name], half=False, device=torch.device(device))
    return net.eval()


def load_detector(path, name: str = "retinaface_resnet50", device: torch.device | str = "cpu") -> torch.nn.Module:
    """RetinaFace from an official-layout file (facexlib's release assets: a bare state dict, keys maybe
    prefixed `module.`), loaded safely and strictly."""
    from ..models.safe_load import load_state_dict

    net = build_retinaface(name, device)
    state = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def move_detector(net: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """RetinaFace on another device (its input mean and `device` are plain attributes, not buffers)."""
    device = torch.device(device)
    net.to(device)
    if hasattr(net, "mean_tensor"):
        net.mean_tensor = net.mean_tensor.to(device)
        net.device = device
    return net
