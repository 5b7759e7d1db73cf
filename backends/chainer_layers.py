"""The Chainer backend's layers: the links and functions a spec's leaves become, and the Chains that
mirror its containers (see :mod:`.chainer` for what is special about Chainer). Imported only by
:mod:`.chainer`, after it has set up the environment Chainer needs."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

# Chainer's import warns about its environment checks; .chainer set the environment up first.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import chainer
    import chainer.functions as F
    import chainer.links as L

from unitrain import layers, sequences
from unitrain.graph import Graph, released_after
from unitrain.randomness import dropout_mask
from unitrain.upsampling import interpolation_matrix

from . import chainer_graph

#: PyTorch's state names -> Chainer's attribute names
_LINK_NAMES = {"weight": "W", "bias": "b"}
_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "avg_mean", "running_var": "avg_var",
             "num_batches_tracked": "num_batches_tracked"}  # fmt: skip


class _BatchNorm(L.BatchNormalization):
    """Chainer's BatchNormalization plus PyTorch's ``num_batches_tracked``.

    Chainer's ``decay`` weighs the old running value (``decay = 1 - momentum``) and it feeds the
    running variance the unbiased batch variance (``m / (m - 1)`` adjustment), as PyTorch does;
    with ``running_var="biased"`` (Keras') a training forward puts the biased one in its place."""

    def __init__(self, spec: layers._BatchNorm, dtype: np.dtype):
        super().__init__(spec.num_features, decay=1 - spec.momentum, eps=spec.eps, dtype=dtype)
        self.num_batches_tracked = np.zeros((), np.int64)
        self.register_persistent("num_batches_tracked")
        self.biased = spec.running_var == "biased"

    def forward(self, x):
        if chainer.config.train:
            self.num_batches_tracked += 1
        if x.ndim > 2 and not x.array.flags.c_contiguous:
            # Chainer's Convolution2D returns a channels-last view (strides N, C=1, H, W), and NumPy
            # reduces such an array over (N, H, W) by adding its 64*14*14 elements one after another
            # in float32 (pairwise summation only runs along a contiguous innermost axis): batch mean
            # and variance came out 5e-5 to 8e-5 off, 1000x the 4e-8 to 2e-7 of a C-contiguous copy.
            x = _Contiguous().apply((x,))[0]
        if not (chainer.config.train and self.biased):
            return super().forward(x)
        kept = self.avg_var.copy()
        output = super().forward(x)
        biased = x.array.var(axis=(0, *range(2, x.ndim)))
        self.avg_var[...] = kept * self.decay + biased * (1 - self.decay)
        return output


class _Contiguous(chainer.FunctionNode):
    """A C-contiguous copy of its input, the gradient passed through: one node of the step's graph
    (reshaping through ``(N, -1)`` and back made the same copy with two, and two more in the backward)."""

    def forward(self, inputs):
        return (np.ascontiguousarray(inputs[0]),)

    def backward(self, indexes, grad_outputs):
        return grad_outputs


class _Dropout:
    """``F.dropout`` with masks drawn from the loop's own generator: Chainer draws them from
    NumPy's global RNG, which the loop should neither depend on nor disturb."""

    def __init__(self, p: float, rng: np.random.Generator):
        self.p, self.rng = p, rng

    def __call__(self, x):
        if not (chainer.config.train and self.p):  # in eval F.dropout is the identity
            return x
        return F.dropout(x, self.p, mask=dropout_mask(self.rng, x.shape, self.p, x.dtype))


def _flatten(x, spec: layers.Flatten):
    start, end = spec.flattened_dims(x.ndim)
    shape = (*x.shape[:start], -1, *x.shape[end + 1 :])
    if isinstance(x, np.ndarray):  # the batch itself, which needs no gradient: a view, as L.Linear reshapes it
        return chainer.Variable(x.reshape(shape), requires_grad=False)
    return F.reshape(x, shape)


def _identity(x):
    return x


def _gelu(x):
    """PyTorch's exact GELU, ``x * Φ(x)`` through the error function (Chainer has no GELU)."""
    return x * 0.5 * (1 + F.erf(x * math.sqrt(0.5)))


def _gelu_tanh(x):
    """PyTorch's ``GELU(approximate="tanh")``."""
    return 0.5 * x * (1 + F.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x * F.sigmoid(x)


def _max_pool(spec: layers.MaxPool2d):
    # cover_all=False: PyTorch's floor output size (Chainer's default pads to cover every input);
    # Chainer pads with -inf, as PyTorch does.
    return functools.partial(
        F.max_pooling_2d, ksize=spec.kernel_size, stride=spec.stride, pad=spec.padding, cover_all=False
    )


def _avg_pool(spec: layers.AvgPool2d):
    # F.average_pooling_2d averages zero padding in (count_include_pad=True, dividing by kh*kw);
    # pad_value=None of the N-d variant divides by the window's non-padding elements instead.
    if spec.count_include_pad:
        return functools.partial(F.average_pooling_2d, ksize=spec.kernel_size, stride=spec.stride, pad=spec.padding)
    return functools.partial(
        F.average_pooling_nd, ksize=spec.kernel_size, stride=spec.stride, pad=spec.padding, pad_value=None
    )


def _adaptive_avg_pool(x, output_size):
    """PyTorch's adaptive bins: output row ``i`` averages input rows ``floor(i*H/oh) .. ceil((i+1)*H/oh)``
    (columns alike); Chainer has no adaptive pooling."""
    (out_h, out_w), (n, c, h, w) = output_size, x.shape
    if (out_h, out_w) == (1, 1):
        return F.mean(x, axis=(2, 3), keepdims=True)
    rows = [(i * h // out_h, -(-(i + 1) * h // out_h)) for i in range(out_h)]
    cols = [(j * w // out_w, -(-(j + 1) * w // out_w)) for j in range(out_w)]
    bins = [F.mean(x[:, :, top:bottom, left:right], axis=(2, 3)) for top, bottom in rows for left, right in cols]
    return F.reshape(F.stack(bins, axis=2), (n, c, out_h, out_w))


def _adaptive_avg_pool_1d(x, output_size):
    return F.squeeze(_adaptive_avg_pool(F.expand_dims(x, 2), (1, output_size)), 2)


def _avg_pool_1d(spec: sequences.AvgPool1d):
    # pad_value=0 averages zero padding in (count_include_pad), None divides by the window's real elements
    pad_value = 0 if spec.count_include_pad else None
    return functools.partial(
        F.average_pooling_1d, ksize=spec.kernel_size, stride=spec.stride, pad=spec.padding, pad_value=pad_value
    )


class _ConvTranspose2d(L.Deconvolution2D):
    """``L.Deconvolution2D`` (same weight layout as PyTorch) with the output size PyTorch's
    ``output_padding`` picks, set per input size. Chainer accepts an output size only where a
    strided convolution of it gives the input back (``output_padding < stride``); otherwise the
    full unpadded deconvolution gets ``output_padding`` zero rows and columns, and the padding is
    cut off, which is PyTorch's definition."""

    def __init__(self, spec: layers.ConvTranspose2d, dtype: np.dtype):
        zero = chainer.initializers.Zero(dtype)  # init_weights is loaded right after
        super().__init__(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                         nobias=not spec.bias, initialW=zero, initial_bias=zero, dilate=spec.dilation,
                         groups=spec.groups)  # fmt: skip
        self.spec = spec

    def forward(self, x):
        spec = self.spec
        if not isinstance(x, chainer.Variable):
            # Chainer 7.8.1's backward computing the weight gradient alone passes Variables where
            # shapes belong (Deconvolution2DFunction.backward's _set_cover_all(x, W)); with an input
            # gradient wanted too, it sets cover_all from shapes first
            x = chainer.Variable(x)
        out_size = spec.output_shape(x.shape[1:])[1:]
        if all(extra < step for extra, step in zip(spec.output_padding, spec.stride, strict=True)):
            self.outsize = out_size
            return super().forward(x)
        full = F.deconvolution_2d(x, self.W, None, spec.stride, 0, dilate=spec.dilation, groups=spec.groups)
        (oh, ow), (ph, pw), (eh, ew) = out_size, spec.padding, spec.output_padding
        y = F.pad(full, ((0, 0), (0, 0), (0, eh), (0, ew)), "constant")[:, :, ph : ph + oh, pw : pw + ow]
        return y if self.b is None else F.bias(y, self.b)


def _upsample(x, spec: layers.Upsample):
    """Nearest doubling: ``F.unpooling_2d`` (PyTorch's ``i >> 1``). Otherwise PyTorch's index rules as
    each axis' interpolation matrix applied with ``F.linear``: Chainer's ``resize_images`` takes
    float32 only, uses ``size / out`` where PyTorch uses ``1 / scale_factor``, and its index code calls
    ``numpy.float``, which NumPy 1.24 removed."""
    (h, w), (oh, ow) = x.shape[2:], spec.output_shape(x.shape[1:])[1:]
    if spec.mode == "nearest" and (oh, ow) == (2 * h, 2 * w):
        return F.unpooling_2d(x, 2, cover_all=False)
    rows = interpolation_matrix(spec, 0, h, oh, x.dtype)
    cols = interpolation_matrix(spec, 1, w, ow, x.dtype)
    y = F.linear(x, cols, n_batch_axes=3)  # (N, C, H, OW)
    return F.swapaxes(F.linear(F.swapaxes(y, 2, 3), rows, n_batch_axes=3), 2, 3)


#: Leaves without state: the native function each spec becomes.
_FUNCTIONS = {
    layers.Identity: lambda spec: _identity,
    layers.ReLU: lambda spec: F.relu,
    layers.Tanh: lambda spec: F.tanh,
    layers.Sigmoid: lambda spec: F.sigmoid,
    layers.GELU: lambda spec: _gelu_tanh if spec.approximate == "tanh" else _gelu,
    layers.LeakyReLU: lambda spec: functools.partial(F.leaky_relu, slope=spec.negative_slope),
    layers.SiLU: lambda spec: _silu,
    layers.ELU: lambda spec: functools.partial(F.elu, alpha=spec.alpha),
    layers.Softmax: lambda spec: functools.partial(F.softmax, axis=spec.dim),
    layers.LogSoftmax: lambda spec: functools.partial(F.log_softmax, axis=spec.dim),
    layers.Flatten: lambda spec: functools.partial(_flatten, spec=spec),
    layers.Upsample: lambda spec: functools.partial(_upsample, spec=spec),
    layers.MaxPool2d: _max_pool,
    layers.AvgPool2d: _avg_pool,
    layers.AdaptiveAvgPool2d: lambda spec: functools.partial(_adaptive_avg_pool, output_size=spec.output_size),
    sequences.MaxPool1d: lambda spec: functools.partial(
        F.max_pooling_1d, ksize=spec.kernel_size, stride=spec.stride, pad=spec.padding, cover_all=False
    ),
    sequences.AvgPool1d: _avg_pool_1d,
    sequences.AdaptiveAvgPool1d: lambda spec: functools.partial(_adaptive_avg_pool_1d, output_size=spec.output_size),
}


class _Linear(L.Linear):
    """Over the last axis of input of any rank, as ``torch.nn.Linear`` (Chainer's flattens all
    axes after the first by default)."""

    def forward(self, x):
        return super().forward(x, n_batch_axes=x.ndim - 1)


class _TransposedTie(chainer.LinkHook):
    """A transposed tie (a graph's ``tied``): before each call, the link computes with its source's
    transpose, a new node of the graph each time, so the source's gradient sums both uses."""

    name = "transposed_tie"

    def __init__(self, attribute: str, source: chainer.Parameter):
        self.attribute, self.source = attribute, source

    def forward_preprocess(self, args):
        object.__setattr__(args.link, self.attribute, F.transpose(self.source))


class _Embedding(L.EmbedID):
    """``F.embed_id`` on PyTorch's table; the ``padding_idx`` row enters as a constant, so it gets
    no gradient (Chainer's ``ignore_label`` would output zeros there instead of the row)."""

    def __init__(self, spec: sequences.Embedding, dtype: np.dtype):
        super().__init__(spec.num_embeddings, spec.embedding_dim, initialW=chainer.initializers.Zero(dtype))
        self.padding_idx = spec.padding_idx

    def forward(self, x):
        table = self.W
        if self.padding_idx is not None:
            trained = np.ones((len(table), 1), table.dtype)
            trained[self.padding_idx] = 0
            table = table * trained + table.array * (1 - trained)  # exact: one of the two terms is zero
        return F.embed_id(x, table)


class _Recurrent(chainer.Link):
    """RNN, LSTM and GRU through Chainer's ``F.n_step_lstm`` / ``n_step_bilstm``, ``n_step_gru`` /
    ``n_step_bigru``, ``n_step_rnn`` / ``n_step_birnn`` (the functions behind ``L.NStepLSTM`` and its
    kin), one layer per call, on parameters held in PyTorch's layout under PyTorch's names, split
    into Chainer's per-gate matrices. The gate orders agree: PyTorch stacks LSTM gates ``i, f, g, o``
    and Chainer's code takes ``W0..W3`` as ``i, f, g, o`` too (``_lstm`` stacks ``W2, W0, W1, W3``
    into ``F.lstm``'s ``a, i, f, o``; the equations in its docstring name ``W2`` and ``W3`` the other
    way round), ``W4..W7`` for the hidden state; GRU's ``r, z, n`` are the same in both, with
    ``n = tanh(W2 x + b2 + r * (W5 h + b5))`` as PyTorch's. Dropout between
    layers is applied here with masks from the loop's stream (shaped like the layer's output as the
    loop sees it), as Chainer's own would draw from NumPy's global RNG."""

    def __init__(self, spec: sequences._Recurrent, dtype: np.dtype, rng: np.random.Generator):
        super().__init__()
        self.spec, self.rng = spec, rng
        with self.init_scope():
            for key, shape in spec.param_shapes().items():
                setattr(self, key, chainer.Parameter(np.zeros(shape, dtype)))
        bidirectional = spec.bidirectional
        if isinstance(spec, sequences.LSTM):
            self.function = F.n_step_bilstm if bidirectional else F.n_step_lstm
        elif isinstance(spec, sequences.GRU):
            self.function = F.n_step_bigru if bidirectional else F.n_step_gru
        else:
            native = F.n_step_birnn if bidirectional else F.n_step_rnn
            self.function = functools.partial(native, activation=spec.nonlinearity)

    def _weights(self, k: int, suffix: str):
        """Chainer's ``ws`` and ``bs`` entries of layer ``k``'s direction ``suffix``."""
        gates, rows = self.spec.gates, self.spec.gates * self.spec.hidden_size
        ws, bs = [], []
        for part in ("ih", "hh"):
            weight = F.split_axis(getattr(self, f"weight_{part}_l{k}{suffix}"), gates, axis=0)
            if self.spec.bias:
                bias = F.split_axis(getattr(self, f"bias_{part}_l{k}{suffix}"), gates, axis=0)
            else:
                bias = np.split(np.zeros(rows, weight[0].dtype), gates)
            ws += list(weight)
            bs += list(bias)
        return ws, bs

    def forward(self, x, lengths=None):
        return self.run(x, lengths=lengths)[0]

    def call_states(self, x, *rest, initial_states=False, final_states=False):
        """A graph's call with initial states or returning the final ones (both batch-first in a graph,
        ``(N, num_layers * num_directions, hidden_size)``): ``rest`` is the lengths, if any, then
        the initial states."""
        count = (2 if isinstance(self.spec, sequences.LSTM) else 1) if initial_states else 0
        lengths = rest[0] if len(rest) > count else None
        states = [F.swapaxes(state, 0, 1) for state in rest[len(rest) - count :]] + [None, None]
        output, h_n, c_n = self.run(x, states[0], states[1], lengths)
        if not final_states:
            return output
        return (output, *(F.swapaxes(state, 0, 1) for state in (h_n, c_n) if state is not None))

    def run(self, x, h0=None, c0=None, lengths=None):
        """``(output, h_n, c_n)`` (``c_n`` None but for LSTM); initial states None are zeros.
        ``lengths``: each sequence's, of a batch-first padded ``x``. Chainer's functions take
        sequences of different lengths as time steps of shrinking batches (``xs[t]`` holds the
        sequences longer than ``t``, longest first), and return each one's state after its last
        step; the reverse direction starts each sequence at its own last step."""
        spec = self.spec
        time_axis = 1 if spec.batch_first else 0
        lstm = isinstance(spec, sequences.LSTM)
        zeros = np.zeros(spec.state_shape(x.shape[1 - time_axis]), x.dtype)
        h0 = zeros if h0 is None else h0
        c0 = zeros if c0 is None and lstm else c0
        if lengths is not None:
            return self._run_padded(x, h0, c0, np.asarray(lengths).reshape(-1))
        steps = F.separate(x, axis=time_axis)  # the functions take a list of time steps
        h_n, c_n, directions = [], [], spec.directions
        for k in range(spec.num_layers):
            ws, bs = zip(*(self._weights(k, suffix) for suffix in ("", "_reverse")[:directions]), strict=True)
            states = slice(k * directions, (k + 1) * directions)
            if lstm:
                h, c, steps = self.function(1, 0.0, h0[states], c0[states], list(ws), list(bs), steps)
                c_n.append(c)
            else:
                h, steps = self.function(1, 0.0, h0[states], list(ws), list(bs), steps)
            h_n.append(h)
            if chainer.config.train and spec.dropout and k < spec.num_layers - 1:
                output = F.stack(steps, axis=time_axis)
                output = output * dropout_mask(self.rng, output.shape, spec.dropout, output.dtype)
                steps = F.separate(output, axis=time_axis)
        output = F.stack(steps, axis=time_axis)
        return output, F.concat(h_n, axis=0), F.concat(c_n, axis=0) if lstm else None

    def _run_padded(self, x, h0, c0, lengths):
        spec = self.spec
        lstm = isinstance(spec, sequences.LSTM)
        order = np.argsort(-lengths, kind="stable")  # longest first, as the functions need
        undo = np.argsort(order)
        batches = [int((lengths > t).sum()) for t in range(x.shape[1])]
        x = F.get_item(x, order)
        steps = [x[:count, t] for t, count in enumerate(batches)]
        h_n, c_n, directions = [], [], spec.directions
        for k in range(spec.num_layers):
            ws, bs = zip(*(self._weights(k, suffix) for suffix in ("", "_reverse")[:directions]), strict=True)
            states = slice(k * directions, (k + 1) * directions)
            if lstm:
                h, c, steps = self.function(1, 0.0, h0[states][:, order], c0[states][:, order], list(ws), list(bs),
                                            steps)  # fmt: skip
                c_n.append(c)
            else:
                h, steps = self.function(1, 0.0, h0[states][:, order], list(ws), list(bs), steps)
            h_n.append(h)
            if chainer.config.train and spec.dropout and k < spec.num_layers - 1:
                output = F.get_item(F.swapaxes(F.pad_sequence(steps, length=len(lengths)), 0, 1), undo)
                output = output * dropout_mask(self.rng, output.shape, spec.dropout, output.dtype)
                output = F.get_item(output, order)
                steps = [output[:count, t] for t, count in enumerate(batches)]
        # zeros past each sequence's end, as pad_packed_sequence gives them; back in the batch's order
        output = F.get_item(F.swapaxes(F.pad_sequence(steps, length=len(lengths)), 0, 1), undo)
        h_n = F.concat(h_n, axis=0)[:, undo]
        return output, h_n, F.concat(c_n, axis=0)[:, undo] if lstm else None


class _LayerNorm(chainer.Link):
    """PyTorch's LayerNorm over the trailing ``normalized_shape`` dimensions, through
    ``F.layer_normalization`` (which normalises the rows of a matrix, eps inside the square root as
    PyTorch). ``gamma``/``beta`` keep PyTorch's ``normalized_shape`` layout."""

    def __init__(self, spec: layers.LayerNorm, dtype: np.dtype):
        super().__init__()
        self.eps, self.size = spec.eps, math.prod(spec.normalized_shape)
        self.affine = spec.elementwise_affine
        if self.affine:
            with self.init_scope():
                self.gamma = chainer.Parameter(np.ones(spec.normalized_shape, dtype))
                self.beta = chainer.Parameter(np.zeros(spec.normalized_shape, dtype))

    def forward(self, x):
        rows = F.reshape(x, (-1, self.size))
        if self.affine:
            gamma, beta = F.reshape(self.gamma, (self.size,)), F.reshape(self.beta, (self.size,))
        else:  # constants: no parameters to train
            gamma, beta = np.ones(self.size, x.dtype), np.zeros(self.size, x.dtype)
        return F.reshape(F.layer_normalization(rows, gamma, beta, self.eps), x.shape)


class _Sequence(chainer.Chain):
    """Layers called in order; its links are children named as the spec names them, so that
    Chainer's paths (``layer1/0/conv1/W``) mirror PyTorch's keys (``layer1.0.conv1.weight``).
    (``chainer.Sequential`` misorders its children when functions sit between links.)"""

    def __init__(self):
        super().__init__()
        self._calls = []

    def child_name(self, name: str) -> str:
        """The attribute to register child ``name`` under: the name itself unless Chain already
        has such an attribute (``forward``, ``params`` ...)."""
        while hasattr(self, name):
            name += "_"
        return name

    def register(self, attribute: str, layer) -> None:
        if isinstance(layer, chainer.Link):
            self.add_link(attribute, layer)

    def append(self, attribute: str, layer) -> None:
        self.register(attribute, layer)
        self._calls.append(layer)

    def forward(self, x):
        for layer in self._calls:
            x = layer(x)
        return x


class _Residual(_Sequence):
    """``post(body(x) + shortcut(x))``; the body's layers are this block's own children (torchvision's
    BasicBlock: ``layer1.0.conv1``), the shortcut is ``downsample``, the layer after the add ``post``."""

    def __init__(self):
        super().__init__()
        self._branches = {"downsample": _identity, "post": _identity}

    def attach(self, role: str, attribute: str, layer) -> None:
        """Set the ``downsample`` (shortcut) or ``post`` layer."""
        self.register(attribute, layer)
        self._branches[role] = layer

    def forward(self, x):
        return self._branches["post"](super().forward(x) + self._branches["downsample"](x))


class _Graph(_Sequence):
    """A graph's modules as children named as the spec names them (``encoder/1/W`` is
    ``encoder.1.weight``); ``forward(*inputs)`` runs its nodes (:func:`chainer_graph.run`)."""

    def __init__(self, spec: Graph):
        super().__init__()
        self._input_names, self._output_names = spec.input_names, spec.outputs
        self._steps = []  # (node name, callable, argument names), filled by the loop's builder
        self._released = released_after(spec)

    def forward(self, *inputs):
        return chainer_graph.run(self._steps, self._input_names, self._output_names, inputs, self._released)
