"""Noise inside a model: pytorch/examples' VAE, ``torch.randn_like`` in its ``reparameterize``,
imported with ``from_torch`` and trained on every backend against the same module in plain
PyTorch fed the same noise (drawn with unitrain's stream and passed to torch as an argument)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import installed_backends
from torch import nn
from torch_reference import assert_run_within_drift, assert_within_drift, drift_tolerances, gradient_size, torch_runs
from unitrain.conformance.tolerances import tolerance

import unitrain
from unitrain import expr, ops
from unitrain import layers as L
from unitrain.checkpoint import Checkpointer, CheckpointError, load_checkpoint
from unitrain.data import ArrayDataset
from unitrain.graph import Graph, Input, Node
from unitrain.graph_noise import NOISE_KEY, GraphNoise
from unitrain.losses import CustomLoss, MSELoss
from unitrain.optim import SGD, Adam

STEPS, BATCH, SEED = 20, 8, 3


class VAE(nn.Module):
    """pytorch/examples' vae/main.py, as written there."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


class GivenNoise(VAE):
    """The same module with its noise passed in: ``forward(x, eps)``."""

    def forward(self, x, eps):
        self.eps = eps
        return super().forward(x)

    def reparameterize(self, mu, logvar):
        return mu + self.eps * torch.exp(0.5 * logvar)


def torch_vae_loss(output, x):  # the example's loss_function
    recon, mu, logvar = output
    bce = F.binary_cross_entropy(recon, x, reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def vae_loss(pred, x):
    recon, mu, logvar = pred[0], pred[1], pred[2]
    bce = -(x * expr.log(recon) + (1 - x) * expr.log(1 - recon)).sum()
    return bce - 0.5 * (1 + logvar - mu**2 - expr.exp(logvar)).sum()


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(SEED)
    module = VAE()
    graph = unitrain.from_torch(module, torch.rand(2, 1, 28, 28))
    images = np.random.default_rng(SEED).random((STEPS, BATCH, 1, 28, 28))
    noise = GraphNoise(graph, SEED)  # the stream a loop of seed SEED draws from, step by step
    batches = [((x, noise.draw(BATCH, np.float64, True)[0]), x.reshape(BATCH, 784)) for x in images]

    def make_model(dtype):
        twin = GivenNoise().to(dtype)
        twin.load_state_dict(copy.deepcopy(module).to(dtype).state_dict())
        return twin

    runs = torch_runs(make_model, lambda params: torch.optim.Adam(params, lr=1e-3), batches,
                      criterion=torch_vae_loss)  # fmt: skip
    return graph, images, runs


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        # MindSpore compiles the step: seconds on two cores, so `slow`
        *(
            pytest.param(name, "float32", marks=[pytest.mark.slow] if name == "mindspore" else [])
            for name in installed_backends()
        ),
        ("numpy", "float64"),
    ],
)
def test_imported_vae_trains_as_pytorch_with_the_same_noise(case, backend, dtype):
    graph, images, runs = case
    loop = unitrain.make_loop(backend, graph, CustomLoss(vae_loss), Adam(lr=1e-3), dtype=dtype, seed=SEED)
    losses = [loop.to_float(loop.step((x, x.reshape(BATCH, 784)))) for x in images]
    # the longest sum of one step: the reconstruction's, over the batch's 784 pixels
    assert_run_within_drift(loop, losses, runs, dtype, BATCH * 784)


def test_noise_is_part_of_the_random_state_and_fresh_at_each_step():
    x = Input((3,))
    model = Graph(x, x + ops.randn_like(x) * ops.rand_like(x).exp().log())
    assert model.noise == (("randn_like", "normal"), ("rand_like", "uniform"))
    assert Graph.from_dict(model.to_dict()) == model
    loop = unitrain.make_loop("numpy", model, seed=1)
    batch = np.zeros((4, 3))
    state = loop.random_state()
    first, second = loop.predict(batch), loop.predict(batch)
    np.testing.assert_array_equal(first, second)  # evaluation: the same draws each call
    loop.train()
    drawn = [np.array(loop.to_numpy(loop.forward(batch))) for _ in range(2)]
    assert not np.allclose(drawn[0], drawn[1])  # training: new noise at each forward
    loop.load_random_state(state)
    np.testing.assert_array_equal(loop.to_numpy(loop.forward(batch)), drawn[0])


