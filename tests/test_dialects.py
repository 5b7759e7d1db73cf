"""Dialects against the frameworks themselves: a tutorial-style MLP written natively in Chainer,
Keras 3 (on its torch backend) and MindSpore with each framework's own optimizer and defaults,
started from the weights unitrain draws with that dialect, and the same model in unitrain with
``dialect=``, end in the same place after 200 Adam steps and after 200 momentum-SGD steps under
StepLR, on every backend.

Bounds: each native case also runs in float64 and in float32 on the batch in reverse order; a
backend's float32 run must stay within sqrt(n) times the native float32 drift (torch_reference's
``drift_tolerances``), and the NumPy backend's float64 run within the float64 formula of the
native float64 run: the equations themselves, where rounding is ~1e-16. Keras 3 and MindSpore
have no float64 run of these tutorials (Keras on torch multiplies float64 in float32: its type
promotion, ``keras/src/backend/common/dtypes.py``, maps float64 to float32; MindSpore's
``CrossEntropyLoss`` takes float16/32 only): their drift is measured against the NumPy backend's
float64 run of the same equations, which the Chainer case checks in float64 (Keras' and
MindSpore's Adam put eps where Chainer's does; Keras' momentum is Chainer's, MindSpore's PyTorch's).

The Chainer case on the NumPy and Chainer backends runs in the quick suite; the other backends
(a torch import, a MindSpore compilation) and the Keras and MindSpore natives (about 0.1 s of
framework Python per step) are ``slow``."""

import os

import numpy as np
import pytest
from conftest import installed_backends
from torch_reference import assert_within_drift, drift_tolerances, float64_tolerances

import unitrain
from unitrain import ArrayDataset, layers, optim
from unitrain.schedules import StepLR
from unitrain.weights import init_weights

pytestmark = pytest.mark.usefixtures("torch_single_thread")
BACKENDS = [pytest.param(name, marks=[pytest.mark.slow] if name in ("torch", "mindspore") else [])
            for name in installed_backends()]  # fmt: skip
STEPS, SAMPLES, FEATURES, HIDDEN, CLASSES, SEED = 200, 24, 12, 16, 5, 3
SGD_LR, SGD_MOMENTUM, STEP_SIZE, GAMMA = 0.05, 0.9, 50, 0.5


