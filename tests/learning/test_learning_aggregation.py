from __future__ import annotations

import numpy as np
import pytest

from fedchain.learning.aggregation import (
    ClientUpdate,
    CoordinateMedian,
    Krum,
    NormBound,
    TrimmedMean,
    WeightedMean,
    apply_delta,
    update_norm,
)
from fedchain.learning.errors import AggregationError, ConfigError
from fedchain.learning.serialize import model_to_bytes

RULES = [
    WeightedMean(),
    WeightedMean(weighted=False),
    CoordinateMedian(),
    TrimmedMean(0.2),
    Krum(byzantine=1),
    Krum(byzantine=1, select=3),
    NormBound(WeightedMean(), factor=3.0),
]


def _updates(n=7, seed=0, shapes=None):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"a": (3, 4), "b": (5,)}
    return [
        ClientUpdate(
            f"d{i}",
            int(rng.integers(10, 100)),
            {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()},
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r)[:40])
def test_conformance_identical_updates_give_that_update(rule):
    one = _updates(1)[0]
    same = [ClientUpdate(f"d{i}", 10 + i, one.delta) for i in range(7)]
    result = rule.aggregate(same)
    for name, value in one.delta.items():
        np.testing.assert_allclose(result.delta[name], value, rtol=1e-6, atol=1e-7)
        assert result.delta[name].dtype == np.float32


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r)[:40])
def test_conformance_deterministic_bytes(rule):
    a = model_to_bytes(rule.aggregate(_updates(seed=3)).delta)
    b = model_to_bytes(rule.aggregate(_updates(seed=3)).delta)
    assert a == b


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r)[:40])
def test_conformance_tiers_average_over_holders(rule):
    shallow = _updates(7, seed=1, shapes={"a": (2, 2)})
    deep = _updates(7, seed=2, shapes={"a": (2, 2), "block": (3,)})
    deep = [ClientUpdate(f"x{i}", u.num_samples, u.delta) for i, u in enumerate(deep)]
    result = rule.aggregate(shallow + deep)
    assert set(result.delta) == {"a", "block"}
    # 'block' is held by the deep devices only: it is aggregated over them alone
    alone = rule.aggregate(
        [ClientUpdate(u.device, u.num_samples, {"block": u.delta["block"]}) for u in deep]
    )
    if not isinstance(rule, NormBound):  # its median bound differs on the two lists
        np.testing.assert_array_equal(result.delta["block"], alone.delta["block"])


@pytest.mark.parametrize("rule", RULES, ids=lambda r: repr(r)[:40])
def test_conformance_rejects_bad_input(rule):
    with pytest.raises(AggregationError):
        rule.aggregate([])
    ups = _updates(7)
    bad = ClientUpdate("bad", 5, {"a": np.full((3, 4), np.nan, np.float32), "b": ups[0].delta["b"]})
    with pytest.raises(AggregationError):
        rule.aggregate([*ups, bad])
    with pytest.raises(AggregationError):
        rule.aggregate([*ups, ups[0]])


def test_weighted_mean_is_eq7_with_sample_weights():
    ups = _updates(4)
    result = WeightedMean().aggregate(ups)
    weights = np.array([u.num_samples for u in ups], np.float64)
    expected = sum(w * u.delta["a"].astype(np.float64) for w, u in zip(weights, ups, strict=True))
    np.testing.assert_allclose(result.delta["a"], expected / weights.sum(), rtol=1e-6)
    plain = WeightedMean(weighted=False).aggregate(ups)
    np.testing.assert_allclose(plain.delta["b"], np.mean([u.delta["b"] for u in ups], 0), rtol=1e-6)


def test_median_and_trimmed_mean_closed_form():
    values = [1.0, 2.0, 100.0, 3.0, -50.0]
    ups = [ClientUpdate(f"d{i}", 1, {"x": np.array([v], np.float32)}) for i, v in enumerate(values)]
    assert CoordinateMedian().aggregate(ups).delta["x"][0] == 2.0
    assert CoordinateMedian().aggregate(ups[:4]).delta["x"][0] == 2.5
    assert TrimmedMean(0.2).aggregate(ups).delta["x"][0] == pytest.approx(2.0)


def test_krum_ignores_an_outlier():
    rng = np.random.default_rng(0)
    honest = [
        ClientUpdate(f"h{i}", 10, {"x": (1.0 + 0.01 * rng.normal(size=20)).astype(np.float32)})
        for i in range(6)
    ]
    evil = ClientUpdate("evil", 1000, {"x": np.full(20, 50.0, np.float32)})
    for rule in (Krum(1), Krum(1, select=4)):
        out = rule.aggregate([*honest[:3], evil, *honest[3:]]).delta["x"]
        assert np.all(np.abs(out - 1.0) < 0.05)
    assert 3 not in Krum(1, select=5).chosen(
        np.stack([u.delta["x"] for u in [*honest[:3], evil, *honest[3:]]])
    )
    with pytest.raises(AggregationError, match="Krum"):
        Krum(2).aggregate(honest[:6])


def test_norm_bound_drops_and_says_so():
    ups = _updates(5)
    big = ClientUpdate("big", 10, {k: v * 1000 for k, v in ups[0].delta.items()})
    result = NormBound(WeightedMean(), max_norm=100.0).aggregate([*ups, big])
    assert "big" in result.dropped and "big" not in result.included
    assert result.included == tuple(u.device for u in ups)
    assert update_norm(big) > 100
    with pytest.raises(AggregationError):
        NormBound(WeightedMean(), max_norm=1e-6).aggregate(ups)
    with pytest.raises(ConfigError):
        NormBound(WeightedMean())


def test_apply_delta_is_float32_elementwise():
    params = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
    out = apply_delta(params, {"a": np.array([0.5, 1, 2], np.float32)})
    assert out["a"].tolist() == [1.5, 2.0, 3.0] and out["b"].tolist() == [0.0, 0.0]
    with pytest.raises(AggregationError):
        apply_delta(params, {"zzz": np.ones(1, np.float32)})