def test_refusals_in_one_line():
    class Float64Noise(VAE):
        def reparameterize(self, mu, logvar):
            return mu + torch.randn_like(logvar, dtype=torch.float16).float() * logvar

    with pytest.raises(ValueError, match=r"^from_torch: node 'randn_like' .*argument dtype=torch.float16 is not"):
        unitrain.from_torch(Float64Noise(), torch.rand(2, 1, 28, 28))
    x = Input((3,))
    with pytest.raises(ValueError, match=r"^Graph: noise 'x' has kind 'gamma'; expected one of \['normal', "):
        Graph.from_nodes({"x": (3,)}, [], ["x"], noise={"x": "gamma"})
    with pytest.raises(ValueError, match=r"^Graph: every input is noise"):
        Graph.from_nodes({"eps": (3,)}, [Node("y", "call_function", "neg", ("eps",))], ["y"], noise={"eps": "normal"})
    inner = Graph(x, x * ops.randn_like(x))
    with pytest.raises(ValueError, match=r"takes 2 inputs \['input', 'randn_like'\], got 3$"):  # data, or data + noise
        Graph(x, inner(x, x, x), {"inner": inner})


def test_to_torch_draws_with_torch(case):
    graph = case[0]
    module = unitrain.to_torch(graph)
    assert "torch.randn((size, 20), dtype = torch.float32)" in module.code
    x = torch.rand(4, 1, 28, 28)
    first, second = module(x)[0], module(x)[0]
    assert first.shape == (4, 784) and not torch.equal(first, second)  # new noise at each call, as the example


def onnx_session(graph, state, input_shape, tmp_path):
    """``graph`` exported to ONNX, checked by ``onnx.checker``, and an onnxruntime session of it (None
    without onnxruntime)."""
    onnx = pytest.importorskip("onnx")
    from unitrain.onnx_export import to_onnx

    model = to_onnx(graph, state, input_shape)
    onnx.checker.check_model(model, full_check=True)  # full_check: every node's shapes and types inferred
    try:
        import onnxruntime
    except ImportError:
        return None
    onnx.save(model, tmp_path / "m.onnx")
    return onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])


def test_onnx_export_draws_the_noise_in_the_graph(tmp_path):
    """The runtime draws its own noise, so the draws are checked by their statistics: a graph that
    outputs them, on N samples of 250 values, mean and variance within six standard errors."""
    x = Input((250,))
    graph = Graph(x, [x + ops.randn_like(x), x + ops.rand_like(x)])
    session = onnx_session(graph, {}, (250,), tmp_path)
    if session is None:
        pytest.skip("onnxruntime is not installed: the export is checked by onnx.checker only")
    zeros = np.zeros((40, 250), np.float32)
    (normal, uniform), (again, _) = session.run(None, {"input": zeros}), session.run(None, {"input": zeros})
    assert normal.shape == uniform.shape == (40, 250) and not np.array_equal(normal, again)  # drawn at each run
    n = normal.size
    # standard errors of a sample mean (sigma / sqrt(n)) and variance (sqrt((mu4 - sigma^4) / n)):
    # normal: sigma 1, mu4 3; uniform [0, 1): sigma^2 1/12, mu4 1/80
    assert abs(normal.mean()) < 6 / np.sqrt(n) and abs(normal.var() - 1) < 6 * np.sqrt(2 / n)
    assert uniform.min() >= 0 and uniform.max() < 1
    assert abs(uniform.mean() - 0.5) < 6 * np.sqrt(1 / 12 / n)
    assert abs(uniform.var() - 1 / 12) < 6 * np.sqrt((1 / 80 - 1 / 144) / n)


def test_onnx_export_of_a_noisy_vae_computes_the_rest_as_unitrain(case, tmp_path):
    """pytorch/examples' VAE: mean and log-variance do not depend on the noise (as unitrain's within
    twice the conformance formula), the reconstruction does: its shape and range."""
    graph = case[0]
    session = onnx_session(graph, graph.initial_state, (1, 28, 28), tmp_path)
    if session is None:
        pytest.skip("onnxruntime is not installed: the export is checked by onnx.checker only")
    x = np.random.default_rng(SEED).random((4, 1, 28, 28)).astype(np.float32)
    recon, mu, logvar = session.run(None, {"input": x})
    _, mu_expected, logvar_expected = unitrain.make_loop("numpy", graph, CustomLoss(vae_loss), seed=SEED).predict(x)
    for got, expected in ((mu, mu_expected), (logvar, logvar_expected)):
        chain = sum(math.prod(shape) for shape in (*graph.shapes.values(), *graph.input_shapes))
        np.testing.assert_allclose(got, expected, rtol=0, atol=2 * tolerance(np.float32, chain, np.abs(expected).max()))
    assert recon.shape == (4, 784) and recon.min() >= 0 and recon.max() <= 1


# --- resuming on another backend: the noise stream is unitrain's own, so it moves with the checkpoint ---

