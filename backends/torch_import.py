"""A PyTorch ``nn.Module`` as a unitrain :class:`~unitrain.graph.Graph`: :func:`from_torch` (the way
back, a graph as a ``torch.fx.GraphModule``, is :func:`~unitrain.backends.torch_export.to_torch`).

``from_torch`` traces the module with ``torch.fx`` (symbolic tracing: the layers PyTorch ships
stay ``call_module`` nodes under their own paths, so the ``state_dict`` keys are the module's)
and maps each node to the graph spec: a layer to its unitrain spec, a function or method
(``F.relu``, ``torch.cat``, ``x.view``, ``+``) to its operation of :mod:`unitrain.ops`. While it
traces, every node is also run on the example inputs, so that shapes are concrete: ``len(x)``
and ``x.size(0)`` are numbers, a ``view`` is checked to keep the batch axis, and ``F.pad`` by
nothing is seen to be nothing. Anything else is refused in one line naming the node and its
target. The module's weights become the graph's ``initial_state``: every backend starts from them.

This module imports torch; the core reaches it only through ``unitrain.from_torch`` or a
``--model`` function that returned a torch module.
"""

from __future__ import annotations

import ast
import builtins
import copy
import operator
from collections.abc import Callable, Sequence
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from unitrain import layers, ops, sequences
from unitrain.graph import Graph, Input
from unitrain.ops import Tensor

from . import torch_import_attention, torch_import_ties
from .torch_export import to_torch  # noqa: F401  (documented here before it had its own module)
from .torch_import_attention import CALLED, called_spec, constant, mask_operation, positional_encoding, same_as_spec
from .torch_import_states import recurrent_call

# --- tracing with concrete values ----------------------------------------------------------------


class _Proxy(fx.Proxy):
    """fx's proxy that knows its example value's length (``len(sentence)`` in a forward)."""

    def __len__(self):
        self.tracer.run_pending()
        return len(self.tracer.values[self.node])


class _Tracer(fx.Tracer):
    """fx's tracer that also runs each node on the example inputs (``values``: node -> value).

    Running a node means undoing fx's patches of ``nn.Module`` around it: writes of class
    attributes, each of which invalidates the method caches of every ``nn.Module`` subclass
    (about a millisecond). Once per node that made a 20,000-layer chain take minutes, so the nodes
    wait in ``pending`` and run in order, under one undoing, when a value is asked for during the
    trace (``len(x)``) and once the trace ends (:meth:`run_pending`)."""

    def __init__(self, examples: Sequence[torch.Tensor]):
        super().__init__()
        self.examples, self.values, self.pending = list(examples), {}, []
        self.placeholders = 0

    def proxy(self, node):
        return _Proxy(node, self)

    def is_leaf_module(self, module, qualified_name):
        return (
            isinstance(module, (*LAYERS, *CALLED))
            or positional_encoding(module) is not None
            or super().is_leaf_module(module, qualified_name)
        )

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind == "placeholder":
            if self.placeholders >= len(self.examples):
                raise ValueError(f"from_torch: forward takes an argument {node.name!r} beyond the "
                                 f"{len(self.examples)} example inputs given")  # fmt: skip
            self.values[node] = self.examples[self.placeholders]
            self.placeholders += 1
        else:
            self.pending.append(node)
        return proxy

    def run_pending(self) -> None:
        """Run the nodes traced since the last call on the example inputs, in the trace's order."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        # as plain PyTorch: with fx's patches of nn.Module.__call__ and __getattr__ undone
        with torch.no_grad(), _maybe_revert_all_patches():
            for node in pending:
                self._run(node)

    def _run(self, node) -> None:
        unseen = [arg for arg in node.all_input_nodes if arg.op == "get_attr" and arg not in self.values]
        self.values.update({arg: operator.attrgetter(arg.target)(self.root) for arg in unseen})  # fx's constants
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: self.values[arg])
        try:
            if node.op == "call_module":
                self.values[node] = self.root.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_method":
                self.values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_function":
                self.values[node] = node.target(*args, **kwargs)
            else:  # get_attr: refused when mapped, its value kept for the trace to go on
                self.values[node] = operator.attrgetter(node.target)(self.root)
        except (Exception, SystemExit) as error:  # the user's module on the user's example: anything
            text = " ".join(str(error).split())[:300]
            raise ValueError(
                f"from_torch: node {node.name!r} ({_target(node)}) fails on the example inputs: "
                f"{type(error).__name__}: {text}"
            ) from None


# --- layers: torch module -> unitrain spec ------------------------------------------------------


def _bias(module) -> bool:
    return module.bias is not None


def _plain(value):
    """torch's 1-tuples of 1-d layers as ints, other tuples as tuples."""
    if isinstance(value, (tuple, list)):
        return value[0] if len(value) == 1 else tuple(value)
    return value


