"""Datasets by name or path: the packaged ones and the user's own, in four formats.

``load_datasets(source)`` returns ``(train, test)``; ``source`` is ``"mnist"``,
``"fashion-mnist"`` (shipped in the package) or a path whose *content* says what it is:

* a ``.npz`` file in Keras's layout: exactly ``x_train, y_train, x_test, y_test``; ``x`` uint8
  (pixels 0..255) or floating (already in [0, 1]), ``(N, H, W)`` or channels-last
  ``(N, H, W, C)``; ``y`` integer class indices ``(N,)`` or ``(N, 1)``. Read with
  ``allow_pickle=False``, each array's header checked before its data is read;
* a folder of IDX files with MNIST's names (``train-images-idx3-ubyte[.gz]``, ...);
* a folder ``train/<class>/<image>`` and ``test/<class>/<image>`` of images (Pillow; classes in
  sorted name order as torchvision's ``ImageFolder``; all images one size; grayscale if every
  image is, else RGB; 16-bit grayscale read at full depth, as floats in [0, 1]; Pillow's
  decompression-bomb guard on);
* CIFAR-10's *binary* version (``data_batch_*.bin``, ``test_batch.bin``, possibly inside
  ``cifar-10-batches-bin/``); the pickled ("python") version is refused, never unpickled.

Samples come out float32 ``(N, C, H, W)``, normalised per channel with the mean and std of the
training set (the packaged datasets: their recorded values), or with ``normalization`` given;
targets int64 ``0..C-1`` with ``C`` the number of classes in the training set. Anything
malformed raises :class:`~unitrain.data.DataError` in one line naming the file and what was
expected; no more than :data:`~unitrain.data.MAX_DATA_BYTES` of samples are ever read.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import (
    MAX_DATA_BYTES,
    PACKAGED,
    SPLITS,
    ArrayDataset,
    DataError,
    find_idx_file,
    idx_split_files,
    load_packaged,
    read_idx_file,
)
from .reading import open_npz, path_kind, path_problem, short_list
from .transforms import Normalization, channels_last_to_nchw

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then 1024 red, 1024 green, 1024 blue pixels
#: Pillow's modes of 16-bit grayscale images (PNG, TIFF), read at their full depth
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Pillow's modes whose pixels no fixed scale maps to [0, 1]
_WIDE_MODES = {"I": "32-bit integer pixels", "F": "32-bit float pixels"}
#: more classes than this is not a classification dataset but a bug in the labels
MAX_CLASSES = 100_000


@dataclass
class _Raw:
    """A dataset as read: pixels uint8 or float ``(N, C, H, W)``, labels int64."""

    kind: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...] | None = None


def load_datasets(source: str | os.PathLike, *, data_dir=None, verify: bool = True,
                  normalization: tuple | Normalization | None = None,
                  check_size=None) -> tuple[ArrayDataset, ArrayDataset]:  # fmt: skip
    """``(train, test)`` of a packaged dataset or of the user's own (see the module's doc).
    ``data_dir`` / ``verify``: a packaged dataset's files from elsewhere (see
    :func:`~unitrain.data.load_packaged`). ``normalization``: ``(mean, std)`` (numbers or one
    per channel) instead of the dataset's own. ``check_size(samples, (C, H, W))``: called with
    the samples' count and shape before their data is read where the format declares them (an
    .npz's headers), else before they become float32: raises to refuse what they would become."""
    given = None if normalization is None else _given_normalization(normalization)
    if isinstance(source, str) and source in PACKAGED:
        train, test = (load_packaged(source, split, data_dir, verify=verify, normalization=given) for split in SPLITS)
        if check_size is not None:  # a few dozen MB: checked once read
            check_size(len(train) + len(test), train.x.shape[1:])
        return train, test
    if data_dir is not None:
        raise DataError(f"a data directory is for {' or '.join(PACKAGED)}, not for the dataset {source}")
    return _finish(_read(Path(source), check_size), source, given, check_size)


