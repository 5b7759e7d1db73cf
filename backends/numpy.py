"""NumPy backend: no framework, hand-written forward and backward passes.

Each layer is a small class: ``forward`` keeps what its ``backward`` needs, ``backward`` adds the
parameter gradients into preallocated ``grads`` buffers and returns the input gradient. With no
autograd tape, ``forward`` records those caches, ``loss`` returns a :class:`LossValue` that knows
its gradient with respect to the predictions, and ``backward`` runs the layers in reverse from it.
The caches belong to the latest ``forward``; ``backward`` refuses the loss of an older one.
Parameters are updated in place, so views of them (the convolution's weight matrix) stay valid.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from unitrain.layers import BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from unitrain.loop import InputError, TrainingLoop
from unitrain.losses import CrossEntropyLoss, MSELoss, NLLLoss
from unitrain.optim import Adam, adam_update, sgd_update
from unitrain.randomness import dropout_mask, dropout_stream, set_stream_state, stream_state


class _Layer:
    """Parameters, gradients and buffers as arrays named like PyTorch's, allocated from the spec.
    Subclasses define ``forward(x, training, record)`` (``record``: keep what backward needs) and
    ``backward(grad, need_input_grad)`` (returns the input gradient, or ``None`` when not needed)."""

    def __init__(self, spec, dtype, rng):
        self.spec = spec
        self.params = {key: np.zeros(shape, dtype) for key, shape in spec.param_shapes().items()}
        self.grads = {key: np.zeros(shape, dtype) for key, shape in spec.param_shapes().items()}
        self.buffers = {
            key: np.zeros(shape, np.int64 if key == "num_batches_tracked" else dtype)
            for key, shape in spec.buffer_shapes().items()
        }


class _Linear(_Layer):
    def forward(self, x, training, record):
        if record:
            self.x = x
        out = x @ self.params["weight"].T
        if "bias" in self.params:
            out += self.params["bias"]
        return out

    def backward(self, grad, need_input_grad):
        self.grads["weight"] += grad.T @ self.x
        if "bias" in self.grads:
            self.grads["bias"] += grad.sum(0)
        return grad @ self.params["weight"] if need_input_grad else None


class _Conv2d(_Layer):
    """im2col: each sample's windows become a (C*k*k, OH*OW) matrix, so one batched matmul
    yields NCHW output directly (measured faster than one (C*k*k, N*OH*OW) matmul plus the
    transposing copies it needs in both passes)."""

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        self.matrix = self.params["weight"].reshape(spec.out_channels, -1)
        self.grad_matrix = self.grads["weight"].reshape(spec.out_channels, -1)

    def forward(self, x, training, record):
        k, s, p = self.spec.kernel_size, self.spec.stride, self.spec.padding
        if p:
            x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        n, c = x.shape[:2]
        windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s]  # (N, C, OH, OW, k, k)
        oh, ow = windows.shape[2:4]
        cols = windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * k * k, oh * ow)  # the one copy
        out = self.matrix @ cols
        if "bias" in self.params:
            out += self.params["bias"][:, None]
        if record:
            self.cols, self.padded_shape = cols, x.shape
        return out.reshape(n, -1, oh, ow)

    def backward(self, grad, need_input_grad):
        n, o, oh, ow = grad.shape
        grad = grad.reshape(n, o, oh * ow)
        self.grad_matrix += (grad @ self.cols.transpose(0, 2, 1)).sum(0)
        if "bias" in self.grads:
            self.grads["bias"] += grad.sum((0, 2))
        if not need_input_grad:
            return None
        k, s, p = self.spec.kernel_size, self.spec.stride, self.spec.padding
        grad_cols = (self.matrix.T @ grad).reshape(n, -1, k, k, oh, ow)
        # col2im: scatter-add each kernel offset's columns back onto the input positions it read
        grad_x = np.zeros(self.padded_shape, grad.dtype)
        for i in range(k):
            for j in range(k):
                grad_x[:, :, i : i + s * oh : s, j : j + s * ow : s] += grad_cols[:, :, i, j]
        h, w = self.padded_shape[2:]
        return grad_x[:, :, p : h - p, p : w - p] if p else grad_x


class _MaxPool2d(_Layer):
    """Max over the k*k strided slices of the input, one per window offset; ``argmax`` keeps the
    first maximal offset per window (PyTorch's tie rule), and backward routes the gradient there."""

    def _slices(self, x, oh, ow):
        k, s = self.spec.kernel_size, self.spec.step
        for i in range(k):
            for j in range(k):
                yield x[:, :, i : i + s * oh : s, j : j + s * ow : s]

    def forward(self, x, training, record):
        k, s = self.spec.kernel_size, self.spec.step
        oh, ow = ((d - k) // s + 1 for d in x.shape[2:])
        slices = self._slices(x, oh, ow)
        out = next(slices).copy()
        argmax = np.zeros(out.shape, np.min_scalar_type(k * k - 1))
        for offset, candidate in enumerate(slices, 1):
            np.putmask(argmax, candidate > out, offset)  # putmask, maximum: far faster than copyto(where=)
            np.maximum(out, candidate, out=out)
        if record:
            self.argmax, self.input_shape = argmax, x.shape
        return out

    def backward(self, grad, need_input_grad):
        k, s = self.spec.kernel_size, self.spec.step
        oh, ow = grad.shape[2:]
        h, w = self.input_shape[2:]
        if s == k and (h, w) == (oh * k, ow * k):
            # windows tile the input exactly: every element is written once, no zeroing or adding
            grad_x = np.empty(self.input_shape, grad.dtype)
            for offset, target in enumerate(self._slices(grad_x, oh, ow)):
                target[...] = grad * (self.argmax == offset)  # faster than a ufunc writing to strided out=
        else:
            grad_x = np.zeros(self.input_shape, grad.dtype)
            for offset, target in enumerate(self._slices(grad_x, oh, ow)):
                target += grad * (self.argmax == offset)
        return grad_x


class _ReLU(_Layer):
    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        #: set by the loop when the input is an array this pass made (never the caller's batch)
        self.in_place = False

    def forward(self, x, training, record):
        out = np.maximum(x, 0, out=x if self.in_place else None)
        if record:
            self.out = out
        return out

    def backward(self, grad, need_input_grad):
        # every backward returns a fresh array, so the incoming gradient can be overwritten
        grad *= self.out > 0
        return grad


class _Flatten(_Layer):
    def forward(self, x, training, record):
        if record:
            self.input_shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, grad, need_input_grad):
        return grad.reshape(self.input_shape)


class _Dropout(_Layer):
    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        self.rng = rng

    def forward(self, x, training, record):
        scale = dropout_mask(self.rng, x.shape, self.spec.p, x.dtype) if training and self.spec.p else None
        if record:
            self.scale = scale
        return x if scale is None else x * scale

    def backward(self, grad, need_input_grad):
        if self.scale is not None:
            grad *= self.scale
        return grad


class _BatchNorm(_Layer):
    def forward(self, x, training, record):
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcasts per-channel vectors over N(, H, W)
        weight, bias = self.params["weight"].reshape(shape), self.params["bias"].reshape(shape)
        if training:
            count = x.size // x.shape[1]
            if count < 2:
                raise InputError(f"{self.spec} needs more than one value per channel in training, got {x.shape}")
            mean = x.mean(axes, keepdims=True)
            centered = x - mean
            squares = np.square(centered).sum(axes)
            inv_std = 1 / np.sqrt(squares.reshape(shape) / count + self.spec.eps)
            self._update_running(mean.reshape(-1), squares / (count - 1))
            x_hat = centered
            x_hat *= inv_std
        else:
            inv_std = 1 / np.sqrt(self.buffers["running_var"].reshape(shape) + self.spec.eps)
            x_hat = (x - self.buffers["running_mean"].reshape(shape)) * inv_std
        if record:
            self.x_hat, self.inv_std, self.batch_stats = x_hat, inv_std, training
        return x_hat * weight + bias

    def _update_running(self, mean, unbiased_var):
        momentum = self.spec.momentum
        self.buffers["running_mean"][...] = momentum * mean + (1 - momentum) * self.buffers["running_mean"]
        self.buffers["running_var"][...] = momentum * unbiased_var + (1 - momentum) * self.buffers["running_var"]
        self.buffers["num_batches_tracked"] += 1

    def backward(self, grad, need_input_grad):
        axes = (0, *range(2, grad.ndim))
        shape = self.inv_std.shape
        grad_weight = (grad * self.x_hat).sum(axes)
        grad_bias = grad.sum(axes)
        self.grads["weight"] += grad_weight
        self.grads["bias"] += grad_bias
        if not need_input_grad:
            return None
        scale = self.params["weight"].reshape(shape) * self.inv_std
        if not self.batch_stats:
            return grad * scale
        # the batch mean and variance depend on x too: dx = w/std * (g - mean(g) - x_hat * mean(g * x_hat))
        count = grad.size // grad.shape[1]
        grad_x = self.x_hat * (grad_weight / count).reshape(shape)
        grad_x += (grad_bias / count).reshape(shape)
        np.subtract(grad, grad_x, out=grad_x)
        grad_x *= scale
        return grad_x


_LAYERS = {
    Linear: _Linear,
    Conv2d: _Conv2d,
    MaxPool2d: _MaxPool2d,
    ReLU: _ReLU,
    Flatten: _Flatten,
    Dropout: _Dropout,
    BatchNorm1d: _BatchNorm,
    BatchNorm2d: _BatchNorm,
}


def _loss_terms(spec, pred, y):
    """Per-sample (MSE: per-element) losses and a function returning the gradient of their
    sum times ``scale`` with respect to ``pred`` (a fresh array on every call)."""
    if isinstance(spec, MSELoss):
        if y.shape != pred.shape:
            raise InputError(f"MSE targets must have the predictions' shape {pred.shape}, got {y.shape}")
        diff = pred - y
        return diff * diff, lambda scale: diff * (2 * scale)
    if pred.ndim != 2:
        raise InputError(f"{type(spec).__name__} needs predictions of shape (N, classes), got {pred.shape}")
    rows = np.arange(len(y))
    if isinstance(spec, NLLLoss):

        def grad(scale):
            g = np.zeros_like(pred)
            g[rows, y] = -scale
            return g

        return -pred[rows, y], grad
    assert isinstance(spec, CrossEntropyLoss)
    shifted = pred - pred.max(1, keepdims=True)  # stable log-softmax
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))

    def grad(scale):  # softmax - one_hot
        g = np.exp(log_probs)
        g[rows, y] -= 1
        g *= scale
        return g

    return -log_probs[rows, y], grad


