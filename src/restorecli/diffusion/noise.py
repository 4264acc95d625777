"""Where every fresh noise tensor of a run comes from (the project's randomness contract, DESIGN.md "Seeds").

One ``torch.Generator("cpu")`` per image drives all randomness. The caller draws x_T first; every later
draw is ``torch.randn(shape, generator=G, dtype=float32)`` on the CPU, in program order, and only then
moved to the device, so a seed gives the same numbers on every device. Samplers never call
``torch.randn_like``: they ask the :class:`NoiseSource` they were given, which guidance and tiling code
can share (the reference README's "Randomness contract" lists where each sampler draws).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = ["NoiseSource", "GeneratorNoise"]


@runtime_checkable
class NoiseSource(Protocol):
    """``noise(like)`` -> a float32 standard-normal tensor with ``like``'s shape on ``like``'s device."""

    def __call__(self, like: torch.Tensor) -> torch.Tensor: ...


class GeneratorNoise:
    """Standard-normal draws from one CPU generator, moved to the device after drawing.

    ``draws`` counts the tensors handed out (the start point included when drawn through
    :meth:`randn`); tests use it to check each sampler's draw pattern.
    """

    def __init__(self, generator: torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"the randomness contract needs a CPU generator, got one on {generator.device}")
        self.generator = generator
        self.draws = 0

    @classmethod
    def from_seed(cls, seed: int) -> "GeneratorNoise":
        return cls(torch.Generator("cpu").manual_seed(seed))

    def randn(self, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        self.draws += 1
        return z if device is None else z.to(device)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.randn(like.shape, like.device)
