"""Layer specs over sequences: token embeddings, recurrent layers, 1-d convolution and pooling.

As :mod:`unitrain.layers`: PyTorch's class names, arguments, defaults, equations and ``state_dict``
keys (``torch.nn.Embedding``, ``RNN``, ``LSTM``, ``GRU``, ``Conv1d``, ``MaxPool1d``, ``AvgPool1d``,
``AdaptiveAvgPool1d``); a spec holds no weights. Per-sample shapes leave out the loop's batch axis
(axis 0 of what the loop is given).

Recurrent layers declare their inputs (``input``, ``h_0`` and for LSTM ``c_0``) and outputs
(``output``, ``h_n`` and for LSTM ``c_n``) in :attr:`~_Recurrent.inputs` and
:attr:`~_Recurrent.outputs`. Inside a :class:`~unitrain.layers.Sequential` the initial states are
zeros and only ``output`` flows on to the next layer (what ``nn.Sequential`` cannot do with
``nn.LSTM``, whose tuple result the next layer would receive); a graph wires the others
(``out, (h_n, c_n) = lstm(x, (h_0, c_0))``, :mod:`unitrain.padded`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import AdaptiveAvgPool2d, AvgPool2d, Conv2d, Layer, MaxPool2d, Shape, _positive_int


def _integer(spec: Layer, name: str, minimum: int) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(spec).__name__}: {name} must be an integer >= {minimum}, got {value!r}")


def _flag(spec: Layer, name: str) -> None:
    if not isinstance(getattr(spec, name), bool):
        raise ValueError(f"{type(spec).__name__}: {name} must be True or False, got {getattr(spec, name)!r}")


# --- embeddings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embedding(Layer):
    """A lookup table: integer token ids of any shape ``S`` give ``weight[ids]`` of shape
    ``(*S, embedding_dim)``. ``padding_idx`` (negative counts from the end, stored non-negative as
    PyTorch does) names a row that gets no gradient; :func:`~unitrain.init_weights` draws the
    weight from ``N(0, 1)`` with that row zeroed (``torch.nn.Embedding``'s init). The loop refuses
    a batch of non-integer ids or ids outside ``0..num_embeddings - 1`` before any framework sees it."""

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None

    def __post_init__(self):
        _positive_int("Embedding", "num_embeddings", self.num_embeddings)
        _positive_int("Embedding", "embedding_dim", self.embedding_dim)
        index, count = self.padding_idx, self.num_embeddings
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
                raise ValueError(
                    f"Embedding: padding_idx must be None or an integer in {-self.num_embeddings}.."
                    f"{self.num_embeddings - 1}, got {index!r}"
                )
            object.__setattr__(self, "padding_idx", index % self.num_embeddings)

    def param_shapes(self):
        return {"weight": (self.num_embeddings, self.embedding_dim)}

    def output_shape(self, input_shape):
        return (*input_shape, self.embedding_dim)

    def ids_problem(self, ids) -> str | None:
        """What is wrong with ``ids`` (a NumPy array) as this layer's input, or None: not integers, or
        an id outside the table."""
        if ids.dtype.kind not in "iu":
            return f"{self} expects integer token ids, got {ids.dtype} input"
        low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
        bad = low if low < 0 else high if high >= self.num_embeddings else None
        if bad is None:
            return None
        return f"{self}: token id {bad} is out of range; expected 0..{self.num_embeddings - 1}"


# --- recurrent layers ----------------------------------------------------------------------------


class _Recurrent(Layer):
    """What ``RNN``, ``LSTM`` and ``GRU`` share (PyTorch's ``RNNBase``).

    Input of shape ``(T, N, input_size)`` (``batch_first``: ``(N, T, input_size)``); ``output``
    holds the last layer's ``h_t`` for every ``t``, ``(T, N, D * hidden_size)`` with ``D = 2`` when
    ``bidirectional`` (the forward direction's features first), ``h_n`` (and ``c_n``) the final state
    of every layer and direction, ``(D * num_layers, N, hidden_size)`` ordered layer by layer, forward
    before reverse. The reverse direction reads the sequence from its last step to its first, and its
    ``output[t]`` is its state after reading steps ``T-1 .. t``. Layer ``k > 0`` reads layer ``k-1``'s
    output, to which, in training, dropout with probability ``dropout`` applies (not after the last
    layer). Weights, per layer ``k`` and direction (suffix ``_reverse``): ``weight_ih_l{k}``
    ``(G * hidden_size, input_size or D * hidden_size)``, ``weight_hh_l{k}``
    ``(G * hidden_size, hidden_size)``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``(G * hidden_size,)``
    with ``G`` gates stacked in PyTorch's order; all drawn from ``U(-1/sqrt(hidden_size),
    1/sqrt(hidden_size))``. Without ``bias``, the biases are zero and absent.

    Per-sample shapes (the loop's batch axis is axis 0): ``(T, input_size)`` with ``batch_first``,
    else ``(N, input_size)`` with the loop's axis 0 the time axis (so batch and shuffle along time
    only knowingly: with ``batch_first=False`` the loop's "samples" are time steps)."""

    #: gates stacked in each weight (PyTorch's order)
    gates: int = 1
    #: the layer's inputs and outputs, by PyTorch's names
    inputs: tuple[str, ...] = ("input", "h_0")
    outputs: tuple[str, ...] = ("output", "h_n")

    def _validate(self):
        name = type(self).__name__
        _positive_int(name, "input_size", self.input_size)
        _positive_int(name, "hidden_size", self.hidden_size)
        _positive_int(name, "num_layers", self.num_layers)
        for flag in ("bias", "batch_first", "bidirectional"):
            _flag(self, flag)
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{name}: dropout must be a number in [0, 1), got {dropout!r}")
        object.__setattr__(self, "dropout", float(dropout))

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def weight_names(self) -> list[tuple[int, str]]:
        """``(layer, suffix)`` of every layer and direction, in ``state_dict`` order."""
        return [(k, suffix) for k in range(self.num_layers) for suffix in ("", "_reverse")[: self.directions]]

    def param_shapes(self):
        rows = self.gates * self.hidden_size
        shapes = {}
        for k, suffix in self.weight_names():
            inputs = self.input_size if k == 0 else self.directions * self.hidden_size
            shapes[f"weight_ih_l{k}{suffix}"] = (rows, inputs)
            shapes[f"weight_hh_l{k}{suffix}"] = (rows, self.hidden_size)
            if self.bias:
                shapes[f"bias_ih_l{k}{suffix}"] = (rows,)
                shapes[f"bias_hh_l{k}{suffix}"] = (rows,)
        return shapes

    def state_shape(self, batch: int) -> Shape:
        """Shape of ``h_0``, ``h_n`` (and ``c_0``, ``c_n``) for ``batch`` sequences."""
        return (self.directions * self.num_layers, batch, self.hidden_size)

    def output_shape(self, input_shape):
        axes = "(T, input_size)" if self.batch_first else "(N, input_size), time first"
        if len(input_shape) != 2 or input_shape[-1] != self.input_size:
            raise ValueError(f"{self} expects per-sample input {axes} with input_size={self.input_size}, "
                             f"got per-sample shape {input_shape}")  # fmt: skip
        return (input_shape[0], self.directions * self.hidden_size)

    def fan_in(self):
        return self.hidden_size  # PyTorch's bound for every weight: 1/sqrt(hidden_size)


@dataclass(frozen=True)
class RNN(_Recurrent):
    """Elman RNN: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` with ``act`` ``tanh`` or
    ``relu`` (``nonlinearity``); one gate (``torch.nn.RNN``)."""

    input_size: int
    hidden_size: int
    num_layers: int = 1
    nonlinearity: str = "tanh"
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False

    def __post_init__(self):
        self._validate()
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {self.nonlinearity!r}")


@dataclass(frozen=True)
class _Gated(_Recurrent):
    """LSTM's and GRU's arguments (RNN's add ``nonlinearity`` after ``num_layers``)."""

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False

    def __post_init__(self):
        self._validate()


@dataclass(frozen=True)
class LSTM(_Gated):
    """Long short-term memory (``torch.nn.LSTM``), gates stacked ``i, f, g, o``::

        i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)
        f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)
        g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)
        o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)
        c_t = f_t * c_{t-1} + i_t * g_t
        h_t = o_t * tanh(c_t)

    ``weight_ih_l{k}`` is ``[W_ii; W_if; W_ig; W_io]`` (rows), the others alike."""

    gates = 4
    inputs = ("input", "h_0", "c_0")
    outputs = ("output", "h_n", "c_n")


@dataclass(frozen=True)
class GRU(_Gated):
    """Gated recurrent unit (``torch.nn.GRU``), gates stacked ``r, z, n``::

        r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    (the reset gate multiplies ``W_hn h + b_hn``, bias included, as in PyTorch and cuDNN)."""

    gates = 3


# --- 1-d convolution and pooling -----------------------------------------------------------------
# Each is its 2-d twin over (C, 1, L) (``as_2d``), which is how backends without 1-d kernels run it.


def _sequence_shape(spec: Layer, input_shape: Shape, channels: int | None = None) -> None:
    if len(input_shape) != 2 or (channels is not None and input_shape[0] != channels):
        wanted = "(C, L)" if channels is None else f"(channels={channels}, length)"
        raise ValueError(f"{spec} expects per-sample input {wanted}, got per-sample shape {input_shape}")


def _length_out(spec: Layer, length: int, kernel: int, dilation: int = 1) -> int:
    out = (length + 2 * spec.padding - dilation * (kernel - 1) - 1) // spec.stride + 1
    if out < 1:
        raise ValueError(f"{spec}: input length {length} is shorter than the window")
    return out


@dataclass(frozen=True)
class Conv1d(Layer):
    """1-d cross-correlation over (N, C, L) input with zero padding (``torch.nn.Conv1d``); weight
    ``(out_channels, in_channels // groups, kernel_size)``."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "groups", "kernel_size", "stride", "dilation"):
            _integer(self, name, 1)
        _integer(self, "padding", 0)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"Conv1d: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                f"must be divisible by groups ({self.groups})"
            )

    def param_shapes(self):
        shapes = {"weight": (self.out_channels, self.in_channels // self.groups, self.kernel_size)}
        if self.bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    def output_shape(self, input_shape):
        _sequence_shape(self, input_shape, self.in_channels)
        return (self.out_channels, _length_out(self, input_shape[1], self.kernel_size, self.dilation))

    def fan_in(self):
        return self.in_channels // self.groups * self.kernel_size

    def as_2d(self) -> Conv2d:
        return Conv2d(self.in_channels, self.out_channels, (1, self.kernel_size), (1, self.stride),
                      (0, self.padding), (1, self.dilation), self.groups, self.bias)  # fmt: skip


@dataclass(frozen=True)
class _Pool1d(Layer):
    """Window pooling over (N, C, L); ``stride=None`` means the window size. Padding at most half
    the window, floor mode (PyTorch's rules)."""

    kernel_size: int
    stride: int | None = None
    padding: int = 0

    def __post_init__(self):
        _integer(self, "kernel_size", 1)
        if self.stride is None:
            object.__setattr__(self, "stride", self.kernel_size)
        _integer(self, "stride", 1)
        _integer(self, "padding", 0)
        if 2 * self.padding > self.kernel_size:
            raise ValueError(
                f"{type(self).__name__}: padding {self.padding} must be at most half the window {self.kernel_size}"
            )

    def output_shape(self, input_shape):
        _sequence_shape(self, input_shape)
        return (input_shape[0], _length_out(self, input_shape[1], self.kernel_size))


@dataclass(frozen=True)
class MaxPool1d(_Pool1d):
    """Maximum over each window; padding counts as -inf (``torch.nn.MaxPool1d``)."""

    def as_2d(self) -> MaxPool2d:
        return MaxPool2d((1, self.kernel_size), (1, self.stride), (0, self.padding))


@dataclass(frozen=True)
class AvgPool1d(_Pool1d):
    """Mean over each window with zero padding: divided by ``kernel_size`` when
    ``count_include_pad`` (PyTorch's default), else by the window's non-padding elements."""

    count_include_pad: bool = True

    def as_2d(self) -> AvgPool2d:
        return AvgPool2d((1, self.kernel_size), (1, self.stride), (0, self.padding), self.count_include_pad)


@dataclass(frozen=True)
class AdaptiveAvgPool1d(Layer):
    """Average over PyTorch's adaptive bins: output ``i`` averages inputs ``floor(i*L/out)`` to
    ``ceil((i+1)*L/out)`` (exclusive)."""

    output_size: int

    def __post_init__(self):
        _integer(self, "output_size", 1)

    def output_shape(self, input_shape):
        _sequence_shape(self, input_shape)
        return (input_shape[0], self.output_size)

    def as_2d(self) -> AdaptiveAvgPool2d:
        return AdaptiveAvgPool2d((1, self.output_size))


#: the specs whose backends run them through their 2-d twins (``as_2d``) over (N, C, 1, L)
ONE_D = (Conv1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d)