def load_dataset(source: str | os.PathLike, split: str = "train", **options) -> ArrayDataset:
    """One split (``"train"`` or ``"test"``) of :func:`load_datasets`; the test split of a
    user's dataset is normalised with its training set's statistics, so both are read."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if isinstance(source, str) and source in PACKAGED:  # its normalisation is known: read this split alone
        given = options.pop("normalization", None)
        given = None if given is None else _given_normalization(given)
        return load_packaged(source, split, **options, normalization=given)
    return load_datasets(source, **options)[SPLITS.index(split)]


def dataset_kind(source: str | os.PathLike) -> str:
    """What ``source`` is (``"mnist"``, ``"npz"``, ``"idx"``, ``"images"``, ``"cifar10"``), from
    its content; raises DataError naming what was expected when it is none of them."""
    if isinstance(source, str) and source in PACKAGED:
        return source
    return _detect(Path(source))[0]


def _given_normalization(value) -> Normalization:
    if isinstance(value, Normalization):
        return value
    mean, std = value
    mean, std = np.atleast_1d(mean).astype(float), np.atleast_1d(std).astype(float)
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()), "given")


def _finish(raw: _Raw, source, given: Normalization | None, check_size=None) -> tuple[ArrayDataset, ArrayDataset]:
    if raw.train_x.shape[1:] != raw.test_x.shape[1:]:
        raise DataError(f"{source}: training samples are {_shape(raw.train_x)}, test samples {_shape(raw.test_x)}; "
                        "expected one shape")  # fmt: skip
    if 0 in raw.train_x.shape[1:]:
        raise DataError(f"{source}: samples of shape {_shape(raw.train_x)} (channels x height x width) hold no "
                        "pixels; expected at least one channel of 1x1")  # fmt: skip
    classes = _check_labels(raw, source)
    if check_size is not None:
        check_size(len(raw.train_x) + len(raw.test_x), raw.train_x.shape[1:])
    if given is not None and len(given.mean) not in (1, raw.train_x.shape[1]):
        raise DataError(f"normalisation has {len(given.mean)} means; {source} has {raw.train_x.shape[1]} channels")
    if given is not None and len(given.mean) != raw.train_x.shape[1]:  # one value for every channel
        channels = raw.train_x.shape[1]
        given = Normalization(given.mean * channels, given.std * channels, given.source)
    normalization = given or Normalization.of_training_set(raw.train_x, f"training set of {source}")
    return tuple(
        ArrayDataset(normalization(x), y, normalization, classes)
        for x, y in ((raw.train_x, raw.train_y), (raw.test_x, raw.test_y))
    )


def _shape(x: np.ndarray) -> str:
    return "x".join(map(str, x.shape[1:]))


def _check_labels(raw: _Raw, source) -> tuple[str, ...]:
    for split, y in (("training", raw.train_y), ("test", raw.test_y)):
        if len(y) == 0:  # an empty test set has no loss or accuracy to report, only NaN
            raise DataError(f"{source}: the {split} set is empty; expected at least one sample")
    low = min(int(raw.train_y.min()), int(raw.test_y.min()))
    count = int(raw.train_y.max()) + 1 if raw.classes is None else len(raw.classes)
    if low < 0 or count > MAX_CLASSES:
        raise DataError(f"{source}: label {low if low < 0 else count - 1} is out of range; expected class "
                        f"indices 0..{MAX_CLASSES - 1}")  # fmt: skip
    for split, y in (("training", raw.train_y), ("test", raw.test_y)):
        if int(y.max()) >= count:
            raise DataError(f"{source}: {split} label {int(y.max())} is out of range; the training set's classes "
                            f"are 0..{count - 1}")  # fmt: skip
    return raw.classes or tuple(str(i) for i in range(count))


def _detect(path: Path) -> tuple[str, Path]:
    """``(kind, folder or file holding it)``."""
    kind = path_kind(path)
    if kind == "nothing":
        raise DataError(f"dataset {path} does not exist; expected {' or '.join(PACKAGED)}, an .npz file or a folder")
    if kind == "a regular file":
        with open(path, "rb") as file:
            magic = file.read(4)
        if magic in (b"PK\x03\x04", b"PK\x05\x06"):
            return "npz", path
        raise DataError(f"dataset {path} is not an .npz file (no zip signature); expected a Keras-style .npz with "
                        f"{', '.join(NPZ_KEYS)}, or a folder")  # fmt: skip
    if problem := path_problem(path, "an .npz file or a directory"):
        raise DataError(f"dataset {path} {problem}")
    if find_idx_file(path, idx_split_files("train")[0]) is not None:
        return "idx", path
    for folder in (path, path / "cifar-10-batches-bin"):
        if path_kind(folder / "test_batch.bin") != "nothing" or list(folder.glob("data_batch_*.bin")):
            return "cifar10", folder
    if path_kind(path / "data_batch_1") != "nothing" or path_kind(path / "cifar-10-batches-py") != "nothing":
        raise DataError(f"dataset {path} is CIFAR-10's pickled (python) version, which unitrain never "
                        "unpickles; use the binary version (data_batch_*.bin, test_batch.bin)")  # fmt: skip
    if path_kind(path / "train") == "a directory":
        return "images", path
    raise DataError(f"dataset folder {path} holds none of: IDX files with MNIST's names (train-images-idx3-ubyte"
                    "[.gz], ...), CIFAR-10 binary batches (data_batch_*.bin, test_batch.bin), image folders "
                    "train/<class>/ and test/<class>/")  # fmt: skip


def _read(path: Path, check_size=None) -> _Raw:
    kind, where = _detect(path)
    if kind == "npz":
        return _read_npz(where, check_size)
    return {"idx": _read_idx_folder, "cifar10": _read_cifar10, "images": _read_image_folder}[kind](where)


# --- .npz -------------------------------------------------------------------------------------


def _read_npz(path: Path, check_size=None) -> _Raw:
    with open_npz(path, str(path), DataError) as archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        if set(members) != set(NPZ_KEYS):
            raise DataError(f"{path} holds the arrays {short_list(sorted(members))}; expected exactly "
                            f"{', '.join(NPZ_KEYS)} (Keras's layout)")  # fmt: skip
        headers = _npy_headers(archive, members, path)
        train, test = headers["x_train"][0], headers["x_test"][0]
        if check_size is not None and len(train) in (3, 4) and train[1:] == test[1:]:  # others: refused below
            check_size(train[0] + test[0], (1, *train[1:]) if len(train) == 3 else (train[3], *train[1:3]))
        arrays = {key: _read_npy(archive, members[key], f"{path}: {key}", headers[key]) for key in NPZ_KEYS}
    split = {}
    for which in ("train", "test"):
        x, y = arrays[f"x_{which}"], arrays[f"y_{which}"]
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and 1 <= x.shape[3] <= 4:
            x = channels_last_to_nchw(x)
        else:
            raise DataError(f"{path}: x_{which} has shape {x.shape}; expected (N, H, W) or channels-last "
                            "(N, H, W, C) with C = 1..4")  # fmt: skip
        if y.ndim == 2 and y.shape[1] == 1:  # Keras's CIFAR-10: (N, 1)
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"{path}: y_{which} has shape {y.shape}; expected (N,) or (N, 1) class indices")
        if len(x) != len(y):
            raise DataError(f"{path}: x_{which} has {len(x)} samples but y_{which} has {len(y)}")
        if y.dtype.kind == "u" and len(y) and (high := int(y.max())) >= MAX_CLASSES:  # int64 would wrap it negative
            raise DataError(f"{path}: label {high} is out of range; expected class indices 0..{MAX_CLASSES - 1}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{path}: x_{which} holds NaN or infinite values")
        split[which] = (x, y.astype(np.int64))
    return _Raw("npz", *split["train"], *split["test"])


def load_target_arrays(source: str | os.PathLike) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of an .npz holding exactly ``x_train, y_train, x_test, y_test`` for
    regression or multi-label training: ``x`` numeric of any shape ``(N, ...)`` and ``y`` numeric
    of any shape ``(N, ...)`` (0/1 vectors for multi-label), both as given (no normalisation:
    ``normalization`` records mean 0, std 1); ``y`` float32, ``x`` too unless it holds integers
    (token ids), which stay int64."""
    path = Path(source)
    if problem := path_problem(path, "an .npz file"):
        raise DataError(f"dataset {path} {problem}")
    with open_npz(path, str(path), DataError) as archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        if set(members) != set(NPZ_KEYS):
            raise DataError(f"{path} holds the arrays {short_list(sorted(members))}; expected exactly "
                            f"{', '.join(NPZ_KEYS)}")  # fmt: skip
        headers = _npy_headers(archive, members, path, values=True)
        arrays = {key: _read_npy(archive, members[key], f"{path}: {key}", headers[key]) for key in NPZ_KEYS}
    for key, array in arrays.items():
        if array.ndim < (2 if key.startswith("x_") else 1) or (key.endswith("_train") and len(array) == 0):
            raise DataError(f"{path}: {key} has shape {array.shape}; expected (N, ...) with N >= 1 samples")
        if not np.isfinite(array).all():
            raise DataError(f"{path}: {key} holds NaN or infinite values")
    for which in ("train", "test"):
        x, y = arrays[f"x_{which}"], arrays[f"y_{which}"]
        if len(x) != len(y):
            raise DataError(f"{path}: x_{which} has {len(x)} samples but y_{which} has {len(y)}")
    for name in ("x", "y"):
        if arrays[f"{name}_train"].shape[1:] != arrays[f"{name}_test"].shape[1:]:
            raise DataError(f"{path}: {name}_train's samples are {_shape(arrays[f'{name}_train'])}, {name}_test's "
                            f"{_shape(arrays[f'{name}_test'])}; expected one shape")  # fmt: skip
    identity = Normalization((0.0,), (1.0,), f"none: {path}'s arrays as given")
    return tuple(
        ArrayDataset(_samples(arrays[f"x_{which}"]), arrays[f"y_{which}"].astype(np.float32), identity)
        for which in SPLITS
    )


