"""MNIST from the original IDX files, checked, found where DESIGN.md says.

Lookup order (DESIGN.md "Data"):

1. an explicit folder (``--data DIR``) or ``$FEDCHAIN_DATA``: authoritative,
   so a file missing or corrupt there is an error, not a reason to look
   elsewhere;
2. the user cache, ``$XDG_CACHE_HOME/fedchain/mnist`` (``~/.cache/...``);
3. a download from the public mirrors into that cache, with a progress bar;
4. offline and with nothing cached, the small real subset shipped in the
   package (``data/mnist_subset.npz``, made by :mod:`fedchain.learning.subset`
   from the full files), with a :class:`~fedchain.learning.errors.DataWarning`
   that says it is a subset.

Every file may be gzipped (``*.gz``) or raw. Its *decompressed* content is
checked against the published SHA-256, so a re-gzipped copy passes and a
single flipped pixel does not; the IDX header (magic, counts, dimensions) is
then checked against the file length. A gzip stream is inflated no further
than its IDX header says the content reaches (and never past
``MAX_IDX_BYTES``), so a small file that inflates without end costs what
its header claims, not the memory it would take. Any failure raises
:class:`~fedchain.learning.errors.DataError` naming the file: a corrupt file
is never silently misread.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from fedchain.learning.errors import DataError, DataWarning

__all__ = [
    "MIRRORS",
    "MNIST_FILES",
    "Dataset",
    "MnistFile",
    "cache_dir",
    "download_mnist",
    "load_mnist",
    "read_idx",
]


@dataclass(frozen=True)
class MnistFile:
    """One of the four published files and the SHA-256 of its ``.gz`` and of
    its decompressed content."""

    name: str
    gz_sha256: str
    sha256: str


MNIST_FILES: Mapping[str, MnistFile] = {
    "train_images": MnistFile(
        "train-images-idx3-ubyte",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train_labels": MnistFile(
        "train-labels-idx1-ubyte",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "test_images": MnistFile(
        "t10k-images-idx3-ubyte",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "test_labels": MnistFile(
        "t10k-labels-idx1-ubyte",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}

# Public mirrors of the original .gz files (the ones torchvision uses).
MIRRORS: Sequence[str] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

SUBSET_RESOURCE = "mnist_subset.npz"

_IDX_DTYPES = {0x08: np.uint8}
MAX_IDX_BYTES = 2**31
"""The largest IDX content a gzipped file may claim (MNIST's largest file
holds 47 MB, EMNIST's 0.55 GB)."""


@dataclass(frozen=True)
class Dataset:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 for train and test.

    ``source`` says where they came from (a folder, or ``"subset"``);
    ``is_subset`` is true for the shipped subset, whose numbers are not
    comparable with results on the full test set.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    is_subset: bool = False
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        kind = "SUBSET of MNIST shipped in the package" if self.is_subset else "MNIST"
        return (
            f"{kind}: {len(self.train_labels):,} train / {len(self.test_labels):,} test "
            f"images from {self.source}"
        )


def cache_dir() -> Path:
    """The user cache for downloaded MNIST files."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedchain" / "mnist"


def read_idx(path: str | Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read one IDX file (gzip or raw) as a NumPy array, strictly.

    ``expected_sha256`` is the SHA-256 of the decompressed content; a
    mismatch, a truncated gzip stream or an inconsistent header raises
    :class:`DataError` naming ``path``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", path) from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = _gunzip_idx(raw, path)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt or truncated gzip stream ({exc})", path) from exc
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise DataError(
                f"SHA-256 of the content is {digest}, expected {expected_sha256} "
                "(corrupt, truncated or not the published file)",
                path,
            )
    return _parse_idx(raw, path)


def _gunzip_idx(data: bytes, path: Path) -> bytes:
    """Inflate a gzipped IDX file up to one byte past the length its header
    implies: enough for :func:`_parse_idx` to accept it or to name the
    mismatch, and no more. A stream that ends early raises EOFError; one
    that reaches its end has had its CRC checked by ``gzip``."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        head = stream.read(4)
        if len(head) < 4 or head[0] or head[1] or head[3] < 1:
            return head  # not an IDX header: _parse_idx says why
        head += stream.read(4 * head[3])
        if len(head) < 4 + 4 * head[3]:
            return head  # truncated header
        shape = struct.unpack(f">{head[3]}I", head[4:])
        size = len(head) + math.prod(shape)
        if size > MAX_IDX_BYTES:
            raise DataError(
                f"IDX header claims {shape} ({size} bytes), more than {MAX_IDX_BYTES}", path
            )
        return head + stream.read(size - len(head) + 1)


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError("not an IDX file (bad magic)", path)
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES or ndim < 1:
        raise DataError(f"unsupported IDX type 0x{dtype_code:02x} with {ndim} dims", path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError("truncated IDX header", path)
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"IDX header says {shape} ({expected} bytes) but the file has {len(raw)} bytes",
            path,
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=header).reshape(shape)


def _find(folder: Path, spec: MnistFile) -> Path | None:
    for candidate in (folder / f"{spec.name}.gz", folder / spec.name):
        if candidate.is_file():
            return candidate
    return None


def _load_folder(folder: Path, files: Mapping[str, MnistFile]) -> Dataset:
    arrays = {}
    for key, spec in files.items():
        path = _find(folder, spec)
        if path is None:
            raise DataError(f"missing {spec.name}.gz (or {spec.name})", folder)
        arrays[key] = read_idx(path, spec.sha256)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{split} images {images.shape} and labels {labels.shape} do not match", folder
            )
    return Dataset(**arrays, source=str(folder))


