"""The base of every layer spec and the argument checks the layers share."""

from __future__ import annotations

import math

from ..initializers import initializer

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

    def __call__(self, *inputs, lengths=None):
        """On symbolic tensors (:mod:`unitrain.ops`): record a call of this layer in a graph
        (``lengths``: each sequence's, for a recurrent layer given initial states too)."""
        from ..ops import call_layer  # ops imports this package

        return call_layer(self, inputs, lengths)


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
