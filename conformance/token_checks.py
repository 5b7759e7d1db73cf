"""The checks of padded sequences: per-position class losses (``CrossEntropyLoss`` and ``NLLLoss``
over ``(N, C, T)`` predictions against ``(N, T)`` class indices, as a language model's loss) with
``ignore_index``, against the float64 reference of :mod:`.reference`; and a recurrent layer given
each sequence's length (``lstm(x, lengths)``), against :mod:`.reference_sequences` run on each
sequence alone, unpadded.

The predictions come through one ``Linear`` with identity weights over the last axis, so that
the gradient with respect to them reaches its weight as ``sum over rows of grad^T pred``.
"""

from __future__ import annotations

import math

import numpy as np

from unitrain import layers, sequences
from unitrain import ops as graph_ops
from unitrain.graph import Graph, Input
from unitrain.losses import CrossEntropyLoss, MSELoss, NLLLoss

from . import reference, reference_sequences
from .checks import F64, check, compare, compare_states, inputs, loaded, state_of, tutorial_gradients

CLASSES, POSITIONS, ROWS = 3, 5, 8
#: every term of the 8 x 3 x 5 predictions may be summed into the loss
TERMS = ROWS * CLASSES * POSITIONS


def _per_position_loop(adapter, loss):
    model = layers.Sequential(layers.Linear(POSITIONS, POSITIONS))
    weights = {"0.weight": np.eye(POSITIONS, dtype=np.float32), "0.bias": np.zeros(POSITIONS, np.float32)}
    return loaded(adapter, model, weights, loss=loss)


def _case(ignore_index: int):
    """Predictions ``(8, 3, 5)``, targets ``(8, 5)`` with a third of them ``ignore_index`` and one
    row ignored entirely."""
    rng = np.random.default_rng(11)
    pred = (3 * rng.standard_normal((ROWS, CLASSES, POSITIONS))).astype(np.float32)
    target = rng.integers(0, CLASSES, (ROWS, POSITIONS))
    target[rng.uniform(size=target.shape) < 1 / 3] = ignore_index
    target[2] = ignore_index
    return pred, target


@check("losses", "sequences")
def check_per_position_losses(adapter):
    """CrossEntropyLoss (label-smoothed, mean) and NLLLoss (sum) over (N, C, T) with ignored targets
    (PyTorch's default ignore_index -100, and an ignore_index that is a class): the loss, the gradient
    and evaluate() (the mean over the targets that count) match the reference."""
    for spec in (CrossEntropyLoss(label_smoothing=0.2), NLLLoss(ignore_index=1, reduction="sum")):
        pred, target = _case(spec.ignore_index)
        what = f"{spec} over (N, C, T) with ignored targets"
        loop = _per_position_loop(adapter, spec)
        expected, grad = reference.loss(spec, pred, target)
        compare(f"{what}: loss", tutorial_gradients(loop, pred, target), expected, dtype=loop.dtype, size=TERMS)
        rows, grad_rows = np.asarray(pred, F64).reshape(-1, POSITIONS), grad.reshape(-1, POSITIONS)
        gradients = {"0.weight": grad_rows.T @ rows, "0.bias": grad_rows.sum(0)}
        compare_states(f"{what}: gradient", loop.gradients(), gradients, dtype=loop.dtype, size=TERMS)
        per_target = reference.loss_terms(spec, pred, target)[0].mean()
        compare(f"{what}: evaluate()['loss']", loop.evaluate((pred, target))["loss"], per_target, dtype=loop.dtype,
                size=TERMS)  # fmt: skip


