from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.learning.errors import ConfigError
from fedchain.learning.partition import dirichlet, iid, shards


def _disjoint_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist()))
    return set(joined.tolist()) == set(range(n))


@given(n=st.integers(10, 500), devices=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_iid_equal_is_a_partition(n, devices, seed):
    parts = iid(n, devices, seed)
    assert _disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_unequal_sizes_reproducible():
    a = iid(1000, 10, 3, size_concentration=0.5, min_size=20)
    b = iid(1000, 10, 3, size_concentration=0.5, min_size=20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    sizes = [len(p) for p in a]
    assert sum(sizes) == 1000 and min(sizes) >= 20 and max(sizes) > 2 * min(sizes)
    assert _disjoint_cover(a, 1000)


def test_dirichlet_small_alpha_skews_labels():
    labels = np.repeat(np.arange(10), 200)
    skewed = dirichlet(labels, 10, 0.1, seed=1, min_size=10)
    even = dirichlet(labels, 10, 1000.0, seed=1, min_size=10)
    assert _disjoint_cover(skewed, len(labels)) and _disjoint_cover(even, len(labels))

    def dominant_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert dominant_share(skewed) > 0.4 > 0.2 > dominant_share(even)


def test_shards_give_few_labels():
    labels = np.repeat(np.arange(10), 100)
    parts = shards(labels, 10, 2, seed=0)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)  # 2 shards of 1000 / 20


def test_bad_arguments():
    with pytest.raises(ConfigError):
        iid(5, 10, 0)
    with pytest.raises(ConfigError):
        dirichlet(np.zeros(10, int), 2, 0.0, 0)
