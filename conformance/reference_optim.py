"""The reference's optimizers: each ``torch.optim`` update as its documentation writes it, in float64,
and :class:`Optimizer`, which applies a unitrain optimizer spec with them (see :mod:`.reference`)."""

from __future__ import annotations

import math

import numpy as np

F64 = np.float64


def sgd(param, grad, buf, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """``torch.optim.SGD``'s documented update. ``buf`` is ``None`` before the first step.
    Returns ``(param, buf)``."""
    param, grad = np.asarray(param, F64), np.asarray(grad, F64)
    if weight_decay:
        grad = grad + weight_decay * param
    if momentum:
        buf = grad.copy() if buf is None else momentum * np.asarray(buf, F64) + (1 - dampening) * grad
        grad = grad + momentum * buf if nesterov else buf
    return param - lr * grad, buf


def sgd_velocity(param, grad, velocity, *, lr, momentum, weight_decay=0.0, nesterov=False):
    """Chainer's ``MomentumSGDRule`` / Keras' ``SGD``: ``v = momentum * v - lr * g`` from
    ``v = 0``, then ``p + v`` (Keras' nesterov: ``p + momentum * v - lr * g``). Returns ``(param, v)``."""
    param, grad = np.asarray(param, F64), np.asarray(grad, F64)
    if weight_decay:
        grad = grad + weight_decay * param
    velocity = momentum * np.asarray(0.0 if velocity is None else velocity, F64) - lr * grad
    return param + (momentum * velocity - lr * grad if nesterov else velocity), velocity


def adam(param, grad, exp_avg, exp_avg_sq, step, *, lr, betas, eps, weight_decay=0.0, decoupled=False,
         eps_before_correction=False):  # fmt: skip
    """``torch.optim.Adam`` (``decoupled``: ``AdamW``), step ``step`` counted from 1, with both
    bias corrections; ``eps_before_correction``: Keras' ``Adam`` (``lr * sqrt(1 - beta2^t) /
    (1 - beta1^t) * m / (sqrt(v) + eps)``). Returns ``(param, exp_avg, exp_avg_sq)``."""
    param, grad = np.asarray(param, F64), np.asarray(grad, F64)
    beta1, beta2 = betas
    if weight_decay and decoupled:
        param = param * (1 - lr * weight_decay)
    elif weight_decay:
        grad = grad + weight_decay * param
    exp_avg = beta1 * np.asarray(exp_avg, F64) + (1 - beta1) * grad
    exp_avg_sq = beta2 * np.asarray(exp_avg_sq, F64) + (1 - beta2) * grad**2
    m_hat = exp_avg / (1 - beta1**step)
    v_hat = exp_avg_sq / (1 - beta2**step)
    if eps_before_correction:  # sqrt(v_hat) + eps / sqrt(1 - beta2^t), as the uncorrected form has it
        return param - lr * m_hat / (np.sqrt(v_hat) + eps / math.sqrt(1 - beta2**step)), exp_avg, exp_avg_sq
    return param - lr * m_hat / (np.sqrt(v_hat) + eps), exp_avg, exp_avg_sq


def rmsprop(param, grad, square_avg, momentum_buffer, grad_avg, *, lr, alpha, eps, weight_decay, momentum, centered):
    """``torch.optim.RMSprop``'s documented algorithm (buffers start at 0). Returns ``(param,
    square_avg, momentum_buffer, grad_avg)``, the last two ``None`` where not used."""
    param, grad = np.asarray(param, F64), np.asarray(grad, F64)
    if weight_decay:
        grad = grad + weight_decay * param
    square_avg = alpha * np.asarray(square_avg, F64) + (1 - alpha) * grad**2
    variance = square_avg
    if centered:
        grad_avg = alpha * np.asarray(grad_avg, F64) + (1 - alpha) * grad
        variance = variance - grad_avg**2
    if momentum > 0:
        momentum_buffer = momentum * np.asarray(momentum_buffer, F64) + grad / (np.sqrt(variance) + eps)
        return param - lr * momentum_buffer, square_avg, momentum_buffer, grad_avg if centered else None
    return param - lr * grad / (np.sqrt(variance) + eps), square_avg, None, grad_avg if centered else None


def adagrad(param, grad, state_sum, step, *, lr, lr_decay, weight_decay, eps):
    """``torch.optim.Adagrad``'s documented algorithm, step ``step`` counted from 1. Returns ``(param, sum)``."""
    param, grad = np.asarray(param, F64), np.asarray(grad, F64)
    if weight_decay:
        grad = grad + weight_decay * param
    decayed = lr / (1 + (step - 1) * lr_decay)
    state_sum = np.asarray(state_sum, F64) + grad**2
    return param - decayed * grad / (np.sqrt(state_sum) + eps), state_sum


def adadelta(param, grad, square_avg, acc_delta, *, lr, rho, eps, weight_decay):
    """``torch.optim.Adadelta``'s documented algorithm (buffers start at 0). Returns ``(param,
    square_avg, acc_delta)``."""
    param, grad = np.asarray(param, F64), np.asarray(grad, F64)
    if weight_decay:
        grad = grad + weight_decay * param
    square_avg = rho * np.asarray(square_avg, F64) + (1 - rho) * grad**2
    delta = np.sqrt(np.asarray(acc_delta, F64) + eps) / np.sqrt(square_avg + eps) * grad
    acc_delta = rho * np.asarray(acc_delta, F64) + (1 - rho) * delta**2
    return param - lr * delta, square_avg, acc_delta


def clip_gradients(grads: dict[str, np.ndarray], *, max_norm=None, max_value=None) -> dict[str, np.ndarray]:
    """``torch.nn.utils.clip_grad_norm_`` (every gradient times ``min(1, max_norm / (total + 1e-6))``,
    ``total`` the 2-norm of all gradients together) or ``clip_grad_value_`` (clamp to ``[-v, v]``)."""
    grads = {name: np.asarray(grad, F64) for name, grad in grads.items()}
    if max_value is not None:
        return {name: np.clip(grad, -max_value, max_value) for name, grad in grads.items()}
    total = np.sqrt(sum(float(np.sum(grad**2)) for grad in grads.values()))
    return {name: grad * min(1.0, max_norm / (total + 1e-6)) for name, grad in grads.items()}


class Optimizer:
    """Applies a unitrain optimizer spec with the functions above, keeping PyTorch-named state."""

    def __init__(self, spec):
        self.spec = spec
        #: the lr of the next update (``spec.lr`` until a check changes it, as ``set_lr`` does)
        self.lr = spec.lr
        #: the momentum (Adam: ``betas[0]``) of the next update, as a cycling schedule sets it; None: the spec's
        self.momentum = None
        self.steps = 0
        self.state: dict[str, np.ndarray] = {}

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec, self.steps = self.spec, self.steps + 1
        momentum = getattr(spec, "momentum", None) if self.momentum is None else self.momentum
        new = {}
        kind = type(spec).__name__
        for name, param in params.items():
            state = {key: self.state.get(f"{name}.{key}", 0.0) for key in ("square_avg", "momentum_buffer", "grad_avg",
                                                                            "acc_delta")}  # fmt: skip
            if kind == "RMSprop":
                new[name], *buffers = rmsprop(
                    param, grads[name], state["square_avg"], state["momentum_buffer"], state["grad_avg"], lr=self.lr,
                    alpha=spec.alpha, eps=spec.eps, weight_decay=spec.weight_decay, momentum=momentum,
                    centered=spec.centered,
                )  # fmt: skip
                for key, value in zip(("square_avg", "momentum_buffer", "grad_avg"), buffers, strict=True):
                    if value is not None:
                        self.state[f"{name}.{key}"] = value
            elif kind == "Adagrad":
                new[name], self.state[f"{name}.sum"] = adagrad(
                    param, grads[name], self.state.get(f"{name}.sum", spec.initial_accumulator_value), self.steps,
                    lr=self.lr, lr_decay=spec.lr_decay, weight_decay=spec.weight_decay, eps=spec.eps,
                )  # fmt: skip
            elif kind == "Adadelta":
                new[name], self.state[f"{name}.square_avg"], self.state[f"{name}.acc_delta"] = adadelta(
                    param, grads[name], state["square_avg"], state["acc_delta"], lr=self.lr, rho=spec.rho,
                    eps=spec.eps, weight_decay=spec.weight_decay,
                )  # fmt: skip
            elif hasattr(spec, "betas"):
                new[name], self.state[f"{name}.exp_avg"], self.state[f"{name}.exp_avg_sq"] = adam(
                    param, grads[name],
                    self.state.get(f"{name}.exp_avg", 0.0), self.state.get(f"{name}.exp_avg_sq", 0.0), self.steps,
                    lr=self.lr, betas=spec.betas if self.momentum is None else (self.momentum, spec.betas[1]),
                    eps=spec.eps, weight_decay=spec.weight_decay,
                    decoupled=spec.decoupled_weight_decay,
                    eps_before_correction=spec.eps_placement == "before_correction",
                )  # fmt: skip
            elif getattr(spec, "lr_in_velocity", False) and momentum:
                new[name], self.state[f"{name}.velocity"] = sgd_velocity(
                    param, grads[name], self.state.get(f"{name}.velocity"), lr=self.lr, momentum=momentum,
                    weight_decay=spec.weight_decay, nesterov=spec.nesterov,
                )  # fmt: skip
            else:
                new[name], buf = sgd(
                    param, grads[name], self.state.get(f"{name}.momentum_buffer"), lr=self.lr,
                    momentum=momentum, dampening=spec.dampening, weight_decay=spec.weight_decay,
                    nesterov=spec.nesterov,
                )  # fmt: skip
                if buf is not None:
                    self.state[f"{name}.momentum_buffer"] = buf
        return new
