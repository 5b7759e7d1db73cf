"""Keras' BatchNormalization against Keras itself: a small CNN with BatchNorm written natively in
Keras 3 (torch backend, channels last, the guide's from-scratch loop) from the weights unitrain
draws with ``dialect="keras"``, and the same model in unitrain with that dialect, trained 200
Adam steps on every backend and then run in inference mode on other images: the weights, the
moving mean and variance (Keras feeds its moving variance the *biased* batch variance,
``running_var="biased"``) and the inference outputs land within float32 rounding of Keras'.

Bounds as in ``test_dialects_cnn.py``: sqrt(n) times Keras' float32 drift (its runs on the batch in
both orders) from the NumPy backend's float64 run of the same equations (Keras on torch computes
float64 in float32); n is the longest sum of one step, the batch x output pixels of a channel's
statistics. The network has no ReLU or max pool (tanh and a global average pool), so no decision
can flip within rounding. The test has teeth: the same model with PyTorch's unbiased running
variance lands outside the bound. Keras' native run and MindSpore's compilation make it ``slow``."""

import os

import numpy as np
import pytest
from conftest import installed_backends
from test_dialects import keras_fit
from torch_reference import assert_within_drift, drift_tolerances

import unitrain
from unitrain import ArrayDataset, layers, optim
from unitrain.weights import init_weights

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_single_thread")]
STEPS, SAMPLES, SIZE, CHANNELS, KERNEL, CLASSES, SEED = 200, 8, 8, 3, 3, 5, 0
OUT = SIZE - KERNEL + 1  # the convolution's output size, pooled to 1 x 1
#: the longest sum of one step: a channel's batch statistics (and its weight gradient)
SUM = SAMPLES * OUT * OUT


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * SAMPLES, 1, SIZE, SIZE)).astype(np.float32)
    return x[:SAMPLES], rng.integers(0, CLASSES, SAMPLES), x[SAMPLES:]


def _model(running_var=None) -> layers.Sequential:
    """Built inside ``unitrain.dialect("keras")``: its BatchNorm takes Keras' defaults. The
    convolution has no bias, as Keras' guides write a convolution before BatchNormalization: the
    batch mean cancels a bias, whose gradient is then rounding noise that Adam scales to lr-sized
    steps (0.0003 apart between Keras' float32 and float64 runs after 200 steps)."""
    return layers.Sequential(
        layers.Conv2d(1, CHANNELS, KERNEL, bias=False), layers.BatchNorm2d(CHANNELS, running_var=running_var),
        layers.Tanh(), layers.AvgPool2d(OUT), layers.Flatten(), layers.Linear(CHANNELS, CLASSES),
    )  # fmt: skip


def keras_native(state, batches, x_test):
    """Conv2D - BatchNormalization - tanh - global average pool - Dense, Keras' defaults (its
    BatchNormalization: momentum 0.99, epsilon 1e-3), Adam's defaults, float32; per ``(x, y)`` of
    ``batches`` STEPS full-batch steps, then the inference outputs on ``x_test``."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    import torch

    def train(x, y):
        conv, norm = keras.layers.Conv2D(CHANNELS, KERNEL, use_bias=False), keras.layers.BatchNormalization()
        dense = keras.layers.Dense(CLASSES)
        model = keras.Sequential([
            keras.Input((SIZE, SIZE, 1)), conv, norm, keras.layers.Activation("tanh"),
            keras.layers.AveragePooling2D(OUT), keras.layers.Flatten(), dense,
        ])  # fmt: skip
        conv.set_weights([state["0.weight"].transpose(2, 3, 1, 0)])
        norm.set_weights([state[f"1.{key}"] for key in ("weight", "bias", "running_mean", "running_var")])
        dense.set_weights([state["5.weight"].T, state["5.bias"]])
        opt = keras.optimizers.Adam()
        keras_fit(model, opt, torch.from_numpy(x.transpose(0, 2, 3, 1).copy()), torch.from_numpy(y), STEPS)
        result = {"0.weight": conv.get_weights()[0].transpose(3, 2, 0, 1)}
        result |= dict(zip((f"1.{key}" for key in ("weight", "bias", "running_mean", "running_var")),
                           norm.get_weights(), strict=True))  # fmt: skip
        kernel, bias = dense.get_weights()
        inference = model(torch.from_numpy(x_test.transpose(0, 2, 3, 1).copy()), training=False)
        return result | {"5.weight": kernel.T, "5.bias": bias, "inference": keras.ops.convert_to_numpy(inference)}

    return [train(x, y) for x, y in batches]


def _unitrain_run(backend, state, dtype="float32", running_var=None):
    x, y, x_test = _data()
    with unitrain.dialect("keras"):  # the model and Adam take Keras' defaults
        model, spec = _model(running_var), optim.Adam()
    loop = unitrain.make_loop(backend, model, optimizer=spec, dtype=dtype)
    loop.load_state_dict(state)
    loop.fit(ArrayDataset(x, y), epochs=STEPS, batch_size=SAMPLES, shuffle=False)
    result = {key: np.array(value) for key, value in loop.state_dict().items() if "num_batches" not in key}
    return result | {"inference": np.asarray(loop.predict(x_test.astype(dtype)))}


@pytest.fixture(scope="module")
def keras_case():
    """The first weights, Keras' float32 run and the float32 tolerances."""
    with unitrain.dialect("keras"):
        state = init_weights(_model(), SEED)
    x, y, x_test = _data()
    run32, reversed32 = keras_native(state, [(x, y), (x[::-1].copy(), y[::-1].copy())], x_test)
    run64 = _unitrain_run("numpy", state, "float64")
    return state, run32, drift_tolerances((run32, reversed32), run64, SUM)


@pytest.mark.parametrize("backend", installed_backends())
def test_keras_batchnorm_lands_where_keras_does(keras_case, backend):
    state, run32, tolerances = keras_case
    assert_within_drift(_unitrain_run(backend, state), run32, tolerances)


def test_unbiased_running_variance_does_not_land_there(keras_case):
    state, run32, tolerances = keras_case
    with pytest.raises(AssertionError, match="running_var"):
        assert_within_drift(_unitrain_run("numpy", state, running_var="unbiased"), run32, tolerances)
