"""Aggregating device updates into the next global model, deterministically.

Step 4 of the serverless round (DESIGN.md) needs the same bytes on every
node and platform, so aggregation is NumPy with a fixed order of
operations, never XLA (fusion and threads may reorder float sums) or BLAS:

* sums across devices are explicit loops in the committed order of the
  updates, accumulated in float64 and rounded once to float32;
* sums along a vector (norms, distances) use NumPy's pairwise summation of a
  contiguous float64 row, whose association order is fixed by the length;
* selections (median, trimmed mean, Krum) sort with ties broken by position.

Tiered models: each device sends the tensors its tier has. Tensors are
grouped by the set of devices that hold them, and the rule runs on each
group's concatenated vectors - so with one tier Krum sees whole updates, and
with tiers the shared tensors are averaged over every device while a deep
tier's extra blocks are averaged over the devices that have them.

Rules are objects with one job (:class:`WeightedMean` - the paper's eq. 7
weighted by sample count - :class:`CoordinateMedian`,
:class:`TrimmedMean`, :class:`Krum`); robustness wraps them
(:class:`NormBound` drops updates with implausible norms, then delegates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedchain.learning.errors import AggregationError, ConfigError

__all__ = [
    "AggregateResult",
    "Aggregator",
    "ClientUpdate",
    "CoordinateMedian",
    "Krum",
    "NormBound",
    "TrimmedMean",
    "VectorRule",
    "WeightedMean",
    "apply_delta",
    "update_norm",
]


@dataclass(frozen=True)
class ClientUpdate:
    """One device's update: the tensors it holds (``name -> float32 array``,
    the change from the global model) and how many examples it trained on."""

    device: str
    num_samples: int
    delta: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class AggregateResult:
    """The aggregated delta (only tensors some included device holds), the
    devices included in order, and those dropped with the reason."""

    delta: dict[str, np.ndarray]
    included: tuple[str, ...]
    dropped: dict[str, str] = field(default_factory=dict)


class Aggregator:
    """Anything that turns an ordered list of updates into one delta."""

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregateResult:
        raise NotImplementedError


def _row_sum(matrix: np.ndarray) -> np.ndarray:
    """Sum of each row of a float64 matrix (pairwise, fixed order)."""
    return np.sum(np.ascontiguousarray(matrix, np.float64), axis=-1)


def update_norm(update: ClientUpdate) -> float:
    """L2 norm of the whole update, tensors in sorted name order."""
    if not update.delta:
        return 0.0
    flat = np.concatenate(
        [np.asarray(update.delta[n], np.float64).ravel() for n in sorted(update.delta)]
    )
    return float(np.sqrt(_row_sum(flat * flat)))


def _check(updates: Sequence[ClientUpdate]) -> None:
    if not updates:
        raise AggregationError("no updates to aggregate")
    seen = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for u in updates:
        if u.device in seen:
            raise AggregationError(f"device {u.device!r} appears twice")
        seen.add(u.device)
        if u.num_samples <= 0:
            raise AggregationError(f"device {u.device!r} claims {u.num_samples} samples")
        for name, value in u.delta.items():
            shape = np.shape(value)
            if shapes.setdefault(name, shape) != shape:
                raise AggregationError(f"tensor {name!r}: shapes {shapes[name]} and {shape}")
            if not np.all(np.isfinite(value)):
                raise AggregationError(f"device {u.device!r} sent a non-finite {name!r}")


class VectorRule(Aggregator):
    """A rule defined on an ordered stack of flat vectors (one per device);
    :meth:`aggregate` handles tiers by grouping tensors by their holders."""

    def combine(self, vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``vectors`` (m, p) float32 in committed order, ``weights`` (m,)
        sample counts -> one (p,) float32 vector."""
        raise NotImplementedError

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregateResult:
        _check(updates)
        groups: dict[tuple[int, ...], list[str]] = {}
        for name in sorted({n for u in updates for n in u.delta}):
            holders = tuple(i for i, u in enumerate(updates) if name in u.delta)
            groups.setdefault(holders, []).append(name)
        delta: dict[str, np.ndarray] = {}
        for holders, names in groups.items():
            vectors = np.stack(
                [
                    np.concatenate(
                        [np.asarray(updates[i].delta[n], np.float32).ravel() for n in names]
                    )
                    for i in holders
                ]
            )
            weights = np.array([updates[i].num_samples for i in holders], np.float64)
            combined = np.asarray(self.combine(vectors, weights), np.float32)
            offset = 0
            for n in names:
                shape = np.shape(updates[holders[0]].delta[n])
                size = int(np.prod(shape, dtype=np.int64))
                delta[n] = combined[offset : offset + size].reshape(shape)
                offset += size
        return AggregateResult(delta, tuple(u.device for u in updates))


