"""LoadSettings -> the loaded components of a pipeline: device and precision, weights, cleaner, stage-2
models (this module does not know the pipeline class; `restorecli.pipeline.build` assembles it).

Weights are resolved (found, verified, downloaded) before anything is loaded, so a missing file ends
the run within seconds with one clear line (exit 2), not after minutes of model loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import SetupError, UsageError
from ..settings import LoadSettings, RestoreSettings, default_captioner, default_settings
from .precision import resolve_device, resolve_dtype

log = logging.getLogger("restorecli.pipeline.loading")

@dataclass
class Components:
    """What a DiffBIRPipeline is made of, loaded: the cleaner and its official stage-1 pipeline, the
    stage-2 models (None for stage 1 only), the device, the version's and task's default settings, and
    the captioner."""

    cleaner: Any
    stage1_pipeline: str
    stage2: Any
    device: torch.device
    default_settings: RestoreSettings
    captioner: Any = None  # a restorecli.captions Captioner, or None (`captioner` none, or stage 1 only)
    # `task` unaligned_face: the face cleaner (a SwinIR), the RetinaFace detector, the parsing mask
    face_cleaner: Any = None
    face_detector: Any = None
    face_parser: Any = None


def load_components(
    load: LoadSettings,
    *,
    stage1_only: bool = False,
    torch_dtype: torch.dtype | None = None,
    progress: Callable | None = None,
) -> Components:
    """Load what `load` describes (only stage 1 with `stage1_only`). Weights are resolved before anything
    is loaded. Raises UsageError / SetupError / WeightsError (exit 2)."""
    from .. import weights
    from ..models.configs import full_size_description
    from ..models.description import load_model_description
    from ..stage1.cleaners import load_cleaner
    from ..stage1.run import plan_for_cleaner, stage1_plan

    opts = load
    faces = opts.task == "unaligned_face"
    if faces:
        _check_facexlib()
    device = resolve_device(opts.device)
    dtype = torch_dtype or resolve_dtype(opts.precision, device)
    version = opts.version
    caption_choice = None if stage1_only else default_captioner(opts)  # stage 1 has no prompt to caption for
    if caption_choice is not None:
        from ..captions.loading import check_captioner, locate_captioner

        check_captioner(caption_choice, opts.llava_bit)

    # 1. Find every file first (fast failure), then load.
    description = None
    if version == "custom":
        description = load_model_description(opts.model)
        if description.cleaner is None and opts.cleaner is None:
            raise SetupError(f"{opts.model}: the description has no cleaner; pass `cleaner`")
        if description.cldm is None and not stage1_only:
            raise SetupError(f"{opts.model}: the description has no stage-2 (cldm) section; use `stage1_only`")
        _require_files(description, opts, stage1_only)
        plan = stage1_plan("custom", opts.task)
        cleaner_source = description.cleaner
    else:
        plan = stage1_plan(version, opts.task)
        wiring = weights.wiring(version, opts.task)
        cleaner_source = None if opts.cleaner else weights.resolve(wiring["cleaner"], weights_dir=opts.weights_dir, progress=progress)
        if not stage1_only:
            sd = weights.resolve(wiring["sd"], weights_dir=opts.weights_dir, progress=progress)
            controlnet = weights.resolve(wiring["controlnet"], weights_dir=opts.weights_dir, progress=progress)
            tokenizer = weights.tokenizer_dir(weights_dir=opts.weights_dir, progress=progress)
            description = full_size_description(version, sd_checkpoint=sd, controlnet_checkpoint=controlnet, tokenizer=tokenizer)

    if opts.cleaner:
        cleaner_source = _cleaner_file(opts.cleaner, opts.weights_dir, progress)
    face_files = _face_files(opts, version, description, progress) if faces else None
    caption_source = None
    if caption_choice is not None:
        caption_source = locate_captioner(caption_choice, weights_dir=opts.weights_dir, progress=progress)

    # 2. Stage 1
    cleaner = load_cleaner(cleaner_source, device=device, dtype=dtype, name=_cleaner_name(cleaner_source))
    stage1_pipeline = plan.pipeline if not opts.cleaner else plan_for_cleaner(cleaner).pipeline

    face_parts = _load_face_parts(face_files, cleaner, opts, device, dtype) if faces else {}

    # 3. Stage 2
    defaults = default_settings(version, opts.task)
    if stage1_only:
        return Components(cleaner, stage1_pipeline, None, device, defaults, **face_parts)
    from ..models.stage2 import load_stage2

    stage2 = load_stage2(description, device=device, dtype=dtype)
    # 4. The captioner (in host memory; on the device only while it captions)
    captioner = None
    if caption_source is not None:
        from ..captions.loading import load_from_folder

        captioner = load_from_folder(caption_source.folder, name=caption_source.name, revision=caption_source.revision,
                                     device=device, llava_bit=opts.llava_bit)
    return Components(cleaner, stage1_pipeline, stage2, device, defaults, captioner, **face_parts)


def _check_facexlib() -> None:
    """unaligned_face builds facexlib's networks: say how to get it before anything is downloaded."""
    import importlib.util

    if importlib.util.find_spec("facexlib") is None or importlib.util.find_spec("cv2") is None:
        raise SetupError("`task` unaligned_face needs facexlib and OpenCV: pip install 'restorecli[faces]'")


