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

A recurrent call in a graph may also take initial states and give its final ones
(``out, (h, c) = lstm(x, (h0, c0), lengths=lengths)``): :func:`argument_roles` says which of a
call node's inputs are the lengths and which the states, :func:`call_shape` checks them and gives
the node's value, a tuple ``(output, h_n[, c_n])`` with ``final_states`` (see docs/sequences.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import Layer
from .sequences import LSTM, Embedding, _Recurrent


def lengths_problem(layer: Layer, input_shape: tuple, lengths_shape: tuple) -> str | None:
    """Why ``layer`` cannot take lengths of per-sample shape ``lengths_shape`` beside its input, or None."""
    if not isinstance(layer, _Recurrent):
        return f"{layer} takes one tensor input; only RNN, LSTM and GRU take a second one, the lengths"
    if not layer.batch_first:
        return f"{layer}: sequence lengths need batch_first=True (the loop's samples must be the sequences)"
    if lengths_shape == layer.state_shape(1)[::2]:  # (D * num_layers, hidden_size): an h_0 per sample
        return (f"{layer}: a second input of per-sample shape {lengths_shape} is an initial state, not the "
                "lengths (per-sample shape ()); mark the node initial_states=True (lstm(x, (h0, c0)) in the "
                "functional API)")  # fmt: skip
    if lengths_shape != ():
        return f"{layer}: lengths must have per-sample shape () (one length per sequence), got {lengths_shape}"
    return None


#: the keyword arguments of a recurrent layer's call node: its last inputs are the initial states
#: (``h_0``, and ``c_0`` for LSTM); its value is the tuple ``(output, h_n[, c_n])``, read by ``getitem``
CALL_OPTIONS = ("initial_states", "final_states")


def argument_roles(layer: Layer, count: int, options: dict) -> tuple[str, ...]:
    """What each of the ``count`` inputs of a call of ``layer`` with node ``options`` is: ``"input"``,
    ``"lengths"``, ``"h_0"``, ``"c_0"``; ``ValueError`` for options or a count that do not fit."""
    if not isinstance(layer, _Recurrent) and count == 2:
        raise ValueError(lengths_problem(layer, (), ()))
    unknown = sorted(set(options) - set(CALL_OPTIONS if isinstance(layer, _Recurrent) else ()))
    if unknown:
        expected = f"among {list(CALL_OPTIONS)}" if isinstance(layer, _Recurrent) else "none"
        raise ValueError(f"{layer} takes no argument {unknown[0]!r}; expected {expected}")
    for key, value in options.items():
        if not isinstance(value, bool):
            raise ValueError(f"{layer}: {key} must be True or False, got {value!r}")
    states = ("h_0", "c_0")[: 1 + isinstance(layer, LSTM)] if options.get("initial_states") else ()
    lengths = count - 1 - len(states)
    if lengths not in (0, 1) or (lengths and not isinstance(layer, _Recurrent)):
        wanted = "the input" + ", the lengths" * isinstance(layer, _Recurrent) + "".join(f", {s}" for s in states)
        raise ValueError(f"{layer} takes {wanted}; got {count} tensor inputs")
    return ("input", *("lengths",) * lengths, *states)


def call_shape(layer: _Recurrent, output: tuple, shapes: list, options: dict):
    """The value's per-sample shape of a recurrent call whose inputs have per-sample ``shapes`` and whose
    ``output`` has been traced: ``output``, or with ``final_states`` the tuple ``(output, h_n[, c_n])``;
    ``ValueError`` for an initial state of the wrong shape. States are batch-major in a graph, per-sample
    ``(num_layers * num_directions, hidden_size)``."""
    roles = argument_roles(layer, len(shapes), options)
    if (options.get("initial_states") or options.get("final_states")) and not layer.batch_first:
        raise ValueError(f"{layer}: initial and final states in a graph need batch_first=True "
                         "(the loop's samples must be the sequences)")  # fmt: skip
    state = layer.state_shape(1)[::2]
    for role, shape in zip(roles, shapes, strict=True):
        if role == "lengths" and (problem := lengths_problem(layer, shapes[0], shape)):
            raise ValueError(problem)
        if role in ("h_0", "c_0") and tuple(shape) != state:
            raise ValueError(f"{layer}: {role} has per-sample shape {tuple(shape)}, expected (num_layers * "
                             f"num_directions, hidden_size) = {state} (a graph's states are batch-first)")  # fmt: skip
    if not options.get("final_states"):
        return output
    return (output, *(state,) * (1 + isinstance(layer, LSTM)))


def is_group(shape) -> bool:
    """Whether a node's shape is a tuple of shapes (a recurrent call with ``final_states``)."""
    return bool(shape) and isinstance(shape[0], tuple)


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
        if isinstance(module, _Recurrent) and len(node.args) > 1:
            for arg, role in zip(node.args, argument_roles(module, len(node.args), node.options), strict=True):
                if role == "lengths" and arg in inputs:
                    steps = graph.shapes[node.args[0]][0]
                    roles.setdefault(arg, Role("lengths", node.target, module, steps, node.args[0]))
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
