"""A multi-model step's batch, and the shapes the step computes from it, checked before any backend
runs a phase: a batch that is not one finite numeric array (several arrays, strings, NaN, no
rows), or a model called on a value of another shape (noise of the wrong size, a discriminator
given the noise instead of the images), is one line naming what was given and what was
expected, where the backend's own error came from deep inside its layers as a traceback, or
the step trained on it silently."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from . import expr
from .expr import Node
from .input_checks import InputError, norm_problem, several_arrays, smallest_norm
from .steps import BATCH, MultiStep, data_arguments, postorder, split

#: a value's shape and where its batch axis is (None: reduced away); a call of a model with
#: several outputs is ``("outputs", (samples, per-sample shapes))``; None: not known here
Value = tuple | None


def checked_batch(x, dtype: np.dtype, step: MultiStep, readers: Mapping) -> np.ndarray:
    """``x`` as the one array of ``dtype`` that ``batch`` stands for in ``step``'s losses (int64
    token ids when the models reading it start with an Embedding), or InputError: several
    arrays (a tuple, a dict, a list of arrays: ``batch`` is one value, and no loss can take one of
    several apart), a value that is no numeric array of shape (N, ...) with N >= 1, or one that is
    not finite in ``dtype``. ``readers``: the loops of the models called on the batch itself, by name, whose
    own checks name what their model expects (its width, token ids within its table)."""
    one = "a multi-model step's batch is one array of shape (N, ...) (`batch` in its losses); got "
    if isinstance(x, tuple | Mapping):
        shapes = [np.shape(part) for part in (x.values() if isinstance(x, Mapping) else x)]
        raise InputError(f"{one}a {type(x).__name__} of {len(shapes)} values of shapes {', '.join(map(str, shapes))}")
    if several := several_arrays(x):  # a list of plain rows is the array of those rows, as for one model
        raise InputError(f"{one}{several} (np.stack them if they are its rows)")
    try:
        array = np.asarray(x)
    except ValueError:  # rows of different lengths
        raise InputError(f"the batch must be one array of shape (N, ...); got a {type(x).__name__} of rows "
                         "of different shapes") from None  # fmt: skip
    if array.dtype.kind not in "fiu":
        raise InputError(f"the batch must be numeric, got dtype {array.dtype}")
    if array.ndim < 2:
        raise InputError(f"the batch must be of shape (N, ...), got shape {array.shape}")
    if not len(array):  # a mean over it would divide by zero
        raise InputError("a batch must hold at least one sample, got 0")
    checked = {name: loop._check_x(array) for name, loop in readers.items()}
    if ids := [name for name, loop in readers.items() if loop._embedding is not None]:
        if other := _value_use(step, ids):
            raise InputError(f"model {ids[0]!r} takes the batch as token ids (it starts with an Embedding), but "
                             f"{other} uses it as values; a step's batch is one or the other")  # fmt: skip
        return checked[ids[0]]
    with np.errstate(over="ignore"):  # an overflow is refused below, in words
        array = array.astype(dtype, copy=False)
    # the readers' own checks refused NaN already (in the same dtype): once a step is enough
    if not readers and not np.isfinite(array).all():  # after the cast: 1e39 is no float32
        raise InputError(f"the batch contains NaN or infinite values (in {np.dtype(dtype)})")
    return array


def _value_use(step: MultiStep, token_readers: Sequence[str]) -> str | None:
    """Where a phase of ``step`` uses the batch other than as the token ids of ``token_readers``."""
    models = dict(step.models)
    for phase in step.phases:
        for node in postorder([phase.loss]):
            op, children, static = split(node)
            if BATCH not in children:
                continue
            reads = op == "call" and static["model"] in token_readers
            if not reads or data_arguments(models[static["model"]], children) != BATCH:
                where = f"model {static['model']!r}" if op == "call" else f"its {op}"
                return f"phase {phase.name!r} ({where})"
    return None


def check_step_shapes(step: MultiStep, batch_shape, training: bool = True, world_size: int = 1) -> None:
    """InputError unless every phase of ``step`` fits a batch of shape ``batch_shape`` (its
    samples first): each model call gets per-sample inputs of the shapes the model takes (in
    ``training``, more than one value per channel at each BatchNorm, as PyTorch, on each of
    ``world_size`` data-parallel processes' rows), and every operation's operands broadcast (as a
    CustomLoss's, never the samples of one against another axis of the other)."""
    if batch_shape[0] < world_size:  # a mean over a rank's no rows: NaN
        raise InputError(f"a batch of {batch_shape[0]} over {world_size} processes leaves a process without rows; "
                         f"use batches of {world_size} or more")  # fmt: skip
    _step_values(step, batch_shape, training, world_size)


def node_shapes(step: MultiStep, batch_shape) -> dict[Node, tuple]:
    """The shape of each node of ``step``'s phases on a batch of shape ``batch_shape`` (a tuple of
    shapes for a call's several outputs; None where not known), as :func:`check_step_shapes`
    checks them: what a backend that draws a call's dropout masks before running its graph
    (MindSpore's) needs."""
    return {node: _shape(value) for node, value in _step_values(step, batch_shape).items()}


def _step_values(step: MultiStep, batch_shape, training: bool = False, world_size: int = 1) -> dict[Node, Value]:
    models, batch = dict(step.models), (tuple(batch_shape), 0)
    values: dict[Node, Value] = {}
    for phase in step.phases:
        try:
            _evaluate(phase.loss, models, batch, values)
            if training:
                _check_norms(phase.loss, models, values, world_size)
        except ValueError as error:
            raise InputError(f"phase {phase.name!r}: {error}") from None
    return values


def _check_norms(root: Node, models: Mapping, values: Mapping[Node, Value], world_size: int) -> None:
    """ValueError for a call that BatchNorm cannot normalise in training (PyTorch raises inside its
    layer, Chainer trains on it silently): one sample where a channel holds one value."""
    for node in postorder([root]):
        operands = [values[argument] for argument in node[2:]] if node[0] == "call" else [None]
        if None in operands or any(operand[0] == "outputs" for operand in operands):
            continue
        model, per_sample = models[node[1]], [shape[1:] for shape, _ in operands]
        per_sample = per_sample[0] if len(per_sample) == 1 else per_sample
        norm = smallest_norm(model, model.leaf_input_shapes(per_sample))
        if problem := norm_problem(norm, operands[0][0][0], world_size):
            raise ValueError(f"model {node[1]!r}: {problem}")


def _shape(value: Value) -> tuple | None:
    if value is None:
        return None
    if value[0] == "outputs":
        samples, outputs = value[1]
        return tuple((samples, *output) for output in outputs)
    return value[0]


def _evaluate(root: Node, models: Mapping, batch: Value, values: dict[Node, Value]) -> Value:
    """The value of ``root``, each node of its tree not in ``values`` yet added to it, children first."""
    for node in postorder([root]):
        if node not in values:
            values[node] = _value(node, [values[child] for child in split(node)[1]], models, batch)
    return values[root]


def _value(node: Node, operands: list[Value], models: Mapping, batch: Value) -> Value:
    op, _, static = split(node)
    if op == "batch":
        return batch
    if op == "noise":
        return (batch[0][0], *static["shape"]), 0
    if op == "const":
        return (), None
    if op == "output":
        if operands[0] is None:
            return None
        _, (samples, outputs) = operands[0]
        return (samples, *outputs[static["index"]]), 0
    if None in operands or any(operand[0] == "outputs" for operand in operands):
        return None  # a multi-output call used whole is refused when the step is built
    if op == "detach":
        return operands[0]
    if op == "call":
        return _call(static["model"], models[static["model"]], operands)
    return expr.operation_shape(op, static, operands)


def _call(name: str, model, operands: list) -> Value:
    noise = getattr(model, "noise", ())
    if noise and len(operands) < len(model.inputs):  # its noise not lifted into the call (a picture's)
        return None
    for shape, batch_axis in operands:
        if batch_axis != 0:
            where = "no samples axis" if batch_axis is None else f"its samples on axis {batch_axis}"
            raise ValueError(f"model {name!r} is given a value of shape {shape} with {where}; expected its "
                             "samples first")  # fmt: skip
    per_sample = [shape[1:] for shape, _ in operands]
    try:
        output = model.output_shape(per_sample[0] if len(per_sample) == 1 else per_sample)
    except ValueError as error:
        raise ValueError(f"model {name!r}: {error}") from None
    samples = operands[0][0][0]
    if output and isinstance(output[0], tuple):
        return "outputs", (samples, output)
    return (samples, *output), 0


def check_picture_shapes(pictures: Mapping[str, expr.Expr], models: Mapping, batch_shape) -> None:
    """RunError, before any training, unless each expression of a recipe's ``[pictures]`` fits
    the models and gives grayscale images, ``(N, H, W)`` or ``(N, 1, H, W)`` (what ``--plot``
    draws): a wrong one was found only at the first epoch's end, its training lost."""
    from .run import RunError

    batch = (tuple(batch_shape), 0)
    for key, expression in pictures.items():
        try:
            value = _evaluate(expression.node, models, batch, {})
        except ValueError as error:
            raise RunError(f"pictures.{key}: {error}") from None
        if value is None:
            continue
        shape, batch_axis = value
        if shape == "outputs" or batch_axis != 0 or len(shape) < 3 or math.prod(shape[1:-2]) != 1:
            raise RunError(f"pictures.{key}: gives values of shape {batch_axis if shape == 'outputs' else shape}; "
                           "expected grayscale images, (N, H, W) or (N, 1, H, W)")  # fmt: skip


def check_run_shapes(run, step: MultiStep, pictures: Mapping[str, expr.Expr], sample_shape,
                     training: bool = True, world_size: int = 1) -> None:  # fmt: skip
    """RunError, before a multi-model run writes anything (its metrics file, a checkpoint), unless
    its phases fit batches of the data's samples (:func:`check_step_shapes`) and its pictures are
    images (:func:`check_picture_shapes`)."""
    from .multi_run import PICTURES
    from .run import RunError

    try:
        check_step_shapes(step, (run.batch_size, *sample_shape), training, world_size)
    except InputError as error:
        raise RunError(str(error)) from None
    count = (run.pictures or {}).get("count", PICTURES)
    check_picture_shapes(pictures, dict(step.models), (count, *sample_shape))