def _ordered_weighted_mean(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    acc = np.zeros(vectors.shape[1], np.float64)
    total = 0.0
    for vector, weight in zip(vectors, weights, strict=True):
        acc += float(weight) * vector.astype(np.float64)
        total += float(weight)
    return (acc / total).astype(np.float32)


@dataclass(frozen=True)
class WeightedMean(VectorRule):
    """Mean of the deltas weighted by sample count (the paper's eq. 7, which
    prints the unweighted 1/m; ``weighted=False`` gives exactly that)."""

    weighted: bool = True

    def combine(self, vectors, weights):
        return _ordered_weighted_mean(vectors, weights if self.weighted else np.ones(len(vectors)))


@dataclass(frozen=True)
class CoordinateMedian(VectorRule):
    """Coordinate-wise median (Yin et al. 2018); even counts average the
    two middle values (in float64)."""

    def combine(self, vectors, weights):
        del weights
        ordered = np.sort(vectors.astype(np.float64), axis=0, kind="stable")
        m = len(ordered)
        if m % 2:
            return ordered[m // 2].astype(np.float32)
        return ((ordered[m // 2 - 1] + ordered[m // 2]) / 2.0).astype(np.float32)


@dataclass(frozen=True)
class TrimmedMean(VectorRule):
    """Coordinate-wise mean after dropping the ``trim`` fraction of largest
    and smallest values (floor(trim * m) each side; unweighted)."""

    trim: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {self.trim}")

    def combine(self, vectors, weights):
        del weights
        m = len(vectors)
        b = int(np.floor(self.trim * m))
        ordered = np.sort(vectors, axis=0, kind="stable")[b : m - b]
        return _ordered_weighted_mean(ordered, np.ones(len(ordered)))


@dataclass(frozen=True)
class Krum(VectorRule):
    """Krum (Blanchard et al. 2017): score each update by the sum of squared
    distances to its ``n - f - 2`` nearest others; keep the ``select`` best
    (ties: earlier position) and average them weighted by samples.
    ``select=1`` is Krum, more is Multi-Krum. Needs ``n > 2f + 2``."""

    byzantine: int = 1
    select: int = 1

    def __post_init__(self):
        if self.byzantine < 0 or self.select < 1:
            raise ConfigError("Krum needs byzantine >= 0 and select >= 1")

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        n = len(vectors)
        if n <= 2 * self.byzantine + 2:
            raise AggregationError(
                f"Krum with f={self.byzantine} needs more than {2 * self.byzantine + 2} "
                f"updates, got {n}"
            )
        v = vectors.astype(np.float64)
        distances = np.zeros((n, n), np.float64)
        for i in range(n):
            diff = v[i + 1 :] - v[i]
            row = _row_sum(diff * diff)
            distances[i, i + 1 :] = row
            distances[i + 1 :, i] = row
        nearest = n - self.byzantine - 2
        scores = np.empty(n, np.float64)
        for i in range(n):
            others = np.sort(np.delete(distances[i], i), kind="stable")[:nearest]
            total = 0.0
            for d in others:
                total += float(d)
            scores[i] = total
        return scores

    def chosen(self, vectors: np.ndarray) -> np.ndarray:
        """Positions of the selected updates, best first."""
        order = np.argsort(self.scores(vectors), kind="stable")
        return order[: min(self.select, len(vectors))]

    def combine(self, vectors, weights):
        keep = np.sort(self.chosen(vectors))
        return _ordered_weighted_mean(vectors[keep], weights[keep])


@dataclass(frozen=True)
class NormBound(Aggregator):
    """Drop updates whose L2 norm is implausible, then run ``inner``.

    Implausible is above ``max_norm`` (absolute), or above ``factor`` times
    the median norm of this round's updates (relative). Dropped updates are
    reported, never silently averaged in.
    """

    inner: Aggregator
    max_norm: float | None = None
    factor: float | None = None

    def __post_init__(self):
        if self.max_norm is None and self.factor is None:
            raise ConfigError("NormBound needs max_norm or factor")
        if (self.max_norm is not None and self.max_norm <= 0) or (
            self.factor is not None and self.factor <= 0
        ):
            raise ConfigError("NormBound bounds must be positive")

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregateResult:
        _check(updates)
        norms = [update_norm(u) for u in updates]
        bound = np.inf if self.max_norm is None else self.max_norm
        if self.factor is not None:
            bound = min(bound, self.factor * float(np.median(norms)))
        kept, dropped = [], {}
        for u, norm in zip(updates, norms, strict=True):
            if norm <= bound:
                kept.append(u)
            else:
                dropped[u.device] = f"norm {norm:.4g} above bound {bound:.4g}"
        if not kept:
            raise AggregationError(f"every update exceeded the norm bound {bound:.4g}")
        result = self.inner.aggregate(kept)
        return AggregateResult(result.delta, result.included, {**dropped, **result.dropped})


def apply_delta(
    params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``params + delta`` tensor by tensor in float32 (eq. 7); tensors no
    update touched are kept as they are."""
    out = {}
    for name, value in params.items():
        base = np.asarray(value, np.float32)
        out[name] = base + np.asarray(delta[name], np.float32) if name in delta else base.copy()
    unknown = set(delta) - set(params)
    if unknown:
        raise AggregationError(f"delta has tensors the model lacks: {sorted(unknown)}")
    return out
