"""Datasets: in-memory arrays, seeded batching, and MNIST shipped inside the package.

Every backend receives the same NumPy batches in the same order for a given seed: the order of
epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``, a pure function of
``(seed, epoch)``, so a run can stop and resume anywhere. The last batch of an epoch holds the
remaining ``n % batch_size`` samples (it is not dropped).
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

#: sha256 of the *decompressed* original IDX files (gzip recompression changes the .gz digest)
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SPLITS = ("train", "test")


class DataError(ValueError):
    """A data file that is missing, truncated, corrupted or of the wrong kind."""


@dataclass
class ArrayDataset:
    """Samples ``x`` (float32, ``(N, ...)``) with targets ``y`` (``(N,)`` int64 classes)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} samples but y has {len(self.y)}")

    @classmethod
    def of(cls, data) -> ArrayDataset:
        if isinstance(data, cls):
            return data
        try:
            x, y = data
        except (TypeError, ValueError):
            raise TypeError(f"expected an ArrayDataset or a pair (x, y), got {type(data).__name__}") from None
        return cls(np.asarray(x), np.asarray(y))

    def __len__(self) -> int:
        return len(self.x)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def order(self, shuffle: bool, seed: int, epoch: int) -> np.ndarray | None:
        """Sample order of an epoch (``None``: the stored order)."""
        return np.random.default_rng([seed, epoch]).permutation(len(self)) if shuffle else None

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        """Mini-batches of an epoch, from batch number ``start`` on (to resume mid-epoch).
        Unshuffled batches are views, not copies."""
        order = self.order(shuffle, seed, epoch)
        for begin in range(start * batch_size, len(self), batch_size):
            if order is None:
                yield self.x[begin : begin + batch_size], self.y[begin : begin + batch_size]
            else:
                index = order[begin : begin + batch_size]
                yield self.x[index], self.y[index]

    def subset(self, index) -> ArrayDataset:
        return ArrayDataset(self.x[index], self.y[index])

    def split(self, first: int, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
        """Random split into ``first`` and ``len - first`` samples, like Chainer's
        ``split_dataset_random`` (the tutorial's 50,000 train / 10,000 validation)."""
        if not 0 <= first <= len(self):
            raise ValueError(f"split size must be in 0..{len(self)}, got {first}")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(order[:first]), self.subset(order[first:])


# --- IDX files ------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (LeCun's format: magic ``0 0 type ndim``, big-endian u32 dims, data)."""
    if len(data) < 4:
        raise DataError(f"{name}: {len(data)} bytes is too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(
            f"{name}: bad magic number 0x{data[:4].hex()}; expected 0x000008NN (unsigned bytes, NN = 01..04 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "has trailing bytes"
        raise DataError(f"{name}: {what}: dimensions {dims} need {expected} data bytes, found {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_file(directory: Path, stem: str, verify: bool) -> bytes:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    raw = zlib.decompress(raw, wbits=31)  # gzip container, faster than gzip.open
                except zlib.error as error:
                    raise DataError(f"{candidate}: corrupt gzip data ({error})") from None
            if verify and hashlib.sha256(raw).hexdigest() != MNIST_FILES[stem]:
                raise DataError(
                    f"{candidate}: sha256 {hashlib.sha256(raw).hexdigest()} does not match the original "
                    f"MNIST file's {MNIST_FILES[stem]}"
                )
            return raw
    raise DataError(f"MNIST file {stem}(.gz) not found in {directory}")


@functools.lru_cache(maxsize=4)
def _mnist_uint8(split: str, directory: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    path = Path(directory)
    images = parse_idx(_read_file(path, f"{prefix}-images-idx3-ubyte", verify), f"{prefix}-images")
    labels = parse_idx(_read_file(path, f"{prefix}-labels-idx1-ubyte", verify), f"{prefix}-labels")
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{prefix}-images: expected dimensions (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{prefix}-labels: expected {len(images)} labels, got shape {labels.shape}")
    if labels.max(initial=0) > 9:
        raise DataError(f"{prefix}-labels: label {labels.max()} is not a digit 0..9")
    return images, labels


def packaged_mnist_dir() -> Path:
    return Path(str(resources.files("unitrain") / "data" / "mnist"))


def load_mnist(split: str = "train", data_dir: str | Path | None = None, *, verify: bool = True) -> ArrayDataset:
    """MNIST as ``x`` float32 ``(N, 1, 28, 28)`` normalised ``(x/255 - 0.1307)/0.3081`` and ``y``
    int64. ``split``: ``"train"`` (60,000) or ``"test"`` (10,000). ``data_dir`` reads the original
    IDX files (gzipped or raw) from elsewhere; by default the copy inside the package is used.
    ``verify`` checks the files' sha256 against the originals'."""
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; expected one of {SPLITS}")
    directory = Path(data_dir) if data_dir is not None else packaged_mnist_dir()
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist or is not a directory")
    images, labels = _mnist_uint8(split, str(directory.resolve()), verify)
    x = images[:, None].astype(np.float32)
    # in place, in float32: the tutorial's formula without 188 MB temporaries per operation
    x /= np.float32(255)
    x -= np.float32(MNIST_MEAN)
    x /= np.float32(MNIST_STD)
    return ArrayDataset(x, labels.astype(np.int64))
