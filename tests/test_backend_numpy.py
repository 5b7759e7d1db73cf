"""The NumPy backend against PyTorch: the same weights and batches through hand-built
``torch.nn`` models and hand-written PyTorch training loops."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import (
    SEED,
    ResNet18,
    accumulation_tolerances,
    assert_states_close,
    assert_states_equal,
    assert_within_drift,
    drift_tolerances,
    expected_run,
    gradient_size,
    leaf_cases,
    load_state,
    numpy_gradients,
    numpy_state,
    random_batches,
    steps_tolerance,
    torch_layers,
    torch_runs,
    train_torch,
    twin_tolerance,
)
from unitrain.backends.numpy import NumpyLoop
from unitrain.backends.numpy_layers import _erfc
from unitrain.conformance.checks import longest_sum
from unitrain.conformance.tolerances import FINITE_DIFFERENCE_STEP, FINITE_DIFFERENCE_TOLERANCE, eps, tolerance

from unitrain import (
    SGD,
    Adam,
    AdamW,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    BCELoss,
    BCEWithLogitsLoss,
    Conv2d,
    CrossEntropyLoss,
    CustomLoss,
    Dropout,
    Flatten,
    HuberLoss,
    L1Loss,
    Linear,
    LogSoftmax,
    MaxPool2d,
    MSELoss,
    NLLLoss,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    SmoothL1Loss,
    Tanh,
    cnn,
    mlp,
    resnet18,
)
from unitrain.loop import InputError
from unitrain.randomness import dropout_mask, dropout_stream


def bn_net(dropout=0.3):
    """BatchNorm 1d/2d, padded strided conv, overlapping pooling, nesting and dropout."""
    return Sequential(
        Conv2d(1, 4, 3, stride=2, padding=1, bias=False), BatchNorm2d(4), ReLU(), MaxPool2d(3, stride=2),
        Flatten(),
        Sequential(Linear(144, 16, bias=False), BatchNorm1d(16)), ReLU(), Dropout(dropout), Linear(16, 10),
    )  # fmt: skip


MODELS = {"mlp": mlp, "cnn": cnn, "bn": bn_net, "bn_no_dropout": lambda: bn_net(0.0)}

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def torch_twin(loop):
    """The equivalent torch.nn.Sequential holding the loop's current weights, in its mode."""
    model = torch_layers(loop.model_spec).to(torch.float64 if loop.dtype == np.float64 else torch.float32)
    return load_state(model, loop.state_dict()).train(loop.training)


@pytest.fixture(scope="module")
def batch(mnist_batches):
    return mnist_batches[0]


def torch_loss(spec, pred, y):
    fn = {CrossEntropyLoss: torch.nn.functional.cross_entropy, NLLLoss: torch.nn.functional.nll_loss,
          MSELoss: torch.nn.functional.mse_loss}[type(spec)]  # fmt: skip
    return fn(pred, torch.from_numpy(y), reduction=spec.reduction)


# (dropout in training draws different masks than PyTorch: see test_dropout_gradient_uses_the_mask)
@pytest.mark.parametrize("model, training", [(m, t) for m in MODELS for t in (True, False) if (m, t) != ("bn", True)])
def test_forward_loss_gradients_and_buffers_match_torch(model, training, batch):
    x, y = batch
    loop = NumpyLoop(MODELS[model]()).train(training)
    references = [torch_twin(loop), torch_twin(loop).double()]
    pred = loop.forward(x)
    loss = loop.loss(pred, y)
    loop.backward(loss)
    # PyTorch in float32 and float64: tolerances from its own float32 drift (torch_reference.drift_tolerances;
    # under BatchNorm2d PyTorch's float32 conv gradient is 5e-6 off the float64 one on one CPU, ours 7e-8).
    runs = []  # per dtype: outputs, gradients, state
    for reference, dtype in zip(references, (torch.float32, torch.float64), strict=True):
        out = reference(torch.from_numpy(x).to(dtype))
        expected_loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(y))
        expected_loss.backward()
        outputs = {"pred": out.detach().numpy(), "loss": expected_loss.detach().numpy()}
        runs.append((outputs, numpy_gradients(reference), numpy_state(reference)))
    ours = ({"pred": pred, "loss": np.asarray(float(loss))}, loop.gradients(), loop.state_dict())
    for actual, part32, part64 in zip(ours, *runs, strict=True):
        assert_within_drift(actual, part32, drift_tolerances([part32], part64, x.size))


@pytest.mark.parametrize("model", ["mlp", "cnn", "bn_no_dropout"])
def test_float64_matches_torch_tightly(model, batch):
    x, y = batch
    loop = NumpyLoop(MODELS[model](), dtype="float64")
    reference = torch_twin(loop)
    pred = loop.forward(x)
    loop.backward(loop.loss(pred, y))
    assert pred.dtype == np.float64
    expected = reference(torch.from_numpy(x.astype(np.float64)))
    torch.nn.functional.cross_entropy(expected, torch.from_numpy(y)).backward()
    assert all(grad.dtype == np.float64 for grad in loop.gradients().values())
    assert_forward_and_gradients_close(loop, x, pred, expected, reference)


