"""Attention layers (MultiheadAttention, TransformerEncoderLayer, TransformerEncoder, PositionalEncoding)
on every backend against ``torch.nn``'s own modules: 20 training steps from the same weights within
PyTorch's own float32 drift (``tests/torch_reference.py``), float64 runs within the conformance formula,
evaluation alike; masks as graph inputs; bad arguments and masks refused in one line."""

import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import installed_backends
from torch import nn
from torch_reference import (
    SEED,
    TorchRun,
    assert_run_close,
    assert_run_within_drift,
    assert_within_drift,
    drift_tolerances,
    dropout_through_python,
    expected_run,
    load_state,
    loop_masks,
    numpy_state,
    optimizer_buffers,
    torch_runs,
    train_torch,
)
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain.graph import Graph, Input, from_dict, to_dict
from unitrain.loop import InputError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

E, S, HEADS, FEEDFORWARD, CLASSES = 8, 5, 2, 16, 3
STEPS, BATCH = 20, 4


def model_spec(norm_first=True, activation="gelu", num_layers=1, causal=False, dropout=0.0, per_head=False) -> Graph:
    """Positional encoding -> encoder (with a final LayerNorm) -> causal self-attention -> mean -> Linear;
    the padding mask reaches every attention, the attention mask ``(S, S)`` every encoder layer. With
    ``per_head`` the encoder's is ``(HEADS, S, S)``, and the self-attention takes an ``(S, S)`` one."""
    mask = Input((HEADS, S, S) if per_head else (S, S), "mask")
    x, padding = Input((S, E), "x"), Input((S,), "padding")
    attention_masks = [Input((S, S), "attention_mask")] if per_head else []
    layer = ut.TransformerEncoderLayer(E, HEADS, FEEDFORWARD, dropout, activation=activation, batch_first=True,
                                       norm_first=norm_first, causal=causal, seq_len=S, padding_mask=True,
                                       src_mask=True, per_head_mask=per_head)  # fmt: skip
    modules = {
        "pos": ut.PositionalEncoding(E, max_len=S, batch_first=True),
        "enc": ut.TransformerEncoder(layer, num_layers, ut.LayerNorm(E)),
        "attn": ut.MultiheadAttention(E, HEADS, dropout, batch_first=True, causal=True),
        "head": ut.Linear(E, CLASSES),
    }
    h = modules["enc"](modules["pos"](x), padding, mask)
    h = modules["attn"](h, h, h, padding, *attention_masks)
    return Graph([x, padding, mask, *attention_masks], modules["head"](h.mean(dim=1)), modules)


class TutorialPositionalEncoding(nn.Module):
    """PyTorch's word_language_model ``PositionalEncoding`` without its dropout, batch first, its table
    in float64 (the example's is float32) and not a ``state_dict`` entry."""

    def __init__(self, d_model, max_len=5000):
        super().__init__()
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        position = torch.arange(0, max_len, dtype=torch.float64).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def forward(self, x):
        return x + self.pe[:, : x.size(1)]


class Twin(nn.Module):
    """``model_spec`` written with torch.nn's own modules."""

    def __init__(self, norm_first=True, activation="gelu", num_layers=1, causal=False, dropout=0.0, per_head=False):
        super().__init__()
        self.causal, self.per_head = causal, per_head
        self.pos = TutorialPositionalEncoding(E, max_len=S)
        layer = nn.TransformerEncoderLayer(E, HEADS, FEEDFORWARD, dropout=dropout, activation=activation,
                                           batch_first=True, norm_first=norm_first)  # fmt: skip
        self.enc = nn.TransformerEncoder(layer, num_layers, nn.LayerNorm(E), enable_nested_tensor=False)
        self.attn = nn.MultiheadAttention(E, HEADS, dropout=dropout, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x, padding, mask, *attention_mask):
        padding = padding != 0
        causal = torch.ones(S, S, dtype=torch.bool).triu(1)
        # one (S, S) mask per sample, or per sample and head: PyTorch's (N * H, S, S)
        mask = (mask != 0).flatten(0, 1) if self.per_head else (mask != 0).repeat_interleave(HEADS, 0)
        h = self.enc(self.pos(x), mask=mask | causal if self.causal else mask, src_key_padding_mask=padding)
        if attention_mask:
            causal = causal | (attention_mask[0] != 0).repeat_interleave(HEADS, 0)
        h = self.attn(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=False)[0]
        return self.head(h.mean(1))


