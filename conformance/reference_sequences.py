"""The independent reference for the sequence layers: embeddings and PyTorch's RNN, LSTM and GRU,
forward and backpropagation through time in float64, written from ``torch/nn/modules/rnn.py``'s
equations without importing anything from the NumPy backend. One cell step at a time, one sample
batch at a time; every backward is the step's textbook derivative, applied from the last step to
the first."""

from __future__ import annotations

import numpy as np

from unitrain import sequences

F64 = np.float64


def embedding(weight, ids):
    return weight[np.asarray(ids, np.int64)]


def embedding_backward(weight, ids, grad, padding_idx):
    """The gradient of the table: each position's output gradient added to its id's row, one by one;
    the padding row gets none."""
    grad_weight = np.zeros_like(weight)
    rows = grad.reshape(-1, weight.shape[1])
    for position, token in enumerate(np.asarray(ids, np.int64).reshape(-1)):
        if token != padding_idx:
            grad_weight[token] += rows[position]
    return grad_weight


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _kind(layer) -> str:
    if isinstance(layer, sequences.LSTM):
        return "lstm"
    return "gru" if isinstance(layer, sequences.GRU) else layer.nonlinearity


def _weights(layer, params, k, suffix):
    """``(W_ih, W_hh, b_ih, b_hh)`` of layer ``k``'s direction ``suffix``; zero biases without ``bias``."""
    w_ih, w_hh = params[f"weight_ih_l{k}{suffix}"], params[f"weight_hh_l{k}{suffix}"]
    zero = np.zeros(len(w_ih), F64)
    return w_ih, w_hh, params.get(f"bias_ih_l{k}{suffix}", zero), params.get(f"bias_hh_l{k}{suffix}", zero)


def cell(kind, weights, x, h, c):
    """One step: ``(h', c', saved)``; ``c`` is None but for LSTM."""
    w_ih, w_hh, b_ih, b_hh = weights
    from_input, from_state = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
    if kind == "lstm":
        i, f, g, o = np.split(from_input + from_state, 4, axis=1)
        i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
        c_next = f * c + i * g
        return o * np.tanh(c_next), c_next, (x, h, c, i, f, g, o, c_next)
    if kind == "gru":
        input_r, input_z, input_n = np.split(from_input, 3, axis=1)
        state_r, state_z, state_n = np.split(from_state, 3, axis=1)
        r, z = _sigmoid(input_r + state_r), _sigmoid(input_z + state_z)
        n = np.tanh(input_n + r * state_n)
        return (1 - z) * n + z * h, None, (x, h, r, z, n, state_n)
    pre = from_input + from_state
    return (np.tanh(pre) if kind == "tanh" else np.maximum(pre, 0)), None, (x, h, pre)


def cell_backward(kind, weights, saved, grad_h, grad_c):
    """Gradients of one step's ``x``, ``h``, ``c`` and of ``(W_ih, W_hh, b_ih, b_hh)``."""
    w_ih, w_hh = weights[:2]
    if kind == "lstm":
        x, h, c, i, f, g, o, c_next = saved
        tanh_c = np.tanh(c_next)
        grad_c_next = grad_c + grad_h * o * (1 - tanh_c**2)
        d_i, d_f, d_g, d_o = grad_c_next * g, grad_c_next * c, grad_c_next * i, grad_h * tanh_c
        pre = np.concatenate([d_i * i * (1 - i), d_f * f * (1 - f), d_g * (1 - g**2), d_o * o * (1 - o)], axis=1)
        pre_input = pre_state = pre
        grad_c, grad_h_direct = grad_c_next * f, 0.0
    elif kind == "gru":
        x, h, r, z, n, state_n = saved
        d_n, d_z, grad_h_direct = grad_h * (1 - z), grad_h * (h - n), grad_h * z
        pre_n = d_n * (1 - n**2)
        pre_r, pre_z = pre_n * state_n * r * (1 - r), d_z * z * (1 - z)
        pre_input = np.concatenate([pre_r, pre_z, pre_n], axis=1)
        pre_state = np.concatenate([pre_r, pre_z, pre_n * r], axis=1)
        grad_c = None
    else:
        x, h, pre = saved
        slope = 1 - np.tanh(pre) ** 2 if kind == "tanh" else (pre > 0).astype(F64)
        pre_input = pre_state = grad_h * slope
        grad_c, grad_h_direct = None, 0.0
    grads = (pre_input.T @ x, pre_state.T @ h, pre_input.sum(0), pre_state.sum(0))
    return pre_input @ w_ih, grad_h_direct + pre_state @ w_hh, grad_c, grads