@pytest.mark.parametrize("loss_spec", [cls(reduction) for cls in (CrossEntropyLoss, NLLLoss, MSELoss)
                                       for reduction in ("mean", "sum")])  # fmt: skip
def test_losses_match_torch(loss_spec, batch):
    x, y = batch
    if isinstance(loss_spec, MSELoss):
        y = np.random.default_rng(0).standard_normal((len(x), 10)).astype(np.float32)
    loop = NumpyLoop(mlp(), loss=loss_spec)
    reference = torch_twin(loop)
    pred = loop.forward(x)
    loss = loop.loss(pred, y)
    loop.backward(loss)
    expected = torch_loss(loss_spec, reference(torch.from_numpy(x)), y)
    expected.backward()
    # float32 here and in PyTorch: the logits' longest sum, then the loss adds the batch's output elements
    size = longest_sum(loop.model_spec, x.shape[1:], len(x)) + pred.size
    assert float(loss) == pytest.approx(expected.item(), rel=0, abs=twin_tolerance(np.float32, size, expected.item()))
    size = gradient_size(loop.model_spec, x.shape[1:], len(x)) + pred.shape[1]  # + the loss's softmax
    atol = twin_tolerance(np.float32, size, 1)
    assert_states_close(loop.gradients(), numpy_gradients(reference), rtol=0, atol=atol, scale_atol=True)


@pytest.mark.parametrize("kernel, stride, padding, pool", [(3, 1, 1, (2,)), (3, 2, 1, (3, 2)), (2, 3, 0, (2, 3)),
                                                          (5, 1, 2, (3, 1))])  # fmt: skip
def test_conv_and_pool_geometries_match_torch(kernel, stride, padding, pool):
    # the 1x1 conv first makes the tested conv compute its input gradient; 9x11 leaves pooling remainders
    spec = Sequential(Conv2d(2, 3, 1), Conv2d(3, 4, kernel, stride, padding), ReLU(), MaxPool2d(*pool), Flatten())
    x = np.random.default_rng(1).standard_normal((5, 2, 9, 11)).astype(np.float32)
    loop = NumpyLoop(spec, loss=MSELoss())
    reference = torch_twin(loop)
    pred = loop.forward(x)
    y = np.random.default_rng(2).standard_normal(pred.shape).astype(np.float32)
    loop.backward(loop.loss(pred, y))
    expected = reference(torch.from_numpy(x))
    torch.nn.functional.mse_loss(expected, torch.from_numpy(y)).backward()
    assert_forward_and_gradients_close(loop, x, pred, expected, reference)


def assert_forward_and_gradients_close(loop, x, pred, expected, reference):
    """Our output and gradients against PyTorch's in the loop's dtype (``expected``, ``reference``): each
    within the formula over the forward's longest sum (gradients: plus the batch's products, plus the
    loss's softmax over the outputs)."""
    expected = expected.detach().numpy()
    atol = twin_tolerance(loop.dtype, longest_sum(loop.model_spec, x.shape[1:], len(x)), expected)
    np.testing.assert_allclose(pred, expected, rtol=0, atol=atol)
    atol = twin_tolerance(loop.dtype, gradient_size(loop.model_spec, x.shape[1:], len(x)) + pred.shape[1], 1)
    assert_states_close(loop.gradients(), numpy_gradients(reference), rtol=0, atol=atol, scale_atol=True)


def test_dropout_gradient_uses_the_mask(batch):
    x, y = batch
    loop = NumpyLoop(Sequential(Flatten(), Linear(784, 32), Dropout(0.5), Linear(32, 10)), seed=3)
    reference = torch_twin(loop)
    hidden = reference[1](reference[0](torch.from_numpy(x)))
    pred = loop.forward(x)
    loop.backward(loop.loss(pred, y))
    scale = loop._root.nodes[2].scale  # the mask this forward drew (PyTorch's form: 0 or 1/(1-p))
    assert set(np.unique(scale)) == {0.0, 2.0} and 0.4 < (scale == 0).mean() < 0.6
    expected = reference[3](hidden * torch.from_numpy(scale))
    torch.nn.functional.cross_entropy(expected, torch.from_numpy(y)).backward()
    assert_forward_and_gradients_close(loop, x, pred, expected, reference)


def test_dropout_is_identity_in_eval_and_seeded(batch):
    x, _ = batch
    flat = x.reshape(len(x), -1)
    model = Sequential(Flatten(), Dropout(0.25))
    first, second = NumpyLoop(model, seed=5), NumpyLoop(model, seed=5)
    masked = first.forward(x)
    np.testing.assert_array_equal(masked, second.forward(x))
    assert not np.array_equal(masked, NumpyLoop(model, seed=6).forward(x))
    kept = masked != 0
    # x / 0.75 here, x times a rounded 1 / 0.75 there: a rounding or two of each value
    np.testing.assert_allclose(masked[kept], flat[kept] / 0.75, rtol=0, atol=twin_tolerance(np.float32, 1, flat))
    np.testing.assert_array_equal(first.eval().forward(x), flat)
    np.testing.assert_array_equal(first.predict(x), flat)


