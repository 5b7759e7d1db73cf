"""MindSpore backend: the attention layers as Cells of ``mindspore.ops`` that graph mode compiles
into the step. MindSpore 2.10's own ``nn.MultiheadAttention`` has PyTorch's layout and masks and
passes the same tests, but its general ``multi_head_attention_forward`` (bias_k/v, zero attention,
separate projections, dropout) compiled about twice as slowly here (the training test 60 s against
35 s, the conformance check 25 s against 13 s, on a loaded 2-core machine), so the cell is written
from the operations that path runs. Parameters keep PyTorch's layout; the encoders are graphs of
these, ``nn.Dense`` and the LayerNorm cell (:mod:`unitrain.backends.mindspore_graph`)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from unitrain import attention

from .mindspore_sequences import _TakesMasks


def _heads(x, heads):
    """``(N, L, E)`` -> ``(N, H, L, E / H)``."""
    n, length, e = x.shape
    return ops.transpose(ops.reshape(x, (n, length, heads, e // heads)), (0, 2, 1, 3))


def _project(x, weight, bias):
    out = ops.matmul(x, ops.transpose(weight, (1, 0)))
    return out if bias is None else out + bias


class MultiheadAttention(_TakesMasks):
    """``x`` (self-attention) or the tuple ``(query, key, value, *masks)`` (a key padding mask, an
    attention mask: added with ``additive_masks``): projections
    by ``ops.matmul``, the masked scores set to ``-inf`` by ``ops.masked_fill`` before
    ``ops.softmax`` over the keys. With ``dropout``, training multiplies the weights by the model's
    ``mask_index``-th mask, drawn by the loop flat (see ``dropout_mask_shape``) and read as
    ``(N, H, L, S)``: the same numbers in the same order as the other backends' masks."""

    def __init__(self, spec: attention.MultiheadAttention, mask_index: int):
        super().__init__()
        self.dropout, self.mask_index, self.additive_masks = spec.dropout > 0, mask_index, spec.additive_masks
        e, self.heads, self.batch_first, self.causal = spec.embed_dim, spec.num_heads, spec.batch_first, spec.causal
        self.scale = float(1 / np.sqrt(spec.head_dim))
        shapes = spec.param_shapes()
        self.in_proj_weight = Parameter(ops.zeros(shapes["in_proj_weight"], ms.float32), name="in_proj_weight")
        self.out_proj_weight = Parameter(ops.zeros((e, e), ms.float32), name="out_proj_weight")
        self.in_proj_bias = self.out_proj_bias = None
        if spec.bias:
            self.in_proj_bias = Parameter(ops.zeros((3 * e,), ms.float32), name="in_proj_bias")
            self.out_proj_bias = Parameter(ops.zeros((e,), ms.float32), name="out_proj_bias")
        self.state = {"in_proj_weight": self.in_proj_weight, "in_proj_bias": self.in_proj_bias,
                      "out_proj.weight": self.out_proj_weight, "out_proj.bias": self.out_proj_bias}  # fmt: skip
        self.state = {key: self.state[key] for key in shapes}
        self.e = e

    def construct(self, x, masks):
        given = ()
        if isinstance(x, tuple):
            query, key, value = x[0], x[1], x[2]
            for index in range(3, len(x)):
                given = (*given, x[index])
        else:
            query, key, value = x, x, x
        if not self.batch_first:
            query, key, value = ops.swapaxes(query, 0, 1), ops.swapaxes(key, 0, 1), ops.swapaxes(value, 0, 1)
        e = self.e
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        w = self.in_proj_weight
        q = _heads(_project(query, w[:e], bq), self.heads)
        k = _heads(_project(key, w[e : 2 * e], bk), self.heads)
        v = _heads(_project(value, w[2 * e :], bv), self.heads)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * self.scale
        length, keys = scores.shape[2], scores.shape[3]
        blocked = ops.zeros((length, keys), ms.bool_)
        if self.causal:
            blocked = ops.expand_dims(ops.arange(keys), 0) > ops.expand_dims(ops.arange(length), 1)
        for mask in given:  # (N, S) key padding, (N, L, S) or (N, H, L, S) attention: as (N, 1 or H, L or 1, S)
            if mask.ndim == 2:
                mask = ops.reshape(mask, (mask.shape[0], 1, 1, keys))
            elif mask.ndim == 3:
                mask = ops.expand_dims(mask, 1)
            if self.additive_masks:
                scores = scores + mask
            else:
                blocked = ops.logical_or(blocked, mask != 0)
        scores = ops.masked_fill(scores, ops.broadcast_to(blocked, scores.shape), Tensor(float("-inf"), ms.float32))
        weights = ops.softmax(scores, -1)
        if self.dropout and self.training:
            weights = weights * ops.reshape(masks[self.mask_index], weights.shape)
        context = ops.matmul(weights, v)
        n = context.shape[0]
        context = ops.reshape(ops.transpose(context, (0, 2, 1, 3)), (n, length, e))
        out = _project(context, self.out_proj_weight, self.out_proj_bias)
        if not self.batch_first:
            out = ops.swapaxes(out, 0, 1)
        return out


class PositionalEncoding(nn.Cell):
    """``x + pe[:T]``, the table a constant of the compiled step."""

    def __init__(self, spec: attention.PositionalEncoding):
        super().__init__()
        self.batch_first = spec.batch_first
        self.pe = Tensor(spec.table(spec.max_len).astype(np.float32))
        self.state = {}

    def construct(self, x):
        if self.batch_first:
            return x + ops.expand_dims(self.pe[: x.shape[1]], 0)
        return x + ops.expand_dims(self.pe[: x.shape[0]], 1)


def cell(spec, mask_index: int) -> nn.Cell:
    """The cell of an attention leaf spec (its ``state``: PyTorch's key -> Parameter); a
    MultiheadAttention with dropout reads the model's ``mask_index``-th dropout mask."""
    if isinstance(spec, attention.MultiheadAttention):
        return MultiheadAttention(spec, mask_index)
    return PositionalEncoding(spec)


def dropout_mask_shape(spec: attention.MultiheadAttention, shapes: tuple) -> tuple:
    """The per-sample shape of the attention weights' mask for per-sample inputs ``shapes`` (one
    shape, or query's, key's, ...), flattened; ``None`` stands for the batch size. The loop draws
    ``(batch, *shape)``: with ``batch_first`` one sample's ``(H, L, S)``; sequence first the loop's
    batch is the sequence (``L = S``) and the heads' batch ``N`` a per-sample axis, so ``N * H``
    rows of ``S`` keys per query."""
    query, key = (shapes, shapes) if isinstance(shapes[0], int) else shapes[:2]
    if spec.batch_first:
        return (spec.num_heads * query[0] * key[0],)
    return (query[0] * spec.num_heads, None)
