"""Loading DiffBIR's stage 2 (SD 2.1 UNet, VAE, OpenCLIP text tower, IRControlNet) as diffusers models.

``load_stage2(description)`` builds the four models from the description's configs (DiffBIR's own
vocabulary, see :mod:`.configs`) on the meta device, converts the official checkpoints (:mod:`.convert`)
and assigns the weights; nothing is randomly initialised first. With a cache folder, the converted
weights are stored once per source file (keyed by its sha256) and later starts read them directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SetupError, WeightsError
from . import convert as cv
from .configs import Stage2Configs, stage2_configs
from .controlnet import IRControlNetModel
from .description import CLDMSpec, DiffusionSpec, ModelDescription

log = logging.getLogger("restorecli.models")

SD_PARTS = ("unet", "vae", "text_encoder")


@dataclass
class Stage2Models:
    """The stage-2 networks of one model description, in eval mode, gradients off."""

    unet: Any  # diffusers.UNet2DConditionModel
    controlnet: IRControlNetModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel (penultimate layer + final layer norm)
    tokenizer: Any  # transformers.CLIPTokenizer (pad id 0, 77 tokens)
    latent_scale_factor: float
    parameterization: str  # "eps" | "v"
    zero_snr: bool
    diffusion: DiffusionSpec = field(default_factory=DiffusionSpec)
    load_report: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    def controlled_unet(self):
        """A :class:`restorecli.models.cldm.ControlledUNet` over this UNet and ControlNet."""
        from .cldm import ControlledUNet

        return ControlledUNet(self.unet, self.controlnet)


# --------------------------------------------------------------------------------------------------
# building models without allocating random weights


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while keeping buffers real.

    Buffers (e.g. CLIP's non-persistent ``position_ids``) are not in checkpoints, so they must be built
    normally; parameters are replaced by the checkpoint's tensors (``load_state_dict(assign=True)``).
    The same idea as accelerate's ``init_empty_weights(include_buffers=False)``, without the dependency.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    with parameters_on_meta():
        return factory()


def new_unet(config: Mapping[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def new_vae(config: Mapping[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


def new_text_encoder(config: Any) -> nn.Module:
    from transformers import CLIPTextModel

    return CLIPTextModel(config)


def new_controlnet(config: Mapping[str, Any]) -> nn.Module:
    return IRControlNetModel(**config)


def empty_models(configs: Stage2Configs) -> dict[str, nn.Module]:
    """All four models on the meta device (parameters only; for key/shape tables and loading)."""
    return {
        "unet": build_empty(lambda: new_unet(configs.unet)),
        "vae": build_empty(lambda: new_vae(configs.vae)),
        "text_encoder": build_empty(lambda: new_text_encoder(configs.text)),
        "controlnet": build_empty(lambda: new_controlnet(configs.controlnet)),
    }


def _placed(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` in ``dtype`` on ``device``, in its own 64-byte aligned CPU allocation.

    Tensors memory-mapped from a safetensors file sit at arbitrary offsets; oneDNN/MKL pick other
    kernels for unaligned weights and the results differ in the last bits. Copying them makes the
    output independent of where the weights came from (converted now, cache, .ckpt or .safetensors).
    """
    if t.dtype != dtype or t.device != device or t.data_ptr() % 64 or not t.is_contiguous():
        return t.to(device=device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
    return t


def assign_weights(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    what: str,
    source: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | str,
) -> nn.Module:
    """Check keys/shapes, cast floating tensors to ``dtype``, assign, move, eval, no grad."""
    cv.check_state_dict(sd, cv.shapes_of(model), what=what, source=source)
    target = torch.device(device)
    cast = {k: _placed(v, dtype if v.is_floating_point() else v.dtype, target) for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:  # cannot happen after a strict load; guards against a model with unusual parameters
        raise WeightsError(f"{source}: {what} weights lack {', '.join(left[:3])}")
    model.to(device=device)
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# the loader


def _default_cache_dir() -> Path | None:
    """``<weights home>/cache/converted`` (restorecli.weights.cache_dir), or None without that module."""
    try:
        from ..weights import cache_dir
    except ImportError:
        return None
    try:
        return cache_dir("converted")
    except OSError as exc:  # an unwritable home: run without the cache
        log.warning("no conversion cache (%s)", exc)
        return None


def _load_tokenizer(folder: Path | None, max_length: int):
    from transformers import CLIPTokenizer

    if folder is None:
        raise SetupError("the model description names no tokenizer folder")
    if not (folder / "vocab.json").is_file():
        raise SetupError(f"{folder}: not a CLIP tokenizer folder (no vocab.json)")
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise SetupError(f"{folder}: cannot load the CLIP tokenizer ({exc})") from None
    # OpenCLIP (and so DiffBIR) pads with id 0 ("!"); the SD 2 tokenizer_config.json may say otherwise
    if tok.pad_token_id != 0:
        tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.model_max_length = max_length
    return tok


def _read_official(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path}: {what} checkpoint not found")
    try:
        return cv.read_checkpoint(path)
    except WeightsError:
        raise
    except Exception as exc:  # a corrupt or foreign file: one line naming it
        raise WeightsError(f"{path}: cannot load {what} checkpoint ({type(exc).__name__}: {exc})") from None


def _convert_sd(path: Path, configs: Stage2Configs, targets: Mapping[str, nn.Module]) -> dict[str, cv.StateDict]:
    sd = _read_official(path, "Stable Diffusion")
    if not any(k.startswith(cv.UNET_PREFIX) for k in sd):
        raise WeightsError(f"{path}: not an SD ldm checkpoint (no {cv.UNET_PREFIX}* keys)")
    text_keys = cv.shapes_of(targets["text_encoder"])
    try:
        return {
            "unet": cv.convert_unet(sd, configs.unet),
            "vae": cv.convert_vae(sd, configs.vae),
            "text_encoder": cv.convert_text_encoder(sd, configs.text, target_keys=text_keys),
        }
    except (KeyError, ValueError, IndexError) as exc:
        raise WeightsError(f"{path}: cannot convert the SD checkpoint ({type(exc).__name__}: {exc})") from None


def _convert_controlnet(path: Path, configs: Stage2Configs) -> dict[str, cv.StateDict]:
    sd = _read_official(path, "IRControlNet")
    try:
        return {"controlnet": cv.convert_controlnet(sd, configs.controlnet)}
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    except (KeyError, IndexError) as exc:
        raise WeightsError(f"{path}: cannot convert the IRControlNet ({type(exc).__name__}: {exc})") from None


def _load_parts(
    kind: str,
    source: Path,
    parts: tuple[str, ...],
    fingerprint: str,
    convert_fn: Callable[[], dict[str, cv.StateDict]],
    targets: Mapping[str, nn.Module],
    cache: cv.ConversionCache | None,
    report: dict[str, Any],
) -> dict[str, cv.StateDict]:
    """Converted state dicts of one source file, from the cache or converted (and cached) now."""
    t0 = time.perf_counter()
    entry = cache.entry(kind, source, fingerprint) if cache is not None else None
    if entry is not None and cache.complete(entry, parts):
        try:
            out = {p: cache.load(entry, p) for p in parts}
            for p in parts:
                cv.check_state_dict(out[p], cv.shapes_of(targets[p]), what=p, source=entry / f"{p}.safetensors")
            report[kind] = {"from": "cache", "entry": str(entry), "seconds": time.perf_counter() - t0}
            log.debug("%s: converted weights from %s", source, entry)
            return out
        except Exception as exc:  # a damaged entry is rebuilt, not fatal
            log.warning("conversion cache entry %s is unusable (%s); converting %s again", entry, exc, source)
            cache.discard(entry)
    out = convert_fn()
    for p in parts:
        cv.check_state_dict(out[p], cv.shapes_of(targets[p]), what=p, source=source)
    stored = False
    if entry is not None:
        meta = {
            "source": str(source.resolve()),
            "kind": kind,
            "converter_version": cv.CONVERTER_VERSION,
            "fingerprint": fingerprint,
        }
        stored = cache.store(entry, out, meta)
    report[kind] = {"from": "converted", "cached": stored, "seconds": time.perf_counter() - t0}
    return out


def load_stage2(
    description_or_spec: ModelDescription | CLDMSpec,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    diffusion: DiffusionSpec | None = None,
    use_cache: bool = True,
) -> Stage2Models:
    """Build and load DiffBIR's stage-2 models.

    ``description_or_spec``: a :class:`ModelDescription` (its ``cldm``, ``diffusion`` and ``tokenizer``)
    or a bare :class:`CLDMSpec` plus ``tokenizer`` (folder) and optionally ``diffusion`` (default eps).
    ``cache_dir``: where converted weights are kept (default: ``restorecli.weights.cache_dir("converted")``,
    i.e. ``<weights home>/cache/converted``); ``use_cache=False`` converts in memory only.
    Weights load in ``dtype`` (all four models; cast a part afterwards, e.g. ``models.vae.to(torch.float32)``,
    to run it in another precision) on ``device``.
    """
    if isinstance(description_or_spec, ModelDescription):
        desc = description_or_spec
        if desc.cldm is None:
            raise SetupError(f"{desc.path or 'model description'}: has no stage-2 (cldm) section")
        spec = desc.cldm
        tok_dir = Path(tokenizer) if tokenizer is not None else desc.tokenizer
        diff = diffusion or desc.diffusion
        where = str(desc.path) if desc.path else "model description"
    elif isinstance(description_or_spec, CLDMSpec):
        spec = description_or_spec
        tok_dir = Path(tokenizer) if tokenizer is not None else None
        diff = diffusion or DiffusionSpec()
        where = "model description"
    else:
        raise TypeError(f"load_stage2 takes a ModelDescription or CLDMSpec, got {type(description_or_spec).__name__}")

    try:
        configs = stage2_configs(spec)
    except SetupError as exc:
        raise SetupError(f"{where}: {exc}") from None
    tok = _load_tokenizer(tok_dir, configs.text.max_position_embeddings)

    root = Path(cache_dir) if cache_dir is not None else (_default_cache_dir() if use_cache else None)
    cache = cv.ConversionCache(root) if (use_cache and root is not None) else None
    report: dict[str, Any] = {"cache_dir": str(root) if cache else None}

    t0 = time.perf_counter()
    models = empty_models(configs)
    report["build_seconds"] = time.perf_counter() - t0

    sd_path, cn_path = Path(spec.sd_checkpoint), Path(spec.controlnet_checkpoint)
    sd_fp = cv.config_fingerprint(configs.unet, configs.vae, cv.text_config_fingerprint_fields(configs.text))
    cn_fp = cv.config_fingerprint(configs.controlnet)

    sd_parts = _load_parts(
        "sd", sd_path, SD_PARTS, sd_fp, lambda: _convert_sd(sd_path, configs, models), models, cache, report
    )
    for name in SD_PARTS:
        assign_weights(models[name], sd_parts.pop(name), what=name, source=sd_path, dtype=dtype, device=device)
    del sd_parts
    cn_parts = _load_parts(
        "controlnet", cn_path, ("controlnet",), cn_fp, lambda: _convert_controlnet(cn_path, configs), models, cache, report
    )
    assign_weights(
        models["controlnet"], cn_parts.pop("controlnet"), what="controlnet", source=cn_path, dtype=dtype, device=device
    )
    report["total_seconds"] = time.perf_counter() - t0
    log.debug("stage 2 loaded: %s", report)

    return Stage2Models(
        unet=models["unet"],
        controlnet=models["controlnet"],
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tok,
        latent_scale_factor=float(spec.latent_scale_factor),
        parameterization=diff.parameterization,
        zero_snr=bool(diff.zero_snr),
        diffusion=diff,
        load_report=report,
    )