def _batches(per_head=False):
    """Sequences padded at their ends (lengths 2..5) and attention masks masking (query, key) pairs at random
    (``per_head``: for each head, then another per sample), never key 0, so no query loses every key."""
    rng = np.random.default_rng(SEED)
    batches = []
    for _ in range(STEPS):
        x = rng.standard_normal((BATCH, S, E)).astype(np.float32)
        lengths = rng.integers(2, S + 1, BATCH)
        padding = (np.arange(S) >= lengths[:, None]).astype(np.float32)
        mask = rng.random((BATCH, HEADS, S, S) if per_head else (BATCH, S, S)) < 0.3
        masks = (mask, *([rng.random((BATCH, S, S)) < 0.3] if per_head else []))
        for each in masks:
            each[..., 0] = False
        batches.append(((x, padding, *(each.astype(np.float32) for each in masks)), rng.integers(0, CLASSES, BATCH)))
    return batches


@pytest.fixture(scope="module")
def case():
    spec, batches = model_spec(), _batches()
    initial = ut.init_weights(spec, SEED)
    runs = torch_runs(lambda dtype: load_state(Twin().to(dtype), initial),
                      lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False), batches)  # fmt: skip
    return spec, batches, runs


def _loop(backend, spec, dtype):
    module = importlib.import_module(f"unitrain.backends.{backend}")
    cls = next(value for value in vars(module).values() if isinstance(value, type) and getattr(value, "name", None)
               == backend and issubclass(value, ut.TrainingLoop))  # fmt: skip
    return cls(spec, optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=SEED, dtype=dtype)


#: float64 where the backend has it (torch's float64 run is the reference itself)
DTYPES = {"numpy": ("float32", "float64"), "torch": ("float32",), "chainer": ("float32", "float64"),
          "mindspore": ("float32",)}  # fmt: skip
#: the longest sum of one step: the feed-forward weight gradient adds batch x steps terms of width 16
SIZE = BATCH * S * FEEDFORWARD


@pytest.mark.parametrize("backend", [name for name in installed_backends() if name != "mindspore"])
def test_trains_and_evaluates_like_torch_nn(case, backend):
    """20 SGD-momentum steps from the same weights: losses, weights and momentum buffers within PyTorch's
    own float32 drift of its float64 run (float64: within the conformance formula), then eval outputs alike.
    MindSpore runs the same case with dropout only (``test_dropout_inside_attention_trains_like_torch_nn``:
    one step and one forward to compile)."""
    spec, batches, runs = case
    assert list(spec.state_shapes()) == list(Twin().state_dict())
    for dtype in DTYPES[backend]:
        loop = _loop(backend, spec, dtype)
        losses = [loop.to_float(loop.step((tuple(part.astype(dtype) for part in x), y))) for x, y in batches]
        assert_run_within_drift(loop, losses, runs, dtype, SIZE)
    assert_evaluates_like_torch_nn(loop, batches[-1][0])


def assert_evaluates_like_torch_nn(loop, x, **variant):
    """The loop's eval output on ``x`` within PyTorch's own float32 drift of ``Twin`` with its weights."""
    trained = {key: value.astype(np.float64) for key, value in loop.state_dict().items()}
    outputs = []
    for dtype in (torch.float32, torch.float64):
        model = load_state(Twin(**variant).to(dtype).eval(), trained)
        with torch.no_grad():
            outputs.append({"out": model(*(torch.from_numpy(part).to(dtype) for part in x)).numpy()})
    tolerances = drift_tolerances(outputs[:1], outputs[1], x[0].size)
    assert_within_drift({"out": loop.predict(x).astype(np.float32)}, outputs[0], tolerances)


