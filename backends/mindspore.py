"""MindSpore backend (CPU, float32).

MindSpore differentiates functions, not tensors: ``step`` is one ``mindspore.jit`` graph of
``value_and_grad(forward + loss)`` followed by the optimizer's update, written into the
parameters with ``ops.assign``. Adam's step number enters the graph as a tensor (so the graph is
compiled once), which makes its bias corrections float32 where PyTorch's are float64.

The tutorial-shaped ``backward`` re-runs forward + loss on the batch recorded by ``forward`` and
``loss`` through the same compiled gradient function, so it equals ``step`` bit for bit. The
re-run would update BatchNorm's running statistics a second time, so ``backward`` restores them.
Dropout masks are drawn by the loop from its own NumPy stream and passed into the graph (see
:class:`_Network`), so the re-run reuses ``forward``'s masks and the stream can be checkpointed:
MindSpore's ``nn.Dropout`` keeps its random state inside stateful kernels that expose it to
nothing, not even ``mindspore.get_rng_state``. A native Cell keeps its own ``nn.Dropout``.

MindSpore's BatchNorm feeds the unbiased batch variance to its running estimate, as PyTorch
does, but its ``momentum`` weights the *old* value; ``num_batches_tracked`` is added here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from types import SimpleNamespace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from unitrain import layers
from unitrain.loop import TrainingLoop
from unitrain.losses import CrossEntropyLoss, MSELoss, NLLLoss
from unitrain.optim import SGD, adam_update, sgd_update
from unitrain.randomness import dropout_mask, dropout_stream, set_stream_state, stream_state

ms.set_device("CPU")  # the adapter is written and tested for MindSpore's CPU build


class _OwnGraphsFilter(logging.Filter):
    """Each loop, in each mode, compiles graphs of its own network: by design, so MindSpore's hint
    to reuse the jitted function ("has been compiled again") does not apply to this module's."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("has been compiled again" in message and __file__ in message)


ms.log._get_logger().addFilter(_OwnGraphsFilter())  # MindSpore has no public handle on its logger

_LOSSES = {CrossEntropyLoss: nn.CrossEntropyLoss, NLLLoss: nn.NLLLoss, MSELoss: nn.MSELoss}


class _BatchNorm(nn.Cell):
    """MindSpore's BatchNorm plus PyTorch's ``num_batches_tracked``."""

    def __init__(self, spec):
        super().__init__()
        native = nn.BatchNorm2d if isinstance(spec, layers.BatchNorm2d) else nn.BatchNorm1d
        self.bn = native(spec.num_features, eps=spec.eps, momentum=1.0 - spec.momentum)
        self.num_batches_tracked = Parameter(Tensor(0, ms.int64), name="num_batches_tracked", requires_grad=False)

    def construct(self, x):
        if self.training:
            ops.assign_add(self.num_batches_tracked, Tensor(1, ms.int64))
        return self.bn(x)

    def state(self) -> dict[str, Parameter]:
        bn = self.bn
        return {"weight": bn.gamma, "bias": bn.beta, "running_mean": bn.moving_mean,
                "running_var": bn.moving_variance, "num_batches_tracked": self.num_batches_tracked}  # fmt: skip


class _Dropout(nn.Cell):
    """Marks where :class:`_Network` applies the ``mask_index``-th dropout mask."""

    def __init__(self, mask_index: int):
        super().__init__()
        self.mask_index = mask_index


class _Network(nn.Cell):
    """The spec's leaf layers in order. Dropout multiplies by a mask passed in with the input,
    ``masks`` (one per Dropout layer; empty in eval mode): the loop draws them from a stream it
    owns, so it can checkpoint the stream and ``backward`` can reuse ``forward``'s masks. (The
    stateful random kernels behind ``nn.Dropout`` allow neither.)"""

    def __init__(self, cells: list[nn.Cell]):
        super().__init__()
        self.layers = nn.CellList(cells)

    def construct(self, x, masks):
        for layer in self.layers:
            if isinstance(layer, _Dropout):
                if self.training:
                    x = x * masks[layer.mask_index]
            else:
                x = layer(x)
        return x


