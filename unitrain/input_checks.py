"""What the core checks of a batch before any framework sees it (the rules are
:mod:`unitrain.loop`'s docstring): inputs, token ids, targets against the loss and the model's
output shape, enough values per BatchNorm channel."""

from __future__ import annotations

import functools
import math

import numpy as np

from . import class_targets, expr, graph_batches, graph_noise, padded
from .distributed import shard
from .layers import _BatchNorm
from .losses import CustomLoss, Loss


class InputError(ValueError):
    """A batch that cannot be fed to the model: wrong shape, dtype, labels or NaN."""


def smallest_norm(model, inputs: dict) -> tuple[str, int] | None:
    """The BatchNorm of ``model`` with the fewest values per channel in one sample, and that count
    (``inputs``: each layer's input shape, ``leaf_input_shapes``); None without BatchNorm."""
    norms = [(path, math.prod(inputs[path][1:])) for path, layer in model.named_layers()
             if isinstance(layer, _BatchNorm)]  # fmt: skip
    return min(norms, key=lambda norm: norm[1], default=None)


def norm_problem(norm: tuple[str, int] | None, samples: int, world_size: int = 1) -> str | None:
    """Why a training forward of ``samples`` cannot normalise at ``norm`` (:func:`smallest_norm`):
    it needs more than one value per channel, as PyTorch. Over ``world_size`` data-parallel
    processes each normalises its own shard of the rows: every rank computes every rank's shard
    from the same two numbers, so all decide alike before any collective (one rank refusing alone
    would leave the others waiting in the next one)."""
    if norm is None:
        return None
    if world_size == 1:
        if samples * norm[1] < 2:
            return (f"{norm[0]}: BatchNorm in training needs more than one value per channel, but a batch of "
                    f"{samples} gives {samples * norm[1]} there; use batches of 2 or more (or eval mode)")  # fmt: skip
        return None
    sizes = [stop - start for start, stop in (shard(samples, rank, world_size) for rank in range(world_size))]
    short = [str(rank) for rank, rows in enumerate(sizes) if 0 < rows * norm[1] < 2]  # rows 1, one value each
    if not short:
        return None
    ranks = f"rank {short[0]}" if len(short) == 1 else f"ranks {', '.join(short)}"
    return (f"{norm[0]}: BatchNorm in training needs more than one value per channel, and each of {world_size} "
            f"processes normalises its own rows: a batch of {samples} gives {ranks} one row; use batches of "
            f"{2 * world_size} or more (2 rows per process), or eval mode")  # fmt: skip


def several_arrays(x) -> str | None:
    """What ``x`` is when it is a tuple or list holding arrays ("a list of 2 arrays of shapes
    (5, 4), (5, 4)"), else None: np.asarray would stack them into rows silently, though they may
    as well be several inputs (a batch ``(x, y)``, two models' images)."""
    if not isinstance(x, tuple | list) or not any(len(getattr(part, "shape", ())) for part in x):
        return None
    shapes = [str(tuple(np.shape(part))) for part in x[:4]]
    more = ", ..." if len(x) > 4 else ""
    return f"a {type(x).__name__} of {len(x)} arrays of shapes {', '.join(shapes)}{more}"


