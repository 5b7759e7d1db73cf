"""Each framework's own tutorial training loop, written by hand without unitrain, for the preset
models with the framework's own SGD, momentum SGD or Adam: what ``unitrain compare --native`` and
``benchmarks/bench_step.py`` measure unitrain's adapters against, in speed and in weights.

PyTorch: ``zero_grad / forward / cross_entropy / backward / step`` with ``torch.optim.SGD`` or
``Adam``. MindSpore: ``value_and_grad`` plus a ``@mindspore.jit`` ``train_step`` calling
``nn.SGD``, ``nn.Momentum`` or ``nn.Adam``. Chainer: a ``Chain`` with ``cleargrads / backward /
update`` and ``optimizers.SGD``, ``MomentumSGD`` or ``Adam``. Each starts from the given weights
(PyTorch layouts, as :func:`~unitrain.weights.init_weights` makes them) and gives them back the
same way, so they compare key by key with any unitrain loop. The framework is imported only when
its loop is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .dialects import dialect
from .layers import preset
from .optim import SGD, Adam, Optimizer
from .run import Run

#: frameworks with a native loop here (NumPy has no tutorial loop of its own)
FRAMEWORKS = ("torch", "mindspore", "chainer")
#: where each framework's own Adam adds eps (torch/optim/adam.py; chainer/optimizers/adam.py and
#: MindSpore's ``P.Adam`` primitive: see docs/dialects.md); no framework has the other place natively
ADAM_EPS_PLACEMENT = {"torch": "after_correction", "mindspore": "before_correction", "chainer": "before_correction"}
#: the preset models every native loop builds (what ``compare --native`` accepts)
MODELS = ("mlp", "cnn")
#: built by the MindSpore and Chainer loops too, for ``benchmarks/bench_step.py`` (whose PyTorch twins
#: of them are tests/torch_reference.py's): LeNet and ResNet-18, its input channels and classes read
#: from the state's ``conv1.weight`` and ``fc.weight``
BENCHMARK_MODELS = ("lenet", "resnet18")


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


def check_run(run: Run) -> str:
    """The preset name of ``run``'s model if the native loops can train the run: a preset they
    build (with the run's dialect's defaults: MindSpore's has bias-free convolutions), SGD(lr,
    momentum) or Adam(lr, betas, eps) as the frameworks' own optimizers have them, cross-entropy, a
    constant lr, no clipping; ValueError saying why not otherwise. At a constant lr PyTorch's
    momentum (``buf = m * buf + g; p -= lr * buf``, MindSpore's too) and Chainer's (``v = m * v -
    lr * g; p += v``) are the same update (``v = -lr * buf``), so every framework's serves every
    dialect; Adam's eps placement is each framework's own (:data:`ADAM_EPS_PLACEMENT`,
    :func:`optimizer_problem`)."""
    with dialect(run.dialect or "torch"):
        name = next((name for name in MODELS if preset(name) == run.model_spec()), None)
    if name is None:
        raise ValueError(f"the native loops build the preset models {', '.join(MODELS)} only")
    spec, native = run.optimizer, None
    if type(spec) is SGD:
        native = SGD(lr=spec.lr, momentum=spec.momentum, lr_in_velocity=spec.lr_in_velocity)
    elif type(spec) is Adam:
        native = Adam(lr=spec.lr, betas=spec.betas, eps=spec.eps, eps_placement=spec.eps_placement)
    if spec != native:
        raise ValueError(f"the native loops train with the frameworks' SGD(lr, momentum) or Adam(lr, betas, eps), "
                         f"not {spec}")  # fmt: skip
    if run.loss != "cross-entropy":
        raise ValueError(f"the native loops train with cross-entropy, not {run.loss}")
    options = [key for key in ("lr_schedule", "clip_grad_norm", "clip_grad_value") if getattr(run, key) is not None]
    if options:
        raise ValueError(f"the native loops train at a constant lr without clipping, not with {', '.join(options)}")
    defaults = {"frozen": (), "param_groups": (), "accumulate_grad_batches": 1, "early_stopping": None,
                "drop_last": False}  # fmt: skip
    controls = [key for key, unset in defaults.items() if getattr(run, key) != unset]
    if controls:
        raise ValueError(f"the native loops train every parameter, one batch a step, without {', '.join(controls)}")
    return name


def optimizer_problem(framework: str, spec: Optimizer) -> str | None:
    """Why ``framework``'s own optimizer cannot compute ``spec`` (a :func:`check_run` optimizer), or None."""
    if isinstance(spec, Adam) and spec.eps_placement != ADAM_EPS_PLACEMENT[framework]:
        return (f"{framework}'s own Adam adds eps {ADAM_EPS_PLACEMENT[framework].replace('_', ' the bias ')}, "
                f"this run's {spec.eps_placement.replace('_', ' the bias ')}")  # fmt: skip
    return None


def native_frameworks(spec: Optimizer) -> tuple[str, ...]:
    """The frameworks whose own optimizer computes ``spec`` (a :func:`check_run` optimizer)."""
    return tuple(framework for framework in FRAMEWORKS if optimizer_problem(framework, spec) is None)


def native_loop(framework: str, model_name: str, state: dict[str, np.ndarray], optimizer: Optimizer | None = None
                ) -> NativeLoop:  # fmt: skip
    """The ``framework``'s tutorial loop training preset ``model_name`` (one of :data:`MODELS`, or for
    MindSpore and Chainer of :data:`BENCHMARK_MODELS` too) from ``state`` with the framework's own
    ``optimizer`` (default SGD(0.01); a :func:`check_run` optimizer without :func:`optimizer_problem`)."""
    optimizer = SGD(0.01) if optimizer is None else optimizer
    if problem := optimizer_problem(framework, optimizer):
        raise ValueError(problem)
    return {"torch": _torch, "mindspore": _mindspore, "chainer": _chainer}[framework](model_name, state, optimizer)


def _batches_tracked(state: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """PyTorch's BatchNorm step counts after ``steps`` more steps from ``state`` (MindSpore's and
    Chainer's BatchNorms keep none)."""
    return {key: np.asarray(value + steps) for key, value in state.items() if key.endswith(".num_batches_tracked")}


def _renamed(names: dict[str, str], separator: str, suffixes: dict[str, str]) -> dict[str, str]:
    """``names`` (native name -> anything) keyed to PyTorch's: ``separator`` becomes ``.`` and the last
    part is translated by ``suffixes`` (those not in it are kept)."""
    renamed = {}
    for name in names:
        *path, last = name.strip(separator).split(separator)
        renamed[name] = ".".join([*path, suffixes.get(last, last)])
    return renamed


def _resnet_shape(state: dict[str, np.ndarray]) -> tuple[int, int]:
    """(input channels, classes) of the ResNet-18 whose weights are ``state``."""
    return state["conv1.weight"].shape[1], state["fc.weight"].shape[0]


def _torch(model_name, state, optimizer):
    from torch import nn

    if model_name == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                            nn.Linear(512, 10))  # fmt: skip
    else:
        bias = "0.bias" in state  # MindSpore's dialect: convolutions without bias
        net = nn.Sequential(nn.Conv2d(1, 6, 5, bias=bias), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 12, 5, bias=bias),
                            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(192, 120), nn.ReLU(),
                            nn.Linear(120, 60), nn.ReLU(), nn.Linear(60, 10))  # fmt: skip
    return torch_loop(net, state, optimizer)


