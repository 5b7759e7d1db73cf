"""The protocol's surface, forward passes, losses and gradients against the float64 reference."""

from __future__ import annotations

import inspect

import numpy as np

from unitrain import layers
from unitrain.loop import CAPABILITIES, TrainingLoop
from unitrain.losses import (
    CrossEntropyLoss,
    MSELoss,
    NLLLoss,
)

from . import reference, tolerances
from .checks import (
    CONV_FAN_IN,
    DENSE_FAN_IN,
    _within,
    batchnorm2d_model,
    batchnorm_model,
    check,
    compare,
    compare_exact,
    compare_states,
    conv_model,
    dense_model,
    fail,
    identity_loop,
    inputs,
    labels,
    loaded,
    mode_model,
    state_of,
    tutorial_gradients,
)
from .reference import F64

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


@check()
def check_eval_forward_deterministic(adapter):
    """Eval-mode outputs are bitwise equal for the same weights and input (dropout/BatchNorm included)."""
    model = mode_model(adapter)
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


@check()
def check_losses(adapter):
    """Cross-entropy, NLL and MSE with mean and sum reduction match their closed forms."""
    pred = (3 * inputs((5,), seed=2)).astype(np.float32)
    for spec in (CrossEntropyLoss, NLLLoss, MSELoss):
        target = inputs((5,), seed=3) if spec is MSELoss else labels(classes=5)
        for reduction in ("mean", "sum"):
            loop = identity_loop(adapter, spec(reduction=reduction))
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
    loop = identity_loop(adapter, CrossEntropyLoss())
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
