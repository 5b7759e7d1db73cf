"""The Chainer adapter against hand-written PyTorch references (same initial weights, same batches)."""

import numpy as np
import pytest
from unitrain.conformance.checks import longest_sum
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain.registry import backend_of

# The adapter first: it makes `import chainer` work (see its distutils note).
ChainerLoop = pytest.importorskip("unitrain.backends.chainer").ChainerLoop
chainer = pytest.importorskip("chainer")
torch = pytest.importorskip("torch")

from chainer import links as L  # noqa: E402
from torch_reference import (  # noqa: E402
    RoundingModel,
    accumulation_tolerances,
    assert_states_close,
    assert_states_equal,
    assert_within_drift,
    drift_tolerances,
    expected_run,
    float64_tolerances,
    gradient_size,
    load_state,
    numpy_state,
    steps_tolerance,
    torch_layers,
    torch_output,
    torch_runs,
    train_torch,
    twin_tolerance,
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
    gradients = accumulation_tolerances(full, x, y, full.gradients())
    assert_within_drift(halves.gradients(), full.gradients(), gradients)
    weights = full.state_dict()
    halves.update()
    full.update()
    # one update at lr 0.01 of those gradients, and a rounding of each weight
    updated = {
        key: 0.01 * gradients[key] + 2 * tolerance(np.float32, 1, np.abs(value).max()) for key, value in weights.items()
    }
    assert_within_drift(halves.state_dict(), full.state_dict(), updated)
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
    np.testing.assert_array_equal(out[kept], 2 * x.reshape(64, -1)[kept])  # times 2.0: exact
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
    conv_out = getattr(loop.model, "0")(x).array.astype(np.float64)  # the same float32 values BatchNorm receives
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


# --- branches, the new leaves and losses, ResNet-18 ------------------------------------

from collections import OrderedDict  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from torch_reference import BasicBlock, ResNet18  # noqa: E402

from unitrain import expr  # noqa: E402

nn = torch.nn

SGD_MOMENTUM = (ut.SGD(lr=0.1, momentum=0.9), lambda params: torch.optim.SGD(params, 0.1, 0.9, foreach=False))

#: each new leaf and its torch.nn twin, placed after a 3x3 convolution over (4, 7, 7) inputs
LEAVES = {
    "conv_tuple_dilated_grouped": (
        ut.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=2),
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), groups=2),
    ),
    "conv_depthwise_nobias": (ut.Conv2d(4, 4, 3, groups=4, bias=False), nn.Conv2d(4, 4, 3, groups=4, bias=False)),
    "maxpool_padded": (ut.MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(3, stride=2, padding=1)),
    "avgpool_include_pad": (ut.AvgPool2d(3, stride=2, padding=1), nn.AvgPool2d(3, stride=2, padding=1)),
    "avgpool_exclude_pad": (
        ut.AvgPool2d((3, 2), stride=(2, 1), padding=1, count_include_pad=False),
        nn.AvgPool2d((3, 2), stride=(2, 1), padding=1, count_include_pad=False),
    ),
    "adaptive_global": (ut.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)),
    "adaptive_uneven_bins": (ut.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveAvgPool2d((3, 2))),
    "layernorm_chw": (ut.LayerNorm((4, 7, 7), eps=1e-3), nn.LayerNorm((4, 7, 7), eps=1e-3)),
    "layernorm_last_no_affine": (ut.LayerNorm(7, elementwise_affine=False), nn.LayerNorm(7, elementwise_affine=False)),
    "identity": (ut.Identity(), nn.Identity()),
    "tanh": (ut.Tanh(), nn.Tanh()),
    "sigmoid": (ut.Sigmoid(), nn.Sigmoid()),
    "gelu": (ut.GELU(), nn.GELU()),
    "gelu_tanh": (ut.GELU(approximate="tanh"), nn.GELU(approximate="tanh")),
    "leaky_relu": (ut.LeakyReLU(0.2), nn.LeakyReLU(0.2)),
    "silu": (ut.SiLU(), nn.SiLU()),
    "elu": (ut.ELU(alpha=0.5), nn.ELU(alpha=0.5)),
    "softmax_channels": (ut.Softmax(dim=1), nn.Softmax(dim=1)),
    "log_softmax_last": (ut.LogSoftmax(dim=-1), nn.LogSoftmax(dim=-1)),
    "conv_transpose_output_padding": (
        ut.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
    ),
    "conv_transpose_grouped_dilated_nobias": (
        ut.ConvTranspose2d(4, 6, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
        nn.ConvTranspose2d(4, 6, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
    ),
    # output_padding >= stride: no strided convolution maps the output back, Chainer's outsize refuses it
    "conv_transpose_output_padding_beyond_stride": (
        ut.ConvTranspose2d(4, 4, 3, padding=2, output_padding=1, dilation=2),
        nn.ConvTranspose2d(4, 4, 3, padding=2, output_padding=1, dilation=2),
    ),
    "upsample_nearest_double": (ut.Upsample(scale_factor=2), nn.Upsample(scale_factor=2)),
    "upsample_nearest_fractional": (ut.Upsample(scale_factor=(1.7, 0.6)), nn.Upsample(scale_factor=(1.7, 0.6))),
    "upsample_bilinear": (ut.Upsample(scale_factor=2, mode="bilinear"), nn.Upsample(scale_factor=2, mode="bilinear")),
    "upsample_bilinear_align_corners": (
        ut.Upsample(size=(9, 12), mode="bilinear", align_corners=True),
        nn.Upsample(size=(9, 12), mode="bilinear", align_corners=True),
    ),
    "flatten_channels_rows": (ut.Flatten(1, 2), nn.Flatten(1, 2)),
}


def around(leaf, torch_leaf, dtype=torch.float32):
    """``leaf`` between a convolution (trained through it) and a Linear classifier, and its torch twin."""
    head = [ut.Conv2d(4, 4, 3, padding=1), leaf, ut.Flatten()]
    features = ut.Sequential(*head).output_shape((4, 7, 7))[0]
    spec = ut.Sequential(*head, ut.Linear(features, 3))
    twin = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), torch_leaf, nn.Flatten(), nn.Linear(features, 3))
    return spec, load_state(twin.to(dtype), ut.init_weights(spec, 0))


