"""MindSpore backend: a :class:`unitrain.graph.Graph` as Cells that graph mode compiles into the step.

Graph mode compiles ``construct`` from its Python source, unrolling a loop over a ``CellList``;
it takes neither a dict of values by node name nor keyword arguments spread from an attribute.
So each node is a Cell of its own (:class:`FunctionNode`, :class:`ModuleNode`) that reads its
arguments by position from the tuple of values computed so far, and the graph's ``construct``
appends each node's value to that tuple. Everything a node needs besides tensors (axes, sizes,
the reshape target) is resolved here, at build time, into positional constants: the compiled
step holds no Python dispatch. A module called at several nodes is one Cell held by several
``ModuleNode``s: its Parameters appear once, and ``value_and_grad`` sums the gradients of their uses.

The dropout masks are drawn before the step, one per Dropout call in the order the nodes run (a
module called at several nodes gets a mask per call, as on the other backends, which draw them as
the nodes run): a module's Cell reads its masks at fixed positions of the tuple, so each
``ModuleNode`` hands its own call's masks to those positions (``mask_map``).
"""

from __future__ import annotations

from collections.abc import Callable

from mindspore import nn, ops

from unitrain import ops as graph_ops
from unitrain.graph import Graph, Node
from unitrain.layers import Container, Layer

#: MindSpore's limit on nested calls while graph mode compiles (``mindspore.set_recursion_limit``'s default)
CALL_DEPTH_LIMIT = 1000
#: of it, what is left to the model: the step around it (loss, gradient, update, a multi-model
#: step's expressions) takes the rest
MODEL_CALL_DEPTH = 900


def unrolled_depth(spec: Layer) -> int:
    """About how deep graph mode nests calls to compile ``spec``: a container's loop over its layers
    or nodes is unrolled into two nested calls per item (on MindSpore 2.10, a graph of 483 nodes and
    a Sequential of 483 layers compiled, a graph of 503 nodes exceeded the limit, however few of its
    nodes depended on each other), and a container inside it adds its own depth."""
    if not isinstance(spec, Container):
        return 0
    items = len(spec.nodes) if isinstance(spec, Graph) else len(spec.children)
    return 2 * items + max((unrolled_depth(child) for _, child in spec.children), default=0)


def _add(args):
    return ops.add(args[0], args[1])


def _sub(args):
    return ops.sub(args[0], args[1])


def _mul(args):
    return ops.mul(args[0], args[1])


def _div(args):
    return ops.div(args[0], args[1])


def _add_number(args, other):
    return args[0] + other


def _sub_number(args, other):
    return args[0] - other


def _number_sub(args, other):
    return other - args[0]


def _mul_number(args, other):
    return args[0] * other


def _div_number(args, other):
    return args[0] / other


def _number_div(args, other):
    return other / args[0]


def _neg(args):
    return ops.neg(args[0])


def _exp(args):
    return ops.exp(args[0])


def _log(args):
    return ops.log(args[0])


def _cat(args, dim):
    return ops.cat(args, dim)


def _stack(args, dim):
    return ops.stack(args, dim)


def _narrow(args, dim, start, length):
    return ops.narrow(args[0], dim, start, length)


def _select(args, dim, index):
    return ops.squeeze(ops.narrow(args[0], dim, index % args[0].shape[dim], 1), dim)


def _reshape(args, sample_shape):
    return ops.reshape(args[0], (args[0].shape[0], *sample_shape))


def _flatten(args, start, end):
    shape = args[0].shape
    return ops.reshape(args[0], (*shape[:start], -1, *shape[end + 1 :]))


def _permute(args, dims):
    return ops.transpose(args[0], dims)


def _sum(args, dims, keepdim):
    return ops.sum(args[0], dims, keepdim)


def _mean(args, dims, keepdim):
    return ops.mean(args[0], dims, keepdim)


def _matmul(args):
    return ops.matmul(args[0], args[1])


def _getitem(args, index):
    return args[0][index]


_BINARY = {"add": (_add, _add_number, _add_number), "sub": (_sub, _sub_number, _number_sub),
           "mul": (_mul, _mul_number, _mul_number), "div": (_div, _div_number, _number_div)}  # fmt: skip


