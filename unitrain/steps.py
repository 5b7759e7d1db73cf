"""A training step over several models and several optimizers, written once for every backend.

A GAN's step is two losses, each stepping its own optimizer, over two models that call each
other; a VAE's is one loss over a model with three outputs and random noise. A
:class:`MultiStep` says such a step as data:

- ``models``: named model specs (``Sequential`` or :class:`~unitrain.graph.Graph`);
- ``optimizers``: named optimizer specs, each over the parameters of chosen models;
- ``phases``: in order, each a :class:`Phase`: a loss (an expression of model calls) and the
  optimizer it steps.

API summary::

    from unitrain import steps
    from unitrain.optim import Adam

    gen, disc = steps.Model("generator"), steps.Model("discriminator")
    real = steps.batch()                          # the batch's x
    fake = gen(steps.normal((16, 1, 1)))          # noise drawn from the step's seeded stream
    step = steps.MultiStep(
        models={"generator": g_spec, "discriminator": d_spec},
        optimizers={"d": steps.OptimizerOver(Adam(2e-4, betas=(0.5, 0.999)), ["discriminator"]),
                    "g": steps.OptimizerOver(Adam(2e-4, betas=(0.5, 0.999)), ["generator"])},
        phases=[steps.Phase("discriminator", steps.bce(disc(real), 1.0)
                            + steps.bce(disc(steps.detach(fake)), 0.0), "d"),
                steps.Phase("generator", steps.bce(disc(fake), 1.0), "g")],
    )
    loop = steps.MultiModelLoop(step, backend="torch", seed=0)
    losses = loop.step(x)                         # {"discriminator": 1.38, "generator": 0.69}

Losses are expressions of :mod:`unitrain.expr` (the CustomLoss language: arithmetic,
``sum``/``mean``, ``expr.log``, ...) whose leaves are extended here with:

- ``("batch",)``: the batch's inputs (:func:`batch`);
- ``("noise", kind, index, shape)``: a per-sample ``shape`` of standard normal or uniform [0, 1)
  values (:func:`normal`, :func:`uniform`), drawn by the core from the step's own seeded NumPy
  stream, one array per leaf per step in ``index`` order, and handed to every backend: every
  backend sees the same noise, and a checkpoint holds the stream's state;
- ``("call", model, *arguments)``: a model called on expressions (``Model(name)(a, b)``);
  ``("output", index, call)`` picks one output of a model with several;
- ``("detach", a)``: ``a`` without its gradient (``tensor.detach()``).

Evaluation rules, the same on every backend:

- A phase zeroes the gradients of its optimizer's models, evaluates its loss (each distinct
  sub-expression once), back-propagates with the backend's own autograd, and steps its optimizer.
- A value computed in an earlier phase of the same step is reused as long as no model it calls
  has been updated since, and computed afresh otherwise: a GAN's ``fake = G(z)`` runs once per step
  (as the PyTorch tutorial's), and ``D(fake)`` after D's update runs with D's new weights. A
  module in training mode updates BatchNorm statistics at each call it makes, as in PyTorch; a
  reused value is no call.
- A model that draws noise inside itself (a graph with ``ops.randn_like``) called on its data
  inputs alone takes its noise from the step's stream: :func:`lift_model_noise`.

Construction refuses in one line (``ValueError``): a model given twice (one name twice, or one
spec under two names), an optimizer over no parameters, a model in two optimizers, a phase with
no optimizer, a loss that does not depend (other than through ``detach``) on a model its
optimizer updates, an unknown model or optimizer name, a loss that is not a scalar.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import expr
from .expr import Expr, Node
from .layers import Container
from .optim import Optimizer, optimizer_from_config

#: the kinds of noise a step draws
NOISE_KINDS = ("normal", "uniform")

_noise_counter = itertools.count()


#: the batch's node
BATCH = ("batch",)


def batch() -> Expr:
    """The batch's inputs ``x``, as the data gives them."""
    return Expr(("batch",))


def _noise(kind: str, shape) -> Expr:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"{kind}: shape must be per-sample sizes (positive integers), got {shape}")
    return Expr(("noise", kind, next(_noise_counter), shape))


