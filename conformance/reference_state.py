"""The reference's initial weights and weight files: the documented initial draw, random
non-trivial states, torchvision's ResNet-18 keys, a minimal safetensors writer (see :mod:`.reference`)."""

from __future__ import annotations

import ast
import json
import math
import struct
from pathlib import Path

import numpy as np

from unitrain import layers, sequences


def initial_state(model: layers.Layer, seed: int) -> dict[str, np.ndarray]:
    """The documented initial draw (see :func:`unitrain.weights.init_weights`): per Linear/Conv2d/
    ConvTranspose2d, weight then bias from ``default_rng(seed)`` in float64, rounded to float32, each by the
    layer's ``weight_init``/``bias_init`` or else the model's ``init`` (:func:`_scheme`): PyTorch's
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``fan_in = in/groups * kh * kw``), torchvision's
    ResNet convolutions ``N(0, 2 / (out * kh * kw))``, Keras' glorot uniform with zero bias,
    Chainer's LeCun normal with zero bias; ConvTranspose2d's default PyTorch's whatever the scheme,
    with ``fan_in = out/groups * kh * kw``. BatchNorm/LayerNorm weight 1, bias 0 (a BatchNorm's
    ``weight_init``/``bias_init`` if given), running mean 0, variance 1, count 0."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, layer in model.named_layers():
        if isinstance(layer, layers.Linear):
            fan_in = layer.in_features
        elif isinstance(layer, layers.Conv2d):
            fan_in = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, layers.ConvTranspose2d):  # torch's fan in: the weight's dimension 1, output channels
            fan_in = layer.out_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, (layers._BatchNorm, layers.LayerNorm)):
            for key, shape in {**layer.param_shapes(), **layer.buffer_shapes()}.items():
                if key == "num_batches_tracked":
                    state[f"{name}.{key}"] = np.array(0, np.int64)
                elif getattr(layer, f"{key}_init", None) is not None:
                    state[f"{name}.{key}"] = _draw(rng, str(getattr(layer, f"{key}_init")), shape, None).astype(
                        np.float32)  # fmt: skip
                else:
                    state[f"{name}.{key}"] = np.full(
                        shape, 1.0 if key in ("weight", "running_var") else 0.0, np.float32
                    )
            continue
        else:
            continue
        for key, shape in layer.param_shapes().items():
            how = getattr(layer, f"{key}_init") or _scheme(model, layer, key)
            state[f"{name}.{key}"] = _draw(rng, str(how), shape, fan_in).astype(np.float32)
    return state


def _scheme(model, layer, key: str) -> str:
    init = getattr(model, "init", "pytorch")
    if isinstance(layer, layers.ConvTranspose2d):  # no scheme names it: PyTorch's default
        return "pytorch"
    if init == "keras":
        return "xavier_uniform" if key == "weight" else "zeros"
    if init == "chainer":
        return "lecun_normal" if key == "weight" else "zeros"
    if init == "resnet" and key == "weight" and isinstance(layer, layers.Conv2d):
        return "kaiming_normal(mode='fan_out', nonlinearity='relu')"
    if init in ("pytorch", "resnet") or key == "bias":
        return "pytorch"
    return init


def _draw(rng, how: str, shape, layer_fan_in) -> np.ndarray:
    """One tensor drawn as ``torch.nn.init``'s function of the name ``how`` starts with documents;
    ``how`` is the initialiser's text (``normal(std=0.02)``)."""
    call = ast.parse(how, mode="eval").body
    name = call.id if isinstance(call, ast.Name) else call.func.id
    args = {} if isinstance(call, ast.Name) else {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    fan_in, fan_out = (shape[1] * receptive, shape[0] * receptive) if len(shape) >= 2 else (None, None)
    gains = {"relu": 2.0, "tanh": 25 / 9, "linear": 1.0, "sigmoid": 1.0, "conv2d": 1.0, "selu": 9 / 16}
    if name == "pytorch":
        return rng.uniform(-1 / math.sqrt(layer_fan_in), 1 / math.sqrt(layer_fan_in), shape)
    if name in ("xavier_uniform", "xavier_normal"):
        std = args.get("gain", 1.0) * math.sqrt(2.0 / (fan_in + fan_out))
        return rng.uniform(-math.sqrt(3) * std, math.sqrt(3) * std, shape) if "uniform" in name else rng.normal(
            0, std, shape)  # fmt: skip
    if name in ("kaiming_uniform", "kaiming_normal"):
        slope, nonlinearity = args.get("a", 0.0), args.get("nonlinearity", "leaky_relu")
        gain2 = 2.0 / (1 + slope**2) if nonlinearity == "leaky_relu" else gains[nonlinearity]
        std = math.sqrt(gain2 / (fan_out if args.get("mode") == "fan_out" else fan_in))
        return rng.uniform(-math.sqrt(3) * std, math.sqrt(3) * std, shape) if "uniform" in name else rng.normal(
            0, std, shape)  # fmt: skip
    if name == "lecun_uniform":
        return rng.uniform(-math.sqrt(3 / fan_in), math.sqrt(3 / fan_in), shape)
    if name == "lecun_normal":
        return rng.normal(0, 1 / math.sqrt(fan_in), shape)
    if name == "normal":
        return rng.normal(args.get("mean", 0.0), args.get("std", 1.0), shape)
    if name == "uniform":
        return rng.uniform(args.get("a", 0.0), args.get("b", 1.0), shape)
    if name in ("zeros", "ones", "constant"):
        return np.full(shape, {"zeros": 0.0, "ones": 1.0}.get(name, args.get("val", 0.0)))
    raise NotImplementedError(f"the reference does not draw {how}")


def random_state(model: layers.Layer, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 weights with every entry non-trivial (BatchNorm scales, shifts and running
    statistics away from 1 and 0), to load into a loop under test."""
    state = {}
    for name, layer in model.named_layers():
        for key, shape in {**layer.param_shapes(), **layer.buffer_shapes()}.items():
            if key == "num_batches_tracked":
                value = np.array(3, np.int64)
            elif key == "running_var" or (key == "weight" and isinstance(layer, (layers._BatchNorm, layers.LayerNorm))):
                value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            else:
                fanned = (layers.Linear, layers.Conv2d, sequences.Conv1d)
                bound = 1 / math.sqrt(layer.fan_in()) if isinstance(layer, fanned) else 0.5
                value = rng.uniform(-bound, bound, shape).astype(np.float32)
            state[f"{name}.{key}"] = value
    for key, _ in getattr(model, "tied", ()):  # a graph's tied parameter is its source's tensor
        del state[key]
    return state


def torchvision_resnet18_state_shapes(num_classes: int = 1000, in_channels: int = 3) -> dict[str, tuple]:
    """``torchvision.models.resnet18().state_dict()``'s keys and shapes, in order, written from
    torchvision's resnet.py: ``ResNet.__init__`` registers conv1 (7x7, no bias), bn1, relu,
    maxpool, layer1..layer4 (two BasicBlocks each), avgpool, fc; a BasicBlock registers conv1,
    bn1, relu, conv2, bn2 (3x3 convs without bias) and, in the first block of layers 2-4, a
    downsample ``Sequential(conv1x1 stride 2, BatchNorm2d)``. (``in_channels`` replaces conv1's 3.)"""

    def batch_norm(name, n):
        return {f"{name}.weight": (n,), f"{name}.bias": (n,), f"{name}.running_mean": (n,),
                f"{name}.running_var": (n,), f"{name}.num_batches_tracked": ()}  # fmt: skip

    shapes = {"conv1.weight": (64, in_channels, 7, 7), **batch_norm("bn1", 64)}
    planes_in = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix, cin = f"layer{stage}.{block}", planes_in if block == 0 else planes
            shapes[f"{prefix}.conv1.weight"] = (planes, cin, 3, 3)
            shapes.update(batch_norm(f"{prefix}.bn1", planes))
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(batch_norm(f"{prefix}.bn2", planes))
            if block == 0 and cin != planes:
                shapes[f"{prefix}.downsample.0.weight"] = (planes, cin, 1, 1)
                shapes.update(batch_norm(f"{prefix}.downsample.1", planes))
        planes_in = planes
    return {**shapes, "fc.weight": (num_classes, 512), "fc.bias": (num_classes,)}


_SAFETENSORS_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}


def write_safetensors(path: Path, state: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer (little-endian header length, JSON header, raw data), as
    the format's specification describes it; independent of :mod:`unitrain.weights`."""
    header, chunks, offset = {}, [], 0
    for name in sorted(state):
        data = np.ascontiguousarray(state[name]).astype(state[name].dtype.newbyteorder("<")).tobytes()
        code = _SAFETENSORS_CODES[np.dtype(state[name].dtype)]
        header[name] = {
            "dtype": code,
            "shape": list(np.shape(state[name])),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