def function(node: Node, rank: int) -> tuple[Callable, tuple]:
    """``(fn, static)`` of a non-activation ``call_function`` node whose first input has
    ``rank`` axes (the batch's included): ``fn(args, *static)``. Sizes are read in ``fn`` from
    the input's shape (constants of each compiled graph), so other input sizes work too."""
    op, kwargs = node.target, node.options
    if op in _BINARY:
        tensors, number, reverse_number = _BINARY[op]
        if "other" not in kwargs:
            return tensors, ()
        return (reverse_number if kwargs.get("reverse") else number), (kwargs["other"],)
    if op == "reshape":  # MindSpore resolves the -1 as PyTorch does
        return _reshape, (tuple(kwargs["shape"]),)
    if op == "flatten":
        return _flatten, (kwargs.get("start_dim", 1) % rank, kwargs.get("end_dim", -1) % rank)
    if op == "permute":
        return _permute, (tuple(d % rank for d in kwargs["dims"]),)
    if op == "transpose":
        dims = list(range(rank))
        a, b = kwargs["dim0"] % rank, kwargs["dim1"] % rank
        dims[a], dims[b] = dims[b], dims[a]
        return _permute, (tuple(dims),)
    if op in ("sum", "mean"):
        dims = graph_ops.reduced_dims(kwargs.get("dim"), rank, op)
        return (_sum if op == "sum" else _mean), (dims, kwargs.get("keepdim", False))
    if op == "narrow":
        return _narrow, (kwargs["dim"] % rank, kwargs["start"], kwargs["length"])
    if op == "select":
        return _select, (kwargs["dim"] % rank, kwargs["index"])
    if op in ("cat", "stack"):
        return (_cat if op == "cat" else _stack), (kwargs["dim"] % (rank + (op == "stack")),)
    if op == "getitem":
        return _getitem, (kwargs["index"],)
    return {"neg": _neg, "exp": _exp, "log": _log, "matmul": _matmul}[op], ()


class FunctionNode(nn.Cell):
    """A tensor operation: ``fn(args, *static)`` on the values at ``indices``."""

    def __init__(self, fn: Callable, indices: tuple[int, ...], static: tuple):
        super().__init__()
        self.fn, self.indices, self.static = fn, indices, static

    def construct(self, values, masks):
        args = ()
        for index in self.indices:
            args = (*args, values[index])
        return self.fn(args, *self.static)


class ModuleNode(nn.Cell):
    """A module (or an activation) called on the values at ``indices``; ``masked``: it takes the
    dropout masks too (the containers and Dropout, see ``_TakesMasks``), the Cell's position ``i``
    reading the graph's mask ``mask_map[i]``."""

    def __init__(self, cell: nn.Cell, indices: tuple[int, ...], masked: bool, mask_map: tuple[int, ...]):
        super().__init__()
        self.cell, self.indices, self.masked, self.mask_map = cell, indices, masked, mask_map

    def construct(self, values, masks):
        args = ()
        for index in self.indices:
            args = (*args, values[index])
        x = args[0] if len(args) == 1 else args
        if not self.masked:
            return self.cell(x)
        if len(masks) == 0:  # evaluation: no masks
            return self.cell(x, masks)
        call_masks = ()
        for index in self.mask_map:
            call_masks = (*call_masks, masks[index])
        return self.cell(x, call_masks)


def positions(spec: Graph) -> dict[str, int]:
    """Each input's and node's position in the tuple of values the graph's construct builds."""
    names = [*spec.input_names, *(node.name for node in spec.nodes)]
    return {name: index for index, name in enumerate(names)}


class PerOutputLoss(nn.Cell):
    """One loss per output: their sum (``summed``), or a tuple of each one's value."""

    def __init__(self, parts: list[nn.Cell], summed: bool):
        super().__init__()
        self.parts, self.summed = nn.CellList(parts), summed

    def construct(self, pred, y):
        values = ()
        for part, p, t in zip(self.parts, pred, y):  # noqa: B905 (graph mode has no strict=)
            values = (*values, part(p, t))
        if not self.summed:
            return values
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total
