"""The independent reference for attention: PyTorch's multi-head attention (``F.multi_head_attention_forward``
without dropout; boolean or float masks) and the word_language_model positional table, forward and backward in float64,
written from the equations without importing anything from the NumPy backend. One sample and one
head at a time; the softmax's backward is its Jacobian ``diag(a) - a a^T`` applied row by row."""

from __future__ import annotations

import math

import numpy as np

F64 = np.float64


def positional_table(length: int, d_model: int) -> np.ndarray:
    """``pe[t, 2i] = sin(t / 10000^(2i / d))``, ``pe[t, 2i + 1] = cos(t / 10000^(2i / d))``, entry by entry."""
    table = np.zeros((length, d_model), F64)
    for t in range(length):
        for column in range(d_model):
            angle = t / 10000 ** ((column - column % 2) / d_model)
            table[t, column] = math.sin(angle) if column % 2 == 0 else math.cos(angle)
    return table


def _allowed(layer, length: int, keys: int, padding_row, mask) -> np.ndarray:
    """``allowed[i, j]``: query ``i`` may read key ``j`` (not padding, not masked by ``mask`` ``(L, S)``:
    boolean masks; with ``causal``, ``j <= i``)."""
    allowed = np.ones((length, keys), bool)
    for i in range(length):
        for j in range(keys):
            if (layer.causal and j > i) or (
                not layer.additive_masks
                and ((padding_row is not None and padding_row[j] != 0) or (mask is not None and mask[i, j] != 0))
            ):
                allowed[i, j] = False
    return allowed


def _head_mask(attn_mask, n: int, h: int):
    """Sample ``n``'s attention mask ``(L, S)`` for head ``h``: its ``(L, S)`` mask, or row ``h`` of its
    ``(heads, L, S)`` one (PyTorch's ``(N * heads, L, S)`` row ``n * heads + h``)."""
    if attn_mask is None:
        return None
    return attn_mask[n] if attn_mask[n].ndim == 2 else attn_mask[n][h]


def attention(layer, p, query, key, value, padding=None, attn_mask=None):
    """The output ``(N, L, E)`` of batch-first inputs and the tape for :func:`attention_backward`; the masks
    mask (non-zero entries) or, with ``additive_masks``, are added to the logits (``-inf`` masks)."""
    e, heads = layer.embed_dim, layer.num_heads
    d = e // heads
    w_q, w_k, w_v = (p["in_proj_weight"][i * e : (i + 1) * e] for i in range(3))
    b_q, b_k, b_v = (p["in_proj_bias"][i * e : (i + 1) * e] if layer.bias else np.zeros(e) for i in range(3))
    out, tape = np.zeros((len(query), query.shape[1], e), F64), []
    for n in range(len(query)):
        q, k, v = query[n] @ w_q.T + b_q, key[n] @ w_k.T + b_k, value[n] @ w_v.T + b_v
        context, weights = np.zeros((len(q), e), F64), []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            mask = _head_mask(attn_mask, n, h)
            allowed = _allowed(layer, len(q), len(k), None if padding is None else padding[n], mask)
            logits = q[:, cols] @ k[:, cols].T / math.sqrt(d)
            if layer.additive_masks:
                logits = logits + (0.0 if padding is None else padding[n][None, :].astype(F64))
                logits = logits + (0.0 if mask is None else mask.astype(F64))
            logits = np.where(allowed, logits, -np.inf)
            exps = np.exp(logits - logits.max(axis=1, keepdims=True))
            a = exps / exps.sum(axis=1, keepdims=True)
            context[:, cols] = a @ v[:, cols]
            weights.append(a)
        out[n] = context @ p["out_proj.weight"].T + (p["out_proj.bias"] if layer.bias else 0)
        tape.append((query[n], key[n], value[n], q, k, v, weights, context))
    return out, tape


def attention_backward(layer, p, tape, grad):
    """The parameters' gradients (by key) and the gradients of query, key and value, from ``grad`` (N, L, E)."""
    e, heads = layer.embed_dim, layer.num_heads
    d = e // heads
    grads = {key: np.zeros(np.shape(value), F64) for key, value in p.items()}
    grad_inputs = [np.zeros((len(tape), *tape[0][i].shape), F64) for i in range(3)]
    w = [p["in_proj_weight"][i * e : (i + 1) * e] for i in range(3)]
    for n, (x_q, x_k, x_v, q, k, v, weights, context) in enumerate(tape):
        g = grad[n]
        grads["out_proj.weight"] += g.T @ context
        if layer.bias:
            grads["out_proj.bias"] += g.sum(axis=0)
        g_context = g @ p["out_proj.weight"]
        g_q, g_k, g_v = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            a = weights[h]
            g_a = g_context[:, cols] @ v[:, cols].T
            g_v[:, cols] += a.T @ g_context[:, cols]
            g_logits = np.stack(
                [(np.diag(row) - np.outer(row, row)) @ g_row for row, g_row in zip(a, g_a, strict=True)]
            )
            g_q[:, cols] += g_logits @ k[:, cols] / math.sqrt(d)
            g_k[:, cols] += g_logits.T @ q[:, cols] / math.sqrt(d)
        for i, (g_proj, x) in enumerate(((g_q, x_q), (g_k, x_k), (g_v, x_v))):
            grads["in_proj_weight"][i * e : (i + 1) * e] += g_proj.T @ x
            if layer.bias:
                grads["in_proj_bias"][i * e : (i + 1) * e] += g_proj.sum(axis=0)
            grad_inputs[i][n] = g_proj @ w[i]
    return grads, grad_inputs
