from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np

from fedchain.learning.data import Dataset, load_subset
from fedchain.learning.subset import build_subset, write_subset


def test_rebuild_is_deterministic_and_taken_from_the_source(mnist, tmp_path):
    arrays = build_subset(mnist, train_per_class=30, test_per_class=10)
    again = build_subset(mnist, train_per_class=30, test_per_class=10)
    a = write_subset(arrays, tmp_path / "a.npz")
    b = write_subset(again, tmp_path / "b.npz")
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    np.testing.assert_array_equal(
        arrays["train_images"], mnist.train_images[arrays["train_indices"]]
    )
    assert np.bincount(arrays["test_labels"]).tolist() == [10] * 10


def test_shipped_subset_matches_its_rebuild_from_itself():
    shipped = load_subset()
    as_full = Dataset(
        shipped.train_images, shipped.train_labels, shipped.test_images, shipped.test_labels, "x"
    )
    rebuilt = build_subset(as_full, train_per_class=600, test_per_class=100)
    np.testing.assert_array_equal(rebuilt["train_images"], shipped.train_images)
    np.testing.assert_array_equal(rebuilt["test_labels"], shipped.test_labels)


def test_shipped_subset_indices_point_into_the_full_files(mnist):
    ref = resources.files("fedchain.learning").joinpath("data", "mnist_subset.npz")
    with ref.open("rb") as fh, np.load(fh) as npz:
        indices = npz["train_indices"]
        images = npz["train_images"]
    assert len(indices) == 6000 and np.all(np.diff(indices.astype(np.int64)) > 0)
    if not mnist.is_subset:  # with the full files at hand, the pixels agree
        np.testing.assert_array_equal(mnist.train_images[indices], images)
