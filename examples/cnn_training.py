"""deeplizard's "CNN Training Loop Explained" (the PyTorch CNN tutorial): Fashion-MNIST, on any unitrain backend.

What maps to what:

* ``torchvision.datasets.FashionMNIST(..., transform=transforms.Compose([transforms.ToTensor()]))``
  -> ``load_dataset("fashion-mnist", "train", normalization=(0, 1))``: pixels scaled to [0, 1]
  and nothing more, as ``ToTensor`` does.
* ``Network``: conv1(1, 6, 5), conv2(6, 12, 5), each ReLU + max_pool2d(2), fc1(12*4*4, 120),
  fc2(120, 60), out(60, 10) -> the ``cnn()`` preset.
* ``DataLoader(train_set, batch_size=100)`` -> ``train.batches(100)`` (unshuffled, as in the tutorial).
* ``optim.Adam(network.parameters(), lr=0.01)`` -> ``Adam(lr=0.01)``.
* ``preds = network(images); loss = F.cross_entropy(preds, labels); optimizer.zero_grad();
  loss.backward(); optimizer.step()`` -> ``network.forward``, ``network.loss``, ``network.zero_grad()``,
  ``network.backward``, ``network.update()``.
* ``total_loss += loss.item()`` -> the native losses are kept and summed once per epoch.
* ``total_correct += get_num_correct(preds, labels)`` (``preds.argmax(dim=1).eq(labels).sum()``) ->
  the same on ``network.to_numpy(preds)``: the predictions made before the update, as in the tutorial.

Prints, as the tutorial does, ``epoch E total_correct: C loss: L``: L is the sum of the batch losses
and C the number of training images classified correctly during the epoch.

Run: ``python examples/cnn_training.py --backend torch``.
"""

from __future__ import annotations

import argparse

import unitrain
from unitrain import Adam, CrossEntropyLoss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=unitrain.available_backends(), help="default: $UNITRAIN_BACKEND, else numpy"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (quick runs)")
    args = parser.parse_args(argv)

    train_set = unitrain.load_dataset("fashion-mnist", "train", normalization=(0.0, 1.0))  # ToTensor() only
    network = unitrain.make_loop(args.backend, unitrain.cnn(), CrossEntropyLoss(), Adam(lr=args.lr), seed=args.seed)

    for epoch in range(args.epochs):
        losses, total_correct = [], 0
        for images, labels in train_set.batches(args.batch_size):
            preds = network.forward(images)
            loss = network.loss(preds, labels)
            network.zero_grad()
            network.backward(loss)
            network.update()
            losses.append(loss)
            total_correct += int((network.to_numpy(preds).argmax(axis=1) == labels).sum())
            if args.max_steps is not None and network.step_count >= args.max_steps:
                break
        total_loss = sum(network.to_float(loss) for loss in losses)
        print("epoch", epoch, "total_correct:", total_correct, "loss:", total_loss)
        if args.max_steps is not None and network.step_count >= args.max_steps:
            break


if __name__ == "__main__":
    main()
