"""The NumPy backend's layer base and its sequence layers: Embedding and the recurrent layers (RNN,
LSTM, GRU) with backpropagation through time written by hand. :mod:`unitrain.backends.numpy`
imports the base from here (its sequence layers need it too) and runs the nodes like its others.

Recurrent layers compute time-major, ``(T, N, features)``: the input projections of all steps are
one matrix product, the recurrence a loop over the steps with one ``(N, H) @ (H, G*H)`` product
each; backward walks the steps in reverse and gathers every weight gradient in one product over
all steps. The reverse direction is the forward one run on the time-reversed sequence.
"""

from __future__ import annotations

import copy

import numpy as np

from unitrain.randomness import dropout_mask
from unitrain.sequences import GRU, LSTM


class _Layer:
    """Parameters, gradients and buffers as arrays named like PyTorch's, allocated from the spec.
    Subclasses define ``forward(x, training, record)`` and ``backward(grad, need_input_grad)``."""

    #: backward reads this layer's output array, so nothing may overwrite it in place
    keeps_output = False
    #: forward may return its input (or a view of it) unchanged
    passes_input = False

    def __init__(self, spec, dtype, rng):
        self.spec = spec
        self.params = {key: np.zeros(shape, dtype) for key, shape in spec.param_shapes().items()}
        self.grads = {key: np.zeros(shape, dtype) for key, shape in spec.param_shapes().items()}
        self.buffers = {
            key: np.zeros(shape, np.int64 if key == "num_batches_tracked" else dtype)
            for key, shape in spec.buffer_shapes().items()
        }

    @property
    def has_params(self):
        """Whether backward computes a parameter gradient here (frozen ones may have none)."""
        return bool(self.grads)

    def freeze(self, key):
        """Compute no gradient for the parameter ``key`` (frozen) if this layer's backward can leave
        it out; returns whether it does (then ``grads`` has no ``key``)."""
        return False


class _Freezable(_Layer):
    """A layer whose backward adds to each of its ``grads`` only if it is there: a frozen parameter's
    gradient is never computed (and a layer with all its parameters frozen is not backpropagated
    through when nothing before it trains)."""

    def freeze(self, key):
        del self.grads[key]
        return True


def _sigmoid(x):
    """Stable and accurate for either sign: exp of a non-positive number only."""
    small = np.exp(-np.abs(x))
    return np.where(x >= 0, 1, small) / (1 + small)


class _Embedding(_Freezable):
    """``weight[ids]``; backward adds each position's gradient to its id's row, except at
    ``padding_idx``. Token ids have no gradient."""

    def forward(self, x, training, record):
        if record:
            self.ids = x
        return self.params["weight"][x]

    def backward(self, grad, need_input_grad):
        if "weight" not in self.grads:
            return None
        ids, rows = self.ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if self.spec.padding_idx is not None:
            kept = ids != self.spec.padding_idx
            ids, rows = ids[kept], rows[kept]
        if len(ids):
            # each id's rows summed in their order, then added to its row once (np.add.at: 5x slower)
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            self.grads["weight"][ids[starts]] += np.add.reduceat(rows[order], starts)
        return None


