"""The start latent and the condition noise augmentation, in the order of the randomness contract.

Official ``diffbir/pipeline.py Pipeline.apply_cldm`` steps 3-4 (draws #1 and #2 of the
seed contract): the start point is drawn first, the noise-augmentation noise
second, then the sampler draws. Both use ``Diffusion.q_sample`` (float32 coefficients).
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from .noise import GeneratorNoise
from .schedules import NoiseSchedule

__all__ = ["initial_latent", "augment_condition"]


def initial_latent(
    shape: tuple[int, ...],
    *,
    noise: GeneratorNoise,
    schedule: NoiseSchedule,
    start_point: str = "noise",
    c_img: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """x_T (unit variance; EDM samplers scale it themselves). Draw #1 of the run.

    ``noise``: ``randn(shape)``. ``cond`` (``--start-point cond``): ``q_sample(c_img, T-1, randn)`` with the
    (padded) condition latent; on zero-SNR models acp[T-1] = 0, so it equals ``noise``.
    """
    if start_point == "noise":
        return noise.randn(shape, device)
    if start_point != "cond":
        raise UsageError(f"`start_point` must be noise or cond, got {start_point!r}")
    if c_img is None:
        raise ValueError("start_point='cond' needs the condition latent c_img")
    if tuple(c_img.shape) != tuple(shape):
        raise ValueError(f"c_img shape {tuple(c_img.shape)} differs from the latent shape {tuple(shape)}")
    return schedule.q_sample(c_img, schedule.num_timesteps - 1, noise.randn(c_img.shape, c_img.device))


def augment_condition(c_img: torch.Tensor, t: int, *, noise: GeneratorNoise, schedule: NoiseSchedule) -> torch.Tensor:
    """``--noise-aug t``: ``q_sample(c_img, t, randn)``, draw #2 (none when t == 0).

    The caller gives the result to BOTH cond and uncond (upstream clones the noised cond latent).
    """
    if t == 0:
        return c_img
    return schedule.q_sample(c_img, t, noise.randn(c_img.shape, c_img.device))