def _build_cell(model: layers.Sequential, params: dict[str, Parameter]) -> _Network:
    """The native network; fills ``params`` with canonical name -> Parameter."""
    cells = []
    for name, layer in model.named_layers():
        if isinstance(layer, layers.Linear):
            cell = nn.Dense(layer.in_features, layer.out_features, "zeros", "zeros", has_bias=layer.bias)
        elif isinstance(layer, layers.Conv2d):
            # PyTorch pads explicitly (or not at all); MindSpore's default pad_mode is "same".
            cell = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                             pad_mode="pad" if layer.padding else "valid", padding=layer.padding,
                             has_bias=layer.bias, weight_init="zeros", bias_init="zeros")  # fmt: skip
        elif isinstance(layer, layers.MaxPool2d):
            cell = nn.MaxPool2d(layer.kernel_size, layer.step)
        elif isinstance(layer, layers.ReLU):
            cell = nn.ReLU()
        elif isinstance(layer, layers.Flatten):
            cell = nn.Flatten()
        elif isinstance(layer, layers.Dropout):
            cell = _Dropout(sum(isinstance(other, _Dropout) for other in cells))
        elif isinstance(layer, (layers.BatchNorm1d, layers.BatchNorm2d)):
            cell = _BatchNorm(layer)
            params.update({f"{name}.{key}": param for key, param in cell.state().items()})
        else:
            raise TypeError(f"the mindspore backend cannot build {layer!r}")
        if isinstance(layer, (layers.Linear, layers.Conv2d)):
            params[f"{name}.weight"] = cell.weight
            if layer.bias:
                params[f"{name}.bias"] = cell.bias
        cells.append(cell)
    return _Network(cells)


def _write(param: Parameter, value: np.ndarray) -> None:
    # In place: after Parameter.set_data a compiled graph no longer sees the parameter's updates.
    ops.assign(param, Tensor(np.array(value, copy=True)))


