"""MindSpore backend (CPU, float32).

MindSpore differentiates functions, not tensors: ``step`` is one ``mindspore.jit`` graph of
``value_and_grad(forward + loss)`` followed by the optimizer's update, written into the
parameters with ``ops.assign``. The step number, the lr and the momentum a schedule cycles enter
the graph as tensors (so the graph is compiled once, and ``set_lr`` or a OneCycleLR step compiles
nothing), which makes Adam's bias corrections, Adagrad's lr decay and cycled momentum terms
(``1 - beta1``) float32 where PyTorch's are float64. Gradient clipping runs inside the graph.

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
from unitrain.backends.mindspore_sequences import _Conv1d, _Embedding, _Recurrent, _TakesMasks, _Through2d

from unitrain import attention, expr, layers, sequences
from unitrain import ops as graph_ops
from unitrain.graph import Graph
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
from unitrain.optim import clip_grad_norm_scale, initial_buffer_value, optimizer_update
from unitrain.randomness import dropout_mask, dropout_stream, set_stream_state, stream_state

from . import mindspore_attention, mindspore_graph

ms.set_device("CPU")  # the adapter is written and tested for MindSpore's CPU build


class _OwnGraphsFilter(logging.Filter):
    """Each loop, in each mode, compiles graphs of its own network: by design, so MindSpore's hint
    to reuse the jitted function ("has been compiled again") does not apply to this module's."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("has been compiled again" in message and __file__ in message)


ms.log._get_logger().addFilter(_OwnGraphsFilter())  # MindSpore has no public handle on its logger


def _in_float64(fn, x, *args):
    """``fn(x, *args)`` computed in float64 and rounded once to ``x``'s dtype. MindSpore's float32
    CPU kernels of exp, tanh, sigmoid and expm1 are fast approximations (measured against
    float64: tanh up to 840 ulp, expm1 500, exp 40, sigmoid 20), its float64 kernels round
    correctly; PyTorch's float32 results are within an ulp or two. Used for the activations and
    custom-loss functions built on them; the cost is two casts of the activation."""
    return fn(x.astype(ms.float64), *args).astype(x.dtype)


def _elu(x, alpha):
    # MindSpore's Elu kernel accepts only alpha == 1.0, so PyTorch's equation from primitives.
    return ops.where(x > 0, x, alpha * ops.expm1(x))


class _Activation(nn.Cell):
    """An elementwise function computed in float64 (see :func:`_in_float64`); ``args`` are
    its static arguments (an axis, alpha, the GELU form)."""

    def __init__(self, fn, *args):
        super().__init__()
        self.fn, self.args = fn, args

    def construct(self, x):
        return _in_float64(self.fn, x, *self.args)


class _LayerNorm(nn.Cell):
    """PyTorch's LayerNorm over the trailing ``normalized_shape`` dims. MindSpore's LayerNorm
    primitive computes the same equation (``eps`` inside the square root, biased variance) but
    takes the first normalised axis as a non-negative index, known only once the input's rank
    is: the primitive is made in ``construct``, where the rank is a compile-time constant
    (``nn.LayerNorm`` fixes the axis at construction). Without ``elementwise_affine`` the scale
    and shift are constant ones and zeros."""

    def __init__(self, spec: layers.LayerNorm):
        super().__init__()
        self.normalized_rank, self.eps, shape = len(spec.normalized_shape), spec.eps, spec.normalized_shape
        self.weight, self.bias = ops.ones(shape, ms.float32), ops.zeros(shape, ms.float32)
        if spec.elementwise_affine:
            self.weight, self.bias = Parameter(self.weight, name="weight"), Parameter(self.bias, name="bias")

    def construct(self, x):
        axis = x.ndim - self.normalized_rank
        return ops.LayerNorm(axis, axis, self.eps)(x, self.weight, self.bias)[0]


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


def _apply(node, x, masks):
    return node(x, masks) if isinstance(node, _TakesMasks) else node(x)


class _Dropout(_TakesMasks):
    """Multiplies by the model's ``mask_index``-th dropout mask in training."""

    def __init__(self, mask_index: int):
        super().__init__()
        self.mask_index = mask_index

    def construct(self, x, masks):
        return x * masks[self.mask_index] if self.training else x


