"""Seeded random draws at Python speed.

Every random choice a node or the simulated network makes comes from a
numpy ``Generator`` that was passed in (never a module-level one), so a seed
fixes a whole run. A numpy call costs a microsecond or more whatever it
returns, and a simulation makes millions of single draws, so
:class:`RandomStream` draws in blocks and hands out Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_BLOCK = 512


class RandomStream:
    """Buffered uniform and normal draws from one ``numpy.random.Generator``.

    The sequence of values depends only on the generator's seed and the order
    of calls, which is what determinism needs.
    """

    __slots__ = ("_normals", "_rng", "_uniforms")

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._uniforms: list[float] = []
        self._normals: list[float] = []

    @classmethod
    def from_seed(cls, *entropy: int) -> RandomStream:
        return cls(np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy)))))

    @property
    def generator(self) -> np.random.Generator:
        return self._rng

    def uniform(self) -> float:
        """A float in [0, 1)."""
        if not self._uniforms:
            self._uniforms = self._rng.random(_BLOCK).tolist()
            self._uniforms.reverse()
        return self._uniforms.pop()

    def normal(self) -> float:
        if not self._normals:
            self._normals = self._rng.standard_normal(_BLOCK).tolist()
            self._normals.reverse()
        return self._normals.pop()

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        return min(int(self.uniform() * n), n - 1)

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        """``k`` distinct items (all of them if fewer), by partial Fisher-Yates."""
        pool = list(items)
        k = min(k, len(pool))
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]

    def lognormal(self, median: float, sigma: float) -> float:
        return median * math.exp(sigma * self.normal())
