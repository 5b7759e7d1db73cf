"""PyTorch backend: the attention layers as ``torch.nn`` modules. ``MultiheadAttention`` is
``nn.MultiheadAttention`` itself (a subclass, so its ``state_dict`` keys are PyTorch's) whose
forward takes the inputs as a graph node passes them; the encoders are graphs of it, ``nn.Linear``
and ``nn.LayerNorm`` (:mod:`unitrain.backends.torch_graph`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from unitrain import attention


class _MultiheadAttention(nn.MultiheadAttention):
    """``forward(x)`` (self-attention), ``forward(query, key, value)`` or ``forward(query, key,
    value, key_padding_mask)`` with the mask's non-zero entries ``True``; ``need_weights=False``, the
    spec's causal mask as ``attn_mask`` with ``is_causal``; ``dropout`` is PyTorch's own (its masks
    from the loop's torch generator)."""

    def __init__(self, spec: attention.MultiheadAttention, device=None, dtype=None):
        super().__init__(spec.embed_dim, spec.num_heads, spec.dropout, bias=spec.bias, batch_first=spec.batch_first,
                         device=device, dtype=dtype)  # fmt: skip
        self.causal = spec.causal

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        query, key, value = (args * 3)[:3] if len(args) == 1 else args[:3]
        padding = args[3] != 0 if len(args) == 4 else None
        mask = None
        if self.causal:
            length = query.shape[1 if self.batch_first else 0]
            mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)  # True: not allowed
        out, _ = super().forward(query, key, value, key_padding_mask=padding, need_weights=False, attn_mask=mask,
                                 is_causal=self.causal)  # fmt: skip
        return out


class _PositionalEncoding(nn.Module):
    """``x + pe[:T]``; the table is a non-persistent buffer (no ``state_dict`` key)."""

    def __init__(self, spec: attention.PositionalEncoding, dtype: torch.dtype):
        super().__init__()
        self.batch_first = spec.batch_first
        self.register_buffer("pe", torch.from_numpy(spec.table(spec.max_len)).to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1] if self.batch_first else x.shape[0]
        table = self.pe[:length]
        return x + (table.unsqueeze(0) if self.batch_first else table.unsqueeze(1))


def module(spec, dtype: torch.dtype) -> nn.Module | None:
    """The module of an attention leaf spec, or None for other specs."""
    if isinstance(spec, attention.MultiheadAttention):
        return skip_init(_MultiheadAttention, spec, dtype=dtype)
    if isinstance(spec, attention.PositionalEncoding):
        return _PositionalEncoding(spec, dtype)
    return None