def small_batches(dtype=np.float32, count=2, classes=3):
    rng = np.random.default_rng(1)
    return [
        (rng.standard_normal((4, 4, 7, 7)).astype(dtype), rng.integers(0, classes, 4).astype(np.int64))
        for _ in range(count)
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", LEAVES)
def test_new_leaf_trains_like_torch(name, dtype):
    spec, reference = around(*LEAVES[name], dtype=getattr(torch, dtype))
    loop = ChainerLoop(spec, optimizer=SGD_MOMENTUM[0], dtype=dtype)
    batches = small_batches(dtype)
    x = batches[0][0]
    expected = reference.eval()(torch.from_numpy(x)).detach().numpy()
    forward = twin_tolerance(dtype, longest_sum(spec, x.shape[1:], len(x)), expected)
    np.testing.assert_allclose(loop.predict(x), expected, rtol=0, atol=forward)
    for batch in batches:
        loop.step(batch)
    train_torch(reference, SGD_MOMENTUM[1](reference.parameters()), batches)
    atol = steps_tolerance(spec, batches, dtype, loss_size=3)  # + the softmax over 3 classes
    diff = assert_states_close(loop.state_dict(), numpy_state(reference), rtol=0, atol=atol, scale_atol=True)
    print(f"{name} {dtype}: max |dw| after 2 SGD-momentum steps vs torch: {diff:.1e}")


class PlusInput(nn.Sequential):
    """torch twin of ``ut.Residual(body)``: identity shortcut, nothing after the add; the body's children
    are its own, as the spec names them."""

    def forward(self, x):
        return super().forward(x) + x


def basic_block(in_planes, planes, stride=1):
    """torchvision's BasicBlock as a spec (tests/torch_reference.py's ``BasicBlock`` is its twin)."""
    body = ut.Sequential({
        "conv1": ut.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False), "bn1": ut.BatchNorm2d(planes),
        "relu": ut.ReLU(), "conv2": ut.Conv2d(planes, planes, 3, padding=1, bias=False), "bn2": ut.BatchNorm2d(planes),
    })  # fmt: skip
    shortcut = None
    if stride != 1 or in_planes != planes:
        shortcut = ut.Sequential(ut.Conv2d(in_planes, planes, 1, stride, bias=False), ut.BatchNorm2d(planes))
    return ut.Residual(body, shortcut, post=ut.ReLU())


