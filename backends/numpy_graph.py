"""NumPy backend: graphs (:class:`unitrain.graph.Graph`), run node by node.

:class:`GraphRun` is a node of the backend's tree (``forward(x, training, record)``,
``backward(grad, need_input_grad)``, ``has_params``): forward evaluates the node list into a
table of values; backward walks it in reverse, summing the gradients that reach a value from each
of its users. A module called at several nodes runs as one tree per call whose leaf layers are
shallow copies of one another: the caches of each call are their own, the parameter, gradient and
buffer arrays are shared, so every call adds its part into the same gradient (the sum over the
uses) and updates the same BatchNorm statistics. Each tensor operation's forward and backward are
written once, in :data:`FUNCTIONS`; the activations run the backend's own activation layers.

A backward owns the gradient it is given and returns arrays its caller owns, none aliasing
another: two inputs never receive the same array.
"""

from __future__ import annotations

import copy

import numpy as np

from unitrain import ops
from unitrain.graph import Graph, get_submodule, released_after, tie_source
from unitrain.layers import Container
from unitrain.sequences import LSTM


def _unbroadcast(grad, shape):
    """``grad`` summed over the axes that broadcasting stretched to reach it from ``shape``."""
    if grad.shape == shape:
        return grad
    axes = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1)
    return grad.sum(axes, keepdims=True)


def _binary_forward(op, args, kwargs):
    if len(args) == 2:
        a, b = args
    elif kwargs.get("reverse"):
        a, b = args[0].dtype.type(kwargs["other"]), args[0]
    else:
        a, b = args[0], args[0].dtype.type(kwargs["other"])
    out = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](a, b)
    return out, (a, b)


def _binary_backward(op, grad, cache, kwargs, need):
    a, b = cache
    if op == "add":
        ga, gb = grad, grad
    elif op == "sub":
        ga, gb = grad, -grad
    elif op == "mul":
        ga, gb = grad * b, grad * a
    else:
        ga, gb = grad / b, -grad * a / (b * b)
    if len(need) == 1:  # a tensor and a number
        return (gb if kwargs.get("reverse") else ga,)
    ga, gb = _unbroadcast(ga, np.shape(a)), _unbroadcast(gb, np.shape(b))
    if gb is ga:
        gb = gb.copy()
    return ga, gb


def _axis_index(ndim, dim, index):
    return (slice(None),) * dim + (index,) + (slice(None),) * (ndim - dim - 1)


def _cat_forward(args, kwargs):
    return np.concatenate(args, axis=kwargs["dim"]), [arg.shape[kwargs["dim"]] for arg in args]


def _cat_backward(grad, sizes, kwargs, need):
    bounds = np.cumsum(sizes)[:-1]
    return tuple(np.split(grad, bounds, axis=kwargs["dim"]))  # disjoint views of an array we own


def _stack_backward(grad, count, kwargs, need):
    return tuple(np.take(grad, i, axis=kwargs["dim"]) for i in range(count))


def _narrow_forward(args, kwargs):
    x, dim = args[0], kwargs["dim"] % args[0].ndim
    return x[_axis_index(x.ndim, dim, slice(kwargs["start"], kwargs["start"] + kwargs["length"]))], x.shape


def _narrow_backward(grad, shape, kwargs, need):
    dim = kwargs["dim"] % len(shape)
    out = np.zeros(shape, grad.dtype)
    out[_axis_index(len(shape), dim, slice(kwargs["start"], kwargs["start"] + kwargs["length"]))] = grad
    return (out,)


def _select_forward(args, kwargs):
    x, dim = args[0], kwargs["dim"] % args[0].ndim
    return x[_axis_index(x.ndim, dim, kwargs["index"])], x.shape


def _select_backward(grad, shape, kwargs, need):
    dim = kwargs["dim"] % len(shape)
    out = np.zeros(shape, grad.dtype)
    out[_axis_index(len(shape), dim, kwargs["index"])] = grad
    return (out,)


def _reshape_forward(args, kwargs):
    x = args[0]
    target = ops.reshape_target(x.shape[1:], kwargs["shape"], "reshape")
    return x.reshape(len(x), *target), x.shape


