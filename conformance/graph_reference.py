"""The independent float64 reference for graphs (:class:`unitrain.graph.Graph`).

Module calls run through :class:`~unitrain.conformance.reference.Reference`, one instance per call
sharing the state (so a module called twice keeps both calls' inputs, and its gradient is the sum
of both calls' parts, added here); tensor operations are written below from PyTorch's
definitions, again without importing the NumPy backend: each forward as the plainest NumPy
expression, each backward as its textbook derivative (a slice's gradient is zero outside the
slice, a concatenation's splits at the input boundaries, a broadcast sums over stretched axes).
"""

from __future__ import annotations

import numpy as np

from unitrain import layers, ops
from unitrain.graph import Graph, get_submodule, tie_source

from .reference import F64, Reference, activation, softmax_backward


def _positive(dim, ndim):
    return dim + ndim if dim < 0 else dim


def _sum_to(grad, shape):
    """``grad`` summed down to ``shape`` (undoing broadcasting of equal-rank shapes)."""
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


def _slicer(ndim, dim, index):
    key = [slice(None)] * ndim
    key[dim] = index
    return tuple(key)


def op_forward(op: str, args: list, kw: dict) -> np.ndarray:
    x = args[0]
    if op in ops.BINARY:
        if len(args) == 2:
            a, b = args
        else:
            a, b = (kw["other"], x) if kw.get("reverse") else (x, kw["other"])
        return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b}[op]()
    if op == "neg":
        return -x
    if op in ("exp", "log"):
        return getattr(np, op)(x)
    if op == "cat":
        return np.concatenate(args, axis=kw["dim"])
    if op == "stack":
        return np.stack(args, axis=_positive(kw["dim"], x.ndim + 1))
    if op == "narrow":
        dim = _positive(kw["dim"], x.ndim)
        return x[_slicer(x.ndim, dim, slice(kw["start"], kw["start"] + kw["length"]))]
    if op == "select":
        return x[_slicer(x.ndim, _positive(kw["dim"], x.ndim), kw["index"])]
    if op == "reshape":
        return x.reshape(x.shape[0], *kw["shape"])
    if op == "flatten":
        start, end = _positive(kw.get("start_dim", 1), x.ndim), _positive(kw.get("end_dim", -1), x.ndim)
        return x.reshape(*x.shape[:start], int(np.prod(x.shape[start : end + 1])), *x.shape[end + 1 :])
    if op == "permute":
        return np.transpose(x, [_positive(d, x.ndim) for d in kw["dims"]])
    if op == "transpose":
        return np.swapaxes(x, kw["dim0"], kw["dim1"])
    if op in ("sum", "mean"):
        dims = ops.reduced_dims(kw.get("dim"), x.ndim, op)
        total = x.sum(axis=dims, keepdims=kw.get("keepdim", False))
        return total if op == "sum" else total / np.prod([x.shape[d] for d in dims])
    if op == "matmul":
        return np.einsum("...ik,...kj->...ij", args[0], args[1])
    return activation(ops.ACTIVATIONS[op](**kw), x)[0]


