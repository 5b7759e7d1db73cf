"""Padded batches of sequences of different lengths through the recurrent layers, with PyTorch's
``pack_padded_sequence`` semantics: a graph gives a batch-first ``RNN`` / ``LSTM`` / ``GRU`` a
second input, each sequence's length, ``lstm(x, lengths)``; sequence ``i`` is read for its
first ``lengths[i]`` steps only, its states stop there (``h_n``, ``c_n`` are those after its last
step, the reverse direction starts from its last real step), and ``output`` is zero past its end.

The lengths are a graph input of per-sample shape ``()`` (``Input((), name="lengths")``), so they
travel with their sequences through batching and shuffling. This module says which graph inputs
are token ids (they feed an ``Embedding``) and which are lengths, and checks both before any
framework sees a batch: integer ids within the table, integer lengths in ``1..T`` (``T`` the
padded axis of the layer they feed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import Layer
from .sequences import Embedding, _Recurrent


def lengths_problem(layer: Layer, input_shape: tuple, lengths_shape: tuple) -> str | None:
    """Why ``layer`` cannot take lengths of per-sample shape ``lengths_shape`` beside its input, or None."""
    if not isinstance(layer, _Recurrent):
        return f"{layer} takes one tensor input; only RNN, LSTM and GRU take a second one, the lengths"
    if not layer.batch_first:
        return f"{layer}: sequence lengths need batch_first=True (the loop's samples must be the sequences)"
    if lengths_shape == layer.state_shape(1)[::2]:  # (D * num_layers, hidden_size): an h_0 per sample
        return (f"{layer}: initial states are not graph inputs (in a graph the layer starts from zeros); "
                f"its second input is the lengths, per-sample shape ()")  # fmt: skip
    if lengths_shape != ():
        return f"{layer}: lengths must have per-sample shape () (one length per sequence), got {lengths_shape}"
    return None


@dataclass(frozen=True)
class Role:
    """What a graph input is: ``"ids"`` (feeds ``layer``, an Embedding, at ``path``), ``"lengths"``
    (of the padded axis of ``steps`` steps as declared, fed to the recurrent ``layer`` at ``path``
    with the sequences of node or input ``source``) or ``"additive mask"`` (a mask added to the
    scores of the MultiheadAttention ``layer`` at ``path``: ``-inf`` allowed)."""

    kind: str
    path: str
    layer: Layer
    steps: int = 0
    source: str = ""


def input_roles(graph) -> dict[str, Role]:
    """The graph inputs that are token ids or lengths, by name (the others are not listed), each with
    the first layer it feeds."""
    from .attention import MultiheadAttention
    from .graph import Graph, get_submodule

    roles = {}
    inputs = set(graph.input_names)
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = get_submodule(graph, node.target)
        first = module if not hasattr(module, "named_layers") or isinstance(module, Graph) else next(
            module.named_layers(), (None, None))[1]  # fmt: skip
        if node.args[0] in inputs and isinstance(first, Embedding):
            roles.setdefault(node.args[0], Role("ids", node.target, first))
        if isinstance(module, MultiheadAttention) and module.additive_masks:
            for arg in node.args[3:]:
                if arg in inputs:
                    roles.setdefault(arg, Role("additive mask", node.target, module))
        if isinstance(module, Graph):  # an encoder's padding mask reaches its attention
            inner = input_roles(module)
            for arg, name in zip(node.args, module.input_names, strict=False):
                if arg in inputs and name in inner and inner[name].kind == "additive mask":
                    roles.setdefault(arg, Role("additive mask", f"{node.target}.{inner[name].path}", inner[name].layer))
        if len(node.args) == 2 and node.args[1] in inputs and isinstance(module, _Recurrent):
            steps = graph.shapes[node.args[0]][0]
            roles.setdefault(node.args[1], Role("lengths", node.target, module, steps, node.args[0]))
    return roles


def check_input(role: Role, name: str, value: np.ndarray, steps: int | None = None) -> str | None:
    """What is wrong with the batch ``value`` of the graph input ``name`` in its ``role``, or None
    (``steps``: the batch's padded axis, when it is not the declared one)."""
    if role.kind == "ids":
        problem = role.layer.ids_problem(value)
        return None if problem is None else f"input {name!r}: {role.path}: {problem}"
    if role.kind == "additive mask":
        if np.isnan(value).any() or (value == np.inf).any():
            return f"input {name!r}: {role.path}: an additive attention mask holds NaN or +inf; expected -inf or finite"
        return None
    if value.dtype.kind not in "iu":
        return f"input {name!r}: sequence lengths must be integers, got {value.dtype}"
    steps = role.steps if steps is None else steps
    bad = value[(value < 1) | (value > steps)]
    if bad.size:
        return (f"input {name!r}: sequence length {int(bad.flat[0])} is outside 1..{steps} "
                f"(the padded axis of {role.path})")  # fmt: skip
    return None
