"""The user's own loss, written once for every backend, as an expression tree.

``CustomLoss(fn)`` calls ``fn(pred, target)`` once with symbolic placeholders; the
operations it applies are recorded as a tree of plain tuples:

- leaves ``("pred",)``, ``("target",)``, ``("const", value)`` (a Python float);
- ``("item", leaf, index)``: ``pred[index]`` (``target[index]``), one output of a model with
  several (a Graph's; its targets a tuple when the loss reads ``target[index]``), so that one loss
  combines them: a VAE's reconstruction term of output 0 and KL term of outputs 1 and 2;
- an operation ``(op, *children, *static)``: ``ARITY[op]`` children (nodes), then the
  static arguments named ``STATIC[op]`` (an exponent, an axis), e.g.
  ``("sum", ("sub", ("pred",), ("target",)), None)``.

The operations (the whole list; broadcasting as NumPy), with their static arguments:

- ``add sub mul div``: ``a + b``, ``a - b``, ``a * b``, ``a / b`` (Python numbers on either side);
- ``neg``: ``-a``; ``pow``: ``a ** k`` (``exponent``, a number);
- ``sum mean``: ``a.sum()``, ``a.mean(axis)`` (``axis``; None: all elements);
- ``abs exp log sqrt square``: ``abs(a)``, ``expr.exp(a)``, ...;
- ``maximum minimum``: ``expr.maximum(a, b)`` (ties split the gradient, as torch);
- ``log_softmax softmax``: ``expr.log_softmax(a, axis)`` (``axis``).

Each backend evaluates a tree with :func:`evaluate` and its NATIVE op table, so its own
autograd differentiates it. The NumPy backend uses :func:`numpy_value_and_grad`: each op's
NumPy forward and vector-Jacobian product are written once, below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

Node = tuple

#: Number of child nodes of each operation (leaves have none).
ARITY = {
    "pred": 0, "target": 0, "const": 0,
    "neg": 1, "abs": 1, "exp": 1, "log": 1, "sqrt": 1, "square": 1,
    "pow": 1, "sum": 1, "mean": 1, "log_softmax": 1, "softmax": 1, "item": 1,
    "add": 2, "sub": 2, "mul": 2, "div": 2, "maximum": 2, "minimum": 2,
}  # fmt: skip

#: Names of each operation's static arguments, stored after its children.
STATIC = {"const": ("value",), "pow": ("exponent",), "sum": ("axis",), "mean": ("axis",),
          "log_softmax": ("axis",), "softmax": ("axis",), "item": ("index",)}  # fmt: skip

#: The operations a backend's op table must provide (``const(value)`` returns a native scalar).
OPS = tuple(op for op in ARITY if op not in ("pred", "target"))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Expr:
    """A symbolic value inside a CustomLoss's ``fn``; ``node`` is its tree."""

    __slots__ = ("node",)

    def __init__(self, node: Node):
        self.node = node

    def __repr__(self):
        return f"Expr({self.node!r})"

    #: NumPy defers to the methods below, which refuse arrays with a message, instead of building object arrays
    __array_ufunc__ = None

    def __bool__(self):
        raise TypeError("a CustomLoss expression has no truth value; use expr.maximum/minimum, not if or comparisons")

    def _compare(self, other):
        raise TypeError("comparisons are not among CustomLoss's operations; use expr.maximum/minimum")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _compare
    __hash__ = None

    def __add__(self, other):
        return _apply("add", self, other)

    def __radd__(self, other):
        return _apply("add", other, self)

    def __sub__(self, other):
        return _apply("sub", self, other)

    def __rsub__(self, other):
        return _apply("sub", other, self)

    def __mul__(self, other):
        return _apply("mul", self, other)

    def __rmul__(self, other):
        return _apply("mul", other, self)

    def __truediv__(self, other):
        return _apply("div", self, other)

    def __rtruediv__(self, other):
        return _apply("div", other, self)

    def __neg__(self):
        return _apply("neg", self)

    def __abs__(self):
        return _apply("abs", self)

    def __pow__(self, exponent):
        if not _number(exponent):
            raise TypeError(f"CustomLoss: the exponent of ** must be a Python number, got {exponent!r}")
        return _apply("pow", self, static=(float(exponent),))

    def __getitem__(self, index):
        if self.node not in (("pred",), ("target",)) or isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"CustomLoss: only pred[i] and target[i] index (an output of a model with several, "
                            f"i a non-negative integer), got {self.node[0]}[{index!r}]")  # fmt: skip
        if index < 0:
            raise TypeError(f"CustomLoss: {self.node[0]}[{index}]: count outputs from 0")
        return _apply("item", self, static=(index,))

    #: pred and target are not sequences: ``a, b = pred`` would never end (write pred[0], pred[1])
    __iter__ = None

    def sum(self, axis: int | None = None) -> Expr:
        return _apply("sum", self, static=(_axis(axis, allow_none=True),))

    def mean(self, axis: int | None = None) -> Expr:
        return _apply("mean", self, static=(_axis(axis, allow_none=True),))


