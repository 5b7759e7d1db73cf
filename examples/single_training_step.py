"""A single training step, taken apart: PyTorch's "A Gentle Introduction to torch.autograd" tutorial,
on any backend. ResNet-18 takes one random 3x64x64 image, the labels are 1000 random numbers, the loss
is the tutorial's ``(prediction - labels).sum()`` and SGD (lr 1e-2, momentum 0.9) takes one step.

What maps to what (PyTorch / MindSpore / Chainer -> unitrain):

* ``resnet18(weights=...)`` -> ``unitrain.resnet18()``: torchvision's module names, shapes, forward and
  initialisation. The tutorial's pretrained weights: save torchvision's ``state_dict`` with
  ``safetensors.torch.save_file`` and pass the file as ``--weights``; without it every backend starts
  from the same ``init_weights``.
* ``loss = (prediction - labels).sum()`` -> ``CustomLoss(lambda prediction, labels: (prediction - labels).sum())``:
  written once, computed and differentiated by each framework (by hand-written rules on NumPy).
* ``optimizer.zero_grad()`` / fresh ``value_and_grad`` / ``model.cleargrads()`` -> ``loop.zero_grad()``
* ``model(data)`` -> ``loop.forward(data)``; the loss -> ``loop.loss(prediction, labels)``
* ``loss.backward()`` / ``grad_fn(data, labels)`` -> ``loop.backward(loss)`` (``loop.gradients()`` shows them)
* ``optim.step()`` / ``optimizer(grads)`` / ``optimizer.update()`` -> ``loop.update()``

As in the tutorial the model stays in training mode: BatchNorm normalises with the statistics of the
one image and updates its running statistics. "after" is the loss of a second forward with the
updated weights. On a first step the momentum buffer is the gradient itself, so momentum only shows
from the second step on.

``--compare`` takes the same step on every installed backend (or those of ``--backends``) from the
same weights and prints how far each backend's updated weights are from the first's, as a fraction
of the first's update of the same tensor, next to what float32 rounding allows (see
``ROUNDING_ALLOWS``).

Run: ``python examples/single_training_step.py --compare``.
"""

from __future__ import annotations

import argparse

import numpy as np
from unitrain.conformance.tolerances import MULTIPLE, eps

import unitrain
from unitrain import SGD, CustomLoss
from unitrain.registry import backend_specs
from unitrain.weights import WeightsError, check_state, load_safetensors

#: How far two backends' updated weights may differ, as a fraction of the update (the loaded weights are
#: exact; only ``lr * gradient`` is computed). The conformance suite's bound for a float32 result of
#: n-term dot products, ``MULTIPLE * eps * n`` relative (unitrain/conformance/tolerances.py), with n the
#: step's longest one (layer4's 3x3 convolutions over 512 channels), doubled for the difference of two
#: backends each that far from the exact update.
ROUNDING_ALLOWS = 2 * MULTIPLE * eps(np.float32) * 512 * 3 * 3


def relative_difference(updated: dict, reference: dict, start: dict) -> float:
    """The largest difference between two updated states, per tensor as a fraction of ``reference``'s update."""
    return max(
        float(np.abs(updated[key] - reference[key]).max())
        / max(float(np.abs(reference[key] - start[key]).max()), np.finfo(np.float32).tiny)
        for key in start
    )


def single_step(backend: str, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float, momentum: float):
    """The tutorial's step from ``weights``; returns (loss before, loss after, updated weights)."""
    loss_fn = CustomLoss(lambda prediction, labels: (prediction - labels).sum())
    loop = unitrain.make_loop(backend, unitrain.resnet18(), loss_fn, SGD(lr=lr, momentum=momentum))
    loop.load_state_dict(weights)
    loop.zero_grad()
    prediction = loop.forward(x)
    loss = loop.loss(prediction, y)
    loop.backward(loss)
    loop.update()
    updated = loop.state_dict()
    after = loop.loss(loop.forward(x), y)
    return loop.to_float(loss), loop.to_float(after), updated


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=unitrain.available_backends(), help="default: $UNITRAIN_BACKEND, else numpy"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images in the step (the tutorial: 1)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the random data")
    parser.add_argument("--weights", help="a safetensors file of torchvision resnet18 weights (default: init_weights)")
    parser.add_argument("--compare", action="store_true", help="take the same step on every installed backend")
    parser.add_argument("--backends", help="with --compare: these (comma-separated) instead of every installed one")
    args = parser.parse_args(argv)

    if args.weights:
        try:
            weights, _ = load_safetensors(args.weights)
            check_state(unitrain.resnet18().state_shapes(), weights, args.weights)
        except WeightsError as error:
            parser.error(str(error))
    else:
        weights = unitrain.init_weights(unitrain.resnet18(), args.seed)
    rng = np.random.default_rng(args.seed)  # torch.rand: uniform in [0, 1)
    x = rng.random((args.batch_size, 3, 64, 64), dtype=np.float32)
    y = rng.random((args.batch_size, 1000), dtype=np.float32)
    if not args.compare:
        backends = [unitrain.get_backend(args.backend).name]
    elif args.backends:
        backends = args.backends.split(",")
        unknown = sorted(set(backends) - set(unitrain.available_backends()))
        if unknown:
            parser.error(f"unknown backends {unknown}; expected some of {unitrain.available_backends()}")
    else:
        backends = [name for name, spec in backend_specs().items() if spec.installed()]

    reference = None
    for backend in backends:
        before, after, updated = single_step(backend, weights, x, y, args.lr, args.momentum)
        change = max(float(np.abs(updated[key] - weights[key]).max()) for key in weights)
        line = f"{backend:>10}: loss before {before:.4f}  after {after:.4f}  largest parameter change {change:.3e}"
        if reference is None:
            reference = updated
        else:
            difference = relative_difference(updated, reference, weights)
            line += f"  weights differ from {backends[0]} by {difference:.1e} of its update"
        print(line)
    if args.compare:
        print(f"float32 rounding allows {ROUNDING_ALLOWS:.1e} of the update")


if __name__ == "__main__":
    main()