def _flatten_forward(args, kwargs):
    x = args[0]
    start, end = kwargs.get("start_dim", 1) % x.ndim, kwargs.get("end_dim", -1) % x.ndim
    return x.reshape(*x.shape[:start], -1, *x.shape[end + 1 :]), x.shape


def _reshape_backward(grad, shape, kwargs, need):
    return (grad.reshape(shape),)


def _permute_forward(args, kwargs):
    dims = [d % args[0].ndim for d in kwargs["dims"]]
    return args[0].transpose(dims), dims


def _permute_backward(grad, dims, kwargs, need):
    return (grad.transpose(np.argsort(dims)),)


def _transpose_forward(args, kwargs):
    return np.swapaxes(args[0], kwargs["dim0"], kwargs["dim1"]), None


def _transpose_backward(grad, cache, kwargs, need):
    return (np.swapaxes(grad, kwargs["dim0"], kwargs["dim1"]),)


def _reduce_forward(op, args, kwargs):
    x = args[0]
    dims = ops.reduced_dims(kwargs.get("dim"), x.ndim, op)
    reduce = np.sum if op == "sum" else np.mean
    return reduce(x, axis=dims, keepdims=kwargs.get("keepdim", False)), (x.shape, dims)


def _reduce_backward(op, grad, cache, kwargs, need):
    shape, dims = cache
    if not kwargs.get("keepdim", False):
        grad = np.expand_dims(grad, dims)
    if op == "mean":
        grad = grad / grad.dtype.type(np.prod([shape[d] for d in dims]))
    return (np.broadcast_to(grad, shape).copy(),)


def _matmul_forward(args, kwargs):
    a, b = args
    return a @ b, (a, b)


def _matmul_backward(grad, cache, kwargs, need):
    a, b = cache
    return (grad @ np.swapaxes(b, -1, -2) if need[0] else None, np.swapaxes(a, -1, -2) @ grad if need[1] else None)


def _op(forward, backward):
    return forward, backward


#: operation -> (forward(args, kwargs) -> (value, cache), backward(grad, cache, kwargs, need) -> input grads)
FUNCTIONS = {
    **{op: _op(lambda args, kwargs, op=op: _binary_forward(op, args, kwargs),
               lambda grad, cache, kwargs, need, op=op: _binary_backward(op, grad, cache, kwargs, need))
       for op in ops.BINARY},
    "neg": _op(lambda args, kwargs: (-args[0], None), lambda grad, cache, kwargs, need: (-grad,)),
    "exp": _op(lambda args, kwargs: (out := np.exp(args[0]), out), lambda grad, out, kwargs, need: (grad * out,)),
    "log": _op(lambda args, kwargs: (np.log(args[0]), args[0]), lambda grad, x, kwargs, need: (grad / x,)),
    "cat": _op(_cat_forward, _cat_backward),
    "stack": _op(lambda args, kwargs: (np.stack(args, axis=kwargs["dim"]), len(args)), _stack_backward),
    "narrow": _op(_narrow_forward, _narrow_backward),
    "select": _op(_select_forward, _select_backward),
    "reshape": _op(_reshape_forward, _reshape_backward),
    "flatten": _op(_flatten_forward, _reshape_backward),
    "permute": _op(_permute_forward, _permute_backward),
    "transpose": _op(_transpose_forward, _transpose_backward),
    **{op: _op(lambda args, kwargs, op=op: _reduce_forward(op, args, kwargs),
               lambda grad, cache, kwargs, need, op=op: _reduce_backward(op, grad, cache, kwargs, need))
       for op in ("sum", "mean")},
    "matmul": _op(_matmul_forward, _matmul_backward),
    # an item of a recurrent call's tuple; its gradient is the tuple's, None at the other items
    "getitem": _op(lambda args, kwargs: (args[0][kwargs["index"]], len(args[0])),
                   lambda grad, count, kwargs, need: (tuple(grad if i == kwargs["index"] else None
                                                            for i in range(count)),)),
}  # fmt: skip