class _Sequential(_TakesMasks):
    def __init__(self, cells: list[nn.Cell]):
        super().__init__()
        self.layers = nn.CellList(cells)

    def construct(self, x, masks):
        for layer in self.layers:
            x = _apply(layer, x, masks)
        return x


class _Residual(_TakesMasks):
    """``post(body(x) + shortcut(x))``; a missing shortcut is the identity, a missing post nothing."""

    def __init__(self, body: nn.Cell, shortcut: nn.Cell | None, post: nn.Cell | None):
        super().__init__()
        self.body, self.shortcut, self.post = body, shortcut, post

    def construct(self, x, masks):
        y = self.body(x, masks)
        y = y + (x if self.shortcut is None else _apply(self.shortcut, x, masks))
        return y if self.post is None else _apply(self.post, y, masks)


class _Graph(_TakesMasks):
    """A graph's nodes (:mod:`.mindspore_graph`) run in order, each appending its value to the
    tuple of values (inputs first); returns the output positions' values."""

    def __init__(self, nodes: list[nn.Cell], several_inputs: bool, outputs: tuple[int, ...]):
        super().__init__()
        self.nodes, self.several_inputs, self.outputs = nn.CellList(nodes), several_inputs, outputs

    def construct(self, x, masks):
        values = (x,)
        if self.several_inputs:
            values = tuple(x)
        for node in self.nodes:
            values = (*values, node(values, masks))
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        outputs = ()
        for index in self.outputs:
            outputs = (*outputs, values[index])
        return outputs


def _pool(spec) -> nn.Cell:
    kind = nn.MaxPool2d if isinstance(spec, layers.MaxPool2d) else nn.AvgPool2d
    extra = {"count_include_pad": spec.count_include_pad} if isinstance(spec, layers.AvgPool2d) else {}
    if not any(spec.padding):
        return kind(spec.kernel_size, spec.stride, **extra)
    # 2.x pools pad like PyTorch: -inf for the maximum, zeros counted or not for the average.
    return kind(spec.kernel_size, spec.stride, pad_mode="pad", padding=spec.padding, **extra)


class _ConvTranspose2d(nn.Cell):
    """PyTorch's ConvTranspose2d through ``ops.Conv2DTranspose`` (the input gradient of a convolution;
    weight ``(in, out // groups, kh, kw)`` as PyTorch's), told the output size PyTorch's
    ``output_padding`` picks. ``nn.Conv2dTranspose`` instead pads the finished output with zeros
    (after the bias), which is PyTorch's result only without padding. The primitive needs an output
    size a strided convolution maps back onto the input: with ``output_padding < stride`` that is
    PyTorch's size; otherwise ``output_padding`` comes off the bottom (right) padding, where it
    cancels PyTorch's extra rows (columns). Beyond the padding, those rows receive nothing but zeros:
    the full unpadded transpose gets ``output_padding`` zero rows and columns (concatenated: with
    ``ops.pad`` there, the compiled step's gradients were wrong from the second step on, MindSpore 2.10
    CPU) and the padding is cut."""

    def __init__(self, spec: layers.ConvTranspose2d):
        super().__init__()
        self.out_channels, self.stride = spec.out_channels, spec.stride
        self.weight = Parameter(ops.zeros(spec.param_shapes()["weight"], ms.float32), name="weight")
        self.bias = Parameter(ops.zeros((spec.out_channels,), ms.float32), name="bias") if spec.bias else None
        below_stride = all(extra < step for extra, step in zip(spec.output_padding, spec.stride, strict=True))
        within_padding = all(extra <= pad for extra, pad in zip(spec.output_padding, spec.padding, strict=True))
        self.direct = below_stride or within_padding
        # output size per axis: (size - 1) * stride + growth
        self.growth = tuple(
            d * (k - 1) + 1 + extra - 2 * pad
            for d, k, extra, pad in zip(spec.dilation, spec.kernel_size, spec.output_padding, spec.padding, strict=True)
        )
        self.padding, self.output_padding = spec.padding, spec.output_padding
        (ph, pw), (eh, ew) = spec.padding, spec.output_padding
        pad = (ph, ph, pw, pw) if below_stride else (ph, ph - eh, pw, pw - ew) if within_padding else (0, 0, 0, 0)
        self.transpose = ops.Conv2DTranspose(
            out_channel=spec.in_channels, kernel_size=spec.kernel_size, mode=1, pad_mode="pad", pad=pad,
            stride=spec.stride, dilation=spec.dilation, group=spec.groups,
        )  # fmt: skip

    def construct(self, x):
        n, _, h, w = x.shape
        oh, ow = (h - 1) * self.stride[0] + self.growth[0], (w - 1) * self.stride[1] + self.growth[1]
        if self.direct:
            y = self.transpose(x, self.weight, (n, self.out_channels, oh, ow))
        else:
            (ph, pw), (eh, ew) = self.padding, self.output_padding
            y = self.transpose(x, self.weight, (n, self.out_channels, oh + 2 * ph - eh, ow + 2 * pw - ew))
            rows = ops.concat((y, ops.zeros((n, self.out_channels, eh, y.shape[3]), y.dtype)), 2)
            y = ops.concat((rows, ops.zeros((n, self.out_channels, rows.shape[2], ew), y.dtype)), 3)
            y = y[:, :, ph : ph + oh, pw : pw + ow]
        return y if self.bias is None else ops.bias_add(y, self.bias)


