"""PyTorch's "DCGAN Tutorial" (Nathan Inkawhich), its architecture scaled to 28x28 MNIST, on any
backend: a generator and a discriminator, two Adam optimizers, one step written once.

What maps to what (PyTorch -> unitrain):

* ``Generator`` / ``Discriminator`` -> two ``Sequential`` specs. The tutorial's 64x64 stack of
  4x4 transposed convolutions becomes ``ConvTranspose2d(nz, 4*ngf, 7)`` (1 -> 7), then two
  stride-2 4x4 ones (7 -> 14 -> 28), BatchNorm and ReLU between, ``Tanh`` last; the discriminator
  mirrors it (two stride-2 4x4 convolutions, LeakyReLU(0.2), BatchNorm, a 7x7 convolution to one
  value, ``Sigmoid``). No biases, as in the tutorial. Feature maps ``ngf = ndf = --features``:
  16 by default (the tutorial's 64, ``--features 64``, is 16 times the work on a CPU).
* ``netG.apply(weights_init)`` (Conv and ConvTranspose weights N(0, 0.02), BatchNorm weights
  N(1, 0.02), biases 0) -> each layer's ``weight_init=`` (:data:`CONV_INIT`, :data:`NORM_INIT`):
  the loop draws them with NumPy from ``--seed``, the same numbers on every backend.
* ``nn.BCELoss()``, ``real_label = 1.``, ``fake_label = 0.`` -> ``steps.bce(D(x), 1.0)``.
* The training loop's two updates -> two phases of one ``steps.MultiStep``: "discriminator"
  (``errD_real + errD_fake`` on ``D(real)`` and ``D(fake.detach())``, stepping optimizerD), then
  "generator" (``D(fake)`` against real labels, stepping optimizerG); ``fake = netG(noise)`` is
  computed once per step, as in the tutorial. ``torch.randn(b_size, nz, 1, 1)`` -> ``steps.normal``,
  drawn from the step's own seeded stream, so every backend sees the same noise.
* ``optim.Adam(lr=0.0002, betas=(0.5, 0.999))`` for both; batch 128; images scaled to [-1, 1]
  (``Normalize((0.5,), (0.5,))``).

Prints the tutorial's ``Loss_D`` / ``Loss_G`` lines and the final losses. ``--checkpoint-dir DIR``
checkpoints the run (crash-safe, every ``--checkpoint-every`` steps); ``--resume`` continues it.
``--compare`` trains on every installed backend from the same weights and noise and prints
one line per loss per backend (``--plot FILE``: their loss curves).
Run: ``python examples/dcgan.py --backend torch --max-steps 200 --save-weights out/``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import unitrain
from unitrain import plot, step_checkpoints, step_compare, steps
from unitrain.files import OutputError

#: the tutorial's ``weights_init``: every convolution's weight N(0, 0.02), BatchNorm's weight N(1, 0.02), bias 0
CONV_INIT, NORM_INIT = "normal(std=0.02)", "normal(std=0.02, mean=1.0)"


def generator(nz: int, ngf: int) -> unitrain.Sequential:
    return unitrain.Sequential(
        unitrain.ConvTranspose2d(nz, ngf * 4, 7, 1, 0, bias=False, weight_init=CONV_INIT),
        unitrain.BatchNorm2d(ngf * 4, weight_init=NORM_INIT), unitrain.ReLU(),
        unitrain.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False, weight_init=CONV_INIT),
        unitrain.BatchNorm2d(ngf * 2, weight_init=NORM_INIT), unitrain.ReLU(),
        unitrain.ConvTranspose2d(ngf * 2, 1, 4, 2, 1, bias=False, weight_init=CONV_INIT), unitrain.Tanh(),
    )  # fmt: skip


def discriminator(ndf: int) -> unitrain.Sequential:
    return unitrain.Sequential(
        unitrain.Conv2d(1, ndf, 4, 2, 1, bias=False, weight_init=CONV_INIT), unitrain.LeakyReLU(0.2),
        unitrain.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False, weight_init=CONV_INIT),
        unitrain.BatchNorm2d(ndf * 2, weight_init=NORM_INIT), unitrain.LeakyReLU(0.2),
        unitrain.Conv2d(ndf * 2, 1, 7, 1, 0, bias=False, weight_init=CONV_INIT), unitrain.Sigmoid(),
    )  # fmt: skip


def dcgan(nz: int, features: int) -> steps.MultiStep:
    netG, netD = steps.Model("generator"), steps.Model("discriminator")
    real = steps.batch()
    fake = netG(steps.normal((nz, 1, 1)))
    adam = unitrain.Adam(lr=0.0002, betas=(0.5, 0.999))
    return steps.MultiStep(
        models={"generator": generator(nz, features), "discriminator": discriminator(features)},
        optimizers={"optimizerD": steps.OptimizerOver(adam, ["discriminator"]),
                    "optimizerG": steps.OptimizerOver(adam, ["generator"])},
        phases=[
            steps.Phase("discriminator", steps.bce(netD(real), 1.0) + steps.bce(netD(steps.detach(fake)), 0.0),
                        "optimizerD"),
            steps.Phase("generator", steps.bce(netD(fake), 1.0), "optimizerG"),
        ],
    )  # fmt: skip


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("UNITRAIN_BACKEND", "numpy"))
    parser.add_argument("--max-steps", type=int, default=469, help="steps to train (469: one epoch of 128)")
    parser.add_argument("--seed", type=int, default=999)  # the tutorial's manualSeed
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--nz", type=int, default=100)
    parser.add_argument(
        "--features",
        type=int,
        default=16,
        help="ngf = ndf: the tutorial's 64 costs 16 times the work of the default 16 on a CPU",
    )
    parser.add_argument("--save-weights", metavar="DIR", help="write DIR/<model>.safetensors for both models")
    parser.add_argument("--plot", metavar="FILE", help="draw 64 samples of a fixed noise batch (e.g. samples.png)")
    step_checkpoints.add_arguments(parser)
    step_compare.add_argument(parser)
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "nz", "features"):
        if getattr(args, name) < 1:
            parser.exit(2, f"dcgan: --{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}\n")
    try:
        if args.plot:
            plot.check_figure_path("--plot", args.plot)
        if args.compare is not None:  # the losses of every backend, one line each, and their curves with --plot
            return step_compare.compare(lambda backend: train(args, backend)[1], step_compare.backends_to_compare(args),
                                        args.plot)  # fmt: skip
        settings = {name: getattr(args, name) for name in ("backend", "seed", "batch_size", "nz", "features")}
        loop, history = train(args, args.backend, step_checkpoints.StepCheckpoints.from_arguments(args, settings))
    except (ValueError, OutputError) as error:  # an unknown backend, a checkpoint that cannot be resumed
        parser.exit(2, f"dcgan: {error}\n")
    if args.save_weights:
        loop.save_weights(args.save_weights)
    if args.plot:  # the tutorial's fixed_noise; predict() runs the generator in eval mode (running statistics)
        fixed_noise = np.random.default_rng(args.seed).standard_normal((64, args.nz, 1, 1)).astype(np.float32)
        samples = (loop.loops["generator"].predict(fixed_noise) + 1) / 2
        plot.save_image_grids(args.plot, [(f"generated, step {args.max_steps}", samples)])
    losses = history[-1]
    print(f"final losses: discriminator {losses['discriminator']:.6f}  generator {losses['generator']:.6f}")
    return losses


def train(args, backend: str, checkpoints=step_checkpoints.NO_CHECKPOINTS):
    """The tutorial's loop on ``backend``: the loop and the losses of every step it ran."""
    step = dcgan(args.nz, args.features)
    loop = steps.MultiModelLoop(step, backend, seed=args.seed)  # weights drawn by each layer's weight_init
    rng = np.random.default_rng(args.seed)

    images, _ = unitrain.data.packaged_arrays("mnist", "train")
    order = rng.permutation(len(images))  # the same on a resume: the checkpoint replaces only the state
    batches = len(images) // args.batch_size
    label = "" if args.compare is None else f"{backend}: "
    history = []
    for index in checkpoints.steps(loop, args.max_steps):
        rows = order[(index % batches) * args.batch_size : (index % batches + 1) * args.batch_size]
        real = images[rows].astype(np.float32) / 127.5 - 1  # ToTensor() then Normalize((0.5,), (0.5,))
        history.append(loop.step(real))
        if index % 50 == 0 or index == args.max_steps - 1:
            errD, errG = history[-1]["discriminator"], history[-1]["generator"]
            print(f"{label}[{index}/{args.max_steps}]\tLoss_D: {errD:.4f}\tLoss_G: {errG:.4f}")
    return loop, history


if __name__ == "__main__":
    main()
