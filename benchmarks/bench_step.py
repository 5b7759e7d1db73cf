"""Training-step throughput: unitrain's adapters against hand-written native loops, same run.

    .venv/bin/python benchmarks/bench_step.py [--steps 200] [--backends numpy,torch,...] [--json FILE]

For each backend and model (the tutorial MLP at batch 64, the tutorial CNN at batch 100) it times
``steps`` SGD steps on the same MNIST batches, after a warm-up, through ``loop.step`` and through
the framework's own tutorial loop written by hand, and reports samples/s and the ratio
unitrain/native (1.00 = no overhead). NumPy has no native loop; its ratio is against PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

import unitrain

WARMUP = 20
MODELS = {"mlp": 64, "cnn": 100}


def _time(step, batches, steps) -> float:
    for x, y in batches[:WARMUP]:
        step(x, y)
    started = time.perf_counter()
    last = None
    for i in range(steps):
        x, y = batches[i % len(batches)]
        last = step(x, y)
    float(last)  # wait for asynchronous frameworks to finish
    return steps * len(batches[0][0]) / (time.perf_counter() - started)


def native_torch(model_name, state):
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
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def native_mindspore(model_name, state):
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
    for param, value in zip(net.trainable_params(), state.values(), strict=True):
        param.set_data(ms.Tensor(value))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.01)

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

    return step


def native_chainer(model_name, state):
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
    params = [p for link in links for p in (link.W, link.b)]
    for param, value in zip(params, state.values(), strict=True):
        param.array[...] = value
    optimizer = chainer.optimizers.SGD(lr=0.01)
    optimizer.setup(net)

    def step(x, y):
        loss = F.softmax_cross_entropy(net(x), y.astype(np.int32))
        net.cleargrads()
        loss.backward()
        optimizer.update()
        return loss.array

    return step


NATIVE = {"torch": native_torch, "mindspore": native_mindspore, "chainer": native_chainer}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backends", default="numpy,torch,mindspore,chainer")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    started = time.perf_counter()
    train = unitrain.load_mnist("train")
    load_seconds = time.perf_counter() - started
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"MNIST train+cache load {load_seconds:.2f} s")  # fmt: skip
    results = []
    for model_name, batch_size in MODELS.items():
        batches = list(train.batches(batch_size))[: args.steps]
        state = unitrain.init_weights(unitrain.layers.preset(model_name), seed=0)
        for backend in args.backends.split(","):
            loop = unitrain.make_loop(backend, unitrain.layers.preset(model_name), seed=0)
            ours = _time(lambda x, y, loop=loop: loop.step((x, y)), batches, args.steps)
            reference = "torch" if backend == "numpy" else backend
            native = _time(NATIVE[reference](model_name, state), batches, args.steps)
            results.append({"model": model_name, "batch": batch_size, "backend": backend,
                            "unitrain_samples_per_sec": ours, "native": reference,
                            "native_samples_per_sec": native, "ratio": ours / native})  # fmt: skip

    print("\n| model | backend | unitrain samples/s | native loop | native samples/s | unitrain / native |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for r in results:
        print(f"| {r['model']} (batch {r['batch']}) | {r['backend']} | {r['unitrain_samples_per_sec']:.0f} | "
              f"{r['native']} | {r['native_samples_per_sec']:.0f} | {r['ratio']:.2f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mnist_load_seconds": load_seconds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
