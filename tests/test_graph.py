"""Graph models (unitrain.graph) trained on the NumPy and PyTorch backends against the same models
written by hand in plain PyTorch: an Inception-style block, an autoencoder whose encoder is used
alone, a model with two inputs, one with two outputs (a loss on each) and one with tied weights.

Each case trains 20 SGD steps. In float64 the run must match PyTorch's float64 loop within the
conformance formula (the equations); in float32 within sqrt(n) times the drift PyTorch's own float32
loop shows on the case (torch_reference.drift_tolerances), n bounding the longest sum of one step:
the batch's elements of the largest value the graph computes (a conv weight gradient adds batch x
output pixels terms, a Linear's adds batch terms or its inputs, a mean loss all output elements).
The PyTorch backend runs the same kernels in the same order as the hand-written module, so there
its float32 run is compared bit for bit.
"""

import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import installed_backends
from torch import nn
from torch_reference import (
    assert_states_equal,
    assert_within_drift,
    expected_run,
    listed_once,
    load_state,
    torch_output,
    torch_runs,
)
from unitrain.backends.numpy import NumpyLoop
from unitrain.backends.torch import TorchLoop
from unitrain.conformance.tolerances import tolerance

import unitrain
from unitrain import expr, ops
from unitrain import layers as L
from unitrain.data import ArrayDataset
from unitrain.graph import Graph, Input, Node, from_dict, to_dict
from unitrain.loop import InputError
from unitrain.losses import CrossEntropyLoss, CustomLoss, MSELoss, PerOutputLoss
from unitrain.optim import SGD
from unitrain.registry import get_backend
from unitrain.sequences import Embedding
from unitrain.weights import init_weights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

STEPS, BATCH, LR, MOMENTUM = 20, 8, 0.05, 0.9
BACKENDS = installed_backends()
# MindSpore compiles each loop's step (seconds per case on two cores): its runs here are `slow`;
# the conformance suite's graph checks cover its graphs in the quick suite
BACKEND_PARAMS = [pytest.param(name, marks=pytest.mark.slow) if name == "mindspore" else name for name in BACKENDS]


def loop_class(name, dtype="float32"):
    """The backend's loop; a dtype it lacks (MindSpore: float64) skips the test."""
    backend = get_backend(name)
    if dtype == "float64" and "float64" not in backend.capabilities:
        pytest.skip(f"the {name} backend has no float64")
    return backend


# --- the cases: a unitrain graph and its hand-written PyTorch twin ---------------------------------


def inception():
    x = Input((4, 8, 8))
    b1 = L.Conv2d(4, 4, 1)
    b2 = L.Sequential(L.Conv2d(4, 4, 1), L.ReLU(), L.Conv2d(4, 4, 3, padding=1))
    b3 = L.Sequential(L.Conv2d(4, 2, 1), L.ReLU(), L.Conv2d(2, 2, 5, padding=2))
    b4 = L.Sequential(L.MaxPool2d(3, stride=1, padding=1), L.Conv2d(4, 2, 1))
    fc = L.Linear(12, 3)
    y = ops.cat([b1(x), b2(x), b3(x), b4(x)], dim=1).relu()
    return Graph(x, fc(y.mean((2, 3))), {"branch1": b1, "branch2": b2, "branch3": b3, "branch4": b4, "fc": fc})


class TorchInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch1 = nn.Conv2d(4, 4, 1)
        self.branch2 = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.branch3 = nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(4, 2, 1))
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        y = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1).relu()
        return self.fc(y.mean((2, 3)))


def autoencoder():
    x = Input((1, 6, 6), name="image")
    encoder = L.Sequential(L.Flatten(), L.Linear(36, 8), L.ReLU())
    decoder = L.Sequential(L.Linear(8, 36), L.Sigmoid())
    return Graph(x, decoder(encoder(x)).reshape(-1, 1, 6, 6), {"encoder": encoder, "decoder": decoder})


class TorchAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(8, 36), nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x)).reshape(-1, 1, 6, 6)


def two_inputs():
    a, b = Input((6,), name="a"), Input((4,), name="b")
    fc1, fc2 = L.Linear(10, 16), L.Linear(16, 3)
    return Graph([a, b], fc2(fc1(ops.cat([a, b], dim=1)).relu()), {"fc1": fc1, "fc2": fc2})


class TorchTwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, a, b):
        return self.fc2(F.relu(self.fc1(torch.cat([a, b], 1))))


def two_outputs():
    x = Input((8,))
    trunk, head1, head2 = L.Linear(8, 16), L.Linear(16, 3), L.Linear(16, 2)
    h = ops.tanh(trunk(x))
    return Graph(x, [head1(h), head2(h)], {"trunk": trunk, "head1": head1, "head2": head2})


class TorchTwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.head1, self.head2 = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.head1(h), self.head2(h)


def tied():
    x = Input((8,))
    shared, fc = L.Linear(8, 8), L.Linear(8, 3)
    h = shared(ops.tanh(shared(ops.tanh(shared(x)))))
    return Graph(x, fc(h), {"shared": shared, "fc": fc})


class TorchTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.fc = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.shared(torch.tanh(self.shared(torch.tanh(self.shared(x))))))


def tied_embedding():
    """The word language model's ``tie_weights``: the output layer's weight is the embedding table."""
    tokens = Input((5,), name="tokens")
    encoder, hidden, decoder = Embedding(10, 6), L.Linear(6, 6), L.Linear(6, 10)
    h = ops.tanh(hidden(encoder(tokens).mean(1)))
    modules = {"encoder": encoder, "hidden": hidden, "decoder": decoder}
    return Graph(tokens, decoder(h), modules, tied={"decoder.weight": "encoder.weight"})


class TorchTiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.hidden, self.decoder = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10)
        self.decoder.weight = self.encoder.weight
        listed_once(self)

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.hidden(self.encoder(tokens).mean(1))))


def three_outputs():
    """A VAE's shape without its noise: the reconstruction, the code's mean and its log-variance."""
    x = Input((12,))
    encoder, mean, log_variance, decoder = L.Linear(12, 8), L.Linear(8, 3), L.Linear(8, 3), L.Linear(3, 12)
    h = ops.tanh(encoder(x))
    mu = mean(h)
    modules = {"encoder": encoder, "mean": mean, "log_variance": log_variance, "decoder": decoder}
    return Graph(x, [ops.sigmoid(decoder(mu)), mu, log_variance(h)], modules)


class TorchThreeOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.mean, self.log_variance = nn.Linear(12, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.decoder = nn.Linear(3, 12)

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        mu = self.mean(h)
        return torch.sigmoid(self.decoder(mu)), mu, self.log_variance(h)


def _vae_loss(pred, target, log=expr.log, exp=expr.exp):
    """pytorch/examples' VAE loss, written once for unitrain's CustomLoss and for torch: the
    reconstruction's binary cross-entropy (summed) plus the KL term of the two other outputs."""
    recon, mu, logvar = pred[0], pred[1], pred[2]
    bce = -(target * log(recon) + (1 - target) * log(1 - recon)).sum()
    return bce - 0.5 * (1 + logvar - mu**2 - exp(logvar)).sum()


def _two_losses(outputs, targets):
    return F.cross_entropy(outputs[0], targets[0]) + F.mse_loss(outputs[1], targets[1])


def _half_squares(pred, target):  # the user's own loss, written once for unitrain's CustomLoss and torch
    return ((pred - target) ** 2).mean() * 0.5


def _custom_second(outputs, targets):
    return F.cross_entropy(outputs[0], targets[0]) + _half_squares(outputs[1], targets[1])


# name: (graph, torch twin, per-sample input shapes, targets ("classes", "input", or "two"), loss, criterion)
CASES = {
    "inception": (inception, TorchInception, [(4, 8, 8)], "classes", CrossEntropyLoss(), F.cross_entropy),
    "autoencoder": (autoencoder, TorchAutoencoder, [(1, 6, 6)], "input", MSELoss(), F.mse_loss),
    "two-inputs": (two_inputs, TorchTwoInputs, [(6,), (4,)], "classes", CrossEntropyLoss(), F.cross_entropy),
    "two-outputs": (two_outputs, TorchTwoOutputs, [(8,)], "two", PerOutputLoss(CrossEntropyLoss(), MSELoss()),
                    _two_losses),
    "tied": (tied, TorchTied, [(8,)], "classes", CrossEntropyLoss(), F.cross_entropy),
    "tied-embedding": (tied_embedding, TorchTiedEmbedding, [(5,)], "classes", CrossEntropyLoss(), F.cross_entropy),
    "custom-per-output": (two_outputs, TorchTwoOutputs, [(8,)], "two",
                          PerOutputLoss(CrossEntropyLoss(), CustomLoss(_half_squares)), _custom_second),
    "loss-over-outputs": (three_outputs, TorchThreeOutputs, [(12,)], "input", CustomLoss(_vae_loss),
                          functools.partial(_vae_loss, log=torch.log, exp=torch.exp)),
}  # fmt: skip


UNET_LAYERS = hasattr(L, "ConvTranspose2d") and hasattr(L, "Upsample")


def unet():
    """Two down blocks, two up blocks (one ConvTranspose2d, one Upsample) and skip concatenations."""
    x = Input((1, 8, 8))
    down1 = L.Sequential(L.Conv2d(1, 4, 3, padding=1), L.ReLU())
    down2 = L.Sequential(L.MaxPool2d(2), L.Conv2d(4, 8, 3, padding=1), L.ReLU())
    bottom = L.Sequential(L.MaxPool2d(2), L.Conv2d(8, 8, 3, padding=1), L.ReLU())
    up1, up2 = L.ConvTranspose2d(8, 8, 2, stride=2), L.Upsample(scale_factor=2, mode="nearest")
    conv1 = L.Sequential(L.Conv2d(16, 8, 3, padding=1), L.ReLU())
    conv2 = L.Sequential(L.Conv2d(12, 4, 3, padding=1), L.ReLU(), L.Conv2d(4, 2, 1))
    d1 = down1(x)
    d2 = down2(d1)
    u1 = conv1(ops.cat([up1(bottom(d2)), d2], dim=1))
    out = conv2(ops.cat([up2(u1), d1], dim=1))
    modules = {"down1": down1, "down2": down2, "bottom": bottom, "up1": up1, "conv1": conv1, "up2": up2, "conv2": conv2}
    return Graph(x, out, modules)


class TorchUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv2 = nn.Sequential(nn.Conv2d(12, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(d1)
        u1 = self.conv1(torch.cat([self.up1(self.bottom(d2)), d2], 1))
        return self.conv2(torch.cat([self.up2(u1), d1], 1))


def tied_transposed():
    """A tied autoencoder: the decoder computes with the encoder's weight transposed (named as
    ``from_torch`` names the functional call it imports it from)."""
    x = Input((8,))
    encoder, decoder = L.Linear(8, 3), L.Linear(3, 8, bias=False)
    return Graph(x, ops.sigmoid(decoder(ops.tanh(encoder(x)))), {"encoder": encoder, "linear": decoder},
                 tied={"linear.weight": "encoder.weight.T"})  # fmt: skip


class TorchTiedTransposed(nn.Module):
    """As tied autoencoders are written in PyTorch: ``F.linear`` with the encoder's weight transposed."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 3)

    def forward(self, x):
        return torch.sigmoid(F.linear(torch.tanh(self.encoder(x)), self.encoder.weight.t()))


def tied_conv_transpose():
    """A convolutional autoencoder whose decoder is its encoder's transpose: ``ConvTranspose2d(4, 2)``
    holds its weight ``(4, 2, 3, 3)`` as ``Conv2d(2, 4)`` does, so the tie is the weight itself."""
    x = Input((2, 6, 6))
    encoder = L.Conv2d(2, 4, 3, stride=2, padding=1)
    decoder = L.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
    return Graph(x, decoder(ops.tanh(encoder(x))), {"encoder": encoder, "decoder": decoder},
                 tied={"decoder.weight": "encoder.weight"})  # fmt: skip


class TorchTiedConvTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.decoder = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.decoder.weight = self.encoder.weight
        listed_once(self)

    def forward(self, x):
        return self.decoder(torch.tanh(self.encoder(x)))


CASES["tied-transposed"] = (tied_transposed, TorchTiedTransposed, [(8,)], "input", MSELoss(), F.mse_loss)
if UNET_LAYERS:  # ConvTranspose2d and Upsample come from another branch; the case joins CASES once they exist
    CASES["unet"] = (unet, TorchUNet, [(1, 8, 8)], "pixels", MSELoss(), F.mse_loss)
    CASES["tied-conv-transpose"] = (tied_conv_transpose, TorchTiedConvTranspose, [(2, 6, 6)], "input", MSELoss(),
                                    F.mse_loss)  # fmt: skip


def batches_for(case):
    _, _, shapes, targets, _, _ = CASES[case]
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(STEPS):
        if case == "tied-embedding":  # token ids
            xs = tuple(rng.integers(0, 10, (BATCH, *shape)) for shape in shapes)
        else:
            xs = tuple(rng.random((BATCH, *shape)).astype(np.float32) for shape in shapes)
        x = xs[0] if len(xs) == 1 else xs
        classes = rng.integers(0, 3, BATCH)
        y = {"classes": classes, "input": xs[0], "two": (classes, rng.random((BATCH, 2)).astype(np.float32)),
             "pixels": rng.random((BATCH, 2, 8, 8)).astype(np.float32)}  # fmt: skip
        batches.append((x, y[targets]))
    return batches


def longest_sum(model):
    """The batch's elements of the largest value the graph computes (see the module doc)."""
    largest = max(math.prod(shape) for shape in (*model.shapes.values(), *model.input_shapes))
    return BATCH * largest


def _cast(value, dtype):
    if isinstance(value, tuple):
        return tuple(_cast(part, dtype) for part in value)
    return value.astype(dtype) if value.dtype.kind == "f" else value


@functools.cache
def _torch_runs(case):
    """The hand-written runs from the weights every backend starts from (init_weights, seed 0)."""
    make, twin, _, _, _, criterion = CASES[case]
    initial = init_weights(make(), 0)
    return torch_runs(
        lambda dtype: load_state(twin().to(dtype), initial),
        lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=False),
        batches_for(case),
        criterion=criterion,
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_graph_trains_as_plain_pytorch(case, backend, dtype):
    make, twin, _, _, loss, _ = CASES[case]
    model = make()
    loop = loop_class(backend, dtype)(model, loss=loss, optimizer=SGD(lr=LR, momentum=MOMENTUM), dtype=dtype)
    initial = loop.state_dict()
    assert list(initial) == list(twin().state_dict())  # PyTorch's keys, in its order; a tied weight once
    runs = _torch_runs(case)
    expected, tolerances = expected_run(runs, dtype, size=longest_sum(model))
    losses = {"loss": np.array([float(loop.step(_cast(batch, dtype))) for batch in batches_for(case)])}
    assert_within_drift(losses, expected.losses, tolerances.losses)
    assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
    if backend == "torch" and dtype == "float32":  # the same kernels in the same order: the same bits
        assert_states_equal(loop.state_dict(), expected.state)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_trained_encoder_is_evaluated_and_saved_alone(tmp_path, backend):
    loop = loop_class(backend)(autoencoder(), loss=MSELoss(), optimizer=SGD(lr=LR, momentum=MOMENTUM))
    for batch in batches_for("autoencoder"):
        loop.step(batch)
    encoder = loop.submodule("encoder")
    state = loop.state_dict()
    assert_states_equal(encoder.state_dict(), {key: state[f"encoder.{key}"] for key in ("1.weight", "1.bias")})
    x = batches_for("autoencoder")[0][0]
    twin = load_state(TorchAutoencoder().encoder, encoder.state_dict())
    expected, tolerances = torch_output(twin, x)
    assert_within_drift({"out": encoder.predict(x)}, expected, tolerances)
    encoder.save_weights(tmp_path / "encoder.safetensors")
    again = TorchLoop(loop.model_spec.encoder)
    again.load_weights(tmp_path / "encoder.safetensors")
    assert_states_equal(again.state_dict(), encoder.state_dict())
    assert loop.state_dict().keys() == state.keys()  # the autoencoder's loop is unchanged


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_several_inputs_and_outputs_through_the_loop(backend):
    """Tuple or dict inputs, tuple targets, fit/evaluate/predict and the tutorial-shaped step."""
    backend = loop_class(backend)
    loop = backend(two_inputs(), optimizer=SGD(lr=LR))
    (a, b), y = batches_for("two-inputs")[0]
    assert loop.predict((a, b)).shape == (BATCH, 3)
    np.testing.assert_array_equal(loop.predict({"b": b, "a": a}), loop.predict((a, b)))
    history = loop.fit(ArrayDataset((a, b), y), epochs=2, batch_size=3)
    assert [record["steps"] for record in history] == [3, 6] and "train_accuracy" in history[0]
    assert 0 <= loop.evaluate(((a, b), y))["accuracy"] <= 1
    two = backend(two_outputs(), loss=PerOutputLoss(CrossEntropyLoss(), MSELoss()))
    x, targets = batches_for("two-outputs")[0]
    two.zero_grad()
    loss = two.loss(two.forward(x), targets)
    two.backward(loss)
    two.update()
    logits, values = two.predict(x)
    assert logits.shape == (BATCH, 3) and values.shape == (BATCH, 2)
    assert math.isfinite(two.evaluate((x, targets))["loss"])
    with pytest.raises(InputError, match="targets must be a tuple of 2 arrays"):
        two.step((x, targets[0]))
    with pytest.raises(InputError, match=r"inputs must have the keys \['a', 'b'\]"):
        loop.predict({"a": a})


def test_a_custom_loss_per_output_evaluates_per_sample():
    """evaluate's loss: cross-entropy per sample plus the CustomLoss's mean over samples of its value on each."""
    loop = NumpyLoop(two_outputs(), loss=CASES["custom-per-output"][4], dtype="float64")
    x, (classes, values) = _cast(batches_for("two-outputs")[0], "float64")
    logits, predicted = loop.predict(x)
    expected = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(classes)))
    expected += np.mean([_half_squares(predicted[i : i + 1], values[i : i + 1]) for i in range(len(x))])
    # the same float64 outputs; each side's losses add a softmax over 3 classes, 2 squares, the batch's samples
    allowed = 2 * tolerance(np.float64, 3 + values.shape[1] + len(classes), expected)
    assert loop.evaluate((x, (classes, values)))["loss"] == pytest.approx(expected, rel=0, abs=allowed)


def test_a_custom_loss_over_several_outputs_evaluates_per_sample_and_checks_what_it_reads():
    loop = NumpyLoop(three_outputs(), loss=CASES["loss-over-outputs"][4], dtype="float64")
    x, y = _cast(batches_for("loss-over-outputs")[0], "float64")
    pred = loop.predict(x)
    rows = [(tuple(torch.from_numpy(part[i : i + 1]) for part in pred), torch.from_numpy(y[i : i + 1]))
            for i in range(len(x))]  # fmt: skip
    expected = np.mean([float(_vae_loss(p, t, torch.log, torch.exp)) for p, t in rows])
    assert loop.evaluate((x, y))["loss"] == pytest.approx(expected, rel=1e-12)
    for loss, model, message in (
        (CustomLoss(_half_squares), three_outputs(), r"^CustomLoss reads pred whole, but the model has 3 outputs: "
                                                     r"write pred\[0\] to pred\[2\]$"),
        (CustomLoss(lambda p, t: (p[3] - t).sum()), three_outputs(), r"^CustomLoss reads pred\[3\], but the model"),
        (CustomLoss(lambda p, t: (p[1] - t).sum()), tied(), r"^CustomLoss reads pred\[1\], but the model has one "
                                                            r"output: write pred$"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            NumpyLoop(model, loss=loss)
    with pytest.raises(InputError, match=r"CustomLoss on outputs of shapes \[\(8, 12\), \(8, 3\), \(8, 3\)\], "
                                         r"targets \(8, 5\): "):  # fmt: skip
        loop.step((x, y[:, :5]))
    with pytest.raises(TypeError, match=r"only pred\[i\] and target\[i\] index"):
        CustomLoss(lambda p, t: (p[0][1] - t).sum())


def test_multi_output_evaluate_is_the_sum_of_each_output_loss():
    loop = NumpyLoop(two_outputs(), loss=PerOutputLoss(CrossEntropyLoss(), MSELoss()), dtype="float64")
    x, (classes, values) = _cast(batches_for("two-outputs")[0], "float64")
    logits, predicted = loop.predict(x)
    twin = (torch.from_numpy(logits), torch.from_numpy(predicted))
    expected = float(_two_losses(twin, (torch.from_numpy(classes), torch.from_numpy(values))))
    # the same float64 outputs; the losses add a softmax over 3 classes and the batch's samples, every value
    allowed = 2 * tolerance(np.float64, 3 + len(classes) + values.size, expected)
    assert loop.evaluate((x, (classes, values)))["loss"] == pytest.approx(expected, rel=0, abs=allowed)


# --- the spec: construction, refusals, serialisation ------------------------------------------------


def test_node_list_and_round_trip():
    model = inception()
    assert [node.op for node in model.nodes].count("call_module") == 5
    assert str(model).splitlines()[0] == "%input = input[4, 8, 8]"
    data = json.loads(json.dumps(model.to_dict()))
    again = from_dict(data)
    assert again == model and again.state_shapes() == model.state_shapes()
    assert model.branch2 is model.get_submodule("branch2")
    assert model.get_submodule("branch2.2") == L.Conv2d(4, 4, 3, padding=1)
    assert model.output_shape((4, 8, 8)) == (3,)
    assert model.output_shape((4, 16, 16)) == (3,)  # shapes re-inferred for another input size


@pytest.mark.parametrize("name", ["mlp", "cnn", "lenet", "resnet18"])
def test_every_preset_round_trips_through_json(name):
    model = getattr(L, name)()
    again = from_dict(json.loads(json.dumps(to_dict(model))))
    assert again == model and list(again.state_shapes()) == list(model.state_shapes())


def test_tied_weights_round_trip_and_are_listed_once():
    model = tied_embedding()
    again = from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model and again.tied == (("decoder.weight", "encoder.weight"),)
    assert list(model.state_shapes()) == ["encoder.weight", "hidden.weight", "hidden.bias", "decoder.bias"]
    assert list(init_weights(model, 0)) == list(model.state_shapes())


def test_a_transposed_tie_round_trips_imports_and_goes_to_torch():
    model = tied_transposed()
    again = from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model and again.tied == (("linear.weight", "encoder.weight.T"),)
    assert list(model.state_shapes()) == ["encoder.weight", "encoder.bias"]  # the weight once, as PyTorch's
    twin = TorchTiedTransposed()
    imported = unitrain.from_torch(twin, torch.rand(2, 8))
    assert str(imported).replace("%x", "%input") == str(model) and imported.tied == model.tied
    assert list(imported.initial_state) == list(twin.state_dict())
    module = unitrain.to_torch(imported)
    assert list(module.state_dict()) == list(twin.state_dict())  # the decoder computes with encoder.weight.t()
    x = torch.rand(4, 8)
    torch.testing.assert_close(module(x), twin(x), rtol=0, atol=0)


def test_from_torch_maps_a_convolution_tied_to_a_transposed_one():
    module = TorchTiedConvTranspose()
    graph = unitrain.from_torch(module, torch.rand(2, 2, 6, 6))
    spec = tied_conv_transpose()
    assert graph.tied == spec.tied and graph.children == spec.children
    assert str(graph).replace("%x", "%input") == str(spec)  # the same nodes, the input named as forward names it
    assert list(graph.initial_state) == list(module.state_dict()) == ["encoder.weight", "encoder.bias", "decoder.bias"]
    back = unitrain.to_torch(graph)
    assert back.decoder.weight is back.encoder.weight  # one Parameter again, as the module's
    x = torch.rand(3, 2, 6, 6)
    torch.testing.assert_close(back(x), module(x), rtol=0, atol=0)


def tie(tied, kind=L.Linear, shape=(4,)):
    x, first, second = Input(shape), kind(4, 4), kind(4, 4)
    return Graph(x, second(first(x)), {"first": first, "second": second}, tied=tied)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: tie({"second.weight": "first.scale"}),
         r"^Graph: tied 'first.scale' is not a parameter of the graph; expected one of \['first.weight', "),
        (lambda: tie({"first.weight": "second.weight"}),
         r"^Graph: tied 'first.weight' comes before its source 'second.weight' in the state_dict; register the "
         r"source's module first"),
        (lambda: tie({"second.weight": "first.bias"}),
         r"^Graph: tied 'second.weight' has shape \(4, 4\), 'first.bias' has \(4,\); tied weights have one shape$"),
        (lambda: Graph((x := Input((6,))), (decoder := L.Linear(3, 6))((encoder := L.Linear(6, 3))(x)),
                       {"encoder": encoder, "decoder": decoder}, tied={"decoder.weight": "encoder.weight"}),
         r"^Graph: tied 'decoder.weight' has shape \(6, 3\), 'encoder.weight' has \(3, 6\); tied weights have one "
         r"shape \(a transposed tie: tie it to 'encoder.weight.T'\)$"),
        (lambda: tie({"second.bias": "first.bias.T"}),
         r"^Graph: 'second.bias' is tied to the transpose of 'first.bias'; a transposed tie is between two Linear "
         r"weights$"),
        (lambda: Graph((x := Input((6,))), (decoder := L.Linear(3, 3))((encoder := L.Linear(6, 3))(x)),
                       {"encoder": encoder, "decoder": decoder}, tied={"decoder.weight": "encoder.weight.T"}),
         r"^Graph: tied 'decoder.weight' has shape \(3, 3\), 'encoder.weight.T' has \(6, 3\); tied weights have one "
         r"shape$"),
        (lambda: tie({"second.weight": "second.weight"}),
         r"^Graph: 'second.weight' is tied to 'second.weight', which is not a tensor of its own$"),
        (lambda: Graph((x := Input((4,))), (b := L.BatchNorm1d(4))((a := L.BatchNorm1d(4))(x)), {"a": a, "b": b},
                       tied={"b.weight": "a.weight"}),
         r"^Graph: tied 'b.weight' belongs to BatchNorm1d\(.*\); ties are between Linear, Embedding, Conv2d and "
         r"ConvTranspose2d parameters$"),
        (lambda: Graph((x := Input((5,))), (inner := tied_embedding())(x), {"inner": inner}),
         r"^Graph: module 'inner' is a graph with tied weights; tie them in the outermost graph$"),
    ],
)  # fmt: skip
def test_bad_ties_are_refused_in_one_line(build, message):
    with pytest.raises(ValueError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


def test_sequential_in_a_graph_keeps_its_keys():
    body = L.cnn()
    x = Input((1, 28, 28))
    assert Graph(x, body(x), {"net": body}).state_shapes() == {f"net.{k}": v for k, v in body.state_shapes().items()}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Graph.from_nodes({"x": (3,)}, [Node("a", "call_function", "relu", ("b",)),
                                                Node("b", "call_function", "relu", ("a",))], ["a"]),
         r"^Graph: node 'a' is in a cycle: a -> b -> a$"),
        (lambda: Graph.from_nodes({"x": (3,)}, [Node("a", "call_function", "relu", ("q",))], ["a"]),
         r"^Graph: node 'a' reads 'q', which is neither an input nor a node \(a dangling input\)$"),
        (lambda: Graph.from_nodes({"x": (3,), "y": (3,)}, [Node("a", "call_function", "relu", ("x",))], ["a"]),
         r"^Graph: input 'y' is used by no output \(a dangling input\)$"),
        (lambda: Graph.from_nodes({"x": (3,)}, [Node("a", "call_function", "cat", ())], ["a"]),
         r"^Graph: node 'a' \(cat\) depends on no input$"),
        (lambda: Graph.from_nodes({"x": (2, 4)}, [Node("c", "call_function", "cat", ("x", "t"), (("dim", 1),)),
                                                  Node("t", "call_function", "transpose", ("x",),
                                                       (("dim0", 1), ("dim1", 2)))], ["c"]),
         r"^node 'c' \(cat\): cat needs equal shapes except in dim 1; input 0 has per-sample shape \(2, 4\), "
         r"input 1 has \(4, 2\)$"),
        (lambda: Graph(Input((3,)), L.Linear(3, 2)(Input((3,)))), r"^Graph: an output depends on input 'input'"),
        (lambda: Graph((x := Input((3,))), L.Linear(3, 2)(x)), r"^Graph: Linear\(.*\) is called but not named"),
        (lambda: ops.cat([Input((2, 4)), Input((3, 5))], dim=1), r"^cat: cat needs equal shapes except in dim 1"),
        (lambda: Input((3,)).reshape(-1, 4), r"^reshape: cannot view per-sample shape \(3,\)"),
        (lambda: Input((3, 4))[:, 1:9:2], r"only integers and slices with step 1"),
        (lambda: ops.cat([Input((3,))], dim=0), r"dim 0 is the batch axis"),
        (lambda: Graph.from_nodes({"x": (3,)}, [Node("c", "call_function", "cat", ("x",), (("dim", 1), ("foo", 2)))],
                                  ["c"]), r"^node 'c' \(cat\): cat takes no argument 'foo'; expected among \['dim'\]$"),
        (lambda: Graph.from_nodes({"x": (3,)}, [Node("a", "call_module", "fc.0", ("x",))], ["a"], {"fc": L.ReLU()}),
         r"^Graph: node 'a' calls no module 'fc.0': fc has modules \[\]$"),
    ],
)  # fmt: skip
def test_bad_graphs_are_refused_in_one_line(build, message):
    with pytest.raises((ValueError, IndexError), match=message) as error:
        build()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_node_list_without_optional_arguments_uses_their_defaults(backend):
    """flatten's start_dim defaults to 1 (nn.Flatten's), sum's dim to every per-sample axis."""
    nodes = [
        Node("flat", "call_function", "flatten", ("x",)),
        Node("fc", "call_module", "fc", ("flat",)),
        Node("total", "call_function", "sum", ("fc",)),
    ]
    model = Graph.from_nodes({"x": (2, 3)}, nodes, ["total"], {"fc": L.Linear(6, 4)})
    loop = loop_class(backend, "float64")(model, dtype="float64")
    x = np.arange(12.0).reshape(2, 2, 3)
    state = loop.state_dict()
    expected = (x.reshape(2, 6) @ state["fc.weight"].T + state["fc.bias"]).sum(1)
    # float64 on both sides: 6 products and the bias, then the sum of 4
    np.testing.assert_allclose(
        loop.predict(x), expected, rtol=0, atol=2 * tolerance(np.float64, 7 + 4, np.abs(expected).max())
    )