def _spec(kind: type, module: nn.Module, **given):
    """``kind`` from the torch module's attributes of the spec's field names (``given`` overrides);
    a tensor of such a name is the module's state, not an argument (BatchNorm's ``running_var``)."""
    values = {f.name: _plain(getattr(module, f.name)) for f in fields(kind) if hasattr(module, f.name)}
    values = {key: value for key, value in values.items()
              if not key.endswith("_init") and not isinstance(value, torch.Tensor)}  # fmt: skip
    return kind(**{**values, **given})


#: torch layer class -> unitrain spec class (the same name and arguments)
LAYERS: dict[type, type] = {
    nn.Linear: layers.Linear, nn.Conv2d: layers.Conv2d, nn.ConvTranspose2d: layers.ConvTranspose2d,
    nn.BatchNorm1d: layers.BatchNorm1d, nn.BatchNorm2d: layers.BatchNorm2d, nn.LayerNorm: layers.LayerNorm,
    nn.MaxPool2d: layers.MaxPool2d, nn.AvgPool2d: layers.AvgPool2d, nn.AdaptiveAvgPool2d: layers.AdaptiveAvgPool2d,
    nn.Upsample: layers.Upsample, nn.Identity: layers.Identity, nn.ReLU: layers.ReLU, nn.Tanh: layers.Tanh,
    nn.Sigmoid: layers.Sigmoid, nn.SiLU: layers.SiLU, nn.GELU: layers.GELU, nn.LeakyReLU: layers.LeakyReLU,
    nn.ELU: layers.ELU, nn.Softmax: layers.Softmax, nn.LogSoftmax: layers.LogSoftmax, nn.Flatten: layers.Flatten,
    nn.Dropout: layers.Dropout, nn.Embedding: sequences.Embedding, nn.RNN: sequences.RNN, nn.LSTM: sequences.LSTM,
    nn.GRU: sequences.GRU, nn.Conv1d: sequences.Conv1d, nn.MaxPool1d: sequences.MaxPool1d,
    nn.AvgPool1d: sequences.AvgPool1d, nn.AdaptiveAvgPool1d: sequences.AdaptiveAvgPool1d,
}  # fmt: skip

#: torch arguments unitrain's layers have only at these values (a spec field of the name is checked by the spec)
_FIXED = {
    "padding_mode": "zeros", "ceil_mode": False, "return_indices": False, "divisor_override": None,
    "max_norm": None, "scale_grad_by_freq": False, "sparse": False, "proj_size": 0, "affine": True,
    "track_running_stats": True, "recompute_scale_factor": None, "dilation": 1,
}  # fmt: skip