#: dropout on the attention weights and at the encoder's three Dropout modules
P = 0.3
SGD_OF = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)  # noqa: E731


@pytest.fixture(scope="module")
def dropout_case():
    """The case with dropout: ``Twin`` trained with the loops' masks (drawn in float32, and in float64 for
    the float64 runs, which draw other numbers), and with PyTorch's own masks from the torch loop's seed.
    Its encoder takes a mask per head (``per_head_mask``), the other case's one per sample."""
    spec, batches = model_spec(dropout=P, per_head=True), _batches(per_head=True)
    initial = ut.init_weights(spec, SEED)
    make = lambda dtype: dropout_through_python(load_state(Twin(dropout=P, per_head=True).to(dtype), initial))  # noqa: E731
    runs = {draw: torch_runs(make, SGD_OF, batches, masks=lambda flip, draw=draw: loop_masks(SEED, draw, BATCH, flip))
            for draw in (np.float32, np.float64)}  # fmt: skip
    own = load_state(Twin(dropout=P, per_head=True).to(torch.float32), initial)
    optimizer = SGD_OF(own.parameters())
    outer = torch.get_rng_state()
    torch.manual_seed(SEED)  # the torch loop's generator starts at its seed (rank 0)
    try:
        losses = np.array(train_torch(own, optimizer, batches))
    finally:
        torch.set_rng_state(outer)
    return spec, batches, runs, TorchRun(numpy_state(own), optimizer_buffers(own, optimizer), {"loss": losses})


@pytest.mark.parametrize("backend", installed_backends())
def test_dropout_inside_attention_trains_like_torch_nn(dropout_case, backend):
    """20 SGD-momentum steps with dropout 0.3 on the attention weights and after the encoder's blocks, its
    attention mask one per head (``(nhead, S, S)``, PyTorch's ``(N * nhead, S, S)``): NumPy,
    Chainer and MindSpore drop what torch.nn drops when given the loop's masks (float32 within PyTorch's own
    float32 drift, float64 within the conformance formula); the torch loop draws from its own generator, as
    torch.nn does from the same seed. Eval mode drops nothing."""
    spec, batches, runs, own = dropout_case
    for dtype in DTYPES[backend]:
        loop = _loop(backend, spec, dtype)
        losses = [loop.to_float(loop.step((tuple(part.astype(dtype) for part in x), y))) for x, y in batches]
        if backend == "torch":  # other masks: PyTorch's drift on the case with the loops' masks bounds it
            assert_run_close(loop, losses, own, expected_run(runs[np.float32], dtype, SIZE)[1])
        else:
            assert_run_within_drift(loop, losses, runs[np.dtype(dtype).type], dtype, SIZE)
    assert_evaluates_like_torch_nn(loop, batches[-1][0], dropout=P, per_head=True)


@pytest.mark.parametrize("variant", [{"norm_first": False, "activation": "relu", "num_layers": 2, "causal": True}])
def test_numpy_post_norm_stack_matches_torch_nn_in_float64(variant):
    """The other encoder arrangement (post-norm, ReLU, two causal layers: PyTorch's ``is_causal`` with the
    square subsequent mask) through NumPy's hand-written backward."""
    spec, batches = model_spec(**variant), _batches()[:5]
    initial = ut.init_weights(spec, SEED)
    runs = torch_runs(lambda dtype: load_state(Twin(**variant).to(dtype), initial),
                      lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False), batches)  # fmt: skip
    loop = _loop("numpy", spec, "float64")
    losses = [loop.to_float(loop.step(batch)) for batch in batches]
    expected, tolerances = expected_run(runs, "float64", SIZE)
    assert_within_drift({"loss": np.array(losses)}, expected.losses, tolerances.losses)
    assert_within_drift(loop.state_dict(), expected.state, tolerances.state)