def _data():
    """Normal features but the first, on a scale 1000 times smaller (data left unnormalised): its
    weights' gradients are small, where Adam's eps placement shows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)) * np.r_[1e-3, np.ones(FEATURES - 1)]
    return x.astype(np.float32), rng.integers(0, CLASSES, SAMPLES)


def _model() -> layers.Sequential:
    return layers.Sequential(layers.Linear(FEATURES, HIDDEN), layers.ReLU(), layers.Linear(HIDDEN, CLASSES))


def _step_lrs():
    """StepLR's lr at each step (one step per epoch here)."""
    return [SGD_LR * GAMMA ** (step // STEP_SIZE) for step in range(STEPS)]


# --- the native tutorials -------------------------------------------------------------------------
# Each trains STEPS full-batch steps from ``state`` (PyTorch layouts) in ``dtype`` and returns the
# final weights in PyTorch layouts.


def chainer_native(state, x, y, dtype, optimizer):
    chainer = pytest.importorskip("chainer")
    import chainer.functions as F
    import chainer.links as L

    class MLP(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1 = L.Linear(FEATURES, HIDDEN)
                self.l2 = L.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            return self.l2(F.relu(self.l1(x)))

    model = MLP()
    for link, index in ((model.l1, 0), (model.l2, 2)):
        link.W.array = state[f"{index}.weight"].astype(dtype)
        link.b.array = state[f"{index}.bias"].astype(dtype)
    opt = chainer.optimizers.Adam() if optimizer == "adam" else chainer.optimizers.MomentumSGD(SGD_LR, SGD_MOMENTUM)
    opt.setup(model)
    x = x.astype(dtype)
    for step in range(STEPS):
        loss = F.softmax_cross_entropy(model(x), y)
        model.cleargrads()
        loss.backward()
        opt.update()
        if optimizer == "sgd" and (step + 1) % STEP_SIZE == 0:  # what StepLR (ExponentialShift) does
            opt.lr *= GAMMA
    return {"0.weight": model.l1.W.array, "0.bias": model.l1.b.array,
            "2.weight": model.l2.W.array, "2.bias": model.l2.b.array}  # fmt: skip


def keras_fit(model, opt, x, y, steps=STEPS):
    """The guide's loop on the torch backend: ``steps`` full-batch steps of sparse categorical
    cross-entropy on the logits, the gradients from torch's autograd applied by ``opt``."""
    import keras
    import torch

    for _ in range(steps):
        logits = model(x, training=True)
        loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        model.zero_grad()
        loss.backward()
        gradients = [variable.value.grad for variable in model.trainable_weights]
        with torch.no_grad():
            opt.apply(gradients, model.trainable_weights)


def keras_native(state, x, y, dtype, optimizer):
    """Keras' guide "writing a training loop from scratch" on its torch backend."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    import torch

    name = np.dtype(dtype).name
    inputs = keras.Input((FEATURES,), dtype=name)
    hidden = keras.layers.Dense(HIDDEN, activation="relu", dtype=name)
    output = keras.layers.Dense(CLASSES, dtype=name)
    model = keras.Model(inputs, output(hidden(inputs)))
    hidden.set_weights([state["0.weight"].T.astype(dtype), state["0.bias"].astype(dtype)])
    output.set_weights([state["2.weight"].T.astype(dtype), state["2.bias"].astype(dtype)])
    if optimizer == "adam":
        opt = keras.optimizers.Adam()
    else:
        schedule = keras.optimizers.schedules.ExponentialDecay(SGD_LR, STEP_SIZE, GAMMA, staircase=True)
        opt = keras.optimizers.SGD(schedule, momentum=SGD_MOMENTUM)
    keras_fit(model, opt, torch.from_numpy(x.astype(dtype)), torch.from_numpy(y))
    (w1, b1), (w2, b2) = hidden.get_weights(), output.get_weights()
    return {"0.weight": w1.T, "0.bias": b1, "2.weight": w2.T, "2.bias": b2}


def mindspore_native(state, x, y, dtype, optimizer):
    ms = pytest.importorskip("mindspore")
    from mindspore import Tensor, nn

    ms.set_device("CPU")

    class MLP(nn.Cell):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Dense(FEATURES, HIDDEN)
            self.relu = nn.ReLU()
            self.l2 = nn.Dense(HIDDEN, CLASSES)

        def construct(self, x):
            return self.l2(self.relu(self.l1(x)))

    net = MLP()
    for dense, index in ((net.l1, 0), (net.l2, 2)):
        dense.weight.set_data(Tensor(state[f"{index}.weight"].astype(dtype)))
        dense.bias.set_data(Tensor(state[f"{index}.bias"].astype(dtype)))
    loss_fn = nn.CrossEntropyLoss()
    if optimizer == "adam":
        opt = nn.Adam(net.trainable_params())
    else:
        opt = nn.Momentum(net.trainable_params(), learning_rate=_step_lrs(), momentum=SGD_MOMENTUM)

    def forward(x, y):
        return loss_fn(net(x), y)

    grad_fn = ms.value_and_grad(forward, None, opt.parameters)

    @ms.jit  # the quickstart's train_step, compiled (PyNative takes about 0.2 s a step here)
    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        opt(grads)
        return loss

    x, y = Tensor(x.astype(dtype)), Tensor(y.astype(np.int32))
    for _ in range(STEPS):
        train_step(x, y)
    return {"0.weight": net.l1.weight.asnumpy(), "0.bias": net.l1.bias.asnumpy(),
            "2.weight": net.l2.weight.asnumpy(), "2.bias": net.l2.bias.asnumpy()}  # fmt: skip


NATIVE = {"chainer": chainer_native, "keras": keras_native, "mindspore": mindspore_native}
CASES = [pytest.param((dialect, optimizer), id=f"{dialect}-{optimizer}",
                      marks=[pytest.mark.slow] if dialect != "chainer" else [])
         for dialect in NATIVE for optimizer in ("adam", "sgd")]  # fmt: skip


@pytest.fixture(scope="module", params=CASES)
def native_case(request):
    """The dialect, optimizer, initial state and the native runs: float32, float64 (Keras and
    MindSpore: see the module's doc), float32 on the reversed batch; with the float32 tolerances."""
    dialect, optimizer = request.param
    with unitrain.dialect(dialect):
        state = init_weights(_model(), SEED)
    x, y = _data()
    native = NATIVE[dialect]
    run32 = native(state, x, y, np.float32, optimizer)
    if dialect != "chainer":
        run64 = _unitrain_run(dialect, optimizer, state, "numpy", "float64")
    else:
        run64 = native(state, x, y, np.float64, optimizer)
    reversed32 = native(state, x[::-1].copy(), y[::-1].copy(), np.float32, optimizer)
    # the longest sum of one step: a weight gradient adds one term per sample
    tolerances = drift_tolerances((run32, reversed32), run64, SAMPLES)
    return dialect, optimizer, state, run32, run64, tolerances


def _unitrain_run(dialect, optimizer, state, backend, dtype="float32"):
    x, y = _data()
    with unitrain.dialect(dialect):  # the model and the optimizer take the dialect's defaults
        model = _model()
        spec = optim.Adam() if optimizer == "adam" else optim.SGD(SGD_LR, momentum=SGD_MOMENTUM)
    schedule = StepLR(STEP_SIZE, GAMMA) if optimizer == "sgd" else None
    loop = unitrain.make_loop(backend, model, optimizer=spec, lr_schedule=schedule, dtype=dtype)
    loop.load_state_dict(state)
    loop.fit(ArrayDataset(x, y), epochs=STEPS, batch_size=SAMPLES, shuffle=False)
    return {key: value for key, value in loop.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_dialect_lands_where_the_native_framework_does(native_case, backend):
    dialect, optimizer, state, run32, _, tolerances = native_case
    assert_within_drift(_unitrain_run(dialect, optimizer, state, backend), run32, tolerances)


def test_float64_dialect_equations_are_the_native_frameworks(native_case):
    dialect, optimizer, state, _, run64, _ = native_case
    if dialect != "chainer":
        pytest.skip(f"{dialect}'s tutorial has no float64 run (see the module's doc)")
    actual = _unitrain_run(dialect, optimizer, state, "numpy", "float64")
    assert_within_drift(actual, run64, float64_tolerances(run64, SAMPLES))


def test_pytorch_equations_do_not_land_there(native_case):
    """The bound has teeth: PyTorch's own equations from the same start end outside it."""
    dialect, optimizer, state, run32, _, tolerances = native_case
    if optimizer == "sgd" and dialect == "mindspore":
        pytest.skip("MindSpore's Momentum is PyTorch's equation")
    x, y = _data()
    with unitrain.dialect(dialect):
        model = _model()
    spec = optim.Adam(eps=1e-7 if dialect == "keras" else 1e-8) if optimizer == "adam" else optim.SGD(
        SGD_LR, momentum=SGD_MOMENTUM)  # fmt: skip
    loop = unitrain.make_loop("numpy", model, optimizer=spec, lr_schedule=StepLR(STEP_SIZE, GAMMA) if optimizer ==
                              "sgd" else None)  # fmt: skip
    loop.load_state_dict(state)
    loop.fit(ArrayDataset(x, y), epochs=STEPS, batch_size=SAMPLES, shuffle=False)
    with pytest.raises(AssertionError):
        assert_within_drift(loop.state_dict(), run32, tolerances)