def _differs(value, fixed) -> bool:
    """``value`` is not ``fixed`` (a pair of it, as ``dilation=(1, 1)``, is)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return any(entry != fixed for entry in values) or not values


def layer_spec(module: nn.Module, path: str):
    """The unitrain spec of a torch layer; ``ValueError`` naming ``path`` for one unitrain lacks."""
    kind = next((LAYERS[cls] for cls in type(module).__mro__ if cls in LAYERS), None)
    what = f"module {path!r} ({type(module).__name__})"
    if kind is None:
        raise ValueError(f"from_torch: {what} has no unitrain layer; supported: "
                         f"{', '.join(cls.__name__ for cls in LAYERS)}")  # fmt: skip
    names = {f.name for f in fields(kind)}
    for key, value in _FIXED.items():
        if key not in names and hasattr(module, key) and _differs(getattr(module, key), value):
            raise ValueError(f"from_torch: {what} has {key}={getattr(module, key)!r}; unitrain's "
                             f"{kind.__name__} has only {key}={value!r}")  # fmt: skip
    if getattr(module, "momentum", 0.1) is None:
        raise ValueError(f"from_torch: {what} has momentum=None (a cumulative average); unitrain's "
                         f"{kind.__name__} takes a momentum in (0, 1]")  # fmt: skip
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.bias is None:
        raise ValueError(f"from_torch: {what} has bias=False; unitrain's LayerNorm has a bias when elementwise_affine")
    given = {"bias": _bias(module)} if kind in (layers.Linear, layers.Conv2d, layers.ConvTranspose2d,
                                                sequences.Conv1d) else {}  # fmt: skip
    if issubclass(kind, layers._BatchNorm):  # PyTorch's running variance, whatever the dialect around the import
        given["running_var"] = "unbiased"
    try:
        return _spec(kind, module, **given)
    except (TypeError, ValueError) as error:
        raise ValueError(f"from_torch: {what}: {error}") from None


# --- functions and methods -> unitrain operations --------------------------------------------------


def _bind(args: tuple, kwargs: dict, names: str) -> list:
    """Positional-or-keyword arguments by ``names`` ("input dim=0": a default after ``=``); any
    other argument is refused (a ``dtype=``, ``out=``, ``rounding_mode=`` would change the result)
    unless it is None or private (``_stacklevel``)."""
    known = [item.partition("=")[0] for item in names.split()]
    extra = [f"{key}={value!r}" for key, value in kwargs.items()
             if key not in known and value is not None and not key.startswith("_")]  # fmt: skip
    if len(args) > len(known) or extra:
        raise ValueError(f"argument {(extra or [repr(args[len(known)])])[0]} is not supported")
    values = []
    for index, item in enumerate(names.split()):
        name, _, default = item.partition("=")
        if index < len(args):
            values.append(args[index])
        elif name in kwargs:
            values.append(kwargs[name])
        elif default:
            values.append(ast.literal_eval(default))
        else:
            raise ValueError(f"missing argument {name!r}")
    return values


def _tensors(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _dims(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _reduce(method: str):
    def call(node, args, kwargs):
        x, dim, keepdim = _bind(args, kwargs, "input dim=None keepdim=False")
        if dim is None:
            raise ValueError(f"{method} over every axis reduces the batch too; give dim (the per-sample axes)")
        return getattr(x, method)(_dims(dim), keepdim=keepdim)

    return call


def _activation(op: str, signature: str = "input", *keep: str):
    """``op`` on its first argument with the arguments named in ``keep`` (``inplace`` goes)."""

    def call(node, args, kwargs):
        x, *rest = _bind(args, kwargs, signature)
        names = [item.partition("=")[0] for item in signature.split()[1:]]
        options = {name: value for name, value in zip(names, rest, strict=True) if name in keep}
        if options.get("dim", 0) is None:
            raise ValueError(f"{op} needs dim (the implicit choice is deprecated in PyTorch)")
        return ops.function(op, x, **options)

    return call


def _binary(function: Callable):
    def call(node, args, kwargs):
        if kwargs.get("alpha", 1) != 1:
            raise ValueError("alpha is not supported; write the multiplication out")
        a, b = _bind(args, {key: value for key, value in kwargs.items() if key != "alpha"}, "input other")
        return function(a, b)

    return call


def _flatten(node, args, kwargs):
    x, start, end = _bind(args, kwargs, "input start_dim=0 end_dim=-1")
    return ops.flatten(x, start, end)


def _view(node, args, kwargs, values):
    """``view``/``reshape``/``squeeze``/``unsqueeze``: to the per-sample shape it gave the example
    (``x.view(x.size(0), -1)``, ``x.view(len(x), 1, -1)``...); the batch axis must stay."""
    before, after = values[node.args[0]].shape, values[node].shape
    if not after or after[0] != before[0]:
        raise ValueError(f"it turns a batch of {before[0]} into {tuple(after)[:1] or 'a scalar'}: the batch axis "
                         f"must stay first (unitrain keeps samples apart)")  # fmt: skip
    return ops.reshape(args[0], None, *after[1:])


def _index(node, args, kwargs, values):
    """``x[:, -1]``, ``x[:, 2:5]`` (a negative index stays one: the last step of any length), or an
    item of a tuple or size."""
    x, key = args
    return x[key]


def _pad(node, args, kwargs):
    x, pad, _mode, _value = _bind(args, kwargs, "input pad mode='constant' value=None")  # by nothing: any mode
    if any(pad):
        raise ValueError(
            f"padding by {list(pad)} is not supported (only by nothing, as a U-Net's F.pad of equal sizes)"
        )
    return x


def _clamp(node, args, kwargs):
    x, low, high = _bind(args, kwargs, "input min=None max=None")
    if low != 0 or high is not None:
        raise ValueError(f"clamp(min={low}, max={high}) is not supported; only clamp(min=0), which is relu")
    return ops.relu(x)


def _layer(kind: type, signature: str, check: Callable | None = None):
    """A functional layer (``F.max_pool2d``): its spec as a weightless module of the graph."""

    def call(node, args, kwargs, importer):
        x, *rest = _bind(args, kwargs, signature)
        options = dict(zip([item.partition("=")[0] for item in signature.split()[1:]], rest, strict=True))
        if check is not None:
            options = check(options)
        if options is None:
            return x
        for key, value in _FIXED.items():
            if _differs(options.get(key, value), value):
                raise ValueError(f"{key}={options[key]!r} is not supported; only {key}={value!r}")
            options.pop(key, None)
        return importer.functional_layer(node, kind(**{key: _plain(value) for key, value in options.items()}), x)

    return call


def _dropout(options):
    if not options.pop("training"):
        return None  # F.dropout(x, training=False) is x
    options.pop("inplace")
    return options


def _interpolate(options):
    if options.pop("antialias"):
        raise ValueError("antialias=True is not supported")
    return options


_OPERATIONS = {
    "add": _binary(operator.add), "sub": _binary(operator.sub), "mul": _binary(operator.mul),
    "div": _binary(operator.truediv), "truediv": _binary(operator.truediv), "neg": lambda n, a, k: -a[0],
    "exp": lambda n, a, k: ops.exp(*_bind(a, k, "input")), "log": lambda n, a, k: ops.log(*_bind(a, k, "input")),
    # noise: an input of the graph that the loop fills from its seeded stream (unitrain.graph_noise)
    "randn_like": lambda n, a, k: ops.randn_like(*_bind(a, k, "input")),
    "rand_like": lambda n, a, k: ops.rand_like(*_bind(a, k, "input")),
    "matmul": lambda n, a, k: a[0] @ a[1], "bmm": lambda n, a, k: a[0] @ a[1],
    "cat": lambda n, a, k: ops.cat(*_bind(a, k, "tensors dim=0")),
    "concat": lambda n, a, k: ops.cat(*_bind(a, k, "tensors dim=0")),
    "concatenate": lambda n, a, k: ops.cat(*_bind(a, k, "tensors dim=0")),
    "stack": lambda n, a, k: ops.stack(*_bind(a, k, "tensors dim=0")),
    "permute": lambda n, a, k: ops.permute(a[0], *(a[1:] or [k["dims"]])),
    "transpose": lambda n, a, k: ops.transpose(*_bind(a, k, "input dim0 dim1")),
    "split": lambda n, a, k: ops.split(*_bind(a, k, "tensor split_size_or_sections dim=0")),
    "chunk": lambda n, a, k: ops.chunk(*_bind(a, k, "input chunks dim=0")),
    "narrow": lambda n, a, k: ops.Tensor.narrow(*_bind(a, k, "input dim start length")),
    "select": lambda n, a, k: ops.Tensor.select(*_bind(a, k, "input dim index")),
    "sum": _reduce("sum"), "mean": _reduce("mean"), "relu": _activation("relu", "input inplace=False"),
    "sigmoid": _activation("sigmoid"), "tanh": _activation("tanh"),
    "gelu": _activation("gelu", "input approximate='none'", "approximate"),
    "silu": _activation("silu", "input inplace=False"),
    "elu": _activation("elu", "input alpha=1.0 inplace=False", "alpha"),
    "leaky_relu": _activation("leaky_relu", "input negative_slope=0.01 inplace=False", "negative_slope"),
    "softmax": _activation("softmax", "input dim=None", "dim"),
    "log_softmax": _activation("log_softmax", "input dim=None", "dim"),
    "pad": _pad, "clamp": _clamp, "clamp_min": lambda n, a, k: _clamp(n, (a[0], a[1]), {}),
    "contiguous": lambda n, a, k: a[0], "flatten": torch_import_attention.per_head_flatten(_flatten),
}  # fmt: skip
#: the reshaping ones read the example's shapes
_SHAPED = {"view": _view, "reshape": _view, "squeeze": _view, "unsqueeze": _view, "getitem": _index}
#: functional layers, each a weightless module of the graph
_LAYERED = {
    "max_pool2d": _layer(layers.MaxPool2d, "input kernel_size stride=None padding=0 dilation=1 ceil_mode=False "
                         "return_indices=False"),
    "avg_pool2d": _layer(layers.AvgPool2d, "input kernel_size stride=None padding=0 ceil_mode=False "
                         "count_include_pad=True divisor_override=None"),
    "adaptive_avg_pool2d": _layer(layers.AdaptiveAvgPool2d, "input output_size"),
    "dropout": _layer(layers.Dropout, "input p=0.5 training=True inplace=False", _dropout),
    "interpolate": _layer(layers.Upsample, "input size=None scale_factor=None mode='nearest' align_corners=None "
                          "recompute_scale_factor=None antialias=False", _interpolate),
}  # fmt: skip

#: call_function targets by the function itself (torch's, torch.nn.functional's and operator's)
_FUNCTIONS: dict[Callable, str] = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub", operator.mul: "mul",
    operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div", operator.neg: "neg",
    operator.matmul: "matmul", operator.getitem: "getitem", operator.floordiv: "floordiv",
    operator.ne: "ne", torch.ne: "ne",
    torch.exp: "exp", torch.log: "log", torch.randn_like: "randn_like", torch.rand_like: "rand_like",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div", torch.neg: "neg",
    torch.matmul: "matmul", torch.bmm: "bmm", torch.cat: "cat", torch.concat: "concat",
    torch.concatenate: "concatenate", torch.stack: "stack", torch.flatten: "flatten", torch.permute: "permute",
    torch.transpose: "transpose", torch.split: "split", torch.chunk: "chunk", torch.narrow: "narrow",
    torch.select: "select",
    torch.reshape: "reshape", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", torch.sum: "sum",
    torch.mean: "mean", torch.relu: "relu", torch.sigmoid: "sigmoid", torch.tanh: "tanh", torch.clamp: "clamp",
    torch.softmax: "softmax", torch.log_softmax: "log_softmax", F.relu: "relu", F.sigmoid: "sigmoid",
    F.tanh: "tanh", F.gelu: "gelu", F.silu: "silu", F.elu: "elu", F.leaky_relu: "leaky_relu", F.softmax: "softmax",
    F.log_softmax: "log_softmax", F.pad: "pad", F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.dropout: "dropout", F.interpolate: "interpolate",
    builtins.getattr: "getattr",
}  # fmt: skip


def _target(node) -> str:
    """How a node names its target in messages: ``torch.cat``, ``Tensor.view``, ``conv1``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        return f"{module.replace('torch.nn.functional', 'F')}.{node.target.__name__}".lstrip(".")
    return str(node.target)


