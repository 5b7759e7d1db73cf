"""Several models, several optimizers, one step (unitrain.steps): a small DCGAN (PyTorch's DCGAN
tutorial scaled to 28x28) and the VAE of PyTorch's examples/vae on each backend, against the
hand-written PyTorch loops of the same cases from the same weights and noise; the spec's refusals."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_examples import EXAMPLES, example
from torch import nn
from torch_reference import TorchRun, TorchRuns, expected_run
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain import expr, step_checkpoints, steps
from unitrain.loop import InputError
from unitrain.optim import Adam
from unitrain.weights import load_safetensors

BACKENDS = ["numpy", "torch", "chainer", "mindspore"]
NZ, NGF, NDF, BATCH, STEPS = 8, 4, 4, 8, 4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    """These cases are small: PyTorch's thread pool would only contend for the busy cores."""


# --- the DCGAN tutorial, scaled to 28x28 and to a few channels -----------------------------


def generator(kit):
    return kit.Sequential(
        kit.ConvTranspose2d(NZ, NGF * 2, 7, 1, 0, bias=False), kit.BatchNorm2d(NGF * 2), kit.ReLU(),
        kit.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False), kit.BatchNorm2d(NGF), kit.ReLU(),
        kit.ConvTranspose2d(NGF, 1, 4, 2, 1, bias=False), kit.Tanh(),
    )  # fmt: skip


def discriminator(kit):
    return kit.Sequential(
        kit.Conv2d(1, NDF, 4, 2, 1, bias=False), kit.LeakyReLU(0.2),
        kit.Conv2d(NDF, NDF * 2, 4, 2, 1, bias=False), kit.BatchNorm2d(NDF * 2), kit.LeakyReLU(0.2),
        kit.Conv2d(NDF * 2, 1, 7, 1, 0, bias=False), kit.Sigmoid(),
    )  # fmt: skip


def dcgan_step():
    gen, disc = steps.Model("generator"), steps.Model("discriminator")
    real = steps.batch()
    fake = gen(steps.normal((NZ, 1, 1)))
    adam = Adam(2e-4, betas=(0.5, 0.999))
    return steps.MultiStep(
        models={"generator": generator(ut), "discriminator": discriminator(ut)},
        optimizers={"d": steps.OptimizerOver(adam, ["discriminator"]), "g": steps.OptimizerOver(adam, ["generator"])},
        phases=[
            steps.Phase("discriminator", steps.bce(disc(real), 1.0) + steps.bce(disc(steps.detach(fake)), 0.0), "d"),
            steps.Phase("generator", steps.bce(disc(fake), 1.0), "g"),
        ],
    )


def tutorial_dcgan(weights, dtype):
    """The models and one step of the tutorial's training loop, as written there (one fake batch
    per step, D then G; each loss term back-propagated as soon as it is computed)."""
    netG, netD = generator(nn).to(dtype), discriminator(nn).to(dtype)
    _load(netG, weights["generator"], dtype)
    _load(netD, weights["discriminator"], dtype)
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999), foreach=False)
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999), foreach=False)
    criterion = nn.BCELoss()

    def step(x, noise):
        real = torch.from_numpy(x).to(dtype)
        netD.zero_grad()
        label = torch.full((len(real),), 1.0, dtype=dtype)
        errD_real = criterion(netD(real).view(-1), label)
        errD_real.backward()
        fake = netG(torch.from_numpy(noise).to(dtype))
        label.fill_(0.0)
        errD_fake = criterion(netD(fake.detach()).view(-1), label)
        errD_fake.backward()
        optimizerD.step()
        netG.zero_grad()
        label.fill_(1.0)
        errG = criterion(netD(fake).view(-1), label)
        errG.backward()
        optimizerG.step()
        return (errD_real + errD_fake).item(), errG.item()

    return {"generator": netG, "discriminator": netD}, step


def torch_dcgan(weights, batches, noises, dtype):
    models, step = tutorial_dcgan(weights, dtype)
    return models, [step(x, noise) for x, (noise,) in zip(batches, noises, strict=True)]


# --- PyTorch's examples/vae: 784-400-20, BCE sum + KLD, Adam 1e-3 --------------------------


