"""Model description files (`--model PATH.json`, schema ``restorecli-model/1``).

A description names a whole DiffBIR model in DiffBIR's own parameter vocabulary (the kwargs of the
official ``SwinIR(...)``, ``ControlLDM(...)`` and ``Diffusion(...)``) plus the checkpoint files in the
official layouts. Paths inside are relative to the JSON file. The tests' tiny reference models are examples.

This module only parses and validates; building models from it is `models.stage1` / `models.stage2`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SetupError

SCHEMA = "restorecli-model/1"


@dataclass(frozen=True)
class CleanerSpec:
    arch: str  # "swinir" (official SwinIR kwargs), or "spandrel" (any file spandrel detects)
    params: dict[str, Any]
    checkpoint: Path


@dataclass(frozen=True)
class CLDMSpec:
    latent_scale_factor: float
    unet_cfg: dict[str, Any]
    vae_cfg: dict[str, Any]
    clip_cfg: dict[str, Any]
    controlnet_cfg: dict[str, Any]
    sd_checkpoint: Path
    controlnet_checkpoint: Path


@dataclass(frozen=True)
class DiffusionSpec:
    timesteps: int = 1000
    beta_schedule: str = "linear"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    parameterization: str = "eps"  # "eps" | "v"
    zero_snr: bool = False


@dataclass(frozen=True)
class ModelDescription:
    path: Path | None
    cleaner: CleanerSpec | None
    cldm: CLDMSpec | None
    diffusion: DiffusionSpec
    tokenizer: Path | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def _fail(path: Path, reason: str) -> SetupError:
    return SetupError(f"{path}: bad model description: {reason}")


def load_model_description(path: str | Path) -> ModelDescription:
    """Parse and validate a ``restorecli-model/1`` JSON file; paths are resolved against its folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"{path}: model description not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SetupError(f"{path}: cannot read model description ({exc})") from None
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    return parse_model_description(raw, base=path.parent, path=path)


def parse_model_description(raw: dict[str, Any], *, base: Path, path: Path | None = None) -> ModelDescription:
    where = path or Path("<model description>")
    if not isinstance(raw, dict) or raw.get("format") != SCHEMA:
        raise _fail(where, f'"format" must be "{SCHEMA}"')

    def rel(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise _fail(where, f'"{key}" must be a path string')
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)

    cleaner = None
    if raw.get("cleaner") is not None:
        c = raw["cleaner"]
        if not isinstance(c, dict) or "checkpoint" not in c:
            raise _fail(where, '"cleaner" needs "arch", "params" and "checkpoint"')
        cleaner = CleanerSpec(
            arch=str(c.get("arch", "swinir")).lower(),
            params=dict(c.get("params") or {}),
            checkpoint=rel(c["checkpoint"], "cleaner.checkpoint"),
        )

    cldm = None
    if raw.get("cldm") is not None:
        c = raw["cldm"]
        params = c.get("params") or {}
        missing = [k for k in ("unet_cfg", "vae_cfg", "clip_cfg", "controlnet_cfg") if k not in params]
        if missing:
            raise _fail(where, f'"cldm.params" lacks {", ".join(missing)}')
        for key in ("sd_checkpoint", "controlnet_checkpoint"):
            if key not in c:
                raise _fail(where, f'"cldm.{key}" is missing')
        cldm = CLDMSpec(
            latent_scale_factor=float(params.get("latent_scale_factor", 0.18215)),
            unet_cfg=dict(params["unet_cfg"]),
            vae_cfg=dict(params["vae_cfg"]),
            clip_cfg=dict(params["clip_cfg"]),
            controlnet_cfg=dict(params["controlnet_cfg"]),
            sd_checkpoint=rel(c["sd_checkpoint"], "cldm.sd_checkpoint"),
            controlnet_checkpoint=rel(c["controlnet_checkpoint"], "cldm.controlnet_checkpoint"),
        )

    d = (raw.get("diffusion") or {}).get("params") or {}
    try:
        diffusion = DiffusionSpec(
            timesteps=int(d.get("timesteps", 1000)),
            beta_schedule=str(d.get("beta_schedule", "linear")),
            linear_start=float(d.get("linear_start", 0.00085)),
            linear_end=float(d.get("linear_end", 0.012)),
            parameterization=str(d.get("parameterization", "eps")),
            zero_snr=bool(d.get("zero_snr", False)),
        )
    except (TypeError, ValueError) as exc:
        raise _fail(where, f'"diffusion.params": {exc}') from None
    if diffusion.parameterization not in ("eps", "v"):
        raise _fail(where, f'"diffusion.params.parameterization" must be "eps" or "v", got {diffusion.parameterization!r}')

    tokenizer = rel(raw["tokenizer"], "tokenizer") if raw.get("tokenizer") else None
    if cldm is not None and tokenizer is None:
        raise _fail(where, '"tokenizer" (a CLIPTokenizer folder) is required with "cldm"')
    return ModelDescription(path=path, cleaner=cleaner, cldm=cldm, diffusion=diffusion, tokenizer=tokenizer, raw=raw)