def _samples(x: np.ndarray) -> np.ndarray:
    """Integer samples stay integers (token ids for an embedding), the others become float32."""
    return x.astype(np.int64) if x.dtype.kind in "iu" else x.astype(np.float32)


def _npy_headers(archive: zipfile.ZipFile, members: dict[str, str], path: Path, values: bool = False) -> dict:
    """Every array's header first: what they declare together is checked before any data is
    inflated, since a small file of deflated zeros declares gigabytes."""
    headers = {key: _npy_header(archive, members[key], key, f"{path}: {key}", values) for key in NPZ_KEYS}
    total = sum(_npy_bytes(shape, dtype) for shape, _, dtype in headers.values())
    if total > MAX_DATA_BYTES:
        raise DataError(f"{path}: its arrays declare {total} bytes together; at most {MAX_DATA_BYTES} are read")
    return headers


def _npy_header(archive: zipfile.ZipFile, member: str, key: str, name: str, values: bool = False) -> tuple:
    """``(shape, fortran_order, dtype)`` of one array of an .npz, checked; no data is read
    (``values``: any numeric samples and targets, as regression reads them)."""
    with archive.open(member) as file:
        shape, fortran, dtype = _npy_header_of(file, name)
    samples = key.startswith("x_")
    allowed = dtype.kind in "fiub" if values else (dtype == np.uint8 or dtype.kind == "f") if samples else (
        dtype.kind in "iu")  # fmt: skip
    if dtype.hasobject or not allowed:
        expected = "numbers" if values else "uint8 pixels or floats in [0, 1]" if samples else "integer class indices"
        raise DataError(f"{name} has dtype {dtype}; expected {expected}")
    if any(length < 0 for length in shape):
        raise DataError(f"{name} declares shape {shape}; expected lengths >= 0")
    if (size := _npy_bytes(shape, dtype)) > MAX_DATA_BYTES:
        raise DataError(f"{name} declares shape {shape}, {size} bytes; at most {MAX_DATA_BYTES} are read")
    return shape, fortran, dtype


