"""The ``unitrain`` command line. Imports no framework until a backend is chosen."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import registry
from .data import DataError, load_mnist
from .layers import PRESETS, preset
from .loop import InputError
from .optim import OPTIMIZERS
from .weights import WeightsError


class UsageError(Exception):
    """A command line that cannot work (bad value, missing file, would overwrite)."""


#: errors that are the user's to fix: reported in one line, exit code 2, no traceback
USER_ERRORS = (UsageError, registry.BackendError, DataError, WeightsError, InputError, OSError)


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unitrain", description="One training loop on PyTorch, MindSpore, Chainer or NumPy."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model on MNIST",
        description="Train on MNIST. Defaults are the MindSpore beginner tutorial's: MLP 784-512-512-10, "
        "SGD lr 0.01, batch 64, 3 epochs.",
    )
    train.add_argument(
        "--backend",
        help=f"numpy, torch, mindspore, chainer or a registered one (default: ${registry.ENV_VAR} or numpy)",
    )
    train.add_argument("--model", choices=sorted(PRESETS), default="mlp")
    train.add_argument("--dataset", choices=["mnist"], default="mnist")
    train.add_argument("--epochs", type=_int_at_least(0), default=3)
    train.add_argument("--batch-size", type=_int_at_least(1), default=64)
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    train.add_argument("--lr", type=_positive_float, default=0.01)
    train.add_argument("--momentum", type=_float, default=None, help="SGD momentum (default 0)")
    train.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    train.add_argument("--weight-decay", type=_float, default=None, help="default 0 (adamw: 0.01)")
    train.add_argument("--seed", type=_int_at_least(0), default=0)
    train.add_argument("--max-steps", type=_int_at_least(0), help="stop after N optimizer steps in total")
    train.add_argument("--no-shuffle", action="store_true", help="visit samples in file order")
    train.add_argument("--init-weights", type=Path, metavar="FILE", help="start from these safetensors weights")
    train.add_argument("--save", type=Path, metavar="FILE", help="write the trained weights (safetensors)")
    train.add_argument("--metrics", type=Path, metavar="FILE", help="write one JSON object per epoch")
    train.add_argument("--data-dir", type=Path, metavar="DIR", help="read MNIST IDX files from DIR")
    train.add_argument("--overwrite", action="store_true", help="allow --save/--metrics to replace files")
    train.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    train.set_defaults(handler=cmd_train)

    backends = commands.add_parser("backends", help="list backends and whether their framework is installed")
    backends.set_defaults(handler=cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"unitrain: error: {error}", file=sys.stderr)
        return 2


# --- unitrain backends -------------------------------------------------------------------


def cmd_backends(args) -> int:
    rows = []
    for spec in registry.backend_specs().values():
        installed = spec.installed()
        rows.append(
            (
                spec.name,
                "installed" if installed else "missing",
                spec.version() or "-",
                "" if installed else (spec.install_hint or ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[3], sep="  ")
    return 0


# --- unitrain train ----------------------------------------------------------------------


def _check_output(path: Path | None, flag: str, overwrite: bool) -> None:
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory, expected a file path")
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable")


def _optimizer(args):
    spec = OPTIMIZERS[args.optimizer]
    options = {"lr": args.lr}
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    if args.optimizer == "sgd":
        options.update(momentum=args.momentum or 0.0, nesterov=args.nesterov)
    elif args.momentum is not None or args.nesterov:
        raise UsageError(f"--momentum/--nesterov apply to sgd, not {args.optimizer}")
    try:
        return spec(**options)
    except ValueError as error:
        raise UsageError(f"--optimizer {args.optimizer}: {error}") from None


def cmd_train(args) -> int:
    # Everything the user typed is checked before the (slow) framework import and any training.
    if args.init_weights is not None and not args.init_weights.is_file():
        raise UsageError(f"--init-weights {args.init_weights} does not exist or is not a file")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir} does not exist or is not a directory")
    _check_output(args.save, "--save", args.overwrite)
    _check_output(args.metrics, "--metrics", args.overwrite)
    if args.save is not None and args.metrics is not None and args.save.resolve() == args.metrics.resolve():
        raise UsageError("--save and --metrics name the same file")
    optimizer = _optimizer(args)
    model = preset(args.model)
    adapter = registry.get_backend(args.backend)
    train_data = load_mnist("train", args.data_dir)
    test_data = load_mnist("test", args.data_dir)

    loop = adapter(model, optimizer=optimizer, seed=args.seed)
    if args.init_weights is not None:
        loop.load_weights(args.init_weights)
    version = registry.backend_specs()[loop.name].version()
    print(
        f"unitrain: backend {loop.name}{f' {version}' if version else ''}, model {args.model}, {optimizer}, "
        f"batch {args.batch_size}, MNIST {len(train_data)} train / {len(test_data)} test",
        flush=True,
    )
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    extensions = [EpochReport(args.epochs)]
    if show_progress:
        extensions.insert(0, ProgressBar())
    if args.metrics is not None:
        extensions.append(MetricsWriter(args.metrics, loop.name, args.model))
    history = loop.fit(
        train_data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        shuffle=not args.no_shuffle,
        max_steps=args.max_steps,
        eval_data=test_data,
        extensions=extensions,
    )
    if not history:  # --epochs 0 or --max-steps 0: still report the model as it is
        metrics = loop.evaluate(test_data)
        print(
            f"no training step taken  test accuracy {100 * metrics['accuracy']:.2f}%  test loss {metrics['loss']:.4f}"
        )
    if args.save is not None:
        loop.save_weights(args.save)
        print(f"unitrain: saved weights to {args.save}")
    return 0


class EpochReport:
    """One line per epoch: train loss, test accuracy, average test loss, samples/s."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_epoch_end(self, loop, record):
        print(
            f"epoch {record['epoch']}/{self.epochs}  train loss {record['train_loss']:.4f}  "
            f"test accuracy {100 * record['test_accuracy']:.2f}%  test loss {record['test_loss']:.4f}  "
            f"{record['samples_per_sec']:.0f} samples/s",
            flush=True,
        )


class ProgressBar:
    """A progress bar on stderr. Reads the loss (a host sync) only when it redraws."""

    width, interval = 30, 0.2

    def on_fit_start(self, loop, plan):
        self.total = plan["steps_per_epoch"]

    def on_epoch_start(self, loop, epoch):
        self.epoch, self.last_draw = epoch + 1, 0.0

    def on_step_end(self, loop, index, loss):
        now = time.monotonic()
        if now - self.last_draw >= self.interval or index + 1 == self.total:
            self.last_draw = now
            done = (index + 1) / self.total
            bar = "#" * int(done * self.width)
            sys.stderr.write(
                f"\repoch {self.epoch} [{bar:<{self.width}}] {index + 1}/{self.total} loss {loop.to_float(loss):.4f}"
            )
            sys.stderr.flush()

    def on_epoch_end(self, loop, record):
        sys.stderr.write("\r" + " " * (self.width + 60) + "\r")
        sys.stderr.flush()


class MetricsWriter:
    """JSON Lines, one object per epoch, flushed as each epoch ends."""

    def __init__(self, path: Path, backend: str, model: str):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in finalize
        self.fields = {"backend": backend, "model": model}

    def on_epoch_end(self, loop, record):
        self.file.write(json.dumps({**self.fields, **record}) + "\n")
        self.file.flush()

    def finalize(self, loop):
        self.file.close()
