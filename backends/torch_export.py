"""A unitrain :class:`~unitrain.graph.Graph` back as a ``torch.fx.GraphModule``: :func:`to_torch`,
the reverse of :func:`~unitrain.backends.torch_import.from_torch`.

Each layer becomes torch's own module under its path (recurrent layers as plain ``nn.LSTM``, whose
tuple the ``forward`` unpacks), each operation torch's own function or tensor method, a noise input
torch's own draw of the batch's size, and a tie PyTorch's ``tie_weights``: the ``state_dict`` keys
are the graph's, and ``print(module.code)`` shows the ``forward``.

This module imports torch; the core reaches it only through ``unitrain.to_torch``.
"""

from __future__ import annotations

import operator
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from unitrain import layers, ops, sequences
from unitrain.graph import Graph

from . import torch_graph
from .torch import _module as torch_module
from .torch_import_states import fx_states_call


def _fx_call(graph: fx.Graph, op: str, args: list, options: dict, rank: int, shape: tuple):
    """The fx node a unitrain operation stands for, with torch's own function (``rank``: the
    first input's, batch included; ``shape``: the per-sample result's)."""
    if op in ops.BINARY:
        function = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}[op]
        if "other" not in options:
            return graph.call_function(function, tuple(args))
        pair = (options["other"], args[0]) if options.get("reverse") else (args[0], options["other"])
        return graph.call_function(function, pair)
    if op in ("cat", "stack"):
        return graph.call_function(getattr(torch, op), (tuple(args),), {"dim": options["dim"]})
    if op == "reshape":  # -1: the batch
        return graph.call_method("reshape", (args[0], -1, *shape))
    if op in ("sum", "mean"):  # dim None: every per-sample axis
        dims = options.get("dim")
        dims = ops.reduced_dims(dims, rank, op) if dims is None else dims
        return graph.call_method(op, (args[0], dims), {"keepdim": options.get("keepdim", False)})
    if op == "permute":
        return graph.call_method("permute", (args[0], *options["dims"]))
    if op == "flatten":
        options = {"start_dim": 1, "end_dim": -1, **options}
    functions = {"neg": torch.neg, "exp": torch.exp, "log": torch.log,
                 "narrow": torch.narrow, "select": torch.select, "flatten": torch.flatten,
                 "transpose": torch.transpose, "matmul": torch.matmul, "relu": F.relu, "sigmoid": torch.sigmoid,
                 "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "elu": F.elu, "leaky_relu": F.leaky_relu,
                 "softmax": F.softmax, "log_softmax": F.log_softmax}  # fmt: skip
    return graph.call_function(functions[op], tuple(args), dict(options))


def _plain_module(spec: layers.Layer) -> nn.Module:
    """The torch module of a spec; recurrent layers as plain ``nn.LSTM`` (a tuple out, as written)."""
    if isinstance(spec, (sequences.RNN, sequences.LSTM, sequences.GRU)):
        return getattr(nn, type(spec).__name__)(**{f.name: getattr(spec, f.name) for f in fields(spec)})
    if isinstance(spec, layers.Sequential) and not any(
        isinstance(child, (sequences.RNN, sequences.LSTM, sequences.GRU)) for _, child in spec.children
    ):
        return torch_module(spec, torch.float32)
    if isinstance(spec, layers.Sequential):  # a namespace of layers called by path
        container = nn.Module()
        for name, child in spec.children:
            container.add_module(name, _plain_module(child))
        return container
    return torch_module(spec, torch.float32)


def to_torch(graph: Graph, state=None) -> fx.GraphModule:
    """``graph`` as a ``torch.fx.GraphModule`` (float32) holding ``state`` (default: the graph's
    ``initial_state``, else ``init_weights(graph, 0)``): the same ``state_dict`` keys, a
    ``forward`` that calls torch's own layers and functions (``print(module.code)`` shows it)."""
    from unitrain.weights import init_weights

    if not isinstance(graph, Graph):
        raise TypeError(f"to_torch: expected a unitrain Graph, got {type(graph).__name__}")
    root = nn.Module()
    for name, child in graph.children:
        root.add_module(name, _plain_module(child))
    code = fx.Graph()
    noise = dict(graph.noise)
    env = {name: code.placeholder(name) for name, _ in graph.data_inputs}
    batch = code.call_method("size", (env[graph.data_inputs[0][0]], 0)) if noise else None
    for name, shape in graph.inputs:  # noise: torch's own draw, of the batch's size (randn_like's)
        if name in noise:
            draw = torch.randn if noise[name] == "normal" else torch.rand
            env[name] = code.call_function(draw, ((batch, *shape),), {"dtype": torch.float32})
    for node in graph.nodes:
        args = [env[arg] for arg in node.args]
        if node.op == "call_module" and node.options:
            env[node.name] = fx_states_call(code, graph, node, args)
        elif node.op == "call_module":
            env[node.name] = code.call_module(node.target, tuple(args))
            if isinstance(root.get_submodule(node.target), nn.RNNBase):
                env[node.name] = code.call_function(operator.getitem, (env[node.name], 0))
        elif node.target == "getitem":  # an item of a recurrent call's (output, h_n[, c_n])
            env[node.name] = args[0][node.options["index"]]
        else:
            rank = len(graph.shapes[node.args[0]]) + 1
            env[node.name] = _fx_call(code, node.target, args, node.options, rank, graph.shapes[node.name])
    outputs = [env[name] for name in graph.outputs]
    code.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    module = fx.GraphModule(root, code, class_name="GraphModule")
    # GraphModule copies the called modules in call order; the state_dict's order is registration order
    module._modules.clear()
    module._modules.update(root._modules)
    for key, source in graph.tied:  # as PyTorch's tie_weights: the state_dict lists both names again
        torch_graph.tie(module, key, source)  # (a transposed tie: no parameter, the source's transpose)
    state = init_weights(graph, 0) if state is None else state
    state = {**state, **{key: state[source] for key, source in graph.tied if source in state}}
    module.load_state_dict({key: torch.from_numpy(np.asarray(value)) for key, value in state.items()})
    return module
