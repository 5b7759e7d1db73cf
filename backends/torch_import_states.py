"""``from_torch`` / ``to_torch``: a recurrent layer's initial and final states, ``out, (h, c) =
self.lstm(x, (h0, c0))``, as a graph's recurrent call with ``initial_states`` / ``final_states``
and its ``getitem`` nodes (see docs/sequences.md), and back."""

from __future__ import annotations

import operator

from torch import fx

from unitrain import ops, padded, sequences
from unitrain.graph import Graph

from .torch_import_attention import ConstantTensor


def recurrent_call(spec, node, x, states, live) -> tuple:
    """A recurrent module's call ``lstm(x)``, ``lstm(x, (h0, c0))``, ``gru(x, h0)`` on the graph's tensors:
    ``(result, unpacked)``, its result and whether its items are the unpacked call's (whose ``getitem``
    nodes read them). Initial states must be another recurrent layer's final states (or their slices): a
    forward argument holds its batch on axis 1, which a unitrain graph input cannot. The states are taken
    out only when the module reads them, so that ``out, _ = self.lstm(x)`` stays the plain call."""
    states = _zeros_as_default(states)
    for state in states if isinstance(states, tuple) else (states,):
        if state is not None and not isinstance(state, ops.StateTensor):
            raise ValueError("an initial state that is not another recurrent layer's final state (h_n, c_n or a "
                             "slice of them) or zeros is not supported: a graph input holds its batch "
                             "first")  # fmt: skip
    result = spec(x) if states is None else spec(x, states)
    reads_states = any(user in live and user.target is operator.getitem and user.args[1] != 0 for user in node.users)
    return result, reads_states or states is not None


def _zeros_as_default(states):
    """``states`` with initial states that ``forward`` builds as zeros (the tutorials' ``h0 =
    torch.zeros(num_layers * D, x.size(0), hidden_size)``, ``x.new_zeros(...)``, an ``init_hidden()``
    attribute) as None: zeros are the layer's own default. Checked on the example's values; anything
    else built in forward is refused."""
    parts = states if isinstance(states, tuple) else (states,)
    built = [state for state in parts if isinstance(state, ConstantTensor)]
    if not built:
        return states
    if any(state.value.any() for state in built):  # torch checked their shapes on the example
        raise ValueError("an initial state built in forward must be zeros (the layer's default), got values other "
                         "than zeros")  # fmt: skip
    if len(built) != len(parts):
        raise ValueError("initial states (h0, c0) with one built as zeros in forward and the other not; give both "
                         "as zeros or both as another layer's final states")  # fmt: skip
    return None


def fx_states_call(code: fx.Graph, graph: Graph, node, args) -> tuple:
    """A recurrent call with initial or final states as torch writes it, ``lstm(x, (h0, c0))``, the
    states moved between the graph's batch-first layout and torch's: ``(output, h_n[, c_n])`` as fx
    nodes (a graph's ``getitem`` picks one)."""
    spec = graph.get_submodule(node.target)
    roles = padded.argument_roles(spec, len(args), node.options)
    if "lengths" in roles:
        raise ValueError(f"to_torch: node {node.name!r} gives {node.target} lengths and states; torch writes it "
                         "with pack_padded_sequence, which to_torch does not emit")  # fmt: skip
    states = [code.call_method("contiguous", (code.call_method("transpose", (arg, 0, 1)),)) for arg in args[1:]]
    hx = (tuple(states) if len(states) == 2 else states[0]) if states else None
    result = code.call_module(node.target, (args[0], hx))
    final = code.call_function(operator.getitem, (result, 1))
    lstm = isinstance(spec, sequences.LSTM)
    finals = [code.call_function(operator.getitem, (final, i)) for i in range(2)] if lstm else [final]
    output = code.call_function(operator.getitem, (result, 0))
    return (output, *(code.call_method("transpose", (state, 0, 1)) for state in finals))
