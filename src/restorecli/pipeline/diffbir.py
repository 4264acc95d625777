"""`DiffBIRPipeline`: DiffBIR's two-stage restoration as a diffusers pipeline.

    from restorecli import DiffBIRPipeline
    pipe = DiffBIRPipeline.from_version("v2.1")      # or .from_description("my_model.json") / .from_pretrained(dir)
    out = pipe(image)                                 # the version's defaults (pipe.default_settings)
    out = pipe(image, upscale=2, restoration_guidance=0.5, seed=7)   # any setting by name
    out.images[0]                                     # HWC float32 in [0, 1] (output_type="np")

`__call__` follows the official inference (DiffBIR HEAD `diffbir/pipeline.py Pipeline.run` and
`apply_cldm`) step by step: check inputs -> stage 1 -> encode the condition -> encode
the prompts -> prepare the latents -> denoise -> decode -> colour fix -> postprocess. Each step is one
method. Randomness: one CPU generator per image (`seed`): x_T first, then noise augmentation, then every
draw the sampler makes, each drawn on the CPU and moved to the device.

Memory and speed are handled here, each in one place:

* `plan_memory` asks `restorecli.pipeline.planning` for the stage-2 tiles that fit the device (or `max_memory`):
  the exact tiled VAE whenever the plain one would not fit (same result; paused tiles that still do not
  fit go to a temporary file in `spill_dir`), the official latent tiles for sampling only when untiled
  sampling would not fit (a different result: logged as a warning), the colour fix in exact bands;
  explicit `tile_size`/`tile_stride` win. Stage 1 plans its own tiles (`restorecli.stage1.run`).
  `check_memory` refuses, before any work, an image that cannot be restored within `max_memory`.
* `_run_stage` retries a stage once with half the tiles after an out-of-memory error, with a warning,
  and then fails with an InputError for this image (a batch counts it and goes on).
* `placement` (`restorecli.pipeline.placement`) keeps idle models off the accelerator: the cleaner during stage 2,
  the text encoder after encoding; with `set_offload(True)` also the VAE and the UNet/ControlNet
  outside their stages.
* `_vae_pass` redoes a half-precision VAE pass that overflowed with a float32 copy of the VAE.
* On accelerators cond and uncond go through one batched UNet + ControlNet call (`cfg_batching`); on
  the CPU the samplers keep upstream's call pattern, which reproduces the official runs bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..captions.prompt import assemble_prompt
from .colorfix import color_fix as apply_color_fix
from .colorfix import color_fix_in_bands
from ..diffusion.conditioning import ControlCondition, ControlledModel
from ..diffusion.guidance import RestorationGuidance, weight_map
from ..diffusion.noise import GUIDANCE_STREAM, GeneratorNoise
from ..diffusion.sampling import sample
from ..diffusion.schedules import NoiseSchedule
from ..diffusion.start import augment_condition, initial_latent
from ..diffusion.tiled_sampling import sampling_windows
from ..vae.tiled import SpillError, check_spill_space, default_spill_dir, posterior_mode, tiled_decode, tiled_encode
from ..errors import InputError, UsageError, brief
from ..oom import is_out_of_memory, release_memory
from ..memory import SAFETY, available_memory, trim_freed_memory
from ..models.cldm import ControlledUNet, encode_prompt, vae_decode, vae_encode
from ..models.description import DiffusionSpec
from ..stage1.cleaners import Cleaner
from ..settings import GuidanceSettings, RestoreSettings, SamplerSettings
from .placement import Placement, module_device
from .planning import (
    OUTPUT_BYTES_PER_PIXEL,
    MemoryPlan,
    VaeChoice,
    format_size,
    leaner_vae_choice,
    plan_stage2,
    smaller_sample_tile,
    smallest_budget,
    stage1_floor,
    stage2_budget,
)
from ..stage1.run import (
    SWINIR_MULTIPLE,
    Stage1Result,
    condition_size,
    output_size_for,
    pad_to_multiple,
    resize_to,
    run_stage1,
    stage1_only_output,
)
from ..vae import VAE_SCALE

log = logging.getLogger("restorecli.pipeline.diffbir")

#: Untiled, the condition is zero-padded to a multiple of 64.
PAD_UNTILED = 64
#: With tiled sampling, upstream pads to a multiple of 8 only.
PAD_TILED = 8

#: Text embeddings kept per pipeline (prompts differ per image once captions lead them: bounded).
PROMPT_CACHE_SIZE = 128

T = TypeVar("T")


@dataclass
class DiffBIROutput(BaseOutput):
    """`images`: the restored images (output_type "np": HWC float32 in [0, 1], unclamped values are
    clipped; "pt": NCHW float32, unclamped; "pil": PIL images, 8-bit with the official truncation).
    `stage1`: the stage-1 (condition) images at the output size, same type. `seeds`: the seed of each.
    `plan`: the stage-2 memory plan used (tiles and estimates; None with stage1_only).
    `guidance_maps` (with `return_guidance_map=True`): the restoration-guidance region weight map W of
    each image at the output size, in [0, 1] (1 = fidelity to the stage-1 image fully enforced; w_mse:
    1 - tanh of the 2x2-block Sobel magnitude, mse: 1 everywhere); "np": HxW float32 arrays, "pt":
    (N, 1, H, W) float32, "pil": 8-bit grayscale ("L") images.
    `captions`: each image's caption (the captioner's or the one given; None without either, and with
    stage1_only). `prompts`: the positive prompt each image was conditioned on (caption, prompt joined
    as upstream; None with stage1_only). `tile_captions` (with `tile_captions`): {latent window: caption}
    of each image's sampling tiles, or None when it was not sampled in tiles."""

    images: Any
    stage1: Any = None
    seeds: list[int] = field(default_factory=list)
    guidance_maps: Any = None
    plan: MemoryPlan | None = None
    captions: list[str | None] = field(default_factory=list)
    prompts: list[str | None] = field(default_factory=list)
    tile_captions: list[dict | None] = field(default_factory=list)


@dataclass
class StageTwoInputs:
    """What stage 2 needs of one image, with the sizes the official crops use."""

    cond_img: torch.Tensor  # (1, 3, h0, w0), the unpadded stage-1 output
    c_img: torch.Tensor  # (1, 4, h2, w2) condition latent (padded)
    latent_size: tuple[int, int]  # (h1, w1): the latent of the padded condition, before latent padding
    tile: tuple[int, int] | None  # latent (size, stride) when tiled sampling is on
    plan: MemoryPlan | None = None