class _Upsample(nn.Cell):
    """``ops.interpolate`` with the output size where its index scale is PyTorch's: a given size,
    integer scale factors or ``align_corners`` (scales from the sizes alone). A fractional scale
    factor, for which PyTorch uses ``1 / scale_factor`` rather than input over output size, gathers
    PyTorch's source rows and columns (:mod:`unitrain.upsampling`) with float32 index arithmetic, as
    ATen's kernels do."""

    def __init__(self, spec: layers.Upsample):
        super().__init__()
        self.size, self.factors, self.mode = spec.size, spec.scale_factor, spec.mode
        self.align_corners = bool(spec.align_corners) if spec.mode == "bilinear" else None
        self.native = self.size is not None or self.align_corners or all(f.is_integer() for f in self.factors)
        if not self.native:
            # rounded here by NumPy: a graph's own float constants are rounded toward zero to float32
            self.scales = tuple(Tensor(np.float32(1.0 / factor)) for factor in spec.scale_factor)

    def construct(self, x):
        h, w = x.shape[2], x.shape[3]
        if self.size is None:  # floor(size * factor), positive
            oh, ow = int(h * self.factors[0]), int(w * self.factors[1])
        else:
            oh, ow = self.size
        if self.native:
            return ops.interpolate(x, size=(oh, ow), mode=self.mode, align_corners=self.align_corners)
        return self._along(self._along(x, 2, h, oh, self.scales[0]), 3, w, ow, self.scales[1])

    def _along(self, x, axis, size, out, scale):
        positions = ops.arange(out).astype(ms.float32)
        if self.mode == "nearest":
            return ops.gather(x, ops.minimum(ops.floor(positions * scale).astype(ms.int32), size - 1), axis)
        source = ops.relu((positions + 0.5) * scale - 0.5)
        first = ops.floor(source)
        weight = ops.clamp(source - first, 0.0, 1.0)
        first = first.astype(ms.int32)
        second = ops.minimum(first + 1, size - 1)
        if axis == 2:
            weight = weight.reshape((-1, 1))
        return ops.gather(x, first, axis) * (1 - weight) + ops.gather(x, second, axis) * weight


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


