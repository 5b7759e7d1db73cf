"""Framework-neutral loss specs.

Every backend computes these natively with PyTorch's definitions (``p = pred``, ``t = target``):

- ``CrossEntropyLoss(label_smoothing=e)``: ``-sum_c q_c * log_softmax(p)_c`` where ``q`` is
  the target distribution, ``(1-e)*t + e/C``; ``t`` is one-hot of a class index (integer
  targets, shape ``(N,)``) or class probabilities (float targets, shape ``(N, C)``).
- ``NLLLoss``: ``-p[t]`` on log-probabilities (e.g. after ``LogSoftmax(dim=1)``); integer targets.
- Both take PyTorch's extra axes: predictions ``(N, C, d1, ..., dK)`` with class indices
  ``(N, d1, ..., dK)`` (one term per position: a language model's ``(N, vocabulary, T)`` logits
  against ``(N, T)`` next tokens), and ``ignore_index`` (default -100): targets equal to it add no
  term and no gradient, and ``"mean"`` divides by the number of the others (PyTorch's mean over
  non-ignored targets; ``nan`` when every target is ignored).
- ``MSELoss``: ``(p - t)**2``; ``L1Loss``: ``|p - t|``.
- ``BCEWithLogitsLoss``: ``max(p, 0) - p*t + log(1 + exp(-|p|))`` (stable form of
  ``-t*log(sigmoid(p)) - (1-t)*log(1-sigmoid(p))``).
- ``BCELoss``: ``-(t*max(log(p), -100) + (1-t)*max(log1p(-p), -100))`` on probabilities
  ``p`` in [0, 1] (e.g. a ``Sigmoid`` output); the gradient is PyTorch's
  ``(p - t) / max(p*(1-p), 1e-12)``, finite where a clamped log has none.
- ``SmoothL1Loss(beta)``: ``0.5*d**2/beta if |d| < beta else |d| - 0.5*beta`` with
  ``d = p - t`` (``beta == 0``: ``|d|``); ``HuberLoss(delta)``:
  ``0.5*d**2 if |d| <= delta else delta*(|d| - 0.5*delta)``.
- ``CustomLoss(fn)``: the user's own expression of ``pred`` and ``target`` (:mod:`unitrain.expr`).

Elementwise losses take float targets shaped like ``pred``. ``reduction="mean"`` averages
over samples (class losses) or over elements (elementwise losses); ``"sum"`` adds them up.
A batch's target dtype tells the kind: integer = class indices, floating = probabilities or
regression targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from . import expr

REDUCTIONS = ("mean", "sum")


class Loss:
    """Base of all loss specs (frozen dataclasses)."""

    #: ``True`` when targets MAY be integer class indices (and accuracy is meaningful).
    class_targets = False
    #: ``True`` when targets MAY be floats: shaped like ``pred`` (class probabilities for
    #: CrossEntropyLoss), or as a CustomLoss's ``fn`` expects.
    float_targets = True


@dataclass(frozen=True)
class _Reduced(Loss):
    reduction: str = "mean"

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {REDUCTIONS}, got {self.reduction!r}")


def _non_negative(spec: Loss, name: str, strictly: bool = False) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        valid = False
    else:
        valid = value > 0 if strictly else value >= 0
    if not valid:
        raise ValueError(f"{type(spec).__name__}: {name} must be a {'positive' if strictly else 'non-negative'} "
                         f"number, got {value!r}")  # fmt: skip
    object.__setattr__(spec, name, float(value))


def _ignore_index(spec: Loss) -> None:
    value = spec.ignore_index
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{type(spec).__name__}: ignore_index must be an integer, got {value!r}")


@dataclass(frozen=True)
class CrossEntropyLoss(_Reduced):
    """``torch.nn.CrossEntropyLoss``: log-softmax and NLL over class indices, or against class
    probabilities (soft or one-hot targets); ``label_smoothing``."""

    label_smoothing: float = 0.0
    ignore_index: int = -100

    class_targets = True

    def __post_init__(self):
        super().__post_init__()
        _ignore_index(self)
        _non_negative(self, "label_smoothing")
        if self.label_smoothing > 1:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {self.label_smoothing!r}")


@dataclass(frozen=True)
class NLLLoss(_Reduced):
    """``torch.nn.NLLLoss``: the negative log-probability of each sample's class (after ``LogSoftmax(dim=1)``)."""

    ignore_index: int = -100

    class_targets = True
    float_targets = False

    def __post_init__(self):
        super().__post_init__()
        _ignore_index(self)


