"""Learning-rate schedules: PyTorch's ``torch.optim.lr_scheduler`` classes, names, arguments and
defaults, computing the same floats.

A schedule spec is a frozen value (``StepLR(step_size=1, gamma=0.7)``); :meth:`LRSchedule.start`
gives a :class:`Scheduler` for an optimizer's initial lr, which reproduces PyTorch's own
bookkeeping: the recursive ("chainable") form each ``get_lr`` uses while stepping, the closed
form where ``SequentialLR`` restarts a schedule at its milestone, the lr shared by a sequence's
schedules. Stepping is per epoch, except ``OneCycleLR``, which PyTorch documents as stepped after
every batch (:attr:`LRSchedule.per_batch`). A run's position is the number of steps taken, so a
resumed run replays the schedule to it and continues with the uninterrupted run's floats.

:func:`parse_schedule` reads the command line's ``'StepLR(step_size=1, gamma=0.7)'`` without
``eval``: the call's name must be one of :data:`SCHEDULES`, its arguments that class's, their
values Python literals (``ast.literal_eval``) or, for ``SequentialLR``, schedule calls.

``OneCycleLR(cycle_momentum=True)`` (PyTorch's default) also cycles the optimizer's momentum
(SGD's and RMSprop's ``momentum``, Adam's and AdamW's ``betas[0]``) inversely to the lr:
:attr:`Scheduler.momentum` is the value to train with now, and :func:`scheduled_optimizer` is
the optimizer as PyTorch's OneCycleLR leaves it at construction (momentum at ``max_momentum``;
one without either is refused, as PyTorch refuses it).
"""

from __future__ import annotations

import ast
import dataclasses
import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import ClassVar

from . import optim


