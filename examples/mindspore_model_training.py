"""MindSpore's beginner tutorial "Model Training" (mindspore.cn, beginner/train), on any unitrain backend.

What maps to what:

* ``datapipe('MNIST_Data/train', 64)`` (Rescale 1/255, Normalize(0.1307, 0.3081), HWC2CHW, batch
  64) -> ``load_mnist("train")`` (the same normalisation, ``(N, 1, 28, 28)``) and ``.batches(64)``.
* ``Network``: Flatten, Dense(784, 512), ReLU, Dense(512, 512), ReLU, Dense(512, 10) -> ``mlp()``.
* ``nn.CrossEntropyLoss()`` and ``nn.SGD(model.trainable_params(), 1e-2)`` -> ``CrossEntropyLoss()``
  and ``SGD(lr=1e-2)``.
* ``forward_fn`` + ``value_and_grad`` + ``train_step`` -> ``loop.step((data, label))``, which
  returns the loss computed before the update, as ``train_step`` does.
* ``model.set_train()`` / ``model.set_train(False)`` -> ``loop.train()`` / ``loop.eval()``.
* ``test_loop``'s per-batch loss and ``argmax`` count -> ``loop.evaluate(test, batch_size=64)``;
  ``Avg loss`` is the mean per-sample loss (the tutorial averages batch means, which differs only
  through the smaller last batch).

The tutorial's published output reaches a test accuracy of 84.7%, 90.5% and 91.9% after epochs 1,
2 and 3. unitrain starts from PyTorch's default initialisation (the same on every backend) and
reaches 91.1%, 92.9% and 93.8% (seed 0, measured on the numpy and torch backends, which agree to
the printed digit).

Run: ``python examples/mindspore_model_training.py --backend mindspore``.
"""

from __future__ import annotations

import argparse

import unitrain
from unitrain import SGD, CrossEntropyLoss


def train_loop(loop, dataset, batch_size: int, epoch: int, seed: int, max_steps: int | None) -> None:
    size = dataset.num_batches(batch_size)
    loop.train()
    for batch, (data, label) in enumerate(dataset.batches(batch_size, shuffle=True, seed=seed, epoch=epoch)):
        loss = loop.step((data, label))
        if batch % 100 == 0:
            print(f"loss: {loop.to_float(loss):>7f}  [{batch:>3d}/{size:>3d}]")
        if max_steps is not None and loop.step_count >= max_steps:
            break


def test_loop(loop, dataset, batch_size: int) -> float:
    loop.eval()
    metrics = loop.evaluate(dataset, batch_size=batch_size)
    print(f"Test: \n Accuracy: {100 * metrics['accuracy']:>0.1f}%, Avg loss: {metrics['loss']:>8f} \n")
    return metrics["accuracy"]


def main(argv: list[str] | None = None) -> list[float]:
    """Returns the test accuracy after each epoch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=unitrain.available_backends(), help="default: $UNITRAIN_BACKEND, else numpy"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (quick runs)")
    args = parser.parse_args(argv)

    train_dataset, test_dataset = unitrain.load_mnist("train"), unitrain.load_mnist("test")
    loop = unitrain.make_loop(args.backend, unitrain.mlp(), CrossEntropyLoss(), SGD(lr=args.lr), seed=args.seed)

    accuracies = []
    for t in range(args.epochs):
        print(f"Epoch {t + 1}\n-------------------------------")
        train_loop(loop, train_dataset, args.batch_size, t, args.seed, args.max_steps)
        accuracies.append(test_loop(loop, test_dataset, args.batch_size))
        if args.max_steps is not None and loop.step_count >= args.max_steps:
            break
    print("Done!")
    return accuracies


if __name__ == "__main__":
    main()
