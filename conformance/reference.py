"""The independent reference: closed-form float64 NumPy for every layer spec, loss and optimizer.

Written from PyTorch's documented definitions, deliberately without importing anything from the
NumPy backend or :mod:`unitrain.optim`, so that a shared mistake cannot make both agree. Speed
does not matter here; clarity does: convolution and pooling loop over kernel offsets and output
positions, and every backward pass is the textbook derivative of its forward.

A state is a dict of arrays keyed like the equivalent PyTorch model's ``state_dict()``; everything
is computed in float64 whatever the arrays came in as. Custom losses are checked against closed
forms written by hand for the expressions in :data:`CUSTOM_LOSSES`, not by walking their trees.
"""

from __future__ import annotations

import math

import numpy as np

from unitrain import layers, sequences

from . import reference_sequences

# re-exported: checks and tests read the whole reference from this module
from .reference_optim import (  # noqa: F401
    Optimizer,
    adadelta,
    adagrad,
    adam,
    clip_gradients,
    rmsprop,
    sgd,
    sgd_velocity,
)
from .reference_state import (  # noqa: F401
    initial_state,
    random_state,
    torchvision_resnet18_state_shapes,
    write_safetensors,
)

F64 = np.float64


# --- forward and backward of a model tree ------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class Reference:
    """A float64 copy of a model: ``forward`` records what ``backward`` needs; BatchNorm's running
    statistics are updated in ``self.state`` by training forwards, as PyTorch does. The tree is
    walked as the spec describes it: a Sequential applies its children in order, a Residual
    computes ``post(body(x) + shortcut(x))`` and sends the gradient of the sum down both paths."""

    def __init__(self, model: layers.Layer, state: dict[str, np.ndarray]):
        self.model = model
        self.state = {
            key: np.array(value, np.int64 if key.endswith("num_batches_tracked") else F64)
            for key, value in state.items()
        }

    def params(self, name: str, layer: layers.Layer) -> dict[str, np.ndarray]:
        return {key: self.state[f"{name}.{key}"] for key in layer.param_shapes()}

    def forward(self, x: np.ndarray, training: bool = False, dropout_masks: dict | None = None) -> np.ndarray:
        """Output for ``x``; in training, Dropout needs its keep-masks by layer path."""
        self.training, self.masks, self.inputs, self.tapes = training, dropout_masks or {}, {}, {}
        return self._forward(self.model, np.asarray(x, F64), "")

    def _forward(self, node, x, path):
        if isinstance(node, layers.Sequential):
            for name, child in node.children:
                x = self._forward(child, x, _join(path, name))
            return x
        if isinstance(node, layers.Residual):
            total = self._forward(node.body, x, path)
            total = total + (x if node.shortcut is None else self._forward(node.shortcut, x, _join(path, "downsample")))
            return total if node.post is None else self._forward(node.post, total, _join(path, "post"))
        self.inputs[path] = x
        return self._leaf(path, node, x)

    def _leaf(self, name, layer, x):
        p = self.params(name, layer)
        if isinstance(layer, layers.Linear):
            return x @ p["weight"].T + (p["bias"] if layer.bias else 0.0)
        if isinstance(layer, sequences.Embedding):
            return reference_sequences.embedding(p["weight"], x)
        if isinstance(layer, sequences._Recurrent):
            output, _, _, self.tapes[name] = reference_sequences.recurrent(layer, p, x, masks=self.masks.get(name))
            return output
        if isinstance(layer, sequences.Conv1d):  # the 2-d convolution over (N, C, 1, L)
            conv = layer.as_2d()
            weight = p["weight"][:, :, None]
            return conv2d(x[:, :, None], weight, p.get("bias"), conv.stride, conv.padding, conv.dilation, conv.groups)[
                :, :, 0
            ]
        if isinstance(layer, sequences.ONE_D):  # a pool: its 2-d twin over (N, C, 1, L)
            return self._leaf(name, layer.as_2d(), x[:, :, None])[:, :, 0]
        if isinstance(layer, layers.Conv2d):
            return conv2d(x, p["weight"], p.get("bias"), layer.stride, layer.padding, layer.dilation, layer.groups)
        if isinstance(layer, layers.MaxPool2d):
            return max_pool2d(x, layer.kernel_size, layer.stride, layer.padding)[0]
        if isinstance(layer, layers.AvgPool2d):
            return avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding, layer.count_include_pad)
        if isinstance(layer, layers.AdaptiveAvgPool2d):
            return adaptive_avg_pool2d(x, layer.output_size)
        if isinstance(layer, layers.ConvTranspose2d):
            return conv_transpose2d(x, p["weight"], p.get("bias"), layer)
        if isinstance(layer, layers.Upsample):
            rows, cols = upsample_matrices(layer, x.shape[2:])
            return np.einsum("ih,nchw,jw->ncij", rows, x, cols)
        if isinstance(layer, layers.Flatten):
            start, end = (dim % x.ndim for dim in (layer.start_dim, layer.end_dim))
            return x.reshape(*x.shape[:start], -1, *x.shape[end + 1 :])
        if isinstance(layer, layers.Dropout):
            return x * self.masks[name] / (1 - layer.p) if self.training and layer.p > 0 else x
        if isinstance(layer, layers._BatchNorm):
            return self._batch_norm(name, layer, x)
        if isinstance(layer, layers.LayerNorm):
            return layer_norm(x, len(layer.normalized_shape), layer.eps, p.get("weight"), p.get("bias"))[0]
        return activation(layer, x)[0]

    def _batch_norm(self, name, layer, x):
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            count = x.size // x.shape[1]
            mean, var = x.mean(axes), x.var(axes)  # biased variance normalises ...
            m = layer.momentum  # ... the unbiased one feeds the running estimate (PyTorch)
            self.state[f"{name}.running_mean"] = (1 - m) * self.state[f"{name}.running_mean"] + m * mean
            self.state[f"{name}.running_var"] = (1 - m) * self.state[f"{name}.running_var"] + m * var * count / (
                count - 1
            )
            self.state[f"{name}.num_batches_tracked"] = self.state[f"{name}.num_batches_tracked"] + 1
        else:
            mean, var = self.state[f"{name}.running_mean"], self.state[f"{name}.running_var"]
        p = self.params(name, layer)
        x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + layer.eps)
        return x_hat * p["weight"].reshape(shape) + p["bias"].reshape(shape)

    def backward(self, grad: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of every parameter, given the gradient of the loss w.r.t. the last output."""
        self.grads = {}
        self.input_grad = self._backward(self.model, np.asarray(grad, F64), "")
        return self.grads

    def _backward(self, node, grad, path):
        if isinstance(node, layers.Sequential):
            for name, child in reversed(node.children):
                grad = self._backward(child, grad, _join(path, name))
            return grad
        if isinstance(node, layers.Residual):
            if node.post is not None:
                grad = self._backward(node.post, grad, _join(path, "post"))
            body = self._backward(node.body, grad, path)
            return body + (
                grad if node.shortcut is None else self._backward(node.shortcut, grad, _join(path, "downsample"))
            )
        return self._leaf_backward(path, node, self.inputs[path], grad)

    def _leaf_backward(self, name, layer, x, grad):
        p = self.params(name, layer)
        if isinstance(layer, layers.Linear):  # over the last axis: the others are rows
            rows, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            self.grads[f"{name}.weight"] = rows.T @ inputs
            if layer.bias:
                self.grads[f"{name}.bias"] = rows.sum(0)
            return grad @ p["weight"]
        if isinstance(layer, sequences.Embedding):
            self.grads[f"{name}.weight"] = reference_sequences.embedding_backward(
                p["weight"], x, grad, layer.padding_idx
            )
            return np.zeros_like(x)  # token ids have no gradient
        if isinstance(layer, sequences._Recurrent):
            grad_x, grads, _, _ = reference_sequences.recurrent_backward(layer, self.tapes[name], grad)
            self.grads.update({f"{name}.{key}": value for key, value in grads.items()})
            return grad_x
        if isinstance(layer, sequences.Conv1d):
            conv = layer.as_2d()
            grad_x, grad_weight, grad_bias = conv2d_backward(
                x[:, :, None], p["weight"][:, :, None], grad[:, :, None], conv.stride, conv.padding, conv.dilation,
                conv.groups,
            )  # fmt: skip
            self.grads[f"{name}.weight"] = grad_weight[:, :, 0]
            if layer.bias:
                self.grads[f"{name}.bias"] = grad_bias
            return grad_x[:, :, 0]
        if isinstance(layer, sequences.ONE_D):
            return self._leaf_backward(name, layer.as_2d(), x[:, :, None], grad[:, :, None])[:, :, 0]
        if isinstance(layer, layers.Conv2d):
            grad_x, self.grads[f"{name}.weight"], bias_grad = conv2d_backward(
                x, p["weight"], grad, layer.stride, layer.padding, layer.dilation, layer.groups
            )
            if layer.bias:
                self.grads[f"{name}.bias"] = bias_grad
            return grad_x
        if isinstance(layer, layers.MaxPool2d):
            return max_pool2d_backward(x, grad, layer.kernel_size, layer.stride, layer.padding)
        if isinstance(layer, layers.AvgPool2d):
            return avg_pool2d_backward(x, grad, layer.kernel_size, layer.stride, layer.padding, layer.count_include_pad)
        if isinstance(layer, layers.AdaptiveAvgPool2d):
            return adaptive_avg_pool2d_backward(x, grad, layer.output_size)
        if isinstance(layer, layers.ConvTranspose2d):
            grad_x, self.grads[f"{name}.weight"], bias_grad = conv_transpose2d_backward(x, p["weight"], grad, layer)
            if layer.bias:
                self.grads[f"{name}.bias"] = bias_grad
            return grad_x
        if isinstance(layer, layers.Upsample):
            rows, cols = upsample_matrices(layer, x.shape[2:])
            return np.einsum("ih,ncij,jw->nchw", rows, grad, cols)
        if isinstance(layer, layers.Flatten):
            return grad.reshape(x.shape)
        if isinstance(layer, layers.Dropout):
            return grad * self.masks[name] / (1 - layer.p) if self.training and layer.p > 0 else grad
        if isinstance(layer, layers._BatchNorm):
            grad_x, self.grads[f"{name}.weight"], self.grads[f"{name}.bias"] = self._batch_norm_backward(
                name, layer, x, grad
            )
            return grad_x
        if isinstance(layer, layers.LayerNorm):
            rank = len(layer.normalized_shape)
            grad_x, grad_weight, grad_bias = layer_norm_backward(x, grad, rank, layer.eps, p.get("weight"))
            if layer.elementwise_affine:
                self.grads[f"{name}.weight"], self.grads[f"{name}.bias"] = grad_weight, grad_bias
            return grad_x
        if isinstance(layer, (layers.Softmax, layers.LogSoftmax)):
            return softmax_backward(layer, x, grad)
        return grad * activation(layer, x)[1]

    def _batch_norm_backward(self, name, layer, x, grad):
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        weight = self.state[f"{name}.weight"].reshape(shape)
        if not self.training:
            std = np.sqrt(self.state[f"{name}.running_var"].reshape(shape) + layer.eps)
            x_hat = (x - self.state[f"{name}.running_mean"].reshape(shape)) / std
            return grad * weight / std, (grad * x_hat).sum(axes), grad.sum(axes)
        grad_x, x_hat = _normalise_backward(x, grad * weight, axes, layer.eps)
        return grad_x, (grad * x_hat).sum(axes), grad.sum(axes)


def _normalise_backward(x, grad_x_hat, axes, eps):
    """d/dx of ``(x - mean(x)) / sqrt(var(x) + eps)`` (statistics over ``axes``, biased variance),
    contracted with ``grad_x_hat``; also returns ``x_hat``."""
    count = math.prod(x.shape[a] for a in axes)
    mean = x.mean(axes, keepdims=True)
    std = np.sqrt(x.var(axes, keepdims=True) + eps)
    x_hat = (x - mean) / std
    grad_x = (
        grad_x_hat
        - grad_x_hat.sum(axes, keepdims=True) / count
        - x_hat * (grad_x_hat * x_hat).sum(axes, keepdims=True) / count
    ) / std
    return grad_x, x_hat


# --- layers as plain functions ------------------------------------------------------------------


def _pad(x, padding, value=0.0):
    (ph, pw) = padding
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _offsets(kernel, dilation, stride, out):
    """For each kernel offset ``(a, b)``: the row and column slices of the padded input that
    offset multiplies, over every output position."""
    (kh, kw), (dh, dw), (sh, sw), (oh, ow) = kernel, dilation, stride, out
    for a in range(kh):
        for b in range(kw):
            yield a, b, slice(a * dh, a * dh + sh * (oh - 1) + 1, sh), slice(b * dw, b * dw + sw * (ow - 1) + 1, sw)


def _conv_out(x_padded, kernel, dilation, stride):
    sizes = zip(x_padded.shape[2:], kernel, dilation, stride, strict=True)
    return tuple((d - dil * (k - 1) - 1) // s + 1 for d, k, dil, s in sizes)


def conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """``out[n, o, i, j] = bias[o] + sum_{c, a, b} w[o, c, a, b] * x_pad[n, g*C/G + c, i*sh + a*dh, j*sw + b*dw]``
    where ``g = o // (O/G)`` is the output channel's group (``torch.nn.Conv2d``)."""
    xp = _pad(x, padding)
    out_channels, group_in, kh, kw = weight.shape
    group_out = out_channels // groups
    oh, ow = _conv_out(xp, (kh, kw), dilation, stride)
    out = np.zeros((len(x), out_channels, oh, ow))
    for g in range(groups):
        o, c = slice(g * group_out, (g + 1) * group_out), slice(g * group_in, (g + 1) * group_in)
        for a, b, rows, cols in _offsets((kh, kw), dilation, stride, (oh, ow)):
            out[:, o] += np.einsum("nchw,oc->nohw", xp[:, c, rows, cols], weight[o, :, a, b])
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def conv2d_backward(x, weight, grad, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """``(grad_x, grad_weight, grad_bias)`` of :func:`conv2d`."""
    xp = _pad(x, padding)
    out_channels, group_in, kh, kw = weight.shape
    group_out = out_channels // groups
    oh, ow = grad.shape[2:]
    grad_padded, grad_weight = np.zeros_like(xp), np.zeros_like(weight)
    for g in range(groups):
        o, c = slice(g * group_out, (g + 1) * group_out), slice(g * group_in, (g + 1) * group_in)
        for a, b, rows, cols in _offsets((kh, kw), dilation, stride, (oh, ow)):
            grad_weight[o, :, a, b] = np.einsum("nohw,nchw->oc", grad[:, o], xp[:, c, rows, cols])
            grad_padded[:, c, rows, cols] += np.einsum("nohw,oc->nchw", grad[:, o], weight[o, :, a, b])
    (ph, pw), (h, w) = padding, xp.shape[2:]
    return grad_padded[:, :, ph : h - ph, pw : w - pw], grad_weight, grad.sum((0, 2, 3))


def _transposed_offsets(layer, input_size):
    """For each kernel offset ``(a, b)``: the rows and columns of the *padded* output (PyTorch's output
    plus ``padding`` on each side) that input pixel ``(i, j)`` adds ``w[.., a, b]`` times itself to,
    ``i * stride + a * dilation``, over every input position."""
    return _offsets(layer.kernel_size, layer.dilation, layer.stride, input_size)


def conv_transpose2d(x, weight, bias, layer):
    """``torch.nn.ConvTranspose2d``: ``out_pad[n, g*O/G + o, i*sh + a*dh, j*sw + b*dw] += x[n, g*C/G + c, i, j]
    * w[g*C/G + c, o, a, b]``, then ``padding`` rows and columns cut from each side of ``out_pad``, whose
    size is ``(size - 1) * stride + dilation * (k - 1) + 1 + output_padding`` (the last rows only zeros)."""
    channels_in, group_out = weight.shape[:2]
    group_in = channels_in // layer.groups
    (ph, pw), (oh, ow) = layer.padding, layer.output_shape(x.shape[1:])[1:]
    padded = np.zeros((len(x), group_out * layer.groups, oh + 2 * ph, ow + 2 * pw))
    for g in range(layer.groups):
        c, o = slice(g * group_in, (g + 1) * group_in), slice(g * group_out, (g + 1) * group_out)
        for a, b, rows, cols in _transposed_offsets(layer, x.shape[2:]):
            padded[:, o, rows, cols] += np.einsum("nchw,co->nohw", x[:, c], weight[c, :, a, b])
    out = padded[:, :, ph : ph + oh, pw : pw + ow]
    return out if bias is None else out + bias[None, :, None, None]


def conv_transpose2d_backward(x, weight, grad, layer):
    """``(grad_x, grad_weight, grad_bias)`` of :func:`conv_transpose2d`: the output gradient, padded back,
    read at the positions each input pixel wrote to."""
    channels_in, group_out = weight.shape[:2]
    group_in = channels_in // layer.groups
    grad_padded = _pad(grad, layer.padding)
    grad_x, grad_weight = np.zeros_like(x), np.zeros_like(weight)
    for g in range(layer.groups):
        c, o = slice(g * group_in, (g + 1) * group_in), slice(g * group_out, (g + 1) * group_out)
        for a, b, rows, cols in _transposed_offsets(layer, x.shape[2:]):
            grad_x[:, c] += np.einsum("nohw,co->nchw", grad_padded[:, o, rows, cols], weight[c, :, a, b])
            grad_weight[c, :, a, b] = np.einsum("nchw,nohw->co", x[:, c], grad_padded[:, o, rows, cols])
    return grad_x, grad_weight, grad.sum((0, 2, 3))


def upsample_matrices(layer, input_size):
    """Per axis, the ``(out, size)`` matrix of ``torch.nn.Upsample``'s weights. Output ``i`` reads source
    position ``src = i * scale`` (nearest, and bilinear with ``align_corners``) or ``(i + 0.5) * scale -
    0.5`` floored at 0 (bilinear), ``scale`` being ``(size - 1) / (out - 1)`` with ``align_corners``,
    else ``1 / scale_factor`` when one was given, else ``size / out``. Nearest takes element
    ``min(floor(src), size - 1)``, its index computed in float32 as ATen does; bilinear weighs
    ``floor(src)`` and the next element (the last one repeated) by ``1 - frac`` and ``frac``."""
    matrices = []
    for axis, (size, out) in enumerate(zip(input_size, layer.output_shape((1, *input_size))[1:], strict=True)):
        if layer.align_corners:
            scale = (size - 1) / (out - 1) if out > 1 else 0.0
        elif layer.scale_factor is not None:
            scale = 1.0 / layer.scale_factor[axis]
        else:
            scale = size / out
        matrix = np.zeros((out, size))
        for i in range(out):
            if layer.mode == "nearest":
                matrix[i, min(math.floor(np.float32(i) * np.float32(scale)), size - 1)] = 1.0
                continue
            source = i * scale if layer.align_corners else max((i + 0.5) * scale - 0.5, 0.0)
            low = math.floor(source)
            frac = min(max(source - low, 0.0), 1.0)
            matrix[i, low] += 1 - frac
            matrix[i, min(low + 1, size - 1)] += frac
        matrices.append(matrix)
    return matrices


def _windows(padded_shape, kernel, stride):
    """``(i, j, rows, cols)`` of every pooling window over a padded input (floor mode)."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = ((d - k) // s + 1 for d, k, s in zip(padded_shape[2:], kernel, stride, strict=True))
    for i in range(oh):
        for j in range(ow):
            yield i, j, slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw)


def _unpad(grad_padded, padding):
    (ph, pw), (h, w) = padding, grad_padded.shape[2:]
    return grad_padded[:, :, ph : h - ph, pw : w - pw]


def max_pool2d(x, kernel, stride, padding=(0, 0)):
    """Window maxima, padding counting as -inf. Returns ``(out, padded input)``."""
    xp = _pad(x, padding, -np.inf)
    windows = list(_windows(xp.shape, kernel, stride))
    out = np.empty((*x.shape[:2], windows[-1][0] + 1, windows[-1][1] + 1))
    for i, j, rows, cols in windows:
        out[:, :, i, j] = xp[:, :, rows, cols].max((2, 3))
    return out, xp


def max_pool2d_backward(x, grad, kernel, stride, padding=(0, 0)):
    """The gradient goes to the first maximal element of each window (row-major), PyTorch's rule."""
    _, xp = max_pool2d(x, kernel, stride, padding)
    grad_padded = np.zeros_like(xp)
    n, c = x.shape[:2]
    ni, ci = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")
    for i, j, rows, cols in _windows(xp.shape, kernel, stride):
        a, b = np.divmod(xp[:, :, rows, cols].reshape(n, c, -1).argmax(2), kernel[1])
        grad_padded[ni, ci, rows.start + a, cols.start + b] += grad[:, :, i, j]
    return _unpad(grad_padded, padding)


def _avg_divisors(x, kernel, stride, padding, count_include_pad):
    """Per output position: ``kh*kw``, or the number of the window's elements inside the input."""
    inside = _pad(np.ones((1, 1, *x.shape[2:])), padding)
    windows = list(_windows(inside.shape, kernel, stride))
    divisors = np.empty((windows[-1][0] + 1, windows[-1][1] + 1))
    for i, j, rows, cols in windows:
        divisors[i, j] = kernel[0] * kernel[1] if count_include_pad else inside[0, 0, rows, cols].sum()
    return divisors, windows


def avg_pool2d(x, kernel, stride, padding=(0, 0), count_include_pad=True):
    """Window sums over the zero-padded input divided by :func:`_avg_divisors`."""
    xp = _pad(x, padding)
    divisors, windows = _avg_divisors(x, kernel, stride, padding, count_include_pad)
    out = np.empty((*x.shape[:2], *divisors.shape))
    for i, j, rows, cols in windows:
        out[:, :, i, j] = xp[:, :, rows, cols].sum((2, 3)) / divisors[i, j]
    return out


def avg_pool2d_backward(x, grad, kernel, stride, padding=(0, 0), count_include_pad=True):
    """The gradient of ``avg_pool2d`` with respect to ``x``."""
    divisors, windows = _avg_divisors(x, kernel, stride, padding, count_include_pad)
    grad_padded = np.zeros((*x.shape[:2], x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]))
    for i, j, rows, cols in windows:
        grad_padded[:, :, rows, cols] += (grad[:, :, i, j] / divisors[i, j])[:, :, None, None]
    return _unpad(grad_padded, padding)


def _adaptive_bins(size, out):
    """PyTorch's adaptive bins: ``floor(i*size/out)`` to ``ceil((i+1)*size/out)``."""
    return [slice(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def adaptive_avg_pool2d(x, output_size):
    """``torch.nn.AdaptiveAvgPool2d``: PyTorch's bins, each averaged."""
    rows, cols = (_adaptive_bins(d, o) for d, o in zip(x.shape[2:], output_size, strict=True))
    return np.stack([np.stack([x[:, :, r, c].mean((2, 3)) for c in cols], -1) for r in rows], -2)


def adaptive_avg_pool2d_backward(x, grad, output_size):
    """The gradient of ``adaptive_avg_pool2d`` with respect to ``x``."""
    rows, cols = (_adaptive_bins(d, o) for d, o in zip(x.shape[2:], output_size, strict=True))
    grad_x = np.zeros_like(x)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            count = (r.stop - r.start) * (c.stop - c.start)
            grad_x[:, :, r, c] += (grad[:, :, i, j] / count)[:, :, None, None]
    return grad_x


def layer_norm(x, rank, eps, weight=None, bias=None):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last ``rank`` dims (biased
    variance). Returns ``(out, x_hat)``."""
    axes = tuple(range(x.ndim - rank, x.ndim))
    x_hat = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)
    out = x_hat if weight is None else x_hat * weight + bias
    return out, x_hat


def layer_norm_backward(x, grad, rank, eps, weight=None):
    """The gradients of ``layer_norm`` with respect to ``x`` (and the affine weight and bias)."""
    axes = tuple(range(x.ndim - rank, x.ndim))
    grad_x, x_hat = _normalise_backward(x, grad if weight is None else grad * weight, axes, eps)
    leading = tuple(range(x.ndim - rank))
    return grad_x, (grad * x_hat).sum(leading), grad.sum(leading)


_erf = np.vectorize(math.erf)


def activation(layer, x):
    """``(f(x), f'(x))`` of an elementwise activation, from PyTorch's documented formulas."""
    if isinstance(layer, layers.Identity):
        return x, np.ones_like(x)
    if isinstance(layer, layers.ReLU):
        return np.maximum(x, 0.0), (x > 0).astype(F64)
    if isinstance(layer, layers.Tanh):
        y = np.tanh(x)
        return y, 1 - y * y
    if isinstance(layer, layers.Sigmoid):
        y = 1 / (1 + np.exp(-x))
        return y, y * (1 - y)
    if isinstance(layer, layers.SiLU):
        s = 1 / (1 + np.exp(-x))
        return x * s, s * (1 + x * (1 - s))
    if isinstance(layer, layers.LeakyReLU):
        return np.where(x > 0, x, layer.negative_slope * x), np.where(x > 0, 1.0, layer.negative_slope)
    if isinstance(layer, layers.ELU):
        return np.where(x > 0, x, layer.alpha * (np.exp(x) - 1)), np.where(x > 0, 1.0, layer.alpha * np.exp(x))
    if isinstance(layer, layers.GELU) and layer.approximate == "none":
        cdf, pdf = (1 + _erf(x / math.sqrt(2))) / 2, np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        return x * cdf, cdf + x * pdf
    if isinstance(layer, layers.GELU):
        c = math.sqrt(2 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if isinstance(layer, (layers.Softmax, layers.LogSoftmax)):
        shifted = x - x.max(layer.dim, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(layer.dim, keepdims=True))
        return (log_probs if isinstance(layer, layers.LogSoftmax) else np.exp(log_probs)), None
    raise TypeError(f"the reference has no {layer!r}")


def softmax_backward(layer, x, grad):
    """Softmax: ``y * (g - sum(g * y))``; LogSoftmax: ``g - softmax * sum(g)``, sums along ``dim``."""
    probs = activation(layers.Softmax(layer.dim), x)[0]
    if isinstance(layer, layers.LogSoftmax):
        return grad - probs * grad.sum(layer.dim, keepdims=True)
    return probs * (grad - (grad * probs).sum(layer.dim, keepdims=True))


# --- losses -----------------------------------------------------------------------------------


def _log_softmax_rows(pred):
    top = pred.max(1, keepdims=True)
    return pred - (top + np.log(np.exp(pred - top).sum(1, keepdims=True)))


def loss_terms(spec, pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample (elementwise losses: per-element) terms of a built-in loss spec and the
    gradient of their *sum* w.r.t. ``pred``, from PyTorch's documented formulas."""
    pred, kind = np.asarray(pred, F64), type(spec).__name__
    target = np.asarray(target)
    if kind in ("CrossEntropyLoss", "NLLLoss") and pred.ndim > 2:
        return _per_position(spec, pred, target)
    if kind in ("CrossEntropyLoss", "NLLLoss"):
        if target.dtype.kind in "iu":
            counts = target != spec.ignore_index
            if not counts.all():  # ignored rows: no term, zero gradient
                terms, grad = loss_terms(spec, pred[counts], target[counts])
                full = np.zeros_like(pred)
                full[counts] = grad
                return terms, full
            q = np.zeros_like(pred)
            q[np.arange(len(pred)), target] = 1.0
        else:
            q = target.astype(F64)
        if kind == "NLLLoss":
            return -(q * pred).sum(1), -q
        smoothing = spec.label_smoothing
        q = (1 - smoothing) * q + smoothing / pred.shape[1]
        log_probs = _log_softmax_rows(pred)
        return -(q * log_probs).sum(1), np.exp(log_probs) * q.sum(1, keepdims=True) - q
    d = pred - target.astype(F64)
    if kind == "MSELoss":
        return d**2, 2 * d
    if kind == "L1Loss":
        return np.abs(d), np.sign(d)
    if kind == "BCEWithLogitsLoss":
        t = target.astype(F64)
        return np.maximum(pred, 0) - pred * t + np.log1p(np.exp(-np.abs(pred))), 1 / (1 + np.exp(-pred)) - t
    if kind == "BCELoss":
        # PyTorch floors both logarithms at -100; its gradient floors p * (1 - p) at ATen's float 1e-12
        t = target.astype(F64)
        with np.errstate(divide="ignore"):
            terms = -(t * np.maximum(np.log(pred), -100.0) + (1 - t) * np.maximum(np.log1p(-pred), -100.0))
        return terms, (pred - t) / np.maximum(pred * (1 - pred), float(np.float32(1e-12)))
    if kind == "SmoothL1Loss":
        beta = spec.beta
        if beta == 0:
            return np.abs(d), np.sign(d)
        small = np.abs(d) < beta
        return np.where(small, 0.5 * d * d / beta, np.abs(d) - 0.5 * beta), np.where(small, d / beta, np.sign(d))
    if kind == "HuberLoss":
        delta = spec.delta
        small = np.abs(d) <= delta
        return np.where(small, 0.5 * d * d, delta * (np.abs(d) - 0.5 * delta)), np.where(small, d, delta * np.sign(d))
    raise ValueError(f"the reference has no loss {kind}")


def _per_position(spec, pred, target):
    """Class losses over ``(N, C, d1, ...)``: each position a sample of its own, position by position."""
    grad = np.zeros_like(pred)
    terms = []
    for position in np.ndindex(*pred.shape[2:]):
        where = (slice(None), slice(None), *position)
        labels = target[where] if target.dtype.kind == "f" else target[(slice(None), *position)]
        part_terms, grad[where] = loss_terms(spec, pred[where], labels)
        terms.append(part_terms)
    return np.concatenate(terms), grad


def loss(spec, pred, target) -> tuple[float, np.ndarray]:
    """``(loss, gradient w.r.t. pred)`` with PyTorch's reductions (elementwise losses average
    over elements); a CustomLoss spec is looked up in :data:`CUSTOM_LOSSES` by its tree."""
    if type(spec).__name__ == "CustomLoss":
        return CUSTOM_LOSSES[spec.tree][1](np.asarray(pred, F64), np.asarray(target, F64))
    terms, grad = loss_terms(spec, pred, target)
    if spec.reduction == "sum":
        return float(terms.sum()), grad
    return float(terms.mean()), grad / terms.size


def _custom(fn, value_and_grad):
    from unitrain.losses import CustomLoss

    return CustomLoss(fn).tree, (fn, value_and_grad)


def _softmax_rows(pred, axis):
    e = np.exp(pred - pred.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _every_op_value_and_grad(p, t):
    """Closed form of ``EVERY_OP`` below, term by term."""
    n = p.size
    root = np.sqrt((p - t) ** 2 + 1.0)
    s0 = _softmax_rows(p, 0)
    terms = [
        ((root - 1).mean(), (p - t) / root / n),
        (0.1 * np.maximum(p, 0.0).sum(), 0.1 * (p > 0)),
        (-np.minimum(p, t).mean(), -1.0 * (p < t) / n),
        (np.abs(p).mean() / 2, np.sign(p) / 2 / n),
        ((np.exp(-p) / 4).sum(), -np.exp(-p) / 4),
        (np.log(1 + p**2).mean(), 2 * p / (1 + p**2) / n),
        ((s0 * t).sum(), s0 * (t - (t * s0).sum(0, keepdims=True))),
        ((p**3).mean(1).sum() / 3, p**2 / p.shape[1]),
    ]
    return float(sum(v for v, _ in terms)), sum(g for _, g in terms)


def _every_op(pred, target):
    from unitrain import expr

    return (
        (expr.sqrt(expr.square(pred - target) + 1.0) - 1).mean()
        + 0.1 * expr.maximum(pred, 0.0).sum()
        - expr.minimum(pred, target).mean()
        + abs(pred).mean() / 2
        + (expr.exp(-pred) / 4).sum()
        + expr.log(1 + pred**2).mean()
        + (expr.softmax(pred, 0) * target).sum()
        + (pred**3).mean(axis=1).sum() / 3
    )


def _soft_cross_entropy(pred, target):
    from unitrain import expr

    return -(target * expr.log_softmax(pred, axis=1)).sum(axis=1).mean()


#: The custom losses the conformance suite trains with: tree -> (fn, closed-form (value, dloss/dpred)).
CUSTOM_LOSSES = dict([
    # the seed tutorial's loss: d/dpred = 1 everywhere
    _custom(lambda pred, labels: (pred - labels).sum(), lambda p, t: (float((p - t).sum()), np.ones_like(p))),
    # soft-target cross-entropy written by hand: d/dpred = (softmax(p) * sum(t) - t) / N
    _custom(_soft_cross_entropy, lambda p, t: (
        float(-(t * _log_softmax_rows(p)).sum(1).mean()),
        (_softmax_rows(p, 1) * t.sum(1, keepdims=True) - t) / len(p),
    )),
    _custom(_every_op, _every_op_value_and_grad),
])  # fmt: skip


def train_step(ref: Reference, spec_loss, optimizer: Optimizer, x, y) -> float:
    """One whole step on the reference: forward (training), loss, backward, update. Returns the
    pre-update loss."""
    value, grad = loss(spec_loss, ref.forward(x, training=True), y)
    grads = ref.backward(grad)
    ref.state.update(optimizer.update({name: ref.state[name] for name in grads}, grads))
    return value
