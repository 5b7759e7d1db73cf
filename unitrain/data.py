"""Datasets: in-memory arrays, seeded batching, and MNIST shipped inside the package.

Every backend receives the same NumPy batches in the same order for a given seed: the order of
epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``, a pure function of
``(seed, epoch)``, so a run can stop and resume anywhere. The last batch of an epoch holds the
remaining ``n % batch_size`` samples (it is not dropped).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .reading import path_kind, path_problem

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

#: sha256 of the *decompressed* original IDX files (gzip recompression changes the .gz digest)
MNIST_FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
#: their dimensions: a file is never read (or inflated) beyond what these need
MNIST_DIMS = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}
MNIST_SIZES = {"train": MNIST_DIMS["train-labels-idx1-ubyte"][0], "test": MNIST_DIMS["t10k-labels-idx1-ubyte"][0]}
SPLITS = ("train", "test")


class DataError(ValueError):
    """A data file that is missing, truncated, corrupted or of the wrong kind."""


def num_batches(num_samples: int, batch_size: int) -> int:
    """Batches per epoch: the last one holds the remaining samples."""
    return -(-num_samples // batch_size)


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
        return num_batches(len(self), batch_size)

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
_CHUNK = 1 << 24


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file held in memory (see :func:`read_idx`)."""
    return read_idx(io.BytesIO(data), name)[0]


def read_idx(file: BinaryIO, name: str = "IDX data", dims: tuple[int | None, ...] | None = None):
    """Read an IDX file (LeCun's format: magic ``0 0 type ndim``, big-endian u32 dims, data)
    from a stream; returns ``(array, sha256 of the file)``. ``dims``: the dimensions the file
    must declare (``None`` for any size), checked from the header. Reads no more than the
    header's dimensions need, so a compressed stream is never inflated beyond them."""
    digest = hashlib.sha256()

    def read(size: int) -> bytes:
        piece = file.read(size)
        digest.update(piece)
        return piece

    head = read(4)
    if len(head) < 4:
        raise DataError(f"{name}: {len(head)} bytes is too short for an IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", head)
    if zero != 0 or dtype != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(
            f"{name}: bad magic number 0x{head.hex()}; expected 0x000008NN (unsigned bytes, NN = 01..04 dimensions)"
        )
    encoded = read(4 * ndim)
    if len(encoded) < 4 * ndim:
        raise DataError(f"{name}: truncated header ({4 + len(encoded)} bytes, need {4 + 4 * ndim})")
    declared = struct.unpack(f">{ndim}I", encoded)
    fits = dims is None or (
        len(declared) == len(dims) and all(d is None or d == e for e, d in zip(declared, dims, strict=True))
    )
    if not fits:
        expected = "(" + ", ".join("N" if d is None else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"
        raise DataError(f"{name}: the header declares dimensions {declared}, expected {expected}")
    need = math.prod(declared)
    data = bytearray()
    while len(data) < need and (piece := read(min(need - len(data), _CHUNK))):
        data += piece
    if len(data) < need:
        raise DataError(f"{name}: truncated: dimensions {declared} need {need} data bytes, found {len(data)}")
    if read(1):
        raise DataError(f"{name}: has trailing bytes after the {need} data bytes its dimensions {declared} need")
    return np.frombuffer(data, np.uint8).reshape(declared), digest.hexdigest()


def _read_file(directory: Path, stem: str, verify: bool) -> np.ndarray:
    # verified files must have the originals' dimensions; others the layout: (N, 28, 28) or (N,)
    dims = MNIST_DIMS[stem] if verify else (None, *MNIST_DIMS[stem][1:])
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if path_kind(candidate) == "nothing":
            continue
        if problem := path_problem(candidate):
            raise DataError(f"MNIST file {candidate} {problem}")
        try:
            with gzip.open(candidate) if candidate.suffix == ".gz" else open(candidate, "rb") as file:
                array, sha256 = read_idx(file, str(candidate), dims)
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise DataError(f"{candidate}: corrupt gzip data ({error})") from None
        if verify and sha256 != MNIST_FILES[stem]:
            raise DataError(
                f"{candidate}: sha256 {sha256} does not match the original MNIST file's {MNIST_FILES[stem]}"
            )
        return array
    raise DataError(f"MNIST file {stem}(.gz) not found in {directory}")


@functools.lru_cache(maxsize=4)
def _mnist_uint8(split: str, directory: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    path = Path(directory)
    images = _read_file(path, f"{prefix}-images-idx3-ubyte", verify)
    labels = _read_file(path, f"{prefix}-labels-idx1-ubyte", verify)
    if len(labels) != len(images):
        raise DataError(f"{prefix}-labels: expected {len(images)} labels, got {len(labels)}")
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
    if problem := path_problem(directory, "a directory"):
        raise DataError(f"data directory {directory} {problem}")
    images, labels = _mnist_uint8(split, str(directory.resolve()), verify)
    x = images[:, None].astype(np.float32)
    # in place, in float32: the tutorial's formula without 188 MB temporaries per operation
    x /= np.float32(255)
    x -= np.float32(MNIST_MEAN)
    x /= np.float32(MNIST_STD)
    return ArrayDataset(x, labels.astype(np.int64))