class TorchVAE(nn.Module):
    """examples/vae's VAE, with ``eps`` an argument (the step's noise) instead of ``randn_like``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x, eps):
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + eps * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def vae_loss(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


def vae_models():
    """The same network as two unitrain models: the encoder (two outputs) and the decoder."""
    x = ut.graph.Input((784,), name="x")
    fc1, fc21, fc22 = ut.Linear(784, 400), ut.Linear(400, 20), ut.Linear(400, 20)
    h1 = fc1(x).relu()
    encoder = ut.graph.Graph(x, [fc21(h1), fc22(h1)], modules={"fc1": fc1, "fc21": fc21, "fc22": fc22})
    decoder = ut.Sequential(ut.Linear(20, 400), ut.ReLU(), ut.Linear(400, 784), ut.Sigmoid())
    return encoder, decoder


def vae_step():
    encoder, decoder = vae_models()
    enc, dec = steps.Model("encoder", outputs=2), steps.Model("decoder")
    x = steps.batch()
    mu, logvar = enc(x)
    recon = dec(mu + expr.exp(0.5 * logvar) * steps.normal(20))  # the reparameterisation
    kld = -0.5 * (1 + logvar - mu**2 - expr.exp(logvar)).sum()
    return steps.MultiStep(
        models={"encoder": encoder, "decoder": decoder},
        optimizers={"adam": steps.OptimizerOver(Adam(1e-3), ["encoder", "decoder"])},
        phases=[steps.Phase("vae", steps.bce(recon, x, reduction="sum") + kld, "adam")],
    )


#: the unitrain models' keys as TorchVAE's
VAE_KEYS = {"encoder.fc1": "fc1", "encoder.fc21": "fc21", "encoder.fc22": "fc22", "decoder.0": "fc3",
            "decoder.2": "fc4"}  # fmt: skip


def torch_vae(weights, batches, noises, dtype):
    model = TorchVAE().to(dtype)
    flat = {}
    for model_name, state in weights.items():
        for key, value in state.items():
            prefix, leaf = f"{model_name}.{key}".rsplit(".", 1)
            flat[f"{VAE_KEYS[prefix]}.{leaf}"] = value
    _load(model, flat, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    losses = []
    for x, (eps,) in zip(batches, noises, strict=True):
        data = torch.from_numpy(x).to(dtype)
        optimizer.zero_grad()
        recon, mu, logvar = model(data, torch.from_numpy(eps).to(dtype))
        loss = vae_loss(recon, data, mu, logvar)
        loss.backward()
        optimizer.step()
        losses.append((loss.item(),))
    inverse = {torch_name: name for name, torch_name in VAE_KEYS.items()}
    state = {}
    for key, value in model.state_dict().items():
        prefix, leaf = key.rsplit(".", 1)
        state[f"{inverse[prefix]}.{leaf}"] = value.detach().numpy()
    return state, losses


# --- running the cases ---------------------------------------------------------------------


def _load(module, state, dtype):
    module.load_state_dict({key: torch.from_numpy(np.asarray(value)).to(dtype) if np.asarray(value).dtype.kind == "f"
                            else torch.from_numpy(np.asarray(value)) for key, value in state.items()})  # fmt: skip


def _flat(states):
    return {f"{model}.{key}": value for model, state in states.items() for key, value in state.items()}


CASES = {
    "dcgan": dict(step=dcgan_step, shape=(1, 28, 28), low=-1.0),
    "vae": dict(step=vae_step, shape=(784,), low=0.0),
}


def tutorial_weights(spec, rng):
    """The DCGAN tutorial's ``weights_init`` drawn in float64 (the float32 runs round them): conv
    weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    state = {}
    for key, value in ut.init_weights(spec, 0).items():
        if value.ndim == 4:
            state[key] = rng.normal(0.0, 0.02, value.shape)
        elif key.endswith(".weight"):
            state[key] = rng.normal(1.0, 0.02, value.shape)
        else:
            state[key] = value
    return state


def case_data(name):
    case = CASES[name]
    step = case["step"]()
    rng = np.random.default_rng(7)
    batches = [rng.uniform(case["low"], 1.0, (BATCH, *case["shape"])) for _ in range(STEPS)]
    if name == "dcgan":
        weights = {model: tutorial_weights(spec, rng) for model, spec in step.models}
    else:
        weights = {model: {k: v.astype(np.float64) for k, v in ut.init_weights(spec, 3).items()}
                   for model, spec in step.models}  # fmt: skip
    stream = steps.NoiseStream(11)
    noises = [[stream.draw(step.noise, BATCH, np.float64)[leaf] for leaf in step.noise] for _ in batches]
    return step, weights, batches, noises


def torch_run(name, weights, batches, noises, dtype, reverse=False):
    if reverse:  # the same exact result in other summation orders: each batch's samples backwards
        batches = [x[::-1].copy() for x in batches]
        noises = [[noise[::-1].copy() for noise in step_noise] for step_noise in noises]
    if name == "dcgan":
        models, losses = torch_dcgan(weights, batches, noises, dtype)
        states = {model: {k: v.detach().numpy() for k, v in m.state_dict().items()} for model, m in models.items()}
        state = _flat(states)
    else:
        state, losses = torch_vae(weights, batches, noises, dtype)
    return TorchRun(state, {}, {"loss": np.array(losses)})


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    name = request.param
    step, weights, batches, noises = case_data(name)
    runs = TorchRuns(
        torch_run(name, weights, batches, noises, torch.float32),
        torch_run(name, weights, batches, noises, torch.float64),
        torch_run(name, weights, batches, noises, torch.float32, reverse=True),
    )
    reversed64 = torch_run(name, weights, batches, noises, torch.float64, reverse=True)
    return name, step, weights, batches, noises, runs, reversed64


