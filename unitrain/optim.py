"""Optimizer specs and their update equations, which are PyTorch's on every backend.

The math lives once, in :func:`sgd_update` and :func:`adam_update`: plain functions over any
array type with arithmetic operators (NumPy, Chainer's arrays, MindSpore tensors), in the
order PyTorch's single-tensor implementations use. Backends whose framework ships PyTorch's
equations (PyTorch itself) use the native optimizer; the others plug these functions into their
framework's optimizer machinery. Chainer's and MindSpore's own Adam put epsilon inside the
bias correction, and Chainer's MomentumSGD folds the learning rate into the velocity; neither
is used.

SGD, for parameter ``p`` with gradient ``g`` (``buf`` starts as ``g`` on the first step)::

    g   = g + weight_decay * p
    buf = momentum * buf + (1 - dampening) * g
    g   = g + momentum * buf     if nesterov else buf
    p   = p - lr * g

Adam (``t`` counts steps from 1; AdamW replaces the first line by ``p = p * (1 - lr * wd)``)::

    g = g + weight_decay * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


def _check(name: str, value, condition: bool, expected: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class Optimizer:
    lr: float = 0.01
    weight_decay: float = 0.0

    def __post_init__(self):
        _check("lr", self.lr, isinstance(self.lr, (int, float)) and self.lr > 0, "> 0")
        _check(
            "weight_decay",
            self.weight_decay,
            isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
            ">= 0",
        )

    #: names of the per-parameter state buffers, as in PyTorch's ``optimizer.state``
    state_names = ()

    def __str__(self) -> str:
        """Compact: the learning rate and whatever differs from the defaults."""
        defaults = type(self)()
        shown = [
            f"{field.name}={getattr(self, field.name)}"
            for field in dataclasses.fields(self)
            if field.name == "lr" or getattr(self, field.name) != getattr(defaults, field.name)
        ]
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True)
class SGD(Optimizer):
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)")
        _check("dampening", self.dampening, 0 <= self.dampening <= 1, "in [0, 1]")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening 0")

    @property
    def state_names(self):
        return ("momentum_buffer",) if self.momentum else ()


@dataclass(frozen=True)
class Adam(Optimizer):
    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    #: AdamW's decoupled decay (``p *= 1 - lr * wd``) instead of L2 added to the gradient
    decoupled_weight_decay = False
    state_names = ("exp_avg", "exp_avg_sq")

    def __post_init__(self):
        super().__post_init__()
        for i, beta in enumerate(self.betas):
            _check(f"betas[{i}]", beta, 0 <= beta < 1, "in [0, 1)")
        _check("eps", self.eps, self.eps > 0, "> 0")


@dataclass(frozen=True)
class AdamW(Adam):
    weight_decay: float = 0.01
    decoupled_weight_decay = True


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def sgd_update(param, grad, buf, spec: SGD):
    """One SGD step. ``buf`` is ``None`` before the first step. Returns ``(param, buf)``."""
    if spec.weight_decay:
        grad = grad + spec.weight_decay * param
    if spec.momentum:
        buf = grad if buf is None else spec.momentum * buf + (1 - spec.dampening) * grad
        grad = grad + spec.momentum * buf if spec.nesterov else buf
    return param - spec.lr * grad, buf


def adam_update(param, grad, exp_avg, exp_avg_sq, step: int, spec: Adam, sqrt):
    """One Adam/AdamW step number ``step`` (from 1). ``sqrt`` is the array module's square
    root. Returns ``(param, exp_avg, exp_avg_sq)``."""
    beta1, beta2 = spec.betas
    if spec.weight_decay:
        if spec.decoupled_weight_decay:
            param = param * (1 - spec.lr * spec.weight_decay)
        else:
            grad = grad + spec.weight_decay * param
    exp_avg = exp_avg + (1 - beta1) * (grad - exp_avg)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    step_size = spec.lr / (1 - beta1**step)
    denom = sqrt(exp_avg_sq) / (1 - beta2**step) ** 0.5 + spec.eps
    return param - step_size * (exp_avg / denom), exp_avg, exp_avg_sq
