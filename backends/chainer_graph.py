"""Chainer backend: a :class:`unitrain.graph.Graph` run node by node with ``chainer.functions``.

The graph's modules are links of one Chain, registered under their names (Chainer's paths
``encoder/1/W`` mirror PyTorch's ``encoder.1.weight``); a module called at several nodes is the
same link called again, so Chainer's autograd sums its gradients and its weights appear once.
:func:`run` evaluates the node list, each tensor operation through the Chainer function of
:data:`FUNCTIONS` (Chainer's arithmetic operators broadcast as NumPy does and their backward
sums over the broadcast axes).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import chainer.functions as F

from unitrain import ops


def _binary(function: Callable) -> Callable:
    def call(*args, other=None, reverse=False):
        a, b = args if other is None else (args[0], other)
        return function(b, a) if reverse else function(a, b)  # reverse: a number on the left, 1 - x

    return call


def _axis(x, dim: int, index) -> tuple:
    return (slice(None),) * (dim % x.ndim) + (index,)


def _reshape(x, shape):
    return F.reshape(x, (x.shape[0], *ops.reshape_target(x.shape[1:], shape, "reshape")))


def _flatten(x, start_dim=1, end_dim=-1):
    start, end = start_dim % x.ndim, end_dim % x.ndim
    return F.reshape(x, (*x.shape[:start], -1, *x.shape[end + 1 :]))


def _reduce(function: Callable) -> Callable:
    def call(x, dim=None, keepdim=False):
        return function(x, axis=ops.reduced_dims(dim, x.ndim, "reduce"), keepdims=keepdim)

    return call


#: each non-activation operation of unitrain.ops.OPS as Chainer functions (kwargs: the node's)
FUNCTIONS: dict[str, Callable] = {
    **{op: _binary(getattr(operator, "truediv" if op == "div" else op)) for op in ops.BINARY}, "neg": lambda x: -x,
    "exp": F.exp, "log": F.log,
    "cat": lambda *args, dim: F.concat(args, axis=dim), "stack": lambda *args, dim: F.stack(args, axis=dim),
    "narrow": lambda x, dim, start, length: x[_axis(x, dim, slice(start, start + length))],
    "select": lambda x, dim, index: x[_axis(x, dim, index)], "reshape": _reshape, "flatten": _flatten,
    "permute": lambda x, dims: F.transpose(x, [d % x.ndim for d in dims]),
    "transpose": lambda x, dim0, dim1: F.swapaxes(x, dim0 % x.ndim, dim1 % x.ndim),
    "sum": _reduce(F.sum), "mean": _reduce(F.mean), "matmul": F.matmul,
    "getitem": lambda values, index: values[index],
}  # fmt: skip
assert set(FUNCTIONS) | set(ops.ACTIVATIONS) == set(ops.OPS), "every operation has its Chainer function"


def run(steps, input_names, output_names, inputs, released):
    """The graph's outputs: ``steps`` are ``(node name, callable, argument names)`` in order, after
    each of which the values ``released`` names are let go of (:func:`unitrain.graph.released_after`)."""
    values = dict(zip(input_names, inputs, strict=True))
    for (name, call, args), done in zip(steps, released, strict=True):
        values[name] = call(*[values[arg] for arg in args])
        for value in done:
            del values[value]
    outputs = tuple(values[name] for name in output_names)
    return outputs if len(outputs) > 1 else outputs[0]
