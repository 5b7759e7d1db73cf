"""Optimizer specs and their update equations: PyTorch's, or another framework's where a spec says so.

The math lives once, in :func:`sgd_update`, :func:`adam_update`, :func:`rmsprop_update`,
:func:`adagrad_update` and :func:`adadelta_update` (:func:`optimizer_update` picks one): plain functions over any
array type with arithmetic operators (NumPy, Chainer's arrays, MindSpore tensors), in the
order PyTorch's single-tensor implementations use. Backends whose framework ships PyTorch's
equations (PyTorch itself) use the native optimizer; the others plug these functions into their
framework's optimizer machinery. Other frameworks' equations (:mod:`unitrain.dialects`) are
options of the same specs: ``Adam(eps_placement=...)``, ``SGD(lr_in_velocity=...)``.

SGD, for parameter ``p`` with gradient ``g`` (``buf`` starts as ``g`` on the first step)::

    g   = g + weight_decay * p
    buf = momentum * buf + (1 - dampening) * g
    g   = g + momentum * buf     if nesterov else buf
    p   = p - lr * g

SGD with ``lr_in_velocity=True`` (Chainer's ``MomentumSGD``, Keras' ``SGD``: the velocity
``v`` starts at 0 and holds the learning rates of past steps, so a schedule's new lr reaches
only the new gradients)::

    g = g + weight_decay * p
    v = momentum * v - lr * g
    p = p + momentum * v - lr * g     if nesterov else p + v

Adam (``t`` counts steps from 1; AdamW replaces the first line by ``p = p * (1 - lr * wd)``)::

    g = g + weight_decay * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

and with ``eps_placement="before_correction"`` (Chainer's, Keras', MindSpore's: ``eps`` is
added to the uncorrected ``sqrt(v)``, which weighs it by ``1 / sqrt(1 - beta2**t)`` compared
with PyTorch's, large in the first steps)::

    p = p - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)

RMSprop (``g += weight_decay * p`` first; ``buf`` with momentum, ``ga`` when centered)::

    sq  = alpha * sq + (1 - alpha) * g * g
    ga  = ga + (1 - alpha) * (g - ga);  avg = sqrt(sq - ga * ga) + eps   (centered)
    avg = sqrt(sq) + eps                                                (otherwise)
    buf = momentum * buf + g / avg;     p = p - lr * buf                (momentum > 0)
    p   = p - lr * g / avg                                              (otherwise)

Adagrad (``sum`` starts at ``initial_accumulator_value``; ``t`` from 1)::

    sum = sum + g * g
    p   = p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(sum) + eps)

Adadelta::

    sq    = rho * sq + (1 - rho) * g * g
    delta = sqrt(acc + eps) / sqrt(sq + eps) * g
    acc   = rho * acc + (1 - rho) * delta * delta
    p     = p - lr * delta

Gradient clipping (:func:`clip_grad_norm_scale`): ``torch.nn.utils.clip_grad_norm_``'s global
norm; by value is ``clamp(g, -v, v)``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

from . import dialects


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
            f"{field.name}={getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.name == "lr" or getattr(self, field.name) != getattr(defaults, field.name)
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def to_config(self) -> dict:
        """JSON values: ``{"type": "SGD", "lr": 0.01, ...}``, every argument explicit."""
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class SGD(Optimizer):
    """``torch.optim.SGD``: its arguments, defaults and update (:func:`sgd_update`)."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    #: Chainer's and Keras' momentum: a velocity with the lr folded in (see the module's doc);
    #: left out, the dialect's (:mod:`unitrain.dialects`)
    lr_in_velocity: bool | None = None

    def __post_init__(self):
        if self.lr_in_velocity is None:
            object.__setattr__(self, "lr_in_velocity", dialects.current().sgd_lr_in_velocity and not self.dampening)
        super().__post_init__()
        _check("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)")
        _check("dampening", self.dampening, 0 <= self.dampening <= 1, "in [0, 1]")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov requires momentum > 0 and dampening 0")
        if not isinstance(self.lr_in_velocity, bool):
            raise ValueError(f"lr_in_velocity must be True or False, got {self.lr_in_velocity!r}")
        if self.lr_in_velocity and self.dampening:
            raise ValueError("lr_in_velocity has no dampening (Chainer's and Keras' momentum): expected dampening 0")

    @property
    def state_names(self):
        if not self.momentum:
            return ()
        return ("velocity",) if self.lr_in_velocity else ("momentum_buffer",)


