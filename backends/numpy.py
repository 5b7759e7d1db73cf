"""NumPy backend: no framework, hand-written forward and backward passes.

The model is a tree of nodes mirroring the spec: :class:`_Sequence` (a ``Sequential``),
:class:`_Residual` (``post(body(x) + shortcut(x))``) and leaf layers. Every node has
``forward(x, training, record)`` (``record``: keep what backward needs) and
``backward(grad, need_input_grad)``, which adds the parameter gradients into preallocated
``grads`` buffers and returns the input gradient (``None`` when not needed). A backward owns the
gradient it is given (it may overwrite it) and returns one its caller owns.

With no autograd tape, ``forward`` records those caches, ``loss`` returns a :class:`LossValue`
that knows its gradient with respect to the predictions, and ``backward`` runs the tree in
reverse from it. The caches belong to the latest ``forward``; ``backward`` refuses the loss of an
older one. Parameters are updated in place, so views of them (the convolution's weight matrix)
stay valid.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from unitrain.backends.numpy_sequences import _Embedding, _Layer, _Recurrent, _sigmoid

from unitrain import expr
from unitrain.graph import Graph
from unitrain.layers import (
    ELU,
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    Identity,
    LayerNorm,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
    Upsample,
)
from unitrain.loop import InputError, TrainingLoop
from unitrain.loss_value import LossExpression
from unitrain.losses import (
    BCE_GRAD_EPSILON,
    BCE_LOG_FLOOR,
    BCELoss,
    BCEWithLogitsLoss,
    CustomLoss,
    HuberLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    PerOutputLoss,
    SmoothL1Loss,
)
from unitrain.optim import clip_grad_norm_scale, initial_buffer_value, optimizer_update, starts_as_gradient
from unitrain.randomness import dropout_mask, dropout_stream, set_stream_state, stream_state
from unitrain.sequences import GRU, LSTM, RNN, AdaptiveAvgPool1d, AvgPool1d, Conv1d, Embedding, MaxPool1d
from unitrain.upsampling import interpolation_matrix

from . import numpy_graph

# --- leaves --------------------------------------------------------------------------------------


class _Linear(_Layer):
    """Over the last axis; other axes are rows of one matrix product."""

    def forward(self, x, training, record):
        if record:
            self.x = x
        out = x @ self.params["weight"].T
        if "bias" in self.params:
            out += self.params["bias"]
        return out

    def backward(self, grad, need_input_grad):
        rows = grad.reshape(-1, grad.shape[-1])
        self.grads["weight"] += rows.T @ self.x.reshape(-1, self.x.shape[-1])
        if "bias" in self.grads:
            self.grads["bias"] += rows.sum(0)
        return grad @ self.params["weight"] if need_input_grad else None


def _window_slices(array, kernel, stride, out_size, dilation=(1, 1)):
    """For each kernel offset ``(i, j)`` in row-major order, the strided view of ``array``
    (N, C, H, W) holding the element at that offset of every window, shape (N, C, OH, OW)."""
    (kh, kw), (sh, sw), (oh, ow), (dh, dw) = kernel, stride, out_size, dilation
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            yield array[:, :, top : top + sh * (oh - 1) + 1 : sh, left : left + sw * (ow - 1) + 1 : sw]


def _pad(x, padding, value=0.0):
    (ph, pw) = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value) if ph or pw else x


def _pooled_size(padded_shape, spec):
    """Output height and width of a pooling window sliding over a padded (N, C, H, W) input."""
    return tuple((d - k) // s + 1 for d, k, s in zip(padded_shape[2:], spec.kernel_size, spec.stride, strict=True))


def _unpad(x, padding):
    (ph, pw), (h, w) = padding, x.shape[2:]
    return x[:, :, ph : h - ph, pw : w - pw] if ph or pw else x


#: Output positions per sample from which per-sample matmuls beat one matmul over the whole batch.
#: Measured on MNIST's CNN (24x24 and 8x8 outputs: per sample 1.5-3.5x faster, the big matmul
#: needs transposing copies) and ResNet-18 on 28x28 (7x7 and smaller: one matmul 1.4-12x faster,
#: the per-sample matrices being too thin for BLAS).
_PER_SAMPLE_POSITIONS = 64


class _Conv2d(_Layer):
    """im2col with the weight as ``groups`` matrices (out/groups, in/groups*kh*kw). Large outputs:
    each sample's windows become a (K, OH*OW) matrix per group, so one batched matmul yields NCHW
    output directly. Small outputs (deep layers): all samples' windows form one (K, N*OH*OW) matrix
    per group, for one large matmul. ``_PER_SAMPLE_POSITIONS`` picks."""

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        shape = (spec.groups, spec.out_channels // spec.groups, -1)
        self.matrix = self.params["weight"].reshape(shape)
        self.grad_matrix = self.grads["weight"].reshape(shape)

    def forward(self, x, training, record):
        spec = self.spec
        (kh, kw), (dh, dw), (sh, sw), groups = spec.kernel_size, spec.dilation, spec.stride, spec.groups
        x = _pad(x, spec.padding)
        n = len(x)
        span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
        windows = sliding_window_view(x, span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]  # (N, C, OH, OW, kh, kw)
        oh, ow = windows.shape[2:4]
        per_sample = oh * ow >= _PER_SAMPLE_POSITIONS
        if per_sample:
            cols = windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, groups, -1, oh * ow)
        else:
            cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(groups, -1, n * oh * ow)
        # the one copy: reshape may return a view whose strides BLAS refuses (NumPy's own loop is far slower)
        cols = np.ascontiguousarray(cols)
        if per_sample:
            out = (self.matrix @ cols).reshape(n, -1, oh, ow)
        else:
            out = (self.matrix @ cols).reshape(-1, n, oh, ow).transpose(1, 0, 2, 3)
        if "bias" in self.params:
            out += self.params["bias"][:, None, None]
        if record:
            self.cols, self.padded_shape, self.per_sample = cols, x.shape, per_sample
        return out if per_sample else np.ascontiguousarray(out)

    def backward(self, grad, need_input_grad):
        spec, groups = self.spec, self.spec.groups
        n, _, oh, ow = grad.shape
        if "bias" in self.grads:
            self.grads["bias"] += grad.sum((0, 2, 3))
        if self.per_sample:
            grad = grad.reshape(n, groups, -1, oh * ow)
            self.grad_matrix += (grad @ self.cols.transpose(0, 1, 3, 2)).sum(0)
        else:
            grad = grad.transpose(1, 0, 2, 3).reshape(groups, -1, n * oh * ow)
            self.grad_matrix += grad @ self.cols.transpose(0, 2, 1)
        if not need_input_grad:
            return None
        grad_cols = self.matrix.transpose(0, 2, 1) @ grad
        c = self.padded_shape[1]
        (kh, kw) = spec.kernel_size
        if self.per_sample:
            grad_cols = grad_cols.reshape(n, c, kh, kw, oh, ow)
        else:
            grad_cols = grad_cols.reshape(c, kh, kw, n, oh, ow).transpose(3, 0, 1, 2, 4, 5)
        # col2im: scatter-add each kernel offset's columns back onto the input positions it read
        grad_x = np.zeros(self.padded_shape, grad.dtype)
        targets = _window_slices(grad_x, spec.kernel_size, spec.stride, (oh, ow), spec.dilation)
        for offset, target in enumerate(targets):
            target += grad_cols[:, :, offset // kw, offset % kw]
        return _unpad(grad_x, spec.padding)


class _ConvTranspose2d(_Layer):
    """The transpose of ``_Conv2d``: forward is its col2im (each input pixel's kernel, weighted per
    group by the ``(in/groups, out/groups*kh*kw)`` weight matrix, added onto the padded output at
    ``stride`` steps, then ``padding`` cut off), backward its im2col (the strided views of the
    padded output gradient, one per kernel offset, give the input and weight gradients)."""

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        shape = (spec.groups, spec.in_channels // spec.groups, -1)
        self.matrix = self.params["weight"].reshape(shape)
        self.grad_matrix = self.grads["weight"].reshape(shape)

    def forward(self, x, training, record):
        spec = self.spec
        n, _, h, w = x.shape
        (kh, kw), (ph, pw) = spec.kernel_size, spec.padding
        rows = x.reshape(n, spec.groups, -1, h * w)
        cols = (self.matrix.transpose(0, 2, 1) @ rows).reshape(n, -1, kh, kw, h, w)
        oh, ow = spec.output_shape(x.shape[1:])[1:]
        padded = np.zeros((n, spec.out_channels, oh + 2 * ph, ow + 2 * pw), x.dtype)
        for offset, target in enumerate(_window_slices(padded, spec.kernel_size, spec.stride, (h, w), spec.dilation)):
            target += cols[:, :, offset // kw, offset % kw]
        out = _unpad(padded, spec.padding)
        if "bias" in self.params:
            out += self.params["bias"][:, None, None]
        if record:
            self.rows, self.input_size = rows, (h, w)
        return out

    def backward(self, grad, need_input_grad):
        spec = self.spec
        n, (h, w) = len(grad), self.input_size
        if "bias" in self.grads:
            self.grads["bias"] += grad.sum((0, 2, 3))
        (kh, kw), (dh, dw), (sh, sw) = spec.kernel_size, spec.dilation, spec.stride
        span = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
        windows = sliding_window_view(_pad(grad, spec.padding), span, axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        cols = windows[:, :, :h, :w].transpose(0, 1, 4, 5, 2, 3).reshape(n, spec.groups, -1, h * w)
        cols = np.ascontiguousarray(cols)  # BLAS refuses the strided view
        self.grad_matrix += (self.rows @ cols.transpose(0, 1, 3, 2)).sum(0)
        if not need_input_grad:
            return None
        return (self.matrix @ cols).reshape(n, -1, h, w)


class _MaxPool2d(_Layer):
    """Max over the kh*kw strided slices of the (-inf padded) input, one per window offset;
    ``argmax`` keeps the first maximal offset per window (PyTorch's tie rule), and backward
    routes the gradient there."""

    def forward(self, x, training, record):
        spec = self.spec
        x = _pad(x, spec.padding, -np.inf)
        out_size = _pooled_size(x.shape, spec)
        slices = _window_slices(x, spec.kernel_size, spec.stride, out_size)
        out = next(slices).copy()
        argmax = np.zeros(out.shape, np.min_scalar_type(np.prod(spec.kernel_size) - 1))
        for offset, candidate in enumerate(slices, 1):
            np.putmask(argmax, candidate > out, offset)  # putmask, maximum: far faster than copyto(where=)
            np.maximum(out, candidate, out=out)
        if record:
            self.argmax, self.padded_shape = argmax, x.shape
        return out

    def backward(self, grad, need_input_grad):
        spec = self.spec
        if spec.stride == spec.kernel_size and self.padded_shape[2:] == tuple(
            o * k for o, k in zip(grad.shape[2:], spec.kernel_size, strict=True)
        ):
            # windows tile the input exactly: every element is written once, no zeroing or adding
            grad_x = np.empty(self.padded_shape, grad.dtype)
            for offset, target in enumerate(_window_slices(grad_x, spec.kernel_size, spec.stride, grad.shape[2:])):
                target[...] = grad * (self.argmax == offset)  # faster than a ufunc writing to strided out=
        else:
            grad_x = np.zeros(self.padded_shape, grad.dtype)
            for offset, target in enumerate(_window_slices(grad_x, spec.kernel_size, spec.stride, grad.shape[2:])):
                target += grad * (self.argmax == offset)
        return _unpad(grad_x, spec.padding)


class _AvgPool2d(_Layer):
    """Sum of the kh*kw strided slices of the zero-padded input over the divisor: kh*kw, or with
    ``count_include_pad=False`` each window's count of non-padding elements."""

    def _divisor(self, size, out_size):
        spec = self.spec
        if spec.count_include_pad or spec.padding == (0, 0):
            return np.prod(spec.kernel_size)
        # per axis: how many of a window's rows (columns) lie inside the unpadded input
        counts = [
            np.minimum(np.arange(o) * s - p + k, d) - np.maximum(np.arange(o) * s - p, 0)
            for d, o, k, s, p in zip(size, out_size, spec.kernel_size, spec.stride, spec.padding, strict=True)
        ]
        return np.outer(*counts)

    def forward(self, x, training, record):
        spec = self.spec
        size = x.shape[2:]
        x = _pad(x, spec.padding)
        out_size = _pooled_size(x.shape, spec)
        slices = _window_slices(x, spec.kernel_size, spec.stride, out_size)
        out = next(slices).copy()
        for candidate in slices:
            out += candidate
        divisor = self._divisor(size, out_size)
        out /= np.asarray(divisor, out.dtype)
        if record:
            self.divisor, self.padded_shape = divisor, x.shape
        return out

    def backward(self, grad, need_input_grad):
        spec = self.spec
        grad = grad / np.asarray(self.divisor, grad.dtype)
        grad_x = np.zeros(self.padded_shape, grad.dtype)
        for target in _window_slices(grad_x, spec.kernel_size, spec.stride, grad.shape[2:]):
            target += grad
        return _unpad(grad_x, spec.padding)


def _adaptive_bins(size, out):
    """(out, size) averaging matrix of PyTorch's adaptive bins along one axis: row ``i`` is
    ``1/len`` over ``floor(i*size/out) .. ceil((i+1)*size/out)``."""
    starts = np.arange(out) * size // out
    ends = -(-(np.arange(out) + 1) * size // out)
    positions = np.arange(size)
    inside = (positions >= starts[:, None]) & (positions < ends[:, None])
    return inside / (ends - starts)[:, None]


class _AdaptiveAvgPool2d(_Layer):
    """Output size 1: the mean over H and W. Otherwise bin averages are separable, so
    ``rows @ x @ cols.T`` with the two axes' averaging matrices (``_adaptive_bins``)."""

    def forward(self, x, training, record):
        if record:
            self.input_shape = x.shape
        if self.spec.output_size == (1, 1):
            return x.mean((2, 3), keepdims=True)
        (h, w), (oh, ow) = x.shape[2:], self.spec.output_size
        rows, cols = _adaptive_bins(h, oh).astype(x.dtype), _adaptive_bins(w, ow).astype(x.dtype)
        if record:
            self.rows, self.cols = rows, cols
        return rows @ x @ cols.T

    def backward(self, grad, need_input_grad):
        if self.spec.output_size == (1, 1):
            h, w = self.input_shape[2:]
            return np.broadcast_to(grad / (h * w), self.input_shape).copy()
        return self.rows.T @ grad @ self.cols


class _Upsample(_Layer):
    """Separable: ``rows @ x @ cols.T`` with each axis' interpolation matrix (PyTorch's index
    rules, :mod:`unitrain.upsampling`), whose transposes give the input gradient."""

    def forward(self, x, training, record):
        (h, w), (oh, ow) = x.shape[2:], self.spec.output_shape(x.shape[1:])[1:]
        rows = interpolation_matrix(self.spec, 0, h, oh, x.dtype)
        cols = interpolation_matrix(self.spec, 1, w, ow, x.dtype)
        if record:
            self.rows, self.cols = rows, cols
        return rows @ x @ cols.T

    def backward(self, grad, need_input_grad):
        return self.rows.T @ grad @ self.cols


class _BatchNorm(_Layer):
    def forward(self, x, training, record):
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)  # broadcasts per-channel vectors over N(, H, W)
        weight, bias = self.params["weight"].reshape(shape), self.params["bias"].reshape(shape)
        if training:
            count = x.size // x.shape[1]
            if count < 2:
                raise InputError(f"{self.spec} needs more than one value per channel in training, got {x.shape}")
            mean = x.mean(axes, keepdims=True)
            centered = x - mean
            squares = np.square(centered).sum(axes)
            inv_std = 1 / np.sqrt(squares.reshape(shape) / count + self.spec.eps)
            self._update_running(mean.reshape(-1), squares / (count - 1))
            x_hat = centered
            x_hat *= inv_std
        else:
            inv_std = 1 / np.sqrt(self.buffers["running_var"].reshape(shape) + self.spec.eps)
            x_hat = (x - self.buffers["running_mean"].reshape(shape)) * inv_std
        if record:
            self.x_hat, self.inv_std, self.batch_stats = x_hat, inv_std, training
        return x_hat * weight + bias

    def _update_running(self, mean, unbiased_var):
        momentum = self.spec.momentum
        self.buffers["running_mean"][...] = momentum * mean + (1 - momentum) * self.buffers["running_mean"]
        self.buffers["running_var"][...] = momentum * unbiased_var + (1 - momentum) * self.buffers["running_var"]
        self.buffers["num_batches_tracked"] += 1

    def backward(self, grad, need_input_grad):
        axes = (0, *range(2, grad.ndim))
        shape = self.inv_std.shape
        grad_weight = (grad * self.x_hat).sum(axes)
        grad_bias = grad.sum(axes)
        self.grads["weight"] += grad_weight
        self.grads["bias"] += grad_bias
        if not need_input_grad:
            return None
        scale = self.params["weight"].reshape(shape) * self.inv_std
        if not self.batch_stats:
            return grad * scale
        # the batch mean and variance depend on x too: dx = w/std * (g - mean(g) - x_hat * mean(g * x_hat))
        count = grad.size // grad.shape[1]
        grad_x = self.x_hat * (grad_weight / count).reshape(shape)
        grad_x += (grad_bias / count).reshape(shape)
        np.subtract(grad, grad_x, out=grad_x)
        grad_x *= scale
        return grad_x


class _LayerNorm(_Layer):
    """Per sample over the trailing ``normalized_shape`` dims: ``x_hat = (x - mean) / std``
    (biased variance), ``x_hat * weight + bias``; backward as BatchNorm's over those dims."""

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        self.keeps_output = not spec.elementwise_affine  # then the output is the kept x_hat

    def forward(self, x, training, record):
        axes = tuple(range(-len(self.spec.normalized_shape), 0))
        centered = x - x.mean(axes, keepdims=True)
        inv_std = 1 / np.sqrt(np.square(centered).mean(axes, keepdims=True) + self.spec.eps)
        x_hat = centered
        x_hat *= inv_std
        if record:
            self.x_hat, self.inv_std, self.axes = x_hat, inv_std, axes
        if not self.params:
            return x_hat
        return x_hat * self.params["weight"] + self.params["bias"]

    def backward(self, grad, need_input_grad):
        leading = tuple(range(grad.ndim - len(self.axes)))
        if self.params:
            self.grads["weight"] += (grad * self.x_hat).sum(leading)
            self.grads["bias"] += grad.sum(leading)
            grad = grad * self.params["weight"]
        if not need_input_grad:
            return None
        # dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std, means over the normalised dims
        grad_x = self.x_hat * (grad * self.x_hat).mean(self.axes, keepdims=True)
        grad_x += grad.mean(self.axes, keepdims=True)
        np.subtract(grad, grad_x, out=grad_x)
        grad_x *= self.inv_std
        return grad_x


class _ReLU(_Layer):
    keeps_output = True

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        #: set when the input is an array this pass made that nothing else reads (see ``_build``)
        self.in_place = False

    def forward(self, x, training, record):
        out = np.maximum(x, 0, out=x if self.in_place else None)
        if record:
            self.out = out
        return out

    def backward(self, grad, need_input_grad):
        grad *= self.out > 0
        return grad


class _Identity(_Layer):
    passes_input = True

    def forward(self, x, training, record):
        return x

    def backward(self, grad, need_input_grad):
        return grad


class _Tanh(_Layer):
    keeps_output = True

    def forward(self, x, training, record):
        out = np.tanh(x)
        if record:
            self.out = out
        return out

    def backward(self, grad, need_input_grad):
        grad *= 1 - np.square(self.out)
        return grad


class _Sigmoid(_Layer):
    keeps_output = True

    def forward(self, x, training, record):
        out = _sigmoid(x)
        if record:
            self.out = out
        return out

    def backward(self, grad, need_input_grad):
        grad *= self.out * (1 - self.out)
        return grad


class _SiLU(_Layer):
    def forward(self, x, training, record):
        sigmoid = _sigmoid(x)
        if record:
            self.x, self.sigmoid = x, sigmoid
        return x * sigmoid

    def backward(self, grad, need_input_grad):
        # d/dx x*s(x) = s * (1 + x * (1 - s))
        grad *= self.sigmoid * (1 + self.x * (1 - self.sigmoid))
        return grad


#: Cephes' rational approximations of erfc (S. L. Moshier, ndtr.c): erf(x) = x*T(x^2)/U(x^2)
#: for |x| < 1, erfc(x) = exp(-x^2)*P(x)/Q(x) for 1 <= x < 8 and exp(-x^2)*R(x)/S(x) beyond;
#: relative error below 1e-15 in float64 (checked against math.erf in the tests). Written out
#: because NumPy has no erf and SciPy is not a dependency; vectorised, ~20x faster than
#: applying math.erf element by element.
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)  # fmt: skip
_ERF_U = (1.0, 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)  # fmt: skip
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)  # fmt: skip
_ERFC_Q = (1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)  # fmt: skip
_ERFC_R = (5.64189583547755073984e-1, 1.27536670759978104416e0, 5.01905042251180477414e0,
           6.16021097993053585195e0, 7.40974269950448939160e0, 2.97886665372100240670e0)  # fmt: skip
