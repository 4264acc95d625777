"""Stage-1 cleaners (degradation removal) loaded through spandrel.

Every official DiffBIR cleaner is an architecture spandrel already detects from its state dict
(the tests load each official layout through spandrel):

* DiffBIR's SwinIR (general_swinir_v1.ckpt, realesrgan_s4_swinir_100k.pth, face_swinir_v1.ckpt): spandrel
  "SwinIR" with a pixel-unshuffle input (``conv_first.1``) and the "nearest+conv" upsampler; 1x overall.
* BSRNet.pth (KAIR RRDBNet, x4): spandrel "ESRGAN" (old-arch keys are converted by spandrel).
* scunet_color_real_psnr.pth: spandrel "SCUNet".

So there is no architecture code here, only a small descriptor of ours (`Cleaner`) that says which
official pipeline a model implies and which precision it runs in, plus the cross-check of a model
description's official SwinIR kwargs against what spandrel read off the weights.

Two spandrel behaviours the official pipelines do not share are handled by `restorecli.stage1.run`, not here:
spandrel's descriptor ``__call__`` pads with reflect/replicate and clamps to [0, 1] (the official
pipelines zero-pad SwinIR, replicate-pad SCUNet and never clamp), so stage 1 calls ``Cleaner.model``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import SetupError
from ..models.description import CleanerSpec

log = logging.getLogger("restorecli.stage1.run")

CleanerKind = Literal["swinir", "bsrnet", "scunet", "generic"]
CLEANER_KINDS: tuple[str, ...] = ("swinir", "bsrnet", "scunet", "generic")

#: The official SwinIR(...) signature (diffbir/model/swinir.py, SwinIR.__init__) with its defaults.
#: A model description's ``cleaner.params`` are these kwargs; missing ones take these values.
OFFICIAL_SWINIR_DEFAULTS: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 1,
    "in_chans": 3,
    "embed_dim": 96,
    "depths": [6, 6, 6, 6],
    "num_heads": [6, 6, 6, 6],
    "window_size": 7,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "qk_scale": None,
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "drop_path_rate": 0.1,
    "ape": False,
    "patch_norm": True,
    "use_checkpoint": False,
    "sf": 4,
    "img_range": 1.0,
    "upsampler": "",
    "resi_connection": "1conv",
    "unshuffle": False,
    "unshuffle_scale": None,
    # training-only kwargs of the official class; no effect at inference
    "hq_key": "jpg",
    "lq_key": "hint",
    "learning_rate": None,
    "weight_decay": None,
}
#: Kwargs that only matter for training (dropout is off in eval mode, checkpointing saves memory only).
_TRAINING_ONLY = {"drop_rate", "attn_drop_rate", "drop_path_rate", "use_checkpoint", "hq_key", "lq_key",
                  "learning_rate", "weight_decay"}


@dataclass
class Cleaner:
    """A loaded stage-1 model: spandrel's descriptor plus what restorecli needs to run it officially.

    `kind` names the official pipeline the model implies : ``swinir`` (DiffBIR's
    unshuffle SwinIR: PIL pre-upscale, short side -> 512, zero-pad 64), ``bsrnet`` (an x4 RRDB: no
    pre-upscale, x4, then resize), ``scunet`` (replicate-pad 64, 512 rule after) or ``generic`` (any
    other spandrel model; see `restorecli.stage1.run`). `dtype` is the compute dtype actually used: the
    requested one where spandrel says the architecture supports it, else float32.
    """

    descriptor: Any  # spandrel.ImageModelDescriptor
    kind: str
    dtype: torch.dtype
    name: str = "cleaner"
    #: the checkpoint file it was loaded from (save_pretrained copies its official keys: spandrel renames
    #: some keys when it builds a model, so the built model's own state dict may not be detectable again)
    source: Path | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.descriptor.model

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.id

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def size_requirements(self):
        return self.descriptor.size_requirements

    @property
    def supports_half(self) -> bool:
        return bool(self.descriptor.supports_half)

    @property
    def supports_bfloat16(self) -> bool:
        return bool(self.descriptor.supports_bfloat16)

    @property
    def pipeline(self) -> str:
        """The official stage-1 pipeline this model implies (same names as `kind`)."""
        return self.kind

    @property
    def device(self) -> torch.device:
        return self.descriptor.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Cleaner":
        """Move the network (weights stay float32); `dtype` changes the compute dtype where supported."""
        if device is not None:
            self.descriptor.to(torch.device(device))
        if dtype is not None:
            self.dtype = resolve_dtype(self.descriptor, dtype, self.name)
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast in `dtype` (as the official Pipeline.run, loop.py), or nothing for float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The raw model on `x` (already padded as the pipeline requires), as float32, unclamped."""
        x = x.to(self.device, torch.float32)
        with self.autocast():
            y = self.model(x)
        return y.float()


