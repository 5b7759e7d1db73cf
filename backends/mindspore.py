"""MindSpore backend (CPU, float32).

MindSpore differentiates functions, not tensors: ``step`` is one ``mindspore.jit`` graph of
``value_and_grad(forward + loss)`` followed by the optimizer's update: PyTorch's SGD by MindSpore's
own fused SGD kernel, one per parameter as ``nn.SGD`` runs it (:func:`_sgd_kernel`), the other
optimizers' equations written into the parameters with ``ops.assign``. Each compiled function
returns one tensor: a graph with several outputs ran ResNet-18's step 25 % slower than the same
graph returning one (MindSpore 2.10 CPU, whatever the outputs: two scalars cost as much as the
gradients), so the step (and the data-parallel step's part before its allreduce) writes its
gradients into the buffers that ``gradients()`` and the allreduce read and returns its loss and
correct count stacked, read with one host copy. The step number, the lr and the momentum a schedule
cycles enter the graph as tensors (so the graph is compiled once, and ``set_lr`` or a OneCycleLR
step compiles nothing), which makes Adam's bias corrections, Adagrad's lr decay and cycled momentum
terms (``1 - beta1``) float32 where PyTorch's are float64. Gradient clipping runs inside the graph.

The tutorial-shaped ``backward`` re-runs forward + loss on the batch recorded by ``forward`` and
``loss`` through the same compiled gradient function, so it equals ``step`` bit for bit. The
re-run would update BatchNorm's running statistics a second time, so ``backward`` restores them.
Dropout masks are drawn by the loop from its own NumPy stream and passed into the graph (see
:class:`_TakesMasks`), so the re-run reuses ``forward``'s masks and the stream can be checkpointed:
MindSpore's ``nn.Dropout`` keeps its random state inside stateful kernels that expose it to
nothing, not even ``mindspore.get_rng_state``. A native Cell keeps its own ``nn.Dropout``.

A spec model is built as a tree of Cells mirroring the spec's (:class:`_Builder`): containers
call their children in order, a residual block adds its body and shortcut where the spec says,
and every Parameter is kept under its dotted PyTorch name (``layer2.0.downsample.1.weight``).
A CustomLoss becomes a Cell per expression node (:class:`_ExprNode`), compiled into the step
like the layers.
A :class:`~unitrain.graph.Graph` is a Cell per node (:mod:`.mindspore_graph`), compiled into the
same one step; several inputs or targets enter it as ``mutable`` tuples, as the dropout masks.

MindSpore's BatchNorm feeds the unbiased batch variance to its running estimate, as PyTorch
does, but its ``momentum`` weights the *old* value; ``num_batches_tracked`` is added here.
MindSpore's float32 CPU kernels of the exponential family are approximations, so those
activations run in float64 (:func:`_in_float64`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Mapping
from types import SimpleNamespace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from unitrain.backends.mindspore_sequences import _TakesMasks

from unitrain import attention, expr, layers, sequences
from unitrain.loop import TrainingLoop
from unitrain.loss_value import LossExpression
from unitrain.losses import (
    BCE_GRAD_EPSILON,
    BCE_LOG_FLOOR,
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    CustomLoss,
    HuberLoss,
    L1Loss,
    Loss,
    MSELoss,
    NLLLoss,
    PerOutputLoss,
    SmoothL1Loss,
)
from unitrain.optim import SGD, clip_grad_norm_scale, initial_buffer_value, optimizer_update
from unitrain.randomness import dropout_mask, dropout_stream, set_stream_state, stream_state
from unitrain.registry import BackendError

from . import mindspore_graph
from .mindspore_layers import _Builder, _dropout_shapes, _in_float64, _log_softmax_of_primitives

ms.set_device("CPU")  # the adapter is written and tested for MindSpore's CPU build


class _OwnGraphsFilter(logging.Filter):
    """Each loop, in each mode, compiles graphs of its own network: by design, so MindSpore's hint
    to reuse the jitted function ("has been compiled again") does not apply to this module's."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("has been compiled again" in message and __file__ in message)


