"""NumPy backend: no framework, hand-written forward and backward passes.

The model is a tree of nodes mirroring the spec (:mod:`unitrain.backends.numpy_layers`:
``_Sequence`` for a ``Sequential``, ``_Residual`` for ``post(body(x) + shortcut(x))``, leaf
layers, a graph's node list). With no autograd tape, ``forward`` records what each node's backward
needs, ``loss`` returns a :class:`LossValue` that knows its gradient with respect to the
predictions, and ``backward`` runs the tree in reverse from it. The caches belong to the latest
``forward``; ``backward`` refuses the loss of an older one.
"""

from __future__ import annotations

import functools

import numpy as np
from unitrain.backends.numpy_sequences import _sigmoid

from unitrain import expr
from unitrain.loop import InputError, TrainingLoop
from unitrain.loss_value import LossExpression
from unitrain.losses import (
    BCE_GRAD_EPSILON,
    BCE_LOG_FLOOR,
    BCELoss,
    BCEWithLogitsLoss,
    CustomLoss,
    HuberLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    PerOutputLoss,
    SmoothL1Loss,
)
from unitrain.optim import clip_grad_norm_scale, initial_buffer_value, optimizer_update, starts_as_gradient
from unitrain.randomness import dropout_stream, set_stream_state, stream_state

from . import numpy_graph
from .numpy_layers import _LAYERS, _build, _log_softmax

# --- losses --------------------------------------------------------------------------------------


def _class_terms(spec, pred, y):
    """CrossEntropyLoss and NLLLoss: the terms that count and the gradient function. Extra axes,
    ``(N, C, d1, ...)``, are rows of their own (classes moved last); rows whose class index is
    ``ignore_index`` give no term and a zero gradient."""
    if pred.ndim < 2:
        raise InputError(f"{type(spec).__name__} needs predictions of shape (N, classes, ...), got {pred.shape}")
    shape, classes = pred.shape, pred.shape[1]
    if pred.ndim > 2:
        pred, y = _classes_last(pred), (_classes_last(y) if y.dtype.kind == "f" else y.reshape(-1))
    terms, grad = _class_rows(spec, pred, y)
    ignored = None if y.dtype.kind == "f" else y == spec.ignore_index
    if ignored is not None and ignored.any():
        terms = terms[~ignored]
        row_grad = grad

        def grad(scale):
            g = row_grad(scale, np.where(ignored, 0, y))
            g[ignored] = 0
            return g

    if len(shape) == 2:
        return terms, grad
    moved = (shape[0], *shape[2:], classes)
    return terms, lambda scale: np.moveaxis(grad(scale).reshape(moved), -1, 1)


def _classes_last(values):
    """``(N, C, d1, ...)`` as rows ``(N * d1 * ..., C)``."""
    return np.moveaxis(values, 1, -1).reshape(-1, values.shape[1])


def _class_rows(spec, pred, y):
    """Per-row terms of (N, C) predictions and ``grad(scale, labels=y)``."""
    rows = np.arange(len(y))
    if isinstance(spec, NLLLoss):

        def grad(scale, labels=y):
            g = np.zeros_like(pred)
            g[rows, labels] = -scale
            return g

        return -pred[rows, np.where(y == spec.ignore_index, 0, y)], grad
    log_probs = _log_softmax(pred, 1)
    smoothing, classes = spec.label_smoothing, pred.shape[1]
    if y.dtype.kind == "f":  # class probabilities, shaped like pred (checked by the core)
        target = y * (1 - smoothing) + smoothing / classes if smoothing else y
        terms = -(target * log_probs).sum(1)

        def grad(scale):  # softmax * sum(target) - target
            g = np.exp(log_probs)
            g *= target.sum(1, keepdims=True)
            g -= target
            g *= scale
            return g

        return terms, grad
    terms = -log_probs[rows, np.where(y == spec.ignore_index, 0, y)]
    if smoothing:
        terms = (1 - smoothing) * terms - smoothing / classes * log_probs.sum(1)

    def grad(scale, labels=y):  # softmax - ((1 - smoothing) * one_hot + smoothing / classes)
        g = np.exp(log_probs)
        g[rows, labels] -= 1 - smoothing
        if smoothing:
            g -= smoothing / classes
        g *= scale
        return g

    return terms, grad


