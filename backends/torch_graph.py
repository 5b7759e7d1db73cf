"""PyTorch backend: a :class:`unitrain.graph.Graph` as an ``nn.Module`` that runs its node list.

The graph's modules are registered under their names (``state_dict`` keys ``encoder.1.weight``,
PyTorch's; a module called at several nodes is one submodule, so autograd sums its gradients and
its weights appear once), and ``forward(*inputs)`` evaluates the nodes in order with the
``torch`` function each operation names (:data:`FUNCTIONS`), as a ``torch.fx.GraphModule`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unitrain import ops
from unitrain.graph import Graph, released_after, tie_source


def _binary(function: Callable, reverse_function: Callable | None = None):
    def call(*args, other=None, reverse=False):
        if other is None:
            return function(*args)
        return reverse_function(args[0], other) if reverse else function(args[0], other)

    return call


def _reshape(x, shape):
    return x.reshape(x.shape[0], *shape)


def _reduce(method: str):
    def call(x, dim=None, keepdim=False):
        dims = tuple(range(1, x.dim())) if dim is None else dim
        return getattr(x, method)(dim=dims, keepdim=keepdim)

    return call


#: each operation of unitrain.ops.OPS as the torch call it stands for (its kwargs are torch's)
FUNCTIONS: dict[str, Callable] = {
    "add": _binary(torch.add), "sub": _binary(torch.sub, lambda x, other: other - x), "mul": _binary(torch.mul),
    "div": _binary(torch.div, lambda x, other: other / x), "neg": torch.neg,
    "exp": torch.exp, "log": torch.log,
    "cat": lambda *args, dim: torch.cat(args, dim), "stack": lambda *args, dim: torch.stack(args, dim),
    "narrow": torch.narrow, "select": torch.select, "reshape": _reshape,
    "flatten": lambda x, start_dim=1, end_dim=-1: torch.flatten(x, start_dim, end_dim),
    "permute": lambda x, dims: x.permute(*dims), "transpose": torch.transpose,
    "sum": _reduce("sum"), "mean": _reduce("mean"), "matmul": torch.matmul,
    "getitem": lambda values, index: values[index],
    "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "elu": F.elu,
    "leaky_relu": F.leaky_relu, "softmax": F.softmax, "log_softmax": F.log_softmax,
}  # fmt: skip
assert set(FUNCTIONS) == set(ops.OPS), "every operation has its torch call"


class GraphModule(nn.Module):
    """The graph's modules as submodules, and a forward that runs its nodes."""

    def __init__(self, spec: Graph, modules: dict[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.input_names, self.output_names = spec.input_names, spec.outputs
        # a tied parameter is its source's Parameter, as ``decoder.weight = encoder.weight`` makes it;
        # the state_dict holds it once, under the source's name (named_parameters' too)
        self.tied = dict(spec.tied)
        for key, given in self.tied.items():
            tie(self, key, given)
        self.register_state_dict_post_hook(_drop_tied)
        self.register_load_state_dict_pre_hook(_fill_tied)
        # (name, callable, argument names, kwargs, the values let go of after it); a plain list, so
        # submodules are registered once
        self.steps = [
            (node.name, self.get_submodule(node.target) if node.op == "call_module" else FUNCTIONS[node.target],
             node.args, node.options, released)
            for node, released in zip(spec.nodes, released_after(spec), strict=True)
        ]  # fmt: skip

    def forward(self, *inputs: torch.Tensor):
        values = dict(zip(self.input_names, inputs, strict=True))
        for name, call, args, kwargs, released in self.steps:
            values[name] = call(*[values[arg] for arg in args], **kwargs)
            for done in released:  # read by no later node: autograd keeps what backward needs
                del values[done]
        outputs = tuple(values[name] for name in self.output_names)
        return outputs if len(outputs) > 1 else outputs[0]


def tie(root: nn.Module, key: str, given: str) -> None:
    """Make the parameter ``key`` of ``root`` its source's Parameter (a graph's ``tied``), or, for a
    transposed tie, no parameter but the source's transpose, taken at each call of its module
    (the tensor a tied autoencoder's ``F.linear(h, encoder.weight.t())`` computes with)."""
    source, transposed = tie_source(given)
    path, name = key.rsplit(".", 1)
    module, parameter = root.get_submodule(path), root.get_parameter(source)
    if not transposed:
        setattr(module, name, parameter)
        return
    delattr(module, name)
    module.register_forward_pre_hook(functools.partial(_transpose_of, name=name, source=parameter))


def _transpose_of(module: nn.Module, args, name: str, source: nn.Parameter) -> None:
    setattr(module, name, source.t())


def _drop_tied(module: GraphModule, state: dict, prefix: str, local_metadata) -> None:
    for key in module.tied:
        state.pop(prefix + key, None)  # a transposed tie is no parameter


def _fill_tied(module: GraphModule, state: dict, prefix: str, *_) -> None:
    for key, given in module.tied.items():
        if prefix + given in state:  # a missing source is reported by load_state_dict itself; a transposed
            state[prefix + key] = state[prefix + given]  # tie (given 'encoder.weight.T') is no parameter