ms.log._get_logger().addFilter(_OwnGraphsFilter())  # MindSpore has no public handle on its logger


class _BinaryCrossEntropy(nn.Cell):
    """PyTorch's BCELoss per element, ``(t - 1) * max(log1p(-p), -100) - t * max(log(p), -100)`` (in
    float64, see :func:`_in_float64`), with PyTorch's gradient ``(p - t) / max(p * (1 - p), 1e-12)`` as
    the Cell's ``bprop``: the clamped logarithms' own derivatives are infinite at 0 and 1, where it is
    finite. (``nn.BCELoss`` floors ``p`` at 1e-12 instead of the logarithms at -100.)"""

    def construct(self, p, t):
        p64, t64 = p.astype(ms.float64), t.astype(ms.float64)
        terms = (t64 - 1) * ops.maximum(ops.log1p(-p64), BCE_LOG_FLOOR) - t64 * ops.maximum(ops.log(p64), BCE_LOG_FLOOR)
        return terms.astype(p.dtype)

    def bprop(self, p, t, out, dout):
        return dout * (p - t) / ops.maximum((1 - p) * p, BCE_GRAD_EPSILON), ops.zeros_like(t)


class _BCELoss(nn.Cell):
    def __init__(self, reduction: str):
        super().__init__()
        self.terms, self.reduction = _BinaryCrossEntropy(), reduction

    def construct(self, p, t):
        terms = self.terms(p, t)
        return terms.mean() if self.reduction == "mean" else terms.sum()


class _CrossEntropyLoss(nn.Cell):
    """PyTorch's cross entropy, ``nll_loss(log_softmax(pred, 1))``, with the log-softmax in float64
    (:func:`_log_softmax_of_primitives`): MindSpore's own runs its LogSoftmax kernel, float32 with
    approximate exp and log, whose bias (a tagger's loss 3e-7 to 7e-7 low at each of 20 steps, where
    PyTorch's float32 is 1e-8 off) summed over a gradient's positions put a momentum buffer 1.4
    times past the bound PyTorch's own rounding gives. Label smoothing keeps MindSpore's kernel."""

    def __init__(self, ignore_index: int, reduction: str):
        super().__init__()
        self.nll, self.reduction = nn.NLLLoss(ignore_index=ignore_index, reduction=reduction), reduction

    def construct(self, pred, target):
        log_probs = _in_float64(_log_softmax_of_primitives, pred, 1)
        if target.dtype == ms.int32:  # class indices
            return self.nll(log_probs, target)
        losses = -(target * log_probs).sum(1)  # class probabilities: PyTorch's mean over the rest
        return losses.mean() if self.reduction == "mean" else losses.sum() if self.reduction == "sum" else losses


#: leaves without weights: spec type -> native cell
def _const(value):
    return Tensor(value, ms.float32)


def _power(a, exponent):
    return ops.pow(a, exponent)


def _exp(a):
    return _in_float64(ops.exp, a)


def _log(a):
    return _in_float64(ops.log, a)


def _sum(a, axis):
    return ops.sum(a, axis)


def _mean(a, axis):
    return ops.mean(a, axis)


def _log_softmax(a, axis):
    return _in_float64(_log_softmax_of_primitives, a, axis)


def _softmax(a, axis):
    return _in_float64(ops.softmax, a, axis)


def _item(a, index):
    return a[index]


#: The custom-loss operations of :mod:`unitrain.expr` as MindSpore functions, whose parameters
#: after the operands are the op's static arguments in ``expr.STATIC`` order.
_EXPR_OPS = {
    "const": _const, "add": ops.add, "sub": ops.sub, "mul": ops.mul, "div": ops.div, "neg": ops.neg,
    "pow": _power, "abs": ops.abs, "square": ops.square, "sqrt": ops.sqrt, "exp": _exp, "log": _log,
    "maximum": ops.maximum, "minimum": ops.minimum, "sum": _sum, "mean": _mean,
    "log_softmax": _log_softmax, "softmax": _softmax, "item": _item,
}  # fmt: skip


