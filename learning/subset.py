"""Regenerate the real MNIST subset shipped in the package.

The subset is the first ``train_per_class`` training images and the first
``test_per_class`` test images of each digit, in file order, taken from the
full checked IDX files, so it is deterministic and class-balanced. The npz
records the original indices, the SHA-256 of the source files and a SHA-256
of its own content (checked on every load).

Regenerate with::

    python -m fedchain.learning.subset --data /path/to/mnist learning/data/mnist_subset.npz
"""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import numpy as np

from fedchain.learning.data import MNIST_FILES, Dataset, load_mnist

__all__ = ["build_subset", "write_subset"]


def _first_per_class(labels: np.ndarray, per_class: int, classes: int = 10) -> np.ndarray:
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(classes)]
    if any(len(p) < per_class for p in picked):
        raise ValueError(f"fewer than {per_class} examples of some class")
    return np.sort(np.concatenate(picked))


def build_subset(
    dataset: Dataset, *, train_per_class: int = 600, test_per_class: int = 100
) -> dict[str, np.ndarray]:
    """The arrays of the subset (see the module docstring)."""
    train_idx = _first_per_class(dataset.train_labels, train_per_class)
    test_idx = _first_per_class(dataset.test_labels, test_per_class)
    arrays = {
        "train_images": np.ascontiguousarray(dataset.train_images[train_idx], dtype=np.uint8),
        "train_labels": np.ascontiguousarray(dataset.train_labels[train_idx], dtype=np.uint8),
        "test_images": np.ascontiguousarray(dataset.test_images[test_idx], dtype=np.uint8),
        "test_labels": np.ascontiguousarray(dataset.test_labels[test_idx], dtype=np.uint8),
        "train_indices": train_idx.astype(np.uint32),
        "test_indices": test_idx.astype(np.uint32),
    }
    content = hashlib.sha256()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        content.update(arrays[key].tobytes())
    arrays["content_sha256"] = np.array(content.hexdigest())
    arrays["source_sha256"] = np.array([f.sha256 for f in MNIST_FILES.values()])
    return arrays


def write_subset(arrays: dict[str, np.ndarray], path: str | Path) -> bytes:
    """Write ``arrays`` as a compressed npz; return the bytes written."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    Path(path).write_bytes(data)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with the full MNIST IDX files")
    parser.add_argument(
        "out", nargs="?", default=str(Path(__file__).parent / "data" / "mnist_subset.npz")
    )
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    full = load_mnist(args.data, allow_subset=False)
    arrays = build_subset(
        full, train_per_class=args.train_per_class, test_per_class=args.test_per_class
    )
    data = write_subset(arrays, args.out)
    print(f"wrote {args.out}: {len(data):,} bytes, content sha256 {arrays['content_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
