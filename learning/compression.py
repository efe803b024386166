"""Top-k sparsification with error feedback, and its wire payload.

Top-k runs AFTER the Gaussian noise (DESIGN.md): it is then post-processing
of a private quantity, so which indices are sent leaks nothing more. What is
not sent is not lost: it stays in a residual that is added to the next
round's update (error feedback, Stich et al. 2018), so ``sent + residual``
always equals ``update + previous residual`` exactly.

``k = ceil(density * size)`` over the whole flattened update (all tensors
together, as the paper sorts "the absolute value of the parameters"), so
exactly ``k`` indices are chosen; ties go to the lower index.

The payload (:func:`encode_sparse` / :func:`decode_sparse`) sends indices and
values: magic ``FCS1``, the dense size, ``k``, then ``k`` little-endian
uint32 indices (ascending) and ``k`` little-endian float32 values. Values
are finite: one NaN or infinity from a peer would poison every aggregate it
joins, so both ends refuse it (:class:`PayloadError`).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from fedchain.learning.errors import ConfigError, PayloadError

__all__ = [
    "SparseUpdate",
    "TopKState",
    "decode_sparse",
    "decode_tensors",
    "densify",
    "encode_sparse",
    "encode_tensors",
    "sparsify",
    "top_k",
    "top_k_count",
]

_MAGIC = b"FCS1"
_HEADER = struct.Struct("<4sII")


def top_k_count(size: int, density: float) -> int:
    """How many entries top-k keeps: ``ceil(density * size)``, at least 1."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    return max(1, min(size, math.ceil(density * size)))


class SparseUpdate(NamedTuple):
    """``k`` flat indices (ascending, uint32) and their values (float32) of a
    dense vector of ``size`` entries."""

    indices: jax.Array | np.ndarray
    values: jax.Array | np.ndarray
    size: int


def sparsify(vector: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Indices (ascending) and values of the ``k`` largest-magnitude entries
    of a flat vector. Traceable; ``k`` is static."""
    _, idx = jax.lax.top_k(jnp.abs(vector), k)
    idx = jnp.sort(idx)
    return idx.astype(jnp.uint32), vector[idx]


def densify(update: SparseUpdate) -> np.ndarray:
    """The dense float32 vector a sparse update stands for."""
    dense = np.zeros(update.size, np.float32)
    dense[np.asarray(update.indices, np.int64)] = np.asarray(update.values, np.float32)
    return dense


class TopKState(NamedTuple):
    """The residual not yet sent (same tree as the updates)."""

    residual: optax.Updates


def top_k(density: float) -> optax.GradientTransformation:
    """Keep the top ``k`` entries (by magnitude) of ``updates + residual``
    across all leaves, zero the rest, and carry the rest as the residual."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")

    def init(params):
        return TopKState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        total = jax.tree.map(jnp.add, updates, state.residual)
        flat, unravel = ravel_pytree(total)
        k = top_k_count(flat.size, density)
        idx, values = sparsify(flat, k)
        sent = jnp.zeros_like(flat).at[idx].set(values)
        return unravel(sent), TopKState(unravel(flat - sent))

    return optax.GradientTransformation(init, update)


def encode_sparse(update: SparseUpdate) -> bytes:
    """The payload bytes of a sparse update (see the module docstring)."""
    indices = np.asarray(update.indices)
    values = np.asarray(update.values)
    k = len(indices)
    if indices.shape != (k,) or values.shape != (k,):
        raise PayloadError(f"indices {indices.shape} and values {values.shape} must be (k,)")
    if not 0 <= update.size < 2**32:
        raise PayloadError(f"a dense size of {update.size} does not fit the payload")
    if k and (
        int(indices.min()) < 0
        or int(indices.max()) >= update.size
        or np.any(np.diff(indices.astype(np.int64)) <= 0)
    ):
        raise PayloadError("indices must be strictly ascending, from 0 and below size")
    with np.errstate(over="ignore"):  # a float64 past float32's range: refused below
        wire_values = values.astype("<f4")
    if not np.all(np.isfinite(wire_values)):
        raise PayloadError("values must be finite in float32")
    return (
        _HEADER.pack(_MAGIC, update.size, k)
        + indices.astype("<u4").tobytes()
        + wire_values.tobytes()
    )


def decode_sparse(payload: bytes) -> SparseUpdate:
    """Strict inverse of :func:`encode_sparse`; raises :class:`PayloadError`."""
    if len(payload) < _HEADER.size:
        raise PayloadError("sparse payload shorter than its header")
    magic, size, k = _HEADER.unpack_from(payload)
    if magic != _MAGIC:
        raise PayloadError(f"bad sparse payload magic {magic!r}")
    if len(payload) != _HEADER.size + 8 * k or k > size:
        raise PayloadError(f"sparse payload of {len(payload)} bytes does not hold k={k}")
    indices = np.frombuffer(payload, "<u4", k, _HEADER.size).astype(np.uint32)
    values = np.frombuffer(payload, "<f4", k, _HEADER.size + 4 * k).astype(np.float32)
    if k and (int(indices.max()) >= size or np.any(np.diff(indices.astype(np.int64)) <= 0)):
        raise PayloadError("sparse payload indices not strictly ascending or out of range")
    if not np.all(np.isfinite(values)):
        raise PayloadError("sparse payload values must be finite")
    return SparseUpdate(indices, values, size)


def encode_tensors(tensors) -> bytes:
    """The sparse payload of a ``name -> array`` update: its non-zero entries
    in the flat order of the sorted names (the order ``ravel_pytree`` uses
    for a dict), so a top-k update costs 8 bytes per kept entry."""
    flat = np.concatenate(
        [np.asarray(tensors[name], np.float32).ravel() for name in sorted(tensors)]
    )
    indices = np.flatnonzero(flat).astype(np.uint32)
    return encode_sparse(SparseUpdate(indices, flat[indices], flat.size))


def decode_tensors(payload: bytes, shapes) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_tensors` given ``name -> shape`` of the
    sender's tier; the payload's size must match those shapes exactly."""
    update = decode_sparse(payload)
    sizes = {name: math.prod(shapes[name]) for name in sorted(shapes)}
    if update.size != sum(sizes.values()):
        raise PayloadError(f"payload holds {update.size} entries, the shapes {sum(sizes.values())}")
    dense = densify(update)
    out, offset = {}, 0
    for name, size in sizes.items():
        out[name] = dense[offset : offset + size].reshape(shapes[name])
        offset += size
    return out
