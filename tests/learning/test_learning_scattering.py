"""Scattering features and the linear model on them (learning/scattering.py).

The properties that make scattering features worth having are checked on
real MNIST digits: wavelets see no constant, the low-pass keeps it, a
one-pixel shift moves the features far less than it moves the pixels, and
a linear model on them learns under DP inside the federated round.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from fedchain.learning import partition
from fedchain.learning.accountant import PrivacyAccountant
from fedchain.learning.aggregation import WeightedMean
from fedchain.learning.errors import ConfigError
from fedchain.learning.federated import Device, Federation
from fedchain.learning.local import LocalConfig
from fedchain.learning.models import LinearSpec, apply, init_params, param_shapes, tier_spec
from fedchain.learning.scattering import CHANNELS, filter_bank, scatter_images


@pytest.fixture(scope="module")
def digits(small_mnist) -> np.ndarray:
    return small_mnist.train_images[:40]


@pytest.fixture(scope="module")
def features(digits) -> np.ndarray:
    return scatter_images(digits, chunk=16)


def test_features_are_81_channels_of_7x7_per_image(digits, features):
    assert features.shape == (len(digits), CHANNELS, 7, 7) == (40, 81, 7, 7)
    assert features.dtype == np.float32 and np.all(np.isfinite(features))
    # per image: the chunk an image falls in (and its padding) changes nothing
    np.testing.assert_allclose(scatter_images(digits[5:6], chunk=4)[0], features[5], atol=1e-5)


def test_the_low_pass_keeps_a_constant_and_the_wavelets_see_none():
    flat = np.full((2, 28, 28), 0.7, np.float32)  # floats: taken as normalized
    out = scatter_images(flat, chunk=2)
    np.testing.assert_allclose(out[:, 0], 0.7, atol=1e-5)
    assert np.max(np.abs(out[:, 1:])) < 1e-4
    psi, phi = filter_bank()
    assert phi[0, 0] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(psi[..., 0, 0], 0.0, atol=1e-6)


def test_a_one_pixel_shift_moves_the_features_less_than_the_pixels(digits, features):
    """Orders 1 and 2 (the wavelet channels: no constant part to flatter
    the ratio) change by about half as much as the pixels do."""
    pixels = digits.astype(np.float32).reshape(40, -1)
    shifted = np.roll(digits, 1, axis=2)  # MNIST borders are blank: a clean shift
    pixel_change = np.linalg.norm(shifted.reshape(40, -1) - pixels, axis=1) / np.linalg.norm(
        pixels, axis=1
    )
    waves = features[:, 1:].reshape(40, -1)
    moved = scatter_images(shifted, chunk=16)[:, 1:].reshape(40, -1)
    feature_change = np.linalg.norm(moved - waves, axis=1) / np.linalg.norm(waves, axis=1)
    assert np.all(feature_change < pixel_change)
    assert np.median(feature_change / pixel_change) < 0.75, feature_change / pixel_change


def test_scattering_refuses_images_of_another_shape():
    with pytest.raises(ConfigError, match="28, 28"):
        scatter_images(np.zeros((3, 32, 32), np.uint8))


def test_linear_spec_has_one_tier_and_starts_at_zero():
    spec = LinearSpec()
    assert tier_spec(2, spec) is spec and spec.tier == 0
    assert param_shapes(spec) == {"linear/w": (81 * 49, 10), "linear/b": (10,)}
    params = init_params(jax.random.key(0), spec)
    assert all(not np.any(np.asarray(v)) for v in params.values())
    with pytest.raises(ConfigError, match="groups"):
        LinearSpec(groups=4)


def test_group_normalization_removes_each_groups_offset(features):
    """Each example is normalized per group of channels on its own (no data
    statistics, so no privacy spent): a constant added to any group of one
    example's features leaves its logits as they were."""
    spec = LinearSpec()
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in param_shapes(spec).items()}
    offsets = np.repeat(rng.normal(size=spec.groups), CHANNELS // spec.groups).astype(np.float32)
    shifted = features[0] + offsets[:, None, None]
    np.testing.assert_allclose(
        apply(params, shifted, spec), apply(params, features[0], spec), rtol=1e-3, atol=1e-2
    )
    assert not np.allclose(apply(params, features[1], spec), apply(params, features[0], spec))


def test_a_linear_model_on_scattering_features_learns_under_dp_in_rounds(small_mnist):
    """Four devices, DP-SGD with real noise, two rounds: far above chance on
    held-out digits, and the accountant saw every step."""
    data = dataclasses.replace(
        small_mnist,
        train_images=scatter_images(small_mnist.train_images),
        test_images=scatter_images(small_mnist.test_images),
    )
    parts = partition.iid(len(data.train_labels), 4, 3)
    devices = [Device(f"dev{i}", 0, p) for i, p in enumerate(parts)]
    config = LocalConfig(steps=5, batch_size=64, clip_norm=1.0)
    fed = Federation(data, devices, config, base=LinearSpec(), aggregator=WeightedMean())
    accountant = PrivacyAccountant(1e-5, "pld")
    state = fed.init(jax.random.key(0))
    for r in range(2):
        state, _ = fed.round(
            state,
            jax.random.key(r + 1),
            learning_rate=1.0,
            noise_multipliers=1.0,
            accountant=accountant,
        )
    assert fed.accuracy(state.params) > 0.7
    assert {s.steps for s in accountant.report().values()} == {10}
