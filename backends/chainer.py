"""Chainer backend: ``chainer.links`` and ``chainer.functions`` called in order by a ``ChainList``,
trained by a ``chainer.Optimizer`` whose update rules run PyTorch's equations (:mod:`unitrain.optim`).

What is special about Chainer:

* Training vs. eval is not model state but ``chainer.config.train``; the loop sets it around every
  call. ``predict`` / ``evaluate`` also turn off ``enable_backprop``.
* Chainer names weights ``W``/``b`` and BatchNorm state ``gamma``/``beta``/``avg_mean``/``avg_var``;
  they are mapped to PyTorch's names (layouts already agree). A native Chain keeps Chainer's own
  names, ``/l1/W`` becoming ``l1.W``.
* Gradients accumulate in ``param.grad`` across ``backward`` calls until ``cleargrads``.
* BatchNorm's float32 batch statistics are plain NumPy float32 reductions, where PyTorch's CPU
  kernel accumulates in double: after ``BatchNorm2d`` outputs agree with PyTorch to about 1e-4.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Mapping

import numpy as np

# Chainer 7.8 imports numpy.distutils, which needs the standard library's distutils (Python < 3.12).
# setuptools' distutils-precedence.pth installs, at interpreter start-up, an import shim serving its
# own copy (which lacks distutils.msvccompiler): drop the shim before anything imported distutils,
# and set the variable so that a later `import setuptools` does not swap its copy back in.
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
if os.environ["SETUPTOOLS_USE_DISTUTILS"] == "stdlib" and "distutils" not in sys.modules:
    _shim = sys.modules.get("_distutils_hack")
    if _shim is not None:
        _shim.remove_shim()

# Importing Chainer warns about its environment checks (numpy.distutils, pkg_resources), which a
# user cannot act on.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from chainer.serializers import DictionarySerializer, NpzDeserializer

from unitrain import layers
from unitrain.loop import TrainingLoop
from unitrain.losses import CrossEntropyLoss, NLLLoss
from unitrain.optim import SGD, adam_update, sgd_update
from unitrain.randomness import dropout_mask, dropout_stream, set_stream_state, stream_state

#: PyTorch's state names -> Chainer's attribute names
_LINK_NAMES = {"weight": "W", "bias": "b"}
_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "avg_mean", "running_var": "avg_var",
             "num_batches_tracked": "num_batches_tracked"}  # fmt: skip


class _BatchNorm(L.BatchNormalization):
    """Chainer's BatchNormalization plus PyTorch's ``num_batches_tracked``.

    Chainer's ``decay`` weighs the old running value (``decay = 1 - momentum``) and it feeds the
    running variance the unbiased batch variance (``m / (m - 1)`` adjustment), as PyTorch does."""

    def __init__(self, spec: layers._BatchNorm, dtype: np.dtype):
        super().__init__(spec.num_features, decay=1 - spec.momentum, eps=spec.eps, dtype=dtype)
        self.num_batches_tracked = np.zeros((), np.int64)
        self.register_persistent("num_batches_tracked")

    def forward(self, x):
        if chainer.config.train:
            self.num_batches_tracked += 1
        return super().forward(x)


class _Dropout:
    """``F.dropout`` with masks drawn from the loop's own generator: Chainer draws them from
    NumPy's global RNG, which the loop should neither depend on nor disturb."""

    def __init__(self, p: float, rng: np.random.Generator):
        self.p, self.rng = p, rng

    def __call__(self, x):
        if not (chainer.config.train and self.p):  # in eval F.dropout is the identity
            return x
        return F.dropout(x, self.p, mask=dropout_mask(self.rng, x.shape, self.p, x.dtype))


def _flatten(x):
    return F.reshape(x, (x.shape[0], -1))


class _Stack(chainer.ChainList):
    """Layers called in order; the links among them are the children ``0, 1, ...``.
    (``chainer.Sequential`` misorders its children when functions sit between links.)"""

    def __init__(self, stack):
        super().__init__(*(layer for layer in stack if isinstance(layer, chainer.Link)))
        self.stack = stack

    def forward(self, x):
        for layer in self.stack:
            x = layer(x)
        return x


