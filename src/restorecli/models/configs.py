"""DiffBIR's stage-2 architecture vocabulary -> diffusers / transformers configs.

DiffBIR describes its ControlLDM with the constructor kwargs of the official modules
(``ControlLDM(unet_cfg, vae_cfg, clip_cfg, controlnet_cfg, latent_scale_factor)`` in
``diffbir/model/cldm.py``; full-size values in ``configs/inference/cldm.yaml``). These functions
translate those kwargs, explicitly and without looking at any weights, into the configs of

* ``diffusers.UNet2DConditionModel``  (``unet_cfg``, official ``UNetModel`` kwargs),
* :class:`restorecli.models.controlnet.IRControlNetModel`  (``controlnet_cfg``, official ``ControlNet``),
* ``diffusers.AutoencoderKL``  (``vae_cfg``, official ``AutoencoderKL(ddconfig, embed_dim)``),
* ``transformers.CLIPTextConfig``  (``clip_cfg``, official ``FrozenOpenCLIPEmbedder`` kwargs).

diffusers' ``from_single_file`` guesses an SD2 config from the network (and picks the wrong one for
SD 2.1 base), so nothing here is guessed. Options the official constructors accept but that change
the architecture in ways the diffusers blocks cannot express raise :class:`SetupError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SetupError
from .description import CLDMSpec, DiffusionSpec, ModelDescription

# Official UNetModel / ControlNet kwargs (diffbir/model/unet.py, controlnet.py) and the values we
# support when they differ from the default. Keys not listed here are rejected as unknown.
_UNET_KEYS = {
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
    "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims", "num_classes",
    "use_checkpoint", "use_fp16", "num_heads", "num_head_channels", "num_heads_upsample",
    "use_scale_shift_norm", "resblock_updown", "use_new_attention_order", "use_spatial_transformer",
    "transformer_depth", "context_dim", "n_embed", "legacy", "disable_self_attentions",
    "num_attention_blocks", "disable_middle_self_attn", "use_linear_in_transformer",
}  # fmt: skip
_CONTROLNET_KEYS = (_UNET_KEYS - {"out_channels"}) | {"hint_channels"}
# (key, value the diffusers blocks implement, why another value does not map)
_UNET_FIXED = (
    ("dims", 2, "only 2-D models exist in diffusers' UNet2DConditionModel"),
    ("conv_resample", True, "diffusers' up/downsamplers are convolutions"),
    ("num_classes", None, "class-conditional UNets are not used by DiffBIR"),
    ("use_scale_shift_norm", False, "not used by SD 2.1"),
    ("resblock_updown", False, "diffusers' UNet2DConditionModel has no resblock up/down sampling"),
    ("use_spatial_transformer", True, "the legacy AttentionBlock is not a diffusers block"),
    ("n_embed", None, "codebook prediction is not supported"),
    ("disable_self_attentions", None, "not used by SD 2.1"),
    ("num_attention_blocks", None, "not used by SD 2.1"),
    ("disable_middle_self_attn", False, "not used by SD 2.1"),
)
_UNET_DEFAULTS = {key: value for key, value, _ in _UNET_FIXED}
_UNET_DEFAULTS.update(num_heads=-1, num_head_channels=-1, transformer_depth=1, use_linear_in_transformer=False)

_DDCONFIG_KEYS = {
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
    "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "use_linear_attn",
    "give_pre_end", "tanh_out",
}  # fmt: skip
_TEXT_CFG_KEYS = {
    "context_length", "vocab_size", "width", "heads", "layers", "ls_init_value", "hf_model_name",
    "hf_tokenizer_name", "hf_model_pretrained", "proj", "pooler_type", "embed_cls", "pad_id", "output_tokens",
}  # fmt: skip


def _bad(section: str, key: str, value: Any, why: str) -> SetupError:
    return SetupError(f"{section}.{key}={value!r} is not supported ({why})")


def _check_keys(section: str, cfg: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise SetupError(f"{section} has unknown keys: {', '.join(unknown)}")
    for key in ("in_channels", "model_channels", "num_res_blocks", "channel_mult", "attention_resolutions"):
        if key in known and key not in cfg:
            raise SetupError(f"{section} lacks {key!r}")


def _encoder_layout(section: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """What the official UNetModel/ControlNet encoder looks like, in diffusers terms."""
    opts = {**_UNET_DEFAULTS, **cfg}
    for key, value, why in _UNET_FIXED:
        if opts[key] != value:
            raise _bad(section, key, opts[key], why)
    if not isinstance(opts["num_res_blocks"], int):
        raise _bad(section, "num_res_blocks", opts["num_res_blocks"], "per-level counts are not supported")
    if opts.get("context_dim") is None:
        raise SetupError(f"{section} lacks 'context_dim' (the text embedding width)")
    mc = int(opts["model_channels"])
    mults = [int(m) for m in opts["channel_mult"]]
    channels = [mc * m for m in mults]
    # Level i runs at downsampling rate ds = 2**i; it has attention iff ds is in attention_resolutions.
    attention = [2**i in set(opts["attention_resolutions"]) for i in range(len(mults))]
    # Heads per level (official: num_heads = ch // num_head_channels when num_head_channels is set).
    # The ``legacy`` flag only changes dim_head when num_head_channels is -1, and then
    # ch // num_heads is what both branches compute, so it needs no mapping.
    nhc, nh = int(opts["num_head_channels"]), int(opts["num_heads"])
    if nhc == -1 and nh == -1:
        raise SetupError(f"{section} needs num_heads or num_head_channels")
    if nhc != -1:
        bad = [c for c in channels if c % nhc]
        if bad:
            raise _bad(section, "num_head_channels", nhc, f"does not divide channels {bad}")
        heads = [c // nhc for c in channels]
    else:
        heads = [nh] * len(channels)
    depth = opts["transformer_depth"]
    depth = [int(depth)] * len(mults) if isinstance(depth, int) else [int(d) for d in depth]
    if len(depth) != len(mults):
        raise _bad(section, "transformer_depth", opts["transformer_depth"], "needs one value per channel_mult level")
    context_dim = opts["context_dim"]
    if isinstance(context_dim, (list, tuple)):
        if len(set(context_dim)) != 1:
            raise _bad(section, "context_dim", context_dim, "per-layer context widths are not supported")
        context_dim = context_dim[0]
    return dict(
        channels=channels,
        attention=attention,
        heads=heads,
        depth=depth,
        layers_per_block=int(opts["num_res_blocks"]),
        context_dim=int(context_dim),
        linear=bool(opts["use_linear_in_transformer"]),
        in_channels=int(opts["in_channels"]),
    )


def _encoder_kwargs(lay: dict[str, Any]) -> dict[str, Any]:
    """The kwargs ``UNet2DConditionModel`` and ``IRControlNetModel`` share: the encoder of ``_encoder_layout``
    and the fixed choices of the official blocks. The heads are not here: diffusers names them
    ``attention_head_dim`` in the UNet and ``num_attention_heads`` in a ControlNet."""
    return dict(
        in_channels=lay["in_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay["attention"]),
        block_out_channels=tuple(lay["channels"]),
        layers_per_block=lay["layers_per_block"],
        transformer_layers_per_block=tuple(lay["depth"]),
        cross_attention_dim=lay["context_dim"],
        use_linear_projection=lay["linear"],
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        upcast_attention=False,
    )


def unet_config_from_ldm(unet_cfg: dict[str, Any]) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for the official ``UNetModel(**unet_cfg)``.

    Mapping: channels = model_channels * channel_mult; level i has cross-attention blocks iff
    ``2**i in attention_resolutions``; diffusers' ``attention_head_dim`` is (for historical reasons)
    the number of HEADS per level = channels // num_head_channels; the mid block uses the last level's
    heads, as the official code does; ``use_linear_in_transformer`` -> ``use_linear_projection``.
    Timestep embedding: ``flip_sin_to_cos=True`` (official order [cos | sin]), ``freq_shift=0``.
    """
    cfg = dict(unet_cfg)
    _check_keys("unet_cfg", cfg, _UNET_KEYS)
    lay = _encoder_layout("unet_cfg", cfg)
    return dict(
        **_encoder_kwargs(lay),
        sample_size=int(cfg.get("image_size") or 64),
        out_channels=int(cfg.get("out_channels", lay["in_channels"])),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(lay["attention"])),
        attention_head_dim=tuple(lay["heads"]),
    )


