"""``from_torch`` of attention: ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
``nn.TransformerEncoder`` and PyTorch word_language_model's ``PositionalEncoding`` as the specs of
:mod:`unitrain.attention`, with their weights under PyTorch's own ``state_dict`` keys.

Unlike the other layers, an attention layer's spec depends on its call: the per-sample length of
``src`` and whether a key padding mask comes in are arguments of the encoder's graph. So the spec
is made when the traced ``forward`` calls the module, from the module's attributes and the call's
example values. The masks are read as PyTorch reads them: a ``bool`` forward argument, or a
float or integer argument turned boolean in ``forward`` with ``mask.bool()`` or ``mask != 0``, is
the unitrain graph input itself (its non-zero entries mask); a float forward argument is added to
the scores (the spec's ``additive_masks``, which both masks of one call share). An attention mask
(``attn_mask`` / ``src_mask`` / ``mask``) is a graph input of per-sample ``(L, S)`` that ``forward``
repeats for PyTorch's ``(N * num_heads, L, S)``: ``mask.repeat_interleave(num_heads, 0)``, or one of
per-sample ``(num_heads, L, S)``, one mask per head, that ``forward`` flattens: ``mask.flatten(0, 1)``. An
``(L, S)`` mask made in ``forward`` has no batch axis to become a graph input: the causal one (checked
on the example) is the spec's ``causal`` flag, any other is refused.
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np
import torch
from torch import fx, nn

from unitrain import layers
from unitrain.attention import MultiheadAttention, PositionalEncoding, TransformerEncoder, TransformerEncoderLayer
from unitrain.ops import Tensor

#: torch modules whose spec is made at their call
CALLED: tuple[type, ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)

#: their forward's arguments after the input(s), the key padding mask's name and the attention mask's
_SIGNATURES = {
    nn.MultiheadAttention: ("query key value key_padding_mask need_weights attn_mask average_attn_weights "
                            "is_causal", "key_padding_mask", "attn_mask"),
    nn.TransformerEncoderLayer: ("src src_mask src_key_padding_mask is_causal", "src_key_padding_mask", "src_mask"),
    nn.TransformerEncoder: ("src mask src_key_padding_mask is_causal", "src_key_padding_mask", "mask"),
}  # fmt: skip


class Mask:
    """A graph tensor made boolean in ``forward`` (``padding.bool()``, ``padding != 0``) or laid out per
    head (``heads``: ``mask.repeat_interleave(num_heads, 0)``, or ``mask.flatten(0, 1)`` of one mask per
    head): usable only as an attention layer's mask, where the graph input itself is the mask."""

    def __init__(self, tensor: Tensor, heads: int | None = None):
        self.tensor, self.heads = tensor, heads


def mask_operation(name: str, args: tuple, values: tuple[tuple, dict]) -> Mask:
    """``Tensor.bool()``, ``x != 0`` or ``x.repeat_interleave(heads, 0)`` on a graph tensor or a mask
    (``values``: the arguments' example values, positional and by keyword)."""
    tensor, heads = (args[0].tensor, args[0].heads) if isinstance(args[0], Mask) else (args[0], None)
    values, keywords = values
    if name == "repeat_interleave":
        repeats, dim = (*values[1:], *(keywords.get(key) for key in ("repeats", "dim")[len(values) - 1 :]))[:2]
        if not isinstance(tensor, Tensor) or heads or type(repeats) is not int or dim != 0:
            raise ValueError("only a graph tensor's repeat_interleave(num_heads, 0) is supported, as an "
                             "attention mask")  # fmt: skip
        return Mask(tensor, repeats)
    zero = name == "bool" or (len(values) == 2 and isinstance(values[1], (int, float)) and values[1] == 0)
    if not isinstance(tensor, Tensor) or not zero:
        raise ValueError("only a graph tensor compared with != 0 (or .bool()) is supported, as a mask")
    return Mask(tensor, heads)


def per_head_flatten(flatten):
    """``flatten`` (from_torch's), that reads ``mask.flatten(0, 1)`` of a graph tensor of per-sample
    ``(H, L, S)`` (or of a mask made from one), passed only as attention masks by keyword, as PyTorch's
    ``(N * H, L, S)`` attention mask: a :class:`Mask` of ``H`` heads. Any other flatten is ``flatten``'s
    (which refuses mixing samples)."""

    def call(node, args, kwargs):
        source = args[0].tensor if isinstance(args[0], Mask) else args[0]
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        heads = isinstance(source, Tensor) and len(source.sample_shape) == 3 and (start, end) == (0, 1)
        if heads and not (isinstance(args[0], Mask) and args[0].heads is not None) and _only_attention_mask(node):
            return Mask(source, source.sample_shape[0])
        return flatten(node, args, kwargs)

    return call