def torch_loop(net, state: dict[str, np.ndarray], spec: Optimizer) -> NativeLoop:
    """PyTorch's tutorial loop (``zero_grad / forward / loss / backward / step``, ``torch.optim``'s
    SGD or Adam for ``spec``) training the ``torch.nn.Module`` ``net`` from ``state``."""
    import torch
    import torch.nn.functional as F

    net.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
    if isinstance(spec, Adam):
        optimizer = torch.optim.Adam(net.parameters(), lr=spec.lr, betas=spec.betas, eps=spec.eps)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=spec.lr, momentum=spec.momentum)

    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        return loss.detach()

    def state_dict():
        return {key: value.detach().numpy().copy() for key, value in net.state_dict().items()}

    return NativeLoop(step, state_dict, lambda loss: loss.item())


def _mindspore(model_name, state, optimizer):
    import mindspore as ms
    from mindspore import nn

    ms.set_device("CPU")
    if model_name in BENCHMARK_MODELS:
        return _mindspore_named(model_name, state, optimizer)
    if model_name == "mlp":
        net = nn.SequentialCell(nn.Flatten(), nn.Dense(784, 512), nn.ReLU(), nn.Dense(512, 512), nn.ReLU(),
                                nn.Dense(512, 10))  # fmt: skip
    else:
        bias = "0.bias" in state  # MindSpore's dialect: its own Conv2d default, no bias
        net = nn.SequentialCell(nn.Conv2d(1, 6, 5, pad_mode="valid", has_bias=bias), nn.ReLU(),
                                nn.MaxPool2d(2, 2), nn.Conv2d(6, 12, 5, pad_mode="valid", has_bias=bias), nn.ReLU(),
                                nn.MaxPool2d(2, 2), nn.Flatten(), nn.Dense(192, 120), nn.ReLU(), nn.Dense(120, 60),
                                nn.ReLU(), nn.Dense(60, 10))  # fmt: skip
    params = net.trainable_params()  # in the order of the PyTorch keys: weight, bias, layer by layer
    for param, value in zip(params, state.values(), strict=True):
        param.set_data(ms.Tensor(np.array(value, np.float32)))
    return _mindspore_train(net, params, optimizer, lambda: {
        key: param.asnumpy().copy() for key, param in zip(state, params, strict=True)})  # fmt: skip


