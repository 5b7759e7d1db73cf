"""The independent reference: closed-form float64 NumPy for every layer spec, loss and optimizer.

Written from PyTorch's documented definitions, deliberately without importing anything from the
NumPy backend or :mod:`unitrain.optim`, so that a shared mistake cannot make both agree. Speed
does not matter here; clarity does: convolution and pooling loop over kernel offsets and output
positions, and every backward pass is the textbook derivative of its forward.

A state is a dict of arrays keyed like ``torch.nn.Sequential.state_dict()``; everything is
computed in float64 whatever the arrays came in as.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from unitrain import layers

F64 = np.float64


# --- forward and backward of a Sequential -----------------------------------------------------


class Reference:
    """A float64 copy of a model: ``forward`` records what ``backward`` needs; BatchNorm's running
    statistics are updated in ``self.state`` by training forwards, as PyTorch does."""

    def __init__(self, model: layers.Sequential, state: dict[str, np.ndarray]):
        self.model = model
        self.state = {
            key: np.array(value, np.int64 if key.endswith("num_batches_tracked") else F64)
            for key, value in state.items()
        }

    def params(self, name: str, layer: layers.Layer) -> dict[str, np.ndarray]:
        return {key: self.state[f"{name}.{key}"] for key in layer.param_shapes()}

    def forward(self, x: np.ndarray, training: bool = False, dropout_masks: dict | None = None) -> np.ndarray:
        """Output for ``x``; in training, Dropout needs its keep-masks by layer name."""
        x = np.asarray(x, F64)
        self.tape = []
        for name, layer in self.model.named_layers():
            inputs = x
            if isinstance(layer, layers.Linear):
                p = self.params(name, layer)
                x = x @ p["weight"].T + (p["bias"] if layer.bias else 0.0)
            elif isinstance(layer, layers.Conv2d):
                x = conv2d(x, **self.params(name, layer), stride=layer.stride, padding=layer.padding)
            elif isinstance(layer, layers.MaxPool2d):
                x = max_pool2d(x, layer.kernel_size, layer.step)
            elif isinstance(layer, layers.ReLU):
                x = np.maximum(x, 0.0)
            elif isinstance(layer, layers.Flatten):
                x = x.reshape(len(x), -1)
            elif isinstance(layer, layers.Dropout):
                if training and layer.p > 0:
                    x = x * dropout_masks[name] / (1 - layer.p)
            elif isinstance(layer, layers._BatchNorm):
                x = self._batch_norm(name, layer, x, training)
            else:
                raise TypeError(f"the reference has no {layer!r}")
            self.tape.append((name, layer, inputs, training, dropout_masks))
        return x

    def _batch_norm(self, name, layer, x, training):
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if training:
            count = x.size // x.shape[1]
            mean, var = x.mean(axes), x.var(axes)  # biased variance normalises ...
            m = layer.momentum  # ... the unbiased one feeds the running estimate (PyTorch)
            self.state[f"{name}.running_mean"] = (1 - m) * self.state[f"{name}.running_mean"] + m * mean
            self.state[f"{name}.running_var"] = (1 - m) * self.state[f"{name}.running_var"] + m * var * count / (
                count - 1
            )
            self.state[f"{name}.num_batches_tracked"] = self.state[f"{name}.num_batches_tracked"] + 1
        else:
            mean, var = self.state[f"{name}.running_mean"], self.state[f"{name}.running_var"]
        p = self.params(name, layer)
        x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + layer.eps)
        return x_hat * p["weight"].reshape(shape) + p["bias"].reshape(shape)

    def backward(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of every parameter, given the gradient of the loss w.r.t. the last output."""
        grads = {}
        for name, layer, x, training, masks in reversed(self.tape):
            if isinstance(layer, layers.Linear):
                p = self.params(name, layer)
                grads[f"{name}.weight"] = grad.T @ x
                if layer.bias:
                    grads[f"{name}.bias"] = grad.sum(0)
                grad = grad @ p["weight"]
            elif isinstance(layer, layers.Conv2d):
                p = self.params(name, layer)
                grad, grads[f"{name}.weight"], bias_grad = conv2d_backward(
                    x, p["weight"], grad, layer.stride, layer.padding
                )
                if layer.bias:
                    grads[f"{name}.bias"] = bias_grad
            elif isinstance(layer, layers.MaxPool2d):
                grad = max_pool2d_backward(x, grad, layer.kernel_size, layer.step)
            elif isinstance(layer, layers.ReLU):
                grad = grad * (x > 0)
            elif isinstance(layer, layers.Flatten):
                grad = grad.reshape(x.shape)
            elif isinstance(layer, layers.Dropout):
                if training and layer.p > 0:
                    grad = grad * masks[name] / (1 - layer.p)
            elif isinstance(layer, layers._BatchNorm):
                grad, grads[f"{name}.weight"], grads[f"{name}.bias"] = self._batch_norm_backward(
                    name, layer, x, grad, training
                )
        return grads

    def _batch_norm_backward(self, name, layer, x, grad, training):
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        weight = self.state[f"{name}.weight"].reshape(shape)
        if not training:
            std = np.sqrt(self.state[f"{name}.running_var"].reshape(shape) + layer.eps)
            x_hat = (x - self.state[f"{name}.running_mean"].reshape(shape)) / std
            return grad * weight / std, (grad * x_hat).sum(axes), grad.sum(axes)
        count = x.size // x.shape[1]
        mean = x.mean(axes, keepdims=True)
        std = np.sqrt(x.var(axes, keepdims=True) + layer.eps)
        x_hat = (x - mean) / std
        grad_x_hat = grad * weight
        # d/dx of (x - mean(x)) / sqrt(var(x) + eps), contracted with grad_x_hat
        grad_x = (
            grad_x_hat
            - grad_x_hat.sum(axes, keepdims=True) / count
            - x_hat * (grad_x_hat * x_hat).sum(axes, keepdims=True) / count
        ) / std
        return grad_x, (grad * x_hat).sum(axes), grad.sum(axes)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """``out[n, o, i, j] = bias[o] + sum_{c, a, b} w[o, c, a, b] * x_padded[n, c, i*s + a, j*s + b]``."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_channels, _, k, _ = weight.shape
    oh, ow = ((d - k) // stride + 1 for d in x.shape[2:])
    out = np.zeros((len(x), out_channels, oh, ow))
    for a in range(k):
        for b in range(k):
            patch = x[:, :, a : a + stride * (oh - 1) + 1 : stride, b : b + stride * (ow - 1) + 1 : stride]
            out += np.einsum("nchw,oc->nohw", patch, weight[:, :, a, b])
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def conv2d_backward(x, weight, grad, stride, padding):
    """``(grad_x, grad_weight, grad_bias)`` of :func:`conv2d`."""
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    k = weight.shape[2]
    oh, ow = grad.shape[2:]
    grad_padded = np.zeros_like(padded)
    grad_weight = np.zeros_like(weight)
    for a in range(k):
        for b in range(k):
            rows = slice(a, a + stride * (oh - 1) + 1, stride)
            cols = slice(b, b + stride * (ow - 1) + 1, stride)
            grad_weight[:, :, a, b] = np.einsum("nohw,nchw->oc", grad, padded[:, :, rows, cols])
            grad_padded[:, :, rows, cols] += np.einsum("nohw,oc->nchw", grad, weight[:, :, a, b])
    h, w = padded.shape[2:]
    grad_x = grad_padded[:, :, padding : h - padding, padding : w - padding]
    return grad_x, grad_weight, grad.sum((0, 2, 3))


def _windows(x, k, stride):
    oh, ow = ((d - k) // stride + 1 for d in x.shape[2:])
    for i in range(oh):
        for j in range(ow):
            yield i, j, (slice(i * stride, i * stride + k), slice(j * stride, j * stride + k))


def max_pool2d(x, k, stride):
    oh, ow = ((d - k) // stride + 1 for d in x.shape[2:])
    out = np.empty((*x.shape[:2], oh, ow))
    for i, j, (rows, cols) in _windows(x, k, stride):
        out[:, :, i, j] = x[:, :, rows, cols].max((2, 3))
    return out


def max_pool2d_backward(x, grad, k, stride):
    """The gradient goes to the first maximal element of each window (row-major), PyTorch's rule."""
    grad_x = np.zeros_like(x)
    n, c = x.shape[:2]
    for i, j, (rows, cols) in _windows(x, k, stride):
        window = x[:, :, rows, cols].reshape(n, c, -1)
        first = window.argmax(2)
        a, b = np.divmod(first, k)
        ni, ci = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")
        grad_x[ni, ci, rows.start + a, cols.start + b] += grad[:, :, i, j]
    return grad_x


