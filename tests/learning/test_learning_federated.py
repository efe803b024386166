from __future__ import annotations

import jax
import numpy as np
import pytest

from fedchain.learning import partition
from fedchain.learning.accountant import PrivacyAccountant
from fedchain.learning.aggregation import ClientUpdate, NormBound, WeightedMean
from fedchain.learning.errors import ConfigError
from fedchain.learning.federated import Device, Federation
from fedchain.learning.local import LocalConfig
from fedchain.learning.models import param_shapes, tier_spec
from fedchain.learning.serialize import model_hash

CONFIG = LocalConfig(steps=6, batch_size=32, clip_norm=1.0, density=0.2)


@pytest.fixture(scope="module")
def run(small_mnist, base_spec):
    parts = partition.iid(len(small_mnist.train_labels), 6, 1)
    devices = [Device(f"dev{i}", 0 if i < 2 else 2, p) for i, p in enumerate(parts)]
    fed = Federation(
        small_mnist,
        devices,
        CONFIG,
        base=base_spec,
        aggregator=NormBound(WeightedMean(), factor=5.0),
    )
    accountant = PrivacyAccountant(1e-5, "pld")
    state = fed.init(jax.random.key(0))
    history = [(state, None)]
    for r in range(4):
        state, report = fed.round(
            state,
            jax.random.key(r + 1),
            learning_rate=2.0,
            noise_multipliers=0.3,
            accountant=accountant,
        )
        history.append((state, report))
    return fed, accountant, history


def test_global_model_is_the_deepest_tier(run, base_spec):
    _, _, history = run
    state = history[-1][0]
    assert set(state.params) == set(param_shapes(tier_spec(2, base_spec)))
    assert state.round == 4


def test_blocks_move_only_by_deep_devices(run):
    fed, _, history = run
    report = history[1][1]
    assert report.result.included == tuple(d.id for d in fed.devices)
    before, after = history[0][0].params, history[1][0].params
    assert np.any(before["block1/w"] != after["block1/w"])


def test_learns_under_dp_and_accounts_every_step(run):
    fed, accountant, history = run
    final = history[-1][0].params
    assert fed.accuracy(final) > 0.3  # chance is 0.1
    assert fed.accuracy(final, tier=0) > 0.3  # the phones' view of the same model
    spent = accountant.report()
    assert set(spent) == {d.id for d in fed.devices}
    assert all(s.steps == 4 * CONFIG.steps and s.epsilon > 0 for s in spent.values())
    assert all(fed._rounds[t]._cache_size() == 1 for t in fed.tiers)  # no recompiles


def test_aggregation_gives_identical_bytes_from_the_same_updates(run):
    fed, _, history = run
    state = history[-1][0]
    updates, *_ = fed.local_updates(state, jax.random.key(99), learning_rate=1.0)
    copies = [
        ClientUpdate(u.device, u.num_samples, {k: v.copy() for k, v in u.delta.items()})
        for u in updates
    ]
    a = fed.aggregator.aggregate(updates)
    b = fed.aggregator.aggregate(copies)
    assert model_hash(a.delta) == model_hash(b.delta)


def test_a_poisoned_update_is_dropped(run):
    fed, _, history = run
    state = history[-1][0]

    def poison(updates):
        bad = updates[3]
        return [
            *updates[:3],
            ClientUpdate(bad.device, bad.num_samples, {k: v * 1e4 for k, v in bad.delta.items()}),
            *updates[4:],
        ]

    _, report = fed.round(state, jax.random.key(5), learning_rate=1.0, transform=poison)
    assert list(report.result.dropped) == ["dev3"]


def test_a_diverged_device_is_left_out_and_the_round_goes_on(run):
    """A device whose update is not finite (it diverged, or lies) is dropped
    with its reason; the others' round still lands, finite."""
    fed, _, history = run
    state = history[-1][0]

    def diverge(updates):
        bad = updates[4]
        nan = {k: np.full_like(v, np.nan) for k, v in bad.delta.items()}
        return [*updates[:4], ClientUpdate(bad.device, bad.num_samples, nan), *updates[5:]]

    new_state, report = fed.round(state, jax.random.key(6), learning_rate=1.0, transform=diverge)
    assert report.result.dropped == {"dev4": "non-finite update"}
    assert "dev4" not in report.result.included
    assert all(np.all(np.isfinite(v)) for v in new_state.params.values())


def test_device_ids_must_be_unique(small_mnist):
    with pytest.raises(ConfigError):
        Federation(small_mnist, [Device("a", 0, np.arange(5))] * 2, CONFIG)


def test_server_learning_rate_scales_the_aggregated_delta(run):
    fed, _, history = run
    state = history[-1][0]
    key = jax.random.key(7)
    plain, _ = fed.round(state, key, learning_rate=1.0)
    scaled, _ = fed.round(state, key, learning_rate=1.0, server_learning_rate=3.0)
    for name, before in state.params.items():
        np.testing.assert_allclose(
            scaled.params[name] - before, 3.0 * (plain.params[name] - before), atol=1e-5
        )
    with pytest.raises(ConfigError):
        fed.round(state, key, learning_rate=1.0, server_learning_rate=0.0)