_ERFC_S = (1.0, 2.26052863220117276590e0, 9.39603524938001434673e0, 1.20489539808096656605e1,
           1.70814450747565897222e1, 9.60896809063285878198e0, 3.36907645100081516050e0)  # fmt: skip


def _rational(numerator, denominator, x):
    """``numerator(x) / denominator(x)``, coefficients from the highest power (Horner)."""
    return np.polyval(np.asarray(numerator, x.dtype), x) / np.polyval(np.asarray(denominator, x.dtype), x)


def _erfc(x):
    """The complementary error function, elementwise, in ``x``'s floating dtype."""
    magnitude = np.abs(x)
    out = np.empty_like(x)
    near = (magnitude < 1).nonzero()
    out[near] = 1 - x[near] * _rational(_ERF_T, _ERF_U, np.square(x[near]))
    bands = (
        ((magnitude >= 1) & (magnitude < 8), _ERFC_P, _ERFC_Q),
        (~(magnitude < 8), _ERFC_R, _ERFC_S),  # NaN lands here and stays NaN
    )
    for band, numerator, denominator in bands:
        index = band.nonzero()
        # erfc underflows to 0 beyond 27 even in float64; the clip keeps the polynomials finite
        a = np.minimum(magnitude[index], 30)
        tail = np.exp(-np.square(a)) * _rational(numerator, denominator, a)
        out[index] = np.where(x[index] < 0, 2 - tail, tail)
    return out


