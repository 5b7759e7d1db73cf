"""Linear and Identity."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..initializers import Initializer
from .base import Layer, _initializers, _positive_int


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
class Identity(Layer):
    """``torch.nn.Identity``: the input, unchanged."""
