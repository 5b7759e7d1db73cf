"""The NumPy backend against PyTorch: the same weights and batches through hand-built
``torch.nn`` models and hand-written PyTorch training loops."""

import numpy as np
import pytest
import safetensors.torch
import torch
from torch_reference import (
    assert_states_close,
    assert_states_equal,
    assert_within_drift,
    drift_tolerances,
    expected_run,
    load_state,
    numpy_gradients,
    numpy_state,
    torch_layers,
    torch_runs,
)
from unitrain.backends.numpy import NumpyLoop

from unitrain import (
    SGD,
    Adam,
    AdamW,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    MSELoss,
    NLLLoss,
    ReLU,
    Sequential,
    cnn,
    mlp,
)
from unitrain.loop import InputError


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
    np.testing.assert_allclose(pred, expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    grads = loop.gradients()
    assert all(grad.dtype == np.float64 for grad in grads.values())
    assert_states_close(grads, numpy_gradients(reference), rtol=1e-9, atol=1e-12, scale_atol=True)


@pytest.mark.parametrize("loss_spec", [cls(reduction) for cls in (CrossEntropyLoss, NLLLoss, MSELoss)
                                       for reduction in ("mean", "sum")])  # fmt: skip
def test_losses_match_torch(loss_spec, batch):
    x, y = batch
    if isinstance(loss_spec, MSELoss):
        y = np.random.default_rng(0).standard_normal((len(x), 10)).astype(np.float32)
    loop = NumpyLoop(mlp(), loss=loss_spec)
    reference = torch_twin(loop)
    loss = loop.loss(loop.forward(x), y)
    loop.backward(loss)
    expected = torch_loss(loss_spec, reference(torch.from_numpy(x)), y)
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5)
    assert_states_close(loop.gradients(), numpy_gradients(reference), rtol=1e-4, atol=1e-6, scale_atol=True)


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
    np.testing.assert_allclose(pred, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_states_close(loop.gradients(), numpy_gradients(reference), rtol=1e-4, atol=1e-6, scale_atol=True)


def test_dropout_gradient_uses_the_mask(batch):
    x, y = batch
    loop = NumpyLoop(Sequential(Flatten(), Linear(784, 32), Dropout(0.5), Linear(32, 10)), seed=3)
    reference = torch_twin(loop)
    hidden = reference[1](reference[0](torch.from_numpy(x)))
    pred = loop.forward(x)
    loop.backward(loop.loss(pred, y))
    scale = loop._layers[2].scale  # the mask this forward drew (PyTorch's form: 0 or 1/(1-p))
    assert set(np.unique(scale)) == {0.0, 2.0} and 0.4 < (scale == 0).mean() < 0.6
    expected = reference[3](hidden * torch.from_numpy(scale))
    torch.nn.functional.cross_entropy(expected, torch.from_numpy(y)).backward()
    np.testing.assert_allclose(pred, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert_states_close(loop.gradients(), numpy_gradients(reference), rtol=1e-4, atol=1e-6, scale_atol=True)


def test_dropout_is_identity_in_eval_and_seeded(batch):
    x, _ = batch
    flat = x.reshape(len(x), -1)
    model = Sequential(Flatten(), Dropout(0.25))
    first, second = NumpyLoop(model, seed=5), NumpyLoop(model, seed=5)
    masked = first.forward(x)
    np.testing.assert_array_equal(masked, second.forward(x))
    assert not np.array_equal(masked, NumpyLoop(model, seed=6).forward(x))
    kept = masked != 0
    np.testing.assert_allclose(masked[kept], flat[kept] / 0.75, rtol=1e-6)
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
    assert_states_close(halves.gradients(), full.gradients(), rtol=1e-5, atol=1e-6, scale_atol=True)
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
    expected = reference.state_dict()
    for key in buffers:
        np.testing.assert_allclose(state[key], expected[key].numpy(), rtol=1e-5, atol=1e-7, err_msg=key)
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
    np.testing.assert_allclose(pred, expected.numpy(), rtol=1e-5, atol=1e-5)
    expected_loss = torch.nn.functional.cross_entropy(expected, torch.from_numpy(y)).item()
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
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
    with pytest.raises(TypeError, match="native numpy model"):
        NumpyLoop(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_one_epoch_of_mlp_reaches_90_percent(mnist_train, mnist_test):
    loop = NumpyLoop(mlp(), optimizer=SGD(lr=0.01), seed=0)
    (record,) = loop.fit(mnist_train, epochs=1, batch_size=64, shuffle=True, eval_data=mnist_test)
    print(f"numpy mlp: test accuracy {record['test_accuracy']:.4f}, {record['samples_per_sec']:.0f} samples/s")
    assert record["test_accuracy"] >= 0.90