class _GELU(_Layer):
    """``x * Phi(x)``: exact, ``Phi(x) = erfc(-x/sqrt(2))/2`` (accurate for either sign), or the
    tanh approximation. Gradients: ``Phi(x) + x * phi(x)``, and the tanh form's derivative."""

    def forward(self, x, training, record):
        if self.spec.approximate == "tanh":
            inner = np.sqrt(2 / np.pi).astype(x.dtype) * (x + 0.044715 * x**3)
            cdf = 0.5 * (1 + np.tanh(inner))
        else:
            cdf = 0.5 * _erfc(x * -np.sqrt(0.5).astype(x.dtype))
        if record:
            self.x, self.cdf = x, cdf
        return x * cdf

    def backward(self, grad, need_input_grad):
        x, cdf = self.x, self.cdf
        if self.spec.approximate == "tanh":
            # d/dx 0.5*x*(1 + tanh(u)) = cdf + x * (1 - tanh(u)^2)/2 * u',  tanh(u) = 2*cdf - 1
            tanh = 2 * cdf - 1
            slope = np.sqrt(2 / np.pi).astype(x.dtype) * (1 + 3 * 0.044715 * np.square(x))
            grad *= cdf + 0.5 * x * (1 - np.square(tanh)) * slope
        else:
            density = np.exp(-0.5 * np.square(x)) / np.sqrt(2 * np.pi).astype(x.dtype)
            grad *= cdf + x * density
        return grad


