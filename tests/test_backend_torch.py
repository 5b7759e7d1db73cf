"""The PyTorch backend against hand-written plain-PyTorch code (nn.Sequential + torch.optim, in torch_reference.py).

Both run the same PyTorch kernels in the same order, so results are compared bit-for-bit.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch_reference import (
    SEED,
    GarmentClassifier,
    ResNet18,
    accumulation_tolerances,
    assert_states_equal,
    assert_within_drift,
    bn_spec,
    leaf_cases,
    load_state,
    network_spec,
    numpy_state,
    optimizer_buffers,
    random_batches,
    reference,
    train_torch,
    twin_tolerance,
)
from unitrain.backends.torch import TorchLoop
from unitrain.conformance.checks import longest_sum
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain import expr
from unitrain.weights import WeightsError


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn"])
def test_forward_matches_torch(name, mnist_train):
    x = mnist_train.x[:100]
    loop = TorchLoop(network_spec(name), seed=SEED)
    ref = reference(name)
    with torch.no_grad():
        np.testing.assert_array_equal(loop.predict(x), ref.eval()(torch.from_numpy(x)).numpy())
        # training mode: BN batch statistics, and dropout drawn as torch.manual_seed(seed) would
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            expected = ref.train()(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(loop.forward(x).detach().numpy(), expected)


OPTIMIZERS = [
    ("mlp", ut.SGD(lr=0.01, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), 50),
    ("cnn", ut.SGD(lr=0.01, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), 50),
    ("mlp", ut.Adam(lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3), 20),
    ("cnn", ut.Adam(lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3), 20),
    ("mlp", ut.AdamW(lr=1e-3, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1), 20),
    (
        "mlp",
        ut.SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
        50,
    ),
    ("bn", ut.Adam(lr=1e-3, weight_decay=1e-4), lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4), 20),
]


@pytest.mark.parametrize(("name", "spec", "make_optimizer", "steps"), OPTIMIZERS)
def test_training_matches_torch_bit_for_bit(name, spec, make_optimizer, steps, mnist_batches):
    batches = mnist_batches[:steps]
    loop = TorchLoop(network_spec(name), optimizer=spec, seed=SEED)
    losses = [float(loop.step(batch)) for batch in batches]

    model = reference(name)
    optimizer = make_optimizer(model.parameters())
    with torch.random.fork_rng():
        torch.manual_seed(SEED)  # the dropout stream of a loop with this seed
        expected = train_torch(model, optimizer, batches)

    assert losses == expected
    assert_states_equal(loop.state_dict(), numpy_state(model))
    state = loop.optimizer_state_dict()
    assert state["step"] == steps and state.pop("step").dtype == np.int64
    assert {key.rsplit(".", 1)[1] for key in state} == set(spec.state_names)
    assert_states_equal(state, optimizer_buffers(model, optimizer))


def test_float64_matches_torch(mnist_batches):
    batches = mnist_batches[:5]
    loop = TorchLoop(ut.mlp(), optimizer=ut.Adam(), seed=SEED, dtype="float64")
    for batch in batches:
        loop.step(batch)
    model = reference("mlp", torch.float64)
    train_torch(model, torch.optim.Adam(model.parameters()), batches)
    assert_states_equal(loop.state_dict(), numpy_state(model))
    assert loop.predict(batches[0][0]).dtype == np.float64
    assert all(v.dtype == np.float64 for v in loop.optimizer_state_dict().values() if v.ndim)


@pytest.mark.parametrize(
    ("loss", "functional", "target"),
    [
        (ut.NLLLoss(reduction="sum"), F.nll_loss, lambda y: y),
        (ut.MSELoss(), F.mse_loss, lambda y: np.eye(10, dtype=np.float32)[y]),
    ],
)
def test_other_losses_match_torch(loss, functional, target, mnist_train):
    x, y = mnist_train.x[:64], target(mnist_train.y[:64])
    loop = TorchLoop(ut.mlp(), loss=loss, seed=SEED)
    value = loop.step((x, y))
    model = reference("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = functional(model(torch.from_numpy(x)), torch.from_numpy(y), reduction=loss.reduction)
    expected.backward()
    optimizer.step()
    assert float(value) == expected.item()
    assert_states_equal(loop.state_dict(), numpy_state(model))
    metrics = loop.evaluate((x, y))
    with torch.no_grad():
        mean = functional(model(torch.from_numpy(x)), torch.from_numpy(y)).item()
    # float32 in other batches and sums: the logits' longest sum, then the mean adds every output element
    allowed = twin_tolerance(np.float32, longest_sum(loop.model_spec, x.shape[1:], len(x)) + y.size + 10, mean)
    assert metrics["loss"] == pytest.approx(mean, rel=0, abs=allowed)


def test_evaluate_matches_torch(mnist_train):
    loop = TorchLoop(ut.cnn(), seed=SEED)
    metrics = loop.evaluate(mnist_train.subset(slice(0, 2500)), batch_size=1000)
    with torch.no_grad():
        logits = reference("cnn").eval()(torch.from_numpy(mnist_train.x[:2500]))
        mean = F.cross_entropy(logits, torch.from_numpy(mnist_train.y[:2500])).item()
    # float32 in other batches and sums: the logits' longest sum, then the mean over samples and classes
    allowed = twin_tolerance(np.float32, longest_sum(loop.model_spec, (1, 28, 28), 1000) + 2500 + 10, mean)
    assert metrics["loss"] == pytest.approx(mean, rel=0, abs=allowed)
    assert metrics["num_correct"] == int((logits.argmax(1).numpy() == mnist_train.y[:2500]).sum())
    assert metrics["num_samples"] == 2500


@pytest.mark.parametrize("name", ["mlp", "bn"])
def test_step_equals_tutorial_sequence(name, mnist_batches):
    whole = TorchLoop(network_spec(name), optimizer=ut.SGD(momentum=0.9), seed=SEED)
    manual = TorchLoop(network_spec(name), optimizer=ut.SGD(momentum=0.9), seed=SEED)
    for x, y in mnist_batches[:3]:
        expected = whole.step((x, y))
        manual.zero_grad()
        loss = manual.loss(manual.forward(x), y)
        manual.backward(loss)
        manual.update()
        assert loss.item() == expected.item()  # with dropout too: both draw from the loop's stream
    assert_states_equal(whole.state_dict(), manual.state_dict())
    assert whole.step_count == manual.step_count == 3


def test_zero_grad_and_accumulation(mnist_train):
    x, y = mnist_train.x[:64], mnist_train.y[:64]
    loop = TorchLoop(ut.cnn(), loss=ut.CrossEntropyLoss(reduction="sum"), seed=SEED)
    grads = loop.gradients()
    assert list(grads) == list(ut.cnn().param_shapes()) and not any(g.any() for g in grads.values())
    loop.backward(loop.loss(loop.forward(x), y))
    full = loop.gradients()
    assert all(g.any() for g in full.values())
    loop.zero_grad()
    assert not any(g.any() for g in loop.gradients().values())
    for half in (slice(0, 32), slice(32, 64)):
        loop.backward(loop.loss(loop.forward(x[half]), y[half]))
    assert_within_drift(loop.gradients(), full, accumulation_tolerances(loop, x, y, full))


def test_dropout_only_in_training_and_seeded():
    spec = ut.Sequential(ut.Linear(20, 200), ut.Dropout(0.5))
    x = np.random.default_rng(1).standard_normal((8, 20), np.float32)
    loop = TorchLoop(spec, seed=3)
    clean = loop.predict(x)
    weights = ut.init_weights(spec, 3)
    expected = x @ weights["0.weight"].T + weights["0.bias"]
    np.testing.assert_allclose(clean, expected, rtol=0, atol=twin_tolerance(np.float32, 20, expected))  # 20 inputs
    global_state = torch.get_rng_state()
    dropped = loop.forward(x).detach().numpy()
    assert torch.equal(torch.get_rng_state(), global_state)  # the user's global RNG is untouched
    kept = dropped != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_array_equal(dropped[kept], 2 * clean[kept])  # the same kernel, times 2.0: exact
    assert not np.array_equal(dropped, loop.forward(x).detach().numpy())  # the stream moves on
    torch.manual_seed(123)  # does not affect the loop's stream
    np.testing.assert_array_equal(TorchLoop(spec, seed=3).forward(x).detach().numpy(), dropped)
    assert not np.array_equal(TorchLoop(spec, seed=4).forward(x).detach().numpy(), dropped)
    loop.eval()
    np.testing.assert_array_equal(loop.forward(x).detach().numpy(), clean)


def test_batchnorm_running_stats_follow_pytorch(mnist_train):
    spec = ut.Sequential(ut.Flatten(), ut.Linear(784, 16), ut.BatchNorm1d(16, eps=1e-3, momentum=0.2))
    x, y = mnist_train.x[:64], mnist_train.y[:64] % 10
    w = ut.init_weights(spec, SEED)
    h = x.reshape(64, -1).astype(np.float64) @ w["1.weight"].T + w["1.bias"]
    loop = TorchLoop(spec, seed=SEED)
    loop.eval()
    loop.forward(x)
    loop.predict(x)
    loop.evaluate((x, y))
    assert loop.state_dict()["2.num_batches_tracked"] == 0  # eval mode updates nothing
    loop.train()
    loop.step((x, y))
    state = loop.state_dict()
    # float32 against float64: the conformance formula, n = a 784-term dot product then a 64-sample statistic
    running_mean, running_var = 0.2 * h.mean(0), 0.8 + 0.2 * h.var(0, ddof=1)  # unbiased variance
    for key, expected in (("2.running_mean", running_mean), ("2.running_var", running_var)):
        within = tolerance(np.float32, 784 + 64, np.abs(expected).max())
        np.testing.assert_allclose(state[key], expected, rtol=0, atol=within, err_msg=key)
    assert state["2.num_batches_tracked"] == 1 and state["2.num_batches_tracked"].dtype == np.int64
    # eval normalises with the running statistics
    h = x.reshape(64, -1) @ state["1.weight"].T + state["1.bias"]
    expected = (h - state["2.running_mean"]) / np.sqrt(state["2.running_var"] + 1e-3) * state["2.weight"]
    expected += state["2.bias"]  # NumPy float32 against PyTorch float32: the conformance formula, n = 784
    np.testing.assert_allclose(
        loop.predict(x), expected, rtol=0, atol=tolerance(np.float32, 784, np.abs(expected).max())
    )


@pytest.mark.parametrize("training", [True, False])
def test_predict_and_evaluate_change_nothing(training, mnist_train, mnist_batches):
    loop = TorchLoop(bn_spec(), optimizer=ut.Adam(), seed=SEED)
    for batch in mnist_batches[:2]:
        loop.step(batch)
    loop.train(training)
    before = loop.state_dict(), loop.optimizer_state_dict(), loop.step_count
    loop.predict(mnist_train.x[:300], batch_size=128)
    loop.evaluate(mnist_train.subset(slice(0, 300)), batch_size=128)
    after = loop.state_dict(), loop.optimizer_state_dict(), loop.step_count
    for old, new in zip(before[:2], after[:2], strict=True):
        assert_states_equal(new, old)
    assert before[2] == after[2] == 2
    assert loop.training is training and loop.model.training is training


def test_state_dict_layout_and_copies():
    spec = bn_spec()
    loop = TorchLoop(spec, seed=SEED)
    state = loop.state_dict()
    assert {k: v.shape for k, v in state.items()} == spec.state_shapes()
    assert list(state) == list(spec.state_shapes()) == list(reference("bn").state_dict())
    for key, value in state.items():
        assert value.dtype == (np.int64 if key.endswith("num_batches_tracked") else np.float32), key
    state["0.weight"][:] = 7  # a copy, not the parameter
    assert not (loop.state_dict()["0.weight"] == 7).any()


def test_weights_round_trip(tmp_path, mnist_train, mnist_batches):
    loop = TorchLoop(bn_spec(), optimizer=ut.Adam(), seed=SEED)
    for batch in mnist_batches[:3]:
        loop.step(batch)
    path = tmp_path / "w.safetensors"
    loop.save_weights(path)
    other = TorchLoop(bn_spec(), seed=5)
    other.load_weights(path)
    assert_states_equal(other.state_dict(), loop.state_dict())
    # the file is an ordinary PyTorch state_dict
    model = reference("bn")
    model.load_state_dict(load_file(path))
    with torch.no_grad():
        np.testing.assert_array_equal(
            model.eval()(torch.from_numpy(mnist_train.x[:50])).numpy(), loop.predict(mnist_train.x[:50])
        )


@pytest.mark.parametrize("spec", [ut.SGD(momentum=0.9), ut.Adam(), ut.AdamW()])
def test_optimizer_state_round_trip(spec, mnist_batches):
    batches = mnist_batches[:5]
    loop = TorchLoop(ut.mlp(), optimizer=spec, seed=SEED)
    fresh = TorchLoop(ut.mlp(), optimizer=spec, seed=1)
    assert list(fresh.optimizer_state_dict()) == ["step"]  # buffers appear with the first step
    for batch in batches[:3]:
        loop.step(batch)
    fresh.load_state_dict(loop.state_dict())
    fresh.load_optimizer_state_dict(loop.optimizer_state_dict())
    assert fresh.step_count == 3
    for batch in batches[3:]:
        loop.step(batch)
        fresh.step(batch)
    assert_states_equal(fresh.state_dict(), loop.state_dict())
    assert_states_equal(fresh.optimizer_state_dict(), loop.optimizer_state_dict())
    state = loop.optimizer_state_dict()
    with pytest.raises(WeightsError, match="unexpected"):
        fresh.load_optimizer_state_dict({**state, "9.weight.exp_avg": state["1.bias." + spec.state_names[0]]})
    with pytest.raises(WeightsError, match="shape"):
        fresh.load_optimizer_state_dict({**state, f"1.bias.{spec.state_names[0]}": np.zeros(3, np.float32)})


def test_native_model_trains(mnist_train):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten())
            self.head = nn.Linear(8 * 13 * 13, 10)

        def forward(self, x):
            return self.head(self.features(x))

    torch.manual_seed(0)
    net = Net()
    loop = ut.make_loop(model=net, optimizer=ut.Adam(lr=1e-3))
    assert isinstance(loop, TorchLoop) and loop.model is net
    assert TorchLoop.is_native_model(net) and not TorchLoop.is_native_model(ut.mlp())
    assert list(loop.state_dict()) == list(net.state_dict())
    data = mnist_train.subset(slice(0, 2000))
    before = loop.evaluate(data)["loss"]
    loop.fit(data, epochs=1, batch_size=64)
    assert loop.evaluate(data)["loss"] < before / 2
    assert loop.step_count == 32 and list(loop.gradients()) == [n for n, _ in net.named_parameters()]


def test_read_only_and_strided_inputs_work_without_warnings(mnist_train):
    loop = TorchLoop(ut.mlp(), seed=SEED)
    x = mnist_train.x[:10].copy()
    expected = loop.predict(x)
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(loop.predict(x), expected)
        # row order may change the matmul's blocking, hence rounding: each within the formula over the fan-in
        atol = twin_tolerance(np.float32, longest_sum(loop.model_spec, x.shape[1:], len(x)), expected)
        np.testing.assert_allclose(loop.predict(x[::-1]), expected[::-1], rtol=0, atol=atol)


# --- branches, named children, the new leaves and losses, the user's own loss --------------------------
# The torch backend builds the same torch.nn modules as the hand-written twins and runs the same kernels in the
# same order, so everything below is compared bit for bit.

MOMENTUM_SGD = ut.SGD(lr=0.1, momentum=0.9)


def momentum_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=MOMENTUM_SGD.lr, momentum=MOMENTUM_SGD.momentum)


def test_resnet18_state_dict_is_torchvisions():
    loop = TorchLoop(ut.resnet18(), seed=SEED)
    with torch.device("meta"):  # names and shapes only
        model = ResNet18()
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert list(loop.state_dict()) == list(expected)
    assert {key: value.shape for key, value in loop.state_dict().items()} == expected
    assert list(loop.gradients()) == [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize(("num_classes", "shape"), [(10, (1, 28, 28)), (1000, (3, 32, 32))])
def test_resnet18_matches_plain_pytorch(num_classes, shape, torch_single_thread):
    spec = ut.resnet18(num_classes=num_classes, in_channels=shape[0])
    batches = random_batches(shape, num_classes, count=2, batch_size=2)
    loop = TorchLoop(spec, optimizer=MOMENTUM_SGD, seed=SEED)
    model = load_state(ResNet18(num_classes, shape[0]), ut.init_weights(spec, SEED))
    x = torch.from_numpy(batches[0][0])
    with torch.no_grad():
        np.testing.assert_array_equal(loop.predict(batches[0][0]), model.eval()(x).numpy())
    # BatchNorm in training mode; the second step applies momentum
    losses = [float(loop.step(batch)) for batch in batches]
    assert losses == train_torch(model, momentum_sgd(model), batches)
    assert_states_equal(loop.state_dict(), numpy_state(model))
    assert_states_equal(loop.gradients(), {k: p.grad.numpy() for k, p in model.named_parameters()})


def test_lenet_is_the_garment_classifier(mnist_batches, torch_single_thread):
    batches = mnist_batches[:2]
    loop = TorchLoop(ut.lenet(), optimizer=MOMENTUM_SGD, seed=SEED)
    model = load_state(GarmentClassifier(), ut.init_weights(ut.lenet(), SEED))
    assert list(loop.state_dict()) == list(model.state_dict())
    losses = [float(loop.step(batch)) for batch in batches]
    assert losses == train_torch(model, momentum_sgd(model), batches)
    assert_states_equal(loop.state_dict(), numpy_state(model))


def test_resnet18_step_equals_tutorial_sequence(torch_single_thread):
    spec = ut.resnet18(num_classes=10, in_channels=1)
    whole, manual = (TorchLoop(spec, optimizer=MOMENTUM_SGD, seed=SEED) for _ in range(2))
    for x, y in random_batches((1, 28, 28), 10, count=2, batch_size=2):
        expected = whole.step((x, y))
        manual.zero_grad()
        loss = manual.loss(manual.forward(x), y)
        manual.backward(loss)
        manual.update()
        assert loss.item() == expected.item()
    assert_states_equal(whole.state_dict(), manual.state_dict())


@pytest.mark.parametrize("name", sorted(leaf_cases()))
def test_new_leaf_trains_and_evaluates_like_torch_nn(name, torch_single_thread):
    spec, twin, shape = leaf_cases()[name]
    batches = random_batches(shape, classes=3, count=2)
    loop = TorchLoop(spec, optimizer=MOMENTUM_SGD, seed=SEED)
    model = load_state(twin, ut.init_weights(spec, SEED))
    with torch.no_grad():
        np.testing.assert_array_equal(loop.predict(batches[0][0]), model.eval()(torch.from_numpy(batches[0][0])))
    losses = [float(loop.step(batch)) for batch in batches]
    assert losses == train_torch(model, momentum_sgd(model), batches)
    assert_states_equal(loop.state_dict(), numpy_state(model))


def _soft_targets(y):
    """Class probabilities: each row a softmax of standard-normal scores."""
    scores = np.random.default_rng(1).standard_normal((len(y), 5))
    return (np.exp(scores) / np.exp(scores).sum(1, keepdims=True)).astype(np.float32)


def _regression_targets(y):
    return np.random.default_rng(2).uniform(-2, 2, (len(y), 5)).astype(np.float32)


LOSSES = {
    "ce_label_smoothing": (ut.CrossEntropyLoss(label_smoothing=0.1),
                           lambda p, t, r: F.cross_entropy(p, t, reduction=r, label_smoothing=0.1), lambda y: y),
    "ce_soft_targets": (ut.CrossEntropyLoss(reduction="sum", label_smoothing=0.2),
                        lambda p, t, r: F.cross_entropy(p, t, reduction=r, label_smoothing=0.2), _soft_targets),
    "ce_one_hot": (ut.CrossEntropyLoss(), lambda p, t, r: F.cross_entropy(p, t, reduction=r),
                   lambda y: np.eye(5, dtype=np.float32)[y]),
    "nll_after_logsoftmax": (ut.NLLLoss(), lambda p, t, r: F.nll_loss(p, t, reduction=r), lambda y: y),
    "bce": (ut.BCELoss(), lambda p, t, r: F.binary_cross_entropy(p, t, reduction=r),
            lambda y: np.random.default_rng(3).uniform(0, 1, (len(y), 5)).astype(np.float32)),
    "bce_sum_hard_targets": (ut.BCELoss("sum"), lambda p, t, r: F.binary_cross_entropy(p, t, reduction=r),
                             lambda y: np.eye(5, dtype=np.float32)[y]),
    "bce_with_logits": (ut.BCEWithLogitsLoss(), lambda p, t, r: F.binary_cross_entropy_with_logits(p, t, reduction=r),
                        lambda y: np.random.default_rng(3).uniform(0, 1, (len(y), 5)).astype(np.float32)),
    "l1": (ut.L1Loss(reduction="sum"), lambda p, t, r: F.l1_loss(p, t, reduction=r), _regression_targets),
    "smooth_l1": (ut.SmoothL1Loss(beta=0.5), lambda p, t, r: F.smooth_l1_loss(p, t, reduction=r, beta=0.5),
                  _regression_targets),
    "huber": (ut.HuberLoss(reduction="sum", delta=0.7), lambda p, t, r: F.huber_loss(p, t, reduction=r, delta=0.7),
              _regression_targets),
    "custom_tutorial": (ut.CustomLoss(lambda pred, labels: (pred - labels).sum()),
                        lambda p, t, r: (p - t).sum(), _regression_targets),
    # every operation of unitrain.expr, written out in torch below
    "custom_every_op": (
        ut.CustomLoss(lambda pred, target: (
            -(expr.log_softmax(pred, 1) * target).sum(1).mean() + expr.abs(pred - target).mean() / 4
            + (expr.sqrt(expr.square(pred) + 1) * expr.exp(-expr.softmax(pred, -1))).mean(0).sum()
            + 0.5 * expr.maximum(pred, target).sum() - expr.minimum(pred, 0.25).sum() * 0.1
            + expr.log(1 + pred ** 2).mean() + 2 / (3 + target ** 2).sum()
        )),
        lambda p, t, r: (
            -(torch.log_softmax(p, 1) * t).sum(1).mean() + (p - t).abs().mean() / 4
            + ((p.square() + 1).sqrt() * torch.exp(-torch.softmax(p, -1))).mean(0).sum()
            + 0.5 * torch.maximum(p, t).sum() - torch.minimum(p, torch.tensor(0.25)).sum() * 0.1
            + torch.log(1 + p**2).mean() + 2 / (3 + t**2).sum()
        ),
        _soft_targets,
    ),
}  # fmt: skip


#: what a loss takes after the Linear layer: log-probabilities for NLLLoss, probabilities for BCELoss
LOSS_HEADS = {
    ut.NLLLoss: ([ut.LogSoftmax(dim=1)], [nn.LogSoftmax(dim=1)]),
    ut.BCELoss: ([ut.Sigmoid()], [nn.Sigmoid()]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_new_loss_value_and_step_match_torch(name, torch_single_thread):
    loss, functional, target = LOSSES[name]
    head, twin_head = LOSS_HEADS.get(type(loss), ([], []))
    spec = ut.Sequential(ut.Linear(6, 5), *head)
    ((x, labels),) = random_batches((6,), classes=5, count=1)
    y = target(labels)
    loop = TorchLoop(spec, loss=loss, optimizer=MOMENTUM_SGD, seed=SEED)
    model = load_state(nn.Sequential(nn.Linear(6, 5), *twin_head), ut.init_weights(spec, SEED))
    value = loop.step((x, y))
    optimizer = momentum_sgd(model)
    expected = functional(model(torch.from_numpy(x)), torch.from_numpy(y), getattr(loss, "reduction", None))
    expected.backward()
    optimizer.step()
    assert value.item() == expected.item()
    assert_states_equal(loop.state_dict(), numpy_state(model))

    # evaluate: the mean per-sample loss (per element for the elementwise losses), accuracy only for class indices
    metrics = loop.evaluate((x, y))
    with torch.no_grad():
        pred, target_tensor = model(torch.from_numpy(x)), torch.from_numpy(y)
        if isinstance(loss, ut.CustomLoss):  # fn applied to each sample alone
            mean = np.mean([functional(pred[i : i + 1], target_tensor[i : i + 1], None).item() for i in range(len(x))])
        else:
            mean = functional(pred, target_tensor, "mean").item()
    # the core sums per-sample float32 values: rounding of one float32 reduction over the batch's elements
    assert metrics["loss"] == pytest.approx(mean, abs=tolerance(np.float32, size=y.size, expected_scale=abs(mean)))
    # accuracy: of class indices, of class probabilities (argmax), BCE's binary accuracy; NaN for values
    pred = pred.numpy()
    if y.dtype.kind == "i":
        assert metrics["num_correct"] == int((pred.argmax(1) == y).sum())
    elif isinstance(loss, (ut.BCEWithLogitsLoss, ut.BCELoss)):  # a logit's sign, a probability's half
        threshold = 0 if isinstance(loss, ut.BCEWithLogitsLoss) else 0.5
        assert metrics["accuracy"] == ((pred > threshold) == (y > 0.5)).mean()
    elif loss.class_targets:
        assert metrics["accuracy"] == (pred.argmax(1) == y.argmax(1)).mean()
    else:
        assert np.isnan(metrics["accuracy"])
    if not loss.class_targets and not isinstance(loss, (ut.BCEWithLogitsLoss, ut.BCELoss, ut.CustomLoss)):
        errors = pred.astype(np.float64) - y
        for key, expected in (("mse", np.square(errors).mean()), ("mae", np.abs(errors).mean())):
            # float64 means of the same float32 errors, in other orders: the formula over their count
            assert metrics[key] == pytest.approx(expected, rel=0, abs=twin_tolerance(np.float64, errors.size, expected))


class TorchResidualWithDropout(nn.Module):
    """Hand-written twin of ``residual_dropout_spec()``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.downsample = nn.Sequential(nn.Dropout(0.3))
        self.post = nn.Tanh()

    def forward(self, x):
        return self.post(self.drop(self.fc(x)) + self.downsample(x))


