"""The conditioning object the samplers pass through to the model: text embedding, condition latent, strength.

Samplers treat it as opaque except for two operations: ``cat`` (cond + uncond in one batched model
call for CFG) and ``crop`` (tiled sampling crops the condition latent to each window, text unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["ControlCondition", "ControlledModel"]


@dataclass(frozen=True, eq=False)
class ControlCondition:
    """One IRControlNet conditioning: ``c_txt`` (B, 77, D), ``c_img`` (B, 4, h, w), control strength.

    The uncond branch uses the negative-prompt embedding and the SAME ``c_img`` .
    """

    c_txt: torch.Tensor
    c_img: torch.Tensor
    control_scale: float = 1.0

    def cat(self, other: "ControlCondition") -> "ControlCondition":
        if other.control_scale != self.control_scale:
            raise ValueError("cannot batch conditions with different control strengths")
        c_txt, c_img = torch.cat([self.c_txt, other.c_txt]), torch.cat([self.c_img, other.c_img])
        return ControlCondition(c_txt, c_img, self.control_scale)

    def crop(self, top: int, bottom: int, left: int, right: int) -> "ControlCondition":
        return replace(self, c_img=self.c_img[..., top:bottom, left:right])


class ControlledModel:
    """``model(x_t, t, cond)`` over a network called as ``net(x_t, t, c_txt, c_img, control_scale)``.

    Adapts :class:`restorecli.models.cldm.ControlledUNet` (ControlLDM.forward) to the samplers' interface.
    """

    def __init__(self, net):
        self.net = net

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: ControlCondition) -> torch.Tensor:
        return self.net(x_t, t, cond.c_txt, cond.c_img, cond.control_scale)