def _padded_reference(lstm, params, x, lengths, target):
    """Output, MSE (sum) loss and parameter gradients of ``lstm`` on each sequence alone, its first
    ``lengths[i]`` steps: the output is zero past a sequence's end, as ``pad_packed_sequence`` gives it."""
    output = np.zeros((*x.shape[:2], lstm.directions * lstm.hidden_size))
    tapes = []
    for row, length in enumerate(lengths):
        out, _, _, tape = reference_sequences.recurrent(lstm, params, x[row : row + 1, :length])
        output[row, :length] = out[0]
        tapes.append(tape)
    loss, grad = reference.loss(MSELoss(reduction="sum"), output, target)
    gradients = {key: np.zeros_like(value) for key, value in params.items()}
    for row, (length, tape) in enumerate(zip(lengths, tapes, strict=True)):
        parts = reference_sequences.recurrent_backward(lstm, tape, grad[row : row + 1, :length])[1]
        for key, part in parts.items():
            gradients[key] += part
    return output, loss, gradients


@check("graph", "sequences")
def check_padded_sequences(adapter):
    """A bidirectional batch-first LSTM given each sequence's length (``lstm(x, lengths)``, PyTorch's
    ``pack_padded_sequence``): predictions, the training loss (MSE, sum) and gradients of a padded
    batch match the float64 reference run on each sequence alone, unpadded (zeros past each end)."""
    steps, width, rows = 5, 3, 4
    x_in, lengths_in = Input((steps, width), name="x"), Input((), name="lengths")
    lstm = sequences.LSTM(width, 4, batch_first=True, bidirectional=True)
    model = Graph([x_in, lengths_in], lstm(x_in, lengths_in), modules={"lstm": lstm})
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=MSELoss(reduction="sum"))
    x, lengths = inputs((steps, width), n=rows), np.array([5, 2, 4, 1])
    target = inputs((steps, 2 * lstm.hidden_size), seed=1, n=rows)
    params = {key.removeprefix("lstm."): np.asarray(value, F64) for key, value in state.items()}
    output, loss, gradients = _padded_reference(lstm, params, np.asarray(x, F64), lengths, target)
    # the longest sum: a weight gradient through time adds every step of every sequence's widest input
    size = rows * steps * (width + 2 * lstm.hidden_size)
    what = "LSTM(bidirectional, batch_first) with lengths [5, 2, 4, 1]"
    compare(f"{what}: predict()", loop.predict((x, lengths)), output, dtype=loop.dtype, size=size)
    compare(f"{what}: training loss", tutorial_gradients(loop, (x, lengths), target), loss, dtype=loop.dtype,
            size=size + math.prod(target.shape))  # fmt: skip
    compare_states(f"{what}: gradient", loop.gradients(), {f"lstm.{key}": value for key, value in gradients.items()},
                   dtype=loop.dtype, size=8 * size)  # fmt: skip


def _states_reference(lstm, params, x, lengths, h0, c0, target):
    """Prediction ``(output, h_n, c_n)`` flattened per sample, MSE (sum) loss, parameter gradients and
    the initial states' gradients of ``lstm`` on each sequence alone (its first ``lengths[i]`` steps)
    from its own initial states; states batch-first, ``(N, num_layers * directions, hidden)``."""
    rows, steps = x.shape[:2]
    output = np.zeros((rows, steps, lstm.directions * lstm.hidden_size))
    h_n, c_n, tapes = np.zeros_like(h0), np.zeros_like(c0), []
    for row, length in enumerate(lengths):
        out, h, c, tape = reference_sequences.recurrent(lstm, params, x[row : row + 1, :length], h0[row][:, None],
                                                        c0[row][:, None])  # fmt: skip
        output[row, :length], h_n[row], c_n[row] = out[0], h[:, 0], c[:, 0]
        tapes.append(tape)
    parts = (output, h_n, c_n)
    loss, grad = reference.loss(MSELoss(reduction="sum"), np.concatenate([p.reshape(rows, -1) for p in parts], 1),
                                target)  # fmt: skip
    bounds = np.cumsum([p[0].size for p in parts])[:-1]
    grad_output, grad_h, grad_c = (g.reshape(p.shape) for g, p in zip(np.split(grad, bounds, 1), parts, strict=True))
    gradients = {key: np.zeros_like(value) for key, value in params.items()}
    grad_h0, grad_c0 = np.zeros_like(h0), np.zeros_like(c0)
    for row, (length, tape) in enumerate(zip(lengths, tapes, strict=True)):
        _, weights, h, c = reference_sequences.recurrent_backward(
            lstm, tape, grad_output[row : row + 1, :length], grad_h[row][:, None], grad_c[row][:, None]
        )
        grad_h0[row], grad_c0[row] = h[:, 0], c[:, 0]
        for key, part in weights.items():
            gradients[key] += part
    return np.concatenate([p.reshape(rows, -1) for p in parts], 1), loss, gradients, grad_h0, grad_c0


