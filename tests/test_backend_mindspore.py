"""The MindSpore backend against hand-written plain-PyTorch code (nn.Sequential + torch.optim).

Different kernels make results agree to float32 rounding, not bit for bit: training runs are held
within the drift PyTorch's own float32 loop shows on the same case (torch_reference.drift_tolerances).
Gradients near 1e-8 differ by a few percent between the two frameworks' kernels and Adam divides them
by sqrt(v) + eps ~ 1e-8: the data decides when a ReLU flips, and Adam turns that into an O(lr)
difference, which PyTorch's own float32 run with reversed batches shows as well.
"""

from collections import OrderedDict

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import (
    SEED,
    ResNet18,
    RoundingModel,
    assert_states_close,
    assert_states_equal,
    assert_within_drift,
    bn_spec,
    expected_run,
    load_state,
    network_spec,
    numpy_state,
    random_batches,
    reference,
    steps_tolerance,
    torch_bn,
    torch_layers,
    torch_mlp,
    torch_runs,
    train_torch,
    twin_tolerance,
)
from unitrain.backends.mindspore import MindSporeLoop, _sgd_kernel
from unitrain.conformance.checks import longest_sum
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain import expr

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# bn_spec for 1x10x10 inputs: MindSpore's CPU convolutions are slow
SMALL_BN = {"image_size": 10, "padding": 1}


def forward_tolerance(spec, x, expected):
    """The conformance bound of a float32 forward: the longest sum behind one output, at its scale."""
    return tolerance(np.float32, longest_sum(spec, x.shape[1:], len(x)), float(np.abs(expected).max()))


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
    expected = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=0, atol=forward_tolerance(loop.model_spec, x, expected))


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
    # the whole step returns its gradients rather than storing them: a backward and an update after it
    # still add to and apply them
    for loop in (whole, tutorial):
        loop.backward(loop.loss(loop.forward(x), y))
        loop.update()
    for got, want in [(tutorial.gradients(), whole.gradients()), (tutorial.state_dict(), whole.state_dict())]:
        assert_states_equal(got, want)


@pytest.mark.parametrize(
    ("spec", "fused"),
    [(ut.SGD(lr=0.1), True), (ut.SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01), True),
     (ut.SGD(lr=0.1, momentum=0.9, nesterov=True), True), (ut.SGD(lr=0.1, momentum=0.9, lr_in_velocity=True), False),
     (ut.Adam(eps_placement="before_correction"), False), (ut.RMSprop(), False)],
)  # fmt: skip
def test_fused_sgd_kernel_only_where_it_computes_the_spec(spec, fused):
    param = ms.Parameter(ms.Tensor(np.zeros((2, 3), np.float32)))
    buffers = tuple(ms.Parameter(ms.Tensor(np.zeros((2, 3), np.float32))) for _ in spec.state_names)
    assert (_sgd_kernel(spec, param, buffers, False, {}) is not None) == fused
    assert _sgd_kernel(spec, param, buffers, True, {}) is None  # a momentum a schedule cycles


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
    # a weight's gradient sums the batch's products, each behind the forward's longest sum
    size = longest_sum(loop.model_spec, x.shape[1:], len(x)) + len(x)
    for key, param in model.named_parameters():
        atol = tolerance(np.float32, size, float(np.abs(param.grad.numpy()).max()))
        np.testing.assert_allclose(halves[key], full[key], rtol=0, atol=atol, err_msg=key)
        np.testing.assert_allclose(full[key], param.grad.numpy(), rtol=0, atol=atol, err_msg=key)


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
    expected_loss = F.cross_entropy(expected, torch.from_numpy(y)).item()
    expected = expected.detach().numpy()
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=forward_tolerance(loop.model_spec, x, expected))
    # the mean adds the batch's losses, each behind the forward's longest sum and a log-sum-exp
    size = longest_sum(loop.model_spec, x.shape[1:], len(x)) + len(x) + expected.shape[1]
    assert metrics["loss"] == pytest.approx(expected_loss, rel=0, abs=tolerance(np.float32, size, expected_loss))
    assert metrics["num_correct"] == int((expected.argmax(1) == y).sum())
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