def op_backward(op: str, args: list, kw: dict, grad: np.ndarray) -> list[np.ndarray]:
    """The gradient reaching each tensor input of ``op`` from ``grad`` on its output."""
    x = args[0]
    if op in ops.BINARY:
        if len(args) == 1:
            other = kw["other"]
            if op in ("add",) or (op == "sub" and not kw.get("reverse")):
                return [grad]
            if op == "sub":
                return [-grad]
            if op == "mul":
                return [grad * other]
            return [-grad * other / x**2] if kw.get("reverse") else [grad / other]
        a, b = args
        parts = {
            "add": (grad, grad), "sub": (grad, -grad), "mul": (grad * b, grad * a),
            "div": (grad / b, -grad * a / b**2),
        }[op]  # fmt: skip
        return [_sum_to(parts[0], a.shape), _sum_to(parts[1], b.shape)]
    if op == "neg":
        return [-grad]
    if op == "exp":
        return [grad * np.exp(x)]
    if op == "log":
        return [grad / x]
    if op == "cat":
        dim, out, start = _positive(kw["dim"], x.ndim), [], 0
        for arg in args:
            out.append(grad[_slicer(grad.ndim, dim, slice(start, start + arg.shape[dim]))])
            start += arg.shape[dim]
        return out
    if op == "stack":
        dim = _positive(kw["dim"], x.ndim + 1)
        return [grad[_slicer(grad.ndim, dim, i)] for i in range(len(args))]
    if op in ("narrow", "select"):
        full = np.zeros_like(x)
        dim = _positive(kw["dim"], x.ndim)
        index = kw["index"] if op == "select" else slice(kw["start"], kw["start"] + kw["length"])
        full[_slicer(x.ndim, dim, index)] = grad
        return [full]
    if op in ("reshape", "flatten"):
        return [grad.reshape(x.shape)]
    if op == "permute":
        dims = [_positive(d, x.ndim) for d in kw["dims"]]
        return [np.transpose(grad, np.argsort(dims))]
    if op == "transpose":
        return [np.swapaxes(grad, kw["dim0"], kw["dim1"])]
    if op in ("sum", "mean"):
        dims = ops.reduced_dims(kw.get("dim"), x.ndim, op)
        if not kw.get("keepdim", False):
            for d in dims:
                grad = np.expand_dims(grad, d)
        grad = np.broadcast_to(grad, x.shape)
        return [grad if op == "sum" else grad / np.prod([x.shape[d] for d in dims])]
    if op == "matmul":
        a, b = args
        return [np.einsum("...ij,...kj->...ik", grad, b), np.einsum("...ki,...kj->...ij", a, grad)]
    layer = ops.ACTIVATIONS[op](**kw)
    if isinstance(layer, (layers.Softmax, layers.LogSoftmax)):
        return [softmax_backward(layer, x, grad)]
    return [grad * activation(layer, x)[1]]


class GraphReference:
    """A float64 copy of a graph: ``forward`` records each node's inputs, ``backward`` returns every
    parameter's gradient (a module called at several nodes, or a tensor tied to two layers: the sum
    over its uses)."""

    def __init__(self, graph: Graph, state: dict[str, np.ndarray]):
        self.graph = graph
        self.state = Reference(layers.Sequential(), state).state  # float64 copies, BatchNorm counters int64
        for key, given in graph.tied:  # a tied parameter computes with its source's values (or their transpose)
            source, transposed = tie_source(given)
            self.state[key] = self.state[source].T if transposed else self.state[source]

    def forward(self, x, training: bool = False):
        """Outputs for ``x`` (an array, or one per input); a tuple for several outputs."""
        xs = (x,) if len(self.graph.inputs) == 1 else tuple(x)
        values = {name: np.asarray(value, F64) for name, value in zip(self.graph.input_names, xs, strict=True)}
        self.calls = {}
        for node in self.graph.nodes:
            args = [values[arg] for arg in node.args]
            if node.op == "call_module":
                call = Reference(layers.Sequential(), {})
                call.state, call.training, call.masks, call.inputs = self.state, training, {}, {}
                values[node.name] = call._forward(get_submodule(self.graph, node.target), args[0], node.target)
                self.calls[node.name] = call
            else:
                values[node.name] = op_forward(node.target, args, node.options)
        self.values = values
        outputs = tuple(values[name] for name in self.graph.outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    def backward(self, grad) -> dict[str, np.ndarray]:
        """Gradients of every parameter, given the loss's gradient on each output."""
        grads = dict(zip(self.graph.outputs, grad if len(self.graph.outputs) > 1 else (grad,), strict=True))
        params: dict[str, np.ndarray] = {}
        for node in reversed(self.graph.nodes):
            if node.name not in grads:
                continue
            upstream = np.asarray(grads.pop(node.name), F64)
            if node.op == "call_module":
                call = self.calls[node.name]
                call.grads = {}
                parts = [call._backward(get_submodule(self.graph, node.target), upstream, node.target)]
                for key, value in call.grads.items():
                    params[key] = params.get(key, 0) + value
            else:
                parts = op_backward(node.target, [self.values[arg] for arg in node.args], node.options, upstream)
            for arg, part in zip(node.args, parts, strict=True):
                grads[arg] = grads[arg] + part if arg in grads else part
        for key, given in self.graph.tied:  # one tensor: the sum of both layers' gradients
            source, transposed = tie_source(given)
            if key in params:
                params[source] = params.get(source, 0) + (params.pop(key).T if transposed else params.pop(key))
        return {key: params.get(key, np.zeros(shape)) for key, shape in self.graph.param_shapes().items()}