def _has_all(folder: Path, files: Mapping[str, MnistFile]) -> bool:
    return folder.is_dir() and all(_find(folder, spec) is not None for spec in files.values())


def download_mnist(
    into: str | Path,
    *,
    mirrors: Sequence[str] = MIRRORS,
    files: Mapping[str, MnistFile] = MNIST_FILES,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Download the ``.gz`` files into ``into`` (each checked against its
    published SHA-256, written atomically) and return the folder.

    Mirrors are tried in order for each file; ``file://`` URLs work too.
    Raises :class:`DataError` if no mirror gives a file with the right sum.
    """
    folder = Path(into)
    folder.mkdir(parents=True, exist_ok=True)
    for spec in files.values():
        target = folder / f"{spec.name}.gz"
        if target.is_file() and _sha256_file(target) == spec.gz_sha256:
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{spec.name}.gz"
            try:
                _fetch(url, target, spec.gz_sha256, timeout=timeout, progress=progress)
                break
            except (OSError, urllib.error.URLError, DataError) as exc:
                failures.append(f"{url}: {exc}")
        else:
            raise DataError("no mirror served it: " + "; ".join(failures), target)
    return folder


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, target: Path, gz_sha256: str, *, timeout: float, progress: bool) -> None:
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    tmp = Path(tmp_name)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = _progress(progress)
            with bar:
                task = bar.add_task(f"download {target.name}", total=total)
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.advance(task, len(chunk))
        if digest.hexdigest() != gz_sha256:
            raise DataError(
                f"downloaded SHA-256 {digest.hexdigest()} != published {gz_sha256}", url
            )
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def load_subset() -> Dataset:
    """The real MNIST subset shipped inside the package (see
    :mod:`fedchain.learning.subset`)."""
    ref = resources.files("fedchain.learning").joinpath("data", SUBSET_RESOURCE)
    try:
        with ref.open("rb") as fh, np.load(fh) as npz:
            arrays = {k: np.array(npz[k]) for k in npz.files}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"shipped subset unreadable ({exc})", str(ref)) from exc
    content = hashlib.sha256()
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        content.update(arrays[key].tobytes())
    if content.hexdigest() != str(arrays["content_sha256"]):
        raise DataError("shipped subset fails its content SHA-256", str(ref))
    return Dataset(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        source="subset",
        is_subset=True,
        notes=(
            "offline and no MNIST files found: using the real MNIST SUBSET shipped in the "
            f"package ({len(arrays['train_labels']):,} train / "
            f"{len(arrays['test_labels']):,} test images); set --data or FEDCHAIN_DATA "
            "to the full IDX files for comparable results",
        ),
    )


def load_mnist(
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    cache: str | Path | None = None,
    mirrors: Sequence[str] = MIRRORS,
    allow_subset: bool = True,
    progress: bool = True,
    files: Mapping[str, MnistFile] = MNIST_FILES,
) -> Dataset:
    """MNIST by the lookup order of the module docstring.

    ``data_dir`` (else ``$FEDCHAIN_DATA``) is authoritative when given.
    ``download=False`` skips the mirrors; ``allow_subset=False`` turns the
    offline fallback into a :class:`DataError`.
    """
    explicit = data_dir if data_dir is not None else os.environ.get("FEDCHAIN_DATA") or None
    if explicit is not None:
        return _load_folder(Path(explicit), files)
    cached = Path(cache) if cache is not None else cache_dir()
    if _has_all(cached, files):
        return _load_folder(cached, files)
    failure: Exception | None = None
    if download:
        try:
            return _load_folder(
                download_mnist(cached, mirrors=mirrors, files=files, progress=progress), files
            )
        except (DataError, OSError) as exc:
            failure = exc
    if not allow_subset:
        raise DataError(
            "MNIST not found and not downloadable"
            + (f" ({failure})" if failure else " (download disabled)"),
            cached,
        ) from failure
    subset = load_subset()
    warnings.warn(subset.notes[0], DataWarning, stacklevel=2)
    return subset


def copy_files(source: str | Path, into: str | Path, files: Mapping[str, MnistFile] = MNIST_FILES):
    """Copy the MNIST files found in ``source`` into ``into`` (e.g. to seed a
    cache from a shared folder)."""
    src, dst = Path(source), Path(into)
    dst.mkdir(parents=True, exist_ok=True)
    for spec in files.values():
        path = _find(src, spec)
        if path is None:
            raise DataError(f"missing {spec.name}.gz (or {spec.name})", src)
        shutil.copy2(path, dst / path.name)
    return dst