# --- the spec tree, new leaves and losses ----------------------------------------------------


class TorchResidual(nn.Module):
    """Hand-written twin of ``ut.Residual``: ``post(body(x) + downsample(x))``, the body's children
    registered under their own names (as torchvision's BasicBlock), the shortcut as ``downsample``."""

    def __init__(self, body: dict, downsample=None, post=None):
        super().__init__()
        self.body_names = list(body)
        for name, module in body.items():
            self.add_module(name, module)
        self.downsample, self.post = downsample, post

    def forward(self, x):
        y = x
        for name in self.body_names:
            y = getattr(self, name)(y)
        y = y + (x if self.downsample is None else self.downsample(x))
        return y if self.post is None else self.post(y)


def chain(pairs, spec_link, torch_link):
    """Leaves given as (spec, torch twin) pairs, each behind a trainable link layer."""
    specs, modules = [], []
    for spec_leaf, torch_leaf in pairs:
        specs += [spec_link(), spec_leaf]
        modules += [torch_link(), torch_leaf]
    return specs, modules


def vector_leaves():
    """Every new elementwise / normalising leaf on 5 features, each behind a Linear(5, 5)."""
    specs, modules = chain(
        [(ut.Identity(), nn.Identity()), (ut.Tanh(), nn.Tanh()), (ut.Sigmoid(), nn.Sigmoid()),
         (ut.GELU(), nn.GELU()), (ut.GELU(approximate="tanh"), nn.GELU(approximate="tanh")),
         (ut.LeakyReLU(0.2), nn.LeakyReLU(0.2)), (ut.SiLU(), nn.SiLU()), (ut.ELU(alpha=0.5), nn.ELU(alpha=0.5)),
         (ut.LayerNorm(5), nn.LayerNorm(5)),
         (ut.LayerNorm(5, eps=1e-3, elementwise_affine=False), nn.LayerNorm(5, eps=1e-3, elementwise_affine=False)),
         (ut.Softmax(dim=1), nn.Softmax(dim=1)), (ut.LogSoftmax(dim=-1), nn.LogSoftmax(dim=-1))],
        lambda: ut.Linear(5, 5), lambda: nn.Linear(5, 5),
    )  # fmt: skip
    return (ut.Sequential(ut.Linear(6, 5), *specs, ut.Linear(5, 3)),
            nn.Sequential(nn.Linear(6, 5), *modules, nn.Linear(5, 3)), (6,))  # fmt: skip


def conv_leaves():
    """Conv2d with tuple arguments, dilation, groups, depthwise and no bias; LayerNorm over (C, H, W);
    Softmax over channels and LogSoftmax over the last axis of images."""
    return (
        ut.Sequential(
            ut.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),  # -> 4x5x7
            ut.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), ut.LayerNorm((6, 5, 7)),
            ut.Conv2d(6, 6, 3, groups=6, bias=False), ut.Softmax(dim=1),  # -> 6x3x5
            ut.Conv2d(6, 4, 1), ut.LogSoftmax(dim=-1), ut.Flatten(), ut.Linear(60, 3),
        ),
        nn.Sequential(
            nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
            nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), nn.LayerNorm((6, 5, 7)),
            nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.Softmax(dim=1),
            nn.Conv2d(6, 4, 1), nn.LogSoftmax(dim=-1), nn.Flatten(), nn.Linear(60, 3),
        ),
        (2, 9, 9),
    )  # fmt: skip