def _axis(axis, allow_none=False):
    if axis is None and allow_none:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"CustomLoss: axis must be an integer{' or None' if allow_none else ''}, got {axis!r}")
    return axis


def _operand(value) -> Node:
    if isinstance(value, Expr):
        return value.node
    if _number(value):
        return ("const", float(value))
    raise TypeError(
        f"CustomLoss: {value!r} cannot enter the loss expression; use pred, target, Python numbers "
        f"and the operations of unitrain.expr"
    )


def _apply(op: str, *operands, static: tuple = ()) -> Expr:
    return Expr((op, *(_operand(value) for value in operands), *static))


def abs(a) -> Expr:  # the expression language's name, as numpy.abs
    """``|a|``, elementwise."""
    return _apply("abs", a)


def exp(a) -> Expr:
    """``e ** a``, elementwise."""
    return _apply("exp", a)


def log(a) -> Expr:
    """The natural logarithm, elementwise."""
    return _apply("log", a)


def sqrt(a) -> Expr:
    """The square root, elementwise."""
    return _apply("sqrt", a)


def square(a) -> Expr:
    """``a * a``, elementwise."""
    return _apply("square", a)


def maximum(a, b) -> Expr:
    """The larger of ``a`` and ``b``, elementwise, broadcast (ties split the gradient, as torch)."""
    return _apply("maximum", a, b)


def minimum(a, b) -> Expr:
    """The smaller of ``a`` and ``b``, elementwise, broadcast (ties split the gradient, as torch)."""
    return _apply("minimum", a, b)


def log_softmax(a, axis: int) -> Expr:
    """``log(softmax(a, axis))``, computed without overflow."""
    return _apply("log_softmax", a, static=(_axis(axis),))


def softmax(a, axis: int) -> Expr:
    """``exp(a) / exp(a).sum(axis)`` along ``axis``, computed without overflow."""
    return _apply("softmax", a, static=(_axis(axis),))


def split(node: Node) -> tuple[str, tuple[Node, ...], dict]:
    """``(op, children, static arguments by name)`` of a node."""
    op = node[0]
    arity = ARITY[op]
    return op, node[1 : 1 + arity], dict(zip(STATIC.get(op, ()), node[1 + arity :], strict=True))


def _is_scalar(node: Node) -> bool:
    op, children, static = split(node)
    if op in ("pred", "target"):
        return False
    if op in ("sum", "mean"):
        return static["axis"] is None or _is_scalar(children[0])
    return all(_is_scalar(child) for child in children)


def _uses(node: Node, leaves: tuple[str, ...]) -> bool:
    op, children, _ = split(node)
    return op in leaves or any(_uses(child, leaves) for child in children)


def trace(fn: Callable) -> Node:
    """Call ``fn(pred, target)`` on placeholders and return its tree; it must be a scalar
    that depends on ``pred`` (a full ``.sum()``/``.mean()`` on every path to an input)."""
    result = fn(Expr(("pred",)), Expr(("target",)))
    if not isinstance(result, Expr):
        raise TypeError(f"CustomLoss: fn must return an expression of pred and target, got {result!r}")
    if not _is_scalar(result.node) or not _uses(result.node, ("pred",)):
        raise ValueError(
            "CustomLoss: fn must return a scalar that depends on pred: reduce it with .sum() or .mean() "
            f"over all elements, got {result.node!r}"
        )
    return result.node


def items(tree: Node, leaf: str) -> set[int]:
    """The indices ``tree`` reads of ``leaf`` (``pred[i]``); ``{None}`` among them where it reads it whole."""
    op, children, static = split(tree)
    if op == leaf:
        return {None}
    if op == "item" and children[0][0] == leaf:
        return {static["index"]}
    return set().union(*(items(child, leaf) for child in children))