@dataclass(frozen=True)
class MSELoss(_Reduced):
    """``torch.nn.MSELoss``: squared differences."""


@dataclass(frozen=True)
class L1Loss(_Reduced):
    """``torch.nn.L1Loss``: absolute differences."""


@dataclass(frozen=True)
class BCEWithLogitsLoss(_Reduced):
    """``torch.nn.BCEWithLogitsLoss``: sigmoid and binary cross-entropy in one stable expression."""


@dataclass(frozen=True)
class BCELoss(_Reduced):
    """Binary cross-entropy on probabilities, ``torch.nn.BCELoss`` without per-element
    ``weight``. Probabilities outside [0, 1] make PyTorch raise and the other backends give NaN."""


#: PyTorch's floor of BCELoss's logarithms, and the floor of ``p*(1-p)`` in its gradient (a C
#: ``float`` constant in ATen, also for float64)
BCE_LOG_FLOOR = -100.0
BCE_GRAD_EPSILON = 9.999999960041972e-13  # float(numpy.float32(1e-12))


@dataclass(frozen=True)
class SmoothL1Loss(_Reduced):
    """``torch.nn.SmoothL1Loss``: quadratic below ``beta``, linear above."""

    beta: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _non_negative(self, "beta")


@dataclass(frozen=True)
class HuberLoss(_Reduced):
    """``torch.nn.HuberLoss``: quadratic below ``delta``, linear above (SmoothL1 times ``delta``)."""

    delta: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _non_negative(self, "delta", strictly=True)


@dataclass(frozen=True)
class CustomLoss(Loss):
    """The user's own loss: ``fn(pred, target)`` written with Python arithmetic, numbers,
    ``.sum()``/``.mean()`` and :mod:`unitrain.expr`'s functions, returning a scalar, e.g.
    ``CustomLoss(lambda pred, labels: (pred - labels).sum())``. ``fn`` runs once, here, on
    placeholders; ``tree`` is what it computed (see :mod:`unitrain.expr`), which every
    backend evaluates natively. Targets are float32 arrays, shaped as ``fn`` expects."""

    fn: Callable = field(compare=False, repr=False)
    tree: tuple = field(init=False)

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"CustomLoss: fn must be a function (pred, target) -> loss, got {self.fn!r}")
        object.__setattr__(self, "tree", expr.trace(self.fn))


@dataclass(frozen=True, init=False)
class PerOutputLoss(Loss):
    """One loss per output of a model with several outputs (a :class:`~unitrain.graph.Graph`),
    summed: ``PerOutputLoss(CrossEntropyLoss(), MSELoss())`` is PyTorch's
    ``F.cross_entropy(out1, y1) + F.mse_loss(out2, y2)``. Targets are a tuple ``(y1, y2)``, each
    checked against its own loss and output."""

    losses: tuple[Loss, ...]

    def __init__(self, *losses: Loss):
        if len(losses) == 1 and isinstance(losses[0], (list, tuple)):
            losses = tuple(losses[0])
        if len(losses) < 2 or not all(isinstance(loss, Loss) and not isinstance(loss, PerOutputLoss)
                                      for loss in losses):  # fmt: skip
            raise ValueError(f"PerOutputLoss: needs two or more loss specs (one per output), got {losses!r}")
        object.__setattr__(self, "losses", tuple(losses))


#: the losses a run names (``--loss``), with their default arguments
LOSSES = {
    "cross-entropy": CrossEntropyLoss, "nll": NLLLoss, "mse": MSELoss, "l1": L1Loss,
    "bce-with-logits": BCEWithLogitsLoss, "bce": BCELoss, "smooth-l1": SmoothL1Loss, "huber": HuberLoss,
}  # fmt: skip