def _mindspore_train(net, params, spec, state_dict):
    """MindSpore's tutorial training step for ``net``: ``value_and_grad`` of the loss, ``nn.SGD``,
    ``nn.Momentum`` or ``nn.Adam`` (``spec``) on ``params``, one ``@mindspore.jit`` graph."""
    import mindspore as ms
    from mindspore import nn

    net.set_train(True)  # BatchNorm normalises with the batch's statistics and updates its running ones
    loss_fn = nn.CrossEntropyLoss()
    if isinstance(spec, Adam):
        optimizer = nn.Adam(params, learning_rate=spec.lr, beta1=spec.betas[0], beta2=spec.betas[1], eps=spec.eps)
    elif spec.momentum:
        optimizer = nn.Momentum(params, learning_rate=spec.lr, momentum=spec.momentum)
    else:
        optimizer = nn.SGD(params, learning_rate=spec.lr)

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

    return NativeLoop(step, state_dict, lambda loss: float(loss.asnumpy()))


def _mindspore_named(model_name, state, optimizer):
    """LeNet and ResNet-18 as Cells whose parameter names are PyTorch's but for BatchNorm's."""
    import mindspore as ms
    from mindspore import nn, ops

    class LeNet(nn.Cell):  # MindSpore's LeNet-5 tutorial's Cell, with the GarmentClassifier's layers
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5, pad_mode="valid", has_bias=True)
            self.conv2 = nn.Conv2d(6, 16, 5, pad_mode="valid", has_bias=True)
            self.fc1, self.fc2, self.fc3 = nn.Dense(256, 120), nn.Dense(120, 84), nn.Dense(84, 10)
            self.relu, self.max_pool2d, self.flatten = nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten()

        def construct(self, x):
            x = self.max_pool2d(self.relu(self.conv1(x)))
            x = self.flatten(self.max_pool2d(self.relu(self.conv2(x))))
            return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))

    def batch_norm(channels):  # MindSpore's momentum weighs the old running value: 1 - PyTorch's 0.1
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.9)

    def conv(in_channels, out_channels, kernel, stride=1, padding=0):
        return nn.Conv2d(in_channels, out_channels, kernel, stride, pad_mode="pad", padding=padding)

    class BasicBlock(nn.Cell):
        def __init__(self, in_planes, planes, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(in_planes, planes, 3, stride, 1), batch_norm(planes)
            self.conv2, self.bn2 = conv(planes, planes, 3, 1, 1), batch_norm(planes)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or in_planes != planes:
                self.downsample = nn.SequentialCell(conv(in_planes, planes, 1, stride), batch_norm(planes))

        def construct(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Cell):
        def __init__(self, in_channels, num_classes):
            super().__init__()
            self.conv1, self.bn1, self.relu = conv(in_channels, 64, 7, 2, 3), batch_norm(64), nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, pad_mode="pad", padding=1)
            in_planes = 64
            for index, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
                setattr(
                    self,
                    f"layer{index}",
                    nn.SequentialCell(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)),
                )
                in_planes = planes
            self.fc = nn.Dense(512, num_classes)

        def construct(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(ops.mean(x, (2, 3)))

    net = LeNet() if model_name == "lenet" else ResNet18(*_resnet_shape(state))
    native = dict(net.parameters_and_names())
    names = _renamed(native, ".", {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                                   "moving_variance": "running_var"})  # fmt: skip
    if set(names.values()) | set(_batches_tracked(state, 0)) != set(state):
        raise ValueError(f"the MindSpore {model_name} does not have the state's keys")
    for name, param in native.items():
        param.set_data(ms.Tensor(np.array(state[names[name]], np.float32)))

    def state_dict():
        values = {names[name]: param.asnumpy().copy() for name, param in native.items()}
        values |= _batches_tracked(state, loop.step_count)
        return {key: values[key] for key in state}

    loop = _mindspore_train(net, net.trainable_params(), optimizer, state_dict)
    return loop


def _chainer(model_name, state, optimizer):
    os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    import chainer
    import chainer.functions as F
    import chainer.links as L

    if model_name in BENCHMARK_MODELS:
        return _chainer_named(model_name, state, optimizer)

    class MLP(chainer.Chain):  # as in Chainer's "write a training loop" tutorial
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1, self.l2, self.l3 = L.Linear(784, 512), L.Linear(512, 512), L.Linear(512, 10)

        def forward(self, x):
            return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))

    class CNN(chainer.Chain):
        def __init__(self, nobias):
            super().__init__()
            with self.init_scope():
                self.c1, self.c2 = L.Convolution2D(1, 6, 5, nobias=nobias), L.Convolution2D(6, 12, 5, nobias=nobias)
                self.l1, self.l2, self.l3 = L.Linear(192, 120), L.Linear(120, 60), L.Linear(60, 10)

        def forward(self, x):
            h = F.max_pooling_2d(F.relu(self.c1(x)), 2, cover_all=False)
            h = F.max_pooling_2d(F.relu(self.c2(h)), 2, cover_all=False)
            return self.l3(F.relu(self.l2(F.relu(self.l1(h)))))

    net = MLP() if model_name == "mlp" else CNN(nobias="0.bias" not in state)
    links = [net.l1, net.l2, net.l3] if model_name == "mlp" else [net.c1, net.c2, net.l1, net.l2, net.l3]
    # Chainer's W is (out, in, ...) as PyTorch's; a link without bias has b None
    params = [p for link in links for p in (link.W, link.b) if p is not None]
    for param, value in zip(params, state.values(), strict=True):
        param.array[...] = value
    return _chainer_train(net, optimizer, lambda: {
        key: param.array.copy() for key, param in zip(state, params, strict=True)})  # fmt: skip


