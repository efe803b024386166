from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedchain.learning.errors import ConfigError
from fedchain.learning.privacy import (
    PAPER_CLIP_NORM,
    add_gaussian_noise,
    clip_examples,
    clip_per_example,
    normalize_by_batch,
    paper_learning_rate,
    per_example_norms,
)


def _per_example(seed=0, batch=16):
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.01, 5.0, batch)
    return {
        "w": jnp.asarray(rng.normal(size=(batch, 4, 3)) * scales[:, None, None], jnp.float32),
        "b": jnp.asarray(rng.normal(size=(batch, 3)) * scales[:, None], jnp.float32),
    }


def test_clipping_bounds_every_example_and_matches_eq3():
    grads = _per_example()
    clipped, norms = clip_examples(grads, 1.0)
    after = per_example_norms(clipped)
    assert np.all(np.asarray(after) <= 1.0 + 1e-5)
    for i, n in enumerate(np.asarray(norms)):
        factor = 1.0 / max(1.0, n / 1.0)  # eq. 3
        np.testing.assert_allclose(clipped["w"][i], grads["w"][i] * factor, rtol=1e-5)


def test_zero_rows_stay_zero():
    grads = {"w": jnp.zeros((3, 5))}
    summed, _ = clip_per_example(0.5).update(grads, optax.EmptyState())
    assert not np.any(np.isnan(summed["w"])) and np.all(summed["w"] == 0)


def test_no_noise_and_infinite_clip_give_the_plain_mean():
    grads = _per_example(batch=8)
    tx = optax.chain(
        clip_per_example(1e9),
        add_gaussian_noise(0.0, 1e9, jax.random.key(0)),
        normalize_by_batch(8),
    )
    out, _ = tx.update(grads, tx.init({"w": grads["w"][0], "b": grads["b"][0]}))
    np.testing.assert_allclose(out["w"], jnp.mean(grads["w"], axis=0), rtol=1e-5)
    np.testing.assert_allclose(out["b"], jnp.mean(grads["b"], axis=0), rtol=1e-5)


def test_noise_has_std_multiplier_times_clip():
    zeros = {"w": jnp.zeros((400, 500)), "b": jnp.zeros(1000)}
    tx = add_gaussian_noise(1.3, 0.5, jax.random.key(42))
    out, state = tx.update(zeros, tx.init(zeros))
    sample = np.concatenate([np.ravel(out["w"]), np.ravel(out["b"])])
    # 201,000 draws: the standard deviation is within 1% of 0.65 (about 6
    # standard errors), the mean within 0.01.
    assert abs(sample.std() / 0.65 - 1) < 0.01
    assert abs(sample.mean()) < 0.01
    again, _ = tx.update(zeros, state)
    assert not np.allclose(again["w"], out["w"])  # the key moved on


def test_dp_step_is_a_chain_with_sgd():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    grads = _per_example(batch=4)
    tx = optax.chain(
        clip_per_example(1.0),
        add_gaussian_noise(1.0, 1.0, jax.random.key(0)),
        normalize_by_batch(4),
        optax.sgd(0.1),
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert updates["w"].shape == (4, 3)


def test_paper_clip_needs_a_rate_scaled_by_one_over_s():
    assert PAPER_CLIP_NORM == 0.01 and paper_learning_rate() == pytest.approx(200.0)
    grads = {"w": jnp.full((2, 10), 3.0)}  # every example's norm is far above both clips

    def step(clip, lr):
        tx = optax.chain(clip_per_example(clip), normalize_by_batch(2), optax.sgd(lr))
        return tx.update(grads, tx.init({"w": jnp.zeros(10)}))[0]["w"]

    np.testing.assert_allclose(
        step(0.01, paper_learning_rate(0.01)), step(1.0, paper_learning_rate(1.0)), rtol=1e-5
    )


def test_bad_hyperparameters():
    with pytest.raises(ConfigError):
        clip_per_example(0.0)
    with pytest.raises(ConfigError):
        add_gaussian_noise(-1.0, 1.0, jax.random.key(0))
    with pytest.raises(ConfigError):
        normalize_by_batch(0)