@dataclass(frozen=True)
class Adam(Optimizer):
    """``torch.optim.Adam`` (without ``amsgrad``): its arguments, defaults and update (:func:`adam_update`)."""

    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    #: left out, the dialect's (PyTorch's 1e-8; Keras' 1e-7)
    eps: float | None = None
    #: where ``eps`` joins ``sqrt(v)``: ``"after_correction"`` (PyTorch's) or ``"before_correction"``
    #: (Chainer's, Keras', MindSpore's); see the module's doc. Left out, the dialect's.
    eps_placement: str | None = None

    #: AdamW's decoupled decay (``p *= 1 - lr * wd``) instead of L2 added to the gradient
    decoupled_weight_decay = False
    state_names = ("exp_avg", "exp_avg_sq")

    def __post_init__(self):
        if self.eps is None:
            object.__setattr__(self, "eps", dialects.current().adam_eps)
        if self.eps_placement is None:
            object.__setattr__(self, "eps_placement", dialects.current().adam_eps_placement)
        super().__post_init__()
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))  # a list from JSON or TOML: hashable and equal
        for i, beta in enumerate(self.betas):
            _check(f"betas[{i}]", beta, 0 <= beta < 1, "in [0, 1)")
        _check("eps", self.eps, self.eps > 0, "> 0")
        if self.eps_placement not in EPS_PLACEMENTS:
            raise ValueError(f"eps_placement must be one of {', '.join(map(repr, EPS_PLACEMENTS))}, "
                             f"got {self.eps_placement!r}")  # fmt: skip


EPS_PLACEMENTS = ("after_correction", "before_correction")


