"""The command line's flags that describe a run, and the parsers of their values: each value is checked
while the command line is parsed, so that a bad one stops the command before NumPy or a framework loads."""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

from .choices import PACKAGED_DATASETS, TASKS
from .controls import METRICS
from .dialects import DIALECTS
from .layers import INIT_SCHEMES, PRESETS, model_from_name
from .losses import LOSSES
from .optim import OPTIMIZERS
from .schedules import parse_schedule


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _schedule(text: str) -> str:
    """A schedule, checked now (before any training) and kept in its canonical spelling."""
    try:
        return str(parse_schedule(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def model_name(text: str) -> str:
    """A model name, resolved now (importing a ``module:function``) so that a bad one stops the
    command before any training; kept as typed, as runs and checkpoints record it."""
    try:
        model_from_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_tensorboard_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--tensorboard", type=Path, metavar="DIR", help=f"{help} (tensorboardX)")


def add_model_argument(parser: argparse.ArgumentParser, help: str = "", default: str = "mlp",
                       check=model_name) -> None:  # fmt: skip
    parser.add_argument(
        "--model", type=check, default=default, metavar="NAME|module:function",
        help=f"{help}{', '.join(PRESETS)} (default mlp), or package.module:function returning a unitrain model spec",
    )  # fmt: skip


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def int_in_range(low: int, high: int):
    at_least = int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    return parse


# The flags that describe the run (a :class:`~unitrain.run.Run`: those of job.RUN_FLAGS and these)
# are absent from the parsed arguments unless typed, so that they override a recipe or checkpoint only
# where given.
EARLY_STOPPING_FLAGS = ("early_stopping", "patience", "min_delta")
OPTIMIZER_FLAGS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """What defines a training run (train and compare share them): a recipe file and flags,
    which override it. Defaults are a :class:`~unitrain.run.Run`'s."""
    unset = argparse.SUPPRESS
    parser.add_argument(
        "recipe", nargs="?", type=Path, metavar="RECIPE.toml",
        help="the run as a file (write one with --print-recipe); flags given too override it",
    )  # fmt: skip
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the run as a recipe (TOML) on stdout and exit without training")  # fmt: skip
    add_model_argument(parser, default=unset)
    parser.add_argument(
        "--loss", choices=list(LOSSES), default=unset,
        help="the torch.nn loss (default cross-entropy; the elementwise ones train on one-hot labels)",
    )  # fmt: skip
    add_data_arguments(parser, default=unset)
    parser.add_argument(
        "--val-split", type=_count_or_fraction, default=unset, metavar="N|FRACTION",
        help="hold N training samples (or a fraction such as 0.1) out for val_loss / val_accuracy each epoch",
    )  # fmt: skip
    parser.add_argument("--val-from", choices=("random", "first", "last"), default=unset,
                        help="which samples --val-split holds out: chosen by --seed (default), the first or the last "
                        "(Keras' validation_split) in file order")  # fmt: skip
    parser.add_argument(
        "--normalize", type=_normalization, default=unset, metavar="MEAN/STD",
        help="normalise with this mean and std, one number or one per channel, comma-separated "
        "('0.1307/0.3081'; default: the packaged dataset's, or your training set's)",
    )  # fmt: skip
    parser.add_argument("--layout", choices=("NCHW", "NHWC"), default=unset,
                        help="a regression or multi-label .npz's 4-d x: channels-first (default) or channels-last, "
                        "transposed once")  # fmt: skip
    parser.add_argument("--task", choices=TASKS, default=unset,
                        help="what the targets are: class indices (default), an .npz's y (regression, multi-label: "
                        "0/1 vectors) or the input itself (reconstruction)")  # fmt: skip
    parser.add_argument("--resize", type=_size, default=unset, metavar="HxW", help="resize samples (bilinear)")
    parser.add_argument("--pad", type=int_at_least(0), default=unset, metavar="N",
                        help="pad samples by N pixels of black on every side (after --resize)")  # fmt: skip
    parser.add_argument("--random-crop-padding", type=int_at_least(0), default=unset, metavar="N",
                        help="augment: crop training samples at random from a copy padded by N pixels")  # fmt: skip
    parser.add_argument("--random-horizontal-flip", action=argparse.BooleanOptionalAction, default=unset,
                        help="augment: flip half of the training samples left to right")  # fmt: skip
    parser.add_argument("--epochs", type=int_at_least(0), default=unset, help="default 3")
    parser.add_argument("--batch-size", type=int_at_least(1), default=unset, help="default 64")
    parser.add_argument("--test-batch-size", type=int_at_least(1), default=unset, metavar="N",
                        help="batch size of the validation and test evaluations (default 1000)")  # fmt: skip
    parser.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=unset,
                        help="leave out each epoch's last, smaller batch (PyTorch's drop_last)")  # fmt: skip
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=unset,
                        help="torch: compile the model with torch.compile (MindSpore's steps are compiled "
                        "anyway)")  # fmt: skip
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=unset, help="default sgd")
    parser.add_argument("--lr", type=_positive_float, default=unset, help="default 0.01")
    parser.add_argument("--momentum", type=_float, default=unset, help="SGD's or RMSprop's momentum (default 0)")
    parser.add_argument("--nesterov", action="store_true", default=unset, help="Nesterov momentum (SGD)")
    parser.add_argument("--weight-decay", type=_float, default=unset, help="default 0 (adamw: 0.01)")
    parser.add_argument(
        "--lr-schedule", type=_schedule, default=unset, metavar="'StepLR(step_size=1, gamma=0.7)'",
        help="a torch.optim.lr_scheduler class with its arguments (StepLR, MultiStepLR, ExponentialLR, "
        "CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR)",
    )  # fmt: skip
    clipping = parser.add_mutually_exclusive_group()
    clipping.add_argument("--clip-grad-norm", type=_positive_float, default=unset, metavar="X",
                          help="clip gradients to total norm X")  # fmt: skip
    clipping.add_argument("--clip-grad-value", type=_positive_float, default=unset, metavar="X",
                          help="clip gradients to [-X, X]")  # fmt: skip
    parser.add_argument("--seed", type=int_at_least(0), default=unset, help="default 0")
    parser.add_argument("--max-steps", type=int_at_least(0), default=unset, metavar="N",
                        help="stop after N optimizer steps in total")  # fmt: skip
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=unset,
                        help="visit samples in a new random order each epoch (default) or in file order")  # fmt: skip
    parser.add_argument("--init-weights", type=str, default=unset, metavar="FILE",
                        help="start from these safetensors weights")  # fmt: skip
    parser.add_argument("--freeze", dest="frozen", action="append", default=unset, metavar="PATTERN",
                        help="leave these parameters untrained: a name (0.weight), a layer path (0, layer1), a glob "
                        "(*.bias) or a layer class (BatchNorm2d); repeatable")  # fmt: skip
    parser.add_argument("--param-group", dest="param_groups", action="append", type=_param_group, default=unset,
                        metavar="'PATTERNS:OPTION=VALUE,...'",
                        help="optimizer options for some parameters, e.g. '*.bias,BatchNorm2d:weight_decay=0' or "
                        "'0:lr=0.001'; repeatable")  # fmt: skip
    parser.add_argument("--accumulate-grad-batches", type=int_at_least(1), default=unset, metavar="K",
                        help="one optimizer step per K batches, each batch's loss over K (default 1)")  # fmt: skip
    parser.add_argument("--early-stopping", choices=METRICS, default=unset, metavar="METRIC",
                        help=f"stop when METRIC ({', '.join(METRICS)}) stops improving; the best epoch's weights "
                        "are kept and are the run's result")  # fmt: skip
    parser.add_argument("--patience", type=int_at_least(0), default=unset, metavar="N",
                        help="with --early-stopping: epochs without improvement to stop at (default 0)")  # fmt: skip
    parser.add_argument("--min-delta", type=_float, default=unset, metavar="X",
                        help="with --early-stopping: the least improvement that counts (default 0)")  # fmt: skip
    parser.add_argument(
        "--dialect", choices=list(DIALECTS), default=unset,
        help="another framework's layer defaults, initialisers and optimizer equations (default torch)",
    )  # fmt: skip
    parser.add_argument(
        "--init", type=str, default=unset, metavar="SCHEME",
        help=f"how the first weights are drawn: {', '.join(INIT_SCHEMES)}, or an initialiser for every weight "
        "('xavier_uniform', 'normal(0.02)', ...; default: the model's, or the dialect's)",
    )  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int_at_least(1),
        metavar="N",
        help="CPU threads for the framework's kernels and BLAS (default: every core this process may use; "
        "with --nproc, an equal share per process)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