#: leaves without weights: spec type -> native cell
_PLAIN_LEAVES = {
    layers.Identity: lambda spec: nn.Identity(),
    layers.ReLU: lambda spec: nn.ReLU(),
    layers.LeakyReLU: lambda spec: nn.LeakyReLU(spec.negative_slope),
    layers.Flatten: lambda spec: nn.Flatten(spec.start_dim, spec.end_dim),
    layers.Upsample: lambda spec: _Upsample(spec),
    layers.MaxPool2d: _pool,
    layers.AvgPool2d: _pool,
    layers.AdaptiveAvgPool2d: lambda spec: nn.AdaptiveAvgPool2d(spec.output_size),
    layers.Tanh: lambda spec: _Activation(ops.tanh),
    layers.Sigmoid: lambda spec: _Activation(ops.sigmoid),
    layers.SiLU: lambda spec: _Activation(ops.silu),
    layers.ELU: lambda spec: _Activation(_elu, spec.alpha),
    layers.GELU: lambda spec: _Activation(ops.gelu, spec.approximate),
    layers.Softmax: lambda spec: _Activation(ops.softmax, spec.dim),
    layers.LogSoftmax: lambda spec: _Activation(ops.log_softmax, spec.dim),
    sequences.MaxPool1d: lambda spec: _Through2d(_pool(spec.as_2d())),
    sequences.AvgPool1d: lambda spec: _Through2d(_pool(spec.as_2d())),
    sequences.AdaptiveAvgPool1d: lambda spec: _Through2d(nn.AdaptiveAvgPool2d(spec.as_2d().output_size)),
}