def bounds(runs, reversed64, dtype, size):
    """PyTorch's run of ``dtype`` and the tolerances of ``expected_run``. In float64 the conformance
    formula bounds the equations' own rounding, but Adam divides by the root of a gradient's square:
    a gradient entry that nearly cancels (the VAE's summed loss) turns its rounding into a step of
    order lr. How strongly this case amplifies float64 rounding is measured as for float32: PyTorch's
    own float64 loop on each batch's samples in reverse order, against it in the given order; a
    backend may lie sqrt(size) times as far (see tests/torch_reference.py)."""
    expected, tolerances = expected_run(runs, dtype, size)
    if np.dtype(dtype) != np.float64:
        return expected, tolerances
    widened = []
    for given, other, bound in zip(runs.float64, reversed64, tolerances, strict=True):
        drift = max((float(np.abs(other[key] - value).max(initial=0)) for key, value in given.items()), default=0.0)
        widened.append({key: max(value, np.sqrt(size) * drift) for key, value in bound.items()})
    return expected, TorchRun(*widened)


def unitrain_run(step, weights, batches, noises, backend, dtype):
    loop = steps.MultiModelLoop(step, backend, seed=11, dtype=dtype)  # the noise stream the case drew with
    for model, state in weights.items():
        loop.loops[model].load_state_dict(state)
    losses = [list(loop.step(x).values()) for x in batches]
    return TorchRun(_flat(loop.state_dicts()), {}, {"loss": np.array(losses)})


#: every backend in float32, and in float64 those that have it (MindSpore's CPU kernels do not)
RUNS = [(backend, dtype) for backend in BACKENDS for dtype in ("float64", "float32")
        if dtype == "float32" or backend != "mindspore"]  # fmt: skip


@pytest.mark.parametrize(("backend", "dtype"), RUNS)
def test_matches_the_hand_written_pytorch_loop(case, backend, dtype):
    name, step, weights, batches, noises, runs, reversed64 = case
    size = BATCH * 784  # the longest sum of one step: the elements of a batch of images (or of their outputs)
    expected, tolerances = bounds(runs, reversed64, dtype, size)
    actual = unitrain_run(step, weights, batches, noises, backend, dtype)
    for part in ("state", "losses"):
        got, want, bound = getattr(actual, part), getattr(expected, part), getattr(tolerances, part)
        assert list(got) == list(want)
        for key, value in want.items():
            difference = float(np.abs(got[key].astype(np.float64) - value.astype(np.float64)).max(initial=0))
            assert difference <= bound[key], f"{name} {backend} {dtype} {key}: {difference:.3g} > {bound[key]:.3g}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_torch_dcgan_step_is_the_tutorial_loop_bit_for_bit(dtype):
    """The torch adapter runs the tutorial's own step (nn.BCELoss's operation for a bce against a 0/1
    label, each loss term back-propagated on its own): from the same weights and noise, every weight,
    BatchNorm statistic and loss equals the hand-written loop's exactly, not within rounding."""
    step, weights, batches, noises = case_data("dcgan")
    expected = torch_run("dcgan", weights, batches, noises, getattr(torch, dtype))
    actual = unitrain_run(step, weights, batches, noises, "torch", dtype)
    assert list(actual.state) == list(expected.state)
    for key, value in expected.state.items():
        np.testing.assert_array_equal(actual.state[key], value, err_msg=key)
    np.testing.assert_array_equal(actual.losses["loss"], expected.losses["loss"])


#: what the tutorial's ``netD(x).view(-1)`` and its labels (``torch.full``, its ``.to(dtype)``) add and
#: the adapter's ``full_like`` labels replace: no arithmetic, no copy of the activations
SHAPES_AND_ALLOCATIONS = {"aten::view", "aten::reshape", "autograd::engine::evaluate_function: ViewBackward0",
                          "aten::to", "aten::full", "aten::full_like", "aten::empty", "aten::empty_like",
                          "aten::empty_strided"}  # fmt: skip


