"""The NumPy backend's attention layers: MultiheadAttention with its backward written by hand, and
the positional encoding. :mod:`unitrain.backends.numpy` registers them in its table of leaves;
the Transformer encoders are graphs of these, Linear and LayerNorm.

Attention runs batch-first, heads split as ``(N, H, L, d)``: the three input projections are one
product each, the scores of all heads one batched product, the masks one ``np.where``. Backward
reuses the softmax's output: ``dS = P * (dP - sum(dP * P))`` over the keys. In training with
``dropout``, the weights ``P`` that multiply the values are ``P * mask``, the mask ``(N, H, L, S)``
drawn from the loop's stream (:mod:`unitrain.randomness`) when the layer runs; backward multiplies
``dP`` by the same mask.
"""

from __future__ import annotations

import numpy as np
from unitrain.backends.numpy_sequences import _Freezable, _Layer

from unitrain.attention import MultiheadAttention, PositionalEncoding
from unitrain.randomness import dropout_mask


def _heads(x, heads):
    """``(N, L, E)`` -> ``(N, H, L, E / H)``."""
    n, length, e = x.shape
    return x.reshape(n, length, heads, e // heads).transpose(0, 2, 1, 3)


def _merge(x):
    """``(N, H, L, d)`` -> ``(N, L, H * d)``."""
    n, heads, length, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(n, length, heads * d)


class _MultiheadAttention(_Freezable):
    """Inputs ``x`` (self-attention), ``(query, key, value)`` or ``(query, key, value)`` and its
    masks; backward returns one gradient per input (None for the masks)."""

    def __init__(self, spec, dtype, rng):
        super().__init__(spec, dtype, rng)
        self.rng = rng

    def forward(self, x, training, record):
        args = x if isinstance(x, tuple) else (x,)
        spec, e = self.spec, self.spec.embed_dim
        inputs = (args * 3)[:3] if len(args) == 1 else args[:3]
        if not spec.batch_first:
            inputs = tuple(a.swapaxes(0, 1) for a in inputs)
        weight, bias = self.params["in_proj_weight"], self.params.get("in_proj_bias")
        projected = []
        for index, a in enumerate(inputs):
            p = a @ weight[index * e : (index + 1) * e].T
            if bias is not None:
                p += bias[index * e : (index + 1) * e]
            projected.append(_heads(p, spec.num_heads))
        q, k, v = projected
        scale = q.dtype.type(self.scale())
        scores = (q @ k.swapaxes(-1, -2)) * scale
        blocked, added = self.masks(*scores.shape[-2:], args[3:])
        if added is not None:
            scores += added
        scores = np.where(blocked, -np.inf, scores)
        with np.errstate(invalid="ignore"):  # a query with every key masked gives NaN, as in PyTorch
            scores -= scores.max(-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(-1, keepdims=True)
        mask = dropout_mask(self.rng, weights.shape, spec.dropout, weights.dtype) if training and spec.dropout else None
        context = _merge((weights if mask is None else weights * mask) @ v)
        out = context @ self.params["out_proj.weight"].T
        if bias is not None:
            out += self.params["out_proj.bias"]
        if record:
            self.saved = (len(args), inputs, q, k, v, weights, mask, context, scale)
        return out if spec.batch_first else out.swapaxes(0, 1)

    def scale(self) -> float:
        """The scores' factor, ``1 / sqrt(head_dim)``."""
        return 1 / np.sqrt(self.spec.head_dim)

    def masks(self, length, keys, masks):
        """``(blocked, added)``: where a query may not read a key (``(length, keys)`` or broadcasting
        to ``(N, H, length, keys)``), and the float masks' sum to add to the scores (None without
        ``additive_masks``), from the batch's key padding mask ``(N, keys)`` and attention mask
        ``(N, length, keys)`` or ``(N, H, length, keys)``, either of them left out."""
        blocked = np.triu(np.ones((length, keys), bool), 1) if self.spec.causal else np.zeros((length, keys), bool)
        added = None
        for mask in masks:
            # as (N, 1 or H, length or 1, keys)
            mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
            if self.spec.additive_masks:
                added = mask if added is None else added + mask
            else:
                blocked = blocked | (mask != 0)
        return blocked, added

    def backward(self, grad, need_input_grad):
        count, inputs, q, k, v, weights, mask, context, scale = self.saved
        spec, e = self.spec, self.spec.embed_dim
        if not spec.batch_first:
            grad = grad.swapaxes(0, 1)
        flat = grad.reshape(-1, e)
        if "out_proj.weight" in self.grads:
            self.grads["out_proj.weight"] += flat.T @ context.reshape(-1, e)
        if "out_proj.bias" in self.grads:
            self.grads["out_proj.bias"] += flat.sum(0)
        grad_context = _heads(grad @ self.params["out_proj.weight"], spec.num_heads)
        grad_weights = grad_context @ v.swapaxes(-1, -2)
        if mask is not None:
            grad_weights *= mask
        grad_v = (weights if mask is None else weights * mask).swapaxes(-1, -2) @ grad_context
        grad_scores = weights * (grad_weights - (grad_weights * weights).sum(-1, keepdims=True)) * scale
        grad_q, grad_k = grad_scores @ k, grad_scores.swapaxes(-1, -2) @ q
        weight = self.params["in_proj_weight"]
        input_grads = []
        for index, (a, g) in enumerate(zip(inputs, (grad_q, grad_k, grad_v), strict=True)):
            g = _merge(g)
            rows = slice(index * e, (index + 1) * e)
            if "in_proj_weight" in self.grads:
                self.grads["in_proj_weight"][rows] += g.reshape(-1, e).T @ a.reshape(-1, e)
            if "in_proj_bias" in self.grads:
                self.grads["in_proj_bias"][rows] += g.reshape(-1, e).sum(0)
            if need_input_grad:
                g = g @ weight[rows]
                input_grads.append(g if spec.batch_first else g.swapaxes(0, 1))
        if count == 1:
            return sum(input_grads) if need_input_grad else None
        if not need_input_grad:
            return (None,) * count
        return (*input_grads, *([None] * (count - 3)))  # the masks have none


class _PositionalEncoding(_Layer):
    """``x + pe[:T]``; the gradient passes through unchanged."""

    passes_input = False

    def forward(self, x, training, record):
        spec = self.spec
        length = x.shape[1] if spec.batch_first else x.shape[0]
        if length > spec.max_len:
            raise ValueError(f"{spec}: {length} steps exceed max_len {spec.max_len}")
        table = spec.table(length).astype(x.dtype)
        return x + (table[None] if spec.batch_first else table[:, None])

    def backward(self, grad, need_input_grad):
        return grad if need_input_grad else None


#: spec class -> NumPy layer
LAYERS = {MultiheadAttention: _MultiheadAttention, PositionalEncoding: _PositionalEncoding}