class _Builder:
    """Builds the spec's tree as Cells, filling ``params`` with dotted PyTorch name -> Parameter
    and numbering the Dropout layers in the order they run (the order of ``named_layers``)."""

    def __init__(self):
        self.params: dict[str, Parameter] = {}
        self.dropouts = 0
        self.cells: dict[str, nn.Cell] = {}  # dotted path -> its Cell, for graphs' call_module nodes
        # dotted path -> (first, count): its Cell reads the masks at positions first .. first + count - 1
        self.mask_ranges: dict[str, tuple[int, int]] = {}

    def build(self, spec: layers.Layer, path: str) -> nn.Cell:
        first = self.dropouts
        cell = self._build(spec, path)
        self.cells[path] = cell
        self.mask_ranges[path] = (first, self.dropouts - first)
        return cell

    def _build(self, spec: layers.Layer, path: str) -> nn.Cell:
        if isinstance(spec, Graph):
            # The graph reads one mask per Dropout call, in the order its nodes run, from its first
            # position on; each module node hands its call's masks to the positions its Cell reads.
            first = self.dropouts
            for name, child in spec.children:
                self.build(child, _join(path, name))
            where = mindspore_graph.positions(spec)
            nodes, taken = [], first
            for node in spec.nodes:
                indices = tuple(where[arg] for arg in node.args)
                if node.op == "call_module":
                    cell = self.cells[_join(path, node.target)]
                    reads, count = self.mask_ranges[_join(path, node.target)]
                    mask_map = (0,) * reads + tuple(range(taken, taken + count))
                    taken += count
                    nodes.append(mindspore_graph.ModuleNode(cell, indices, isinstance(cell, _TakesMasks), mask_map))
                elif node.target in graph_ops.ACTIVATIONS:
                    cell = _PLAIN_LEAVES[graph_ops.ACTIVATIONS[node.target]](graph_ops.ACTIVATIONS[node.target](
                        **node.options))  # fmt: skip
                    nodes.append(mindspore_graph.ModuleNode(cell, indices, False, ()))
                else:
                    fn, static = mindspore_graph.function(node, len(spec.shapes[node.args[0]]) + 1)
                    nodes.append(mindspore_graph.FunctionNode(fn, indices, static))
            self.dropouts = taken
            for key, source in spec.tied:  # the source's Parameter in both Cells: its gradient sums both uses
                cell_path, attribute = _join(path, key).rsplit(".", 1)
                setattr(self.cells[cell_path], attribute, self.params[_join(path, source)])
            return _Graph(nodes, len(spec.inputs) > 1, tuple(where[name] for name in spec.outputs))
        if isinstance(spec, layers.Sequential):
            return _Sequential([self.build(child, _join(path, name)) for name, child in spec.children])
        if isinstance(spec, layers.Residual):
            body = self.build(spec.body, path)  # the body's children live in the Residual's namespace
            shortcut = None if spec.shortcut is None else self.build(spec.shortcut, _join(path, "downsample"))
            post = None if spec.post is None else self.build(spec.post, _join(path, "post"))
            return _Residual(body, shortcut, post)
        cell, state = self._leaf(spec)
        self.params.update({f"{path}.{key}": param for key, param in state.items()})
        return cell

    def _leaf(self, spec: layers.Layer) -> tuple[nn.Cell, dict[str, Parameter]]:
        if type(spec) in _PLAIN_LEAVES:
            return _PLAIN_LEAVES[type(spec)](spec), {}
        if type(spec) in attention.LEAVES.values():
            cell = mindspore_attention.cell(spec)
            return cell, cell.state
        if isinstance(spec, layers.Dropout):
            self.dropouts += 1
            return _Dropout(self.dropouts - 1), {}
        if isinstance(spec, (layers.BatchNorm1d, layers.BatchNorm2d)):
            cell = _BatchNorm(spec)
            return cell, cell.state()
        if isinstance(spec, sequences._Recurrent):
            cell = _Recurrent(spec, self.dropouts)
            self.dropouts += spec.num_layers - 1 if spec.dropout else 0
            return cell, cell.state
        if isinstance(spec, (sequences.Embedding, sequences.Conv1d)):
            cell = _Embedding(spec) if isinstance(spec, sequences.Embedding) else _Conv1d(spec)
            return cell, {"weight": cell.weight, **({"bias": cell.bias} if spec.param_shapes().get("bias") else {})}
        if isinstance(spec, layers.LayerNorm):
            cell = _LayerNorm(spec)
            return cell, {"weight": cell.weight, "bias": cell.bias} if spec.elementwise_affine else {}
        if isinstance(spec, layers.Linear):
            cell = nn.Dense(spec.in_features, spec.out_features, "zeros", "zeros", has_bias=spec.bias)
        elif isinstance(spec, layers.ConvTranspose2d):
            cell = _ConvTranspose2d(spec)
        elif isinstance(spec, layers.Conv2d):
            # PyTorch pads explicitly, (top, bottom, left, right) in MindSpore's "pad" mode; no padding is
            # its "valid" mode, as MindSpore's tutorials write it
            (ph, pw) = spec.padding
            padding = {"pad_mode": "pad", "padding": (ph, ph, pw, pw)} if ph or pw else {"pad_mode": "valid"}
            cell = nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, **padding,
                             dilation=spec.dilation, group=spec.groups, has_bias=spec.bias, weight_init="zeros",
                             bias_init="zeros")  # fmt: skip
        else:
            raise TypeError(f"the mindspore backend cannot build {spec!r}")
        return cell, {"weight": cell.weight, **({"bias": cell.bias} if spec.bias else {})}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _dropout_shapes(spec: layers.Layer, shape: tuple[int, ...], found: list) -> tuple[int, ...]:
    """``spec``'s output shape for per-sample input ``shape``; appends ``(p, per-sample shape)``
    of each dropout mask it applies to ``found``, in the order they run (a graph's: as its nodes run,
    a module called at several nodes once per call)."""
    if isinstance(spec, layers.Sequential):
        for child in spec.layers:
            shape = _dropout_shapes(child, shape, found)
        return shape
    if isinstance(spec, layers.Residual):
        out = _dropout_shapes(spec.body, shape, found)
        if spec.shortcut is not None:
            _dropout_shapes(spec.shortcut, shape, found)
        return out if spec.post is None else _dropout_shapes(spec.post, out, found)
    if isinstance(spec, Graph):
        shapes = spec._infer([shape] if len(spec.inputs) == 1 else list(shape), "", {})
        for node in spec.nodes:
            if node.op == "call_module":
                args = [shapes[arg] for arg in node.args]
                _dropout_shapes(spec.get_submodule(node.target), args[0] if len(args) == 1 else tuple(args), found)
        return spec.output_shape(shape)
    if isinstance(spec, layers.Dropout):
        found.append((spec.p, shape))
    out = spec.output_shape(shape)
    if isinstance(spec, sequences._Recurrent) and spec.dropout:  # between its layers, each as wide as the output
        found.extend([(spec.dropout, out)] * (spec.num_layers - 1))
    return out


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
    return _in_float64(ops.log_softmax, a, axis)


def _softmax(a, axis):
    return _in_float64(ops.softmax, a, axis)


