"""`DiffBIRPipeline`: DiffBIR's two-stage restoration as a diffusers pipeline.

    from restorecli import DiffBIRPipeline
    pipe = DiffBIRPipeline.from_version("v2.1")             # or .from_description("my_model.json")
    out = pipe(image, upscale=4, seed=231)                   # image: PIL, HWC uint8/uint16 array
    out.images[0]                                            # HWC float32 in [0, 1] (output_type="np")

`__call__` follows the official inference (DiffBIR HEAD `diffbir/pipeline.py Pipeline.run` and
`apply_cldm`; PIPELINE.md 2-9) step by step: check inputs -> stage 1 -> encode the condition -> encode
the prompts -> prepare the latents -> denoise -> decode -> colour fix -> postprocess. Each step is one
method. Randomness: one CPU generator per image (`seed`): x_T first, then noise augmentation, then every
draw the sampler makes, each drawn on the CPU and moved to the device (DESIGN.md, "Seeds").

Memory and speed are handled here, each in one place:

* `plan_memory` asks `restorecli.pipeline.planning` for the stage-2 tiles that fit the device (or `max_memory`):
  the exact tiled VAE whenever the plain one would not fit (same result), the official latent tiles for
  sampling only when untiled sampling would not fit (a different result: logged as a warning); explicit
  `tile_size`/`tile_stride` win. Stage 1 plans its own tiles (`restorecli.stage1.run`).
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
import math
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .colorfix import color_fix as apply_color_fix
from ..diffusion.conditioning import ControlCondition, ControlledModel
from ..diffusion.guidance import GuidanceSettings, RestorationGuidance, weight_map
from ..diffusion.noise import GeneratorNoise
from ..diffusion.sampling import sample
from ..diffusion.schedules import NoiseSchedule
from ..vae.tiled import posterior_mode, tiled_decode, tiled_encode
from ..errors import InputError, UsageError, brief
from ..oom import is_out_of_memory, release_memory
from .memory import available_memory
from ..models.cldm import ControlledUNet, encode_prompt, vae_decode, vae_encode
from ..models.description import DiffusionSpec
from ..stage1.cleaners import Cleaner
from ..settings.defaults import COLOR_FIXES, SAMPLERS, START_POINTS
from .placement import Placement, module_device
from .planning import (
    MemoryPlan,
    VaeChoice,
    leaner_vae_choice,
    plan_stage2,
    smaller_sample_tile,
    stage2_budget,
)
from ..stage1.run import SWINIR_MULTIPLE, Stage1Result, pad_to_multiple, resize_to, run_stage1, stage1_only_output

log = logging.getLogger("restorecli.pipeline.diffbir")

#: Latent downsampling of the SD VAE.
VAE_SCALE = 8
#: Untiled, the condition is zero-padded to a multiple of 64 (PIPELINE.md 2.4).
PAD_UNTILED = 64
#: With tiled sampling, upstream pads to a multiple of 8 only (PIPELINE.md 2.4, 10.11).
PAD_TILED = 8

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
    (N, 1, H, W) float32, "pil": 8-bit grayscale ("L") images."""

    images: Any
    stage1: Any = None
    seeds: list[int] = field(default_factory=list)
    guidance_maps: Any = None
    plan: MemoryPlan | None = None