class TimeFirstSelfAttention(nn.Module):
    """``MultiheadAttention`` in a Sequential: time first, self-attention on its one input."""

    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(E, HEADS, bias=False), nn.Linear(3 * E, CLASSES)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].flatten(1))


class CrossAttention(nn.Module):
    """Queries from one input, keys and values from another of another length."""

    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(E, HEADS, batch_first=True), nn.Linear(E, CLASSES)

    def forward(self, query, memory):
        return self.head(self.attn(query, memory, memory, need_weights=False)[0].mean(1))


def _cross_attention_spec():
    query, memory = Input((3, E), "query"), Input((S, E), "memory")
    attn, head = ut.MultiheadAttention(E, HEADS, batch_first=True), ut.Linear(E, CLASSES)
    return Graph([query, memory], head(attn(query, memory, memory).mean(dim=1)), {"attn": attn, "head": head})


OTHER_CASES = {  # name -> (spec, twin, batch of x)
    "time_first_self_attention": (
        lambda: ut.Sequential({"attn": ut.MultiheadAttention(E, HEADS, bias=False), "flatten": ut.Flatten(),
                               "head": ut.Linear(3 * E, CLASSES)}),  # the loop's samples are time steps of 3
        TimeFirstSelfAttention, lambda rng: rng.standard_normal((S, 3, E)),
    ),
    "cross_attention": (
        _cross_attention_spec, CrossAttention,
        lambda rng: (rng.standard_normal((BATCH, 3, E)), rng.standard_normal((BATCH, S, E))),
    ),
}  # fmt: skip


@pytest.mark.parametrize("backend", [name for name in installed_backends() if name in ("numpy", "chainer")])
@pytest.mark.parametrize("name", OTHER_CASES)
def test_time_first_and_cross_attention_match_torch_nn_in_float64(name, backend):
    """MultiheadAttention without batch_first in a Sequential (self-attention), and with queries and keys of
    different lengths: five SGD-momentum steps within the conformance formula of torch.nn's float64 run."""
    make_spec, twin, make_x = OTHER_CASES[name]
    spec, rng = make_spec(), np.random.default_rng(SEED)
    batches = [(make_x(rng), rng.integers(0, CLASSES, S if name.startswith("time") else BATCH)) for _ in range(5)]
    initial = ut.init_weights(spec, SEED)
    runs = torch_runs(lambda dtype: load_state(twin().to(dtype), initial),
                      lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False), batches)  # fmt: skip
    loop = _loop(backend, spec, "float64")
    assert list(loop.state_dict()) == list(twin().state_dict())
    assert_run_within_drift(loop, [loop.to_float(loop.step(batch)) for batch in batches], runs, "float64", SIZE)


@pytest.mark.parametrize("backend", [name for name in installed_backends() if name in ("chainer", "mindspore")])
def test_time_first_attention_drops_what_numpy_drops(backend):
    """Sequence first, the loop's batch is the sequence and the heads' batch a per-sample axis: the masks of
    the attention weights still come from the stream in NumPy's (N, H, L, S) order (MindSpore draws them flat
    and reads them so). One training forward and its gradients, float32."""
    spec = ut.Sequential({"attn": ut.MultiheadAttention(E, HEADS, dropout=0.5), "flatten": ut.Flatten(),
                          "head": ut.Linear(3 * E, CLASSES)})  # fmt: skip
    x, y = np.random.default_rng(SEED).standard_normal((S, 3, E)).astype(np.float32), np.arange(S) % CLASSES
    results = []
    for name in ("numpy", backend):
        loop = _loop(name, spec, "float32")
        loop.zero_grad()
        pred = loop.forward(x)
        loop.backward(loop.loss(pred, y))
        results.append((loop.to_numpy(pred), loop.gradients(), loop.eval().predict(x)))
    (expected, gradients, evaluated), (pred, other_gradients, _) = results
    bound = tolerance(np.float32, SIZE, 1.0)
    np.testing.assert_allclose(pred, expected, rtol=0, atol=bound)
    for key, value in gradients.items():
        np.testing.assert_allclose(other_gradients[key], value, rtol=0, atol=8 * bound, err_msg=key)
    assert np.abs(evaluated - expected).max() > 100 * bound  # dropout acted