def recurrent(layer, params, x, h0=None, c0=None, masks=None):
    """``(output, h_n, c_n, tape)`` of an RNN, LSTM or GRU spec on ``x`` in the spec's layout;
    ``masks``: the keep-masks (already scaled) between layers, in training. ``c_n`` None but for LSTM."""
    kind, directions = _kind(layer), layer.directions
    x = np.asarray(x, F64)
    if layer.batch_first:
        x = x.transpose(1, 0, 2)
    steps, batch = x.shape[:2]
    h0 = np.zeros(layer.state_shape(batch)) if h0 is None else np.asarray(h0, F64)
    c0 = np.zeros(layer.state_shape(batch)) if c0 is None and kind == "lstm" else c0
    h_n, c_n, tape = [], [], []
    for k in range(layer.num_layers):
        outputs, layer_tape = [], []
        for d, suffix in enumerate(("", "_reverse")[:directions]):
            weights = _weights(layer, params, k, suffix)
            h, c = h0[k * directions + d], None if c0 is None else c0[k * directions + d]
            out, saved = np.zeros((steps, batch, layer.hidden_size)), {}
            order = range(steps) if d == 0 else range(steps - 1, -1, -1)
            for t in order:
                h, c, saved[t] = cell(kind, weights, x[t], h, c)
                out[t] = h
            outputs.append(out)
            layer_tape.append((weights, saved, order))
            h_n.append(h)
            c_n.append(c)
        x = np.concatenate(outputs, axis=2)
        if masks is not None and k < layer.num_layers - 1:
            x = x * (masks[k].transpose(1, 0, 2) if layer.batch_first else masks[k])
        tape.append(layer_tape)
    output = x.transpose(1, 0, 2) if layer.batch_first else x
    return output, np.stack(h_n), None if c0 is None else np.stack(c_n), (tape, masks)


def recurrent_backward(layer, tape, grad_output, grad_h_n=None, grad_c_n=None):
    """Gradients of the input, of every parameter (by ``state_dict`` key) and of ``h_0`` (and ``c_0``)."""
    kind, directions, hidden = _kind(layer), layer.directions, layer.hidden_size
    tape, masks = tape
    grad = np.asarray(grad_output, F64)
    grad = grad.transpose(1, 0, 2) if layer.batch_first else grad
    shape = layer.state_shape(grad.shape[1])
    grad_h_n = np.zeros(shape) if grad_h_n is None else grad_h_n
    grad_c_n = np.zeros(shape) if grad_c_n is None and kind == "lstm" else grad_c_n
    grads, grad_h0, grad_c0 = {}, np.zeros(shape), np.zeros(shape)
    for k in range(layer.num_layers - 1, -1, -1):
        if masks is not None and k < layer.num_layers - 1:
            grad = grad * (masks[k].transpose(1, 0, 2) if layer.batch_first else masks[k])
        grad_x = 0.0
        for d, suffix in enumerate(("", "_reverse")[:directions]):
            weights, saved, order = tape[k][d]
            index = k * directions + d
            grad_h = grad_h_n[index]
            grad_c = None if grad_c_n is None else grad_c_n[index]
            totals = [np.zeros_like(w) for w in weights]
            grad_in = np.zeros((grad.shape[0], grad.shape[1], weights[0].shape[1]))
            for t in reversed(order):
                grad_in[t], grad_h, grad_c, step = cell_backward(
                    kind, weights, saved[t], grad[t, :, d * hidden : (d + 1) * hidden] + grad_h, grad_c
                )
                totals = [total + part for total, part in zip(totals, step, strict=True)]
            grad_h0[index] = grad_h
            if grad_c is not None:
                grad_c0[index] = grad_c
            for name, total in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), totals, strict=True):
                if name.startswith("weight") or layer.bias:
                    grads[f"{name}_l{k}{suffix}"] = total
            grad_x = grad_x + grad_in
        grad = grad_x
    grad = grad.transpose(1, 0, 2) if layer.batch_first else grad
    return grad, {key: grads[key] for key in layer.param_shapes()}, grad_h0, grad_c0 if kind == "lstm" else None
