"""PyTorch's examples/vae (the variational auto-encoder of Kingma and Welling on MNIST: 784-400-20,
BCE summed + KL divergence, Adam 1e-3) on any backend, its step written once.

What maps to what (PyTorch -> unitrain):

* ``VAE.encode`` (``fc1`` -> ReLU -> ``fc21``, ``fc22``) -> the model "encoder", a ``Graph`` with
  two outputs (``mu``, ``logvar``); ``VAE.decode`` (``fc3`` -> ReLU -> ``fc4`` -> sigmoid) -> the
  model "decoder", a ``Sequential``. One optimizer, ``Adam(lr=1e-3)``, over both models' parameters.
* ``reparameterize`` (``mu + eps * exp(0.5 * logvar)``, ``eps = torch.randn_like(std)``) -> the same
  arithmetic in the step's expression, ``eps`` drawn by ``steps.normal(20)`` from the step's seeded
  stream (so every backend sees the same ``eps``).
* ``loss_function``: ``F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction='sum')`` plus
  ``-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())`` -> ``steps.bce(recon, x, "sum")`` plus
  the same sum, as an expression. ``x.view(-1, 784)``: the images are flattened before the step.
* ``--batch-size 128``; the example's "Train Epoch" lines print ``loss.item() / len(data)`` and the
  "Test set loss" is the summed loss over the test set divided by its size (here computed with the
  models' ``predict`` and NumPy, ``eps`` drawn from ``--seed``).

``--checkpoint-dir DIR`` checkpoints the run (crash-safe, every ``--checkpoint-every`` steps);
``--resume`` continues it.
``--compare`` trains on every installed backend from the same weights and noise and prints
one line per loss per backend (``--plot FILE``: their loss curves).

Run: ``python examples/vae.py --backend chainer --max-steps 469 --save-weights out/``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import unitrain
from unitrain import expr, plot, step_checkpoints, step_compare, steps
from unitrain.files import OutputError
from unitrain.graph import Graph, Input


def vae() -> steps.MultiStep:
    x = Input((784,), name="x")
    fc1, fc21, fc22 = unitrain.Linear(784, 400), unitrain.Linear(400, 20), unitrain.Linear(400, 20)
    h1 = fc1(x).relu()
    encoder = Graph(x, [fc21(h1), fc22(h1)], modules={"fc1": fc1, "fc21": fc21, "fc22": fc22})
    decoder = unitrain.Sequential({"fc3": unitrain.Linear(20, 400), "relu": unitrain.ReLU(),
                                   "fc4": unitrain.Linear(400, 784), "sigmoid": unitrain.Sigmoid()})  # fmt: skip
    encode, decode = steps.Model("encoder", outputs=2), steps.Model("decoder")
    data = steps.batch()
    mu, logvar = encode(data)
    recon_batch = decode(mu + steps.normal(20) * expr.exp(0.5 * logvar))
    KLD = -0.5 * (1 + logvar - mu**2 - expr.exp(logvar)).sum()
    return steps.MultiStep(
        models={"encoder": encoder, "decoder": decoder},
        optimizers={"optimizer": steps.OptimizerOver(unitrain.Adam(lr=1e-3), ["encoder", "decoder"])},
        phases=[steps.Phase("loss", steps.bce(recon_batch, data, reduction="sum") + KLD, "optimizer")],
    )


def test_loss(loop: steps.MultiModelLoop, images: np.ndarray, rng: np.random.Generator) -> float:
    """The summed loss over ``images`` divided by their number, as the example's ``test``."""
    mu, logvar = loop.loops["encoder"].predict(images)
    recon = loop.loops["decoder"].predict(mu + rng.standard_normal(mu.shape).astype(np.float32) * np.exp(0.5 * logvar))
    bce = -(images * np.maximum(np.log(recon), -100) + (1 - images) * np.maximum(np.log1p(-recon), -100)).sum()
    kld = -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum()
    return float(bce + kld) / len(images)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("UNITRAIN_BACKEND", "numpy"))
    parser.add_argument("--max-steps", type=int, default=469, help="steps to train (469: one epoch of 128)")
    parser.add_argument("--seed", type=int, default=1)  # the example's --seed
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--save-weights", metavar="DIR", help="write DIR/<model>.safetensors for both models")
    parser.add_argument("--plot", metavar="FILE", help="draw test images, their reconstructions and samples")
    step_checkpoints.add_arguments(parser)
    step_compare.add_argument(parser)
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.exit(2, f"vae: --{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}\n")
    try:
        if args.plot:
            plot.check_figure_path("--plot", args.plot)
        if args.compare is not None:  # the losses of every backend, one line each, and their curves with --plot
            return step_compare.compare(lambda backend: train(args, backend)[1], step_compare.backends_to_compare(args),
                                        args.plot)  # fmt: skip
        settings = {name: getattr(args, name) for name in ("backend", "seed", "batch_size")}
        loop, history, rng = train(args, args.backend, step_checkpoints.StepCheckpoints.from_arguments(args, settings))
    except (ValueError, OutputError) as error:  # an unknown backend, a checkpoint that cannot be resumed
        parser.exit(2, f"vae: {error}\n")
    test_images, _ = unitrain.data.packaged_arrays("mnist", "test")
    test = test_loss(loop, test_images.reshape(-1, 784).astype(np.float32) / 255, rng)
    print(f"====> Test set loss: {test:.4f}")
    if args.save_weights:
        loop.save_weights(args.save_weights)
    if args.plot:  # the example's comparison (8 test images over their reconstructions) and its 64 samples
        originals = test_images[:32].reshape(-1, 784).astype(np.float32) / 255
        mu, logvar = loop.loops["encoder"].predict(originals)
        eps = rng.standard_normal(mu.shape).astype(np.float32)
        reconstructions = loop.loops["decoder"].predict(mu + eps * np.exp(0.5 * logvar))
        samples = loop.loops["decoder"].predict(rng.standard_normal((64, 20)).astype(np.float32))
        panels = [("test images", originals), ("reconstructions", reconstructions), ("samples", samples)]
        plot.save_image_grids(args.plot, [(title, images.reshape(-1, 1, 28, 28)) for title, images in panels])
    loss = history[-1]["loss"]
    print(f"final losses: train {loss:.6f}  test {test:.6f}")
    return {"train": loss, "test": test}


def train(args, backend: str, checkpoints=step_checkpoints.NO_CHECKPOINTS):
    """The example's ``train`` on ``backend``: the loop, each step's loss per image, and the
    generator the test loss goes on drawing from."""
    loop = steps.MultiModelLoop(vae(), backend, seed=args.seed)
    history, label = [], "" if args.compare is None else f"{backend}: "
    images, _ = unitrain.data.packaged_arrays("mnist", "train")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(images))  # the same on a resume: the checkpoint replaces only the state
    batches = len(images) // args.batch_size
    for index in checkpoints.steps(loop, args.max_steps):
        rows = order[(index % batches) * args.batch_size : (index % batches + 1) * args.batch_size]
        data = images[rows].reshape(len(rows), 784).astype(np.float32) / 255  # ToTensor(), x.view(-1, 784)
        history.append({"loss": loop.step(data)["loss"] / len(data)})
        if index % 50 == 0 or index == args.max_steps - 1:
            epoch, seen = index // batches + 1, (index % batches) * len(data)
            print(f"{label}Train Epoch: {epoch} [{seen}/{len(images)}]\tLoss: {history[-1]['loss']:.6f}")
    return loop, history, rng


if __name__ == "__main__":
    main()