@check("graph", "sequences")
def check_recurrent_states(adapter):
    """A bidirectional 2-layer batch-first LSTM started from initial states that a Linear makes from a
    graph input, given each sequence's length, its output and final states read on (``out, (h_n, c_n) =
    lstm(x, (h0, c0), lengths=lengths)``): predictions, the training loss (MSE, sum) and the gradients
    (the LSTM's, and through the initial states the Linear's) match the float64 reference run on each
    sequence alone from its own initial states."""
    steps, width, hidden, rows, code = 4, 3, 3, 4, 2
    lstm = sequences.LSTM(width, hidden, num_layers=2, batch_first=True, bidirectional=True)
    count = 2 * lstm.num_layers  # num_layers * num_directions
    start = layers.Linear(code, 2 * count * hidden)
    x_in, lengths_in, z_in = Input((steps, width), name="x"), Input((), name="lengths"), Input((code,), name="z")
    initial = start(z_in).reshape(-1, 2 * count, hidden)
    out, (h, c) = lstm(x_in, (initial[:, :count], initial[:, count:]), lengths=lengths_in)
    flat = [out.flatten(), h.transpose(0, 1).flatten(), c.transpose(0, 1).flatten()]
    model = Graph([x_in, lengths_in, z_in], graph_ops.cat(flat, dim=1), modules={"start": start, "lstm": lstm})
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=MSELoss(reduction="sum"))
    x, z, lengths = inputs((steps, width), n=rows), inputs((code,), seed=2, n=rows), np.array([4, 2, 3, 1])
    target = inputs((steps * 2 * hidden + 2 * count * hidden,), seed=1, n=rows)
    weight, bias = np.asarray(state["start.weight"], F64), np.asarray(state["start.bias"], F64)
    states = (np.asarray(z, F64) @ weight.T + bias).reshape(rows, 2 * count, hidden)
    params = {key.removeprefix("lstm."): np.asarray(value, F64) for key, value in state.items() if "lstm." in key}
    pred, loss, gradients, grad_h0, grad_c0 = _states_reference(
        lstm, params, np.asarray(x, F64), lengths, states[:, :count], states[:, count:], target
    )
    grad_states = np.concatenate([grad_h0, grad_c0], 1).reshape(rows, -1)
    gradients = {"start.weight": grad_states.T @ np.asarray(z, F64), "start.bias": grad_states.sum(0),
                 **{f"lstm.{key}": value for key, value in gradients.items()}}  # fmt: skip
    size = rows * steps * (width + 2 * hidden)  # as check_padded_sequences' (the widest input per step)
    what = "LSTM(bidirectional, 2 layers) from initial states with lengths [4, 2, 3, 1], final states read"
    compare(f"{what}: predict()", loop.predict((x, lengths, z)), pred, dtype=loop.dtype, size=size)
    compare(f"{what}: training loss", tutorial_gradients(loop, (x, lengths, z), target), loss, dtype=loop.dtype,
            size=size + math.prod(target.shape))  # fmt: skip
    compare_states(f"{what}: gradient", loop.gradients(), gradients, dtype=loop.dtype, size=8 * size)
