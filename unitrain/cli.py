"""The ``unitrain`` command line. Imports no framework until a backend is chosen."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

# only what parsing needs: `unitrain --help` and a mistyped flag answer before NumPy loads; each command
# imports the rest (tests/test_cli_imports.py checks what parsing imports)
from . import distributed, files, registry
from .built_models import one_model_per_name
from .cli_arguments import (
    EARLY_STOPPING_FLAGS,
    OPTIMIZER_FLAGS,
    add_data_arguments,
    add_model_argument,
    add_run_arguments,
    add_tensorboard_argument,
    input_shape,
    int_at_least,
    int_in_range,
    model_name,
)
from .controls import EarlyStopping
from .dialects import dialect
from .layers import model_from_name
from .optim import OPTIMIZERS
from .reading import path_problem
from .signals import ending_on_signals, interrupted

if TYPE_CHECKING:
    import numpy as np

    from .run import Run


class UsageError(Exception):
    """A command line that cannot work (bad value, missing file, would overwrite)."""


#: errors that are the user's to fix: reported in one line, exit code 2, no traceback; and those defined by
#: modules that parsing does not load (none of which can have been raised while they are not loaded)
USER_ERRORS = (UsageError, distributed.LaunchError, files.OutputError, registry.BackendError, OSError)
_LOADED_LATER_USER_ERRORS = {"unitrain.data": "DataError", "unitrain.weights": "WeightsError",
                             "unitrain.input_checks": "InputError", "unitrain.plot": "PlotError",
                             "unitrain.run": "RunError", "unitrain.job": "JobError"}  # fmt: skip


def _is_users_error(error: Exception) -> bool:
    later = [getattr(sys.modules[module], name) for module, name in _LOADED_LATER_USER_ERRORS.items()
             if module in sys.modules]  # fmt: skip
    return isinstance(error, (*USER_ERRORS, *later))


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line as every other error: one line, exit code 2 (argparse's own
    prints the usage first); subcommands' parsers are of this class too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unitrain", description="One training loop on PyTorch, MindSpore, Chainer or NumPy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model on MNIST, Fashion-MNIST or your own data",
        description="Train on a dataset (default MNIST). Defaults are the MindSpore beginner tutorial's: "
        "MLP 784-512-512-10, SGD lr 0.01, batch 64, 3 epochs.",
    )
    train.add_argument(
        "--backend",
        help=f"numpy, torch, mindspore, chainer or a registered one (default: ${registry.ENV_VAR} or numpy)",
    )
    add_run_arguments(train)
    train.add_argument(
        "--nproc",
        type=int_at_least(1),
        metavar="N",
        help="data-parallel over N processes on the backend's own engine and launcher (torchrun, mpiexec, msrun)",
    )
    train.add_argument(
        "--master-port", type=int_in_range(1, 65535), metavar="P", help="--nproc: the rendezvous port (default: free)"
    )
    train.add_argument("--save", type=Path, metavar="FILE", help="write the trained weights (safetensors)")
    train.add_argument("--metrics", type=Path, metavar="FILE", help="write one JSON object per epoch")
    train.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the run's curves by epoch (matplotlib)")
    add_tensorboard_argument(train, "write TensorBoard event files into DIR: loss and lr per step, the epoch records")
    train.add_argument("--overwrite", action="store_true", help="allow --save/--metrics/--plot to replace files")
    train.add_argument(
        "--checkpoint-dir", type=Path, metavar="DIR", help="write checkpoints (each epoch's end, Ctrl-C)"
    )
    train.add_argument("--checkpoint-every", type=int_at_least(1), metavar="N", help="also checkpoint every N steps")
    train.add_argument("--keep", type=int_at_least(1), default=3, metavar="K", help="keep the newest K checkpoints")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run checkpointed in DIR (its newest checkpoint, or a step-N folder), on any --backend",
    )
    train.set_defaults(handler=cmd_train)

    compare = commands.add_parser(
        "compare",
        help="the same run on several backends side by side, in one report",
        description="Train on each backend in turn from the same initial weights, over the same batches, with the "
        "same settings (those of train), then report accuracy, loss, speed and how far each backend's weights and "
        "predictions are from the first one's.",
    )
    compare.add_argument(
        "--backends", metavar="A,B,...", help="comma-separated backends, the reference first (default: all installed)"
    )
    add_run_arguments(compare)
    compare.add_argument(
        "--json", type=Path, metavar="FILE", help="also write the report as JSON, every step's loss too"
    )
    compare.add_argument(
        "--report", type=Path, metavar="DIR", help="also write a web page with figures: DIR/index.html (matplotlib)"
    )
    add_tensorboard_argument(compare, "write TensorBoard event files, one run per backend: DIR/<backend>")
    compare.add_argument(
        "--native",
        action="store_true",
        help="also train each framework's hand-written tutorial loop (torch, mindspore, chainer; SGD), for speed "
        "and weights",
    )
    compare.add_argument(
        "--sample-every", type=int_at_least(1), metavar="K",
        help="compare each layer's weights with the reference every K steps (default: 50 samples per run)",
    )  # fmt: skip
    compare.add_argument(
        "--overwrite",
        action="store_true",
        help="allow --json to replace a file, --report to write into a non-empty DIR",
    )
    compare.set_defaults(handler=cmd_compare)

    plot_command = commands.add_parser(
        "plot",
        help="draw train loss, test loss and test accuracy by epoch of train --metrics files",
        description="Draw the curves of one or several runs (train --metrics files) into one PNG, one line per file.",
    )
    plot_command.add_argument("metrics", nargs="+", type=Path, metavar="METRICS.jsonl")
    plot_command.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png", help="the figure")
    plot_command.add_argument("--overwrite", action="store_true", help="allow -o to replace a file")
    plot_command.set_defaults(handler=cmd_plot)

    evaluate = commands.add_parser("evaluate", help="test loss and accuracy of a weights file on a test set")
    predict = commands.add_parser("predict", help="classify a test image or a 28x28 grayscale PNG")
    for command in (evaluate, predict):
        command.add_argument("--weights", type=Path, metavar="FILE", required=True, help="safetensors weights")
        command.add_argument("--backend", help=f"default: ${registry.ENV_VAR} or numpy")
        command.add_argument(
            "--recipe", type=Path, metavar="RECIPE.toml",
            help="the model and data (dataset and transforms) of the run the weights come from",
        )  # fmt: skip
        add_model_argument(command, default=argparse.SUPPRESS, check=str)  # or a --recipe's [models] name
        add_data_arguments(command, default=argparse.SUPPRESS)
    evaluate.set_defaults(handler=cmd_evaluate)
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--index", type=int_at_least(0), help="test image number (default 0)")
    source.add_argument("--image", type=Path, metavar="FILE.png", help="28x28 grayscale PNG, white digit on black")
    predict.add_argument(
        "--output",
        type=Path,
        metavar="FILE.npy",
        help="also write the model's outputs for the whole test set (or --image) as a .npy array",
    )
    predict.add_argument("--overwrite", action="store_true", help="allow --output to replace a file")
    predict.set_defaults(handler=cmd_predict)

    convert = commands.add_parser(
        "convert",
        help="a model's weights to or from PyTorch, MindSpore or Chainer files, or to ONNX",
        description="Convert weights between file formats, chosen by extension: .safetensors (unitrain's), "
        ".pt/.pth (a PyTorch state_dict), .ckpt (MindSpore), .npz (Chainer's save_npz); .onnx to export the model. "
        "Tensors are named as each framework names the model's layers (docs/convert.md).",
    )
    convert.add_argument("input", type=Path, metavar="IN", help="the weights to read")
    convert.add_argument("output", type=Path, metavar="OUT", help="the file to write")
    add_model_argument(convert, "the model the weights belong to: ")
    convert.add_argument("--input-shape", type=input_shape, metavar="SIZES",
                         help="for OUT.onnx: one sample's input shape without the batch dimension, such as "
                              "3,32,32 (default: a graph's declared one, else MNIST's 1,28,28)")  # fmt: skip
    convert.add_argument("--overwrite", action="store_true", help="allow OUT to replace a file")
    convert.set_defaults(handler=cmd_convert)

    backends = commands.add_parser("backends", help="list backends and whether their framework is installed")
    backends.set_defaults(handler=cmd_backends)

    conformance = commands.add_parser(
        "conformance",
        help="run the conformance suite: a matrix of checks x backends",
        description="Run the conformance checks on backends (default: every installed one). "
        "Exit status 1 on any unexpected failure.",
    )
    conformance.add_argument("--backend", action="append", metavar="NAME", help="a registered backend (repeatable)")
    conformance.add_argument(
        "--adapter", action="append", metavar="MODULE:CLASS", help="an adapter class to import (repeatable)"
    )
    conformance.add_argument("--check", action="append", metavar="NAME", help="run only this check (repeatable)")
    conformance.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    conformance.add_argument("--overwrite", action="store_true", help="allow --json to replace a file")
    conformance.set_defaults(handler=cmd_conformance)
    return parser


def _data_fields() -> tuple[str, ...]:
    from .run import DataSpec

    return tuple(field.name for field in dataclasses.fields(DataSpec))


def _typed_run_settings(args) -> dict:
    """The run settings typed on the command line (argparse left the others out)."""
    from .job import RUN_FLAGS

    fields = (*RUN_FLAGS, *_data_fields(), *OPTIMIZER_FLAGS, *EARLY_STOPPING_FLAGS)
    return {key: value for key, value in vars(args).items() if key in fields}


def _with_flags(base: Run, typed: dict) -> Run:
    """``base`` with the settings ``typed`` on the command line."""
    from .job import RUN_FLAGS
    from .run import RunError

    changes = {key: typed[key] for key in RUN_FLAGS if key in typed}
    if "clip_grad_norm" in typed or "clip_grad_value" in typed:  # the one typed replaces the other's clipping
        changes = {"clip_grad_norm": None, "clip_grad_value": None, **changes}
    data = {key: typed[key] for key in _data_fields() if key in typed}
    if any(key in typed for key in EARLY_STOPPING_FLAGS):
        changes["early_stopping"] = _early_stopping(base.early_stopping, typed)
    try:
        with dialect(changes.get("dialect", base.dialect) or "torch"):  # its defaults for arguments left out
            optimizer = _optimizer(base.optimizer, typed)
        return base.replace(**changes, data=data, optimizer=optimizer)
    except RunError as error:
        raise UsageError(str(error)) from None


def _early_stopping(base: EarlyStopping | None, typed: dict) -> EarlyStopping:
    """``base`` (the recipe's early stopping, if any) with the typed ``--early-stopping``,
    ``--patience`` and ``--min-delta``."""
    if base is None and "early_stopping" not in typed:
        flag = next(key for key in EARLY_STOPPING_FLAGS if key in typed)
        raise UsageError(f"--{flag.replace('_', '-')} needs --early-stopping METRIC (or a recipe's [early_stopping])")
    options = {"monitor": typed["early_stopping"]} if "early_stopping" in typed else {}
    options.update({key: typed[key] for key in ("patience", "min_delta") if key in typed})
    try:
        return dataclasses.replace(base, **options) if base is not None else EarlyStopping(**options)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _optimizer(base, typed: dict):
    """``base`` with the typed optimizer flags: ``--optimizer`` a different one keeps the lr only."""
    options = {key: typed[key] for key in ("lr", "momentum", "nesterov", "weight_decay") if key in typed}
    kind = OPTIMIZERS[typed["optimizer"]] if "optimizer" in typed else type(base)
    if kind is type(base):
        options = {**dataclasses.asdict(base), **options}
    else:
        options.setdefault("lr", base.lr)
    name = next(key for key, value in OPTIMIZERS.items() if value is kind)
    arguments = {field.name for field in dataclasses.fields(kind)}
    if inapplicable := [key for key in options if key not in arguments]:
        raise UsageError(f"--{inapplicable[0].replace('_', '-')} does not apply to --optimizer {name}")
    try:
        return kind(**options)
    except ValueError as error:
        raise UsageError(f"--optimizer {name}: {error}") from None


def _run_of(args) -> tuple[Run, object]:
    """The run the command line describes, and the checkpoint it resumes (or None): then the
    recorded run with the typed settings, which :class:`~unitrain.job.Job` reconciles."""
    from .job import resumable_checkpoint
    from .run import Run, load_recipe

    typed = _typed_run_settings(args)
    if getattr(args, "resume", None) is not None:
        if args.recipe is not None:
            raise UsageError("--resume continues the run its checkpoint records; a RECIPE starts a new run")
        if "init_weights" in typed:
            raise UsageError(
                "--init-weights and --resume exclude each other: a resumed run continues from its checkpoint"
            )
        checkpoint = resumable_checkpoint(args.resume)
        return _with_flags(checkpoint.run_spec(), typed), checkpoint
    run = _with_flags(load_recipe(args.recipe) if args.recipe is not None else Run(), typed)
    run.model_spec()  # a recipe's package.module:function is imported now, as --model's is, before any data
    return run, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _whole_lines_to_stderr()
    # SIGTERM ends a command as Ctrl-C does: MindSpore turns Ctrl-C into SIGTERM (see stop_on_signals).
    # A signal while the handlers are being installed raises there: it too ends the command in one line.
    try:
        with ending_on_signals():
            try:
                with one_model_per_name():  # parsing checks --model by building it: once a command
                    args = build_parser().parse_args(argv)
                    return args.handler(args)
            except Exception as error:
                if not _is_users_error(error):
                    raise
                print(f"unitrain: error: {_one_line(error)}", file=sys.stderr)
                return 2
    except KeyboardInterrupt as interrupt:
        return interrupted(interrupt)


def _whole_lines_to_stderr() -> None:
    """Each line written to stderr in one write: the ranks of a data-parallel job share their
    launcher's pipe, and where Python's output is unbuffered (``PYTHONUNBUFFERED``, ``-u``) a
    ``print`` is two writes, the text and its newline, so that two ranks' refusals could run into
    one line. Line buffering flushes at each newline (and a progress bar's carriage return) all the same."""
    with contextlib.suppress(AttributeError, ValueError, OSError):  # a stream that cannot be reconfigured
        sys.stderr.reconfigure(line_buffering=True, write_through=False)


def _one_line(error: Exception) -> str:
    """An OSError as path and reason (``w.safetensors: No space left on device``), not ``[Errno 28] ...``;
    control characters (a newline in a file name) escaped, so that it stays one line."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename is not None else error.strerror
    else:
        text = str(error)
    return re.sub(r"[\x00-\x1f\x7f]", lambda match: repr(match.group())[1:-1], text)


# --- unitrain convert --------------------------------------------------------------------


def cmd_convert(args) -> int:
    from .convert import convert, format_of
    from .job import published

    final = convert(args.input, args.output, model_from_name(args.model), overwrite=args.overwrite,
                    input_shape=args.input_shape)  # fmt: skip
    placed = published("OUT", args.output, final, "weights", args.overwrite)
    print(f"unitrain: wrote {final} ({format_of(final, 'OUT').title}, model {args.model})")
    return 0 if placed else 2


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


# --- unitrain conformance ----------------------------------------------------------------


def cmd_conformance(args) -> int:
    from unitrain.conformance import runner

    from .job import write_json

    files.check_output(args.json, "--json", args.overwrite)
    results = runner.run_matrix(args.backend, args.adapter, args.check)
    print(runner.format_report(results))
    status = 1 if any(r.unexpected for r in results) else 0
    if args.json is not None and not write_json(args.json, runner.results_json(results), "results", args.overwrite):
        return 2
    return status


# --- unitrain compare --------------------------------------------------------------------


def cmd_compare(args) -> int:
    from . import multi_commands
    from .job import Job

    if multi_commands.wanted(args):
        return multi_commands.compare_command(args, _typed_run_settings(args))
    run, _ = _run_of(args)
    if args.print_recipe:
        print(run.to_toml(), end="")
        return 0
    if args.backends is None:
        backends = [name for name, spec in registry.backend_specs().items() if spec.installed()]
    else:
        backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if len(backends) < 2 or len(set(backends)) != len(backends):
        given = args.backends if args.backends is not None else ",".join(backends)
        raise UsageError(f"--backends needs two or more different backends, got {given!r}")
    job = Job(run, tensorboard=args.tensorboard, overwrite=args.overwrite, threads=args.threads,
              progress=args.progress, recipe=args.recipe)  # fmt: skip
    outcome = job.compare(backends, native=args.native, sample_every=args.sample_every, json=args.json,
                          report=args.report)  # fmt: skip
    return outcome.status


def _evaluation_run(args) -> Run:
    """The model and data ``evaluate``/``predict`` use: ``--recipe``'s, or ``--model`` and
    ``--dataset``'s (argparse leaves out those not typed)."""
    from .run import DataSpec, Run, load_recipe

    typed = [f"--{key.replace('_', '-')}" for key in ("model", "dataset", "data_dir") if hasattr(args, key)]
    if args.recipe is not None and typed:
        raise UsageError(f"{typed[0]} and --recipe exclude each other: the recipe names the model and data")
    data = DataSpec(dataset=getattr(args, "dataset", "mnist"), data_dir=getattr(args, "data_dir", None))
    try:  # checked here, not while parsing: with a --recipe of several models it names one of them
        model = model_name(getattr(args, "model", "mlp")) if args.recipe is None else None
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"argument --model: {error}") from None
    run = Run(model=model, data=data) if args.recipe is None else load_recipe(args.recipe)
    run.model_spec()  # its package.module:function imported before any data
    return run


# --- unitrain train ----------------------------------------------------------------------


def cmd_train(args) -> int:
    from . import multi_commands
    from .job import Job

    if multi_commands.wanted(args):  # a recipe of several models and optimizers (unitrain.multi_run)
        return multi_commands.train_command(args, _typed_run_settings(args))
    run, checkpoint = _run_of(args)
    job = Job(
        run, args.backend, resume=args.resume, checkpoint=checkpoint, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, keep=args.keep, save=args.save, metrics=args.metrics,
        plot=args.plot, tensorboard=args.tensorboard, overwrite=args.overwrite, nproc=args.nproc,
        master_port=args.master_port, threads=args.threads, progress=args.progress, recipe=args.recipe,
    )  # fmt: skip
    if args.print_recipe:
        print(job.run.to_toml(), end="")
        return 0
    return job.train().status


# --- unitrain plot -----------------------------------------------------------------------


def cmd_plot(args) -> int:
    from . import plot
    from .job import published

    files.check_output(args.output, "-o", args.overwrite, [("a metrics file to draw", path) for path in args.metrics])
    plot.require_matplotlib("unitrain plot")
    plot.check_figure_path("-o", args.output)
    runs = []
    for path in args.metrics:
        records = plot.read_metrics(path)
        backends = sorted({str(r["backend"]) for r in records if isinstance(r.get("backend"), str)})
        runs.append((f"{path} ({', '.join(backends)})" if backends else str(path), records))
    figure = plot.curves_figure(runs)
    final = files.publish(args.output, lambda staged: plot.save_figure(figure, staged, args.output.suffix),
                          overwrite=args.overwrite)  # fmt: skip
    if not published("-o", args.output, final, "figure", args.overwrite):
        return 2
    print(f"unitrain: drew {len(runs)} run{'s' if len(runs) > 1 else ''} in {final}")
    return 0


# --- unitrain evaluate / predict ---------------------------------------------------------------


def _read_weights(path: Path, model_name: str, flag: str = "--weights") -> dict:
    """A weights file checked against the model (from its header) before any framework is imported."""
    from .weights import check_state, load_safetensors

    shapes, name = model_from_name(model_name).state_shapes(), f"{flag} {path}"
    return load_safetensors(path, lambda declared: check_state(shapes, declared, name), name=name)[0]


def _loop_with_weights(args, run: Run):
    weights = _read_weights(args.weights, run.model)
    loop = registry.get_backend(args.backend)(run.model_spec(), loss=run.loop_options()["loss"])  # the run's loss
    loop.load_state_dict(weights, source=str(args.weights))
    return loop


def cmd_evaluate(args) -> int:
    from . import multi_commands

    if multi_commands.wanted(args):
        return multi_commands.evaluate_command(args)
    run = _evaluation_run(args)
    test = run.datasets()[2]
    loop = _loop_with_weights(args, run)
    metrics = loop.evaluate(test)
    parts = []
    if math.isfinite(metrics["accuracy"]):  # NaN: targets that are values
        counts = f"{metrics['num_correct']}/{metrics['num_samples']}"
        parts.append(f"test accuracy {100 * metrics['accuracy']:.2f}% ({counts})")
    parts.append(f"test loss {metrics['loss']:.4f}")
    if "mse" in metrics:
        parts.append(f"test mse {metrics['mse']:.4g}  test mae {metrics['mae']:.4g}")
    print(f"{args.weights} on {loop.name}: " + "  ".join(parts))
    return 0


def _read_png(path: Path, normalization) -> np.ndarray:
    """A 28x28 8-bit grayscale PNG as one normalised sample, shape (1, 1, 28, 28)."""
    import numpy as np

    if problem := path_problem(path, "a PNG file"):
        raise UsageError(f"--image {path} {problem}")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UsageError("--image needs Pillow: pip install pillow") from None
    try:
        with warnings.catch_warnings():
            # Pillow's guard stays on: over its pixel limit it warns, over twice the limit it raises
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                kind, mode, size = image.format, image.mode, image.size
                if kind == "PNG" and mode == "L" and size == (28, 28):  # decode only what is expected
                    pixels = np.asarray(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"--image {path} declares more pixels than Pillow decodes "
                         f"({Image.MAX_IMAGE_PIXELS}); expected 28x28") from None  # fmt: skip
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise UsageError(f"--image {path} is not a readable image: {str(error)[:200]}") from None
    if kind != "PNG":
        raise UsageError(f"--image {path} is a {kind} image, expected a PNG")
    if mode != "L":
        raise UsageError(f"--image {path} has mode {mode}, expected 8-bit grayscale (mode L), e.g. image.convert('L')")
    if size != (28, 28):
        raise UsageError(f"--image {path} is {size[0]}x{size[1]} pixels, expected 28x28")
    return normalization(pixels[None, None])  # exactly as the dataset's images


def cmd_predict(args) -> int:
    import numpy as np

    run = _evaluation_run(args)
    files.check_output(args.output, "--output", args.overwrite)
    test = run.datasets()[2]
    if args.image is not None:  # normalised, resized and padded as the run's samples
        image = _read_png(args.image, test.normalization)
        x, what = run.data.static_transforms(dataclasses.replace(test, x=image, y=test.y[:1])).x, str(args.image)
    loop = _loop_with_weights(args, run)
    if args.image is None:
        index = args.index or 0
        if index >= len(test):
            raise UsageError(f"--index {index} is out of range: the test set has {len(test)} images")
        x, what = test.x[index : index + 1], f"test image {index} (true label {test.y[index]})"
    if args.output is not None:
        outputs = loop.predict(test.x if args.image is None else x)

        def write(staged):
            with open(staged, "wb") as file:  # np.save given a path would add ".npy" to the staged name
                np.save(file, outputs)

        final = files.publish(args.output, write, overwrite=args.overwrite)
        print(f"unitrain: wrote the outputs, shape {outputs.shape}, to {final}")
    if run.data.task != "classification":  # values: the outputs themselves

        def shown(values):
            return np.array2string(np.asarray(values), precision=4, threshold=20)

        target = "" if args.image is not None else f"  target {shown(test.y[index])}"
        where = str(args.image) if args.image is not None else f"test sample {index}"
        print(f"{where}: outputs {shown(loop.predict(x)[0])}{target}")
        return 0
    logits = loop.predict(x)[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    label = int(probabilities.argmax())
    print(f"{what}: label {label} (probability {probabilities[label]:.4f})")
    print("  ".join(f"{digit}: {p:.4f}" for digit, p in enumerate(probabilities)))
    return 0