def _only_attention_mask(node) -> bool:
    """Whether ``node`` is used (itself or as ``!= 0`` / ``.bool()`` of it) only as a module call's
    ``mask``, ``src_mask`` or ``attn_mask`` keyword argument."""
    for user in node.users:
        if user.op == "call_module":
            keywords = [key for key, value in user.kwargs.items() if value is node]
            if node in user.args or not keywords or any(key not in _MASK_KEYWORDS for key in keywords):
                return False
        elif user.target not in ("bool", "ne", operator.ne, torch.ne) or not _only_attention_mask(user):
            return False
    return bool(node.users)


_MASK_KEYWORDS = ("mask", "src_mask", "attn_mask")


def _layer_norm(module: nn.LayerNorm, path: str) -> layers.LayerNorm:
    if not module.elementwise_affine or module.bias is None:
        raise ValueError(f"module {path!r}: unitrain's encoders' LayerNorms have a weight and a bias")
    return layers.LayerNorm(tuple(module.normalized_shape), eps=module.eps)


def _attention(module: nn.MultiheadAttention, path: str) -> MultiheadAttention:
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(f"module {path!r}: unitrain's MultiheadAttention has add_bias_kv=False and "
                         "add_zero_attn=False")  # fmt: skip
    return MultiheadAttention(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                              module.batch_first, kdim=module.kdim, vdim=module.vdim)  # fmt: skip


def _encoder_layer(module: nn.TransformerEncoderLayer, path: str, seq_len: int, masks: dict, additive: bool,
                   causal: bool):  # fmt: skip
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
        causal=causal, padding_mask="padding" in masks, additive_masks=additive, src_mask="attention" in masks,
        per_head_mask="attention" in masks and len(masks["attention"].sample_shape) == 3,
    )  # fmt: skip


def _bound(names: list[str], args: tuple, kwargs: dict, path: str) -> dict:
    if len(args) > len(names) or any(key not in names[len(args) :] for key in kwargs):
        raise ValueError(f"calls {path} with arguments its forward does not take")
    return {**dict(zip(names, args, strict=False)), **kwargs}


class ConstantTensor:
    """A tensor ``forward`` builds from no graph value (``nn.Transformer.generate_square_subsequent_mask(L)``,
    ``torch.triu(torch.ones(5, 5), 1).bool()``): its example value, usable only as an attention layer's
    causal mask, the spec's ``causal`` flag."""

    def __init__(self, value: torch.Tensor):
        self.value = value


#: what builds a mask: torch functions, and tensor methods and operators by name
_BUILDERS = (torch.full, torch.ones, torch.zeros, torch.zeros_like, torch.triu, torch.tril, torch.logical_not)
_NEW = ("new_zeros", "new_ones", "new_full")  # a tensor's methods that read only its dtype and device
_BUILDING = {"triu", "tril", "bool", "float", "to", "masked_fill", "logical_not", "ne", "eq", "invert", "mul", "add",
             "neg", *_NEW}  # fmt: skip


def constant(node, name, args: tuple, kwargs: dict, value, root: nn.Module | None = None) -> ConstantTensor | None:
    """A :class:`ConstantTensor` when ``node`` (``name``: the method's or operator's) builds a tensor from
    constants alone (``args``, ``kwargs``: their values in the graph, ``value``: the example's), else None.
    fx keeps a tensor computed outside the trace as a ``get_attr`` of ``_tensor_constant<k>``, and a tensor
    held in a plain attribute of ``root`` (``self.hidden = torch.zeros(...)``, neither weight nor buffer)
    as a ``get_attr`` of its name."""
    if node.op == "get_attr":
        held = node.target.startswith("_tensor_constant") or (root is not None and _plain_attribute(root, node.target))
        return ConstantTensor(value) if held and torch.is_tensor(value) else None
    if not torch.is_tensor(value) or not (node.target in _BUILDERS or name in _BUILDING):
        return None
    leaves = []  # x.new_zeros(shape) reads only x's dtype and device
    fx.node.map_aggregate((args[1:] if name in _NEW else args, kwargs), leaves.append)
    plain = (ConstantTensor, int, float, bool, str, torch.dtype, torch.device, type(None))
    return ConstantTensor(value) if all(isinstance(leaf, plain) for leaf in leaves) else None


def _plain_attribute(root: nn.Module, target: str) -> bool:
    """Whether ``target`` names a tensor attribute of ``root`` that is neither a parameter nor a buffer."""
    held = {name for name, _ in root.named_parameters(remove_duplicate=False)}
    held.update(name for name, _ in root.named_buffers(remove_duplicate=False))
    return target not in held


