"""Runs of several models from a recipe: ``unitrain train gan.toml``, ``compare``, ``evaluate``.

A recipe with a ``[models]`` table is a :class:`MultiRun`: named models, optimizers over them and
the phases of one :class:`~unitrain.steps.MultiStep`, written as text::

    seed = 999
    batch_size = 128
    epochs = 5                      # max_steps = N: stop earlier
    [data]                          # a DataSpec, as a one-model recipe's
    dataset = "mnist"
    normalize = {mean = [0.5], std = [0.5]}
    [models]                        # package.module:function (or a preset name), called once each
    generator = "examples.recipes.nets:dcgan_generator"
    discriminator = "examples.recipes.nets:dcgan_discriminator"
    [optimizers.optimizerD]         # a one-model recipe's [optimizer], and the models it updates
    type = "Adam"
    lr = 0.0002
    betas = [0.5, 0.999]
    models = ["discriminator"]
    [values]                        # named expressions, each one node of the step: computed once
    fake = "generator(normal(100, 1, 1))"
    [[phases]]                      # in order; each loss steps its optimizer
    name = "discriminator"
    loss = "bce(discriminator(batch), 1.0) + bce(discriminator(detach(fake)), 0.0)"
    optimizer = "optimizerD"
    [pictures]                      # optional: what --plot draws at each epoch's end
    samples = "generator(normal(100, 1, 1))"   # from noise drawn once: the same every epoch, on every backend
    count = 16

An expression is Python syntax over a closed vocabulary, read with :mod:`ast` and never run:
numbers, ``+ - * / **``, ``batch`` (the batch's images), the ``[values]`` defined above it, a
model's name called on expressions (``encoder(batch)[0]``: one output of a model with several),
``normal(*shape)`` / ``uniform(*shape)`` (per-sample noise from the step's seeded stream),
``detach``, ``bce(p, target, reduction="mean")``, ``exp``, ``log``, ``sqrt``, ``square``, ``abs``,
``maximum``, ``minimum``, and ``.sum()`` / ``.mean()``. Anything else is refused in one line.

The run trains its step over the training set's images (labels unused) in shuffled batches
(each epoch's order drawn from the seed and the epoch, so a resumed run sees the same batches;
the last partial batch is dropped), and checkpoints into ``--checkpoint-dir`` (one file,
replaced atomically, with the recipe, the step's whole state and the epoch's running sums:
:mod:`unitrain.step_checkpoints`) every ``--checkpoint-every`` steps (default: each epoch's end)
and at the end. ``--resume DIR`` continues it bit for bit on the same backend and machine.
``--metrics`` writes one JSON object per epoch (``<phase>_loss``: the phase's mean loss over the
epoch's steps), ``--plot`` the pictures of every epoch, ``--save DIR`` each model's weights as
``DIR/<model>.safetensors``.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import json
import math
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import expr, files, steps
from .data import DataError
from .layers.containers import physical_memory
from .reading import Closed, Int, ListOf, MapOf, OneOf, Optional, check_json, short
from .run import DataSpec, RunError, _check_fields, recipe_values
from .step_checkpoints import CHECKPOINT_FILE, StepCheckpoints
from .step_shapes import check_run_shapes

#: longest loss or value text a recipe may hold (a DCGAN's loss is under 100 characters)
MAX_EXPRESSION_CHARS = 2000
#: deepest nesting of an expression's syntax tree (a VAE's loss nests 12 deep)
MAX_EXPRESSION_DEPTH = 100
#: the functions an expression may call, besides the models
FUNCTIONS = {
    "normal": steps.normal, "uniform": steps.uniform, "detach": steps.detach, "bce": steps.bce,
    "exp": expr.exp, "log": expr.log, "sqrt": expr.sqrt, "square": expr.square, "abs": expr.abs,
    "maximum": expr.maximum, "minimum": expr.minimum,
}  # fmt: skip
_OPERATORS = {ast.Add: "__add__", ast.Sub: "__sub__", ast.Mult: "__mul__", ast.Div: "__truediv__",
              ast.Pow: "__pow__"}  # fmt: skip
#: pictures drawn per epoch when [pictures] sets no count
PICTURES = 16


def is_multi_recipe(path) -> bool:
    """Whether the recipe at ``path`` names several models (a ``[models]`` table); False for one
    that cannot be read, which the one-model path then reports."""
    try:
        return isinstance(recipe_values(path).get("models"), Mapping)
    except RunError:
        return False


def _expression_error(where: str, message: str) -> RunError:
    return RunError(f"{where}: {message}")


class _Reader:
    """Turns the text of an expression into a :class:`~unitrain.expr.Expr` (the module's doc)."""

    def __init__(self, outputs: Mapping[str, int], values: Mapping[str, expr.Expr]):
        self.outputs, self.values = outputs, values

    def read(self, text, where: str) -> expr.Expr:
        if not isinstance(text, str) or not text.strip():
            raise _expression_error(where, f"expected an expression as text, got {short(text)}")
        if len(text) > MAX_EXPRESSION_CHARS:
            raise _expression_error(where, f"{len(text)} characters; expected at most {MAX_EXPRESSION_CHARS}")
        try:
            tree = ast.parse(text.strip(), mode="eval").body
            if (depth := _depth(tree)) > MAX_EXPRESSION_DEPTH:  # refused whatever the interpreter's recursion limit
                raise _expression_error(where, f"nests {depth} deep; expected at most {MAX_EXPRESSION_DEPTH}")
            value = self._node(tree, where)
        except RunError:
            raise
        except SyntaxError as error:
            raise _expression_error(where, f"is not an expression: {error.msg}") from None
        except (RecursionError, MemoryError):
            raise _expression_error(where, "nests too deep") from None
        except (ValueError, TypeError) as error:  # the step's own one-line refusals (a bad noise shape, ...)
            raise _expression_error(where, str(error)) from None
        if isinstance(value, str) or not isinstance(value, expr.Expr | int | float):
            raise _expression_error(where, f"{short(text)} is not a tensor expression")
        return value if isinstance(value, expr.Expr) else expr.Expr(("const", float(value)))

    def _node(self, node, where):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "batch":
                return steps.batch()
            if node.id in self.values:
                return self.values[node.id]
            if node.id in self.outputs:
                raise _expression_error(where, f"model {node.id!r} must be called: {node.id}(...)")
            raise _expression_error(where, f"unknown name {node.id!r}; expected batch, a model "
                                           f"({', '.join(self.outputs)}), a value defined before it "
                                           f"({', '.join(self.values) or 'none'}) or a function")  # fmt: skip
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = self._tensor(node.left, where), self._tensor(node.right, where)
            if not isinstance(left, expr.Expr):
                left = expr.Expr(("const", float(left)))
            return getattr(left, _OPERATORS[type(node.op)])(right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = self._tensor(node.operand, where)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            call, index = node.value, node.slice.value
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in self.outputs):
                raise _expression_error(where, "only a model's call may be indexed: model(x)[i]")
            count = self.outputs[call.func.id]
            if type(index) is not int or not 0 <= index < count or count == 1:
                raise _expression_error(where, f"output {short(index)} of model {call.func.id!r}, which has {count}")
            return expr.Expr(("output", index, self._model_call(call, where).node))
        if isinstance(node, ast.Call):
            return self._call(node, where)
        raise _expression_error(where, f"{type(node).__name__} is not allowed here ({short(ast.unparse(node))}); "
                                       "see the expressions of unitrain.multi_run")  # fmt: skip

    def _tensor(self, node, where):
        value = self._node(node, where)
        if isinstance(value, str):
            raise _expression_error(where, f"the text {value!r} is not a number or tensor")
        return value

    def _model_call(self, node: ast.Call, where) -> expr.Expr:
        if node.keywords or not node.args:
            raise _expression_error(where, f"model {node.func.id!r} takes its inputs as positional arguments")
        inputs = [expr._operand(self._tensor(argument, where)) for argument in node.args]
        return expr.Expr(("call", node.func.id, *inputs))

    def _call(self, node: ast.Call, where):
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("sum", "mean") and not node.args:
            target = self._tensor(node.func.value, where)
            keywords = {keyword.arg: self._node(keyword.value, where) for keyword in node.keywords}
            if set(keywords) - {"axis"} or not isinstance(target, expr.Expr):
                raise _expression_error(where, f".{node.func.attr}() takes only axis=, of a tensor")
            return getattr(target, node.func.attr)(**keywords)
        if not isinstance(node.func, ast.Name):
            raise _expression_error(where, f"cannot call {short(ast.unparse(node.func))}; expected a model or "
                                           f"one of {', '.join(FUNCTIONS)}")  # fmt: skip
        name = node.func.id
        if name in self.outputs:
            if self.outputs[name] > 1:
                raise _expression_error(where, f"model {name!r} has {self.outputs[name]} outputs: pick one with "
                                               f"{name}(...)[i]")  # fmt: skip
            return self._model_call(node, where)
        if name not in FUNCTIONS:
            raise _expression_error(where, f"unknown function {name!r}; expected a model ({', '.join(self.outputs)}) "
                                           f"or one of {', '.join(FUNCTIONS)}")  # fmt: skip
        arguments = [self._node(argument, where) for argument in node.args]
        keywords = {keyword.arg: self._node(keyword.value, where) for keyword in node.keywords}
        if None in keywords:
            raise _expression_error(where, f"{name}(**...) is not allowed")
        if name in ("normal", "uniform"):
            if keywords:
                raise _expression_error(where, f"{name}() takes the per-sample shape as integers: {name}(100, 1, 1)")
            return FUNCTIONS[name](arguments)
        try:
            return FUNCTIONS[name](*arguments, **keywords)
        except TypeError as error:
            raise _expression_error(where, f"{name}(): {error}") from None


def _depth(tree: ast.AST) -> int:
    """How deep ``tree`` nests, without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _output_count(spec) -> int:
    return len(spec.outputs) if hasattr(spec, "outputs") else 1


_OPTIMIZER_SCHEMA = {"models": list}
_PICTURES_SCHEMA = {"samples": Optional(str), "reconstructions": Optional(str), "count": Optional(Int(1))}
_MULTI_SCHEMA = {
    "models": dict, "optimizers": dict, "phases": list, "values": Optional(dict), "pictures": Optional(dict),
    "data": Optional(dict), "batch_size": Optional(Int(1)), "epochs": Optional(Int(0)),
    "max_steps": Optional(Int(0)), "seed": Optional(Int(0)),
}  # fmt: skip


@dataclass(frozen=True)
class MultiRun:
    """A run of several models (the module's doc); :meth:`from_dict` checks a recipe's values."""

    models: Mapping[str, str]
    optimizers: Mapping[str, Mapping[str, Any]]
    phases: tuple[Mapping[str, str], ...]
    values: Mapping[str, str] = field(default_factory=dict)
    pictures: Mapping[str, Any] | None = None
    data: DataSpec = field(default_factory=DataSpec)
    batch_size: int = 64
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MultiRun:
        _check_fields(values, _MULTI_SCHEMA, "")
        values = dict(values)
        for name, model in values["models"].items():
            if not isinstance(model, str):
                raise RunError(f"models.{name}: expected package.module:function or a preset name, got {short(model)}")
        for name, options in values["optimizers"].items():
            if not isinstance(options, Mapping):
                raise RunError(f"optimizers.{name}: expected a table of the optimizer's type, arguments and models")
            try:
                check_json(dict(options), _OPTIMIZER_SCHEMA, f"optimizers.{name}")
            except ValueError as error:
                raise RunError(str(error)) from None
        for index, phase in enumerate(values["phases"]):
            _check_fields(phase, {"name": str, "loss": str, "optimizer": Optional(str)}, f"phases[{index}]")
        if values.get("pictures") is not None:
            _check_fields(values["pictures"], _PICTURES_SCHEMA, "pictures")
        if "data" in values:
            values["data"] = DataSpec.from_dict(values["data"])
        values["phases"] = tuple(values["phases"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self) | {"data": self.data.to_dict(), "phases": [dict(p) for p in self.phases]}
        return {key: value for key, value in values.items() if value not in (None, {})}

    def replace(self, **changes) -> MultiRun:
        return dataclasses.replace(self, **changes)

    def model_specs(self) -> dict[str, Any]:
        from .layers import model_from_name

        specs = {}
        for name, model in self.models.items():
            try:
                specs[name] = model_from_name(model)
            except ValueError as error:
                raise RunError(f"models.{name}: {error}") from None
        return specs

    def build(self) -> tuple[steps.MultiStep, dict[str, expr.Expr]]:
        """The step, and the pictures' expressions (``samples``, ``reconstructions``)."""
        from .optim import optimizer_from_config

        specs = self.model_specs()
        reader = _Reader({name: _output_count(spec) for name, spec in specs.items()}, {})
        phases = [steps.Phase(phase["name"], loss, phase.get("optimizer"))
                  for phase, loss in zip(self.phases, self.read_losses(reader), strict=True)]  # fmt: skip
        optimizers = {}
        for name, options in self.optimizers.items():
            config = {key: value for key, value in options.items() if key != "models"}
            try:
                optimizers[name] = steps.OptimizerOver(optimizer_from_config(config), options["models"])
            except ValueError as error:
                raise RunError(f"optimizers.{name}: {error}") from None
        try:
            step = steps.MultiStep(models=specs, optimizers=optimizers, phases=phases)
        except (ValueError, TypeError) as error:
            raise RunError(str(error)) from None
        pictures = {key: reader.read(text, f"pictures.{key}") for key, text in (self.pictures or {}).items()
                    if key in ("samples", "reconstructions")}  # fmt: skip
        _check_noise_size(steps.noise_leaves(phase.loss for phase in step.phases), self.batch_size, "phases")
        count = (self.pictures or {}).get("count", PICTURES)
        _check_noise_size(steps.noise_leaves(e.node for e in pictures.values()), count, "pictures")
        return step, pictures

    def read_losses(self, reader: _Reader) -> list[expr.Expr]:
        """Each phase's loss, read with ``reader`` after the ``[values]`` (whose noise is drawn first)."""
        named = {}
        for name, text in self.values.items():
            if not name.isidentifier() or name == "batch" or name in reader.outputs or name in FUNCTIONS:
                raise RunError(f"values.{name}: a value's name must be an identifier that is no model, function "
                               "or 'batch'")  # fmt: skip
            named[name] = reader.read(text, f"values.{name}")
            reader.values = named
        return [reader.read(phase["loss"], f"phases[{index}].loss") for index, phase in enumerate(self.phases)]

    def datasets(self):
        """``(train, test)``: the data's images, transformed as the recipe's ``[data]`` says."""
        from .datasets import load_datasets

        spec = self.data
        if spec.task != "classification" or spec.val_split:
            raise RunError("data: a multi-model run reads images only: no task or val_split")
        train, test = load_datasets(spec.dataset, data_dir=spec.data_dir, normalization=spec.normalize)
        train, test = spec.static_transforms(train), spec.static_transforms(test)
        if len(train) < self.batch_size:
            raise DataError(f"batch_size {self.batch_size}: the training set has {len(train)} samples")
        return train, test

    def total_steps(self, samples: int) -> int:
        steps_in_all = samples // self.batch_size * self.epochs
        return steps_in_all if self.max_steps is None else min(steps_in_all, self.max_steps)

    def settings(self) -> dict:
        """What a resumed run must share with the checkpointed one (where it ends may change)."""
        return {key: value for key, value in self.to_dict().items() if key not in ("epochs", "max_steps")}


def batch_order(seed: int, epoch: int, samples: int) -> np.ndarray:
    """The samples' order in ``epoch``: from the seed and the epoch alone, so a resume sees it too."""
    return np.random.default_rng([seed, epoch]).permutation(samples)


def forward(root: expr.Expr, loops: Mapping[str, Any], x, noise: Mapping) -> np.ndarray:
    """``root``'s value with the models in eval mode (``predict``), no gradient: pictures, evaluate."""
    return forward_all([root], loops, x, noise)[root.node]


def forward_all(roots: Sequence[expr.Expr], loops: Mapping[str, Any], x, noise: Mapping) -> dict:
    """Every node's value under ``roots`` (each computed once), as :func:`forward`'s."""
    values = {}
    for node in steps.postorder([root.node for root in roots]):
        op, children, static = steps.split(node)
        arguments = [values[child] for child in children]
        if op == "batch":
            values[node] = x
        elif op == "noise":
            values[node] = noise[node]
        elif op == "detach":
            values[node] = arguments[0]
        elif op == "call":
            values[node] = loops[static["model"]].predict(arguments[0] if len(arguments) == 1 else tuple(arguments))
        elif op == "output":
            values[node] = arguments[0][static["index"]]
        elif op == "const":
            values[node] = np.float32(static["value"])
        else:
            values[node] = np.asarray(expr.NUMPY_OPS[op][0](*arguments, **static), np.float32)
    return values


def _check_noise_size(leaves, samples: int, where: str) -> None:
    """RunError, before anything is drawn, when ``samples`` draws of the noise ``leaves`` would not fit
    in this machine's memory (NumPy draws them in float64)."""
    per_sample = sum(math.prod(leaf[3]) for leaf in leaves)
    needed, memory = 8 * samples * per_sample, physical_memory()
    if memory is not None and needed > memory:
        raise RunError(f"{where}: its noise is {per_sample:,} values a sample, {needed / 2**30:,.1f} GiB for "
                       f"{samples:,} samples; this machine has {memory / 2**30:,.1f} GiB of memory")  # fmt: skip


class Pictures:
    """What ``--plot`` draws at each epoch's end: ``samples`` from noise drawn once (from the seed),
    ``reconstructions`` of the first test images; as 8-bit images in [0, 1] (un-normalised)."""

    def __init__(self, run: MultiRun, expressions: Mapping[str, expr.Expr], test):
        self.expressions = expressions
        self.count = (run.pictures or {}).get("count", PICTURES)
        norm = test.normalization
        self.mean, self.std = (
            (np.float32(0), np.float32(1))
            if norm is None
            else (
                np.asarray(norm.mean, np.float32).reshape(-1, 1, 1),
                np.asarray(norm.std, np.float32).reshape(-1, 1, 1),
            )
        )
        self.inputs = test.x[: self.count]
        leaves = steps.noise_leaves(e.node for e in expressions.values())
        self.noise = steps.NoiseStream(run.seed).draw(leaves, self.count, np.float32)

    def images(self, values) -> np.ndarray:
        return np.clip(np.asarray(values, np.float32) * self.std + self.mean, 0, 1)

    def draw(self, loops) -> dict[str, str]:
        """This epoch's pictures, each as base64 of 8-bit pixels (small enough for a checkpoint)."""
        drawn = {}
        for name, expression in self.expressions.items():
            pixels = np.round(self.images(forward(expression, loops, self.inputs, self.noise)) * 255).astype(np.uint8)
            drawn[name] = json.dumps([list(pixels.shape), base64.b64encode(pixels.tobytes()).decode()])
        return drawn

    def figure(self, labelled: Sequence[tuple[str, Mapping[str, str]]]):
        """One row per ``(label, drawn)``: an epoch's, or a backend's, samples and reconstructions
        (the test images first when reconstructed)."""
        from . import plot

        rows = []
        for label, drawn in labelled:
            row = [("test images", self.images(self.inputs))] if "reconstructions" in drawn else []
            for name, text in drawn.items():
                shape, data = json.loads(text)
                row.append((f"{label}: {name}", np.frombuffer(base64.b64decode(data), np.uint8)
                            .reshape(shape) / 255.0))  # fmt: skip
            rows.append(row)
        figure, axes = plot._figure(len(rows), len(rows[0]), width=3.0, height=0.6 + 3.0 * -(-self.count // 8) / 8)
        for axes_row, row in zip(axes, rows, strict=True):
            for ax, (title, images) in zip(axes_row, row, strict=True):
                ax.imshow(_grid(images), cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
        return figure


def _grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    images = images.reshape(len(images), *images.shape[-2:])
    height, width = images.shape[1:]
    rows = -(-len(images) // columns)
    grid = np.ones((rows * (height + 2) + 2, columns * (width + 2) + 2))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[2 + row * (height + 2) : 2 + row * (height + 2) + height,
             2 + column * (width + 2) : 2 + column * (width + 2) + width] = image  # fmt: skip
    return grid


class RunCheckpoints(StepCheckpoints):
    """:class:`~unitrain.step_checkpoints.StepCheckpoints` that also keep the recipe and the
    epoch's running record (losses summed so far, earlier epochs' records and pictures)."""

    def __init__(self, run: MultiRun, directory, every, *, resume=False, keep=1):
        super().__init__(directory, every, run.settings(), resume=resume, keep=keep)
        self.run, self.progress = run, {"sums": {}, "steps": 0, "records": [], "pictures": []}
        # what unitrain.checkpoint.stop_on_signals sets on Ctrl-C, SIGTERM or a launcher's SIGUSR1
        self.stop_requested, self.stop_signal = False, None

    def remaining(self, loop, max_steps):
        left = super().remaining(loop, max_steps)
        if self.resume:
            self.progress = _checked_progress(self.metadata.get("progress"), self.path)
        return left

    def after_step(self, loop, last):
        if self.path is not None and (last or self.stop_requested or loop.step_count % self.every == 0):
            self.save(
                loop,
                {
                    "settings": json.dumps(self.settings),
                    "multi_run": json.dumps(self.run.to_dict()),
                    "progress": json.dumps(self.progress),
                },
            )


class _Float:
    """A number, NaN and infinities included (a diverged loss is still a record)."""

    def describe(self) -> str:
        return "a number"

    def accepts(self, value) -> bool:
        return type(value) in (float, int)


_PROGRESS = Closed({"sums": MapOf(str, _Float()), "steps": Int(), "records": ListOf(MapOf(str, _Float()), 0, 10**6),
                    "pictures": ListOf(MapOf(OneOf(("samples", "reconstructions")), str), 0, 10**6)})  # fmt: skip


def _checked_progress(text, path) -> dict:
    """A checkpoint's record of the epoch in progress, refused (CheckpointError) unless it is the
    shape :class:`RunCheckpoints` writes, its pictures 8-bit images of their stated shapes."""
    from .checkpoint import CheckpointError

    try:
        progress = json.loads(text)
        check_json(progress, _PROGRESS, "progress")
        for drawn in progress["pictures"]:
            for value in drawn.values():
                shape, data = json.loads(value)
                if not (isinstance(shape, list) and 3 <= len(shape) <= 4):
                    raise ValueError(f"a picture of shape {short(shape)}; expected (N, C, H, W) or (N, H, W)")
                np.frombuffer(base64.b64decode(data, validate=True), np.uint8).reshape(shape)
    except (TypeError, ValueError, RecursionError) as error:  # not JSON, another shape, pixels that do not fit
        raise CheckpointError(f"--resume: {path} holds no multi-model run's progress: {str(error)[:200]}") from None
    return progress


def resumed_run(directory: Path) -> MultiRun:
    """The run a multi-model checkpoint directory records (RunError if it is not one)."""
    from .weights import WeightsError, load_safetensors

    path = Path(directory) / CHECKPOINT_FILE
    try:
        recorded = json.loads(load_safetensors(path)[1].get("multi_run", "null"))
        return MultiRun.from_dict(recorded)
    except (ValueError, RecursionError, WeightsError) as error:
        raise RunError(f"--resume {directory}: {path} records no multi-model run: {str(error)[:200]}") from None


@dataclass
class MultiJob:
    """A :class:`MultiRun` on a backend with its outputs: what ``unitrain train`` does with it."""

    run: MultiRun
    backend: str | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    save: Path | None = None
    metrics: Path | None = None
    plot: Path | None = None
    overwrite: bool = False
    #: a rank of a data-parallel job (its launcher started it): rank 0 alone writes and prints
    distributed: bool = False
    #: event files of each step's and epoch's losses (:class:`~unitrain.extensions.PhaseTensorBoardWriter`)
    tensorboard: Path | None = None
    #: how many of the newest checkpoints stay (:class:`~unitrain.step_checkpoints.StepCheckpoints`)
    keep: int = 3
    #: a progress bar on stderr (None: when stderr is a terminal)
    progress: bool | None = None

    def check(self) -> None:
        from . import plot
        from .extensions import check_tensorboard_dir

        files.check_output(self.metrics, "--metrics", self.overwrite)
        if self.tensorboard is not None:
            check_tensorboard_dir(self.tensorboard, "--tensorboard")
        files.check_output(self.plot, "--plot", self.overwrite)
        if self.plot is not None:
            plot.require_matplotlib("--plot")
            plot.check_figure_path("--plot", self.plot)
            if not self.run.pictures:
                raise RunError('--plot draws the recipe\'s [pictures]: add samples = "model(normal(...))" there')
        if self.save is not None:
            files.check_output_dir(self.save, "--save", self.overwrite)

    def train(self) -> tuple[steps.MultiModelLoop, list[dict], int]:
        """Train; returns the loop, the epochs' records and the exit status: 0, or 128 + N when
        signal N (Ctrl-C, SIGTERM) stopped the run at a step boundary, checkpointed into
        ``--checkpoint-dir`` if there is one."""
        from .checkpoint import stop_on_signals
        from .extensions import MetricsWriter
        from .registry import get_backend

        if not self.distributed:  # a launched job's ranks: rank 0 alone, below (the outputs are its own)
            self.check()
        step, expressions = self.run.build()
        train, test = self.run.datasets()
        check_run_shapes(self.run, step, expressions, train.x.shape[1:])  # before anything is written
        backend = get_backend(self.backend).name
        try:
            loop = steps.MultiModelLoop(step, backend, seed=self.run.seed, distributed=self.distributed)
        except ValueError as error:  # a backend without the capability; data parallel: a loss no split computes
            raise RunError(str(error)) from None
        if loop.world_size > self.run.batch_size:
            raise RunError(f"batch_size {self.run.batch_size}: {loop.world_size} processes need a row each")
        per_epoch, total = len(train) // self.run.batch_size, self.run.total_steps(len(train))
        if total < 1:
            raise RunError(f"epochs {self.run.epochs}, max_steps {self.run.max_steps}: no step to train")
        every = self.checkpoint_every or per_epoch
        checkpoints = RunCheckpoints(self.run, self.checkpoint_dir, every, resume=self.resume, keep=self.keep)
        pictures = Pictures(self.run, expressions, test) if expressions else None
        lead = loop.rank == 0  # the one that writes: checkpoints, metrics, pictures, weights, lines
        if self.distributed and lead:
            self.check()
        writer = MetricsWriter(self.metrics, {"backend": backend}, self.overwrite) if self.metrics and lead else None
        extensions = self._extensions(per_epoch) if lead else []
        order, progress, stopped = None, checkpoints.progress, False

        def notice():
            if lead:
                print("\nunitrain: stopping at the next step boundary (Ctrl-C again to abort)", file=sys.stderr,
                      flush=True)  # fmt: skip

        with checkpoints.held() if lead else contextlib.nullcontext(), stop_on_signals(checkpoints, notice):
            # announced once a stop signal would checkpoint: from here, Ctrl-C stops at a step boundary
            if lead:
                print(f"unitrain: {', '.join(self.run.models)} on {backend}: {total} steps of {self.run.batch_size}"
                      f"{f' over {loop.world_size} processes' if loop.world_size > 1 else ''}, phases "
                      f"{', '.join(p['name'] for p in self.run.phases)}", flush=True)  # fmt: skip
            for index in checkpoints.remaining(loop, total):
                epoch, position = divmod(index, per_epoch)
                if order is None or position == 0:
                    order = batch_order(self.run.seed, epoch, len(train))
                    for extension in extensions:
                        extension.on_epoch_start(loop, epoch)
                rows = order[position * self.run.batch_size : (position + 1) * self.run.batch_size]
                losses = loop.step(train.x[rows])
                for extension in extensions:
                    extension.on_step_end(loop, position, losses)
                progress = checkpoints.progress
                for phase, value in losses.items():
                    progress["sums"][phase] = progress["sums"].get(phase, 0.0) + value
                progress["steps"] += 1
                ended = position == per_epoch - 1
                if ended or index == total - 1:  # a run ending mid-epoch reports it, and its checkpoint keeps the sums
                    means = {f"{phase}_loss": value / progress["steps"] for phase, value in progress["sums"].items()}
                    record, drawn = {"epoch": epoch + 1, "step": index + 1, **means}, []
                    if pictures is not None and lead:
                        drawn = [pictures.draw(loop.loops)]
                    if ended:
                        progress.update(sums={}, steps=0, records=[*progress["records"], record],
                                        pictures=[*progress["pictures"], *drawn])  # fmt: skip
                    for extension in [*extensions, *([writer] if writer is not None else [])]:
                        extension.on_epoch_end(loop, record)  # the progress bar first goes: the line replaces it
                    if lead:
                        print("  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                                        for key, value in record.items()), flush=True)  # fmt: skip
                stopped = checkpoints.stop_requested = loop.any_rank(checkpoints.stop_requested)  # all ranks at once
                if lead:
                    checkpoints.after_step(loop, last=index == total - 1)
                if stopped and index < total - 1:
                    break
        for extension in extensions:
            extension.finalize(loop)
        if writer is not None:
            writer.finalize(loop)
            print(f"unitrain: wrote the metrics to {writer.path}")
        if stopped and index < total - 1:
            if lead:
                where = (
                    f"checkpoint in {checkpoints.path}" if checkpoints.path else "no --checkpoint-dir, no checkpoint"
                )
                print(f"unitrain: stopped at step {loop.step_count}; {where}", file=sys.stderr, flush=True)
            return loop, progress["records"], 128 + (checkpoints.stop_signal or signal.SIGINT)
        partial = not ended
        if lead:
            self._publish(loop, pictures, progress["pictures"] + (drawn if partial else []))
        if loop.world_size > 1:  # the ranks end together, after rank 0's files
            loop.any_rank(False)
        return loop, progress["records"] + ([record] if partial else []), 0

    def _extensions(self, per_epoch: int) -> list:
        """Rank 0's progress bar and TensorBoard writer, as ``fit`` drives a one-model run's."""
        from .extensions import PhaseProgressBar, PhaseTensorBoardWriter

        chosen = []
        if sys.stderr.isatty() if self.progress is None else self.progress:
            chosen.append(PhaseProgressBar())
            chosen[-1].on_fit_start(None, {"steps_per_epoch": per_epoch})
        if self.tensorboard is not None:
            chosen.append(PhaseTensorBoardWriter(self.tensorboard))
        return chosen

    def _publish(self, loop, pictures, drawn: list) -> None:
        from . import plot

        if self.save is not None:
            self.save.mkdir(parents=True, exist_ok=True)
            for name, model in loop.loops.items():
                final = files.publish(self.save / f"{name}.safetensors", model.save_weights, overwrite=self.overwrite)
                print(f"unitrain: saved {name}'s weights to {final}")
        if self.plot is not None and drawn:
            figure = pictures.figure([(f"epoch {number}", epoch) for number, epoch in enumerate(drawn, 1)])
            final = files.publish(self.plot, lambda staged: plot.save_figure(figure, staged, self.plot.suffix),
                                  overwrite=self.overwrite)  # fmt: skip
            print(f"unitrain: drew the pictures of {len(drawn)} epoch{'s' * (len(drawn) > 1)} in {final}")


def histories_of(run: MultiRun, backends: Sequence[str]) -> tuple[dict[str, list[dict[str, float]]], dict]:
    """Each backend's losses at every step, from the same weights, batches and noise (``compare``),
    and its pictures at the end (empty without ``[pictures]``)."""
    step, expressions = run.build()
    train, test = run.datasets()
    check_run_shapes(run, step, expressions, train.x.shape[1:])
    pictures = Pictures(run, expressions, test) if expressions else None
    per_epoch, total = len(train) // run.batch_size, run.total_steps(len(train))
    histories, drawn = {}, {}
    for backend in backends:
        loop = steps.MultiModelLoop(step, backend, seed=run.seed)
        history = []
        for index in range(total):
            epoch, position = divmod(index, per_epoch)
            rows = batch_order(run.seed, epoch, len(train))[position * run.batch_size :][: run.batch_size]
            history.append(loop.step(train.x[rows]))
        histories[backend] = history
        if pictures is not None:
            drawn[backend] = pictures.draw(loop.loops)
    return histories, (pictures, drawn)


def test_losses(run: MultiRun, loops: Mapping[str, Any], test, batch_size: int = 1000) -> dict[str, float]:
    """Each phase's loss over the test set with the models in eval mode, no update (noise from the
    run's seed): a mean over the batch averaged over the test set, a sum over it per test sample
    (the VAE's, as PyTorch's example prints it; :func:`batch_share`)."""
    step, _ = run.build()
    stream, sums = steps.NoiseStream(run.seed), {}
    for start in range(0, len(test), batch_size):
        x = test.x[start : start + batch_size]
        noise = stream.draw(step.noise, len(x), np.float32)
        for phase in step.phases:
            value = float(forward(expr.Expr(phase.loss), loops, x, noise))
            sums[phase.name] = sums.get(phase.name, 0.0) + value * batch_share(phase.loss, len(x))
    return {name: total / len(test) for name, total in sums.items()}


def batch_share(loss: steps.Node, samples: int) -> int:
    """A test batch's weight in a figure over the test set that is divided by its size: the batch's
    size for a loss that is a mean over the batch, 1 for a sum over it (the figure is then per
    sample); the size for a loss that is neither (:func:`unitrain.steps.batch_weighting`)."""
    try:
        return 1 if steps.batch_weighting(loss) == "sum" else samples
    except ValueError:
        return samples


def load_multi_recipe(path) -> MultiRun:
    """The multi-model run a recipe file describes (RunError naming the file and the field)."""
    values = recipe_values(path)
    try:
        run = MultiRun.from_dict(values)
        run.build()  # its models imported and its expressions read before any data
    except RunError as error:
        raise RunError(f"recipe {path}: {error}") from None
    return run
