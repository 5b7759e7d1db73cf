"""Weights: the initial draw shared by every backend, and safetensors files.

A *state* is a ``dict[str, numpy.ndarray]`` with the keys and layouts of the equivalent
PyTorch ``nn.Sequential.state_dict()``. Files are safetensors, written atomically; loading
never unpickles anything.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from .files import atomic_write
from .initializers import Initializer, initializer
from .layers import Container, Conv2d, ConvTranspose2d, LayerNorm, Linear, _BatchNorm
from .reading import path_problem, short, short_list
from .sequences import Conv1d, Embedding, _Recurrent

State = dict[str, np.ndarray]


class WeightsError(ValueError):
    """A weights file or state that does not fit: wrong keys, shapes or a malformed file."""


def init_weights(model: Container, seed: int) -> State:
    """The first weights, drawn by NumPy so every backend starts identical.

    Draws are float64 from ``numpy.random.default_rng(seed)``, leaf by leaf in
    ``state_dict`` order, weight before bias, then rounded to float32. A Linear's, Conv2d's,
    ConvTranspose2d's or BatchNorm's ``weight_init`` / ``bias_init`` (:mod:`unitrain.initializers`)
    decides its draw; left out, the outermost container's ``init`` does for Linear and Conv2d
    (:func:`initializers_of`). PyTorch's defaults (``init="pytorch"``): weight and bias
    ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = in_channels / groups * kh * kw``
    (what ``kaiming_uniform_(a=sqrt(5))`` amounts to); ConvTranspose2d's likewise with PyTorch's
    ``fan_in = out_channels / groups * kh * kw`` (its weight's dimension 1), whatever the scheme.
    BatchNorm and LayerNorm weight 1, bias 0, running mean 0, running variance 1. Conv1d as
    Conv2d's default; Embedding ``~ N(0, 1)`` with the ``padding_idx`` row zeroed; RNN, LSTM
    and GRU weights and biases ``~ U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))`` (PyTorch's
    defaults; MultiheadAttention's, its ``initial_weights``). A graph with an ``initial_state`` (an
    imported model's weights) starts from that instead, whatever the seed.
    """
    if getattr(model, "initial_state", None) is not None:
        return {key: value.copy() for key, value in model.initial_state.items()}
    rng = np.random.default_rng(seed)
    state: State = {}
    for name, layer in model.named_layers():
        shapes = layer.param_shapes()
        if hasattr(layer, "initial_weights"):  # a layer that draws its own (attention)
            state.update({f"{name}.{key}": value for key, value in layer.initial_weights(rng).items()})
        elif isinstance(layer, Embedding):
            value = rng.standard_normal(shapes["weight"])
            if layer.padding_idx is not None:
                value[layer.padding_idx] = 0
            state[f"{name}.weight"] = value.astype(np.float32)
        elif isinstance(layer, (Linear, Conv2d, ConvTranspose2d)):
            for key, draw in initializers_of(model, layer).items():
                if key in shapes:
                    state[f"{name}.{key}"] = draw.draw(rng, shapes[key], layer.fan_in()).astype(np.float32)
        elif isinstance(layer, (Conv1d, _Recurrent)):
            bound = 1.0 / math.sqrt(layer.fan_in())
            for key, shape in shapes.items():
                state[f"{name}.{key}"] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif isinstance(layer, (_BatchNorm, LayerNorm)):
            for key, shape in {**shapes, **layer.buffer_shapes()}.items():
                if (draw := getattr(layer, f"{key}_init", None)) is not None:  # a BatchNorm's weight_init / bias_init
                    state[f"{name}.{key}"] = draw.draw(rng, shape, None).astype(np.float32)
                    continue
                fill = 1 if key in ("weight", "running_var") else 0
                state[f"{name}.{key}"] = np.full(shape, fill, np.int64 if key == "num_batches_tracked" else np.float32)
    for key, _ in getattr(model, "tied", ()):  # drawn as PyTorch draws it, then replaced by its source
        del state[key]
    return state


#: ``init`` schemes' (weight, bias) initialisers of Linear / Conv2d layers (see unitrain.layers.INIT_SCHEMES)
_SCHEMES = {
    "pytorch": {Linear: ("pytorch", "pytorch"), Conv2d: ("pytorch", "pytorch")},
    "resnet": {
        Linear: ("pytorch", "pytorch"),
        Conv2d: ("kaiming_normal(mode='fan_out', nonlinearity='relu')", "pytorch"),
    },
    "keras": {Linear: ("xavier_uniform", "zeros"), Conv2d: ("xavier_uniform", "zeros")},
    "chainer": {Linear: ("lecun_normal", "zeros"), Conv2d: ("lecun_normal", "zeros")},
}


def initializers_of(model: Container, layer: Linear | Conv2d | ConvTranspose2d) -> dict[str, Initializer]:
    """``{"weight": ..., "bias": ...}``: how ``init_weights`` draws ``layer``'s tensors in ``model``."""
    scheme = getattr(model, "init", "pytorch")
    if isinstance(layer, ConvTranspose2d):  # the schemes name Linear and Conv2d draws only
        weight, bias = "pytorch", "pytorch"
    else:
        weight, bias = _SCHEMES[scheme][type(layer)] if scheme in _SCHEMES else (scheme, "pytorch")
    return {"weight": initializer(layer.weight_init or weight), "bias": initializer(layer.bias_init or bias)}


def check_state(expected: Mapping[str, tuple[int, ...]], state: Mapping, source="state"):
    """Raise :class:`WeightsError` unless ``state`` (arrays, or a file's :class:`Declared`
    tensors) has exactly the expected keys and shapes, and floating values except the integer
    BatchNorm counters ``num_batches_tracked``."""
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {short_list(missing)}")
    if extra:
        problems.append(f"unexpected keys {short_list(extra)}")
    for key, wanted in expected.items():
        if key not in state:
            continue
        shape, dtype = describe(state[key])
        if tuple(shape) != tuple(wanted):
            problems.append(f"key {key!r} has shape {tuple(shape)}, the model expects {tuple(wanted)}")
        elif key.endswith("num_batches_tracked") and dtype not in _INTEGER:
            problems.append(f"key {key!r} has dtype {dtype}, expected an integer dtype")
        elif not key.endswith("num_batches_tracked") and dtype not in _FLOATING:
            problems.append(f"key {key!r} has dtype {dtype}, expected a floating dtype ({', '.join(_FLOATING)})")
    if problems:
        raise WeightsError(f"{source} does not match the model: " + "; ".join(problems))


# --- safetensors ----------------------------------------------------------------------------
# Read and written by the format's reference implementation (the `safetensors` library, memory-
# mapped, which refuses malformed headers); unitrain adds what the format leaves open: pickles
# named as such, duplicate keys, NumPy's limits, and the caller's keys, shapes and dtypes checked
# from the header before any tensor is read.

#: safetensors' dtype names that NumPy holds
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_FLOATING, _INTEGER = ("F16", "F32", "F64"), ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")
_MAX_DIMS = 32  # NumPy 1.x's limit on dimensions
#: The library accepts headers up to 100 MB, and its parser then takes 12x that in memory (1.2 GB,
#: measured); 16 MiB (about 160,000 tensors' entries) keeps a header under 200 MB.
_MAX_HEADER = 16 << 20


class Declared(NamedTuple):
    """A tensor as a safetensors header declares it, before its data is read."""

    shape: tuple[int, ...]
    #: safetensors' name of the dtype ("F32", "I64", "BF16", ...)
    dtype: str


def describe(value) -> Declared:
    """The shape and safetensors dtype name of an array (or of a :class:`Declared` tensor)."""
    if isinstance(value, Declared):
        return value
    array = np.asarray(value)
    return Declared(array.shape, _CODES.get(array.dtype.newbyteorder("="), str(array.dtype)))


def save_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write ``tensors`` to the safetensors file ``path`` with the ``safetensors`` library, in C order."""
    arrays = {name: np.asarray(value, order="C") for name, value in tensors.items()}  # the library needs C order
    for name, array in arrays.items():
        if array.dtype.newbyteorder("=") not in _CODES:
            raise WeightsError(f"tensor {name!r} has dtype {array.dtype}, which unitrain does not write")
    try:
        data = safetensors.numpy.save(arrays, dict(metadata) if metadata else None)
    except (SafetensorError, TypeError) as error:
        raise WeightsError(f"cannot write {path}: {error}") from None
    atomic_write(path, [data])


def load_safetensors(
    path, check: Callable[[dict[str, Declared]], None] | None = None, *, name: str | None = None
) -> tuple[State, dict[str, str]]:
    """Read a safetensors file; returns ``(tensors, metadata)``. ``check`` sees every tensor's
    :class:`Declared` shape and dtype before any data is read, and raises to refuse the file.
    Floating tensors must be finite. ``name`` is how messages call the file (default: its path)."""
    path = Path(path)
    name = name or str(path)
    if problem := path_problem(path, "a safetensors file"):
        raise WeightsError(f"{name} {problem}")

    def bad(why: str) -> WeightsError:
        return WeightsError(f"{name} is not a valid safetensors file: {why}")

    try:
        with open(path, "rb") as file:
            size, start = os.fstat(file.fileno()).st_size, file.read(9)
    except OSError as error:
        raise WeightsError(f"cannot read {name}: {error.strerror}") from None
    if size == 0:
        raise WeightsError(f"{name} is empty, expected a safetensors file")
    # A header length of 128 (mod 256) also starts with 0x80: a safetensors header is JSON, from byte 8.
    header_len = int.from_bytes(start[:8], "little")
    if not (start[8:9] == b"{" and header_len <= size - 8) and (start[:1] == b"\x80" or start[:2] == b"PK"):
        raise bad("it looks like a pickle or torch.save archive; unitrain never unpickles, "
                  "convert it with safetensors.torch.save_file")  # fmt: skip
    if header_len > _MAX_HEADER:
        raise bad(f"its header of {header_len} bytes is over unitrain's limit of {_MAX_HEADER} bytes")
    try:
        with safe_open(path, framework="numpy") as file:
            declared = {key: Declared(tuple(file.get_slice(key).get_shape()), file.get_slice(key).get_dtype())
                        for key in file.offset_keys()}  # fmt: skip
            for key, (shape, dtype) in declared.items():
                if len(shape) > _MAX_DIMS or max(shape, default=0) >= 2**63 or dtype not in _DTYPES:
                    raise bad(f"tensor {key!r} of shape {short_list(shape)} and dtype {dtype} is beyond NumPy "
                              f"(at most {_MAX_DIMS} dimensions below 2^63, dtypes {', '.join(_DTYPES)})")  # fmt: skip
            _refuse_duplicate_keys(path, header_len, bad)
            if check is not None:
                check(declared)
            tensors = {key: file.get_tensor(key) for key in declared}
            metadata = file.metadata() or {}
    except SafetensorError as error:
        raise bad(str(error)) from None
    except OSError as error:
        raise WeightsError(f"cannot read {name}: {error.strerror or error}") from None
    for key, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise WeightsError(f"{name}: tensor {key!r} contains NaN or infinite values")
    return tensors, metadata


def _refuse_duplicate_keys(path: Path, header_len: int, bad) -> None:
    """The library keeps the last of two equal keys; a file that says two things is refused.
    Runs after the library accepted the header, so its nesting and numbers are bounded."""

    def unique(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise bad(f"key {short(key)} appears more than once in the header")
            seen.add(key)
        # returns None: the values are not needed (the library parsed them), so they are not kept

    with open(path, "rb") as file:
        file.seek(8)
        try:
            json.loads(file.read(header_len), object_pairs_hook=unique)
        except ValueError as error:
            if isinstance(error, WeightsError):
                raise
            raise bad(f"header is not JSON ({error})") from None
