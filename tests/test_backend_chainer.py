"""The Chainer adapter against hand-written PyTorch references (same initial weights, same batches)."""

import numpy as np
import pytest
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain.registry import backend_of

# The adapter first: it makes `import chainer` work (see its distutils note).
ChainerLoop = pytest.importorskip("unitrain.backends.chainer").ChainerLoop
chainer = pytest.importorskip("chainer")
torch = pytest.importorskip("torch")

from chainer import links as L  # noqa: E402
from torch_reference import (  # noqa: E402
    assert_states_close,
    assert_states_equal,
    assert_within_drift,
    drift_tolerances,
    expected_run,
    float64_tolerances,
    load_state,
    numpy_state,
    torch_layers,
    torch_output,
    torch_runs,
    train_torch,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def bn_mlp(dropout=0.0):
    layers = [ut.Flatten(), ut.Linear(784, 64), ut.BatchNorm1d(64, momentum=0.2), ut.ReLU()]
    if dropout:
        layers.append(ut.Dropout(dropout))
    return ut.Sequential(*layers, ut.Linear(64, 10))


def bn_cnn():
    """BatchNorm2d with a non-default eps, a pool with stride != window, nested Sequential."""
    return ut.Sequential(
        ut.Sequential(ut.Conv2d(1, 4, 3, stride=2, padding=1), ut.BatchNorm2d(4, eps=1e-3), ut.ReLU()),
        ut.MaxPool2d(3, stride=2),
        ut.Flatten(),
        ut.Linear(4 * 6 * 6, 10),
    )


MODELS = {"mlp": ut.mlp, "cnn": ut.cnn, "bn_mlp": bn_mlp, "bn_cnn": bn_cnn}


def torch_model(spec, dtype=torch.float32):
    """The equivalent torch.nn.Sequential with the same initial weights."""
    return load_state(torch_layers(spec).to(dtype), ut.init_weights(spec, 0))


# --- forward, losses --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_forward_matches_torch(name, mnist_batches):
    spec = MODELS[name]()
    loop, x = ChainerLoop(spec), mnist_batches[0][0]
    references = {dtype: torch_model(spec, dtype) for dtype in (torch.float32, torch.float64)}
    # Tolerances: PyTorch's own float32 drift on the same case (torch_reference.drift_tolerances).
    assert_within_drift({"out": loop.predict(x)}, *torch_output(references[torch.float32].eval(), x))
    # Training mode: BatchNorm normalises with batch statistics and updates its running ones.
    for model in references.values():
        model.train()
    assert_within_drift({"out": loop.forward(x).array}, *torch_output(references[torch.float32], x))
    references[torch.float64](torch.from_numpy(x).double())  # the float64 twin records the same batch
    state32, state64 = (numpy_state(model) for model in references.values())
    assert_within_drift(loop.state_dict(), state32, drift_tolerances([state32], state64, x.size))


@pytest.mark.parametrize(
    ("loss", "reference"),
    [
        (ut.CrossEntropyLoss(), torch.nn.functional.cross_entropy),
        (ut.CrossEntropyLoss("sum"), lambda p, y: torch.nn.functional.cross_entropy(p, y, reduction="sum")),
        (ut.NLLLoss(), lambda p, y: torch.nn.functional.nll_loss(torch.log_softmax(p, 1), y)),
        (ut.NLLLoss("sum"), lambda p, y: torch.nn.functional.nll_loss(torch.log_softmax(p, 1), y, reduction="sum")),
    ],
)
def test_class_losses_match_torch(loss, reference, mnist_batches):
    x, y = mnist_batches[0]
    loop = ChainerLoop(ut.mlp(), loss)
    pred = loop.forward(x)
    if isinstance(loss, ut.NLLLoss):
        pred = chainer.functions.log_softmax(pred)
    expected = reference(torch.from_numpy(loop.predict(x)), torch.from_numpy(y)).item()
    # Both frameworks' loss kernels on the same logits: the conformance formula, n = the logits summed.
    assert loop.to_float(loop.loss(pred, y)) == pytest.approx(expected, abs=tolerance(np.float32, pred.size, expected))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_matches_torch(reduction):
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((16, 3)).astype(np.float32)
    spec = ut.Sequential(ut.Linear(8, 3))
    loop, reference = ChainerLoop(spec, ut.MSELoss(reduction)), torch_model(spec)
    expected = torch.nn.functional.mse_loss(reference(torch.from_numpy(x)), torch.from_numpy(y), reduction=reduction)
    # The conformance formula: n = 8 inputs of a prediction + the y.size terms of the loss.
    within = tolerance(np.float32, 8 + y.size, expected.item())
    assert loop.to_float(loop.loss(loop.forward(x), y)) == pytest.approx(expected.item(), abs=within)
    per_element = expected.item() / (y.size if reduction == "sum" else 1)
    assert loop.evaluate((x, y))["loss"] == pytest.approx(
        per_element, abs=within / (y.size if reduction == "sum" else 1)
    )


# --- training against torch -------------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum": (ut.SGD(lr=0.01, momentum=0.9), lambda p: torch.optim.SGD(p, 0.01, 0.9, foreach=False)),
    "sgd_nesterov_wd": (
        ut.SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, 0.01, 0.9, weight_decay=1e-3, nesterov=True, foreach=False),
    ),
    "adam": (
        ut.Adam(lr=1e-3, weight_decay=1e-4),
        lambda p: torch.optim.Adam(p, 1e-3, weight_decay=1e-4, foreach=False),
    ),
    "adamw": (ut.AdamW(lr=1e-3), lambda p: torch.optim.AdamW(p, 1e-3, foreach=False)),
}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "optimizer", "steps"),
    [("mlp", "sgd_momentum", 50), ("cnn", "sgd_momentum", 50), ("bn_cnn", "sgd_nesterov_wd", 30),
     ("mlp", "adam", 20), ("cnn", "adamw", 20)],
)  # fmt: skip
def test_training_matches_torch(model, optimizer, steps, mnist_batches):
    spec, (opt_spec, make_torch_optimizer) = MODELS[model](), OPTIMIZERS[optimizer]
    batches = mnist_batches[:steps]
    runs = torch_runs(lambda dtype: torch_model(spec, dtype), make_torch_optimizer, batches)
    # float64: the equations, to within float64 rounding; float32: within the drift PyTorch's own
    # float32 loop shows on this case (torch_reference.drift_tolerances says why).
    for dtype in ("float64", "float32"):
        expected, tolerances = expected_run(runs, dtype, size=batches[0][0].size)
        loop = ChainerLoop(spec, optimizer=opt_spec, dtype=dtype)
        losses = {"loss": np.array([float(loop.step((x.astype(dtype), y))) for x, y in batches])}
        assert_within_drift(losses, expected.losses, tolerances.losses)
        ratio = assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
        print(f"{model}/{optimizer} {dtype}: weights off torch by {ratio:.2g} of their tolerance")
        # Optimizer buffers follow PyTorch's too, under PyTorch's names.
        optimizer_state = loop.optimizer_state_dict()
        assert optimizer_state.pop("step") == steps
        assert_within_drift(optimizer_state, expected.buffers, tolerances.buffers)


