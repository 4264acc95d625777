"""One options object for a restoration run, with the official defaults of each model version.

The CLI fills a `RestoreOptions` from its flags (None = "not given"); `resolve()` fills the gaps from
the version's defaults (PIPELINE.md 1.3) and checks the values. The library takes the same object.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import UsageError

VERSIONS = ("v1", "v2", "v2.1")
TASKS = ("sr", "denoise", "face", "unaligned_face")
SAMPLERS = (
    "spaced",
    "ddim",
    "dpm++_m2",
    "edm_euler",
    "edm_euler_a",
    "edm_heun",
    "edm_dpm_2",
    "edm_dpm_2_a",
    "edm_lms",
    "edm_dpm++_2s_a",
    "edm_dpm++_sde",
    "edm_dpm++_2m",
    "edm_dpm++_2m_sde",
    "edm_dpm++_3m_sde",
)
COLOR_FIXES = ("wavelet", "adain", "none")
START_POINTS = ("noise", "cond")
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
CAPTIONERS = ("none",)
GUIDANCE_LOSSES = ("w_mse", "mse")
GUIDANCE_SPACES = ("latent", "rgb")

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
#: The v2 "ECCV paper version" invocation of the HEAD README (and the v2-era CLI defaults).
V2_NEG_PROMPT = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"


@dataclass(frozen=True)
class VersionDefaults:
    sampler: str
    steps: int
    cfg: float
    prompt: str
    negative_prompt: str


#: v1, v2.1 and custom models: the HEAD command-line defaults (they are the same for every version);
#: v2: the README's "ECCV paper version" invocation (spaced, 50 steps, cfg 4, empty prompt).
HEAD_DEFAULTS = VersionDefaults("edm_dpm++_3m_sde", 10, 6.0, DEFAULT_POS_PROMPT, DEFAULT_NEG_PROMPT)
VERSION_DEFAULTS = {
    "v1": HEAD_DEFAULTS,
    "v2": VersionDefaults("spaced", 50, 4.0, "", V2_NEG_PROMPT),
    "v2.1": HEAD_DEFAULTS,
    "custom": HEAD_DEFAULTS,
}


@dataclass
class RestoreOptions:
    """Every setting of one restoration run. None means "use the default of the model version"."""

    # model
    model: str = "v2.1"  # v1 | v2 | v2.1 | path to a restorecli-model/1 JSON file
    task: str = "sr"
    cleaner: str | None = None  # pinned cleaner name or a model file spandrel can load
    upscale: float | None = None  # default 4 for sr, 1 for denoise/face
    stage1_only: bool = False
    # sampling
    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    rescale_cfg: bool = False
    prompt: str | None = None
    negative_prompt: str | None = None
    captioner: str = "none"
    strength: float = 1.0
    start_point: str = "noise"
    noise_aug: int = 0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 300.0
    s_noise: float = 1.0
    eta: float = 1.0
    order: int = 1
    seed: int = 231
    color_fix: str = "wavelet"
    # restoration guidance
    guidance: float = 0.0
    guidance_loss: str = "w_mse"
    guidance_space: str = "latent"
    guidance_start: int = 1001
    guidance_stop: int = -1
    guidance_repeat: int = 1
    # tiling and hardware
    tile_size: int | None = None
    tile_stride: int | None = None
    cleaner_tile_size: int | None = None
    cleaner_tile_stride: int | None = None
    device: str = "auto"
    precision: str | None = None  # default fp16 on CUDA, fp32 elsewhere
    max_memory: int | None = None  # bytes
    offload: bool = False
    compile: bool = False
    weights_dir: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.model if self.model in VERSIONS else "custom"

    def resolve(self) -> "RestoreOptions":
        """A copy with every None filled from the version defaults; raises UsageError on bad values."""
        d = VERSION_DEFAULTS[self.version]
        o = dataclasses.replace(self)
        if o.sampler is None:
            o.sampler = d.sampler
        if o.steps is None:
            o.steps = d.steps
        if o.cfg is None:
            o.cfg = d.cfg
        if o.prompt is None:
            o.prompt = d.prompt
        if o.negative_prompt is None:
            o.negative_prompt = d.negative_prompt
        if o.upscale is None:
            o.upscale = 4.0 if o.task in ("sr", "unaligned_face") else 1.0
        o.validate()
        return o

    def validate(self) -> None:
        def choice(name: str, value, allowed) -> None:
            if value not in allowed:
                raise UsageError(f"`{name}` must be one of {', '.join(map(str, allowed))}; got {value!r}")

        for flag, value in (
            ("--upscale", self.upscale), ("--cfg", self.cfg), ("--strength", self.strength),
            ("--guidance", self.guidance), ("--s-churn", self.s_churn), ("--s-tmin", self.s_tmin),
            ("--s-tmax", self.s_tmax), ("--s-noise", self.s_noise), ("--eta", self.eta),
        ):
            if value is not None and not math.isfinite(value):
                raise UsageError(f"`{flag}` must be a finite number, got {value}")
        choice("--task", self.task, TASKS)
        if self.sampler is not None:
            choice("--sampler", self.sampler, SAMPLERS)
        choice("--color-fix", self.color_fix, COLOR_FIXES)
        choice("--start-point", self.start_point, START_POINTS)
        choice("--captioner", self.captioner, CAPTIONERS)
        if self.device.split(":")[0] not in DEVICES or (":" in self.device and not self.device.startswith("cuda:")):
            raise UsageError(f"`--device` must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        if self.precision is not None:
            choice("--precision", self.precision, PRECISIONS)
        choice("--guidance-loss", self.guidance_loss, GUIDANCE_LOSSES)
        choice("--guidance-space", self.guidance_space, GUIDANCE_SPACES)
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"`--steps` must be >= 1, got {self.steps}")
        if self.upscale is not None and not (0 < self.upscale <= 16):
            raise UsageError(f"`--upscale` must be in (0, 16], got {self.upscale}")
        if self.cfg is not None and self.cfg < 0:
            raise UsageError(f"`--cfg` must be >= 0, got {self.cfg}")
        if not 0 <= self.strength <= 10:
            raise UsageError(f"`--strength` must be in [0, 10], got {self.strength}")
        if not 0 <= self.noise_aug <= 999:
            raise UsageError(f"`--noise-aug` must be a timestep in [0, 999], got {self.noise_aug}")
        if self.guidance < 0:
            raise UsageError(f"`--guidance` must be >= 0, got {self.guidance}")
        if self.guidance_start <= self.guidance_stop:
            raise UsageError(
                "`--guidance-start` must be greater than `--guidance-stop` (guidance acts while "
                f"stop < t < start, counting down from 1000); got start {self.guidance_start}, stop {self.guidance_stop}"
            )
        if self.guidance_repeat < 1:
            raise UsageError(f"`--guidance-repeat` must be >= 1, got {self.guidance_repeat}")
        if self.order < 1:
            raise UsageError(f"`--order` must be >= 1, got {self.order}")
        for name, size, stride in (
            ("--tile-size", self.tile_size, self.tile_stride),
            ("--cleaner-tile-size", self.cleaner_tile_size, self.cleaner_tile_stride),
        ):
            if size is None and stride is not None:
                raise UsageError(f"`{name.replace('size', 'stride')}` needs `{name}`")
            if size is not None:
                if size <= 0 or size % 64:
                    raise UsageError(f"`{name}` must be a positive multiple of 64, got {size}")
                if stride is not None and not 0 < stride <= size:
                    raise UsageError(f"`{name.replace('size', 'stride')}` must be in (0, {name}={size}], got {stride}")
