"""Framework-neutral layer specs.

A spec describes a layer; it holds no weights. Each backend builds the native equivalent
(``torch.nn.Linear``, ``mindspore.nn.Dense``, ``chainer.links.Linear``, NumPy arrays).
Class names, argument names, defaults and equations are PyTorch's, and a model's weight
names are exactly the ``state_dict`` keys and shapes of the equivalent ``torch.nn`` model.

A model is a tree: containers (:class:`Sequential`, :class:`Residual`) whose leaves are
layers. Backends build the tree recursively, so a residual add happens where the spec puts it.
Pair arguments (``kernel_size``, ``stride``, ...) accept an int or a 2-tuple and are stored
as ``(h, w)`` tuples.

Shape inference (:meth:`Layer.output_shape`) lets the core reject a batch or a model that
does not fit, before any framework sees it, with a message naming the layer's dotted path.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from . import dialects
from .initializers import Initializer, initializer

Shape = tuple[int, ...]
Pair = tuple[int, int]


def _positive_int(layer: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{layer}: {name} must be a positive integer, got {value!r}")


def _pair(spec: Layer, name: str, minimum: int) -> None:
    """Normalise ``spec.<name>`` (an int or a 2-tuple of ints >= ``minimum``) to a 2-tuple."""
    value = getattr(spec, name)
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair)
    ):
        raise ValueError(
            f"{type(spec).__name__}: {name} must be an integer >= {minimum} or a pair of them, got {value!r}"
        )
    object.__setattr__(spec, name, tuple(pair))


def _number(spec: Layer, name: str) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{type(spec).__name__}: {name} must be a finite number, got {value!r}")
    object.__setattr__(spec, name, float(value))


def _image_shape(spec: Layer, input_shape: Shape, channels: int | None = None) -> Shape:
    if len(input_shape) != 3 or (channels is not None and input_shape[0] != channels):
        wanted = "(C, H, W)" if channels is None else f"(channels={channels}, height, width)"
        raise ValueError(f"{spec} expects per-sample input {wanted}, got per-sample shape {input_shape}")
    return input_shape


def _window_output(spec: Layer, input_shape: Shape, kernel: Pair, dilation: Pair = (1, 1)) -> Pair:
    """Output height and width of a sliding window (PyTorch's floor rule)."""
    out = tuple(
        (size + 2 * pad - dil * (k - 1) - 1) // step + 1
        for size, pad, dil, k, step in zip(input_shape[1:], spec.padding, dilation, kernel, spec.stride, strict=True)
    )
    if min(out) < 1:
        raise ValueError(f"{spec}: input {input_shape[1]}x{input_shape[2]} is smaller than the window")
    return out


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

    def __call__(self, *inputs):
        """On symbolic tensors (:mod:`unitrain.ops`): record a call of this layer in a graph."""
        from .ops import call_layer  # ops imports this module

        return call_layer(self, inputs)


# --- leaves with weights ---------------------------------------------------------------------


def _initializers(spec: Layer) -> None:
    """Normalise ``weight_init`` / ``bias_init`` (None: the model's ``init`` scheme decides) and
    refuse one that cannot apply to its tensor."""
    shapes = spec.param_shapes()
    for key in ("weight", "bias"):
        value = getattr(spec, f"{key}_init")
        if value is None:
            continue
        name = f"{type(spec).__name__}: {key}_init"
        try:
            value = initializer(value)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
        if key not in shapes:
            raise ValueError(f"{name} {value} is given, but the layer has no bias (bias=False)")
        value.check_applies(name, shapes[key])
        object.__setattr__(spec, f"{key}_init", value)


@dataclass(frozen=True)
class Linear(Layer):
    """``y = x W^T + b`` over the last axis of input of any rank (``torch.nn.Linear``): per-sample
    ``(*, in_features)`` gives ``(*, out_features)``; ``weight`` is ``(out_features, in_features)``."""

    in_features: int
    out_features: int
    bias: bool = True
    #: how the first weight and bias are drawn (:mod:`unitrain.initializers`; None: the model's ``init``)
    weight_init: Initializer | str | None = field(default=None, repr=False)
    bias_init: Initializer | str | None = field(default=None, repr=False)

    def __post_init__(self):
        _positive_int("Linear", "in_features", self.in_features)
        _positive_int("Linear", "out_features", self.out_features)
        _initializers(self)

    def param_shapes(self):
        shapes = {"weight": (self.out_features, self.in_features)}
        if self.bias:
            shapes["bias"] = (self.out_features,)
        return shapes

    def output_shape(self, input_shape):
        # over the last axis of input of any rank, as torch.nn.Linear
        if len(input_shape) < 1 or input_shape[-1] != self.in_features:
            raise ValueError(
                f"{self} expects {self.in_features} input features per sample, got per-sample shape {input_shape}"
            )
        return (*input_shape[:-1], self.out_features)

    def fan_in(self):
        return self.in_features


@dataclass(frozen=True)
class Conv2d(Layer):
    """2-D cross-correlation over NCHW input with zero padding (``torch.nn.Conv2d``).
    Weight ``(out_channels, in_channels // groups, kh, kw)``; each of the ``groups`` groups
    of output channels sees only its own ``in_channels // groups`` input channels. ``bias``
    left out: the dialect's (PyTorch's True; MindSpore's ``has_bias=False``)."""

    in_channels: int
    out_channels: int
    kernel_size: int | Pair
    stride: int | Pair = 1
    padding: int | Pair = 0
    dilation: int | Pair = 1
    groups: int = 1
    bias: bool | None = None
    weight_init: Initializer | str | None = field(default=None, repr=False)
    bias_init: Initializer | str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.bias is None:
            object.__setattr__(self, "bias", dialects.current().conv_bias)
        for name in ("in_channels", "out_channels", "groups"):
            _positive_int("Conv2d", name, getattr(self, name))
        for name, minimum in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
            _pair(self, name, minimum)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"Conv2d: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                f"must be divisible by groups ({self.groups})"
            )
        _initializers(self)

    def param_shapes(self):
        shapes = {"weight": (self.out_channels, self.in_channels // self.groups, *self.kernel_size)}
        if self.bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    def output_shape(self, input_shape):
        _image_shape(self, input_shape, self.in_channels)
        return (self.out_channels, *_window_output(self, input_shape, self.kernel_size, self.dilation))

    def fan_in(self):
        return self.in_channels // self.groups * math.prod(self.kernel_size)


@dataclass(frozen=True)
class ConvTranspose2d(Layer):
    """The transpose (gradient with respect to the input) of a ``Conv2d`` with the same
    ``stride``, ``padding``, ``dilation`` and ``groups`` (``torch.nn.ConvTranspose2d``): each
    input pixel adds its weighted kernel into the output at ``stride`` steps, and ``padding``
    rows and columns are then cut from each border. Output size per axis
    ``(size - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1``;
    ``output_padding`` (below ``stride`` or ``dilation``) adds rows at the bottom and columns at
    the right, picking one of the input sizes a strided ``Conv2d`` maps to the same output.
    Weight ``(in_channels, out_channels // groups, kh, kw)``."""

    in_channels: int
    out_channels: int
    kernel_size: int | Pair
    stride: int | Pair = 1
    padding: int | Pair = 0
    output_padding: int | Pair = 0
    groups: int = 1
    bias: bool = True
    dilation: int | Pair = 1

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "groups"):
            _positive_int("ConvTranspose2d", name, getattr(self, name))
        for name, minimum in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("output_padding", 0),
                              ("dilation", 1)):  # fmt: skip
            _pair(self, name, minimum)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"ConvTranspose2d: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                f"must be divisible by groups ({self.groups})"
            )
        if any(o >= max(s, d) for o, s, d in zip(self.output_padding, self.stride, self.dilation, strict=True)):
            raise ValueError(
                f"ConvTranspose2d: output_padding {self.output_padding} must be smaller than either stride "
                f"{self.stride} or dilation {self.dilation}"
            )

    def param_shapes(self):
        shapes = {"weight": (self.in_channels, self.out_channels // self.groups, *self.kernel_size)}
        if self.bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    def output_shape(self, input_shape):
        _image_shape(self, input_shape, self.in_channels)
        out = tuple(
            (size - 1) * step - 2 * pad + dil * (k - 1) + extra + 1
            for size, step, pad, dil, k, extra in zip(input_shape[1:], self.stride, self.padding, self.dilation,
                                                      self.kernel_size, self.output_padding, strict=True)
        )  # fmt: skip
        if min(out) < 1:
            raise ValueError(f"{self}: input {input_shape[1]}x{input_shape[2]} gives an empty output {out}")
        return (self.out_channels, *out)

    def fan_in(self):
        # PyTorch computes it from the weight's dimension 1, which holds the *output* channels here
        return self.out_channels // self.groups * math.prod(self.kernel_size)


@dataclass(frozen=True)
class _Norm(Layer):
    """Shared validation of the normalisation layers' ``eps``."""

    def _check_eps(self):
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {self.eps!r}")


@dataclass(frozen=True)
class _BatchNorm(_Norm):
    """PyTorch's BatchNorm. Training: normalise with the batch mean and biased variance and
    update ``running = (1 - momentum) * running + momentum * batch_stat`` where the variance
    fed to the running estimate is the *unbiased* one. Eval: normalise with the running
    statistics. ``num_batches_tracked`` counts training batches, as in PyTorch. ``eps`` and
    ``momentum`` left out: the dialect's (PyTorch's 1e-5 and 0.1)."""

    num_features: int
    eps: float | None = None
    momentum: float | None = None

    _input_rank = 0

    def __post_init__(self):
        if self.eps is None:
            object.__setattr__(self, "eps", dialects.current().batchnorm_eps)
        if self.momentum is None:
            object.__setattr__(self, "momentum", dialects.current().batchnorm_momentum)
        _positive_int(type(self).__name__, "num_features", self.num_features)
        self._check_eps()
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
class LayerNorm(_Norm):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the trailing
    ``normalized_shape`` dims of each sample, biased variance (``torch.nn.LayerNorm``).
    ``normalized_shape`` (int or tuple) is stored as a tuple of ints."""

    normalized_shape: int | tuple[int, ...]
    eps: float = 1e-5
    elementwise_affine: bool = True

    def __post_init__(self):
        shape = self.normalized_shape
        shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
        if (
            not isinstance(shape, (tuple, list))
            or not shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
        ):
            raise ValueError(
                f"LayerNorm: normalized_shape must be a positive integer or a non-empty tuple of them, "
                f"got {self.normalized_shape!r}"
            )
        object.__setattr__(self, "normalized_shape", tuple(shape))
        self._check_eps()

    def param_shapes(self):
        if not self.elementwise_affine:
            return {}
        return {"weight": self.normalized_shape, "bias": self.normalized_shape}

    def output_shape(self, input_shape):
        n = len(self.normalized_shape)
        if tuple(input_shape[len(input_shape) - n :]) != self.normalized_shape:
            raise ValueError(
                f"{self} expects per-sample input ending in {self.normalized_shape}, got per-sample shape {input_shape}"
            )
        return input_shape


# --- pooling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool2d(Layer):
    """Window pooling; ``stride=None`` means the window size. After construction ``stride``
    is always a pair. Padding at most half the window, floor mode (PyTorch's rules)."""

    kernel_size: int | Pair
    stride: int | Pair | None = None
    padding: int | Pair = 0

    def __post_init__(self):
        _pair(self, "kernel_size", 1)
        if self.stride is None:
            object.__setattr__(self, "stride", self.kernel_size)
        _pair(self, "stride", 1)
        _pair(self, "padding", 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(
                f"{type(self).__name__}: padding {self.padding} must be at most half the window {self.kernel_size}"
            )

    def output_shape(self, input_shape):
        _image_shape(self, input_shape)
        return (input_shape[0], *_window_output(self, input_shape, self.kernel_size))


@dataclass(frozen=True)
class MaxPool2d(_Pool2d):
    """Maximum over each window; padding counts as -inf (never the maximum)."""


@dataclass(frozen=True)
class AvgPool2d(_Pool2d):
    """Mean over each window with zero padding: divided by ``kh*kw`` when
    ``count_include_pad`` (PyTorch's default), else by the window's non-padding elements."""

    count_include_pad: bool = True


@dataclass(frozen=True)
class AdaptiveAvgPool2d(Layer):
    """Average over PyTorch's adaptive bins: output row ``i`` averages input rows
    ``floor(i*H/oh)`` to ``ceil((i+1)*H/oh)`` (exclusive), the same for columns. ``1`` is a
    global average."""

    output_size: int | Pair

    def __post_init__(self):
        _pair(self, "output_size", 1)

    def output_shape(self, input_shape):
        _image_shape(self, input_shape)
        return (input_shape[0], *self.output_size)


# --- resampling ----------------------------------------------------------------------------------

UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class Upsample(Layer):
    """Resizes NCHW images to ``size`` or by ``scale_factor`` (exactly one of them;
    ``torch.nn.Upsample``), as pairs once constructed. The output size is ``size``, or
    ``floor(size * scale_factor)`` per axis. Each output index ``i`` reads the input at source
    position ``src(i)`` with PyTorch's rules (:mod:`unitrain.upsampling`): ``"nearest"`` takes
    element ``min(floor(src), size - 1)``, ``"bilinear"`` interpolates linearly between
    ``floor(src)`` and the next element along each axis. ``align_corners`` (bilinear only;
    ``None`` means ``False``) maps the corner pixels' centres onto each other."""

    size: int | Pair | None = None
    scale_factor: float | tuple[float, float] | None = None
    mode: str = "nearest"
    align_corners: bool | None = None

    def __post_init__(self):
        if (self.size is None) == (self.scale_factor is None):
            raise ValueError(f"Upsample: give exactly one of size and scale_factor, got size={self.size!r} and "
                             f"scale_factor={self.scale_factor!r}")  # fmt: skip
        if self.size is not None:
            _pair(self, "size", 1)
        else:
            factor = self.scale_factor
            pair = (factor, factor) if not isinstance(factor, (tuple, list)) else tuple(factor)
            if len(pair) != 2 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in pair
            ):
                raise ValueError(f"Upsample: scale_factor must be a positive number or a pair of them, got {factor!r}")
            object.__setattr__(self, "scale_factor", tuple(float(v) for v in pair))
        if self.mode not in UPSAMPLE_MODES:
            raise ValueError(f"Upsample: mode must be one of {UPSAMPLE_MODES}, got {self.mode!r}")
        if self.align_corners is not None and (self.mode == "nearest" or not isinstance(self.align_corners, bool)):
            wanted = "None with mode 'nearest'" if self.mode == "nearest" else "True, False or None"
            raise ValueError(f"Upsample: align_corners must be {wanted}, got {self.align_corners!r}")

    def output_shape(self, input_shape):
        _image_shape(self, input_shape)
        if self.size is not None:
            return (input_shape[0], *self.size)
        out = tuple(math.floor(size * factor) for size, factor in zip(input_shape[1:], self.scale_factor, strict=True))
        if min(out) < 1:
            raise ValueError(f"{self}: input {input_shape[1]}x{input_shape[2]} gives an empty output {out}")
        return (input_shape[0], *out)


# --- leaves without weights --------------------------------------------------------------------


@dataclass(frozen=True)
class Identity(Layer):
    """``torch.nn.Identity``: the input, unchanged."""


@dataclass(frozen=True)
class ReLU(Layer):
    """``torch.nn.ReLU``: ``max(x, 0)``."""


@dataclass(frozen=True)
class Tanh(Layer):
    """``torch.nn.Tanh``."""


@dataclass(frozen=True)
class Sigmoid(Layer):
    """``torch.nn.Sigmoid``: ``1 / (1 + exp(-x))``."""


@dataclass(frozen=True)
class SiLU(Layer):
    """``x * sigmoid(x)``."""


@dataclass(frozen=True)
class GELU(Layer):
    """``approximate="none"``: ``x * Phi(x)`` with the exact normal CDF
    ``Phi(x) = (1 + erf(x / sqrt(2))) / 2``; ``"tanh"``:
    ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))``."""

    approximate: str = "none"

    def __post_init__(self):
        if self.approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {self.approximate!r}")


@dataclass(frozen=True)
class LeakyReLU(Layer):
    """``x if x >= 0 else negative_slope * x``."""

    negative_slope: float = 0.01

    def __post_init__(self):
        _number(self, "negative_slope")


@dataclass(frozen=True)
class ELU(Layer):
    """``x if x > 0 else alpha * (exp(x) - 1)``."""

    alpha: float = 1.0

    def __post_init__(self):
        _number(self, "alpha")


@dataclass(frozen=True)
class _SoftmaxLike(Layer):
    """``dim`` counts the batch axis (as PyTorch) and may be negative."""

    dim: int

    def __post_init__(self):
        if isinstance(self.dim, bool) or not isinstance(self.dim, int):
            raise ValueError(f"{type(self).__name__}: dim must be an integer, got {self.dim!r}")

    def output_shape(self, input_shape):
        rank = len(input_shape) + 1
        if not -rank <= self.dim < rank:
            raise ValueError(
                f"{self}: dim {self.dim} is out of range for a batch of rank {rank} "
                f"(per-sample shape {input_shape}); expected {-rank}..{rank - 1}"
            )
        return input_shape


@dataclass(frozen=True)
class Softmax(_SoftmaxLike):
    """``exp(x) / sum(exp(x))`` along ``dim``."""


@dataclass(frozen=True)
class LogSoftmax(_SoftmaxLike):
    """``x - log(sum(exp(x)))`` along ``dim``."""


@dataclass(frozen=True)
class Flatten(Layer):
    """Merges dimensions ``start_dim`` to ``end_dim`` (both included; counted with the batch
    axis as 0, negative from the end) into one, in C order (``torch.nn.Flatten``). The default
    flattens every dimension but the batch one; the batch axis itself always stays."""

    start_dim: int = 1
    end_dim: int = -1

    def __post_init__(self):
        for name in ("start_dim", "end_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Flatten: {name} must be an integer, got {value!r}")

    def flattened_dims(self, rank: int) -> tuple[int, int]:
        """``(start, end)``, non-negative, for a batch of ``rank`` dimensions."""
        start, end = (dim + rank if dim < 0 else dim for dim in (self.start_dim, self.end_dim))
        if not (1 <= start < rank and 1 <= end < rank) or start > end:
            raise ValueError(
                f"{self}: for a batch of rank {rank} start_dim and end_dim must lie in 1..{rank - 1} "
                f"(or {-(rank - 1)}..-1) with start_dim <= end_dim; the batch axis 0 is never flattened"
            )
        return start, end

    def output_shape(self, input_shape):
        start, end = self.flattened_dims(len(input_shape) + 1)
        return (*input_shape[: start - 1], math.prod(input_shape[start - 1 : end]), *input_shape[end:])


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: in training zero each element with probability ``p`` and scale the
    survivors by ``1/(1-p)``; identity in eval mode."""

    p: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {self.p!r}")


# --- containers ----------------------------------------------------------------------------------


class Container(Layer):
    """A layer made of named children. Its leaves' weights are named by dotted paths
    (``layer1.0.conv1.weight``), in ``state_dict`` order."""

    children: tuple[tuple[str, Layer], ...]

    def named_layers(self, prefix: str = "") -> Iterator[tuple[str, Layer]]:
        """Every leaf layer with its dotted path, in ``state_dict`` order."""
        for name, child in self.children:
            if isinstance(child, Container):
                yield from child.named_layers(f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", child

    def _shapes(self, of) -> dict[str, Shape]:
        return {f"{name}.{key}": shape for name, layer in self.named_layers() for key, shape in of(layer).items()}

    def param_shapes(self):
        return self._shapes(lambda layer: layer.param_shapes())

    def buffer_shapes(self):
        return self._shapes(lambda layer: layer.buffer_shapes())

    def state_shapes(self) -> dict[str, Shape]:
        """Every key of the weight file, in ``torch.nn.Module.state_dict()`` order."""
        return self._shapes(lambda layer: {**layer.param_shapes(), **layer.buffer_shapes()})

    def output_shape(self, input_shape):
        return self._trace(tuple(input_shape), "", {})

    def leaf_input_shapes(self, input_shape: Shape) -> dict[str, Shape]:
        """The per-sample input shape of every leaf, by dotted path (``ValueError`` as
        :meth:`output_shape`)."""
        shapes: dict[str, Shape] = {}
        self._trace(tuple(input_shape), "", shapes)
        return shapes

    def _trace(self, input_shape: Shape, path: str, seen: dict[str, Shape]) -> Shape:
        raise NotImplementedError

    def has(self, kind: type[Layer]) -> bool:
        return any(isinstance(layer, kind) for _, layer in self.named_layers())


def _trace(layer: Layer, input_shape: Shape, path: str, seen: dict[str, Shape]) -> Shape:
    """``layer``'s output shape; a leaf's error is prefixed with its dotted path, and ``seen``
    records each leaf's input shape."""
    if isinstance(layer, Container):
        return layer._trace(input_shape, path, seen)
    seen[path] = input_shape
    try:
        return tuple(layer.output_shape(input_shape))
    except ValueError as error:
        raise ValueError(f"{path}: {error}" if path else str(error)) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass(frozen=True, init=False)
class Sequential(Container):
    """An ordered stack, ``Sequential(a, b, ...)`` (children named ``"0"``, ``"1"``, ...) or
    ``Sequential({"conv1": a, "bn1": b})`` (children named by the keys), as
    ``torch.nn.Sequential``. ``init`` chooses how :func:`unitrain.init_weights` draws the
    first weights of the layers that name no ``weight_init`` / ``bias_init`` when this is the
    outermost container: a scheme of :data:`INIT_SCHEMES` (``"pytorch"``: each layer's PyTorch
    default; ``"resnet"``: torchvision's ResNet; ``"keras"``, ``"chainer"``: their Dense/Linear and
    convolution defaults), or an initialiser for every weight (``"xavier_uniform"``; biases keep
    PyTorch's default). Left out: the dialect's scheme."""

    children: tuple[tuple[str, Layer], ...] = field(default_factory=tuple)
    init: str = "pytorch"

    def __init__(self, *layers, init: str | None = None):
        if len(layers) == 1 and isinstance(layers[0], Mapping):
            items = list(layers[0].items())
            for name, _ in items:
                if not isinstance(name, str) or not name or "." in name:
                    raise ValueError(f"Sequential: child name {name!r} must be a non-empty string without '.'")
        else:
            if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
                layers = tuple(layers[0])
            items = [(str(index), layer) for index, layer in enumerate(layers)]
        for name, layer in items:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {name} is {layer!r}, expected a unitrain layer spec")
        object.__setattr__(self, "children", tuple(items))
        object.__setattr__(self, "init", _sequential_init(init))

    @property
    def layers(self) -> tuple[Layer, ...]:
        return tuple(layer for _, layer in self.children)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.children)

    def _trace(self, input_shape, path, seen):
        for name, layer in self.children:
            input_shape = _trace(layer, input_shape, _join(path, name), seen)
        return input_shape


#: a model's ``init`` schemes: the weight and bias initialisers of Linear and Conv2d layers
#: (torchvision's ResNet: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` on Conv2d
#: weights; Keras' Dense and Conv2D: ``glorot_uniform`` and zeros; Chainer's Linear and
#: Convolution2D: ``LeCunNormal`` and zeros)
INIT_SCHEMES = ("pytorch", "resnet", "keras", "chainer")


def check_init(init) -> str:
    """``init`` (a scheme or an initialiser's text, for every weight) in its canonical text;
    ValueError otherwise."""
    if init in INIT_SCHEMES:
        return init
    try:
        value = initializer(init)
    except ValueError as error:
        raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)} or an initialiser for every weight "
                         f"({error})") from None  # fmt: skip
    return str(value)