def test_a_graph_inside_a_sequential_and_a_graph_inside_a_graph():
    """Graphs nest both ways with PyTorch's keys, and the float64 backends compute the same."""
    inner = tied()
    x = Input((8,))
    outer = Graph(x, inner(x) * 2.0, {"block": inner})
    model = L.Sequential(outer, L.Linear(3, 2))
    assert list(model.state_shapes()) == ["0.block.shared.weight", "0.block.shared.bias", "0.block.fc.weight",
                                          "0.block.fc.bias", "1.weight", "1.bias"]  # fmt: skip
    batch = (np.random.default_rng(0).random((4, 8)), np.array([0, 1, 1, 0]))
    states, losses = [], []
    for backend in [get_backend(name) for name in BACKENDS]:
        if "float64" in backend.capabilities:
            loop = backend(model, optimizer=SGD(lr=LR), dtype="float64")
            losses.append([float(loop.step(batch)) for _ in range(3)])
            states.append(loop.state_dict())
    # float64 on every backend: each step's longest sum bounded by the batch's elements (+ the softmax),
    # over 3 steps (lr 0.05 keeps a step's error below its gradient's)
    size = 3 * (batch[0].size + 2)
    for other_losses, other_states in zip(losses[1:], states[1:], strict=True):
        allowed = 2 * tolerance(np.float64, size, max(np.abs(losses[0])))
        np.testing.assert_allclose(other_losses, losses[0], rtol=0, atol=allowed)
        for key, value in states[0].items():
            allowed = 2 * tolerance(np.float64, size, np.abs(value).max())
            np.testing.assert_allclose(other_states[key], value, rtol=0, atol=allowed, err_msg=key)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((4, 6)), r"^the model takes 2 inputs \['a', 'b'\]: pass a tuple or a dict of arrays, got ndarray$"),
        ((np.zeros((4, 6)), np.zeros((3, 4))), r"^input 'b' must be a batch of shape \(N, \.\.\.\) with the same N"),
        ((np.zeros((4, 6)), np.full((4, 4), np.nan)), r"^input 'b' contains NaN or infinite values$"),
        (
            (np.zeros((4, 5)), np.zeros((4, 4))),
            r"^node 'fc1' calls fc1: Linear\(in_features=10, out_features=16, bias=True\) expects 10 input features "
            r"per sample, got per-sample shape \(9,\)$",
        ),
    ],
)
def test_bad_inputs_of_a_two_input_graph_are_refused_in_one_line(x, message):
    loop = NumpyLoop(two_inputs())
    with pytest.raises(InputError, match=message) as error:
        loop.predict(x)
    assert "\n" not in str(error.value)