@dataclass
class StageTwoInputs:
    """What stage 2 needs of one image, with the sizes the official crops use (PIPELINE.md 2.4)."""

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
    `cleaner` (a `restorecli.stage1.cleaners.Cleaner`) is held as a plain attribute; stage-2 components may
    be None for a stage-1-only pipeline.
    """

    model_cpu_offload_seq = "text_encoder->controlnet->unet->vae"

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
    ):
        super().__init__()
        self.register_modules(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.cleaner = cleaner
        self.stage1_pipeline = stage1_pipeline
        self.diffusion = diffusion or DiffusionSpec()
        self.latent_scale_factor = float(latent_scale_factor)
        self.schedule = NoiseSchedule.from_spec(self.diffusion)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        first = next((m for m in (unet, cleaner, vae) if m is not None and module_device(m) is not None), None)
        self.placement = Placement(module_device(first) if first is not None else "cpu")
        #: cond + uncond in one batched call: None = automatic (accelerators yes, CPU upstream's pattern)
        self.batch_cfg: bool | None = None
        #: `stage_monitor(name)` -> a context manager around each stage (benchmarks time and measure them)
        self.stage_monitor: Callable[[str], Any] | None = None

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
    def from_description(cls, path, *, device="cpu", dtype=torch.float32, stage1_only: bool = False, **kwargs):
        """A pipeline from a `restorecli-model/1` JSON file (see `../shared/reference/model_v.json`)."""
        from .loading import load_pipeline
        from ..settings.defaults import RestoreOptions

        opts = RestoreOptions(model=str(path), device=str(device), stage1_only=stage1_only, **kwargs)
        return load_pipeline(opts, dtype=dtype)

    @classmethod
    def from_version(cls, version: str = "v2.1", *, task: str = "sr", device="auto", stage1_only: bool = False, **kwargs):
        """A pipeline of a pinned version (v1, v2, v2.1) and task; downloads the pinned weights if needed."""
        from .loading import load_pipeline
        from ..settings.defaults import RestoreOptions

        opts = RestoreOptions(model=version, task=task, device=str(device), stage1_only=stage1_only, **kwargs)
        return load_pipeline(opts)

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
        """True: cond and uncond in one batched UNet + ControlNet call (accelerators). None on the CPU:
        the samplers' upstream pattern (batched for ddim / dpm++_m2, two calls for spaced / edm), which
        reproduces the official runs bit for bit; batching there changes float rounding
        (`restorecli.diffusion.sampling.sample`). `batch_cfg` overrides."""
        if self.batch_cfg is not None:
            return self.batch_cfg
        return True if self.execution_device.type != "cpu" else None

    # ------------------------------------------------------------------------------------------------
    # the call

    @torch.no_grad()
    def __call__(
        self,
        image,
        *,
        upscale: float = 4.0,
        stage1_only: bool = False,
        prompt: str = "",
        negative_prompt: str = "",
        sampler: str = "edm_dpm++_3m_sde",
        steps: int = 10,
        cfg: float = 6.0,
        rescale_cfg: bool = False,
        strength: float = 1.0,
        start_point: str = "noise",
        noise_aug: int = 0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = 300.0,
        s_noise: float = 1.0,
        eta: float = 1.0,
        order: int = 1,
        seed: int = 231,
        color_fix: str = "wavelet",
        guidance: float = 0.0,
        guidance_loss: str = "w_mse",
        guidance_space: str = "latent",
        guidance_start: int = 1001,
        guidance_stop: int = -1,
        guidance_repeat: int = 1,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        cleaner_tile_size: int | None = None,
        cleaner_tile_stride: int | None = None,
        max_memory: int | None = None,
        output_type: str = "np",
        return_guidance_map: bool = False,
        on_step: Callable[[int, int], None] | None = None,
        source: str | None = None,
    ) -> DiffBIROutput:
        """Restore one image (PIL image, or HWC RGB uint8/uint16/float array).

        Defaults are the official command line's (HEAD); `restorecli.settings.defaults` has each version's.
        `tile_size`/`tile_stride` (pixels) turn on the official tiled sampling; `cleaner_tile_*` the
        official tiled stage 1. `max_memory` (bytes) caps the memory every stage plans its tiles for
        (default: what the device has free; `restorecli.pipeline.planning`). `on_step(done, total)` reports
        sampling progress. `source` names the image in error messages.

        Restoration guidance (PIPELINE.md 7.2, `restorecli.diffusion.guidance`): `guidance` > 0 pulls
        every step toward the stage-1 image with the official scale; `guidance_loss` w_mse | mse,
        `guidance_space` latent | rgb, active while `guidance_stop` < t < `guidance_start`,
        `guidance_repeat` iterations per step. 0 (default) changes nothing, not even the random draws.
        `return_guidance_map` fills `DiffBIROutput.guidance_maps`.
        """
        # 1. Check inputs
        rgb = self.check_inputs(
            image, sampler=sampler, steps=steps, cfg=cfg, strength=strength, start_point=start_point,
            noise_aug=noise_aug, color_fix=color_fix, guidance=guidance, tile_size=tile_size,
            tile_stride=tile_stride, output_type=output_type, stage1_only=stage1_only,
        )
        guidance_settings = GuidanceSettings(
            float(guidance), guidance_loss, guidance_space, int(guidance_start), int(guidance_stop), int(guidance_repeat)
        )
        # 2. Stage 1: the clean but smooth condition image I_reg (>= 512 short side)
        stage1 = self.run_stage1(
            rgb, upscale=upscale, tile_size=cleaner_tile_size, tile_stride=cleaner_tile_stride,
            max_memory=max_memory, source=source, keep_on_device=stage1_only,
        )
        if stage1_only:
            result = stage1_only_output(stage1)
            return DiffBIROutput(images=self.postprocess(result, output_type), seeds=[seed])

        generator = torch.Generator("cpu").manual_seed(int(seed))
        noise = GeneratorNoise(generator)
        # 3. Plan stage 2's memory: VAE tiles, sampling tiles (and with them the padding)
        plan = self.plan_memory(
            stage1, tile_size=tile_size, tile_stride=tile_stride, max_memory=max_memory, sampler=sampler,
            cfg=cfg, guidance=guidance_settings,
        )
        # 4. Encode the condition (pad, VAE-encode the posterior mode, pad the latent)
        inputs = self.encode_condition(stage1.cond_img, plan, source=source)
        # 5. Encode the prompts
        c_txt = self.encode_prompt(prompt)
        c_txt_neg = self.encode_prompt(negative_prompt)
        # 6. Prepare the latents: x_T (or the noised condition), then noise augmentation
        x_T, c_img = self.prepare_latents(inputs.c_img, noise, start_point=start_point, noise_aug=noise_aug)
        # 7. Denoise, with restoration guidance (its draws happen in the loop)
        z, guide = self.denoise_image(
            x_T, ControlCondition(c_txt, c_img, strength), ControlCondition(c_txt_neg, c_img, strength), inputs,
            sampler=sampler, steps=steps, cfg=cfg, rescale_cfg=rescale_cfg, noise=noise,
            knobs={"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise, "eta": eta, "order": order},
            guidance=guidance_settings, on_step=on_step, source=source,
        )
        # 8. Decode (crop the latent and the image back to the unpadded sizes)
        decoded = self.decode_image(z, inputs, source=source)
        # 9. Colour fix toward the stage-1 image, then resize to the output size
        with self._monitor("colour fix"):
            restored = self.color_correct(decoded, inputs.cond_img, color_fix, stage1.output_size, on_cpu=plan.post_on_cpu)
        # 10. Postprocess
        maps = None
        if return_guidance_map:
            maps = self.guidance_map(inputs, x_T, guidance_settings, stage1.output_size, guide)
        return DiffBIROutput(
            images=self.postprocess(restored, output_type),
            stage1=self.postprocess(stage1_only_output(stage1), output_type),
            seeds=[int(seed)],
            guidance_maps=None if maps is None else self.postprocess_map(maps, output_type),
            plan=plan,
        )

    # ------------------------------------------------------------------------------------------------
    # the steps

    def check_inputs(self, image, *, sampler, steps, cfg, strength, start_point, noise_aug, color_fix,
                     guidance, tile_size, tile_stride, output_type, stage1_only) -> np.ndarray:
        """Validate everything before any tensor work; return the image as an HWC RGB array."""
        if self.cleaner is None:
            raise UsageError("this pipeline has no stage-1 cleaner")
        if not stage1_only and not self.has_stage2:
            raise UsageError("this pipeline was loaded for stage 1 only; load it without stage1_only to run stage 2")
        if sampler not in SAMPLERS:
            raise UsageError(f"`sampler` must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        if int(steps) < 1:
            raise UsageError(f"`steps` must be >= 1, got {steps}")
        if cfg < 0:
            raise UsageError(f"`cfg` must be >= 0, got {cfg}")
        if not 0 <= strength <= 10:
            raise UsageError(f"`strength` must be in [0, 10], got {strength}")
        if start_point not in START_POINTS:
            raise UsageError(f"`start_point` must be one of {', '.join(START_POINTS)}; got {start_point!r}")
        if not 0 <= int(noise_aug) < self.schedule.num_timesteps:
            raise UsageError(f"`noise_aug` must be in [0, {self.schedule.num_timesteps - 1}], got {noise_aug}")
        if color_fix not in COLOR_FIXES:
            raise UsageError(f"`color_fix` must be one of {', '.join(COLOR_FIXES)}; got {color_fix!r}")
        if not (math.isfinite(guidance) and guidance >= 0):
            raise UsageError(f"`guidance` must be a finite number >= 0, got {guidance}")
        if tile_size is not None and (tile_size <= 0 or tile_size % 64):
            raise UsageError(f"`tile_size` must be a positive multiple of 64, got {tile_size}")
        if tile_stride is not None and (tile_size is None or not 0 < tile_stride <= tile_size):
            raise UsageError(f"`tile_stride` must be in (0, tile_size], got {tile_stride}")
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
                    guidance: GuidanceSettings | None = None) -> MemoryPlan:
        """Stage-2 tiles for this image within what the device has free (at most `max_memory`), see
        `restorecli.pipeline.planning`. With `set_offload(True)` the weights a stage brings to the device are
        taken off the budget first."""
        h0, w0 = stage1.cond_img.shape[-2:]
        device = self.execution_device
        budget = stage2_budget(device, max_memory)
        if self.placement.offload and self.placement.active:
            budget -= max(_weight_bytes(self.unet, self.controlnet), _weight_bytes(self.vae))
        batched = self.cfg_batching()
        if batched is None:
            batched = sampler in ("ddim", "dpm++_m2")  # upstream batches these (diffusion.sampling)
        plan = plan_stage2(
            h0, w0, vae_config=self.vae.config, unet_config=self.unet.config, dtype=self.unet.dtype,
            vae_dtype=self.vae.dtype, device=device, budget=max(budget, 0), tile_size=tile_size,
            tile_stride=tile_stride, cfg_batch=2 if (batched and cfg != 1.0) else 1,
            guidance_space=guidance.space if guidance is not None and guidance.enabled else None,
            output_size=stage1.output_size,
        )
        log.info("memory plan: %s", plan.describe())
        short = [name for name in ("encode", "sampling", "decode") if plan.estimates.get(name, 0) > plan.budget]
        if short:
            log.warning("%s may not fit the %.1f GiB at hand even in the smallest tiles; trying anyway",
                        " and ".join(short), plan.budget / 2**30)
        if plan.sample_tile_auto:
            size, stride = plan.sample_tile
            log.warning(
                "sampling %dx%d in tiles of %d px (stride %d px): untiled sampling needs about %.1f GiB, more than "
                "the %.1f GiB at hand; tiled results differ slightly from untiled ones (--tile-size chooses the "
                "tiles, --max-memory the budget)", w0, h0, size * VAE_SCALE, stride * VAE_SCALE,
                plan.untiled.get("sampling", 0) / 2**30, plan.budget / 2**30,
            )
        return plan

    def encode_condition(self, cond_img: torch.Tensor, plan: MemoryPlan | None = None, *, tile_size=None,
                         tile_stride=None, source=None) -> StageTwoInputs:
        """Pad, encode and pad again as `Pipeline.apply_cldm` (PIPELINE.md 2.4, 4.1).

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
        """(1, 77, D) penultimate-layer OpenCLIP embedding; cached per prompt for the pipeline's life. The
        text encoder is on the device only while it encodes a prompt not seen before."""
        if prompt not in self._prompt_cache:
            with self._monitor("prompt"), self.placement.using(self.text_encoder, release=True):
                self._prompt_cache[prompt] = encode_prompt(self._stage2(), [prompt]).float().to(self.execution_device)
        return self._prompt_cache[prompt]

    def prepare_latents(self, c_img: torch.Tensor, noise: GeneratorNoise, *, start_point: str, noise_aug: int):
        """Draw #1: x_T = randn (or, with start point `cond`, the condition latent noised to t = T-1);
        draw #2 (noise_aug > 0): the condition latent noised to t = noise_aug, shared by cond and uncond
        (PIPELINE.md 6.6, 6.7)."""
        first = noise.randn(c_img.shape, c_img.device)
        if start_point == "cond":
            x_T = self.schedule.q_sample(c_img, self.schedule.num_timesteps - 1, first)
        else:
            x_T = first
        if noise_aug > 0:
            c_img = self.schedule.q_sample(c_img, int(noise_aug), noise.randn(c_img.shape, c_img.device))
        return x_T, c_img

    def guidance_target(self, cond_img: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """`2 * pad(stage1) - 1`, zero-padded bottom/right to 8 x the sampled latent's size: the v2-era
        `pad_to_multiples_of(clean, 64) * 2 - 1` untiled; with tiled sampling the stage-2 padding (8, and
        the latent's own zero padding when tiling falls back) so the target covers the latent exactly."""
        h, w = latent.shape[-2] * VAE_SCALE, latent.shape[-1] * VAE_SCALE
        img = cond_img.float()
        padded = torch.nn.functional.pad(img, (0, w - img.shape[-1], 0, h - img.shape[-2]), value=0.0)
        return padded.to(self.execution_device) * 2 - 1

    def prepare_guidance(self, inputs: StageTwoInputs, x_T: torch.Tensor, noise: GeneratorNoise,
                         settings: GuidanceSettings) -> RestorationGuidance:
        """The x0 hook that applies restoration guidance (`restorecli.diffusion.guidance`).

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
            latent_scale_factor=self.latent_scale_factor, noise=noise, checkpoint=inputs.tile is not None,
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

    def denoise_image(self, x_T, cond, uncond, inputs: StageTwoInputs, *, sampler, steps, cfg, rescale_cfg, noise,
                      knobs, guidance: GuidanceSettings, on_step=None, source=None):
        """`denoise` with restoration guidance (built per attempt) and the out-of-memory retry: a second
        attempt uses half the tiles and starts from the same generator state, so it draws the same noise.
        Returns (z, the guidance hook or None)."""
        state, draws = noise.generator.get_state(), noise.draws
        hooks: list[RestorationGuidance | None] = []

        def attempt(tile):
            noise.generator.set_state(state)
            noise.draws = draws
            guide = self.prepare_guidance(inputs, x_T, noise, guidance) if guidance.enabled else None
            hooks.append(guide)
            return self.denoise(x_T, cond, uncond, sampler=sampler, steps=steps, cfg=cfg, rescale_cfg=rescale_cfg,
                                noise=noise, tile=tile, knobs=knobs, on_step=on_step, x0_hook=guide,
                                batch_cfg=False if inputs.plan is not None and inputs.plan.unbatched_cfg else None)

        h0, w0 = inputs.cond_img.shape[-2:]
        z = self._run_stage(
            "sampling", attempt, inputs.tile, lambda tile: smaller_sample_tile(tile, h0, w0),
            lambda tile: f"{tile[0] * VAE_SCALE}-pixel sampling tiles (stride {tile[1] * VAE_SCALE})", source,
        )
        return z, hooks[-1]

    def denoise(self, x_T, cond, uncond, *, sampler, steps, cfg, rescale_cfg, noise, tile, knobs, on_step=None, x0_hook=None,
                batch_cfg: bool | None = None):
        """The sampler over the UNet + IRControlNet (and the VAE when guidance needs it), on the device.
        `batch_cfg`: False when the plan has room for one branch per call only; None: `cfg_batching()`."""
        model = ControlledModel(ControlledUNet(self.unet, self.controlnet))
        modules = (self.unet, self.controlnet) + ((self.vae,) if x0_hook is not None else ())
        with self.placement.using(*modules):
            return sample(
                sampler, model, x_T, schedule=self.schedule, steps=int(steps), cond=cond, uncond=uncond,
                cfg=float(cfg), rescale_cfg=rescale_cfg, noise=noise, tile=tile,
                batch_cfg=self.cfg_batching() if batch_cfg is None else batch_cfg,
                on_step=on_step, x0_hook=x0_hook, **knobs,
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
        """`vae_decode(z[..., :h1, :w1])[..., :h0, :w0]`, no clamp (PIPELINE.md 9.1); with the exact tiled
        decoder when `vae` (a plan's choice) has a tile (same result)."""
        h1, w1 = inputs.latent_size
        h0, w0 = inputs.cond_img.shape[-2:]
        z = z[..., :h1, :w1]
        return self._decode(z, vae or VaeChoice())[..., :h0, :w0]

    def color_correct(self, decoded: torch.Tensor, cond_img: torch.Tensor, kind: str, output_size, *,
                      on_cpu: bool = False) -> torch.Tensor:
        """`color_fix((x + 1) / 2, stage1)` then a bicubic antialiased resize to the output size (PIPELINE.md 9.2).
        `on_cpu`: in host memory (the plan's choice when the image-sized buffers would not fit the device)."""
        if on_cpu:
            decoded, cond_img = decoded.cpu(), cond_img.cpu()
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
                                   offload=self._offload_tiles(vae))
            return posterior_mode(moments) * self.latent_scale_factor

        with self.placement.using(self.vae):
            return self._vae_pass("encode", run)

    def _decode(self, z: torch.Tensor, vae: VaeChoice) -> torch.Tensor:
        """Image (about [-1, 1], unclamped, float32) of a scaled latent; exact tiles when `vae.tile`."""
        def run(module) -> torch.Tensor:
            if vae.tile is None:
                return vae_decode(_VaeView(module, self.latent_scale_factor), z)
            return tiled_decode(module, z / self.latent_scale_factor, tile_size=vae.tile, recompute=vae.recompute,
                                offload=self._offload_tiles(vae))

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

    def _monitor(self, name: str):
        return self.stage_monitor(name) if self.stage_monitor is not None else contextlib.nullcontext()

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
                                 "try a smaller --upscale or another device")
            log.warning("%s: out of memory in %s (%s); trying once more with %s", where, name, first, describe(retry))
            try:
                return run(retry)
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc):
                    raise
                second = brief(exc, 120, with_type=False)
            release_memory()
            raise InputError(source, f"too large for the available memory: {name} ran out of memory even with "
                             f"{describe(retry)} ({second}); try a smaller --upscale, --max-memory or --offload")

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
