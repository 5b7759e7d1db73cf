"""The hand-written MindSpore and Chainer LeNet and ResNet-18 of unitrain/native.py (the benchmark's
native side) are the same networks as unitrain's: from the same weights, their first step's loss on
the same batch, and the weights and BatchNorm statistics it leaves, are unitrain's adapter's within
float32 rounding."""

import numpy as np
import pytest
from unitrain.conformance.checks import longest_sum  # the suite's tolerance size of a model's forward pass
from unitrain.conformance.tolerances import tolerance

import unitrain
from unitrain.native import native_loop

# ResNet-18 with 3 input channels and 7 classes (both read from the weights by the native loops) on a
# small image: its last stage sees 1x1, so BatchNorm there normalises over the batch alone (4 samples)
CASES = {
    "lenet": (unitrain.lenet, (1, 28, 28)),
    "resnet18": (lambda: unitrain.resnet18(num_classes=7, in_channels=3), (3, 20, 20)),
}


@pytest.mark.parametrize("model_name", CASES)
@pytest.mark.parametrize("framework", ["mindspore", "chainer"])
def test_first_step_loss_is_the_adapters(framework, model_name):
    # through the adapter, which readies the import (Chainer needs the stdlib distutils first)
    pytest.importorskip(f"unitrain.backends.{framework}")
    spec, input_shape = CASES[model_name]
    model = spec()
    state = unitrain.init_weights(model, seed=0)
    rng = np.random.default_rng(0)
    classes = state["fc3.weight" if model_name == "lenet" else "fc.weight"].shape[0]
    x = rng.standard_normal((4, *input_shape), np.float32)
    y = rng.integers(0, classes, 4)

    native = native_loop(framework, model_name, state)
    native_loss = native.to_float(native.step(x, y))
    loop = unitrain.make_loop(framework, spec(), seed=0)
    loop.load_state_dict(state)
    loss = loop.to_float(loop.step((x, y)))

    # Each side is within the conformance tolerance of the exact loss, whose longest sum is the forward
    # pass's (or the cross entropy's over the classes and the batch), so they are within twice of each other.
    size = max(longest_sum(model, input_shape, len(x)), classes, len(x))
    assert abs(native_loss - loss) <= 2 * tolerance(np.float32, size, abs(loss))
    # After the step: the weights (SGD moved them by lr times gradients of the same float32 accuracy) and
    # BatchNorm's running statistics (one momentum step towards the batch's, which catches a momentum
    # or eps convention not converted), key by key with the same bound on each tensor's scale.
    native_state, state = native.state_dict(), loop.state_dict()
    assert list(native_state) == list(state)
    for key, value in state.items():
        value = np.asarray(value, np.float64)
        bound = 2 * tolerance(np.float32, size, float(np.abs(value).max()))
        np.testing.assert_allclose(native_state[key], value, rtol=0, atol=bound, err_msg=key)


# --- each framework's own momentum SGD and Adam (what ``compare --native`` trains with) ------------
#: two steps, so that the momentum buffer and Adam's moments of the first step enter the second. Adam's
#: eps 1e-3 makes its update Lipschitz in the gradient (at most lr / eps = 1 times it; with 1e-8 a gradient
#: within rounding of zero would move its weight by +-lr on one side and not the other).
NATIVE_OPTIMIZERS = {
    "momentum": lambda: unitrain.SGD(0.05, momentum=0.9),
    "adam": lambda: unitrain.Adam(1e-3, eps=1e-3),
}
FRAMEWORKS = [pytest.param(name, marks=[pytest.mark.slow] if name == "mindspore" else [])
              for name in ("torch", "mindspore", "chainer")]  # fmt: skip


def _mlp_batch():
    rng = np.random.default_rng(1)
    return rng.standard_normal((4, 1, 28, 28), np.float32), rng.integers(0, 10, 4)


