"""The checks. Each is a function of the adapter class; it builds its own small loops, compares
them with :mod:`.reference` and raises :class:`CheckFailure` with what was expected, what came
out, the max error and the tolerance. Capability tags a check needs are declared with it; an
adapter lacking one gets a skip naming it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unitrain import layers, sequences
from unitrain.data import ArrayDataset, load_mnist
from unitrain.loop import CAPABILITIES, TrainingLoop
from unitrain.losses import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    CustomLoss,
    HuberLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
)
from unitrain.optim import SGD, Adadelta, Adagrad, Adam, AdamW, RMSprop
from unitrain.schedules import StepLR, parse_schedule

from . import reference, tolerances
from .reference import F64


class CheckFailure(AssertionError):
    """A check found the adapter wrong; ``max_error``/``tolerance`` are set for numeric mismatches."""

    def __init__(self, message: str, max_error: float | None = None, tolerance: float | None = None):
        super().__init__(message)
        self.message, self.max_error, self.tolerance = message, max_error, tolerance


class CheckSkipped(Exception):
    """The check does not apply to this adapter; the argument says why."""


@dataclass(frozen=True)
class Check:
    name: str
    function: Callable[[type[TrainingLoop]], None]
    requires: frozenset[str]

    @property
    def summary(self) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join(inspect.getdoc(self.function).split("\n\n")[0].split())

    def __call__(self, adapter: type[TrainingLoop]) -> _Record:
        """Run the check; returns its comparison nearest to tolerance."""
        missing = sorted(self.requires - adapter.capabilities)
        if missing:
            raise CheckSkipped(f"needs capability {', '.join(missing)}, which {adapter.__name__} does not declare")
        record = _Record(self.name)
        token = _current.set(record)
        try:
            self.function(adapter)
        finally:
            _current.reset(token)
        return record


#: every check by name, in the order they run
CHECKS: dict[str, Check] = {}


def check(*requires: str):
    """Register the decorated function as a check needing the capabilities ``requires``."""
    unknown = set(requires) - CAPABILITIES
    assert not unknown, unknown

    def register(function):
        CHECKS[function.__name__] = Check(function.__name__, function, frozenset(requires))
        return function

    return register


# --- comparing --------------------------------------------------------------------------------


class _Record:
    """The running check's name and the comparison nearest to its tolerance."""

    def __init__(self, name: str):
        self.name, self.max_error, self.tolerance = name, None, None

    def note(self, error: float, tolerance: float) -> None:
        ratio = error / tolerance if tolerance else (math.inf if error else 0.0)
        best = self.max_error / self.tolerance if self.tolerance else (math.inf if self.max_error else -1.0)
        if self.max_error is None or ratio > best:
            self.max_error, self.tolerance = error, tolerance


_current: contextvars.ContextVar[_Record] = contextvars.ContextVar("conformance_check")


def fail(message: str, max_error: float | None = None, tolerance: float | None = None):
    """Fail the running check with ``message`` (and the error against its tolerance)."""
    raise CheckFailure(message, max_error, tolerance)


def compare(what: str, got, expected, *, dtype, size: float, scale: float | None = None) -> None:
    """``got`` within :func:`tolerances.tolerance` of ``expected`` (``size`` rounded operations on
    values of magnitude ``scale``, by default the largest expected value)."""
    got, expected = np.asarray(got), np.asarray(expected, F64)
    if got.shape != expected.shape:
        fail(f"{what}: expected shape {expected.shape}, got shape {got.shape}")
    record = _current.get()
    if scale is None:
        scale = float(np.abs(expected).max()) if expected.size else 0.0
    _within(what, got, expected, tolerances.tolerance(dtype, size, scale, record.name))


def compare_exact(what: str, got, expected) -> None:
    """Bit-for-bit equality, dtype included."""
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        fail(f"{what}: expected shape {expected.shape}, got shape {got.shape}")
    if got.dtype != expected.dtype:
        fail(f"{what}: expected dtype {expected.dtype}, got dtype {got.dtype}")
    _within(what, got, expected, 0.0, " (must be bit-exact)")


def _within(what, got, expected, tolerance, note=""):
    diff = np.array(np.abs(got.astype(F64) - expected.astype(F64)))  # an array even when 0-d
    diff[np.isnan(diff) | (np.isnan(got) != np.isnan(expected))] = math.inf
    diff[np.isnan(got) & np.isnan(expected)] = 0.0
    error = float(diff.max()) if diff.size else 0.0
    _current.get().note(error, tolerance)
    if error > tolerance:
        index = np.unravel_index(int(np.argmax(diff)), diff.shape)
        where = f" at index {tuple(int(i) for i in index)}" if diff.ndim else ""
        fail(
            f"{what}: expected {float(expected[index]):.6g}, got {float(got[index]):.6g}{where}; "
            f"max error {error:.3g} > tolerance {tolerance:.3g}{note}",
            error,
            tolerance,
        )


def compare_states(what: str, got: dict, expected: dict, *, dtype=None, size: float = 0) -> None:
    """Same keys; values within tolerance (``dtype`` given) or bit-exact."""
    if list(got) != list(expected):
        missing = [k for k in expected if k not in got]
        extra = [k for k in got if k not in expected]
        if missing or extra:
            fail(f"{what}: expected keys {list(expected)}, got {list(got)} (missing {missing}, unexpected {extra})")
    for key in expected:
        if dtype is None:
            compare_exact(f"{what} {key!r}", got[key], expected[key])
        else:
            compare(f"{what} {key!r}", got[key], expected[key], dtype=dtype, size=size)


def expect_error(what: str, action: Callable[[], object], *needles: str, kind=ValueError) -> None:
    """``action`` raises ``kind`` whose message contains every needle."""
    try:
        action()
    except kind as error:
        message = str(error)
        absent = [n for n in needles if n not in message]
        if absent:
            fail(f"{what}: the error message {message!r} does not mention {absent}")
        return
    except Exception as error:
        fail(f"{what}: expected {kind.__name__}, got {type(error).__name__}: {error}")
    fail(f"{what}: expected {kind.__name__}, nothing was raised")


# --- models and data ------------------------------------------------------------------------


def dense_model() -> layers.Sequential:
    """Input ``(N, 3, 4)``."""
    return layers.Sequential(layers.Flatten(), layers.Linear(12, 10), layers.ReLU(), layers.Linear(10, 4))


def conv_model() -> layers.Sequential:
    """Input ``(N, 2, 9, 9)``: padding, overlapping pooling windows and a strided convolution."""
    return layers.Sequential(
        layers.Conv2d(2, 3, 3, padding=1), layers.ReLU(), layers.MaxPool2d(3, stride=2),
        layers.Conv2d(3, 4, 2, stride=2), layers.ReLU(), layers.Flatten(), layers.Linear(16, 4),
    )  # fmt: skip


def dropout_model() -> layers.Sequential:
    """Input ``(N, 3, 4)``."""
    return layers.Sequential(
        layers.Flatten(), layers.Linear(12, 10), layers.ReLU(), layers.Dropout(0.5), layers.Linear(10, 4)
    )


def batchnorm_model() -> layers.Sequential:
    """Input ``(N, 6)``."""
    return layers.Sequential(
        layers.Linear(6, 8), layers.BatchNorm1d(8, momentum=0.2), layers.ReLU(), layers.Linear(8, 4)
    )


def batchnorm2d_model() -> layers.Sequential:
    """Input ``(N, 2, 5, 5)``."""
    return layers.Sequential(
        layers.Conv2d(2, 3, 3), layers.BatchNorm2d(3, eps=1e-3), layers.ReLU(), layers.Flatten(), layers.Linear(27, 4)
    )


DENSE_FAN_IN = 12
CONV_FAN_IN = 27  # the largest number of products summed into one output (3 channels x 3 x 3)


def inputs(shape, seed: int = 0, n: int = 8) -> np.ndarray:
    """``n`` float32 samples of ``shape``, standard normal from ``seed``."""
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def labels(n: int = 8, classes: int = 4, seed: int = 0) -> np.ndarray:
    """``n`` int64 class indices below ``classes``, from ``seed``."""
    return np.random.default_rng(seed + 100).integers(0, classes, n).astype(np.int64)


def loaded(adapter, model, state, **options) -> TrainingLoop:
    """A loop of ``adapter`` on ``model`` holding the weights ``state``."""
    loop = adapter(model, **options)
    loop.load_state_dict(state)
    return loop


