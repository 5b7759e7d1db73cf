"""The training loop's side of graphs with several inputs or outputs (:mod:`unitrain.graph`).

A batch's ``x`` for several inputs is a tuple in the graph's input order or a dict by input name,
each array ``(N, *that input's shape)``; predictions of several outputs are a tuple of arrays; the
targets ``y`` a tuple with one array per output, each checked against its own loss of a
:class:`~unitrain.losses.PerOutputLoss`. One input and one output take the plain-array path of
:class:`~unitrain.loop.TrainingLoop` unchanged; these functions run only for the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from . import expr, padded
from .graph import Graph, get_submodule
from .layers import Container
from .losses import CustomLoss, PerOutputLoss

if TYPE_CHECKING:
    from .data import ArrayDataset
    from .loop import TrainingLoop


def check_model(loop: TrainingLoop, model, loss) -> tuple[int, int]:
    """The model's numbers of inputs and outputs, after refusing what this loop cannot train."""
    if not isinstance(model, Graph):
        if isinstance(loss, PerOutputLoss):
            raise ValueError(f"{loss} needs a model with {len(loss.losses)} outputs (a unitrain Graph)")
        return 1, 1
    if "graph" not in loop.capabilities:
        raise ValueError(f"the {loop.name} backend cannot build graph models (no 'graph' capability)")
    inputs, outputs = len(model.inputs), len(model.outputs)
    if isinstance(loss, CustomLoss):
        check_custom_loss(loss, outputs)
    elif outputs > 1 and not (isinstance(loss, PerOutputLoss) and len(loss.losses) == outputs):
        raise ValueError(f"the model has {outputs} outputs {list(model.outputs)}: train it with "
                         f"PerOutputLoss(one loss per output) or a CustomLoss of pred[0], pred[1]..., got "
                         f"{loss!r}")  # fmt: skip
    if outputs == 1 and isinstance(loss, PerOutputLoss):
        raise ValueError(f"{loss} needs a model with {len(loss.losses)} outputs, this graph has one")
    return inputs, outputs


def check_custom_loss(loss: CustomLoss, outputs: int) -> None:
    """A CustomLoss reads a model's one output as ``pred``, each of several as ``pred[i]``."""
    read = expr.items(loss.tree, "pred")
    if outputs == 1 and read != {None}:
        raise ValueError(f"CustomLoss reads pred[{max(i for i in read if i is not None)}], but the model has one "
                         "output: write pred")  # fmt: skip
    if outputs > 1 and (None in read or max(read) >= outputs):
        what = "pred whole" if None in read else f"pred[{max(read)}]"
        raise ValueError(f"CustomLoss reads {what}, but the model has {outputs} outputs: write pred[0] to "
                         f"pred[{outputs - 1}]")  # fmt: skip


