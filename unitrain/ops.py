"""The tensor operations a :class:`~unitrain.graph.Graph` may hold between layer calls, and the
symbolic tensors that record them.

Each operation is a ``call_function`` node: a name from :data:`OPS` (PyTorch's function name),
its tensor inputs and keyword arguments that are plain numbers (PyTorch's argument names, so a
node reads as the ``torch`` call it stands for). Dimensions count the batch axis, as in
PyTorch (``cat(..., dim=1)`` joins channels of an ``(N, C, H, W)`` batch); no operation may mix
samples, so the batch axis is never concatenated, reduced, moved or reshaped. :func:`infer`
gives an operation's per-sample output shape, or a ``ValueError`` naming both shapes.

A :class:`Tensor` is a symbolic value: calling a layer spec on it (``Linear(4, 2)(x)``), an
operator (``a + b``, ``x[:, 2:5]``, ``x @ y``) or a function here (``cat([a, b], dim=1)``)
records a node and returns a new Tensor with its shape inferred at once, as Keras' functional
API records a layer call on a ``KerasTensor``. :class:`~unitrain.graph.Graph` turns what the
outputs depend on into its node list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from . import layers

Shape = tuple[int, ...]

#: activation functions and the layer spec each one evaluates (its keyword arguments are the spec's fields)
ACTIVATIONS = {
    "relu": layers.ReLU, "sigmoid": layers.Sigmoid, "tanh": layers.Tanh, "gelu": layers.GELU,
    "silu": layers.SiLU, "elu": layers.ELU, "leaky_relu": layers.LeakyReLU, "softmax": layers.Softmax,
    "log_softmax": layers.LogSoftmax,
}  # fmt: skip

#: elementwise binary operations; one input and ``other=<number>`` is a tensor and a scalar
#: (``reverse=True``: the scalar on the left, ``1 - x``)
BINARY = ("add", "sub", "mul", "div")

#: every operation a call_function node may name, with the keyword arguments it takes (PyTorch's
#: names; an activation's are its layer spec's fields)
ARGUMENTS = {
    **{op: ("other", "reverse") for op in BINARY}, "neg": (), "exp": (), "log": (), "cat": ("dim",), "stack": ("dim",),
    "narrow": ("dim", "start", "length"), "select": ("dim", "index"), "reshape": ("shape",),
    "flatten": ("start_dim", "end_dim"), "permute": ("dims",), "transpose": ("dim0", "dim1"),
    "sum": ("dim", "keepdim"), "mean": ("dim", "keepdim"), "matmul": (), "getitem": ("index",),
}  # fmt: skip
OPS = (*ARGUMENTS, *ACTIVATIONS)

#: the noise a graph can draw (:func:`randn_like`, :func:`rand_like`): each becomes an input of the
#: graph that the loop fills (see :mod:`unitrain.graph_noise`)
NOISE_KINDS = ("normal", "uniform")


# --- shape rules -------------------------------------------------------------------------------


def _dim(dim, rank: int, what: str, new_axis: bool = False) -> int:
    """``dim`` of a batch of ``rank`` axes (batch included) as a non-negative index >= 1."""
    size = rank + 1 if new_axis else rank
    if isinstance(dim, bool) or not isinstance(dim, int) or not -size <= dim < size:
        raise ValueError(
            f"{what}: dim {dim!r} is out of range for a batch of rank {rank}; expected {-size}..{size - 1}"
        )
    dim %= size
    if dim == 0:
        raise ValueError(f"{what}: dim 0 is the batch axis; operations work on each sample, dims 1..{size - 1}")
    return dim


def _int(value, what: str, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _broadcast(a: Shape, b: Shape, what: str) -> Shape:
    """NumPy's broadcasting of two per-sample shapes of equal rank (the batch axes then align)."""
    if len(a) != len(b) or any(x != y and 1 not in (x, y) for x, y in zip(a, b, strict=True)):
        raise ValueError(f"{what}: per-sample shapes {a} and {b} do not broadcast (equal rank, each dim equal or 1)")
    return tuple(max(x, y) for x, y in zip(a, b, strict=True))