def many_ops():
    """One input ``(12,)``; most operations between two Linear layers, the first called twice."""
    x = Input((12,))
    fc, head = L.Linear(12, 12), L.Linear(8, 3)
    h = fc(ops.tanh(fc(x))).reshape(-1, 2, 3, 2)
    a = ops.cat([h * h[:, 0:1], 1.0 - h / 2.0], dim=1)  # (4, 3, 2)
    first, rest = a.split([1, 3], dim=1)
    f = ops.stack([first.select(1, 0), -rest.mean(1)], dim=1)  # (2, 3, 2)
    m = f.permute(0, 1, 3, 2) @ f  # (2, 2, 2)
    u = ops.sigmoid(m).sum(3) + m.transpose(2, 3).sum(-1, keepdim=True).flatten(2, 3)  # (2, 2)
    v = ops.softmax(u.flatten(), dim=1) + ops.gelu(ops.log_softmax(u, dim=2).flatten(1))  # (4,)
    return Graph(x, head(ops.cat([v, ops.relu(v)], dim=1)), {"fc": fc, "head": head})


@pytest.mark.parametrize("make", [many_ops, inception, tied, tied_conv_transpose, tied_transposed])
def test_onnx_export_of_a_graph_runs_as_unitrain(make, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from unitrain.convert import convert
    from unitrain.weights import save_safetensors

    model = make()
    loop = NumpyLoop(model)
    save_safetensors(tmp_path / "w.safetensors", loop.state_dict())
    convert(tmp_path / "w.safetensors", tmp_path / "m.onnx", model)
    x = np.random.default_rng(0).normal(size=(16, *model.input_shapes[0])).astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    expected = loop.predict(x)
    np.testing.assert_allclose(session.run(["output"], {"input": x})[0], expected, rtol=0,
                               atol=_onnx_allowed(model, expected))  # fmt: skip


def _onnx_allowed(model: Graph, expected) -> float:
    """onnxruntime's float32 kernels and ours each lie within the conformance formula of the exact output:
    a chain of roundings behind one output element passes each value at most once and reduces over at
    most its elements, so all the values of one sample bound its length."""
    chain = sum(math.prod(shape) for shape in (*model.shapes.values(), *model.input_shapes))
    return 2 * tolerance(np.float32, chain, float(np.abs(expected).max()))


@pytest.mark.parametrize("make", [two_inputs, two_outputs])
def test_onnx_export_of_several_inputs_and_outputs_names_each(make, tmp_path):
    """Several inputs: each under its graph name; several outputs: each under its node's name."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from unitrain.convert import convert
    from unitrain.weights import save_safetensors

    model = make()
    loop = NumpyLoop(model, loss=PerOutputLoss(CrossEntropyLoss(), MSELoss()) if len(model.outputs) > 1 else None)
    save_safetensors(tmp_path / "w.safetensors", loop.state_dict())
    convert(tmp_path / "w.safetensors", tmp_path / "m.onnx", model)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    xs = tuple(rng.normal(size=(16, *shape)).astype(np.float32) for shape in model.input_shapes)
    names = [value.name for value in session.get_inputs()]
    assert names == (["input"] if len(xs) == 1 else list(model.input_names))
    outputs = [value.name for value in session.get_outputs()]
    assert outputs == (["output"] if len(model.outputs) == 1 else list(model.outputs))
    got = session.run(outputs, dict(zip(names, xs, strict=True)))
    expected = loop.predict(xs[0] if len(xs) == 1 else xs)
    for value, want in zip(got, expected if isinstance(expected, tuple) else (expected,), strict=True):
        np.testing.assert_allclose(value, want, rtol=0, atol=_onnx_allowed(model, want))


def test_graphs_need_the_capability():
    """An adapter without the "graph" capability refuses a graph in one line, before building anything."""

    class NoGraphs(NumpyLoop):  # a third-party adapter that has not declared graphs
        name, capabilities = "no-graphs", NumpyLoop.capabilities - {"graph"}

    with pytest.raises(
        ValueError, match=r"^the no-graphs backend cannot build graph models \(no 'graph' capability\)$"
    ):
        NoGraphs(two_inputs())


@pytest.mark.skipif(UNET_LAYERS, reason="the U-Net runs in test_graph_trains_as_plain_pytorch")
def test_unet_waits_for_its_layers():
    pytest.skip("the U-Net case needs unitrain.layers.ConvTranspose2d and Upsample (branch 'leaves')")


def dropout_graph():
    """Dropout in two modules, ``b`` listed after ``a`` but run first, and ``a`` called at two nodes:
    each call draws a mask of its own, in the order the nodes run."""
    x = Input((6,))
    a = L.Sequential(L.Linear(6, 6), L.ReLU(), L.Dropout(0.5))
    b = L.Sequential(L.Dropout(0.25), L.Linear(6, 6))
    fc = L.Linear(12, 3)
    return Graph(x, fc(ops.cat([b(x), a(a(x))], dim=1)), {"a": a, "b": b, "fc": fc})


@pytest.mark.parametrize("backend", [param for param in BACKEND_PARAMS if param not in ("numpy", "torch")])
def test_dropout_in_a_graph_draws_the_masks_of_the_numpy_backend(backend):
    """Chainer and MindSpore draw a graph's dropout masks from the loop's own stream (PyTorch from
    its generator), as for a Sequential: in float64 (MindSpore: float32) the NumPy backend's steps."""
    dtype = "float64" if "float64" in get_backend(backend).capabilities else "float32"
    rng = np.random.default_rng(0)
    batch = (rng.random((5, 6)).astype(dtype), rng.integers(0, 3, 5))
    runs = [[float(loop.step(batch)) for _ in range(3)]
            for loop in (get_backend(name)(dropout_graph(), optimizer=SGD(lr=LR), dtype=dtype)
                         for name in ("numpy", backend))]  # fmt: skip
    # another mask moves the loss by ~0.1; rounding far less: each of 3 steps' sums of at most 5 x 12
    # products (+ the softmax over 3 classes) within the formula
    allowed = 2 * tolerance(dtype, 3 * (5 * 12 + 3), max(np.abs(runs[0])))
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=allowed)