def test_the_torch_dcgan_step_runs_the_operations_and_backward_passes_of_the_tutorial_loop(monkeypatch):
    """One step through the torch adapter executes the ATen operations and autograd nodes of the
    tutorial's hand-written step, as many times each (no extra op, copy or detach), in as many
    backward passes (errD_real, errD_fake, errG), none retaining its graph: the discriminator's
    activations on the real batch are freed before it sees the fake one, as in the tutorial."""
    from collections import Counter

    from torch.profiler import profile

    step, weights, batches, noises = case_data("dcgan")
    _, tutorial = tutorial_dcgan(weights, torch.float32)
    loop = steps.MultiModelLoop(step, "torch", seed=11)
    for model, state in weights.items():
        loop.loops[model].load_state_dict(state)
    passes = []
    backward = torch.autograd.backward

    def counted(tensors, grad_tensors=None, retain_graph=None, *args, **kwargs):
        passes[-1].append(bool(retain_graph))
        return backward(tensors, grad_tensors, retain_graph, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counted)
    operations = []
    # float32 batches and noise, as a DataLoader gives them (the adapter draws its noise in float32 too)
    x, noise = [batch.astype(np.float32) for batch in batches], [step[0].astype(np.float32) for step in noises]
    for run in (lambda x, noise: loop.step(x), tutorial):
        passes.append([])
        run(x[0], noise[0])  # the first step creates Adam's state
        passes[-1].clear()
        with profile() as profiled:
            run(x[1], noise[1])
        operations.append(Counter(event.name for event in profiled.events()
                                  if event.name.startswith(("aten::", "autograd::engine"))
                                  and event.name not in SHAPES_AND_ALLOCATIONS))  # fmt: skip
    ours, tutorials = operations
    assert ours == tutorials, f"the adapter's step: {ours - tutorials}; the tutorial's: {tutorials - ours}"
    assert passes == [[False] * 3, [False] * 3]


def test_a_torch_backward_pass_keeps_its_graph_only_for_a_later_pass_through_it():
    """The tutorial's discriminator phase is two passes that free their graphs; where the fake batch is
    not detached, the discriminator's pass goes through the generator's graph, which the generator's
    phase goes through again: that pass alone keeps it, and the step trains."""
    gen, disc = steps.Model("generator"), steps.Model("discriminator")
    fake = gen(steps.normal((NZ, 1, 1)))
    adam = Adam(2e-4, betas=(0.5, 0.999))
    undetached = steps.MultiStep(
        models={"generator": generator(ut), "discriminator": discriminator(ut)},
        optimizers={"d": steps.OptimizerOver(adam, ["discriminator"]), "g": steps.OptimizerOver(adam, ["generator"])},
        phases=[steps.Phase("discriminator", steps.bce(disc(steps.batch()), 1.0) + steps.bce(disc(fake), 0.0), "d"),
                steps.Phase("generator", steps.bce(disc(fake), 1.0), "g")],
    )  # fmt: skip
    x = np.random.default_rng(0).uniform(-1, 1, (BATCH, 1, 28, 28))
    for step, keeps in ((dcgan_step(), [[False, False], [False]]), (undetached, [[False, True], [False]])):
        loop = steps.MultiModelLoop(step, "torch")
        assert [[keep for _, keep, _ in phase] for phase in loop._evaluator.passes] == keeps
        assert all(np.isfinite(list(loop.step(x).values())).all() for _ in range(2))


def test_a_bce_of_values_outside_0_1_is_nan_on_torch_as_on_numpy():
    """torch's binary_cross_entropy refuses such values with an error; the step computes the
    expression instead (NaN, as every other backend), not a traceback."""
    model = steps.Model("m")
    x = steps.batch()
    loss = steps.bce(model(x), 1.0) + steps.bce(model(x) * 2, 0.0)
    sgd = steps.OptimizerOver(ut.SGD(0.1), ["m"])
    step = steps.MultiStep(models={"m": ut.Sequential(ut.Linear(3, 1))}, optimizers={"o": sgd},
                           phases=[steps.Phase("p", loss, "o")])  # fmt: skip
    x = 5 * np.random.default_rng(0).standard_normal((8, 3))
    for backend in ("numpy", "torch"):
        assert np.isnan(steps.MultiModelLoop(step, backend).step(x)["p"])


def test_noise_is_drawn_once_for_every_backend():
    """The core draws the noise: a seeded stream, the same arrays whatever the backend, resumable."""
    step = dcgan_step()
    first, second = steps.NoiseStream(5), steps.NoiseStream(5)
    a = first.draw(step.noise, 4, np.float32)[step.noise[0]]
    state = first.state()
    b = first.draw(step.noise, 4, np.float32)[step.noise[0]]
    np.testing.assert_array_equal(a, second.draw(step.noise, 4, np.float32)[step.noise[0]])
    second.set_state(state)
    np.testing.assert_array_equal(b, second.draw(step.noise, 4, np.float32)[step.noise[0]])
    assert a.shape == (4, NZ, 1, 1) and not np.array_equal(a, b)