def reshape_target(shape: Shape, target: Sequence[int], what: str) -> Shape:
    """The per-sample ``target`` shape with its one ``-1`` resolved (sizes must match)."""
    target = tuple(target)
    if (
        any(isinstance(d, bool) or not isinstance(d, int) or (d < 1 and d != -1) for d in target)
        or target.count(-1) > 1
    ):
        raise ValueError(f"{what}: shape must be positive integers with at most one -1, got {target}")
    size = math.prod(shape)
    known = math.prod(d for d in target if d != -1)
    if -1 in target:
        if size % known:
            raise ValueError(f"{what}: cannot view per-sample shape {shape} ({size} values) as {target}")
        target = tuple(size // known if d == -1 else d for d in target)
    if math.prod(target) != size:
        raise ValueError(f"{what}: cannot view per-sample shape {shape} ({size} values) as {target}")
    return target


def infer(op: str, shapes: Sequence[Shape], kwargs: dict, what: str) -> Shape:
    """Per-sample output shape of ``op`` on inputs of per-sample ``shapes``; ``what`` names the
    node in the ``ValueError``."""
    if op not in OPS:
        raise ValueError(f"{what}: unknown operation {op!r}; expected one of {', '.join(OPS)}")
    unknown = sorted(set(kwargs) - set(ARGUMENTS.get(op, kwargs)))
    if unknown:
        raise ValueError(f"{what}: {op} takes no argument {unknown[0]!r}; expected among {list(ARGUMENTS[op])}")
    for flag in ("reverse", "keepdim"):
        if not isinstance(kwargs.get(flag, False), bool):
            raise ValueError(f"{what}: {flag} must be True or False, got {kwargs[flag]!r}")
    if op == "getitem":  # an item of a recurrent layer's tuple (output, h_n[, c_n])
        index = kwargs.get("index")
        if len(shapes) != 1 or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(shapes[0]):
            raise ValueError(f"{what}: getitem takes one recurrent call's tuple of {len(shapes[0])} and an index "
                             f"0..{len(shapes[0]) - 1}, got index {index!r}")  # fmt: skip
        return shapes[0][index]
    arity = {"cat": None, "stack": None, "matmul": 2}.get(op, 2 if op in BINARY and "other" not in kwargs else 1)
    if (arity is None and not shapes) or (arity is not None and len(shapes) != arity):
        raise ValueError(f"{what}: {op} takes {arity or 'one or more'} tensor inputs, got {len(shapes)}")
    first = shapes[0]
    rank = len(first) + 1
    if op in BINARY:
        if len(shapes) == 1:
            other = kwargs["other"]
            if isinstance(other, bool) or not isinstance(other, (int, float)) or not math.isfinite(other):
                raise ValueError(f"{what}: other must be a finite number, got {other!r}")
            return first
        return _broadcast(first, shapes[1], what)
    if op in ("neg", "exp", "log", *ACTIVATIONS):
        if op in ACTIVATIONS:
            try:
                return ACTIVATIONS[op](**kwargs).output_shape(first)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{what}: {error}") from None
        return first
    if op in ("cat", "stack"):
        dim = _dim(kwargs.get("dim"), rank, what, new_axis=op == "stack")
        for index, shape in enumerate(shapes[1:], 1):
            if op == "stack":
                same = shape == first
            else:
                same = len(shape) == len(first) and all(
                    a == b for i, (a, b) in enumerate(zip(shape, first, strict=True)) if i != dim - 1
                )
            if not same:
                rule = "equal shapes" if op == "stack" else f"equal shapes except in dim {dim}"
                raise ValueError(f"{what}: {op} needs {rule}; input 0 has per-sample shape {first}, "
                                 f"input {index} has {shape}")  # fmt: skip
        if op == "stack":
            return (*first[: dim - 1], len(shapes), *first[dim - 1 :])
        return (*first[: dim - 1], sum(shape[dim - 1] for shape in shapes), *first[dim:])
    if op in ("narrow", "select"):
        dim = _dim(kwargs.get("dim"), rank, what)
        size = first[dim - 1]
        if op == "select":
            index = kwargs.get("index")
            if isinstance(index, bool) or not isinstance(index, int) or not -size <= index < size:
                raise ValueError(f"{what}: index {index!r} is out of range for dim {dim} of size {size}")
            return first[: dim - 1] + first[dim:]
        start = _int(kwargs.get("start"), what, "start", 0)
        length = _int(kwargs.get("length"), what, "length", 1)
        if start + length > size:
            raise ValueError(f"{what}: narrow({start}, {length}) runs past dim {dim} of size {size} "
                             f"(per-sample shape {first})")  # fmt: skip
        return (*first[: dim - 1], length, *first[dim:])
    if op == "reshape":
        return reshape_target(first, kwargs.get("shape", ()), what)
    if op == "flatten":
        start = _dim(kwargs.get("start_dim", 1), rank, what)
        end = _dim(kwargs.get("end_dim", -1), rank, what)
        if end < start:
            raise ValueError(f"{what}: flatten's end_dim {end} comes before start_dim {start}")
        return (*first[: start - 1], math.prod(first[start - 1 : end]), *first[end:])
    if op == "permute":
        dims = tuple(kwargs.get("dims", ()))
        in_range = all(isinstance(d, int) and not isinstance(d, bool) and -rank <= d < rank for d in dims)
        if not in_range or sorted(d % rank for d in dims) != list(range(rank)) or dims[0] % rank:
            raise ValueError(f"{what}: dims must order all {rank} axes with the batch axis 0 first, got {dims}")
        return tuple(first[d % rank - 1] for d in dims[1:])
    if op == "transpose":
        a, b = (_dim(kwargs.get(name), rank, what) for name in ("dim0", "dim1"))
        out = list(first)
        out[a - 1], out[b - 1] = out[b - 1], out[a - 1]
        return tuple(out)
    if op in ("sum", "mean"):
        dims = reduced_dims(kwargs.get("dim"), rank, what)
        if kwargs.get("keepdim", False):
            return tuple(1 if i + 1 in dims else d for i, d in enumerate(first))
        return tuple(d for i, d in enumerate(first) if i + 1 not in dims)
    # matmul: (..., n, k) @ (..., k, m) per sample, equal leading dims
    a, b = shapes
    if len(a) < 2 or len(a) != len(b) or a[:-2] != b[:-2] or a[-1] != b[-2]:
        raise ValueError(f"{what}: matmul needs per-sample shapes (..., n, k) and (..., k, m) of equal rank >= 2, "
                         f"got {a} and {b}")  # fmt: skip
    return (*a[:-1], b[-1])


def reduced_dims(dim, rank: int, what: str) -> tuple[int, ...]:
    """``sum``/``mean``'s ``dim`` (an int or a sequence of them; None: every per-sample axis)."""
    if dim is None:
        return tuple(range(1, rank))
    dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
    resolved = tuple(sorted({_dim(d, rank, what) for d in dims}))
    if len(resolved) != len(dims):
        raise ValueError(f"{what}: dim {dim} names an axis twice")
    return resolved


# --- symbolic tensors --------------------------------------------------------------------------


class Tensor:
    """A symbolic batch in a graph under construction: ``shape`` is the full shape with ``None``
    for the batch axis (as Keras prints it), ``sample_shape`` the per-sample rest. Created by
    :func:`unitrain.graph.Input` and by every call on a Tensor; it holds no data."""

    __slots__ = ("args", "kwargs", "op", "sample_shape", "target")

    def __init__(self, op: str, target, args: tuple, kwargs: dict, sample_shape: Shape):
        #: ``"input"`` (target: its name), ``"noise"`` (target: its kind), ``"call_module"`` (target:
        #: the layer spec) or ``"call_function"``
        self.op, self.target, self.args, self.kwargs = op, target, args, kwargs
        self.sample_shape = tuple(sample_shape)

    @property
    def shape(self) -> tuple[int | None, ...]:
        return (None, *self.sample_shape)

    @property
    def ndim(self) -> int:
        return len(self.sample_shape) + 1

    def __repr__(self):
        what = self.target if isinstance(self.target, str) else type(self.target).__name__
        return f"Tensor({self.op} {what}, shape={self.shape})"

    # arithmetic, as torch.Tensor's operators
    def __add__(self, other):
        return _binary("add", self, other)

    def __radd__(self, other):
        return _binary("add", self, other)

    def __sub__(self, other):
        return _binary("sub", self, other)

    def __rsub__(self, other):
        return _binary("sub", self, other, reverse=True)

    def __mul__(self, other):
        return _binary("mul", self, other)

    def __rmul__(self, other):
        return _binary("mul", self, other)

    def __truediv__(self, other):
        return _binary("div", self, other)

    def __rtruediv__(self, other):
        return _binary("div", self, other, reverse=True)

    def __neg__(self):
        return function("neg", self)

    def exp(self):
        return function("exp", self)

    def log(self):
        return function("log", self)

    def __matmul__(self, other):
        return matmul(self, other)

    def __getitem__(self, key):
        return _index(self, key)

    # torch.Tensor's methods of the same names
    def reshape(self, *shape):
        return reshape(self, *shape)

    view = reshape

    def flatten(self, start_dim: int = 1, end_dim: int = -1):
        return flatten(self, start_dim, end_dim)

    def permute(self, *dims):
        return permute(self, *dims)

    def transpose(self, dim0: int, dim1: int):
        return transpose(self, dim0, dim1)

    def sum(self, dim=None, keepdim: bool = False):
        return function("sum", self, dim=_plain_dim(dim), keepdim=keepdim)

    def mean(self, dim=None, keepdim: bool = False):
        return function("mean", self, dim=_plain_dim(dim), keepdim=keepdim)

    def narrow(self, dim: int, start: int, length: int):
        return function("narrow", self, dim=dim, start=start, length=length)

    def select(self, dim: int, index: int):
        return function("select", self, dim=dim, index=index)

    def split(self, split_size_or_sections, dim: int = 0):
        return split(self, split_size_or_sections, dim)

    def chunk(self, chunks: int, dim: int = 0):
        return chunk(self, chunks, dim)

    def relu(self):
        return function("relu", self)

    def sigmoid(self):
        return function("sigmoid", self)

    def tanh(self):
        return function("tanh", self)

    def softmax(self, dim: int):
        return function("softmax", self, dim=dim)

    def log_softmax(self, dim: int):
        return function("log_softmax", self, dim=dim)


def _plain_dim(dim):
    return list(dim) if isinstance(dim, (list, tuple)) else dim


def _check_tensor(value, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what}: expected a symbolic unitrain Tensor, got {type(value).__name__}")
    return value


def function(op: str, *inputs: Tensor, **kwargs) -> Tensor:
    """Record ``op`` on ``inputs`` (a ``call_function`` node); its shape is inferred now."""
    for value in inputs:
        _check_tensor(value, op)
        if isinstance(value, StateTensor):
            raise ValueError(f"{op}: {value.role} is read as PyTorch's (num_layers * num_directions, N, "
                             f"hidden_size); index it ({value.role}[-1]) or put its batch axis first "
                             f"({value.role}.transpose(0, 1)) before {op}")  # fmt: skip
    return _record(op, inputs, kwargs)


def _record(op: str, inputs: tuple, kwargs: dict, kind: type | None = None) -> Tensor:
    kwargs = {key: value for key, value in kwargs.items() if value is not None or key == "dim"}
    shape = infer(op, [value.sample_shape for value in inputs], kwargs, op)
    return (kind or Tensor)("call_function", op, inputs, kwargs, shape)


def call_layer(layer: layers.Layer, inputs: tuple, lengths: Tensor | None = None) -> Tensor:
    """``layer(*inputs)`` on symbolic tensors: a ``call_module`` node (a weightless activation
    not named in the graph's modules becomes its function; see :class:`~unitrain.graph.Graph`).
    A recurrent layer takes initial states and lengths too (:func:`_recurrent_call`)."""
    name = type(layer).__name__
    from .sequences import _Recurrent

    if isinstance(layer, _Recurrent) and (lengths is not None or len(inputs) > 1):
        return _recurrent_call(layer, inputs, lengths)
    if lengths is not None:
        raise ValueError(f"{layer} takes no lengths; only RNN, LSTM and GRU do")
    for value in inputs:
        _check_tensor(value, f"{name}(...)")
        if isinstance(value, StateTensor):
            function(name, value)  # refused there, in the same words
    if isinstance(layer, layers.Container) and hasattr(layer, "input_names"):  # a Graph used as a module
        if layer.noise and len(inputs) == len(layer.inputs) - len(layer.noise):  # its data inputs only:
            declared = dict(layer.inputs)  # its noise becomes the calling graph's, drawn anew at each call
            inputs = (*inputs, *(Tensor("noise", kind, (), {}, declared[name]) for name, kind in layer.noise))
        shapes = layer.infer_shapes([value.sample_shape for value in inputs])
        if len(shapes) != 1:
            raise ValueError(f"{name}: a graph called as a module must have one output, this one has {len(shapes)}")
        return Tensor("call_module", layer, inputs, {}, shapes[0])
    if len(inputs) != 1 and hasattr(layer, "output_shape_of"):  # a leaf of several inputs (attention)
        return Tensor("call_module", layer, inputs, {}, layer.output_shape_of(tuple(v.sample_shape for v in inputs)))
    if len(inputs) == 2:  # a recurrent layer and each sequence's length (unitrain.padded)
        from .padded import lengths_problem

        if problem := lengths_problem(layer, inputs[0].sample_shape, inputs[1].sample_shape):
            raise ValueError(problem)
    elif len(inputs) != 1:
        raise ValueError(f"{layer} takes one tensor input, got {len(inputs)}")
    shape = layers._trace(layer, inputs[0].sample_shape, name, {})
    return (RecurrentResult if isinstance(layer, _Recurrent) else Tensor)("call_module", layer, inputs, {}, shape)


def _recurrent_call(layer, inputs: tuple, lengths: Tensor | None) -> Tensor:
    """``lstm(x, (h0, c0))``, ``gru(x, h0)``, ``lstm(x, lengths)`` (a per-sample shape ``()``),
    ``lstm(x, (h0, c0), lengths=lengths)``: one call node whose inputs are ``x``, the lengths and the
    initial states (``initial_states=True``), as :func:`unitrain.padded.argument_roles` reads them."""
    from .padded import LSTM, call_shape

    x, *rest = inputs
    if len(rest) > 1:
        raise ValueError(f"{layer} takes the input and its initial states (and lengths=), got {len(inputs)} "
                         "inputs; an LSTM's states are one tuple (h0, c0)")  # fmt: skip
    states = rest[0] if rest else None
    if isinstance(states, Tensor) and not isinstance(states, StateTensor) and len(states.sample_shape) != 2:
        states, lengths = None, states  # the lengths as the second argument, lstm(x, lengths); a state is 2-d
    if states is not None:
        count = 2 if isinstance(layer, LSTM) else 1
        states = tuple(states) if isinstance(states, (tuple, list)) else (states,)
        if len(states) != count:
            wanted = "a tuple (h0, c0)" if count == 2 else "one tensor h0"
            got = "one tensor" if len(states) == 1 else f"{len(states)} tensors"
            raise ValueError(f"{layer} takes its initial states as {wanted}, got {got}")
    arguments = (x, *([] if lengths is None else [lengths]), *(states or ()))
    for value in arguments:
        _check_tensor(value, f"{type(layer).__name__}(...)")
    options = {"initial_states": True} if states is not None else {}
    shapes = [value.sample_shape for value in arguments]
    shape = call_shape(layer, layers._trace(layer, x.sample_shape, type(layer).__name__, {}), shapes, options)
    return RecurrentResult("call_module", layer, arguments, options, shape)


class StateTensor(Tensor):
    """A recurrent layer's ``h_n`` or ``c_n`` in a graph. A graph holds it batch-first, per-sample
    ``(num_layers * num_directions, hidden_size)``, but it reads as PyTorch's ``(num_layers *
    num_directions, N, hidden_size)``: ``h_n[-1]`` is the last layer's state ``(N, hidden_size)``
    (a ``select`` of the per-sample axis 0), ``h_n[-2:]`` a state of the last two, ``h_n.transpose(0,
    1)`` or ``h_n.permute(1, 0, 2)`` the batch-first tensor. It is another layer's initial state as
    it is; anything else must index it or put its batch axis first."""

    __slots__ = ("role",)

    @property
    def shape(self):
        return (self.sample_shape[0], None, self.sample_shape[1])

    def _state(self, op: str, **kwargs) -> Tensor:
        out = _record(op, (self,), kwargs, StateTensor)
        out.role = self.role
        return out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if any(item != slice(None) for item in rest) or not isinstance(first, (int, slice)) or isinstance(first, bool):
            raise IndexError(f"indexing {self.role}: index its first axis only ({self.role}[-1], {self.role}[-2:]), "
                             f"got {key!r}")  # fmt: skip
        if isinstance(first, int):
            return _record("select", (self,), {"dim": 1, "index": first})
        start, stop, step = first.indices(self.sample_shape[0])
        if step != 1 or stop <= start:
            raise IndexError(f"indexing {self.role}: only a non-empty slice with step 1, got {first}")
        return self._state("narrow", dim=1, start=start, length=stop - start)

    def permute(self, *dims):
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        if len(dims) != 3 or dims[0] % 3 != 1:
            raise ValueError(f"permute of {self.role}: put its batch axis (1) first, as permute(1, 0, 2), got {dims}")
        batch_first = {0: 1, 1: 0, 2: 2}  # PyTorch's axes of the state -> the graph's
        return _record("permute", (self,), {"dims": [batch_first[d % 3] for d in dims]})

    def transpose(self, dim0: int, dim1: int):
        if {dim0 % 3, dim1 % 3} != {0, 1}:
            raise ValueError(f"transpose of {self.role}: swap axes 0 and 1 (its batch first), got {dim0}, {dim1}")
        return _record("permute", (self,), {"dims": [0, 1, 2]})


class RecurrentResult(Tensor):
    """What calling a recurrent layer returns: the ``output`` tensor, which also unpacks as PyTorch's
    result, ``output, (h_n, c_n) = lstm(x)`` (``output, h_n = gru(x)``), and indexes as it (``lstm(x)[0]``,
    ``lstm(x)[1]``). Unpacked, the call becomes one node with ``final_states=True`` whose items are
    ``getitem`` nodes; use that ``output`` rather than the call itself, which would run the layer twice."""

    __slots__ = ("_items",)

    def items(self) -> tuple:
        """``(output, h_n)`` or ``(output, (h_n, c_n))``, made once."""
        if getattr(self, "_items", None) is None:
            from .padded import call_shape

            options = {**self.kwargs, "final_states": True}
            layer = self.target
            shapes = [value.sample_shape for value in self.args]
            group = Tensor("call_module", layer, self.args, options, call_shape(layer, self.sample_shape, shapes,
                                                                                  options))  # fmt: skip
            items = [_record("getitem", (group,), {"index": index}, StateTensor if index else Tensor)
                     for index in range(len(group.sample_shape))]  # fmt: skip
            for item, role in zip(items[1:], ("h_n", "c_n"), strict=False):
                item.role = role
            self._items = (items[0], items[1] if len(items) == 2 else (items[1], items[2]))
        return self._items

    def __iter__(self):
        return iter(self.items())

    def __len__(self):
        return 2

    def __getitem__(self, key):
        if isinstance(key, int) and not isinstance(key, bool):
            return self.items()[key]
        return super().__getitem__(key)


def _binary(op: str, a: Tensor, b, reverse: bool = False) -> Tensor:
    if isinstance(b, Tensor):
        return function(op, a, b)
    if isinstance(b, bool) or not isinstance(b, (int, float)):
        raise TypeError(f"{op}: the other operand must be a Tensor or a number, got {type(b).__name__}")
    if reverse and op in ("sub", "div"):
        return function(op, a, other=float(b), reverse=True)
    return function(op, a, other=float(b))


def add(a: Tensor, b) -> Tensor:
    return _binary("add", a, b)


def sub(a: Tensor, b) -> Tensor:
    return _binary("sub", a, b)


def mul(a: Tensor, b) -> Tensor:
    return _binary("mul", a, b)


def div(a: Tensor, b) -> Tensor:
    return _binary("div", a, b)


def cat(tensors: Sequence[Tensor], dim: int) -> Tensor:
    """``torch.cat``: join along ``dim`` (shapes equal elsewhere)."""
    return function("cat", *tensors, dim=dim)


def stack(tensors: Sequence[Tensor], dim: int) -> Tensor:
    """``torch.stack``: a new axis at ``dim`` (equal shapes)."""
    return function("stack", *tensors, dim=dim)


def split(x: Tensor, split_size_or_sections, dim: int) -> tuple[Tensor, ...]:
    """``torch.split``: pieces of ``split_size`` along ``dim`` (the last may be smaller), or of the
    listed sizes; each piece is a ``narrow`` node (so a piece's gradient lands in its slice)."""
    _check_tensor(x, "split")
    size = x.sample_shape[_dim(dim, x.ndim, "split") - 1]
    if isinstance(split_size_or_sections, int) and not isinstance(split_size_or_sections, bool):
        step = _int(split_size_or_sections, "split", "split_size", 1)
        sizes = [min(step, size - start) for start in range(0, size, step)]
    else:
        sizes = [_int(s, "split", "section size", 1) for s in split_size_or_sections]
        if sum(sizes) != size:
            raise ValueError(f"split: sections {sizes} sum to {sum(sizes)}, dim {dim} has size {size}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(x.narrow(dim, start, length) for start, length in zip(starts, sizes, strict=True))


def chunk(x: Tensor, chunks: int, dim: int) -> tuple[Tensor, ...]:
    """``torch.chunk``: ``chunks`` pieces of ``ceil(size / chunks)`` (fewer if they run out)."""
    _check_tensor(x, "chunk")
    size = x.sample_shape[_dim(dim, x.ndim, "chunk") - 1]
    return split(x, -(-size // _int(chunks, "chunk", "chunks", 1)), dim)


def reshape(x: Tensor, *shape) -> Tensor:
    """``x.reshape(-1, 16 * 4 * 4)`` as in PyTorch; the first entry is the batch (``-1`` or
    ``None``), the rest the per-sample shape (one ``-1`` allowed when the batch is ``None``)."""
    _check_tensor(x, "reshape")
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else shape
    if not shape or shape[0] not in (-1, None):
        raise ValueError(f"reshape: the first entry must be the batch, -1 or None, got shape {shape}")
    rest = shape[1:]
    if shape[0] == -1 and -1 in rest:
        raise ValueError(f"reshape: -1 is the batch here, so the other entries must be sizes, got {shape}")
    return function("reshape", x, shape=list(rest))


def flatten(x: Tensor, start_dim: int = 1, end_dim: int = -1) -> Tensor:
    """``torch.flatten`` with ``nn.Flatten``'s defaults (every axis but the batch)."""
    return function("flatten", x, start_dim=start_dim, end_dim=end_dim)


def permute(x: Tensor, *dims) -> Tensor:
    if isinstance(x, StateTensor):  # its axes are PyTorch's (layers, N, hidden)
        return x.permute(*dims)
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    return function("permute", x, dims=list(dims))


def transpose(x: Tensor, dim0: int, dim1: int) -> Tensor:
    if isinstance(x, StateTensor):
        return x.transpose(dim0, dim1)
    return function("transpose", x, dim0=dim0, dim1=dim1)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return function("matmul", a, b)


def _index(x: Tensor, key) -> Tensor:
    """``x[:, 2:5]``, ``x[:, 0]``, ``x[..., 1]``: integers and step-1 slices of per-sample axes."""
    key = key if isinstance(key, tuple) else (key,)
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (x.ndim - len(key) + 1) + key[at + 1 :]
    if not key or key[0] != slice(None) or len(key) > x.ndim:
        raise IndexError(f"indexing {x}: keep the batch axis whole (x[:, ...]) and index at most {x.ndim} axes")
    out, dim = x, 1
    for item in key[1:]:
        size = out.sample_shape[dim - 1]
        if isinstance(item, int) and not isinstance(item, bool):
            out = out.select(dim, item)
            continue
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise IndexError(f"indexing {x}: only integers and slices with step 1, got {item!r}")
        start, stop, _ = item.indices(size)
        if stop <= start:
            raise IndexError(f"indexing {x}: slice {item} of dim {dim} (size {size}) is empty")
        if (start, stop) != (0, size):
            out = out.narrow(dim, start, stop - start)
        dim += 1
    return out


def relu(x: Tensor) -> Tensor:
    return function("relu", x)


def sigmoid(x: Tensor) -> Tensor:
    return function("sigmoid", x)


def tanh(x: Tensor) -> Tensor:
    return function("tanh", x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return function("gelu", x, approximate=approximate)


def silu(x: Tensor) -> Tensor:
    return function("silu", x)


def elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    return function("elu", x, alpha=alpha)


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    return function("leaky_relu", x, negative_slope=negative_slope)


def softmax(x: Tensor, dim: int) -> Tensor:
    return function("softmax", x, dim=dim)


def log_softmax(x: Tensor, dim: int) -> Tensor:
    return function("log_softmax", x, dim=dim)


def exp(x: Tensor) -> Tensor:
    return function("exp", x)


def log(x: Tensor) -> Tensor:
    return function("log", x)


def randn_like(x: Tensor) -> Tensor:
    """Standard normal noise of ``x``'s shape (``torch.randn_like``), drawn anew at every training
    forward from the loop's seeded stream: the graph gets an input the loop fills."""
    return Tensor("noise", "normal", (), {}, _check_tensor(x, "randn_like").sample_shape)


def rand_like(x: Tensor) -> Tensor:
    """Uniform noise in [0, 1) of ``x``'s shape (``torch.rand_like``), as :func:`randn_like`."""
    return Tensor("noise", "uniform", (), {}, _check_tensor(x, "rand_like").sample_shape)
