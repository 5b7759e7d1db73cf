"""``from_torch`` of attention: ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
``nn.TransformerEncoder`` and PyTorch word_language_model's ``PositionalEncoding`` as the specs of
:mod:`unitrain.attention`, with their weights under PyTorch's own ``state_dict`` keys.

Unlike the other layers, an attention layer's spec depends on its call: the per-sample length of
``src`` and whether a key padding mask comes in are arguments of the encoder's graph. So the spec
is made when the traced ``forward`` calls the module, from the module's attributes and the call's
example values. The padding mask is read as PyTorch reads it: a ``bool`` forward argument, or a
float or integer argument turned boolean in ``forward`` with ``mask.bool()`` or ``mask != 0``, is
the unitrain graph input itself (its non-zero entries mark padding); a float forward argument is
added to the scores (the spec's ``additive_masks``). Masks of ``attn_mask`` / ``mask`` (causal or
any other) are refused: the spec's ``causal`` flag is fixed when the model is built, and an
``(L, S)`` mask made in ``forward`` has no batch axis to become a graph input.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from unitrain import layers
from unitrain.attention import MultiheadAttention, PositionalEncoding, TransformerEncoder, TransformerEncoderLayer
from unitrain.ops import Tensor

#: torch modules whose spec is made at their call
CALLED: tuple[type, ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)

#: their forward's arguments after the input(s), with the ones unitrain refuses when given
_SIGNATURES = {
    nn.MultiheadAttention: ("query key value key_padding_mask need_weights attn_mask average_attn_weights "
                            "is_causal", "key_padding_mask", ("attn_mask", "is_causal")),
    nn.TransformerEncoderLayer: ("src src_mask src_key_padding_mask is_causal", "src_key_padding_mask",
                                 ("src_mask", "is_causal")),
    nn.TransformerEncoder: ("src mask src_key_padding_mask is_causal", "src_key_padding_mask",
                            ("mask", "is_causal")),
}  # fmt: skip


class Mask:
    """A graph tensor made boolean in ``forward`` (``padding.bool()``, ``padding != 0``): usable only as
    an attention layer's key padding mask, where the graph input itself is the mask."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


def boolean_mask(name: str, args: tuple, values: tuple) -> Mask:
    """``Tensor.bool()`` or ``x != 0`` on a graph tensor (``values``: the arguments' example values)."""
    zero = name == "bool" or (len(values) == 2 and isinstance(values[1], (int, float)) and values[1] == 0)
    if not isinstance(args[0], Tensor) or not zero:
        raise ValueError("only a graph tensor compared with != 0 (or .bool()) is supported, as a key padding mask")
    return Mask(args[0])


def _layer_norm(module: nn.LayerNorm, path: str) -> layers.LayerNorm:
    if not module.elementwise_affine or module.bias is None:
        raise ValueError(f"module {path!r}: unitrain's encoders' LayerNorms have a weight and a bias")
    return layers.LayerNorm(tuple(module.normalized_shape), eps=module.eps)


def _attention(module: nn.MultiheadAttention, path: str) -> MultiheadAttention:
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise ValueError(f"module {path!r}: unitrain's MultiheadAttention has kdim = vdim = embed_dim, "
                         "add_bias_kv=False and add_zero_attn=False")  # fmt: skip
    return MultiheadAttention(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                              module.batch_first)  # fmt: skip


def _encoder_layer(module: nn.TransformerEncoderLayer, path: str, seq_len: int, padding_mask: bool, additive: bool):
    activation = {1: "relu", 2: "gelu"}.get(module.activation_relu_or_gelu)
    if activation is None or getattr(module.activation, "approximate", "none") != "none":
        raise ValueError(f"module {path!r}: activation {module.activation!r} is not supported; only relu and "
                         "gelu (exact)")  # fmt: skip
    attention = _attention(module.self_attn, f"{path}.self_attn")
    norm = _layer_norm(module.norm1, f"{path}.norm1")
    if _layer_norm(module.norm2, f"{path}.norm2") != norm or {module.dropout.p, module.dropout1.p,
                                                              module.dropout2.p} != {attention.dropout}:  # fmt: skip
        raise ValueError(f"module {path!r}: its two LayerNorms and its dropouts must be alike, as "
                         "TransformerEncoderLayer makes them")  # fmt: skip
    return TransformerEncoderLayer(
        attention.embed_dim, attention.num_heads, module.linear1.out_features, module.dropout.p, activation,
        norm.eps, attention.batch_first, module.norm_first, module.linear1.bias is not None, seq_len=seq_len,
        padding_mask=padding_mask, additive_masks=additive,
    )  # fmt: skip