@pytest.mark.parametrize(("model", "optimizer"), [("bn_mlp", "sgd_momentum"), ("mlp", "adam"), ("cnn", "adamw")])
def test_float64_matches_torch(model, optimizer, mnist_batches):
    spec, (opt_spec, make_torch_optimizer) = MODELS[model](), OPTIMIZERS[optimizer]
    loop = ChainerLoop(spec, optimizer=opt_spec, dtype="float64")
    reference = torch_model(spec, dtype=torch.float64)
    batches64 = [(x.astype(np.float64), y) for x, y in mnist_batches[:10]]
    for batch in batches64:
        loop.step(batch)
    train_torch(reference, make_torch_optimizer(reference.parameters()), batches64)
    state = loop.state_dict()
    assert all(v.dtype == (np.int64 if k.endswith("tracked") else np.float64) for k, v in state.items())
    assert loop.predict(batches64[0][0]).dtype == np.float64
    assert all(v.dtype == np.float64 for v in loop.gradients().values())
    assert all(v.dtype == np.float64 for k, v in loop.optimizer_state_dict().items() if k != "step")
    expected = numpy_state(reference)
    ratio = assert_within_drift(state, expected, float64_tolerances(expected, batches64[0][0].size))
    print(f"float64 {model}/{optimizer}: weights after 10 steps off torch by {ratio:.1e} of their tolerance")


# --- the tutorial-shaped step, gradients --------------------------------------------------------


def tutorial_step(loop, x, y):
    loop.zero_grad()
    loss = loop.loss(loop.forward(x), y)
    loop.backward(loss)
    loop.update()
    return loss