class DiffBIRPipeline(DiffusionPipeline):
    """DiffBIR: stage 1 (a cleaner: SwinIR, BSRNet, SCUNet, any spandrel model) removes the degradation,
    stage 2 (IRControlNet on Stable Diffusion 2.1) regenerates detail conditioned on its VAE latent.

    Components: `unet` (diffusers UNet2DConditionModel), `controlnet` (`IRControlNetModel`), `vae`
    (AutoencoderKL), `text_encoder` (CLIPTextModel, penultimate layer), `tokenizer` (CLIPTokenizer).
    `cleaner` (a `restorecli.stage1.cleaners.Cleaner`) and `captioner` (a `restorecli.captions` captioner
    or None; not saved by `save_pretrained`) are held as plain attributes; stage-2 components may be None
    for a stage-1-only pipeline.
    """

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"
    #: diffusers reads this to know the components (to(), components); None for a stage-1-only pipeline
    _optional_components = ["unet", "controlnet", "vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet=None,
        controlnet=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        *,
        cleaner: Cleaner | None = None,
        stage1_pipeline: str | None = None,
        diffusion: DiffusionSpec | None = None,
        latent_scale_factor: float = 0.18215,
        default_settings: RestoreSettings | None = None,
        captioner=None,
    ):
        super().__init__()
        self.register_modules(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.cleaner = cleaner
        #: describes each image for its prompt (on the device only while it captions); None: no captions
        self.captioner = captioner
        self.stage1_pipeline = stage1_pipeline
        self.diffusion = diffusion or DiffusionSpec()
        self.latent_scale_factor = float(latent_scale_factor)
        self.schedule = NoiseSchedule.from_spec(self.diffusion)
        #: What `__call__` runs when it is given no settings: the version's and task's defaults (set by loading).
        self.default_settings = default_settings or RestoreSettings()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        first = next((m for m in (unet, cleaner, vae) if m is not None and module_device(m) is not None), None)
        self.placement = Placement(module_device(first) if first is not None else "cpu")
        #: cond + uncond in one batched call: None = automatic (accelerators yes, CPU upstream's pattern)
        self.batch_cfg: bool | None = None
        #: `stage_monitor(name)` -> a context manager around each stage (benchmarks time and measure them)
        self.stage_monitor: Callable[[str], Any] | None = None
        #: where the tiled VAE's paused tiles go when they do not fit the budget (None: $RESTORE_HOME/tmp)
        self.spill_dir: str | None = None

    # ------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_stage2_models(cls, models, *, cleaner: Cleaner | None = None, stage1_pipeline: str | None = None):
        """Wrap `restorecli.models.stage2.Stage2Models` (and a cleaner) in a pipeline."""
        return cls(
            unet=models.unet,
            controlnet=models.controlnet,
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            cleaner=cleaner,
            stage1_pipeline=stage1_pipeline,
            diffusion=models.diffusion,
            latent_scale_factor=models.latent_scale_factor,
        )

    @classmethod
    def from_description(cls, path, *, task: str = "sr", cleaner: str | None = None, weights_dir: str | None = None,
                         stage1_only: bool = False, device="auto", torch_dtype: torch.dtype | None = None,
                         offload: bool = False, compile: bool = False, captioner: str | None = None,
                         llava_bit: str = "4") -> "DiffBIRPipeline":
        """A pipeline from a `restorecli-model/1` JSON file (your own or self-trained DiffBIR model).
        `captioner`: florence2 (the default), llava, none, a model folder or a Hub id."""
        return cls._load(str(path), task=task, cleaner=cleaner, weights_dir=weights_dir, stage1_only=stage1_only,
                         device=device, torch_dtype=torch_dtype, offload=offload, compile=compile, captioner=captioner,
                         llava_bit=llava_bit)

    @classmethod
    def from_version(cls, version: str = "v2.1", *, task: str = "sr", cleaner: str | None = None,
                     weights_dir: str | None = None, stage1_only: bool = False, device="auto",
                     torch_dtype: torch.dtype | None = None, offload: bool = False,
                     compile: bool = False, captioner: str | None = None, llava_bit: str = "4") -> "DiffBIRPipeline":
        """A pipeline of a pinned version (v1, v2, v2.1) and task; downloads the pinned weights if needed.
        `captioner`: the version's default (florence2; v2: none), llava, none, a model folder or a Hub id."""
        if version not in ("v1", "v2", "v2.1"):
            raise UsageError(f"`version` must be v1, v2 or v2.1, got {version!r} (a description file: from_description)")
        return cls._load(version, task=task, cleaner=cleaner, weights_dir=weights_dir, stage1_only=stage1_only,
                         device=device, torch_dtype=torch_dtype, offload=offload, compile=compile, captioner=captioner,
                         llava_bit=llava_bit)

    @classmethod
    def _load(cls, model: str, *, task, cleaner, weights_dir, stage1_only, device, torch_dtype, offload, compile,
              captioner=None, llava_bit="4"):
        from ..settings import LoadSettings

        load = LoadSettings(model=model, task=task, cleaner=cleaner, weights_dir=weights_dir, device=str(device),
                            offload=offload, compile=compile, captioner=captioner, llava_bit=llava_bit)
        return cls.from_settings(load, stage1_only=stage1_only, torch_dtype=torch_dtype)

    @classmethod
    def from_settings(cls, load, *, stage1_only: bool = False, torch_dtype: torch.dtype | None = None,
                      progress: Callable | None = None) -> "DiffBIRPipeline":
        """The pipeline a `restorecli.settings.LoadSettings` describes (what the CLI and the web app use),
        with `default_settings` set to its version's and task's defaults. `task` unaligned_face is
        `restorecli.faces.FacePipeline`'s (a background and a face restorer sharing stage-2 models)."""
        if load.task == "unaligned_face":
            raise UsageError("`task` unaligned_face restores each face and the background with two pipelines: "
                             "use restorecli.FacePipeline (from_version, from_description, from_settings) or "
                             "restorecli.load_pipeline")
        from .loading import load_components

        return cls.from_components(load_components(load, stage1_only=stage1_only, torch_dtype=torch_dtype,
                                                   progress=progress), load)

    @classmethod
    def from_components(cls, parts, load) -> "DiffBIRPipeline":
        """The pipeline of loaded `restorecli.pipeline.loading.Components` (`load`: its LoadSettings)."""
        from .loading import prepare_for_speed

        if parts.stage2 is None:
            return cls(cleaner=parts.cleaner, stage1_pipeline=parts.stage1_pipeline,
                       default_settings=parts.default_settings)
        pipe = cls.from_stage2_models(parts.stage2, cleaner=parts.cleaner, stage1_pipeline=parts.stage1_pipeline)
        pipe.default_settings = parts.default_settings
        pipe.captioner = parts.captioner
        prepare_for_speed(pipe, parts.device, compile=load.compile)
        if load.offload:
            pipe.set_offload(True)
        return pipe

    @classmethod
    def from_pretrained(cls, path, *, device="auto", torch_dtype: torch.dtype | None = None, offload: bool = False,
                        compile: bool = False, **unsupported) -> "DiffBIRPipeline":
        """A pipeline saved with `save_pretrained` (a local folder): every component, the cleaner, the
        diffusion spec, the latent scale and the default settings, exactly as saved."""
        if unsupported:
            raise UsageError(f"DiffBIRPipeline.from_pretrained: unsupported argument(s) {', '.join(sorted(unsupported))} "
                             "(it loads a folder written by save_pretrained; device=, torch_dtype=, offload=, compile=)")
        from .saving import load_saved_pipeline

        return load_saved_pipeline(cls, path, device=device, torch_dtype=torch_dtype, offload=offload, compile=compile)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> None:
        """Write the whole pipeline to a folder that `from_pretrained` reads back: each diffusers /
        transformers component in its own subfolder, the cleaner as safetensors, and `restorecli.json`
        (diffusion spec, latent scale, stage-1 pipeline, default settings)."""
        if not safe_serialization or kwargs:
            raise UsageError("DiffBIRPipeline.save_pretrained writes safetensors only and takes no other options")
        from .saving import save_pipeline

        save_pipeline(self, save_directory)

    def sharing_stage2(self, cleaner: Cleaner, stage1_pipeline: str) -> "DiffBIRPipeline":
        """A pipeline with another stage-1 `cleaner` and the same everything else: the same stage-2
        modules (not copies), placement, prompt cache, captioner and defaults (unaligned_face's face
        restorer beside its background restorer)."""
        other = type(self)(
            unet=self.unet, controlnet=self.controlnet, vae=self.vae, text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, cleaner=cleaner, stage1_pipeline=stage1_pipeline, diffusion=self.diffusion,
            latent_scale_factor=self.latent_scale_factor, default_settings=self.default_settings,
            captioner=self.captioner,
        )
        other.placement = self.placement
        other._prompt_cache = self._prompt_cache
        other.batch_cfg, other.spill_dir, other.stage_monitor = self.batch_cfg, self.spill_dir, self.stage_monitor
        return other

    def to(self, *args, **kwargs) -> "DiffBIRPipeline":
        """Move (and/or cast) every component, the stage-1 cleaner included; the placement follows."""
        device, dtype = _device_and_dtype(args, kwargs)
        super().to(*args, **kwargs)
        if self.cleaner is not None:
            self.cleaner.to(device=device, dtype=dtype)
        if device is not None:
            self.placement.device = torch.device(device)
            if self.captioner is not None:  # it stays in host memory and computes there
                self.captioner.device = torch.device(device)
        return self

    def enable_model_cpu_offload(self, *args, **kwargs):
        """Not used: accelerate's hooks would fight this pipeline's own placement. Use `set_offload(True)`."""
        raise UsageError("DiffBIRPipeline places its models itself; use pipe.set_offload(True) (the CLI's `offload`) "
                         "instead of enable_model_cpu_offload")

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        """Not used (see `enable_model_cpu_offload`)."""
        raise UsageError("DiffBIRPipeline places its models itself; use pipe.set_offload(True) (the CLI's `offload`) "
                         "instead of enable_sequential_cpu_offload")

    @property
    def has_stage2(self) -> bool:
        return self.unet is not None and self.controlnet is not None and self.vae is not None

    @property
    def execution_device(self) -> torch.device:
        """Where the models compute (idle ones may wait in host memory, see `set_offload`)."""
        return self.placement.device

    def set_offload(self, offload: bool = True) -> None:
        """Keep the VAE, UNet/ControlNet and text encoder in host memory except during their stages
        (`--offload`, for small GPUs). No effect on the CPU."""
        self.placement.offload = bool(offload)
        if offload:
            self.placement.to_host(self.vae, self.unet, self.controlnet, self.text_encoder)
        else:
            self.placement.to_device(self.vae, self.unet, self.controlnet)

    def cfg_batching(self) -> bool | None:
        """True: cond and uncond in one batched UNet + ControlNet call (accelerators, and the CPU in half
        precision). None on the CPU in float32: the samplers' upstream pattern (batched for ddim /
        dpm++_m2, two calls for spaced / edm), which reproduces the official runs bit for bit; batching
        there changes float rounding (`restorecli.diffusion.sampling.sample`). In bf16 on the CPU that
        exactness is gone anyway, and one batch-2 call took 18.4 s against 36.4 s for two batch-1 calls
        (full-size v2.1 UNet + IRControlNet, 64x64 latent, 2 cores: `benchmarks/run.py --speed --dtype
        bf16`). `batch_cfg` overrides."""
        if self.batch_cfg is not None:
            return self.batch_cfg
        if self.execution_device.type != "cpu":
            return True
        return True if getattr(self.unet, "dtype", torch.float32) != torch.float32 else None

    # ------------------------------------------------------------------------------------------------
    # the call

    @torch.no_grad()
    def __call__(
        self,
        image,
        settings: RestoreSettings | None = None,
        *,
        output_type: str = "np",
        return_guidance_map: bool = False,
        on_step: Callable[[int, int], None] | None = None,
        source: str | None = None,
        caption: str | None = None,
        **overrides,
    ) -> DiffBIROutput:
        """Restore one image (PIL image, or HWC RGB uint8/uint16/float array).

        `settings` (a `restorecli.settings.RestoreSettings`) defaults to `self.default_settings`, the
        loaded version's and task's defaults; `**overrides` replace single settings by their flat names
        (`upscale`, `steps`, `sampler`, `cfg`, `prompt`, `restoration_guidance`, `tile_size`, `max_memory`,
        ...; `restorecli.settings.leaves(RestoreSettings)` lists them all). `on_step(done, total)` reports
        sampling progress; `source` names the image in error messages. `return_guidance_map` fills
        `DiffBIROutput.guidance_maps` with the restoration guidance's region weight map.

        Captions (DiffBIR ``diffbir/inference/loop.py``): `caption` (your own text; "" for none) or else the
        pipeline's `captioner` describes the image as given, before any resize, and the positive prompt
        becomes ``", ".join(s for s in [caption, prompt] if s)``; the negative prompt is untouched. With
        `tile_captions` and tiled sampling each tile's region is captioned and its model calls see their
        own caption + prompt.
        """
        settings = (settings if settings is not None else self.default_settings).replace(**overrides)
        # 1. Check inputs
        rgb = self.check_inputs(image, settings, output_type)
        sampling, guidance, tiles = settings.sampler, settings.guidance, settings.tiles
        self.check_memory(
            rgb.shape[:2], upscale=settings.upscale, stage1_only=settings.stage1_only, tile_size=tiles.tile_size,
            tile_stride=tiles.tile_stride, cleaner_tile_size=tiles.cleaner_tile_size, max_memory=tiles.max_memory,
            sampler=sampling.sampler, cfg=sampling.cfg, guidance=guidance, source=source,
        )
        # 2. Caption the image as read (upstream captions the low-quality image before its pre-upscale);
        #    the captioner leaves the device before stage 1
        if not settings.stage1_only:
            caption = self.caption_image(rgb, caption)
            prompt = assemble_prompt(caption, settings.prompts.prompt)
        # 3. Stage 1: the clean but smooth condition image I_reg (>= 512 short side)
        stage1 = self.run_stage1(
            rgb, upscale=settings.upscale, tile_size=tiles.cleaner_tile_size, tile_stride=tiles.cleaner_tile_stride,
            max_memory=tiles.max_memory, source=source, keep_on_device=settings.stage1_only,
        )
        if settings.stage1_only:
            result = stage1_only_output(stage1)
            return DiffBIROutput(images=self.postprocess(result, output_type), seeds=[sampling.seed], captions=[None],
                                 prompts=[None], tile_captions=[None])

        generator = torch.Generator("cpu").manual_seed(sampling.seed)
        noise = GeneratorNoise(generator)
        # 4. Plan stage 2's memory: VAE tiles, sampling tiles (and with them the padding)
        plan = self.plan_memory(
            stage1, tile_size=tiles.tile_size, tile_stride=tiles.tile_stride, max_memory=tiles.max_memory,
            sampler=sampling.sampler, cfg=sampling.cfg, guidance=guidance, source=source,
        )
        # 5. Encode the condition (pad, VAE-encode the posterior mode, pad the latent)
        inputs = self.encode_condition(stage1.cond_img, plan, source=source)
        # 6. Encode the prompts (with tile captions: each sampling tile's own, made per tiling attempt)
        c_txt = self.encode_prompt(prompt)
        c_txt_neg = self.encode_prompt(settings.prompts.negative_prompt)
        tile_text, tile_captions = None, [None]
        if settings.prompts.tile_captions:
            def tile_text(x, tile):
                texts, tile_captions[0] = self.tile_conditioning(rgb, inputs, x, tile, settings.prompts.prompt)
                return texts
        # 7. Prepare the latents: x_T (or the noised condition), then noise augmentation
        x_T, c_img = self.prepare_latents(inputs.c_img, noise, start_point=sampling.start_point,
                                          noise_aug=sampling.noise_aug)
        # 8. Denoise, with restoration guidance (its draws happen in the loop)
        strength = sampling.strength
        z, guide = self.denoise_image(
            x_T, ControlCondition(c_txt, c_img, strength), ControlCondition(c_txt_neg, c_img, strength), inputs,
            sampling=sampling, noise=noise, guidance=guidance, on_step=on_step, source=source, tile_text=tile_text,
        )
        # 9. Decode (crop the latent and the image back to the unpadded sizes)
        decoded = self.decode_image(z, inputs, source=source)
        # 10. Colour fix toward the stage-1 image, then resize to the output size
        with self._monitor("colour fix"):
            restored = self.color_correct(decoded, inputs.cond_img, settings.color_fix, stage1.output_size,
                                          on_cpu=plan.post_on_cpu, rows=plan.post_rows)
        # 11. Postprocess
        maps = None
        if return_guidance_map:
            maps = self.guidance_map(inputs, x_T, guidance, stage1.output_size, guide)
        return DiffBIROutput(
            images=self.postprocess(restored, output_type),
            stage1=self.postprocess(stage1_only_output(stage1), output_type),
            seeds=[sampling.seed],
            guidance_maps=None if maps is None else self.postprocess_map(maps, output_type),
            plan=plan,
            captions=[caption],
            prompts=[prompt],
            tile_captions=tile_captions,
        )

    # ------------------------------------------------------------------------------------------------
    # the steps

    def check_inputs(self, image, settings: RestoreSettings, output_type: str) -> np.ndarray:
        """What the settings cannot check themselves (they are validated when made): that this pipeline
        can run them, and the image. Returns the image as an HWC RGB array."""
        if not isinstance(settings, RestoreSettings):
            raise UsageError(f"`settings` must be a restorecli.settings.RestoreSettings, got {type(settings).__name__}")
        if self.cleaner is None:
            raise UsageError("this pipeline has no stage-1 cleaner")
        if not settings.stage1_only and not self.has_stage2:
            raise UsageError("this pipeline was loaded for stage 1 only; load it without stage1_only to run stage 2")
        if settings.prompts.tile_captions and not settings.stage1_only and self.captioner is None:
            raise UsageError("`tile_captions` needs a captioner, and this pipeline has none (`captioner` none)")
        if not settings.sampler.noise_aug < self.schedule.num_timesteps:
            raise UsageError(f"`noise_aug` must be in [0, {self.schedule.num_timesteps - 1}], got {settings.sampler.noise_aug}")
        if output_type not in ("np", "pt", "pil"):
            raise UsageError(f"`output_type` must be np, pt or pil; got {output_type!r}")
        return _as_rgb_array(image)

    def run_stage1(self, rgb: np.ndarray, *, upscale: float, tile_size=None, tile_stride=None,
                   max_memory=None, source=None, keep_on_device: bool = True) -> Stage1Result:
        """Stage 1 as the official pipelines run it (see `restorecli.stage1.run`), with the cleaner on the
        device for it (and off it afterwards unless `keep_on_device`). On out-of-memory it runs once more
        with tiles half as large (explicit tiles) or half the memory budget (automatic tiles)."""
        def attempt(setting):
            size, stride, cap = setting
            return run_stage1(
                rgb, self.cleaner, upscale=upscale, pipeline=self.stage1_pipeline, tile_size=size,
                tile_stride=stride, max_memory=cap, source=source,
            )

        def smaller(setting):
            size, stride, cap = setting
            if size:
                half = size // 2 // SWINIR_MULTIPLE * SWINIR_MULTIPLE
                return (half, half // 2, cap) if half >= SWINIR_MULTIPLE else None
            return None, None, available_memory(self.cleaner.device, cap) // 2

        def describe(setting):
            size, stride, cap = setting
            return f"{size}-pixel tiles" if size else f"tiles planned for {cap / 2**30:.1f} GiB"

        with self.placement.using(self.cleaner, release=not keep_on_device):
            return self._run_stage("stage 1", attempt, (tile_size, tile_stride, max_memory), smaller, describe, source)

    def plan_memory(self, stage1: Stage1Result, *, tile_size=None, tile_stride=None, max_memory=None,
                    sampler: str = "edm_dpm++_3m_sde", cfg: float = 6.0,
                    guidance: GuidanceSettings | None = None, source: str | None = None) -> MemoryPlan:
        """Stage-2 tiles for this image within what the device has free (at most `max_memory`), see
        `restorecli.pipeline.planning`. With `set_offload(True)` the weights a stage brings to the device are
        taken off the budget first. An InputError for this image when even the leanest plan exceeds
        `max_memory`, or the disk lacks room for the paused VAE tiles the plan puts there."""
        h0, w0 = stage1.cond_img.shape[-2:]
        plan = self._plan(h0, w0, stage1.output_size, tile_size=tile_size, tile_stride=tile_stride,
                          max_memory=max_memory, sampler=sampler, cfg=cfg, guidance=guidance)
        log.info("memory plan: %s", plan.describe())
        self._refuse_if_short(plan, max_memory, source)
        short = [name for name in ("encode", "sampling", "decode", "colour fix") if name in plan.over_budget()]
        if short:
            log.warning("%s may not fit the %.1f GiB at hand even in the smallest tiles; trying anyway",
                        " and ".join(short), plan.budget / 2**30)
        if plan.sample_tile_auto:
            size, stride = plan.sample_tile
            log.warning(
                "sampling %dx%d in tiles of %d px (stride %d px): untiled sampling needs about %.1f GiB, more than "
                "the %.1f GiB at hand; tiled results differ slightly from untiled ones (`tile_size` chooses the "
                "tiles, `max_memory` the budget)", w0, h0, size * VAE_SCALE, stride * VAE_SCALE,
                plan.untiled.get("sampling", 0) / 2**30, plan.budget / 2**30,
            )
        return plan

    def check_memory(self, lq_size, *, upscale: float, stage1_only: bool = False, tile_size=None, tile_stride=None,
                     cleaner_tile_size=None, max_memory=None, sampler: str = "edm_dpm++_3m_sde", cfg: float = 6.0,
                     guidance: GuidanceSettings | None = None, source: str | None = None) -> MemoryPlan | None:
        """Before any work on an `lq_size` = (h, w) input: an InputError naming the file when it cannot be
        restored within `max_memory` even with the leanest plan (the message gives the smallest budget that
        works), or when the paused VAE tiles would not fit the disk. Returns the plan (None without
        `max_memory`: the free memory then only sets the tiles)."""
        if max_memory is None:
            return None
        h, w = (int(v) for v in lq_size[:2])
        output_size = output_size_for(h, w, upscale)
        if min(output_size) < 1:
            return None  # stage 1 reports it
        cleaner = self.cleaner
        first = stage1_floor(
            cleaner.kind, self.stage1_pipeline or cleaner.pipeline, (h, w), upscale, scale=cleaner.scale,
            dtype=cleaner.dtype, multiple_of=getattr(getattr(cleaner, "size_requirements", None), "multiple_of", 1) or 1,
            tile=cleaner_tile_size,
        )
        if stage1_only:
            budget = stage2_budget(self.cleaner.device, max_memory)
            plan = MemoryPlan(budget=budget, size=condition_size(output_size))
            plan.estimates["stage 1"] = first
            plan.estimates["output"] = OUTPUT_BYTES_PER_PIXEL * output_size[0] * output_size[1]
        else:
            h0, w0 = condition_size(output_size)
            plan = self._plan(h0, w0, output_size, tile_size=tile_size, tile_stride=tile_stride, max_memory=max_memory,
                              sampler=sampler, cfg=cfg, guidance=guidance, stage1=first)
        self._refuse_if_short(plan, max_memory, source)
        return plan

    def _plan(self, h0: int, w0: int, output_size, *, tile_size, tile_stride, max_memory, sampler, cfg, guidance,
              stage1: int | None = None) -> MemoryPlan:
        device = self.execution_device
        budget = stage2_budget(device, max_memory)
        if self.placement.offload and self.placement.active:
            budget -= max(_weight_bytes(self.unet, self.controlnet), _weight_bytes(self.vae))
        batched = self.cfg_batching()
        if batched is None:
            batched = sampler in ("ddim", "dpm++_m2")  # upstream batches these (diffusion.sampling)
        host_room = int(SAFETY * available_memory("cpu")) if device.type != "cpu" else None
        return plan_stage2(
            h0, w0, vae_config=self.vae.config, unet_config=self.unet.config, dtype=self.unet.dtype,
            vae_dtype=self.vae.dtype, device=device, budget=max(budget, 0), tile_size=tile_size,
            tile_stride=tile_stride, cfg_batch=2 if (batched and cfg != 1.0) else 1,
            guidance_space=guidance.space if guidance is not None and guidance.enabled else None,
            output_size=output_size, host_room=host_room, stage1=stage1,
        )

    def _refuse_if_short(self, plan: MemoryPlan, max_memory: int | None, source: str | None) -> None:
        """The one-line refusals: a plan that cannot fit `max_memory` at all, a disk too small for its spill."""
        if max_memory is not None and plan.needed > SAFETY * max_memory:
            stage = max(plan.estimates, key=plan.estimates.get)
            h0, w0 = plan.size
            raise InputError(
                source,
                f"cannot be restored within `max_memory` {format_size(max_memory)}: {stage} needs about "
                f"{format_size(plan.needed)} even with the leanest tiles (a {w0}x{h0} stage-2 image); the smallest "
                f"budget that works is `max_memory` {format_size(smallest_budget(plan.needed))}",
            )
        if plan.spill > 0:
            try:
                check_spill_space(self.spill_dir or default_spill_dir(), plan.spill)
            except SpillError as e:
                raise InputError(source, str(e)) from None

    def encode_condition(self, cond_img: torch.Tensor, plan: MemoryPlan | None = None, *, tile_size=None,
                         tile_stride=None, source=None) -> StageTwoInputs:
        """Pad, encode and pad again as `Pipeline.apply_cldm`.

        Untiled sampling: zero-pad the image to a multiple of 64, `c_img = mode(q(z | 2x - 1)) * scale`,
        pad the latent to a multiple of 8 (a no-op then). Tiled sampling (`plan.sample_tile`, or
        `tile_size`/`tile_stride` without a plan): pad to 8 only, unless the latent is smaller than a
        tile (then untiled, with the latent zero-padded to 8 - upstream's rule, kept for parity). The
        encoder runs in `plan.encode_tile` exact tiles when planned (same result).
        """
        if plan is None:
            h0, w0 = cond_img.shape[-2:]
            plan = plan_stage2(h0, w0, vae_config=self.vae.config, unet_config=self.unet.config, budget=1 << 62,
                               tile_size=tile_size, tile_stride=tile_stride)
        cond_img = cond_img.float()
        padded = pad_to_multiple(cond_img, PAD_TILED if plan.sample_tile else PAD_UNTILED) * 2 - 1
        c_img = self._run_stage(
            "encode", lambda vae: self._encode(padded, vae), plan.encode,
            lambda vae: leaner_vae_choice(vae, max(padded.shape[-2:]), part="encode", device=self.execution_device),
            lambda vae: vae.describe("px") + " VAE", source,
        ).float()
        del padded
        h1, w1 = c_img.shape[-2:]
        tile = None
        if plan.sample_tile is not None:
            size, stride = plan.sample_tile
            if h1 >= size and w1 >= size:
                tile = (size, max(1, stride))
        if tile is None:
            c_img = pad_to_multiple(c_img, 8)
        return StageTwoInputs(cond_img=cond_img, c_img=c_img, latent_size=(h1, w1), tile=tile, plan=plan)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, 77, D) penultimate-layer OpenCLIP embedding; the last PROMPT_CACHE_SIZE prompts are kept (the
        default and negative prompts of a batch stay). The text encoder is on the device only while it
        encodes a prompt not seen before."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return self._prompt_cache[prompt]
        with self._monitor("prompt"), self.placement.using(self.text_encoder, release=True):
            embedding = encode_prompt(self._stage2(), [prompt]).float().to(self.execution_device)
        self._prompt_cache[prompt] = embedding
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return embedding

    def caption_image(self, rgb: np.ndarray, caption: str | None = None) -> str | None:
        """The image's caption: `caption` when given, else the captioner's (None without one). The
        captioner is on the device only while it captions."""
        if caption is not None:
            return caption.strip()
        if self.captioner is None:
            return None
        with self._monitor("caption"):
            return self.captioner.caption(rgb)

    def tile_conditioning(self, rgb: np.ndarray, inputs: StageTwoInputs, x: torch.Tensor, tile: tuple[int, int],
                          prompt: str) -> tuple[dict | None, dict | None]:
        """({latent window: text embedding}, {latent window: caption}) for sampling `x` in `tile` =
        (size, stride) latent tiles: each window's region of the input captioned, joined with `prompt`
        and encoded (once per distinct prompt). (None, None) when the latent is smaller than a tile."""
        from ..captions.tiles import tile_prompts

        windows = sampling_windows(x.shape[-2], x.shape[-1], *tile)
        if not windows:
            return None, None
        with self._monitor("caption"):
            captions, prompts = tile_prompts(self.captioner, rgb, windows, cond_size=tuple(inputs.cond_img.shape[-2:]),
                                             prompt=prompt, latent_scale=VAE_SCALE)
        return {w: self.encode_prompt(p) for w, p in prompts.items()}, captions

    def prepare_latents(self, c_img: torch.Tensor, noise: GeneratorNoise, *, start_point: str, noise_aug: int):
        """Draw #1: x_T (`restorecli.diffusion.start.initial_latent`: randn, or with start point `cond`
        the condition latent noised to t = T-1); draw #2 (noise_aug > 0): the condition latent noised to
        t = noise_aug (`augment_condition`), shared by cond and uncond."""
        x_T = initial_latent(c_img.shape, noise=noise, schedule=self.schedule, start_point=start_point,
                             c_img=c_img, device=c_img.device)
        return x_T, augment_condition(c_img, int(noise_aug), noise=noise, schedule=self.schedule)

    def guidance_target(self, cond_img: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """`2 * pad(stage1) - 1`, zero-padded bottom/right to 8 x the sampled latent's size: the v2-era
        `pad_to_multiples_of(clean, 64) * 2 - 1` untiled; with tiled sampling the stage-2 padding (8, and
        the latent's own zero padding when tiling falls back) so the target covers the latent exactly."""
        h, w = latent.shape[-2] * VAE_SCALE, latent.shape[-1] * VAE_SCALE
        img = cond_img.float()
        padded = torch.nn.functional.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2]), value=0.0)
        return padded.to(self.execution_device) * 2 - 1

    def prepare_guidance(self, inputs: StageTwoInputs, x_T: torch.Tensor, noise: GeneratorNoise,
                         settings: GuidanceSettings,
                         posterior_noise: GeneratorNoise | None = None) -> RestorationGuidance:
        """The x0 hook that applies restoration guidance (`restorecli.diffusion.guidance`).

        `noise` is the image's generator (the spaced sampler draws the target's posterior samples from
        it, in the v2-era order); `posterior_noise` the separate stream every other sampler draws them
        from (default `noise.derived()`), so their own noise is the same at every guidance scale.

        With tiled sampling the hook still sees the whole latent's x0 (after the tiles' blending), so
        the weight map and the loss are the whole image's. rgb space then back-propagates through the
        full-size decoder, with gradient checkpointing to bound its memory (the tiled VAE has no
        backward pass).
        """
        if settings.space == "rgb" and inputs.tile is not None:
            log.warning("rgb-space guidance back-propagates through the VAE decoder of the whole %dx%d image at "
                        "every step (about 3 GB per 512x512 pixels in float32, checkpointed); latent space does not",
                        x_T.shape[-1] * VAE_SCALE, x_T.shape[-2] * VAE_SCALE)
        choice = inputs.plan.encode if inputs.plan is not None else VaeChoice()
        encode = None
        if choice.tile is not None:
            def encode(target: torch.Tensor) -> torch.Tensor:
                return tiled_encode(self.vae, target, tile_size=choice.tile, recompute=choice.recompute,
                                    offload=choice.offload or None)

        return RestorationGuidance(
            settings, self.guidance_target(inputs.cond_img, x_T), vae=self.vae,
            latent_scale_factor=self.latent_scale_factor, noise=noise,
            posterior_noise=posterior_noise if posterior_noise is not None else noise.derived(GUIDANCE_STREAM),
            checkpoint=inputs.tile is not None,
            encode=encode,
        )

    def guidance_map(self, inputs: StageTwoInputs, x_T: torch.Tensor, settings: GuidanceSettings,
                     output_size, guide: RestorationGuidance | None = None) -> torch.Tensor:
        """The region weight map W of the guidance loss (w_mse: 1 - tanh(block Sobel); mse: ones),
        cropped to the stage-1 size and resized to the output size, (1, 1, H, W) in [0, 1]."""
        h0, w0 = inputs.cond_img.shape[-2:]
        if settings.loss == "mse":
            return torch.ones((inputs.cond_img.shape[0], 1, *output_size))
        weight = guide.weight if guide is not None else weight_map(self.guidance_target(inputs.cond_img, x_T).add(1).div(2))
        return resize_to(weight[..., :h0, :w0].float().cpu(), output_size).clamp(0, 1)

    @staticmethod
    def postprocess_map(maps: torch.Tensor, output_type: str):
        """pt: (N, 1, H, W); np: HxW float32 arrays; pil: 8-bit grayscale images (rounded)."""
        if output_type == "pt":
            return maps
        if output_type == "np":
            return [m[0].numpy().astype(np.float32) for m in maps]
        from PIL import Image

        return [Image.fromarray((m[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()) for m in maps]

    def denoise_image(self, x_T, cond, uncond, inputs: StageTwoInputs, *, sampling: SamplerSettings, noise,
                      guidance: GuidanceSettings, on_step=None, source=None, tile_text=None):
        """`denoise` with restoration guidance (built per attempt) and the out-of-memory retry: a second
        attempt uses half the tiles and starts from the same state of both streams (the image's generator
        is reset; guidance's separate posterior stream is derived afresh from the seed), so it draws the
        same noise. `tile_text(x_T, tile)`: the per-window text embeddings of a tiled attempt (per-tile
        captions), made before its sampling starts. Returns (z, the guidance hook or None)."""
        state, draws = noise.generator.get_state(), noise.draws
        hooks: list[RestorationGuidance | None] = []

        def attempt(tile):
            noise.generator.set_state(state)
            noise.draws = draws
            conditioned = cond
            if tile is not None and tile_text is not None:
                conditioned = cond.with_tile_text(tile_text(x_T, tile))
            guide = None
            if guidance.enabled:
                guide = self.prepare_guidance(inputs, x_T, noise, guidance, noise.derived(GUIDANCE_STREAM))
            hooks.append(guide)
            return self.denoise(x_T, conditioned, uncond, sampling=sampling, noise=noise, tile=tile, on_step=on_step,
                                x0_hook=guide,
                                batch_cfg=False if inputs.plan is not None and inputs.plan.unbatched_cfg else None)

        h0, w0 = inputs.cond_img.shape[-2:]
        z = self._run_stage(
            "sampling", attempt, inputs.tile, lambda tile: smaller_sample_tile(tile, h0, w0),
            lambda tile: f"{tile[0] * VAE_SCALE}-pixel sampling tiles (stride {tile[1] * VAE_SCALE})", source,
        )
        return z, hooks[-1]

    def denoise(self, x_T, cond, uncond, *, sampling: SamplerSettings, noise, tile, on_step=None, x0_hook=None,
                batch_cfg: bool | None = None):
        """The sampler over the UNet + IRControlNet (and the VAE when guidance needs it), on the device.
        `batch_cfg`: False when the plan has room for one branch per call only; None: `cfg_batching()`."""
        model = ControlledModel(ControlledUNet(self.unet, self.controlnet))
        modules = (self.unet, self.controlnet) + ((self.vae,) if x0_hook is not None else ())
        with self.placement.using(*modules):
            return sample(
                sampling.sampler, model, x_T, schedule=self.schedule, steps=sampling.steps, cond=cond,
                uncond=uncond, cfg=sampling.cfg, rescale_cfg=sampling.rescale_cfg, noise=noise, tile=tile,
                batch_cfg=self.cfg_batching() if batch_cfg is None else batch_cfg,
                on_step=on_step, x0_hook=x0_hook, **sampling.knobs,
            )

    def decode_image(self, z: torch.Tensor, inputs: StageTwoInputs, *, source=None) -> torch.Tensor:
        """`decode` as planned (`inputs.plan.decode`), once more with leaner tiles after out-of-memory."""
        plan = inputs.plan.decode if inputs.plan is not None else VaeChoice()
        return self._run_stage(
            "decode", lambda vae: self.decode(z, inputs, vae=vae), plan,
            lambda vae: leaner_vae_choice(vae, max(z.shape[-2:]), part="decode", device=self.execution_device),
            lambda vae: vae.describe("latent px") + " VAE", source,
        )

    def decode(self, z: torch.Tensor, inputs: StageTwoInputs, *, vae: VaeChoice | None = None) -> torch.Tensor:
        """`vae_decode(z[..., :h1, :w1])[..., :h0, :w0]`, no clamp ; with the exact tiled
        decoder when `vae` (a plan's choice) has a tile (same result)."""
        h1, w1 = inputs.latent_size
        h0, w0 = inputs.cond_img.shape[-2:]
        z = z[..., :h1, :w1]
        return self._decode(z, vae or VaeChoice())[..., :h0, :w0]

    def color_correct(self, decoded: torch.Tensor, cond_img: torch.Tensor, kind: str, output_size, *,
                      on_cpu: bool = False, rows: int | None = None) -> torch.Tensor:
        """`color_fix((x + 1) / 2, stage1)` then a bicubic antialiased resize to the output size.
        `on_cpu`: in host memory (the plan's choice when the image-sized buffers would not fit the device).
        `rows`: in exact bands of that many rows, written into `decoded` (the plan's choice when the
        whole-image temporaries would not fit); a resize to the same size is then skipped (it is the
        identity, bit for bit)."""
        if on_cpu:
            decoded, cond_img = decoded.cpu(), cond_img.cpu()
        if rows is not None:
            x = color_fix_in_bands(kind, decoded, cond_img, int(rows))
            return x if tuple(x.shape[-2:]) == tuple(output_size) else resize_to(x, output_size)
        x = apply_color_fix(kind, (decoded + 1) / 2, cond_img.to(decoded.device, decoded.dtype))
        return resize_to(x, output_size)

    # ------------------------------------------------------------------------------------------------
    # the VAE, with exact tiles and the float32 fallback (one place)

    def _offload_tiles(self, vae: VaeChoice) -> bool | None:
        """Paused VAE tiles in host memory: when planned or with --offload; else tiled_vae decides."""
        return True if (vae.offload or (self.placement.offload and self.placement.active)) else None

    def _encode(self, image: torch.Tensor, vae: VaeChoice) -> torch.Tensor:
        """Scaled posterior mode of an image in [-1, 1]; with the exact tiled encoder when `vae.tile`."""
        def run(module) -> torch.Tensor:
            if vae.tile is None:
                return vae_encode(_VaeView(module, self.latent_scale_factor), image)
            moments = tiled_encode(module, image, tile_size=vae.tile, recompute=vae.recompute,
                                   offload=self._offload_tiles(vae), max_stored_bytes=vae.max_stored,
                                   spill_dir=self.spill_dir)
            return posterior_mode(moments) * self.latent_scale_factor

        with self.placement.using(self.vae):
            return self._vae_pass("encode", run)

    def _decode(self, z: torch.Tensor, vae: VaeChoice) -> torch.Tensor:
        """Image (about [-1, 1], unclamped, float32) of a scaled latent; exact tiles when `vae.tile`."""
        def run(module) -> torch.Tensor:
            if vae.tile is None:
                return vae_decode(_VaeView(module, self.latent_scale_factor), z)
            return tiled_decode(module, z / self.latent_scale_factor, tile_size=vae.tile, recompute=vae.recompute,
                                offload=self._offload_tiles(vae), max_stored_bytes=vae.max_stored,
                                spill_dir=self.spill_dir)

        with self.placement.using(self.vae):
            return self._vae_pass("decode", run).float()

    def _vae_pass(self, what: str, run: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        """`run(self.vae)`; a half-precision result that overflowed (NaN/inf) is computed again by a
        float32 copy of the VAE, with a warning. Every VAE pass of the pipeline comes through here.

        `self.vae` itself is never changed (its dtype, parameters and device stay as they are, so a
        failure in the retry or a concurrent user of the module cannot find it half converted); the
        copy is made on the VAE's device for this pass only (the float32 weights: 335 MB for SD 2.1's
        VAE) and freed afterwards.
        """
        x = run(self.vae)
        if x.dtype == torch.float32 or torch.isfinite(x).all():
            return x
        log.warning("the %s VAE %s overflowed; running it again in float32", str(x.dtype).removeprefix("torch."), what)
        del x
        vae32 = _float32_copy(self.vae)
        try:
            return run(vae32)
        finally:
            del vae32
            release_memory()

    # ------------------------------------------------------------------------------------------------
    # stages: monitoring and the out-of-memory retry

    @contextlib.contextmanager
    def _monitor(self, name: str):
        """A stage: inside `stage_monitor(name)` if one is set; afterwards what it freed leaves the process
        (`trim_freed_memory`: the next stage's plan counts on it)."""
        try:
            with self.stage_monitor(name) if self.stage_monitor is not None else contextlib.nullcontext():
                yield
        finally:
            trim_freed_memory()

    def _run_stage(self, name: str, run: Callable[[Any], T], setting, smaller: Callable[[Any], Any],
                   describe: Callable[[Any], str], source: str | None) -> T:
        """`run(setting)`; after an out-of-memory error, caches are freed and it runs once more with
        `smaller(setting)` (with a warning); a second one is this image's InputError."""
        where = source or "image"
        with self._monitor(name):
            try:
                return run(setting)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
                if not is_out_of_memory(exc):
                    raise
                first = brief(exc, 120, with_type=False)
            # outside the except block, so the failed attempt's frames and tensors are gone
            release_memory()
            retry = smaller(setting)
            if retry is None:
                raise InputError(source, f"out of memory in {name} ({first}) and no smaller tiles to try; "
                                 "try a smaller `upscale` or another device")
            log.warning("%s: out of memory in %s (%s); trying once more with %s", where, name, first, describe(retry))
            try:
                return run(retry)
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
                second = brief(exc, 120, with_type=False)
            release_memory()
            raise InputError(source, f"too large for the available memory: {name} ran out of memory even with "
                             f"{describe(retry)} ({second}); try a smaller `upscale`, `max_memory` or `offload`")

    @staticmethod
    def postprocess(x: torch.Tensor, output_type: str):
        """pt: the float tensor as is; np: HWC float32 clipped to [0, 1]; pil: official 8-bit truncation."""
        if output_type == "pt":
            return x
        if output_type == "np":
            return [img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() for img in x.float()]
        from PIL import Image

        u8 = (x.float() * 255).clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in u8]

    # ------------------------------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        """Token context length (77); `restorecli.models.cldm` reads it like `Stage2Models.max_length`."""
        return int(self.text_encoder.config.max_position_embeddings)

    def _stage2(self):
        """The pipeline offers the attributes `restorecli.models.cldm` functions read off Stage2Models."""
        return self


@dataclass(frozen=True)
class _VaeView:
    """The two attributes `restorecli.models.cldm.vae_encode` / `vae_decode` read, for a given VAE module."""

    vae: torch.nn.Module
    latent_scale_factor: float


def _float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 deep copy of `module` on its device; the half-precision tensors are never duplicated
    (each parameter and floating buffer is converted straight into the copy)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
    for b in module.buffers():
        if b.is_floating_point():
            memo[id(b)] = b.detach().float()
    return copy.deepcopy(module, memo)


def _weight_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def _as_rgb_array(image) -> np.ndarray:
    """PIL image or HWC array -> HWC RGB array (uint8, uint16 or float in [0, 1])."""
    if hasattr(image, "mode") and hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise UsageError(f"`image` must be a PIL image or an HWC RGB array, got shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16) and not np.issubdtype(arr.dtype, np.floating):
        raise UsageError(f"`image` must be uint8, uint16 or float, got {arr.dtype}")
    return arr


def _device_and_dtype(args, kwargs):
    """The device and dtype of a `.to(...)` call, as torch.nn.Module.to and DiffusionPipeline.to take them."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            device = arg
    return device, dtype