def torch_optimizer(spec, params):
    if isinstance(spec, SGD):
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, dampening=spec.dampening,
                               nesterov=spec.nesterov, weight_decay=spec.weight_decay, foreach=False)  # fmt: skip
    kind = torch.optim.AdamW if isinstance(spec, AdamW) else torch.optim.Adam
    return kind(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, foreach=False)


# case: (model, optimizer, steps). Weights, buffers and losses must lie within float64 rounding of
# PyTorch's float64 loop (the equations) and, in float32, within the drift PyTorch's own float32 loop
# shows on the same case (torch_reference.drift_tolerances says why).
TRAJECTORIES = {
    "mlp-sgd-momentum": ("mlp", SGD(lr=0.01, momentum=0.9), 50),
    "cnn-sgd-momentum": ("cnn", SGD(lr=0.01, momentum=0.9), 50),
    "mlp-adam": ("mlp", Adam(lr=1e-3), 20),
    "cnn-adamw": ("cnn", AdamW(lr=1e-3, weight_decay=0.01), 20),
    "mlp-adamw": ("mlp", AdamW(lr=1e-3, weight_decay=0.01), 20),
    "mlp-nesterov-wd": ("mlp", SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4), 20),
    "bn-sgd-momentum-wd": ("bn_no_dropout", SGD(lr=0.01, momentum=0.9, weight_decay=1e-4), 20),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", TRAJECTORIES)
def test_training_trajectory_matches_a_torch_loop(case, dtype, mnist_batches):
    model, optimizer, steps = TRAJECTORIES[case]
    loop = NumpyLoop(MODELS[model](), optimizer=optimizer, dtype=dtype)
    initial = loop.state_dict()
    batches = mnist_batches[:steps]
    runs = torch_runs(
        lambda torch_dtype: load_state(torch_layers(loop.model_spec).to(torch_dtype), initial),
        lambda params: torch_optimizer(optimizer, params),
        batches,
    )
    expected, tolerances = expected_run(runs, dtype, size=batches[0][0].size)
    losses = {"loss": np.array([float(loop.step((x.astype(dtype), y))) for x, y in batches])}
    assert loop.step_count == loop.optimizer_state_dict()["step"] == steps
    assert_within_drift(losses, expected.losses, tolerances.losses)
    assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
    optimizer_state = loop.optimizer_state_dict()
    del optimizer_state["step"]
    assert_within_drift(optimizer_state, expected.buffers, tolerances.buffers)


@pytest.mark.parametrize("model", ["cnn", "bn_no_dropout"])
def test_step_equals_tutorial_sequence_bit_for_bit(model, mnist_batches):
    whole = NumpyLoop(MODELS[model](), optimizer=SGD(lr=0.05, momentum=0.9))
    tutorial = NumpyLoop(MODELS[model](), optimizer=SGD(lr=0.05, momentum=0.9))
    for x, y in mnist_batches[:4]:
        step_loss = whole.step((x, y))
        tutorial.zero_grad()
        loss = tutorial.loss(tutorial.forward(x), y)
        tutorial.backward(loss)
        tutorial.update()
        assert float(step_loss) == float(loss)
    assert tutorial.step_count == whole.step_count == 4
    assert_states_equal(tutorial.state_dict(), whole.state_dict())
    assert_states_equal(tutorial.optimizer_state_dict(), whole.optimizer_state_dict())


def test_gradients_accumulate_until_zero_grad(batch):
    x, y = batch
    halves = NumpyLoop(cnn(), loss=CrossEntropyLoss("sum"))
    full = NumpyLoop(cnn(), loss=CrossEntropyLoss("sum"))
    for part in (slice(0, 32), slice(32, 64)):
        halves.backward(halves.loss(halves.forward(x[part]), y[part]))
    full.backward(full.loss(full.forward(x), y))
    assert_within_drift(halves.gradients(), full.gradients(), accumulation_tolerances(full, x, y, full.gradients()))
    halves.zero_grad()
    assert all(not grad.any() for grad in halves.gradients().values())
    before = halves.state_dict()
    halves.update()  # zero gradients, no momentum: nothing moves
    assert_states_equal(halves.state_dict(), before)


def test_backward_refuses_the_loss_of_an_older_forward(batch):
    x, y = batch
    loop = NumpyLoop(mlp())
    loss = loop.loss(loop.forward(x), y)
    loop.forward(x)
    with pytest.raises(RuntimeError, match="latest forward"):
        loop.backward(loss)