@pytest.mark.parametrize("optimizer", [ut.SGD(lr=0.05, momentum=0.9), ut.Adam()])
def test_step_equals_tutorial_sequence(optimizer, mnist_batches):
    whole, tutorial = ChainerLoop(bn_cnn(), optimizer=optimizer), ChainerLoop(bn_cnn(), optimizer=optimizer)
    for x, y in mnist_batches[:3]:
        assert float(whole.step((x, y))) == tutorial.to_float(tutorial_step(tutorial, x, y))
    assert_states_equal(whole.state_dict(), tutorial.state_dict())
    assert_states_equal(whole.optimizer_state_dict(), tutorial.optimizer_state_dict())
    assert_states_equal(whole.gradients(), tutorial.gradients())
    assert whole.step_count == tutorial.step_count == 3


def test_zero_grad_clears(mnist_batches):
    loop = ChainerLoop(ut.mlp())
    x, y = mnist_batches[0]
    assert all(not g.any() for g in loop.gradients().values())
    loop.backward(loop.loss(loop.forward(x), y))
    grads = loop.gradients()
    assert {k: g.shape for k, g in grads.items()} == ut.mlp().param_shapes()
    assert all(g.any() for g in grads.values())
    loop.zero_grad()
    assert all(not g.any() for g in loop.gradients().values())


def test_gradients_accumulate(mnist_batches):
    x, y = mnist_batches[0]
    halves = ChainerLoop(ut.cnn(), ut.CrossEntropyLoss("sum"), ut.SGD(momentum=0.9))
    full = ChainerLoop(ut.cnn(), ut.CrossEntropyLoss("sum"), ut.SGD(momentum=0.9))
    halves.zero_grad()
    for part in (slice(0, 32), slice(32, 64)):
        halves.backward(halves.loss(halves.forward(x[part]), y[part]))
    full.zero_grad()
    full.backward(full.loss(full.forward(x), y))
    assert_states_close(halves.gradients(), full.gradients(), rtol=1e-5, atol=1e-5)
    halves.update()
    full.update()
    assert_states_close(halves.state_dict(), full.state_dict(), rtol=1e-5, atol=1e-6)
    # The momentum buffer is a copy of the first gradient, not the gradient array itself.
    buffers = halves.optimizer_state_dict()
    for param in halves.model.params():
        param.grad.fill(0)  # in place, as Link.zerograds does
    assert_states_equal(halves.optimizer_state_dict(), buffers)


def test_update_without_gradients_changes_nothing(mnist_batches):
    loop = ChainerLoop(ut.mlp(), optimizer=ut.Adam(weight_decay=0.1))
    before = loop.state_dict()
    loop.zero_grad()
    loop.update()  # as torch: parameters without gradients are skipped, their state is not created
    assert_states_equal(loop.state_dict(), before)
    assert list(loop.optimizer_state_dict()) == ["step"]


# --- modes --------------------------------------------------------------------------------------


def test_dropout_only_in_training(mnist_batches):
    x = mnist_batches[0][0]
    loop, plain = ChainerLoop(bn_mlp(dropout=0.5), seed=3), ChainerLoop(bn_mlp(), seed=3)
    np.testing.assert_array_equal(loop.predict(x), plain.predict(x))  # eval: identity
    loop.eval()
    np.testing.assert_array_equal(loop.forward(x).array, plain.predict(x))
    loop.train()
    hidden = ChainerLoop(ut.Sequential(ut.Flatten(), ut.Dropout(0.5)), seed=3)
    out = hidden.forward(x).array
    kept = out != 0
    assert 0.45 < 1 - kept.mean() < 0.55
    np.testing.assert_allclose(out[kept], 2 * x.reshape(64, -1)[kept], rtol=1e-6)
    # Masks come from the loop's seed, not NumPy's global RNG.
    again = ChainerLoop(ut.Sequential(ut.Flatten(), ut.Dropout(0.5)), seed=3)
    np.random.seed(123)
    np.testing.assert_array_equal(again.forward(x).array, out)
    assert not np.array_equal(hidden.forward(x).array, out)


