from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedchain.learning import data as data_mod
from fedchain.learning.data import (
    MnistFile,
    download_mnist,
    load_mnist,
    load_subset,
    read_idx,
)
from fedchain.learning.errors import DataError, DataWarning


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A small, real-looking MNIST in IDX form (from the shipped subset) with
    its own checksum table, gzipped; plus the folder."""
    subset = load_subset()
    arrays = {
        "train_images": subset.train_images[:50],
        "train_labels": subset.train_labels[:50],
        "test_images": subset.test_images[:20],
        "test_labels": subset.test_labels[:20],
    }
    folder = tmp_path_factory.mktemp("idx")
    files = {}
    for key, array in arrays.items():
        raw = _idx_bytes(array)
        name = f"tiny-{key}-idx"
        packed = gzip.compress(raw, mtime=0)
        (folder / f"{name}.gz").write_bytes(packed)
        files[key] = MnistFile(
            name, hashlib.sha256(packed).hexdigest(), hashlib.sha256(raw).hexdigest()
        )
    return folder, files, arrays


def test_reads_gzip_and_raw_identically(tiny_files, tmp_path):
    folder, files, arrays = tiny_files
    spec = files["train_images"]
    raw_path = tmp_path / spec.name
    raw_path.write_bytes(gzip.decompress((folder / f"{spec.name}.gz").read_bytes()))
    from_gz = read_idx(folder / f"{spec.name}.gz", spec.sha256)
    from_raw = read_idx(raw_path, spec.sha256)
    np.testing.assert_array_equal(from_gz, arrays["train_images"])
    np.testing.assert_array_equal(from_raw, from_gz)


def test_truncated_gzip_names_the_file(tiny_files, tmp_path):
    folder, files, _ = tiny_files
    spec = files["train_images"]
    bad = tmp_path / f"{spec.name}.gz"
    bad.write_bytes((folder / f"{spec.name}.gz").read_bytes()[:-40])
    with pytest.raises(DataError) as info:
        read_idx(bad, spec.sha256)
    assert info.value.path == bad and str(bad) in str(info.value)


def test_flipped_pixel_fails_the_checksum(tiny_files, tmp_path):
    folder, files, _ = tiny_files
    spec = files["train_images"]
    raw = bytearray(gzip.decompress((folder / f"{spec.name}.gz").read_bytes()))
    raw[500] ^= 0xFF
    bad = tmp_path / spec.name
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="SHA-256"):
        read_idx(bad, spec.sha256)


def test_header_inconsistent_with_length(tmp_path):
    path = tmp_path / "short-idx"
    path.write_bytes(_idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5])
    with pytest.raises(DataError, match="header says"):
        read_idx(path)
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_a_gzip_stream_is_inflated_no_further_than_its_header_says(tmp_path):
    """A small .gz whose content runs far past what its IDX header claims
    (a gzip bomb, or a damaged file) is refused having inflated about the
    header's worth, not the whole stream."""
    path = tmp_path / "bomb.gz"
    claimed = _idx_bytes(np.zeros((3, 28, 28), np.uint8))
    path.write_bytes(gzip.compress(claimed + bytes(64 * 2**20), compresslevel=1))
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="header says"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"inflated {peak} bytes for a 2,368-byte claim"


def test_a_header_claiming_more_than_the_bound_is_refused_before_inflating(tmp_path):
    path = tmp_path / "huge.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**20, 2**10, 2**10)))
    with pytest.raises(DataError, match="more than"):
        read_idx(path)