class _LeakyReLU(_Layer):
    def forward(self, x, training, record):
        positive = x > 0
        if record:
            self.positive = positive
        return np.where(positive, x, x * self.spec.negative_slope)

    def backward(self, grad, need_input_grad):
        return np.where(self.positive, grad, grad * self.spec.negative_slope)


class _ELU(_Layer):
    def forward(self, x, training, record):
        negative_part = self.spec.alpha * np.expm1(np.minimum(x, 0))
        if record:
            self.x, self.negative_part = x, negative_part
        return np.where(x > 0, x, negative_part)

    def backward(self, grad, need_input_grad):
        # below zero d/dx alpha*(exp(x) - 1) = alpha*exp(x) = output + alpha
        return np.where(self.x > 0, grad, grad * (self.negative_part + self.spec.alpha))


def _log_softmax(x, axis):
    shifted = x - x.max(axis, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis, keepdims=True))
    return shifted


class _Softmax(_Layer):
    keeps_output = True

    def forward(self, x, training, record):
        out = np.exp(_log_softmax(x, self.spec.dim))
        if record:
            self.out = out
        return out

    def backward(self, grad, need_input_grad):
        # s * (g - sum(g * s)) along the softmax axis
        grad -= (grad * self.out).sum(self.spec.dim, keepdims=True)
        grad *= self.out
        return grad


