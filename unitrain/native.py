"""Each framework's own tutorial training loop, written by hand without unitrain, for the two
preset models and plain SGD: what ``unitrain compare --native`` and ``benchmarks/bench_step.py``
measure unitrain's adapters against, in speed and in weights.

PyTorch: ``zero_grad / forward / cross_entropy / backward / step``. MindSpore: ``value_and_grad``
plus a ``@mindspore.jit`` ``train_step`` calling ``nn.SGD``. Chainer: a ``Chain`` with
``cleargrads / backward / update`` and ``optimizers.SGD``. Each starts from the given weights
(PyTorch layouts, as :func:`~unitrain.weights.init_weights` makes them) and gives them back the
same way, so they compare key by key with any unitrain loop. The framework is imported only when
its loop is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .layers import Sequential, preset
from .optim import SGD, Optimizer

#: frameworks with a native loop here (NumPy has no tutorial loop of its own)
FRAMEWORKS = ("torch", "mindspore", "chainer")
#: the preset models the native loops build
MODELS = ("mlp", "cnn")


class NativeLoop:
    """A framework's tutorial loop behind the few names :meth:`~unitrain.TrainingLoop.fit`'s
    extensions use: ``step(x, y)`` (the native loss, not synced), ``to_float``, ``state_dict()``
    (NumPy copies, PyTorch keys) and ``step_count``."""

    def __init__(self, step: Callable[[np.ndarray, np.ndarray], Any], state_dict: Callable[[], dict],
                 to_float: Callable[[Any], float]):  # fmt: skip
        self._step, self.state_dict, self.to_float = step, state_dict, to_float
        self.step_count = 0

    def step(self, x: np.ndarray, y: np.ndarray) -> Any:
        loss = self._step(x, y)
        self.step_count += 1
        return loss


def check_run(model: Sequential, optimizer: Optimizer) -> str:
    """The preset name of ``model`` if the native loops can train it with ``optimizer`` (plain SGD,
    the tutorials' optimizer); ValueError saying why not otherwise."""
    name = next((name for name in MODELS if preset(name) == model), None)
    if name is None:
        raise ValueError(f"the native loops build the preset models {', '.join(MODELS)} only")
    if optimizer != SGD(lr=optimizer.lr):
        raise ValueError(f"the native loops train with the tutorials' plain SGD(lr), not {optimizer}")
    return name


def native_loop(framework: str, model_name: str, state: dict[str, np.ndarray], lr: float = 0.01) -> NativeLoop:
    """The ``framework``'s tutorial loop training preset ``model_name`` from ``state`` with SGD(lr)."""
    return {"torch": _torch, "mindspore": _mindspore, "chainer": _chainer}[framework](model_name, state, lr)


def _torch(model_name, state, lr):
    import torch
    import torch.nn.functional as F
    from torch import nn

    if model_name == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                            nn.Linear(512, 10))  # fmt: skip
    else:
        net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 12, 5), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(192, 120), nn.ReLU(), nn.Linear(120, 60),
                            nn.ReLU(), nn.Linear(60, 10))  # fmt: skip
    net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)

    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        return loss.detach()

    def state_dict():
        return {key: value.detach().numpy().copy() for key, value in net.state_dict().items()}

    return NativeLoop(step, state_dict, lambda loss: loss.item())


def _mindspore(model_name, state, lr):
    import mindspore as ms
    from mindspore import nn

    ms.set_device("CPU")
    if model_name == "mlp":
        net = nn.SequentialCell(nn.Flatten(), nn.Dense(784, 512), nn.ReLU(), nn.Dense(512, 512), nn.ReLU(),
                                nn.Dense(512, 10))  # fmt: skip
    else:
        net = nn.SequentialCell(nn.Conv2d(1, 6, 5, pad_mode="valid", has_bias=True), nn.ReLU(),
                                nn.MaxPool2d(2, 2), nn.Conv2d(6, 12, 5, pad_mode="valid", has_bias=True), nn.ReLU(),
                                nn.MaxPool2d(2, 2), nn.Flatten(), nn.Dense(192, 120), nn.ReLU(), nn.Dense(120, 60),
                                nn.ReLU(), nn.Dense(60, 10))  # fmt: skip
    params = net.trainable_params()  # in the order of the PyTorch keys: weight, bias, layer by layer
    for param, value in zip(params, state.values(), strict=True):
        param.set_data(ms.Tensor(np.array(value, np.float32)))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = nn.SGD(params, learning_rate=lr)

    def forward(data, label):
        return loss_fn(net(data), label)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    @ms.jit
    def train_step(data, label):
        loss, grads = grad_fn(data, label)
        optimizer(grads)
        return loss

    def step(x, y):
        return train_step(ms.Tensor.from_numpy(x), ms.Tensor.from_numpy(y.astype(np.int32)))

    def state_dict():
        return {key: param.asnumpy().copy() for key, param in zip(state, params, strict=True)}

    return NativeLoop(step, state_dict, lambda loss: float(loss.asnumpy()))


def _chainer(model_name, state, lr):
    os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    import chainer
    import chainer.functions as F
    import chainer.links as L

    class MLP(chainer.Chain):  # as in Chainer's "write a training loop" tutorial
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1, self.l2, self.l3 = L.Linear(784, 512), L.Linear(512, 512), L.Linear(512, 10)

        def forward(self, x):
            return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))

    class CNN(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.c1, self.c2 = L.Convolution2D(1, 6, 5), L.Convolution2D(6, 12, 5)
                self.l1, self.l2, self.l3 = L.Linear(192, 120), L.Linear(120, 60), L.Linear(60, 10)

        def forward(self, x):
            h = F.max_pooling_2d(F.relu(self.c1(x)), 2, cover_all=False)
            h = F.max_pooling_2d(F.relu(self.c2(h)), 2, cover_all=False)
            return self.l3(F.relu(self.l2(F.relu(self.l1(h)))))

    net = MLP() if model_name == "mlp" else CNN()
    links = [net.l1, net.l2, net.l3] if model_name == "mlp" else [net.c1, net.c2, net.l1, net.l2, net.l3]
    params = [p for link in links for p in (link.W, link.b)]  # Chainer's W is (out, in, ...) as PyTorch's
    for param, value in zip(params, state.values(), strict=True):
        param.array[...] = value
    optimizer = chainer.optimizers.SGD(lr=lr)
    optimizer.setup(net)

    def step(x, y):
        loss = F.softmax_cross_entropy(net(x), y.astype(np.int32))
        net.cleargrads()
        loss.backward()
        optimizer.update()
        return loss.array

    def state_dict():
        return {key: param.array.copy() for key, param in zip(state, params, strict=True)}

    return NativeLoop(step, state_dict, float)