KDIM, VDIM = 6, 4


class WideMemoryCrossAttention(nn.Module):
    """Cross-attention to another input of another width: keys of ``kdim`` features (the memory through a
    Linear) and values of ``vdim`` (another Linear of it), PyTorch's separate ``q/k/v_proj_weight``."""

    def __init__(self):
        super().__init__()
        self.keys, self.values = nn.Linear(KDIM, KDIM), nn.Linear(KDIM, VDIM)
        self.attn = nn.MultiheadAttention(E, HEADS, kdim=KDIM, vdim=VDIM, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, query, memory):
        h = self.attn(query, self.keys(memory), self.values(memory), need_weights=False)[0]
        return self.head(h.mean(1))


def _wide_memory_batches(steps=STEPS):
    rng = np.random.default_rng(SEED)
    return [((rng.standard_normal((BATCH, 3, E)).astype(np.float32), rng.standard_normal((BATCH, S, KDIM))
              .astype(np.float32)), rng.integers(0, CLASSES, BATCH)) for _ in range(steps)]  # fmt: skip


@pytest.fixture(scope="module")
def wide_memory_case():
    """The graph imported from ``WideMemoryCrossAttention`` (torch.fx), its initial weights drawn by unitrain,
    and torch.nn's runs of the module from them."""
    batches = _wide_memory_batches()
    spec = ut.from_torch(WideMemoryCrossAttention(), tuple(map(torch.from_numpy, batches[0][0])))
    initial = ut.init_weights(spec, SEED)
    runs = torch_runs(lambda dtype: load_state(WideMemoryCrossAttention().to(dtype), initial), SGD_OF, batches)
    return spec, batches, runs


@pytest.mark.parametrize("backend", installed_backends())
def test_cross_attention_with_other_key_and_value_widths_trains_like_torch_nn(wide_memory_case, backend):
    """``kdim``/``vdim`` (queries of 8 features, keys of 6, values of 4): from_torch maps the module, and 20
    SGD-momentum steps from the same weights land within PyTorch's own float32 drift of its float64 run
    (float64: within the conformance formula) on every backend (MindSpore: one float32 run, one compile)."""
    spec, batches, runs = wide_memory_case
    attn = spec.modules["attn"]
    assert attn == ut.MultiheadAttention(E, HEADS, batch_first=True, kdim=KDIM, vdim=VDIM)
    assert list(spec.state_shapes()) == list(WideMemoryCrossAttention().state_dict())
    for dtype in DTYPES[backend]:
        loop = _loop(backend, spec, dtype)
        losses = [loop.to_float(loop.step((tuple(part.astype(dtype) for part in x), y))) for x, y in batches]
        assert_run_within_drift(loop, losses, runs, dtype, SIZE)


