"""Shared fixtures of the learning tests: data loaded once, small models.

MNIST comes from ``$FEDCHAIN_DATA`` when set (CI points it at the shared
full files) and otherwise from the real subset shipped in the package; no
test touches the network.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedchain.learning.data import Dataset, load_mnist
from fedchain.learning.errors import DataWarning
from fedchain.learning.models import CnnSpec


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_mnist(download=False)


@pytest.fixture(scope="session")
def small_mnist(mnist) -> Dataset:
    """A class-balanced 2,000/1,000 slice, the same shape whatever the source."""
    train = np.sort(
        np.concatenate([np.flatnonzero(mnist.train_labels == c)[:200] for c in range(10)])
    )
    test = np.sort(
        np.concatenate([np.flatnonzero(mnist.test_labels == c)[:100] for c in range(10)])
    )
    return Dataset(
        mnist.train_images[train],
        mnist.train_labels[train],
        mnist.test_images[test],
        mnist.test_labels[test],
        source=mnist.source,
        is_subset=True,
    )


@pytest.fixture(scope="session")
def base_spec() -> CnnSpec:
    return CnnSpec(conv1=8, conv2=16, hidden=32)