class _Direction:
    """One layer's one direction: the recurrence over time-major input, and its backward (RNN and
    GRU; the LSTM's is :class:`_LSTMDirection`)."""

    def __init__(self, spec, params, grads, suffix):
        self.kind = "lstm" if isinstance(spec, LSTM) else "gru" if isinstance(spec, GRU) else spec.nonlinearity
        self.w_ih, self.w_hh = params[f"weight_ih{suffix}"], params[f"weight_hh{suffix}"]
        self.b_ih, self.b_hh = params.get(f"bias_ih{suffix}"), params.get(f"bias_hh{suffix}")
        self.grads, self.suffix = grads, suffix

    def _add_weight_gradients(self, grad_in, grad_hidden, previous):
        """Adds every step's weight and bias gradients at once, from the gates' gradients over all
        steps (``grad_hidden``: those the recurrent weights see, None: the same) and each step's
        previous hidden state, skipping frozen parameters (looked up here: freezing comes after the
        layer is built)."""
        grad_in = grad_in.reshape(-1, grad_in.shape[-1])
        grad_hidden = grad_in if grad_hidden is None else grad_hidden.reshape(grad_in.shape)
        weight_ih, weight_hh, bias_ih, bias_hh = (
            self.grads.get(f"{name}{self.suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )
        if weight_ih is not None:
            weight_ih += grad_in.T @ self.x.reshape(-1, self.x.shape[-1])
        if weight_hh is not None:
            weight_hh += grad_hidden.T @ previous.reshape(-1, previous.shape[-1])
        sum_in = grad_in.sum(0)
        if bias_ih is not None:
            bias_ih += sum_in
        if bias_hh is not None:
            bias_hh += sum_in if grad_hidden is grad_in else grad_hidden.sum(0)

    def forward(self, x, h, c, record, mask=None):
        """``x`` (T, N, I), states (N, H); returns every step's h (T, N, H), the last h and c. With
        ``mask`` (T, N, 1) of ones and zeros, a sequence's states stay where they were at its zeros
        and its outputs there are zero (its steps past its length)."""
        hidden = self.w_hh.shape[1]
        projected = x @ self.w_ih.T  # every step's input projection at once
        if self.b_ih is not None:
            projected += self.b_ih
        outputs = np.empty((len(x), *h.shape), h.dtype)
        steps = []  # what backward needs, per step
        for t, step_in in enumerate(projected):
            recurrent = h @ self.w_hh.T
            if self.b_hh is not None:
                recurrent += self.b_hh
            if self.kind == "gru":
                r = _sigmoid(step_in[:, :hidden] + recurrent[:, :hidden])
                z = _sigmoid(step_in[:, hidden : 2 * hidden] + recurrent[:, hidden : 2 * hidden])
                recurrent_n = recurrent[:, 2 * hidden :]
                n = np.tanh(step_in[:, 2 * hidden :] + r * recurrent_n)
                saved = (h, r, z, n, recurrent_n)
                h = (1 - z) * n + z * h
            else:
                pre = step_in + recurrent
                h_prev, h = h, np.tanh(pre) if self.kind == "tanh" else np.maximum(pre, 0)
                saved = (h_prev, h)
            if mask is not None:  # past a sequence's end: output zero, states kept
                kept = mask[t]
                outputs[t] = h * kept
                h = outputs[t] + (1 - kept) * saved[0]
                if record:
                    steps.append(saved)
                continue
            outputs[t] = h
            if record:
                steps.append(saved)
        if record:
            self.x, self.steps, self.mask = x, steps, mask
        return outputs, h, c

    def backward(self, grad_out, grad_h, grad_c):
        """``grad_out`` (T, N, H) and the final states' gradients; adds the weight gradients and
        returns those of ``x`` and of the initial states."""
        hidden = self.w_hh.shape[1]
        steps = len(grad_out)
        gates_in = np.empty((steps, grad_out.shape[1], self.w_ih.shape[0]), grad_out.dtype)
        gates_hidden = gates_in if self.kind != "gru" else np.empty_like(gates_in)
        previous = np.empty_like(grad_out)  # h_{t-1} of every step, for the recurrent weights' gradient
        for t in range(steps - 1, -1, -1):
            grad = grad_out[t] + grad_h
            saved = self.steps[t]
            if self.mask is not None:  # past a sequence's end its state's gradient passes through unchanged
                kept = self.mask[t]
                through_h, grad = (1 - kept) * grad_h, grad * kept
            if self.kind == "gru":
                h_prev, r, z, n, recurrent_n = saved
                grad_n = grad * (1 - z) * (1 - n * n)
                grad_r = grad_n * recurrent_n * r * (1 - r)
                grad_z = grad * (h_prev - n) * z * (1 - z)
                gates_in[t, :, :hidden], gates_in[t, :, hidden : 2 * hidden] = grad_r, grad_z
                gates_in[t, :, 2 * hidden :] = grad_n
                gates_hidden[t, :, : 2 * hidden] = gates_in[t, :, : 2 * hidden]
                gates_hidden[t, :, 2 * hidden :] = grad_n * r
                grad_h = grad * z + gates_hidden[t] @ self.w_hh
            else:
                h_prev, h = saved
                gates_in[t] = grad * (1 - h * h) if self.kind == "tanh" else grad * (h > 0)
                grad_h = gates_in[t] @ self.w_hh
            if self.mask is not None:
                grad_h = grad_h + through_h
            previous[t] = h_prev
        self._add_weight_gradients(gates_in, gates_hidden if self.kind == "gru" else None, previous)
        return gates_in @ self.w_ih, grad_h, grad_c


def _sigmoid_in_place(x):
    """``1 / (1 + exp(-x))`` over ``x``: as accurate for either sign as :func:`_sigmoid` (where
    ``exp(-x)`` overflows, the result rounds to 0 anyway), in four passes and no temporary. Call
    under ``np.errstate(over="ignore")``."""
    np.negative(x, out=x)
    np.exp(x, out=x)
    x += 1
    np.reciprocal(x, out=x)


class _LSTMDirection(_Direction):
    """The LSTM's recurrence in as few passes per step as it needs (the per-step arrays are small,
    so each NumPy call's overhead counts): the gates' activations overwrite the input projections
    of all steps (one product for all, kept for backward), the states go into preallocated
    ``(T + 1, N, H)`` arrays, and backward computes once over all steps every factor that does not
    depend on the incoming gradient, leaving per step four multiplications, two additions and the
    one product for the previous hidden state's gradient; the weight gradients are one product each."""

    def forward(self, x, h, c, record, mask=None):
        hidden, (steps, n) = self.w_hh.shape[1], x.shape[:2]
        x = x.reshape(-1, x.shape[-1])  # one product over all steps (a batch-first input is copied time-major)
        gates = (x @ self.w_ih.T).reshape(steps, n, -1)  # every step's input projection, then its gates (i, f, g, o)
        for bias in (self.b_ih, self.b_hh):
            if bias is not None:
                gates += bias
        hs, cs = np.empty((2, steps + 1, n, hidden), h.dtype)  # the states entering each step, and the last
        hs[0], cs[0] = h, c
        tanh_cs = np.empty((steps, n, hidden), h.dtype)
        outputs = hs[1:] if mask is None else np.empty_like(tanh_cs)
        # mask: past a sequence's end its output is zero and its states stay (computed in c_new, h_new)
        c_new, h_new = (cs[1:], hs[1:]) if mask is None else np.empty((2, steps, n, hidden), h.dtype)
        recurrent, tanh_g = np.empty((n, 4 * hidden), h.dtype), np.empty((n, hidden), h.dtype)
        w_hh = self.w_hh.T
        with np.errstate(over="ignore"):
            for t in range(steps):
                step = gates[t]
                step += np.matmul(hs[t], w_hh, out=recurrent)
                i, f, g, o = step.reshape(n, 4, hidden).transpose(1, 0, 2)
                np.tanh(g, out=tanh_g)
                _sigmoid_in_place(step)
                np.copyto(g, tanh_g)
                np.multiply(f, cs[t], out=c_new[t])
                c_new[t] += np.multiply(i, g, out=tanh_g)
                np.tanh(c_new[t], out=tanh_cs[t])
                np.multiply(o, tanh_cs[t], out=h_new[t])
                if mask is not None:
                    kept = mask[t]
                    np.multiply(h_new[t], kept, out=outputs[t])
                    hs[t + 1] = outputs[t] + (1 - kept) * hs[t]
                    cs[t + 1] = kept * c_new[t] + (1 - kept) * cs[t]
        if record:
            self.x, self.gates, self.hs, self.cs, self.tanh_cs, self.mask = x, gates, hs, cs, tanh_cs, mask
        return outputs, hs[-1], cs[-1]

    def backward(self, grad_out, grad_h, grad_c):
        hidden, (steps, n) = self.w_hh.shape[1], grad_out.shape[:2]
        i, f, g, o = (self.gates[..., k * hidden : (k + 1) * hidden] for k in range(4))
        tanh_c = self.tanh_cs
        through_tanh = np.multiply(tanh_c, tanh_c)  # d h / d c = o * (1 - tanh(c)^2)
        np.subtract(1, through_tanh, out=through_tanh)
        through_tanh *= o
        # the gates' derivatives, times the c (i, f, g) or h (o) gradient step by step: the gates' gradients
        grad_gates = np.subtract(1, self.gates)
        grad_gates *= self.gates  # the sigmoids' derivatives (i, f, o; g's place is overwritten)
        by_gate = grad_gates.reshape(steps, n, 4, hidden)
        by_gate[:, :, 0] *= g
        by_gate[:, :, 1] *= self.cs[:-1]
        np.multiply(g, g, out=by_gate[:, :, 2])
        np.subtract(1, by_gate[:, :, 2], out=by_gate[:, :, 2])
        by_gate[:, :, 2] *= i
        by_gate[:, :, 3] *= tanh_c
        grad, scratch = np.empty((2, n, hidden), grad_out.dtype)
        grad_c, grad_h = grad_c.copy(), grad_h.copy()
        for t in range(steps - 1, -1, -1):
            np.add(grad_out[t], grad_h, out=grad)
            if self.mask is not None:  # past a sequence's end its state's gradient passes through unchanged
                kept = self.mask[t]
                through_h, through_c = (1 - kept) * grad_h, (1 - kept) * grad_c
                grad *= kept
                grad_c *= kept
            grad_c += np.multiply(grad, through_tanh[t], out=scratch)
            by_gate[t, :, :3] *= grad_c[:, None, :]
            by_gate[t, :, 3] *= grad
            grad_c *= f[t]
            np.matmul(grad_gates[t], self.w_hh, out=grad_h)
            if self.mask is not None:
                grad_h += through_h
                grad_c += through_c
        self._add_weight_gradients(grad_gates, None, self.hs[:-1])
        return (grad_gates.reshape(steps * n, -1) @ self.w_ih).reshape(steps, n, -1), grad_h, grad_c


class _Recurrent(_Freezable):
    """RNN, LSTM and GRU: layers of one or two :class:`_Direction` s, dropout between layers in
    training (masks from the loop's stream, shaped like the layer's output as the loop sees it)."""

    keeps_output = True  # an LSTM's output is its kept hidden states

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        self.rng = rng
        suffixes = ("", "_reverse")[: spec.directions]
        direction = _LSTMDirection if isinstance(spec, LSTM) else _Direction
        self.layers = [
            [direction(spec, self.params, self.grads, f"_l{k}{suffix}") for suffix in suffixes]
            for k in range(spec.num_layers)
        ]

    def __copy__(self):
        """A replica for another call of the layer in a graph: the same weights and gradients, its own
        caches (which live in the directions)."""
        replica = object.__new__(type(self))
        replica.__dict__.update(self.__dict__)
        replica.layers = [[copy.copy(direction) for direction in directions] for directions in self.layers]
        return replica

    def forward(self, x, training, record):
        x, lengths = x if isinstance(x, tuple) else (x, None)  # a graph's lstm(x, lengths)
        return self.run(x, None, None, training, record, lengths)[0]

    def run(self, x, h0, c0, training, record, lengths=None):
        """``(output, h_n, c_n)`` (``c_n`` None but for LSTM) from input and initial states (None: zeros),
        in the spec's layouts; ``lengths`` (N,): each sequence's, of a batch-first padded input."""
        spec = self.spec
        if spec.batch_first:
            x = x.swapaxes(0, 1)
        real = reverse = None  # each sequence's real steps, and its reversal, with lengths
        if lengths is not None:
            real, reverse = _padding(lengths, len(x), x.dtype)
        if record:
            self.reverse = reverse
        shape = spec.state_shape(x.shape[1])
        h0 = np.zeros(shape, x.dtype) if h0 is None else h0
        c0 = np.zeros(shape, x.dtype) if c0 is None and isinstance(spec, LSTM) else c0
        h_n, c_n, masks = [], [], []
        for k, directions in enumerate(self.layers):
            outputs = []
            for d, direction in enumerate(directions):
                index = k * len(directions) + d
                sequence = x if d == 0 else _reversed(x, reverse)
                c_start = None if c0 is None else c0[index]
                out, h, c = direction.forward(sequence, h0[index], c_start, record, real)
                outputs.append(out if d == 0 else _reversed(out, reverse))
                h_n.append(h)
                c_n.append(c)
            x = outputs[0] if len(outputs) == 1 else np.concatenate(outputs, -1)
            mask = None
            if training and spec.dropout and k < spec.num_layers - 1:
                facing = x.swapaxes(0, 1) if spec.batch_first else x
                mask = dropout_mask(self.rng, facing.shape, spec.dropout, x.dtype)
                x = x * (mask.swapaxes(0, 1) if spec.batch_first else mask)
            masks.append(mask)
        if record:
            self.masks = masks
        output = x.swapaxes(0, 1) if spec.batch_first else x
        return output, np.stack(h_n), None if c0 is None else np.stack(c_n)

    def backward(self, grad, need_input_grad):
        grad_x = self.backward_states(grad, None, None)[0]
        return grad_x if need_input_grad else None

    def backward_states(self, grad_output, grad_h_n, grad_c_n):
        """Gradients of input, ``h_0`` and ``c_0`` (None but for LSTM) from those of the outputs
        (None: zeros); adds the weight gradients."""
        spec = self.spec
        grad = grad_output.swapaxes(0, 1) if spec.batch_first else grad_output
        shape = spec.state_shape(grad.shape[1])
        grad_h_n = np.zeros(shape, grad.dtype) if grad_h_n is None else grad_h_n
        lstm = isinstance(spec, LSTM)
        grad_c_n = np.zeros(shape, grad.dtype) if grad_c_n is None and lstm else grad_c_n
        grad_h0, grad_c0 = np.empty_like(grad_h_n), None if grad_c_n is None else np.empty_like(grad_c_n)
        hidden = spec.hidden_size
        for k in range(len(self.layers) - 1, -1, -1):
            directions = self.layers[k]
            if self.masks[k] is not None:
                grad = grad * (self.masks[k].swapaxes(0, 1) if spec.batch_first else self.masks[k])
            grad_x = 0
            for d, direction in enumerate(directions):
                index = k * len(directions) + d
                part = grad[..., d * hidden : (d + 1) * hidden]
                part = part if d == 0 else _reversed(part, self.reverse)
                grad_c = None if grad_c_n is None else grad_c_n[index]
                grad_in, grad_h0[index], c = direction.backward(part, grad_h_n[index], grad_c)
                if grad_c0 is not None:
                    grad_c0[index] = c
                grad_x = grad_x + (grad_in if d == 0 else _reversed(grad_in, self.reverse))
            grad = grad_x
        return (grad.swapaxes(0, 1) if spec.batch_first else grad), grad_h0, grad_c0


def _padding(lengths, steps, dtype):
    """The mask (T, N, 1) of each sequence's real steps, and the time index (T, N) that reverses each
    sequence within its length (padding stays in place), for :func:`_reversed`."""
    lengths = np.asarray(lengths).reshape(-1)
    time = np.arange(steps)[:, None]
    mask = (time < lengths).astype(dtype)[..., None]
    reverse = np.where(time < lengths, lengths - 1 - time, time)
    return mask, reverse


def _reversed(values, reverse):
    """``values`` (T, N, ...) read backwards in time: the whole axis, or each sequence within its
    length (``reverse`` from :func:`_padding`); either is its own inverse."""
    if reverse is None:
        return values[::-1]
    return values[reverse, np.arange(values.shape[1])]