class _LogSoftmax(_Layer):
    keeps_output = True

    def forward(self, x, training, record):
        out = _log_softmax(x, self.spec.dim)
        if record:
            self.out = out
        return out

    def backward(self, grad, need_input_grad):
        # g - softmax * sum(g) along the axis
        return grad - np.exp(self.out) * grad.sum(self.spec.dim, keepdims=True)


class _Flatten(_Layer):
    passes_input = True

    def forward(self, x, training, record):
        if record:
            self.input_shape = x.shape
        start, end = self.spec.flattened_dims(x.ndim)
        return x.reshape(*x.shape[:start], -1, *x.shape[end + 1 :])

    def backward(self, grad, need_input_grad):
        return grad.reshape(self.input_shape)


class _Dropout(_Layer):
    passes_input = True  # in eval mode and with p == 0

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        self.rng = rng

    def forward(self, x, training, record):
        scale = dropout_mask(self.rng, x.shape, self.spec.p, x.dtype) if training and self.spec.p else None
        if record:
            self.scale = scale
        return x if scale is None else x * scale

    def backward(self, grad, need_input_grad):
        if self.scale is not None:
            grad *= self.scale
        return grad


class _Through2d(_Layer):
    """A 1-d layer run as its 2-d twin (``spec.as_2d()``) over (N, C, 1, L); its parameters and
    gradients are views of the twin's, in the 1-d layer's shapes."""

    def __init__(self, spec, dtype, rng):
        self.spec = spec
        self.inner = _LAYERS[type(spec.as_2d())](spec.as_2d(), dtype, rng)
        self.keeps_output, self.passes_input = self.inner.keeps_output, self.inner.passes_input
        shapes = spec.param_shapes()
        self.params = {key: value.reshape(shapes[key]) for key, value in self.inner.params.items()}
        self.grads = {key: value.reshape(shapes[key]) for key, value in self.inner.grads.items()}
        self.buffers = {}

    def forward(self, x, training, record):
        return self.inner.forward(x[:, :, None, :], training, record)[:, :, 0, :]

    def backward(self, grad, need_input_grad):
        grad = self.inner.backward(grad[:, :, None, :], need_input_grad)
        return None if grad is None else grad[:, :, 0, :]


_LAYERS = {
    Embedding: _Embedding,
    RNN: _Recurrent,
    LSTM: _Recurrent,
    GRU: _Recurrent,
    Conv1d: _Through2d,
    MaxPool1d: _Through2d,
    AvgPool1d: _Through2d,
    AdaptiveAvgPool1d: _Through2d,
    Linear: _Linear,
    Conv2d: _Conv2d,
    ConvTranspose2d: _ConvTranspose2d,
    MaxPool2d: _MaxPool2d,
    AvgPool2d: _AvgPool2d,
    AdaptiveAvgPool2d: _AdaptiveAvgPool2d,
    Upsample: _Upsample,
    BatchNorm1d: _BatchNorm,
    BatchNorm2d: _BatchNorm,
    LayerNorm: _LayerNorm,
    Identity: _Identity,
    ReLU: _ReLU,
    Tanh: _Tanh,
    Sigmoid: _Sigmoid,
    SiLU: _SiLU,
    GELU: _GELU,
    LeakyReLU: _LeakyReLU,
    ELU: _ELU,
    Softmax: _Softmax,
    LogSoftmax: _LogSoftmax,
    Flatten: _Flatten,
    Dropout: _Dropout,
}

