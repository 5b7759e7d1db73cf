"""Activation layers: elementwise functions and (log-)softmax over an axis."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Layer, _number


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
