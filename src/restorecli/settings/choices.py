"""The enumerated values of the settings, each defined once.

Settings hold the plain string values (``"edm_dpm++_3m_sde"``, ``"wavelet"``); these enums are the one
list of what is allowed, which validation, ``--help`` (click choices) and shell completion all read.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string enum whose ``str()`` is its value (Python 3.12 changed ``format`` of mixed-in enums)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Version(Choice):
    V1 = "v1"
    V2 = "v2"
    V2_1 = "v2.1"


class Task(Choice):
    SR = "sr"
    DENOISE = "denoise"
    FACE = "face"
    UNALIGNED_FACE = "unaligned_face"


class FaceDetector(Choice):
    """RetinaFace backbones (facexlib `init_detection_model` names); resnet50 is DiffBIR's."""

    RETINAFACE_RESNET50 = "retinaface_resnet50"
    RETINAFACE_MOBILE = "retinaface_mobile0.25"


class FaceParser(Choice):
    """What masks a restored face when it is pasted back: parsenet (DiffBIR's), bisenet, or none (a soft
    ellipse, no network)."""

    PARSENET = "parsenet"
    BISENET = "bisenet"
    NONE = "none"


class Sampler(Choice):
    SPACED = "spaced"
    DDIM = "ddim"
    DPMPP_M2 = "dpm++_m2"
    EDM_EULER = "edm_euler"
    EDM_EULER_A = "edm_euler_a"
    EDM_HEUN = "edm_heun"
    EDM_DPM_2 = "edm_dpm_2"
    EDM_DPM_2_A = "edm_dpm_2_a"
    EDM_LMS = "edm_lms"
    EDM_DPMPP_2S_A = "edm_dpm++_2s_a"
    EDM_DPMPP_SDE = "edm_dpm++_sde"
    EDM_DPMPP_2M = "edm_dpm++_2m"
    EDM_DPMPP_2M_SDE = "edm_dpm++_2m_sde"
    EDM_DPMPP_3M_SDE = "edm_dpm++_3m_sde"


class ColorFix(Choice):
    WAVELET = "wavelet"
    ADAIN = "adain"
    NONE = "none"


class StartPoint(Choice):
    NOISE = "noise"
    COND = "cond"


class GuidanceLoss(Choice):
    W_MSE = "w_mse"
    MSE = "mse"


class GuidanceSpace(Choice):
    LATENT = "latent"
    RGB = "rgb"


class Precision(Choice):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Captioner(Choice):
    """The named captioners (`captioner` also takes a model folder or a Hub id, so it is not a closed choice)."""

    NONE = "none"
    FLORENCE2 = "florence2"
    LLAVA = "llava"


class LlavaBit(Choice):
    """`llava_bit`: bitsandbytes NF4 (upstream's default), 8-bit, or 16-bit weights."""

    FOUR = "4"
    EIGHT = "8"
    SIXTEEN = "16"


#: `--device`: one of these, or ``cuda:N``.
DEVICES = ("auto", "cpu", "cuda", "mps")

VERSIONS = Version.values()
TASKS = Task.values()
SAMPLERS = Sampler.values()
COLOR_FIXES = ColorFix.values()
START_POINTS = StartPoint.values()
GUIDANCE_LOSSES = GuidanceLoss.values()
GUIDANCE_SPACES = GuidanceSpace.values()
PRECISIONS = Precision.values()
CAPTIONERS = Captioner.values()
LLAVA_BITS = LlavaBit.values()