def normal(shape) -> Expr:
    """Standard normal noise of per-sample ``shape`` (``torch.randn(N, *shape)``), new at each step."""
    return _noise("normal", shape)


def uniform(shape) -> Expr:
    """Uniform noise in [0, 1) of per-sample ``shape`` (``torch.rand(N, *shape)``), new at each step."""
    return _noise("uniform", shape)


def detach(value) -> Expr:
    """``value`` with its gradient stopped (``tensor.detach()``)."""
    return Expr(("detach", expr._operand(value)))


def bce(probabilities, target, reduction: str = "mean") -> Expr:
    """PyTorch's ``F.binary_cross_entropy(p, t, reduction=...)`` (logarithms floored at -100) as an
    expression; ``target`` may be a number (a GAN's real/fake label)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"bce: reduction must be 'mean' or 'sum', got {reduction!r}")
    floor = -100.0
    p = probabilities
    if isinstance(target, int | float) and target in (0, 1):  # a label: the other term is exactly 0, left out
        terms = -expr.maximum(expr.log(p if target == 1 else 1 - p), floor)
    else:
        terms = -(target * expr.maximum(expr.log(p), floor) + (1 - target) * expr.maximum(expr.log(1 - p), floor))
    return terms.mean() if reduction == "mean" else terms.sum()


class Model:
    """A named model of a :class:`MultiStep`; calling it records a call. ``outputs``: how many
    outputs the model has (a call then returns a tuple of that many expressions)."""

    def __init__(self, name: str, outputs: int = 1):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Model: name must be an identifier, got {name!r}")
        if isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < 1:
            raise ValueError(f"Model {name!r}: outputs must be a positive integer, got {outputs!r}")
        self.name, self.outputs = name, outputs

    def __call__(self, *arguments) -> Expr | tuple[Expr, ...]:
        if not arguments:
            raise ValueError(f"Model {self.name!r}: a call needs at least one input")
        call = ("call", self.name, *(expr._operand(argument) for argument in arguments))
        if self.outputs == 1:
            return Expr(call)
        return tuple(Expr(("output", index, call)) for index in range(self.outputs))


def split(node: Node) -> tuple[str, tuple[Node, ...], dict]:
    """``(op, children, static arguments)`` of any node: this module's and :mod:`unitrain.expr`'s."""
    op = node[0]
    if op == "batch":
        return op, (), {}
    if op == "noise":
        return op, (), {"kind": node[1], "index": node[2], "shape": node[3]}
    if op == "detach":
        return op, (node[1],), {}
    if op == "call":
        return op, node[2:], {"model": node[1]}
    if op == "output":
        return op, (node[2],), {"index": node[1]}
    if op not in expr.ARITY or op in ("pred", "target", "item"):  # a CustomLoss's leaves mean nothing here
        raise ValueError(f"unknown operation {op!r}")
    return expr.split(node)


def postorder(roots: Iterable[Node], children=lambda node: split(node)[1]) -> list[Node]:
    """Every distinct node under ``roots``, each after its ``children`` (the order to compute them)."""
    order, seen = [], set()

    def visit(node):
        if node in seen:
            return
        seen.add(node)
        for child in children(node):
            visit(child)
        order.append(node)

    for root in roots:
        visit(root)
    return order


def differentiable_models(node: Node) -> frozenset[str]:
    """The models whose parameters ``node``'s gradient reaches (``detach`` stops it)."""
    op, children, static = split(node)
    if op == "detach":
        return frozenset()
    reached = frozenset({static["model"]}) if op == "call" else frozenset()
    return reached.union(*(differentiable_models(child) for child in children))


def noise_leaves(roots: Iterable[Node]) -> list[Node]:
    """The noise leaves under ``roots``, in the order they are drawn (their index)."""
    return sorted((node for node in postorder(roots) if node[0] == "noise"), key=lambda node: node[2])


def _is_scalar(node: Node) -> bool:
    op, children, static = split(node)
    if op in ("batch", "noise", "call", "output"):
        return False
    if op == "const":
        return True
    if op in ("sum", "mean"):
        return static["axis"] is None or _is_scalar(children[0])
    return all(_is_scalar(child) for child in children)


