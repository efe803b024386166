from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedchain.learning import partition
from fedchain.learning.compression import top_k_count
from fedchain.learning.errors import ConfigError
from fedchain.learning.local import (
    LocalConfig,
    _sample,
    accuracy,
    make_evaluator,
    make_local_round,
    pad_devices,
    zero_residual,
)
from fedchain.learning.models import init_params, param_shapes

DP = LocalConfig(steps=8, batch_size=32, clip_norm=1.0, density=0.1, sampling="poisson")
PLAIN = LocalConfig(steps=8, batch_size=32, clip_norm=None, sampling="fixed")


@pytest.fixture(scope="module")
def setup(small_mnist, base_spec):
    parts = partition.iid(len(small_mnist.train_labels), 4, 0, size_concentration=5.0, min_size=200)
    data = pad_devices(small_mnist.train_images, small_mnist.train_labels, parts)
    params = init_params(jax.random.key(0), base_spec)
    evaluate = make_evaluator(base_spec)
    return data, parts, params, evaluate


@pytest.fixture(scope="module")
def dp_round(base_spec):
    return make_local_round(base_spec, DP)


@pytest.fixture(scope="module")
def plain_round(base_spec):
    return make_local_round(base_spec, PLAIN)


def _fedavg(round_fn, setup, spec, rounds, lr, z):
    data, parts, params, _ = setup
    sizes = np.array([len(p) for p in parts], np.float32)
    residual = zero_residual(spec, 4)
    params = dict(params)
    for r in range(rounds):
        out = round_fn(
            params, data, jax.random.split(jax.random.key(r), 4), jnp.full(4, z), lr, residual
        )
        residual = out.residual
        params = {
            k: v + jnp.tensordot(sizes / sizes.sum(), out.updates[k], axes=1)
            for k, v in params.items()
        }
    return params, out


def test_private_round_learns_and_never_recompiles(dp_round, setup, small_mnist, base_spec):
    params, out = _fedavg(dp_round, setup, base_spec, rounds=5, lr=2.0, z=0.3)
    assert dp_round._cache_size() == 1  # five rounds, new keys, noise, rates: one compile
    acc = accuracy(setup[3], params, small_mnist.test_images, small_mnist.test_labels)
    assert acc > 0.4, acc  # chance is 0.1
    assert np.all(np.isfinite(np.asarray(out.loss)))


def test_private_round_payload_is_top_k(dp_round, setup, base_spec):
    data, _, params, _ = setup
    out = dp_round(
        params,
        data,
        jax.random.split(jax.random.key(9), 4),
        jnp.ones(4),
        1.0,
        zero_residual(base_spec, 4),
    )
    size = sum(int(np.prod(s)) for s in param_shapes(base_spec).values())
    k = top_k_count(size, DP.density)
    assert out.indices.shape == (4, k) and out.values.shape == (4, k)
    for d in range(4):
        flat = np.concatenate([np.ravel(out.updates[n][d]) for n in sorted(out.updates)])
        dense = np.zeros(size, np.float32)
        dense[np.asarray(out.indices[d], np.int64)] = np.asarray(out.values[d])
        # the same vector in the model's flattening order (ravel_pytree sorts names)
        np.testing.assert_array_equal(dense, flat)
        assert np.count_nonzero(flat) <= k
        assert np.any(np.asarray(out.residual["fc1/w"][d]) != 0)  # what was not sent is kept


def test_plain_round_learns(plain_round, setup, small_mnist, base_spec):
    params, _ = _fedavg(plain_round, setup, base_spec, rounds=4, lr=0.3, z=0.0)
    acc = accuracy(setup[3], params, small_mnist.test_images, small_mnist.test_labels)
    assert acc > 0.6, acc
    assert plain_round._cache_size() == 1


def test_poisson_sampling_is_uniform_and_stays_in_bounds():
    config = LocalConfig(batch_size=20, sampling="poisson")
    count, n_max = jnp.int32(150), 300
    draw = jax.jit(jax.vmap(lambda k: _sample(k, count, n_max, config)))
    idx, mask, batch, truncated = draw(jax.random.split(jax.random.key(0), 4000))
    sizes = np.asarray(mask).sum(axis=1)
    # Binomial(150, 20/150): mean 20, sd 4.16; the mean of 4000 draws is 20 +- 0.07
    q = 20 / 150
    assert abs(sizes.mean() - 20) < 0.25
    assert sizes.std() == pytest.approx(np.sqrt(150 * q * (1 - q)), rel=0.05)
    chosen = np.asarray(idx)[np.asarray(mask)]
    assert chosen.max() < 150  # never a padding row
    counts = np.bincount(chosen, minlength=150)
    assert counts.min() > 0.6 * counts.mean()  # every real example gets picked
    for row, m in zip(np.asarray(idx), np.asarray(mask), strict=True):
        assert len(set(row[m].tolist())) == m.sum()  # distinct within a batch
    assert float(batch[0]) == 20.0 and int(np.sum(truncated)) <= 5


def test_fixed_sampling_draws_exactly_the_batch():
    config = LocalConfig(batch_size=8, sampling="fixed")
    idx, mask, _, truncated = _sample(jax.random.key(1), jnp.int32(50), 64, config)
    assert int(mask.sum()) == 8 and int(np.asarray(idx).max()) < 50 and not bool(truncated)


def test_config_checks_and_accounting_events():
    with pytest.raises(ConfigError):
        LocalConfig(sampling="shuffle")
    with pytest.raises(ConfigError):
        LocalConfig(density=0.0)
    with pytest.raises(ConfigError):
        LocalConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError):
        LocalConfig(optimizer="adam", momentum=0.9)  # adam brings its own
    assert LocalConfig(optimizer="adam").optimizer == "adam"
    event = DP.dp_steps(1.1, 500)
    assert event.sampling_rate == pytest.approx(32 / 500)
    assert event.capacity == DP.physical_batch == 32 + 17
    assert PLAIN.dp_steps(1.0, 500).capacity is None