def test_other_key_and_value_widths_init_refusals_and_to_torch():
    """PyTorch's Xavier bound per projection (fan_in its input's width), ``kdim = embed_dim`` the default's
    spec, inputs of the wrong width refused naming the width, and ``to_torch`` computing what the module
    computes from the same weights."""
    attn = ut.MultiheadAttention(64, 4, kdim=32, vdim=64)
    assert attn.param_shapes() == {key: tuple(value.shape) for key, value in
                                   nn.MultiheadAttention(64, 4, kdim=32, vdim=64).state_dict().items()}  # fmt: skip
    state = ut.init_weights(ut.Sequential(attn), 0)
    for key, fan_in in (("q_proj_weight", 64), ("k_proj_weight", 32), ("v_proj_weight", 64)):
        bound = math.sqrt(6 / (64 + fan_in))
        assert 0.95 * bound < np.abs(state[f"0.{key}"]).max() <= bound
    assert ut.MultiheadAttention(8, 2, kdim=8, vdim=8) == ut.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match=r"expects per-sample value \(L, vdim\) with vdim=4, got per-sample shape "
                                         r"\(5, 6\)"):  # fmt: skip
        ut.MultiheadAttention(E, HEADS, batch_first=True, kdim=KDIM, vdim=VDIM)(
            Input((3, E), "q"), Input((S, KDIM), "k"), Input((S, KDIM), "v"))  # fmt: skip
    with pytest.raises(ValueError, match="kdim must be a positive integer"):
        ut.MultiheadAttention(E, HEADS, kdim=0)
    batches = _wide_memory_batches(1)
    module = WideMemoryCrossAttention()
    query, memory = (torch.from_numpy(part) for part in batches[0][0])
    exported = ut.to_torch(ut.from_torch(module, (query, memory)))
    assert list(exported.state_dict()) == list(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(query, memory), module(query, memory), rtol=0, atol=0)


class MaskedSelfAttention(nn.Module):
    """Self-attention with a key padding mask and an attention mask, boolean (a per-sample ``(L, S)`` mask:
    PyTorch's ``(N * H, L, S)`` repeats it per head) or float (per head, ``(H, L, S)``: added)."""

    def __init__(self, additive):
        super().__init__()
        self.additive = additive
        self.attn, self.head = nn.MultiheadAttention(E, HEADS, batch_first=True), nn.Linear(E, CLASSES)

    def forward(self, x, padding, mask):
        if self.additive:
            padding, mask = padding, mask.flatten(0, 1)
        else:
            padding, mask = padding != 0, (mask != 0).repeat_interleave(HEADS, 0)
        return self.head(self.attn(x, x, x, key_padding_mask=padding, attn_mask=mask, need_weights=False)[0].mean(1))


def _masked_spec(additive):
    x, padding = Input((S, E), "x"), Input((S,), "padding")
    mask = Input((HEADS, S, S) if additive else (S, S), "mask")
    attn, head = ut.MultiheadAttention(E, HEADS, batch_first=True, additive_masks=additive), ut.Linear(E, CLASSES)
    return Graph([x, padding, mask], head(attn(x, x, x, padding, mask).mean(dim=1)), {"attn": attn, "head": head})


def _masked_batches(additive):
    """Padded keys and masked (query, key) pairs, key 0 never masked: no query loses every key. Float masks
    are -inf where they mask, offsets of about 1 elsewhere."""
    rng = np.random.default_rng(SEED)
    batches = []
    for _ in range(5):
        x = rng.standard_normal((BATCH, S, E))
        padded = np.arange(S) >= rng.integers(2, S + 1, BATCH)[:, None]
        masked = rng.random((BATCH, *((HEADS, S, S) if additive else (S, S)))) < 0.3
        masked[..., 0] = False
        if additive:
            padding = np.where(padded, -np.inf, rng.uniform(-1, 1, padded.shape))
            mask = np.where(masked, -np.inf, rng.standard_normal(masked.shape))
        else:
            padding, mask = padded.astype(np.float64), masked.astype(np.float64)
        batches.append(((x, padding, mask), rng.integers(0, CLASSES, BATCH)))
    return batches