def _sequential_init(init) -> str:
    try:
        return check_init(dialects.current().init if init is None else init)
    except ValueError as error:
        raise ValueError(f"Sequential: {error}") from None


@dataclass(frozen=True)
class Residual(Container):
    """``y = post(body(x) + shortcut(x))``: a skip connection (torchvision's BasicBlock).
    ``shortcut=None`` is the identity, ``post=None`` means nothing after the add. Naming:
    the body's children live directly in the Residual's namespace (``conv1``, ``bn1``, ...),
    the shortcut is ``downsample`` and ``post`` is ``post``."""

    body: Sequential
    shortcut: Layer | None = None
    post: Layer | None = None

    def __post_init__(self):
        if not isinstance(self.body, Sequential):
            raise TypeError(f"Residual: body must be a unitrain Sequential, got {self.body!r}")
        for name, value in (("shortcut", self.shortcut), ("post", self.post)):
            if value is not None and not isinstance(value, Layer):
                raise TypeError(f"Residual: {name} must be a unitrain layer spec or None, got {value!r}")
        clash = {name for name, _ in self.body.children} & {"downsample", "post"}
        if clash:
            raise ValueError(
                f"Residual: body children may not be named {sorted(clash)}: those name the shortcut and post"
            )

    @property
    def children(self) -> tuple[tuple[str, Layer], ...]:
        named = list(self.body.children)
        if self.shortcut is not None:
            named.append(("downsample", self.shortcut))
        if self.post is not None:
            named.append(("post", self.post))
        return tuple(named)

    def _trace(self, input_shape, path, seen):
        body = self.body._trace(input_shape, path, seen)
        shortcut = input_shape
        if self.shortcut is not None:
            shortcut = _trace(self.shortcut, input_shape, _join(path, "downsample"), seen)
        if body != shortcut:
            raise ValueError(f"{path or 'Residual'}: body gives {body}, shortcut gives {shortcut}")
        if self.post is not None:
            return _trace(self.post, body, _join(path, "post"), seen)
        return body


