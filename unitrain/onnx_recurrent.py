"""``RNN``, ``LSTM`` and ``GRU`` as ONNX's own ``RNN``, ``LSTM`` and ``GRU`` operators (opset 14's
definitions, unchanged through opset 20), for :mod:`unitrain.onnx_export`.

ONNX's operators are one layer each, taking every direction at once: a layer of ``num_layers`` is that
many nodes, layer ``k`` reading layer ``k - 1``'s output with its directions' features side by side
(PyTorch's order: forward first). Each node's weights are ``W`` ``(D, G * hidden, input)``, ``R``
``(D, G * hidden, hidden)`` and ``B`` ``(D, 2 * G * hidden)`` (``[b_ih, b_hh]`` per direction), with
the gate blocks in ONNX's order: LSTM ``i, o, f, c`` where PyTorch stacks ``i, f, g, o``; GRU ``z, r,
h`` where PyTorch stacks ``r, z, n``. GRU takes ``linear_before_reset=1``, ONNX's name for PyTorch's
equation ``n_t = tanh(W_in x + b_in + r_t * (W_hn h + b_hn))`` (the default, 0, applies the reset
gate before ``W_hn``). The sigmoid/tanh activations are ONNX's defaults; RNN names ``Tanh`` or
``Relu`` per direction.

onnxruntime's CPU kernels take the time-first layout only (``layout=1`` is refused: "Batchwise
recurrent operations (layout == 1) are not supported"), so a ``batch_first`` layer's input and
output are transposed around the nodes, and a graph's batch-first states (per-sample ``(D *
num_layers, hidden)``) are transposed to ONNX's ``(D, N, hidden)`` per layer. A call's lengths
become ``sequence_lens`` (int32) of every layer's node; its initial states ``initial_h`` /
``initial_c``; ``h_n`` / ``c_n``, where the graph reads them, the nodes' ``Y_h`` / ``Y_c``
outputs, layer by layer.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .sequences import GRU, LSTM, RNN, _Recurrent

#: ONNX's gate blocks, each the index of PyTorch's block it takes
GATE_ORDER = {LSTM: (0, 3, 1, 2), GRU: (1, 0, 2), RNN: (0,)}


def _reordered(layer: _Recurrent, array: np.ndarray) -> np.ndarray:
    """A weight's or bias's gate blocks (rows) from PyTorch's order into ONNX's."""
    blocks = np.split(np.asarray(array), layer.gates)
    return np.concatenate([blocks[index] for index in GATE_ORDER[type(layer)]])


def _weights(graph, layer: _Recurrent, path: str, k: int) -> list[str]:
    """Layer ``k``'s ``W``, ``R`` and ``B`` (``""`` without bias) initializers, every direction stacked."""
    suffixes = ("", "_reverse")[: layer.directions]

    def stacked(kind: str, keys) -> str:
        arrays = [np.concatenate([_reordered(layer, graph.state[f"{path}.{key}_l{k}{suffix}"]) for key in keys])
                  for suffix in suffixes]  # fmt: skip
        return graph.tensor(f"{path}.{kind}_l{k}", np.stack(arrays))

    biases = stacked("B", ("bias_ih", "bias_hh")) if layer.bias else ""
    return [stacked("W", ("weight_ih",)), stacked("R", ("weight_hh",)), biases]


def _attributes(layer: _Recurrent) -> dict:
    attributes = {"hidden_size": layer.hidden_size, "direction": "bidirectional" if layer.bidirectional else "forward"}
    if isinstance(layer, GRU):
        attributes["linear_before_reset"] = 1
    if isinstance(layer, RNN):
        attributes["activations"] = [layer.nonlinearity.capitalize()] * layer.directions
    return attributes


def recurrent(graph, layer: _Recurrent, x: str, path: str, reads=(0,), lengths: str | None = None,
              h_0: str | None = None, c_0: str | None = None) -> list[str | None]:  # fmt: skip
    """``layer`` on ``x`` as ONNX nodes: ``[output, h_n, c_n]`` (LSTM; ``[output, h_n]`` otherwise),
    each None unless its index is in ``reads``; the states batch-first as a graph holds them."""
    directions, count = layer.directions, layer.num_layers
    lengths = graph.op("Cast", [lengths], path, to=TensorProto.INT32) if lengths else ""
    initial = [graph.op("Transpose", [state], path, perm=[1, 0, 2]) if state else "" for state in (h_0, c_0)]
    sequence = graph.op("Transpose", [x], path, perm=[1, 0, 2]) if layer.batch_first else x  # (T, N, features)
    finals = {1: [], 2: []}
    for k in range(count):
        last = k == count - 1
        slices = count > 1 and any(initial)  # layer k's rows of the states
        bounds = [graph.ints(path, [k * directions]), graph.ints(path, [(k + 1) * directions])] if slices else []
        states = [graph.op("Slice", [state, *bounds], path) if state and bounds else state for state in initial]
        inputs = [sequence, *_weights(graph, layer, path, k), lengths, *states[: 1 + isinstance(layer, LSTM)]]
        while not inputs[-1]:  # ONNX omits trailing optional inputs
            inputs.pop()
        wanted = [not last or 0 in reads, 1 in reads, 2 in reads][: 2 + isinstance(layer, LSTM)]
        outputs = graph.node(type(layer).__name__, inputs, path, wanted, **_attributes(layer))
        for index in finals:
            if index < len(outputs) and outputs[index]:
                finals[index].append(outputs[index])
        if outputs[0]:  # Y (T, D, N, hidden) -> (T, N, D * hidden), the directions side by side
            sequence = graph.op("Reshape", [graph.op("Transpose", [outputs[0]], path, perm=[0, 2, 1, 3]),
                                            graph.ints(path, [0, 0, -1])], path)  # fmt: skip
    results: list[str | None] = [None] * (2 + isinstance(layer, LSTM))
    if 0 in reads:
        results[0] = graph.op("Transpose", [sequence], path, perm=[1, 0, 2]) if layer.batch_first else sequence
    for index, states in finals.items():
        if states:  # every layer's (D, N, hidden), layer by layer -> (N, D * num_layers, hidden)
            stacked = states[0] if count == 1 else graph.op("Concat", states, path, axis=0)
            results[index] = graph.op("Transpose", [stacked], path, perm=[1, 0, 2])
    return results
