"""Framework-neutral layer specs.

A spec describes a layer; it holds no weights. Each backend builds the native equivalent
(``torch.nn.Linear``, ``mindspore.nn.Dense``, ``chainer.links.Linear``, NumPy arrays).
Names and layouts of weights follow PyTorch: a ``Sequential`` of specs has exactly the
``state_dict`` keys and shapes of the equivalent ``torch.nn.Sequential``.

Shape inference (:meth:`Layer.output_shape`) lets the core reject a batch of the wrong
feature size with a message naming the layer, before any framework sees it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

Shape = tuple[int, ...]


def _positive_int(layer: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: {name} must be a positive integer, got {value!r}")


class Layer:
    """Base of all layer specs. Subclasses are frozen dataclasses."""

    def param_shapes(self) -> dict[str, Shape]:
        """Trainable parameters, in PyTorch order (``weight`` before ``bias``)."""
        return {}

    def buffer_shapes(self) -> dict[str, Shape]:
        """Non-trainable state saved with the weights (BatchNorm running statistics)."""
        return {}

    def output_shape(self, input_shape: Shape) -> Shape:
        """Per-sample output shape; raises ``ValueError`` naming the mismatch."""
        return input_shape

    def fan_in(self) -> int:
        """Inputs feeding one output unit; sets the init bound ``1/sqrt(fan_in)``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Linear(Layer):
    in_features: int
    out_features: int
    bias: bool = True

    def __post_init__(self):
        _positive_int("Linear", "in_features", self.in_features)
        _positive_int("Linear", "out_features", self.out_features)

    def param_shapes(self):
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.bias:
            shapes["bias"] = (self.out_features,)
        return shapes

    def output_shape(self, input_shape):
        if len(input_shape) != 1 or input_shape[0] != self.in_features:
            raise ValueError(
                f"{self} expects {self.in_features} input features per sample, got per-sample shape {input_shape}"
            )
        return (self.out_features,)

    def fan_in(self):
        return self.in_features


