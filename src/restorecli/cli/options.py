"""The restoration options shared by `restore IMAGE...` and `restore batch DIR`, defined once.

Each option is an `Annotated` alias with its help text (as huggingface_hub's CLI does); the
`restore_options` decorator appends them all to a command's signature and hands the command one
`RestoreOptions` object instead of forty keyword arguments. The flag names are a contract
(`../shared/reference/cases.json` calls the CLI with them): add flags, never rename them.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..settings.defaults import RestoreOptions

MODEL = "Model"
SAMPLING = "Sampling"
GUIDANCE = "Restoration guidance"
HARDWARE = "Tiling and hardware"


def _opt(*names: str, help: str, panel: str, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=kw.pop("show_default", True), **kw)


def parse_size(text: str | None) -> int | None:
    """'8GB', '512MiB', '2.5G', '1000000' -> bytes (powers of 1024 for every unit)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"`--max-memory` must look like 8GB, 512MB or a byte count; got {text!r}")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


# name -> (annotation, default); order = order in --help
RESTORE_PARAMS: dict[str, tuple[object, object]] = {
    # model
    "model": (Annotated[str, _opt("--model", "-m", help="Model version (v1, v2, v2.1) or a model description JSON file.", panel=MODEL)], "v2.1"),
    "task": (Annotated[str, _opt("--task", help="What to restore: sr (blind super-resolution), denoise, face (aligned 512x512 faces).", panel=MODEL)], "sr"),
    "upscale": (Annotated[Optional[float], _opt("--upscale", "-s", help="Output size relative to the input. [default: 4 for sr, 1 for denoise/face]", panel=MODEL, show_default=False)], None),
    "cleaner": (Annotated[Optional[str], _opt("--cleaner", help="Stage-1 model: a pinned cleaner name (see `restore weights list`) or any image-to-image model file spandrel loads (Real-ESRGAN, SwinIR, HAT, DAT, SCUNet...). [default: the version's cleaner]", panel=MODEL, show_default=False)], None),
    "stage1_only": (Annotated[bool, _opt("--stage1-only", help="Write the stage-1 (degradation removal) result and stop; no diffusion weights needed.", panel=MODEL)], False),
    "weights_dir": (Annotated[Optional[str], _opt("--weights-dir", envvar="RESTORE_WEIGHTS_DIR", help="Folder of checkpoint files you already have (found by file name, verified by sha256).", panel=MODEL, show_default=False)], None),
    # sampling
    "sampler": (Annotated[Optional[str], _opt("--sampler", help="Sampler: spaced, ddim, dpm++_m2, edm_euler, edm_euler_a, edm_heun, edm_dpm_2, edm_dpm_2_a, edm_lms, edm_dpm++_2s_a, edm_dpm++_sde, edm_dpm++_2m, edm_dpm++_2m_sde, edm_dpm++_3m_sde. [default: per version]", panel=SAMPLING, show_default=False)], None),
    "steps": (Annotated[Optional[int], _opt("--steps", help="Sampling steps. [default: 10; v2: 50]", panel=SAMPLING, show_default=False)], None),
    "seed": (Annotated[int, _opt("--seed", help="Seed of the one CPU generator that draws all noise (same seed + inputs + device = same bytes).", panel=SAMPLING)], 231),
    "cfg": (Annotated[Optional[float], _opt("--cfg", help="Classifier-free guidance scale (1 = no unconditional pass). [default: 6; v2: 4]", panel=SAMPLING, show_default=False)], None),
    "rescale_cfg": (Annotated[bool, _opt("--rescale-cfg", help="Ramp the cfg scale from 1 (t=1000) to 1+cfg (t=0), as the official --rescale_cfg.", panel=SAMPLING)], False),
    "prompt": (Annotated[Optional[str], _opt("--prompt", "-p", help="Positive prompt. [default: the official long quality prompt; v2: empty]", panel=SAMPLING, show_default=False)], None),
    "negative_prompt": (Annotated[Optional[str], _opt("--negative-prompt", "-n", help="Negative prompt (the unconditional branch of cfg). [default: per version]", panel=SAMPLING, show_default=False)], None),
    "captioner": (Annotated[str, _opt("--captioner", help="Image captioner prepended to the prompt; only `none` for now.", panel=SAMPLING)], "none"),
    "strength": (Annotated[float, _opt("--strength", help="Control strength: scales every IRControlNet residual.", panel=SAMPLING)], 1.0),
    "start_point": (Annotated[str, _opt("--start-point", help="Start from pure noise, or from the condition latent noised to t=999 (`cond`).", panel=SAMPLING)], "noise"),
    "noise_aug": (Annotated[int, _opt("--noise-aug", help="Noise the condition latent to this timestep first (0 = off).", panel=SAMPLING)], 0),
    "s_churn": (Annotated[float, _opt("--s-churn", help="EDM samplers: churn (extra noise per step).", panel=SAMPLING)], 0.0),
    "s_tmin": (Annotated[float, _opt("--s-tmin", help="EDM samplers: churn only for sigma >= this.", panel=SAMPLING)], 0.0),
    "s_tmax": (Annotated[float, _opt("--s-tmax", help="EDM samplers: churn only for sigma <= this.", panel=SAMPLING)], 300.0),
    "s_noise": (Annotated[float, _opt("--s-noise", help="EDM samplers: noise multiplier.", panel=SAMPLING)], 1.0),
    "eta": (Annotated[float, _opt("--eta", help="Ancestral/SDE EDM samplers: amount of fresh noise (DDIM ignores it, as upstream).", panel=SAMPLING)], 1.0),
    "order": (Annotated[int, _opt("--order", help="edm_lms: order of the linear multistep method.", panel=SAMPLING)], 1),
    "color_fix": (Annotated[str, _opt("--color-fix", help="Colour correction toward the stage-1 image: wavelet, adain or none.", panel=SAMPLING)], "wavelet"),
    # guidance
    "guidance": (Annotated[float, _opt("--guidance", help="Restoration guidance scale: pulls the result toward the stage-1 image (0 = off).", panel=GUIDANCE)], 0.0),
    "guidance_loss": (Annotated[str, _opt("--guidance-loss", help="w_mse (region-adaptive: strong in flat areas, weak on edges) or mse.", panel=GUIDANCE)], "w_mse"),
    "guidance_space": (Annotated[str, _opt("--guidance-space", help="Compute the guidance loss on the latent or on the decoded rgb image.", panel=GUIDANCE)], "latent"),
    "guidance_start": (Annotated[int, _opt("--guidance-start", help="Guide only while t < this (t counts down from 1000).", panel=GUIDANCE)], 1001),
    "guidance_stop": (Annotated[int, _opt("--guidance-stop", help="Guide only while t > this.", panel=GUIDANCE)], -1),
    "guidance_repeat": (Annotated[int, _opt("--guidance-repeat", help="Guidance gradient steps per sampling step.", panel=GUIDANCE)], 1),
    # tiling and hardware
    "tile_size": (Annotated[Optional[int], _opt("--tile-size", help="Tiled sampling: tile size in pixels (multiple of 64). [default: automatic]", panel=HARDWARE, show_default=False)], None),
    "tile_stride": (Annotated[Optional[int], _opt("--tile-stride", help="Tiled sampling: tile stride in pixels. [default: tile size / 2]", panel=HARDWARE, show_default=False)], None),
    "cleaner_tile_size": (Annotated[Optional[int], _opt("--cleaner-tile-size", help="Tiled stage 1: tile size in pixels (multiple of 64). [default: automatic]", panel=HARDWARE, show_default=False)], None),
    "cleaner_tile_stride": (Annotated[Optional[int], _opt("--cleaner-tile-stride", help="Tiled stage 1: tile stride in pixels. [default: tile size / 2]", panel=HARDWARE, show_default=False)], None),
    "device": (Annotated[str, _opt("--device", help="auto, cpu, cuda (or cuda:N) or mps.", panel=HARDWARE)], "auto"),
    "precision": (Annotated[Optional[str], _opt("--precision", help="fp32, fp16 or bf16. [default: fp16 on CUDA, fp32 elsewhere]", panel=HARDWARE, show_default=False)], None),
    "max_memory": (Annotated[Optional[str], _opt("--max-memory", help="Cap on the memory tiling plans for, e.g. 8GB. [default: what the device has free]", panel=HARDWARE, show_default=False)], None),
    "offload": (Annotated[bool, _opt("--offload", help="Keep idle submodules on the CPU (small GPUs).", panel=HARDWARE)], False),
    "compile": (Annotated[bool, _opt("--compile", help="torch.compile the UNet and ControlNet (slow first image, faster after).", panel=HARDWARE)], False),
}


def restore_options(command):
    """Append RESTORE_PARAMS to `command`'s signature; call it with `opts=RestoreOptions(...)`."""
    own = inspect.signature(command, eval_str=True)
    own_params = [p for name, p in own.parameters.items() if name != "opts"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
        for name, (ann, default) in RESTORE_PARAMS.items()
    ]
    own_params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind != p.KEYWORD_ONLY else p for p in own_params]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in RESTORE_PARAMS}
        values["max_memory"] = parse_size(values["max_memory"])
        opts = RestoreOptions(**values)
        return command(opts=opts, **kwargs)

    del wrapper.__wrapped__
    wrapper.__signature__ = own.replace(parameters=own_params + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own_params + extra}
    return wrapper
