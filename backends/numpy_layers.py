"""The NumPy adapter's layers: hand-written forward and backward passes, one class per layer
spec (``_LAYERS``), and the containers that run a spec's tree of them (:func:`_build`).

Every node has ``forward(x, training, record)`` (``record``: keep what backward needs) and
``backward(grad, need_input_grad)``, which adds the parameter gradients into preallocated
``grads`` buffers and returns the input gradient (``None`` when not needed). A backward owns the
gradient it is given (it may overwrite it) and returns one its caller owns. Parameters are updated
in place, so views of them (the convolution's weight matrix) stay valid.
"""

from __future__ import annotations

import numpy as np
from unitrain.backends.numpy_attention import LAYERS as _ATTENTION_LAYERS
from unitrain.backends.numpy_conv import (
    _AdaptiveAvgPool2d,
    _AvgPool2d,
    _Conv2d,
    _ConvTranspose2d,
    _MaxPool2d,
)
from unitrain.backends.numpy_sequences import _Embedding, _Freezable, _Layer, _Recurrent, _sigmoid

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
from unitrain.loop import InputError
from unitrain.randomness import dropout_mask
from unitrain.sequences import GRU, LSTM, RNN, AdaptiveAvgPool1d, AvgPool1d, Conv1d, Embedding, MaxPool1d
from unitrain.upsampling import interpolation_matrix

from . import numpy_graph

# --- leaves --------------------------------------------------------------------------------------


class _Linear(_Freezable):
    """Over the last axis; other axes are rows of one matrix product."""

    def forward(self, x, training, record):
        rows = x.reshape(-1, x.shape[-1])  # a strided input is copied once, not multiplied slice by slice
        if record:
            self.rows = rows
        out = rows @ self.params["weight"].T
        if "bias" in self.params:
            out += self.params["bias"]
        return out.reshape(*x.shape[:-1], -1)

    def backward(self, grad, need_input_grad):
        rows = grad.reshape(-1, grad.shape[-1])
        if "weight" in self.grads:
            self.grads["weight"] += rows.T @ self.rows
        if "bias" in self.grads:
            self.grads["bias"] += rows.sum(0)
        return (rows @ self.params["weight"]).reshape(*grad.shape[:-1], -1) if need_input_grad else None


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


class _BatchNorm(_Freezable):
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
            fed = squares / (count - 1 if self.spec.running_var == "unbiased" else count)  # PyTorch's, Keras'
            self._update_running(mean.reshape(-1), fed)
            x_hat = centered
            x_hat *= inv_std
        else:
            inv_std = 1 / np.sqrt(self.buffers["running_var"].reshape(shape) + self.spec.eps)
            x_hat = (x - self.buffers["running_mean"].reshape(shape)) * inv_std
        if record:
            self.x_hat, self.inv_std, self.batch_stats = x_hat, inv_std, training
        return x_hat * weight + bias

    def _update_running(self, mean, var):
        momentum = self.spec.momentum
        self.buffers["running_mean"][...] = momentum * mean + (1 - momentum) * self.buffers["running_mean"]
        self.buffers["running_var"][...] = momentum * var + (1 - momentum) * self.buffers["running_var"]
        self.buffers["num_batches_tracked"] += 1

    def backward(self, grad, need_input_grad):
        axes = (0, *range(2, grad.ndim))
        shape = self.inv_std.shape
        grad_weight = (grad * self.x_hat).sum(axes)
        grad_bias = grad.sum(axes)
        for key, value in (("weight", grad_weight), ("bias", grad_bias)):  # the input gradient uses both
            if key in self.grads:
                self.grads[key] += value
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


class _LayerNorm(_Freezable):
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
        if "weight" in self.grads:
            self.grads["weight"] += (grad * self.x_hat).sum(leading)
        if "bias" in self.grads:
            self.grads["bias"] += grad.sum(leading)
        if self.params:
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

    def freeze(self, key):
        if not self.inner.freeze(key):
            return False
        del self.grads[key]
        return True

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
    **_ATTENTION_LAYERS,
}

# --- containers ----------------------------------------------------------------------------------


class _Sequence:
    def __init__(self, nodes):
        self.nodes = nodes

    @property
    def first_trained(self):
        """Nodes before the first one with parameters to train need no backward, and it no input
        gradient (read at each backward: freezing comes after the tree is built)."""
        return next((i for i, node in enumerate(self.nodes) if node.has_params), len(self.nodes))

    @property
    def has_params(self):
        return self.first_trained < len(self.nodes)

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

    @property
    def has_params(self):
        return any(node is not None and node.has_params for node in (self.body, self.shortcut, self.post))

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
