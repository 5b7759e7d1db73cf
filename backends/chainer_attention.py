"""Chainer backend: the attention layers as Links of Chainer functions (Chainer has no multi-head
attention). Parameters keep PyTorch's names with ``_`` for ``.`` (``out_proj_weight`` is
``out_proj.weight``); the encoders are graphs of these, ``L.Linear`` and the LayerNorm link
(:mod:`unitrain.backends.chainer_graph`)."""

from __future__ import annotations

import chainer
import chainer.functions as F
import numpy as np

from unitrain import attention
from unitrain.randomness import dropout_mask


def _heads(x, heads: int):
    """``(N, L, E)`` -> ``(N, H, L, E / H)``."""
    n, length, e = x.shape
    return F.transpose(F.reshape(x, (n, length, heads, e // heads)), (0, 2, 1, 3))


class MultiheadAttention(chainer.Link):
    """``forward(x)`` (self-attention), ``forward(query, key, value)`` or ``forward(query, key,
    value, *masks)`` (a key padding mask, an attention mask: added with ``additive_masks``): the
    projections through ``F.linear`` over the last axis, the scores
    of all heads through ``F.matmul``, masked positions set to ``-inf`` by ``F.where`` before
    ``F.softmax`` over the keys; in training with ``dropout``, ``F.dropout`` of the weights with a
    mask from the loop's stream (as its Dropout layers: Chainer's own draws from NumPy's global RNG)."""

    def __init__(self, spec: attention.MultiheadAttention, dtype: np.dtype, rng: np.random.Generator):
        super().__init__()
        self.spec, self.rng = spec, rng
        with self.init_scope():
            for key, shape in spec.param_shapes().items():
                setattr(self, key.replace(".", "_"), chainer.Parameter(np.zeros(shape, dtype)))

    def forward(self, *args):
        spec, e = self.spec, self.spec.embed_dim
        inputs = (args * 3)[:3] if len(args) == 1 else args[:3]
        if not spec.batch_first:
            inputs = tuple(F.swapaxes(a, 0, 1) for a in inputs)
        weights = F.split_axis(self.in_proj_weight, 3, axis=0)
        biases = F.split_axis(self.in_proj_bias, 3, axis=0) if spec.bias else (None,) * 3
        q, k, v = (_heads(F.linear(a, w, b, n_batch_axes=2), spec.num_heads)
                   for a, w, b in zip(inputs, weights, biases, strict=True))  # fmt: skip
        scores = F.matmul(q, k, transb=True) * (1 / np.sqrt(spec.head_dim))
        blocked = np.zeros(scores.shape[-2:], bool)
        if spec.causal:
            blocked = np.triu(np.ones(scores.shape[-2:], bool), 1)
        for mask in args[3:]:  # (N, S) key padding, (N, L, S) or (N, H, L, S) attention: as (N, 1 or H, L or 1, S)
            mask = mask.array if isinstance(mask, chainer.Variable) else mask
            mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
            if spec.additive_masks:
                scores = scores + np.broadcast_to(mask, scores.shape).astype(scores.dtype)
            else:
                blocked = blocked | (mask != 0)
        blocked = np.broadcast_to(blocked, scores.shape)
        scores = F.where(blocked, np.full(scores.shape, -np.inf, scores.dtype), scores)
        weights = F.softmax(scores, axis=-1)
        if chainer.config.train and spec.dropout:
            weights = F.dropout(weights, spec.dropout, mask=dropout_mask(self.rng, weights.shape, spec.dropout,
                                                                           weights.dtype))  # fmt: skip
        context = F.matmul(weights, v)
        n, _, length, _ = context.shape
        context = F.reshape(F.transpose(context, (0, 2, 1, 3)), (n, length, e))
        out = F.linear(context, self.out_proj_weight, self.out_proj_bias if spec.bias else None, n_batch_axes=2)
        return out if spec.batch_first else F.swapaxes(out, 0, 1)


class PositionalEncoding:
    """``x + pe[:T]`` (a function: no parameters)."""

    def __init__(self, spec: attention.PositionalEncoding):
        self.spec = spec

    def __call__(self, x):
        length = x.shape[1] if self.spec.batch_first else x.shape[0]
        table = self.spec.table(length).astype(x.dtype)
        return x + (table[None] if self.spec.batch_first else table[:, None])


def leaf(spec, dtype: np.dtype, rng: np.random.Generator):
    """The link or function of an attention leaf spec (``rng``: the loop's dropout stream), or None
    for other specs."""
    if isinstance(spec, attention.MultiheadAttention):
        return MultiheadAttention(spec, dtype, rng)
    if isinstance(spec, attention.PositionalEncoding):
        return PositionalEncoding(spec)
    return None
