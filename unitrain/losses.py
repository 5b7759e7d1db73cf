"""Framework-neutral loss specs.

Every backend computes these natively with PyTorch's definitions:

- ``CrossEntropyLoss``: ``-log_softmax(logits)[y]``; targets are integer class indices.
- ``NLLLoss``: ``-logp[y]`` on log-probabilities; targets are integer class indices.
- ``MSELoss``: ``(pred - target) ** 2`` per element; targets are floats shaped like ``pred``.

``reduction="mean"`` averages over samples (MSE: over elements), ``"sum"`` adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class Loss:
    reduction: str = "mean"

    #: ``True`` when targets are integer class indices (and accuracy is meaningful).
    class_targets = True

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {REDUCTIONS}, got {self.reduction!r}")


@dataclass(frozen=True)
class CrossEntropyLoss(Loss):
    pass


@dataclass(frozen=True)
class NLLLoss(Loss):
    pass


@dataclass(frozen=True)
class MSELoss(Loss):
    class_targets = False
