"""The DCGAN step of unitrain.steps against each framework's hand-written two-optimizer loop.

    .venv/bin/python benchmarks/bench_generative.py [--steps N] [--repeats R] [--backends torch,chainer]
        [--threads N] [--cpu-time] [--json FILE]

examples/dcgan.py's models (``--features`` channels, nz 100, batch 64, Adam 2e-4 beta1 0.5) trained
by ``steps.MultiModelLoop``, and by the tutorial's loop written in the framework itself on the same
native modules (torch: ``nn.Module``s and ``torch.optim.Adam``; Chainer: the adapter's links and
``chainer.optimizers.Adam``; MindSpore: the adapter's Cells, ``nn.Adam`` and ``nn.BCELoss``, each
phase's ``value_and_grad`` and both optimizers in one ``mindspore.jit`` step, as MindSpore's DCGAN
tutorial writes it). Both sides run alternately ``R`` times; the best of each is kept; the
ratio is unitrain's speed over the hand-written loop's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

import unitrain
from unitrain import steps

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dcgan.py"


def example():
    spec = importlib.util.spec_from_file_location("dcgan_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_loop(loop, nz):
    """The tutorial's loop on the torch modules of ``loop``'s models."""
    import torch

    netG, netD = loop.loops["generator"].model, loop.loops["discriminator"].model
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999), foreach=False)
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999), foreach=False)
    criterion = torch.nn.BCELoss()

    def step(x):
        real = torch.from_numpy(x)
        netD.zero_grad()
        label = torch.full((len(real),), 1.0)
        errD_real = criterion(netD(real).view(-1), label)
        errD_real.backward()
        fake = netG(torch.randn(len(real), nz, 1, 1))
        label.fill_(0.0)
        errD_fake = criterion(netD(fake.detach()).view(-1), label)
        errD_fake.backward()
        optimizerD.step()
        netG.zero_grad()
        label.fill_(1.0)
        errG = criterion(netD(fake).view(-1), label)
        errG.backward()
        optimizerG.step()

    return step


def chainer_loop(loop, nz):
    """Chainer's examples/dcgan updater, written for these links: its own Adam on each model."""
    import chainer
    import chainer.functions as F

    gen, dis = loop.loops["generator"].model, loop.loops["discriminator"].model
    opt_gen, opt_dis = chainer.optimizers.Adam(2e-4, beta1=0.5), chainer.optimizers.Adam(2e-4, beta1=0.5)
    opt_gen.setup(gen)
    opt_dis.setup(dis)
    rng = np.random.default_rng(0)

    def bce(p, label):
        return -F.mean(F.log(p) if label else F.log(1 - p))

    def step(x):
        z = rng.standard_normal((len(x), nz, 1, 1)).astype(np.float32)
        fake = gen(z)
        dis.cleargrads()
        loss_dis = bce(dis(x), 1) + bce(dis(fake.array), 0)
        loss_dis.backward()
        opt_dis.update()
        gen.cleargrads()
        loss_gen = bce(dis(fake), 1)
        loss_gen.backward()
        opt_gen.update()

    return step


def mindspore_loop(loop, nz):
    """MindSpore's DCGAN tutorial's step on these Cells: a loss function per phase, differentiated
    with ``value_and_grad`` over its optimizer's parameters, both phases and both ``nn.Adam``
    updates in one compiled step. Functional autograd makes the generator phase compute
    ``netG(z)`` again, as the tutorial's does (so does the unitrain step)."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    net_g, net_d = loop.loops["generator"]._net, loop.loops["discriminator"]._net  # they take (x, dropout masks)
    opt_g = nn.Adam(net_g.trainable_params(), learning_rate=2e-4, beta1=0.5, beta2=0.999)
    opt_d = nn.Adam(net_d.trainable_params(), learning_rate=2e-4, beta1=0.5, beta2=0.999)
    weights = {id(param) for param in net_g.trainable_params()}
    for param in opt_g.get_parameters():  # one graph holds both optimizers: their own step, powers... need other names
        if id(param) not in weights:
            param.name = f"generator.{param.name}"
    criterion = nn.BCELoss()

    def discriminator_loss(real, z):
        fake = ops.stop_gradient(net_g(z, ()))
        real_label, fake_label = ops.ones(real.shape[0], ms.float32), ops.zeros(real.shape[0], ms.float32)
        return criterion(net_d(real, ()).view(-1), real_label) + criterion(net_d(fake, ()).view(-1), fake_label)

    def generator_loss(z):
        return criterion(net_d(net_g(z, ()), ()).view(-1), ops.ones(z.shape[0], ms.float32))

    grad_d = ms.value_and_grad(discriminator_loss, None, opt_d.parameters)
    grad_g = ms.value_and_grad(generator_loss, None, opt_g.parameters)

    @ms.jit
    def train_step(real, z):
        loss_d, grads_d = grad_d(real, z)
        opt_d(grads_d)
        loss_g, grads_g = grad_g(z)
        opt_g(grads_g)
        return loss_d, loss_g

    rng = np.random.default_rng(0)

    def step(x):
        z = rng.standard_normal((len(x), nz, 1, 1)).astype(np.float32)
        loss_d, loss_g = train_step(Tensor(x), Tensor(z))
        return float(loss_d.asnumpy()), float(loss_g.asnumpy())  # the losses, as the unitrain step returns them

    return step


NATIVE = {"torch": torch_loop, "chainer": chainer_loop, "mindspore": mindspore_loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--backends", default="torch,chainer,mindspore")
    parser.add_argument("--threads", type=int, help="compute threads of every framework (default: their own)")
    parser.add_argument("--cpu-time", action="store_true", help="time the steps in process CPU time, not wall-clock")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    # CPU time moves far less than wall-clock time on a machine other processes load (with one thread
    # per framework, both sides are counted alike), as benchmarks/bench_step.py's --cpu-time
    clock = time.process_time if args.cpu_time else time.perf_counter
    for backend in args.backends.split(",") if args.threads else ():
        unitrain.get_backend(backend).set_threads(args.threads)  # the framework's pool, which its native loop uses too
    dcgan, nz = example(), 100
    batches = [np.random.default_rng(i).uniform(-1, 1, (64, 1, 28, 28)).astype(np.float32) for i in range(args.steps)]
    print("| backend | unitrain s/step | hand-written s/step | unitrain / hand-written speed |")
    print("| --- | ---: | ---: | ---: |")
    for backend in args.backends.split(","):
        ours = steps.MultiModelLoop(dcgan.dcgan(nz, args.features), backend)
        native = NATIVE[backend](steps.MultiModelLoop(dcgan.dcgan(nz, args.features), backend), nz)
        best = {"ours": np.inf, "native": np.inf}
        for _ in range(args.repeats):
            for side, run in (("ours", ours.step), ("native", native)):
                run(batches[0])  # warm-up
                started = clock()
                for x in batches:
                    run(x)
                best[side] = min(best[side], (clock() - started) / len(batches))
        print(f"| {backend} | {best['ours']:.4f} | {best['native']:.4f} | {best['native'] / best['ours']:.2f}x |")
        results.append({"model": "dcgan", "backend": backend, "unitrain_seconds_per_step": best["ours"],
                        "native_seconds_per_step": best["native"]})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