class _Importer:
    """Maps one traced fx graph to unitrain tensors, node by node."""

    def __init__(self, root: nn.Module, tracer: _Tracer):
        self.root, self.values = root, tracer.values
        self.specs: dict[str, layers.Layer] = {}  # module path -> its spec (one per torch module)
        self.functional: dict[str, layers.Layer] = {}  # functional layers, named after their nodes
        self.fixed_buffers: set[str] = set()  # state_dict keys of tables a spec computes (PositionalEncoding's pe)
        self.tied: dict[str, str] = {}  # a functional layer's weight -> the layer weight it is (torch_import_ties)

    def functional_layer(self, node, spec, x):
        name = node.name
        while name in self.functional or hasattr(self.root, name):
            name = f"{name}_"
        self.functional[name] = spec
        return spec(x)

    def run(self, graph: fx.Graph):
        env: dict = {}
        inputs = []
        live = self.live = set()  # what the output depends on: not the unused half of `out, _ = self.lstm(x)`
        for node in reversed(graph.nodes):
            if node.op in ("output", "placeholder") or node in live:
                live.update(node.all_input_nodes)
        for node in graph.nodes:
            if node.op not in ("output", "placeholder") and node not in live:
                continue
            where = f"from_torch: node {node.name!r} ({_target(node)})"
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda arg: env[arg])
            try:
                if node.op == "placeholder":
                    example = self.values[node]
                    env[node] = Input(tuple(example.shape[1:]), node.name)
                    inputs.append(env[node])
                elif node.op == "output":
                    outputs = _tensors(args[0])
                    if not all(isinstance(value, Tensor) for value in outputs):
                        raise ValueError("the module returns something other than tensors; return a tensor or a "
                                         "tuple of them")  # fmt: skip
                    return inputs, outputs
                elif node.op == "get_attr":  # a Linear's weight (F.linear: a tied decoder), a constant, or refused
                    value = self.values[node]
                    env[node] = constant(node, None, (), {}, value, self.root) or torch_import_ties.weight_of(
                        node, value, self.root)  # fmt: skip
                elif node.op == "call_module":
                    env[node] = self.call_module(node, args, kwargs)
                else:
                    env[node] = self.call(node, args, kwargs)
            except (ValueError, TypeError, IndexError) as error:
                message = str(error)
                raise ValueError(message if message.startswith("from_torch:") else f"{where}: {message}") from None
        raise AssertionError("an fx graph ends with its output node")

    def call_module(self, node, args, kwargs):
        path = node.target
        module = self.root.get_submodule(path)
        if isinstance(module, CALLED):
            return self.call_attention(node, module, args, kwargs)
        if path not in self.specs:
            pattern = positional_encoding(module)
            if pattern is not None:
                self.specs[path] = self.positional_encoding(node, module, *pattern)
            else:
                self.specs[path] = layer_spec(module, path)
        spec = self.specs[path]
        if isinstance(spec, sequences._Recurrent) and isinstance(self.values[node], tuple):
            result, unpacked = recurrent_call(spec, node, *_bind(args, kwargs, "input hx=None"), self.live)
            return _Recurrent(result, path, unpacked=unpacked)
        if (
            any(arg is not None for arg in args[1:])
            or any(v is not None for v in kwargs.values())
            or not (args and isinstance(args[0], Tensor))
        ):
            raise ValueError("calls a layer with more than one tensor (masks); unitrain's layers take one input "
                             "(recurrent layers their initial states too)")  # fmt: skip
        return spec(args[0])

    def call_attention(self, node, module, args, kwargs):
        """An attention layer's spec is made per call (its length, its mask); one module, one spec."""
        examples = fx.node.map_arg((node.args, node.kwargs), lambda arg: self.values[arg])
        spec, inputs = called_spec(module, node.target, (args, kwargs), examples)
        if self.specs.setdefault(node.target, spec) != spec:
            raise ValueError(f"calls {node.target} again with another length or mask; unitrain's layer is one spec")
        out = spec(*inputs)
        return _Recurrent(out, node.target, "(attn_output, attn_output_weights)") if isinstance(
            self.values[node], tuple) else out  # fmt: skip

    def positional_encoding(self, node, module, spec, dropout):
        """word_language_model's PositionalEncoding, checked on the example (in eval: no dropout)."""
        x = self.values[node.args[0]] if node.args else None
        training = module.training
        with torch.no_grad(), _maybe_revert_all_patches():
            out = module.train(False)(x) if isinstance(x, torch.Tensor) else None
        module.train(training)
        if out is None or not same_as_spec(spec, x, out):
            raise ValueError(f"from_torch: module {node.target!r} ({type(module).__name__}) holds the sinusoidal "
                             "table pe but its forward does not compute x + pe[:T] (word_language_model's "
                             "PositionalEncoding)")  # fmt: skip
        self.fixed_buffers.update(f"{node.target}.{name}" for name, _ in module.named_buffers())
        return layers.Sequential(spec, layers.Dropout(dropout)) if dropout else spec

    def call(self, node, args, kwargs):
        if (tied := torch_import_ties.call(node, args, kwargs, self)) is not None:
            return tied
        name = node.target if node.op == "call_method" else _FUNCTIONS.get(node.target)
        if (built := constant(node, name, args, kwargs, self.values[node])) is not None:
            return built  # a causal mask made in forward
        if name == "getitem" and isinstance(args[0], _Recurrent):
            return args[0].output(args[1])
        if name == "getitem" and isinstance(args[0], tuple):  # (h_n, c_n) of an LSTM
            return args[0][args[1]]
        if (node.op == "call_method" and name in ("size", "dim")) or name == "getattr":
            return _concrete(self.values[node])  # shape arithmetic: numbers of the example
        if name in ("add", "sub", "mul", "div", "floordiv") and not any(isinstance(a, Tensor) for a in args):
            return _concrete(self.values[node])
        if name in ("bool", "ne", "repeat_interleave"):
            return mask_operation(name, args, fx.node.map_arg((node.args, node.kwargs), lambda arg: self.values[arg]))
        if name in _SHAPED:
            return _SHAPED[name](node, args, kwargs, self.values)
        if name in _LAYERED:
            return _LAYERED[name](node, args, kwargs, self)
        if name in _OPERATIONS:
            return _OPERATIONS[name](node, args, kwargs)
        raise ValueError(
            "has no unitrain operation (docs/graphs.md lists what imports); write it with "
            "the supported layers and functions"
        )