def test_batchnorm_running_stats_follow_torch_only_in_training(mnist_batches):
    spec = bn_cnn()
    loop, reference = ChainerLoop(spec), torch_model(spec)
    for x, _ in mnist_batches[:3]:
        loop.forward(x)
        reference.train()(torch.from_numpy(x))
    state = loop.state_dict()
    assert state["0.1.num_batches_tracked"] == 3 and state["0.1.num_batches_tracked"].dtype == np.int64
    reference64 = torch_model(spec, torch.float64)
    for x, _ in mnist_batches[:3]:
        reference64.train()(torch.from_numpy(x).double())
    state32, state64 = numpy_state(reference), numpy_state(reference64)
    assert_within_drift(state, state32, drift_tolerances([state32], state64, mnist_batches[0][0].size))
    loop.eval()
    x = mnist_batches[3][0]
    loop.forward(x)
    assert_states_equal(loop.state_dict(), state)
    assert_within_drift({"out": loop.predict(x)}, *torch_output(reference.eval(), x))


def test_batchnorm_statistics_after_a_conv_are_summed_pairwise(mnist_batches):
    """Chainer's Convolution2D returns a channels-last view, over which NumPy would add the N*H*W values
    of a channel in one float32 running sum (5e-5 relative error); the adapter's BatchNorm sums pairwise."""
    loop = ChainerLoop(ut.Sequential(ut.Conv2d(1, 4, 3, stride=2, padding=1), ut.BatchNorm2d(4, momentum=1.0)))
    x = mnist_batches[0][0]
    conv_out = loop.model[0](x).array.astype(np.float64)  # the same float32 values BatchNorm receives
    loop.forward(x)  # momentum 1: the running statistics become this batch's
    state = loop.state_dict()
    n = conv_out.size // 4
    # Pairwise summation of n terms: error <= ~eps log2(n) x the sum of their magnitudes (Higham 4.2);
    # the conformance formula with size log2(n), relative to mean |x| and to the variance (terms >= 0).
    bound = tolerance(np.float32, np.log2(n))
    mean_error = np.abs(state["1.running_mean"] - conv_out.mean((0, 2, 3)))
    var_error = np.abs(state["1.running_var"] - conv_out.var((0, 2, 3), ddof=1))
    assert (mean_error <= bound * np.abs(conv_out).mean((0, 2, 3))).all(), mean_error
    assert (var_error <= bound * conv_out.var((0, 2, 3), ddof=1)).all(), var_error


def test_predict_and_evaluate_change_nothing(mnist_batches):
    loop = ChainerLoop(bn_mlp(dropout=0.2), optimizer=ut.Adam())
    twin = ChainerLoop(bn_mlp(dropout=0.2), optimizer=ut.Adam())
    loop.step(mnist_batches[0])
    twin.step(mnist_batches[0])
    state, opt_state = loop.state_dict(), loop.optimizer_state_dict()
    loop.predict(mnist_batches[1][0])
    metrics = loop.evaluate(ut.ArrayDataset(*mnist_batches[1]), batch_size=16)
    assert metrics["num_samples"] == 64 and 0 <= metrics["accuracy"] <= 1
    assert_states_equal(loop.state_dict(), state)
    assert_states_equal(loop.optimizer_state_dict(), opt_state)
    assert loop.step_count == 1 and loop.training
    # Still in training mode, and no dropout mask was drawn: it continues exactly like its twin.
    assert float(loop.step(mnist_batches[2])) == float(twin.step(mnist_batches[2]))
    assert_states_equal(loop.state_dict(), twin.state_dict())


