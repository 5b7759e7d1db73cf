"""Frozen parameters get no gradient at all, as PyTorch's ``requires_grad=False``, on the backends
whose gradients unitrain drives itself (NumPy's own backpropagation, Chainer's graph): not only no
update. What they train is test_controls.py's (equal to the hand-written PyTorch loop); here, that
the frozen ones' gradients are never computed, read from each backend's own gradient store."""

import numpy as np
import pytest
from conftest import installed_backends
from unitrain.backends.numpy_sequences import _Freezable

import unitrain
from unitrain import layers
from unitrain.graph import Graph, Input


def _model():
    return layers.Sequential(layers.Linear(6, 5), layers.ReLU(), layers.Linear(5, 4), layers.ReLU(),
                             layers.Linear(4, 3))  # fmt: skip


def _computed_gradients(loop):
    """The parameters whose gradient the last backward computed, from the backend's own store:
    Chainer's ``param.grad`` (None until a backward sets it), the NumPy layers' ``grads`` (a frozen
    parameter has no array there for its layer's backward to add to)."""
    if loop.name == "chainer":
        return {name for name, param in loop._params.items() if param.grad is not None}
    return set(loop._grads)


@pytest.mark.parametrize("backend", [name for name in ("numpy", "chainer") if name in installed_backends()])
def test_frozen_parameters_get_no_gradient(backend):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8)
    loop = unitrain.make_loop(backend, _model(), frozen=["0", "2.weight"])
    loop.zero_grad()
    loop.backward(loop.loss(loop.forward(x), y))
    assert _computed_gradients(loop) == {"2.bias", "4.weight", "4.bias"}
    assert set(loop.gradients()) == {"2.bias", "4.weight", "4.bias"}
    if backend == "numpy":  # and backpropagation stops at the first layer that trains (Chainer: no graph below it)
        assert loop._root.first_trained == 2


def _sequence_model():
    """Every NumPy layer family with parameters besides Linear, Conv2d and BatchNorm: Embedding, LSTM,
    GRU, Conv1d, MultiheadAttention, LayerNorm and ConvTranspose2d (over the (N, 1, T, E) features)."""
    tokens = Input((6,), name="tokens")
    modules = {"embedding": unitrain.Embedding(10, 4), "lstm": unitrain.LSTM(4, 5, batch_first=True),
               "gru": unitrain.GRU(5, 6, batch_first=True), "conv": unitrain.Conv1d(6, 6, 3, padding=1),
               "attention": unitrain.MultiheadAttention(6, 2, batch_first=True), "norm": unitrain.LayerNorm(6),
               "up": unitrain.ConvTranspose2d(1, 2, 2, stride=2), "decoder": layers.Linear(12, 3)}  # fmt: skip
    m = modules
    h = m["gru"](m["lstm"](m["embedding"](tokens)))
    h = m["norm"](m["attention"](m["conv"](h.permute(0, 2, 1)).permute(0, 2, 1)))
    up = m["up"](h.reshape(-1, 1, 6, 6))  # (N, 2, 12, 12)
    logits = m["decoder"](up.mean(1)[:, :6]).permute(0, 2, 1)  # (N, 3, 6): a class per position
    return Graph(tokens, logits, modules=modules)


FROZEN = [
    "embedding.weight",
    "lstm.weight_ih_l0",
    "lstm.bias_hh_l0",
    "gru.weight_hh_l0",
    "conv.weight",
    "attention.in_proj_weight",
    "attention.out_proj.bias",
    "norm.weight",
    "up.weight",
    "decoder.bias",
]


@pytest.mark.skipif("numpy" not in installed_backends(), reason="numpy backend")
def test_numpy_layers_compute_no_frozen_gradient(monkeypatch):
    """Each frozen parameter's gradient array, taken out of its layer, stays untouched by backward: no
    layer computes into an array it kept from before the freezing, or into one it has no more."""
    taken = {}
    freeze = _Freezable.freeze

    def keep_the_array(layer, key):
        taken.setdefault(id(layer), []).append(layer.grads[key])
        return freeze(layer, key)

    monkeypatch.setattr(_Freezable, "freeze", keep_the_array)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, (4, 6)), rng.integers(0, 3, (4, 6))
    loop = unitrain.make_loop("numpy", _sequence_model(), frozen=FROZEN)
    loop.zero_grad()
    loop.backward(loop.loss(loop.forward(x), y))
    assert set(loop._grads) == set(loop._params) - set(FROZEN)
    assert sum(len(arrays) for arrays in taken.values()) == len(FROZEN)
    assert all(not array.any() for arrays in taken.values() for array in arrays)
    assert all(np.abs(grad).sum() > 0 for grad in loop._grads.values())
