"""Official DiffBIR / Stable Diffusion checkpoint layouts -> diffusers / transformers state dicts.

Sources and what maps where (key names from ``ControlLDM.load_pretrained_sd`` and the official
modules; full-size key/shape manifests in the official checkpoints' key/shape lists):

* SD ldm checkpoint (``{"state_dict": ...}`` ``.ckpt`` or a flat ``.safetensors``):
  ``model.diffusion_model.*`` -> ``UNet2DConditionModel``, ``first_stage_model.*`` -> ``AutoencoderKL``,
  ``cond_stage_model.model.*`` (OpenCLIP text tower) -> ``CLIPTextModel``.
* IRControlNet (bare state dict: ``time_embed.*``, ``input_blocks.*``, ``zero_convs.N.0.*``,
  ``middle_block.*``, ``middle_block_out.0.*``) -> :class:`IRControlNetModel`.

Where diffusers' single-file helpers (``diffusers.loaders.single_file_utils``) do the job they are used;
the tests check every mapping against the golden outputs and the full-size manifests:

* UNet: ``convert_ldm_unet_checkpoint`` as is.
* VAE: ``convert_ldm_vae_checkpoint`` as is (it also turns the mid-block attention's 1x1 conv q/k/v/
  proj_out weights into linear weights).
* IRControlNet: ``convert_controlnet_checkpoint`` as is: our model keeps ``ControlNetModel``'s attribute
  names and the function skips the absent ``input_hint_block`` (the only part DiffBIR lacks).
* Text: ``convert_open_clip_checkpoint`` after two fixes of ours: its list of keys to drop for the
  penultimate layer is hard-coded to SD 2's ``resblocks.23``, so we remove the residual blocks beyond
  the used depth ourselves (any depth); and it emits ``text_model.``-prefixed keys, which
  transformers >= 5 no longer uses in ``CLIPTextModel``, so that prefix is stripped when the model
  has none.

Every result is checked against the target model's key/shape table: a missing, unexpected or
mis-shaped tensor is a :class:`WeightsError` naming the checkpoint file.

The module also holds the conversion cache: converted weights are stored as safetensors under a
folder keyed by the source file's sha256 (from the weights hash cache, so a checkpoint is hashed
once for verification and the cache together), the target configs and :data:`CONVERTER_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import WeightsError
from ..weights.hashing import sha256 as cached_sha256

log = logging.getLogger("restorecli.models")

#: Bump when a converter's output changes; old cache entries are then ignored.
CONVERTER_VERSION = 1

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."

StateDict = dict[str, torch.Tensor]
Shapes = Mapping[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------------------
# reading official files


def read_checkpoint(path: str | os.PathLike) -> StateDict:
    """A checkpoint as a flat state dict (``state_dict`` unwrapped, ``module.`` stripped), loaded safely."""
    from .safe_load import load_state_dict

    return load_state_dict(path)


def with_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The entries whose key starts with ``prefix`` (keys unchanged)."""
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------
# converters (pure functions: official state dict + diffusers config -> diffusers state dict)


