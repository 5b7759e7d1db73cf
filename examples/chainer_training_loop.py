"""Chainer's "Write a training loop" tutorial (docs.chainer.org, MNIST), on any unitrain backend.

What maps to what:

* ``mnist.get_mnist()`` + ``split_dataset_random(train_val, 50000, seed=0)`` ->
  ``load_mnist("train").split(50000, seed)``: 50,000 training / 10,000 validation images (and the
  10,000-image test set, kept for the end).
* ``iterators.SerialIterator(train, batchsize)`` -> ``train.batches(batchsize, shuffle=True, epoch=e)``.
* the tutorial's ``MLP(n_mid_units=100)`` (784-100-100-10) -> ``tutorial_mlp()``, a ``Sequential`` of layer specs.
* ``optimizers.SGD(lr=0.01).setup(model)`` -> ``SGD(lr=0.01)`` given to ``make_loop``.
* ``model.cleargrads(); loss.backward(); optimizer.update()`` -> ``loop.zero_grad()``,
  ``loop.forward``, ``loop.loss``, ``loop.backward``, ``loop.update()``.
* the validation pass under ``chainer.using_config("train", False)`` -> ``loop.evaluate(valid)``.
* ``serializers.save_npz`` / ``load_npz`` -> ``loop.save_weights`` / ``load_weights`` (safetensors).
* ``model(x[None, ...]).array.argmax(axis=1)`` -> ``loop.predict(x).argmax(axis=1)``.

Run: ``python examples/chainer_training_loop.py --backend chainer``.
"""

from __future__ import annotations

import argparse

import numpy as np

import unitrain
from unitrain import SGD, CrossEntropyLoss, Flatten, Linear, ReLU, Sequential


def tutorial_mlp(n_mid_units: int = 100, n_out: int = 10) -> Sequential:
    """The tutorial's MLP: two hidden layers of ``n_mid_units`` with ReLU."""
    return Sequential(
        Flatten(),
        Linear(784, n_mid_units),
        ReLU(),
        Linear(n_mid_units, n_mid_units),
        ReLU(),
        Linear(n_mid_units, n_out),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=unitrain.available_backends(), help="default: $UNITRAIN_BACKEND, else numpy"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--units", type=int, default=100, help="hidden units per layer")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many updates (quick runs)")
    parser.add_argument("--out", default="my_mnist.safetensors", help="where to save the trained model")
    parser.add_argument("--show", type=int, default=5, help="test images to classify at the end")
    args = parser.parse_args(argv)

    # Dataset: 50,000 train / 10,000 validation from the training set, plus the test set.
    train, valid = unitrain.load_mnist("train").split(50000, seed=args.seed)
    test = unitrain.load_mnist("test")

    # Network and optimizer.
    loop = unitrain.make_loop(
        args.backend, tutorial_mlp(args.units), CrossEntropyLoss(), SGD(lr=args.lr), seed=args.seed
    )

    # The training loop, written out.
    for epoch in range(args.epochs):
        losses = []  # native scalars: read once per epoch, not once per step
        for x, y in train.batches(args.batch_size, shuffle=True, seed=args.seed, epoch=epoch):
            loop.zero_grad()
            prediction = loop.forward(x)
            loss = loop.loss(prediction, y)
            loop.backward(loss)
            loop.update()
            losses.append(loss)
            if args.max_steps is not None and loop.step_count >= args.max_steps:
                break
        train_loss = np.mean([loop.to_float(value) for value in losses])
        metrics = loop.evaluate(valid)
        print(
            f"epoch:{epoch + 1:02d} train_loss:{train_loss:.04f} "
            f"val_loss:{metrics['loss']:.04f} val_accuracy:{metrics['accuracy']:.04f}"
        )
        if args.max_steps is not None and loop.step_count >= args.max_steps:
            break

    # Save the model, then load it into a fresh loop and classify a few test images.
    loop.save_weights(args.out)
    print(f"saved the model to {args.out}")
    restored = unitrain.make_loop(args.backend, tutorial_mlp(args.units), seed=args.seed + 1)
    restored.load_weights(args.out)
    images, labels = test.x[: args.show], test.y[: args.show]
    predicted = restored.predict(images).argmax(axis=1)
    for guess, label in zip(predicted, labels, strict=True):
        print(f"predicted label: {guess}  true label: {label}")
    same = np.array_equal(predicted, loop.predict(images).argmax(axis=1))
    print(f"the loaded model classifies like the trained one: {same}")


if __name__ == "__main__":
    main()