def _chainer_train(net, spec, state_dict):
    """Chainer's tutorial training step for ``net``: ``cleargrads / backward / update`` with
    ``optimizers.SGD``, ``MomentumSGD`` or ``Adam`` (``spec``)."""
    import chainer
    import chainer.functions as F

    if isinstance(spec, Adam):
        optimizer = chainer.optimizers.Adam(alpha=spec.lr, beta1=spec.betas[0], beta2=spec.betas[1], eps=spec.eps)
    elif spec.momentum:
        optimizer = chainer.optimizers.MomentumSGD(lr=spec.lr, momentum=spec.momentum)
    else:
        optimizer = chainer.optimizers.SGD(lr=spec.lr)
    optimizer.setup(net)

    def step(x, y):
        loss = F.softmax_cross_entropy(net(x), y.astype(np.int32))
        net.cleargrads()
        loss.backward()
        optimizer.update()
        return loss.array

    return NativeLoop(step, state_dict, float)


def _chainer_named(model_name, state, optimizer):
    """LeNet and ResNet-18 as Chains whose link names are PyTorch's module names."""
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from chainer import serializers

    class LeNet(chainer.Chain):  # PyTorch's "Training with PyTorch" GarmentClassifier
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.conv1, self.conv2 = L.Convolution2D(1, 6, 5), L.Convolution2D(6, 16, 5)
                self.fc1, self.fc2, self.fc3 = L.Linear(256, 120), L.Linear(120, 84), L.Linear(84, 10)

        def forward(self, x):
            h = F.max_pooling_2d(F.relu(self.conv1(x)), 2, cover_all=False)
            h = F.max_pooling_2d(F.relu(self.conv2(h)), 2, cover_all=False)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(h)))))

    def batch_norm(
        channels,
    ):  # decay weighs the old running value (1 - PyTorch's momentum 0.1); Chainer's default eps is 2e-5, PyTorch's 1e-5
        return L.BatchNormalization(channels, decay=0.9, eps=1e-5)

    class BasicBlock(chainer.Chain):
        def __init__(self, in_planes, planes, stride):
            super().__init__()
            with self.init_scope():
                self.conv1 = L.Convolution2D(in_planes, planes, 3, stride, 1, nobias=True)
                self.bn1 = batch_norm(planes)
                self.conv2 = L.Convolution2D(planes, planes, 3, 1, 1, nobias=True)
                self.bn2 = batch_norm(planes)
                if stride != 1 or in_planes != planes:
                    self.downsample = chainer.Sequential(
                        L.Convolution2D(in_planes, planes, 1, stride, 0, nobias=True), batch_norm(planes)
                    )

        def forward(self, x):
            h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(h + (self.downsample(x) if hasattr(self, "downsample") else x))

    class ResNet18(chainer.Chain):
        def __init__(self, in_channels, num_classes):
            super().__init__()
            with self.init_scope():
                self.conv1 = L.Convolution2D(in_channels, 64, 7, 2, 3, nobias=True)
                self.bn1 = batch_norm(64)
                in_planes = 64
                for index, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
                    setattr(
                        self,
                        f"layer{index}",
                        chainer.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)),
                    )
                    in_planes = planes
                self.fc = L.Linear(512, num_classes)

        def forward(self, x):
            h = F.max_pooling_2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1, cover_all=False)
            h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
            return self.fc(F.mean(h, axis=(2, 3)))

    net = LeNet() if model_name == "lenet" else ResNet18(*_resnet_shape(state))
    # Chainer's serializers read and write the weights and BatchNorm's statistics by path ("layer1/0/bn1/gamma");
    # BatchNormalization.N counts its fine-tuning mode, unused in training, and is left as it is
    serializer = serializers.DictionarySerializer()
    serializer.save(net)
    names = _renamed(serializer.target, "/", {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias",
                                              "avg_mean": "running_mean", "avg_var": "running_var"})  # fmt: skip
    names = {name: key for name, key in names.items() if not name.endswith("/N")}
    if set(names.values()) | set(_batches_tracked(state, 0)) != set(state):
        raise ValueError(f"the Chainer {model_name} does not have the state's keys")
    serializers.NpzDeserializer({**serializer.target, **{name: state[key] for name, key in names.items()}}).load(net)

    def state_dict():
        serializer = serializers.DictionarySerializer()
        serializer.save(net)
        values = {key: np.array(serializer.target[name]) for name, key in names.items()}
        values |= _batches_tracked(state, loop.step_count)
        return {key: values[key] for key in state}

    loop = _chainer_train(net, optimizer, state_dict)
    return loop
