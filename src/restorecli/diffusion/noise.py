"""Where every fresh noise tensor of a run comes from (the seed contract: README, Sampling).

One ``torch.Generator("cpu")`` per image drives all randomness. The caller draws x_T first; every later
draw is ``torch.randn(shape, generator=G, dtype=float32)`` on the CPU, in program order, and only then
moved to the device, so a seed gives the same numbers on every device. Samplers never call
``torch.randn_like``: they ask the :class:`NoiseSource` they were given, which guidance and tiling code
can share.

Randomness that is not the sampler's own (restoration guidance's posterior samples of its target, on
every sampler but ``spaced``) comes from a separate stream, :meth:`GeneratorNoise.derived`, seeded from
the image's seed by :func:`derived_seed`, so it never shifts the sampler's draws.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import hashlib

import torch

__all__ = ["NoiseSource", "GeneratorNoise", "GUIDANCE_STREAM", "derived_seed"]

#: Name of the stream restoration guidance draws its target's posterior samples from (all samplers but spaced).
GUIDANCE_STREAM = "guidance"
#: torch's CPU generator (mt19937) is initialised from the low 32 bits of its seed only.
_SEED_BITS = 32


def derived_seed(seed: int, stream: str) -> int:
    """The seed of the separate stream ``stream`` of an image whose generator was seeded with ``seed``.

    Rule: let ``s = seed mod 2**32`` (the part of a seed torch's CPU generator uses, so seeds that give the
    same sampler noise give the same derived noise); the derived seed is the first 4 bytes, little-endian,
    of ``SHA-256("restorecli/<stream>/<s>")`` as an unsigned integer, plus 1 (mod 2**32) in the one case
    where that equals ``s``, so a derived stream never starts from the image's own generator state.
    """
    mask = (1 << _SEED_BITS) - 1
    s = int(seed) & mask
    digest = hashlib.sha256(f"restorecli/{stream}/{s}".encode("ascii")).digest()
    d = int.from_bytes(digest[:4], "little")
    return (d + 1) & mask if d == s else d


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

    def derived(self, stream: str = GUIDANCE_STREAM) -> "GeneratorNoise":
        """A NEW source for the separate stream ``stream``: a fresh CPU generator seeded with
        :func:`derived_seed` of this generator's seed (``initial_seed``), at its start whatever this one
        has drawn, so two calls give the same numbers (the out-of-memory retry relies on this)."""
        return GeneratorNoise.from_seed(derived_seed(self.generator.initial_seed(), stream))

    def randn(self, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        self.draws += 1
        return z if device is None else z.to(device)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.randn(like.shape, like.device)
