"""The MindSpore backend against hand-written plain-PyTorch code (nn.Sequential + torch.optim).

Different kernels make results agree to float32 rounding, not bit for bit: training runs are held
within the drift PyTorch's own float32 loop shows on the same case (torch_reference.drift_tolerances).
Gradients near 1e-8 differ by a few percent between the two frameworks' kernels and Adam divides them
by sqrt(v) + eps ~ 1e-8: the data decides when a ReLU flips, and Adam turns that into an O(lr)
difference, which PyTorch's own float32 run with reversed batches shows as well.
"""

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_reference import (
    SEED,
    assert_states_equal,
    assert_within_drift,
    bn_spec,
    expected_run,
    load_state,
    network_spec,
    reference,
    torch_bn,
    torch_layers,
    torch_mlp,
    torch_runs,
)
from unitrain.backends.mindspore import MindSporeLoop

import unitrain as ut

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# bn_spec for 1x10x10 inputs: MindSpore's CPU convolutions are slow
SMALL_BN = {"image_size": 10, "padding": 1}


def no_dropout(spec):
    return ut.Sequential(*(layer for layer in spec if not isinstance(layer, ut.Dropout)))


@pytest.fixture(scope="module")
def small():
    """Three batches of 32 random 1x10x10 images for ``bn_spec(**SMALL_BN)``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 1, 10, 10)).astype(np.float32)
    return ut.ArrayDataset(x, rng.integers(0, 10, 96))


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn"])
def test_forward_matches_torch(name, mnist_train, small):
    x = small.x if name == "bn" else mnist_train.x[:100]
    loop = MindSporeLoop(network_spec(name, **SMALL_BN), seed=SEED)
    model = reference(name, **SMALL_BN)
    if name == "bn":  # dropout draws differ between frameworks: compare in eval mode
        loop.eval()
        model.eval()
    out = loop.forward(x)
    assert isinstance(out, ms.Tensor)
    np.testing.assert_allclose(out.asnumpy(), model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "spec", "torch_optimizer", "steps"),
    [
        ("mlp", ut.SGD(lr=0.01, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), 50),
        ("cnn", ut.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), 5),
        ("mlp", ut.Adam(lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3), 20),
        ("mlp", ut.AdamW(lr=1e-3), lambda p: torch.optim.AdamW(p, lr=1e-3), 20),
    ],
    ids=["sgd-momentum", "sgd-nesterov-wd", "adam", "adamw"],
)  # fmt: skip
def test_training_matches_torch(name, spec, torch_optimizer, steps, mnist_batches):
    batches = mnist_batches[:steps]
    loop = MindSporeLoop(network_spec(name), optimizer=spec, seed=SEED)
    losses = {"loss": np.array([float(loop.step(batch)) for batch in batches])}
    # MindSpore's adapter runs float32 only: within the drift PyTorch's own float32 loop shows on this
    # case (torch_reference.drift_tolerances); the equations are asserted in float64 by the conformance
    # suite's reference and the other backends' tests.
    runs = torch_runs(lambda dtype: reference(name, dtype), torch_optimizer, batches)
    expected, tolerances = expected_run(runs, "float32", size=batches[0][0].size)
    assert_within_drift(losses, expected.losses, tolerances.losses)
    assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
    assert loop.step_count == steps
    assert int(loop.optimizer_state_dict()["step"]) == steps


def test_batchnorm_follows_torch_in_training_only(small):
    """Running statistics (unbiased variance, momentum 0.1 and 0.2) and num_batches_tracked."""
    spec = no_dropout(bn_spec(**SMALL_BN))
    loop = MindSporeLoop(spec, optimizer=ut.SGD(lr=0.1), seed=SEED)
    batches = list(small.batches(32))
    for batch in batches:
        loop.step(batch)
    runs = torch_runs(lambda dtype: load_state(torch_layers(spec).to(dtype), ut.init_weights(spec, SEED)),
                      lambda params: torch.optim.SGD(params, lr=0.1), batches)  # fmt: skip
    expected, tolerances = expected_run(runs, "float32", size=batches[0][0].size)
    assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
    assert loop.state_dict()["5.1.num_batches_tracked"] == 3
    before = loop.state_dict()
    loop.eval()
    loop.step(batches[0])  # eval mode: normalises with the running statistics, leaves them alone
    state = loop.state_dict()
    for key in ("1.running_mean", "1.running_var", "5.1.running_var", "1.num_batches_tracked"):
        np.testing.assert_array_equal(state[key], before[key])
    assert not np.array_equal(state["0.weight"], before["0.weight"])


def tutorial_step(loop, x, y):
    loop.zero_grad()
    pred = loop.forward(x)
    loss = loop.loss(pred, y)
    loop.backward(loss)
    loop.update()
    return loss


@pytest.mark.parametrize("spec", [ut.SGD(lr=0.1, momentum=0.9, dampening=0.1), ut.Adam()], ids=["sgd", "adam"])
def test_tutorial_step_equals_step(spec, small):
    # dropout included: backward re-runs forward with the masks forward drew
    whole, tutorial = (MindSporeLoop(bn_spec(**SMALL_BN), optimizer=spec, seed=SEED) for _ in range(2))
    for x, y in small.batches(32):
        assert float(whole.step((x, y))) == float(tutorial_step(tutorial, x, y))
    for got, want in [(tutorial.state_dict(), whole.state_dict()), (tutorial.gradients(), whole.gradients()),
                      (tutorial.optimizer_state_dict(), whole.optimizer_state_dict())]:  # fmt: skip
        assert_states_equal(got, want)


def test_gradients_accumulate_until_zero_grad(mnist_train):
    loop = MindSporeLoop(ut.mlp(), loss=ut.CrossEntropyLoss(reduction="sum"), seed=SEED)
    x, y = mnist_train.x[:64], mnist_train.y[:64]
    for part in (slice(0, 32), slice(32, 64)):
        loop.backward(loop.loss(loop.forward(x[part]), y[part]))
    halves = loop.gradients()
    loop.zero_grad()
    assert all(not g.any() for g in loop.gradients().values())
    loop.backward(loop.loss(loop.forward(x), y))
    full = loop.gradients()
    model = reference("mlp")
    F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), reduction="sum").backward()
    for key, param in model.named_parameters():
        np.testing.assert_allclose(halves[key], full[key], rtol=1e-4, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(full[key], param.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def test_modes_dropout_and_read_only_evaluation(small):
    loop = MindSporeLoop(bn_spec(**SMALL_BN), optimizer=ut.Adam(), seed=SEED)
    x, y = small.x, small.y
    loop.step((x, y))
    state, opt_state = loop.state_dict(), loop.optimizer_state_dict()
    predicted = loop.predict(x)
    metrics = loop.evaluate((x, y), batch_size=50)
    np.testing.assert_array_equal(loop.predict(x), predicted)  # eval: dropout is the identity
    model = load_state(torch_bn(**SMALL_BN), state).eval()
    expected = model(torch.from_numpy(x))
    np.testing.assert_allclose(predicted, expected.detach().numpy(), atol=1e-5)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(expected, torch.from_numpy(y)).item(), rel=1e-5)
    assert metrics["num_correct"] == int((expected.argmax(1).numpy() == y).sum())
    assert loop.training and loop.step_count == 1
    assert_states_equal(loop.state_dict(), state)
    assert_states_equal(loop.optimizer_state_dict(), opt_state)
    train_out = loop.forward(x).asnumpy()  # training: dropout active, batch statistics
    assert not np.allclose(train_out, predicted)
    assert loop.state_dict()["1.num_batches_tracked"] == 2


def test_state_dict_and_files(tmp_path, small):
    spec = no_dropout(bn_spec(**SMALL_BN))
    loop = MindSporeLoop(spec, optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=SEED)
    state = loop.state_dict()
    assert {k: v.shape for k, v in state.items()} == spec.state_shapes()
    assert all(v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, v in state.items())
    assert set(loop.optimizer_state_dict()) == {"step"}  # buffers are created by the first step
    batches = list(small.batches(32))
    loop.step(batches[0])
    loop.save_weights(tmp_path / "w.safetensors")
    opt_state = loop.optimizer_state_dict()
    assert opt_state["step"].dtype == np.int64 and "5.0.weight.momentum_buffer" in opt_state

    restored = MindSporeLoop(spec, optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=1)
    restored.load_weights(tmp_path / "w.safetensors")
    restored.load_optimizer_state_dict(opt_state)
    assert_states_equal(restored.state_dict(), loop.state_dict())
    for batch in batches[1:]:
        assert float(loop.step(batch)) == float(restored.step(batch))
    assert_states_equal(restored.state_dict(), loop.state_dict())
    restored.load_optimizer_state_dict({"step": np.array(0)})  # a fresh optimizer: no buffers yet
    assert set(restored.optimizer_state_dict()) == {"step"}


def test_native_cell_trains(mnist_batches):
    cell = ms.nn.SequentialCell(
        [ms.nn.Flatten(), ms.nn.Dense(784, 64), ms.nn.BatchNorm1d(64), ms.nn.ReLU(), ms.nn.Dense(64, 10)]
    )
    assert MindSporeLoop.is_native_model(cell) and not MindSporeLoop.is_native_model(torch_mlp())
    loop = ut.make_loop(None, cell, optimizer=ut.SGD(lr=0.05, momentum=0.9))
    assert isinstance(loop, MindSporeLoop)
    assert {"1.weight", "2.moving_mean", "4.bias"} <= set(loop.state_dict())
    batches = mnist_batches[:30]
    losses = [float(loop.step(batch)) for batch in batches]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert set(loop.gradients()) == {"1.weight", "1.bias", "2.gamma", "2.beta", "4.weight", "4.bias"}


@pytest.mark.slow
def test_one_epoch_mlp_reaches_90_percent():
    loop = MindSporeLoop(ut.mlp(), optimizer=ut.SGD(lr=0.01), seed=0)
    history = loop.fit(ut.load_mnist("train"), epochs=1, batch_size=64, eval_data=ut.load_mnist("test"))
    print(history)
    assert history[0]["test_accuracy"] >= 0.90