def controlnet_config_from_ldm(controlnet_cfg: dict[str, Any]) -> dict[str, Any]:
    """``IRControlNetModel`` kwargs for the official ``ControlNet(**controlnet_cfg)``.

    ``hint_channels`` is the width of the condition latent concatenated to x_t before ``conv_in``.
    """
    cfg = dict(controlnet_cfg)
    _check_keys("controlnet_cfg", cfg, _CONTROLNET_KEYS)
    if "hint_channels" not in cfg:
        raise SetupError("controlnet_cfg lacks 'hint_channels' (channels of the condition latent)")
    lay = _encoder_layout("controlnet_cfg", cfg)
    return dict(
        **_encoder_kwargs(lay),
        conditioning_channels=int(cfg["hint_channels"]),
        num_attention_heads=tuple(lay["heads"]),
    )


def vae_config_from_ldm(vae_cfg: dict[str, Any], latent_scale_factor: float = 0.18215) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs for the official ``AutoencoderKL(ddconfig=..., embed_dim=...)`` (KL-f8)."""
    if "ddconfig" not in vae_cfg:
        raise SetupError("vae_cfg lacks 'ddconfig'")
    unknown = sorted(set(vae_cfg) - {"ddconfig", "embed_dim"})
    if unknown:
        raise SetupError(f"vae_cfg has unknown keys: {', '.join(unknown)}")
    dd = dict(vae_cfg["ddconfig"])
    unknown = sorted(set(dd) - _DDCONFIG_KEYS)
    if unknown:
        raise SetupError(f"vae_cfg.ddconfig has unknown keys: {', '.join(unknown)}")
    fixed = (
        ("double_z", True, "diffusers' AutoencoderKL always predicts mean and log-variance"),
        ("attn_resolutions", [], "diffusers' encoder/decoder blocks have no attention outside the mid block"),
        ("resamp_with_conv", True, "diffusers' resamplers are convolutions"),
        ("use_linear_attn", False, "not a diffusers block"),
        ("give_pre_end", False, "the decoder must run to the end"),
        ("tanh_out", False, "not used by SD"),
    )
    for key, value, why in fixed:
        got = dd.get(key, value)
        if (list(got) if isinstance(got, (list, tuple)) else got) != value:
            raise _bad("vae_cfg.ddconfig", key, got, why)
    z = int(dd["z_channels"])
    embed_dim = int(vae_cfg.get("embed_dim", z))
    if embed_dim != z:
        raise _bad("vae_cfg", "embed_dim", embed_dim, f"diffusers' quant_conv needs embed_dim == z_channels ({z})")
    n = len(dd["ch_mult"])
    return dict(
        in_channels=int(dd.get("in_channels", 3)),
        out_channels=int(dd.get("out_ch", 3)),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"]),
        layers_per_block=int(dd["num_res_blocks"]),
        act_fn="silu",
        latent_channels=z,
        norm_num_groups=32,
        sample_size=int(dd.get("resolution", 256)),
        scaling_factor=float(latent_scale_factor),
        mid_block_add_attention=True,
        use_quant_conv=True,
        use_post_quant_conv=True,
    )


def text_config_from_ldm(clip_cfg: dict[str, Any]):
    """``transformers.CLIPTextConfig`` for the official ``FrozenOpenCLIPEmbedder(**clip_cfg)``.

    The OpenCLIP text tower is a pre-LN transformer with exact GELU, MLP ratio 4 and a causal mask, the
    same network as ``CLIPTextModel``. ``layer="penultimate"`` (SD 2.x) runs all but the last
    residual block and then ``ln_final``: that is a ``CLIPTextModel`` with ``layers - 1`` layers,
    whose ``last_hidden_state`` already has ``final_layer_norm`` applied. No text projection.
    """
    from transformers import CLIPTextConfig

    unknown = sorted(set(clip_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "layer"})
    if unknown:
        raise SetupError(f"clip_cfg has unknown keys: {', '.join(unknown)}")
    text = dict(clip_cfg.get("text_cfg") or {})
    unknown = sorted(set(text) - _TEXT_CFG_KEYS)
    if unknown:
        raise SetupError(f"clip_cfg.text_cfg has unknown keys: {', '.join(unknown)}")
    if text.get("ls_init_value") is not None:
        raise _bad("clip_cfg.text_cfg", "ls_init_value", text["ls_init_value"], "layer scale is not in CLIPTextModel")
    if text.get("hf_model_name"):
        raise _bad("clip_cfg.text_cfg", "hf_model_name", text["hf_model_name"], "only the OpenCLIP text tower")
    if text.get("embed_cls"):
        raise _bad("clip_cfg.text_cfg", "embed_cls", True, "not in CLIPTextModel")
    layer = clip_cfg.get("layer", "last")
    layers = int(text.get("layers", 12))
    if layer == "penultimate":
        used = layers - 1
    elif layer == "last":
        used = layers
    else:
        raise _bad("clip_cfg", "layer", layer, 'use "penultimate" or "last"')
    width = int(text.get("width", 512))
    return CLIPTextConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=int(clip_cfg.get("embed_dim", width)),
        num_hidden_layers=used,
        num_attention_heads=int(text.get("heads", 8)),
        max_position_embeddings=int(text.get("context_length", 77)),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        pad_token_id=int(text.get("pad_id", 0)),
        bos_token_id=49406,
        eos_token_id=49407,
    )


def text_layers_in_checkpoint(clip_cfg: dict[str, Any]) -> int:
    """How many OpenCLIP residual blocks the official text tower has (``text_cfg.layers``)."""
    return int((clip_cfg.get("text_cfg") or {}).get("layers", 12))


# --- the full-size architecture (configs/inference/cldm.yaml at HEAD 3f8b530) ---

_SD21_ENCODER = {
    "use_checkpoint": True,
    "image_size": 32,
    "in_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 1024,
    "legacy": False,
}

FULL_SIZE_CLDM_PARAMS: dict[str, Any] = {
    "latent_scale_factor": 0.18215,
    "unet_cfg": {**_SD21_ENCODER, "out_channels": 4},
    "vae_cfg": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
    "clip_cfg": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
        "layer": "penultimate",
    },
    "controlnet_cfg": {**_SD21_ENCODER, "hint_channels": 4},
}

# Diffusion parameters of the pinned versions (configs/inference/diffusion.yaml, diffusion_v2.1.yaml).
PINNED_DIFFUSION: dict[str, DiffusionSpec] = {
    "v1": DiffusionSpec(parameterization="eps", zero_snr=False),
    "v2": DiffusionSpec(parameterization="eps", zero_snr=False),
    "v2.1": DiffusionSpec(parameterization="v", zero_snr=True),
}


def full_size_cldm_spec(sd_checkpoint: str | Path, controlnet_checkpoint: str | Path) -> CLDMSpec:
    """The official full-size ControlLDM (SD 2.1 base + IRControlNet; same for v1, v2, v2.1)."""
    p = FULL_SIZE_CLDM_PARAMS
    return CLDMSpec(
        latent_scale_factor=p["latent_scale_factor"],
        unet_cfg=dict(p["unet_cfg"]),
        vae_cfg={"embed_dim": 4, "ddconfig": dict(p["vae_cfg"]["ddconfig"])},
        clip_cfg={k: (dict(v) if isinstance(v, dict) else v) for k, v in p["clip_cfg"].items()},
        controlnet_cfg=dict(p["controlnet_cfg"]),
        sd_checkpoint=Path(sd_checkpoint),
        controlnet_checkpoint=Path(controlnet_checkpoint),
    )


def full_size_description(
    version: str, *, sd_checkpoint: str | Path, controlnet_checkpoint: str | Path, tokenizer: str | Path
) -> ModelDescription:
    """A stage-2-only ModelDescription of a pinned version ("v1", "v2", "v2.1"); no cleaner."""
    if version not in PINNED_DIFFUSION:
        raise SetupError(f"unknown model version {version!r}; expected one of {', '.join(PINNED_DIFFUSION)}")
    return ModelDescription(
        path=None,
        cleaner=None,
        cldm=full_size_cldm_spec(sd_checkpoint, controlnet_checkpoint),
        diffusion=PINNED_DIFFUSION[version],
        tokenizer=Path(tokenizer),
    )


@dataclass(frozen=True)
class Stage2Configs:
    """All four configs of one ControlLDM description."""

    unet: dict[str, Any]
    controlnet: dict[str, Any]
    vae: dict[str, Any]
    text: Any  # transformers.CLIPTextConfig
    text_layers_in_checkpoint: int


def stage2_configs(spec: CLDMSpec) -> Stage2Configs:
    return Stage2Configs(
        unet=unet_config_from_ldm(spec.unet_cfg),
        controlnet=controlnet_config_from_ldm(spec.controlnet_cfg),
        vae=vae_config_from_ldm(spec.vae_cfg, spec.latent_scale_factor),
        text=text_config_from_ldm(spec.clip_cfg),
        text_layers_in_checkpoint=text_layers_in_checkpoint(spec.clip_cfg),
    )


def full_size_configs() -> Stage2Configs:
    """The four configs of the official full-size ControlLDM (SD 2.1 base + IRControlNet); builds nothing,
    reads no checkpoint (for memory plans, benchmarks and meta-device models)."""
    return stage2_configs(full_size_cldm_spec("sd.ckpt", "controlnet.pth"))
