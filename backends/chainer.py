"""Chainer backend: ``chainer.links`` and ``chainer.functions`` in a tree of Chains that mirrors the
spec's containers (a ``Residual`` adds its body and shortcut in its own ``forward``), trained by a
``chainer.Optimizer`` whose update rules run PyTorch's equations (:mod:`unitrain.optim`).

What is special about Chainer:

* Children are registered under the spec's names, so Chainer's paths mirror PyTorch's keys
  (``layer2/0/downsample/0/W`` is ``layer2.0.downsample.0.weight``). A name Chain already uses as an
  attribute (``forward``, ``params``) gets a trailing ``_`` in Chainer only.
* What Chainer lacks is written from its primitives with PyTorch's equations: exact GELU (``F.erf``),
  SiLU, adaptive average pooling, upsampling other than nearest doubling, label smoothing and
  probability targets of the cross-entropy, BCE with float targets and on probabilities, and
  tie-splitting ``maximum``/``minimum`` for ``CustomLoss``.

* A :class:`~unitrain.graph.Graph` is a Chain of its modules whose forward runs the node list
  (:mod:`.chainer_graph`); several inputs are passed as several arguments.
* Training vs. eval is not model state but ``chainer.config.train``; the loop sets it around every
  call. ``predict`` / ``evaluate`` also turn off ``enable_backprop``.
* Chainer names weights ``W``/``b`` and BatchNorm state ``gamma``/``beta``/``avg_mean``/``avg_var``;
  they are mapped to PyTorch's names (layouts already agree). A native Chain keeps Chainer's own
  names, ``/l1/W`` becoming ``l1.W``.
* Gradients accumulate in ``param.grad`` across ``backward`` calls until ``cleargrads``.
* BatchNorm's float32 batch statistics are NumPy float32 reductions (PyTorch's CPU kernel
  accumulates in double); ``_BatchNorm`` hands them a C-contiguous input so that NumPy sums pairwise.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import sys
import warnings
from collections.abc import Mapping

import numpy as np

# Chainer 7.8 imports numpy.distutils, which needs the standard library's distutils (Python < 3.12).
# setuptools' distutils-precedence.pth installs, at interpreter start-up, an import shim serving its
# own copy (which lacks distutils.msvccompiler): drop the shim before anything imported distutils,
# and set the variable so that a later `import setuptools` does not swap its copy back in.
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
if os.environ["SETUPTOOLS_USE_DISTUTILS"] == "stdlib" and "distutils" not in sys.modules:
    _shim = sys.modules.get("_distutils_hack")
    if _shim is not None:
        _shim.remove_shim()

# Importing Chainer warns about its environment checks (numpy.distutils, pkg_resources), which a
# user cannot act on.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from chainer.serializers import DictionarySerializer, NpzDeserializer

from unitrain import attention, expr, layers, losses, ops, sequences
from unitrain.graph import Graph
from unitrain.loop import TrainingLoop
from unitrain.optim import clip_grad_norm_scale, initial_buffer_value, optimizer_update, starts_as_gradient
from unitrain.randomness import dropout_mask, dropout_stream, set_stream_state, stream_state
from unitrain.upsampling import interpolation_matrix

from . import chainer_attention, chainer_graph

#: PyTorch's state names -> Chainer's attribute names
_LINK_NAMES = {"weight": "W", "bias": "b"}
_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "avg_mean", "running_var": "avg_var",
             "num_batches_tracked": "num_batches_tracked"}  # fmt: skip


class _BatchNorm(L.BatchNormalization):
    """Chainer's BatchNormalization plus PyTorch's ``num_batches_tracked``.

    Chainer's ``decay`` weighs the old running value (``decay = 1 - momentum``) and it feeds the
    running variance the unbiased batch variance (``m / (m - 1)`` adjustment), as PyTorch does."""

    def __init__(self, spec: layers._BatchNorm, dtype: np.dtype):
        super().__init__(spec.num_features, decay=1 - spec.momentum, eps=spec.eps, dtype=dtype)
        self.num_batches_tracked = np.zeros((), np.int64)
        self.register_persistent("num_batches_tracked")

    def forward(self, x):
        if chainer.config.train:
            self.num_batches_tracked += 1
        if x.ndim > 2 and not x.array.flags.c_contiguous:
            # Chainer's Convolution2D returns a channels-last view (strides N, C=1, H, W), and NumPy
            # reduces such an array over (N, H, W) by adding its 64*14*14 elements one after another
            # in float32 (pairwise summation only runs along a contiguous innermost axis): batch mean
            # and variance came out 5e-5 to 8e-5 off, 1000x the 4e-8 to 2e-7 of a C-contiguous copy.
            # Reshaping through (N, -1) makes that copy (a view is impossible) and is differentiable.
            x = F.reshape(F.reshape(x, (x.shape[0], -1)), x.shape)
        return super().forward(x)


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
    return F.reshape(x, (*x.shape[:start], -1, *x.shape[end + 1 :]))


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

    def forward(self, *inputs):
        return chainer_graph.run(self._steps, self._input_names, self._output_names, inputs)


def _class_rows(spec, pred, y):
    """``(N, C, d1, ...)`` predictions as rows ``(N * d1 * ..., C)`` (classes last) with their
    targets, and the rows whose class index is ``ignore_index`` left out (PyTorch's mean divides
    by the rows that count)."""
    if pred.ndim > 2:
        classes = pred.shape[1]
        pred = F.reshape(F.moveaxis(pred, 1, -1), (-1, classes))
        y = np.moveaxis(y, 1, -1).reshape(-1, classes) if y.dtype.kind == "f" else y.reshape(-1)
    if y.dtype.kind != "f" and (y == spec.ignore_index).any():
        kept = np.flatnonzero(y != spec.ignore_index)
        pred, y = F.get_item(pred, kept), y[kept]
    return pred, y


def _cross_entropy(spec: losses.CrossEntropyLoss, logits, y):
    """Per row (:func:`_class_rows`). Class indices without smoothing: Chainer's own softmax cross-entropy.
    Otherwise PyTorch's ``-sum(((1 - ε) * target + ε / C) * log_softmax(logits))``, where ``target`` is
    the given probabilities or the one-hot rows of the class indices (Chainer has no label smoothing)."""
    logits, y = _class_rows(spec, logits, y)
    if y.dtype.kind != "f" and not spec.label_smoothing:
        return F.softmax_cross_entropy(logits, y.astype(np.int32), reduce="no")
    classes = logits.shape[1]
    target = y if y.dtype.kind == "f" else np.eye(classes, dtype=logits.dtype)[y]
    target = (1 - spec.label_smoothing) * target + spec.label_smoothing / classes
    return -F.sum(target * F.log_softmax(logits), axis=1)


def _negative_log_likelihood(spec: losses.NLLLoss, log_probs, y):
    log_probs, y = _class_rows(spec, log_probs, y)
    return -F.select_item(log_probs, y.astype(np.int32))


def _bce_with_logits(spec, logits, y):
    """PyTorch's stable form ``(1 - y) * x - log_sigmoid(x)``, ``-log_sigmoid(x) = softplus(-x)``
    (Chainer's sigmoid_cross_entropy takes only 0/1 integer labels)."""
    return (1 - y) * logits + F.softplus(-logits)


class _BinaryCrossEntropy(chainer.FunctionNode):
    """PyTorch's BCELoss per element (Chainer's losses take logits): ``(t - 1) * max(log1p(-p), -100)
    - t * max(log(p), -100)``, and PyTorch's gradient ``(p - t) / max(p * (1 - p), 1e-12)``, finite where
    a clamped logarithm's derivative is not."""

    def forward(self, inputs):
        p, t = inputs
        self.coefficient = (p - t) / np.maximum((1 - p) * p, p.dtype.type(losses.BCE_GRAD_EPSILON))
        floor = p.dtype.type(losses.BCE_LOG_FLOOR)
        with np.errstate(divide="ignore"):  # log(0) is -inf, floored just below
            return ((t - 1) * np.maximum(np.log1p(-p), floor) - t * np.maximum(np.log(p), floor),)

    def backward(self, indexes, grad_outputs):
        return grad_outputs[0] * self.coefficient, None


def _smooth_l1(spec, pred, y):
    """PyTorch's ``SmoothL1Loss(beta)`` is ``HuberLoss(delta=beta) / beta``; ``beta=0`` is L1."""
    if spec.beta == 0:
        return F.absolute_error(pred, y)
    return F.huber_loss(pred, y, spec.beta, reduce="no") / spec.beta


#: Per-sample (class losses) or per-element terms of each loss; ``reduction`` sums or averages them.
_LOSS_TERMS = {
    losses.CrossEntropyLoss: _cross_entropy,
    losses.NLLLoss: _negative_log_likelihood,
    losses.MSELoss: lambda spec, pred, y: F.squared_error(pred, y),
    losses.BCEWithLogitsLoss: _bce_with_logits,
    losses.BCELoss: lambda spec, p, y: _BinaryCrossEntropy().apply((p, y))[0],
    losses.L1Loss: lambda spec, pred, y: F.absolute_error(pred, y),
    losses.SmoothL1Loss: _smooth_l1,
    losses.HuberLoss: lambda spec, pred, y: F.huber_loss(pred, y, spec.delta, reduce="no"),
}


def _broadcast(a, b):
    """Two operands (Variables, arrays or Python numbers) as Variables of one shape and dtype."""
    dtype = next(v.dtype for v in (a, b) if hasattr(v, "dtype"))
    return F.broadcast(*(v if hasattr(v, "dtype") else np.asarray(v, dtype) for v in (a, b)))


def _maximum(a, b):
    """``torch.maximum``: ties split the gradient evenly (``F.maximum`` gives it all to ``a``). The two
    selections are the same value, so their mean is exact, and at a tie each side gets half."""
    a, b = _broadcast(a, b)
    return 0.5 * (F.where(a.array >= b.array, a, b) + F.where(a.array > b.array, a, b))


def _minimum(a, b):
    a, b = _broadcast(a, b)
    return 0.5 * (F.where(a.array <= b.array, a, b) + F.where(a.array < b.array, a, b))


#: CustomLoss's operations (:mod:`unitrain.expr`) as Chainer functions; Chainer's autograd differentiates them.
_EXPR_OPS = {
    "const": lambda value: value,
    "neg": operator.neg,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "pow": lambda a, exponent: a**exponent,
    "abs": F.absolute,
    "exp": F.exp,
    "log": F.log,
    "sqrt": F.sqrt,
    "square": F.square,
    "sum": lambda a, axis: F.sum(a, axis=axis),
    "mean": lambda a, axis: F.mean(a, axis=axis),
    "maximum": _maximum,
    "minimum": _minimum,
    "log_softmax": lambda a, axis: F.log_softmax(a, axis=axis),
    "softmax": lambda a, axis: F.softmax(a, axis=axis),
}


class _Rule(chainer.UpdateRule):
    """A parameter's update rule; its ``state`` holds PyTorch's buffers under PyTorch's names."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def update(self, param):
        # PyTorch skips parameters without a gradient rather than stepping them with zeros.
        if param.grad is not None:
            super().update(param)

    def load(self, state: dict, t: int) -> None:
        """Replace the state (``None`` until the first update creates it) and the step count."""
        self._state = state or None
        self.t = t if state else 0


class _PyTorchRule(_Rule):
    """Any spec's update (:func:`unitrain.optim.optimizer_update`), in place on the parameter's
    arrays; ``spec``, ``lr`` and ``momentum`` are its parameter group's (``set_lr`` and a schedule
    change the last two)."""

    def __init__(self, group):
        super().__init__(group.spec)
        self.group = group

    def init_state(self, param):
        if not starts_as_gradient(self.spec):  # PyTorch's momentum buffer starts as the first gradient
            for name in self.spec.state_names:
                self.state[name] = np.full_like(param.array, initial_buffer_value(self.spec, name))

    def update_core_cpu(self, param):
        names = self.spec.state_names
        buffers = tuple(self.state.get(name) for name in names)
        _, buffers = optimizer_update(
            self.spec, param.array, param.grad, buffers, self.t, self.group.lr, np.sqrt, True, self.group.momentum,
        )  # fmt: skip
        self.state.update(zip(names, buffers, strict=True))


class _ClipGradNorm:
    """A Chainer optimizer hook (timing ``pre``): ``clip_grad_norm_``'s global-norm clipping.
    Chainer's own ``GradientClipping`` leaves out PyTorch's ``+ 1e-6`` and scales only above the norm."""

    name, timing, call_for_each_param = "ClipGradNorm", "pre", False

    def __init__(self, max_norm):
        self.max_norm = max_norm

    def __call__(self, optimizer):
        grads = [param.grad for param in optimizer.target.params()
                 if param.grad is not None and param.update_rule.enabled]  # frozen ones are not clipped  # fmt: skip
        if grads:
            norms = [np.linalg.norm(grad.reshape(-1)) for grad in grads]
            scale = clip_grad_norm_scale(norms, self.max_norm, np.sqrt, np.minimum).astype(grads[0].dtype)
            for grad in grads:
                grad *= scale


def _stop_gradient(param):
    """No gradient for ``param`` at all, as PyTorch's ``requires_grad=False``: Chainer's backward
    computes the gradients of the inputs whose variable node requires one (``FunctionNode``'s
    ``target_input_indexes``), and a layer whose inputs need none is left out of the graph. Chainer
    has no public switch for it (``Link.disable_update`` only stops the update), so the parameter's
    flag and its node's are cleared."""
    param._requires_grad = False
    param.node._requires_grad = False


