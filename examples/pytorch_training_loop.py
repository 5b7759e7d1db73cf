"""PyTorch's "Training with PyTorch" tutorial (pytorch.org, beginner/introyt/trainingyt), on MNIST
and any unitrain backend.

What maps to what:

* ``DataLoader(training_set, batch_size, shuffle=True)`` ->
  ``train.batches(batch_size, shuffle=True, seed, epoch)``; the test set is the validation set,
  as in the tutorial.
* the ``nn.Module`` -> a ``Sequential`` of layer specs. It has Dropout and BatchNorm, so
  ``model.train(True)`` / ``model.eval()`` -> ``loop.train()`` / ``loop.eval()`` change what it computes.
* ``optimizer.zero_grad(); outputs = model(inputs); loss = loss_fn(outputs, labels);
  loss.backward(); optimizer.step()`` -> ``loop.zero_grad()``, ``loop.forward``, ``loop.loss``,
  ``loop.backward``, ``loop.update()``.
* ``running_loss += loss.item()``, printed every 1000 batches -> the same every ``--log-every``
  batches (default 100), reading the native losses once per report rather than once per batch.
* ``with torch.no_grad():`` validation -> ``loop.forward`` / ``loop.loss`` after ``loop.eval()``
  (gradients are only computed by ``backward``); ``loop.evaluate`` reports the final accuracy.
* ``torch.save(model.state_dict(), model_path)`` for the best validation loss ->
  ``loop.save_weights(path)`` (safetensors with PyTorch's ``state_dict`` keys).

Run: ``python examples/pytorch_training_loop.py --backend torch``.
"""

from __future__ import annotations

import argparse

import numpy as np

import unitrain
from unitrain import SGD, BatchNorm1d, CrossEntropyLoss, Dropout, Flatten, Linear, ReLU, Sequential

MODEL = Sequential(Flatten(), Linear(784, 256), BatchNorm1d(256), ReLU(), Dropout(0.2), Linear(256, 10))


def train_one_epoch(loop, train, args, epoch: int) -> float:
    """One epoch of the tutorial-shaped step; returns the mean loss of the last report's batches."""
    running, last_loss = [], float("nan")
    for i, (inputs, labels) in enumerate(train.batches(args.batch_size, shuffle=True, seed=args.seed, epoch=epoch)):
        loop.zero_grad()
        outputs = loop.forward(inputs)
        loss = loop.loss(outputs, labels)
        loop.backward(loss)
        loop.update()
        running.append(loss)
        done = args.max_steps is not None and loop.step_count >= args.max_steps
        if (i + 1) % args.log_every == 0 or done:
            last_loss = float(np.mean([loop.to_float(value) for value in running]))
            print(f"  batch {i + 1} loss: {last_loss:.4f}")
            running = []
        if done:
            break
    return last_loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=unitrain.available_backends(), help="default: $UNITRAIN_BACKEND, else numpy"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--log-every", type=int, default=100, help="report the running loss every N batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many updates (quick runs)")
    parser.add_argument("--out", default="best_model.safetensors", help="where the best model is saved")
    args = parser.parse_args(argv)

    train, validation = unitrain.load_mnist("train"), unitrain.load_mnist("test")
    optimizer = SGD(lr=args.lr, momentum=args.momentum)
    loop = unitrain.make_loop(args.backend, MODEL, CrossEntropyLoss(), optimizer, seed=args.seed)

    best_vloss = float("inf")
    for epoch in range(args.epochs):
        print(f"EPOCH {epoch + 1}:")
        loop.train()  # dropout on, BatchNorm uses (and tracks) batch statistics
        avg_loss = train_one_epoch(loop, train, args, epoch)

        loop.eval()  # dropout off, BatchNorm uses its running statistics
        vlosses = [loop.to_float(loop.loss(loop.forward(x), y)) for x, y in validation.batches(1000)]
        avg_vloss = float(np.mean(vlosses))
        print(f"LOSS train {avg_loss:.4f} valid {avg_vloss:.4f}")

        if avg_vloss < best_vloss:
            best_vloss = avg_vloss
            loop.save_weights(args.out)
        if args.max_steps is not None and loop.step_count >= args.max_steps:
            break

    accuracy = loop.evaluate(validation)["accuracy"]
    print(f"best model saved to {args.out}; final validation accuracy: {100 * accuracy:.1f}%")


if __name__ == "__main__":
    main()
