"""``from_torch``'s weights read outside their layers: a tied autoencoder's decoder.

PyTorch writes a decoder tied to its encoder's transpose without a layer of its own,
``F.linear(h, self.encoder.weight.t())``: fx records the weight as a ``get_attr`` node, its
transpose as ``t`` (or ``.T``, ``transpose(0, 1)``), and ``F.linear`` as a function. Such a call
becomes a ``Linear`` without bias, a functional module of the graph named after the node, whose
weight is tied to the encoder's (``{"linear.weight": "encoder.weight.T"}``): no ``state_dict`` key
of its own, as in PyTorch. Any other use of a weight outside its layer (a bias from elsewhere,
arithmetic on it, a parameter that belongs to no ``nn.Linear``) is refused in one line.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unitrain import layers
from unitrain.graph import TRANSPOSED


@dataclass(frozen=True)
class Weight:
    """An ``nn.Linear``'s weight read outside its layer (``path``: its ``state_dict`` key), maybe transposed."""

    path: str
    shape: tuple[int, int]
    transposed: bool = False


def weight_of(node, value, root: nn.Module) -> Weight:
    """A ``get_attr`` node's value, if it is a Linear's weight; ``ValueError`` otherwise."""
    owner = root.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else root
    if isinstance(owner, nn.Linear) and node.target.endswith(".weight") and value is owner.weight:
        return Weight(node.target, tuple(value.shape))
    raise ValueError(f"reads the module's attribute {node.target!r} directly; unitrain graphs hold weights only "
                     "in layers (nn.Linear, nn.Conv2d, ...), and a Linear's weight outside it only as "
                     "F.linear(x, encoder.weight) or F.linear(x, encoder.weight.t())")  # fmt: skip


def _transposed(node, args) -> bool:
    """Whether ``node`` transposes a matrix: ``w.t()``, ``w.T``, ``torch.t(w)``, ``w.transpose(0, 1)``."""
    if (node.op == "call_method" and node.target == "t") or (node.op == "call_function" and node.target is torch.t):
        return len(args) == 1
    if node.op == "call_function" and node.target is builtins.getattr:
        return args[1:] == ("T",)
    if node.target in ("transpose", torch.transpose):
        return sorted(args[1:]) == [0, 1]
    return False


def call(node, args, kwargs, importer):
    """What ``node`` makes of a :class:`Weight` among its arguments (None: it has none)."""
    weights = [arg for arg in (*args, *kwargs.values()) if isinstance(arg, Weight)]
    if not weights:
        return None
    weight = weights[0]
    if args[:1] == (weight,) and _transposed(node, args) and not kwargs:
        return Weight(weight.path, weight.shape[::-1], not weight.transposed)
    bound = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    if node.op == "call_function" and node.target is F.linear and bound.get("weight") is weight:
        if bound.get("bias") is not None:
            raise ValueError(f"F.linear with {weight.path} and a bias: a bias outside a layer has no state_dict "
                             "key in a unitrain graph; use F.linear without bias, or an nn.Linear")  # fmt: skip
        out_features, in_features = weight.shape
        spec = layers.Linear(in_features, out_features, bias=False)
        out = importer.functional_layer(node, spec, bound["input"])
        name = next(reversed(importer.functional))  # the name functional_layer gave it
        importer.tied[f"{name}.weight"] = weight.path + (TRANSPOSED if weight.transposed else "")
        return out
    raise ValueError(f"uses the weight {weight.path} outside its layer other than as F.linear's weight "
                     "(F.linear(x, encoder.weight.t())); keep it in its layer")  # fmt: skip
