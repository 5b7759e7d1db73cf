"""Two-dimensional pooling: max, average and adaptive average."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Layer, Pair, _image_shape, _pair, _window_output


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
