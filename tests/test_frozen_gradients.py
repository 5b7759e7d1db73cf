"""Frozen parameters get no gradient at all, as PyTorch's ``requires_grad=False``, on the backends
whose gradients unitrain drives itself (NumPy's own backpropagation, Chainer's graph): not only no
update. What they train is test_controls.py's (equal to the hand-written PyTorch loop); here, that
the frozen ones' gradients are never computed, read from each backend's own gradient store."""

import numpy as np
import pytest
from conftest import installed_backends

import unitrain
from unitrain import layers


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