def pool_leaves():
    """Padded MaxPool2d and AvgPool2d (padding counted and not), AdaptiveAvgPool2d with overlapping bins."""
    return (
        ut.Sequential(
            ut.Conv2d(2, 4, 3, padding=1), ut.MaxPool2d(3, stride=2, padding=1),  # -> 4x6x6
            ut.Conv2d(4, 4, 3, padding=1), ut.AvgPool2d(3, stride=2, padding=1),  # -> 4x3x3
            ut.Conv2d(4, 4, 3, padding=1), ut.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
            ut.AdaptiveAvgPool2d((3, 2)), ut.Flatten(), ut.Linear(24, 3),
        ),
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(3, stride=2, padding=1),
            nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
            nn.AdaptiveAvgPool2d((3, 2)), nn.Flatten(), nn.Linear(24, 3),
        ),
        (2, 12, 12),
    )  # fmt: skip


def residual_tree():
    """Named children, identity and projection shortcuts, a Residual nested in a Residual's body,
    post layers, AvgPool2d's default stride and a global AdaptiveAvgPool2d."""
    inner = ut.Residual(ut.Sequential({"conv": ut.Conv2d(8, 8, 3, padding=1)}), ut.Conv2d(8, 8, 1))
    spec = ut.Sequential({
        "stem": ut.Conv2d(2, 4, 3, padding=1),
        "block1": ut.Residual(ut.Sequential({"conv1": ut.Conv2d(4, 4, 3, padding=1), "bn1": ut.BatchNorm2d(4),
                                             "act": ut.ELU()}), post=ut.GELU()),
        "block2": ut.Residual(ut.Sequential({"conv1": ut.Conv2d(4, 8, 3, stride=2, padding=1),
                                             "bn1": ut.BatchNorm2d(8)}),
                              ut.Sequential(ut.Conv2d(4, 8, 1, stride=2, bias=False), ut.BatchNorm2d(8)), ut.ReLU()),
        "block3": ut.Residual(ut.Sequential({"inner": inner, "act": ut.Tanh()})),
        "pool": ut.AvgPool2d(2), "gap": ut.AdaptiveAvgPool2d(1), "flatten": ut.Flatten(), "fc": ut.Linear(8, 3),
    })  # fmt: skip
    inner = TorchResidual({"conv": nn.Conv2d(8, 8, 3, padding=1)}, nn.Conv2d(8, 8, 1))
    twin = nn.Sequential(OrderedDict({
        "stem": nn.Conv2d(2, 4, 3, padding=1),
        "block1": TorchResidual({"conv1": nn.Conv2d(4, 4, 3, padding=1), "bn1": nn.BatchNorm2d(4), "act": nn.ELU()},
                                post=nn.GELU()),
        "block2": TorchResidual({"conv1": nn.Conv2d(4, 8, 3, stride=2, padding=1), "bn1": nn.BatchNorm2d(8)},
                                nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8)), nn.ReLU()),
        "block3": TorchResidual({"inner": inner, "act": nn.Tanh()}),
        "pool": nn.AvgPool2d(2), "gap": nn.AdaptiveAvgPool2d(1), "flatten": nn.Flatten(), "fc": nn.Linear(8, 3),
    }))  # fmt: skip
    return spec, twin, (2, 8, 8)


