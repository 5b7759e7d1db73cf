"""What the core checks of a batch before any framework sees it (the rules are
:mod:`unitrain.loop`'s docstring): inputs, token ids, targets against the loss and the model's
output shape, enough values per BatchNorm channel."""

from __future__ import annotations

import functools
import math

import numpy as np

from . import class_targets, expr, graph_batches, padded
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


def norm_problem(norm: tuple[str, int] | None, samples: int) -> str | None:
    """Why a training forward of ``samples`` cannot normalise at ``norm`` (:func:`smallest_norm`):
    it needs more than one value per channel, as PyTorch."""
    if norm is not None and samples * norm[1] < 2:
        return (f"{norm[0]}: BatchNorm in training needs more than one value per channel, but a batch of "
                f"{samples} gives {samples * norm[1]} there; use batches of 2 or more (or eval mode)")  # fmt: skip
    return None


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

    def _check_batch_statistics(self, x: np.ndarray) -> None:
        """A training forward needs more than one value per BatchNorm channel (as PyTorch)."""
        if not self.training or self.model_spec is None:
            return
        n, sample_shape = (
            (len(x), x.shape[1:]) if self._input_count == 1 else (len(x[0]), tuple(a.shape[1:] for a in x))
        )
        if problem := norm_problem(self._facts(sample_shape)[1], n):
            raise InputError(problem)

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
