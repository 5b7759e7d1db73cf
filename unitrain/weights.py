"""Weights: the initial draw shared by every backend, and safetensors files.

A *state* is a ``dict[str, numpy.ndarray]`` with the keys and layouts of the equivalent
PyTorch ``nn.Sequential.state_dict()``. Files are safetensors, written atomically; loading
never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .layers import Container, Conv2d, LayerNorm, Linear, _BatchNorm

State = dict[str, np.ndarray]


class WeightsError(ValueError):
    """A weights file or state that does not fit: wrong keys, shapes or a malformed file."""


def init_weights(model: Container, seed: int) -> State:
    """The first weights, drawn by NumPy so every backend starts identical.

    Draws are float64 from ``numpy.random.default_rng(seed)``, leaf by leaf in
    ``state_dict`` order, weight before bias, then rounded to float32. PyTorch's defaults
    (``init="pytorch"``): Linear and Conv2d weight and bias ``~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in))`` with ``fan_in = in_channels / groups * kh * kw`` (what
    ``kaiming_uniform_(a=sqrt(5))`` amounts to); BatchNorm and LayerNorm weight 1, bias 0,
    running mean 0, running variance 1. ``init="resnet"`` (torchvision's ResNet) changes
    only Conv2d weights: ``~ N(0, 2 / fan_out)`` with ``fan_out = out_channels * kh * kw``
    (``kaiming_normal_(mode="fan_out", nonlinearity="relu")``).
    """
    rng = np.random.default_rng(seed)
    resnet = getattr(model, "init", "pytorch") == "resnet"
    state: State = {}
    for name, layer in model.named_layers():
        shapes = layer.param_shapes()
        if isinstance(layer, (Linear, Conv2d)):
            bound = 1.0 / math.sqrt(layer.fan_in())
            for key, shape in shapes.items():
                if resnet and isinstance(layer, Conv2d) and key == "weight":
                    std = math.sqrt(2.0 / (shape[0] * math.prod(shape[2:])))
                    value = rng.normal(0.0, std, shape)
                else:
                    value = rng.uniform(-bound, bound, shape)
                state[f"{name}.{key}"] = value.astype(np.float32)
        elif isinstance(layer, (_BatchNorm, LayerNorm)):
            for key, shape in {**shapes, **layer.buffer_shapes()}.items():
                fill = 1 if key in ("weight", "running_var") else 0
                state[f"{name}.{key}"] = np.full(shape, fill, np.int64 if key == "num_batches_tracked" else np.float32)
    return state


def check_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray], source="state"):
    """Raise :class:`WeightsError` unless ``state`` has exactly the expected keys and shapes."""
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    for key, shape in expected.items():
        if key in state and tuple(np.shape(state[key])) != tuple(shape):
            problems.append(f"key {key!r} has shape {tuple(np.shape(state[key]))}, the model expects {tuple(shape)}")
    if problems:
        raise WeightsError(f"{source} does not match the model: " + "; ".join(problems))


# --- safetensors ----------------------------------------------------------------------------
# Format: u64 little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the raw little-endian tensor bytes. https://github.com/huggingface/safetensors

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, chunks) -> None:
    """Write ``chunks`` (bytes-likes) to ``path`` so that a crash at any instant leaves either
    the old file or the complete new one: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from others
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent or Path("."))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name, value in tensors.items():
        array = np.asarray(value, order="C")  # ascontiguousarray would turn 0-d into 1-d
        if array.dtype not in _CODES:
            raise WeightsError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _CODES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the reference writer does
    atomic_write(path, [struct.pack("<Q", len(encoded)), encoded, *(a.data for a in arrays)])


def load_safetensors(path) -> tuple[State, dict[str, str]]:
    """Read a safetensors file, validating every offset; returns ``(tensors, metadata)``."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a directory, expected a safetensors file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} does not exist") from None
    except OSError as error:
        raise WeightsError(f"cannot read weights file {path}: {error.strerror}") from None

    def bad(why: str) -> WeightsError:
        return WeightsError(f"{path} is not a valid safetensors file: {why}")

    # A header length of 128 (mod 256) also starts with 0x80: a safetensors header is JSON, from byte 8.
    plausible = len(data) > 8 and data[8:9] == b"{" and struct.unpack("<Q", data[:8])[0] <= len(data) - 8
    if not plausible and (data[:1] == b"\x80" or data[:2] == b"PK"):
        raise bad("it looks like a pickle or torch.save archive; unitrain never unpickles, "
                  "convert it with safetensors.torch.save_file")  # fmt: skip
    if len(data) < 8:
        raise bad(f"{len(data)} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(_MAX_HEADER, len(data) - 8):
        raise bad(f"header length {header_len} exceeds the file's {len(data) - 8} remaining bytes")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad(f"header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + header_len :]
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} has a malformed dtype, shape or data_offsets: {info!r}") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(body):
            raise bad(f"tensor {name!r} spans bytes {begin}..{end} of a {len(body)}-byte body (truncated?)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} of shape {shape} and dtype {info['dtype']} "
                      f"needs {math.prod(shape) * dtype.itemsize} bytes, has {end - begin}")  # fmt: skip
        spans.append((begin, end, name))
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {position} (overlap or gap)")
        position = end
    if position != len(body):
        raise bad(f"{len(body) - position} trailing bytes after the last tensor")
    return tensors, metadata
