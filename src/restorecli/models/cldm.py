"""DiffBIR's ControlLDM operations on the diffusers models (``diffbir/model/cldm.py``, ``ControlLDM``).

The pipeline and the samplers call these:

* :func:`tokenize` / :func:`encode_prompt` - OpenCLIP tokens and the penultimate-layer text embedding
  .
* :func:`vae_encode` / :func:`vae_decode` - condition latent = posterior MODE * scale; decode(z / scale),
  no clamp.
* :class:`ControlledUNet` - one denoiser call ``(x_t, t, c_txt, c_img, control_scale)`` -> raw model
  output (eps or v, as the model was trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .controlnet import IRControlNetModel
    from .stage2 import Stage2Models


def tokenize(models: Stage2Models, prompts: Sequence[str]) -> torch.Tensor:
    """(B, 77) long token ids: SOT, BPE, EOT, zero padding; longer prompts are cut with EOT kept last.

    Same ids as the vendored OpenCLIP ``tokenize`` (checked against the golden ids).
    """
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of strings, got a single str")
    out = models.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=models.max_length,
        truncation=True,
        return_tensors="pt",
    )
    return out.input_ids


@torch.no_grad()
def encode_prompt(models: Stage2Models, prompts: Sequence[str]) -> torch.Tensor:
    """(B, 77, D) text embedding of each prompt (``FrozenOpenCLIPEmbedder.encode``).

    token + positional embedding, all residual blocks but the last with the causal mask only (no padding
    mask), then ``ln_final``: the ``last_hidden_state`` of our ``layers - 1`` ``CLIPTextModel``.
    An empty prompt is encoded like any other (SOT, EOT, zeros).
    """
    ids = tokenize(models, prompts).to(models.text_encoder.device)
    return models.text_encoder(input_ids=ids).last_hidden_state


@torch.no_grad()
def vae_encode(models: Stage2Models, image: torch.Tensor) -> torch.Tensor:
    """Latent of an image in [-1, 1]: ``mode(q(z|x)) * latent_scale_factor`` (the posterior mean).

    The input is cast to the VAE's dtype and device; the latent comes back in that dtype.
    """
    vae = models.vae
    x = image.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(x).latent_dist.mode() * models.latent_scale_factor


@torch.no_grad()
def vae_decode(models: Stage2Models, z: torch.Tensor) -> torch.Tensor:
    """Image (about [-1, 1], NOT clamped) of a scaled latent: ``decode(z / latent_scale_factor)``."""
    vae = models.vae
    z = z.to(device=vae.device, dtype=vae.dtype)
    return vae.decode(z / models.latent_scale_factor).sample


class ControlledUNet(nn.Module):
    """``ControlLDM.forward``: the IRControlNet's residuals, scaled, added to the UNet's skips and middle.

    ``control = controlnet(concat(x_t, c_img), t, c_txt)``; every residual ``*= control_scale``;
    ``unet(x_t, t, c_txt, down_block_additional_residuals=control[:-1],
    mid_block_additional_residual=control[-1])``. Both networks get the same ``x_t`` (for EDM samplers
    the already ``c_in``-scaled one); ``c_img`` is never scaled.

    Inputs may be batched (B=2 for cond+uncond); ``c_img`` / ``c_txt`` with batch 1 are broadcast.
    ``t``: long or float (fractional DPM-Solver times), a scalar, shape (1,) or (B,).
    Inputs are cast to the dtype/device of the UNet's first parameter (``conv_in``) and the output
    comes back in ``x_t``'s dtype, so samplers can keep fp32 latents around a half-precision network.
    """

    def __init__(self, unet: nn.Module, controlnet: IRControlNetModel):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float | int,
        c_txt: torch.Tensor,
        c_img: torch.Tensor,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        dtype, device = self.dtype, self.device
        batch = x_t.shape[0]
        x = x_t.to(device=device, dtype=dtype)
        ctx = c_txt.to(device=device, dtype=dtype)
        cond = c_img.to(device=device, dtype=dtype)
        if ctx.shape[0] != batch:
            ctx = ctx.expand(batch, *ctx.shape[1:])
        if cond.shape[0] != batch:
            cond = cond.expand(batch, *cond.shape[1:])
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch)

        down, mid = self.controlnet(x, t, ctx, cond, conditioning_scale=control_scale)
        out = self.unet(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)