def _npy_header_of(file, name: str) -> tuple:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(file)
        if version == (1, 0):
            return fmt.read_array_header_1_0(file)
        if version == (2, 0):
            return fmt.read_array_header_2_0(file)
    except ValueError as error:
        raise DataError(f"{name}: not a .npy array: {str(error)[:200]}") from None
    raise DataError(f"{name}: .npy format version {version} is not supported; expected 1.0 or 2.0")


def _npy_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _read_npy(archive: zipfile.ZipFile, member: str, name: str, header: tuple) -> np.ndarray:
    """The data of one array of an .npz, whose header :func:`_npy_header` checked."""
    shape, fortran, dtype = header
    with archive.open(member) as file:
        _npy_header_of(file, name)
        data = _read_exactly(file, _npy_bytes(shape, dtype), name)
    try:
        array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    except ValueError as error:
        raise DataError(f"{name}: {str(error)[:200]}") from None
    return np.ascontiguousarray(array)


def _read_exactly(file, size: int, name: str) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise DataError(f"{name}: truncated: its shape needs {size} data bytes, found {len(data)}")
    return data


# --- a folder of IDX files --------------------------------------------------------------------


def _read_idx_folder(path: Path) -> _Raw:
    arrays = []
    for split in SPLITS:
        for stem, dims in zip(idx_split_files(split), ((None, None, None), (None,)), strict=True):
            found = find_idx_file(path, stem)
            if found is None:
                raise DataError(f"IDX file {stem}(.gz) not found in {path}")
            arrays.append(read_idx_file(found, "IDX file", dims))
    train_x, train_y, test_x, test_y = arrays
    for split, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        if len(x) != len(y):
            raise DataError(f"{path}: {split}-images has {len(x)} images but {split}-labels has {len(y)} labels")
    return _Raw("idx", train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64))


