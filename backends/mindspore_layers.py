"""The MindSpore backend's layers: the Cells a spec's leaves become, the containers that mirror its
tree, and :class:`_Builder`, which builds them under their dotted PyTorch names (see
:mod:`.mindspore` for what is special about MindSpore)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from unitrain.backends.mindspore_sequences import (
    _Conv1d,
    _Embedding,
    _Recurrent,
    _StatesCall,
    _TakesMasks,
    _Through2d,
)

from unitrain import attention, layers, sequences
from unitrain import ops as graph_ops
from unitrain.graph import Graph, tie_source

from . import mindspore_attention, mindspore_graph


def _in_float64(fn, x, *args):
    """``fn(x, *args)`` computed in float64 and rounded once to ``x``'s dtype. MindSpore's float32
    CPU kernels of exp, tanh, sigmoid and expm1 are fast approximations (measured against
    float64: tanh up to 840 ulp, expm1 500, exp 40, sigmoid 20), its float64 kernels round
    correctly; PyTorch's float32 results are within an ulp or two. Used for the activations and
    custom-loss functions built on them; the cost is two casts of the activation."""
    return fn(x.astype(ms.float64), *args).astype(x.dtype)


def _log_softmax_of_primitives(x, axis):
    """``log_softmax`` from max, exp, sum and log: MindSpore's LogSoftmax kernel computes in float32
    whatever its input's dtype (on float64 N(0, 1) logits 3.4e-6 off, its float32 result), while
    its float64 primitives round correctly."""
    shifted = x - ops.amax(x, axis, True)
    return shifted - ops.log(ops.sum(ops.exp(shifted), axis, True))


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
    """MindSpore's BatchNorm plus PyTorch's ``num_batches_tracked``; with ``running_var="biased"``
    (Keras') a training forward puts the biased batch variance where MindSpore's kernel put the
    unbiased one."""

    def __init__(self, spec):
        super().__init__()
        native = nn.BatchNorm2d if isinstance(spec, layers.BatchNorm2d) else nn.BatchNorm1d
        self.bn = native(spec.num_features, eps=spec.eps, momentum=1.0 - spec.momentum)
        self.num_batches_tracked = Parameter(Tensor(0, ms.int64), name="num_batches_tracked", requires_grad=False)
        self.biased, self.momentum = spec.running_var == "biased", spec.momentum
        self.axes = (0, 2, 3) if isinstance(spec, layers.BatchNorm2d) else (0,)

    def construct(self, x):
        if not self.training:
            return self.bn(x)
        ops.assign_add(self.num_batches_tracked, Tensor(1, ms.int64))
        if not self.biased:
            return self.bn(x)
        kept = self.bn.moving_variance * 1.0
        output = self.bn(x)
        biased = ops.stop_gradient(x).var(axis=self.axes, ddof=0)
        ops.assign(self.bn.moving_variance, kept * (1.0 - self.momentum) + biased * self.momentum)
        return output

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
    layers.LogSoftmax: lambda spec: _Activation(_log_softmax_of_primitives, spec.dim),
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
                    if node.options:  # a recurrent call with initial or final states
                        cell = _StatesCall(cell, spec.get_submodule(node.target), len(node.args), node.options)
                    nodes.append(mindspore_graph.ModuleNode(cell, indices, isinstance(cell, _TakesMasks), mask_map))
                elif node.target in graph_ops.ACTIVATIONS:
                    cell = _PLAIN_LEAVES[graph_ops.ACTIVATIONS[node.target]](graph_ops.ACTIVATIONS[node.target](
                        **node.options))  # fmt: skip
                    nodes.append(mindspore_graph.ModuleNode(cell, indices, False, ()))
                else:
                    fn, static = mindspore_graph.function(node, len(spec.shapes[node.args[0]]) + 1)
                    nodes.append(mindspore_graph.FunctionNode(fn, indices, static))
            self.dropouts = taken
            for key, given in spec.tied:  # the source's Parameter in both Cells: its gradient sums both uses
                source, transposed = tie_source(given)
                cell_path, attribute = _join(path, key).rsplit(".", 1)
                setattr(self.cells[cell_path], attribute, self.params[_join(path, source)])
                if transposed:  # nn.Dense multiplies by its weight transposed: by the source, untransposed
                    self.cells[cell_path].matmul = ops.MatMul()
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
            cell = mindspore_attention.cell(spec, self.dropouts)
            self.dropouts += 1 if getattr(spec, "dropout", 0) else 0  # MultiheadAttention's weights' mask
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
    if isinstance(spec, attention.MultiheadAttention):
        if spec.dropout:
            found.append((spec.dropout, mindspore_attention.dropout_mask_shape(spec, shape)))
        return spec.output_shape_of((shape,) if isinstance(shape[0], int) else shape)
    out = spec.output_shape(shape)
    if isinstance(spec, sequences._Recurrent) and spec.dropout:  # between its layers, each as wide as the output
        found.extend([(spec.dropout, out)] * (spec.num_layers - 1))
    return out