def resampling_leaves():
    """ConvTranspose2d (output_padding below and beyond the stride, groups, dilation, no bias), Upsample
    (nearest and bilinear; by a size, integer and fractional scale factors; align_corners) and
    Flatten(start_dim, end_dim)."""
    return (
        ut.Sequential(
            ut.Conv2d(2, 4, 3, padding=1), ut.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
            ut.Upsample(scale_factor=(1.7, 0.6)), ut.Conv2d(6, 4, 3, stride=2),  # -> 4x11x3
            ut.Upsample(size=(9, 12), mode="bilinear", align_corners=True),
            ut.ConvTranspose2d(4, 4, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
            ut.Upsample(scale_factor=1.5, mode="bilinear"), ut.Conv2d(4, 2, 3, stride=3),  # -> 2x9x7
            ut.ConvTranspose2d(2, 2, 3, padding=2, output_padding=1, dilation=2),  # output_padding >= stride
            ut.ConvTranspose2d(2, 2, 3, output_padding=1, dilation=2), ut.Upsample(scale_factor=2),  # ... > padding
            ut.Upsample(scale_factor=(1.5, 0.5), mode="bilinear", align_corners=True), ut.Upsample(scale_factor=0.5),
            ut.Flatten(1, 2), ut.Flatten(), ut.Linear(44 * 6, 3),
        ),
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
            nn.Upsample(scale_factor=(1.7, 0.6)), nn.Conv2d(6, 4, 3, stride=2),
            nn.Upsample(size=(9, 12), mode="bilinear", align_corners=True),
            nn.ConvTranspose2d(4, 4, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
            nn.Upsample(scale_factor=1.5, mode="bilinear"), nn.Conv2d(4, 2, 3, stride=3),
            nn.ConvTranspose2d(2, 2, 3, padding=2, output_padding=1, dilation=2),
            nn.ConvTranspose2d(2, 2, 3, output_padding=1, dilation=2), nn.Upsample(scale_factor=2),
            nn.Upsample(scale_factor=(1.5, 0.5), mode="bilinear", align_corners=True), nn.Upsample(scale_factor=0.5),
            nn.Flatten(1, 2), nn.Flatten(), nn.Linear(44 * 6, 3),
        ),
        (2, 7, 7),
    )  # fmt: skip


@pytest.mark.parametrize("model", [vector_leaves, conv_leaves, pool_leaves, residual_tree, resampling_leaves])
def test_new_leaves_and_branches_train_like_torch(model):
    """Every new leaf, grouped into four models (one MindSpore compilation each): eval outputs, then
    two SGD-momentum steps (BatchNorm in training mode) from the same weights, against torch.nn."""
    spec, twin, shape = model()
    loop = MindSporeLoop(spec, optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=SEED)
    assert list(loop.state_dict()) == list(twin.state_dict())
    load_state(twin, loop.state_dict())
    batches = random_batches(shape, 3, 2)
    x = batches[0][0]
    expected = twin.eval()(torch.from_numpy(x)).detach().numpy()
    # float32 here and in torch.nn: each within the formula over the forward's longest sum
    forward = twin_tolerance(np.float32, longest_sum(spec, x.shape[1:], len(x)), expected)
    np.testing.assert_allclose(loop.predict(x), expected, rtol=0, atol=forward)
    for batch in batches:
        loop.step(batch)
    train_torch(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), batches)
    atol = steps_tolerance(spec, batches, np.float32, loss_size=3)  # + the softmax over 3 classes
    assert_states_close(loop.state_dict(), numpy_state(twin), rtol=0, atol=atol, scale_atol=True)