# --- containers ----------------------------------------------------------------------------------


class _Sequence:
    def __init__(self, nodes):
        self.nodes = nodes
        # nodes before the first one with parameters need no backward, and it no input gradient
        self.first_trained = next((i for i, node in enumerate(nodes) if node.has_params), len(nodes))
        self.has_params = self.first_trained < len(nodes)

    def forward(self, x, training, record):
        for node in self.nodes:
            x = node.forward(x, training, record)
        return x

    def backward(self, grad, need_input_grad):
        stop = 0 if need_input_grad else self.first_trained
        for index in range(len(self.nodes) - 1, stop - 1, -1):
            grad = self.nodes[index].backward(grad, need_input_grad or index > stop)
        return grad if need_input_grad else None


class _Residual:
    """``post(body(x) + shortcut(x))``; ``shortcut`` None is the identity, ``post`` None nothing."""

    def __init__(self, body, shortcut, post, add_in_place):
        self.body, self.shortcut, self.post = body, shortcut, post
        #: whether the body's output is an array nothing else reads, so the sum can overwrite it
        self.add_in_place = add_in_place
        self.has_params = any(node is not None and node.has_params for node in (body, shortcut, post))

    def forward(self, x, training, record):
        out = self.body.forward(x, training, record)
        skip = x if self.shortcut is None else self.shortcut.forward(x, training, record)
        out = np.add(out, skip, out=out if self.add_in_place else None)
        return out if self.post is None else self.post.forward(out, training, record)

    def backward(self, grad, need_input_grad):
        if self.post is not None:
            grad = self.post.backward(grad, True)
        # both branches receive the same gradient, and a backward may overwrite what it is given
        shared = self.shortcut is not None or need_input_grad
        body_grad = self.body.backward(grad.copy() if shared else grad, need_input_grad)
        if self.shortcut is not None:
            grad = self.shortcut.backward(grad, need_input_grad)
        if not need_input_grad:
            return None
        body_grad += grad
        return body_grad


def _build(spec, leaves, private, make_leaf=None):
    """The node tree of ``spec``, taking its leaves in ``named_layers`` order from ``leaves``.
    ``private``: whether the node's input is an array this pass made that nothing else reads
    (so a ReLU may overwrite it). Returns the node and the same property of its output.
    ``make_leaf(spec)`` builds a graph's activation functions."""
    if isinstance(spec, Graph):
        return numpy_graph.build(spec, leaves, lambda *a: _build(*a, make_leaf), make_leaf), False
    if isinstance(spec, Sequential):
        nodes = []
        for _, child in spec.children:
            node, private = _build(child, leaves, private, make_leaf)
            nodes.append(node)
        return _Sequence(nodes), private
    if isinstance(spec, Residual):
        body, body_private = _build(spec.body, leaves, False, make_leaf)  # x feeds the shortcut too
        shortcut = None if spec.shortcut is None else _build(spec.shortcut, leaves, False, make_leaf)[0]
        post, private = (None, True) if spec.post is None else _build(spec.post, leaves, True, make_leaf)
        return _Residual(body, shortcut, post, body_private), private
    layer = next(leaves)
    assert layer.spec is spec, "the tree walk must visit leaves in named_layers order"
    if isinstance(layer, _ReLU):
        layer.in_place = private
    return layer, private if layer.passes_input else not layer.keeps_output


# --- losses --------------------------------------------------------------------------------------


def _class_terms(spec, pred, y):
    """CrossEntropyLoss and NLLLoss: the terms that count and the gradient function. Extra axes,
    ``(N, C, d1, ...)``, are rows of their own (classes moved last); rows whose class index is
    ``ignore_index`` give no term and a zero gradient."""
    if pred.ndim < 2:
        raise InputError(f"{type(spec).__name__} needs predictions of shape (N, classes, ...), got {pred.shape}")
    shape, classes = pred.shape, pred.shape[1]
    if pred.ndim > 2:
        pred, y = _classes_last(pred), (_classes_last(y) if y.dtype.kind == "f" else y.reshape(-1))
    terms, grad = _class_rows(spec, pred, y)
    ignored = None if y.dtype.kind == "f" else y == spec.ignore_index
    if ignored is not None and ignored.any():
        terms = terms[~ignored]
        row_grad = grad

        def grad(scale):
            g = row_grad(scale, np.where(ignored, 0, y))
            g[ignored] = 0
            return g

    if len(shape) == 2:
        return terms, grad
    moved = (shape[0], *shape[2:], classes)
    return terms, lambda scale: np.moveaxis(grad(scale).reshape(moved), -1, 1)


def _classes_last(values):
    """``(N, C, d1, ...)`` as rows ``(N * d1 * ..., C)``."""
    return np.moveaxis(values, 1, -1).reshape(-1, values.shape[1])