def test_batchnorm_statistics_update_only_in_training(batch):
    x, y = batch
    loop = NumpyLoop(bn_net())
    reference = torch_twin(loop)
    buffers = ("1.running_mean", "1.running_var", "1.num_batches_tracked", "5.1.running_mean", "5.1.running_var")
    for _ in range(3):
        loop.forward(x)
        reference(torch.from_numpy(x))
    state = loop.state_dict()
    assert state["1.num_batches_tracked"] == 3 and state["1.num_batches_tracked"].dtype == np.int64
    expected = {key: value.numpy() for key, value in reference.state_dict().items()}
    # a statistic sums BatchNorm's n x positions, behind the longest sum before it (longest_sum counts both)
    size = longest_sum(loop.model_spec, x.shape[1:], len(x))
    for key in buffers:
        atol = twin_tolerance(np.float32, size, expected[key]) if expected[key].dtype.kind == "f" else 0
        np.testing.assert_allclose(state[key], expected[key], rtol=0, atol=atol, err_msg=key)
    loop.eval()
    loop.forward(x)
    loop.predict(x)
    loop.evaluate((x, y))
    assert_states_equal(loop.state_dict(), state)
    single = NumpyLoop(Sequential(Flatten(), Linear(784, 4), BatchNorm1d(4)))
    with pytest.raises(InputError, match="more than one value"):
        single.forward(x[:1])  # PyTorch refuses this too: the unbiased variance divides by zero


def test_predict_and_evaluate_change_nothing(mnist_train, mnist_batches):
    loop = NumpyLoop(bn_net(), optimizer=Adam())
    for batch in mnist_batches[:2]:
        loop.step(batch)
    state, optimizer_state = loop.state_dict(), loop.optimizer_state_dict()
    x, y = mnist_train.x[:300], mnist_train.y[:300]
    pred = loop.predict(x, batch_size=128)
    metrics = loop.evaluate((x, y), batch_size=128)
    assert loop.training and loop.step_count == 2
    assert_states_equal(loop.state_dict(), state)
    assert_states_equal(loop.optimizer_state_dict(), optimizer_state)
    reference = torch_twin(loop).eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x))
    size = longest_sum(loop.model_spec, x.shape[1:], 128)  # a batch of predict's
    np.testing.assert_allclose(pred, expected.numpy(), rtol=0, atol=twin_tolerance(np.float32, size, expected.numpy()))
    expected_loss = torch.nn.functional.cross_entropy(expected, torch.from_numpy(y)).item()
    size += len(x) + pred.shape[1]  # the mean adds every sample's softmax over the classes
    assert metrics["loss"] == pytest.approx(expected_loss, rel=0, abs=twin_tolerance(np.float32, size, expected_loss))
    assert metrics["num_correct"] == int((expected.argmax(1).numpy() == y).sum())


def test_state_dict_layout_and_weight_files(tmp_path, batch):
    loop = NumpyLoop(bn_net(), seed=4)
    loop.step(batch)
    state = loop.state_dict()
    expected = torch_layers(bn_net()).state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].shape == tuple(value.shape), key
        assert state[key].dtype == (np.int64 if key.endswith("num_batches_tracked") else np.float32), key
    path = tmp_path / "weights.safetensors"
    loop.save_weights(path)
    torch_layers(bn_net()).load_state_dict(safetensors.torch.load_file(path))  # PyTorch reads the file
    restored = NumpyLoop(bn_net(), seed=9)
    restored.load_weights(path)
    assert_states_equal(restored.state_dict(), state)


@pytest.mark.parametrize("optimizer", [SGD(lr=0.05, momentum=0.9), Adam(lr=1e-3)])
def test_optimizer_state_round_trip(optimizer, mnist_batches):
    batches = mnist_batches[:5]
    original = NumpyLoop(cnn(), optimizer=optimizer)
    for batch in batches[:3]:
        original.step(batch)
    saved = original.optimizer_state_dict()
    assert set(saved) == {"step"} | {f"{name}.{buffer}" for name in cnn().param_shapes()
                                     for buffer in optimizer.state_names}  # fmt: skip
    assert saved["step"].dtype == np.int64 and saved["step"].shape == ()
    resumed = NumpyLoop(cnn(), optimizer=optimizer, seed=1)
    resumed.load_state_dict(original.state_dict())
    resumed.load_optimizer_state_dict(saved)
    for batch in batches[3:]:
        original.step(batch)
        resumed.step(batch)
    assert_states_equal(resumed.state_dict(), original.state_dict())
    with pytest.raises(ValueError, match="unexpected"):
        resumed.load_optimizer_state_dict({"step": np.int64(1), "0.weight.nonsense": saved["step"]})


def test_float64_trains_end_to_end(mnist_train):
    loop = NumpyLoop(bn_net(), optimizer=Adam(), dtype="float64")
    history = loop.fit(mnist_train.subset(slice(0, 640)), epochs=2, batch_size=64)
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert all(v.dtype == np.float64 for k, v in loop.state_dict().items() if "num_batches" not in k)
    assert all(v.dtype == np.float64 for k, v in loop.optimizer_state_dict().items() if k != "step")
    assert loop.predict(mnist_train.x[:5]).dtype == np.float64


