"""Weights and their files, initialisers, seeds, epochs, dtypes and bad input."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from unitrain import layers
from unitrain.data import ArrayDataset
from unitrain.loop import TrainingLoop
from unitrain.optim import SGD, Adam

from . import reference
from .checks import (
    DENSE_FAN_IN,
    batchnorm_model,
    check,
    compare,
    compare_states,
    dense_model,
    expect_error,
    fail,
    inputs,
    labels,
    loaded,
    state_of,
)

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
    # the DCGAN tutorial's weights_init; a transposed convolution keeps PyTorch's default under any scheme
    model = layers.Sequential(
        layers.ConvTranspose2d(3, 4, 3, bias=False, weight_init="normal(std=0.02)"),
        layers.BatchNorm2d(4, weight_init="normal(std=0.02, mean=1.0)", bias_init="uniform(-0.1, 0.1)"),
        layers.ConvTranspose2d(4, 2, 2, stride=2), layers.Flatten(), layers.Linear(200, 3), init="keras",
    )  # fmt: skip
    compare_states("initial state_dict() of ConvTranspose2d and BatchNorm initialisers:",
                   adapter(model, seed=5).state_dict(), reference.initial_state(model, 5), dtype="float32",
                   size=1)  # fmt: skip


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