RESUME_BATCH, RESUME_EPOCHS, RESUME_AT = 8, 2, 4  # 5 batches an epoch: the checkpoint is mid-epoch
#: each backend resumes the next one's checkpoint: every backend writes one and reads one
RESUME_PAIRS = [(name, installed_backends()[index - 1]) for index, name in enumerate(installed_backends())]


def noisy_regressor():
    x = Input((6,))
    encoder, decoder = L.Linear(6, 8), L.Linear(8, 3)
    code = encoder(x).tanh()
    return Graph(x, decoder(code + 0.5 * ops.randn_like(code)), {"encoder": encoder, "decoder": decoder})


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory):
    """``run(backend, dtype)``: the uninterrupted run of the case, checkpointed at step RESUME_AT."""
    rng = np.random.default_rng(SEED)
    x, y = (rng.standard_normal((40, features)).astype(np.float32) for features in (6, 3))
    data = ArrayDataset(x, y)
    runs = {}

    def run(backend, dtype="float32", resume=None):
        loop = unitrain.make_loop(backend, noisy_regressor(), MSELoss(), SGD(lr=0.1, momentum=0.9), seed=SEED,
                                  dtype=dtype)  # fmt: skip
        if resume is not None:
            resume.restore(loop)
        elif (backend, dtype) in runs:
            return runs[backend, dtype]
        folder = tmp_path_factory.mktemp(f"{backend}-{dtype}")
        loop.fit(data, epochs=RESUME_EPOCHS, batch_size=RESUME_BATCH,
                 extensions=[] if resume else [Checkpointer(folder, every=RESUME_AT, keep=None)],
                 start_epoch=resume.epoch if resume else 0, start_batch=resume.batch if resume else 0)  # fmt: skip
        if resume is None:
            runs[backend, dtype] = loop, load_checkpoint(folder / f"step-{RESUME_AT:08d}")
        return loop if resume else runs[backend, dtype]

    return run


@pytest.mark.parametrize(("first", "second"), RESUME_PAIRS)
def test_a_checkpoint_resumes_the_noise_stream_on_another_backend(resume_case, first, second):
    _, checkpoint = resume_case(first)
    assert checkpoint.backend == first and NOISE_KEY in checkpoint.random_state
    uninterrupted = resume_case(second)[0]
    moved = resume_case(second, resume=checkpoint)
    assert moved.step_count == uninterrupted.step_count == 10
    # both float32 runs approximate the float64 one, drawn from the same noise rounded: the moved run may
    # drift sqrt(n) times as far as the two uninterrupted runs measurably do (torch_reference.drift_tolerances)
    exact = resume_case("numpy", "float64")[0].state_dict()
    size = gradient_size(noisy_regressor(), [(6,), (8,)], RESUME_BATCH)  # the noise is an input too
    written = resume_case(first)[0].state_dict()
    tolerances = drift_tolerances([uninterrupted.state_dict(), written], exact, size)
    assert_within_drift(moved.state_dict(), uninterrupted.state_dict(), {k: 2 * v for k, v in tolerances.items()})
    if first == "numpy":  # the same move with the stream restarted, as before: far outside the bound
        restarted = resume_case(second, resume=dataclasses.replace(checkpoint, random_state={}))
        errors = {k: np.abs(v - uninterrupted.state_dict()[k]).max() / (2 * tolerances[k])
                  for k, v in restarted.state_dict().items()}  # fmt: skip
        assert max(errors.values()) > 100, errors


# --- a graph that draws noise, called as a module of another graph ---

NESTED_STEPS, NESTED_BATCH = 20, 8


def nested_vae():
    """A denoising VAE: uniform noise on the input, then an encoder graph whose reparameterisation
    draws normal noise, then a decoder. The encoder's noise is lifted into the outer graph."""
    x = Input((12,))
    hidden, mu, logvar = L.Linear(12, 8), L.Linear(8, 4), L.Linear(8, 4)
    h = hidden(x).relu()
    mean, log_variance = mu(h), logvar(h)
    encoder = Graph(x, mean + ops.randn_like(log_variance) * (0.5 * log_variance).exp(),
                    {"hidden": hidden, "mu": mu, "logvar": logvar})  # fmt: skip
    image, decoder = Input((12,)), L.Linear(4, 12)
    code = encoder(image + 0.1 * ops.rand_like(image))
    return Graph(image, decoder(code).sigmoid(), {"encoder": encoder, "decoder": decoder})