def test_detach_stops_the_gradient_on_every_backend():
    """A loss that uses one value twice, once detached: only the other use may carry gradient."""
    model = ut.Sequential(ut.Linear(3, 2))
    net = steps.Model("net")
    out = net(steps.batch())
    step = steps.MultiStep({"net": model}, {"sgd": steps.OptimizerOver(ut.optim.SGD(0.1), ["net"])},
                           [steps.Phase("only", (out * steps.detach(out)).sum(), "sgd")])  # fmt: skip
    x = np.random.default_rng(0).normal(size=(4, 3))
    weights = ut.init_weights(model, 0)
    torch_model = nn.Sequential(nn.Linear(3, 2)).double()
    _load(torch_model, weights, torch.float64)
    y = torch_model(torch.from_numpy(x))
    (y * y.detach()).sum().backward()
    expected = torch_model[0].weight.detach().numpy() - 0.1 * torch_model[0].weight.grad.numpy()
    for backend in BACKENDS[:3]:  # MindSpore has no float64; its detach is checked by the conformance check
        loop = steps.MultiModelLoop(step, backend, dtype="float64")
        loop.loops["net"].load_state_dict(weights)
        loop.step(x)
        # one float64 step through a 3-input layer: the conformance formula over that chain
        allowed = tolerance(np.float64, 3, float(np.abs(expected).max()))
        np.testing.assert_allclose(loop.loops["net"].state_dict()["0.weight"], expected, rtol=0, atol=allowed,
                                   err_msg=backend)  # fmt: skip


def test_round_trips_through_json():
    import json

    step = vae_step()
    again = steps.MultiStep.from_dict(json.loads(json.dumps(step.to_dict())))
    assert again == step
    assert again.noise == step.noise


def _simple(**overrides):
    a, b = ut.Sequential(ut.Linear(2, 2)), ut.Sequential(ut.Linear(2, 1))
    first, second = steps.Model("a"), steps.Model("b")
    arguments = dict(
        models={"a": a, "b": b},
        optimizers={"opt_a": steps.OptimizerOver(Adam(), ["a"]), "opt_b": steps.OptimizerOver(Adam(), ["b"])},
        phases=[steps.Phase("one", second(first(steps.batch())).mean(), "opt_a")],
    )
    arguments.update(overrides)
    return arguments


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(phases=[steps.Phase("one", steps.Model("a")(steps.batch()).mean(), None)]),
         "phase 'one' updates no parameters"),
        (dict(models=[("a", ut.Sequential(ut.Linear(2, 2))), ("a", ut.Sequential(ut.Linear(2, 1)))]),
         "model 'a' is named twice"),
        (dict(optimizers={"opt_a": steps.OptimizerOver(Adam(), ["a"]),
                          "none": steps.OptimizerOver(Adam(), [])}), "optimizer 'none' has no parameters"),
        (dict(models={"a": ut.Sequential(ut.Linear(2, 2)), "b": ut.Sequential(ut.ReLU())},
              optimizers={"opt_a": steps.OptimizerOver(Adam(), ["a"]), "opt_b": steps.OptimizerOver(Adam(), ["b"])}),
         "optimizer 'opt_b' has no parameters"),
        (dict(phases=[steps.Phase("one", steps.Model("b")(steps.detach(steps.Model("a")(steps.batch()))).mean(),
                                  "opt_a")]), "its loss does not depend on the parameters of ['a']"),
        (dict(phases=[steps.Phase("one", steps.Model("a")(steps.batch()), "opt_a")]), "the loss must be a scalar"),
        (dict(phases=[steps.Phase("one", steps.Model("c")(steps.batch()).mean(), "opt_a")]),
         "calls model 'c'"),
        (dict(optimizers={"opt_a": steps.OptimizerOver(Adam(), ["a"]), "again": steps.OptimizerOver(Adam(), ["a"])}),
         "model 'a' is in two optimizers"),
        (dict(phases=[steps.Phase("one", ("mean", ("pred",), None), "opt_a")]),
         "phase 'one': unknown operation 'pred'"),
    ],
)  # fmt: skip
def test_refuses_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        steps.MultiStep(**_simple(**overrides))
    assert "\n" not in str(caught.value)


def test_a_batch_the_models_cannot_take_is_refused_in_one_line():
    loop = steps.MultiModelLoop(dcgan_step(), "numpy")
    for batch, message in ((np.zeros((4, 3, 28, 28)), "channels"), (np.full((4, 1, 28, 28), np.nan), "NaN")):
        with pytest.raises(InputError, match=message) as caught:
            loop.step(batch)
        assert "\n" not in str(caught.value)


def test_one_spec_under_two_names_is_refused():
    shared = ut.Sequential(ut.Linear(2, 2))
    with pytest.raises(ValueError, match="one model spec is given twice, as 'a' and 'b'"):
        steps.MultiStep(**_simple(models={"a": shared, "b": shared}))


# --- the examples --------------------------------------------------------------------------


