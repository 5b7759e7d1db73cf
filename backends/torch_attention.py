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
    value, *masks)``: a key padding mask ``(N, S)`` and an attention mask ``(N, L, S)`` or
    ``(N, H, L, S)`` (as PyTorch's ``(N * H, L, S)``), their non-zero entries ``True`` or, with
    ``additive_masks``, the floats themselves; ``need_weights=False``, the spec's causal mask in
    ``attn_mask`` (with ``is_causal`` when it is the only attention mask); ``dropout`` is PyTorch's own (its masks
    from the loop's torch generator)."""

    def __init__(self, spec: attention.MultiheadAttention, device=None, dtype=None):
        super().__init__(spec.embed_dim, spec.num_heads, spec.dropout, bias=spec.bias, batch_first=spec.batch_first,
                         device=device, dtype=dtype)  # fmt: skip
        self.causal, self.additive_masks = spec.causal, spec.additive_masks

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        query, key, value = (args * 3)[:3] if len(args) == 1 else args[:3]
        masks = {"key_padding_mask": None, "attn_mask": None}
        for mask in args[3:]:  # (N, S) key padding, (N, L, S) or (N, H, L, S) attention: PyTorch's (N * H, L, S)
            name = "key_padding_mask" if mask.dim() == 2 else "attn_mask"
            if name == "attn_mask":
                mask = mask.repeat_interleave(self.num_heads, 0) if mask.dim() == 3 else mask.flatten(0, 1)
            masks[name] = mask if self.additive_masks else mask != 0  # PyTorch adds float masks
        if self.causal:
            length = query.shape[1 if self.batch_first else 0]
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)  # True: not allowed
            given = masks["attn_mask"]
            if given is None:
                masks["attn_mask"] = causal
            elif self.additive_masks:
                masks["attn_mask"] = given.masked_fill(causal, float("-inf"))
            else:
                masks["attn_mask"] = given | causal
        # is_causal: a hint that attn_mask is the causal one alone (PyTorch may use either)
        only_causal = self.causal and not any(mask.dim() > 2 for mask in args[3:])
        out, _ = super().forward(query, key, value, need_weights=False, is_causal=only_causal, **masks)
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
