"""Datasets: in-memory arrays, seeded batching, IDX files, and the datasets shipped inside the
package (MNIST, Fashion-MNIST). The user's own formats are read by :mod:`unitrain.datasets`.

Every backend receives the same NumPy batches in the same order for a given seed: the order of
epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``, a pure function of
``(seed, epoch)``, so a run can stop and resume anywhere. The last batch of an epoch holds the
remaining ``n % batch_size`` samples (it is not dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .reading import path_kind, path_problem
from .transforms import Augmentation, Normalization, pad, resize

#: MNIST's mean and std, the values of PyTorch's MNIST example (of the training set's pixels / 255)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: Fashion-MNIST's, computed the same way: over all 60,000 x 28 x 28 training pixels / 255 in
#: float64, population standard deviation (``x.mean()``, ``x.std()``): 0.286040597, 0.353024245
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

#: the IDX files' dimensions: a file is never read (or inflated) beyond what these need
MNIST_DIMS = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}
#: at most this many bytes of raw samples are read from any file the user gives (1 GiB)
MAX_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class PackagedDataset:
    """A dataset shipped in ``unitrain/datafiles/<name>/`` as gzipped IDX files with MNIST's names."""

    name: str
    title: str
    #: sha256 of the *decompressed* original IDX files (gzip recompression changes the .gz digest)
    sha256: dict[str, str]
    mean: float
    std: float
    classes: tuple[str, ...]

    def directory(self) -> Path:
        return Path(str(resources.files("unitrain") / "datafiles" / self.name))

    def normalization(self) -> Normalization:
        return Normalization((self.mean,), (self.std,), f"{self.title} training set")