class _ExprInput(nn.Cell):
    """``pred`` (``index`` 0) or ``target`` (1) in a custom loss's tree of Cells."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def construct(self, pred, target):
        return pred if self.index == 0 else target


class _ExprNode(nn.Cell):
    """One operation of a custom loss: ``fn(*operands, *static)``. Graph mode cannot walk the
    tree itself (it allows constant tuples nested 6 deep at most), so :func:`_custom_loss` turns
    the tree into Cells once, at construction, and the compiled step runs them like layers."""

    def __init__(self, fn, *operands, **static):
        super().__init__()
        self.fn, self.operands, self.static = fn, nn.CellList(list(operands)), tuple(static.values())

    def construct(self, pred, target):
        values = ()
        for operand in self.operands:
            values = (*values, operand(pred, target))
        return self.fn(*values, *self.static)


def _custom_loss(tree) -> nn.Cell:
    """The custom loss's tree as Cells: ``expr.evaluate`` walks it with an op table whose
    entries build the node's Cell from its operands' Cells."""
    builders = {op: functools.partial(_ExprNode, fn) for op, fn in _EXPR_OPS.items()}
    return expr.evaluate(tree, _ExprInput(0), _ExprInput(1), builders)


def _loss_function(spec: Loss, reduction: str, summed: bool = True):
    """The native loss of ``spec`` with ``reduction`` (MindSpore's losses follow PyTorch's
    equations, arguments aside: ``nn.HuberLoss``'s ``delta``, ``nn.SmoothL1Loss``'s ``beta``).
    A PerOutputLoss gives the sum of its losses, or with ``summed=False`` each one's value."""
    if isinstance(spec, PerOutputLoss):
        parts = [_loss_function(part, reduction or getattr(part, "reduction", None)) for part in spec.losses]
        return mindspore_graph.PerOutputLoss(parts, summed)
    if isinstance(spec, CustomLoss):
        return _custom_loss(spec.tree)
    if isinstance(spec, CrossEntropyLoss):
        if not spec.label_smoothing:
            return _CrossEntropyLoss(spec.ignore_index, reduction)
        return nn.CrossEntropyLoss(
            ignore_index=spec.ignore_index, reduction=reduction, label_smoothing=spec.label_smoothing
        )
    if isinstance(spec, SmoothL1Loss):
        # PyTorch's beta == 0 is the L1 loss; MindSpore's kernel refuses beta == 0.
        return nn.SmoothL1Loss(spec.beta, reduction) if spec.beta > 0 else nn.L1Loss(reduction)
    if isinstance(spec, HuberLoss):
        return nn.HuberLoss(reduction, spec.delta)
    if isinstance(spec, BCELoss):
        return _BCELoss(reduction)
    if isinstance(spec, NLLLoss):
        return nn.NLLLoss(ignore_index=spec.ignore_index, reduction=reduction)
    native = {MSELoss: nn.MSELoss, L1Loss: nn.L1Loss, BCEWithLogitsLoss: nn.BCEWithLogitsLoss}
    return native[type(spec)](reduction=reduction)