@pytest.mark.parametrize("optimizer", NATIVE_OPTIMIZERS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_native_optimizers_step_as_the_adapter(framework, optimizer, request):
    """The framework's own optimizer (torch.optim.SGD/Adam, chainer.optimizers.MomentumSGD/Adam,
    mindspore.nn.Momentum/Adam) under the framework's dialect, two steps from the same weights: the
    weights are unitrain's adapter's within twice the float32 bound of their scale (each within one
    of the exact equations). The premise that no ReLU decision lies within rounding of a flip at
    either step is test_native_optimizer_cases_keep_their_relu_decisions'."""
    pytest.importorskip(f"unitrain.backends.{framework}")
    if framework == "torch":
        request.getfixturevalue("torch_single_thread")
    model, spec, state = _native_optimizer_case(framework, optimizer)
    x, y = _mlp_batch()
    native = native_loop(framework, "mlp", state, spec)
    loop = unitrain.make_loop(framework, model, optimizer=spec, seed=0)
    loop.load_state_dict(state)
    for _ in range(2):
        native.step(x, y)
        loop.step((x, y))
    size = longest_sum(model, (1, 28, 28), len(x))
    native_state = native.state_dict()
    for key, value in loop.state_dict().items():
        value = np.asarray(value, np.float64)
        bound = 2 * tolerance(np.float32, size, float(np.abs(value).max()))
        np.testing.assert_allclose(native_state[key], value, rtol=0, atol=bound, err_msg=key)


def _native_optimizer_case(framework, optimizer):
    """The framework's dialect's MLP preset and optimizer (its momentum and eps placement), and the
    first weights."""
    with unitrain.dialect(framework):
        model, spec = unitrain.mlp(), NATIVE_OPTIMIZERS[optimizer]()
    return model, spec, unitrain.init_weights(model, seed=0)


@pytest.mark.parametrize(
    ("framework", "optimizer"), [("torch", "momentum"), ("torch", "adam"), ("mindspore", "adam"),
                                 ("chainer", "momentum"), ("chainer", "adam")],
)  # fmt: skip
def test_native_optimizer_cases_keep_their_relu_decisions(framework, optimizer, torch_single_thread):
    """Every ReLU input of both steps' forward passes (float64 NumPy run) lies more than
    RoundingModel.MARGIN rounding scales from zero, on any CPU. (MindSpore's momentum case is
    torch's: the same MLP, weights and equation.)"""
    torch = pytest.importorskip("torch")
    from torch_reference import RoundingModel, torch_mlp

    model, spec, state = _native_optimizer_case(framework, optimizer)
    x, y = _mlp_batch()
    loop = unitrain.make_loop("numpy", model, optimizer=spec, dtype="float64")
    loop.load_state_dict(state)
    for step in range(2):
        net = torch_mlp().double()
        net.load_state_dict({key: torch.from_numpy(np.asarray(value, np.float64)) for key, value in
                             loop.state_dict().items()})  # fmt: skip
        for name, index, margin in RoundingModel(net, torch.from_numpy(x)).margins():
            assert margin > RoundingModel.MARGIN, f"step {step + 1}, {name} call {index}: {margin:.1f} scales"
        loop.step((x.astype(np.float64), y))


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "lenet"])
def test_the_chainer_step_calls_what_chainers_own_loop_calls(model_name):
    """Each function node of a Chainer step costs 10-25 us of Python, a few per cent of a small
    model's step: the adapter's step builds the nodes of Chainer's hand-written loop, no more."""
    pytest.importorskip("unitrain.backends.chainer")
    import chainer

    class Calls(chainer.FunctionHook):
        def __init__(self):
            self.labels = []

        def forward_preprocess(self, function, in_data):
            self.labels.append(function.label)

        def backward_preprocess(self, function, in_data, out_grad):
            self.labels.append(f"backward of {function.label}")

    spec = getattr(unitrain, model_name)
    x, y = np.random.default_rng(0).standard_normal((8, 1, 28, 28), np.float32), np.arange(8) % 10
    loop = unitrain.make_loop("chainer", spec(), seed=0)
    native = native_loop("chainer", model_name, unitrain.init_weights(spec(), seed=0))
    calls = {}
    for side, step in {"adapter": lambda x, y: loop.step((x, y)), "Chainer's loop": native.step}.items():
        hook = Calls()
        with hook:
            step(x, y)
        calls[side] = sorted(hook.labels)
    assert calls["adapter"] == calls["Chainer's loop"]