def test_the_examples_train_print_their_losses_and_save_each_model(tmp_path, capsys):
    dcgan = example("dcgan")
    losses = dcgan.main(["--backend", "numpy", "--max-steps", "2", "--features", "4", "--nz", "8",
                         "--batch-size", "16", "--save-weights", str(tmp_path / "dcgan")])  # fmt: skip
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (f"final losses: discriminator {losses['discriminator']:.6f}  "
                                    f"generator {losses['generator']:.6f}")  # fmt: skip
    saved = ut.make_loop("numpy", dcgan.generator(8, 4), ut.MSELoss())
    saved.load_weights(tmp_path / "dcgan" / "generator.safetensors")
    assert (tmp_path / "dcgan" / "discriminator.safetensors").is_file()
    assert not np.allclose(saved.state_dict()["0.weight"], 0)

    vae = example("vae")
    result = vae.main(["--backend", "numpy", "--max-steps", "2", "--batch-size", "16",
                       "--save-weights", str(tmp_path / "vae"), "--plot", str(tmp_path / "vae.png")])  # fmt: skip
    assert (tmp_path / "vae.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    out = capsys.readouterr().out
    assert f"====> Test set loss: {result['test']:.4f}" in out
    assert sorted(path.name for path in (tmp_path / "vae").iterdir()) == ["decoder.safetensors", "encoder.safetensors"]
    # an untrained VAE's test loss: about 784 * log(2) ~ 543 per image, as the example's first lines
    assert 300 < result["test"] < 600


def test_the_dcgan_recipe_and_example_draw_the_tutorial_s_weights_identically_on_every_backend(monkeypatch):
    """``weights_init`` of the DCGAN tutorial through ``weight_init=``: every Conv2d and
    ConvTranspose2d weight ~ N(0, 0.02), every BatchNorm weight ~ N(1, 0.02), biases 0; the
    recipe's models are the example's, and the four backends start from the same bits."""
    from unitrain.multi_run import load_multi_recipe

    monkeypatch.chdir(EXAMPLES.parent)  # the recipe's module:function models import from the repository's root
    run = load_multi_recipe(EXAMPLES / "recipes" / "dcgan.toml")
    step, _ = run.build()
    assert dict(step.models) == dict(example("dcgan").dcgan(100, 16).models)
    drawn = {model: ut.init_weights(spec, run.seed + index) for index, (model, spec) in enumerate(step.models)}
    # each model's loop as MultiModelLoop makes it: seeded with the run's seed plus the model's index
    states = {backend: {model: ut.make_loop(backend, spec, ut.MSELoss(), seed=run.seed + index).state_dict()
                        for index, (model, spec) in enumerate(step.models)} for backend in BACKENDS}  # fmt: skip
    for backend, state in states.items():
        for model, weights in drawn.items():
            assert state[model].keys() == weights.keys()
            for key, value in weights.items():
                np.testing.assert_array_equal(state[model][key], value, err_msg=f"{backend}: {model}.{key}")
    for model, spec in step.models:
        kinds = dict(spec.named_layers())
        for key, value in drawn[model].items():
            layer, leaf = kinds[key.rpartition(".")[0]], key.rpartition(".")[2]
            if leaf in ("bias", "running_mean", "num_batches_tracked"):
                assert not value.any(), key
                continue
            if leaf == "running_var":
                assert (value == 1).all(), key
                continue
            mean = 1.0 if isinstance(layer, ut.BatchNorm2d) else 0.0
            # the sample mean and standard deviation of n normal draws lie within 5 of their standard
            # errors, sigma / sqrt(n) and sigma / sqrt(2 n), but once in 1.7 million
            n, sigma = value.size, 0.02
            assert abs(value.mean(dtype=np.float64) - mean) < 5 * sigma / np.sqrt(n), key
            assert abs(value.std(dtype=np.float64) - sigma) < 5 * sigma / np.sqrt(2 * n), key


@pytest.mark.parametrize("name", ["dcgan", "vae"])
def test_the_examples_refuse_bad_input_in_one_line(name, capsys):
    for argv, message in ((["--backend", "tensorflow"], "unknown backend"), (["--max-steps", "0"], "--max-steps")):
        with pytest.raises(SystemExit) as exit_info:
            example(name).main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


# --- checkpoints ---------------------------------------------------------------------------


def small_gan():
    """An MLP GAN with BatchNorm: every kind of state (weights, running statistics, Adam's buffers)."""
    gen, disc = steps.Model("g"), steps.Model("d")
    fake = gen(steps.uniform(3))
    adam = Adam(1e-2, betas=(0.5, 0.999))
    return steps.MultiStep(
        models={"g": ut.Sequential(ut.Linear(3, 6), ut.BatchNorm1d(6), ut.ReLU(), ut.Linear(6, 4), ut.Tanh()),
                "d": ut.Sequential(ut.Linear(4, 6), ut.LeakyReLU(0.2), ut.Linear(6, 1), ut.Sigmoid())},
        optimizers={"d": steps.OptimizerOver(adam, ["d"]), "g": steps.OptimizerOver(adam, ["g"])},
        phases=[steps.Phase("d", steps.bce(disc(steps.batch()), 1.0) + steps.bce(disc(steps.detach(fake)), 0.0), "d"),
                steps.Phase("g", steps.bce(disc(fake), 1.0), "g")],
    )  # fmt: skip


def dropout_gan():
    """small_gan with Dropout in both models: the discriminator runs three times a step (three
    masks), the generator once, its call repeated by the second phase (which must reuse its mask)."""
    gen, disc = steps.Model("g"), steps.Model("d")
    fake = gen(steps.uniform(3))
    sgd = ut.optim.SGD(0.5)
    return steps.MultiStep(
        models={"g": ut.Sequential(ut.Linear(3, 6), ut.BatchNorm1d(6), ut.Tanh(), ut.Dropout(0.5), ut.Linear(6, 4)),
                "d": ut.Sequential(ut.Linear(4, 6), ut.Tanh(), ut.Dropout(0.25), ut.Linear(6, 1), ut.Sigmoid())},
        optimizers={"d": steps.OptimizerOver(sgd, ["d"]), "g": steps.OptimizerOver(sgd, ["g"])},
        phases=[steps.Phase("d", steps.bce(disc(steps.batch()), 1.0) + steps.bce(disc(steps.detach(fake)), 0.0), "d"),
                steps.Phase("g", steps.bce(disc(fake), 1.0), "g")],
    )  # fmt: skip


def dropout_after_noise():
    """A VAE on samples of 4 values whose encoder draws its own noise (``randn_like``, lifted into
    the step) and whose decoder has Dropout: the decoder's masks take the shape of the encoder's
    output, which MindSpore infers before its graph runs."""
    x = ut.graph.Input((4,), name="x")
    mu, logvar = ut.Linear(4, 3), ut.Linear(4, 3)
    z = mu(x) + ut.ops.randn_like(logvar(x)) * (0.5 * logvar(x)).exp()
    encode, decode = steps.Model("encoder"), steps.Model("decoder")
    return steps.MultiStep(
        models={"encoder": ut.graph.Graph(x, z, {"mu": mu, "logvar": logvar}),
                "decoder": ut.Sequential(ut.Linear(3, 6), ut.Tanh(), ut.Dropout(0.5), ut.Linear(6, 4))},
        optimizers={"sgd": steps.OptimizerOver(ut.optim.SGD(0.1), ["encoder", "decoder"])},
        phases=[steps.Phase("vae", ((decode(encode(steps.batch())) - steps.batch()) ** 2).mean(), "sgd")],
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["chainer", "mindspore"])
@pytest.mark.parametrize("case", [dropout_gan, dropout_after_noise])
def test_dropout_in_a_step_draws_the_masks_of_the_numpy_backend(backend, case):
    """Chainer and MindSpore draw each model call's dropout masks from that model's loop stream, in
    the order the calls run, as the NumPy backend does (PyTorch draws from its generator); a call
    that repeats an earlier phase's reuses its masks. So from the same weights the three runs take
    the same steps: within the conformance formula twice over (each float32 run within it of the
    exact one), over the chain of the 4 steps' sums of 8 samples x 6 inputs (the widest: the VAE's
    loss sums 8 x 4); another mask moves a loss by ~0.1."""
    batches = np.random.default_rng(2).uniform(-1, 1, (4, 8, 4)).astype(np.float32)
    runs = {}
    for name in ("numpy", backend):
        loop = steps.MultiModelLoop(case(), name, seed=4)
        runs[name] = ([list(loop.step(x).values()) for x in batches], _flat(loop.state_dicts()))
    allowed = 2 * tolerance(np.float32, len(batches) * 8 * 6)
    np.testing.assert_allclose(runs[backend][0], runs["numpy"][0], rtol=0, atol=allowed)
    for key, value in runs["numpy"][1].items():
        np.testing.assert_allclose(runs[backend][1][key], value, rtol=0, atol=allowed * max(1, np.abs(value).max()),
                                   err_msg=key)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS[:3])  # MindSpore passes too, in 13 s of eager ops: left out for time