REGRESSION = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
PROBABILITIES = np.random.default_rng(2).dirichlet(np.ones(5), 6).astype(np.float32)
LOSS_CASES = {
    "ce_smoothing_indices": (ut.CrossEntropyLoss(label_smoothing=0.1), np.array([0, 3, 2, 4, 1, 3]),
                             lambda p, t: F.cross_entropy(p, t, label_smoothing=0.1)),
    "ce_probabilities": (ut.CrossEntropyLoss(), PROBABILITIES, F.cross_entropy),
    "ce_probabilities_smoothing_sum": (ut.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"), PROBABILITIES,
                                       lambda p, t: F.cross_entropy(p, t, label_smoothing=0.2, reduction="sum")),
    "nll_after_logsoftmax": (ut.NLLLoss(), np.array([1, 1, 0, 4, 2, 3]), lambda p, t: F.nll_loss(p.log_softmax(1), t)),
    "bce_with_logits": (ut.BCEWithLogitsLoss(), (REGRESSION > 0).astype(np.float32),
                        F.binary_cross_entropy_with_logits),
    "bce": (ut.BCELoss(), (REGRESSION > 0).astype(np.float32), lambda p, t: F.binary_cross_entropy(p.sigmoid(), t)),
    "bce_soft_targets_sum": (ut.BCELoss(reduction="sum"), PROBABILITIES,
                             lambda p, t: F.binary_cross_entropy(p.sigmoid(), t, reduction="sum")),
    "l1_sum": (ut.L1Loss(reduction="sum"), REGRESSION, lambda p, t: F.l1_loss(p, t, reduction="sum")),
    "smooth_l1": (ut.SmoothL1Loss(beta=0.5), REGRESSION, lambda p, t: F.smooth_l1_loss(p, t, beta=0.5)),
    "smooth_l1_beta0": (ut.SmoothL1Loss(beta=0.0), REGRESSION, lambda p, t: F.smooth_l1_loss(p, t, beta=0.0)),
    "huber": (ut.HuberLoss(delta=0.5), REGRESSION, lambda p, t: F.huber_loss(p, t, delta=0.5)),
    "custom_tutorial": (ut.CustomLoss(lambda pred, labels: (pred - labels).sum()), REGRESSION,
                        lambda p, t: (p - t).sum()),
    "custom_every_op": (
        ut.CustomLoss(lambda p, t: (expr.maximum(abs(p - t) ** 2, 0.1) / 2 - expr.log_softmax(p, 1).mean(0).sum()
                                    + expr.sqrt(expr.square(t) + 1) * expr.softmax(p, -1) + expr.exp(-p) * 0.1
                                    - expr.log(10 + expr.minimum(p, t)) + (-p).sum(1).mean()).mean()),
        REGRESSION,
        lambda p, t: (torch.maximum(abs(p - t) ** 2, torch.tensor(0.1)) / 2 - p.log_softmax(1).mean(0).sum()
                      + torch.sqrt(t.square() + 1) * p.softmax(-1) + torch.exp(-p) * 0.1
                      - torch.log(10 + torch.minimum(p, t)) + (-p).sum(1).mean()).mean()),
}  # fmt: skip


@pytest.mark.parametrize("case", LOSS_CASES)
def test_losses_match_torch(case):
    """Each new loss (and a CustomLoss using every operation): value and one SGD-momentum step."""
    loss, y, torch_loss = LOSS_CASES[case]
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    # NLLLoss takes log-probabilities, BCELoss probabilities (torch_loss applies the same to the Linear's output)
    head = {ut.NLLLoss: [ut.LogSoftmax(dim=1)], ut.BCELoss: [ut.Sigmoid()]}.get(type(loss), [])
    spec = ut.Sequential(ut.Linear(4, 5), *head)
    loop = MindSporeLoop(spec, loss=loss, optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=SEED)
    model = load_state(nn.Sequential(nn.Linear(4, 5)), loop.state_dict())
    value = float(loop.step((x, y)))
    expected = torch_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
    # float32 here and in torch: the 4-input layer, then the reduction over the batch's 30 outputs after
    # a softmax over 5 of them
    loss_size = y.size + 5
    allowed = twin_tolerance(np.float32, longest_sum(spec, x.shape[1:], len(x)) + loss_size, expected.item())
    assert abs(value - expected.item()) <= allowed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    expected.backward()
    optimizer.step()
    atol = steps_tolerance(spec, [(x, y)], np.float32, loss_size=loss_size)
    assert_states_close(loop.state_dict(), numpy_state(model), rtol=0, atol=atol, scale_atol=True)