class _Rule(chainer.UpdateRule):
    """A parameter's update rule; its ``state`` holds PyTorch's buffers under PyTorch's names."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def update(self, param):
        # PyTorch skips parameters without a gradient rather than stepping them with zeros.
        if param.grad is not None:
            super().update(param)

    def load(self, state: dict, t: int) -> None:
        """Replace the state (``None`` until the first update creates it) and the step count."""
        self._state = state or None
        self.t = t if state else 0


class _SGDRule(_Rule):
    def update_core_cpu(self, param):
        new, buf = sgd_update(param.array, param.grad, self.state.get("momentum_buffer"), self.spec)
        param.array[...] = new
        if buf is not None:
            # The first buffer is the gradient array itself: copy it, as PyTorch clones it, so that
            # nothing that writes param.grad in place (Link.zerograds) can reach the buffer.
            self.state["momentum_buffer"] = buf.copy() if buf is param.grad else buf


class _AdamRule(_Rule):
    def init_state(self, param):
        self.state["exp_avg"] = np.zeros_like(param.array)
        self.state["exp_avg_sq"] = np.zeros_like(param.array)

    def update_core_cpu(self, param):
        s = self.state
        new, s["exp_avg"], s["exp_avg_sq"] = adam_update(
            param.array, param.grad, s["exp_avg"], s["exp_avg_sq"], self.t, self.spec, np.sqrt
        )
        param.array[...] = new


class _Optimizer(chainer.optimizer.GradientMethod):
    """Chainer's optimizer machinery (setup, per-parameter rules, ``t``) with PyTorch's rules."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def create_update_rule(self):
        return (_SGDRule if isinstance(self.spec, SGD) else _AdamRule)(self.spec)

    def reallocate_cleared_grads(self):
        """Keep cleared gradients ``None`` (GradientMethod would fill them with zeros)."""