def evaluate(tree: Node, pred, target, ops: Mapping[str, Callable]):
    """Walk ``tree`` calling ``ops[op](*children, **static)``; ``pred``/``target`` are the
    backend's native arrays (tuples of them for a model with several outputs), ``ops`` its native
    functions (the names of :data:`OPS`; ``item`` indexes a tuple)."""
    op, children, static = split(tree)
    if op == "pred":
        return pred
    if op == "target":
        return target
    return ops[op](*(evaluate(child, pred, target, ops) for child in children), **static)


# --- NumPy: each op's forward and vector-Jacobian product, once -----------------------------


def _log_softmax(a, axis):
    shifted = a - a.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _reduce_to(grad, shape):
    """Undo NumPy broadcasting: sum ``grad`` down to an operand's ``shape``."""
    grad = grad.sum(axis=tuple(range(grad.ndim - len(shape)))) if grad.ndim > len(shape) else grad
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _mean_vjp(g, a, out, axis):
    count = a.size if axis is None else a.shape[axis]
    return (np.broadcast_to(g if axis is None else np.expand_dims(g, axis), a.shape) / count,)


def _tie_split(a, b, winner):
    """Gradient shares of ``maximum``/``minimum``: all to the winner, half each on ties."""
    share = np.where(a == b, 0.5, np.where(winner, 1.0, 0.0))
    return share, 1.0 - share


#: op -> (forward(*children, **static), vjp(g, *children, out, **static) -> per-child grads)
NUMPY_OPS: dict[str, tuple[Callable, Callable]] = {
    "add": (np.add, lambda g, a, b, out: (g, g)),
    "sub": (np.subtract, lambda g, a, b, out: (g, -g)),
    "mul": (np.multiply, lambda g, a, b, out: (g * b, g * a)),
    "div": (np.divide, lambda g, a, b, out: (g / b, -g * a / (b * b))),
    "neg": (np.negative, lambda g, a, out: (-g,)),
    "abs": (np.abs, lambda g, a, out: (g * np.sign(a),)),
    "exp": (np.exp, lambda g, a, out: (g * out,)),
    "log": (np.log, lambda g, a, out: (g / a,)),
    "sqrt": (np.sqrt, lambda g, a, out: (g / (2 * out),)),
    "square": (np.square, lambda g, a, out: (2 * g * a,)),
    "pow": (
        lambda a, exponent: np.power(a, exponent),
        lambda g, a, out, exponent: (g * exponent * np.power(a, exponent - 1),),
    ),
    "maximum": (np.maximum, lambda g, a, b, out: tuple(g * s for s in _tie_split(a, b, a > b))),
    "minimum": (np.minimum, lambda g, a, b, out: tuple(g * s for s in _tie_split(a, b, a < b))),
    "sum": (
        lambda a, axis: np.sum(a, axis=axis),
        lambda g, a, out, axis: (np.broadcast_to(g if axis is None else np.expand_dims(g, axis), a.shape),),
    ),
    "mean": (lambda a, axis: np.mean(a, axis=axis), _mean_vjp),
    "item": (lambda a, index: a[index], None),  # a leaf's part: numpy_value_and_grad sends its gradient there
    "log_softmax": (
        _log_softmax,
        lambda g, a, out, axis: (g - np.exp(out) * g.sum(axis=axis, keepdims=True),),
    ),
    "softmax": (
        lambda a, axis: np.exp(_log_softmax(a, axis)),
        lambda g, a, out, axis: (out * (g - (g * out).sum(axis=axis, keepdims=True)),),
    ),
}


def _axis_of(axis: int, shape: tuple[int, ...], op: str) -> int:
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"{op} over axis {axis} of a value of shape {shape}")
    return axis % len(shape)


def result_shape(tree: Node, pred_shape: tuple, target_shape: tuple) -> tuple[int, ...]:
    """The shape ``tree`` computes for inputs of these shapes (their first axis: the batch's
    samples; a tuple of shapes where the tree reads ``pred[i]``/``target[i]``); ``ValueError``
    names the first operation whose operands do not broadcast, whose axis does not exist, an item
    beyond the outputs, or that broadcasts one operand's samples against another axis of the other
    (a prediction ``(N, 1)`` minus targets ``(N,)`` would give ``(N, N)``: every sample against every
    target, where PyTorch's ``mse_loss`` warns)."""
    return _shape_and_batch_axis(tree, tuple(pred_shape), tuple(target_shape))[0]


