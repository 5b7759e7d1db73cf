"""Every backend, started from the same weight file on the same batches, ends in the same place."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import installed_backends
from unitrain.backends.numpy import NumpyLoop
from unitrain.conformance.tolerances import tolerance

import unitrain
from unitrain.weights import load_safetensors

BACKENDS = installed_backends()


def train_cli(*args):
    result = subprocess.run([sys.executable, "-m", "unitrain", "train", "--no-progress", *args],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module", params=["0.9", "0"], ids=["momentum", "plain"])
def after_50_sgd_steps(tmp_path_factory, request):
    """``unitrain train --init-weights F --no-shuffle --max-steps 50 --momentum M`` on every backend."""
    folder = tmp_path_factory.mktemp("cross")
    init = folder / "init.safetensors"
    unitrain.make_loop("numpy", unitrain.mlp(), seed=7).save_weights(init)
    states = {}
    for backend in BACKENDS:
        out = folder / f"{backend}.safetensors"
        metrics = folder / f"{backend}.jsonl"
        train_cli("--backend", backend, "--init-weights", str(init), "--no-shuffle", "--max-steps", "50",
                  "--momentum", request.param, "--save", str(out), "--metrics", str(metrics))  # fmt: skip
        states[backend] = load_safetensors(out)[0]
    return load_safetensors(init)[0], states, folder, request.param


def largest_sample_share(model, optimizer, batches):
    """Trains ``model`` (float64, Linear layers) on ``batches``; returns the largest element of one
    sample's share of any step's mean-loss gradient. A Linear layer's weight gradient from one sample is
    the outer product of the gradient at its output (already divided by the batch size) and its input,
    so the largest element is their two largest magnitudes multiplied (the bias: the first alone)."""
    import torch
    import torch.nn.functional as F

    seen = []

    def record(_, args, out):
        out.retain_grad()
        seen.append((args[0].detach(), out))

    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(record)
    largest = 0.0
    for x, y in batches:
        seen.clear()
        optimizer.zero_grad()
        F.cross_entropy(model(torch.from_numpy(x).double()), torch.from_numpy(y)).backward()
        optimizer.step()
        for inputs, out in seen:
            per_sample = out.grad.abs().amax(1) * torch.clamp(inputs.flatten(1).abs().amax(1), min=1)
            largest = max(largest, float(per_sample.max()))
    return largest


@pytest.fixture(scope="module")
def torch_after_50_sgd_steps(after_50_sgd_steps, mnist_batches):
    """The hand-written PyTorch loop on the same case (torch_reference.torch_runs), the tolerances its
    own float32 drift gives (torch_reference.drift_tolerances), and the most one ReLU crossing moves a
    weight. Float32 rounding, which differs between CPUs and kernels, can put one sample's
    pre-activation on the other side of zero than another backend's (measured on one machine: PyTorch
    against the three others, 2.1e-5). That changes only the sample's own share of its one step (each
    sample is seen once in 50 unshuffled batches), kept by momentum m for 1 / (1 - m) steps in all: at
    most lr x the largest one-sample share of a step / (1 - m), measured along the float64 run."""
    pytest.importorskip("torch")
    import torch
    from torch_reference import expected_run, load_state, torch_layers, torch_runs

    init, _, _, momentum = after_50_sgd_steps
    batches, lr = mnist_batches[:50], 0.01

    def make_model(dtype):
        return load_state(torch_layers(unitrain.mlp()).to(dtype), init)

    def make_optimizer(params):
        return torch.optim.SGD(params, lr=lr, momentum=float(momentum))

    runs = torch_runs(make_model, make_optimizer, batches)
    expected, tolerances = expected_run(runs, "float32", size=batches[0][0].size)
    model = make_model(torch.float64)
    crossing = lr * largest_sample_share(model, make_optimizer(model.parameters()), batches) / (1 - float(momentum))
    return runs, expected, {key: max(tolerance, crossing) for key, tolerance in tolerances.state.items()}


def test_weights_after_50_sgd_steps_agree_across_backends(after_50_sgd_steps, torch_after_50_sgd_steps):
    from torch_reference import assert_within_drift

    init, states, _, _ = after_50_sgd_steps
    _, expected, tolerances = torch_after_50_sgd_steps
    for backend, state in states.items():
        assert set(state) == set(expected.state)
        for key in init:
            assert np.abs(state[key] - init[key]).max() > 1e-3, f"{backend} did not train {key}"
        # Each backend within PyTorch's float32 drift of the hand-written loop, so any two within twice it.
        assert_within_drift({key: state[key] for key in expected.state}, expected.state, tolerances)


def test_same_test_accuracy_to_the_sample(after_50_sgd_steps, torch_after_50_sgd_steps, mnist_test):
    """Backends may disagree only on test samples whose two largest logits lie closer than the logits'
    float32 drift allows: PyTorch's float32 run's logits against its float64 run's, times sqrt(n) as
    for the weights (torch_reference.drift_tolerances), on both sides of the margin."""
    import torch
    from torch_reference import drift_tolerances, load_state, torch_layers

    _, _, folder, _ = after_50_sgd_steps
    runs, _, _ = torch_after_50_sgd_steps
    logits = []
    for dtype, run in ((torch.float32, runs.float32), (torch.float64, runs.float64)):
        model = load_state(torch_layers(unitrain.mlp()).to(dtype), run.state).eval()
        logits.append({"out": model(torch.from_numpy(mnist_test.x).to(dtype)).detach().numpy()})
    drift = drift_tolerances(logits[:1], logits[1], size=64 * 784)["out"]
    top2 = np.sort(logits[1]["out"], axis=1)[:, -2:]
    undecided = int((top2[:, 1] - top2[:, 0] <= 2 * drift).sum())
    records = {b: json.loads((folder / f"{b}.jsonl").read_text().splitlines()[-1]) for b in BACKENDS}
    accuracies = {b: r["test_accuracy"] for b, r in records.items()}
    assert max(accuracies.values()) - min(accuracies.values()) <= undecided / len(mnist_test.y), (accuracies, undecided)
    assert all(r["steps"] == 50 and r["backend"] == b for b, r in records.items())


@pytest.mark.parametrize("writer", BACKENDS)
def test_a_weight_file_from_any_backend_loads_into_every_other(writer, tmp_path, mnist_test):
    path = tmp_path / "w.safetensors"
    model = unitrain.Sequential(unitrain.Conv2d(1, 4, 3), unitrain.BatchNorm2d(4), unitrain.ReLU(),
                                unitrain.MaxPool2d(2), unitrain.Flatten(), unitrain.Linear(676, 10))  # fmt: skip
    source = unitrain.make_loop(writer, model, seed=3)
    x, y = mnist_test.x[:32], mnist_test.y[:32]
    source.step((x, y))  # moves the BatchNorm running statistics off their initial values
    source.save_weights(path)
    # The float64 prediction is the truth; NumPy's own float32 prediction shows the drift, and any
    # backend may drift sqrt(n) times as far (torch_reference.drift_tolerances says why), at least one
    # float32 rounding of the logits (the conformance formula, size 1).
    predictions = {}
    for dtype in ("float32", "float64"):
        numpy_loop = NumpyLoop(model, seed=99, dtype=dtype)
        numpy_loop.load_weights(path)
        predictions[dtype] = numpy_loop.predict(x.astype(dtype))
    drift = np.abs(predictions["float32"] - predictions["float64"]).max()
    within = max(np.sqrt(x.size) * drift, tolerance(np.float32, 1, np.abs(predictions["float64"]).max()))
    for reader in BACKENDS:
        loop = unitrain.make_loop(reader, model, seed=99)
        loop.load_weights(path)
        np.testing.assert_allclose(
            loop.predict(x), predictions["float64"], rtol=0, atol=within, err_msg=f"{writer}->{reader}"
        )
        assert loop.state_dict()["1.num_batches_tracked"] == 1


def test_numpy_chainer_and_mindspore_drop_the_same_units(mnist_train):
    """They draw dropout masks by one rule (unitrain.randomness), so a model with Dropout trains to the
    same weights on each; PyTorch draws from its own generator."""
    model = unitrain.Sequential(
        unitrain.Flatten(), unitrain.Linear(784, 64), unitrain.ReLU(), unitrain.Dropout(0.5),
        unitrain.Linear(64, 32), unitrain.ReLU(), unitrain.Dropout(0.0), unitrain.Dropout(0.3), unitrain.Linear(32, 10),
    )  # fmt: skip
    data = mnist_train.subset(np.arange(640))

    optimizer = unitrain.SGD(lr=0.05, momentum=0.9)
    final = {}
    for backend in [name for name in BACKENDS if name != "torch"]:
        loop = unitrain.make_loop(backend, model, optimizer=optimizer, seed=4)
        loop.fit(data, epochs=2, batch_size=64)
        final[backend] = loop.state_dict()
    # Float32 and float64 draw different masks, so the drift is NumPy's own on the same network, data and
    # optimizer without dropout (masks of 0 and 1/(1-p) add one rounding at most); any backend may drift
    # sqrt(n) times as far (torch_reference.drift_tolerances says why), n = one batch's elements.
    plain = unitrain.Sequential(*(layer for layer in model if not isinstance(layer, unitrain.Dropout)))
    plain_runs = {}
    for dtype in ("float32", "float64"):
        loop = NumpyLoop(plain, optimizer=optimizer, seed=4, dtype=dtype)
        loop.fit(unitrain.ArrayDataset(data.x.astype(dtype), data.y), epochs=2, batch_size=64)
        plain_runs[dtype] = loop.state_dict()
    drift = max(np.abs(plain_runs["float32"][key] - plain_runs["float64"][key]).max() for key in plain_runs["float64"])
    start = unitrain.init_weights(model, 4)
    for backend, state in final.items():
        for key, value in state.items():
            assert np.abs(value - start[key]).max() > 1e-3, f"{backend} did not train {key}"
            within = max(np.sqrt(64 * 784) * drift, tolerance(np.float32, 1, np.abs(value).max()))
            np.testing.assert_allclose(value, final["numpy"][key], rtol=0, atol=within, err_msg=f"{backend} {key}")