PACKAGED = {
    "mnist": PackagedDataset(
        "mnist", "MNIST",
        {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        MNIST_MEAN, MNIST_STD, tuple(str(digit) for digit in range(10)),
    ),
    "fashion-mnist": PackagedDataset(
        "fashion-mnist", "Fashion-MNIST",
        {
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        FASHION_MNIST_MEAN, FASHION_MNIST_STD,
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}  # fmt: skip
MNIST_FILES = PACKAGED["mnist"].sha256
#: every packaged dataset's training set (their files are verified against the originals)
PACKAGED_TRAIN_SAMPLES = MNIST_DIMS["train-images-idx3-ubyte"][0]
SPLITS = ("train", "test")


class DataError(ValueError):
    """A data file that is missing, truncated, corrupted or of the wrong kind."""


def _arrays(value):
    """An array, or a tuple of arrays as such (several inputs or outputs)."""
    several = isinstance(value, tuple) and value and all(isinstance(v, np.ndarray) for v in value)
    return tuple(value) if several else np.asarray(value)


def _count(value) -> int:
    return len(value[0]) if isinstance(value, tuple) else len(value)


def _take(value, index):
    return tuple(v[index] for v in value) if isinstance(value, tuple) else value[index]


def num_batches(num_samples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch: the last one holds the remaining samples, or with ``drop_last`` (PyTorch's
    DataLoader, MindSpore's ``drop_remainder``) those are left out."""
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


@dataclass
class ArrayDataset:
    """Samples ``x`` (float32, ``(N, ...)``) with targets ``y`` (``(N,)`` int64 classes).

    A loaded dataset also says how it was made: ``normalization`` (the mean and std its pixels
    were normalised with, and where they come from), ``classes`` (class names, index order) and
    ``augmentation`` (applied to each training batch by :meth:`batches`; see
    :class:`~unitrain.transforms.Augmentation`).

    A model with several inputs (outputs) takes a tuple of arrays as ``x`` (``y``), one per
    input (output), of equal length (see :mod:`unitrain.graph`)."""

    x: np.ndarray
    y: np.ndarray
    normalization: Normalization | None = field(default=None, compare=False)
    classes: tuple[str, ...] | None = field(default=None, compare=False)
    augmentation: Augmentation | None = field(default=None, compare=False)

    def __post_init__(self):
        for part in (self.x, self.y):
            if isinstance(part, tuple) and len({len(value) for value in part}) > 1:
                raise DataError(f"the arrays of a tuple must have equal lengths, got {[len(v) for v in part]}")
        if _count(self.x) != _count(self.y):
            raise DataError(f"x has {_count(self.x)} samples but y has {_count(self.y)}")

    @classmethod
    def of(cls, data) -> ArrayDataset:
        if isinstance(data, cls):
            return data
        try:
            x, y = data
        except (TypeError, ValueError):
            raise TypeError(f"expected an ArrayDataset or a pair (x, y), got {type(data).__name__}") from None
        return cls(_arrays(x), _arrays(y))

    def __len__(self) -> int:
        return _count(self.x)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return num_batches(len(self), batch_size, drop_last)

    def order(self, shuffle: bool, seed: int, epoch: int) -> np.ndarray | None:
        """Sample order of an epoch (``None``: the stored order)."""
        return np.random.default_rng([seed, epoch]).permutation(len(self)) if shuffle else None

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start: int = 0, drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        """Mini-batches of an epoch, from batch number ``start`` on (to resume mid-epoch), each
        augmented by ``augmentation(x, seed, epoch, batch number)`` if set. Unshuffled,
        unaugmented batches are views, not copies."""
        order = self.order(shuffle, seed, epoch)
        end = self.num_batches(batch_size, drop_last) * batch_size
        for index, begin in enumerate(range(start * batch_size, min(end, len(self)), batch_size), start=start):
            chosen = slice(begin, begin + batch_size) if order is None else order[begin : begin + batch_size]
            x, y = _take(self.x, chosen), _take(self.y, chosen)
            yield (x if self.augmentation is None else self.augmentation(x, seed, epoch, index)), y

    def subset(self, index) -> ArrayDataset:
        return dataclasses.replace(self, x=_take(self.x, index), y=_take(self.y, index))

    def split(self, first: int, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
        """Random split into ``first`` and ``len - first`` samples, like Chainer's
        ``split_dataset_random`` (the tutorial's 50,000 train / 10,000 validation)."""
        if not 0 <= first <= len(self):
            raise ValueError(f"split size must be in 0..{len(self)}, got {first}")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(order[:first]), self.subset(order[first:])

    def augmented(self, crop_padding: int = 0, flip: bool = False) -> ArrayDataset:
        """This dataset with a random crop (of the sample's size, after ``crop_padding`` pixels of
        padding filled with normalised black) and horizontal flip on each training batch."""
        fill = self.normalization.fill() if self.normalization is not None else (0.0,) * self.x.shape[1]
        return dataclasses.replace(self, augmentation=Augmentation(crop_padding, flip, fill))

    def padded(self, padding: int) -> ArrayDataset:
        """Samples padded by ``padding`` pixels of normalised black on every side (e.g. 28x28 to
        LeNet-5's original 32x32 with ``padding=2``)."""
        fill = self.normalization.fill() if self.normalization is not None else (0.0,) * self.x.shape[1]
        return dataclasses.replace(self, x=pad(self.x, padding, fill))

    def resized(self, height: int, width: int) -> ArrayDataset:
        """Samples resized to ``height`` x ``width`` (bilinear, see :func:`~unitrain.transforms.resize`)."""
        return dataclasses.replace(self, x=resize(self.x, (height, width)))


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
    if need > MAX_DATA_BYTES:
        raise DataError(f"{name}: the header declares dimensions {declared}, {need} bytes; at most "
                        f"{MAX_DATA_BYTES} are read")  # fmt: skip
    data = bytearray()
    while len(data) < need and (piece := read(min(need - len(data), _CHUNK))):
        data += piece
    if len(data) < need:
        raise DataError(f"{name}: truncated: dimensions {declared} need {need} data bytes, found {len(data)}")
    if read(1):
        raise DataError(f"{name}: has trailing bytes after the {need} data bytes its dimensions {declared} need")
    return np.frombuffer(data, np.uint8).reshape(declared), digest.hexdigest()


def read_idx_file(path: Path, what: str, dims: tuple[int | None, ...], sha256: str | None = None) -> np.ndarray:
    """The IDX file at ``path`` (gzipped when it ends in ``.gz``), which must declare ``dims``
    and, if given, decompress to bytes of digest ``sha256``; ``what`` names it in errors."""
    if problem := path_problem(path):
        raise DataError(f"{what} {path} {problem}")
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as file:
            array, digest = read_idx(file, str(path), dims)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: corrupt gzip data ({error})") from None
    if sha256 is not None and digest != sha256:
        raise DataError(f"{path}: sha256 {digest} does not match the original {what}'s {sha256}")
    return array


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """``DIR/stem.gz`` or ``DIR/stem``, whichever is there (the gzipped one first)."""
    return next((path for path in (directory / f"{stem}.gz", directory / stem) if path_kind(path) != "nothing"), None)


def idx_split_files(split: str) -> tuple[str, str]:
    """MNIST's IDX file names (images, labels) of ``split``, ``"train"`` or ``"test"``, without ``.gz``."""
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


@functools.lru_cache(maxsize=4)
def _packaged_uint8(name: str, split: str, directory: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    dataset, folder, arrays = PACKAGED[name], Path(directory), []
    for stem in idx_split_files(split):
        path = find_idx_file(folder, stem)
        if path is None:
            raise DataError(f"{dataset.title} file {stem}(.gz) not found in {folder}")
        # verified files must have the originals' dimensions; others the layout: (N, 28, 28) or (N,)
        dims = MNIST_DIMS[stem] if verify else (None, *MNIST_DIMS[stem][1:])
        arrays.append(read_idx_file(path, f"{dataset.title} file", dims, dataset.sha256[stem] if verify else None))
    images, labels = arrays
    if len(labels) != len(images):
        raise DataError(f"{split} labels: expected {len(images)} labels, got {len(labels)}")
    if labels.max(initial=0) >= len(dataset.classes):
        raise DataError(f"{split} labels: label {labels.max()} is not a class 0..{len(dataset.classes) - 1}")
    return images, labels


def packaged_mnist_dir() -> Path:
    """The folder of the MNIST files shipped inside the package."""
    return PACKAGED["mnist"].directory()


def packaged_arrays(name: str, split: str, data_dir: str | Path | None = None, *,
                    verify: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A packaged dataset's pixels, uint8 ``(N, 1, 28, 28)`` (a read-only view of a cached
    array), and labels (uint8 ``(N,)``), read from ``data_dir`` or the package (see
    :func:`load_packaged`)."""
    if name not in PACKAGED:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(PACKAGED)}")
    if split not in SPLITS:
        raise ValueError(f"unknown {PACKAGED[name].title} split {split!r}; expected one of {SPLITS}")
    directory = Path(data_dir) if data_dir is not None else PACKAGED[name].directory()
    if problem := path_problem(directory, "a directory"):
        raise DataError(f"data directory {directory} {problem}")
    images, labels = _packaged_uint8(name, split, str(directory.resolve()), verify)
    return images[:, None], labels


def load_packaged(name: str, split: str = "train", data_dir: str | Path | None = None, *, verify: bool = True,
                  normalization: Normalization | None = None) -> ArrayDataset:  # fmt: skip
    """A packaged dataset (``"mnist"``, ``"fashion-mnist"``) as ``x`` float32 ``(N, 1, 28, 28)``
    normalised ``(x/255 - mean)/std`` with its own training set's mean and std (or
    ``normalization``), and ``y`` int64. ``split``: ``"train"`` (60,000) or ``"test"``
    (10,000). ``data_dir`` reads the original IDX files (gzipped or raw) from elsewhere; by
    default the copy inside the package is used. ``verify`` checks the files' sha256 against
    the originals'."""
    if normalization is not None and len(normalization.mean) != 1:
        raise DataError(f"{name} is grayscale: its normalisation takes one mean and one std, got "
                        f"{len(normalization.mean)}")  # fmt: skip
    images, labels = packaged_arrays(name, split, data_dir, verify=verify)
    normalization = normalization or PACKAGED[name].normalization()
    return ArrayDataset(normalization(images), labels.astype(np.int64), normalization, PACKAGED[name].classes)


def load_mnist(split: str = "train", data_dir: str | Path | None = None, *, verify: bool = True) -> ArrayDataset:
    """MNIST (see :func:`load_packaged`): normalised ``(x/255 - 0.1307)/0.3081``."""
    return load_packaged("mnist", split, data_dir, verify=verify)