def _bound(names: list[str], args: tuple, kwargs: dict, path: str) -> dict:
    if len(args) > len(names) or any(key not in names[len(args) :] for key in kwargs):
        raise ValueError(f"calls {path} with arguments its forward does not take")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def called_spec(module: nn.Module, path: str, call: tuple[tuple, dict], examples: tuple[tuple, dict]):
    """``(spec, its tensor inputs)`` for a call of an attention ``module`` with the graph values
    ``call`` (positional and keyword arguments) whose example values are ``examples``; ``ValueError``
    for what unitrain's specs cannot do."""
    signature, mask_name, refused = _SIGNATURES[type(module)]
    names = signature.split()
    given, examples = _bound(names, *call, path), _bound(names, *examples, path)
    for name in refused:
        if given.get(name) not in (None, False):
            raise ValueError(f"calls {path} with {name}; unitrain's attention takes only a key padding mask "
                             "(build a causal model with the spec's causal=True)")  # fmt: skip
    mask, additive = given.get(mask_name), False
    if mask is not None:
        if isinstance(mask, Mask):
            mask = mask.tensor
        elif not isinstance(mask, Tensor):
            raise ValueError(f"calls {path} with a {mask_name} that is not a graph input or made from one")
        else:  # bool, or float (PyTorch refuses other masks on the example): PyTorch adds a float mask
            additive = examples[mask_name].dtype != torch.bool
    inputs = [given[name] for name in names[: 3 if isinstance(module, nn.MultiheadAttention) else 1]]
    if not all(isinstance(value, Tensor) for value in inputs):
        raise ValueError(f"calls {path} with something other than tensors as {', '.join(names[: len(inputs)])}")
    padding = [] if mask is None else [mask]
    if isinstance(module, nn.MultiheadAttention):
        return dataclasses.replace(_attention(module, path), additive_masks=additive), [*inputs, *padding]
    seq_len = examples["src"].shape[1]
    if isinstance(module, nn.TransformerEncoderLayer):
        return _encoder_layer(module, path, seq_len, mask is not None, additive), [*inputs, *padding]
    if len(module.layers) == 0:
        raise ValueError(f"module {path!r} has no layers")
    specs = [_encoder_layer(layer, f"{path}.layers.{i}", seq_len, mask is not None, additive)
             for i, layer in enumerate(module.layers)]  # fmt: skip
    if any(spec != specs[0] for spec in specs):
        raise ValueError(f"module {path!r}: its layers differ in their arguments; unitrain's TransformerEncoder "
                         "repeats one layer's")  # fmt: skip
    norm = None if module.norm is None else _layer_norm(module.norm, f"{path}.norm")
    return TransformerEncoder(specs[0], len(specs), norm), [*inputs, *padding]


# --- word_language_model's PositionalEncoding -----------------------------------------------------


def positional_encoding(module: nn.Module) -> tuple[PositionalEncoding, float] | None:
    """``(spec, dropout p)`` when ``module`` is word_language_model's ``PositionalEncoding`` pattern: a
    ``pe`` buffer holding the sinusoidal table of ``(max_len, 1, d_model)`` (time first) or ``(1, max_len,
    d_model)`` (batch first) and at most one ``nn.Dropout``; else None. That its forward adds the table
    is checked on the example (``same_as_spec``)."""
    pe = getattr(module, "pe", None)
    children = list(module.children())
    if not isinstance(pe, torch.Tensor) or pe.dim() != 3 or 1 not in pe.shape[:2] or pe.shape == (1, 1, pe.shape[2]):
        return None
    if len(children) > 1 or any(not isinstance(child, nn.Dropout) for child in children):
        return None
    batch_first = pe.shape[0] == 1
    max_len, d_model = pe.shape[1 if batch_first else 0], pe.shape[2]
    if d_model % 2:
        return None
    spec = PositionalEncoding(d_model, max_len, batch_first)
    table = spec.table(max_len)
    if not np.allclose(pe.detach().double().reshape(max_len, d_model).numpy(), table, rtol=0, atol=1e-6):
        return None
    return spec, (children[0].p if children else 0.0)


def same_as_spec(spec: PositionalEncoding, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the module's output on the example is ``x + pe[:T]`` (in eval: no dropout)."""
    length = x.shape[1] if spec.batch_first else x.shape[0]
    table = torch.from_numpy(spec.table(length)).to(x.dtype)
    expected = x + (table[None] if spec.batch_first else table[:, None])
    scale = max(1.0, float(x.abs().max()))
    atol = 8 * scale * float(np.finfo(np.float32).eps)  # the module's table is float32 in the example
    return out.shape == x.shape and bool(torch.allclose(out, expected, rtol=0, atol=atol))