# --- CIFAR-10 binary --------------------------------------------------------------------------


def _read_cifar10(folder: Path) -> _Raw:
    def number(path: Path) -> int:
        match = re.fullmatch(r"data_batch_(\d+)\.bin", path.name)
        return int(match.group(1)) if match else -1

    train_files = sorted((p for p in folder.glob("data_batch_*.bin") if number(p) >= 0), key=number)
    if not train_files:
        raise DataError(f"CIFAR-10 folder {folder} has no data_batch_*.bin training batches")
    budget = [MAX_DATA_BYTES]
    train = [_read_cifar_batch(p, budget) for p in train_files]
    test = _read_cifar_batch(folder / "test_batch.bin", budget)
    return _Raw(
        "cifar10",
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        *test,
        CIFAR10_CLASSES,
    )


def _read_cifar_batch(path: Path, budget: list[int]) -> tuple[np.ndarray, np.ndarray]:
    if problem := path_problem(path, "a CIFAR-10 binary batch"):
        raise DataError(f"CIFAR-10 file {path} {problem}")
    size = path.stat().st_size
    if size == 0 or size % _CIFAR_RECORD:
        raise DataError(f"{path} has {size} bytes, expected a positive multiple of {_CIFAR_RECORD} "
                        "(CIFAR-10 binary records: a label byte and 3x32x32 pixels)")  # fmt: skip
    budget[0] -= size
    if budget[0] < 0:
        raise DataError(f"{path}: the CIFAR-10 files hold more than {MAX_DATA_BYTES} bytes")
    with open(path, "rb") as file:
        records = np.frombuffer(_read_exactly(file, size, str(path)), np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} is out of range; CIFAR-10's classes are 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


# --- a folder of class folders of images ------------------------------------------------------