class _Recurrent:
    """A recurrent layer's ``(output, states)`` (or an attention layer's ``(output, weights)``): its
    ``output`` (index 0) and, for a recurrent layer that reads them, its final states."""

    def __init__(self, output: Tensor, path: str, parts: str = "(output, states)", unpacked: bool = False):
        self.output_tensor, self.path, self.parts, self.unpacked = output, path, parts, unpacked

    def output(self, index):
        if self.unpacked:
            return self.output_tensor[index]
        if index != 0:
            raise ValueError(f"takes item {index!r} of {self.path}'s {self.parts}; only the output (item 0) "
                             "flows in a unitrain graph")  # fmt: skip
        return self.output_tensor


def _concrete(value):
    if isinstance(value, torch.Size):
        return tuple(value)
    return value


# --- the module tree -----------------------------------------------------------------------------


def _namespaces(root: nn.Module, specs: dict[str, layers.Layer]) -> dict[str, layers.Layer]:
    """The graph's modules: each called layer under its torch path, inside ``Sequential``
    containers named as torch's parents, in torch's registration (``state_dict``) order."""

    def build(module: nn.Module, prefix: str) -> dict[str, layers.Layer]:
        children = {}
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in specs:
                children[name] = specs[path]
            elif any(called.startswith(f"{path}.") for called in specs):
                children[name] = layers.Sequential(build(child, f"{path}."))
        return children

    return build(root, "")