def _class_rows(spec, pred, y):
    """Per-row terms of (N, C) predictions and ``grad(scale, labels=y)``."""
    rows = np.arange(len(y))
    if isinstance(spec, NLLLoss):

        def grad(scale, labels=y):
            g = np.zeros_like(pred)
            g[rows, labels] = -scale
            return g

        return -pred[rows, np.where(y == spec.ignore_index, 0, y)], grad
    log_probs = _log_softmax(pred, 1)
    smoothing, classes = spec.label_smoothing, pred.shape[1]
    if y.dtype.kind == "f":  # class probabilities, shaped like pred (checked by the core)
        target = y * (1 - smoothing) + smoothing / classes if smoothing else y
        terms = -(target * log_probs).sum(1)

        def grad(scale):  # softmax * sum(target) - target
            g = np.exp(log_probs)
            g *= target.sum(1, keepdims=True)
            g -= target
            g *= scale
            return g

        return terms, grad
    terms = -log_probs[rows, np.where(y == spec.ignore_index, 0, y)]
    if smoothing:
        terms = (1 - smoothing) * terms - smoothing / classes * log_probs.sum(1)

    def grad(scale, labels=y):  # softmax - ((1 - smoothing) * one_hot + smoothing / classes)
        g = np.exp(log_probs)
        g[rows, labels] -= 1 - smoothing
        if smoothing:
            g -= smoothing / classes
        g *= scale
        return g

    return terms, grad


def _elementwise_terms(spec, pred, y):
    """Losses on targets shaped like the predictions (checked by the core): per-element losses and
    the gradient function."""
    if isinstance(spec, BCEWithLogitsLoss):
        # max(p, 0) - p*t + log(1 + exp(-|p|)); gradient sigmoid(p) - t
        return np.maximum(pred, 0) - pred * y + np.log1p(np.exp(-np.abs(pred))), lambda s: (_sigmoid(pred) - y) * s
    if isinstance(spec, BCELoss):
        # PyTorch's forward, logs floored at -100, and its gradient, finite at 0 and 1
        floor = pred.dtype.type(BCE_LOG_FLOOR)
        with np.errstate(divide="ignore"):  # log(0) is -inf, floored right here
            terms = (y - 1) * np.maximum(np.log1p(-pred), floor) - y * np.maximum(np.log(pred), floor)
        return terms, lambda s: (pred - y) / np.maximum((1 - pred) * pred, pred.dtype.type(BCE_GRAD_EPSILON)) * s
    diff = pred - y
    if isinstance(spec, MSELoss):
        return diff * diff, lambda scale: diff * (2 * scale)
    if isinstance(spec, L1Loss) or (isinstance(spec, SmoothL1Loss) and spec.beta == 0):
        return np.abs(diff), lambda scale: np.sign(diff) * scale
    # SmoothL1Loss(beta) is HuberLoss(delta=beta) / beta; both quadratic inside, linear outside
    width = spec.beta if isinstance(spec, SmoothL1Loss) else spec.delta
    divisor = spec.beta if isinstance(spec, SmoothL1Loss) else 1.0
    magnitude = np.abs(diff)
    inside = magnitude < width
    terms = np.where(inside, 0.5 * diff * diff, width * (magnitude - 0.5 * width)) / diff.dtype.type(divisor)
    return terms, lambda scale: np.where(inside, diff, width * np.sign(diff)) * (scale / divisor)


_ELEMENTWISE_LOSSES = (MSELoss, L1Loss, BCEWithLogitsLoss, BCELoss, SmoothL1Loss, HuberLoss)


def _loss_terms(spec, pred, y):
    """Per-sample (elementwise losses: per-element) losses and a function returning the gradient
    of their sum times ``scale`` with respect to ``pred`` (a fresh array on every call)."""
    if isinstance(spec, _ELEMENTWISE_LOSSES):
        return _elementwise_terms(spec, pred, y)
    return _class_terms(spec, pred, y)


class _Origin:
    """What the gradient of a loss needs: the gradient function of the forward it came from."""

    __slots__ = ("forward_id", "grad")

    def __init__(self, grad, forward_id):
        self.grad, self.forward_id = grad, forward_id


class LossValue(LossExpression):
    """A loss as returned by :meth:`NumpyLoop.loss`: a 0-d value (``float()`` reads it) that takes
    arithmetic as torch's loss does (see :mod:`unitrain.loss_value`), and carries the gradient
    with respect to the predictions of the forward it came from."""

    __slots__ = ()

    def __init__(self, value, grad, forward_id):
        super().__init__(value, _Origin(grad, forward_id))


def _quiet(method):
    """Runs ``method`` without NumPy's overflow/invalid warnings. A diverging run is reported
    from its NaN/Inf loss (as every framework does); the warnings would only repeat it."""

    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return method(*args, **kwargs)

    return quiet


