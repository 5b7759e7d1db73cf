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