class _Optimizer(chainer.optimizer.GradientMethod):
    """Chainer's optimizer machinery (setup, per-parameter rules, ``t``) with PyTorch's rules, each
    parameter's those of its group (``groups``: ``id(parameter)`` ->
    :class:`~unitrain.controls.ParamGroup`; a frozen one has none, and its rule is disabled)."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def setup(self, link):
        chainer.Optimizer.setup(self, link)  # GradientMethod's would give every parameter one kind of rule
        for param in link.params():
            group = self.groups.get(id(param))
            param.update_rule = _PyTorchRule(group) if group is not None else _Rule(None)
            param.update_rule.enabled = group is not None
        return self

    def reallocate_cleared_grads(self):
        """Keep cleared gradients ``None`` (GradientMethod would fill them with zeros)."""


class ChainerLoop(TrainingLoop):
    name = "chainer"
    framework = "chainer"
    capabilities = frozenset({
        "dropout", "batchnorm", "conv", "native-model", "float64", "random-state",
        "residual", "activations", "layernorm", "pooling", "losses", "custom-loss", "optimizers", "clipping",
        "distributed", "training-controls", "sequences", "graph", "multi-model", "attention",
    })  # fmt: skip

    # --- building ---------------------------------------------------------------------------

    def _build(self, model):
        self._rng = dropout_stream(self.seed, self.rank)
        paths = {}  # canonical name -> Chainer serializer path
        self._natives = {}  # dotted module path -> its native callable, for graphs' call_module nodes
        root = self._node(model, "", "", paths)
        self._paths = {key: paths[key] for key in model.state_shapes()}  # in state_dict order
        self._adopt(root)

    def _node(self, spec, name: str, path: str, paths: dict):
        """The native callable of ``spec`` (a container or a leaf). ``name`` and ``path`` prefix its state
        entries' canonical names and Chainer paths (``layer1.0.`` and ``layer1/0/``; empty at the root);
        each entry's path goes into ``paths``. The tree of Chains mirrors the spec's, so the two agree."""
        if isinstance(spec, layers.Residual):
            block = _Residual()
            self._fill(block, spec.body.children, name, path, paths)
            for role, child in (("downsample", spec.shortcut), ("post", spec.post)):
                if child is not None:
                    block.attach(role, *self._child(block, role, child, name, path, paths))
            return block
        if isinstance(spec, layers.Sequential):
            chain = _Sequence()
            self._fill(chain, spec.children, name, path, paths)
            return chain
        if isinstance(spec, Graph):
            chain = _Graph(spec)
            for child_name, child in spec.children:
                chain.register(*self._child(chain, child_name, child, name, path, paths))
            for node in spec.nodes:
                if node.op == "call_module":
                    call = self._natives[f"{name}{node.target}"]
                elif node.target in ops.ACTIVATIONS:
                    call = self._leaf(ops.ACTIVATIONS[node.target](**node.options))
                else:
                    call = functools.partial(chainer_graph.FUNCTIONS[node.target], **node.options)
                chain._steps.append((node.name, call, node.args))
            for key, source in spec.tied:
                (leaf_path, attribute), (source_path, source_attribute) = key.rsplit(".", 1), source.rsplit(".", 1)
                link = self._natives[f"{name}{leaf_path}"]
                shared = getattr(self._natives[f"{name}{source_path}"], _LINK_NAMES[source_attribute])
                # no longer a parameter of this link (Chainer's optimizer updates each parameter it
                # lists), but the tensor it computes with; Chainer sums the gradients of both uses
                delattr(link, _LINK_NAMES[attribute])
                setattr(link, _LINK_NAMES[attribute], shared)
            return chain
        layer = self._leaf(spec)
        if isinstance(layer, chainer.Link):
            names = (
                _LINK_NAMES
                if isinstance(layer, (L.Linear, L.Convolution2D, L.ConvolutionND, L.EmbedID, L.Deconvolution2D))
                else _BN_NAMES
            )
            for key in {**spec.param_shapes(), **spec.buffer_shapes()}:
                # a recurrent layer's parameters carry PyTorch's names already, attention's with _ for .
                torch_named = isinstance(layer, (_Recurrent, chainer_attention.MultiheadAttention))
                paths[f"{name}{key}"] = f"{path}{key.replace('.', '_') if torch_named else names[key]}"
        return layer

    def _child(self, chain: _Sequence, child_name: str, spec, name: str, path: str, paths: dict):
        """``(attribute, native callable)`` of ``chain``'s child ``child_name``."""
        attribute = chain.child_name(child_name)
        native = self._node(spec, f"{name}{child_name}.", f"{path}{attribute}/", paths)
        self._natives[f"{name}{child_name}"] = native
        return attribute, native

    def _fill(self, chain: _Sequence, children, name: str, path: str, paths: dict) -> None:
        """Append ``children`` ((name, spec) pairs) to ``chain``."""
        for child_name, spec in children:
            chain.append(*self._child(chain, child_name, spec, name, path, paths))

    def _leaf(self, spec):
        """The native link or function of a leaf spec."""
        if isinstance(spec, (layers.Linear, layers.Conv2d, sequences.Conv1d)):
            zero = chainer.initializers.Zero(self.dtype)  # init_weights is loaded right after
            init = {"nobias": not spec.bias, "initialW": zero, "initial_bias": zero}
            if isinstance(spec, layers.Linear):
                return _Linear(spec.in_features, spec.out_features, **init)
            size = spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding
            native = L.Convolution2D if isinstance(spec, layers.Conv2d) else L.Convolution1D
            return native(*size, dilate=spec.dilation, groups=spec.groups, **init)
        if type(spec) in attention.LEAVES.values():
            return chainer_attention.leaf(spec, self.dtype, self._rng)
        if isinstance(spec, sequences.Embedding):
            return _Embedding(spec, self.dtype)
        if isinstance(spec, sequences._Recurrent):
            return _Recurrent(spec, self.dtype, self._rng)
        if isinstance(spec, layers.ConvTranspose2d):
            return _ConvTranspose2d(spec, self.dtype)
        if isinstance(spec, layers._BatchNorm):
            return _BatchNorm(spec, self.dtype)
        if isinstance(spec, layers.LayerNorm):
            return _LayerNorm(spec, self.dtype)
        if isinstance(spec, layers.Dropout):
            return _Dropout(spec.p, self._rng)
        return _FUNCTIONS[type(spec)](spec)

    def _wrap_native(self, model):
        uninitialized = [path for path, param in model.namedparams() if param.array is None]
        if uninitialized:
            raise ValueError(
                f"Chainer parameters {uninitialized} are not initialized yet: give the links their input "
                "sizes or run one forward pass before handing the model to the loop"
            )
        flat = DictionarySerializer()
        flat.save(model)
        # Parameters and floating-point persistents (avg_mean ...); scalar ones such as
        # BatchNormalization.N (the count of its fine-tuning mode, unused here) stay out.
        paths = sorted(path for path, value in flat.target.items() if np.asarray(value).dtype.kind == "f")
        self._paths = {path.replace("/", "."): path for path in paths}
        self._adopt(model)

    def _adopt(self, model):
        self.model = model
        model.cleargrads()  # new links hold NaN gradients, which a first backward would add to
        params = {path.lstrip("/"): param for path, param in model.namedparams()}
        self._params = {name: params[path] for name, path in self._paths.items() if path in params}
        groups = self._resolve_controls(self._params)
        self.optimizer = _Optimizer({id(self._params[name]): group for group in groups for name in group.names})
        self.optimizer.setup(model)
        for name in self.frozen:
            _stop_gradient(self._params[name])
        if self.clip_grad_norm is not None:
            self.optimizer.add_hook(_ClipGradNorm(self.clip_grad_norm))
        elif self.clip_grad_value is not None:  # Chainer's own hook clamps like torch.clamp_
            bound = self.clip_grad_value
            self.optimizer.add_hook(chainer.optimizer_hooks.GradientHardClipping(-bound, bound))

    @classmethod
    def is_native_model(cls, model):
        framework = sys.modules.get("chainer")
        return framework is not None and isinstance(model, framework.Link)

    @classmethod
    def native_example_model(cls):
        return chainer.Sequential(L.Linear(8, 16), F.relu, L.Linear(16, 3))

    # --- the step ---------------------------------------------------------------------------

    def _set_training(self, mode):
        self._train = mode

    def _zero_grad(self):
        self.model.cleargrads()

    def _forward(self, x):
        with chainer.using_config("train", self._train):
            return self._call(x)

    def _call(self, x):
        return self.model(*x) if isinstance(x, tuple) else self.model(x)  # a tuple: a graph's inputs

    def _loss(self, pred, y):
        return self._compute_loss(pred, y)

    def _compute_loss(self, pred, y, reduction=None, spec=None):
        """The value of the loss spec (default: the loop's); ``reduction`` overrides the spec's
        own (a CustomLoss has none). A PerOutputLoss sums its losses, as a PyTorch loop writes it."""
        spec = spec or self.loss_spec
        if isinstance(spec, losses.PerOutputLoss):
            parts = [self._compute_loss(p, t, reduction, part) for p, t, part in zip(pred, y, spec.losses, strict=True)]
            return functools.reduce(operator.add, parts)
        if isinstance(spec, losses.CustomLoss):
            return expr.evaluate(spec.tree, pred, y, _EXPR_OPS)
        terms = _LOSS_TERMS[type(spec)](spec, pred, y)
        return F.mean(terms) if (reduction or spec.reduction) == "mean" else F.sum(terms)

    def _backward(self, loss):
        loss.backward()

    def _update(self):
        self.optimizer.update()

    def _step(self, x, y):
        self._zero_grad()
        pred = self._forward(x)
        loss = self._loss(pred, y)
        loss.backward()
        self.optimizer.update()
        # arrays, not Variables: a Variable keeps its graph
        self._step_pred = tuple(p.array for p in pred) if isinstance(pred, tuple) else pred.array
        return loss.array

    def _set_lr(self, lr):
        pass  # each rule reads its group's lr

    def _set_momentum(self, momentum):
        pass  # each rule reads its group's momentum

    def _scale_gradients(self, factor):
        for param in self.model.params():
            if param.grad is not None:
                param.grad *= self.dtype.type(factor)

    def _step_correct(self, y):
        return self._count_correct(self._step_pred, y)

    def _count_correct(self, pred, y):
        pred = getattr(pred, "array", pred)  # _loss_and_gradients's are Variables
        xp = chainer.backend.get_array_module(pred)
        return (pred.argmax(axis=1) == xp.asarray(y)).sum()

    @staticmethod
    def to_numpy(value):
        return chainer.backend.CpuDevice().send(getattr(value, "array", value)).copy()

    @staticmethod
    def to_float(value):
        return float(getattr(value, "array", value))  # float() does not take a chainer.Variable

    # --- data parallel: ChainerMN over MPI (launched by mpiexec) ------------------------------

    def _setup_distributed(self):
        import chainermn  # imports mpi4py

        # 'naive': MPI allreduce of NumPy arrays ('flat' and the NCCL ones need CuPy). Not
        # create_multi_node_optimizer: it averages inside update(), where the core's weighted sum
        # of shards already did, and its first update() only broadcasts the weights.
        self._communicator = chainermn.create_communicator("naive")
        return self._communicator.rank, self._communicator.size

    def _reduce_gradients(self, weight):
        scale = self.dtype.type(weight * self._communicator.size)  # the mean below divides the sum by the size
        for param in self.model.params():
            if param.grad is not None:
                param.grad *= scale
        # zero_fill: a rank without rows (or a parameter without a gradient) still takes part
        self._communicator.multi_node_mean_grad(self.model, zero_fill=True)

    def _all_sum(self, values):
        return self._communicator.allreduce(values)

    def _predict(self, x):
        with chainer.using_config("train", self._train), chainer.no_backprop_mode():
            pred = self._call(x)
        return tuple(p.array for p in pred) if isinstance(pred, tuple) else pred.array

    def _evaluate_batch(self, x, y):
        with chainer.using_config("train", self._train), chainer.no_backprop_mode():
            pred = self._call(x)
            if isinstance(self.loss_spec, losses.PerOutputLoss):  # each output's sum
                parts = zip(pred, y, self.loss_spec.losses, strict=True)
                return tuple(float(self._compute_loss(p, t, "sum", part).array) for p, t, part in parts), 0
            loss = self._compute_loss(pred, y, "sum")
        correct = int((pred.array.argmax(axis=1) == y).sum()) if y.dtype.kind == "i" else 0  # class indices
        return float(loss.array), correct

    # --- state ------------------------------------------------------------------------------

    def _gradients(self):
        return {name: np.zeros_like(p.array) if p.grad is None else p.grad.copy() for name, p in self._params.items()}

    def _state_dict(self):
        flat = DictionarySerializer()
        flat.save(self.model)
        return {name: np.array(flat.target[path]) for name, path in self._paths.items()}

    def _load_state_dict(self, state):
        # strict=False: entries outside the canonical state (BatchNormalization.N) keep their values.
        NpzDeserializer({path: state[name] for name, path in self._paths.items()}, strict=False).load(self.model)

    def _optimizer_state_dict(self):
        state = {"step": np.array(self.optimizer.t, np.int64)}
        for name, param in self._params.items():
            for key, value in (param.update_rule.state or {}).items():
                state[f"{name}.{key}"] = value.copy()
        return state

    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]):
        step = int(state["step"])
        for name, param in self._params.items():
            names = () if name in self.frozen else self._state_names(name)
            entries = {key: np.array(state[f"{name}.{key}"]) for key in names if f"{name}.{key}" in state}
            param.update_rule.load(entries, step)
        self.optimizer.t = step

    def _random_state(self):
        # a native Chain's F.dropout draws from NumPy's global RNG, which the loop does not own
        return stream_state(self._rng) if self.model_spec is not None else {}

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)
