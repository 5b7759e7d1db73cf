"""Layer specs for attention: multi-head attention, Transformer encoders, positional encodings.

As :mod:`unitrain.layers`: PyTorch's class names, arguments, equations and ``state_dict`` keys
(``torch.nn.MultiheadAttention``, ``TransformerEncoderLayer``, ``TransformerEncoder``; the
sinusoidal table of PyTorch's word_language_model example). A spec holds no weights.

Masks are inputs, as in PyTorch's ``forward``: in a :class:`~unitrain.graph.Graph`, a
``MultiheadAttention`` is called on ``(query, key, value)`` and optionally ``key_padding_mask``
and ``attn_mask``, an encoder (layer) on ``src`` and optionally ``src_key_padding_mask`` and
``src_mask``; the key padding mask is a graph input of per-sample shape ``(S,)`` whose non-zero
entries mark the keys to ignore (PyTorch's boolean ``True``), the attention mask one of ``(L,
S)``. The causal mask (PyTorch's ``is_causal`` with the triangular ``attn_mask``) is the spec's
``causal`` flag, fixed when the model is built. Called on one input
(inside a ``Sequential``), ``MultiheadAttention`` is self-attention: ``query = key = value``.

The encoders are graphs themselves (their modules and nodes are PyTorch's submodules and
``forward``), so every backend that runs graphs, ``MultiheadAttention``, ``Linear`` and
``LayerNorm`` runs them natively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .graph import Graph, Input
from .layers import GELU, Dropout, Layer, LayerNorm, Linear, ReLU, Sequential, Shape, _positive_int


def _flag(spec_name: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{spec_name}: {name} must be True or False, got {value!r}")


def _dropout(spec_name: str, dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{spec_name}: dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


@dataclass(frozen=True)
class MultiheadAttention(Layer):
    """Scaled dot-product attention over ``num_heads`` heads of ``embed_dim // num_heads`` features
    (``torch.nn.MultiheadAttention`` with ``need_weights=False``)::

        q, k, v = query @ W_q.T + b_q, key @ W_k.T + b_k, value @ W_v.T + b_v   # W = in_proj_weight rows
        head_h = softmax(q_h @ k_h.T / sqrt(d) + mask) @ v_h                      # d = embed_dim // num_heads
        out = concat(head_1 .. head_H) @ out_proj.weight.T + out_proj.bias

    ``mask`` is ``-inf`` where the key is padding (``key_padding_mask`` non-zero), where
    ``attn_mask`` is non-zero (its per-sample ``(L, S)``, or ``(num_heads, L, S)``: PyTorch's
    ``(N * num_heads, L, S)``) or, with ``causal``, where the key comes after the query
    (``attn_mask = triu(-inf, 1)``): PyTorch's boolean masks. With ``additive_masks`` the two
    masks' values are added to the scores instead (PyTorch's float masks; ``-inf`` masks), the
    causal mask still ``-inf``. The masks are inputs (floats, as every graph input; so their kind
    is the spec's). A query whose keys are all masked gives NaN, as in PyTorch. In training,
    ``dropout`` zeroes each attention weight ``softmax(...)`` with that probability and scales the
    others by ``1 / (1 - dropout)`` (PyTorch's ``dropout_p``), each weight of each head its own
    draw. Weights: ``in_proj_weight`` ``(3E, E)`` (Xavier-uniform), ``in_proj_bias`` ``(3E,)`` and
    ``out_proj.bias`` zeros, ``out_proj.weight``
    ``(E, E)`` as a Linear's. Keys and values of other widths (``kdim``, ``vdim``: cross-attention
    to another model's features) have their own projections, as PyTorch's: ``q_proj_weight``
    ``(E, E)``, ``k_proj_weight`` ``(E, kdim)``, ``v_proj_weight`` ``(E, vdim)`` (each Xavier-uniform)
    in place of ``in_proj_weight``, whenever either width differs from ``E``. Per-sample shapes
    with ``batch_first``: query ``(L, E)``, key ``(S, kdim)``, value ``(S, vdim)``,
    ``key_padding_mask`` ``(S,)``; output ``(L, E)``. Without ``batch_first`` the loop's axis 0 is
    the sequence axis (as for the recurrent layers) and no mask input fits."""

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    batch_first: bool = False
    causal: bool = False
    additive_masks: bool = False
    kdim: int | None = None
    vdim: int | None = None

    def __post_init__(self):
        _positive_int("MultiheadAttention", "embed_dim", self.embed_dim)
        _positive_int("MultiheadAttention", "num_heads", self.num_heads)
        for name in ("kdim", "vdim"):
            if getattr(self, name) is not None:
                _positive_int("MultiheadAttention", name, getattr(self, name))
                if getattr(self, name) == self.embed_dim:  # PyTorch's None: one spec for one layer
                    object.__setattr__(self, name, None)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"MultiheadAttention: embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"
            )
        object.__setattr__(self, "dropout", _dropout("MultiheadAttention", self.dropout))
        for name in ("bias", "batch_first", "causal", "additive_masks"):
            _flag("MultiheadAttention", name, getattr(self, name))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def widths(self) -> tuple[int, int, int]:
        """The features of query, key and value: ``(embed_dim, kdim, vdim)``."""
        e = self.embed_dim
        return e, self.kdim or e, self.vdim or e

    @property
    def separate_projections(self) -> bool:
        """Whether the projections are ``q/k/v_proj_weight`` (PyTorch's ``not _qkv_same_embed_dim``)."""
        return self.kdim is not None or self.vdim is not None

    def projection_weights(self) -> tuple[str, str, str]:
        """The ``state_dict`` keys holding the query's, key's and value's projection: three names, or
        ``in_proj_weight`` three times (its row blocks ``E`` apart)."""
        if self.separate_projections:
            return "q_proj_weight", "k_proj_weight", "v_proj_weight"
        return ("in_proj_weight",) * 3

    def param_shapes(self):
        e = self.embed_dim
        if self.separate_projections:
            shapes = {name: (e, width) for name, width in zip(self.projection_weights(), self.widths, strict=True)}
        else:
            shapes = {"in_proj_weight": (3 * e, e)}
        if self.bias:
            shapes["in_proj_bias"] = (3 * e,)
        shapes["out_proj.weight"] = (e, e)
        if self.bias:
            shapes["out_proj.bias"] = (e,)
        return shapes

    def initial_weights(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """PyTorch's ``_reset_parameters``: Xavier-uniform ``in_proj_weight`` (fan_in E, fan_out 3E), or
        each of ``q/k/v_proj_weight`` (fan_in its input's width, fan_out E), zero biases;
        ``out_proj.weight`` keeps its Linear's ``U(-1/sqrt(E), 1/sqrt(E))``."""
        e = self.embed_dim
        drawn = {}
        for name, shape in self.param_shapes().items():
            if name.endswith("proj_weight"):
                bound = math.sqrt(6.0 / sum(shape))
                drawn[name] = rng.uniform(-bound, bound, shape)
        drawn["out_proj.weight"] = rng.uniform(-1 / math.sqrt(e), 1 / math.sqrt(e), (e, e))
        if self.bias:
            drawn["in_proj_bias"], drawn["out_proj.bias"] = np.zeros(3 * e), np.zeros(e)
        return {key: drawn[key].astype(np.float32) for key in self.param_shapes()}

    def output_shape(self, input_shape):
        return self.output_shape_of((input_shape,))

    def output_shape_of(self, shapes: tuple[Shape, ...]) -> Shape:
        """The output's per-sample shape for inputs ``(x,)``, ``(query, key, value)`` or ``(query, key,
        value)`` and a key padding mask, an attention mask or both (see :meth:`mask_names`);
        ``ValueError`` naming the input that does not fit."""
        if len(shapes) not in (1, 3, 4, 5):
            raise ValueError(f"{self} takes (query), (query, key, value) and optionally key_padding_mask and "
                             f"attn_mask, got {len(shapes)} inputs")  # fmt: skip
        query, key, value = (shapes * 3)[:3] if len(shapes) == 1 else shapes[:3]
        for (name, shape), width in zip((("query", query), ("key", key), ("value", value)), self.widths, strict=True):
            if len(shape) != 2 or shape[-1] != width:
                letter = {"query": "E", "key": "kdim", "value": "vdim"}[name]
                axes = f"(L, {letter})" if self.batch_first else f"(N, {letter}), sequence first"
                raise ValueError(f"{self} expects per-sample {name} {axes} with {letter}={width}, "
                                 f"got per-sample shape {tuple(shape)}")  # fmt: skip
        if key[0] != value[0]:
            raise ValueError(f"{self}: key and value must have the same length, got {key} and {value}")
        if self.causal and query[0] != key[0]:
            raise ValueError(f"{self}: a causal mask needs as many queries as keys, got {query} and {key}")
        masks = self.mask_names(shapes[3:]) if len(shapes) > 3 else ()
        if masks and not self.batch_first:
            what = masks[0].replace("attn_", "attention ").replace("key_padding_", "key padding ")
            raise ValueError(f"{self}: a {what} needs batch_first=True (its axis 0 is the batch)")
        for name, shape in zip(masks, shapes[3:], strict=True):
            wanted = [(key[0],)] if name == "key_padding_mask" else [(query[0], key[0]),
                                                                     (self.num_heads, query[0], key[0])]  # fmt: skip
            if tuple(shape) not in wanted:
                hint = "one entry per key" if name == "key_padding_mask" else "(L, S) or (num_heads, L, S)"
                raise ValueError(f"{self}: {name} must have per-sample shape {' or '.join(map(str, wanted))} "
                                 f"({hint}), got {tuple(shape)}")  # fmt: skip
        return tuple(query)

    @staticmethod
    def mask_names(shapes: tuple[Shape, ...]) -> tuple[str, ...]:
        """What the inputs after ``(query, key, value)`` are, from their per-sample shapes:
        ``key_padding_mask`` ``(S,)`` then ``attn_mask`` ``(L, S)`` or ``(num_heads, L, S)`` (PyTorch's
        order; either may be left out); ``ValueError`` for any other."""
        names = tuple("key_padding_mask" if len(shape) == 1 else "attn_mask" for shape in shapes)
        if names not in ((), ("key_padding_mask",), ("attn_mask",), ("key_padding_mask", "attn_mask")) or any(
            len(shape) not in (1, 2, 3) for shape in shapes
        ):
            raise ValueError(f"MultiheadAttention: after (query, key, value) it takes key_padding_mask (S,) and/or "
                             f"attn_mask (L, S) or (num_heads, L, S), in that order; got per-sample shapes "
                             f"{tuple(tuple(shape) for shape in shapes)}")  # fmt: skip
        return names

    def fan_in(self):
        return self.embed_dim


@dataclass(frozen=True)
class PositionalEncoding(Layer):
    """``x + pe[:T]`` with PyTorch's word_language_model table: ``pe[t, 2i] = sin(t / 10000^(2i/d))``,
    ``pe[t, 2i+1] = cos(t / 10000^(2i/d))``. Input ``(T, N, d_model)`` (``batch_first``:
    ``(N, T, d_model)``), at most ``max_len`` steps. The example's ``dropout`` is a
    :class:`~unitrain.layers.Dropout` after it, and its fixed table is computed, not a
    ``state_dict`` buffer (``pe``)."""

    d_model: int
    max_len: int = 5000
    batch_first: bool = False

    def __post_init__(self):
        _positive_int("PositionalEncoding", "d_model", self.d_model)
        _positive_int("PositionalEncoding", "max_len", self.max_len)
        _flag("PositionalEncoding", "batch_first", self.batch_first)

    def table(self, length: int) -> np.ndarray:
        """``pe[:length]`` in float64, ``(length, d_model)``, computed as the example does (in float32
        there; the backends round this table to their dtype)."""
        position = np.arange(length, dtype=np.float64)[:, None]
        div_term = np.exp(np.arange(0, self.d_model, 2, dtype=np.float64) * (-math.log(10000.0) / self.d_model))
        pe = np.zeros((length, self.d_model))
        pe[:, 0::2] = np.sin(position * div_term)
        pe[:, 1::2] = np.cos(position * div_term)[:, : self.d_model // 2]
        return pe

    def output_shape(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] != self.d_model:
            raise ValueError(f"{self} expects per-sample input (T, d_model={self.d_model}) with batch_first, "
                             f"else (N, d_model), got per-sample shape {tuple(input_shape)}")  # fmt: skip
        if self.batch_first and input_shape[0] > self.max_len:
            raise ValueError(f"{self}: {input_shape[0]} steps exceed max_len {self.max_len}")
        return tuple(input_shape)


_ACTIVATIONS = {"relu": ReLU, "gelu": GELU}


class _Encoder(Graph):
    """A graph built from PyTorch's arguments, shown and serialised as those arguments."""

    def _arguments(self) -> dict:
        return dict(self.__dict__["arguments"])

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self._arguments().items())
        return f"{type(self).__name__}({arguments})"

    __str__ = __repr__

    def __reduce__(self):
        return _rebuild, (type(self).__name__, self._arguments())


def _rebuild(kind: str, arguments: dict):
    return ENCODERS[kind](**arguments)


def _set_arguments(graph: Graph, arguments: dict) -> None:
    object.__setattr__(graph, "arguments", tuple(arguments.items()))


@dataclass(frozen=True, init=False, eq=True, repr=False)
class TransformerEncoderLayer(_Encoder):
    """One encoder block, ``torch.nn.TransformerEncoderLayer`` (keys ``self_attn.in_proj_weight``,
    ``linear1.weight``, ``norm1.weight``, ...)::

        sa(x) = dropout1(self_attn(x, x, x));  ff(x) = dropout2(linear2(dropout(activation(linear1(x)))))
        post-norm:  x = norm1(x + sa(x)); x = norm2(x + ff(x))
        norm_first: x = x + sa(norm1(x)); x = x + ff(norm2(x))

    Called on ``(src,)``, ``(src, src_key_padding_mask)``, ``(src, src_mask)`` or ``(src,
    src_key_padding_mask, src_mask)`` (a mask only with ``batch_first``; ``src_mask`` per sample
    ``(S, S)``, or ``(nhead, S, S)`` with ``per_head_mask``: PyTorch's ``attn_mask`` of ``(S, S)``
    repeated per sample and head, or ``(N * nhead, S, S)``, here after the padding mask as for
    :class:`MultiheadAttention`); ``causal`` masks later keys (PyTorch's ``is_causal`` with the
    square subsequent mask), beside ``src_mask`` when both are given. ``dropout`` is
    every one of PyTorch's four: the attention weights' and the three
    :class:`~unitrain.layers.Dropout` modules ``dropout``, ``dropout1``, ``dropout2`` (present only
    when ``dropout > 0``; they hold no weights). Its default here is 0.0, PyTorch's 0.1."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, causal: bool = False, seq_len: int = 1,
                 padding_mask: bool = False, additive_masks: bool = False, src_mask: bool = False,
                 per_head_mask: bool = False):  # fmt: skip
        """``seq_len`` is the per-sample length the graph's shapes are inferred with (any other
        length runs too); ``padding_mask``, ``src_mask``: whether the layer takes
        ``src_key_padding_mask``, ``src_mask``, both added to the scores with ``additive_masks``
        (PyTorch's float masks; see MultiheadAttention); ``per_head_mask``: ``src_mask`` holds one
        ``(S, S)`` mask per head."""
        if activation not in _ACTIVATIONS:
            raise ValueError(f"TransformerEncoderLayer: activation must be 'relu' or 'gelu', got {activation!r}")
        _flag("TransformerEncoderLayer", "norm_first", norm_first)
        _flag("TransformerEncoderLayer", "padding_mask", padding_mask)
        _flag("TransformerEncoderLayer", "src_mask", src_mask)
        _flag("TransformerEncoderLayer", "additive_masks", additive_masks)
        _flag("TransformerEncoderLayer", "per_head_mask", per_head_mask)
        if per_head_mask and not src_mask:
            raise ValueError("TransformerEncoderLayer: per_head_mask=True describes src_mask; it needs src_mask=True")
        _positive_int("TransformerEncoderLayer", "dim_feedforward", dim_feedforward)
        _positive_int("TransformerEncoderLayer", "seq_len", seq_len)
        dropout = _dropout("TransformerEncoderLayer", dropout)
        attention = MultiheadAttention(d_model, nhead, dropout, bias, batch_first, causal, additive_masks)
        # PyTorch's module order; the Dropout modules only with dropout > 0 (p = 0 would draw nothing)
        dropouts = (lambda *names: {name: Dropout(dropout) for name in names}) if dropout else lambda *names: {}
        modules = {
            "self_attn": attention,
            "linear1": Linear(d_model, dim_feedforward, bias=bias),
            **dropouts("dropout"),
            "linear2": Linear(dim_feedforward, d_model, bias=bias),
            "norm1": LayerNorm(d_model, eps=layer_norm_eps),
            "norm2": LayerNorm(d_model, eps=layer_norm_eps),
            **dropouts("dropout1", "dropout2"),
        }
        drop = {name: modules.get(name, lambda x: x) for name in ("dropout", "dropout1", "dropout2")}
        src = Input((seq_len, d_model), "src")
        inputs = [src]
        if padding_mask:
            inputs.append(Input((seq_len,), "src_key_padding_mask"))
        if src_mask:
            inputs.append(Input((nhead, seq_len, seq_len) if per_head_mask else (seq_len, seq_len), "src_mask"))
        masks = inputs[1:]
        act = _ACTIVATIONS[activation]()

        def attend(x):
            return drop["dropout1"](modules["self_attn"](x, x, x, *masks))

        def feed_forward(x):
            return drop["dropout2"](modules["linear2"](drop["dropout"](act(modules["linear1"](x)))))

        x = src
        if norm_first:
            x = x + attend(modules["norm1"](x))
            x = x + feed_forward(modules["norm2"](x))
        else:
            x = modules["norm1"](x + attend(x))
            x = modules["norm2"](x + feed_forward(x))
        Graph.__init__(self, inputs, x, modules)
        _set_arguments(self, dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                                  activation=activation, layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                                  norm_first=norm_first, bias=bias, causal=causal, seq_len=seq_len,
                                  padding_mask=padding_mask, additive_masks=additive_masks,
                                  src_mask=src_mask, per_head_mask=per_head_mask))  # fmt: skip


@dataclass(frozen=True, init=False, eq=True, repr=False)
class TransformerEncoder(_Encoder):
    """``num_layers`` copies of ``encoder_layer`` (each with its own weights: ``layers.0.*``,
    ``layers.1.*``, ...) and an optional final ``norm`` (a LayerNorm, ``norm.*``), as
    ``torch.nn.TransformerEncoder``. PyTorch's layers start as deep copies of one layer (equal
    weights); :func:`unitrain.init_weights` draws each layer's own. The masks (PyTorch's ``mask``
    and ``src_key_padding_mask``) reach every layer."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: LayerNorm | None = None):
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            raise ValueError(f"TransformerEncoder: encoder_layer must be a TransformerEncoderLayer, "
                             f"got {encoder_layer!r}")  # fmt: skip
        _positive_int("TransformerEncoder", "num_layers", num_layers)
        if norm is not None and not isinstance(norm, LayerNorm):
            raise ValueError(f"TransformerEncoder: norm must be None or a LayerNorm, got {norm!r}")
        inputs = [Input(shape, name) for name, shape in encoder_layer.inputs]
        stack = Sequential(*[TransformerEncoderLayer(**encoder_layer._arguments()) for _ in range(num_layers)])
        x = inputs[0]
        for _, block in stack.children:
            x = block(x, *inputs[1:])
        modules = {"layers": stack}
        if norm is not None:
            modules["norm"] = norm
            x = norm(x)
        Graph.__init__(self, inputs, x, modules)
        _set_arguments(self, dict(encoder_layer=encoder_layer, num_layers=num_layers, norm=norm))


#: the encoders by name (for :func:`unitrain.graph.from_dict` and pickling)
ENCODERS = {"TransformerEncoderLayer": TransformerEncoderLayer, "TransformerEncoder": TransformerEncoder}
#: the attention module's leaf layers by name
LEAVES = {"MultiheadAttention": MultiheadAttention, "PositionalEncoding": PositionalEncoding}