class NestedVAE(nn.Module):
    """The same model in plain PyTorch, its two noises passed in."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"hidden": nn.Linear(12, 8), "mu": nn.Linear(8, 4), "logvar": nn.Linear(8, 4)})
        self.decoder = nn.Linear(4, 12)

    def forward(self, x, uniform, normal):
        h = F.relu(self.encoder["hidden"](x + 0.1 * uniform))
        mean, log_variance = self.encoder["mu"](h), self.encoder["logvar"](h)
        return torch.sigmoid(self.decoder(mean + normal * torch.exp(0.5 * log_variance)))


@pytest.fixture(scope="module")
def nested_case():
    graph = nested_vae()
    initial = unitrain.make_loop("numpy", graph, seed=SEED, dtype="float64").state_dict()
    images = np.random.default_rng(SEED).random((NESTED_STEPS, NESTED_BATCH, 12))
    noise = GraphNoise(graph, SEED)  # the outer graph's inputs: its own noise, then the encoder's
    batches = [((x, *noise.draw(NESTED_BATCH, np.float64, True)), x) for x in images]

    def make_model(dtype):
        model = NestedVAE().to(dtype)
        model.load_state_dict({key: torch.tensor(value, dtype=dtype) for key, value in initial.items()})
        return model

    runs = torch_runs(make_model, lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9), batches,
                      criterion=F.mse_loss)  # fmt: skip
    return graph, initial, images, runs


def test_a_noisy_graph_called_as_a_module_lifts_its_noise_into_the_caller():
    graph = nested_vae()
    # in the order the nodes meet them: the caller's own draw, then the encoder's, each call its own
    assert graph.noise == (("rand_like", "uniform"), ("randn_like", "normal"))
    assert [node.args for node in graph.nodes if node.target == "encoder"] == [("add", "randn_like")]
    assert Graph.from_dict(graph.to_dict()) == graph
    x = Input((12,))
    twice = Graph(x, graph.encoder(x) + graph.encoder(x), {"encoder": graph.encoder})
    assert twice.noise == (("randn_like", "normal"), ("randn_like_1", "normal"))  # one draw per call
    data = graph.to_dict()
    data["noise"] = {"rand_like": "normal", "randn_like": "uniform"}
    with pytest.raises(ValueError, match=r"^Graph: node 'encoder' fills encoder's normal noise 'randn_like' with "
                                         r"'randn_like', which is uniform noise$"):  # fmt: skip
        Graph.from_dict(data)
    loop = unitrain.make_loop("numpy", graph, seed=SEED)
    alone = loop.submodule("encoder")  # evaluated alone, the encoder draws its own noise
    assert alone.predict(np.zeros((2, 12))).shape == (2, 4)
    assert unitrain.to_torch(graph)(torch.rand(3, 12)).shape == (3, 12)  # torch draws both, the encoder's given


def test_onnx_export_draws_a_sub_graphs_noise_in_the_caller(tmp_path):
    graph = nested_vae()
    session = onnx_session(graph, unitrain.make_loop("numpy", graph, seed=SEED).state_dict(), (12,), tmp_path)
    if session is None:
        pytest.skip("onnxruntime is not installed: the export is checked by onnx.checker only")
    x = np.random.default_rng(SEED).random((5, 12)).astype(np.float32)
    first, second = session.run(None, {"input": x})[0], session.run(None, {"input": x})[0]
    assert first.shape == (5, 12) and not np.array_equal(first, second)


@pytest.mark.parametrize(
    ("backend", "dtype"), [*((name, "float32") for name in installed_backends()), ("numpy", "float64")]
)
def test_a_noisy_sub_graph_trains_as_pytorch_with_the_same_noise(nested_case, backend, dtype):
    graph, initial, images, runs = nested_case
    loop = unitrain.make_loop(backend, graph, MSELoss(), SGD(lr=0.5, momentum=0.9), dtype=dtype, seed=SEED)
    loop.load_state_dict(initial)
    losses = [loop.to_float(loop.step((x, x))) for x in images]
    assert_run_within_drift(loop, losses, runs, dtype, NESTED_BATCH * 12)  # the longest sum: the loss's


def test_another_backends_bad_noise_state_is_refused_in_one_line(resume_case):
    checkpoint = resume_case("torch")[1]
    broken = dataclasses.replace(checkpoint, random_state={**checkpoint.random_state,
                                                           NOISE_KEY: np.frombuffer(b"{}", np.uint8)})  # fmt: skip
    loop = unitrain.make_loop("numpy", noisy_regressor(), MSELoss(), SGD(lr=0.1, momentum=0.9), seed=SEED)
    before = loop.state_dict()
    with pytest.raises(CheckpointError, match=r"random.safetensors is not a graph noise state: not a PCG64") as error:
        broken.restore(loop)
    assert "\n" not in str(error.value)
    assert all(np.array_equal(value, before[key]) for key, value in loop.state_dict().items())  # nothing loaded
