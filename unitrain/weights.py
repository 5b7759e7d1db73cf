"""Weights: the initial draw shared by every backend, and safetensors files.

A *state* is a ``dict[str, numpy.ndarray]`` with the keys and layouts of the equivalent
PyTorch ``nn.Sequential.state_dict()``. Files are safetensors, written atomically; loading
never unpickles anything.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .files import atomic_write
from .layers import Conv2d, Linear, Sequential, _BatchNorm

State = dict[str, np.ndarray]


class WeightsError(ValueError):
    """A weights file or state that does not fit: wrong keys, shapes or a malformed file."""


def init_weights(model: Sequential, seed: int) -> State:
    """PyTorch's default initialisation, drawn by NumPy so every backend starts identical.

    Linear and Conv2d: weight and bias ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (what
    ``kaiming_uniform_(a=sqrt(5))`` amounts to), drawn in float64 from
    ``numpy.random.default_rng(seed)`` layer by layer, weight before bias, then rounded to
    float32. BatchNorm: weight 1, bias 0, running mean 0, running variance 1.
    """
    rng = np.random.default_rng(seed)
    state: State = {}
    for name, layer in model.named_layers():
        if isinstance(layer, (Linear, Conv2d)):
            bound = 1.0 / math.sqrt(layer.fan_in())
            for key, shape in layer.param_shapes().items():
                state[f"{name}.{key}"] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif isinstance(layer, _BatchNorm):
            n = layer.num_features
            state[f"{name}.weight"] = np.ones(n, np.float32)
            state[f"{name}.bias"] = np.zeros(n, np.float32)
            state[f"{name}.running_mean"] = np.zeros(n, np.float32)
            state[f"{name}.running_var"] = np.ones(n, np.float32)
            state[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
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