@dataclass(frozen=True)
class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay, default 0.01."""

    weight_decay: float = 0.01
    decoupled_weight_decay = True


@dataclass(frozen=True)
class RMSprop(Optimizer):
    """``torch.optim.RMSprop``: its arguments, defaults and update (:func:`rmsprop_update`)."""

    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check("alpha", self.alpha, 0 <= self.alpha <= 1, "in [0, 1]")
        _check("eps", self.eps, self.eps > 0, "> 0")
        _check("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)")
        if not isinstance(self.centered, bool):
            raise ValueError(f"centered must be True or False, got {self.centered!r}")

    @property
    def state_names(self):
        return ("square_avg",) + ("momentum_buffer",) * (self.momentum > 0) + ("grad_avg",) * self.centered


@dataclass(frozen=True)
class Adagrad(Optimizer):
    """``torch.optim.Adagrad``: its arguments, defaults and update (:func:`adagrad_update`)."""

    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    state_names = ("sum",)

    def __post_init__(self):
        super().__post_init__()
        _check("lr_decay", self.lr_decay, self.lr_decay >= 0, ">= 0")
        value = self.initial_accumulator_value
        _check("initial_accumulator_value", value, value >= 0, ">= 0")
        _check("eps", self.eps, self.eps > 0, "> 0")


@dataclass(frozen=True)
class Adadelta(Optimizer):
    """``torch.optim.Adadelta``: its arguments, defaults and update (:func:`adadelta_update`)."""

    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6

    state_names = ("square_avg", "acc_delta")

    def __post_init__(self):
        super().__post_init__()
        _check("rho", self.rho, 0 <= self.rho <= 1, "in [0, 1]")
        _check("eps", self.eps, self.eps > 0, "> 0")


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop, "adagrad": Adagrad, "adadelta": Adadelta}


def optimizer_from_config(config) -> Optimizer:
    """The spec :meth:`Optimizer.to_config` described (arguments left out take their defaults);
    ValueError naming the problem."""
    classes = {cls.__name__: cls for cls in OPTIMIZERS.values()}
    options = dict(config)
    kind = options.pop("type", None)
    if kind not in classes:
        raise ValueError(f"unknown optimizer type {str(kind)[:100]!r}; expected one of {', '.join(classes)}")
    arguments = [field.name for field in dataclasses.fields(classes[kind])]
    if unknown := sorted(set(options) - set(arguments)):
        raise ValueError(f"{kind} has no argument {str(unknown[0])[:100]!r}; its arguments: {', '.join(arguments)}")
    try:
        return classes[kind](**options)
    except TypeError as error:  # e.g. betas that are not a pair
        raise ValueError(f"{kind}: {error}") from None


def momentum(spec: Optimizer) -> float | None:
    """The momentum a schedule may cycle (PyTorch's OneCycleLR: an optimizer with ``momentum`` or
    ``betas``): SGD's and RMSprop's ``momentum``, Adam's and AdamW's ``betas[0]``; ``None`` for the others."""
    if isinstance(spec, (SGD, RMSprop)):
        return spec.momentum
    return spec.betas[0] if isinstance(spec, Adam) else None


def with_momentum(spec: Optimizer, value: float) -> Optimizer:
    """``spec`` with its :func:`momentum` replaced by ``value``."""
    if isinstance(spec, Adam):
        return dataclasses.replace(spec, betas=(value, spec.betas[1]))
    return dataclasses.replace(spec, momentum=value)


def initial_buffer_value(spec: Optimizer, name: str) -> float:
    """The value a state buffer starts from when the first step creates it (SGD's momentum
    buffer is the exception: it starts as the gradient, see :func:`starts_as_gradient`)."""
    return spec.initial_accumulator_value if isinstance(spec, Adagrad) else 0.0


def starts_as_gradient(spec: Optimizer) -> bool:
    """Whether the spec's buffer is created from the first gradient (PyTorch's momentum buffer,
    ``None`` until then) rather than from :func:`initial_buffer_value` (a velocity starts at 0)."""
    return isinstance(spec, SGD) and bool(spec.momentum) and not spec.lr_in_velocity


def _arithmetic(in_place: bool):
    """``(add, sub, mul, div)``: in-place operators where the caller owns NumPy arrays (the results
    are the same bits, without a new array per operation), else ones that return new values (any
    array type, MindSpore's graphs included)."""
    if in_place:
        return operator.iadd, operator.isub, operator.imul, operator.itruediv
    return operator.add, operator.sub, operator.mul, operator.truediv


# Every update below takes ``lr`` apart from the spec (a schedule or ``set_lr`` changes it; the
# spec keeps the initial one), and SGD, RMSprop and Adam a live ``momentum`` (Adam's ``beta1``;
# ``None``: the spec's), which OneCycleLR cycles; the spec's own value decides the structure (whether
# a momentum buffer is kept: see unitrain.schedules.scheduled_optimizer). With ``in_place=True``
# they write ``param`` and the buffers in place (NumPy arrays the caller owns). ``sqrt`` is the array
# module's square root. Each returns the new parameter and buffers.


def sgd_update(param, grad, buf, spec: SGD, lr, in_place: bool = False, momentum=None):
    """One SGD step. ``buf`` is ``None`` before the first step. Returns ``(param, buf)``."""
    add, sub, mul, _ = _arithmetic(in_place)
    momentum = spec.momentum if momentum is None else momentum
    if spec.weight_decay:
        grad = grad + spec.weight_decay * param
    if spec.momentum and spec.lr_in_velocity:  # the velocity starts at 0 (None: not created yet)
        step = lr * grad
        buf = -step if buf is None else sub(mul(buf, momentum), step)
        return add(param, momentum * buf - step if spec.nesterov else buf), buf
    if spec.momentum:
        if buf is None:  # PyTorch clones the gradient; a graph's value needs no copy
            buf = grad.copy() if in_place else grad
        else:
            buf = add(mul(buf, momentum), (1 - spec.dampening) * grad)
        grad = grad + momentum * buf if spec.nesterov else buf
    return sub(param, lr * grad), buf


def adam_update(param, grad, exp_avg, exp_avg_sq, step, spec: Adam, lr, sqrt, in_place: bool = False, beta1=None):
    """One Adam/AdamW step number ``step`` (from 1). Returns ``(param, exp_avg, exp_avg_sq)``."""
    add, sub, mul, div = _arithmetic(in_place)
    beta1 = spec.betas[0] if beta1 is None else beta1
    beta2 = spec.betas[1]
    if spec.weight_decay:
        if spec.decoupled_weight_decay:
            param = mul(param, 1 - lr * spec.weight_decay)
        else:
            grad = grad + spec.weight_decay * param
    exp_avg = add(exp_avg, (1 - beta1) * (grad - exp_avg))
    exp_avg_sq = add(mul(exp_avg_sq, beta2), (1 - beta2) * grad * grad)
    if spec.eps_placement == "before_correction":
        step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        return sub(param, mul(exp_avg / (sqrt(exp_avg_sq) + spec.eps), step_size)), exp_avg, exp_avg_sq
    step_size = lr / (1 - beta1**step)
    denom = add(div(sqrt(exp_avg_sq), (1 - beta2**step) ** 0.5), spec.eps)
    return sub(param, mul(exp_avg / denom, step_size)), exp_avg, exp_avg_sq


def rmsprop_update(
    param, grad, square_avg, momentum_buffer, grad_avg, spec: RMSprop, lr, sqrt, in_place=False, momentum=None
):
    """One RMSprop step; ``momentum_buffer`` / ``grad_avg`` are ``None`` unless the spec has
    momentum / is centered. Returns ``(param, square_avg, momentum_buffer, grad_avg)``."""
    add, sub, mul, _ = _arithmetic(in_place)
    momentum = spec.momentum if momentum is None else momentum
    if spec.weight_decay:
        grad = grad + spec.weight_decay * param
    square_avg = add(mul(square_avg, spec.alpha), (1 - spec.alpha) * grad * grad)
    if spec.centered:
        grad_avg = add(grad_avg, (1 - spec.alpha) * (grad - grad_avg))
        avg = sqrt(square_avg - grad_avg * grad_avg)
    else:
        avg = sqrt(square_avg)
    avg = add(avg, spec.eps)
    if spec.momentum:
        momentum_buffer = add(mul(momentum_buffer, momentum), grad / avg)
        return sub(param, lr * momentum_buffer), square_avg, momentum_buffer, grad_avg
    return sub(param, mul(grad / avg, lr)), square_avg, momentum_buffer, grad_avg


def adagrad_update(param, grad, state_sum, step, spec: Adagrad, lr, sqrt, in_place: bool = False):
    """One Adagrad step number ``step`` (from 1). Returns ``(param, sum)``."""
    add, sub, mul, _ = _arithmetic(in_place)
    if spec.weight_decay:
        grad = grad + spec.weight_decay * param
    decayed_lr = lr / (1 + (step - 1) * spec.lr_decay)
    state_sum = add(state_sum, grad * grad)
    std = add(sqrt(state_sum), spec.eps)
    return sub(param, mul(grad / std, decayed_lr)), state_sum


def adadelta_update(param, grad, square_avg, acc_delta, spec: Adadelta, lr, sqrt, in_place: bool = False):
    """One Adadelta step. Returns ``(param, square_avg, acc_delta)``."""
    add, sub, mul, div = _arithmetic(in_place)
    if spec.weight_decay:
        grad = grad + spec.weight_decay * param
    square_avg = add(mul(square_avg, spec.rho), (1 - spec.rho) * grad * grad)
    std = sqrt(square_avg + spec.eps)
    delta = mul(div(sqrt(acc_delta + spec.eps), std), grad)
    acc_delta = add(mul(acc_delta, spec.rho), (1 - spec.rho) * delta * delta)
    return sub(param, lr * delta), square_avg, acc_delta


def optimizer_update(
    spec: Optimizer, param, grad, buffers: tuple, step, lr, sqrt, in_place: bool = False, momentum=None
):
    """One step of ``spec``'s optimizer on one parameter, whatever its kind: ``buffers`` holds
    the spec's ``state_names`` buffers in that order (created by the caller from
    :func:`initial_buffer_value`, except SGD's momentum buffer: ``None`` before the first step);
    ``step`` counts from 1; ``momentum`` is the live :func:`momentum` (``None``: the spec's).
    Returns ``(param, buffers)`` in the same order."""
    # written for MindSpore's graph syntax too: no starred assignment, no dicts
    if isinstance(spec, SGD):
        param, buf = sgd_update(param, grad, buffers[0] if buffers else None, spec, lr, in_place, momentum)
        return param, (buf,) if buffers else ()
    if isinstance(spec, Adam):
        param, exp_avg, exp_avg_sq = adam_update(
            param, grad, buffers[0], buffers[1], step, spec, lr, sqrt, in_place, momentum
        )
        return param, (exp_avg, exp_avg_sq)
    if isinstance(spec, RMSprop):
        momentum_buffer = buffers[1] if spec.momentum else None
        grad_avg = buffers[-1] if spec.centered else None
        param, square_avg, momentum_buffer, grad_avg = rmsprop_update(
            param, grad, buffers[0], momentum_buffer, grad_avg, spec, lr, sqrt, in_place, momentum
        )
        return param, (square_avg,) + ((momentum_buffer,) if spec.momentum else ()) + (
            (grad_avg,) if spec.centered else ()
        )
    if isinstance(spec, Adagrad):
        param, state_sum = adagrad_update(param, grad, buffers[0], step, spec, lr, sqrt, in_place)
        return param, (state_sum,)
    param, square_avg, acc_delta = adadelta_update(param, grad, buffers[0], buffers[1], spec, lr, sqrt, in_place)
    return param, (square_avg, acc_delta)


def clip_grad_norm_scale(norms, max_norm: float, sqrt, minimum):
    """``torch.nn.utils.clip_grad_norm_``'s factor for every gradient: ``max_norm / (total +
    1e-6)`` clamped to 1, ``total`` being the 2-norm of all gradients together, from each
    gradient's 2-norm in ``norms`` (computed once, then every gradient is multiplied by it)."""
    squares = norms[0] * norms[0]
    for norm in norms[1:]:
        squares = squares + norm * norm
    return minimum(max_norm / (sqrt(squares) + 1e-6), 1.0)
