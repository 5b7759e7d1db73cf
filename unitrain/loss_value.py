"""A loss value that takes arithmetic, for adapters whose loss is not a node of an autograd tape.

torch's and Chainer's losses are tensors of their tapes: ``loop.backward(loss * 0.5)``,
``loss / accumulation_steps`` or ``loss + 0.01 * loss ** 2`` differentiate the expression. NumPy's
loss (our own backprop) has no tape, so :class:`LossExpression` carries, beside the value, its
slope: the derivative of the expression with respect to the loss that ``loss()`` returned (its
``origin``). The gradient of the expression is the loss's gradient times that slope (the chain
rule on a scalar), which is what ``backward`` accumulates. An expression takes numbers and
expressions of the same loss; one of two different ``loss()`` calls is refused.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


class LossExpression:
    """``value`` (a 0-d native value: ``float()`` reads it), its ``slope`` d value / d loss, and
    the ``origin`` it is a function of (what the adapter needs to differentiate that loss)."""

    __slots__ = ("origin", "slope", "value")

    def __init__(self, value: Any, origin: Any, slope: float = 1.0):
        self.value, self.origin, self.slope = value, origin, slope

    def __float__(self) -> float:
        return float(self.value)

    def item(self) -> float:
        """The value as a Python float, as torch's ``loss.item()``."""
        return float(self.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({float(self.value)!r})"

    def _derived(self, value: Any, slope: float) -> LossExpression:
        if isinstance(self.value, np.generic):  # NumPy 1.x makes a float32 scalar op a number float64
            value = self.value.dtype.type(value)
        derived = object.__new__(type(self))
        derived.value, derived.origin, derived.slope = value, self.origin, float(slope)
        return derived

    def _operand(self, other: Any) -> tuple[Any, float] | None:
        """``(value, slope)`` of ``other``: a number's slope is 0; None if it cannot be combined."""
        if isinstance(other, LossExpression):
            if other.origin is not self.origin:
                raise TypeError("a loss combined with the loss of another loss() call: each backward() "
                                "differentiates one loss() (write a combined loss as a CustomLoss)")  # fmt: skip
            return other.value, other.slope
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            return other, 0.0
        return None

    def __add__(self, other):
        if (operand := self._operand(other)) is None:
            return NotImplemented
        return self._derived(self.value + operand[0], self.slope + operand[1])

    __radd__ = __add__

    def __sub__(self, other):
        if (operand := self._operand(other)) is None:
            return NotImplemented
        return self._derived(self.value - operand[0], self.slope - operand[1])

    def __rsub__(self, other):
        if (operand := self._operand(other)) is None:
            return NotImplemented
        return self._derived(operand[0] - self.value, operand[1] - self.slope)

    def __mul__(self, other):
        if (operand := self._operand(other)) is None:
            return NotImplemented
        value, slope = operand
        return self._derived(self.value * value, self.slope * float(value) + float(self.value) * slope)

    __rmul__ = __mul__

    def __truediv__(self, other):
        if (operand := self._operand(other)) is None:
            return NotImplemented
        value, slope = operand
        a, b = float(self.value), float(value)
        return self._derived(self.value / value, (self.slope * b - a * slope) / (b * b))

    def __rtruediv__(self, other):
        if (operand := self._operand(other)) is None:
            return NotImplemented
        value, slope = operand
        a, b = float(value), float(self.value)
        return self._derived(value / self.value, (slope * b - a * self.slope) / (b * b))

    def __pow__(self, exponent):
        if isinstance(exponent, LossExpression) or self._operand(exponent) is None:
            return NotImplemented  # a power of a number only, as the slope needs
        a = float(self.value)
        return self._derived(self.value**exponent, exponent * a ** (exponent - 1) * self.slope)

    def __neg__(self):
        return self._derived(-self.value, -self.slope)

    def __pos__(self):
        return self
