"""PyTorch backend: a :class:`unitrain.graph.Graph` as an ``nn.Module`` that runs its node list.

The graph's modules are registered under their names (``state_dict`` keys ``encoder.1.weight``,
PyTorch's; a module called at several nodes is one submodule, so autograd sums its gradients and
its weights appear once), and ``forward(*inputs)`` evaluates the nodes in order with the
``torch`` function each operation names (:data:`FUNCTIONS`), as a ``torch.fx.GraphModule`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unitrain import ops
from unitrain.graph import Graph


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
        for key, source in self.tied.items():
            path, name = key.rsplit(".", 1)
            setattr(self.get_submodule(path), name, self.get_parameter(source))
        self.register_state_dict_post_hook(_drop_tied)
        self.register_load_state_dict_pre_hook(_fill_tied)
        # (name, callable, argument names, kwargs); a plain list, so submodules are registered once
        self.steps = [
            (node.name, self.get_submodule(node.target) if node.op == "call_module" else FUNCTIONS[node.target],
             node.args, node.options)
            for node in spec.nodes
        ]  # fmt: skip

    def forward(self, *inputs: torch.Tensor):
        values = dict(zip(self.input_names, inputs, strict=True))
        for name, call, args, kwargs in self.steps:
            values[name] = call(*[values[arg] for arg in args], **kwargs)
        outputs = tuple(values[name] for name in self.output_names)
        return outputs if len(outputs) > 1 else outputs[0]


def _drop_tied(module: GraphModule, state: dict, prefix: str, local_metadata) -> None:
    for key in module.tied:
        del state[prefix + key]


def _fill_tied(module: GraphModule, state: dict, prefix: str, *_) -> None:
    for key, source in module.tied.items():
        if prefix + source in state:  # a missing source is reported by load_state_dict itself
            state[prefix + key] = state[prefix + source]