@dataclass(frozen=True)
class OptimizerOver:
    """An optimizer spec over the parameters of ``models`` (names of the step's models)."""

    optimizer: Optimizer
    models: tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"OptimizerOver: expected a unitrain optimizer spec, got {self.optimizer!r}")
        models = (self.models,) if isinstance(self.models, str) else tuple(self.models)
        object.__setattr__(self, "models", models)


@dataclass(frozen=True)
class Phase:
    """One loss of the step and the optimizer it steps (``loss`` an expression, or its tree)."""

    name: str
    loss: Node
    optimizer: str | None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Phase: name must be an identifier, got {self.name!r}")
        loss = self.loss.node if isinstance(self.loss, Expr) else self.loss
        if not isinstance(loss, tuple):
            raise TypeError(f"phase {self.name!r}: the loss must be an expression of model calls, got {loss!r}")
        object.__setattr__(self, "loss", loss)


@dataclass(frozen=True, init=False)
class MultiStep:
    """Named models, named optimizers over them, and the ordered phases of one step (module doc)."""

    models: tuple[tuple[str, Container], ...]
    optimizers: tuple[tuple[str, OptimizerOver], ...]
    phases: tuple[Phase, ...]
    #: the noise leaves of all phases, in drawing order
    noise: tuple[Node, ...] = field(compare=False, repr=False)

    def __init__(self, models, optimizers, phases: Sequence[Phase]):
        models = _pairs(models, "model")
        optimizers = _pairs(optimizers, "optimizer")
        specs: dict[int, str] = {}
        for name, spec in models:
            if not isinstance(spec, Container):
                raise TypeError(f"model {name!r} is {spec!r}, expected a unitrain Sequential or Graph")
            if id(spec) in specs:
                raise ValueError(f"one model spec is given twice, as {specs[id(spec)]!r} and {name!r}; "
                                 "call one name twice to use one model twice")  # fmt: skip
            specs[id(spec)] = name
        names = dict(models)
        owner: dict[str, str] = {}
        for name, over in optimizers:
            if not isinstance(over, OptimizerOver):
                raise TypeError(f"optimizer {name!r} must be an OptimizerOver(optimizer, models), got {over!r}")
            for model in over.models:
                if model not in names:
                    raise ValueError(f"optimizer {name!r} names model {model!r}; the models are {list(names)}")
                if model in owner:
                    raise ValueError(f"model {model!r} is in two optimizers, {owner[model]!r} and {name!r}")
                owner[model] = name
            if not any(names[model].param_shapes() for model in over.models):
                raise ValueError(f"optimizer {name!r} has no parameters to update (models {list(over.models)})")
        phases = tuple(phases)
        if not phases:
            raise ValueError("MultiStep: needs at least one phase")
        for phase in phases:
            if not isinstance(phase, Phase):
                raise TypeError(f"MultiStep: phases must be Phase(name, loss, optimizer), got {phase!r}")
        phases = lift_model_noise(phases, names)
        optimizer_names = dict(optimizers)
        for phase in phases:
            _check_phase(phase, names, optimizer_names)
        if len({phase.name for phase in phases}) < len(phases):
            raise ValueError(f"MultiStep: phase names must differ, got {[phase.name for phase in phases]}")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "optimizers", optimizers)
        object.__setattr__(self, "phases", phases)
        object.__setattr__(self, "noise", tuple(noise_leaves(phase.loss for phase in phases)))

    def optimizer_models(self, optimizer: str) -> tuple[str, ...]:
        return dict(self.optimizers)[optimizer].models

    def to_dict(self) -> dict:
        """JSON-ready: every model spec, optimizer and loss tree (tuples become lists)."""
        from .graph import to_dict as layer_to_dict

        return {
            "models": [[name, layer_to_dict(spec)] for name, spec in self.models],
            "optimizers": [[name, over.optimizer.to_config(), list(over.models)] for name, over in self.optimizers],
            "phases": [[phase.name, _plain(phase.loss), phase.optimizer] for phase in self.phases],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> MultiStep:
        """The step :meth:`to_dict` gave; ``ValueError`` in one line for data of any other shape."""
        from .graph import from_dict as layer_from_dict

        try:
            return cls(
                [(name, layer_from_dict(spec)) for name, spec in data["models"]],
                [(name, OptimizerOver(optimizer_from_config(config), models)) for name, config, models in
                 data["optimizers"]],
                [Phase(name, _tree(loss), optimizer) for name, loss, optimizer in data["phases"]],
            )  # fmt: skip
        except (KeyError, TypeError, IndexError, RecursionError) as error:  # JSON of another shape, or nested deep
            raise ValueError(f"MultiStep.from_dict: the data does not fit to_dict's models, optimizers and phases: "
                             f"{type(error).__name__}: {str(error)[:200]}") from None  # fmt: skip


def _pairs(value, kind: str) -> tuple[tuple[str, object], ...]:
    """A dict or a sequence of (name, value) pairs, refusing a name given twice."""
    pairs = tuple(value.items()) if isinstance(value, Mapping) else tuple(tuple(pair) for pair in value)
    seen = set()
    for name, _ in pairs:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"MultiStep: {kind} name must be an identifier, got {name!r}")
        if name in seen:
            raise ValueError(f"MultiStep: {kind} {name!r} is named twice")
        seen.add(name)
    if not pairs:
        raise ValueError(f"MultiStep: needs at least one {kind}")
    return pairs