def test_resnet18_matches_plain_pytorch():
    """unitrain.resnet18(): torchvision's keys and shapes; eval logits and one SGD-momentum step with
    BatchNorm in training mode against tests/torch_reference.py's ResNet-18, on two 3x40x40 images (the
    last stage still sees 2x2 per image: at 1x1, BatchNorm over two values amplifies rounding beyond
    any float32 bound, for torch in float32 against float64 too)."""
    x = np.random.default_rng(127).standard_normal((2, 3, 40, 40)).astype(np.float32)
    y = np.array([3, 7])
    loop = MindSporeLoop(ut.resnet18(num_classes=10), optimizer=ut.SGD(lr=0.01, momentum=0.9), seed=SEED)
    state = loop.state_dict()
    assert {key: value.shape for key, value in state.items()} == {
        key: tuple(value.shape) for key, value in ResNet18(num_classes=10).state_dict().items()
    }
    logits = loop.predict(x)
    loop.step((x, y))
    results = {}
    for dtype in (torch.float32, torch.float64):
        model = load_state(ResNet18(num_classes=10), state).to(dtype)
        eval_logits = model.eval()(torch.from_numpy(x).to(dtype)).detach().numpy()
        train_torch(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), [(x, y)])
        state_after = {key: value.double().numpy() for key, value in model.state_dict().items()}
        results[dtype] = eval_logits, state_after
    (logits32, state32), (logits64, state64) = results[torch.float32], results[torch.float64]
    # The case is chosen (input seed 127) so that the training step's every ReLU input and max pool
    # tie lies many rounding scales from flipping, on any CPU (RoundingModel; seed 4, used before,
    # has a ReLU input 0.5 scales from zero): where rounding flips one, two float32 runs differ by
    # that unit's whole gradient contribution, which no rounding bound covers.
    for name, index, margin in RoundingModel(
        load_state(ResNet18(num_classes=10), state), torch.from_numpy(x)
    ).margins():
        assert margin > RoundingModel.MARGIN, f"{name} call {index}: {margin:.1f} rounding scales from flipping"

    # Tolerances derived from torch's own float32 rounding on this case: torch in float32 lies d from
    # float64; MindSpore's float32 kernels round as much but in another order, so it may lie d on the
    # other side (2d), doubled for the summation orders' spread: 4d.
    def distance(a, b):
        return max(float(np.abs(a[key] - b[key]).max()) for key in b)

    assert np.abs(logits - logits64).max() <= 4 * np.abs(logits32 - logits64).max()
    trained = {key: value.astype(np.float64) for key, value in loop.state_dict().items()}
    assert distance(trained, state64) <= 4 * distance(state32, state64)


def test_tutorial_step_equals_step_through_branches():
    """A Residual as the whole model, with Dropout in its body, shortcut and post and BatchNorm in
    the body: the tutorial-shaped step reuses forward's masks and equals step() bit for bit."""
    spec = ut.Residual(
        ut.Sequential({"fc": ut.Linear(6, 6), "bn": ut.BatchNorm1d(6), "drop": ut.Dropout(0.3), "act": ut.ReLU()}),
        ut.Sequential(ut.Dropout(0.5), ut.Linear(6, 6)),
        ut.Sequential(ut.Dropout(0.2), ut.LayerNorm(6)),
    )
    whole, tutorial = (MindSporeLoop(spec, optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=SEED) for _ in range(2))
    assert list(whole.state_dict())[:3] == ["fc.weight", "fc.bias", "bn.weight"]
    for x, y in random_batches((6,), 6, 3):
        assert float(whole.step((x, y))) == float(tutorial_step(tutorial, x, y))
    for got, want in [(tutorial.state_dict(), whole.state_dict()), (tutorial.gradients(), whole.gradients()),
                      (tutorial.optimizer_state_dict(), whole.optimizer_state_dict()),
                      (tutorial.random_state(), whole.random_state())]:  # fmt: skip
        assert_states_equal(got, want)
    assert whole.state_dict()["bn.num_batches_tracked"] == 3


@pytest.mark.slow
def test_one_epoch_mlp_reaches_90_percent():
    loop = MindSporeLoop(ut.mlp(), optimizer=ut.SGD(lr=0.01), seed=0)
    history = loop.fit(ut.load_mnist("train"), epochs=1, batch_size=64, eval_data=ut.load_mnist("test"))
    print(history)
    assert history[0]["test_accuracy"] >= 0.90
