"""unitrain.from_torch of attention: a Transformer-encoder text classifier written as a PyTorch
``nn.Module`` (Keras' "Text classification with Transformer" in PyTorch's words: ``nn.Embedding``,
word_language_model's ``PositionalEncoding``, ``nn.TransformerEncoder`` with a key padding mask,
``nn.MultiheadAttention``, a ``Linear`` on the first position), imported with torch.fx and trained
20 steps on every backend against the module itself trained by a plain PyTorch loop from the same
weights: float32 within sqrt(n) times PyTorch's own float32 drift on the case, float64 within the
conformance formula (tests/torch_reference.py); what the specs cannot do is refused in one line."""

import copy
import functools
import math

import numpy as np
import pytest
import torch
from conftest import installed_backends
from torch import nn
from torch_reference import (
    SEED,
    TorchRuns,
    assert_run_within_drift,
    assert_states_equal,
    dropout_through_python,
    loop_masks,
    torch_runs,
)

import unitrain
from unitrain.attention import MultiheadAttention, PositionalEncoding, TransformerEncoder
from unitrain.losses import CrossEntropyLoss
from unitrain.optim import SGD
from unitrain.registry import get_backend

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCAB, S, D, HEADS, FEEDFORWARD, CLASSES = 10, 6, 8, 2, 16, 3
STEPS, BATCH, LR, MOMENTUM = 20, 4, 0.1, 0.9
#: the longest sum of one step: the feed-forward weight gradient adds batch x steps terms of width 16
SIZE = BATCH * S * FEEDFORWARD


class TutorialPositionalEncoding(nn.Module):
    """PyTorch word_language_model's ``PositionalEncoding`` as written there (a persistent ``pe``
    buffer, a Dropout), batch first (``pe`` of ``(1, max_len, d_model)``); its table computed in
    float64 so that the float64 reference run holds the exact table (the example's is float32)."""

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        position = torch.arange(0, max_len, dtype=torch.float64).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x):
        x = x + self.pe[:, : x.size(1), :]
        return self.dropout(x)


class TransformerClassifier(nn.Module):
    """Token ids and a padding mask (1 = padding) in, class scores of the first position out; the
    second block attends once more with ``nn.MultiheadAttention`` itself."""

    def __init__(self, dropout=0.0, activation="relu"):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D, padding_idx=0)
        self.position = TutorialPositionalEncoding(D, dropout=dropout, max_len=S)
        layer = nn.TransformerEncoderLayer(D, HEADS, FEEDFORWARD, dropout=dropout, activation=activation,
                                           batch_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.attention = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.classifier = nn.Linear(D, CLASSES)

    def forward(self, tokens, padding):
        mask = padding != 0
        h = self.encoder(self.position(self.embedding(tokens)), src_key_padding_mask=mask)
        h, _ = self.attention(h, h, h, key_padding_mask=mask, need_weights=False)
        return self.classifier(h[:, 0])


@functools.cache
def module(dropout=0.0) -> nn.Module:
    """The classifier with PyTorch's own initial weights (seeded), its ``pe`` still float64: each run
    converts a copy (``.to(dtype)``)."""
    torch.manual_seed(SEED)
    return TransformerClassifier(dropout)


@functools.cache
def batches():
    """Sequences padded at their ends (lengths 2..S), position 0 never padding."""
    rng = np.random.default_rng(SEED)
    out = []
    for _ in range(STEPS):
        lengths = rng.integers(2, S + 1, BATCH)
        padding = np.arange(S) >= lengths[:, None]
        tokens = np.where(padding, 0, rng.integers(1, VOCAB, (BATCH, S)))
        out.append(((tokens, padding.astype(np.float32)), rng.integers(0, CLASSES, BATCH)))
    return out


def example():
    tokens, padding = batches()[0][0]
    return torch.from_numpy(tokens), torch.from_numpy(padding)


@functools.cache
def imported():
    return unitrain.from_torch(copy.deepcopy(module()).float(), example())


@functools.cache
def reference_runs(dropout=0.0):
    """PyTorch's runs, their states without the ``pe`` table (not a weight: the import computes it); with
    ``dropout``, the module drops what the loops drop (their float64 masks)."""
    make = (lambda dtype: copy.deepcopy(module()).to(dtype)) if not dropout else (
        lambda dtype: dropout_through_python(copy.deepcopy(module(dropout)).to(dtype)))  # fmt: skip
    masks = None if not dropout else lambda flip: loop_masks(SEED, np.float64, BATCH, flip)
    return _without_table(torch_runs(make, sgd, batches(), masks=masks))


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=False)