def _check_phase(phase: Phase, models: Mapping[str, Container], optimizers: Mapping[str, OptimizerOver]):
    where = f"phase {phase.name!r}"
    if phase.optimizer is None:
        raise ValueError(f"{where} updates no parameters: give it the name of an optimizer")
    if phase.optimizer not in optimizers:
        raise ValueError(f"{where}: no optimizer {phase.optimizer!r}; the optimizers are {list(optimizers)}")
    try:
        order = postorder([phase.loss])
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    for node in order:
        op, children, static = split(node)
        if op == "noise" and static["kind"] not in NOISE_KINDS:
            raise ValueError(f"{where}: noise of kind {static['kind']!r}; expected one of {NOISE_KINDS}")
        if op == "call":
            model = models.get(static["model"])
            if model is None:
                raise ValueError(f"{where} calls model {static['model']!r}; the models are {list(models)}")
            wanted = len(model.inputs) if hasattr(model, "inputs") else 1
            noise = getattr(model, "noise", ())  # a graph's randn_like/rand_like: its last inputs
            if len(children) != wanted:
                data = f" ({wanted - len(noise)} without its noise)" if noise else ""
                raise ValueError(f"{where} calls model {static['model']!r} with {len(children)} inputs; it takes "
                                 f"{wanted}{data}")  # fmt: skip
            for (name, kind), given in zip(noise, children[wanted - len(noise) :], strict=True):
                if given[0] == "noise" and given[1] != kind:
                    raise ValueError(f"{where} fills model {static['model']!r}'s {kind} noise {name!r} with "
                                     f"{given[1]} noise")  # fmt: skip
        elif op == "output":
            called = models[split(children[0])[2]["model"]]
            count = len(called.outputs) if hasattr(called, "outputs") else 1
            if not 0 <= static["index"] < count or count == 1:
                raise ValueError(f"{where} reads output {static['index']} of model {split(children[0])[2]['model']!r}, "
                                 f"which has {count}")  # fmt: skip
    if not _is_scalar(phase.loss):
        raise ValueError(f"{where}: the loss must be a scalar: reduce it with .sum() or .mean() over all elements")
    updated = set(optimizers[phase.optimizer].models)
    if not updated & differentiable_models(phase.loss):
        raise ValueError(f"{where}: its loss does not depend on the parameters of {sorted(updated)}, which its "
                         f"optimizer {phase.optimizer!r} updates (a detach() in the way?)")  # fmt: skip


