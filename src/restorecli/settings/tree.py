"""The settings of a restoration, as frozen dataclasses validated when they are made.

`RestoreSettings` is what one call of the pipeline needs (sampler, prompts, restoration guidance,
tiles and memory, stage 1); `LoadSettings` is what building a pipeline needs (model, task, cleaner,
device, precision). The field defaults are the official command line's for v2.1 `sr`; the defaults of
the other versions and tasks come from `restorecli.settings.defaults`.

A new setting is one `setting(...)` field in the group it belongs to, with a check in that group's
`__post_init__`: the CLI flag, `--help`, the pipeline keyword and the validation message follow.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import UsageError
from . import choices as C
from .spec import FACES, GUIDANCE, HARDWARE, MODEL, SAMPLING, SettingError, finite, integer, leaves, one_of, setting

#: HEAD inference.py DEFAULT_POS_PROMPT / DEFAULT_NEG_PROMPT (the "oil painting" duplicate is upstream's).
DEFAULT_POS_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing, "
    "hyper sharpness, perfect without deformations."
)
DEFAULT_NEG_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, 3D render, "
    "unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg "
    "artifacts, deformed, lowres, over-smooth."
)


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


def _tile_pair(obj, size_field: str, stride_field: str, size_name: str, stride_name: str) -> None:
    size, stride = getattr(obj, size_field), getattr(obj, stride_field)
    if size is None and stride is not None:
        raise SettingError(stride_name, f"needs `{size_name}`")
    if size is not None:
        size = integer(size_name, size)
        if size <= 0 or size % 64:
            raise SettingError(size_name, f"must be a positive multiple of 64, got {size}")
        _set(obj, size_field, size)
        if stride is not None:
            stride = integer(stride_name, stride)
            if not 0 < stride <= size:
                raise SettingError(stride_name, f"must be in (0, `{size_name}`={size}], got {stride}")
            _set(obj, stride_field, stride)


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler and its knobs (official `inference.py` names), and the seed of the image's noise."""

    sampler: str = setting(
        C.Sampler.EDM_DPMPP_3M_SDE.value, flags="--sampler", panel=SAMPLING, choices=C.Sampler,
        help="Sampler.", default_text="edm_dpm++_3m_sde; v2: spaced")
    steps: int = setting(10, flags="--steps", panel=SAMPLING, help="Sampling steps.", default_text="10; v2: 50")
    seed: int = setting(231, flags="--seed", panel=SAMPLING,
                        help="Seed of the one CPU generator that draws all noise (same seed + inputs + device = same bytes).")
    cfg: float = setting(6.0, flags="--cfg", panel=SAMPLING, default_text="6; v2: 4",
                         help="Classifier-free guidance scale (1 = no unconditional pass).")
    rescale_cfg: bool = setting(False, flags="--rescale-cfg", panel=SAMPLING,
                                help="Ramp the cfg scale from 1 (t=1000) to 1+cfg (t=0), as the official --rescale_cfg.")
    strength: float = setting(1.0, flags="--strength", panel=SAMPLING, help="Control strength: scales every IRControlNet residual.")
    start_point: str = setting(C.StartPoint.NOISE.value, flags="--start-point", panel=SAMPLING, choices=C.StartPoint,
                               help="Start from pure noise, or from the condition latent noised to t=999 (`cond`).")
    noise_aug: int = setting(0, flags="--noise-aug", panel=SAMPLING, help="Noise the condition latent to this timestep first (0 = off).")
    s_churn: float = setting(0.0, flags="--s-churn", panel=SAMPLING, help="EDM samplers: churn (extra noise per step).")
    s_tmin: float = setting(0.0, flags="--s-tmin", panel=SAMPLING, help="EDM samplers: churn only for sigma >= this.")
    s_tmax: float = setting(300.0, flags="--s-tmax", panel=SAMPLING, help="EDM samplers: churn only for sigma <= this.")
    s_noise: float = setting(1.0, flags="--s-noise", panel=SAMPLING, help="EDM samplers: noise multiplier.")
    eta: float = setting(1.0, flags="--eta", panel=SAMPLING,
                         help="Ancestral/SDE EDM samplers: amount of fresh noise (DDIM ignores it, as upstream).")
    order: int = setting(1, flags="--order", panel=SAMPLING, help="edm_lms: order of the linear multistep method.")

    def __post_init__(self):
        _set(self, "sampler", one_of("sampler", self.sampler, C.Sampler))
        _set(self, "start_point", one_of("start_point", self.start_point, C.StartPoint))
        _set(self, "rescale_cfg", bool(self.rescale_cfg))
        for name in ("cfg", "strength", "s_churn", "s_tmin", "s_tmax", "s_noise", "eta"):
            _set(self, name, finite(name, getattr(self, name)))
        for name in ("steps", "seed", "noise_aug", "order"):
            _set(self, name, integer(name, getattr(self, name)))
        if self.steps < 1:
            raise SettingError("steps", f"must be >= 1, got {self.steps}")
        if self.cfg < 0:
            raise SettingError("cfg", f"must be >= 0, got {self.cfg}")
        if not 0 <= self.strength <= 10:
            raise SettingError("strength", f"must be in [0, 10], got {self.strength}")
        if not 0 <= self.noise_aug <= 999:
            raise SettingError("noise_aug", f"must be a timestep in [0, 999], got {self.noise_aug}")
        if self.order < 1:
            raise SettingError("order", f"must be >= 1, got {self.order}")
        for name in ("eta", "s_churn", "s_noise"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be a finite number >= 0, got {getattr(self, name)}")

    @property
    def knobs(self) -> dict[str, Any]:
        """The keyword arguments every sampler family takes (`diffusion.sampling.sample`)."""
        return {"s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax, "s_noise": self.s_noise,
                "eta": self.eta, "order": self.order}


@dataclass(frozen=True)
class PromptSettings:
    """The text conditioning: positive and negative prompt (a caption of the image, where the pipeline
    has a captioner or one is given, leads the positive prompt), and per-tile captions."""

    prompt: str = setting(DEFAULT_POS_PROMPT, flags=("--prompt", "-p"), panel=SAMPLING,
                          default_text="the official long quality prompt; v2: empty", help="Positive prompt.")
    negative_prompt: str = setting(DEFAULT_NEG_PROMPT, flags=("--negative-prompt", "-n"), panel=SAMPLING,
                                   default_text="per version", help="Negative prompt (the unconditional branch of cfg).")
    tile_captions: bool = setting(False, flags="--tile-captions", panel=SAMPLING,
                                  help="Tiled sampling: caption each tile's region and condition that tile on its own "
                                       "caption + prompt (one caption per tile; upstream gives every tile the "
                                       "whole-image caption).")

    def __post_init__(self):
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise SettingError(name, f"must be a string, got {getattr(self, name)!r}")
        _set(self, "tile_captions", bool(self.tile_captions))


@dataclass(frozen=True)
class GuidanceSettings:
    """Region-adaptive restoration guidance (official v2-era `--g_*` options): `scale` 0 = off; `loss`
    w_mse | mse; `space` latent | rgb; it acts while ``stop < t + 1 < start`` (model timestep t, counting
    down from 999), `repeat` gradient steps per sampling step. Not classifier-free guidance (`cfg`)."""

    scale: float = setting(0.0, name="restoration_guidance", flags="--guidance", panel=GUIDANCE,
                           help="Restoration guidance scale: pulls the result toward the stage-1 image (0 = off).")
    loss: str = setting(C.GuidanceLoss.W_MSE.value, name="guidance_loss", flags="--guidance-loss", panel=GUIDANCE,
                        choices=C.GuidanceLoss, help="w_mse (region-adaptive: strong in flat areas, weak on edges) or mse.")
    space: str = setting(C.GuidanceSpace.LATENT.value, name="guidance_space", flags="--guidance-space", panel=GUIDANCE,
                         choices=C.GuidanceSpace, help="Compute the guidance loss on the latent or on the decoded rgb image.")
    start: int = setting(1001, name="guidance_start", flags="--guidance-start", panel=GUIDANCE,
                         help="Guide only while t < this (t counts down from 1000).")
    stop: int = setting(-1, name="guidance_stop", flags="--guidance-stop", panel=GUIDANCE, help="Guide only while t > this.")
    repeat: int = setting(1, name="guidance_repeat", flags="--guidance-repeat", panel=GUIDANCE,
                          help="Guidance gradient steps per sampling step.")

    def __post_init__(self):
        _set(self, "scale", finite("restoration_guidance", self.scale))
        if self.scale < 0:
            raise SettingError("restoration_guidance", f"must be >= 0, got {self.scale}")
        _set(self, "loss", one_of("guidance_loss", self.loss, C.GuidanceLoss))
        _set(self, "space", one_of("guidance_space", self.space, C.GuidanceSpace))
        for attr, name in (("start", "guidance_start"), ("stop", "guidance_stop"), ("repeat", "guidance_repeat")):
            _set(self, attr, integer(name, getattr(self, attr)))
        if self.start <= self.stop:
            raise SettingError("guidance_start", "must be greater than `guidance_stop` (guidance acts while stop < t < "
                               f"start, t counting down from 1000); got start {self.start}, stop {self.stop}")
        if self.repeat < 1:
            raise SettingError("guidance_repeat", f"must be >= 1, got {self.repeat}")

    @property
    def enabled(self) -> bool:
        return self.scale > 0

    def active_at(self, model_t: float) -> bool:
        """``stop < t_now < start`` (strict) with ``t_now = model_t + 1`` (official `apply_cond_fn`)."""
        t_now = model_t + 1
        return self.stop < t_now < self.start


def parse_size(text: str | int | None) -> int | None:
    """'8GB', '512MiB', '2.5G', '1000000' -> bytes (powers of 1024 for every unit)."""
    import re

    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise SettingError("max_memory", f"must look like 8GB, 512MB or a byte count; got {text!r}")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


@dataclass(frozen=True)
class TileSettings:
    """Tiles and memory: explicit tiles (pixels) for sampling and stage 1, and the memory cap every stage
    plans its automatic tiles for (bytes; None = what the device has free)."""

    tile_size: Optional[int] = setting(None, flags="--tile-size", panel=HARDWARE, default_text="automatic",
                                       help="Tiled sampling: tile size in pixels (multiple of 64).")
    tile_stride: Optional[int] = setting(None, flags="--tile-stride", panel=HARDWARE, default_text="tile size / 2",
                                         help="Tiled sampling: tile stride in pixels.")
    cleaner_tile_size: Optional[int] = setting(None, flags="--cleaner-tile-size", panel=HARDWARE, default_text="automatic",
                                               help="Tiled stage 1: tile size in pixels (multiple of 64).")
    cleaner_tile_stride: Optional[int] = setting(None, flags="--cleaner-tile-stride", panel=HARDWARE,
                                                 default_text="tile size / 2", help="Tiled stage 1: tile stride in pixels.")
    max_memory: Optional[int] = setting(None, flags="--max-memory", panel=HARDWARE, parse=parse_size, metavar="SIZE",
                                        default_text="what the device has free",
                                        help="Cap on the memory tiling plans for, e.g. 8GB.")

    def __post_init__(self):
        _tile_pair(self, "tile_size", "tile_stride", "tile_size", "tile_stride")
        _tile_pair(self, "cleaner_tile_size", "cleaner_tile_stride", "cleaner_tile_size", "cleaner_tile_stride")
        if self.max_memory is not None:
            size = parse_size(self.max_memory) if isinstance(self.max_memory, str) else integer("max_memory", self.max_memory)
            if size <= 0:
                raise SettingError("max_memory", f"must be > 0, got {size}")
            _set(self, "max_memory", size)


@dataclass(frozen=True)
class FaceSettings:
    """`task` unaligned_face, per image: which detected faces are restored, and where the aligned crops
    go. The pipeline returns every crop (before and after) in its output; `save_faces` is read by the
    file runner (`restore IMAGE...`, `restore batch`), which writes them there."""

    only_center_face: bool = setting(False, flags="--only-center-face", panel=FACES,
                                     help="Restore only the detected face nearest the image centre (facexlib's "
                                          "only_center_face); the others keep the background's restoration.")
    save_faces: Optional[str] = setting(None, flags="--save-faces", panel=FACES, metavar="DIR", default_text="off",
                                        help="Also write each aligned 512x512 face crop before and after restoration "
                                             "to DIR, as STEM_faceK_lq.png and STEM_faceK_restored.png (K = 0, 1, ... "
                                             "in detection order).")

    def __post_init__(self):
        _set(self, "only_center_face", bool(self.only_center_face))
        if self.save_faces is not None:
            if not isinstance(self.save_faces, str) or not self.save_faces.strip():
                raise SettingError("save_faces", f"must name a folder, got {self.save_faces!r}")


@dataclass(frozen=True)
class RestoreSettings:
    """Everything one restoration call needs. Make variants with `replace(name=value, ...)` (flat names,
    as `DiffBIRPipeline.__call__` takes them: `steps`, `restoration_guidance`, `tile_size`...)."""

    upscale: float = setting(4.0, flags=("--upscale", "-s"), panel=MODEL, default_text="4 for sr, 1 for denoise/face",
                             help="Output size relative to the input.")
    stage1_only: bool = setting(False, flags="--stage1-only", panel=MODEL,
                                help="Write the stage-1 (degradation removal) result and stop; no diffusion weights needed.")
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    prompts: PromptSettings = field(default_factory=PromptSettings)
    color_fix: str = setting(C.ColorFix.WAVELET.value, flags="--color-fix", panel=SAMPLING, choices=C.ColorFix,
                             help="Colour correction toward the stage-1 image.")
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    tiles: TileSettings = field(default_factory=TileSettings)
    faces: FaceSettings = field(default_factory=FaceSettings)

    def __post_init__(self):
        _set(self, "upscale", finite("upscale", self.upscale))
        if not 0 < self.upscale <= 16:
            raise SettingError("upscale", f"must be in (0, 16], got {self.upscale}")
        _set(self, "stage1_only", bool(self.stage1_only))
        _set(self, "color_fix", one_of("color_fix", self.color_fix, C.ColorFix))

    def replace(self, **overrides) -> "RestoreSettings":
        return replace_settings(self, overrides)

    def flat(self) -> dict[str, Any]:
        return flat_settings(self)


@dataclass(frozen=True)
class LoadSettings:
    """What a pipeline is built from: the model and task, the cleaner, the captioner, where weights are, the
    hardware. `captioner` None means the version's default (`restorecli.settings.default_captioner`)."""

    model: str = setting("v2.1", flags=("--model", "-m"), panel=MODEL,
                         help="Model version (v1, v2, v2.1) or a model description JSON file.")
    task: str = setting(C.Task.SR.value, flags="--task", panel=MODEL, choices=C.Task,
                        help="What to restore: sr (blind super-resolution), denoise, face (aligned 512x512 faces), "
                             "unaligned_face (whole photos with faces: each face is detected, aligned, restored "
                             "as a face and pasted back into the restored background; v2, v2.1 and model files).")
    cleaner: Optional[str] = setting(None, flags="--cleaner", panel=MODEL, default_text="the version's cleaner",
                                     help="Stage-1 model: a pinned cleaner name (see `restore weights list`) or any "
                                          "image-to-image model file spandrel loads (Real-ESRGAN, SwinIR, HAT, DAT, SCUNet...).")
    weights_dir: Optional[str] = setting(None, flags="--weights-dir", panel=MODEL, envvar="RESTORE_WEIGHTS_DIR",
                                         help="Folder of checkpoint files you already have (found by file name, verified by sha256).")
    device: str = setting("auto", flags="--device", panel=HARDWARE, help="auto, cpu, cuda (or cuda:N) or mps.")
    precision: str = setting(C.Precision.AUTO.value, flags="--precision", panel=HARDWARE, choices=C.Precision,
                             help="Precision of the networks; auto = fp16 on CUDA, bf16 on CPUs with bf16 instructions "
                                  "(AVX512-BF16/AMX), fp32 elsewhere. fp32 on the CPU reproduces the official code "
                                  "bit for bit.")
    captioner: Optional[str] = setting(
        None, flags="--captioner", panel=SAMPLING, metavar="NAME|DIR|HUB_ID", default_text="florence2; v2: none",
        help="Vision-language model whose short description of each image leads the prompt: florence2 (Florence-2 "
             "base), llava (upstream's default, LLaVA-1.5-7B), none, a model folder, or a Hub id of any "
             "image-text-to-text model.")
    llava_bit: str = setting(C.LlavaBit.FOUR.value, flags="--llava-bit", panel=SAMPLING, choices=C.LlavaBit,
                             help="llava's weights: 4 (NF4, upstream's default) or 8 bits with bitsandbytes on CUDA, "
                                  "else 16 bits.")
    face_detector: str = setting(C.FaceDetector.RETINAFACE_RESNET50.value, flags="--face-detector", panel=FACES,
                                 choices=C.FaceDetector,
                                 help="unaligned_face: the face detector (RetinaFace; resnet50 is DiffBIR's, "
                                      "mobile0.25 is 60x smaller and less accurate).")
    face_parser: str = setting(C.FaceParser.PARSENET.value, flags="--face-parser", panel=FACES, choices=C.FaceParser,
                               help="unaligned_face: the face-parsing mask that blends each restored face back: "
                                    "parsenet (DiffBIR's; weights derived from a CC BY-NC-SA model, non-commercial), "
                                    "bisenet (MIT), none (a soft ellipse, no network).")
    offload: bool = setting(False, flags="--offload", panel=HARDWARE, help="Keep idle submodules on the CPU (small GPUs).")
    compile: bool = setting(False, flags="--compile", panel=HARDWARE,
                            help="torch.compile the UNet and ControlNet (slow first image, faster after).")

    def __post_init__(self):
        _set(self, "model", str(self.model))
        _set(self, "task", one_of("task", self.task, C.Task))
        _set(self, "precision", one_of("precision", "auto" if self.precision is None else self.precision, C.Precision))
        device = str(self.device)
        kind, _, index = device.partition(":")
        if kind not in C.DEVICES or (index and (kind != "cuda" or not index.isdigit())):
            raise SettingError("device", f"must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
        _set(self, "device", device)
        for name in ("cleaner", "weights_dir", "captioner"):
            value = getattr(self, name)
            if value is not None:
                _set(self, name, str(value))
        if self.captioner is not None and not self.captioner.strip():
            raise SettingError("captioner", "must name a captioner (none, florence2, llava), a model folder or a Hub id")
        _set(self, "llava_bit", one_of("llava_bit", str(self.llava_bit), C.LlavaBit))
        _set(self, "face_detector", one_of("face_detector", self.face_detector, C.FaceDetector))
        _set(self, "face_parser", one_of("face_parser", self.face_parser, C.FaceParser))
        _set(self, "offload", bool(self.offload))
        _set(self, "compile", bool(self.compile))

    @property
    def version(self) -> str:
        """v1 | v2 | v2.1, or "custom" for a model description file."""
        return self.model if self.model in C.VERSIONS else "custom"

    def replace(self, **overrides) -> "LoadSettings":
        return replace_settings(self, overrides)


# -- flat names <-> the tree --------------------------------------------------------------------------


def flat_settings(settings) -> dict[str, Any]:
    """{flat name: value} of every leaf."""
    out = {}
    for leaf in leaves(type(settings)):
        value = settings
        for part in leaf.path:
            value = getattr(value, part)
        out[leaf.name] = value
    return out


def replace_settings(settings, overrides: dict[str, Any]):
    """A copy of `settings` with the leaves named in `overrides` (flat names) replaced and checked."""
    if not overrides:
        return settings
    by_name = {leaf.name: leaf for leaf in leaves(type(settings))}
    unknown = [name for name in overrides if name not in by_name]
    if unknown:
        raise UsageError(_unknown_message(unknown[0], list(by_name)))
    nested: dict = {}
    for name, value in overrides.items():
        node = nested
        *parents, last = by_name[name].path
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return _apply(settings, nested)


def _apply(obj, nested: dict):
    changes = {key: _apply(getattr(obj, key), value) if isinstance(value, dict) else value
               for key, value in nested.items()}
    return dataclasses.replace(obj, **changes)


def _unknown_message(name: str, known: list[str]) -> str:
    if name == "guidance":
        return ("unknown setting `guidance`: restoration guidance (the pull toward the stage-1 image, 0 = off, "
                "about 0.5 typical) is `restoration_guidance`; classifier-free guidance is `cfg`")
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown setting `{name}`" + (f"; did you mean `{close[0]}`?" if close else "")