def _face_files(opts: LoadSettings, version: str, description, progress) -> dict:
    """Resolve (find, verify, download) the face cleaner, detector and parser files before loading.
    Pinned versions: the `face_cleaner` of weights.toml; a model description: its own cleaner."""
    from .. import weights

    files = {"face_cleaner": description.cleaner if version == "custom" else
             weights.resolve(weights.wiring(version, opts.task)["face_cleaner"], weights_dir=opts.weights_dir,
                             progress=progress)}
    files["face_detector"] = weights.resolve(opts.face_detector, weights_dir=opts.weights_dir, progress=progress)
    files["face_parser"] = (None if opts.face_parser == "none" else
                            weights.resolve(opts.face_parser, weights_dir=opts.weights_dir, progress=progress))
    return files


def _load_face_parts(files: dict, background_cleaner, opts: LoadSettings, device, dtype) -> dict:
    from ..faces.detection import load_detector
    from ..faces.parsing import load_parser, no_parser
    from ..stage1.cleaners import load_cleaner

    source = files["face_cleaner"]
    # a model description has one cleaner: the faces use the loaded one (unless `cleaner` replaced it;
    # a description without a cleaner restores the faces with the `cleaner` given)
    same = source is None or (opts.version == "custom" and not opts.cleaner)
    face_cleaner = background_cleaner if same else load_cleaner(source, device=device, dtype=dtype,
                                                                name=_cleaner_name(source))
    detector = load_detector(files["face_detector"], opts.face_detector, device=device)
    parser = no_parser() if files["face_parser"] is None else load_parser(files["face_parser"], opts.face_parser, device)
    log.info("faces: detector %s, parser %s", opts.face_detector, opts.face_parser)
    return {"face_cleaner": face_cleaner, "face_detector": detector, "face_parser": parser}


def prepare_for_speed(pipe, device: torch.device, *, compile: bool = False) -> None:
    """PyTorch SDPA attention everywhere (diffusers' default, checked), channels-last UNet and ControlNet
    on CUDA, a channels-last bf16 VAE on the CPU, and with `compile` torch.compile of the UNet and
    ControlNet.

    * SDPA (``AttnProcessor2_0``) runs flash / memory-efficient kernels: attention memory linear in the
      number of tokens, which `restorecli.pipeline.planning` relies on. A plain ``AttnProcessor`` (an older
      diffusers default) is replaced; other custom processors are left alone.
    * channels-last (NHWC) is the layout tensor-core convolutions use natively on CUDA (diffusers'
      "Speed up inference" guide recommends it for the UNet). Not on the CPU: oneDNN picks other kernels
      there, which changes float rounding (and the official parity) for no measured gain
      (benchmarks/run.py, speed table).
    * the VAE in bf16 on the CPU is channels-last: oneDNN's bf16 convolutions at the VAE's large
      feature maps run about twice as fast in NHWC (benchmarks/cpu.py, full-size v2.1 at 512x512:
      decode 6.1 -> 3.2 s, encode 2.9 -> 1.4 s; the UNet and ControlNet, at 1/8 of the resolution, gain
      nothing). fp32 keeps NCHW: no gain there, and NCHW is what reproduces the official output.
    * torch.compile: the first image of each new size compiles the two networks (about a minute on a
      GPU, several on a CPU; tiled sampling keeps one tile shape); later steps and images run faster.
    """
    for name in ("unet", "controlnet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            kinds = use_sdpa(module)
            log.debug("%s attention: %s", name, ", ".join(sorted(kinds)) or "none")
    if device.type == "cuda":
        for module in (pipe.unet, pipe.controlnet):
            module.to(memory_format=torch.channels_last)
    vae = getattr(pipe, "vae", None)
    if device.type == "cpu" and vae is not None and vae.dtype == torch.bfloat16:
        vae.to(memory_format=torch.channels_last)
    if compile:
        log.info("compiling the UNet and ControlNet (torch.compile): the first image takes longer")
        pipe.unet.compile()
        pipe.controlnet.compile()


def use_sdpa(module: torch.nn.Module) -> set[str]:
    """Give every diffusers attention layer of `module` that uses the plain `AttnProcessor` the SDPA one;
    returns the processor class names in use afterwards."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    kinds = set()
    for m in module.modules():
        processor = getattr(m, "processor", None)
        if processor is None or not hasattr(m, "set_processor"):
            continue
        if type(processor) is AttnProcessor:
            m.set_processor(AttnProcessor2_0())
        kinds.add(type(m.processor).__name__)
    return kinds


def _require_files(description, opts: LoadSettings, stage1_only: bool) -> None:
    paths = []
    if description.cleaner is not None and opts.cleaner is None:
        paths.append(description.cleaner.checkpoint)
    if description.cldm is not None and not stage1_only:
        paths += [description.cldm.sd_checkpoint, description.cldm.controlnet_checkpoint]
        if description.tokenizer is not None:
            paths.append(description.tokenizer)
    for path in paths:
        if not Path(path).exists():
            raise SetupError(f"{description.path}: {path} does not exist")


def _cleaner_file(choice: str, weights_dir, progress) -> Path:
    """--cleaner: a pinned cleaner name (weights.toml) or a model file spandrel can load."""
    from .. import weights

    path = Path(choice).expanduser()
    if path.exists():
        return path
    try:
        weights.get_entry(choice)
    except UsageError:
        raise UsageError(f"`cleaner` {choice!r}: no such file, and not a pinned cleaner name (see `restore weights list`)") from None
    return weights.resolve(choice, weights_dir=weights_dir, progress=progress)


def _cleaner_name(source) -> str | None:
    checkpoint = getattr(source, "checkpoint", source)
    return Path(checkpoint).name if checkpoint is not None else None