#: The custom-loss operations of :mod:`unitrain.expr` as MindSpore functions, whose parameters
#: after the operands are the op's static arguments in ``expr.STATIC`` order.
_EXPR_OPS = {
    "const": _const, "add": ops.add, "sub": ops.sub, "mul": ops.mul, "div": ops.div, "neg": ops.neg,
    "pow": _power, "abs": ops.abs, "square": ops.square, "sqrt": ops.sqrt, "exp": _exp, "log": _log,
    "maximum": ops.maximum, "minimum": ops.minimum, "sum": _sum, "mean": _mean,
    "log_softmax": _log_softmax, "softmax": _softmax,
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
        self._has_dropout = any(isinstance(layer, layers.Dropout) or (isinstance(layer, sequences._Recurrent)
                                                                      and layer.dropout)
                                for _, layer in model.named_layers())  # fmt: skip
        # per-sample input shape -> (p, per-sample shape) of each mask, in the order they apply
        self._mask_shapes: dict[tuple[int, ...], list[tuple[float, tuple[int, ...]]]] = {}
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

        def apply_update(gradients, t, first, lr, momentum):
            for param, grad, buffers, spec, group in zip(weights, gradients, buffers_of, specs, group_of):  # noqa: B905
                # SGD's momentum buffer is created from the gradient (see _step_args); without a
                # schedule cycling it, the momentum is the spec's constant
                new_param, new_buffers = optimizer_update(
                    spec, param, grad, (None,) if first else buffers, t, lr[group], ops.sqrt, False,
                    momentum if cycled else None,
                )  # fmt: skip
                for buf, new_buf in zip(buffers, new_buffers):  # noqa: B905
                    ops.assign(buf, new_buf)
                ops.assign(param, new_param)
            return t

        def step(x, y, t, first, lr, momentum, masks):
            (value, pred), gradients = value_pred_and_grad(x, y, masks)
            gradients = clipped(gradients)
            for buf, grad in zip(grads, gradients):  # noqa: B905
                ops.assign(buf, grad)
            apply_update(gradients, t, first, lr, momentum)
            return value, pred

        def loss_and_gradients(x, y, masks):  # one forward pass, where backward runs a second one
            (value, pred), gradients = value_pred_and_grad(x, y, masks)
            for buf, grad in zip(grads, gradients):  # noqa: B905
                ops.assign(buf, grad)
            return value, pred

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

        def evaluate(x, y):
            pred = run(x, ())
            if several_outputs:  # each output's sum; no accuracy
                return sum_loss(pred, y), 0
            correct = (pred.argmax(1) == y).sum() if y.dtype == ms.int32 else 0  # class indices only
            return sum_loss(pred, y), correct

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
            Tensor.from_numpy(dropout_mask(self._rng, (n, *shape), p, np.float32))
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
        loss, self._step_pred = self._fn.step(self._x(x), self._y(y), *self._step_args(), self._masks(x))
        self._opt_ready = True
        return loss

    def _loss_and_gradients(self, x, y):
        return self._fn.loss_and_gradients(self._x(x), self._y(y), self._masks(x))

    def _step_correct(self, y):
        return (self._step_pred.argmax(1) == self._y(y)).sum()

    def _count_correct(self, pred, y):
        # On the host: the data-parallel step has synced for its loss already, and three eager
        # (PyNative) ops cost more than the fused graph itself (3.5 ms against 4.4 ms, the MLP at 32 rows).
        return int((pred.asnumpy().argmax(1) == y).sum())

    @staticmethod
    def to_numpy(value):
        value = value.value if isinstance(value, LossExpression) else value
        return value.asnumpy().copy() if isinstance(value, Tensor) else np.array(value)

    def _predict(self, x):
        pred = self._fn.forward(self._x(x), ())
        return tuple(part.asnumpy() for part in pred) if isinstance(pred, tuple) else pred.asnumpy()

    def _evaluate_batch(self, x, y):
        loss, correct = self._fn.evaluate(self._x(x), self._y(y))
        if isinstance(loss, tuple):  # each output's sum
            return tuple(map(float, loss)), 0
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
        return {name: buf.asnumpy().copy() for name, buf in zip(self._grad_names, self._grads, strict=True)}

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