class LossValue:
    """A loss as returned by :meth:`NumpyLoop.loss`: a 0-d value (``float()`` reads it) that
    also carries its gradient with respect to the predictions of the forward it came from."""

    __slots__ = ("forward_id", "grad", "value")

    def __init__(self, value, grad, forward_id):
        self.value, self.grad, self.forward_id = value, grad, forward_id

    def __float__(self):
        return float(self.value)

    def __repr__(self):
        return f"LossValue({float(self.value)!r})"


def _quiet(method):
    """Runs ``method`` without NumPy's overflow/invalid warnings. A diverging run is reported
    from its NaN/Inf loss (as every framework does); the warnings would only repeat it."""

    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return method(*args, **kwargs)

    return quiet


class NumpyLoop(TrainingLoop):
    name = "numpy"
    capabilities = frozenset({"dropout", "batchnorm", "conv", "float64", "random-state"})

    def _build(self, model):
        self._rng = dropout_stream(self.seed)
        named = list(model.named_layers())
        self._layers = [_LAYERS[type(spec)](spec, self.dtype, self._rng) for _, spec in named]
        made_here = False  # whether the current activation is an array the pass allocated
        for layer in self._layers:
            if isinstance(layer, _ReLU):
                layer.in_place = made_here
            made_here = made_here or not isinstance(layer, (_Flatten, _Dropout))  # these may pass x on
        self._params, self._grads, self._state = {}, {}, {}
        for (prefix, _), layer in zip(named, self._layers, strict=True):
            for key, value in {**layer.params, **layer.buffers}.items():
                self._state[f"{prefix}.{key}"] = value
            for key in layer.params:
                self._params[f"{prefix}.{key}"] = layer.params[key]
                self._grads[f"{prefix}.{key}"] = layer.grads[key]
        # layers before the first one with parameters need no backward, and it no input gradient
        self._first_trained = next((i for i, layer in enumerate(self._layers) if layer.params), len(self._layers))
        self._optimizer_state: dict[str, np.ndarray] = {}
        self._mode = True
        self._forward_id = 0

    def _set_training(self, mode):
        self._mode = mode

    def _zero_grad(self):
        for grad in self._grads.values():
            grad.fill(0)

    @_quiet
    def _run(self, x, record):
        for layer in self._layers:
            x = layer.forward(x, self._mode, record)
        return x

    def _forward(self, x):
        self._forward_id += 1
        return self._run(x, record=True)

    @_quiet
    def _loss(self, pred, y):
        terms, grad = _loss_terms(self.loss_spec, pred, y)
        value = terms.sum()
        if self.loss_spec.reduction == "mean":
            value /= self.dtype.type(terms.size)  # a NumPy 1.x float32 scalar over a Python int gives float64
            return LossValue(value, lambda: grad(1 / terms.size), self._forward_id)
        return LossValue(value, lambda: grad(1), self._forward_id)

    @_quiet
    def _backward(self, loss):
        if not isinstance(loss, LossValue) or loss.forward_id != self._forward_id:
            raise RuntimeError("backward() needs the loss of the latest forward(); only its intermediates are kept")
        grad = loss.grad()
        first = self._first_trained
        for index in range(len(self._layers) - 1, first - 1, -1):
            grad = self._layers[index].backward(grad, index > first)

    @_quiet
    def _update(self):
        spec, state = self.optimizer_spec, self._optimizer_state
        for name, param in self._params.items():
            grad = self._grads[name]
            if isinstance(spec, Adam):
                avg, avg_sq = f"{name}.exp_avg", f"{name}.exp_avg_sq"
                if avg not in state:
                    state[avg], state[avg_sq] = np.zeros_like(param), np.zeros_like(param)
                param[...], state[avg], state[avg_sq] = adam_update(
                    param, grad, state[avg], state[avg_sq], self.step_count + 1, spec, np.sqrt
                )
            else:
                param[...], buf = sgd_update(param, grad, state.get(f"{name}.momentum_buffer"), spec)
                if buf is not None:
                    # the first step's buffer is the gradient itself, which zero_grad clears
                    state[f"{name}.momentum_buffer"] = buf.copy() if buf is grad else buf

    def _step(self, x, y):
        self._zero_grad()
        loss = self._loss(self._forward(x), y)
        self._backward(loss)
        self._update()
        return loss.value

    def _predict(self, x):
        return self._run(x, record=False)

    def _evaluate_batch(self, x, y):
        pred = self._run(x, record=False)
        terms, _ = _loss_terms(self.loss_spec, pred, y)
        correct = int((pred.argmax(1) == y).sum()) if self.loss_spec.class_targets else 0
        return float(terms.sum(dtype=np.float64)), correct

    def _gradients(self):
        return {name: grad.copy() for name, grad in self._grads.items()}

    def _state_dict(self):
        return {name: value.copy() for name, value in self._state.items()}

    def _load_state_dict(self, state):
        for name, value in state.items():
            self._state[name][...] = value

    def _optimizer_state_dict(self):
        state = {name: value.copy() for name, value in self._optimizer_state.items()}
        return {"step": np.array(self.step_count, np.int64), **state}

    def _load_optimizer_state_dict(self, state):
        self._optimizer_state = {key: np.array(value) for key, value in state.items() if key != "step"}

    def _random_state(self):
        return stream_state(self._rng)

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)