class _Function:
    """A tensor operation at one node, keeping its forward's cache for backward."""

    has_params = False

    def __init__(self, op, kwargs):
        self.forward_rule, self.backward_rule = FUNCTIONS[op]
        self.kwargs = kwargs

    def run(self, args, training, record):
        out, cache = self.forward_rule(args, self.kwargs)
        if record:
            self.cache = cache
        return out

    def gradients(self, grad, need):
        return self.backward_rule(grad, self.cache, self.kwargs, need)


class _Call:
    """A module (or activation) at one node: a tree of the backend (or a nested GraphRun)."""

    def __init__(self, tree):
        self.tree = tree
        self.has_params = tree.has_params

    def run(self, args, training, record):
        self.arity = len(args)
        return self.tree.forward(args[0] if len(args) == 1 else tuple(args), training, record)

    def gradients(self, grad, need):
        out = self.tree.backward(grad, any(need))
        if out is None:  # no input gradient wanted, of however many inputs
            return (None,) * len(need)
        # a recurrent layer's second input, the lengths, has no gradient
        return out if isinstance(out, tuple) else (out, *[None] * (self.arity - 1))


class _StatesCall:
    """A recurrent layer at a node with initial states (its last inputs) or returning the tuple
    ``(output, h_n[, c_n])``; a graph holds states batch-first, the layer layer-major."""

    def __init__(self, layer, options):
        self.layer, self.options, self.has_params = layer, options, layer.has_params
        self.count = (2 if isinstance(layer.spec, LSTM) else 1) if options.get("initial_states") else 0

    def run(self, args, training, record):
        x, rest = args[0], args[1:]
        self.lengths = len(rest) > self.count
        states = [state.swapaxes(0, 1) for state in rest[len(rest) - self.count :]] + [None, None]
        output, h_n, c_n = self.layer.run(x, states[0], states[1], training, record, rest[0] if self.lengths else None)
        if record:
            self.output_shape = output.shape
        if not self.options.get("final_states"):
            return output
        return (output, *(state.swapaxes(0, 1) for state in (h_n, c_n) if state is not None))

    def gradients(self, grad, need):
        grad_output, grad_h, grad_c = (*grad, None)[:3] if isinstance(grad, tuple) else (grad, None, None)
        if grad_output is None:
            grad_output = np.zeros(self.output_shape, next(g for g in grad if g is not None).dtype)
        grad_x, grad_h0, grad_c0 = self.layer.backward_states(
            grad_output, *(None if g is None else np.ascontiguousarray(g.swapaxes(0, 1)) for g in (grad_h, grad_c))
        )
        states = (grad_h0, grad_c0)[: self.count]
        return (grad_x, *[None] * self.lengths, *(state.swapaxes(0, 1) for state in states))


