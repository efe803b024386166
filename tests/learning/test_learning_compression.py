from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.learning.compression import (
    SparseUpdate,
    TopKState,
    decode_sparse,
    decode_tensors,
    densify,
    encode_sparse,
    encode_tensors,
    sparsify,
    top_k,
    top_k_count,
)
from fedchain.learning.errors import ConfigError, PayloadError


def _tree(seed):
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(rng.normal(size=(7, 9)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=13), jnp.float32),
    }


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
def test_keeps_exactly_k_largest(density):
    tree = _tree(0)
    tx = top_k(density)
    sent, _ = tx.update(tree, tx.init(tree))
    flat = np.concatenate([np.ravel(tree["a"]), np.ravel(tree["b"])])
    out = np.concatenate([np.ravel(sent["a"]), np.ravel(sent["b"])])
    k = math.ceil(density * flat.size)
    assert top_k_count(flat.size, density) == k
    assert np.count_nonzero(out) == k
    kept = np.abs(flat[out != 0])
    assert kept.min() >= np.abs(flat[out == 0]).max(initial=0.0)
    np.testing.assert_array_equal(out[out != 0], flat[out != 0])


def test_error_feedback_conserves_the_mass_not_sent():
    tx = top_k(0.05)
    state = tx.init(_tree(0))
    total_in = jax.tree.map(jnp.zeros_like, _tree(0))
    total_sent = jax.tree.map(jnp.zeros_like, _tree(0))
    for r in range(6):
        update = _tree(r)
        before = state.residual
        sent, state = tx.update(update, state)
        # one round, exactly: sent + new residual == update + old residual
        for name in update:
            np.testing.assert_array_equal(
                np.asarray(sent[name] + state.residual[name]),
                np.asarray(update[name] + before[name]),
            )
        total_in = jax.tree.map(jnp.add, total_in, update)
        total_sent = jax.tree.map(jnp.add, total_sent, sent)
    for name in total_in:
        np.testing.assert_allclose(
            total_sent[name] + state.residual[name], total_in[name], rtol=1e-5, atol=1e-5
        )


def test_residual_gets_sent_eventually():
    tx = top_k(0.5)
    small = {"x": jnp.array([0.1, 5.0])}
    sent, state = tx.update(small, tx.init(small))
    assert np.asarray(sent["x"]).tolist() == [0.0, 5.0]
    sent, state = tx.update({"x": jnp.zeros(2)}, state)
    np.testing.assert_allclose(sent["x"], [0.1, 0.0])
    assert isinstance(state, TopKState)


def test_payload_roundtrip():
    vector = jnp.asarray(np.random.default_rng(3).normal(size=100), jnp.float32)
    idx, values = sparsify(vector, 10)
    payload = encode_sparse(SparseUpdate(idx, values, 100))
    assert len(payload) == 12 + 8 * 10
    back = decode_sparse(payload)
    np.testing.assert_array_equal(back.indices, np.asarray(idx))
    dense = densify(back)
    assert np.count_nonzero(dense) == 10
    np.testing.assert_array_equal(dense[np.asarray(idx)], np.asarray(values))


def test_tensor_payload_roundtrip_in_sorted_name_order():
    tree = _tree(4)
    tx = top_k(0.1)
    sent, _ = tx.update(tree, tx.init(tree))
    sent = {k: np.asarray(v) for k, v in sent.items()}
    payload = encode_tensors(sent)
    k = top_k_count(7 * 9 + 13, 0.1)
    assert len(payload) == 12 + 8 * k
    back = decode_tensors(payload, {"a": (7, 9), "b": (13,)})
    for name in sent:
        np.testing.assert_array_equal(back[name], sent[name])
    with pytest.raises(PayloadError):
        decode_tensors(payload, {"a": (7, 9)})


def test_payload_is_strict():
    good = encode_sparse(SparseUpdate(np.array([1, 4], np.uint32), np.ones(2, np.float32), 5))
    for bad in (good[:-1], good + b"\x00", b"NOPE" + good[4:]):
        with pytest.raises(PayloadError):
            decode_sparse(bad)
    with pytest.raises(PayloadError):
        encode_sparse(SparseUpdate(np.array([4, 1], np.uint32), np.ones(2, np.float32), 5))
    with pytest.raises(PayloadError):
        encode_sparse(SparseUpdate(np.array([1, 9], np.uint32), np.ones(2, np.float32), 5))
    with pytest.raises(ConfigError):
        top_k(0.0)
    with pytest.raises(PayloadError):
        encode_sparse(SparseUpdate(np.array([-1, 3]), np.ones(2, np.float32), 5))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_values_are_refused_both_ways(value):
    """A NaN from one peer would poison every aggregate it joins (1e39 is
    infinite once cast to the payload's float32)."""
    values = np.array([1.0, value])
    with pytest.raises(PayloadError):
        encode_sparse(SparseUpdate(np.array([1, 4], np.uint32), values, 5))
    good = encode_sparse(SparseUpdate(np.array([1, 4], np.uint32), np.ones(2, np.float32), 5))
    with np.errstate(over="ignore"):
        bad = good[:-4] + np.array([value], "<f4").tobytes()
    with pytest.raises(PayloadError):
        decode_sparse(bad)


@st.composite
def _sparse_updates(draw):
    size = draw(st.integers(0, 300))
    indices = sorted(draw(st.sets(st.integers(0, max(size - 1, 0)), max_size=size)))
    floats = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    values = draw(st.lists(floats, min_size=len(indices), max_size=len(indices)))
    return SparseUpdate(np.array(indices, np.uint32), np.array(values, np.float32), size)


@settings(max_examples=200, deadline=None)
@given(_sparse_updates())
def test_property_sparse_payload_roundtrip(update):
    back = decode_sparse(encode_sparse(update))
    assert back.size == update.size
    np.testing.assert_array_equal(back.indices, update.indices)
    np.testing.assert_array_equal(back.values, update.values)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=120), st.binary(max_size=80).map(lambda b: b"FCS1" + b)))
def test_property_any_bytes_decode_or_raise_payload_error(payload):
    try:
        update = decode_sparse(payload)
    except PayloadError:
        return
    assert encode_sparse(update) == payload  # what decodes is canonical


@settings(max_examples=300, deadline=None)
@given(_sparse_updates(), st.data())
def test_property_a_changed_byte_is_refused_or_changes_the_update(update, data):
    payload = bytearray(encode_sparse(update))
    index = data.draw(st.integers(0, len(payload) - 1))
    payload[index] ^= data.draw(st.integers(1, 255))
    try:
        back = decode_sparse(bytes(payload))
    except PayloadError:
        return
    assert encode_sparse(back) == bytes(payload) != encode_sparse(update)