def test_native_models_are_refused():
    assert "native-model" not in NumpyLoop.capabilities
    with pytest.raises(TypeError, match=r"a torch model: train it with make_loop\('torch', model\)"):
        NumpyLoop(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_one_epoch_of_mlp_reaches_90_percent(mnist_train, mnist_test):
    loop = NumpyLoop(mlp(), optimizer=SGD(lr=0.01), seed=0)
    (record,) = loop.fit(mnist_train, epochs=1, batch_size=64, shuffle=True, eval_data=mnist_test)
    print(f"numpy mlp: test accuracy {record['test_accuracy']:.4f}, {record['samples_per_sec']:.0f} samples/s")
    assert record["test_accuracy"] >= 0.90


# --- the model as a tree, the new leaves and losses ------------------------------------


class TorchResidual(nn.Module):
    """Plain PyTorch twin of ``unitrain.Residual``: ``post(body(x) + downsample(x))``, the body's
    modules registered directly on the block (torchvision's BasicBlock naming)."""

    def __init__(self, body, downsample=None, post=None):
        super().__init__()
        for name, module in body.items():
            self.add_module(name, module)
        self.body_names = list(body)
        self.downsample, self.post = downsample, post

    def forward(self, x):
        out = x
        for name in self.body_names:
            out = getattr(self, name)(out)
        out = out + (x if self.downsample is None else self.downsample(x))
        return out if self.post is None else self.post(out)


def numpy_layout_cases():
    """Geometries the shared ``leaf_cases`` (7x7 images) do not reach in this backend: convolutions with
    groups, dilation and rectangular kernels over a larger image, each taking its input in the
    batch-last memory layout the first convolution leaves (see ``numpy_conv._Conv2d``), and rectangular
    windows on a 9x8 image; same form as ``leaf_cases``."""
    leaves = {
        "conv2d_per_sample_groups_dilation": (Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1), groups=2),
                                              nn.Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1), groups=2)),
        "conv2d_per_sample_depthwise": (Conv2d(4, 8, (3, 2), padding=(1, 1), groups=4, bias=False),
                                        nn.Conv2d(4, 8, (3, 2), padding=(1, 1), groups=4, bias=False)),
        "maxpool2d_rectangular": (MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)),
                                  nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1))),
        "avgpool2d_rectangular_exclude_pad": (AvgPool2d((3, 2), stride=(2, 1), padding=1, count_include_pad=False),
                                              nn.AvgPool2d((3, 2), stride=(2, 1), padding=1, count_include_pad=False)),
        "adaptiveavgpool2d_uneven_bins": (AdaptiveAvgPool2d((4, 3)), nn.AdaptiveAvgPool2d((4, 3))),
        "logsoftmax_rows": (LogSoftmax(dim=-2), nn.LogSoftmax(dim=-2)),
    }  # fmt: skip
    cases = {}
    for name, (leaf, torch_leaf) in leaves.items():
        features = int(np.prod(leaf.output_shape((4, 9, 8))))
        spec = Sequential(Conv2d(3, 4, 1), leaf, Flatten(), Linear(features, 3))
        cases[name] = (
            spec,
            nn.Sequential(nn.Conv2d(3, 4, 1), torch_leaf, nn.Flatten(), nn.Linear(features, 3)),
            (3, 9, 8),
        )
    return cases


LEAF_CASES = leaf_cases() | numpy_layout_cases()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", LEAF_CASES)
def test_new_leaf_evaluates_and_trains_like_torch(name, dtype):
    spec, reference, sample_shape = LEAF_CASES[name]
    optimizer = SGD(lr=0.1, momentum=0.9)
    loop = NumpyLoop(spec, optimizer=optimizer, dtype=dtype)
    reference = load_state(reference.to(getattr(torch, dtype)), loop.state_dict())
    batches = [(x.astype(dtype), y) for x, y in random_batches(sample_shape, classes=3, count=2)]
    x = batches[0][0]
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(x)).numpy()
    forward = twin_tolerance(dtype, longest_sum(spec, sample_shape, len(x)), expected)
    np.testing.assert_allclose(loop.predict(x), expected, rtol=0, atol=forward)
    losses = [float(loop.step(batch)) for batch in batches]
    expected_losses = train_torch(reference, torch_optimizer(optimizer, reference.parameters()), batches)
    allowed = steps_tolerance(spec, batches, dtype, loss_size=3)  # + the softmax over 3 classes
    assert losses == pytest.approx(expected_losses, rel=0, abs=allowed * max(1, *np.abs(expected_losses)))
    assert_states_close(loop.state_dict(), numpy_state(reference), rtol=0, atol=allowed, scale_atol=True)