def _sgd_kernel(spec, param: Parameter, buffers: tuple, cycled: bool, zeros: dict) -> tuple | None:
    """``(ops.SGD(...), accum, momentum, stat)``: the arguments after the parameter, gradient and lr with
    which MindSpore's fused SGD kernel (``nn.SGD``'s) computes ``spec``'s update of ``param`` in place;
    ``None`` where it computes another equation. Its CPU kernel (sgd_cpu_kernel.cc) runs per element
    ``g += wd * p``; ``buf = m * buf + (1 - dampening) * g`` (``buf = g`` where ``stat > 0``, which it
    then zeroes); ``g += m * buf`` if nesterov, else ``g = buf``; ``p -= lr * g``: torch/optim/sgd.py's
    equations, in its order. ``stat`` is a zero constant here, never written: from a zero buffer
    ``m * 0 + g`` is the gradient PyTorch's first step copies, and a dampened first step runs the
    assigned update (``first``); without momentum the kernel reads neither ``accum`` nor ``stat``.
    Fused nowhere else: a velocity with the lr in it (``lr_in_velocity``), a momentum a schedule cycles
    (at 0 the kernel would skip the buffer PyTorch updates), other optimizers (MindSpore's Adam kernels
    add eps before the bias correction, as ``eps_placement="before_correction"`` but in another order;
    its RMSprop, Adagrad and Adadelta kernels differ from torch.optim's too). ``zeros``: one constant
    per shape, shared."""
    if type(spec) is not SGD or spec.lr_in_velocity or cycled:
        return None
    if param.shape not in zeros:
        zeros[param.shape] = Tensor(np.zeros(param.shape, np.float32))
    stat = zeros[param.shape]
    kernel = ops.SGD(float(spec.dampening), float(spec.weight_decay), spec.nesterov)
    return kernel, buffers[0] if spec.momentum else stat, Tensor(spec.momentum, ms.float32), stat


def _write(param: Parameter, value: np.ndarray) -> None:
    # In place: after Parameter.set_data a compiled graph no longer sees the parameter's updates.
    ops.assign(param, Tensor(np.array(value, copy=True)))