def check_inputs(loop: TrainingLoop, x) -> tuple[np.ndarray, ...]:
    """``x`` of a graph with several inputs as a tuple of checked arrays in input order (a graph
    that draws noise: the data inputs' from ``x``, one array when it has one, then the noise's)."""
    from .loop import InputError

    data_inputs = loop.model_spec.data_inputs
    names = tuple(name for name, _ in data_inputs)
    if loop._noise is not None and len(names) == 1 and not isinstance(x, (Mapping, tuple, list)):
        x = (x,)
    if isinstance(x, Mapping):
        if set(x) != set(names):
            raise InputError(f"inputs must have the keys {list(names)}, got {sorted(x)}")
        x = [x[name] for name in names]
    if not isinstance(x, (tuple, list)) or len(x) != len(names):
        raise InputError(f"the model takes {len(names)} inputs {list(names)}: pass a tuple or a dict of arrays, "
                         f"got {type(x).__name__}")  # fmt: skip
    arrays = []
    roles = loop._input_roles
    for (name, declared), value in zip(data_inputs, x, strict=True):
        value = np.asarray(value)
        if value.dtype.kind not in "fiu":
            raise InputError(f"input {name!r} must be numeric, got dtype {value.dtype}")
        if value.ndim < (2 if declared else 1) or (arrays and len(value) != len(arrays[0])):
            raise InputError(f"input {name!r} must be a batch of shape (N, ...) with the same N as the others, "
                             f"got shape {value.shape}")  # fmt: skip
        if name in roles and roles[name].kind == "additive mask":  # -inf masks a key
            value = value.astype(loop.dtype, copy=False)
            if problem := padded.check_input(roles[name], name, value):
                raise InputError(problem)
            arrays.append(value)
            continue
        if name in roles:  # token ids or sequence lengths: integers, passed on as int64 (lengths checked below)
            if roles[name].kind == "ids" and (problem := padded.check_input(roles[name], name, value)):
                raise InputError(problem)
            arrays.append(value)
            continue
        value = value.astype(loop.dtype, copy=False)
        if not np.isfinite(value).all():
            raise InputError(f"input {name!r} contains NaN or infinite values")
        arrays.append(value)
    if loop._noise is not None:
        arrays += loop._noise.draw(len(arrays[0]), loop.dtype, loop.training)
        names = loop.model_spec.input_names
    shapes = tuple(value.shape[1:] for value in arrays)
    loop._output_shape(shapes)
    if lengths := [(name, role) for name, role in roles.items() if role.kind == "lengths"]:
        inferred = loop.model_spec._infer(shapes, "", {})  # this batch's padded axes, not the declared ones
        for name, role in lengths:
            value = arrays[names.index(name)]
            if problem := padded.check_input(role, name, value, steps=inferred[role.source][0]):
                raise InputError(problem)
    return tuple(value.astype(np.int64, copy=False) if name in roles and roles[name].kind != "additive mask" else value
                 for name, value in zip(names, arrays, strict=True))  # fmt: skip


def check_targets(loop: TrainingLoop, y, n: int, outputs) -> tuple[np.ndarray, ...]:
    """``y`` for several outputs: one array per output, each checked against its own loss."""
    from .loop import InputError

    if isinstance(loop.loss_spec, CustomLoss):
        return custom_targets(loop, y, n, outputs)
    count = len(loop.loss_spec.losses)
    if not isinstance(y, (tuple, list)) or len(y) != count:
        raise InputError(f"the model has {count} outputs: targets must be a tuple of {count} arrays, "
                         f"got {type(y).__name__}")  # fmt: skip
    return tuple(
        loop._check_target(spec, target, n, None if outputs is None else outputs[index])
        for index, (spec, target) in enumerate(zip(loop.loss_spec.losses, y, strict=True))
    )


def custom_targets(loop: TrainingLoop, y, n: int, outputs):
    """``y`` of a CustomLoss over several outputs: one array (``target``) or a tuple (``target[i]``),
    each numeric, finite, of ``n`` samples, and of shapes the loss's expression can combine."""
    from .loop import InputError

    read = expr.items(loop.loss_spec.tree, "target")
    if read - {None}:
        count = max(read - {None}) + 1
        if None in read or not isinstance(y, (tuple, list)) or len(y) < count:
            raise InputError(f"the CustomLoss reads target[{count - 1}]: targets must be a tuple of {count} "
                             f"arrays, got {type(y).__name__}")  # fmt: skip
        y = tuple(np.asarray(part) for part in y)
    else:
        y = np.asarray(y)
    parts = y if isinstance(y, tuple) else (y,)
    for part in parts:
        if part.ndim == 0 or len(part) != n or part.dtype.kind not in "fiub":
            raise InputError(f"got {n} inputs but targets of shape {part.shape} and dtype {part.dtype}")
        if not np.isfinite(part).all():
            raise InputError("targets contain NaN or infinite values")
    if outputs is not None:
        shapes = tuple((n, *output) for output in outputs)
        targets = tuple(part.shape for part in parts) if isinstance(y, tuple) else y.shape
        try:
            expr.result_shape(loop.loss_spec.tree, shapes, targets)
        except ValueError as error:
            raise InputError(f"CustomLoss on outputs of shapes {list(shapes)}, targets {targets}: {error}") from None
    cast = tuple(part.astype(loop.dtype, copy=False) for part in parts)
    return cast if isinstance(y, tuple) else cast[0]


def rows(x, start: int, stop: int):
    """Rows ``start:stop`` of an array or of each array in a tuple."""
    return x[start:stop] if isinstance(x, np.ndarray) else tuple(value[start:stop] for value in x)