def finite_difference_check(function, array, analytic, h=FINITE_DIFFERENCE_STEP):
    """Central differences of scalar ``function()`` over every element of ``array`` (perturbed in place)
    against ``analytic``, within the conformance suite's finite-difference bound (conformance/tolerances.py
    derives it: float64 truncation ~h**2, cancellation ~eps |f| / h), relative above 1."""
    numeric = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + h
        up = function()
        array[index] = saved - h
        down = function()
        array[index] = saved
        numeric[index] = (up - down) / (2 * h)
    np.testing.assert_allclose(analytic, numeric, rtol=FINITE_DIFFERENCE_TOLERANCE, atol=FINITE_DIFFERENCE_TOLERANCE)


@pytest.mark.parametrize("name", LEAF_CASES)
def test_new_leaf_gradients_match_finite_differences(name):
    spec, _, sample_shape = LEAF_CASES[name]
    front, leaf = spec.layers[:2]
    loop = NumpyLoop(Sequential(leaf), dtype="float64", seed=1)
    layer = loop._root.nodes[0]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, *front.output_shape(sample_shape)))
    for param in layer.params.values():
        param[...] = rng.standard_normal(param.shape)  # not LayerNorm's initial ones and zeros
    projection = rng.standard_normal(layer.forward(x, True, False).shape)

    def objective():
        return float((layer.forward(x, True, False) * projection).sum())

    layer.forward(x, True, True)
    for grad in layer.grads.values():
        grad.fill(0)
    grad_x = layer.backward(projection.copy(), True)
    finite_difference_check(objective, x, grad_x)
    for key, param in layer.params.items():
        finite_difference_check(objective, param, layer.grads[key])


def test_erfc_is_float64_accurate():
    x = np.linspace(-6, 26, 64001)
    expected = np.array([math.erfc(v) for v in x])
    # Cephes' stated accuracy: 3.7e-16 relative for |x| < 1, up to 5.7e-14 relative in the far tail
    np.testing.assert_allclose(_erfc(x), expected, rtol=6e-14, atol=0)
    assert np.isnan(_erfc(np.array([np.nan])))[0]
    np.testing.assert_array_equal(_erfc(np.array([-np.inf, np.inf, -40.0, 40.0])), [2, 0, 2, 0])


def nested_residual_spec():
    """Residuals nested in a residual's body: an identity shortcut around a pre-activation body (its ReLU
    must not overwrite the input the shortcut adds), a Tanh whose output a ReLU reads next (must not be
    overwritten either), a downsample with BatchNorm, no post in the inner block."""
    inner = Residual(Sequential({"relu": ReLU(), "conv": Conv2d(4, 4, 3, padding=1)}))
    block = Residual(
        Sequential({"conv1": Conv2d(3, 4, 3, stride=2, padding=1), "inner": inner, "tanh": Tanh(), "relu": ReLU()}),
        shortcut=Sequential(Conv2d(3, 4, 1, stride=2, bias=False), BatchNorm2d(4)),
        post=ReLU(),
    )
    return Sequential({"block": block, "pool": AdaptiveAvgPool2d(1), "flatten": Flatten(), "fc": Linear(4, 3)})


def torch_nested_residual():
    inner = TorchResidual({"relu": nn.ReLU(), "conv": nn.Conv2d(4, 4, 3, padding=1)})
    block = TorchResidual(
        {"conv1": nn.Conv2d(3, 4, 3, stride=2, padding=1), "inner": inner, "tanh": nn.Tanh(), "relu": nn.ReLU()},
        downsample=nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4)),
        post=nn.ReLU(),
    )
    return nn.Sequential(
        OrderedDict(block=block, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(4, 3))
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nested_residuals_train_like_torch(dtype):
    spec = nested_residual_spec()
    optimizer = SGD(lr=0.1, momentum=0.9)
    loop = NumpyLoop(spec, optimizer=optimizer, dtype=dtype)
    reference = load_state(torch_nested_residual().to(getattr(torch, dtype)), loop.state_dict())
    assert list(loop.state_dict()) == list(reference.state_dict())
    assert "block.inner.conv.weight" in loop.state_dict() and "block.downsample.1.running_var" in loop.state_dict()
    batches = [(x.astype(dtype), y) for x, y in random_batches((3, 8, 8), classes=3, count=2)]
    losses = [float(loop.step(batch)) for batch in batches]
    expected_losses = train_torch(reference, torch_optimizer(optimizer, reference.parameters()), batches)
    allowed = steps_tolerance(spec, batches, dtype, loss_size=3)  # + the softmax over 3 classes
    assert losses == pytest.approx(expected_losses, rel=0, abs=allowed * max(1, *np.abs(expected_losses)))
    assert_states_close(loop.state_dict(), numpy_state(reference), rtol=0, atol=allowed, scale_atol=True)
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(batches[0][0])).numpy()
    # the steps' chains, then one forward more
    x = batches[0][0]
    size = len(batches) * gradient_size(spec, x.shape[1:], len(x)) + longest_sum(spec, x.shape[1:], len(x))
    forward = twin_tolerance(dtype, size, expected)
    np.testing.assert_allclose(loop.predict(x), expected, rtol=0, atol=forward)