def lift_model_noise(phases: Sequence[Phase], models: Mapping[str, Container]) -> tuple[Phase, ...]:
    """``phases`` with the noise of each model that draws its own (a graph with ``ops.randn_like``,
    see :mod:`unitrain.graph_noise`) lifted into the step: a call of such a model on its data inputs
    only gets one new noise leaf per noise input of the model, in the model's order, appended to its
    arguments, so the step's stream draws it (after the leaves written in the losses, the calls in
    the order the phases meet them). One call node is one call: a value an earlier phase computed
    and a later one reuses keeps its draw, as it keeps its dropout masks; two calls draw twice, as a
    module calling ``randn_like`` twice. Calls given every input (the noise too) stay as written."""
    lifted: dict[Node, Node] = {}

    def lift(node: Node) -> Node:
        if node not in lifted:
            op, children, static = split(node)
            new = _with_children(node, tuple(lift(child) for child in children))
            model = models.get(static["model"]) if op == "call" else None
            noise = getattr(model, "noise", ())
            if noise and len(children) == len(model.inputs) - len(noise):
                shapes = dict(model.inputs)
                new = (*new, *(_noise(kind, shapes[name]).node for name, kind in noise))
            lifted[node] = new
        return lifted[node]

    lifted_phases = []
    for phase in phases:
        try:
            lifted_phases.append(Phase(phase.name, lift(phase.loss), phase.optimizer))
        except ValueError:  # an unknown operation: kept as written, for the phase's check to name it
            lifted_phases.append(phase)
    return tuple(lifted_phases)


def predict_call(loop, arguments: Sequence):
    """A call's value outside a step (a run's pictures and test losses): ``loop.predict`` of its
    data arguments. A model that draws noise draws it as its loop's ``predict`` does
    (:mod:`unitrain.graph_noise`), not from the step's stream."""
    return loop.predict(data_arguments(loop.model_spec, arguments))


def data_arguments(model: Container, arguments: Sequence):
    """A call's ``arguments`` as the loop of ``model`` takes them (``step``'s checks, ``predict``):
    one value, or a tuple for several inputs; the data inputs alone for a model that draws noise."""
    noise = getattr(model, "noise", ())
    data = arguments[: len(model.inputs) - len(noise)] if noise else arguments
    return data[0] if len(data) == 1 else tuple(data)


def _with_children(node: Node, children: tuple[Node, ...]) -> Node:
    """``node`` with ``children`` in place of its own (``split``'s order)."""
    op = node[0]
    if op in ("batch", "noise"):
        return node
    if op in ("call", "output"):
        return (op, node[1], *children)
    if op == "detach":
        return (op, *children)
    return (op, *children, *node[1 + len(children) :])


def _plain(node):
    return [_plain(part) for part in node] if isinstance(node, tuple) else node


def _tree(value):
    return tuple(_tree(part) for part in value) if isinstance(value, list) else value


# --- the noise stream ----------------------------------------------------------------------------


class NoiseStream:
    """The step's noise: NumPy's PCG64 seeded with ``seed``, drawn in float64 and cast to the
    run's dtype, so every backend sees the same values."""

    def __init__(self, seed: int):
        self.generator = np.random.Generator(np.random.PCG64(seed))

    def draw(self, leaves: Sequence[Node], samples: int, dtype) -> dict[Node, np.ndarray]:
        drawn = {}
        for leaf in leaves:
            _, kind, _, shape = leaf
            size = (samples, *shape)
            values = self.generator.standard_normal(size) if kind == "normal" else self.generator.random(size)
            drawn[leaf] = values.astype(dtype)
        return drawn

    def state(self) -> dict:
        return self.generator.bit_generator.state

    def set_state(self, state: Mapping) -> None:
        self.generator.bit_generator.state = dict(state)


# --- running it ----------------------------------------------------------------------------------


def placeholder_loss(model: Container):
    """The per-model loops' own loss is never used (the phases' losses are): one that fits the model."""
    from .losses import MSELoss, PerOutputLoss

    outputs = len(model.outputs) if hasattr(model, "outputs") else 1
    return PerOutputLoss(*[MSELoss()] * outputs) if outputs > 1 else MSELoss()