# --- presets ---------------------------------------------------------------------------------------


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


def lenet() -> Sequential:
    """LeNet-5 as PyTorch's "Training with PyTorch" tutorial's ``GarmentClassifier`` for
    1x28x28 input, with its ``state_dict`` names (``conv1``, ``conv2``, ``fc1``..``fc3``)."""
    return Sequential({
        "conv1": Conv2d(1, 6, 5), "relu1": ReLU(), "pool1": MaxPool2d(2, 2),
        "conv2": Conv2d(6, 16, 5), "relu2": ReLU(), "pool2": MaxPool2d(2, 2),
        "flatten": Flatten(),
        "fc1": Linear(16 * 4 * 4, 120), "relu3": ReLU(),
        "fc2": Linear(120, 84), "relu4": ReLU(),
        "fc3": Linear(84, 10),
    })  # fmt: skip


def _basic_block(in_planes: int, planes: int, stride: int) -> Residual:
    """torchvision's ``BasicBlock``: two 3x3 convs with BatchNorm, a 1x1-conv downsample
    when the shape changes, ReLU after the add."""
    body = Sequential({
        "conv1": Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False), "bn1": BatchNorm2d(planes),
        "relu": ReLU(),
        "conv2": Conv2d(planes, planes, 3, padding=1, bias=False), "bn2": BatchNorm2d(planes),
    })  # fmt: skip
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = Sequential(Conv2d(in_planes, planes, 1, stride=stride, bias=False), BatchNorm2d(planes))
    return Residual(body, downsample, ReLU())


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> Sequential:
    """torchvision's ``resnet18()``: the same module names, shapes, forward and
    initialisation scheme (``init="resnet"``), so its ``state_dict`` loads unchanged.
    Input size rule: any H, W >= 1; each stride-2 step (stem conv, max pool, layers 2-4)
    takes a size to ``ceil(size / 2)``, so the last stage sees ``ceil(H / 32)``: 224 gives
    7x7, MNIST's 28x28 gives 1x1 (BatchNorm training there needs batches of 2 or more)."""
    _positive_int("resnet18", "num_classes", num_classes)
    _positive_int("resnet18", "in_channels", in_channels)
    stages, in_planes = {}, 64
    for index, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        stages[f"layer{index}"] = Sequential(_basic_block(in_planes, planes, stride), _basic_block(planes, planes, 1))
        in_planes = planes
    return Sequential(
        {
            "conv1": Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            "bn1": BatchNorm2d(64),
            "relu": ReLU(),
            "maxpool": MaxPool2d(3, stride=2, padding=1),
            **stages,
            "avgpool": AdaptiveAvgPool2d(1),
            "flatten": Flatten(),
            "fc": Linear(512, num_classes),
        },
        init="resnet",
    )


