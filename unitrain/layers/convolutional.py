"""Convolutions: Conv2d and ConvTranspose2d."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .. import dialects
from ..initializers import Initializer
from .base import Layer, Pair, _image_shape, _initializers, _pair, _positive_int, _window_output


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
    Weight ``(in_channels, out_channels // groups, kh, kw)``; ``weight_init`` / ``bias_init``
    left out: PyTorch's default draw, whatever the model's ``init`` scheme."""

    in_channels: int
    out_channels: int
    kernel_size: int | Pair
    stride: int | Pair = 1
    padding: int | Pair = 0
    output_padding: int | Pair = 0
    groups: int = 1
    bias: bool = True
    dilation: int | Pair = 1
    weight_init: Initializer | str | None = field(default=None, repr=False)
    bias_init: Initializer | str | None = field(default=None, repr=False)

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
        _initializers(self)

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