def test_resuming_from_a_checkpoint_continues_bit_for_bit(backend, tmp_path):
    batches = np.random.default_rng(2).uniform(-1, 1, (4, 8, 4))
    straight = steps.MultiModelLoop(small_gan(), backend, seed=4)
    straight_losses = [straight.step(x) for x in batches]
    first = steps.MultiModelLoop(small_gan(), backend, seed=4)
    losses = [first.step(x) for x in batches[:2]]
    first.save_checkpoint(tmp_path / "run.safetensors")
    resumed = steps.MultiModelLoop(small_gan(), backend, seed=9)  # other initial weights and noise, all replaced
    resumed.load_checkpoint(tmp_path / "run.safetensors")
    losses += [resumed.step(x) for x in batches[2:]]
    assert losses == straight_losses and resumed.step_count == 4
    for name, state in straight.state_dicts().items():
        for key, value in state.items():
            np.testing.assert_array_equal(resumed.loops[name].state_dict()[key], value, err_msg=f"{name}.{key}")
        for key, value in straight.loops[name].optimizer_state_dict().items():
            np.testing.assert_array_equal(resumed.loops[name].optimizer_state_dict()[key], value, err_msg=key)


def test_the_examples_refuse_checkpoint_and_compare_options_they_cannot_follow_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / step_checkpoints.CHECKPOINT_FILE).write_text("")
    cases = ((["--resume"], "--resume needs --checkpoint-dir"),
             (["--checkpoint-dir", tmp_path / "run", "--checkpoint-every", "0"], "--checkpoint-every must be"),
             (["--checkpoint-dir", tmp_path / "file"], "is a file, expected a directory"),
             (["--checkpoint-dir", tmp_path / "used"], "already holds a run's checkpoint; pass --resume"),
             (["--checkpoint-dir", tmp_path / "none", "--resume"], "does not exist"),
             (["--compare", "numpy,tensorflow"], "unknown backend 'tensorflow'"),
             (["--compare", "numpy,numpy"], "a backend named twice"),
             (["--compare", "--checkpoint-dir", tmp_path / "run"], "takes no --checkpoint-dir"),
             (["--compare", "--save-weights", tmp_path / "run"], "--compare saves no weights"))  # fmt: skip
    for name in ("dcgan", "vae"):
        for argv, message in cases:
            with pytest.raises(SystemExit) as exit_info:
                example(name).main([str(value) for value in argv])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "none").exists()