def _ties(root: nn.Module) -> dict[str, str]:
    """Each parameter that is another's tensor (``decoder.weight = encoder.weight``) -> its first name."""
    seen: dict[int, str] = {}
    tied = {}
    for name, parameter in root.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied[name] = seen[id(parameter)]
        seen.setdefault(id(parameter), name)
    return tied


def _state(root: nn.Module, graph: Graph, fixed: set[str]) -> dict[str, np.ndarray]:
    """The module's ``state_dict`` as the graph's initial state; ``ValueError`` when they differ."""
    state = root.state_dict()
    shapes = graph.state_shapes()
    for key in state:
        if key not in shapes and key not in fixed and key not in dict(graph.tied):
            raise ValueError(f"from_torch: {key} belongs to a layer that forward never calls; remove the layer "
                             "(its weights would be lost)")  # fmt: skip
    out = {}
    for key, shape in shapes.items():
        tensor = state[key].detach().cpu()
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"from_torch: {key} has shape {tuple(tensor.shape)}, the layer's spec {tuple(shape)}")
        if tensor.is_complex() or not torch.isfinite(tensor).all():  # astype would drop imaginary parts
            raise ValueError(f"from_torch: {key} holds {'complex' if tensor.is_complex() else 'NaN or infinite'} "
                             "values; expected finite real weights")  # fmt: skip
        dtype = np.int64 if key.endswith("num_batches_tracked") else np.float32
        out[key] = tensor.numpy().astype(dtype)
    return out