def state_of(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float64 weights of ``model`` from ``seed`` (the reference's draw)."""
    return reference.random_state(model, np.random.default_rng(seed))


def params_of(loop: TrainingLoop) -> dict[str, np.ndarray]:
    """The loop's trainable parameters (no buffers), by name."""
    state = loop.state_dict()
    return {key: state[key] for key in loop.model_spec.param_shapes()}


def tutorial_gradients(loop: TrainingLoop, x, y) -> float:
    """zero_grad, forward, loss, backward; returns the loss."""
    loop.zero_grad()
    value = loop.loss(loop.forward(x), y)
    loop.backward(value)
    return loop.to_float(value)


# --- 1. protocol surface ------------------------------------------------------------------------

PUBLIC_METHODS = (
    "zero_grad", "forward", "loss", "backward", "update", "step", "train", "eval", "predict", "evaluate", "fit",
    "state_shapes", "state_dict", "gradients", "load_state_dict", "save_weights", "load_weights",
    "optimizer_state_dict", "load_optimizer_state_dict", "random_state", "load_random_state", "to_float",
    "is_native_model", "native_example_model",
)  # fmt: skip


@check()
def check_protocol_surface(adapter):
    """Every method and attribute of the protocol exists with the documented signature."""
    if not (isinstance(adapter, type) and issubclass(adapter, TrainingLoop)):
        fail(f"{adapter!r} is not a TrainingLoop subclass")
    if getattr(adapter, "__abstractmethods__", None):
        fail(f"{adapter.__name__} leaves hooks unimplemented: {sorted(adapter.__abstractmethods__)}")
    if not isinstance(adapter.name, str) or not adapter.name:
        fail(f"{adapter.__name__}.name must be a non-empty string, got {adapter.name!r}")
    if not isinstance(adapter.capabilities, frozenset) or not adapter.capabilities <= CAPABILITIES:
        fail(f"{adapter.__name__}.capabilities must be a frozenset within {sorted(CAPABILITIES)}, "
             f"got {adapter.capabilities!r}")  # fmt: skip
    if not isinstance(adapter.conformance_xfails, dict):
        fail(f"{adapter.__name__}.conformance_xfails must be a dict, got {adapter.conformance_xfails!r}")
    for name in ("__init__", *PUBLIC_METHODS):
        expected = inspect.signature(getattr(TrainingLoop, name))
        got = inspect.signature(getattr(adapter, name))
        if [(p.name, p.kind, p.default) for p in got.parameters.values()] != [
            (p.name, p.kind, p.default) for p in expected.parameters.values()
        ]:
            fail(f"{adapter.__name__}.{name}{got} differs from the protocol's {name}{expected}")
    loop = adapter(dense_model(), seed=0)
    facts = {"training": (loop.training, True), "step_count": (loop.step_count, 0), "seed": (loop.seed, 0),
             "dtype": (loop.dtype, np.dtype(np.float32))}  # fmt: skip
    for attribute, (got, expected) in facts.items():
        if got != expected:
            fail(f"a new loop's {attribute} is {got!r}, expected {expected!r}")


# --- 2-3. forward -------------------------------------------------------------------------------


def _mode_model(adapter) -> layers.Sequential:
    """Input ``(N, 6)``: BatchNorm and Dropout (where the adapter has them) nested one level down,
    inside a Residual's body where the adapter has branches."""
    extra = [layers.BatchNorm1d(8)] if "batchnorm" in adapter.capabilities else []
    extra += [layers.Dropout(0.5)] if "dropout" in adapter.capabilities else []
    middle = layers.Sequential(*extra, layers.ReLU())
    if "residual" in adapter.capabilities:
        middle = layers.Residual(middle, post=layers.ReLU())
    return layers.Sequential(layers.Linear(6, 8), middle, layers.Linear(8, 4))


@check()
def check_eval_forward_deterministic(adapter):
    """Eval-mode outputs are bitwise equal for the same weights and input (dropout/BatchNorm included)."""
    model = _mode_model(adapter)
    loop = loaded(adapter, model, state_of(model))
    x = inputs((6,))
    first = loop.predict(x)
    compare_exact("predict() called twice", loop.predict(x), first)
    loop.eval()
    compare_exact("predict() in eval mode vs. in training mode", loop.predict(x), first)
    compare_exact("a second loop with the same weights", loaded(adapter, model, state_of(model)).predict(x), first)


def _check_forward(adapter, model, input_shape, size):
    state = state_of(model)
    loop = loaded(adapter, model, state)
    x = inputs(input_shape)
    compare("predict()", loop.predict(x), reference.Reference(model, state).forward(x), dtype=loop.dtype, size=size)


@check()
def check_forward_dense(adapter):
    """Flatten, Linear and ReLU match the reference forward."""
    _check_forward(adapter, dense_model(), (3, 4), DENSE_FAN_IN)


@check("conv")
def check_forward_conv(adapter):
    """Conv2d (padding, stride) and MaxPool2d (overlapping windows) match the reference forward."""
    _check_forward(adapter, conv_model(), (2, 9, 9), CONV_FAN_IN)


@check("dropout")
def check_forward_dropout_eval(adapter):
    """Dropout is the identity in eval mode."""
    model = layers.Sequential(layers.Linear(6, 8), layers.ReLU(), layers.Dropout(0.5), layers.Linear(8, 4))
    _check_forward(adapter, model, (6,), 8)


@check("batchnorm")
def check_forward_batchnorm_eval(adapter):
    """BatchNorm1d/2d in eval mode normalise with the running statistics, as the reference does."""
    _check_forward(adapter, batchnorm_model(), (6,), 8)
    if "conv" in adapter.capabilities:
        _check_forward(adapter, batchnorm2d_model(), (2, 5, 5), CONV_FAN_IN)


@check("batchnorm")
def check_forward_batchnorm_train(adapter):
    """BatchNorm in training mode (batch statistics): loss and gradients match the reference."""
    model = batchnorm_model()
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=MSELoss(reduction="sum"))
    x, target = inputs((6,)), inputs((4,), seed=1)
    ref = reference.Reference(model, state)
    expected, grad = reference.loss(loop.loss_spec, ref.forward(x, training=True), target)
    got = tutorial_gradients(loop, x, target)
    compare("training-mode loss", got, expected, dtype=loop.dtype, size=32)
    compare_states("gradient", loop.gradients(), ref.backward(grad), dtype=loop.dtype, size=64)


# --- 4. losses --------------------------------------------------------------------------------


def _identity_loop(adapter, loss):
    """A loop whose forward returns its input exactly: one Linear with identity weights."""
    model = layers.Sequential(layers.Linear(5, 5))
    return loaded(adapter, model, {"0.weight": np.eye(5, dtype=np.float32), "0.bias": np.zeros(5, np.float32)},
                  loss=loss)  # fmt: skip


@check()
def check_losses(adapter):
    """Cross-entropy, NLL and MSE with mean and sum reduction match their closed forms."""
    pred = (3 * inputs((5,), seed=2)).astype(np.float32)
    for spec in (CrossEntropyLoss, NLLLoss, MSELoss):
        target = inputs((5,), seed=3) if spec is MSELoss else labels(classes=5)
        for reduction in ("mean", "sum"):
            loop = _identity_loop(adapter, spec(reduction=reduction))
            expected, _ = reference.loss(loop.loss_spec, pred, target)
            got = loop.to_float(loop.loss(loop.forward(pred), target))
            compare(f"{spec.__name__}(reduction={reduction!r})", got, expected, dtype=loop.dtype, size=40)
        per_sample = reference.loss_terms(loop.loss_spec, pred, target)[0].mean()
        compare(f"{spec.__name__} evaluate()['loss']", loop.evaluate((pred, target))["loss"], per_sample,
                dtype=loop.dtype, size=40)  # fmt: skip


@check()
def check_loss_extreme_logits(adapter):
    """Cross-entropy of logits of magnitude 1e4 is finite and exact, and so are its gradients."""
    pred = np.array([[1e4, -1e4, 0, 0, 0], [-1e4, 1e4, 0, 0, 0], [0, 0, 1e4, 1e4, -1e4]], np.float32)
    target = np.array([0, 0, 4])
    loop = _identity_loop(adapter, CrossEntropyLoss())
    expected, grad = reference.loss(loop.loss_spec, pred, target)
    got = tutorial_gradients(loop, pred, target)
    compare("cross-entropy of extreme logits", got, expected, dtype=loop.dtype, size=5)
    # log-softmax subtracts numbers of magnitude 1e4: float32 keeps ~1e4 * eps of absolute accuracy
    compare("gradient '0.bias' for extreme logits", loop.gradients()["0.bias"], grad.sum(0), dtype=loop.dtype, size=5,
            scale=1e4)  # fmt: skip


# --- 5. gradients -------------------------------------------------------------------------------


def _check_gradients(adapter, model, input_shape, loss, size):
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=loss)
    x = inputs(input_shape)
    y = inputs((4,), seed=1) if isinstance(loss, MSELoss) else labels()
    ref = reference.Reference(model, state)
    expected, grad = reference.loss(loss, ref.forward(x, training=True), y)
    compare(f"{type(loss).__name__} loss", tutorial_gradients(loop, x, y), expected, dtype=loop.dtype, size=size)
    compare_states(f"{type(loss).__name__} gradient", loop.gradients(), ref.backward(grad), dtype=loop.dtype,
                   size=size * 8)  # fmt: skip


@check()
def check_gradients(adapter):
    """Gradients of every parameter match the reference for cross-entropy, NLL (sum) and MSE."""
    for loss in (CrossEntropyLoss(), NLLLoss(reduction="sum"), MSELoss()):
        _check_gradients(adapter, dense_model(), (3, 4), loss, DENSE_FAN_IN)


@check("conv")
def check_gradients_conv(adapter):
    """Gradients through Conv2d and MaxPool2d match the reference."""
    _check_gradients(adapter, conv_model(), (2, 9, 9), CrossEntropyLoss(), CONV_FAN_IN)


@check("float64")
def check_gradients_finite_differences(adapter):
    """In float64, gradients match central finite differences of the adapter's own loss."""
    model = dense_model()
    state = {k: v.astype(F64) for k, v in state_of(model).items()}
    loop = loaded(adapter, model, state, loss=CrossEntropyLoss(reduction="sum"), dtype="float64")
    x, y = inputs((3, 4)).astype(F64), labels()
    tutorial_gradients(loop, x, y)
    gradients = loop.gradients()
    rng = np.random.default_rng(5)
    h = tolerances.FINITE_DIFFERENCE_STEP
    for key in state:
        for flat in rng.choice(state[key].size, 3, replace=False):
            index = np.unravel_index(flat, state[key].shape)
            values = []
            for sign in (1, -1):
                shifted = {k: v.copy() for k, v in state.items()}
                shifted[key][index] += sign * h
                loop.load_state_dict(shifted)
                values.append(loop.to_float(loop.loss(loop.forward(x), y)))
            numeric = (values[0] - values[1]) / (2 * h)
            tol = tolerances.FINITE_DIFFERENCE_TOLERANCE * max(1.0, abs(numeric))
            _within(f"gradient {key!r}{tuple(int(i) for i in index)} vs. central difference",
                    np.asarray(gradients[key][index]), np.asarray(numeric), tol)  # fmt: skip


# --- 6-7. optimizers ------------------------------------------------------------------------------


def _optimizer_steps(adapter, spec, steps=3, loop=None, ref_optimizer=None, buffers=True):
    """``steps`` tutorial steps; after each, parameters and optimizer buffers must equal the
    reference optimizer applied to the same gradients. Returns the loop and the reference."""
    model = dense_model()
    loop = loop or loaded(adapter, model, state_of(model), optimizer=spec)
    ref_optimizer = ref_optimizer or reference.Optimizer(spec)
    params = {k: v.astype(F64) for k, v in params_of(loop).items()}
    for step in range(1, steps + 1):
        tutorial_gradients(loop, inputs((3, 4), seed=step), labels(seed=step))
        params = ref_optimizer.update(params, loop.gradients())
        loop.update()
        label = f"{spec} step {step}"
        compare_states(f"{label}: parameter", params_of(loop), params, dtype=loop.dtype, size=4 * step)
        if not buffers:
            continue
        state = loop.optimizer_state_dict()
        if int(state.get("step", -1)) != loop.step_count:
            fail(f"{label}: optimizer_state_dict()['step'] is {state.get('step')}, expected {loop.step_count}")
        for key, value in ref_optimizer.state.items():
            if key not in state:
                fail(f"{label}: optimizer_state_dict() lacks {key!r}")
            compare(f"{label}: {key}", state[key], value, dtype=loop.dtype, size=4 * step)
    return loop, ref_optimizer


@check()
def check_sgd_updates(adapter):
    """Plain SGD, with and without weight decay: 3 steps match the closed form."""
    _optimizer_steps(adapter, SGD(lr=0.1))
    _optimizer_steps(adapter, SGD(lr=0.1, weight_decay=0.05))


@check()
def check_sgd_momentum(adapter):
    """SGD with momentum (and dampening, weight decay): parameters and momentum buffers match."""
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9))
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01))


@check()
def check_sgd_nesterov(adapter):
    """Nesterov momentum with weight decay matches the closed form."""
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01))


