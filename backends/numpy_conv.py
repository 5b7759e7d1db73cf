"""The NumPy adapter's convolution and pooling layers (2-d; the 1-d ones run through them as
(N, C, 1, L)): im2col convolutions and their transposes, max, average and adaptive pooling, each
with its backward written by hand.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from unitrain.backends.numpy_sequences import _Freezable, _Layer, _scratch


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


def _is_batch_last(array):
    """Whether an (N, C, H, W) array's memory is laid out (C, H, W, N), as :class:`_Conv2d` leaves it."""
    return not array.flags.c_contiguous and array.transpose(1, 2, 3, 0).flags.c_contiguous


def _new(shape, dtype, batch_last, fill=np.empty):
    """A new (N, C, H, W) array, laid out (C, H, W, N) in memory if ``batch_last``."""
    if not batch_last:
        return fill(shape, dtype)
    return fill((*shape[1:], shape[0]), dtype).transpose(3, 0, 1, 2)


class _Convolution(_Freezable):
    """A convolution's weight and its gradient as one matrix per group ``(groups, rows / groups, -1)``:
    views of the arrays, taken again by :meth:`bind_weight` when a tie (``numpy_graph.tie``) hands
    the layer another layer's arrays."""

    def __init__(self, spec, dtype, rng, rows):
        super().__init__(spec, dtype, rng)
        self._matrix_shape = (spec.groups, rows // spec.groups, -1)
        self.bind_weight()

    def bind_weight(self):
        self.matrix = self.params["weight"].reshape(self._matrix_shape)
        self.grad_matrix = self.grads["weight"].reshape(self._matrix_shape)


class _Conv2d(_Convolution):
    """im2col in one layout for the forward and both gradients, with the batch innermost: the
    columns are ``(C/groups*kh*kw, OH*OW*N)`` per group, and arrays travel through the layer as
    (N, C, H, W) views of memory laid out (C, H, W, N). With the batch innermost, each kernel
    offset's block of the input is a run of ``OW*N`` contiguous values, so im2col and its
    transpose (col2im: the input gradient added back offset by offset) copy long runs, and the
    three matrix products take contiguous operands without transposing copies. The output stays
    in that layout (the ReLU and pooling after it work on it as they are, :class:`_MaxPool2d`
    keeping it); an input or gradient that arrives in NumPy's usual layout is copied once.
    The columns of a training forward are kept for the backward in a buffer reused across steps."""

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng, spec.out_channels)

    def forward(self, x, training, record):
        spec = self.spec
        (ph, pw), groups = spec.padding, spec.groups
        n, c, h, w = x.shape
        padded_shape = (n, c, h + 2 * ph, w + 2 * pw)
        if ph or pw or not x.transpose(1, 2, 3, 0).flags.c_contiguous:
            # zero borders: only the inside of this buffer is ever written
            padded = _scratch(self, "_padded", (*padded_shape[1:], n), x.dtype).transpose(3, 0, 1, 2)
            padded[:, :, ph : ph + h, pw : pw + w] = x
            x = padded
        oh, ow = spec.output_shape((c, h, w))[1:]
        (kh, kw) = spec.kernel_size
        shape = (c, kh, kw, oh, ow, n)
        cols = _scratch(self, "_cols", shape, x.dtype) if record else np.empty(shape, x.dtype)
        windows = _window_slices(x, spec.kernel_size, spec.stride, (oh, ow), spec.dilation)
        for offset, window in enumerate(windows):
            np.copyto(cols[:, offset // kw, offset % kw].transpose(3, 0, 1, 2), window)
        cols = cols.reshape(groups, -1, oh * ow * n)
        out = np.matmul(self.matrix, cols).reshape(-1, oh, ow, n)
        if "bias" in self.params:
            out += self.params["bias"][:, None, None, None]
        if record:
            self.cols, self.padded_shape = cols, padded_shape
        return out.transpose(3, 0, 1, 2)

    def backward(self, grad, need_input_grad):
        spec, groups = self.spec, self.spec.groups
        n, o, oh, ow = grad.shape
        rows = grad.transpose(1, 2, 3, 0)
        if not rows.flags.c_contiguous:  # a gradient in NumPy's usual layout (after a Flatten)
            rows = _scratch(self, "_grad_rows", rows.shape, rows.dtype)
            np.copyto(rows, grad.transpose(1, 2, 3, 0))
        rows = rows.reshape(groups, -1, oh * ow * n)
        if "bias" in self.grads:
            self.grads["bias"] += rows.reshape(o, -1).sum(1)
        if "weight" in self.grads:
            self.grad_matrix += rows @ self.cols.transpose(0, 2, 1)
        if not need_input_grad:
            return None
        c = self.padded_shape[1]
        (kh, kw) = spec.kernel_size
        grad_cols = _scratch(self, "_grad_cols", self.cols.shape, grad.dtype)
        np.matmul(self.matrix.transpose(0, 2, 1), rows, out=grad_cols)
        grad_cols = grad_cols.reshape(c, kh, kw, oh, ow, n)
        # col2im: add each kernel offset's columns back onto the input positions it read
        grad_x = _new(self.padded_shape, grad.dtype, True, np.zeros)
        targets = _window_slices(grad_x, spec.kernel_size, spec.stride, (oh, ow), spec.dilation)
        for offset, target in enumerate(targets):
            target += grad_cols[:, offset // kw, offset % kw].transpose(3, 0, 1, 2)
        return _unpad(grad_x, spec.padding)


class _ConvTranspose2d(_Convolution):
    """The transpose of ``_Conv2d``: forward is its col2im (each input pixel's kernel, weighted per
    group by the ``(in/groups, out/groups*kh*kw)`` weight matrix, added onto the padded output at
    ``stride`` steps, then ``padding`` cut off), backward its im2col (the strided views of the
    padded output gradient, one per kernel offset, give the input and weight gradients)."""

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng, spec.in_channels)

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
        if "weight" in self.grads:
            self.grad_matrix += (self.rows @ cols.transpose(0, 1, 3, 2)).sum(0)
        if not need_input_grad:
            return None
        return (self.matrix @ cols).reshape(n, -1, h, w)


def _along(array, axis, start, stride, count):
    """The view of ``array`` at ``start``, ``start + stride``, ... (``count`` of them) along ``axis``."""
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, start + stride * (count - 1) + 1, stride)
    return array[tuple(index)]


def _max_along(x, axis, kernel, stride, count):
    """Max pooling along one axis: the maxima, and per kernel offset a 0/1 mask of the windows whose
    first maximal element sits there (``None``: all of them, for a kernel of 1). Arrays keep ``x``'s
    memory layout."""
    windows = [_along(x, axis, offset, stride, count) for offset in range(kernel)]
    out = windows[0].copy(order="K")
    for window in windows[1:]:
        np.maximum(out, window, out=out)
    masks, left = [], None  # left: 1 where no earlier offset held the maximum
    for window in windows[:-1]:
        hit = np.equal(window, out).astype(x.dtype)
        if left is None:
            left = 1 - hit
        else:
            hit *= left
            left -= hit
        masks.append(hit)
    return out, [*masks, left]


def _spread_along(grad, masks, axis, stride, size, batch_last):
    """The transpose of :func:`_max_along`: each window's gradient back to its maximal element."""
    kernel, count = len(masks), grad.shape[axis]
    shape = (*grad.shape[:axis], size, *grad.shape[axis + 1 :])
    # windows that tile the axis exactly write every element once: no zeroing, no adding
    tiled = stride == kernel and size == kernel * count
    out = _new(shape, grad.dtype, batch_last, np.empty if tiled else np.zeros)
    for offset, mask in enumerate(masks):
        target = _along(out, axis, offset, stride, count)
        if tiled:
            np.copyto(target, grad) if mask is None else np.multiply(grad, mask, out=target)
        else:
            target += grad if mask is None else grad * mask
    return out


class _MaxPool2d(_Layer):
    """Separable, over the (-inf padded) input: the max over each window's ``kw`` columns, then the
    max of those over its ``kh`` rows, ``kh + kw - 2`` elementwise passes instead of ``kh*kw - 1``.
    Each pass keeps 0/1 masks of where its maxima came from, which route the gradient back: the
    first column with the maximum within each row, then the first such row, is the first maximal
    element in row-major order (PyTorch's tie rule)."""

    def forward(self, x, training, record):
        spec = self.spec
        x = _pad(x, spec.padding, -np.inf)
        (oh, ow), (kh, kw), (sh, sw) = _pooled_size(x.shape, spec), spec.kernel_size, spec.stride
        rows, column_masks = _max_along(x, 3, kw, sw, ow)
        out, row_masks = _max_along(rows, 2, kh, sh, oh)
        if record:
            self.masks, self.padded_shape, self.batch_last = (row_masks, column_masks), x.shape, _is_batch_last(x)
        return out

    def backward(self, grad, need_input_grad):
        (sh, sw), (row_masks, column_masks), (h, w) = self.spec.stride, self.masks, self.padded_shape[2:]
        rows = _spread_along(grad, row_masks, 2, sh, h, self.batch_last)
        return _unpad(_spread_along(rows, column_masks, 3, sw, w, self.batch_last), self.spec.padding)


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
        out = next(slices).copy(order="K")
        for candidate in slices:
            out += candidate
        divisor = self._divisor(size, out_size)
        out /= np.asarray(divisor, out.dtype)
        if record:
            self.divisor, self.padded_shape, self.batch_last = divisor, x.shape, _is_batch_last(x)
        return out

    def backward(self, grad, need_input_grad):
        spec = self.spec
        grad = grad / np.asarray(self.divisor, grad.dtype)
        grad_x = _new(self.padded_shape, grad.dtype, self.batch_last, np.zeros)
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
