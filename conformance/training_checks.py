"""Training as a whole: trajectories against the reference, overfitting, native models."""

from __future__ import annotations

import functools

import numpy as np

from unitrain import layers
from unitrain.data import ArrayDataset, load_mnist
from unitrain.losses import (
    CrossEntropyLoss,
)
from unitrain.optim import SGD, Adam

from . import reference
from .checks import (
    CheckSkipped,
    check,
    compare,
    compare_exact,
    compare_states,
    fail,
    inputs,
    labels,
    params_of,
)

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