def _shape_and_batch_axis(tree: Node, pred_shape, target_shape) -> tuple[tuple[int, ...], int | None]:
    """The shape and where its batch axis is (None: reduced away, or a constant)."""
    op, children, static = split(tree)
    if op in ("pred", "target", "const"):
        return {"pred": (pred_shape, 0), "target": (target_shape, 0), "const": ((), None)}[op]
    if op == "item":
        leaf, index = children[0][0], static["index"]
        shapes = pred_shape if leaf == "pred" else target_shape
        if index >= len(shapes):
            raise ValueError(f"{leaf}[{index}] of {len(shapes)} {'outputs' if leaf == 'pred' else 'targets'}")
        return tuple(shapes[index]), 0
    return operation_shape(op, static, [_shape_and_batch_axis(child, pred_shape, target_shape) for child in children])


def operation_shape(op: str, static: Mapping, operands: list) -> tuple[tuple[int, ...], int | None]:
    """What operation ``op`` computes of ``operands``, each ``(shape, where its batch axis is or
    None)``: the same pair, or ``ValueError`` naming the rule it breaks (:func:`result_shape`)."""
    if len(operands) == 2:
        (a, a_batch), (b, b_batch) = operands
        try:
            shape = tuple(np.broadcast_shapes(a, b))
        except ValueError:
            raise ValueError(f"{op} of shapes {a} and {b} (they do not broadcast)") from None
        # broadcasting aligns the shapes' last axes: where each operand's batch axis lands
        landed = {
            axis + len(shape) - len(operand) for operand, axis in ((a, a_batch), (b, b_batch)) if axis is not None
        }
        if len(landed) > 1:
            raise ValueError(f"{op} of shapes {a} and {b} would broadcast the samples of one against another axis "
                             f"of the other, to {shape}; give both the same axes (reshape the prediction or the "
                             "target)")  # fmt: skip
        return shape, next(iter(landed), None)
    ((shape, batch),) = operands
    axis = static.get("axis")
    if op in ("sum", "mean"):
        if axis is None:
            return (), None
        axis = _axis_of(axis, shape, op)
        batch = None if batch == axis else batch if batch is None or batch < axis else batch - 1
        return shape[:axis] + shape[axis + 1 :], batch
    if op in ("log_softmax", "softmax"):
        _axis_of(axis, shape, op)
    return shape, batch


def numpy_value(tree: Node, pred, target) -> float:
    """The loss alone, computed with the same NumPy forward rules."""
    return float(evaluate(tree, pred, target, _numpy_forward(_first(pred).dtype)))


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _numpy_forward(dtype) -> dict[str, Callable]:
    return {op: forward for op, (forward, _) in NUMPY_OPS.items()} | {"const": lambda value: np.asarray(value, dtype)}


def numpy_value_and_grad(tree: Node, pred, target) -> tuple[float, np.ndarray | tuple]:
    """The loss and ``dloss/dpred`` in ``pred``'s dtype (constants take that dtype too); ``pred`` a
    tuple of outputs (read as ``pred[i]``): a tuple of their gradients."""
    dtype = _first(pred).dtype

    def forward(node):
        op, children, static = split(node)
        if op == "pred":
            return pred, None
        if op == "target":
            return target, None
        if op == "const":
            return np.asarray(static["value"], dtype), None
        if op == "item":
            return forward(children[0])[0][static["index"]], None
        inputs = [forward(child) for child in children]
        values = [value for value, _ in inputs]
        return np.asarray(NUMPY_OPS[op][0](*values, **static), dtype), inputs

    def backward(node, value, inputs, grad, total):
        op, children, static = split(node)
        if op == "pred":
            total += grad
            return
        if op == "item" and children[0] == ("pred",):
            part = total[static["index"]]
            np.add(part, grad, out=part)
            return
        if not inputs or not _uses(node, ("pred",)):
            return
        values = [child_value for child_value, _ in inputs]
        grads = NUMPY_OPS[op][1](grad, *values, value, **static)
        for child, (child_value, child_inputs), child_grad in zip(children, inputs, grads, strict=True):
            child_grad = _reduce_to(np.asarray(child_grad, dtype), child_value.shape)
            backward(child, child_value, child_inputs, child_grad, total)

    value, inputs = forward(tree)
    total = tuple(np.zeros_like(part) for part in pred) if isinstance(pred, tuple) else np.zeros_like(pred)
    backward(tree, value, inputs, np.ones((), dtype), total)
    return float(value), total