def load_cleaner(
    source: CleanerSpec | str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
) -> Cleaner:
    """Load a stage-1 model with spandrel.

    `source`: a `CleanerSpec` from a model description (arch ``swinir``: official SwinIR kwargs, checked
    against the weights; arch ``spandrel``: any file spandrel detects), a path to a model file, or a
    state dict. DiffBIR's wrappers (``state_dict``, ``module.``) are removed by
    `restorecli.models.safe_load.load_state_dict`. Raises SetupError for anything that is not a usable
    RGB image-to-image model.
    """
    spec = source if isinstance(source, CleanerSpec) else None
    if spec is not None:
        where = str(spec.checkpoint)
        if spec.arch not in ("swinir", "spandrel"):
            raise SetupError(f'{where}: cleaner "arch" must be "swinir" or "spandrel", got {spec.arch!r}')
        state_dict = _read_state_dict(spec.checkpoint)
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        state_dict = _read_state_dict(Path(source))
    elif isinstance(source, Mapping):
        where = name or "<state dict>"
        state_dict = dict(source)
    else:
        raise TypeError(f"load_cleaner: expected a CleanerSpec, a path or a state dict, got {type(source).__name__}")

    descriptor = descriptor_from_state_dict(state_dict, where)
    if spec is not None and spec.arch == "swinir":
        check_swinir_params(descriptor, spec.params, where)
    kind = cleaner_kind(descriptor)
    compute_dtype = resolve_dtype(descriptor, dtype, where)
    descriptor.to(torch.device(device))
    descriptor.eval()
    descriptor.model.requires_grad_(False)
    log.info("cleaner %s: spandrel %s, x%d, kind %s, %s", where, descriptor.architecture.id,
             descriptor.scale, kind, str(compute_dtype).removeprefix("torch."))
    path = Path(spec.checkpoint) if spec is not None else (Path(source) if isinstance(source, (str, os.PathLike)) else None)
    return Cleaner(descriptor=descriptor, kind=kind, dtype=compute_dtype, name=name or Path(where).name, source=path)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # Imported here: checkpoints.py owns safe loading and the DiffBIR unwrapping (state_dict / module.).
    from ..models.safe_load import load_state_dict

    return dict(load_state_dict(path))


def descriptor_from_state_dict(state_dict: Mapping[str, torch.Tensor], where: str = "<state dict>"):
    """spandrel's ImageModelDescriptor for a state dict (detect, build, strict load), or SetupError."""
    import spandrel

    try:
        # spandrel's loaders rename keys in the dict they get (SwinIR conv_first.1 -> conv_first): pass a copy.
        descriptor = spandrel.ModelLoader().load_from_state_dict(dict(state_dict))
    except spandrel.UnsupportedModelError:
        raise SetupError(
            f"{where}: not a model architecture spandrel {spandrel.__version__} can detect",
            hint="`cleaner` takes a pinned cleaner name or an image-to-image model file spandrel supports",
        ) from None
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SetupError(f"{where}: spandrel detected a model but could not load its weights ({first})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise SetupError(f"{where}: {descriptor.architecture.id} is not an image-to-image model (it needs a mask)")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise SetupError(
            f"{where}: {descriptor.architecture.id} maps {descriptor.input_channels} to "
            f"{descriptor.output_channels} channels; stage 1 needs an RGB (3 to 3 channel) model"
        )
    return descriptor


def cleaner_kind(descriptor) -> str:
    """Which official pipeline a spandrel model implies."""
    arch = descriptor.architecture.id
    model = descriptor.model
    if (
        arch == "SwinIR"
        and getattr(model, "start_unshuffle", 1) > 1
        and getattr(model, "upsampler", "") == "nearest+conv"
        and descriptor.scale == 1
    ):
        return "swinir"  # DiffBIR's SwinIR: 8x unshuffle in, 3x nearest x2 out (configs/inference/swinir.yaml)
    if arch == "ESRGAN" and descriptor.scale == 4 and not getattr(model, "shuffle_factor", None):
        return "bsrnet"  # KAIR RRDBNet x4 (BSRNet); Real-ESRGAN x4plus has the same architecture
    if arch == "SCUNet":
        return "scunet"
    return "generic"