def convert_unet(sd: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> StateDict:
    """``model.diffusion_model.*`` -> ``UNet2DConditionModel`` keys (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return dict(convert_ldm_unet_checkpoint(with_prefix(sd, UNET_PREFIX), dict(unet_config)))


def convert_vae(sd: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> StateDict:
    """``first_stage_model.*`` -> ``AutoencoderKL`` keys (diffusers' converter; 1x1-conv attention -> linear)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return dict(convert_ldm_vae_checkpoint(with_prefix(sd, VAE_PREFIX), dict(vae_config)))


def convert_text_encoder(
    sd: Mapping[str, torch.Tensor], text_config: Any, *, target_keys: Shapes | None = None
) -> StateDict:
    """``cond_stage_model.model.*`` (OpenCLIP text tower) -> ``CLIPTextModel`` keys.

    Keeps residual blocks ``0 .. num_hidden_layers-1`` (the penultimate-layer model drops the last),
    splits ``attn.in_proj_*`` into q/k/v (diffusers' converter), ignores ``text_projection`` and
    ``logit_scale``. ``target_keys`` decides whether the ``text_model.`` prefix is kept.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    used = int(text_config.num_hidden_layers)
    block = TEXT_PREFIX + "transformer.resblocks."
    kept: StateDict = {}
    for k, v in with_prefix(sd, TEXT_PREFIX).items():
        if k.startswith(block) and int(k[len(block) :].split(".", 1)[0]) >= used:
            continue  # residual blocks after the used depth (the official forward stops before them)
        if k in (TEXT_PREFIX + "text_projection", TEXT_PREFIX + "logit_scale"):
            continue
        kept[k] = v
    out = convert_open_clip_checkpoint(SimpleNamespace(config=text_config), kept, prefix=TEXT_PREFIX)
    out.pop("text_projection.weight", None)
    prefixed = target_keys is None or any(k.startswith("text_model.") for k in target_keys)
    if not prefixed:
        out = {(k[len("text_model.") :] if k.startswith("text_model.") else k): v for k, v in out.items()}
    return out


def convert_controlnet(sd: Mapping[str, torch.Tensor], controlnet_config: Mapping[str, Any]) -> StateDict:
    """Bare IRControlNet state dict -> :class:`IRControlNetModel` keys (diffusers' ControlNet converter)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if "input_hint_block.0.weight" in sd:
        raise ValueError("has an input_hint_block: a plain ControlNet, not DiffBIR's IRControlNet")
    if "time_embed.0.weight" not in sd:
        raise ValueError("is not an IRControlNet state dict (no time_embed.0.weight)")
    # the function takes the dict as is when it finds "time_embed.0.weight" (bare layout)
    out = convert_controlnet_checkpoint(dict(sd), {"layers_per_block": controlnet_config["layers_per_block"]})
    return {k: v for k, v in out.items() if v is not None}


def check_state_dict(got: Mapping[str, torch.Tensor], expected: Shapes, *, what: str, source: str | os.PathLike) -> None:
    """Raise WeightsError unless ``got`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if tuple(got[k].shape) != tuple(expected[k]))

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} with another shape ({k}: {tuple(got[k].shape)} in the file, {tuple(expected[k])} expected)"
        )
    if problems:
        raise WeightsError(f"{source}: {what} weights do not match the model description: " + "; ".join(problems))


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model's state dict (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# conversion cache


def config_fingerprint(*configs: Any) -> str:
    """Short stable hash of the target configs (a different architecture never reuses an entry)."""

    def plain(c: Any) -> Any:
        if hasattr(c, "to_dict"):
            c = c.to_dict()
        if isinstance(c, Mapping):
            return {str(k): plain(v) for k, v in sorted(c.items()) if not str(k).startswith("_")}
        if isinstance(c, (list, tuple)):
            return [plain(v) for v in c]
        return c if isinstance(c, (str, int, float, bool, type(None))) else str(c)

    text = json.dumps([plain(c) for c in configs], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# transformers adds bookkeeping fields to its config dicts that do not change the network
_TEXT_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps",
)  # fmt: skip


def text_config_fingerprint_fields(text_config: Any) -> dict[str, Any]:
    return {k: getattr(text_config, k) for k in _TEXT_CONFIG_FIELDS}


#: Tensor data in cache files starts at multiples of this many bytes (see save_aligned_safetensors).
ALIGN = 64
PAD_PREFIX = "__pad"
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def save_aligned_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a standard safetensors file in which every tensor starts at a 64-byte file offset.

    Why not ``safetensors.torch.save_file``: it packs tensors back to back, so memory-mapped tensors
    land at arbitrary addresses. CPU kernels (oneDNN/MKL) take other code paths for unaligned weights
    and round differently in the last bits, and copying them costs a full read at start-up. With
    aligned offsets the cache loads zero-copy and computes exactly as freshly allocated weights.
    The format forbids holes between tensors, so each gap is a small U8 tensor named ``__padN__``
    (dropped by :func:`load_aligned_safetensors`); the header is padded with spaces, as the format allows.
    """
    import struct

    entries: dict[str, Any] = {}
    chunks: list[Any] = []
    offset = 0
    for name in sorted(tensors):
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor name {name!r} is reserved for padding")
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
        if offset % ALIGN:
            gap = ALIGN - offset % ALIGN
            entries[f"{PAD_PREFIX}{len(entries)}__"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            chunks.append(bytes(gap))
            offset += gap
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        chunks.append(t)
        offset += nbytes
    head = {"__metadata__": dict(metadata or {}), **entries} if metadata else entries
    header = json.dumps(head, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for chunk in chunks:
            if isinstance(chunk, torch.Tensor):
                if chunk.numel():
                    f.write(memoryview(chunk.reshape(-1).view(torch.uint8).numpy()))
            else:
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def load_aligned_safetensors(path: str | os.PathLike) -> StateDict:
    """Tensors of a safetensors file (memory-mapped), without the ``__padN__`` fillers."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if not k.startswith(PAD_PREFIX)}


class ConversionCache:
    """Converted weights of one source checkpoint: ``<root>/<kind>-<sha16>-<cfg>-c<version>/<part>.safetensors``.

    An entry is a folder written under a temporary name and renamed into place when complete, so a
    crash or a concurrent run never leaves a half-written entry that looks complete.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, kind: str, source: str | os.PathLike, fingerprint: str) -> Path:
        """The entry folder for `source` (hashed through the weights hash cache: a checkpoint that
        `restorecli.weights.resolve` just verified is not hashed again)."""
        try:
            digest = cached_sha256(source)
        except OSError as exc:
            raise WeightsError(f"{Path(source)}: cannot read checkpoint ({exc.strerror or exc})") from None
        return self.root / f"{kind}-{digest[:16]}-{fingerprint}-c{CONVERTER_VERSION}"

    @staticmethod
    def complete(entry: Path, parts: tuple[str, ...]) -> bool:
        return (entry / "meta.json").is_file() and all((entry / f"{p}.safetensors").is_file() for p in parts)

    @staticmethod
    def load(entry: Path, part: str) -> StateDict:
        return load_aligned_safetensors(entry / f"{part}.safetensors")

    def store(self, entry: Path, parts: Mapping[str, Mapping[str, torch.Tensor]], meta: dict[str, Any]) -> bool:
        """Write an entry atomically; False (and a warning) if the folder cannot be written."""
        tmp: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.root))
            for part, sd in parts.items():
                meta_st = {"converter_version": str(CONVERTER_VERSION)}
                save_aligned_safetensors(sd, tmp / f"{part}.safetensors", metadata=meta_st)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
            if entry.exists():  # another run finished first; its entry is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
                return True
            os.replace(tmp, entry)
            return True
        except OSError as exc:
            log.warning("cannot write the conversion cache %s: %s", entry, exc)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            return False

    @staticmethod
    def discard(entry: Path) -> None:
        shutil.rmtree(entry, ignore_errors=True)


def iter_entries(root: str | os.PathLike) -> Iterator[Path]:
    """The complete-looking cache entries under ``root`` (for listing / cleaning)."""
    root = Path(root)
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file():
                yield p
