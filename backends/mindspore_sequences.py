"""The MindSpore adapter's sequence layers (Embedding, RNN/LSTM/GRU, Conv1d, the 1-d pools) and the
marker of the cells that take the loop's dropout masks, which the recurrent layers are too;
:mod:`unitrain.backends.mindspore` builds them into its tree of Cells."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from unitrain import sequences


class _TakesMasks(nn.Cell):
    """A node called with the dropout masks, ``node(x, masks)``: the containers, Dropout and the
    recurrent layers. ``masks`` holds one mask per Dropout layer of the whole model and per gap
    between a recurrent layer's layers with ``dropout`` (empty in eval mode): the loop
    draws them from a stream it owns, so it can checkpoint the stream and ``backward`` can reuse
    ``forward``'s masks. (The stateful random kernels behind ``nn.Dropout`` allow neither.)"""


class _Embedding(nn.Cell):
    """``ops.gather`` from PyTorch's table (``ops.embedding`` is Ascend-only); the ``padding_idx``
    row enters through ``stop_gradient``, so it gets no gradient."""

    def __init__(self, spec: sequences.Embedding):
        super().__init__()
        self.weight = Parameter(ops.zeros(spec.param_shapes()["weight"], ms.float32), name="weight")
        self.trained = None
        if spec.padding_idx is not None:
            trained = np.ones((spec.num_embeddings, 1), np.float32)
            trained[spec.padding_idx] = 0
            self.trained = Tensor(trained)

    def construct(self, ids):
        table = self.weight
        if self.trained is not None:  # exact: one of the two terms is zero
            table = table * self.trained + ops.stop_gradient(table * (1 - self.trained))
        return ops.gather(table, ids, 0)


class _Conv1d(nn.Cell):
    """``ops.conv1d`` (MindSpore's Conv2D over (N, C, 1, L)) on PyTorch's ``(out, in/groups, k)`` weight."""

    def __init__(self, spec: sequences.Conv1d):
        super().__init__()
        self.spec = spec
        shapes = spec.param_shapes()
        self.weight = Parameter(ops.zeros(shapes["weight"], ms.float32), name="weight")
        self.bias = Parameter(ops.zeros(shapes["bias"], ms.float32), name="bias") if spec.bias else None

    def construct(self, x):
        spec = self.spec
        return ops.conv1d(x, self.weight, self.bias, spec.stride, "pad", spec.padding, spec.dilation, spec.groups)


class _Through2d(nn.Cell):
    """A 1-d pool as its 2-d twin's cell over (N, C, 1, L)."""

    def __init__(self, cell: nn.Cell):
        super().__init__()
        self.cell = cell

    def construct(self, x):
        return self.cell(x.expand_dims(2)).squeeze(2)