def _read_image_folder(path: Path) -> _Raw:
    listing = {split: _list_images(path / split) for split in SPLITS}
    classes = tuple(sorted(listing["train"]))
    if extra := sorted(set(listing["test"]) - set(classes)):
        raise DataError(f"{path / 'test'} has class folders {short_list(extra)} that {path / 'train'} lacks")
    headers = {}  # every image's size and mode, from its header, before any is decoded
    first = None
    for split in SPLITS:
        for files in listing[split].values():
            for file in files:
                headers[file] = _image_header(file)
                size = headers[file][0]
                if first is None:
                    first = (file, size)
                elif size != first[1]:
                    raise DataError(f"images of mixed sizes: {first[0]} is {_wxh(first[1])}, {file} is {_wxh(size)}; "
                                    "expected one size (resize them first)")  # fmt: skip
    if first is None:
        raise DataError(f"image folder {path} holds no images")
    modes = {}  # the first file of each mode, to name in a message
    for file, (_, mode) in headers.items():
        modes.setdefault(mode, file)
    if wide := [mode for mode in modes if mode in _WIDE_MODES]:
        raise DataError(f"image {modes[wide[0]]} has mode {wide[0]} ({_WIDE_MODES[wide[0]]}); expected 8-bit "
                        "grayscale or colour, or 16-bit grayscale")  # fmt: skip
    deep = [file for mode, file in modes.items() if mode in _GRAY16_MODES]  # read whole, as floats in [0, 1]
    color = [file for mode, file in modes.items() if mode not in ("L", "1", *_GRAY16_MODES)]
    if deep and color:
        raise DataError(f"image {deep[0]} is 16-bit grayscale but {color[0]} is in colour; expected one kind of "
                        "image (convert them first)")  # fmt: skip
    gray = not color
    channels, (width, height) = (1 if gray else 3), first[1]
    dtype = np.dtype(np.float32 if deep else np.uint8)
    if len(headers) * channels * width * height * dtype.itemsize > MAX_DATA_BYTES:
        raise DataError(f"image folder {path}: {len(headers)} images of {_wxh(first[1])} exceed {MAX_DATA_BYTES} bytes")
    out = []
    for split in SPLITS:
        files = [(file, classes.index(name)) for name, group in sorted(listing[split].items()) for file in group]
        x = np.empty((len(files), channels, height, width), dtype)
        for i, (file, _) in enumerate(files):
            pixels = _decode(file, "L" if gray else "RGB", deep)
            x[i] = pixels[None] if gray else pixels.transpose(2, 0, 1)
        out += [x, np.array([label for _, label in files], np.int64)]
    return _Raw("images", *out, classes)


def _list_images(folder: Path) -> dict[str, list[Path]]:
    if problem := path_problem(folder, "a directory"):
        raise DataError(f"image folder {folder} {problem}")
    classes = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataError(f"{entry.path} is not a class folder; expected {folder}/<class>/<images>")
        classes[entry.name] = [
            Path(e.path) for e in sorted(os.scandir(entry.path), key=lambda e: e.name) if not e.name.startswith(".")
        ]
    return classes


def _image_header(file: Path) -> tuple[tuple[int, int], str]:
    if problem := path_problem(file, "an image file"):
        raise DataError(f"image {file} {problem}")
    with _pillow_errors(file), Image.open(file) as image:  # reads the header only
        return image.size, image.mode


def _decode(file: Path, mode: str, scaled: bool) -> np.ndarray:
    """``file``'s pixels in ``mode``; ``scaled``: as floats in [0, 1] (a 16-bit image's whole range,
    which Pillow's convert would clip to 255)."""
    with _pillow_errors(file), Image.open(file) as image:
        if not scaled:
            return np.asarray(image.convert(mode), np.uint8)
        if image.mode in _GRAY16_MODES:
            return np.asarray(image, np.float32) / 65535
        return np.asarray(image.convert(mode), np.float32) / 255


@contextlib.contextmanager
def _pillow_errors(file: Path):
    """Pillow's failures on one file as one DataError; its decompression-bomb guard kept (over
    its pixel limit Pillow warns, which is made an error here; over twice the limit it raises)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {file} declares more pixels than Pillow decodes ({Image.MAX_IMAGE_PIXELS})") from None
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise DataError(f"image {file} is not a readable image: {str(error)[:200]}") from None


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