@check()
def check_sgd_momentum_new_lr(adapter):
    """Resuming momentum SGD from saved weights and optimizer state with a new learning rate continues
    PyTorch's trajectory.

    The momentum buffer must hold gradients, not velocities with the old lr folded in (Chainer's
    convention). Only parameters are compared here; buffers are check_sgd_momentum's."""
    first = SGD(lr=0.1, momentum=0.9)
    loop, ref_optimizer = _optimizer_steps(adapter, first, steps=2, buffers=False)
    second = SGD(lr=0.02, momentum=0.9)
    resumed = loaded(adapter, dense_model(), loop.state_dict(), optimizer=second)
    resumed.load_optimizer_state_dict(loop.optimizer_state_dict())
    resumed.step_count = loop.step_count
    ref_optimizer.spec, ref_optimizer.lr = second, second.lr
    _optimizer_steps(adapter, second, steps=2, loop=resumed, ref_optimizer=ref_optimizer, buffers=False)


@check()
def check_adam_updates(adapter):
    """Adam (with and without L2 weight decay): parameters and both moments match, bias correction included."""
    _optimizer_steps(adapter, Adam(lr=0.01, eps=1e-4))
    _optimizer_steps(adapter, Adam(lr=0.01, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1))


@check()
def check_sgd_lr_in_velocity(adapter):
    """Chainer's and Keras' momentum (``SGD(lr_in_velocity=True)``): the velocity holds past
    steps' lrs, so a new lr reaches only new gradients; parameters and ``velocity`` match."""
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, lr_in_velocity=True, weight_decay=0.01))
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, lr_in_velocity=True, nesterov=True))
    loop, ref_optimizer = _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, lr_in_velocity=True), steps=2)
    second = SGD(lr=0.02, momentum=0.9, lr_in_velocity=True)  # resumed with a new lr, as check_sgd_momentum_new_lr
    resumed = loaded(adapter, dense_model(), loop.state_dict(), optimizer=second)
    resumed.load_optimizer_state_dict(loop.optimizer_state_dict())
    resumed.step_count = loop.step_count
    ref_optimizer.spec, ref_optimizer.lr = second, second.lr
    _optimizer_steps(adapter, second, steps=2, loop=resumed, ref_optimizer=ref_optimizer)


@check()
def check_adam_eps_before_correction(adapter):
    """Chainer's, Keras' and MindSpore's Adam (``eps_placement="before_correction"``): eps joins
    the uncorrected ``sqrt(v)``; a large eps makes the difference from PyTorch's visible."""
    _optimizer_steps(adapter, Adam(lr=0.01, eps=1e-2, eps_placement="before_correction"))
    _optimizer_steps(adapter, Adam(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1,
                                   eps_placement="before_correction"))  # fmt: skip


@check()
def check_adamw_updates(adapter):
    """AdamW (decoupled weight decay): parameters and both moments match."""
    _optimizer_steps(adapter, AdamW(lr=0.01, eps=1e-4, weight_decay=0.1))


@check("optimizers")
def check_rmsprop_updates(adapter):
    """RMSprop (plain; centered with momentum and weight decay): parameters and buffers match."""
    _optimizer_steps(adapter, RMSprop(lr=0.01, alpha=0.9, eps=0.01))
    _optimizer_steps(adapter, RMSprop(lr=0.01, alpha=0.9, eps=0.01, momentum=0.5, centered=True, weight_decay=0.1))


@check("optimizers")
def check_adagrad_updates(adapter):
    """Adagrad with lr decay, an initial accumulator and weight decay: parameters and ``sum`` match."""
    _optimizer_steps(adapter, Adagrad(lr=0.1, lr_decay=0.5, initial_accumulator_value=0.1, weight_decay=0.1))


@check("optimizers")
def check_adadelta_updates(adapter):
    """Adadelta (with weight decay): parameters and both accumulators match."""
    _optimizer_steps(adapter, Adadelta(lr=1.0, rho=0.8, eps=1e-3, weight_decay=0.1))


@check("optimizers")
def check_set_lr_and_schedule(adapter):
    """``set_lr`` changes the live loop's next updates; ``fit`` steps a StepLR per epoch (the lr in
    each record), and ``seek_schedule`` resumes it mid-schedule."""
    spec = SGD(lr=0.1, momentum=0.9)
    loop, ref_optimizer = _optimizer_steps(adapter, spec, steps=1, buffers=False)
    loop.set_lr(0.03)
    ref_optimizer.lr = 0.03
    _optimizer_steps(adapter, spec, steps=2, loop=loop, ref_optimizer=ref_optimizer, buffers=False)
    model = dense_model()
    schedule = StepLR(step_size=1, gamma=0.5)
    scheduled = loaded(adapter, model, state_of(model), optimizer=SGD(lr=0.2), lr_schedule=schedule)
    history = scheduled.fit((inputs((3, 4)), labels()), epochs=3, batch_size=4, shuffle=False)
    lrs = [record.get("lr") for record in history]
    if lrs != [0.2, 0.1, 0.05] or scheduled.lr != 0.025 or scheduled.schedule_position != 3:
        got = f"records' lr {lrs}, then lr {scheduled.lr} at position {scheduled.schedule_position}"
        fail(f"StepLR(step_size=1, gamma=0.5) from lr 0.2 over 3 epochs: {got}; expected [0.2, 0.1, 0.05], 0.025, 3")
    resumed = loaded(adapter, model, scheduled.state_dict(), optimizer=SGD(lr=0.2), lr_schedule=schedule)
    resumed.seek_schedule(2)
    if resumed.lr != 0.05:
        fail(f"seek_schedule(2) on StepLR(step_size=1, gamma=0.5) from lr 0.2: lr {resumed.lr}, expected 0.05")