def test_compare_trains_each_backend_from_the_same_weights_and_noise_and_prints_each_loss(tmp_path, capsys):
    tiny = ["--features", "2", "--nz", "4", "--batch-size", "4", "--max-steps", "3"]
    histories = example("dcgan").main([*tiny, "--compare", "numpy,torch,chainer", "--plot", str(tmp_path / "c.png")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "largest |difference|" in line]
    assert [line.split()[:2] for line in lines] == [[phase, backend] for phase in ("discriminator", "generator")
                                                   for backend in ("numpy", "torch", "chainer")]  # fmt: skip
    for line in lines:
        phase, backend, _, final, *_, largest = line.split()
        values = [losses[phase] for losses in histories[backend]]
        assert len(values) == 3 and final == f"{values[-1]:.6f}"
        expected = max(abs(a - b[phase]) for a, b in zip(values, histories["numpy"], strict=True))
        assert largest == f"{expected:.2e}"
    for backend in ("numpy", "chainer"):  # each backend's run is the one --backend makes
        assert example("dcgan").main([*tiny, "--backend", backend]) == histories[backend][-1]
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


TINY_DCGAN = ["--features", "2", "--nz", "4", "--batch-size", "4", "--checkpoint-every", "2"]


def killed_mid_run(command: list[str], checkpoint) -> int:
    """Run ``command`` (a multi-model run that never ends), SIGKILL it once it has checkpointed; the
    step count of the checkpoint it left."""
    # one thread, as this module's own torch runs (another count sums in another order)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as process:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, err
    return int(load_safetensors(checkpoint)[1]["step_count"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS[:3])  # MindSpore's eager ops are not bit-reproducible across processes
def test_a_sigkilled_example_resumes_to_the_weights_of_an_uninterrupted_run(backend, tmp_path, capsys):
    common = [*TINY_DCGAN, "--backend", backend]
    killed = tmp_path / "killed"
    command = [sys.executable, str(EXAMPLES / "dcgan.py"), *common, "--checkpoint-dir", str(killed), "--max-steps",
               "1000000"]  # fmt: skip
    done = killed_mid_run(command, killed / step_checkpoints.CHECKPOINT_FILE)
    target = str(done + 3)  # chosen after the kill: no race with how far the killed run got
    with pytest.raises(SystemExit) as exit_info:  # another run's settings: refused, the checkpoint untouched
        example("dcgan").main([*common, "--seed", "5", "--max-steps", target, "--checkpoint-dir", str(killed),
                               "--resume"])  # fmt: skip
    assert exit_info.value.code == 2 and "seed 999 there, 5 now" in capsys.readouterr().err
    dcgan = example("dcgan")
    resumed = dcgan.main([*common, "--max-steps", target, "--checkpoint-dir", str(killed), "--resume",
                          "--save-weights", str(tmp_path / "resumed")])  # fmt: skip
    straight = dcgan.main([*common, "--max-steps", target, "--save-weights", str(tmp_path / "straight")])
    assert resumed == straight
    for model in ("generator", "discriminator"):
        expected, _ = load_safetensors(tmp_path / "straight" / f"{model}.safetensors")
        got, _ = load_safetensors(tmp_path / "resumed" / f"{model}.safetensors")
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{model}.{key}")
    assert int(load_safetensors(killed / step_checkpoints.CHECKPOINT_FILE)[1]["step_count"]) == done + 3
    with pytest.raises(SystemExit) as exit_info:
        dcgan.main([*common, "--max-steps", target, "--checkpoint-dir", str(killed), "--resume"])
    assert exit_info.value.code == 2 and f"already at step {target}" in capsys.readouterr().err