def _elementwise_terms(spec, pred, y):
    """Losses on targets shaped like the predictions (checked by the core): per-element losses and
    the gradient function."""
    if isinstance(spec, BCEWithLogitsLoss):
        # max(p, 0) - p*t + log(1 + exp(-|p|)); gradient sigmoid(p) - t
        return np.maximum(pred, 0) - pred * y + np.log1p(np.exp(-np.abs(pred))), lambda s: (_sigmoid(pred) - y) * s
    if isinstance(spec, BCELoss):
        # PyTorch's forward, logs floored at -100, and its gradient, finite at 0 and 1
        floor = pred.dtype.type(BCE_LOG_FLOOR)
        with np.errstate(divide="ignore"):  # log(0) is -inf, floored right here
            terms = (y - 1) * np.maximum(np.log1p(-pred), floor) - y * np.maximum(np.log(pred), floor)
        return terms, lambda s: (pred - y) / np.maximum((1 - pred) * pred, pred.dtype.type(BCE_GRAD_EPSILON)) * s
    diff = pred - y
    if isinstance(spec, MSELoss):
        return diff * diff, lambda scale: diff * (2 * scale)
    if isinstance(spec, L1Loss) or (isinstance(spec, SmoothL1Loss) and spec.beta == 0):
        return np.abs(diff), lambda scale: np.sign(diff) * scale
    # SmoothL1Loss(beta) is HuberLoss(delta=beta) / beta; both quadratic inside, linear outside
    width = spec.beta if isinstance(spec, SmoothL1Loss) else spec.delta
    divisor = spec.beta if isinstance(spec, SmoothL1Loss) else 1.0
    magnitude = np.abs(diff)
    inside = magnitude < width
    terms = np.where(inside, 0.5 * diff * diff, width * (magnitude - 0.5 * width)) / diff.dtype.type(divisor)
    return terms, lambda scale: np.where(inside, diff, width * np.sign(diff)) * (scale / divisor)


_ELEMENTWISE_LOSSES = (MSELoss, L1Loss, BCEWithLogitsLoss, BCELoss, SmoothL1Loss, HuberLoss)


def _loss_terms(spec, pred, y):
    """Per-sample (elementwise losses: per-element) losses and a function returning the gradient
    of their sum times ``scale`` with respect to ``pred`` (a fresh array on every call)."""
    if isinstance(spec, _ELEMENTWISE_LOSSES):
        return _elementwise_terms(spec, pred, y)
    return _class_terms(spec, pred, y)


class _Origin:
    """What the gradient of a loss needs: the gradient function of the forward it came from."""

    __slots__ = ("forward_id", "grad")

    def __init__(self, grad, forward_id):
        self.grad, self.forward_id = grad, forward_id