class InputChecks:
    """The part of :class:`~unitrain.loop.TrainingLoop` that validates batches."""

    @functools.cached_property
    def _input_roles(self) -> dict:
        """The graph inputs that are token ids, lengths or additive masks (:func:`unitrain.padded.input_roles`):
        the spec's, found once rather than at every batch (a walk of the graph costs more than the checks)."""
        return padded.input_roles(self.model_spec)

    def _check_x(self, x) -> np.ndarray:
        if self._input_count > 1:
            return graph_batches.check_inputs(self, x)
        if several := several_arrays(x):
            raise InputError(f"the model takes one input, an array of shape (N, ...); got {several} "
                             "(np.stack them if they are its rows)")  # fmt: skip
        x = np.asarray(x)
        if self._embedding is not None:
            return self._check_token_ids(x)
        if x.dtype != self.dtype:
            if x.dtype.kind not in "fiu":
                raise InputError(f"inputs must be numeric, got dtype {x.dtype}")
            # a native model's integer inputs are token ids (its embedding's indices): kept integers
            x = x.astype(np.int64 if x.dtype.kind in "iu" and self.model_spec is None else self.dtype)
        if x.ndim < 2:
            raise InputError(f"inputs must be a batch of shape (N, ...), got shape {x.shape}")
        if self.model_spec is not None:
            self._output_shape(x.shape[1:])
        if not np.isfinite(x).all():
            raise InputError("inputs contain NaN or infinite values")
        return x

    def _check_token_ids(self, x: np.ndarray) -> np.ndarray:
        """A model that starts with an Embedding takes integer token ids within its table, passed on as int64."""
        path, embedding = self._embedding
        if x.ndim < 2:
            raise InputError(f"inputs must be a batch of shape (N, ...), got shape {x.shape}")
        if problem := embedding.ids_problem(x):
            raise InputError(f"{path}: {problem}")
        self._output_shape(x.shape[1:])
        return x.astype(np.int64, copy=False)

    def _output_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self._facts(sample_shape)[0]

    def _facts(self, sample_shape):
        if sample_shape not in self._shape_facts:
            try:
                output = self.model_spec.output_shape(sample_shape)
                inputs = self.model_spec.leaf_input_shapes(sample_shape)
            except ValueError as error:
                raise InputError(str(error)) from None
            self._shape_facts[sample_shape] = (output, smallest_norm(self.model_spec, inputs))
        return self._shape_facts[sample_shape]

    def _check_batch_statistics(self, x, world_size: int = 1) -> None:
        """A training forward needs more than one value per BatchNorm channel (as PyTorch); ``x``:
        the whole (checked) batch that ``world_size`` data-parallel processes share."""
        if self.training and (problem := self._norm_problem(x, world_size)):
            raise InputError(problem)

    def _norm_problem(self, x, world_size: int) -> str | None:
        if self.model_spec is None:
            return None
        n, sample_shape = (
            (len(x), x.shape[1:]) if self._input_count == 1 else (len(x[0]), tuple(a.shape[1:] for a in x))
        )
        return norm_problem(self._facts(sample_shape)[1], n, world_size)

    def _check_epoch_batches(self, data, batch_size: int, drop_last: bool, last_reached: bool) -> None:
        """Before :meth:`fit` trains: each batch size an epoch of ``data`` gives (the full one, and
        a smaller last one unless ``drop_last`` or the run ends before it: ``last_reached``) must be
        one BatchNorm can normalise on every rank; the step would refuse it only once reached, a
        whole epoch in. Refused, not dropped: a PyTorch DataLoader does not drop it either."""
        samples = len(data)
        last = samples % batch_size if last_reached and not drop_last else 0
        noise = graph_noise.state(self._noise)  # checking a graph's input draws its noise: put the stream back
        try:
            for size in [batch_size] * (samples >= batch_size) + [last] * (last > 0):
                # a batch the step's own checks refuse is refused here in the same words
                if problem := self._norm_problem(self._check_x(data.subset(slice(0, size)).x), self.world_size):
                    last_words = f" leaves a last batch of {size} (drop_last=True, --drop-last, leaves it out)"
                    raise InputError(f"batch_size {batch_size} on {samples} samples"
                                     f"{last_words if size == last else ''}: {problem}")  # fmt: skip
        finally:
            graph_noise.load_state(self._noise, noise)

    def _check_y(self, y, n: int, sample_shape=None) -> np.ndarray:
        """Targets checked against the loss spec and, for spec models, the output shape (see
        the module docstring); returns int64 class indices or ``self.dtype`` values."""
        output = None
        if sample_shape is not None and self.model_spec is not None:
            output = self._output_shape(sample_shape)
        if self._output_count > 1:
            return graph_batches.check_targets(self, y, n, output)
        return self._check_target(self.loss_spec, y, n, output)

    def _check_target(self, spec: Loss, y, n: int, output: tuple[int, ...] | None) -> np.ndarray:
        """``y`` checked against one loss spec and, when known, the per-sample ``output`` shape."""
        y = np.asarray(y)
        loss_name = type(spec).__name__
        if y.ndim == 0 or len(y) != n:
            raise InputError(f"got {n} inputs but targets of shape {y.shape}")
        if y.dtype.kind not in "fiub":
            raise InputError(f"targets must be numeric, got dtype {y.dtype}")
        if spec.class_targets and y.dtype.kind in "iu":
            return class_targets.check(spec, y, output, InputError)
        if not spec.float_targets:
            raise InputError(f"{loss_name} needs integer class indices of shape (N,), got dtype {y.dtype}")
        if not np.isfinite(y).all():
            raise InputError("targets contain NaN or infinite values")
        if output is not None:
            if isinstance(spec, CustomLoss):
                try:
                    expr.result_shape(spec.tree, (n, *output), y.shape)
                except ValueError as error:
                    raise InputError(
                        f"CustomLoss on outputs of shape {(n, *output)}, targets {y.shape}: {error}"
                    ) from None
            elif y.shape[1:] != output:
                kind = "class probabilities" if spec.class_targets else "targets"
                hint = " (class indices must be an integer array)" if spec.class_targets else ""
                raise InputError(
                    f"{loss_name}: {kind} of shape {y.shape} do not match the model's outputs of shape "
                    f"{(n, *output)}{hint}"
                )
        return y.astype(self.dtype, copy=False)

    def _check_batch(self, batch) -> tuple[np.ndarray, np.ndarray]:
        try:
            x, y = batch
        except (TypeError, ValueError):
            raise InputError(f"a batch must be a pair (x, y), got {type(batch).__name__}") from None
        x = self._check_x(x)
        if not len(x[0] if self._input_count > 1 else x):  # a mean over it would divide by zero
            raise InputError("a batch must hold at least one sample, got 0")
        if self._input_count > 1:
            return x, self._check_y(y, len(x[0]), tuple(a.shape[1:] for a in x))
        return x, self._check_y(y, len(x), x.shape[1:])