@pytest.mark.parametrize("backend", [name for name in installed_backends() if name != "mindspore"])
@pytest.mark.parametrize("additive", [False, True], ids=["boolean", "additive"])
def test_attention_masks_train_like_torch_nn(additive, backend):
    """A key padding mask with an attention mask, PyTorch's boolean ones (a per-sample (L, S) mask) or float
    ones added to the scores (-inf and offsets; a per-head (H, L, S) mask): five SGD-momentum steps within
    the conformance formula of torch.nn's float64 run (float32: within its drift). MindSpore runs them in
    the conformance suite's check_attention."""
    spec, batches = _masked_spec(additive), _masked_batches(additive)
    initial = ut.init_weights(spec, SEED)
    runs = torch_runs(lambda dtype: load_state(MaskedSelfAttention(additive).to(dtype), initial), SGD_OF, batches)
    for dtype in DTYPES[backend]:
        loop = _loop(backend, spec, dtype)
        data = [(tuple(part.astype(dtype) for part in x), y) for x, y in batches]
        assert_run_within_drift(loop, [loop.to_float(loop.step(batch)) for batch in data], runs, dtype, SIZE)


def test_masks_of_the_wrong_shape_or_values_are_refused_before_any_framework_work():
    from unitrain.backends.numpy import NumpyLoop

    loop = NumpyLoop(_masked_spec(additive=True))
    x, padding, mask = np.zeros((2, S, E)), np.zeros((2, S)), np.zeros((2, HEADS, S, S))
    with pytest.raises(
        InputError, match=r"attn_mask must have per-sample shape \(5, 5\) or \(2, 5, 5\) .*got \(3, 5, 5\)"
    ):
        loop.step(((x, padding, np.zeros((2, 3, S, S))), np.array([0, 1])))
    with pytest.raises(InputError, match=r"^input 'mask': attn: an additive attention mask holds NaN or \+inf"):
        loop.step(((x, padding, np.full((2, HEADS, S, S), np.nan)), np.array([0, 1])))
    with pytest.raises(InputError, match=r"^input 'padding' must be numeric, got dtype <U1"):
        loop.step(((x, np.full((2, S), "a"), mask), np.array([0, 1])))
    assert loop.step_count == 0
    padding[:, -1] = -np.inf  # -inf masks a key
    assert np.isfinite(loop.predict((x, padding, mask))).all()
    with pytest.raises(ValueError, match=r"after \(query, key, value\) it takes key_padding_mask \(S,\) and/or"):
        _masked_spec(True).modules["attn"](*(Input((S, E), n) for n in "qkv"), Input((S, S), "m"), Input((S,), "p"))