class _Recurrent(_TakesMasks):
    """RNN, LSTM and GRU as one native ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` per layer: their
    parameters already have PyTorch's layout, gate order (LSTM ``i, f, g, o``, GRU ``r, z, n`` with
    the reset gate on ``W_hn h + b_hn``) and names (``weight_ih_l0_reverse``), layer ``k``'s under
    ``l0``. One layer each, so that dropout between layers takes the loop's masks (the model's
    ``first_mask``-th on): ``nn.LSTM``'s own ``dropout`` draws from MindSpore's kernels."""

    def __init__(self, spec: sequences._Recurrent, first_mask: int):
        super().__init__()
        self.first_mask, self.dropout = first_mask, spec.dropout > 0
        arguments = {"has_bias": spec.bias, "batch_first": spec.batch_first, "bidirectional": spec.bidirectional}
        if isinstance(spec, sequences.RNN):
            arguments["nonlinearity"] = spec.nonlinearity
        native = {sequences.LSTM: nn.LSTM, sequences.GRU: nn.GRU, sequences.RNN: nn.RNN}[type(spec)]
        widths = [spec.input_size] + [spec.directions * spec.hidden_size] * (spec.num_layers - 1)
        saved = np.random.get_state()  # the native cells draw their (discarded) first weights from it
        try:
            self.layers = nn.CellList([native(width, spec.hidden_size, 1, **arguments) for width in widths])
        finally:
            np.random.set_state(saved)
        self.state = {}
        for k, layer in enumerate(self.layers):
            for d, suffix in enumerate(("", "_reverse")[: spec.directions]):
                self.state[f"weight_ih_l{k}{suffix}"] = layer.w_ih_list[d]
                self.state[f"weight_hh_l{k}{suffix}"] = layer.w_hh_list[d]
                if spec.bias:
                    self.state[f"bias_ih_l{k}{suffix}"] = layer.b_ih_list[d]
                    self.state[f"bias_hh_l{k}{suffix}"] = layer.b_hh_list[d]

    def construct(self, x, masks):
        lengths = None
        if isinstance(x, tuple):  # a graph's lstm(x, lengths): the native cells' seq_length
            x, lengths = x
            lengths = lengths.astype(ms.int32)
        for index, layer in enumerate(self.layers):
            if index > 0 and self.dropout and self.training:
                x = x * masks[self.first_mask + index - 1]
            x = layer(x)[0] if lengths is None else layer(x, None, lengths)[0]
        return x

    def run(self, x, h0, c0=None):
        """``(output, h_n, c_n)`` (``c_n`` None but for LSTM) from initial states in PyTorch's
        layout, ``(D * num_layers, N, hidden_size)``, in eval mode (for graphs that wire them)."""
        directions = len(self.layers[0].w_ih_list)
        h_n, c_n = [], []
        for index, layer in enumerate(self.layers):
            states = slice(index * directions, (index + 1) * directions)
            x, state = layer(x, h0[states] if c0 is None else (h0[states], c0[states]))
            h_n.append(state if c0 is None else state[0])
            if c0 is not None:
                c_n.append(state[1])
        return x, ops.cat(h_n), None if c0 is None else ops.cat(c_n)


class _StatesCall(_TakesMasks):
    """A graph's call of a recurrent cell (``cell``, of ``spec``) on ``count`` inputs: the input, the
    lengths if any, then the initial states with ``initial_states``; with ``final_states`` its value is
    ``(output, h_n[, c_n])``. A graph holds states batch-first, the native cells layer-major."""

    def __init__(self, cell: _Recurrent, spec: sequences._Recurrent, count: int, options: dict):
        super().__init__()
        self.cell, self.lstm, self.directions = cell, isinstance(spec, sequences.LSTM), spec.directions
        self.states = (2 if self.lstm else 1) if options.get("initial_states") else 0
        self.lengths, self.final = count - 1 > self.states, options.get("final_states", False)

    def construct(self, x, masks):
        inputs = x if isinstance(x, tuple) else (x,)
        x = inputs[0]
        lengths = inputs[1].astype(ms.int32) if self.lengths else None
        h0 = c0 = None
        if self.states > 0:
            h0 = ops.swapaxes(inputs[len(inputs) - self.states], 0, 1)
        if self.states > 1:
            c0 = ops.swapaxes(inputs[len(inputs) - 1], 0, 1)
        h_n, c_n = (), ()
        for index, layer in enumerate(self.cell.layers):
            if index > 0 and self.cell.dropout and self.training:
                x = x * masks[self.cell.first_mask + index - 1]
            hx = None
            if h0 is not None:
                start = index * self.directions
                hx = h0[start : start + self.directions]
                if c0 is not None:
                    hx = (hx, c0[start : start + self.directions])
            x, state = layer(x, hx, lengths)
            h_n = (*h_n, state[0] if self.lstm else state)
            if self.lstm:
                c_n = (*c_n, state[1])
        if not self.final:
            return x
        if self.lstm:
            return x, _batch_first(h_n), _batch_first(c_n)
        return x, _batch_first(h_n)


def _batch_first(states: tuple):
    """Each layer's ``(directions, N, hidden)`` states as one ``(N, layers * directions, hidden)``."""
    joined = states[0] if len(states) == 1 else ops.cat(states)  # (graph mode reports a cat of one)
    return ops.swapaxes(joined, 0, 1)