class MindSporeLoop(TrainingLoop):
    name = "mindspore"
    framework = "mindspore"
    # No float64: MindSpore's CPU Conv2D, BatchNorm and cross entropy take float16/32 only.
    capabilities = frozenset({"dropout", "batchnorm", "conv", "native-model", "random-state"})

    #: ``False`` runs every step eagerly (PyNative), to debug or to compare speed
    compiled = True

    @classmethod
    def is_native_model(cls, model) -> bool:
        module = sys.modules.get("mindspore")
        return module is not None and isinstance(model, module.nn.Cell)

    @classmethod
    def native_example_model(cls) -> nn.Cell:
        return nn.SequentialCell([nn.Dense(8, 16), nn.ReLU(), nn.Dense(16, 3)])

    def _build(self, model: layers.Sequential) -> None:
        self._rng = dropout_stream(self.seed)
        self._dropout_p = [layer.p for _, layer in model.named_layers() if isinstance(layer, layers.Dropout)]
        self._mask_shapes: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        self._params: dict[str, Parameter] = {}
        self._setup(_build_cell(model, self._params))

    def _wrap_native(self, model) -> None:
        ms.set_seed(self.seed)
        self._params = {param.name: param for param in model.get_parameters()}
        self._setup(model)

    def _setup(self, net: nn.Cell) -> None:
        self._net = net
        self._grad_names = [name for name, param in self._params.items() if param.requires_grad]
        self._buffers = [param for param in self._params.values() if not param.requires_grad]

        def zeros_like(kind: str, name: str) -> Parameter:
            param = self._params[name]
            return Parameter(ops.zeros(param.shape, param.dtype), name=f"{kind}.{name}", requires_grad=False)

        self._grads = [zeros_like("grad", name) for name in self._grad_names]
        self._opt_state = {
            kind: [zeros_like(kind, name) for name in self._grad_names] for kind in self.optimizer_spec.state_names
        }
        # Whether the optimizer buffers exist (PyTorch creates them at the first step).
        self._opt_ready = False
        self._recorded_x = self._recorded_y = self._recorded_masks = None
        # A compiled function keeps the train/eval branches of the mode it was compiled in.
        self._compiled_by_mode: dict[bool, SimpleNamespace] = {}

    def _compile(self) -> SimpleNamespace:
        """The step's parts as compiled functions, for the network's current mode. (MindSpore's
        graph syntax has no ``zip(strict=)``, hence the noqa.)"""
        net, grads, opt_state = self._net, self._grads, self._opt_state
        masked = isinstance(net, _Network)

        def run(x, masks):
            return net(x, masks) if masked else net(x)

        weights = [self._params[name] for name in self._grad_names]
        spec, loss_cls = self.optimizer_spec, _LOSSES[type(self.loss_spec)]
        loss_fn, sum_loss = loss_cls(reduction=self.loss_spec.reduction), loss_cls(reduction="sum")
        class_targets = self.loss_spec.class_targets

        def forward(x, masks):
            return run(x, masks)

        def loss(pred, y):
            return loss_fn(pred, y)

        def forward_loss(x, y, masks):
            return loss_fn(run(x, masks), y)

        def forward_loss_pred(x, y, masks):
            pred = run(x, masks)
            return loss_fn(pred, y), pred

        value_and_grad = ms.value_and_grad(forward_loss, None, weights)
        # the whole step also returns its predictions (has_aux: not differentiated), for train accuracy
        value_pred_and_grad = ms.value_and_grad(forward_loss_pred, None, weights, has_aux=True)

        def apply_update(gradients, t, first):
            if isinstance(spec, SGD):
                momentum = opt_state.get("momentum_buffer", [None] * len(weights))
                for param, grad, buf in zip(weights, gradients, momentum):  # noqa: B905
                    new_param, new_buf = sgd_update(param, grad, None if first else buf, spec)
                    if new_buf is not None:
                        ops.assign(buf, new_buf)
                    ops.assign(param, new_param)
            else:
                for param, grad, m, v in zip(weights, gradients, opt_state["exp_avg"], opt_state["exp_avg_sq"]):  # noqa: B905
                    new_param, new_m, new_v = adam_update(param, grad, m, v, t, spec, ops.sqrt)
                    ops.assign(m, new_m)
                    ops.assign(v, new_v)
                    ops.assign(param, new_param)
            return t

        def step(x, y, t, first, masks):
            (value, pred), gradients = value_pred_and_grad(x, y, masks)
            for buf, grad in zip(grads, gradients):  # noqa: B905
                ops.assign(buf, grad)
            apply_update(gradients, t, first)
            return value, pred

        def backward(x, y, masks):
            value, gradients = value_and_grad(x, y, masks)
            for buf, grad in zip(grads, gradients):  # noqa: B905
                ops.assign_add(buf, grad)
            return value

        def update(t, first):
            return apply_update(grads, t, first)

        def zero_grad():
            for buf in grads:
                ops.assign(buf, ops.zeros_like(buf))
            return len(grads)

        def evaluate(x, y):
            pred = run(x, ())
            correct = (pred.argmax(1) == y).sum() if class_targets else 0
            return sum_loss(pred, y), correct

        functions = (forward, loss, step, backward, update, zero_grad, evaluate)
        return SimpleNamespace(**{fn.__name__: ms.jit(fn) if self.compiled else fn for fn in functions})

    # --- conversions --------------------------------------------------------------------

    def _masks(self, x: np.ndarray) -> tuple[Tensor, ...]:
        """Fresh dropout masks for a training forward of ``x`` (scaled by ``1/(1-p)``), else ``()``."""
        if not (self._net.training and isinstance(self._net, _Network) and self._dropout_p):
            return ()
        if x.shape[1:] not in self._mask_shapes:
            shapes, shape = [], x.shape[1:]
            for _, layer in self.model_spec.named_layers():
                if isinstance(layer, layers.Dropout):
                    shapes.append(shape)
                shape = layer.output_shape(shape)
            self._mask_shapes[x.shape[1:]] = shapes
        # mutable: a plain tuple of tensors would be a graph constant, compiled again at every step
        return ms.mutable(tuple(
            Tensor.from_numpy(dropout_mask(self._rng, (len(x), *shape), p, np.float32))
            for p, shape in zip(self._dropout_p, self._mask_shapes[x.shape[1:]], strict=True)
        ))  # fmt: skip

    def _x(self, x: np.ndarray) -> Tensor:
        return Tensor.from_numpy(np.ascontiguousarray(x))

    def _y(self, y: np.ndarray) -> Tensor:
        # MindSpore's class losses take int32 labels.
        dtype = np.int32 if self.loss_spec.class_targets else self.dtype
        return Tensor.from_numpy(np.ascontiguousarray(y, dtype))

    def _step_args(self) -> tuple[Tensor, bool]:
        """Adam's step number (``step_count`` counts the steps already taken; a tensor, so the
        graph is compiled once, not per step) and whether
        SGD's momentum buffer is to be created from the gradient. From the zero buffer the
        general formula gives exactly the gradient unless dampening is used, so only then is a
        graph compiled for the first step."""
        first = not self._opt_ready and bool(getattr(self.optimizer_spec, "dampening", 0))
        return Tensor(self.step_count + 1, ms.int64), first

    # --- hooks ----------------------------------------------------------------------------

    def _set_training(self, mode: bool) -> None:
        self._net.set_train(mode)
        if mode not in self._compiled_by_mode:
            self._compiled_by_mode[mode] = self._compile()
        self._fn = self._compiled_by_mode[mode]

    def _zero_grad(self) -> None:
        self._fn.zero_grad()

    def _forward(self, x):
        self._recorded_x, self._recorded_masks, self._recorded_y = self._x(x), self._masks(x), None
        return self._fn.forward(self._recorded_x, self._recorded_masks)

    def _loss(self, pred, y):
        self._recorded_y = self._y(y)
        return self._fn.loss(pred, self._recorded_y)

    def _backward(self, loss) -> None:
        if self._recorded_y is None:
            raise RuntimeError("backward() needs the loss() of a forward() first")
        # The re-run would update BatchNorm's running statistics a second time for this batch.
        saved = [buffer.asnumpy().copy() for buffer in self._buffers] if self._net.training else []
        self._fn.backward(self._recorded_x, self._recorded_y, self._recorded_masks)
        for buffer, value in zip(self._buffers, saved, strict=False):
            _write(buffer, value)

    def _update(self) -> None:
        self._fn.update(*self._step_args())
        self._opt_ready = True

    def _step(self, x, y):
        loss, self._step_pred = self._fn.step(self._x(x), self._y(y), *self._step_args(), self._masks(x))
        self._opt_ready = True
        return loss

    def _step_correct(self, y):
        return (self._step_pred.argmax(1) == self._y(y)).sum()

    @staticmethod
    def to_numpy(value):
        return value.asnumpy().copy() if isinstance(value, Tensor) else np.array(value)

    def _predict(self, x):
        return self._fn.forward(self._x(x), ()).asnumpy()

    def _evaluate_batch(self, x, y):
        loss, correct = self._fn.evaluate(self._x(x), self._y(y))
        return float(loss), int(correct)

    def _random_state(self):
        # a native Cell's nn.Dropout keeps its random state inside MindSpore's kernels
        return stream_state(self._rng) if self.model_spec is not None else {}

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)

    def _gradients(self):
        return {name: buf.asnumpy().copy() for name, buf in zip(self._grad_names, self._grads, strict=True)}

    def _state_dict(self):
        return {name: param.asnumpy().copy() for name, param in self._params.items()}

    def _load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        for name, value in state.items():
            _write(self._params[name], value)

    def _optimizer_state_dict(self):
        state = {"step": np.array(self.step_count, np.int64)}
        if self._opt_ready:
            for kind, buffers in self._opt_state.items():
                for name, buf in zip(self._grad_names, buffers, strict=True):
                    state[f"{name}.{kind}"] = buf.asnumpy().copy()
        return state

    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._opt_ready = False
        for kind, buffers in self._opt_state.items():
            for name, buf in zip(self._grad_names, buffers, strict=True):
                key = f"{name}.{kind}"
                self._opt_ready |= key in state
                # An absent buffer restarts from zero, as if the first step were still to come.
                _write(buf, np.asarray(state[key], self.dtype) if key in state else np.zeros(buf.shape, self.dtype))