def resnet18_runs(dtype, x, y, optimizer):
    """unitrain.resnet18() on NumPy and the plain-PyTorch ResNet-18 from the same weights: each one's eval
    logits, then the state after one step in training mode (BatchNorm on batch statistics)."""
    loop = NumpyLoop(resnet18(), optimizer=optimizer, dtype=dtype)
    model = load_state(ResNet18().to(getattr(torch, dtype)), loop.state_dict())
    x = x.astype(dtype)
    with torch.no_grad():
        expected_logits = model.eval()(torch.from_numpy(x)).numpy()
    logits = loop.predict(x)
    loop.step((x, y))
    train_torch(model, torch_optimizer(optimizer, model.parameters()), [(x, y)])
    return (logits, loop.state_dict()), (expected_logits, numpy_state(model))


def test_resnet18_matches_plain_pytorch_resnet18():
    # 2x3x64x64: layer4 sees 2x2 maps, so its training-mode BatchNorm normalises 8 values per channel; at 32x32
    # it would be 2, whose normalised values are +-1 whatever the input, an ill-conditioned step (float32
    # weights then differ from float64 by O(1) in PyTorch itself)
    rng = np.random.default_rng(SEED)
    x, y = rng.standard_normal((2, 3, 64, 64)), rng.integers(0, 1000, 2)
    optimizer = SGD(lr=0.01, momentum=0.9)
    (logits64, state64), (truth_logits, truth_state) = resnet18_runs("float64", x, y, optimizer)
    (logits32, state32), (torch_logits32, torch_state32) = resnet18_runs("float32", x, y, optimizer)
    assert list(state32) == list(truth_state)  # torchvision's keys, in its order
    for actual, actual64, torch32, truth in [(logits32, logits64, torch_logits32, truth_logits)] + [
        (state32[key], state64[key], torch_state32[key], truth_state[key]) for key in truth_state
    ]:
        # PyTorch's own float32 error against the float64 result measures this case's rounding: as the
        # conformance formula MULTIPLE * eps * size * scale with the chain length `size` it implies
        scale = max(1.0, float(np.abs(truth).max()))
        size = float(np.abs(torch32 - truth).max()) / (eps(np.float32) * scale)
        np.testing.assert_allclose(actual, truth, rtol=0, atol=tolerance(np.float32, size, scale))
        np.testing.assert_allclose(actual64, truth, rtol=0, atol=tolerance(np.float64, size, scale))


def soft_targets(labels):
    """Class probabilities: each row a softmax of standard-normal scores."""
    scores = np.random.default_rng(1).standard_normal((len(labels), 5))
    return np.exp(scores) / np.exp(scores).sum(1, keepdims=True)


def regression_targets(labels):
    return np.random.default_rng(2).uniform(-2, 2, (len(labels), 5))