def _without_table(runs):
    return TorchRuns(*(run._replace(state={k: v for k, v in run.state.items() if k != "position.pe"}) for run in runs))


def test_the_import_is_the_module_s_own_layers_and_weights():
    graph = imported()
    encoder = graph.modules["encoder"]
    assert isinstance(encoder, TransformerEncoder) and encoder._arguments()["num_layers"] == 2
    assert isinstance(graph.modules["attention"], MultiheadAttention)
    assert graph.modules["position"] == PositionalEncoding(D, max_len=S, batch_first=True)
    state = module().state_dict()
    del state["position.pe"]  # the table is computed, not a weight
    assert list(graph.initial_state) == list(state)
    assert_states_equal(graph.initial_state, {key: value.float().numpy() for key, value in state.items()})


@pytest.mark.parametrize("backend", installed_backends())
def test_the_imported_classifier_trains_on_every_backend_as_in_pytorch(backend):
    """20 SGD-momentum steps from the module's weights: losses, weights and momentum buffers within
    PyTorch's own float32 drift (float64 where the backend has it: within the conformance formula).
    One float32 case on MindSpore (one compile)."""
    runs = reference_runs()
    capabilities = get_backend(backend).capabilities
    dtypes = ["float32", "float64"] if "float64" in capabilities and backend != "torch" else ["float32"]
    for dtype in dtypes:
        loop = get_backend(backend)(imported(), loss=CrossEntropyLoss(), optimizer=SGD(lr=LR, momentum=MOMENTUM),
                                    dtype=dtype)  # fmt: skip
        losses = [loop.to_float(loop.step(((tokens, padding.astype(dtype)), y))) for (tokens, padding), y in batches()]
        assert_run_within_drift(loop, losses, runs, dtype, SIZE)


def test_dropout_imports_and_trains_with_the_loop_s_masks():
    """PyTorch's default-style encoder with dropout 0.1 (the attention weights', the layers' three, the
    positional encoding's): the import keeps each p, and 20 float64 steps of the import on NumPy equal the
    module trained with the loop's masks within the conformance formula (the other backends draw the same
    masks: tests/test_attention.py)."""
    graph = unitrain.from_torch(copy.deepcopy(module(0.1)).float(), example())
    layer = graph.modules["encoder"].modules["layers"].layers[0]
    assert layer.modules["self_attn"].dropout == 0.1 and layer.modules["dropout2"] == unitrain.Dropout(0.1)
    loop = get_backend("numpy")(graph, loss=CrossEntropyLoss(), optimizer=SGD(lr=LR, momentum=MOMENTUM),
                                dtype="float64", seed=SEED)  # fmt: skip
    losses = [loop.to_float(loop.step(((tokens, padding.astype("float64")), y))) for (tokens, padding), y in batches()]
    assert_run_within_drift(loop, losses, reference_runs(0.1), "float64", SIZE)


class FloatPadding(TransformerClassifier):
    """PyTorch's float key padding masks, added to the scores: -inf at padding (from the data)."""

    def forward(self, tokens, padding):
        h = self.encoder(self.position(self.embedding(tokens)), src_key_padding_mask=padding)
        h, _ = self.attention(h, h, h, key_padding_mask=padding, need_weights=False)
        return self.classifier(h[:, 0])


def test_float_padding_masks_import_as_added_masks_and_train_on_numpy():
    """The encoder's and the attention's float masks import as ``additive_masks`` (the -inf passes the input
    checks), and 20 float64 steps on NumPy equal the module's within the conformance formula."""
    torch.manual_seed(SEED)
    twin = FloatPadding()
    data = [((tokens, np.where(padding != 0, -np.inf, 0.0)), y) for (tokens, padding), y in batches()]
    (tokens, padding), _ = data[0]
    example = (torch.from_numpy(tokens), torch.from_numpy(padding).float())
    graph = unitrain.from_torch(copy.deepcopy(twin).float(), example)
    layer = graph.modules["encoder"].modules["layers"].layers[0]
    assert graph.modules["attention"].additive_masks and layer.modules["self_attn"].additive_masks
    runs = _without_table(torch_runs(lambda dtype: copy.deepcopy(twin).to(dtype), sgd, data))
    loop = get_backend("numpy")(graph, loss=CrossEntropyLoss(), optimizer=SGD(lr=LR, momentum=MOMENTUM),
                                dtype="float64")  # fmt: skip
    assert_run_within_drift(loop, [loop.to_float(loop.step(batch)) for batch in data], runs, "float64", SIZE)


