"""Class-index targets as PyTorch's ``CrossEntropyLoss`` and ``NLLLoss`` take them: ``(N,)`` against
outputs ``(N, C)``, or ``(N, d1, ..., dK)`` against ``(N, C, d1, ..., dK)`` (one target per position,
a language model's next token at every step), with ``ignore_index`` marking targets that count for
nothing (padding). The loop checks targets here and counts what its means divide by: the targets
that are not ignored, which are the samples for plain ``(N,)`` targets without ignored ones.
"""

from __future__ import annotations

import numpy as np


def check(spec, y: np.ndarray, output: tuple[int, ...] | None, error: type[Exception]) -> np.ndarray:
    """``y`` as int64 class indices after checking it against the loss ``spec`` and, when known, the
    model's per-sample ``output`` shape; raises ``error`` with one line naming what is wrong."""
    loss_name = type(spec).__name__
    if y.ndim < 1:
        raise error(f"class targets must be an integer array of shape (N, ...), got shape {y.shape}")
    if output is not None:
        if len(output) != y.ndim or tuple(output[1:]) != y.shape[1:]:
            wanted = "(N, classes)" if y.ndim == 1 else f"(N, classes, {', '.join(map(str, y.shape[1:]))})"
            raise error(
                f"{loss_name} with class indices needs model outputs of shape {wanted} for targets of shape "
                f"{y.shape}, the model gives per-sample shape {output}"
            )
        classes = output[0]
        low, high = (int(y.min()), int(y.max())) if y.size else (0, 0)
        if low < 0 or high >= classes:  # out of range, unless ignore_index: look again without those
            kept = y[y != spec.ignore_index]
            low, high = (int(kept.min()), int(kept.max())) if kept.size else (0, 0)
            if low < 0 or high >= classes:
                bad = low if low < 0 else high
                raise error(
                    f"label {bad} is out of range: the model has {classes} classes (0..{classes - 1}, "
                    f"or ignore_index={spec.ignore_index})"
                )
        elif low != high or low != spec.ignore_index:  # some target is not ignore_index
            return y.astype(np.int64, copy=False)
    if spec.reduction == "mean" and y.size and not np.any(y != spec.ignore_index):
        raise error(f"every target of the batch is ignore_index={spec.ignore_index}: {loss_name}'s mean over "
                    "no targets is undefined (PyTorch's is NaN)")  # fmt: skip
    return y.astype(np.int64, copy=False)


def counted(spec, y: np.ndarray) -> int:
    """How many of the class indices ``y`` count: those not equal to ``spec.ignore_index``."""
    return int(np.count_nonzero(np.asarray(y) != spec.ignore_index))