#: each built-in backend's evaluator of phases, imported when its backend is asked for (another
#: adapter names its own ``PhaseEvaluator`` subclass as its class attribute ``multi_model_evaluator``)
EVALUATORS = {
    "numpy": "unitrain.backends.numpy_steps",
    "torch": "unitrain.backends.torch_steps",
    "chainer": "unitrain.backends.chainer_steps",
    "mindspore": "unitrain.backends.mindspore_steps",
}


def evaluator_of(adapter: type) -> type[PhaseEvaluator]:
    """The adapter's ``multi_model_evaluator`` class, or that of the built-in adapter it extends."""
    import importlib

    own = getattr(adapter, "multi_model_evaluator", None)
    if own is not None:
        return own
    for base in adapter.__mro__:
        if base.__dict__.get("name") in EVALUATORS:
            return importlib.import_module(EVALUATORS[base.__dict__["name"]]).Evaluator
    raise ValueError(f"the {adapter.name} adapter declares 'multi-model' but names no multi_model_evaluator")


def runs_data_parallel(evaluator: type[PhaseEvaluator]) -> bool:
    """Whether ``evaluator``'s ``run`` takes each phase's share of the global batch (``weights``),
    by which data parallel sums the gradients over the ranks (every built-in evaluator does)."""
    import inspect

    return "weights" in inspect.signature(evaluator.run).parameters


class PhaseEvaluator:
    """Runs the phases of a step on one backend. The order of the work, the cache of values
    and the rule that makes them stale are here, once; a backend says how to compute one node
    (:meth:`compute`) and how to back-propagate a phase's loss (:meth:`backward`)."""

    def __init__(self, step: MultiStep, loops: Mapping[str, Any]):
        self.step, self.loops = step, loops
        self.phases = [(phase, step.optimizer_models(phase.optimizer), postorder([phase.loss]))
                       for phase in step.phases]  # fmt: skip
        self.calls: dict[Node, frozenset[str]] = {}  # node -> the models it calls (stale when one changes)
        self.splits: dict[Node, tuple] = {}  # node -> split(node), once rather than at every step
        for _, _, order in self.phases:
            for node in order:
                op, children, static = self.splits[node] = split(node)
                own = {static["model"]} if op == "call" else set()
                self.calls[node] = frozenset(own).union(*(self.calls[child] for child in children))

    def run(self, x, noise: Mapping[Node, np.ndarray], weights: Sequence[float] | None = None) -> list:
        """Every phase on ``x``; ``weights`` (data parallel): each phase's share of the global batch,
        the gradients summed over the ranks with it before the update (each loop's ``update``
        would average them with equal shares)."""
        cache: dict[Node, Any] = {}
        losses = []
        for index, (phase, updated, _) in enumerate(self.phases):
            for name in updated:
                self.loops[name].zero_grad()
            self.differentiate(index, cache, x, noise)
            for name in updated:
                loop = self.loops[name]
                if weights is None:
                    loop.update()
                else:
                    loop._reduce_gradients(weights[index])
                    loop._update()
                    loop.step_count += 1
            losses.append(self.loss_value(cache[phase.loss]))
            for node in [node for node in cache if self.calls[node] & set(updated)]:
                del cache[node]
        return losses

    def differentiate(self, index: int, cache: dict, x, noise) -> None:
        """Compute phase ``index``'s nodes into ``cache`` and accumulate its loss's gradients."""
        phase, updated, order = self.phases[index]
        self.evaluate(order, cache, x, noise)
        self.backward(phase, updated, order, cache, keep=index < len(self.phases) - 1)

    def evaluate(self, order: Sequence[Node], cache: dict, x, noise) -> None:
        """The nodes of ``order`` that ``cache`` lacks, each from its children's values."""
        for node in order:
            if node not in cache:
                op, children, static = self.splits[node]
                cache[node] = self.compute(node, op, [cache[child] for child in children], static, x, noise)

    def compute(self, node: Node, op: str, arguments: list, static: dict, x, noise):
        """The value of ``node`` from its children's values."""
        raise NotImplementedError

    def backward(self, phase: Phase, updated: Sequence[str], order: list[Node], cache: dict, keep: bool) -> None:
        """Accumulate the gradient of the phase's loss into the ``updated`` models' parameters
        (``keep``: a later phase may back-propagate through the cached values again)."""
        raise NotImplementedError

    def loss_value(self, value) -> float:
        return float(value)