@check("optimizers")
def check_one_cycle_momentum(adapter):
    """OneCycleLR with PyTorch's default ``cycle_momentum=True`` sets the live loop's momentum
    (Adam: ``betas[0]``) at every step as it sets the lr: ``fit`` matches the reference optimizer run
    with the schedule's lr and momentum (SGD without momentum gains a momentum buffer, as in
    PyTorch), and a loop restored mid-schedule with ``seek_schedule`` continues it."""
    text, steps, batch = "OneCycleLR(max_lr=0.5, total_steps=4)", 4, 2
    schedule = parse_schedule(text)
    x, y = inputs((3, 4)), labels()
    for spec in (SGD(lr=0.1), Adam(lr=0.01, eps=1e-4)):
        model = dense_model()
        state = state_of(model)
        # the lr and momentum floats are unitrain.schedules' (checked against torch.optim.lr_scheduler in
        # unitrain's tests); what is checked here is that the adapter trains with them
        running, ref_optimizer = schedule.start(spec.lr), reference.Optimizer(spec)
        ref = reference.Reference(model, {key: value.astype(F64) for key, value in state.items()})
        expected = []
        for step in range(steps):
            ref_optimizer.lr, ref_optimizer.momentum = running.lr, running.momentum
            reference.train_step(
                ref, CrossEntropyLoss(), ref_optimizer, *(v[step * batch : (step + 1) * batch] for v in (x, y))
            )
            running.step()
            expected.append({key: ref.state[key] for key in model.param_shapes()})
        first = loaded(adapter, model, state, optimizer=spec, lr_schedule=schedule)
        first.fit((x, y), epochs=1, batch_size=batch, shuffle=False, max_steps=steps // 2)
        label = f"{spec} with {text}"
        compare_states(f"{label}, step {steps // 2}: parameter", params_of(first), expected[steps // 2 - 1],
                       dtype=first.dtype, size=4 * steps // 2)  # fmt: skip
        resumed = loaded(adapter, model, first.state_dict(), optimizer=spec, lr_schedule=schedule)
        resumed.load_optimizer_state_dict(first.optimizer_state_dict())
        resumed.seek_schedule(first.schedule_position)
        resumed.fit((x, y), epochs=1, batch_size=batch, shuffle=False, start_batch=steps // 2)
        compare_states(f"{label}, resumed at step {steps // 2}, step {steps}: parameter", params_of(resumed),
                       expected[-1], dtype=resumed.dtype, size=4 * steps)  # fmt: skip


@check("clipping")
def check_gradient_clipping(adapter):
    """Clipping by global norm (``clip_grad_norm_``: one factor for all gradients) and by value,
    between the gradients and the update."""
    model = dense_model()
    for options in ({"clip_grad_norm": 0.05}, {"clip_grad_value": 0.02}):
        loop = loaded(adapter, model, state_of(model), optimizer=SGD(lr=0.5), **options)
        params = {key: value.astype(F64) for key, value in params_of(loop).items()}
        for step in range(1, 3):
            tutorial_gradients(loop, inputs((3, 4), seed=step), labels(seed=step))
            grads = reference.clip_gradients(
                loop.gradients(), max_norm=options.get("clip_grad_norm"), max_value=options.get("clip_grad_value")
            )
            params = {key: value - 0.5 * grads[key] for key, value in params.items()}
            loop.update()
            compare_states(
                f"{options} step {step}: parameter", params_of(loop), params, dtype=loop.dtype, size=4 * step
            )


@check("training-controls")
def check_frozen_parameters_and_groups(adapter):
    """``frozen`` parameters never move and have no gradient or optimizer state; a ``param_groups``
    entry updates its parameters with its own lr, momentum and weight decay, the others with the
    optimizer's; ``set_lr`` scales every group's lr alike."""
    model, spec = dense_model(), SGD(lr=0.1, momentum=0.9)
    group = SGD(lr=0.02, momentum=0.5, weight_decay=0.1)
    loop = loaded(adapter, model, state_of(model), optimizer=spec, frozen=["1.bias"],
                  param_groups=[{"params": ["3"], "lr": 0.02, "momentum": 0.5, "weight_decay": 0.1}])  # fmt: skip
    start = params_of(loop)
    optimizers = {"1.weight": reference.Optimizer(spec), "3.weight": reference.Optimizer(group)}
    optimizers["3.bias"] = optimizers["3.weight"]
    params = {key: value.astype(F64) for key, value in start.items() if key != "1.bias"}
    for step in range(1, 4):
        if step == 3:  # the group keeps its lr's ratio to the optimizer's: 0.02 * 0.05 / 0.1
            loop.set_lr(0.05)
            optimizers["1.weight"].lr, optimizers["3.weight"].lr = 0.05, 0.01
        tutorial_gradients(loop, inputs((3, 4), seed=step), labels(seed=step))
        grads = loop.gradients()
        if "1.bias" in grads:
            fail("gradients() holds the frozen '1.bias'; a frozen parameter has no gradient")
        for names in (["1.weight"], ["3.weight", "3.bias"]):
            params.update(optimizers[names[0]].update({key: params[key] for key in names}, grads))
        loop.update()
        got = params_of(loop)
        compare_exact(f"step {step}: frozen parameter '1.bias'", got["1.bias"], start["1.bias"])
        compare_states(f"step {step}: parameter", {key: got[key] for key in params}, params, dtype=loop.dtype,
                       size=4 * step)  # fmt: skip
    state = loop.optimizer_state_dict()
    if extra := [key for key in state if key.startswith("1.bias.")]:
        fail(f"optimizer_state_dict() holds {extra} for the frozen '1.bias'; a frozen parameter has no state")


@check("training-controls")
def check_gradient_accumulation_in_fit(adapter):
    """``fit(accumulate_grad_batches=3)`` on 4 batches: one step on the first three batches' mean
    gradient, one on the last batch's gradient divided by 3 (Lightning's rule)."""
    model, spec = dense_model(), SGD(lr=0.1, momentum=0.9)
    state, x, y = state_of(model), inputs((3, 4), n=8), labels(n=8)
    loop = loaded(adapter, model, state, optimizer=spec)
    history = loop.fit((x, y), epochs=1, batch_size=2, shuffle=False, accumulate_grad_batches=3)
    if loop.step_count != 2 or history[0].get("steps") != 2:
        fail(f"4 batches 3 to a step: {loop.step_count} optimizer steps, record {history[0]}; expected 2")
    ref, optimizer = reference.Reference(model, {k: v.astype(F64) for k, v in state.items()}), reference.Optimizer(spec)
    for batches in ((0, 1, 2), (3,)):
        total = {}
        for b in batches:
            _, grad = reference.loss(CrossEntropyLoss(), ref.forward(x[2 * b : 2 * b + 2], training=True),
                                     y[2 * b : 2 * b + 2])  # fmt: skip
            for key, value in ref.backward(grad).items():
                total[key] = total.get(key, 0.0) + value / 3
        ref.state.update(optimizer.update({key: ref.state[key] for key in total}, total))
    compare_states("after 2 accumulated steps: parameter", params_of(loop),
                   {key: ref.state[key] for key in model.param_shapes()}, dtype=loop.dtype, size=4 * 4)  # fmt: skip


# --- 8-10. the step ---------------------------------------------------------------------------------


@check()
def check_zero_grad(adapter):
    """zero_grad() clears every accumulated gradient."""
    loop = adapter(dense_model())
    tutorial_gradients(loop, inputs((3, 4)), labels())
    if not any(np.any(g != 0) for g in loop.gradients().values()):
        fail("backward() left every gradient zero")
    loop.zero_grad()
    for key, grad in loop.gradients().items():
        if np.any(grad != 0):
            fail(f"after zero_grad(), gradient {key!r} is not zero: max |g| = {float(np.abs(grad).max()):.3g}")


@check()
def check_gradient_accumulation(adapter):
    """Without zero_grad, gradients accumulate: two half-batches (sum reduction) equal the full batch."""
    loop = adapter(dense_model(), loss=CrossEntropyLoss(reduction="sum"))
    x, y = inputs((3, 4)), labels()
    tutorial_gradients(loop, x, y)
    full = loop.gradients()
    tutorial_gradients(loop, x[:4], y[:4])
    loop.backward(loop.loss(loop.forward(x[4:]), y[4:]))
    compare_states("two accumulated half-batches vs. the full batch: gradient", loop.gradients(),
                   {k: v.astype(F64) for k, v in full.items()}, dtype=loop.dtype, size=8 * DENSE_FAN_IN)  # fmt: skip


@check()
def check_loss_expressions(adapter):
    """``backward(f(loss))`` for the expressions tutorials write (``loss * 0.5``, ``loss / n``,
    ``loss + loss``, ``loss ** 2``, ``2 - loss``) gives ``f'(loss)`` times the loss's gradient, as
    torch's and Chainer's autograd do, and ``to_float(f(loss))`` gives ``f(loss)``."""
    model = dense_model()
    state = state_of(model)
    x, y = inputs((3, 4)), labels()
    ref = reference.Reference(model, state)
    value, grad = reference.loss(CrossEntropyLoss(), ref.forward(x, training=True), y)
    expected_grads = ref.backward(grad)
    expressions = [  # (text, f, f' at the loss)
        ("loss * 0.5", lambda loss: loss * 0.5, 0.5), ("0.25 * loss", lambda loss: 0.25 * loss, 0.25),
        ("loss / 4", lambda loss: loss / 4, 0.25), ("loss + loss", lambda loss: loss + loss, 2.0),
        ("loss ** 2", lambda loss: loss**2, 2 * value), ("2 - loss", lambda loss: 2 - loss, -1.0),
    ]  # fmt: skip
    for text, f, slope in expressions:
        loop = loaded(adapter, model, state)
        loop.zero_grad()
        loss = loop.loss(loop.forward(x), y)
        try:
            expression = f(loss)
            loop.backward(expression)
        except Exception as error:  # the expression or backward refused: the check fails, naming it
            fail(f"backward({text}) raised {type(error).__name__}: {error}")
        compare(f"to_float({text})", loop.to_float(expression), f(value), dtype=loop.dtype, size=DENSE_FAN_IN)
        compare_states(f"gradient of {text}", loop.gradients(), {k: slope * v for k, v in expected_grads.items()},
                       dtype=loop.dtype, size=8 * DENSE_FAN_IN)  # fmt: skip


@check()
def check_step_returns_pre_update_loss(adapter):
    """step() returns the loss of the weights before its update."""
    model = dense_model()
    state = state_of(model)
    loop = loaded(adapter, model, state, optimizer=SGD(lr=0.5))
    x, y = inputs((3, 4)), labels()
    expected, _ = reference.loss(loop.loss_spec, reference.Reference(model, state).forward(x), y)
    compare("step() return value", loop.to_float(loop.step((x, y))), expected, dtype=loop.dtype, size=DENSE_FAN_IN)
    if loop.step_count != 1:
        fail(f"step_count after one step() is {loop.step_count}, expected 1")


@check()
def check_predictions_as_numpy_and_train_accuracy(adapter):
    """``to_numpy(forward(x))`` is a NumPy array of the loop's dtype, in eval mode what
    ``predict(x)`` gives; ``fit``'s ``train_accuracy`` (where the adapter reports it) counts the
    step's own predictions: those of the weights before the update."""
    model = dense_model()
    state = state_of(model)
    loop = loaded(adapter, model, state, optimizer=SGD(lr=0.5))
    x, y = inputs((3, 4)), labels()
    loop.eval()
    pred = loop.to_numpy(loop.forward(x))
    if not isinstance(pred, np.ndarray) or pred.dtype != loop.dtype:
        fail(f"to_numpy(forward(x)) gave {type(pred).__name__} of dtype {getattr(pred, 'dtype', None)}, "
             f"expected a numpy.ndarray of {loop.dtype}")  # fmt: skip
    compare("to_numpy(forward(x)) vs. predict(x)", pred, loop.predict(x), dtype=loop.dtype, size=DENSE_FAN_IN)
    expected = reference.Reference(model, state).forward(x)
    (record,) = loop.fit((x, y), epochs=1, batch_size=len(x), shuffle=False)
    if "train_accuracy" in record:
        correct = float(np.mean(expected.argmax(axis=1) == y))
        if record["train_accuracy"] != correct:
            fail(f"train_accuracy {record['train_accuracy']} after one step, expected {correct}: the argmax of "
                 "that step's own forward pass")  # fmt: skip


@check()
def check_tutorial_sequence_equals_step(adapter):
    """zero_grad, forward, loss, backward, update gives bit-for-bit what step() gives, with
    BatchNorm and with Dropout (the same masks), also inside a Residual, where the adapter has them."""
    models = [("a dense", dense_model(), (3, 4))]
    if "batchnorm" in adapter.capabilities:
        models.append(("a BatchNorm1d", batchnorm_model(), (6,)))
    if "dropout" in adapter.capabilities:
        models.append(("a Dropout", dropout_model(), (3, 4)))
    if "residual" in adapter.capabilities:
        models.append(("a residual", _mode_model(adapter), (6,)))
    for what, model, shape in models:
        state = state_of(model)
        whole = loaded(adapter, model, state, optimizer=SGD(lr=0.1, momentum=0.9))
        parts = loaded(adapter, model, state, optimizer=SGD(lr=0.1, momentum=0.9))
        for step in range(3):
            x, y = inputs(shape, seed=step), labels(seed=step)
            whole.step((x, y))
            tutorial_gradients(parts, x, y)
            parts.update()
        compare_states(f"after 3 steps of {what} model, tutorial sequence vs. step():", parts.state_dict(),
                       whole.state_dict())  # fmt: skip
        compare_states(f"optimizer state of {what} model, tutorial sequence vs. step():",
                       parts.optimizer_state_dict(), whole.optimizer_state_dict())  # fmt: skip
        if parts.step_count != whole.step_count:
            fail(f"step_count: tutorial sequence {parts.step_count}, step() {whole.step_count}")


@check()
def check_loss_and_gradients_in_one_pass(adapter):
    """The data-parallel step's ``_loss_and_gradients(x, y)`` gives the loss, predictions and
    gradients of zero_grad, forward, loss, backward (replacing earlier gradients), and leaves the
    same state: BatchNorm's running statistics updated once, the same Dropout masks drawn."""
    models = [("a dense", dense_model(), (3, 4)), ("a BatchNorm/Dropout", _mode_model(adapter), (6,))]
    for what, model, shape in models:
        state = state_of(model)
        fused, parts = loaded(adapter, model, state), loaded(adapter, model, state)
        for loop in (fused, parts):  # gradients to be replaced
            tutorial_gradients(loop, inputs(shape, seed=1), labels(seed=1))
        x, y = inputs(shape), labels()
        loss, pred = fused._loss_and_gradients(x, y)
        parts.zero_grad()
        expected_pred = parts.forward(x)
        expected_loss = parts.loss(expected_pred, y)
        parts.backward(expected_loss)
        size = 8 * DENSE_FAN_IN  # the widest sum: a weight's gradient over the 8 samples' fan-ins
        compare(f"{what} model, _loss_and_gradients vs. the tutorial sequence: loss", fused.to_float(loss),
                parts.to_float(expected_loss), dtype=fused.dtype, size=size)  # fmt: skip
        compare(f"{what} model, _loss_and_gradients vs. the tutorial sequence: predictions", fused.to_numpy(pred),
                parts.to_numpy(expected_pred), dtype=fused.dtype, size=size)  # fmt: skip
        compare_states(f"{what} model, _loss_and_gradients vs. the tutorial sequence: gradient", fused.gradients(),
                       parts.gradients(), dtype=fused.dtype, size=size)  # fmt: skip
        compare_states(f"{what} model, _loss_and_gradients vs. the tutorial sequence: state", fused.state_dict(),
                       parts.state_dict(), dtype=fused.dtype, size=size)  # fmt: skip


@check()
def check_step_follows_state_changes(adapter):
    """step() follows what changed since the last step (a compiled step must not keep stale copies):
    after load_state_dict and load_optimizer_state_dict with fresh optimizer state, and across a
    smaller batch, each step returns the reference loss and lands on the reference parameters."""
    model = dense_model()
    for spec in (SGD(lr=0.1, momentum=0.9), Adam(lr=0.01, eps=1e-4)):
        loop = loaded(adapter, model, state_of(model), optimizer=spec)
        for step in range(2):  # whatever the adapter compiles or caches is now warm
            loop.step((inputs((3, 4), seed=step), labels(seed=step)))
        state = state_of(model, seed=1)
        loop.load_state_dict(state)
        loop.load_optimizer_state_dict({"step": np.array(0)})  # no buffers: momentum and moments start afresh
        ref, ref_optimizer = reference.Reference(model, state), reference.Optimizer(spec)
        for step, n in enumerate((8, 5, 8), start=1):
            x, y = inputs((3, 4), seed=10 + step, n=n), labels(n, seed=10 + step)
            expected = reference.train_step(ref, loop.loss_spec, ref_optimizer, x, y)
            label = f"{spec}, step {step} after load_state_dict/load_optimizer_state_dict (batch of {n})"
            compare(f"{label}: step() return value", loop.to_float(loop.step((x, y))), expected,
                    dtype=loop.dtype, size=DENSE_FAN_IN)  # fmt: skip
            compare_states(f"{label}: parameter", params_of(loop), {k: ref.state[k] for k in model.param_shapes()},
                           dtype=loop.dtype, size=4 * step)  # fmt: skip


# --- 11-13. modes, dropout, BatchNorm ---------------------------------------------------------------


@check()
def check_train_eval_toggles(adapter):
    """train()/eval() are idempotent, return the loop and reach layers inside nested Sequentials."""
    if not {"dropout", "batchnorm"} & adapter.capabilities:
        raise CheckSkipped("needs dropout or batchnorm: without them training and eval mode compute the same")
    model = _mode_model(adapter)
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=MSELoss(reduction="sum"))
    x, target = inputs((6,)), np.zeros((8, 4), np.float32)
    eval_loss, _ = reference.loss(loop.loss_spec, reference.Reference(model, state).forward(x), target)

    def observed_loss():
        return loop.to_float(loop.loss(loop.forward(x), target))

    for calls in (["eval"], ["eval", "eval"], ["train", "eval"]):
        for call in calls:
            if getattr(loop, call)() is not loop:
                fail(f"{call}() must return the loop itself")
        if loop.training:
            fail(f"after {'(), '.join(calls)}() the loop reports training=True")
        compare(f"loss after {'(), '.join(calls)}()", observed_loss(), eval_loss, dtype=loop.dtype, size=8)
    for calls in (["train"], ["train", "train"], ["eval", "train"]):
        for call in calls:
            getattr(loop, call)()
        if not loop.training:
            fail(f"after {'(), '.join(calls)}() the loop reports training=False")
        if abs(observed_loss() - eval_loss) <= 1e-3 * abs(eval_loss):
            fail(f"after {'(), '.join(calls)}() the nested {model.layers[1]} still computes as in eval mode")


@check("dropout")
def check_dropout_statistics(adapter):
    """In training, Dropout zeroes a fraction p of elements (within 5 standard deviations) and scales
    survivors by 1/(1-p); two forwards draw different masks."""
    p, n = 0.3, 4000
    model = layers.Sequential(layers.Dropout(p), layers.Linear(n, 1, bias=False))
    loop = loaded(adapter, model, {"1.weight": np.ones((1, n), np.float32)}, loss=MSELoss(reduction="sum"))
    x, target = np.ones((1, n), np.float32), np.zeros((1, 1), np.float32)
    masks = []
    for _ in range(2):
        # loss = out**2 with out = sum(kept) / (1 - p), and d loss / d w = 2 * out * kept / (1 - p)
        out = math.sqrt(tutorial_gradients(loop, x, target))
        scaled = loop.gradients()["1.weight"][0] / (2 * out)
        kept = scaled > 0.5 / (1 - p)
        compare("survivor scale", scaled, kept / (1 - p), dtype=loop.dtype, size=n)
        dropped = 1 - kept.mean()
        bound = 5 * math.sqrt(p * (1 - p) / n)
        if abs(dropped - p) > bound:
            fail(f"dropped fraction {dropped:.4f}, expected p = {p} within {bound:.4f}", abs(dropped - p), bound)
        masks.append(kept)
    if np.array_equal(*masks):
        fail("two training forwards used the same dropout mask")


@check("dropout", "random-state")
def check_random_state_resumes_dropout(adapter):
    """random_state() is uint8 arrays that predict/evaluate leave alone; a loop restored from
    state_dict, optimizer_state_dict and random_state draws the original's dropout masks (its next
    steps give bit-identical weights); bytes that are not a state are refused, naming the key."""
    model = dropout_model()
    optimizer = SGD(lr=0.1, momentum=0.9)
    loop = loaded(adapter, model, state_of(model), optimizer=optimizer)
    batches = [(inputs((3, 4), seed=i), labels(seed=i)) for i in range(3)]
    loop.step(batches[0])
    saved = loop.state_dict(), loop.optimizer_state_dict(), loop.random_state()
    if not saved[2] or any(np.asarray(value).dtype != np.uint8 for value in saved[2].values()):
        fail(f"random_state() must be a non-empty dict of uint8 arrays, got {saved[2]!r:.200}")
    loop.predict(batches[1][0])
    loop.evaluate(batches[1])
    compare_states("random_state() after predict/evaluate", loop.random_state(), saved[2])
    for batch in batches[1:]:
        loop.step(batch)
    restored = adapter(model, optimizer=optimizer, seed=1)  # another seed: the state alone decides
    restored.load_state_dict(saved[0])
    restored.load_optimizer_state_dict(saved[1])
    restored.load_random_state(saved[2])
    for batch in batches[1:]:
        restored.step(batch)
    compare_states("after a restore, the next steps' weights", restored.state_dict(), loop.state_dict())
    key = next(iter(saved[2]))
    garbage, unknown = {key: np.zeros(3, np.uint8)}, {"bogus": saved[2][key]}
    expect_error("load_random_state() of 3 zero bytes", lambda: restored.load_random_state(garbage), adapter.name)
    expect_error("load_random_state() with an unknown key", lambda: restored.load_random_state(unknown), "bogus")


@check("batchnorm")
def check_batchnorm_running_stats(adapter):
    """Running statistics follow PyTorch's momentum and unbiased-variance convention, and change
    only in training (not in eval forwards, predict or evaluate)."""
    models = [(batchnorm_model(), (6,))]
    if "conv" in adapter.capabilities:
        models.append((batchnorm2d_model(), (2, 5, 5)))
    for model, shape in models:
        state = state_of(model)
        loop = loaded(adapter, model, state)
        ref = reference.Reference(model, state)
        x, y = inputs(shape), labels()
        loop.forward(x)
        ref.forward(x, training=True)
        buffers = {k: v for k, v in ref.state.items() if k.startswith("1.running") or k.startswith("1.num")}
        got = loop.state_dict()
        for key, value in buffers.items():
            if key.endswith("num_batches_tracked"):
                compare_exact(f"{key} after one training forward", got[key], value)
            else:
                compare(f"{key} after one training forward", got[key], value, dtype=loop.dtype, size=2 * len(x))
        loop.eval()
        before = loop.state_dict()
        actions = {"an eval-mode forward": loop.forward, "predict": loop.predict, "evaluate": loop.evaluate}
        for action, run in actions.items():
            run((x, y) if action == "evaluate" else x)
            for key in buffers:
                compare_exact(f"{key} after {action}", loop.state_dict()[key], before[key])


@check("batchnorm")
def check_batchnorm_eval_batch_independence(adapter):
    """In eval mode a sample's BatchNorm output does not depend on the other samples of its batch."""
    model = batchnorm_model()
    loop = loaded(adapter, model, state_of(model))
    x = inputs((6,))
    batch = loop.predict(x)
    alone = np.concatenate([loop.predict(x[i : i + 1]) for i in range(len(x))])
    compare("predict() of each sample alone vs. in the batch", alone, batch, dtype=loop.dtype, size=8)


# --- 14. evaluate/predict change nothing ---------------------------------------------------------


@check()
def check_evaluate_predict_change_nothing(adapter):
    """predict and evaluate leave parameters, buffers, gradients, optimizer state, step count and mode alone."""
    model = _mode_model(adapter)
    loop = loaded(adapter, model, state_of(model), optimizer=Adam(lr=0.01))
    x, y = inputs((6,)), labels()
    for step in range(2):
        loop.step((inputs((6,), seed=step), labels(seed=step)))
    for mode in ("train", "eval"):
        getattr(loop, mode)()
        before = (loop.state_dict(), loop.gradients(), loop.optimizer_state_dict(), loop.step_count, loop.training)
        loop.predict(x)
        loop.evaluate((x, y), batch_size=3)
        after = (loop.state_dict(), loop.gradients(), loop.optimizer_state_dict(), loop.step_count, loop.training)
        for what, got, expected in zip(
            ("state_dict()", "gradients()", "optimizer_state_dict()"), after, before, strict=False
        ):
            compare_states(f"in {mode} mode, predict/evaluate changed {what}", got, expected)
        if after[3:] != before[3:]:
            fail(f"in {mode} mode, predict/evaluate changed (step_count, training) from {before[3:]} to {after[3:]}")


# --- 15. weights ----------------------------------------------------------------------------------


@check()
def check_weights_round_trip(adapter):
    """load_state_dict then state_dict() gives the same arrays bit for bit, and so do save/load_weights."""
    model = batchnorm_model() if "batchnorm" in adapter.capabilities else dense_model()
    state = state_of(model)
    loop = loaded(adapter, model, state)
    compare_states("state_dict() after load_state_dict():", loop.state_dict(), state)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        loop.save_weights(path)
        fresh = adapter(model, seed=1)
        fresh.load_weights(path)
    compare_states("state_dict() after save_weights()/load_weights():", fresh.state_dict(), state)


@check()
def check_reference_weights_file(adapter):
    """A safetensors file written by the reference loads and gives the reference's forward."""
    model = batchnorm_model() if "batchnorm" in adapter.capabilities else dense_model()
    shape = (6,) if "batchnorm" in adapter.capabilities else (3, 4)
    state = state_of(model, seed=9)
    loop = adapter(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reference.safetensors"
        reference.write_safetensors(path, state)
        loop.load_weights(path)
    x = inputs(shape)
    compare("predict() with the reference's weight file", loop.predict(x),
            reference.Reference(model, state).forward(x), dtype=loop.dtype, size=DENSE_FAN_IN)  # fmt: skip


@check()
def check_weights_errors(adapter):
    """Loading wrong keys or shapes raises an error naming them."""
    model = dense_model()
    loop = adapter(model)
    state = state_of(model)
    missing = {k: v for k, v in state.items() if k != "3.bias"}
    expect_error("load_state_dict() without '3.bias'", lambda: loop.load_state_dict(missing), "3.bias")
    extra = {**state, "9.weight": state["3.bias"]}
    expect_error("load_state_dict() with an extra key", lambda: loop.load_state_dict(extra), "9.weight")
    wrong = {**state, "1.weight": state["1.weight"].T}
    expect_error("load_state_dict() with a transposed '1.weight'", lambda: loop.load_state_dict(wrong), "1.weight",
                 "(12, 10)")  # fmt: skip
    compare_states("state_dict() after rejected loads (must be unchanged):", loop.state_dict(),
                   reference.initial_state(model, 0))  # fmt: skip


@check("conv")
def check_initializers(adapter):
    """Every layer's ``weight_init``/``bias_init`` and the model's ``init`` scheme draw the
    documented distributions with ``torch.nn.init``'s fans (a grouped convolution's too)."""
    model = layers.Sequential(
        layers.Conv2d(2, 4, 3, groups=2, weight_init="kaiming_normal(mode='fan_out', nonlinearity='relu')"),
        layers.ReLU(),
        layers.Conv2d(4, 4, 1, weight_init="xavier_normal(gain=2.0)", bias_init="zeros"),
        layers.Flatten(),
        layers.Linear(16, 8),  # the model's init: Keras' glorot uniform and zero bias
        layers.ReLU(),
        layers.Linear(8, 6, weight_init="kaiming_uniform(a=0.2)", bias_init="normal(0.5)"),
        layers.Linear(6, 5, weight_init="lecun_normal", bias_init="uniform(-0.1, 0.1)"),
        layers.Linear(5, 3, weight_init="xavier_uniform", bias_init="pytorch"),
        init="keras",
    )
    loop = adapter(model, seed=11)
    compare_states("initial state_dict() with per-layer initialisers:", loop.state_dict(),
                   reference.initial_state(model, 11), dtype="float32", size=1)  # fmt: skip
    model = layers.Sequential(layers.Linear(4, 8), layers.ReLU(), layers.Linear(8, 3), init="chainer")
    compare_states("initial state_dict() with init='chainer':", adapter(model, seed=2).state_dict(),
                   reference.initial_state(model, 2), dtype="float32", size=1)  # fmt: skip


# --- 16-18. seeds, epochs, dtypes ------------------------------------------------------------------


def _record_batches(loop: TrainingLoop) -> list[np.ndarray]:
    """Spy on the whole-step hook: returns the list that will receive each step's inputs."""
    seen, step = [], loop._step

    def spy(x, y):
        seen.append(np.array(x))
        return step(x, y)

    loop._step = spy
    return seen


def _indexed_data(n: int) -> ArrayDataset:
    """Samples whose first feature is their index."""
    x = inputs((3, 4), n=n)
    x[:, 0, 0] = np.arange(n)
    return ArrayDataset(x, labels(n))


@check()
def check_seeds(adapter):
    """The same seed gives the documented initial weights and batch order; another seed differs."""
    model = dense_model()
    data = _indexed_data(10)
    orders = {}
    for seed in (3, 4):
        loop = adapter(model, seed=seed)
        compare_states(f"initial state_dict() with seed {seed}:", loop.state_dict(),
                       reference.initial_state(model, seed))  # fmt: skip
        seen = _record_batches(loop)
        loop.fit(data, epochs=2, batch_size=4)
        orders[seed] = [int(v) for x in seen for v in x[:, 0, 0]]
        expected = [int(i) for epoch in range(2) for i in np.random.default_rng([seed, epoch]).permutation(10)]
        if orders[seed] != expected:
            fail(f"batch order with seed {seed}: expected {expected}, got {orders[seed]}")
    if orders[3] == orders[4]:
        fail("seeds 3 and 4 gave the same batch order")


@check()
def check_epoch_visits_every_sample(adapter):
    """An epoch visits every sample once; the last partial batch holds the remainder."""
    loop = adapter(dense_model())
    seen = _record_batches(loop)
    history = loop.fit(_indexed_data(10), epochs=1, batch_size=4)
    sizes = [len(x) for x in seen]
    visited = sorted(int(v) for x in seen for v in x[:, 0, 0])
    if sizes != [4, 4, 2] or visited != list(range(10)):
        fail(f"10 samples in batches of 4: expected batch sizes [4, 4, 2] covering 0..9 once, "
             f"got sizes {sizes} covering {visited}")  # fmt: skip
    if loop.step_count != 3 or len(history) != 1 or history[0]["steps"] != 3:
        fail(f"after one epoch of 3 batches: step_count {loop.step_count}, history {history}")


@check()
def check_float32_dtypes(adapter):
    """float32 parameters, gradients, outputs and optimizer state stay float32."""
    for spec in (SGD(lr=0.1, momentum=0.9), Adam()):
        model = batchnorm_model() if "batchnorm" in adapter.capabilities else dense_model()
        shape = (6,) if "batchnorm" in adapter.capabilities else (3, 4)
        loop = adapter(model, optimizer=spec)
        for step in range(2):
            loop.step((inputs(shape, seed=step), labels(seed=step)))
        arrays = {f"state_dict()[{k!r}]": v for k, v in loop.state_dict().items() if "num_batches" not in k}
        arrays.update({f"gradients()[{k!r}]": v for k, v in loop.gradients().items()})
        arrays.update({f"optimizer_state_dict()[{k!r}]": v for k, v in loop.optimizer_state_dict().items()
                       if k != "step"})  # fmt: skip
        arrays["predict()"] = loop.predict(inputs(shape))
        for what, value in arrays.items():
            if np.asarray(value).dtype != np.float32:
                fail(f"{spec}: {what} has dtype {np.asarray(value).dtype}, expected float32")


# --- 19. bad input ---------------------------------------------------------------------------------


@check()
def check_bad_input(adapter):
    """Wrong feature size, out-of-range or non-integer labels and NaN inputs raise clear errors."""
    loop = adapter(dense_model())
    x, y = inputs((3, 4)), labels()
    expect_error("step() with 13 features per sample", lambda: loop.step((inputs((13,)), y)), "12", "(13,)")
    expect_error("step() with label 4 for 4 classes", lambda: loop.step((x, np.full(8, 4))), "label 4")
    expect_error("step() with label -1", lambda: loop.step((x, np.full(8, -1))), "label -1")
    expect_error("step() with float labels", lambda: loop.step((x, y.astype(np.float32))), "integer")
    nan = x.copy()
    nan[2, 1, 1] = np.nan
    expect_error("step() with a NaN input", lambda: loop.step((nan, y)), "NaN")
    expect_error("predict() with a NaN input", lambda: loop.predict(nan), "NaN")
    if loop.step_count != 0:
        fail(f"rejected batches changed step_count to {loop.step_count}")


# --- 20-26. graphs with branches, the layers and losses beyond a stack, the user's own loss -----


def _longest_sum(model, input_shape, n: int) -> int:
    """The most terms summed into one value anywhere in ``model``'s forward pass on ``n`` samples —
    a dot product's fan-in, a pooling window, a normalisation's count, a softmax's axis — which is
    the ``size`` of :func:`tolerances.tolerance` for its outputs (the suite's convention, as
    ``CONV_FAN_IN`` for the conv model)."""
    shapes = model.leaf_input_shapes(input_shape)
    sizes = [1]
    for path, layer in model.named_layers():
        batch_shape = (n, *shapes[path])
        if isinstance(layer, (layers.Linear, layers.Conv2d)):
            sizes.append(layer.fan_in())
        elif isinstance(layer, layers.ConvTranspose2d):  # an output adds input channels x kernel taps at most
            sizes.append(layer.in_channels // layer.groups * math.prod(layer.kernel_size))
        elif isinstance(layer, layers.Upsample):  # bilinear: two neighbours along each axis
            sizes.append(4)
        elif isinstance(layer, (layers.MaxPool2d, layers.AvgPool2d)):
            sizes.append(math.prod(layer.kernel_size))
        elif isinstance(layer, layers.AdaptiveAvgPool2d):  # a bin spans at most ceil(size / out) + 1 rows
            sizes.append(math.prod(-(-d // o) + 1 for d, o in zip(batch_shape[2:], layer.output_size, strict=True)))
        elif isinstance(layer, layers.LayerNorm):
            sizes.append(math.prod(layer.normalized_shape))
        elif isinstance(layer, layers._BatchNorm):  # training statistics over the batch and the positions
            sizes.append(n * math.prod(batch_shape[2:]))
        elif isinstance(layer, (layers.Softmax, layers.LogSoftmax)):
            sizes.append(batch_shape[layer.dim])
        elif isinstance(layer, sequences.Embedding):  # a row's gradient adds every position holding its id
            sizes.append(math.prod(batch_shape))
        elif isinstance(layer, sequences._Recurrent):  # each step's h reads all earlier steps' sums
            steps = batch_shape[1] if layer.batch_first else n
            width = max(layer.input_size, layer.directions * layer.hidden_size) + layer.hidden_size
            sizes.append(steps * layer.num_layers * width)
        elif isinstance(layer, sequences.Conv1d):
            sizes.append(layer.fan_in())
        elif isinstance(layer, (sequences.MaxPool1d, sequences.AvgPool1d)):
            sizes.append(layer.kernel_size)
        elif isinstance(layer, sequences.AdaptiveAvgPool1d):
            sizes.append(-(-batch_shape[2] // layer.output_size) + 1)
    return max(sizes)


def _layer_case(adapter, what, model, input_shape, *, scale=1.0, x=None):
    """Eval-mode forward and training-mode loss (MSE, sum) and gradients of ``model`` (random weights)
    match the reference; ``scale`` widens the inputs so that activations see their curved regions.
    Tolerance sizes: the forward's :func:`_longest_sum`; the loss adds up every output too; and
    gradients, as in ``_check_gradients``, allow 8 times the loss's. ``x``: the inputs, if not those
    (token ids, say)."""
    state = state_of(model)
    loss = MSELoss(reduction="sum")
    loop = loaded(adapter, model, state, loss=loss)
    x = scale * inputs(input_shape) if x is None else x
    ref = reference.Reference(model, state)
    size = _longest_sum(model, input_shape, len(x))
    compare(f"{what}: predict()", loop.predict(x), ref.forward(x), dtype=loop.dtype, size=size)
    output = model.output_shape(input_shape)
    target = inputs(output, seed=1, n=len(x))
    size = max(size, len(x) * math.prod(output))
    expected, grad = reference.loss(loss, ref.forward(x, training=True), target)
    compare(f"{what}: training loss", tutorial_gradients(loop, x, target), expected, dtype=loop.dtype, size=size)
    compare_states(f"{what}: gradient", loop.gradients(), ref.backward(grad), dtype=loop.dtype, size=8 * size)


def _between_convs(*middle, channels=4, image=(6, 5)) -> layers.Sequential:
    """Input ``(N, 2, *image)``: a convolution feeds the ``middle`` layers (so their backward
    reaches a parameter) and a Linear reads their output."""
    stem = layers.Conv2d(2, channels, 3, padding=1)
    out = layers.Sequential(*middle).output_shape((channels, *image))
    return layers.Sequential(stem, *middle, layers.Flatten(), layers.Linear(math.prod(out), 3))


@check("conv")
def check_conv2d_options(adapter):
    """Conv2d with pair kernel/stride/padding, dilation, groups (depthwise) and no bias matches the reference."""
    strided = layers.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2)
    cases = {
        repr(strided): layers.Sequential(
            strided, layers.Flatten(), layers.Linear(math.prod(strided.output_shape((2, 6, 5))), 3)
        ),
        "depthwise Conv2d(4, 4, 3, groups=4, bias=False)": _between_convs(
            layers.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        ),
    }
    for what, model in cases.items():
        _layer_case(adapter, what, model, (2, 6, 5))


@check("conv", "pooling")
def check_pooling(adapter):
    """MaxPool2d with padding, AvgPool2d (count_include_pad True and False) and AdaptiveAvgPool2d
    (uneven bins) match the reference; two pools per model keep the number of models small."""
    cases = (
        (layers.MaxPool2d(3, stride=2, padding=1), layers.AvgPool2d(3, stride=2, padding=1)),
        (layers.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)),
         layers.AvgPool2d((2, 3), stride=(1, 2), padding=(1, 1), count_include_pad=False)),
        (layers.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), layers.AdaptiveAvgPool2d((4, 3))),
    )  # fmt: skip
    for pools in cases:
        what = " then ".join(map(repr, pools))
        _layer_case(adapter, what, _between_convs(*pools), (2, 6, 5))


@check("layernorm")
def check_layer_norm(adapter):
    """LayerNorm over the last dim and over several trailing dims, with and without affine parameters."""
    vector = layers.Sequential(layers.Linear(6, 8), layers.LayerNorm(8, eps=1e-3), layers.Linear(8, 4))
    _layer_case(adapter, "LayerNorm(8)", vector, (6,))
    plain = layers.Sequential(layers.Linear(6, 8), layers.LayerNorm(8, elementwise_affine=False), layers.Linear(8, 4))
    _layer_case(adapter, "LayerNorm(8, elementwise_affine=False)", plain, (6,))
    if "conv" in adapter.capabilities:
        _layer_case(adapter, "LayerNorm((4, 6, 5))", _between_convs(layers.LayerNorm((4, 6, 5))), (2, 6, 5))


#: Activations, each between two Linear layers; inputs scaled by 3 so that GELU, ELU, SiLU ...
#: are compared where they curve (where GELU's tanh form is up to 5e-4 off the erf form).
ACTIVATIONS = (
    layers.Identity(), layers.Tanh(), layers.Sigmoid(), layers.GELU(), layers.GELU(approximate="tanh"),
    layers.LeakyReLU(0.2), layers.SiLU(), layers.ELU(alpha=0.7), layers.Softmax(dim=1), layers.LogSoftmax(dim=-1),
)  # fmt: skip


@check("activations")
def check_activations(adapter):
    """Identity, Tanh, Sigmoid, GELU (exact and tanh), LeakyReLU, SiLU, ELU, Softmax and LogSoftmax
    (over the feature axis, and LogSoftmax over the channels of an image batch) match their formulas."""
    for layer in ACTIVATIONS:
        model = layers.Sequential(layers.Linear(6, 8), layer, layers.Linear(8, 4))
        _layer_case(adapter, repr(layer), model, (6,), scale=3.0)
    if "conv" in adapter.capabilities:
        layer = layers.LogSoftmax(dim=1)
        _layer_case(adapter, f"{layer!r} of (N, C, H, W)", _between_convs(layer), (2, 6, 5), scale=3.0)


@check("sequences")
def check_sequence_layers(adapter):
    """Embedding (with padding_idx, integer ids), a stacked bidirectional batch-first LSTM, stacked tanh
    and bias-free bidirectional ReLU RNNs; a stacked bidirectional time-first GRU feeding Conv1d and the
    1-d pools; Linear over the last axis: predictions, training loss and gradients through time match
    the float64 reference (two models, so that compiling backends compile little)."""
    # three steps: MindSpore unrolls every step of nn.GRU and nn.RNN into the graphs it compiles
    ids = np.random.default_rng(0).integers(0, 7, (8, 3))
    ids[0, :2] = 2  # the padding row is read, and gets no gradient
    recurrent = layers.Sequential(
        sequences.Embedding(7, 3, padding_idx=2),
        sequences.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True),
        sequences.RNN(8, 4, num_layers=2, batch_first=True),
        sequences.RNN(4, 3, nonlinearity="relu", bias=False, batch_first=True, bidirectional=True),
        layers.Linear(6, 2),
    )
    _layer_case(adapter, "Embedding, LSTM, RNN (tanh, relu), batch first", recurrent, (3,), x=ids)
    # per sample (3 sequences, 3 features): the GRU's batch becomes Conv1d's channels
    convolved = layers.Sequential(
        layers.Linear(3, 3), sequences.GRU(3, 8, num_layers=2, bidirectional=True),
        sequences.Conv1d(3, 4, 3, stride=2, padding=1), sequences.MaxPool1d(2, padding=1),
        sequences.Conv1d(4, 4, 2, dilation=2, groups=2, bias=False),
        sequences.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), sequences.AdaptiveAvgPool1d(2),
    )  # fmt: skip
    _layer_case(adapter, "GRU time first, Conv1d and the 1-d pools", convolved, (3, 3), x=inputs((3, 3), n=3))


def residual_dense_model() -> layers.Sequential:
    """Input ``(N, 6)``: an identity shortcut with a layer after the add, a projection shortcut,
    and a Residual nested in a Residual's body, under named children."""
    inner = layers.Residual(layers.Sequential({"fc": layers.Linear(8, 8), "act": layers.Tanh()}))
    return layers.Sequential({
        "stem": layers.Linear(6, 8),
        "block": layers.Residual(
            layers.Sequential({"fc1": layers.Linear(8, 8), "relu": layers.ReLU(), "fc2": layers.Linear(8, 8)}),
            post=layers.ReLU(),
        ),
        "down": layers.Residual(
            layers.Sequential({"fc1": layers.Linear(8, 5), "inner": layers.Sequential(layers.ReLU())}),
            shortcut=layers.Sequential(layers.Linear(8, 5)),
        ),
        "nested": layers.Residual(
            layers.Sequential({"pre": layers.Linear(5, 8), "res": inner, "post_fc": layers.Linear(8, 5)})
        ),
        "head": layers.Linear(5, 4),
    })  # fmt: skip


def mini_resnet(batchnorm: bool) -> layers.Sequential:
    """Input ``(N, 2, 7, 7)``: ResNet-18's stem and two BasicBlocks (the second with a strided
    1x1-conv downsample) at 4-6 channels, with torchvision's names."""
    norm = layers.BatchNorm2d if batchnorm else (lambda channels: layers.Identity())

    def block(cin, cout, stride):
        body = layers.Sequential({
            "conv1": layers.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), "bn1": norm(cout),
            "relu": layers.ReLU(), "conv2": layers.Conv2d(cout, cout, 3, padding=1, bias=False), "bn2": norm(cout),
        })  # fmt: skip
        downsample = None
        if stride != 1 or cin != cout:
            downsample = layers.Sequential(layers.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))
        return layers.Residual(body, downsample, layers.ReLU())

    return layers.Sequential({
        "conv1": layers.Conv2d(2, 4, 3, stride=1, padding=1, bias=False), "bn1": norm(4), "relu": layers.ReLU(),
        "maxpool": layers.MaxPool2d(3, stride=2, padding=1) if batchnorm else layers.Identity(),
        "layer1": layers.Sequential(block(4, 4, 1)), "layer2": layers.Sequential(block(4, 6, 2)),
        "avgpool": layers.AdaptiveAvgPool2d(1) if batchnorm else layers.Flatten(), "flatten": layers.Flatten(),
        "fc": layers.Linear(6 if batchnorm else 6 * 4 * 4, 3),
    })  # fmt: skip


@check("residual")
def check_residual(adapter):
    """Residual blocks (identity and projection shortcuts, a layer after the add, nesting) under named
    children: forward, loss and every gradient match the reference, and state_dict() uses the dotted names."""
    model = residual_dense_model()
    _layer_case(adapter, "dense residual model", model, (6,))
    keys = list(adapter(model).state_dict())
    if keys != list(model.state_shapes()):
        fail(f"state_dict() keys of the residual model: expected {list(model.state_shapes())}, got {keys}")
    if "conv" in adapter.capabilities:
        _layer_case(adapter, "convolutional residual model", mini_resnet(batchnorm=False), (2, 7, 7))


@check("residual", "conv", "batchnorm", "pooling")
def check_mini_resnet(adapter):
    """ResNet-18's structure at toy size (stem, max pool, BasicBlocks with BatchNorm and a strided
    downsample, global average pool): eval forward and training-mode gradients match the reference."""
    _layer_case(adapter, "mini ResNet", mini_resnet(batchnorm=True), (2, 7, 7))


@check("residual", "conv", "batchnorm")
def check_resnet18_state_dict(adapter):
    """unitrain.resnet18()'s state_dict() has torchvision's keys and shapes, in torchvision's order."""
    state = adapter(layers.resnet18(num_classes=10, in_channels=1)).state_dict()
    expected = reference.torchvision_resnet18_state_shapes(num_classes=10, in_channels=1)
    got = {key: tuple(np.shape(value)) for key, value in state.items()}
    if list(got) != list(expected):
        fail(f"resnet18 state_dict() keys: expected {list(expected)}, got {list(got)}")
    wrong = {key: (got[key], shape) for key, shape in expected.items() if got[key] != shape}
    if wrong:
        fail(f"resnet18 state_dict() shapes (got, expected): {wrong}")


#: (loss spec, kind of targets) of the checks below: class indices, class probabilities, floats, [0, 1]
NEW_LOSSES = (
    (CrossEntropyLoss(label_smoothing=0.2), "indices"),
    (CrossEntropyLoss(), "probabilities"),
    (CrossEntropyLoss(label_smoothing=0.2), "probabilities"),
    (BCEWithLogitsLoss(), "unit"),
    (L1Loss(), "floats"),
    (SmoothL1Loss(beta=0.5), "floats"),
    (HuberLoss(delta=0.7), "floats"),
)


def _targets(kind: str, n: int = 8, classes: int = 5) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "indices":
        return labels(n, classes)
    if kind == "probabilities":
        return rng.dirichlet(np.ones(classes), n).astype(np.float32)
    if kind == "unit":
        return rng.uniform(0, 1, (n, classes)).astype(np.float32)
    return (2 * inputs((classes,), seed=4, n=n)).astype(np.float32)


#: the loss checks' tolerance size: every one of the 8 x 5 predictions' terms is summed into the loss
LOSS_TERMS = 40


def _loss_and_gradients(adapter, loss, pred, target, what):
    """Through :func:`_identity_loop`, the tutorial sequence's loss and gradients (``grad.T @ pred``
    and ``grad.sum(0)`` for ``grad`` = dloss/dpred) match the reference; returns the loop and the loss."""
    loop = _identity_loop(adapter, loss)
    expected, grad = reference.loss(loss, pred, target)
    compare(f"{what}: loss", tutorial_gradients(loop, pred, target), expected, dtype=loop.dtype, size=LOSS_TERMS)
    gradients = {"0.weight": grad.T @ np.asarray(pred, F64), "0.bias": grad.sum(0)}
    compare_states(f"{what}: gradient", loop.gradients(), gradients, dtype=loop.dtype, size=LOSS_TERMS)
    return loop, expected


@check("losses")
def check_losses_new(adapter):
    """CrossEntropyLoss with label smoothing and class-probability targets, BCEWithLogitsLoss, L1Loss,
    SmoothL1Loss and HuberLoss: values (mean, and sum for two), gradients and evaluate() match their formulas."""
    pred = (3 * inputs((5,), seed=2)).astype(np.float32)
    for spec, kind in NEW_LOSSES:
        target = _targets(kind)
        what = f"{spec} with {kind} targets"
        loop, _ = _loss_and_gradients(adapter, spec, pred, target, what)
        per_sample = reference.loss_terms(spec, pred, target)[0].mean()
        compare(f"{what}: evaluate()['loss']", loop.evaluate((pred, target))["loss"], per_sample, dtype=loop.dtype,
                size=LOSS_TERMS)  # fmt: skip
    # "sum" adds what "mean" averages: over samples for class probabilities, over elements for the rest
    for spec, kind in ((CrossEntropyLoss(reduction="sum"), "probabilities"), (L1Loss(reduction="sum"), "floats")):
        target = _targets(kind)
        loop = _identity_loop(adapter, spec)
        expected, _ = reference.loss(spec, pred, target)
        compare(f"{spec} with {kind} targets: loss", loop.to_float(loop.loss(loop.forward(pred), target)), expected,
                dtype=loop.dtype, size=LOSS_TERMS)  # fmt: skip


@check("conv", "pooling")
def check_transposed_conv_and_upsample(adapter):
    """ConvTranspose2d (stride, padding, output_padding below and beyond the stride, groups, dilation,
    no bias), Upsample (nearest and bilinear, by size and by integer and fractional scale factors,
    align_corners) and Flatten(start_dim, end_dim) match the reference; three layers per model keep
    the number of models small."""
    cases = (
        (layers.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1),  # -> 12x10
         layers.Upsample(scale_factor=(1.7, 0.6)), layers.Upsample(size=(9, 7), mode="bilinear")),
        (layers.ConvTranspose2d(4, 4, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
         layers.Upsample(scale_factor=2), layers.Upsample(scale_factor=(1.5, 0.5), mode="bilinear")),
        (layers.ConvTranspose2d(4, 4, 3, output_padding=1, dilation=2),
         layers.Upsample(scale_factor=0.7, mode="bilinear", align_corners=True), layers.Flatten(1, 2)),
    )  # fmt: skip
    for middle in cases:
        what = " then ".join(map(repr, middle))
        _layer_case(adapter, what, _between_convs(*middle), (2, 6, 5))


@check("losses")
def check_bce_loss(adapter):
    """BCELoss on probabilities, with mean and sum reduction, soft and hard targets, including
    predictions of exactly 0 and 1 (logarithms floored at -100, PyTorch's finite gradient there):
    values, gradients and evaluate() match the formula."""
    rng = np.random.default_rng(9)
    pred = rng.uniform(0.02, 0.98, (8, 5)).astype(np.float32)
    pred[0, :2], pred[1, 3] = (0.0, 1.0), 1.0
    for spec, target in (
        (BCELoss(), _targets("unit")),
        (BCELoss(reduction="sum"), (rng.uniform(0, 1, (8, 5)) > 0.5).astype(np.float32)),
    ):
        what = f"{spec} on probabilities"
        loop, _ = _loss_and_gradients(adapter, spec, pred, target, what)
        if spec.reduction == "mean":
            per_element = reference.loss_terms(spec, pred, target)[0].mean()
            compare(f"{what}: evaluate()['loss']", loop.evaluate((pred, target))["loss"], per_element,
                    dtype=loop.dtype, size=LOSS_TERMS)  # fmt: skip


@check("custom-loss")
def check_custom_loss(adapter):
    """CustomLoss: the seed tutorial's (pred - labels).sum(), a hand-written soft cross-entropy and an
    expression using every operation give the closed-form loss and gradients, through the tutorial
    sequence and through step()."""
    pred = inputs((5,), seed=2)
    target = np.random.default_rng(8).uniform(0.1, 1.0, (8, 5)).astype(np.float32)
    for tree, (fn, _) in reference.CUSTOM_LOSSES.items():
        what = f"CustomLoss {tree[0]}(...)"
        loop, expected = _loss_and_gradients(adapter, CustomLoss(fn), pred, target, what)
        compare(f"{what}: step() return value", loop.to_float(loop.step((pred, target))), expected,
                dtype=loop.dtype, size=LOSS_TERMS)  # fmt: skip


@check()
def check_bad_input_branches(adapter):
    """Branches that do not fit and targets that do not fit the loss are refused before any framework
    work, naming the layer path or both shapes."""
    x = inputs((4,))
    mismatch = layers.Sequential({"block": layers.Residual(layers.Sequential(layers.Linear(4, 5)))})
    loop = adapter(mismatch)
    expect_error("step() through a Residual whose body changes the shape", lambda: loop.step((x, labels())),
                 "block: body gives (5,), shortcut gives (4,)")  # fmt: skip
    model = layers.Sequential(layers.Linear(4, 4))
    cases = (
        (CrossEntropyLoss(), np.full((8, 3), 1 / 3, np.float32), ("(8, 3)", "(8, 4)")),
        (NLLLoss(), np.zeros((8, 4), np.float32), ("NLLLoss", "integer class indices")),
        (MSELoss(), np.zeros((8, 5), np.float32), ("(8, 5)", "(8, 4)")),
        (CustomLoss(lambda pred, target: (pred - target).sum()), np.zeros((8, 3), np.float32),
         ("(8, 4)", "(8, 3)", "do not broadcast")),
    )  # fmt: skip
    for loss, target, needles in cases:
        loop = adapter(model, loss=loss)
        expect_error(f"step() with {loss} and targets of shape {target.shape}", lambda: loop.step((x, target)),  # noqa: B023
                     *needles)  # fmt: skip
        if loop.step_count != 0:
            fail(f"a rejected batch changed step_count to {loop.step_count}")


# --- 27-29. training as a whole -------------------------------------------------------------------


#: Adam's eps is raised from 1e-8 so that float32 noise on near-zero gradients (~1e-8) is not
#: amplified into lr-sized steps; Adam's equations themselves are checked exactly elsewhere.
TRAJECTORY_OPTIMIZERS = (SGD(lr=0.01, momentum=0.9), Adam(lr=1e-3, eps=1e-4))
TRAJECTORY_BATCH = 16


@functools.lru_cache(maxsize=4)
def _reference_trajectory(preset: str, spec, steps: int):
    """Per-step losses and final parameters of the reference, shared by every backend."""
    model = layers.preset(preset)
    data = load_mnist("train")
    ref, optimizer = reference.Reference(model, reference.initial_state(model, 0)), reference.Optimizer(spec)
    losses = []
    for step in range(steps):
        batch = slice(step * TRAJECTORY_BATCH, (step + 1) * TRAJECTORY_BATCH)
        losses.append(reference.train_step(ref, CrossEntropyLoss(), optimizer, data.x[batch], data.y[batch]))
    return losses, {key: ref.state[key] for key in model.param_shapes()}


def _trajectory(adapter, preset, steps):
    model, data = layers.preset(preset), load_mnist("train")
    size = max(layer.fan_in() for _, layer in model.named_layers() if layer.param_shapes())
    for spec in TRAJECTORY_OPTIMIZERS:
        loop = adapter(model, optimizer=spec)
        losses = []
        for step in range(steps):
            batch = slice(step * TRAJECTORY_BATCH, (step + 1) * TRAJECTORY_BATCH)
            losses.append(loop.to_float(loop.step((data.x[batch], data.y[batch]))))
        expected_losses, expected_params = _reference_trajectory(preset, spec, steps)
        compare(f"{spec}: losses of {steps} steps", losses, expected_losses, dtype=loop.dtype, size=size)
        compare_states(f"{spec}: after {steps} steps, parameter", params_of(loop), expected_params,
                       dtype=loop.dtype, size=size)  # fmt: skip


@check()
def check_trajectory_mlp(adapter):
    """100 steps of the mlp on MNIST (SGD with momentum, and Adam) stay within tolerance of the reference."""
    _trajectory(adapter, "mlp", steps=100)


@check("conv")
def check_trajectory_cnn(adapter):
    """20 steps of the cnn on MNIST (SGD with momentum, and Adam) stay within tolerance of the reference."""
    _trajectory(adapter, "cnn", steps=20)


@check()
def check_overfit_smoke(adapter):
    """16 fixed samples are learned to near-zero loss."""
    model = layers.Sequential(layers.Flatten(), layers.Linear(12, 32), layers.ReLU(), layers.Linear(32, 4))
    loop = adapter(model, optimizer=Adam(lr=0.02))
    data = ArrayDataset(inputs((3, 4), n=16), labels(16))
    loop.fit(data, epochs=150, batch_size=16, shuffle=False)
    metrics = loop.evaluate(data)
    if not (metrics["loss"] < 0.05 and metrics["accuracy"] == 1.0):
        fail(f"after 150 full-batch Adam steps on 16 samples: loss {metrics['loss']:.4g} (expected < 0.05), "
             f"accuracy {metrics['accuracy']:.3f} (expected 1)")  # fmt: skip


@check("native-model")
def check_native_model(adapter):
    """A native model of the framework (native_example_model()) trains through the same loop."""
    model = adapter.native_example_model()
    if model is None:
        raise CheckSkipped(f"{adapter.__name__}.native_example_model() offers no example native model")
    if not adapter.is_native_model(model):
        fail(f"{adapter.__name__}.is_native_model() rejects its own native_example_model()")
    loop = adapter(model, optimizer=Adam(lr=0.02))
    if loop.model_spec is not None:
        fail(f"a native model gave model_spec {loop.model_spec!r}, expected None")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8)).astype(np.float32), rng.integers(0, 3, 16)
    start = loop.evaluate((x, y))["loss"]
    for _ in range(60):
        loop.step((x, y))
    metrics = loop.evaluate((x, y))
    if not metrics["loss"] < start / 2:
        fail(f"60 Adam steps on 16 samples took the native model's loss from {start:.4g} to {metrics['loss']:.4g}, "
             f"expected below half")  # fmt: skip
    if loop.predict(x).shape != (16, 3):
        fail(f"predict() of the native model has shape {loop.predict(x).shape}, expected (16, 3)")
    state = loop.state_dict()
    if not state:
        fail("state_dict() of the native model is empty")
    copy = adapter(adapter.native_example_model())
    copy.load_state_dict(state)
    compare_exact("predict() after loading the trained native state into a fresh one", copy.predict(x), loop.predict(x))