def from_torch(module: nn.Module, example_inputs) -> Graph:
    """``module`` as a unitrain :class:`~unitrain.graph.Graph` whose ``initial_state`` is its
    weights, in float32 as every loop's first weights are (see the module doc).
    ``example_inputs``: a tensor or a tuple of them, one per ``forward`` argument, each a batch
    (axis 0; two samples or more, so that the batch axis is told apart from the others).
    ``ValueError`` in one line naming what cannot be imported."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    examples = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not examples or not all(isinstance(x, torch.Tensor) and x.dim() >= 2 for x in examples):
        raise ValueError("from_torch: example_inputs must be a tensor or a tuple of tensors, each a batch of "
                         "samples (at least 2 axes: the batch first)")  # fmt: skip
    graph, build = _imported(module, examples)
    # the batch axis is symbolic in the graph; a forward that reads the example's batch size as a plain
    # number (x.view(2, -1)) would be another model at another size: trace once more, a sample longer
    longer = tuple(torch.cat([x, x[:1]]) for x in examples)
    try:
        again = _imported(module, longer)[0]
    except ValueError as error:
        again = str(error).removeprefix("from_torch: ")
    if again != graph:
        batch = len(examples[0])
        where = again if isinstance(again, str) else _first_difference(graph, again)
        raise ValueError(f"from_torch: {type(module).__name__}.forward depends on the example's batch size "
                         f"{batch}: with {batch + 1} samples, {where}; write the batch as x.size(0), len(x) or "
                         "-1")  # fmt: skip
    inputs, outputs, modules, fixed_buffers = build
    return Graph(inputs, outputs, modules, initial_state=_state(module, graph, fixed_buffers), tied=graph.tied)


def _imported(module: nn.Module, examples: tuple) -> tuple[Graph, tuple]:
    """The traced graph (without weights) and what built it: its input and output tensors, its modules
    and the ``state_dict`` keys of the tables its specs compute."""
    tracer = _Tracer(examples)
    try:  # on a copy: running the nodes updates a training BatchNorm's statistics
        traced = tracer.trace(copy.deepcopy(module))
    except (Exception, SystemExit) as error:  # fx's TraceError, or the user's forward failing (or exiting)
        failure = error
    else:
        failure = None
    if isinstance(failure, ValueError) and str(failure).startswith("from_torch:"):
        raise failure
    tracer.run_pending()  # before the trace's own error: a node that fails on the examples is the cause
    if failure is not None:
        error = failure
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, SystemExit):
            first = f"it called sys.exit({error.code!r})"
        raise ValueError(f"from_torch: torch.fx cannot trace {type(module).__name__}.forward: {first}") from None
    placeholders = sum(1 for node in traced.nodes if node.op == "placeholder")
    if placeholders != len(examples):
        raise ValueError(f"from_torch: {type(module).__name__}.forward takes {placeholders} inputs, "
                         f"{len(examples)} example inputs given")  # fmt: skip
    importer = _Importer(tracer.root, tracer)
    inputs, outputs = importer.run(traced)
    modules = {**_namespaces(module, importer.specs), **importer.functional}
    try:
        graph = Graph(inputs, outputs, modules, tied={**_ties(module), **importer.tied})
    except ValueError as error:
        raise ValueError(f"from_torch: {error}") from None
    return graph, (inputs, outputs, modules, importer.fixed_buffers)


def _first_difference(graph: Graph, other: Graph) -> str:
    """Where two imports of one module differ: the first node (or input) that is not the same."""
    for (name, shape), (_, other_shape) in zip(graph.inputs, other.inputs, strict=True):
        if shape != other_shape:
            return f"input {name!r} has per-sample shape {other_shape}, not {shape}"
    for node, again in zip(graph.nodes, other.nodes, strict=False):
        if node != again:
            return f"node {node.name!r} ({node.target}) is {again}, not {node}"
    return "the graph differs"


# --- the command line: a --model function that returned a torch module ----------------------------


def imported_model(value, name: str) -> Graph:
    """A ``--model`` function's torch result as a graph: ``(module, example_inputs)``, or a module
    with an ``example_input_array`` (PyTorch Lightning's attribute); ``ValueError`` otherwise."""
    if isinstance(value, tuple) and len(value) != 2:
        raise ValueError(f"model {name!r}: returned a tuple of {len(value)} items; expected a torch module "
                         "or (module, example_inputs)")  # fmt: skip
    module, example = value if isinstance(value, tuple) else (value, None)
    example = getattr(module, "example_input_array", None) if example is None else example
    if example is None:
        raise ValueError(f"model {name!r}: returned a torch {type(module).__name__} without an example input; "
                         "return (module, example_inputs) or set module.example_input_array")  # fmt: skip
    try:
        return from_torch(module, example)
    except ValueError as error:
        raise ValueError(f"model {name!r}: {error}") from None