class ChainerLoop(TrainingLoop):
    name = "chainer"
    framework = "chainer"
    capabilities = frozenset({"dropout", "batchnorm", "conv", "native-model", "float64", "random-state"})

    # --- building ---------------------------------------------------------------------------

    def _build(self, model):
        zero = chainer.initializers.Zero(self.dtype)  # init_weights is loaded right after
        self._rng = dropout_stream(self.seed)
        stack, self._paths = [], {}  # canonical name -> Chainer serializer path
        for name, spec in model.named_layers():
            if isinstance(spec, (layers.Linear, layers.Conv2d)):
                init = {"nobias": not spec.bias, "initialW": zero, "initial_bias": zero}
                if isinstance(spec, layers.Linear):
                    layer = L.Linear(spec.in_features, spec.out_features, **init)
                else:
                    size = spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding
                    layer = L.Convolution2D(*size, **init)
            elif isinstance(spec, layers._BatchNorm):
                layer = _BatchNorm(spec, self.dtype)
            elif isinstance(spec, layers.MaxPool2d):
                # cover_all=False: PyTorch's floor output size (Chainer's default pads to cover every input).
                layer = functools.partial(F.max_pooling_2d, ksize=spec.kernel_size, stride=spec.step, cover_all=False)
            elif isinstance(spec, layers.Dropout):
                layer = _Dropout(spec.p, self._rng)
            else:
                layer = {layers.ReLU: F.relu, layers.Flatten: _flatten}[type(spec)]
            if isinstance(layer, chainer.Link):
                index = sum(isinstance(other, chainer.Link) for other in stack)  # its ChainList child name
                names = _BN_NAMES if isinstance(layer, _BatchNorm) else _LINK_NAMES
                for key in {**spec.param_shapes(), **spec.buffer_shapes()}:
                    self._paths[f"{name}.{key}"] = f"{index}/{names[key]}"
            stack.append(layer)
        self._adopt(_Stack(stack))

    def _wrap_native(self, model):
        uninitialized = [path for path, param in model.namedparams() if param.array is None]
        if uninitialized:
            raise ValueError(
                f"Chainer parameters {uninitialized} are not initialized yet: give the links their input "
                "sizes or run one forward pass before handing the model to the loop"
            )
        flat = DictionarySerializer()
        flat.save(model)
        # Parameters and floating-point persistents (avg_mean ...); scalar ones such as
        # BatchNormalization.N (the count of its fine-tuning mode, unused here) stay out.
        paths = sorted(path for path, value in flat.target.items() if np.asarray(value).dtype.kind == "f")
        self._paths = {path.replace("/", "."): path for path in paths}
        self._adopt(model)

    def _adopt(self, model):
        self.model = model
        model.cleargrads()  # new links hold NaN gradients, which a first backward would add to
        params = {path.lstrip("/"): param for path, param in model.namedparams()}
        self._params = {name: params[path] for name, path in self._paths.items() if path in params}
        self.optimizer = _Optimizer(self.optimizer_spec)
        self.optimizer.setup(model)

    @classmethod
    def is_native_model(cls, model):
        framework = sys.modules.get("chainer")
        return framework is not None and isinstance(model, framework.Link)

    @classmethod
    def native_example_model(cls):
        return chainer.Sequential(L.Linear(8, 16), F.relu, L.Linear(16, 3))

    # --- the step ---------------------------------------------------------------------------

    def _set_training(self, mode):
        self._train = mode

    def _zero_grad(self):
        self.model.cleargrads()

    def _forward(self, x):
        with chainer.using_config("train", self._train):
            return self.model(x)

    def _loss(self, pred, y):
        return self._compute_loss(pred, y, self.loss_spec.reduction)

    def _compute_loss(self, pred, y, reduction):
        if isinstance(self.loss_spec, CrossEntropyLoss):
            per_sample = F.softmax_cross_entropy(pred, y.astype(np.int32), reduce="no")
        elif isinstance(self.loss_spec, NLLLoss):
            per_sample = -F.select_item(pred, y.astype(np.int32))
        else:
            per_sample = F.squared_error(pred, y)
        return F.mean(per_sample) if reduction == "mean" else F.sum(per_sample)

    def _backward(self, loss):
        loss.backward()

    def _update(self):
        self.optimizer.update()

    def _step(self, x, y):
        self._zero_grad()
        pred = self._forward(x)
        loss = self._loss(pred, y)
        loss.backward()
        self.optimizer.update()
        self._step_pred = pred.array  # arrays, not Variables: a Variable keeps its graph
        return loss.array

    def _step_correct(self, y):
        xp = chainer.backend.get_array_module(self._step_pred)
        return (self._step_pred.argmax(axis=1) == xp.asarray(y)).sum()

    @staticmethod
    def to_numpy(value):
        return chainer.backend.CpuDevice().send(getattr(value, "array", value)).copy()

    @staticmethod
    def to_float(value):
        return float(getattr(value, "array", value))  # float() does not take a chainer.Variable

    def _predict(self, x):
        with chainer.using_config("train", self._train), chainer.no_backprop_mode():
            return self.model(x).array

    def _evaluate_batch(self, x, y):
        with chainer.using_config("train", self._train), chainer.no_backprop_mode():
            pred = self.model(x)
            loss = self._compute_loss(pred, y, "sum")
        correct = int((pred.array.argmax(axis=1) == y).sum()) if self.loss_spec.class_targets else 0
        return float(loss.array), correct

    # --- state ------------------------------------------------------------------------------

    def _gradients(self):
        return {name: np.zeros_like(p.array) if p.grad is None else p.grad.copy() for name, p in self._params.items()}

    def _state_dict(self):
        flat = DictionarySerializer()
        flat.save(self.model)
        return {name: np.array(flat.target[path]) for name, path in self._paths.items()}

    def _load_state_dict(self, state):
        # strict=False: entries outside the canonical state (BatchNormalization.N) keep their values.
        NpzDeserializer({path: state[name] for name, path in self._paths.items()}, strict=False).load(self.model)

    def _optimizer_state_dict(self):
        state = {"step": np.array(self.optimizer.t, np.int64)}
        for name, param in self._params.items():
            for key, value in (param.update_rule.state or {}).items():
                state[f"{name}.{key}"] = value.copy()
        return state

    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]):
        step = int(state["step"])
        names = self.optimizer_spec.state_names
        for name, param in self._params.items():
            entries = {key: np.array(state[f"{name}.{key}"]) for key in names if f"{name}.{key}" in state}
            param.update_rule.load(entries, step)
        self.optimizer.t = step

    def _random_state(self):
        # a native Chain's F.dropout draws from NumPy's global RNG, which the loop does not own
        return stream_state(self._rng) if self.model_spec is not None else {}

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)
