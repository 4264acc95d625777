"""IRControlNet, DiffBIR's ControlNet, as a diffusers model.

Why not ``diffusers.ControlNetModel``: it runs the hint through a ``controlnet_cond_embedding`` CNN and
ADDS it after ``conv_in``. DiffBIR's IRControlNet (``diffbir/model/controlnet.py``, ``ControlNet``) has no
hint encoder: the condition latent is CONCATENATED with x_t along channels, so ``conv_in`` takes
``in_channels + conditioning_channels`` (4 + 4) channels. Everything after ``conv_in`` is the SD
encoder (input blocks + middle block) with a 1x1 convolution on every skip ("zero convs") and on the
middle block output.

So this class is built from diffusers' own blocks (``Timesteps``, ``TimestepEmbedding``,
``get_down_block``, ``UNetMidBlock2DCrossAttn``) and keeps ``ControlNetModel``'s attribute names
(``conv_in``, ``time_embedding``, ``down_blocks``, ``controlnet_down_blocks``, ``mid_block``,
``controlnet_mid_block``), so diffusers' ldm ControlNet key mapping applies unchanged and the residuals
plug into ``UNet2DConditionModel(down_block_additional_residuals=..., mid_block_additional_residual=...)``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block
from torch import nn


class IRControlNetModel(ModelMixin, ConfigMixin):
    """DiffBIR's IRControlNet: ``concat(x_t, c_img)`` -> SD encoder -> 1x1 convs on every residual.

    ``num_attention_heads`` is the number of heads per level (what diffusers' UNet config calls
    ``attention_head_dim`` for historical reasons). Defaults are the full-size SD 2.1 base layout.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20),
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        cross_attention_dim: int = 1024,
        use_linear_projection: bool = True,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        downsample_padding: int = 1,
        upcast_attention: bool = False,
    ):
        super().__init__()
        n = len(down_block_types)
        if len(block_out_channels) != n:
            raise ValueError(f"`block_out_channels` needs {n} entries (one per down block), got {block_out_channels}")
        heads = (num_attention_heads,) * n if isinstance(num_attention_heads, int) else tuple(num_attention_heads)
        depth = (
            (transformer_layers_per_block,) * n
            if isinstance(transformer_layers_per_block, int)
            else tuple(transformer_layers_per_block)
        )
        if len(heads) != n or len(depth) != n:
            raise ValueError(
                f"`num_attention_heads` and `transformer_layers_per_block` need {n} entries, got {heads} and {depth}"
            )

        self.conv_in = nn.Conv2d(in_channels + conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        def zero_conv(ch: int) -> nn.Conv2d:
            conv = nn.Conv2d(ch, ch, kernel_size=1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            return conv

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(block_out_channels[0])])
        out_ch = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            last = i == n - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=depth[i],
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=time_embed_dim,
                    add_downsample=not last,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=heads[i],
                    attention_head_dim=out_ch // heads[i],
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    upcast_attention=upcast_attention,
                )
            )
            # one residual (and one zero conv) per resnet, plus one after the downsampler
            for _ in range(layers_per_block + (0 if last else 1)):
                self.controlnet_down_blocks.append(zero_conv(out_ch))

        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            transformer_layers_per_block=depth[-1],
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
        )
        self.controlnet_mid_block = zero_conv(block_out_channels[-1])

    @property
    def num_down_residuals(self) -> int:
        """12 for SD 2.1 (the official ``zero_convs``)."""
        return len(self.controlnet_down_blocks)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        cond_latent: torch.Tensor,
        conditioning_scale: float = 1.0,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``(down_block_residuals, mid_block_residual)``, each residual multiplied by ``conditioning_scale``.

        Official ``ControlNet.forward`` + the ``control_scales`` product of ``ControlLDM.forward``.
        ``timestep`` may be long or float (DPM-Solver passes fractional model times), a scalar or one
        value per batch item. ``cond_latent`` and ``encoder_hidden_states`` with batch 1 are broadcast.
        """
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.to(sample.device).expand(batch)
        # the sinusoidal embedding is computed in fp32 (as the official code), then cast like diffusers' UNet
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))

        if cond_latent.shape[0] != batch:
            cond_latent = cond_latent.expand(batch, *cond_latent.shape[1:])
        if encoder_hidden_states.shape[0] != batch:
            encoder_hidden_states = encoder_hidden_states.expand(batch, *encoder_hidden_states.shape[1:])

        h = self.conv_in(torch.cat([sample, cond_latent.to(sample.dtype)], dim=1))
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)

        down = tuple(conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True))
        mid = self.controlnet_mid_block(h)
        if conditioning_scale != 1.0:
            down = tuple(d * conditioning_scale for d in down)
            mid = mid * conditioning_scale
        return down, mid