class AttentionMasks(TransformerClassifier):
    """An attention mask per sample, ``(N, S, S)`` (1 = not allowed), repeated per head for PyTorch's
    ``(N * H, S, S)`` (``per_head``: one per sample and head, ``(N, H, S, S)``, flattened), beside the key
    padding mask, in the encoder and in the attention after it."""

    def __init__(self, per_head=False):
        super().__init__()
        self.per_head = per_head

    def forward(self, tokens, padding, mask):
        padding = padding != 0
        mask = (mask != 0).flatten(0, 1) if self.per_head else (mask != 0).repeat_interleave(HEADS, dim=0)
        h = self.encoder(self.position(self.embedding(tokens)), mask=mask, src_key_padding_mask=padding)
        h, _ = self.attention(h, h, h, key_padding_mask=padding, attn_mask=mask, need_weights=False)
        return self.classifier(h[:, 0])


@pytest.mark.parametrize("per_head", [False, True], ids=["per-sample", "per-head"])
def test_attention_masks_from_graph_inputs_import_and_train_on_numpy(per_head):
    """``encoder(x, mask=..., src_key_padding_mask=...)`` and ``attention(..., attn_mask=...)`` with masks
    from graph inputs import as the specs' mask inputs (``src_mask``; per head: ``per_head_mask``), and 20
    float64 steps on NumPy equal the module's within the conformance formula (the specs' masks on four
    backends: tests/test_attention.py)."""
    torch.manual_seed(SEED)
    twin = AttentionMasks(per_head)
    rng = np.random.default_rng(SEED)
    shape = (len(batches()), BATCH, *((HEADS,) if per_head else ()), S, S)
    masks = (rng.random(shape) < 0.3) & (np.arange(S) > 0)  # key 0 never masked
    data = [
        ((tokens, padding, mask.astype(np.float32)), y)
        for ((tokens, padding), y), mask in zip(batches(), masks, strict=True)
    ]
    graph = unitrain.from_torch(copy.deepcopy(twin).float(), tuple(map(torch.from_numpy, data[0][0])))
    layer = graph.modules["encoder"].modules["layers"].layers[0]
    assert layer._arguments()["src_mask"] and layer.input_names == ("src", "src_key_padding_mask", "src_mask")
    assert layer._arguments()["per_head_mask"] == per_head
    runs = _without_table(torch_runs(lambda dtype: copy.deepcopy(twin).to(dtype), sgd, data))
    loop = get_backend("numpy")(graph, loss=CrossEntropyLoss(), optimizer=SGD(lr=LR, momentum=MOMENTUM),
                                dtype="float64")  # fmt: skip
    data = [((tokens, padding.astype("float64"), mask.astype("float64")), y) for (tokens, padding, mask), y in data]
    assert_run_within_drift(loop, [loop.to_float(loop.step(batch)) for batch in data], runs, "float64", SIZE)


class CausalInForward(TransformerClassifier):
    """Causal masks made in ``forward``: PyTorch's float square subsequent mask for the encoder, a boolean one
    from a constant length for the attention (fx keeps it as a tensor constant)."""

    def forward(self, tokens, padding):
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.size(1))
        h = self.encoder(self.position(self.embedding(tokens)), mask=causal, is_causal=True)
        mask = torch.triu(torch.ones(S, S), 1).bool()
        h, _ = self.attention(h, h, h, key_padding_mask=padding != 0, attn_mask=mask, need_weights=False)
        return self.classifier(h[:, -1])


