"""What every check is made of: the registry, the comparisons and the small models and data.

A check is a function of the adapter class, registered with :func:`check` in the modules named
``*_checks.py`` (in the order ``unitrain.conformance`` imports them, which is the order they run
and are listed in). It builds its own small loops, compares them with :mod:`.reference` and raises
:class:`CheckFailure` with what was expected, what came out, the max error and the tolerance.
Capability tags a check needs are declared with it; an adapter lacking one gets a skip naming it.
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from unitrain import layers, sequences
from unitrain.loop import CAPABILITIES, TrainingLoop

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


def compare_correct(what: str, got, pred, y, *, dtype, size: float) -> None:
    """``got`` can be the number of rows of predictions ``pred`` that argmax to the class indices
    ``y`` when each prediction may be off by :func:`compare`'s tolerance: a row whose label's score
    and best other score are within twice of it counts either way."""
    pred = np.asarray(pred, F64)
    tolerance = tolerances.tolerance(dtype, size, float(np.abs(pred).max()), _current.get().name)
    others = np.where(np.arange(pred.shape[1]) == y[:, None], -math.inf, pred).max(1)
    lead = pred[np.arange(len(y)), y] - others
    fewest, most = int((lead > 2 * tolerance).sum()), int((lead >= -2 * tolerance).sum())
    if got is None or not fewest <= float(got) <= most:
        fail(f"{what}: expected {fewest}" + (f" to {most}" if most > fewest else "") + f", got {got}")


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


def batchnorm_model(running_var: str = "unbiased") -> layers.Sequential:
    """Input ``(N, 6)``."""
    return layers.Sequential(
        layers.Linear(6, 8), layers.BatchNorm1d(8, momentum=0.2, running_var=running_var), layers.ReLU(),
        layers.Linear(8, 4),
    )  # fmt: skip


def batchnorm2d_model(running_var: str = "unbiased") -> layers.Sequential:
    """Input ``(N, 2, 5, 5)``."""
    return layers.Sequential(
        layers.Conv2d(2, 3, 3), layers.BatchNorm2d(3, eps=1e-3, running_var=running_var), layers.ReLU(),
        layers.Flatten(), layers.Linear(27, 4),
    )  # fmt: skip


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


def longest_sum(model, input_shape, n: int) -> int:
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


def mode_model(adapter) -> layers.Sequential:
    """Input ``(N, 6)``: BatchNorm and Dropout (where the adapter has them) nested one level down,
    inside a Residual's body where the adapter has branches."""
    extra = [layers.BatchNorm1d(8)] if "batchnorm" in adapter.capabilities else []
    extra += [layers.Dropout(0.5)] if "dropout" in adapter.capabilities else []
    middle = layers.Sequential(*extra, layers.ReLU())
    if "residual" in adapter.capabilities:
        middle = layers.Residual(middle, post=layers.ReLU())
    return layers.Sequential(layers.Linear(6, 8), middle, layers.Linear(8, 4))


def identity_loop(adapter, loss):
    """A loop whose forward returns its input exactly: one Linear with identity weights."""
    model = layers.Sequential(layers.Linear(5, 5))
    return loaded(adapter, model, {"0.weight": np.eye(5, dtype=np.float32), "0.bias": np.zeros(5, np.float32)},
                  loss=loss)  # fmt: skip