def length(x) -> int:
    return len(x) if isinstance(x, np.ndarray) else len(x[0])


def predict(loop: TrainingLoop, x, batch_size: int):
    """:meth:`TrainingLoop.predict` for several inputs or outputs."""
    from .fitting import eval_mode

    n = length(x)
    with eval_mode(loop):
        parts = [loop._predict(rows(x, i, i + batch_size)) for i in range(0, n, batch_size)]
    if loop._output_count == 1:
        return np.concatenate(parts) if parts else np.zeros((0,), loop.dtype)
    return tuple(np.concatenate([part[k] for part in parts]) for k in range(loop._output_count))


def evaluate(loop: TrainingLoop, dataset: ArrayDataset, batch_size: int) -> dict[str, float]:
    """:meth:`TrainingLoop.evaluate` for several outputs: ``loss`` is the sum over outputs of each
    one's evaluation loss (per sample, or per element for the elementwise losses); no accuracy."""
    from .fitting import eval_mode

    if isinstance(loop.loss_spec, CustomLoss):
        return custom_evaluate(loop, dataset, batch_size)
    totals = np.zeros(loop._output_count)
    # a CustomLoss reduces itself: its evaluation loss is the sum over samples of its value on each
    # (as for one output), from the predictions; the adapter's value for it is not used
    custom = {k: spec for k, spec in enumerate(loop.loss_spec.losses) if isinstance(spec, CustomLoss)}
    with eval_mode(loop):
        for x, y in dataset.batches(batch_size):
            x, y = loop._check_batch((x, y))
            sums = np.asarray(loop._evaluate_batch(x, y)[0], np.float64)
            pred = loop._predict(x) if custom else ()
            for k, spec in custom.items():
                samples = range(len(y[k]))
                sums[k] = sum(expr.numpy_value(spec.tree, pred[k][i : i + 1], y[k][i : i + 1]) for i in samples)
            totals += sums
    n = len(dataset)
    per_output = []
    for spec, total, target in zip(loop.loss_spec.losses, totals, dataset.y, strict=True):
        per_sample = total / n if n else float("nan")
        if not spec.class_targets and not isinstance(spec, CustomLoss):
            per_sample /= max(1, int(np.prod(np.shape(target)[1:])))
        per_output.append(per_sample)
    return {"loss": float(sum(per_output)), "accuracy": float("nan"), "num_correct": 0, "num_samples": n}


def custom_evaluate(loop: TrainingLoop, dataset: ArrayDataset, batch_size: int) -> dict[str, float]:
    """:func:`evaluate` for a CustomLoss over several outputs: as for one output, the mean over
    samples of its value on each, from the predictions."""
    from .fitting import eval_mode

    total, tree = 0.0, loop.loss_spec.tree
    with eval_mode(loop):
        for x, y in dataset.batches(batch_size):
            x, y = loop._check_batch((x, y))
            pred = loop._predict(x)
            total += sum(expr.numpy_value(tree, rows(pred, i, i + 1), rows(y, i, i + 1)) for i in range(length(x)))
    n = len(dataset)
    return {"loss": total / n if n else float("nan"), "accuracy": float("nan"), "num_correct": 0, "num_samples": n}


def submodule(loop: TrainingLoop, path: str, loss=None, optimizer=None) -> TrainingLoop:
    """The module at ``path`` as a loop of its own (see :meth:`TrainingLoop.submodule`)."""
    if loop.model_spec is None:
        raise ValueError("submodule needs a unitrain model spec, not a native model")
    module = get_submodule(loop.model_spec, path)
    if not isinstance(module, Container):
        raise ValueError(f"module {path!r} is a {type(module).__name__}: a sub-model must be a Sequential, "
                         "Residual or Graph")  # fmt: skip
    prefix = f"{path}."
    state = {key[len(prefix) :]: value for key, value in loop.state_dict().items() if key.startswith(prefix)}
    options = {"dtype": str(loop.dtype), "seed": loop.seed}
    if loss is not None:
        options["loss"] = loss
    if optimizer is not None:
        options["optimizer"] = optimizer
    sub = type(loop)(module, **options)
    sub.load_state_dict(state, source=f"module {path!r}")
    sub.eval() if not loop.training else sub.train()
    return sub