def add_data_arguments(parser: argparse.ArgumentParser, default=None) -> None:
    parser.add_argument(
        "--dataset", default="mnist" if default is None else default, metavar="|".join(PACKAGED_DATASETS) + "|PATH",
        help="a packaged dataset, or your own: a Keras-style .npz, a folder of IDX files, of class folders of "
        "images (train/, test/) or of CIFAR-10 binary batches (default: mnist)",
    )  # fmt: skip
    parser.add_argument("--data-dir", type=str, default=default, metavar="DIR",
                        help="read the packaged dataset's IDX files from DIR")  # fmt: skip


def _normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, slash, std = text.partition("/")
    try:
        if not slash:
            raise ValueError
        return tuple(_float(v) for v in mean.split(",")), tuple(_positive_float(v) for v in std.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected MEAN/STD, finite numbers (std > 0), comma-separated per "
                                         f"channel, got {text[:100]!r}") from None  # fmt: skip


def _size(text: str) -> tuple[int, int]:
    height, x, width = text.lower().partition("x")
    try:
        size = int(height), int(width)
    except ValueError:
        size = None
    if not x or size is None or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 32x32, got {text[:100]!r}")
    return size


def input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape 1,28,28``: one sample's sizes, without the batch dimension."""
    try:
        shape = tuple(int(size) for size in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected one sample's sizes without the batch dimension, positive integers "
                                         f"separated by commas such as 1,28,28, got {text[:100]!r}")  # fmt: skip
    return shape


def _count_or_fraction(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value.is_integer() and value >= 0 and "." not in text:
        return int(value)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in (0, 1), got {text[:100]!r}")
    return value


def _param_group(text: str) -> dict:
    """``'*.bias,BatchNorm2d:weight_decay=0'`` as ``{"params": [...], "weight_decay": 0}``."""
    patterns, colon, options = text.partition(":")
    group = {"params": [pattern.strip() for pattern in patterns.split(",") if pattern.strip()]}
    try:
        for option in options.split(",") if options.strip() else ():
            name, equals, value = option.partition("=")
            if not equals or not name.strip().isidentifier():
                raise ValueError
            group[name.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        group = {}
    if not colon or not group.get("params") or len(group) < 2:
        raise argparse.ArgumentTypeError(f"expected PATTERNS:OPTION=VALUE,... such as '*.bias:weight_decay=0', "
                                         f"got {text[:100]!r}")  # fmt: skip
    return group
