"""The check of the attention layers (capability ``attention``): multi-head self-attention behind the
positional encoding, with a causal mask and a key padding mask given as a graph input, then with float
key padding and per-head attention masks added to the scores, then cross-attention to keys and values
of other widths (``kdim``, ``vdim``: separate projection weights), against the float64 reference of
:mod:`.reference_attention`.

Tolerance sizes as in the graph checks: no value sums more terms than the batch's elements of the
largest value the model computes, so that is the ``size`` of the forward and the loss; gradients
allow 8 times it.
"""

from __future__ import annotations

import numpy as np

from unitrain.attention import MultiheadAttention, PositionalEncoding
from unitrain.graph import Graph, Input
from unitrain.losses import MSELoss

from .checks import check, compare, compare_states, inputs, loaded, state_of, tutorial_gradients
from .reference_attention import attention, attention_backward, positional_table

F64 = np.float64
LENGTH, EMBED, HEADS, SAMPLES = 5, 8, 2, 8
#: cross-attention's memory: its length, the keys' and the values' widths
MEMORY, KDIM, VDIM = 4, 6, 3


def attention_model(additive: bool = False) -> Graph:
    """Inputs ``x (N, 5, 8)`` and ``padding (N, 5)``: ``x`` plus the positional table, then causal
    self-attention over two heads that skips the padded keys; ``additive``: the padding mask and a
    per-head attention mask ``bias (N, 2, 5, 5)`` are added to the scores (PyTorch's float masks)."""
    x, padding = Input((LENGTH, EMBED), "x"), Input((LENGTH,), "padding")
    position = PositionalEncoding(EMBED, max_len=LENGTH, batch_first=True)
    attend = MultiheadAttention(EMBED, HEADS, batch_first=True, causal=True, additive_masks=additive)
    h = position(x)
    masks = [padding] + ([Input((HEADS, LENGTH, LENGTH), "bias")] if additive else [])
    return Graph([x, *masks], attend(h, h, h, *masks), {"position": position, "attend": attend})


def cross_attention_model() -> Graph:
    """Queries ``(N, 5, 8)`` attend over two heads to keys ``(N, 4, 6)`` and values ``(N, 4, 3)``."""
    query, key, value = Input((LENGTH, EMBED), "query"), Input((MEMORY, KDIM), "key"), Input((MEMORY, VDIM), "value")
    attend = MultiheadAttention(EMBED, HEADS, batch_first=True, kdim=KDIM, vdim=VDIM)
    return Graph([query, key, value], attend(query, key, value), {"attend": attend})


def padding_masks(seed: int = 3) -> np.ndarray:
    """Each sample padded at its end to a random length of 2..5 (its first keys stay, so every causal
    query keeps one); 1 marks padding."""
    lengths = np.random.default_rng(seed).integers(2, LENGTH + 1, SAMPLES)
    return (np.arange(LENGTH) >= lengths[:, None]).astype(np.float32)


def additive_masks(seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The padding as PyTorch's float key padding mask (``-inf`` at padding, small offsets elsewhere) and
    a per-head float attention mask of N(0, 1) offsets."""
    rng = np.random.default_rng(seed)
    padding = np.where(padding_masks() != 0, -np.inf, rng.uniform(-1, 1, (SAMPLES, LENGTH)))
    return padding.astype(np.float32), rng.standard_normal((SAMPLES, HEADS, LENGTH, LENGTH)).astype(np.float32)


@check("graph", "attention")
def check_attention(adapter):
    """Multi-head self-attention (scaled by sqrt(head_dim), causal mask, key padding mask as a graph input)
    after the sinusoidal positional encoding, then with float masks added to the scores (a key padding mask
    and a per-head attention mask): forward, loss and every gradient match the float64 reference."""
    for additive in (False, True):
        model = attention_model(additive)
        layer = model.attend
        state = state_of(model)
        loop = loaded(adapter, model, state, loss=MSELoss(reduction="sum"))
        x = inputs((LENGTH, EMBED), n=SAMPLES)
        masks = additive_masks() if additive else (padding_masks(),)
        target = inputs((LENGTH, EMBED), seed=2, n=SAMPLES)
        params = {key.removeprefix("attend."): value.astype(F64) for key, value in state.items()}
        h = x.astype(F64) + positional_table(LENGTH, EMBED)
        expected, tape = attention(layer, params, h, h, h, *masks)
        size = SAMPLES * LENGTH * EMBED
        what = ("causal self-attention with additive key padding and attention masks" if additive
                else "causal self-attention with a key padding mask")  # fmt: skip
        compare(f"{what}: predict()", loop.predict((x, *masks)), expected, dtype=loop.dtype, size=size)
        got = tutorial_gradients(loop, (x, *masks), target)
        compare(f"{what}: training loss", got, ((expected - target) ** 2).sum(), dtype=loop.dtype, size=size)
        grads, _ = attention_backward(layer, params, tape, 2 * (expected - target))
        compare_states(f"{what}: gradient", loop.gradients(),
                       {f"attend.{key}": value for key, value in grads.items()}, dtype=loop.dtype,
                       size=8 * size)  # fmt: skip
    _check_cross_attention(adapter)


def _check_cross_attention(adapter):
    model = cross_attention_model()
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=MSELoss(reduction="sum"))
    x = tuple(inputs(shape, seed=seed, n=SAMPLES) for seed, (_, shape) in enumerate(model.inputs, 5))
    target = inputs((LENGTH, EMBED), seed=2, n=SAMPLES)
    params = {key.removeprefix("attend."): value.astype(F64) for key, value in state.items()}
    expected, tape = attention(model.attend, params, *(part.astype(F64) for part in x))
    size, what = SAMPLES * LENGTH * EMBED, "cross-attention to keys and values of other widths"
    compare(f"{what}: predict()", loop.predict(x), expected, dtype=loop.dtype, size=size)
    got = tutorial_gradients(loop, x, target)
    compare(f"{what}: training loss", got, ((expected - target) ** 2).sum(), dtype=loop.dtype, size=size)
    grads, _ = attention_backward(model.attend, params, tape, 2 * (expected - target))
    compare_states(f"{what}: gradient", loop.gradients(), {f"attend.{key}": value for key, value in grads.items()},
                   dtype=loop.dtype, size=8 * size)  # fmt: skip
