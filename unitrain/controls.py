"""Training controls: frozen parameters, parameter groups and early stopping.

Which parameters a pattern names (:func:`matches`): a parameter's dotted name (``0.weight``),
the path of its layer (``0``, ``layer1.0.bn1``: every parameter below it), either as an
``fnmatch`` glob (``*.bias``, ``layer1.*``), or, for a spec model, the class name of its layer
(``BatchNorm2d``, ``LayerNorm``, ``Linear``).

**Freezing** (``frozen=`` patterns): those parameters get no update and no optimizer state, as
parameters with ``requires_grad=False`` left out of a ``torch.optim`` optimizer; ``gradients()``
leaves them out and gradient clipping does not count them. Their gradients are not computed at
all where unitrain drives the backward pass: PyTorch's ``requires_grad``, Chainer's variable
nodes, the NumPy backend's Linear, Conv2d and BatchNorm layers (its other layers compute and drop
them), and a backward pass stops at the first layer that trains. MindSpore's compiled step
differentiates the trainable parameters only. BatchNorm's running statistics are
buffers, not parameters: in training mode they keep following the batches whether the layer's
weight and bias are frozen or not (PyTorch's rule); ``loop.eval()`` keeps them fixed.

**Parameter groups** (``param_groups=``, as ``torch.optim``'s): a list of mappings, each with
``params`` (patterns) and options of the optimizer spec (``lr``, ``weight_decay``, ``momentum``,
``betas``, ...) that replace the spec's own for those parameters. Parameters no group names
form a last group with the spec's options. A parameter may be named by one group only. Under an
``lr_schedule`` every group follows its own scheduler, started from its own lr, as PyTorch's
schedulers step every group; ``set_lr(lr)`` sets the spec's lr to ``lr`` and scales every
group's lr by the same factor.

**Early stopping** (:class:`EarlyStopping`, ``fit(early_stopping=...)``): Keras' callback —
after each epoch the monitored metric of the epoch's record is compared with the best so far;
``patience`` epochs without an improvement by more than ``min_delta`` stop the run, and the
best epoch's weights are kept (and loaded at the end with ``restore_best_weights``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

from .optim import Optimizer
from .optim import momentum as momentum_of
from .schedules import LRSchedule, scheduled_optimizer

#: the metrics an epoch record may hold, which early stopping can monitor
METRICS = ("train_loss", "train_accuracy", *(f"{split}_{metric}" for split in ("val", "test")
                                              for metric in ("loss", "accuracy", "mse", "mae")))  # fmt: skip


def matches(pattern: str, name: str, layer_type: str | None = None) -> bool:
    """Whether ``pattern`` names the parameter ``name`` (see the module's doc); ``layer_type``:
    the class name of its layer in a spec model."""
    path = name.rpartition(".")[0]
    prefixes = [path.rsplit(".", depth)[0] for depth in range(path.count(".") + 1)] if path else []
    return pattern == layer_type or any(fnmatchcase(candidate, pattern) for candidate in (name, *prefixes))


def _selected(patterns: Iterable[str], layer_types: Mapping[str, str | None], what: str) -> list[str]:
    """The parameters (in model order) any of ``patterns`` names; ValueError for one naming none."""
    chosen = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{what}: expected parameter names, layer paths or globs, got {pattern!r}")
        found = {name for name, layer in layer_types.items() if matches(pattern, name, layer)}
        if not found:
            shown = ", ".join(list(layer_types)[:8]) + (", ..." if len(layer_types) > 8 else "")
            raise ValueError(f"{what}: {pattern!r} matches no parameter of the model; its parameters: {shown}")
        chosen |= found
    return [name for name in layer_types if name in chosen]


@dataclass
class ParamGroup:
    """Parameters updated with one optimizer spec and one live lr and momentum."""

    #: the parameters' names, in the model's order
    names: tuple[str, ...]
    #: the update spec (the run's spec with the group's options, as a schedule leaves it)
    spec: Optimizer
    #: the group's options as given (empty for the parameters no group names)
    options: dict[str, Any]
    #: the lr the next update uses
    lr: float
    #: the momentum (Adam: ``betas[0]``) the next update uses; None for optimizers without
    momentum: float | None
    #: the group's scheduler (None without an lr schedule)
    scheduler: Any = None


def resolve_groups(
    layer_types: Mapping[str, str | None],
    optimizer: Optimizer,
    schedule: LRSchedule | None,
    frozen: Sequence[str],
    param_groups: Sequence[Mapping[str, Any]],
) -> tuple[frozenset[str], list[ParamGroup]]:
    """``(frozen parameter names, groups)`` for a model whose parameters, in order, are the keys
    of ``layer_types`` (values: their layer's class name, None for a native model). The
    parameters no group names come last, with the spec's options; empty groups are left out."""
    frozen_names = frozenset(_selected(frozen, layer_types, "frozen"))
    owner: dict[str, int] = {}
    groups = []
    for index, group in enumerate(param_groups):
        where = f"param_groups[{index}]"
        if not isinstance(group, Mapping) or "params" not in group:
            raise ValueError(f"{where}: expected a table with 'params' and optimizer options, got {group!r}")
        options = {key: value for key, value in group.items() if key != "params"}
        patterns = [group["params"]] if isinstance(group["params"], str) else list(group["params"])
        names = [name for name in _selected(patterns, layer_types, where) if name not in frozen_names]
        if patterns and not names:
            raise ValueError(f"{where}: every parameter it names is frozen; a frozen parameter has no optimizer")
        for name in names:
            if name in owner:
                raise ValueError(f"{where}: parameter {name!r} is in param_groups[{owner[name]}] too; "
                                 "a parameter belongs to one group")  # fmt: skip
            owner[name] = index
        arguments = [field.name for field in dataclasses.fields(optimizer)]
        if unknown := sorted(set(options) - set(arguments)):
            raise ValueError(f"{where}: {type(optimizer).__name__} has no option {unknown[0]!r}; "
                             f"its options: {', '.join(arguments)}")  # fmt: skip
        try:
            spec = dataclasses.replace(optimizer, **options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        groups.append((tuple(names), spec, options))
    rest = tuple(name for name in layer_types if name not in owner and name not in frozen_names)
    groups.append((rest, optimizer, {}))
    resolved = []
    for names, spec, options in groups:
        if not names:
            continue
        update = scheduled_optimizer(spec, schedule)
        scheduler = None if schedule is None else schedule.start(float(spec.lr))
        resolved.append(ParamGroup(names, update, options, float(spec.lr), momentum_of(update), scheduler))
    return frozen_names, resolved


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when ``monitor`` (a key of :data:`METRICS`) has not improved by more than
    ``min_delta`` for ``patience`` epochs (Keras' ``EarlyStopping``, whose names and defaults
    these are, except ``restore_best_weights``). ``mode``: ``min``, ``max`` or ``auto`` (max for
    accuracies, min for losses)."""

    monitor: str = "val_loss"
    patience: int = 0
    min_delta: float = 0.0
    mode: str = "auto"
    restore_best_weights: bool = True

    def __post_init__(self):
        if self.monitor not in METRICS:
            raise ValueError(f"early_stopping.monitor: {self.monitor!r} is not a metric of the run; "
                             f"expected one of {', '.join(METRICS)}")  # fmt: skip
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"early_stopping.patience: expected an integer >= 0, got {self.patience!r}")
        if (isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float))
                or not math.isfinite(self.min_delta) or self.min_delta < 0):  # fmt: skip
            raise ValueError(f"early_stopping.min_delta: expected a finite number >= 0, got {self.min_delta!r}")
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(f"early_stopping.mode: expected auto, min or max, got {self.mode!r}")
        if not isinstance(self.restore_best_weights, bool):
            raise ValueError(f"early_stopping.restore_best_weights: expected true or false, got "
                             f"{self.restore_best_weights!r}")  # fmt: skip

    @property
    def maximize(self) -> bool:
        return self.mode == "max" or (self.mode == "auto" and self.monitor.endswith("accuracy"))  # errors: min

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_available(self, has_validation: bool, has_test: bool, class_targets: bool, values: bool) -> None:
        """ValueError when the runs' records cannot hold the monitored metric (``class_targets``:
        accuracies are measured; ``values``: mean squared and absolute errors are)."""
        split, _, kind = self.monitor.partition("_")
        missing = {"val": not has_validation, "test": not has_test}.get(split, False)
        if missing:
            source = "validation data (val_split)" if split == "val" else "test data"
            raise ValueError(f"early_stopping.monitor: {self.monitor} needs {source}, which the run does not have")
        if kind == "accuracy" and not class_targets:
            raise ValueError(f"early_stopping.monitor: {self.monitor} needs integer class targets; "
                             f"monitor {split}_loss instead")  # fmt: skip
        if kind in ("mse", "mae") and not values:
            raise ValueError(f"early_stopping.monitor: {self.monitor} needs an elementwise loss on value targets; "
                             f"monitor {split}_loss instead")  # fmt: skip


class EarlyStoppingState:
    """Where an :class:`EarlyStopping` stands in a run: the best value and its epoch, the epochs
    waited since, and the best epoch's weights. :meth:`to_json` and the weights are what a
    checkpoint keeps."""

    def __init__(self, spec: EarlyStopping, best: float | None = None, best_epoch: int = 0, wait: int = 0,
                 stopped: bool = False, best_weights: dict[str, np.ndarray] | None = None):  # fmt: skip
        self.spec, self.best, self.best_epoch, self.wait, self.stopped = spec, best, best_epoch, wait, stopped
        self.best_weights = best_weights

    def update(self, record: Mapping[str, float], state_dict) -> bool:
        """Take an epoch's record (``state_dict``: a callable giving the weights); returns
        whether the run stops here."""
        value = record.get(self.spec.monitor)
        if value is None:
            raise ValueError(f"early_stopping.monitor: the epoch records have no {self.spec.monitor}; "
                             f"they have {', '.join(key for key in record if key in METRICS)}")  # fmt: skip
        value = float(value)
        best, delta = self.best, self.spec.min_delta
        if best is None:
            improved = math.isfinite(value)
        else:
            improved = value > best + delta if self.spec.maximize else value < best - delta
        if improved:
            self.best, self.best_epoch, self.wait = value, int(record["epoch"]), 0
            self.best_weights = state_dict()
        else:
            self.wait += 1
            self.stopped = self.wait >= self.spec.patience  # Keras': patience 0 and 1 alike stop at the first
        return self.stopped

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped": self.stopped}  # fmt: skip

    @classmethod
    def from_json(cls, values: Mapping[str, Any], best_weights) -> EarlyStoppingState:
        return cls(EarlyStopping(**values["spec"]), values["best"], values["best_epoch"], values["wait"],
                   values["stopped"], best_weights)  # fmt: skip
