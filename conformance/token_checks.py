"""The checks of per-position class losses (``CrossEntropyLoss`` and ``NLLLoss`` over ``(N, C, T)``
predictions against ``(N, T)`` class indices, as a language model's loss) with ``ignore_index``:
values, gradients and ``evaluate()`` against the float64 reference of :mod:`.reference`.

The predictions come through one ``Linear`` with identity weights over the last axis, so that
the gradient with respect to them reaches its weight as ``sum over rows of grad^T pred``.
"""

from __future__ import annotations

import numpy as np

from unitrain import layers
from unitrain.losses import CrossEntropyLoss, NLLLoss

from . import reference
from .checks import F64, check, compare, compare_states, loaded, tutorial_gradients

CLASSES, POSITIONS, ROWS = 3, 5, 8
#: every term of the 8 x 3 x 5 predictions may be summed into the loss
TERMS = ROWS * CLASSES * POSITIONS


def _per_position_loop(adapter, loss):
    model = layers.Sequential(layers.Linear(POSITIONS, POSITIONS))
    weights = {"0.weight": np.eye(POSITIONS, dtype=np.float32), "0.bias": np.zeros(POSITIONS, np.float32)}
    return loaded(adapter, model, weights, loss=loss)


def _case(ignore_index: int):
    """Predictions ``(8, 3, 5)``, targets ``(8, 5)`` with a third of them ``ignore_index`` and one
    row ignored entirely."""
    rng = np.random.default_rng(11)
    pred = (3 * rng.standard_normal((ROWS, CLASSES, POSITIONS))).astype(np.float32)
    target = rng.integers(0, CLASSES, (ROWS, POSITIONS))
    target[rng.uniform(size=target.shape) < 1 / 3] = ignore_index
    target[2] = ignore_index
    return pred, target


@check("losses", "sequences")
def check_per_position_losses(adapter):
    """CrossEntropyLoss (label-smoothed, mean) and NLLLoss (sum) over (N, C, T) with ignored targets
    (PyTorch's default ignore_index -100, and an ignore_index that is a class): the loss, the gradient
    and evaluate() (the mean over the targets that count) match the reference."""
    for spec in (CrossEntropyLoss(label_smoothing=0.2), NLLLoss(ignore_index=1, reduction="sum")):
        pred, target = _case(spec.ignore_index)
        what = f"{spec} over (N, C, T) with ignored targets"
        loop = _per_position_loop(adapter, spec)
        expected, grad = reference.loss(spec, pred, target)
        compare(f"{what}: loss", tutorial_gradients(loop, pred, target), expected, dtype=loop.dtype, size=TERMS)
        rows, grad_rows = np.asarray(pred, F64).reshape(-1, POSITIONS), grad.reshape(-1, POSITIONS)
        gradients = {"0.weight": grad_rows.T @ rows, "0.bias": grad_rows.sum(0)}
        compare_states(f"{what}: gradient", loop.gradients(), gradients, dtype=loop.dtype, size=TERMS)
        per_target = reference.loss_terms(spec, pred, target)[0].mean()
        compare(f"{what}: evaluate()['loss']", loop.evaluate((pred, target))["loss"], per_target, dtype=loop.dtype,
                size=TERMS)  # fmt: skip
