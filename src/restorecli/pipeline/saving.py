"""`save_pretrained` / `from_pretrained` for the whole DiffBIR pipeline, so a saved folder restores the
same bytes as the pipeline that wrote it.

Layout of a saved folder::

    restorecli.json      format, stage-1 pipeline, diffusion spec (eps/v, zero-SNR, betas), latent scale,
                         default settings (flat names), what it was loaded from
    cleaner/model.safetensors    the stage-1 network's state dict (spandrel detects it again on load)
    unet/ controlnet/ vae/ text_encoder/ tokenizer/   each component's own save_pretrained
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..errors import SetupError, UsageError
from ..models.description import DiffusionSpec

log = logging.getLogger("restorecli.pipeline.saving")

FORMAT = "restorecli-pipeline/1"
INDEX = "restorecli.json"
COMPONENTS = ("unet", "controlnet", "vae", "text_encoder", "tokenizer")


def save_pipeline(pipe, directory) -> None:
    from safetensors.torch import save_file

    from ..settings import flat_settings

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if pipe.cleaner is None:
        raise UsageError("this pipeline has no stage-1 cleaner to save")
    (root / "cleaner").mkdir(exist_ok=True)
    if pipe.cleaner.source is not None:  # the official keys, which spandrel detects again
        from ..models.safe_load import load_state_dict

        state = load_state_dict(pipe.cleaner.source)
    else:
        state = pipe.cleaner.model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(root / "cleaner" / "model.safetensors"))
    saved = []
    for name in COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            component.save_pretrained(str(root / name))
            saved.append(name)
    index = {
        "format": FORMAT,
        "components": saved,
        "cleaner": {"name": pipe.cleaner.name, "stage1_pipeline": pipe.stage1_pipeline},
        "diffusion": dataclasses.asdict(pipe.diffusion),
        "latent_scale_factor": pipe.latent_scale_factor,
        "default_settings": flat_settings(pipe.default_settings),
    }
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def load_saved_pipeline(cls, directory, *, device="auto", torch_dtype: torch.dtype | None = None,
                        offload: bool = False, compile: bool = False):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.controlnet import IRControlNetModel
    from ..settings import RestoreSettings
    from ..stage1.cleaners import load_cleaner
    from .loading import prepare_for_speed
    from .precision import resolve_device, resolve_dtype

    root = Path(directory)
    index_path = root / INDEX
    if not index_path.is_file():
        raise SetupError(f"{root}: not a saved restorecli pipeline (no {INDEX}; write one with save_pretrained)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise SetupError(f"{index_path}: unreadable ({exc})") from None
    if index.get("format") != FORMAT:
        raise SetupError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
    dev = resolve_device(str(device))
    dtype = torch_dtype or resolve_dtype(None, dev)
    cleaner = load_cleaner(root / "cleaner" / "model.safetensors", device=dev, dtype=dtype,
                           name=index["cleaner"].get("name"))
    parts = {}
    loaders = {"unet": UNet2DConditionModel, "controlnet": IRControlNetModel, "vae": AutoencoderKL,
               "text_encoder": CLIPTextModel}
    for name in index.get("components", []):
        if name == "tokenizer":
            parts[name] = CLIPTokenizer.from_pretrained(str(root / name))
            continue
        model = loaders[name].from_pretrained(str(root / name), torch_dtype=dtype)
        parts[name] = model.to(dev).eval().requires_grad_(False)
    pipe = cls(
        **parts, cleaner=cleaner, stage1_pipeline=index["cleaner"].get("stage1_pipeline"),
        diffusion=DiffusionSpec(**index["diffusion"]), latent_scale_factor=index["latent_scale_factor"],
        default_settings=RestoreSettings().replace(**index.get("default_settings", {})),
    )
    if pipe.has_stage2:
        prepare_for_speed(pipe, dev, compile=compile)
        if offload:
            pipe.set_offload(True)
    return pipe
