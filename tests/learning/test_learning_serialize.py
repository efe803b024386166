from __future__ import annotations

import hashlib
import struct

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from fedchain.learning.errors import PayloadError
from fedchain.learning.models import init_params, tier_spec
from fedchain.learning.serialize import model_from_bytes, model_hash, model_to_bytes


def test_roundtrip_and_order_independence(base_spec):
    params = init_params(jax.random.key(0), tier_spec(1, base_spec))
    data = model_to_bytes(params)
    back = model_from_bytes(data)
    assert list(back) == sorted(params)
    for name in params:
        np.testing.assert_array_equal(back[name], np.asarray(params[name]))
    reversed_order = dict(reversed(list(params.items())))
    assert model_hash(reversed_order) == model_hash(params) == hashlib.sha256(data).hexdigest()


def test_known_bytes():
    # The format is frozen: this is what every machine must produce.
    data = model_to_bytes({"b": np.array([1.0], np.float32), "a": np.zeros((1, 2), np.float32)})
    expected = (
        b"FCM1"
        + struct.pack("<I", 2)
        + struct.pack("<H", 1)
        + b"a"
        + struct.pack("<BBII", 1, 2, 1, 2)
        + b"\x00" * 8
        + struct.pack("<H", 1)
        + b"b"
        + struct.pack("<BBI", 1, 1, 1)
        + struct.pack("<f", 1.0)
    )
    assert data == expected


@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=4)))
@settings(max_examples=30, deadline=None)
def test_roundtrip_any_float32(array):
    back = model_from_bytes(model_to_bytes({"x": array}))["x"]
    assert back.tobytes() == np.ascontiguousarray(array).tobytes()


def test_strict_decoding():
    data = model_to_bytes({"a": np.ones(3, np.float32)})
    for bad in (data[:-1], data + b"\x00", b"XXXX" + data[4:]):
        with pytest.raises(PayloadError):
            model_from_bytes(bad)
    with pytest.raises(PayloadError):
        model_to_bytes({"a": np.array([0.1], np.float64)})  # not exactly float32
    assert model_from_bytes(model_to_bytes({"a": np.array([0.5], np.float64)}))["a"][0] == 0.5