def test_evaluate_matches_torch(mnist_batches):
    loop, reference = ChainerLoop(ut.mlp()), torch_model(ut.mlp())
    x, y = np.concatenate([b[0] for b in mnist_batches[:4]]), np.concatenate([b[1] for b in mnist_batches[:4]])
    metrics = loop.evaluate((x, y), batch_size=100)
    logits = reference.eval()(torch.from_numpy(x))
    loss = torch_output(reference, x, lambda logits: torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    assert_within_drift({"out": np.asarray(metrics["loss"])}, *loss)
    assert metrics["num_correct"] == int((logits.argmax(1).numpy() == y).sum())


# --- weights and optimizer state ----------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_layout(name):
    spec = MODELS[name]()
    state = ChainerLoop(spec).state_dict()
    assert {k: v.shape for k, v in state.items()} == spec.state_shapes()
    assert list(state) == list(spec.state_shapes())
    assert all(v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, v in state.items())
    assert_states_equal(state, ut.init_weights(spec, 0))


def test_weights_round_trip(tmp_path, mnist_batches):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    loop = ChainerLoop(bn_cnn(), optimizer=ut.SGD(lr=0.1))
    for batch in mnist_batches[:3]:
        loop.step(batch)
    loop.save_weights(tmp_path / "w.safetensors")
    fresh = ChainerLoop(bn_cnn(), seed=7)
    fresh.load_weights(tmp_path / "w.safetensors")
    assert_states_equal(fresh.state_dict(), loop.state_dict())
    x = mnist_batches[4][0]
    np.testing.assert_array_equal(fresh.predict(x), loop.predict(x))
    # PyTorch reads the file as its own state_dict.
    reference = torch_model(bn_cnn())
    reference.load_state_dict(safetensors_torch.load_file(tmp_path / "w.safetensors"))
    assert_within_drift({"out": loop.predict(x)}, *torch_output(reference.eval(), x))


@pytest.mark.parametrize("optimizer", [ut.SGD(momentum=0.9), ut.AdamW()])
def test_optimizer_state_round_trip(optimizer, mnist_batches):
    loop = ChainerLoop(bn_mlp(), optimizer=optimizer)
    for batch in mnist_batches[:3]:
        loop.step(batch)
    state = loop.optimizer_state_dict()
    assert state["step"].dtype == np.int64 and state["step"].shape == () and state["step"] == 3
    assert set(state) == {"step"} | {f"{p}.{s}" for p in bn_mlp().param_shapes() for s in optimizer.state_names}
    resumed = ChainerLoop(bn_mlp(), optimizer=optimizer, seed=5)
    resumed.load_state_dict(loop.state_dict())
    resumed.load_optimizer_state_dict(state)
    assert_states_equal(resumed.optimizer_state_dict(), state)
    for batch in mnist_batches[3:5]:
        assert float(resumed.step(batch)) == float(loop.step(batch))
    assert_states_equal(resumed.state_dict(), loop.state_dict())
    with pytest.raises(ValueError, match="optimizer state"):
        resumed.load_optimizer_state_dict({**state, "nope.exp_avg": np.zeros(1)})


# --- native models ------------------------------------------------------------------------------


class NativeNet(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.l1 = L.Linear(784, 64)
            self.bn = L.BatchNormalization(64)
            self.l2 = L.Linear(64, 10)

    def forward(self, x):
        return self.l2(chainer.functions.relu(self.bn(self.l1(x))))


def test_native_model_trains(mnist_batches):
    np.random.seed(0)  # Chainer's initializers draw from NumPy's global RNG
    net = NativeNet()
    assert ChainerLoop.is_native_model(net) and backend_of(net) == "chainer"
    assert not ChainerLoop.is_native_model(torch.nn.Linear(2, 2))
    loop = ut.make_loop(None, net, optimizer=ut.SGD(lr=0.05, momentum=0.9))
    assert isinstance(loop, ChainerLoop)
    state = loop.state_dict()
    assert {k: v.shape for k, v in state.items()} == {
        "bn.avg_mean": (64,), "bn.avg_var": (64,), "bn.beta": (64,), "bn.gamma": (64,),
        "l1.W": (64, 784), "l1.b": (64,), "l2.W": (10, 64), "l2.b": (10,),
    }  # fmt: skip
    before = loop.evaluate(ut.ArrayDataset(*mnist_batches[-1]))["loss"]
    losses = [float(loop.step(batch)) for batch in mnist_batches[:40]]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert loop.evaluate(ut.ArrayDataset(*mnist_batches[-1]))["loss"] < 0.5 * before
    params = ("l1.W", "l1.b", "bn.gamma", "bn.beta", "l2.W", "l2.b")
    assert set(loop.optimizer_state_dict()) == {"step"} | {f"{k}.momentum_buffer" for k in params}
    loop.load_state_dict(state)  # Chainer's names round-trip too
    assert_states_equal(loop.state_dict(), state)
    np.testing.assert_array_equal(net.l1.W.array, state["l1.W"])


def test_native_model_must_be_initialized():
    with pytest.raises(ValueError, match="not initialized"):
        ChainerLoop(L.Linear(None, 10))


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_epoch_mlp_reaches_90_percent():
    loop = ChainerLoop(ut.mlp(), optimizer=ut.SGD(lr=0.01), seed=0)
    history = loop.fit(ut.load_mnist("train"), epochs=1, batch_size=64, shuffle=True, eval_data=ut.load_mnist("test"))
    record = history[0]
    print(
        f"chainer mlp 1 epoch: test accuracy {record['test_accuracy']:.4f}, {record['samples_per_sec']:.0f} samples/s"
    )
    assert record["test_accuracy"] >= 0.90
