"""The recipe of a run of several models (``unitrain train gan.toml``, ``compare``, ``evaluate``):
its tables checked, its expressions read, its step built; :mod:`unitrain.multi_run` trains it.

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
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import expr, steps
from .data import DataError
from .layers.containers import physical_memory
from .reading import Int, Optional, check_json, short
from .run import DataSpec, RunError, _check_fields, recipe_values

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
                                       "see the expressions of unitrain.multi_recipe")  # fmt: skip

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


def _check_noise_size(leaves, samples: int, where: str) -> None:
    """RunError, before anything is drawn, when ``samples`` draws of the noise ``leaves`` would not fit
    in this machine's memory (NumPy draws them in float64)."""
    per_sample = sum(math.prod(leaf[3]) for leaf in leaves)
    needed, memory = 8 * samples * per_sample, physical_memory()
    if memory is not None and needed > memory:
        raise RunError(f"{where}: its noise is {per_sample:,} values a sample, {needed / 2**30:,.1f} GiB for "
                       f"{samples:,} samples; this machine has {memory / 2**30:,.1f} GiB of memory")  # fmt: skip


def load_multi_recipe(path) -> MultiRun:
    """The multi-model run a recipe file describes (RunError naming the file and the field)."""
    values = recipe_values(path)
    try:
        run = MultiRun.from_dict(values)
        run.build()  # its models imported and its expressions read before any data
    except RunError as error:
        raise RunError(f"recipe {path}: {error}") from None
    return run