def _number(name: str, value, low: float | None = None, high: float | None = None, *, above: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        expected = f"{'>' if above else '>='} {low}" if high is None else f"in {'(' if above else '['}{low}, {high}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class LRSchedule:
    #: stepped after every optimizer step instead of after every epoch
    per_batch: ClassVar[bool] = False

    @property
    def cycles_momentum(self) -> bool:
        """Whether the schedule also sets the optimizer's momentum (:attr:`Scheduler.momentum`)."""
        return False

    def start(self, lr: float) -> Scheduler:
        """A scheduler for an optimizer whose lr is ``lr``, at position 0."""
        return Scheduler(self, lr)

    def __str__(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class StepLR(LRSchedule):
    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        _integer("step_size", self.step_size, 1)
        _number("gamma", self.gamma, 0, above=True)


@dataclass(frozen=True)
class MultiStepLR(LRSchedule):
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __post_init__(self):
        if not isinstance(self.milestones, (list, tuple)):
            raise ValueError(f"milestones must be a list of integers, got {self.milestones!r}")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for milestone in self.milestones:
            _integer("each milestone", milestone, 0)
        _number("gamma", self.gamma, 0, above=True)


@dataclass(frozen=True)
class ExponentialLR(LRSchedule):
    gamma: float

    def __post_init__(self):
        _number("gamma", self.gamma, 0, above=True)


@dataclass(frozen=True)
class CosineAnnealingLR(LRSchedule):
    T_max: int
    eta_min: float = 0.0

    def __post_init__(self):
        _integer("T_max", self.T_max, 1)
        _number("eta_min", self.eta_min, 0)


@dataclass(frozen=True)
class LinearLR(LRSchedule):
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5

    def __post_init__(self):
        _number("start_factor", self.start_factor, 0, 1, above=True)
        _number("end_factor", self.end_factor, 0, 1)
        _integer("total_iters", self.total_iters, 1)


@dataclass(frozen=True)
class OneCycleLR(LRSchedule):
    max_lr: float
    total_steps: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False

    per_batch = True

    def __post_init__(self):
        _number("max_lr", self.max_lr, 0, above=True)
        if self.total_steps is not None:
            _integer("total_steps", self.total_steps, 1)
        elif self.epochs is not None and self.steps_per_epoch is not None:
            _integer("epochs", self.epochs, 1)
            _integer("steps_per_epoch", self.steps_per_epoch, 1)
        else:
            raise ValueError("OneCycleLR needs total_steps, or epochs and steps_per_epoch")
        if not isinstance(self.pct_start, float):  # as PyTorch: 0 and 1 must be written 0.0 and 1.0
            raise ValueError(f"pct_start must be a float in [0, 1], got {self.pct_start!r}")
        _number("pct_start", self.pct_start, 0, 1)
        if self.anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {self.anneal_strategy!r}")
        if not isinstance(self.cycle_momentum, bool):
            raise ValueError(f"cycle_momentum must be True or False, got {self.cycle_momentum!r}")
        for name in ("base_momentum", "max_momentum", "div_factor", "final_div_factor"):
            _number(name, getattr(self, name), 0, above=name.endswith("factor"))
        for name in ("base_momentum", "max_momentum") if self.cycle_momentum else ():
            # the momentum (or beta1) it sets: unitrain's optimizers take [0, 1); at 0 PyTorch's SGD and
            # RMSprop skip their momentum buffer for that step, which a compiled step cannot follow
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1) with cycle_momentum=True, got {getattr(self, name)!r}")
        if not isinstance(self.three_phase, bool):
            raise ValueError(f"three_phase must be True or False, got {self.three_phase!r}")

    @property
    def cycles_momentum(self) -> bool:
        return self.cycle_momentum

    @property
    def steps(self) -> int:
        """The number of steps the schedule is defined for (PyTorch raises after more)."""
        return self.total_steps if self.total_steps is not None else self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class SequentialLR(LRSchedule):
    schedulers: tuple[LRSchedule, ...]
    milestones: tuple[int, ...]

    def __post_init__(self):
        if not isinstance(self.schedulers, (list, tuple)) or not self.schedulers:
            raise ValueError(f"schedulers must be a non-empty list of schedules, got {self.schedulers!r}")
        if not isinstance(self.milestones, (list, tuple)):
            raise ValueError(f"milestones must be a list of integers, got {self.milestones!r}")
        object.__setattr__(self, "schedulers", tuple(self.schedulers))
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for schedule in self.schedulers:
            if not isinstance(schedule, LRSchedule) or schedule.per_batch:
                raise ValueError(f"schedulers must be per-epoch schedules, got {schedule!r}")
        for milestone in self.milestones:
            _integer("each milestone", milestone, 1)
        if len(self.milestones) != len(self.schedulers) - 1:
            raise ValueError(f"SequentialLR needs one milestone fewer than schedulers, got "
                             f"{len(self.schedulers)} schedulers and {len(self.milestones)} milestones")  # fmt: skip


SCHEDULES = {cls.__name__: cls for cls in (StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, LinearLR,
                                           OneCycleLR, SequentialLR)}  # fmt: skip


def scheduled_optimizer(optimizer: optim.Optimizer, schedule: LRSchedule | None) -> optim.Optimizer:
    """The optimizer as ``schedule`` leaves it at construction, whose structure (which buffers,
    :attr:`~unitrain.optim.Optimizer.state_names`) the updates follow: ``optimizer`` itself, but with
    its momentum (Adam's ``betas[0]``) at ``max_momentum`` under a schedule that cycles it, as
    PyTorch's OneCycleLR sets it (so SGD or RMSprop without momentum gets a momentum buffer).
    ValueError, as PyTorch, for an optimizer without ``momentum`` or ``betas``."""
    if schedule is None or not schedule.cycles_momentum:
        return optimizer
    if optim.momentum(optimizer) is None:
        raise ValueError(f"{type(schedule).__name__} with cycle_momentum=True (PyTorch's default) cycles the "
                         f"optimizer's momentum, which {type(optimizer).__name__} does not have (SGD, RMSprop, Adam "
                         "and AdamW do); pass cycle_momentum=False")  # fmt: skip
    return optim.with_momentum(optimizer, schedule.max_momentum)


def check_schedule_length(schedule: LRSchedule | None, epochs: int, steps_per_epoch: int,
                          max_steps: int | None) -> None:  # fmt: skip
    """OneCycleLR is defined for its total_steps only (PyTorch raises past them): ValueError for a
    run of ``epochs`` of ``steps_per_epoch`` (at most ``max_steps``) that would go past them."""
    planned_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    if schedule is not None and schedule.per_batch and planned_steps > schedule.steps:
        raise ValueError(f"{type(schedule).__name__} covers {schedule.steps} steps, but the run takes up to "
                         f"{planned_steps}; raise total_steps (or epochs/steps_per_epoch), or lower "
                         "--max-steps/--epochs")  # fmt: skip


# --- PyTorch's bookkeeping ----------------------------------------------------------------------


class _Group:
    """An optimizer's param_group as the schedulers see it: the lr they share and ``initial_lr``
    (plus OneCycleLR's ``max_lr`` and ``min_lr``; cycling momentum, ``momentum`` and its bounds)."""

    def __init__(self, lr: float):
        self.lr, self.initial_lr = lr, None
        self.momentum = self.base_momentum = self.max_momentum = None


def _running(spec: LRSchedule, group: _Group):
    return _Sequence(spec, group) if isinstance(spec, SequentialLR) else _Running(spec, group)


class _Running:
    """One ``torch.optim.lr_scheduler.LRScheduler``: ``last_epoch``, ``_step_count``, the
    initial step at construction, ``get_lr`` (recursive) and ``_get_closed_form_lr``."""

    def __init__(self, spec: LRSchedule, group: _Group):
        self.spec, self.group = spec, group
        if isinstance(spec, OneCycleLR):
            group.initial_lr = spec.max_lr / spec.div_factor
            group.max_lr, group.min_lr = spec.max_lr, group.initial_lr / spec.final_div_factor
            if spec.cycle_momentum:  # PyTorch sets the optimizer's momentum to max_momentum first
                group.momentum = group.max_momentum = spec.max_momentum
                group.base_momentum = spec.base_momentum
        elif group.initial_lr is None:
            group.initial_lr = group.lr
        self.base_lr = group.initial_lr
        self.last_epoch = -1
        self.initial_step()

    def initial_step(self):
        self.step_count = 0
        self.initial = True
        self.step()
        self.initial = False

    def step(self):
        self.step_count += 1
        self.last_epoch += 1
        self.group.lr = self.recursive()

    def restart(self):
        """``_update_lr(0)``: SequentialLR's jump to a schedule at its milestone (closed form)."""
        self.last_epoch = 0
        self.group.lr = self.closed()

    def recursive(self) -> float:
        spec, lr, epoch = self.spec, self.group.lr, self.last_epoch
        if isinstance(spec, StepLR):
            return lr if epoch == 0 or epoch % spec.step_size else lr * spec.gamma
        if isinstance(spec, MultiStepLR):
            count = spec.milestones.count(epoch)
            return lr * spec.gamma**count if count else lr
        if isinstance(spec, ExponentialLR):
            return lr if self.initial else lr * spec.gamma
        if isinstance(spec, CosineAnnealingLR):
            if self.initial:
                return lr
            if self.step_count == 1 and epoch > 0:
                return spec.eta_min + (self.base_lr - spec.eta_min) * (1 + math.cos(epoch * math.pi / spec.T_max)) / 2
            if (epoch - 1 - spec.T_max) % (2 * spec.T_max) == 0:
                return lr + (self.base_lr - spec.eta_min) * (1 - math.cos(math.pi / spec.T_max)) / 2
            ratio = (1 + math.cos(math.pi * epoch / spec.T_max)) / (1 + math.cos(math.pi * (epoch - 1) / spec.T_max))
            return ratio * (lr - spec.eta_min) + spec.eta_min
        if isinstance(spec, LinearLR):
            if epoch == 0:
                return lr * spec.start_factor
            if self.initial or epoch > spec.total_iters:
                return lr
            change = spec.end_factor - spec.start_factor
            return lr * (1.0 + change / (spec.total_iters * spec.start_factor + (epoch - 1) * change))
        return self._one_cycle()

    def closed(self) -> float:
        spec, base, epoch = self.spec, self.base_lr, self.last_epoch
        if isinstance(spec, StepLR):
            return base * spec.gamma ** (epoch // spec.step_size)
        if isinstance(spec, MultiStepLR):
            return base * spec.gamma ** bisect_right(sorted(spec.milestones), epoch)
        if isinstance(spec, ExponentialLR):
            return base * spec.gamma**epoch
        if isinstance(spec, CosineAnnealingLR):
            return spec.eta_min + (base - spec.eta_min) * (1 + math.cos(math.pi * epoch / spec.T_max)) / 2
        if isinstance(spec, LinearLR):
            change = spec.end_factor - spec.start_factor
            return base * (spec.start_factor + change * min(spec.total_iters, epoch) / spec.total_iters)
        return self._one_cycle()

    def _one_cycle(self) -> float:
        """OneCycleLR's ``get_lr``: the lr of step ``last_epoch`` and, when it cycles momentum, the
        momentum it sets on the group as it goes (both from the same phase and fraction of it)."""
        spec, group, step = self.spec, self.group, self.last_epoch
        total = spec.steps
        if step > total:
            raise ValueError(f"OneCycleLR stepped {step} times, past its total_steps {total}")
        low, high = group.base_momentum, group.max_momentum
        ends = [float(spec.pct_start * total) - 1]
        lrs = [(group.initial_lr, group.max_lr)]
        momenta = [(high, low)]
        if spec.three_phase:
            ends.append(float(2 * spec.pct_start * total) - 2)
            lrs += [(group.max_lr, group.initial_lr), (group.initial_lr, group.min_lr)]
            momenta += [(low, high), (high, high)]
        else:
            lrs.append((group.max_lr, group.min_lr))
            momenta.append((low, high))
        ends.append(total - 1)
        start_step = 0.0
        for i, end_step in enumerate(ends):
            if step <= end_step or i == len(ends) - 1:
                pct = (step - start_step) / (end_step - start_step)
                if spec.cycle_momentum:
                    group.momentum = _anneal(spec.anneal_strategy, *momenta[i], pct)
                return _anneal(spec.anneal_strategy, *lrs[i], pct)
            start_step = end_step
        raise AssertionError("unreachable: the last phase always matches")


def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
    """OneCycleLR's ``_annealing_cos`` / ``_annealing_linear``: from ``start`` to ``end`` as ``pct``
    goes from 0 to 1."""
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


class _Sequence:
    """``SequentialLR``: its schedules built in order on the shared lr, then reset to the first."""

    def __init__(self, spec: SequentialLR, group: _Group):
        self.spec, self.group = spec, group
        self.children = [_running(child, group) for child in spec.schedulers]
        self.last_epoch = 0
        group.lr = group.initial_lr
        self.undo()
        self.children[bisect_right(spec.milestones, 0)].initial_step()

    def undo(self):  # PyTorch's recursive_undo
        for child in self.children:
            if isinstance(child, _Sequence):
                child.undo()
            else:
                child.last_epoch -= 1

    def initial_step(self):
        raise ValueError("a SequentialLR inside a SequentialLR cannot be restarted at a milestone")

    restart = initial_step

    def step(self):
        self.last_epoch += 1
        index = bisect_right(self.spec.milestones, self.last_epoch)
        child = self.children[index]
        if index > 0 and self.spec.milestones[index - 1] == self.last_epoch:
            child.restart()
        else:
            child.step()


class Scheduler:
    """A schedule running from an optimizer's initial lr: :attr:`lr` is the lr to train with
    now (:attr:`momentum` too, where the schedule cycles it), :meth:`step` advances it,
    :attr:`position` counts the steps taken."""

    def __init__(self, spec: LRSchedule, lr: float):
        self.spec, self.initial_lr = spec, lr
        self._restart()

    def _restart(self):
        self._group = _Group(self.initial_lr)
        self._root = _running(self.spec, self._group)
        self.position = 0

    @property
    def lr(self) -> float:
        return self._group.lr

    @property
    def momentum(self) -> float | None:
        """The optimizer's momentum (Adam's ``betas[0]``) now; ``None`` unless the schedule cycles it."""
        return self._group.momentum

    def step(self) -> float:
        self._root.step()
        self.position += 1
        return self.lr

    def seek(self, position: int) -> float:
        """Replay from the start to ``position`` (PyTorch's floats depend on the path)."""
        _integer("schedule position", position, 0)
        if position < self.position:
            self._restart()
        while self.position < position:
            self.step()
        return self.lr


# --- the command line's form ---------------------------------------------------------------------

#: a schedule written on a command line is short; anything far longer is not one
_MAX_TEXT = 2000


def parse_schedule(text: str) -> LRSchedule:
    """``'StepLR(step_size=1, gamma=0.7)'`` as a spec, without ``eval``; ValueError (one line,
    naming the problem) on anything else."""
    if len(text) > _MAX_TEXT:
        raise ValueError(f"a schedule is at most {_MAX_TEXT} characters, got {len(text)}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError(f"{text!r} is not a schedule call like 'StepLR(step_size=1, gamma=0.7)'") from None
    try:
        return _schedule(tree.body)
    except RecursionError:
        raise ValueError(f"{text[:80]!r}... is nested too deeply") from None


def _schedule(node: ast.AST) -> LRSchedule:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"{ast.unparse(node)[:200]!r} is not a schedule call like 'StepLR(step_size=1, gamma=0.7)'")
    name = node.func.id
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name[:100]!r}; expected one of {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    names = [field.name for field in dataclasses.fields(cls)]
    if len(node.args) > len(names):
        raise ValueError(f"{name} takes at most {len(names)} arguments ({', '.join(names)}), got {len(node.args)}")
    arguments = {key: _value(value) for key, value in zip(names, node.args, strict=False)}
    for keyword in node.keywords:
        if keyword.arg not in names:
            given = "**" if keyword.arg is None else repr(keyword.arg[:100])
            raise ValueError(f"{name} has no argument {given}; its arguments: {', '.join(names)}")
        if keyword.arg in arguments:
            raise ValueError(f"{name} got {keyword.arg!r} twice")
        arguments[keyword.arg] = _value(keyword.value)
    missing = [field.name for field in dataclasses.fields(cls)
               if field.default is dataclasses.MISSING and field.name not in arguments]  # fmt: skip
    if missing:
        raise ValueError(f"{name} needs {', '.join(missing)}")
    try:
        return cls(**arguments)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _value(node: ast.AST):
    if isinstance(node, ast.Call):
        return _schedule(node)
    if isinstance(node, (ast.List, ast.Tuple)) and any(isinstance(item, ast.Call) for item in node.elts):
        return tuple(_value(item) for item in node.elts)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError):
        raise ValueError(f"{ast.unparse(node)[:200]!r} is not a literal value") from None