def test_state_keys_init_and_serialisation_are_torch_s():
    mha = ut.MultiheadAttention(E, HEADS)
    assert mha.param_shapes() == {
        key: tuple(v.shape) for key, v in nn.MultiheadAttention(E, HEADS).state_dict().items()
    }
    layer = ut.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True, activation="gelu")
    twin = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True, activation="gelu")
    assert layer.state_shapes() == {key: tuple(value.shape) for key, value in twin.state_dict().items()}
    state = ut.init_weights(ut.Sequential(ut.MultiheadAttention(64, 4)), 0)
    bound = math.sqrt(6 / (64 + 3 * 64))  # xavier_uniform_ of the (3E, E) in_proj_weight
    assert 0.95 * bound < np.abs(state["0.in_proj_weight"]).max() <= bound
    assert 0.95 / 8 < np.abs(state["0.out_proj.weight"]).max() <= 1 / 8  # the Linear's U(-1/sqrt(E), 1/sqrt(E))
    assert not state["0.in_proj_bias"].any() and not state["0.out_proj.bias"].any()
    for spec in (model_spec(), model_spec(per_head=True)):
        assert from_dict(to_dict(spec)) == spec and repr(spec.enc).startswith("TransformerEncoder(encoder_layer=")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ut.MultiheadAttention(10, 3), "embed_dim 10 must be divisible by num_heads 3"),
        (lambda: ut.TransformerEncoderLayer(10, 4), "embed_dim 10 must be divisible by num_heads 4"),
        (lambda: ut.TransformerEncoderLayer(8, 2, activation="tanh"), "activation must be 'relu' or 'gelu'"),
        (lambda: ut.MultiheadAttention(8, 2, dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
        (lambda: ut.TransformerEncoderLayer(8, 2, dropout=-0.1), r"dropout must be a number in \[0, 1\), got -0.1"),
        (lambda: ut.MultiheadAttention(8, 2, dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
        (lambda: ut.TransformerEncoder(ut.LayerNorm(8), 2), "encoder_layer must be a TransformerEncoderLayer"),
        (
            lambda: ut.TransformerEncoderLayer(8, 2, per_head_mask=True),
            "per_head_mask=True describes src_mask; it needs src_mask=True",
        ),
        (
            lambda: ut.MultiheadAttention(8, 2)(
                Input((3, 8)), Input((3, 8), "k"), Input((3, 8), "v"), Input((3,), "m")
            ),
            "a key padding mask needs batch_first=True",
        ),
        (
            lambda: ut.MultiheadAttention(8, 2, batch_first=True)(*(Input((3, 8), n) for n in "qkv"), Input((4,), "m")),
            r"key_padding_mask must have per-sample shape \(3,\) \(one entry per key\), got \(4,\)",
        ),
    ],
)
def test_bad_arguments_and_masks(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_mask_of_the_wrong_length_is_refused_before_any_framework_work():
    from unitrain.backends.numpy import NumpyLoop

    loop = NumpyLoop(model_spec())
    x = np.zeros((2, S, E), np.float32)
    padding, mask = np.zeros((2, S), np.float32), np.zeros((2, S, S), np.float32)
    with pytest.raises(InputError, match=r"key_padding_mask must have per-sample shape \(5,\).*got \(4,\)"):
        loop.step(((x, np.zeros((2, 4), np.float32), mask), np.array([0, 1])))
    with pytest.raises(InputError, match=r"attn_mask must have per-sample shape \(5, 5\) or \(2, 5, 5\).*got \(5, 4\)"):
        loop.step(((x, padding, np.zeros((2, S, 4), np.float32)), np.array([0, 1])))
    assert loop.step_count == 0


def test_token_ids_beside_a_mask_stay_integers_and_are_checked():
    from unitrain.backends.numpy import NumpyLoop

    tokens, padding = Input((4,), "tokens"), Input((4,), "padding")
    embedding, attn = ut.Embedding(6, E), ut.MultiheadAttention(E, HEADS, batch_first=True)
    h = embedding(tokens)
    loop = NumpyLoop(Graph([tokens, padding], attn(h, h, h, padding), {"embedding": embedding, "attn": attn}))
    mask = np.array([[0, 0, 0, 1]], np.float32)
    assert loop.predict((np.array([[1, 5, 2, 0]]), mask)).shape == (1, 4, E)
    with pytest.raises(InputError, match=r"^input .tokens.: embedding: .* token id 6 is out of range; expected 0..5$"):
        loop.predict((np.array([[1, 6, 2, 0]]), mask))
    with pytest.raises(InputError, match="expects integer token ids, got float32 input"):
        loop.predict((np.array([[1, 5, 2, 0]], np.float32), mask))


def test_the_command_refuses_indivisible_heads_in_one_line(tmp_path):
    (tmp_path / "attention.py").write_text(
        "import unitrain as ut\n\n\n"
        "def model():\n    return ut.Sequential(ut.MultiheadAttention(10, 3, batch_first=True), ut.Flatten())\n"
    )
    rng = np.random.default_rng(0)
    arrays = {f"{kind}_{split}": value for split in ("train", "test")
              for kind, value in (("x", rng.standard_normal((8, 4, 10)).astype(np.float32)),
                                  ("y", rng.integers(0, 3, 8)))}  # fmt: skip
    np.savez(tmp_path / "data.npz", **arrays)
    command = ["train", "--dataset", "data.npz", "--model", "attention:model", "--backend", "mindspore"]
    result = subprocess.run([sys.executable, "-m", "unitrain", *command], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""  # nothing announced: no loop was built
    assert result.stderr.count("\n") == 1 and "embed_dim 10 must be divisible by num_heads 3" in result.stderr