# name: (loss spec, the torch function of (pred, target, reduction), targets from the batch's class labels)
NEW_LOSSES = {
    "ce_label_smoothing": (CrossEntropyLoss(label_smoothing=0.1),
                           lambda p, t, r: F.cross_entropy(p, t, reduction=r, label_smoothing=0.1), lambda y: y),
    "ce_soft_targets_smoothed": (CrossEntropyLoss(reduction="sum", label_smoothing=0.2),
                                 lambda p, t, r: F.cross_entropy(p, t, reduction=r, label_smoothing=0.2), soft_targets),
    "ce_one_hot": (CrossEntropyLoss(), lambda p, t, r: F.cross_entropy(p, t, reduction=r), lambda y: np.eye(5)[y]),
    "nll_after_logsoftmax": (NLLLoss(reduction="sum"), lambda p, t, r: F.nll_loss(p, t, reduction=r), lambda y: y),
    "bce_with_logits": (BCEWithLogitsLoss(), lambda p, t, r: F.binary_cross_entropy_with_logits(p, t, reduction=r),
                        lambda y: np.random.default_rng(3).uniform(0, 1, (len(y), 5))),
    "bce": (BCELoss(), lambda p, t, r: F.binary_cross_entropy(p, t, reduction=r),
            lambda y: np.random.default_rng(3).uniform(0, 1, (len(y), 5))),
    "bce_sum_hard_targets": (BCELoss(reduction="sum"), lambda p, t, r: F.binary_cross_entropy(p, t, reduction=r),
                             lambda y: np.eye(5)[y]),
    "l1": (L1Loss(reduction="sum"), lambda p, t, r: F.l1_loss(p, t, reduction=r), regression_targets),
    "smooth_l1": (SmoothL1Loss(beta=0.5), lambda p, t, r: F.smooth_l1_loss(p, t, reduction=r, beta=0.5),
                  regression_targets),
    "smooth_l1_beta_0": (SmoothL1Loss(beta=0.0), lambda p, t, r: F.smooth_l1_loss(p, t, reduction=r, beta=0.0),
                         regression_targets),
    "huber": (HuberLoss(reduction="sum", delta=0.7), lambda p, t, r: F.huber_loss(p, t, reduction=r, delta=0.7),
              regression_targets),
    "custom_tutorial": (CustomLoss(lambda pred, labels: (pred - labels).sum()), lambda p, t, r: (p - t).sum(),
                        regression_targets),
}  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NEW_LOSSES)
def test_new_loss_value_gradients_and_step_match_torch(name, dtype):
    loss, functional, make_targets = NEW_LOSSES[name]
    # NLLLoss takes log-probabilities, BCELoss probabilities
    head, twin_head = {NLLLoss: ([LogSoftmax(dim=1)], [nn.LogSoftmax(dim=1)]),
                       BCELoss: ([Sigmoid()], [nn.Sigmoid()])}.get(type(loss), ([], []))  # fmt: skip
    optimizer = SGD(lr=0.1, momentum=0.9)
    loop = NumpyLoop(Sequential(Linear(6, 8), Tanh(), Linear(8, 5), *head), loss=loss, optimizer=optimizer, dtype=dtype)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), *twin_head)
    model = load_state(model.to(getattr(torch, dtype)), loop.state_dict())
    ((x, labels),) = random_batches((6,), classes=5, count=1, batch_size=8)
    x, y = x.astype(dtype), make_targets(labels)
    y = y.astype(dtype) if y.dtype.kind == "f" else y
    value = loop.loss(loop.forward(x), y)
    loop.backward(value)
    expected = functional(model(torch.from_numpy(x)), torch.from_numpy(y), getattr(loss, "reduction", None))
    expected.backward()
    # a few roundings per summed term (the loss adds up 40 of them), as the conformance formula counts them
    atol = tolerance(dtype, size=y.size, expected_scale=abs(expected.item()))
    assert np.asarray(value.value).dtype == dtype
    assert float(value) == pytest.approx(expected.item(), rel=0, abs=atol)
    gradients = loop.gradients()
    assert all(grad.dtype == dtype for grad in gradients.values())
    assert_states_close(gradients, numpy_gradients(model), rtol=0, atol=atol, scale_atol=True)
    loop.update()
    torch_optimizer(optimizer, model.parameters()).step()
    assert_states_close(loop.state_dict(), numpy_state(model), rtol=0, atol=atol)
    if not isinstance(loss, CustomLoss):  # evaluate: mean per sample (per element for elementwise losses)
        with torch.no_grad():
            mean = functional(model(torch.from_numpy(x)), torch.from_numpy(y), "mean").item()
        assert loop.evaluate((x, y))["loss"] == pytest.approx(mean, rel=0, abs=tolerance(dtype, y.size, abs(mean)))


def residual_dropout_spec():
    body = Sequential({"fc": Linear(6, 6), "bn": BatchNorm1d(6), "drop": Dropout(0.5)})
    return Sequential(Residual(body, Sequential(Dropout(0.3)), Tanh()), Linear(6, 3))


def test_dropout_in_both_branches_draws_the_stream_in_forward_order():
    loop = NumpyLoop(residual_dropout_spec(), seed=5)
    ((x, _),) = random_batches((6,), classes=3, count=1)
    loop.forward(x)
    block = loop._root.nodes[0]
    rng = dropout_stream(5)  # one stream, masks drawn in named_layers order: the body's, then the shortcut's
    np.testing.assert_array_equal(block.body.nodes[2].scale, dropout_mask(rng, (4, 6), 0.5, np.float32))
    np.testing.assert_array_equal(block.shortcut.nodes[0].scale, dropout_mask(rng, (4, 6), 0.3, np.float32))


def test_branches_step_like_the_tutorial_sequence_and_resume_bit_for_bit():
    batches = random_batches((6,), classes=3, count=4)
    whole, tutorial = (NumpyLoop(residual_dropout_spec(), optimizer=SGD(lr=0.1, momentum=0.9)) for _ in range(2))
    for x, y in batches[:2]:
        step_loss = whole.step((x, y))
        tutorial.zero_grad()
        loss = tutorial.loss(tutorial.forward(x), y)
        tutorial.backward(loss)
        tutorial.update()
        assert float(step_loss) == float(loss)
    assert_states_equal(tutorial.state_dict(), whole.state_dict())
    resumed = NumpyLoop(residual_dropout_spec(), optimizer=SGD(lr=0.1, momentum=0.9), seed=9)
    resumed.load_state_dict(whole.state_dict())
    resumed.load_optimizer_state_dict(whole.optimizer_state_dict())
    resumed.load_random_state(whole.random_state())
    for batch in batches[2:]:
        assert float(resumed.step(batch)) == float(whole.step(batch))
    assert_states_equal(resumed.state_dict(), whole.state_dict())