def _causal(mask: ConstantTensor, length: int) -> bool:
    """Whether ``mask`` is the square subsequent mask of ``length``: ``True`` (boolean) or ``-inf`` (float,
    0 elsewhere) above the diagonal."""
    value, above = mask.value, torch.ones(length, length, dtype=torch.bool).triu(1)
    if tuple(value.shape) != (length, length):
        return False
    if value.dtype == torch.bool:
        return bool(torch.equal(value, above))
    return value.is_floating_point() and bool((value[above] == float("-inf")).all() and (value[~above] == 0).all())


def _self_attention(module) -> nn.MultiheadAttention:
    """The attention of a call's module (an encoder's first layer's)."""
    if isinstance(module, nn.MultiheadAttention):
        return module
    return (module.layers[0] if isinstance(module, nn.TransformerEncoder) else module).self_attn


def _graph_mask(module, path: str, name: str, mask, example) -> tuple[Tensor, bool]:
    """The graph input a mask argument is, and whether PyTorch adds it (a float mask)."""
    heads = _self_attention(module).num_heads
    repeated = isinstance(mask, Mask) and mask.heads is not None
    if name.endswith("padding_mask") and repeated:
        raise ValueError(f"calls {path} with a {name} repeated per head; it has one entry per key")
    if not name.endswith("padding_mask") and not (repeated and mask.heads == heads):
        raise ValueError(f"calls {path} with a {name} that is not a graph input repeated per head "
                         f"(mask.repeat_interleave({heads}, 0) of an (N, L, S) input) or one per head "
                         f"(mask.flatten(0, 1) of an (N, {heads}, L, S) input); unitrain's attention masks are "
                         "graph inputs (a causal mask: the spec's causal=True)")  # fmt: skip
    if not isinstance(mask, (Mask, Tensor)):
        raise ValueError(f"calls {path} with a {name} that is not a graph input or made from one")
    return (mask.tensor if isinstance(mask, Mask) else mask), example.dtype != torch.bool


def called_spec(module: nn.Module, path: str, call: tuple[tuple, dict], examples: tuple[tuple, dict]):
    """``(spec, its tensor inputs)`` for a call of an attention ``module`` with the graph values
    ``call`` (positional and keyword arguments) whose example values are ``examples``; ``ValueError``
    for what unitrain's specs cannot do."""
    signature, padding_name, attention_name = _SIGNATURES[type(module)]
    names = signature.split()
    given, examples = _bound(names, *call, path), _bound(names, *examples, path)
    length = examples[names[0]].shape[1 if _self_attention(module).batch_first else 0]
    causal = isinstance(given.get(attention_name), ConstantTensor)
    if causal and not _causal(given.pop(attention_name), length):
        raise ValueError(f"calls {path} with a {attention_name} made in forward that is not the causal mask "
                         f"(triu of -inf or True, diagonal 1) of {length}; other masks must be graph "
                         "inputs")  # fmt: skip
    if given.get("is_causal") not in (None, False) and not causal:
        raise ValueError(f"calls {path} with is_causal but no causal {attention_name}; build a causal model with "
                         "the spec's causal=True")  # fmt: skip
    masks, kinds = {}, set()  # kind -> graph input; PyTorch adds float masks (bool or float: it refuses others)
    for kind, name in (("padding", padding_name), ("attention", attention_name)):
        if given.get(name) is not None:
            masks[kind], additive = _graph_mask(module, path, name, given[name], examples[name])
            kinds.add(additive)
    if len(kinds) > 1:
        raise ValueError(f"calls {path} with a boolean and a float mask; unitrain's masks are both boolean or both "
                         "added (additive_masks)")  # fmt: skip
    additive = kinds == {True}
    inputs = [given[name] for name in names[: 3 if isinstance(module, nn.MultiheadAttention) else 1]]
    if not all(isinstance(value, Tensor) for value in inputs):
        raise ValueError(f"calls {path} with something other than tensors as {', '.join(names[: len(inputs)])}")
    inputs += list(masks.values())  # the key padding mask first, as the specs take them
    if isinstance(module, nn.MultiheadAttention):
        return dataclasses.replace(_attention(module, path), additive_masks=additive, causal=causal), inputs
    seq_len = examples["src"].shape[1]
    if isinstance(module, nn.TransformerEncoderLayer):
        return _encoder_layer(module, path, seq_len, masks, additive, causal), inputs
    if len(module.layers) == 0:
        raise ValueError(f"module {path!r} has no layers")
    specs = [_encoder_layer(layer, f"{path}.layers.{i}", seq_len, masks, additive, causal)
             for i, layer in enumerate(module.layers)]  # fmt: skip
    if any(spec != specs[0] for spec in specs):
        raise ValueError(f"module {path!r}: its layers differ in their arguments; unitrain's TransformerEncoder "
                         "repeats one layer's")  # fmt: skip
    norm = None if module.norm is None else _layer_norm(module.norm, f"{path}.norm")
    return TransformerEncoder(specs[0], len(specs), norm), inputs


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