class LossValue(LossExpression):
    """A loss as returned by :meth:`NumpyLoop.loss`: a 0-d value (``float()`` reads it) that takes
    arithmetic as torch's loss does (see :mod:`unitrain.loss_value`), and carries the gradient
    with respect to the predictions of the forward it came from."""

    __slots__ = ()

    def __init__(self, value, grad, forward_id):
        super().__init__(value, _Origin(grad, forward_id))


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
    capabilities = frozenset({
        "dropout", "batchnorm", "conv", "float64", "random-state",
        "residual", "activations", "layernorm", "pooling", "losses", "custom-loss", "optimizers", "clipping",
        "distributed", "training-controls", "graph", "sequences", "multi-model", "attention",
    })  # fmt: skip

    def _build(self, model):
        self._rng = dropout_stream(self.seed, self.rank)
        named = list(model.named_layers())
        leaves = [_LAYERS[type(spec)](spec, self.dtype, self._rng) for _, spec in named]
        tied = numpy_graph.tie(model, dict(zip((path for path, _ in named), leaves, strict=True)))
        make_leaf = lambda spec: _LAYERS[type(spec)](spec, self.dtype, self._rng)  # noqa: E731
        self._root, _ = _build(model, iter(leaves), False, make_leaf)
        self._leaves, self._make_leaf = leaves, make_leaf  # a multi-model step builds a tree per call from them
        self._params, self._grads, self._state = {}, {}, {}
        for (prefix, _), layer in zip(named, leaves, strict=True):
            for key, value in {**layer.params, **layer.buffers}.items():
                name = f"{prefix}.{key}"
                if name in tied:  # its source's arrays, listed under the source's name
                    continue
                self._state[name] = value
                if key in layer.params:
                    self._params[name], self._grads[name] = value, layer.grads[key]
        self._optimizer_state: dict[str, np.ndarray] = {}
        self._resolve_controls(self._params)
        self._stop_frozen_gradients({f"{prefix}.{key}": (layer, key) for (prefix, _), layer in
                                     zip(named, leaves, strict=True) for key in layer.params})  # fmt: skip
        self._mode = True
        self._forward_id = 0

    def _stop_frozen_gradients(self, owners):
        """No gradient for the frozen parameters whose layer's backward can leave it out (``owners``:
        name -> (layer, key)), as PyTorch's ``requires_grad=False``."""
        for name in self.frozen:
            layer, key = owners[name]
            if layer.freeze(key):
                del self._grads[name]

    def _set_training(self, mode):
        self._mode = mode

    def _zero_grad(self):
        for grad in self._grads.values():
            grad.fill(0)

    @_quiet
    def _run(self, x, record):
        return self._root.forward(x, self._mode, record)

    def _forward(self, x):
        self._forward_id += 1
        return self._run(x, record=True)

    @_quiet
    def _loss(self, pred, y):
        if isinstance(self.loss_spec, PerOutputLoss):  # PyTorch's loss1(out1, y1) + loss2(out2, y2)
            parts = [self._loss_value(*part) for part in zip(self.loss_spec.losses, pred, y, strict=True)]
            value = functools.reduce(lambda a, b: a + b, (value for value, _ in parts))
            return LossValue(value, lambda: tuple(grad() for _, grad in parts), self._forward_id)
        return LossValue(*self._loss_value(self.loss_spec, pred, y), self._forward_id)

    def _loss_value(self, spec, pred, y):
        """One loss's value and a function giving its gradient with respect to ``pred``."""
        if isinstance(spec, CustomLoss):
            value, grad = expr.numpy_value_and_grad(spec.tree, pred, y)  # several outputs: a tuple of gradients
            return self.dtype.type(value), lambda: tuple(part.copy() for part in grad) if isinstance(
                grad, tuple) else grad.copy()  # fmt: skip
        terms, grad = _loss_terms(spec, pred, y)
        value = terms.sum()
        if spec.reduction == "mean":
            value /= self.dtype.type(terms.size)  # a NumPy 1.x float32 scalar over a Python int gives float64
            return value, lambda: grad(1 / terms.size)
        return value, lambda: grad(1)

    @_quiet
    def _backward(self, loss):
        if not isinstance(loss, LossValue) or loss.origin.forward_id != self._forward_id:
            raise RuntimeError("backward() needs the loss of the latest forward(); only its intermediates are kept")
        grad = loss.origin.grad()
        if loss.slope != 1:  # an expression of the loss: the chain rule's factor
            grad *= self.dtype.type(loss.slope)
        self._root.backward(grad, False)

    @_quiet
    def _update(self):
        state = self._optimizer_state
        self._clip_gradients()
        for group in self.param_groups:
            spec, names = group.spec, group.spec.state_names
            for name in group.names:
                param = self._params[name]
                keys = [f"{name}.{buffer}" for buffer in names]
                if keys and keys[0] not in state and not starts_as_gradient(spec):
                    for key, buffer in zip(keys, names, strict=True):
                        state[key] = np.full_like(param, initial_buffer_value(spec, buffer))
                buffers = tuple(state.get(key) for key in keys)
                _, buffers = optimizer_update(
                    spec, param, self._grads[name], buffers, self.step_count + 1, group.lr, np.sqrt, True,
                    group.momentum,
                )  # fmt: skip
                state.update(zip(keys, buffers, strict=True))

    def _scale_gradients(self, factor):
        for grad in self._grads.values():
            grad *= self.dtype.type(factor)

    def _clip_gradients(self):
        grads = [grad for name, grad in self._grads.items() if name not in self.frozen]
        if self.clip_grad_value is not None:
            for grad in grads:
                np.clip(grad, -self.clip_grad_value, self.clip_grad_value, out=grad)
        elif self.clip_grad_norm is not None and grads:
            norms = [np.linalg.norm(grad.reshape(-1)) for grad in grads]
            scale = clip_grad_norm_scale(norms, self.clip_grad_norm, np.sqrt, np.minimum).astype(self.dtype)
            for grad in grads:
                grad *= scale

    def _set_lr(self, lr):
        pass  # each update reads its group's lr

    def _set_momentum(self, momentum):
        pass  # each update reads its group's momentum

    def _step(self, x, y):
        self._zero_grad()
        self._step_pred = self._forward(x)
        loss = self._loss(self._step_pred, y)
        self._backward(loss)
        self._update()
        return loss.value

    def _step_correct(self, y):
        return self._count_correct(self._step_pred, y)

    def _count_correct(self, pred, y):
        return int((pred.argmax(1) == y).sum())

    def _predict(self, x):
        return self._run(x, record=False)

    def _evaluate_batch(self, x, y):
        pred = self._run(x, record=False)
        if isinstance(self.loss_spec, PerOutputLoss):
            sums = [
                0.0 if isinstance(spec, CustomLoss) else _loss_terms(spec, p, t)[0].sum(dtype=np.float64)
                for spec, p, t in zip(self.loss_spec.losses, pred, y, strict=True)
            ]  # the core sums a CustomLoss
            return tuple(map(float, sums)), 0
        terms, _ = _loss_terms(self.loss_spec, pred, y)
        correct = int((pred.argmax(1) == y).sum()) if y.dtype.kind in "iu" else 0
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

    # --- data parallel: MPI through mpi4py (launched by mpiexec) ------------------------------

    def _setup_distributed(self):
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        return self._comm.Get_rank(), self._comm.Get_size()

    def _reduce_gradients(self, weight):
        from mpi4py import MPI

        grads = list(self._grads.values())
        flat = np.concatenate([grad.ravel() for grad in grads])  # one allreduce for all parameters
        flat *= self.dtype.type(weight)
        self._comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        offset = 0
        for grad in grads:
            grad[...] = flat[offset : offset + grad.size].reshape(grad.shape)
            offset += grad.size

    def _all_sum(self, values):
        from mpi4py import MPI

        total = np.empty_like(values)
        self._comm.Allreduce(values, total, op=MPI.SUM)
        return total

    def _random_state(self):
        return stream_state(self._rng)

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)