class MindSporeLoop(TrainingLoop):
    name = "mindspore"
    framework = "mindspore"
    # No float64: MindSpore's CPU Conv2D, BatchNorm and cross entropy take float16/32 only.
    capabilities = frozenset({
        "dropout", "batchnorm", "conv", "native-model", "random-state",
        "residual", "activations", "layernorm", "pooling", "losses", "custom-loss", "optimizers", "clipping",
        "distributed", "training-controls", "sequences", "graph", "multi-model", "attention",
    })  # fmt: skip

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
        self._rng = dropout_stream(self.seed, self.rank)
        self._has_dropout = any(
            isinstance(layer, layers.Dropout)
            or (isinstance(layer, (sequences._Recurrent, attention.MultiheadAttention)) and layer.dropout)
            for _, layer in model.named_layers()
        )
        # per-sample input shape -> (p, per-sample shape) of each mask, in the order they apply
        self._mask_shapes: dict[tuple[int, ...], list[tuple[float, tuple[int, ...]]]] = {}
        if (depth := mindspore_graph.unrolled_depth(model)) > mindspore_graph.MODEL_CALL_DEPTH:  # before compiling
            raise BackendError(f"the mindspore backend compiles a model's layers and graph nodes into about two "
                               f"nested calls each, within MindSpore's limit of {mindspore_graph.CALL_DEPTH_LIMIT} "
                               f"({mindspore_graph.MODEL_CALL_DEPTH} for the model): this one needs about {depth}; use "
                               "fewer layers or nodes, or another backend")  # fmt: skip
        builder = _Builder()
        net = builder.build(model, "")
        self._params = {key: builder.params[key] for key in model.state_shapes()}  # state_dict order
        for key, param in self._params.items():
            param.name = key  # MindSpore's own tools (checkpoints, summaries) show PyTorch's names too
        self._setup(net)

    def _wrap_native(self, model) -> None:
        ms.set_seed(self.seed)
        self._params = {param.name: param for param in model.get_parameters()}
        self._setup(model)

    def _setup(self, net: nn.Cell) -> None:
        self._net = net
        groups = self._resolve_controls([name for name, param in self._params.items() if param.requires_grad])
        # frozen parameters are not differentiated at all: value_and_grad takes the others only
        self._grad_names = [name for group in groups for name in group.names]
        self._buffers = [param for param in self._params.values() if not param.requires_grad]

        def buffer_like(kind: str, name: str, value: float = 0.0) -> Parameter:
            param = self._params[name]
            return Parameter(
                ops.full(param.shape, value, dtype=param.dtype), name=f"{kind}.{name}", requires_grad=False
            )

        self._grads = [buffer_like("grad", name) for name in self._grad_names]
        # each parameter's optimizer buffers, in its group's spec's state_names order
        self._opt_state = [
            {kind: buffer_like(kind, name, initial_buffer_value(group.spec, kind)) for kind in group.spec.state_names}
            for group in groups for name in group.names
        ]  # fmt: skip
        # the groups' lrs: an input of the compiled step, so that set_lr compiles nothing
        self._lr = self._group_lrs()
        self._momentum = Tensor(self.momentum or 0.0, ms.float32)  # read only where a schedule cycles it
        # Whether the optimizer buffers exist (PyTorch creates them at the first step).
        self._opt_ready = False
        self._recorded_x = self._recorded_y = self._recorded_masks = self._recorded_loss = None
        self._step_correct_count = None  # the last step's, read with its loss
        # A compiled function keeps the train/eval branches of the mode it was compiled in.
        self._compiled_by_mode: dict[bool, SimpleNamespace] = {}

    def _compile(self) -> SimpleNamespace:
        """The step's parts as compiled functions, for the network's current mode. (MindSpore's
        graph syntax has no ``zip(strict=)``, hence the noqa.)"""
        net, grads, opt_state = self._net, self._grads, self._opt_state
        masked = isinstance(net, _TakesMasks)

        def run(x, masks):
            return net(x, masks) if masked else net(x)

        weights = [self._params[name] for name in self._grad_names]
        # each parameter's spec and group number, in the order of weights (Python constants of the graph)
        specs = [group.spec for group in self.param_groups for _ in group.names]
        group_of = [number for number, group in enumerate(self.param_groups) for _ in group.names]
        cycled = self.lr_schedule is not None and self.lr_schedule.cycles_momentum
        loss_fn = _loss_function(self.loss_spec, getattr(self.loss_spec, "reduction", None))
        # the core evaluates a CustomLoss itself, from predict
        sum_loss = None if isinstance(self.loss_spec, CustomLoss) else _loss_function(self.loss_spec, "sum", False)
        several_outputs = isinstance(self.loss_spec, PerOutputLoss)

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

        buffers_of = [tuple(state.values()) for state in opt_state]
        max_norm, max_value = self.clip_grad_norm, self.clip_grad_value

        def clipped(gradients):
            if max_value is not None:
                return [ops.clamp(grad, -max_value, max_value) for grad in gradients]
            if max_norm is None:
                return gradients
            norms = [ops.sqrt((grad * grad).sum()) for grad in gradients]
            scale = clip_grad_norm_scale(norms, max_norm, ops.sqrt, ops.minimum)
            return [grad * scale for grad in gradients]

        # MindSpore's fused SGD kernel (one per parameter, as nn.SGD runs it) where it computes the spec's
        # equation; the other parameters (all of them at a dampened first step) assign PyTorch's update
        zeros: dict = {}
        kernels = [_sgd_kernel(spec, param, buffers, cycled, zeros)
                   for spec, param, buffers in zip(specs, weights, buffers_of, strict=True)]  # fmt: skip
        fused = [index for index, kernel in enumerate(kernels) if kernel is not None]
        others = [index for index, kernel in enumerate(kernels) if kernel is None]

        def assigned_update(indices, gradients, t, first, lr, momentum):
            for index in indices:
                param, buffers, spec = weights[index], buffers_of[index], specs[index]
                # SGD's momentum buffer is created from the gradient (see _step_args); without a
                # schedule cycling it, the momentum is the spec's constant
                new_param, new_buffers = optimizer_update(
                    spec, param, gradients[index], (None,) if first else buffers, t, lr[group_of[index]], ops.sqrt,
                    False, momentum if cycled else None,
                )  # fmt: skip
                for buf, new_buf in zip(buffers, new_buffers):  # noqa: B905
                    ops.assign(buf, new_buf)
                ops.assign(param, new_param)
            return t

        def apply_update(gradients, t, first, lr, momentum):
            if first:  # a dampened momentum buffer starts as the gradient: PyTorch's first step
                return assigned_update(fused + others, gradients, t, first, lr, momentum)
            for index in fused:
                sgd, accum, momentum_value, stat = kernels[index]
                sgd(weights[index], gradients[index], lr[group_of[index]], accum, momentum_value, stat)
            return assigned_update(others, gradients, t, first, lr, momentum)

        def step(x, y, t, first, lr, momentum, masks):
            (value, pred), gradients = value_pred_and_grad(x, y, masks)
            gradients = clipped(gradients)
            for buf, grad in zip(grads, gradients):  # noqa: B905
                ops.assign(buf, grad)
            apply_update(gradients, t, first, lr, momentum)
            return ops.stack((value, correct_count(pred, y).astype(value.dtype)))  # one output: module docstring

        def loss_and_gradients(x, y, masks):  # one forward pass, where backward runs a second one
            (value, pred), gradients = value_pred_and_grad(x, y, masks)
            for buf, grad in zip(grads, gradients):  # noqa: B905
                ops.assign(buf, grad)
            return ops.stack((value, correct_count(pred, y).astype(value.dtype)))

        def backward(x, y, masks, slope):
            value, gradients = value_and_grad(x, y, masks)
            for buf, grad in zip(grads, gradients):  # noqa: B905
                ops.assign_add(buf, grad * slope)
            return value

        def update(t, first, lr, momentum):
            gradients = clipped(grads)
            if max_value is not None or max_norm is not None:
                for buf, grad in zip(grads, gradients):  # noqa: B905
                    ops.assign(buf, grad)
            return apply_update(gradients, t, first, lr, momentum)

        def scale_gradients(factor):
            for buf in grads:
                ops.assign(buf, buf * factor)
            return factor

        def zero_grad():
            for buf in grads:
                ops.assign(buf, ops.zeros_like(buf))
            return len(grads)

        def correct_count(pred, y):
            """How many rows of ``pred`` argmax to the class indices ``y``, as a float32 (exact
            below 2**24 rows); zero for other targets."""
            if isinstance(pred, tuple) or y.dtype != ms.int32 or pred.ndim < 2:
                return ops.zeros((), ms.float32)
            return (pred.argmax(1) == y).sum().astype(ms.float32)

        def evaluate(x, y):
            pred = run(x, ())
            if several_outputs:  # each output's sum; no accuracy
                return sum_loss(pred, y)
            return ops.stack((sum_loss(pred, y), correct_count(pred, y)))

        functions = (forward, loss, step, loss_and_gradients, backward, update, scale_gradients, zero_grad, evaluate)
        compiled = SimpleNamespace(**{fn.__name__: ms.jit(fn) if self.compiled else fn for fn in functions})
        compiled.update_in_graph = update  # for a caller's own compiled graph (a multi-model step's)
        return compiled

    # --- conversions --------------------------------------------------------------------

    def _masks(self, x: np.ndarray) -> tuple[Tensor, ...]:
        """Fresh dropout masks for a training forward of ``x`` (scaled by ``1/(1-p)``), else ``()``."""
        if not (self._net.training and isinstance(self._net, _TakesMasks) and self._has_dropout):
            return ()
        several = isinstance(x, tuple)  # a graph's inputs
        sample_shape = tuple(part.shape[1:] for part in x) if several else x.shape[1:]
        if sample_shape not in self._mask_shapes:
            _dropout_shapes(self.model_spec, sample_shape, shapes := [])
            self._mask_shapes[sample_shape] = shapes
        n = len(x[0]) if several else len(x)
        # mutable: a plain tuple of tensors would be a graph constant, compiled again at every step
        return ms.mutable(tuple(
            Tensor.from_numpy(dropout_mask(self._rng, (n, *(n if size is None else size for size in shape)), p,
                                           np.float32))
            for p, shape in self._mask_shapes[sample_shape]
        ))  # fmt: skip

    def _x(self, x: np.ndarray | tuple) -> Tensor:
        if isinstance(x, tuple):  # a graph's inputs; mutable, as the masks
            return ms.mutable(tuple(map(self._x, x)))
        return Tensor.from_numpy(np.ascontiguousarray(x))

    def _y(self, y: np.ndarray | tuple) -> Tensor:
        if isinstance(y, tuple):  # one target per output of a graph
            return ms.mutable(tuple(map(self._y, y)))
        # Integer targets are class indices, which MindSpore's class losses take as int32.
        dtype = np.int32 if y.dtype.kind in "iu" else self.dtype
        return Tensor.from_numpy(np.ascontiguousarray(y, dtype))

    def _step_args(self, ahead: int = 0) -> tuple[Tensor, bool, Tensor, Tensor]:
        """The step number (``step_count`` counts the steps already taken; a tensor, so the
        graph is compiled once, not per step), whether SGD's momentum buffer is to be created
        from the gradient, the lr and the momentum (tensors too). From the zero buffer the
        general formula gives exactly the gradient unless dampening is used, so only then is a
        graph compiled for the first step. ``ahead``: for the update after ``ahead`` more updates."""
        first = not (self._opt_ready or ahead) and any(getattr(g.spec, "dampening", 0) for g in self.param_groups)
        return Tensor(self.step_count + 1 + ahead, ms.int64), first, self._lr, self._momentum

    def _group_lrs(self) -> Tensor:
        return Tensor(np.array([group.lr for group in self.param_groups] or [self.lr], np.float32))

    def _set_lr(self, lr: float) -> None:
        self._lr = self._group_lrs()

    def _scale_gradients(self, factor: float) -> None:
        self._fn.scale_gradients(Tensor(factor, ms.float32))

    def _set_momentum(self, momentum: float) -> None:
        self._momentum = Tensor(momentum, ms.float32)

    # --- hooks ----------------------------------------------------------------------------

    @classmethod
    def set_threads(cls, count: int) -> None:
        super().set_threads(count)
        # MindSpore's CPU kernels' pool (25 threads by default) is set once per process ("can not be
        # set repeatedly", a RuntimeError): a second call keeps the first count
        with contextlib.suppress(RuntimeError):
            ms.device_context.cpu.op_tuning.threads_num(count)

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
        # backward differentiates forward and loss again (value_and_grad): the value it is given
        # says only by which factor, its slope, when it is an expression of the loss (loss * 0.5)
        self._recorded_loss = LossExpression(self._fn.loss(pred, self._recorded_y), object())
        return self._recorded_loss

    def _backward(self, loss) -> None:
        if self._recorded_y is None:
            raise RuntimeError("backward() needs the loss() of a forward() first")
        if not isinstance(loss, LossExpression) or loss.origin is not self._recorded_loss.origin:
            raise RuntimeError("backward() needs the latest loss(), or an expression of it (loss * 0.5)")
        # The re-run would update BatchNorm's running statistics a second time for this batch.
        saved = [buffer.asnumpy().copy() for buffer in self._buffers] if self._net.training else []
        slope = Tensor(np.array(loss.slope, self.dtype))
        self._fn.backward(self._recorded_x, self._recorded_y, self._recorded_masks, slope)
        for buffer, value in zip(self._buffers, saved, strict=False):
            _write(buffer, value)

    def _update(self) -> None:
        self._fn.update(*self._step_args())
        self._opt_ready = True

    def _step(self, x, y):
        out = self._fn.step(self._x(x), self._y(y), *self._step_args(), self._masks(x))
        self._opt_ready = True
        # One copy to the host for both: the next step waits for this one's graph to finish anyway (MindSpore's
        # runtime runs a compiled function only once the work queued before it is done), and an eager
        # index of the output would cost ~0.5 ms each.
        loss, self._step_correct_count = out.asnumpy()
        return Tensor(loss)

    def _loss_and_gradients(self, x, y):
        loss, correct = self._fn.loss_and_gradients(self._x(x), self._y(y), self._masks(x)).asnumpy()  # as _step
        return Tensor(loss), correct

    def _step_correct(self, y):
        return self._step_correct_count

    def _count_correct(self, pred, y):
        # On the host: three eager (PyNative) ops took 3.5 ms, the MLP's whole fused graph 4.4 ms (32 rows)
        return int((pred.asnumpy().argmax(1) == y).sum())

    @staticmethod
    def to_numpy(value):
        value = value.value if isinstance(value, LossExpression) else value
        return value.asnumpy().copy() if isinstance(value, Tensor) else np.array(value)

    def _predict(self, x):
        pred = self._fn.forward(self._x(x), ())
        return tuple(part.asnumpy() for part in pred) if isinstance(pred, tuple) else pred.asnumpy()

    def _evaluate_batch(self, x, y):
        out = self._fn.evaluate(self._x(x), self._y(y))
        if isinstance(out, tuple):  # each output's sum
            return tuple(map(float, out)), 0
        loss, correct = out.asnumpy()
        return float(loss), int(correct)

    # --- data parallel: mindspore.communication (launched by msrun; mccl on CPU) --------------

    def _setup_distributed(self):
        from mindspore.communication import get_group_size, get_rank, init

        init()  # msrun's scheduler process never returns from it
        self._allreduce = ops.AllReduce()
        self._reduce = None
        return get_rank(), get_group_size()

    def _reduce_gradients(self, weight):
        if self._reduce is None:  # the gradient buffers exist once the model is built
            grads, allreduce = self._grads, self._allreduce

            def reduce_gradients(weight):
                for buf in grads:
                    ops.assign(buf, allreduce(buf * weight))
                return weight

            self._reduce = ms.jit(reduce_gradients)  # the engine's AllReduce inside a compiled graph
        self._reduce(Tensor(weight, ms.float32))

    def _all_sum(self, values):
        return self._allreduce(Tensor.from_numpy(np.asarray(values, np.float32))).asnumpy().astype(np.float64)

    def _random_state(self):
        # a native Cell's nn.Dropout keeps its random state inside MindSpore's kernels
        return stream_state(self._rng) if self.model_spec is not None else {}

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)

    def _gradients(self):
        return {name: grad.asnumpy().copy() for name, grad in zip(self._grad_names, self._grads, strict=True)}

    def _state_dict(self):
        return {name: param.asnumpy().copy() for name, param in self._params.items()}

    def _load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        for name, value in state.items():
            _write(self._params[name], value)

    def _optimizer_state_dict(self):
        state = {"step": np.array(self.step_count, np.int64)}
        if self._opt_ready:
            for name, buffers in zip(self._grad_names, self._opt_state, strict=True):
                for kind, buf in buffers.items():
                    state[f"{name}.{kind}"] = buf.asnumpy().copy()
        return state

    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self._opt_ready = False
        for name, buffers in zip(self._grad_names, self._opt_state, strict=True):
            for kind, buf in buffers.items():
                key = f"{name}.{kind}"
                self._opt_ready |= key in state
                # An absent buffer restarts from its initial value, as if the first step were still to come.
                initial = initial_buffer_value(self._group_of[name].spec, kind)
                _write(
                    buf, np.asarray(state[key], self.dtype) if key in state else np.full(buf.shape, initial, self.dtype)
                )