def branchy(dtype=torch.float32):
    """Residual blocks nested to depth three, named children, and the torch twin with the same keys."""
    spec = ut.Sequential({
        "block": basic_block(4, 8, stride=2),
        "plain": ut.Residual(ut.Sequential(
            ut.Conv2d(8, 8, 3, padding=1), ut.Residual(ut.Sequential(ut.Tanh(), ut.Conv2d(8, 8, 1))),
        )),
        "pool": ut.AdaptiveAvgPool2d(1), "flatten": ut.Flatten(), "fc": ut.Linear(8, 3),
    })  # fmt: skip
    downsample = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    twin = nn.Sequential(OrderedDict(
        block=BasicBlock(4, 8, 2, downsample),
        plain=PlusInput(nn.Conv2d(8, 8, 3, padding=1), PlusInput(nn.Tanh(), nn.Conv2d(8, 8, 1))),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, 3),
    ))  # fmt: skip
    return spec, load_state(twin.to(dtype), ut.init_weights(spec, 0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_branches_train_like_torch(dtype):
    spec, reference = branchy(getattr(torch, dtype))
    loop = ChainerLoop(spec, optimizer=SGD_MOMENTUM[0], dtype=dtype)
    assert list(loop.state_dict()) == list(reference.state_dict())
    assert "block.downsample.1.running_var" in loop.state_dict() and "plain.1.1.weight" in loop.state_dict()
    batches = small_batches(dtype)
    x = batches[0][0]
    expected = reference.eval()(torch.from_numpy(x)).detach().numpy()
    forward = twin_tolerance(dtype, longest_sum(spec, x.shape[1:], len(x)), expected)
    np.testing.assert_allclose(loop.predict(x), expected, rtol=0, atol=forward)
    for batch in batches:  # BatchNorm in training mode
        loop.step(batch)
    train_torch(reference, SGD_MOMENTUM[1](reference.parameters()), batches)
    atol = steps_tolerance(spec, batches, dtype, loss_size=3)  # + the softmax over 3 classes
    diff = assert_states_close(loop.state_dict(), numpy_state(reference), rtol=0, atol=atol, scale_atol=True)
    print(f"branches {dtype}: max |dw| after 2 SGD-momentum steps vs torch: {diff:.1e}")


def test_child_names_that_chainer_reserves():
    """A child named like a Chain attribute (``forward``, ``params``) still gets PyTorch's key."""
    spec = ut.Sequential({"forward": ut.Linear(4, 4), "params": ut.Sequential(ut.Linear(4, 2))})
    state = ChainerLoop(spec).state_dict()
    assert list(state) == ["forward.weight", "forward.bias", "params.0.weight", "params.0.bias"]
    assert_states_equal(state, ut.init_weights(spec, 0))


def regression_batch(kind, rows=8, classes=5):
    """Inputs (rows, 12) and targets of ``kind``: class indices, class probabilities, [0, 1] floats, reals."""
    rng = np.random.default_rng(2)
    x = 2 * rng.standard_normal((rows, 12)).astype(np.float32)
    if kind == "indices":
        return x, rng.integers(0, classes, rows).astype(np.int64)
    if kind == "probabilities":
        logits = rng.standard_normal((rows, classes))
        return x, (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    y = rng.uniform(0, 1, (rows, classes)) if kind == "unit" else 2 * rng.standard_normal((rows, classes))
    return x, y.astype(np.float32)


TF = torch.nn.functional
#: name -> (loss spec, torch's loss function, kind of targets)
LOSSES = {
    "ce_label_smoothing": (
        ut.CrossEntropyLoss(label_smoothing=0.1), lambda p, y: TF.cross_entropy(p, y, label_smoothing=0.1), "indices",
    ),
    "ce_probabilities": (ut.CrossEntropyLoss(), TF.cross_entropy, "probabilities"),
    "ce_probabilities_smoothing_sum": (
        ut.CrossEntropyLoss("sum", label_smoothing=0.2),
        lambda p, y: TF.cross_entropy(p, y, reduction="sum", label_smoothing=0.2), "probabilities",
    ),
    "nll_after_log_softmax": (ut.NLLLoss(), TF.nll_loss, "indices"),
    "bce_with_logits": (ut.BCEWithLogitsLoss(), TF.binary_cross_entropy_with_logits, "unit"),
    "bce_with_logits_sum": (
        ut.BCEWithLogitsLoss("sum"), lambda p, y: TF.binary_cross_entropy_with_logits(p, y, reduction="sum"), "unit",
    ),
    "l1": (ut.L1Loss(), TF.l1_loss, "real"),
    "l1_sum": (ut.L1Loss("sum"), lambda p, y: TF.l1_loss(p, y, reduction="sum"), "real"),
    "smooth_l1": (ut.SmoothL1Loss(beta=0.5), lambda p, y: TF.smooth_l1_loss(p, y, beta=0.5), "real"),
    "smooth_l1_beta0": (ut.SmoothL1Loss(beta=0.0), lambda p, y: TF.smooth_l1_loss(p, y, beta=0.0), "real"),
    "huber_sum": (ut.HuberLoss("sum", delta=2.0), lambda p, y: TF.huber_loss(p, y, reduction="sum", delta=2.0), "real"),
    "bce": (ut.BCELoss(), TF.binary_cross_entropy, "unit"),
    "bce_sum": (ut.BCELoss("sum"), lambda p, y: TF.binary_cross_entropy(p, y, reduction="sum"), "unit"),
}  # fmt: skip
#: what a loss needs after the Linear layer: log-probabilities for NLLLoss, probabilities for BCELoss
HEADS = {ut.NLLLoss: ([ut.LogSoftmax(dim=1)], [nn.LogSoftmax(dim=1)]), ut.BCELoss: ([ut.Sigmoid()], [nn.Sigmoid()])}


@pytest.mark.parametrize("name", LOSSES)
def test_new_loss_matches_torch(name):
    """The loss value and one SGD-momentum step from the same weights (targets reach both sides of
    SmoothL1's beta and Huber's delta)."""
    loss, torch_loss, kind = LOSSES[name]
    head, twin_head = HEADS.get(type(loss), ([], []))
    spec = ut.Sequential(ut.Linear(12, 5), *head)
    twin = load_state(nn.Sequential(nn.Linear(12, 5), *twin_head), ut.init_weights(spec, 0))
    loop = ChainerLoop(spec, loss, SGD_MOMENTUM[0])
    x, y = regression_batch(kind)
    expected = torch_loss(twin(torch.from_numpy(x)), torch.from_numpy(y))
    # float32 here and in PyTorch: the 12-input layer, then the loss's reduction over every target element
    allowed = twin_tolerance(np.float32, longest_sum(spec, x.shape[1:], len(x)) + y.size, expected.item())
    assert loop.to_float(loop.loss(loop.forward(x), y)) == pytest.approx(expected.item(), rel=0, abs=allowed)
    assert float(loop.step((x, y))) == pytest.approx(expected.item(), rel=0, abs=allowed)
    optimizer = SGD_MOMENTUM[1](twin.parameters())
    optimizer.zero_grad()
    expected.backward()
    optimizer.step()
    atol = steps_tolerance(spec, [(x, y)], np.float32, loss_size=y.size)
    assert_states_close(loop.state_dict(), numpy_state(twin), rtol=0, atol=atol, scale_atol=True)


def torch_custom_step(model, loss_fn, x, y, steps=2):
    optimizer = SGD_MOMENTUM[1](model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()


def test_custom_loss_of_the_tutorial_matches_torch():
    spec = ut.Sequential(ut.Linear(12, 5))
    loop = ChainerLoop(spec, ut.CustomLoss(lambda pred, labels: (pred - labels).sum()), SGD_MOMENTUM[0])
    twin = load_state(nn.Sequential(nn.Linear(12, 5)), ut.init_weights(spec, 0))
    x, y = regression_batch("real")
    expected = (twin(torch.from_numpy(x)) - torch.from_numpy(y)).sum().item()
    # the 12-input layer, then the sum over every target element
    allowed = twin_tolerance(np.float32, longest_sum(spec, x.shape[1:], len(x)) + y.size, expected)
    assert float(loop.step((x, y))) == pytest.approx(expected, rel=0, abs=allowed)
    loop.step((x, y))
    torch_custom_step(twin, lambda pred, labels: (pred - labels).sum(), x, y)
    atol = steps_tolerance(spec, [(x, y)] * 2, np.float32, loss_size=y.size)
    assert_states_close(loop.state_dict(), numpy_state(twin), rtol=0, atol=atol, scale_atol=True)


def every_op(pred, target, ops):
    """One loss using every CustomLoss operation, written against ``ops`` (unitrain.expr or torch)."""
    return (
        (ops.maximum(pred, target) + ops.minimum(pred, 0.25) - 1.5 * target).mean()
        + abs(pred - target).sum(1).mean() / 4
        + ops.log_softmax(pred, 1).mean(0).sum() * -0.5
        + ops.square(ops.softmax(-pred, -1)).sum()
        + ops.sqrt(ops.square(pred) + 1).mean()
        + ops.exp(-(pred**2)).mean()
        + ops.log(2 + pred * pred).sum(0).mean()
        - (3 - pred) ** 2 / 50
    ).sum()


#: torch's functions under unitrain.expr's names (torch.maximum/minimum take tensors only)
TORCH_OPS = SimpleNamespace(
    **{name: getattr(torch, name) for name in ("sqrt", "square", "exp", "log", "log_softmax", "softmax")},
    maximum=lambda a, b: torch.maximum(a, torch.as_tensor(b, dtype=a.dtype)),
    minimum=lambda a, b: torch.minimum(a, torch.as_tensor(b, dtype=a.dtype)),
)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_custom_loss_every_op_matches_torch(dtype):
    """Weights after two steps; the model is the identity map at first, so that predictions tie with the
    targets (and with 0.25) exactly where the targets are made to: maximum/minimum split those gradients."""
    spec = ut.Sequential(ut.Linear(5, 5))
    x = np.random.default_rng(3).standard_normal((6, 5)).astype(dtype)
    x[0, 0] = 0.25
    noise = np.random.default_rng(4).standard_normal((6, 5)).astype(dtype)
    y = x + noise * (np.arange(5) % 2)  # ties in columns 0, 2, 4
    state = {"0.weight": np.eye(5, dtype=np.float32), "0.bias": np.zeros(5, np.float32)}
    loop = ChainerLoop(spec, ut.CustomLoss(lambda p, t: every_op(p, t, expr)), SGD_MOMENTUM[0], dtype=dtype)
    loop.load_state_dict(state)
    twin = load_state(nn.Sequential(nn.Linear(5, 5)), state).to(getattr(torch, dtype))
    expected = every_op(twin(torch.from_numpy(x)), torch.from_numpy(y), TORCH_OPS).item()
    # the 5-input layer, then each term's reductions over every prediction element (eight terms)
    loss_size = 8 * y.size
    allowed = twin_tolerance(dtype, longest_sum(spec, x.shape[1:], len(x)) + loss_size, expected)
    assert float(loop.step((x, y))) == pytest.approx(expected, rel=0, abs=allowed)
    loop.step((x, y))
    torch_custom_step(twin, lambda p, t: every_op(p, t, TORCH_OPS), x, y)
    atol = steps_tolerance(spec, [(x, y)] * 2, dtype, loss_size=loss_size)
    assert_states_close(loop.state_dict(), numpy_state(twin), rtol=0, atol=atol, scale_atol=True)


def largest_difference(actual, expected):
    """The largest absolute difference between two states."""
    assert list(actual) == list(expected)
    return max(float(np.abs(actual[key] - value).max(initial=0)) for key, value in expected.items())


def test_resnet18_matches_plain_pytorch():
    """``unitrain.resnet18()`` against tests/torch_reference.py's ResNet18 from the same weights: eval
    logits, then one SGD-momentum step (the seed tutorial's lr 1e-2, momentum 0.9) with BatchNorm in
    training mode; in float64, then in float32 against the float64 truth.

    The case is chosen to be well-conditioned, and checks it is:
    - (2, 3, 36, 36) inputs: at 32x32 or 28x28 the last stage is 1x1, so its BatchNorm normalises two
      values per channel and the step is ill-conditioned (PyTorch's own float32 and float64 weights
      then differ by 0.9 after one step); from 36x36 on it is 2x2 and sees 8 values per channel.
    - The gradient jumps at a ReLU's 0 and at a max-pool tie: where a decision lies within float32
      rounding of its kink, one float32 run's gradient takes the other branch and weights separate by
      1e-4 at lr 1e-2 in either framework, which is no rounding bound. Which way a CPU rounds differs
      between CPUs, so the premise is checked with ``RoundingModel`` (the same on any CPU): seed 46
      keeps every decision 7.4 rounding scales away (at 64x64, with four times the decisions, none of
      115 seeds reached 6)."""
    spec = ut.resnet18(num_classes=10)
    x = np.random.default_rng(46).standard_normal((2, 3, 36, 36))
    y = np.array([3, 7])
    optimizer = (ut.SGD(lr=0.01, momentum=0.9), lambda params: torch.optim.SGD(params, 0.01, 0.9, foreach=False))
    runs = {}
    for dtype in ("float64", "float32"):
        loop = ChainerLoop(spec, optimizer=optimizer[0], dtype=dtype)
        reference = load_state(ResNet18(num_classes=10).to(getattr(torch, dtype)), loop.state_dict())
        # torchvision's keys in its order (load_state_dict above checked the shapes)
        assert list(loop.state_dict()) == list(reference.state_dict())
        batch = (x.astype(dtype), y)
        if dtype == "float64":  # RoundingModel runs a copy: training-mode forwards update BatchNorm's statistics
            for name, index, margin in RoundingModel(reference.train(), torch.from_numpy(batch[0])).margins():
                assert margin > RoundingModel.MARGIN, f"{name} call {index}: {margin:.1f} rounding scales from flipping"
        logits = ({"logits": loop.predict(batch[0])},
                  {"logits": reference.eval()(torch.from_numpy(batch[0])).detach().numpy()})  # fmt: skip
        loop.step(batch)
        train_torch(reference, optimizer[1](reference.parameters()), [batch])
        runs[dtype] = logits, (loop.state_dict(), numpy_state(reference))
    # the step's longest sum: a weight gradient over the batch's output pixels, plus the softmax over 10 classes
    size = gradient_size(spec, x.shape[1:], len(x)) + 10
    # float64: the same equations, each within the conformance formula of the exact result
    for chainer_result, torch_result in runs["float64"]:
        tolerances = {key: twin_tolerance(np.float64, size, value) for key, value in torch_result.items()}
        assert_within_drift(chainer_result, torch_result, tolerances)
    # float32: Chainer's error from the float64 truth within sqrt(size) times PyTorch's own float32 error on
    # the same case (drift_tolerances); a wrong equation (a dropped shortcut, a misplaced pool) is off by 1e-2
    for (chainer32, torch32), (_, truth) in zip(runs["float32"], runs["float64"], strict=True):
        own_error, torch_error = largest_difference(chainer32, truth), largest_difference(torch32, truth)
        print(f"resnet18 float32: chainer {own_error:.1e}, torch {torch_error:.1e} from float64")
        assert_within_drift(chainer32, truth, drift_tolerances([torch32], truth, size))


def test_residual_as_the_whole_model():
    spec = ut.Residual(ut.Sequential({"fc": ut.Linear(6, 6), "act": ut.Tanh()}), ut.Linear(6, 6, bias=False), ut.ReLU())
    loop = ChainerLoop(spec)
    assert list(loop.state_dict()) == ["fc.weight", "fc.bias", "downsample.weight"]
    x = np.random.default_rng(6).standard_normal((3, 6)).astype(np.float32)
    state = loop.state_dict()
    expected = np.maximum(np.tanh(x @ state["fc.weight"].T + state["fc.bias"]) + x @ state["downsample.weight"].T, 0)
    # float32: two 6-term dot products and the add, within the conformance formula (n = 12)
    atol = tolerance(np.float32, 12, float(np.abs(expected).max()))
    np.testing.assert_allclose(loop.predict(x), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["ce_label_smoothing", "ce_probabilities", "bce_with_logits", "l1", "smooth_l1"])
def test_evaluate_with_new_losses_matches_torch(name):
    """evaluate's loss is the per-sample (class losses) or per-element mean, over uneven batches."""
    loss, torch_loss, kind = LOSSES[name]
    spec = ut.Sequential(ut.Linear(12, 5))
    loop, twin = ChainerLoop(spec, loss), load_state(nn.Sequential(nn.Linear(12, 5)), ut.init_weights(spec, 0))
    x, y = regression_batch(kind)
    metrics = loop.evaluate((x, y), batch_size=3)
    logits = twin(torch.from_numpy(x))
    expected = torch_loss(logits, torch.from_numpy(y)).item()
    # the 12-input layer, then the mean over every target element
    allowed = twin_tolerance(np.float32, longest_sum(spec, x.shape[1:], len(x)) + y.size, expected)
    assert metrics["loss"] == pytest.approx(expected, rel=0, abs=allowed)
    if kind == "indices":
        assert metrics["num_correct"] == int((logits.argmax(1).numpy() == y).sum())
    elif not loss.class_targets and not isinstance(loss, ut.BCEWithLogitsLoss):  # values: no accuracy
        assert np.isnan(metrics["accuracy"])


def test_step_equals_tutorial_sequence_through_branches(mnist_batches):
    """Dropout in both branches of a Residual draws the loop's stream in one order (body, then shortcut)."""

    def spec():
        body = ut.Sequential(ut.Linear(784, 32), ut.BatchNorm1d(32), ut.ReLU(), ut.Dropout(0.3))
        return ut.Sequential(
            ut.Flatten(), ut.Residual(body, ut.Sequential(ut.Linear(784, 32), ut.Dropout(0.5)), ut.ReLU()),
            ut.Linear(32, 10),
        )  # fmt: skip

    whole, tutorial = (ChainerLoop(spec(), optimizer=ut.SGD(lr=0.05, momentum=0.9), seed=4) for _ in range(2))
    for x, y in mnist_batches[:3]:
        assert float(whole.step((x, y))) == tutorial.to_float(tutorial_step(tutorial, x, y))
    assert_states_equal(whole.state_dict(), tutorial.state_dict())
    assert_states_equal(whole.random_state(), tutorial.random_state())
