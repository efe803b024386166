"""Canonical bytes of model parameters and the model hash.

The hash of the global model goes on chain (round-open transaction), so the
same parameters must give the same bytes on every run and machine. The
format fixes everything that could vary:

    magic  b"FCM1"
    u32    number of tensors
    per tensor, in sorted name order:
        u16 name length, name (UTF-8)
        u8  dtype code (1 = float32)
        u8  ndim, then ndim x u32 dims
        the values, float32 little-endian, C order

All integers are little-endian. Only float32 is allowed: a float64 array is
converted only if it round-trips exactly, else it is an error (silently
rounding would give two "identical" models different hashes).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np

from fedchain.learning.errors import PayloadError

__all__ = ["model_from_bytes", "model_hash", "model_to_bytes"]

_MAGIC = b"FCM1"
_FLOAT32 = 1


def _as_float32(name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == np.float32:
        return array
    converted = array.astype(np.float32)
    if not np.array_equal(converted.astype(array.dtype), array):
        raise PayloadError(f"tensor {name!r} of dtype {array.dtype} is not exactly float32")
    return converted


def model_to_bytes(params: Mapping[str, object]) -> bytes:
    """Canonical bytes of a flat ``name -> array`` mapping (see the module
    docstring); JAX arrays are fetched to the host."""
    parts = [_MAGIC, struct.pack("<I", len(params))]
    for name in sorted(params):
        array = _as_float32(name, params[name])
        encoded = name.encode("utf-8")
        if len(encoded) > 0xFFFF or array.ndim > 0xFF:
            raise PayloadError(f"tensor name or rank too large: {name!r}")
        parts.append(struct.pack("<H", len(encoded)) + encoded)
        parts.append(struct.pack(f"<BB{array.ndim}I", _FLOAT32, array.ndim, *array.shape))
        parts.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return b"".join(parts)


def model_hash(params: Mapping[str, object]) -> str:
    """Hex SHA-256 of :func:`model_to_bytes`."""
    return hashlib.sha256(model_to_bytes(params)).hexdigest()


def model_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Strict inverse of :func:`model_to_bytes`; raises :class:`PayloadError`
    on anything malformed or trailing."""
    view = memoryview(data)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise PayloadError("model bytes truncated")
        chunk = view[pos : pos + n]
        pos += n
        return chunk

    if bytes(take(4)) != _MAGIC:
        raise PayloadError("bad model magic")
    (count,) = struct.unpack("<I", take(4))
    params: dict[str, np.ndarray] = {}
    previous = None
    for _ in range(count):
        (length,) = struct.unpack("<H", take(2))
        try:
            name = bytes(take(length)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError("tensor name is not UTF-8") from exc
        if previous is not None and name <= previous:
            raise PayloadError("tensor names not in strictly sorted order")
        previous = name
        dtype, ndim = struct.unpack("<BB", take(2))
        if dtype != _FLOAT32:
            raise PayloadError(f"unknown dtype code {dtype}")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim))
        size = int(np.prod(shape, dtype=np.int64))
        params[name] = np.frombuffer(take(4 * size), "<f4").astype(np.float32).reshape(shape)
    if pos != len(view):
        raise PayloadError(f"{len(view) - pos} trailing bytes after the model")
    return params