@settings(max_examples=300, deadline=None)
@given(
    header=st.binary(min_size=4, max_size=16).map(lambda b: b"\x00\x00" + b[2:]),
    body=st.binary(max_size=64),
    compress=st.booleans(),
)
def test_any_idx_bytes_read_or_raise_data_error(tmp_path_factory, header, body, compress):
    """Whatever a file holds (raw or gzip, cut anywhere): an array whose
    size its header accounts for exactly, or DataError naming the file."""
    raw = header + body
    path = tmp_path_factory.mktemp("idx") / "file"
    data = gzip.compress(raw) if compress else raw
    path.write_bytes(data[: len(data) - len(body) // 2] if compress and body else data)
    try:
        array = read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert 4 + 4 * array.ndim + array.size == len(raw) and array.dtype == np.uint8


def test_explicit_folder_is_authoritative(tiny_files, tmp_path, monkeypatch):
    folder, files, arrays = tiny_files
    loaded = load_mnist(folder, files=files, download=False)
    np.testing.assert_array_equal(loaded.test_labels, arrays["test_labels"])
    assert not loaded.is_subset
    monkeypatch.setenv("FEDCHAIN_DATA", str(tmp_path))  # empty folder
    with pytest.raises(DataError, match="missing"):
        load_mnist(files=files, download=False)


def test_cache_then_subset_fallback(tiny_files, tmp_path, monkeypatch):
    folder, files, _ = tiny_files
    monkeypatch.delenv("FEDCHAIN_DATA", raising=False)
    with pytest.warns(DataWarning, match="SUBSET"):
        fallback = load_mnist(cache=tmp_path / "empty", files=files, download=False)
    assert fallback.is_subset and "SUBSET" in fallback.describe()
    with pytest.raises(DataError):
        load_mnist(cache=tmp_path / "empty", files=files, download=False, allow_subset=False)
    cached = load_mnist(cache=folder, files=files, download=False)
    assert cached.source == str(folder)


def test_download_from_a_local_http_mirror(tiny_files, tmp_path, monkeypatch):
    folder, files, arrays = tiny_files
    monkeypatch.delenv("FEDCHAIN_DATA", raising=False)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirrors = ("http://127.0.0.1:1/nothing/", f"http://127.0.0.1:{server.server_port}/")
        cache = tmp_path / "cache"
        loaded = load_mnist(cache=cache, mirrors=mirrors, files=files, progress=False)
    finally:
        server.shutdown()
    np.testing.assert_array_equal(loaded.train_images, arrays["train_images"])
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{f.name}.gz" for f in files.values())


def test_download_rejects_a_wrong_file(tiny_files, tmp_path):
    folder, files, _ = tiny_files
    wrong = {k: MnistFile(f.name, "0" * 64, f.sha256) for k, f in files.items()}
    with pytest.raises(DataError, match="no mirror"):
        download_mnist(tmp_path, mirrors=(folder.as_uri() + "/",), files=wrong, progress=False)
    assert not any(tmp_path.iterdir())  # nothing half-written
    download_mnist(tmp_path, mirrors=(folder.as_uri() + "/",), files=files, progress=False)
    assert len(list(tmp_path.iterdir())) == 4


def test_published_sums_are_the_readme_ones():
    assert data_mod.MNIST_FILES["train_images"].sha256.startswith("ba891046")
    assert data_mod.MNIST_FILES["test_labels"].gz_sha256.startswith("f7ae60f9")


def test_loaded_mnist_is_real(mnist):
    # Whatever the source (full files or the subset), these are MNIST digits.
    assert mnist.train_images.shape[1:] == (28, 28) and mnist.train_images.dtype == np.uint8
    assert set(np.unique(mnist.train_labels)) == set(range(10))
    if not mnist.is_subset:
        assert list(mnist.train_labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
        assert len(mnist.train_labels) == 60_000 and len(mnist.test_labels) == 10_000


def test_subset_is_checked_and_balanced():
    subset = load_subset()
    assert np.bincount(subset.train_labels).tolist() == [600] * 10
    assert np.bincount(subset.test_labels).tolist() == [100] * 10
    size = Path(data_mod.__file__).parent.joinpath("data", "mnist_subset.npz").stat().st_size
    assert size < 3_000_000


def test_warning_message_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDCHAIN_DATA", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_mnist(cache=tmp_path, download=False)
    assert any("SUBSET" in str(w.message) for w in caught)