@dataclass(frozen=True)
class Conv2d(Layer):
    """2-D convolution over NCHW input, square kernel, no dilation or groups."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    bias: bool = True

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "kernel_size", "stride"):
            _positive_int("Conv2d", name, getattr(self, name))
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"Conv2d: padding must be a non-negative integer, got {self.padding!r}")

    def param_shapes(self):
        k = self.kernel_size
        shapes = {"weight": (self.out_channels, self.in_channels, k, k)}
        if self.bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    def output_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            raise ValueError(
                f"{self} expects per-sample input (channels={self.in_channels}, height, width), "
                f"got per-sample shape {input_shape}"
            )
        _, h, w = input_shape
        out_h, out_w = ((d + 2 * self.padding - self.kernel_size) // self.stride + 1 for d in (h, w))
        if out_h < 1 or out_w < 1:
            raise ValueError(f"{self}: input {h}x{w} is smaller than the kernel")
        return (self.out_channels, out_h, out_w)

    def fan_in(self):
        return self.in_channels * self.kernel_size**2


@dataclass(frozen=True)
class MaxPool2d(Layer):
    """Max pooling with a square window; stride defaults to the window (PyTorch's default)."""

    kernel_size: int
    stride: int | None = None

    def __post_init__(self):
        _positive_int("MaxPool2d", "kernel_size", self.kernel_size)
        if self.stride is not None:
            _positive_int("MaxPool2d", "stride", self.stride)

    @property
    def step(self) -> int:
        return self.stride or self.kernel_size

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self} expects per-sample input (C, H, W), got {input_shape}")
        c, h, w = input_shape
        out_h, out_w = ((d - self.kernel_size) // self.step + 1 for d in (h, w))
        if out_h < 1 or out_w < 1:
            raise ValueError(f"{self}: input {h}x{w} is smaller than the window")
        return (c, out_h, out_w)


@dataclass(frozen=True)
class ReLU(Layer):
    pass


@dataclass(frozen=True)
class Flatten(Layer):
    """Flattens every dimension but the batch one (C-order, as ``torch.nn.Flatten``)."""

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: in training zero each element with probability ``p`` and scale the
    survivors by ``1/(1-p)``; identity in eval mode."""

    p: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {self.p!r}")


@dataclass(frozen=True)
class _BatchNorm(Layer):
    """PyTorch's BatchNorm. Training: normalise with the batch mean and biased variance and
    update ``running = (1 - momentum) * running + momentum * batch_stat`` where the variance
    fed to the running estimate is the *unbiased* one. Eval: normalise with the running
    statistics. ``num_batches_tracked`` counts training batches, as in PyTorch."""

    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1

    _input_rank = 0

    def __post_init__(self):
        _positive_int(type(self).__name__, "num_features", self.num_features)
        if not self.eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {self.eps!r}")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in (0, 1], got {self.momentum!r}")

    def param_shapes(self):
        return {"weight": (self.num_features,), "bias": (self.num_features,)}

    def buffer_shapes(self):
        n = (self.num_features,)
        return {"running_mean": n, "running_var": n, "num_batches_tracked": ()}

    def output_shape(self, input_shape):
        if len(input_shape) != self._input_rank or input_shape[0] != self.num_features:
            raise ValueError(
                f"{self} expects per-sample input of rank {self._input_rank} with "
                f"{self.num_features} channels first, got {input_shape}"
            )
        return input_shape


@dataclass(frozen=True)
class BatchNorm1d(_BatchNorm):
    """Over (N, C) input."""

    _input_rank = 1


@dataclass(frozen=True)
class BatchNorm2d(_BatchNorm):
    """Over (N, C, H, W) input, statistics per channel."""

    _input_rank = 3


@dataclass(frozen=True)
class Sequential(Layer):
    """An ordered stack; layer ``i`` owns the names ``"{i}.weight"`` etc., as in PyTorch."""

    layers: tuple[Layer, ...] = field(default_factory=tuple)

    def __init__(self, *layers: Layer):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {index} is {layer!r}, expected a unitrain layer spec")
        object.__setattr__(self, "layers", tuple(layers))

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def named_layers(self, prefix: str = "") -> Iterator[tuple[str, Layer]]:
        """Leaf layers with their dotted PyTorch prefix (``"3"``, ``"2.0"`` when nested)."""
        for index, layer in enumerate(self.layers):
            name = f"{prefix}{index}"
            if isinstance(layer, Sequential):
                yield from layer.named_layers(name + ".")
            else:
                yield name, layer

    def param_shapes(self):
        return {
            f"{name}.{key}": shape for name, layer in self.named_layers() for key, shape in layer.param_shapes().items()
        }

    def buffer_shapes(self):
        return {
            f"{name}.{key}": shape
            for name, layer in self.named_layers()
            for key, shape in layer.buffer_shapes().items()
        }

    def state_shapes(self) -> dict[str, Shape]:
        """Every key of the weight file, in ``torch.nn.Sequential.state_dict()`` order."""
        shapes = {}
        for name, layer in self.named_layers():
            for key, shape in {**layer.param_shapes(), **layer.buffer_shapes()}.items():
                shapes[f"{name}.{key}"] = shape
        return shapes

    def output_shape(self, input_shape):
        for _, layer in self.named_layers():
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def has(self, kind: type[Layer]) -> bool:
        return any(isinstance(layer, kind) for _, layer in self.named_layers())


def mlp() -> Sequential:
    """The MindSpore beginner tutorial's network: 784-512-512-10."""
    return Sequential(Flatten(), Linear(784, 512), ReLU(), Linear(512, 512), ReLU(), Linear(512, 10))


def cnn() -> Sequential:
    """The CNN tutorial's LeNet-style network for 1x28x28 input."""
    return Sequential(
        Conv2d(1, 6, 5), ReLU(), MaxPool2d(2),
        Conv2d(6, 12, 5), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(192, 120), ReLU(), Linear(120, 60), ReLU(), Linear(60, 10),
    )  # fmt: skip


PRESETS = {"mlp": mlp, "cnn": cnn}


def preset(name: str) -> Sequential:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(PRESETS)}") from None