class NumpyLoop(TrainingLoop):
    name = "numpy"
    capabilities = frozenset({
        "dropout", "batchnorm", "conv", "float64", "random-state",
        "residual", "activations", "layernorm", "pooling", "losses", "custom-loss", "optimizers", "clipping",
        "distributed", "training-controls", "graph", "sequences",
    })  # fmt: skip

    def _build(self, model):
        self._rng = dropout_stream(self.seed, self.rank)
        named = list(model.named_layers())
        leaves = [_LAYERS[type(spec)](spec, self.dtype, self._rng) for _, spec in named]
        make_leaf = lambda spec: _LAYERS[type(spec)](spec, self.dtype, self._rng)  # noqa: E731
        self._root, _ = _build(model, iter(leaves), False, make_leaf)
        self._params, self._grads, self._state = {}, {}, {}
        for (prefix, _), layer in zip(named, leaves, strict=True):
            for key, value in {**layer.params, **layer.buffers}.items():
                self._state[f"{prefix}.{key}"] = value
            for key in layer.params:
                self._params[f"{prefix}.{key}"] = layer.params[key]
                self._grads[f"{prefix}.{key}"] = layer.grads[key]
        self._optimizer_state: dict[str, np.ndarray] = {}
        self._resolve_controls(self._params)
        self._mode = True
        self._forward_id = 0

    def _set_training(self, mode):
        self._mode = mode

    def _zero_grad(self):
        for grad in self._grads.values():
            grad.fill(0)

    @_quiet
    def _run(self, x, record):
        return self._root.forward(x, self._mode, record)

    def _forward(self, x):
        self._forward_id += 1
        return self._run(x, record=True)

    @_quiet
    def _loss(self, pred, y):
        if isinstance(self.loss_spec, PerOutputLoss):  # PyTorch's loss1(out1, y1) + loss2(out2, y2)
            parts = [self._loss_value(*part) for part in zip(self.loss_spec.losses, pred, y, strict=True)]
            value = functools.reduce(lambda a, b: a + b, (value for value, _ in parts))
            return LossValue(value, lambda: tuple(grad() for _, grad in parts), self._forward_id)
        return LossValue(*self._loss_value(self.loss_spec, pred, y), self._forward_id)

    def _loss_value(self, spec, pred, y):
        """One loss's value and a function giving its gradient with respect to ``pred``."""
        if isinstance(spec, CustomLoss):
            value, grad = expr.numpy_value_and_grad(spec.tree, pred, y)
            return self.dtype.type(value), grad.copy
        terms, grad = _loss_terms(spec, pred, y)
        value = terms.sum()
        if spec.reduction == "mean":
            value /= self.dtype.type(terms.size)  # a NumPy 1.x float32 scalar over a Python int gives float64
            return value, lambda: grad(1 / terms.size)
        return value, lambda: grad(1)

    @_quiet
    def _backward(self, loss):
        if not isinstance(loss, LossValue) or loss.origin.forward_id != self._forward_id:
            raise RuntimeError("backward() needs the loss of the latest forward(); only its intermediates are kept")
        grad = loss.origin.grad()
        if loss.slope != 1:  # an expression of the loss: the chain rule's factor
            grad *= self.dtype.type(loss.slope)
        self._root.backward(grad, False)

    @_quiet
    def _update(self):
        state = self._optimizer_state
        self._clip_gradients()
        for group in self.param_groups:
            spec, names = group.spec, group.spec.state_names
            for name in group.names:
                param = self._params[name]
                keys = [f"{name}.{buffer}" for buffer in names]
                if keys and keys[0] not in state and not starts_as_gradient(spec):
                    for key, buffer in zip(keys, names, strict=True):
                        state[key] = np.full_like(param, initial_buffer_value(spec, buffer))
                buffers = tuple(state.get(key) for key in keys)
                _, buffers = optimizer_update(
                    spec, param, self._grads[name], buffers, self.step_count + 1, group.lr, np.sqrt, True,
                    group.momentum,
                )  # fmt: skip
                state.update(zip(keys, buffers, strict=True))

    def _scale_gradients(self, factor):
        for grad in self._grads.values():
            grad *= self.dtype.type(factor)

    def _clip_gradients(self):
        grads = [grad for name, grad in self._grads.items() if name not in self.frozen]
        if self.clip_grad_value is not None:
            for grad in grads:
                np.clip(grad, -self.clip_grad_value, self.clip_grad_value, out=grad)
        elif self.clip_grad_norm is not None and grads:
            norms = [np.linalg.norm(grad.reshape(-1)) for grad in grads]
            scale = clip_grad_norm_scale(norms, self.clip_grad_norm, np.sqrt, np.minimum).astype(self.dtype)
            for grad in grads:
                grad *= scale

    def _set_lr(self, lr):
        pass  # each update reads its group's lr

    def _set_momentum(self, momentum):
        pass  # each update reads its group's momentum

    def _step(self, x, y):
        self._zero_grad()
        self._step_pred = self._forward(x)
        loss = self._loss(self._step_pred, y)
        self._backward(loss)
        self._update()
        return loss.value

    def _step_correct(self, y):
        return self._count_correct(self._step_pred, y)

    def _count_correct(self, pred, y):
        return int((pred.argmax(1) == y).sum())

    def _predict(self, x):
        return self._run(x, record=False)

    def _evaluate_batch(self, x, y):
        pred = self._run(x, record=False)
        if isinstance(self.loss_spec, PerOutputLoss):
            sums = [_loss_terms(spec, p, t)[0].sum(dtype=np.float64) for spec, p, t in zip(self.loss_spec.losses,
                    pred, y, strict=True)]  # fmt: skip
            return tuple(map(float, sums)), 0
        terms, _ = _loss_terms(self.loss_spec, pred, y)
        correct = int((pred.argmax(1) == y).sum()) if y.dtype.kind in "iu" else 0
        return float(terms.sum(dtype=np.float64)), correct

    def _gradients(self):
        return {name: grad.copy() for name, grad in self._grads.items()}

    def _state_dict(self):
        return {name: value.copy() for name, value in self._state.items()}

    def _load_state_dict(self, state):
        for name, value in state.items():
            self._state[name][...] = value

    def _optimizer_state_dict(self):
        state = {name: value.copy() for name, value in self._optimizer_state.items()}
        return {"step": np.array(self.step_count, np.int64), **state}

    def _load_optimizer_state_dict(self, state):
        self._optimizer_state = {key: np.array(value) for key, value in state.items() if key != "step"}

    # --- data parallel: MPI through mpi4py (launched by mpiexec) ------------------------------

    def _setup_distributed(self):
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        return self._comm.Get_rank(), self._comm.Get_size()

    def _reduce_gradients(self, weight):
        from mpi4py import MPI

        grads = list(self._grads.values())
        flat = np.concatenate([grad.ravel() for grad in grads])  # one allreduce for all parameters
        flat *= self.dtype.type(weight)
        self._comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        offset = 0
        for grad in grads:
            grad[...] = flat[offset : offset + grad.size].reshape(grad.shape)
            offset += grad.size

    def _all_sum(self, values):
        from mpi4py import MPI

        total = np.empty_like(values)
        self._comm.Allreduce(values, total, op=MPI.SUM)
        return total

    def _random_state(self):
        return stream_state(self._rng)

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)