class GraphRun:
    def __init__(self, spec: Graph, steps):
        self.spec, self.steps = spec, steps
        self.inputs, self.outputs = spec.input_names, spec.outputs
        requires = dict.fromkeys(self.inputs, False)
        for node, step in zip(spec.nodes, steps, strict=True):
            requires[node.name] = step.has_params or any(requires[arg] for arg in node.args)
        self.requires = requires
        self.has_params = any(requires[name] for name in self.outputs)
        self.released = released_after(spec)

    def forward(self, x, training, record):
        values = dict(zip(self.inputs, x if len(self.inputs) > 1 else (x,), strict=True))
        for node, step, released in zip(self.spec.nodes, self.steps, self.released, strict=True):
            values[node.name] = step.run([values[arg] for arg in node.args], training, record)
            for name in released:  # read by no later node: the steps keep what their backward needs
                del values[name]
        outputs = tuple(values[name] for name in self.outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    def backward(self, grad, need_input_grad):
        grads = {}
        for name, value in zip(self.outputs, grad if len(self.outputs) > 1 else (grad,), strict=True):
            _accumulate(grads, name, value)
        for node, step in zip(reversed(self.spec.nodes), reversed(self.steps), strict=True):
            value = grads.pop(node.name, None)
            if value is None or not self.requires[node.name]:
                continue
            need = [self.requires[arg] or (need_input_grad and arg in self.inputs) for arg in node.args]
            for arg, wanted, part in zip(node.args, need, step.gradients(value, need), strict=True):
                if wanted and part is not None:
                    _accumulate(grads, arg, part)
        if not need_input_grad:
            return None
        parts = tuple(grads.get(name) for name in self.inputs)
        return parts if len(parts) > 1 else parts[0]


def _accumulate(grads, name, value):
    if isinstance(value, tuple):  # a recurrent call's tuple: item by item, None where no gradient reached
        known = grads.get(name, (None,) * len(value))
        value = tuple(b if a is None else a if b is None else a + b for a, b in zip(known, value, strict=True))
        grads[name] = value
    elif name in grads:
        grads[name] = grads[name] + value  # a fresh array: either summand may be a view of another's
    else:
        grads[name] = value


def _replicas(leaves, used):
    """The leaves for one call: the layers themselves at their first call, shallow copies after."""
    for leaf in leaves:
        replica = copy.copy(leaf) if id(leaf) in used else leaf
        used.add(id(leaf))
        yield replica


#: operations whose result is a new array (the others return views of their input)
_FRESH = frozenset({*ops.BINARY, "neg", "exp", "log", "cat", "stack", "sum", "mean", "matmul"})


def build(spec: Graph, leaves, build_tree, make_leaf) -> GraphRun:
    """The graph's runner, taking its leaves (``named_layers`` order) from ``leaves``;
    ``build_tree(spec, leaves, private)`` builds a module's tree, ``make_leaf(spec)`` an
    activation layer. A node whose one input is an array the pass made and that nothing else
    reads gets ``private=True`` (a ReLU may overwrite it), as in a Sequential."""
    own = {path: next(leaves) for path, _ in spec.named_layers()}
    readers: dict[str, int] = {name: 1 for name in spec.outputs}
    for node in spec.nodes:
        for arg in node.args:
            readers[arg] = readers.get(arg, 0) + 1
    fresh = dict.fromkeys(spec.input_names, False)
    used: set[int] = set()
    steps = []
    for node in spec.nodes:
        private = len(node.args) == 1 and fresh[node.args[0]] and readers[node.args[0]] == 1
        if node.op == "call_function" and node.target not in ops.ACTIVATIONS:
            steps.append(_Function(node.target, node.options))
            fresh[node.name] = node.target in _FRESH
            continue
        if node.op == "call_function":
            layer = ops.ACTIVATIONS[node.target](**node.options)
            tree, fresh[node.name] = build_tree(layer, iter([make_leaf(layer)]), private)
        else:
            module = get_submodule(spec, node.target)
            if isinstance(module, Container):
                paths = [f"{node.target}.{path}" for path, _ in module.named_layers()]
            else:
                paths = [node.target]
            tree, fresh[node.name] = build_tree(module, _replicas([own[path] for path in paths], used), private)
            if node.options:  # a recurrent call with initial or final states (the tree is the layer)
                steps.append(_StatesCall(tree, node.options))
                fresh[node.name] = False
                continue
        steps.append(_Call(tree))
    return GraphRun(spec, steps)


def tie(spec, leaves: dict) -> set[str]:
    """Make each tied parameter of ``spec`` (a graph's ``tied``) its source's arrays, value and
    gradient, in the leaves by path; both layers' backward passes add into the one gradient.
    Returns the tied keys."""
    tied = dict(getattr(spec, "tied", ()))
    for key, given in tied.items():
        source, transposed = tie_source(given)
        (path, name), (source_path, source_name) = key.rsplit(".", 1), source.rsplit(".", 1)
        leaf, origin = leaves[path], leaves[source_path]
        value, grad = origin.params[source_name], origin.grads[source_name]
        # a transposed tie: views of the source's arrays, so the update and the gradient sum are theirs
        leaf.params[name], leaf.grads[name] = (value.T, grad.T) if transposed else (value, grad)
        if hasattr(leaf, "bind_weight"):  # a convolution computes with views of its weight
            leaf.bind_weight()
    return set(tied)