def test_causal_masks_made_in_forward_import_as_the_causal_flag_and_train_on_numpy():
    """The square subsequent mask built in ``forward`` (float or boolean) imports as the specs' ``causal``
    flag, and 20 float64 steps on NumPy equal the module's within the conformance formula."""
    torch.manual_seed(SEED)
    twin = CausalInForward()
    graph = unitrain.from_torch(copy.deepcopy(twin).float(), example())
    layer = graph.modules["encoder"].modules["layers"].layers[0]
    assert graph.modules["attention"].causal and layer.modules["self_attn"].causal
    assert layer.input_names == ("src",)
    runs = _without_table(torch_runs(lambda dtype: copy.deepcopy(twin).to(dtype), sgd, batches()))
    loop = get_backend("numpy")(graph, loss=CrossEntropyLoss(), optimizer=SGD(lr=LR, momentum=MOMENTUM),
                                dtype="float64")  # fmt: skip
    data = [((tokens, padding.astype("float64")), y) for (tokens, padding), y in batches()]
    assert_run_within_drift(loop, [loop.to_float(loop.step(batch)) for batch in data], runs, "float64", SIZE)


class IntegerPadding(TransformerClassifier):
    def forward(self, tokens, padding):
        return self.classifier(self.encoder(self.embedding(tokens), src_key_padding_mask=padding.long())[:, 0])


class Causal(TransformerClassifier):
    """An attention mask (here an input: made in forward, it would be a constant torch.fx cannot keep)."""

    def forward(self, tokens, padding, causal):
        return self.classifier(self.encoder(self.embedding(tokens), mask=causal, is_causal=True)[:, 0])


class Unrepeated(TransformerClassifier):
    def forward(self, tokens, padding, causal):
        return self.classifier(self.encoder(self.embedding(tokens), mask=causal)[:, 0])


class MixedMasks(TransformerClassifier):
    def forward(self, tokens, padding, mask):
        mask = mask.repeat_interleave(HEADS, 0)
        return self.classifier(self.encoder(self.embedding(tokens), mask=mask, src_key_padding_mask=padding != 0)[:, 0])


class NotCausal(TransformerClassifier):
    def forward(self, tokens, padding):
        mask = torch.tril(torch.ones(S, S), -1).bool()
        return self.classifier(self.encoder(self.embedding(tokens), mask=mask)[:, 0])


class AddsAConstant(TransformerClassifier):
    def forward(self, tokens, padding):
        return self.classifier(self.embedding(tokens)[:, 0] + torch.ones(D))


class Weights(TransformerClassifier):
    def forward(self, tokens, padding):
        h = self.embedding(tokens)
        return self.attention(h, h, h)[1]


class Compared(TransformerClassifier):
    def forward(self, tokens, padding):
        h = self.embedding(tokens)
        return self.classifier(self.encoder(h, src_key_padding_mask=padding != 1)[:, 0])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TransformerClassifier(activation=nn.GELU(approximate="tanh")), "only relu and gelu (exact)"),
        (IntegerPadding, "only bool and floating types of src_key_padding_mask are supported"),
        (
            AddsAConstant,
            "node 'add' (_operator.add): add: the other operand must be a Tensor or a number, got ConstantTensor",
        ),
        (Causal, "with is_causal but no causal mask; build a causal model with the spec's causal=True"),
        (
            NotCausal,
            "with a mask made in forward that is not the causal mask (triu of -inf or True, diagonal 1) "
            "of 6; other masks must be graph inputs",
        ),
        (Unrepeated, "with a mask that is not a graph input repeated per head (mask.repeat_interleave(2, 0) of"),
        (MixedMasks, "with a boolean and a float mask; unitrain's masks are both boolean or both added"),
        (Compared, "only a graph tensor compared with != 0 (or .bool()) is supported, as a mask"),
        (Weights, "takes item 1 of attention's (attn_output, attn_output_weights)"),
    ],
)
@pytest.mark.filterwarnings("ignore:Support for mismatched src_key_padding_mask and mask")  # MixedMasks: PyTorch's
def test_what_the_specs_cannot_do_is_refused_in_one_line(make, message):
    torch.manual_seed(SEED)
    with pytest.raises(ValueError, match="^from_torch: ") as error:
        causal = [nn.Transformer.generate_square_subsequent_mask(S)] if make in (Causal, Unrepeated) else []
        causal = [torch.zeros(BATCH, S, S)] if make is MixedMasks else causal
        unitrain.from_torch(make().float(), (*example(), *causal))
    assert message in str(error.value) and "\n" not in str(error.value)