#: what a multi-model checkpoint holds of each model's loop: the part's getter (loaded by
#: :mod:`unitrain.state_loading`, every part checked before any is assigned)
CHECKPOINT_PARTS = {"weights": "state_dict", "optimizer": "optimizer_state_dict", "random": "random_state"}


class MultiModelLoop:
    """Runs a :class:`MultiStep` on one backend: one :class:`~unitrain.TrainingLoop` of the
    backend per model (``loops[name]``: its weights, ``state_dict``, ``save_weights``; each built
    with its optimizer's spec, and seeded ``seed + its index``) and the backend's evaluator of
    phases, which differentiates each loss with the framework's own autograd."""

    def __init__(self, step: MultiStep, backend: str | type = "numpy", *, seed: int = 0, dtype: str = "float32",
                 distributed: bool = False):  # fmt: skip
        from .registry import get_backend

        if not isinstance(step, MultiStep):
            raise TypeError(f"MultiModelLoop: expected a MultiStep, got {step!r}")
        adapter = backend if isinstance(backend, type) else get_backend(backend)
        if "multi-model" not in adapter.capabilities:
            raise ValueError(f"the {adapter.name} backend cannot run several models in one step yet "
                             "(no 'multi-model' capability)")  # fmt: skip
        self.step_spec = step
        owners = {model: over.optimizer for _, over in step.optimizers for model in over.models}
        self.loops = {
            name: adapter(spec, placeholder_loss(spec), owners.get(name), seed=seed + index, dtype=dtype,
                          distributed=distributed)
            for index, (name, spec) in enumerate(step.models)
        }  # fmt: skip
        first = next(iter(self.loops.values()))
        self.rank, self.world_size = first.rank, first.world_size
        #: data parallel: how each phase's loss adds up over the ranks' rows (phase_losses.batch_weighting)
        self._weightings = [self._weighting(phase) for phase in step.phases] if self.world_size > 1 else None
        self.dtype = np.dtype(dtype)
        #: the models called on the batch itself, which check it as their own loop's inputs
        specs = dict(step.models)
        calls = [node for phase in step.phases for node in postorder([phase.loss]) if node[0] == "call"]
        self._batch_readers = sorted({call[1] for call in calls if data_arguments(specs[call[1]], call[2:]) == BATCH})
        self.noise = NoiseStream(seed)
        self.step_count = 0
        self._fitting_shapes: set[tuple] = set()  # the batch shapes every phase was checked to fit
        self._evaluator = evaluator_of(adapter)(step, self.loops)
        if self.world_size > 1 and not runs_data_parallel(type(self._evaluator)):
            raise ValueError(f"the {adapter.name} backend runs a multi-model step in one process only")

    @staticmethod
    def _weighting(phase: Phase) -> str:
        from . import phase_losses

        try:
            return phase_losses.batch_weighting(phase.loss)
        except ValueError as error:
            raise ValueError(f"phase {phase.name!r} cannot be split over processes: {error}") from None

    def step(self, x) -> dict[str, float]:
        """One step on the batch ``x`` (one array of shape (N, ...): what ``batch`` stands for): every
        phase in order; returns each phase's loss (before its update)."""
        from .step_shapes import check_step_shapes, checked_batch

        # a wrong batch: one line (InputError) naming what was expected, before any phase runs
        x = checked_batch(x, self.dtype, self.step_spec, {name: self.loops[name] for name in self._batch_readers})
        if x.shape not in self._fitting_shapes:  # each batch shape once (a shorter last batch is another)
            check_step_shapes(self.step_spec, x.shape, world_size=self.world_size)  # alike on every rank
            self._fitting_shapes.add(x.shape)
        samples = len(x)
        noise = self.noise.draw(self.step_spec.noise, samples, self.dtype)  # every rank: the global batch's
        if self.world_size == 1:
            losses = self._evaluator.run(x, noise)
        else:  # this rank's rows of the batch and its noise; the gradients summed with each rank's share
            from .distributed import shard

            start, stop = shard(samples, self.rank, self.world_size)
            noise = {leaf: values[start:stop] for leaf, values in noise.items()}
            weights = [(stop - start) / samples if kind == "mean" else 1.0 for kind in self._weightings]
            local = self._evaluator.run(x[start:stop], noise, weights)
            first = next(iter(self.loops.values()))
            losses = [
                float(value) for value in first._all_sum(np.array([w * v for w, v in zip(weights, local, strict=True)]))
            ]
        self.step_count += 1
        return {phase.name: value for phase, value in zip(self.step_spec.phases, losses, strict=True)}

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank calls it at the same point)."""
        return next(iter(self.loops.values())).any_rank(flag)

    def state_dicts(self) -> dict[str, dict[str, np.ndarray]]:
        """Each model's weights, by model name."""
        return {name: loop.state_dict() for name, loop in self.loops.items()}

    def save_checkpoint(self, path, metadata: Mapping[str, str] | None = None) -> None:
        """Everything a resume needs in one safetensors file, written atomically: each model's
        weights, optimizer state and random stream (``<model>/<part>/<key>``), the step count and
        the noise stream's state; ``metadata``: the caller's own strings, kept beside them."""
        from .weights import save_safetensors

        tensors = {
            f"{name}/{part}/{key}": value
            for name, loop in self.loops.items()
            for part, getter in CHECKPOINT_PARTS.items()
            for key, value in getattr(loop, getter)().items()
        }
        own = {"step_count": str(self.step_count), "noise": json.dumps(self.noise.state())}
        save_safetensors(path, tensors, {**(metadata or {}), **own})

    def load_checkpoint(self, path) -> dict[str, str]:
        """Resume from a :meth:`save_checkpoint` file of the same step; the next step continues
        exactly (bit for bit on the same backend and machine). Returns the file's metadata."""
        from .randomness import PCG64_STATE
        from .reading import check_json
        from .state_loading import CHECKERS, assign
        from .weights import WeightsError, load_safetensors

        tensors, metadata = load_safetensors(path)
        parts: dict[tuple[str, str], dict[str, np.ndarray]] = {
            (name, part): {} for name in self.loops for part in CHECKPOINT_PARTS
        }
        for key, value in tensors.items():
            pieces = key.split("/", 2)
            if len(pieces) != 3 or (pieces[0], pieces[1]) not in parts:
                raise WeightsError(f"{path}: {key!r} belongs to no model and part of this step "
                                   f"(models {list(self.loops)}, parts {list(CHECKPOINT_PARTS)})")  # fmt: skip
            parts[pieces[0], pieces[1]][pieces[2]] = value
        if "step_count" not in metadata or "noise" not in metadata:
            raise WeightsError(f"{path}: not a multi-model checkpoint (no step count and noise state)")
        step_count = metadata["step_count"]
        if not (step_count.isascii() and step_count.isdigit() and len(step_count) < 19):
            raise WeightsError(f"{path}: step count {step_count[:40]!r}; expected a whole number >= 0")
        try:
            noise = json.loads(metadata["noise"])
            check_json(noise, PCG64_STATE)
        except (ValueError, RecursionError) as error:  # ValueError: bad JSON, or the schema's
            raise WeightsError(f"{path}: its noise stream is not a PCG64 state: {str(error)[:200]}") from None
        checked = {  # every part of every model first: a part refused leaves the loops as they were
            (name, part): CHECKERS[part](self.loops[name], state, f"{path} ({name} {part})")
            for (name, part), state in parts.items()
        }
        for (name, part), state in checked.items():
            assign(self.loops[name], part, state)
        self.noise.set_state(noise)
        self.step_count = int(step_count)
        return metadata

    def save_weights(self, directory) -> None:
        """Each model's weights as ``directory/<model>.safetensors`` (the directory is created)."""
        from pathlib import Path

        Path(directory).mkdir(parents=True, exist_ok=True)
        for name, loop in self.loops.items():
            loop.save_weights(Path(directory) / f"{name}.safetensors")