def resolve_dtype(descriptor, requested: torch.dtype, where: str = "cleaner") -> torch.dtype:
    """`requested` where spandrel says the architecture supports it, otherwise float32 (logged)."""
    if requested == torch.float32:
        return torch.float32
    supported = {torch.float16: descriptor.supports_half, torch.bfloat16: descriptor.supports_bfloat16}
    if requested not in supported:
        raise ValueError(f"unsupported stage-1 dtype {requested}")
    if supported[requested]:
        return requested
    log.info("%s: %s does not support %s; stage 1 runs in float32", where, descriptor.architecture.id,
             str(requested).removeprefix("torch."))
    return torch.float32


def detected_swinir_params(descriptor) -> dict[str, Any]:
    """The official SwinIR kwargs that the spandrel-built model embodies (read off the built module)."""
    m = descriptor.model
    blocks0 = [layer.residual_group.blocks for layer in m.layers]
    unshuffle = int(getattr(m, "start_unshuffle", 1))
    first_block = blocks0[0][0]
    state = m.state_dict()
    return {
        "img_size": int(m.patch_embed.img_size[0]),
        "patch_size": int(m.patch_embed.patch_size[0]),
        "in_chans": int(descriptor.input_channels),
        "embed_dim": int(m.embed_dim),
        "depths": [len(b) for b in blocks0],
        "num_heads": [int(b[0].attn.num_heads) for b in blocks0],
        # a block shrinks its window to the feature size when the image is smaller (official and spandrel alike)
        "window_size": int(m.window_size),
        "mlp_ratio": float(m.mlp_ratio),
        "qkv_bias": "layers.0.residual_group.blocks.0.attn.qkv.bias" in state,
        "qk_scale": None if abs(first_block.attn.scale - (m.embed_dim // first_block.attn.num_heads) ** -0.5) < 1e-12
        else float(first_block.attn.scale),
        "ape": bool(m.ape),
        "patch_norm": bool(m.patch_norm),
        "sf": int(m.upscale),
        "upsampler": str(m.upsampler),
        "resi_connection": "1conv" if isinstance(m.conv_after_body, torch.nn.Conv2d) else "3conv",
        "unshuffle": unshuffle > 1,
        "unshuffle_scale": unshuffle if unshuffle > 1 else None,
    }


def check_swinir_params(descriptor, params: Mapping[str, Any], where: str = "cleaner") -> None:
    """SetupError unless the description's official SwinIR kwargs match the model spandrel built.

    Missing kwargs take the official defaults (OFFICIAL_SWINIR_DEFAULTS). ``img_range`` is not stored in
    the weights (spandrel guesses it from the window size), so the description's value is applied to
    the model instead of compared.
    """
    if descriptor.architecture.id != "SwinIR":
        raise SetupError(f'{where}: the description says "swinir" but spandrel detected {descriptor.architecture.id}')
    unknown = sorted(set(params) - set(OFFICIAL_SWINIR_DEFAULTS))
    if unknown:
        raise SetupError(f"{where}: unknown SwinIR parameter(s) {', '.join(unknown)} in the model description")
    wanted = {**OFFICIAL_SWINIR_DEFAULTS, **params}
    if wanted["unshuffle"]:
        if wanted["unshuffle_scale"] is None:
            raise SetupError(f'{where}: "unshuffle": true needs "unshuffle_scale"')
        if wanted["unshuffle_scale"] != wanted["sf"]:
            # diffbir/model/swinir.py builds PixelUnshuffle(sf) but sizes conv_first by unshuffle_scale**2,
            # so the official model only runs when the two are equal.
            raise SetupError(
                f'{where}: "unshuffle_scale" ({wanted["unshuffle_scale"]}) must equal "sf" ({wanted["sf"]}); '
                "the official SwinIR unshuffles by sf"
            )
    else:
        wanted["unshuffle_scale"] = None
    detected = detected_swinir_params(descriptor)
    if detected["upsampler"] == "":
        del detected["sf"]  # denoising/JPEG SwinIR: sf only sets a no-op crop in the official forward
    mismatches = []
    for key, got in detected.items():
        want = wanted[key]
        if isinstance(got, list):
            want = list(want)
        elif isinstance(got, float) and want is not None:
            want = float(want)
        if want != got:
            mismatches.append(f"{key}: description {want!r}, weights {got!r}")
    if mismatches:
        raise SetupError(f"{where}: SwinIR weights do not match the model description ({'; '.join(mismatches)})")
    descriptor.model.img_range = float(wanted["img_range"])
