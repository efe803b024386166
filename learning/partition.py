"""Splitting a data set across devices, reproducibly from a seed.

Three schemes a federated-learning user expects:

* :func:`iid` - shuffled, then cut into pieces whose sizes are equal or drawn
  unequal (``size_concentration``: Dirichlet over devices, smaller is more
  unequal);
* :func:`dirichlet` - label skew: for each class, its examples are split
  over devices by a Dirichlet(``alpha``) draw (Hsu et al. 2019); small
  ``alpha`` gives devices few dominant labels;
* :func:`shards` - sort by label, cut into ``devices * shards_per_device``
  shards, deal each device a few (McMahan et al. 2017): each device sees
  about ``shards_per_device`` labels.

Each returns a list of index arrays (sorted, disjoint, covering the data
unless stated). Randomness comes only from the ``numpy.random.Generator``
or the integer seed passed in.
"""

from __future__ import annotations

import numpy as np

from fedchain.learning.errors import ConfigError

__all__ = ["dirichlet", "iid", "shards"]


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check(n: int, devices: int, min_size: int):
    if devices < 1:
        raise ConfigError(f"need at least one device, got {devices}")
    if devices * min_size > n:
        raise ConfigError(f"{n} examples cannot give {devices} devices {min_size} each")


def iid(
    n: int,
    devices: int,
    seed: int | np.random.Generator,
    *,
    size_concentration: float | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Random disjoint pieces of ``range(n)``; equal sizes (within one) unless
    ``size_concentration`` is given, then Dirichlet-drawn sizes of at least
    ``min_size``."""
    _check(n, devices, min_size)
    rng = _rng(seed)
    order = rng.permutation(n)
    if size_concentration is None:
        sizes = np.full(devices, n // devices)
        sizes[: n % devices] += 1
    else:
        if size_concentration <= 0:
            raise ConfigError("size_concentration must be positive")
        shares = rng.dirichlet(np.full(devices, size_concentration))
        spare = n - devices * min_size
        sizes = min_size + np.floor(shares * spare).astype(np.int64)
        sizes[np.argsort(-shares, kind="stable")[: n - sizes.sum()]] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[i] : bounds[i + 1]]) for i in range(devices)]


def dirichlet(
    labels: np.ndarray,
    devices: int,
    alpha: float,
    seed: int | np.random.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: class ``c``'s examples go to devices in
    proportions drawn from Dirichlet(``alpha``). Redrawn (up to
    ``max_tries``) until every device has ``min_size`` examples."""
    labels = np.asarray(labels)
    _check(len(labels), devices, min_size)
    if alpha <= 0:
        raise ConfigError(f"alpha must be positive, got {alpha}")
    rng = _rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(devices, alpha))) * len(idx)).astype(int)
            for d, piece in enumerate(np.split(idx, cuts[:-1])):
                parts[d].append(piece)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ConfigError(
        f"no Dirichlet({alpha}) split gave every device {min_size} examples in {max_tries} tries"
    )


def shards(
    labels: np.ndarray,
    devices: int,
    shards_per_device: int,
    seed: int | np.random.Generator,
) -> list[np.ndarray]:
    """Pathological non-IID split: label-sorted shards, ``shards_per_device``
    to each device. Examples past the last whole shard are left out."""
    labels = np.asarray(labels)
    count = devices * shards_per_device
    _check(len(labels), count, 1)
    rng = _rng(seed)
    order = np.lexsort((rng.permutation(len(labels)), labels))  # by label, ties shuffled
    size = len(labels) // count
    dealt = rng.permutation(count).reshape(devices, shards_per_device)
    return [
        np.sort(np.concatenate([order[s * size : (s + 1) * size] for s in row])) for row in dealt
    ]