def mnist_resnet18() -> Sequential:
    """``--model resnet18``: ResNet-18 for 1x28x28 images and 10 classes."""
    return resnet18(num_classes=10, in_channels=1)


PRESETS = {"mlp": mlp, "cnn": cnn, "lenet": lenet, "resnet18": mnist_resnet18}


def preset(name: str) -> Sequential:
    """A new spec of the preset ``name`` (``mlp``, ``cnn``, ``lenet``, ``resnet18``); ValueError naming the presets."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(PRESETS)}") from None


#: ``package.module:function``, a user's function that returns a model spec
FACTORY_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"
#: what a run may name as its model: a preset or a factory (checkpoints record it)
MODEL_PATTERN = "|".join([*map(re.escape, PRESETS), FACTORY_PATTERN])


#: how deep containers may nest. Every backend builds and runs the tree recursively: PyTorch's
#: module calls take about four Python frames a level (300 levels pass Python's default limit of
#: 1000 frames), and MindSpore names a parameter by its path, in at most 1024 characters.
MAX_NESTING = 100
#: layers in a model at most (a container listed many times in another counts each time)
MAX_LAYERS = 100_000


def check_buildable(model: Container, itemsize: int = 4) -> None:
    """ValueError, before anything is built, for a model that nests containers deeper than
    :data:`MAX_NESTING`, holds more than :data:`MAX_LAYERS` layers, or whose weights and their
    gradients (``itemsize`` bytes a value) need more than this machine's memory. Walks the tree
    without recursion, so that any tree is measured."""
    stack, layers = [(model, 1)], 0
    while stack:
        container, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"the model nests containers more than {MAX_NESTING} deep; expected at most "
                             f"{MAX_NESTING} (every backend builds and runs the tree recursively)")  # fmt: skip
        layers += len(container.children)
        if layers > MAX_LAYERS:
            raise ValueError(f"the model has more than {MAX_LAYERS} layers; expected at most {MAX_LAYERS}")
        stack.extend((child, depth + 1) for _, child in container.children if isinstance(child, Container))
    values = sum(math.prod(shape) for shape in model.state_shapes().values())
    memory = _physical_memory()
    if memory is not None and 2 * values * itemsize > memory:
        raise ValueError(f"the model has {values:,} weights, {values * itemsize / 2**30:,.1f} GiB at {itemsize} bytes "
                         f"each and as much again for their gradients; this machine has {memory / 2**30:,.1f} GiB "
                         "of memory")  # fmt: skip


def _physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def model_from_name(name: str) -> Container:
    """The model ``name`` names: a :data:`PRESETS` name, or ``package.module:function``, a
    function importable with the current directory first on ``sys.path`` (as ``python -m``
    has it) that takes no arguments and returns a :class:`Container`, or a ``torch.nn.Module``
    as ``(module, example_inputs)`` or with an ``example_input_array``, which
    ``unitrain.from_torch`` imports. ``ValueError`` (one line, naming ``name``) for anything else."""
    if name in PRESETS:
        return preset(name)
    expected = f"one of {', '.join(PRESETS)} or package.module:function returning a unitrain model spec"
    if not re.fullmatch(FACTORY_PATTERN, name):
        raise ValueError(f"unknown model {name!r}; expected {expected}")
    module_name, function_name = name.split(":")
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # the user's module may raise anything on import, or exit
        reason = _one_line(error) if isinstance(error, Exception) else f"importing it {_what_happened(error)}"
        raise ValueError(f"model {name!r}: cannot import {module_name}: {reason}") from None
    finally:
        sys.path.remove(here)
    function = getattr(module, function_name, None)
    if not callable(function):
        found = "has no attribute" if function is None else f"has a {type(function).__name__}, not a function, named"
        raise ValueError(f"model {name!r}: module {module_name} {found} {function_name!r}; expected {expected}")
    try:
        model = function()
    except (Exception, SystemExit) as error:  # the user's code: an exit would end unitrain unexplained
        raise ValueError(f"model {name!r}: {function_name}() {_what_happened(error)}") from None
    if _is_torch_model(model):  # the user's code imported torch already: trace it into a Graph
        from .backends.torch_import import imported_model

        model = imported_model(model, name)
    if not isinstance(model, Container):
        raise ValueError(f"model {name!r}: {function_name}() returned {type(model).__name__}, expected a unitrain "
                         "model spec (a unitrain.layers Container such as Sequential)")  # fmt: skip
    try:
        check_buildable(model)
    except ValueError as error:
        raise ValueError(f"model {name!r}: {error}") from None
    return model


def _is_torch_model(value) -> bool:
    """A ``torch.nn.Module``, or ``(module, example_inputs)``, without importing torch."""
    torch = sys.modules.get("torch")
    module = value[0] if isinstance(value, tuple) and value else value
    return torch is not None and isinstance(module, torch.nn.Module)


def _what_happened(error: BaseException) -> str:
    """The user's code's failure, for a message: ``raised ValueError: ...`` or ``called sys.exit(3)``."""
    return f"called sys.exit({error.code!r})" if isinstance(error, SystemExit) else f"raised {_one_line(error)}"


def _one_line(error: Exception) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 200 else text[:197] + "..."