def test_dropout_in_both_branches_draws_from_the_loops_stream(torch_single_thread):
    spec = ut.Residual(ut.Sequential({"fc": ut.Linear(6, 6), "drop": ut.Dropout(0.5)}), ut.Sequential(ut.Dropout(0.3)),
                       ut.Tanh())  # fmt: skip
    batches = random_batches((6,), classes=6, count=3)
    loop = TorchLoop(spec, optimizer=MOMENTUM_SGD, seed=SEED)
    model = load_state(TorchResidualWithDropout(), ut.init_weights(spec, SEED))
    assert list(loop.state_dict()) == list(model.state_dict())
    losses = [float(loop.step(batch)) for batch in batches]
    with torch.random.fork_rng():
        torch.manual_seed(SEED)  # the dropout stream of a loop with this seed
        assert losses == train_torch(model, momentum_sgd(model), batches)
    assert_states_equal(loop.state_dict(), numpy_state(model))


@pytest.mark.slow
def test_one_epoch_of_mlp_reaches_90_percent():
    loop = TorchLoop(ut.mlp(), optimizer=ut.SGD(lr=0.01), seed=0)
    (record,) = loop.fit(ut.load_mnist("train"), epochs=1, batch_size=64, shuffle=True, eval_data=ut.load_mnist("test"))
    print(f"torch mlp 1 epoch: accuracy {record['test_accuracy']:.4f}, {record['samples_per_sec']:.0f} samples/s")
    assert record["test_accuracy"] >= 0.90