# --- losses -----------------------------------------------------------------------------------


def loss_terms(kind: str, pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (MSE: per-element) losses and the gradient of their *sum* w.r.t. ``pred``.
    ``kind``: ``"cross_entropy"``, ``"nll"`` or ``"mse"``."""
    pred = np.asarray(pred, F64)
    if kind == "mse":
        diff = pred - np.asarray(target, F64)
        return diff**2, 2 * diff
    rows = np.arange(len(pred))
    one_hot = np.zeros_like(pred)
    one_hot[rows, target] = 1.0
    if kind == "nll":
        return -pred[rows, target], -one_hot
    if kind == "cross_entropy":
        top = pred.max(1, keepdims=True)
        log_sum_exp = top[:, 0] + np.log(np.exp(pred - top).sum(1))
        softmax = np.exp(pred - (top + np.log(np.exp(pred - top).sum(1, keepdims=True))))
        return log_sum_exp - pred[rows, target], softmax - one_hot
    raise ValueError(f"unknown loss kind {kind!r}")


def loss(kind: str, reduction: str, pred, target) -> tuple[float, np.ndarray]:
    """``(loss, gradient w.r.t. pred)`` with PyTorch's reductions (MSE's mean is over elements)."""
    terms, grad = loss_terms(kind, pred, target)
    if reduction == "sum":
        return float(terms.sum()), grad
    return float(terms.mean()), grad / terms.size


# --- optimizers -------------------------------------------------------------------------------


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


def adam(param, grad, exp_avg, exp_avg_sq, step, *, lr, betas, eps, weight_decay=0.0, decoupled=False):
    """``torch.optim.Adam`` (``decoupled``: ``AdamW``), step ``step`` counted from 1, with both
    bias corrections. Returns ``(param, exp_avg, exp_avg_sq)``."""
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
    return param - lr * m_hat / (np.sqrt(v_hat) + eps), exp_avg, exp_avg_sq


class Optimizer:
    """Applies a unitrain optimizer spec with the functions above, keeping PyTorch-named state."""

    def __init__(self, spec):
        self.spec = spec
        self.steps = 0
        self.state: dict[str, np.ndarray] = {}

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec, self.steps = self.spec, self.steps + 1
        new = {}
        for name, param in params.items():
            if hasattr(spec, "betas"):
                new[name], self.state[f"{name}.exp_avg"], self.state[f"{name}.exp_avg_sq"] = adam(
                    param, grads[name],
                    self.state.get(f"{name}.exp_avg", 0.0), self.state.get(f"{name}.exp_avg_sq", 0.0), self.steps,
                    lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay,
                    decoupled=spec.decoupled_weight_decay,
                )  # fmt: skip
            else:
                new[name], buf = sgd(
                    param, grads[name], self.state.get(f"{name}.momentum_buffer"), lr=spec.lr,
                    momentum=spec.momentum, dampening=spec.dampening, weight_decay=spec.weight_decay,
                    nesterov=spec.nesterov,
                )  # fmt: skip
                if buf is not None:
                    self.state[f"{name}.momentum_buffer"] = buf
        return new


def train_step(ref: Reference, spec_loss, optimizer: Optimizer, x, y) -> float:
    """One whole step on the reference: forward (training), loss, backward, update. Returns the
    pre-update loss."""
    kind = {"CrossEntropyLoss": "cross_entropy", "NLLLoss": "nll", "MSELoss": "mse"}[type(spec_loss).__name__]
    value, grad = loss(kind, spec_loss.reduction, ref.forward(x, training=True), y)
    grads = ref.backward(grad)
    ref.state.update(optimizer.update({name: ref.state[name] for name in grads}, grads))
    return value


# --- initial weights and weight files ---------------------------------------------------------


def initial_state(model: layers.Sequential, seed: int) -> dict[str, np.ndarray]:
    """The documented initial draw (see :func:`unitrain.weights.init_weights`): per Linear/Conv2d,
    weight then bias ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` from ``default_rng(seed)`` in float64,
    rounded to float32; BatchNorm weight 1, bias 0, running mean 0, variance 1, count 0."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, layer in model.named_layers():
        if isinstance(layer, layers.Linear):
            fan_in = layer.in_features
        elif isinstance(layer, layers.Conv2d):
            fan_in = layer.in_channels * layer.kernel_size**2
        elif isinstance(layer, layers._BatchNorm):
            n = layer.num_features
            state.update({f"{name}.weight": np.ones(n, np.float32), f"{name}.bias": np.zeros(n, np.float32),
                          f"{name}.running_mean": np.zeros(n, np.float32),
                          f"{name}.running_var": np.ones(n, np.float32),
                          f"{name}.num_batches_tracked": np.array(0, np.int64)})  # fmt: skip
            continue
        else:
            continue
        bound = 1 / math.sqrt(fan_in)
        for key, shape in layer.param_shapes().items():
            state[f"{name}.{key}"] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return state


def random_state(model: layers.Sequential, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float32 weights with every entry non-trivial (BatchNorm scales, shifts and running
    statistics away from 1 and 0), to load into a loop under test."""
    state = {}
    for name, layer in model.named_layers():
        for key, shape in {**layer.param_shapes(), **layer.buffer_shapes()}.items():
            if key == "num_batches_tracked":
                value = np.array(3, np.int64)
            elif key in ("running_var",) or (key == "weight" and isinstance(layer, layers._BatchNorm)):
                value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            else:
                bound = 1 / math.sqrt(layer.fan_in()) if isinstance(layer, (layers.Linear, layers.Conv2d)) else 0.5
                value = rng.uniform(-bound, bound, shape).astype(np.float32)
            state[f"{name}.{key}"] = value
    return state


_SAFETENSORS_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}


def write_safetensors(path: Path, state: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer (little-endian header length, JSON header, raw data), as
    the format's specification describes it; independent of :mod:`unitrain.weights`."""
    header, chunks, offset = {}, [], 0
    for name in sorted(state):
        data = np.ascontiguousarray(state[name]).astype(state[name].dtype.newbyteorder("<")).tobytes()
        code = _SAFETENSORS_CODES[np.dtype(state[name].dtype)]
        header[name] = {
            "dtype": code,
            "shape": list(np.shape(state[name])),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
