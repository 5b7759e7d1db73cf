"""A single training step, taken apart: the step every framework's tutorial repeats (forward,
loss, backward, optimizer update), here on one MNIST batch with SGD (lr 1e-2, momentum 0.9).

What maps to what (PyTorch / MindSpore / Chainer -> unitrain):

* ``optimizer.zero_grad()`` / fresh ``value_and_grad`` / ``model.cleargrads()`` -> ``loop.zero_grad()``
* ``model(x)`` -> ``loop.forward(x)``; ``loss_fn(pred, y)`` -> ``loop.loss(pred, y)``
* ``loss.backward()`` / ``grad_fn(x, y)`` -> ``loop.backward(loss)`` (``loop.gradients()`` shows them)
* ``optimizer.step()`` / ``optimizer(grads)`` / ``optimizer.update()`` -> ``loop.update()``

On a first step the momentum buffer is the gradient itself, so momentum only shows from the second
step on. ``--compare`` takes the same step on every installed backend from the same ``init_weights`` and
prints how far each backend's updated weights are from the first's: float32 rounding apart.

Run: ``python examples/single_training_step.py --compare``.
"""

from __future__ import annotations

import argparse

import numpy as np

import unitrain
from unitrain import SGD, CrossEntropyLoss
from unitrain.registry import backend_specs


def single_step(backend: str, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, lr: float, momentum: float):
    """One tutorial-shaped step from ``weights``; returns (loss before, loss after, updated weights)."""
    loop = unitrain.make_loop(backend, unitrain.mlp(), CrossEntropyLoss(), SGD(lr=lr, momentum=momentum))
    loop.load_state_dict(weights)
    loop.zero_grad()
    pred = loop.forward(x)
    loss = loop.loss(pred, y)
    loop.backward(loss)
    loop.update()
    after = loop.evaluate((x, y), batch_size=len(x))["loss"]
    return loop.to_float(loss), after, loop.state_dict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=unitrain.available_backends(), help="default: $UNITRAIN_BACKEND, else numpy"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true", help="take the same step on every installed backend")
    args = parser.parse_args(argv)

    x, y = next(unitrain.load_mnist("train").batches(args.batch_size))
    weights = unitrain.init_weights(unitrain.mlp(), args.seed)
    installed = [name for name, spec in backend_specs().items() if spec.installed()]
    backends = installed if args.compare else [unitrain.get_backend(args.backend).name]

    reference = None
    for backend in backends:
        before, after, updated = single_step(backend, weights, x, y, args.lr, args.momentum)
        change = max(float(np.abs(updated[key] - weights[key]).max()) for key in weights)
        line = f"{backend:>10}: loss before {before:.6f}  after {after:.6f}  largest parameter change {change:.3e}"
        if reference is None:
            reference = updated
        else:
            difference = max(float(np.abs(updated[key] - reference[key]).max()) for key in weights)
            line += f"  max weight difference from {backends[0]} {difference:.3e}"
        print(line)


if __name__ == "__main__":
    main()
