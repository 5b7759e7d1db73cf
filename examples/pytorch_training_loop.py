"""PyTorch's "Training with PyTorch" tutorial (pytorch.org, beginner/introyt/trainingyt): Fashion-MNIST,
its GarmentClassifier, on any unitrain backend.

What maps to what:

* ``FashionMNIST(..., transform=Compose([ToTensor(), Normalize((0.5,), (0.5,))]))`` ->
  ``load_dataset("fashion-mnist", split, normalization=(0.5, 0.5))``: the dataset ships inside
  unitrain, normalised as the tutorial does (``(x/255 - 0.5)/0.5``).
* ``DataLoader(training_set, batch_size=4, shuffle=True)`` ->
  ``training_set.batches(4, shuffle=True, seed, epoch)``; the test set is the validation set.
* ``GarmentClassifier`` (conv 1->6 5x5, max pool 2, conv 6->16 5x5, max pool 2, fc 256-120-84-10,
  ReLUs) -> ``unitrain.lenet()``, with the same ``state_dict`` names (``conv1``, ``fc3``, ...).
* ``SGD(model.parameters(), lr=0.001, momentum=0.9)`` and ``CrossEntropyLoss()`` -> the same specs.
* ``optimizer.zero_grad(); outputs = model(inputs); loss = loss_fn(outputs, labels);
  loss.backward(); optimizer.step()`` -> ``loop.zero_grad()``, ``loop.forward``, ``loop.loss``,
  ``loop.backward``, ``loop.update()``.
* ``running_loss += loss.item()``, printed as the loss per batch every 1000 batches -> the same
  (``--log-every``), reading the native losses once per report rather than once per batch.
* ``model.eval()`` and ``with torch.no_grad():`` validation with the mean of the batch losses ->
  ``loop.evaluate(validation_set)["loss"]``: the mean loss per sample, which is the mean of the
  tutorial's 2,500 batch means (its batches all hold 4 samples), computed without gradients.
* ``torch.save(model.state_dict(), model_path)`` for the best validation loss, and
  ``saved_model.load_state_dict(torch.load(PATH))`` -> ``loop.save_weights(path)`` (safetensors
  with PyTorch's keys, loadable by ``torch``) and ``load_weights`` into a new loop.
* TensorBoard's ``SummaryWriter`` is left out.

Run: ``python examples/pytorch_training_loop.py --backend torch`` (``--max-steps 2000`` for a
quick run).
"""

from __future__ import annotations

import argparse

import numpy as np

import unitrain
from unitrain import SGD, CrossEntropyLoss


def train_one_epoch(loop, training_set, args, epoch: int) -> float:
    """One epoch of the tutorial-shaped step; returns the loss per batch of the last report."""
    running, last_loss = [], 0.0
    batches = training_set.batches(args.batch_size, shuffle=True, seed=args.seed, epoch=epoch)
    for i, (inputs, labels) in enumerate(batches):
        loop.zero_grad()
        outputs = loop.forward(inputs)
        loss = loop.loss(outputs, labels)
        loop.backward(loss)
        loop.update()
        running.append(loss)
        done = args.max_steps is not None and loop.step_count >= args.max_steps
        if i % args.log_every == args.log_every - 1 or done:
            last_loss = float(np.mean([loop.to_float(value) for value in running]))  # loss per batch
            print(f"  batch {i + 1} loss: {last_loss}")
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
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--log-every", type=int, default=1000, help="report the loss per batch every N batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many updates (quick runs)")
    parser.add_argument("--out", default="model_best.safetensors", help="where the best model is saved")
    args = parser.parse_args(argv)

    normalize = (0.5, 0.5)  # the tutorial's Normalize((0.5,), (0.5,))
    training_set = unitrain.load_dataset("fashion-mnist", "train", normalization=normalize)
    validation_set = unitrain.load_dataset("fashion-mnist", "test", normalization=normalize)
    classes = training_set.classes
    print(f"Training set has {len(training_set)} instances")
    print(f"Validation set has {len(validation_set)} instances")
    _, labels = next(training_set.batches(args.batch_size, shuffle=True, seed=args.seed))
    print("  ".join(classes[label] for label in labels))

    model = unitrain.lenet()  # the tutorial's GarmentClassifier
    optimizer = SGD(lr=args.lr, momentum=args.momentum)
    loop = unitrain.make_loop(args.backend, model, CrossEntropyLoss(), optimizer, seed=args.seed)

    best_vloss = 1_000_000.0
    for epoch in range(args.epochs):
        print(f"EPOCH {epoch + 1}:")
        loop.train(True)
        avg_loss = train_one_epoch(loop, training_set, args, epoch)

        avg_vloss = loop.evaluate(validation_set)["loss"]  # eval mode, no gradients
        print(f"LOSS train {avg_loss} valid {avg_vloss}")

        if avg_vloss < best_vloss:
            best_vloss = avg_vloss
            loop.save_weights(args.out)
        if args.max_steps is not None and loop.step_count >= args.max_steps:
            break

    saved_model = unitrain.make_loop(args.backend, unitrain.lenet(), CrossEntropyLoss())
    saved_model.load_weights(args.out)
    metrics = saved_model.evaluate(validation_set)
    print(f"best model saved to {args.out}, reloaded: valid loss {metrics['loss']} "
          f"(best {best_vloss}), accuracy {100 * metrics['accuracy']:.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
