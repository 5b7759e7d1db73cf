"""Two rules of a multi-model step (unitrain.steps), on all four backends against plain PyTorch doing
what the rule says: a call repeated from an earlier phase is computed once, so a model's BatchNorm
statistics count each call of the step once, also where a phase calls the model both afresh and as a
repeat; and a graph that draws noise inside itself (``ops.randn_like``) as a model of the step takes
its noise from the step's stream, one draw per call, resumed exactly from a checkpoint."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import TorchRun, TorchRuns, expected_run

import unitrain as ut
from unitrain import expr, ops, steps
from unitrain import layers as L
from unitrain.graph import Graph, Input

BACKENDS = ["numpy", "torch", "chainer", "mindspore"]
#: every backend in float32, and in float64 those that have it (MindSpore's CPU kernels do not)
RUNS = [(backend, dtype) for backend in BACKENDS for dtype in ("float32", "float64")
        if dtype == "float32" or backend != "mindspore"]  # fmt: skip
SEED = 5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    """These cases are small: PyTorch's thread pool would only contend for the busy cores."""


def _load(module, state, dtype):
    module.load_state_dict({key: torch.from_numpy(np.asarray(value)).to(dtype) if np.asarray(value).dtype.kind == "f"
                            else torch.from_numpy(np.asarray(value)) for key, value in state.items()})  # fmt: skip


def _state(module):
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def _flat(states):
    return {f"{model}.{key}": value for model, state in states.items() for key, value in state.items()}


def _reversed_case(batches, noises):
    """The same case in other summation orders: each batch's samples, and their noise, backwards."""
    return [x[::-1].copy() for x in batches], [[part[::-1].copy() for part in noise] for noise in noises]


def _torch_runs(train, weights, batches, noises):
    """``train(weights, batches, noises, dtype)`` as ``TorchRuns``: float32, float64, float32 reversed."""
    return TorchRuns(train(weights, batches, noises, torch.float32), train(weights, batches, noises, torch.float64),
                     train(weights, *_reversed_case(batches, noises), torch.float32))  # fmt: skip


def _unitrain_run(step, weights, batches, backend, dtype):
    loop = steps.MultiModelLoop(step, backend, seed=SEED, dtype=dtype)  # the noise stream the case drew with
    for model, state in weights.items():
        loop.loops[model].load_state_dict(state)
    losses = [list(loop.step(x).values()) for x in batches]
    return TorchRun(_flat(loop.state_dicts()), {}, {"loss": np.array(losses)})


def _assert_within(actual, runs, dtype, size, what):
    expected, tolerances = expected_run(runs, dtype, size)
    for part in ("state", "losses"):
        got, want, bound = getattr(actual, part), getattr(expected, part), getattr(tolerances, part)
        assert list(got) == list(want)
        for key, value in want.items():
            if value.dtype.kind != "f":  # num_batches_tracked: how many calls each BatchNorm counted
                np.testing.assert_array_equal(got[key], value, err_msg=f"{what} {key}")
                continue
            difference = float(np.abs(got[key].astype(np.float64) - value.astype(np.float64)).max(initial=0))
            assert difference <= bound[key], f"{what} {key}: {difference:.3g} > {bound[key]:.3g}"


def _case(step, batch_shape, count, batch):
    """Initial weights (float64), batches and, per step, the step's noise as its loop draws it."""
    rng = np.random.default_rng(SEED)
    weights = {model: {key: value.astype(np.float64) if value.dtype.kind == "f" else value
                       for key, value in ut.init_weights(spec, SEED + index).items()}
               for index, (model, spec) in enumerate(step.models)}  # fmt: skip
    batches = [rng.uniform(-1.0, 1.0, (batch, *batch_shape)) for _ in range(count)]
    stream = steps.NoiseStream(SEED)
    noises = [list(stream.draw(step.noise, batch, np.float64).values()) for _ in batches]  # in step.noise's order
    return weights, batches, noises


# --- a model called afresh and as a repeat in one phase ------------------------------------------

REPEAT_STEPS, REPEAT_BATCH = 4, 16


def repeat_models(kit):
    generator = kit.Sequential(kit.Linear(3, 6), kit.BatchNorm1d(6), kit.ReLU(), kit.Linear(6, 4), kit.Tanh())
    discriminator = kit.Sequential(kit.Linear(4, 6), kit.BatchNorm1d(6), kit.LeakyReLU(0.2), kit.Linear(6, 1),
                                   kit.Sigmoid())  # fmt: skip
    return generator, discriminator


def repeat_step():
    """A GAN whose generator phase scores the discriminator's fake again (a repeat of the first
    phase's ``G(z1)``: the generator is not updated in between) beside a new one, ``G(z2)``: the
    generator's phase calls it both as a repeat and afresh."""
    gen, disc = steps.Model("g"), steps.Model("d")
    fake, other = gen(steps.normal(3)), gen(steps.normal(3))
    sgd = ut.optim.SGD(0.1, momentum=0.9)
    generator, discriminator = repeat_models(ut)
    return steps.MultiStep(
        models={"g": generator, "d": discriminator},
        optimizers={"d": steps.OptimizerOver(sgd, ["d"]), "g": steps.OptimizerOver(sgd, ["g"])},
        phases=[steps.Phase("d", steps.bce(disc(steps.batch()), 1.0) + steps.bce(disc(steps.detach(fake)), 0.0), "d"),
                steps.Phase("g", steps.bce(disc(fake), 1.0) + steps.bce(disc(other), 1.0), "g")],
    )  # fmt: skip


def torch_repeats(weights, batches, noises, dtype):
    """The step's documented semantics in plain PyTorch: ``fake = G(z1)`` once, reused by both
    phases; ``G(z2)`` new in the second; each module call in the order the losses are written."""
    generator, discriminator = (model.to(dtype) for model in repeat_models(nn))
    _load(generator, weights["g"], dtype)
    _load(discriminator, weights["d"], dtype)
    optimizer_d = torch.optim.SGD(discriminator.parameters(), lr=0.1, momentum=0.9)
    optimizer_g = torch.optim.SGD(generator.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, (z1, z2) in zip(batches, noises, strict=True):
        real, z1, z2 = (torch.from_numpy(value).to(dtype) for value in (x, z1, z2))
        optimizer_d.zero_grad()
        d_real = discriminator(real)
        fake = generator(z1)
        loss_d = F.binary_cross_entropy(d_real, torch.ones_like(d_real)) + F.binary_cross_entropy(
            discriminator(fake.detach()), torch.zeros_like(d_real)
        )
        loss_d.backward()
        optimizer_d.step()
        optimizer_g.zero_grad()
        d_fake = discriminator(fake)
        d_other = discriminator(generator(z2))
        loss_g = F.binary_cross_entropy(d_fake, torch.ones_like(d_fake)) + F.binary_cross_entropy(
            d_other, torch.ones_like(d_other)
        )
        loss_g.backward()
        optimizer_g.step()
        losses.append((loss_d.item(), loss_g.item()))
    return TorchRun(_flat({"g": _state(generator), "d": _state(discriminator)}), {}, {"loss": np.array(losses)})


@pytest.fixture(scope="module")
def repeat_case():
    step = repeat_step()
    weights, batches, noises = _case(step, (4,), REPEAT_STEPS, REPEAT_BATCH)
    return step, weights, batches, _torch_runs(torch_repeats, weights, batches, noises)


@pytest.mark.parametrize(("backend", "dtype"), RUNS)
def test_a_call_repeated_beside_a_fresh_one_counts_its_batchnorm_statistics_once(repeat_case, backend, dtype):
    """Running means, variances and ``num_batches_tracked`` of both models (and the weights and
    losses) after 4 steps, against PyTorch's loop: within the float64-derived bounds, the longest sum
    of a step the batch's 16 rows of the 6 hidden features; the call counts exactly."""
    step, weights, batches, runs = repeat_case
    actual = _unitrain_run(step, weights, batches, backend, dtype)
    _assert_within(actual, runs, dtype, REPEAT_BATCH * 6, f"{backend} {dtype}")


# --- a graph that draws noise inside itself, as a model of the step ------------------------------

VAE_STEPS, VAE_BATCH = 20, 8


def noisy_encoder():
    """examples/vae's encoder, small, reparameterising inside itself with ``randn_like``: outputs
    ``z, mu, logvar``."""
    x = Input((12,))
    hidden, mu, logvar = L.Linear(12, 8), L.Linear(8, 4), L.Linear(8, 4)
    h = hidden(x).relu()
    mean, log_variance = mu(h), logvar(h)
    z = mean + ops.randn_like(log_variance) * (0.5 * log_variance).exp()
    return Graph(x, [z, mean, log_variance], {"hidden": hidden, "mu": mu, "logvar": logvar})


def vae_step():
    encode, decode = steps.Model("encoder", outputs=3), steps.Model("decoder")
    images = steps.batch()
    z, mu, logvar = encode(images)  # its noise: lifted into the step, drawn from the step's stream
    kld = -0.5 * (1 + logvar - mu**2 - expr.exp(logvar)).sum()
    return steps.MultiStep(
        models={"encoder": noisy_encoder(), "decoder": ut.Sequential(ut.Linear(4, 12), ut.Sigmoid())},
        optimizers={"sgd": steps.OptimizerOver(ut.optim.SGD(0.01, momentum=0.9), ["encoder", "decoder"])},
        phases=[steps.Phase("vae", steps.bce(decode(z), images, reduction="sum") + kld, "sgd")],
    )


class TorchVAE(nn.Module):
    """The same model in plain PyTorch, its noise passed in (``torch.randn_like``'s draw)."""

    def __init__(self):
        super().__init__()
        self.hidden, self.mu, self.logvar = nn.Linear(12, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.decoder = nn.Linear(4, 12)

    def forward(self, x, eps):
        h = F.relu(self.hidden(x))
        mu, logvar = self.mu(h), self.logvar(h)
        return torch.sigmoid(self.decoder(mu + eps * torch.exp(0.5 * logvar))), mu, logvar


def torch_vae(weights, batches, noises, dtype):
    model = TorchVAE().to(dtype)
    flat = _flat(weights)
    _load(model, {key.removeprefix("encoder.").replace("decoder.0", "decoder"): value for key, value in flat.items()},
          dtype)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for x, (eps,) in zip(batches, noises, strict=True):
        data = torch.from_numpy(x).to(dtype)
        optimizer.zero_grad()
        recon, mu, logvar = model(data, torch.from_numpy(eps).to(dtype))
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = F.binary_cross_entropy(recon, data, reduction="sum") + kld
        loss.backward()
        optimizer.step()
        losses.append((loss.item(),))
    state = {("decoder.0." + key[len("decoder.") :] if key.startswith("decoder.") else "encoder." + key): value
             for key, value in _state(model).items()}  # fmt: skip
    return TorchRun({key: state[key] for key in flat}, {}, {"loss": np.array(losses)})


@pytest.fixture(scope="module")
def vae_case():
    step = vae_step()
    weights, batches, noises = _case(step, (12,), VAE_STEPS, VAE_BATCH)
    batches = [(x + 1) / 2 for x in batches]  # images in [0, 1]: the reconstruction's BCE targets
    return step, weights, batches, _torch_runs(torch_vae, weights, batches, noises)


@pytest.mark.parametrize(("backend", "dtype"), RUNS)
def test_a_graph_drawing_noise_inside_trains_as_pytorch_fed_the_same_draws(vae_case, straight_vae, backend, dtype):
    """20 steps within the float64-derived bounds (the longest sum: the loss's, over the batch's 96
    elements); the draws are the step's stream's, which the case drew the torch noise from."""
    step, weights, batches, runs = vae_case
    actual = straight_vae(backend) if dtype == "float32" else _unitrain_run(step, weights, batches, backend, dtype)
    _assert_within(actual, runs, dtype, VAE_BATCH * 12, f"{backend} {dtype}")


@pytest.fixture(scope="module")
def straight_vae(vae_case):
    """Each backend's uninterrupted float32 run of the case, made once for both tests that read it."""
    step, weights, batches, _ = vae_case
    runs = {}

    def run(backend):
        if backend not in runs:
            runs[backend] = _unitrain_run(step, weights, batches, backend, "float32")
        return runs[backend]

    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_run_draws_the_graph_s_noise_an_uninterrupted_one_draws(vae_case, straight_vae, backend, tmp_path):
    """The draws are the step's stream's, which the checkpoint holds: 10 steps, a checkpoint, a loop
    of another seed (other weights, other noise) loading it and 10 more equal 20 straight steps, bit
    for bit."""
    step, weights, batches, _ = vae_case
    expected = straight_vae(backend)
    first = steps.MultiModelLoop(step, backend, seed=SEED)
    for model, state in weights.items():
        first.loops[model].load_state_dict(state)
    losses = [list(first.step(x).values()) for x in batches[:10]]
    first.save_checkpoint(tmp_path / "run.safetensors")
    resumed = steps.MultiModelLoop(step, backend, seed=SEED + 1)
    resumed.load_checkpoint(tmp_path / "run.safetensors")
    losses += [list(resumed.step(x).values()) for x in batches[10:]]
    np.testing.assert_array_equal(np.array(losses), expected.losses["loss"])
    for key, value in expected.state.items():
        np.testing.assert_array_equal(_flat(resumed.state_dicts())[key], value, err_msg=key)


def test_the_noise_of_a_model_is_lifted_into_the_step_one_draw_per_call():
    """The step's rule, on its spec: each call of a noisy model on its data inputs gets the model's
    noise as new leaves of the step (drawn after the written ones, in the order the phases meet the
    calls); a call an earlier phase made and a later one repeats keeps its draw; another call draws
    anew; a call given its noise takes it as written; the step's JSON keeps the draws as leaves."""
    import json

    encode, decode = steps.Model("encoder", outputs=3), steps.Model("decoder")
    written = steps.uniform(12)
    z, mu, _ = encode(steps.batch())
    z_noisy = encode(steps.batch() + 0.1 * written)[0]
    z_given = encode(steps.batch(), steps.normal(4))[0]
    sgd = steps.OptimizerOver(ut.optim.SGD(0.1), ["encoder", "decoder"])
    models = {"encoder": noisy_encoder(), "decoder": ut.Sequential(ut.Linear(4, 12), ut.Sigmoid())}
    step = steps.MultiStep(models, {"sgd": sgd}, [
        steps.Phase("first", ((decode(z) - steps.batch()) ** 2).mean() + (mu**2).mean(), "sgd"),
        steps.Phase("second", ((decode(z) - decode(z_noisy) + decode(z_given)) ** 2).mean(), "sgd"),
    ])  # fmt: skip
    calls = [node for phase in step.phases for node in steps.postorder([phase.loss])
             if node[0] == "call" and node[1] == "encoder"]  # fmt: skip
    lifted = [call[-1] for call in dict.fromkeys(calls)]
    assert [len(call) for call in dict.fromkeys(calls)] == [4, 4, 4]  # ("call", "encoder", x, noise) each
    written_given, written_uniform = z_given.node[2][3], written.node
    assert lifted[2] == written_given and lifted[0] != lifted[1]
    assert [leaf[1:2] + leaf[3:] for leaf in step.noise] == [("uniform", (12,)), ("normal", (4,)), ("normal", (4,)),
                                                            ("normal", (4,))]  # fmt: skip
    assert step.noise[:2] == (written_uniform, written_given) and step.noise[2:] == (lifted[0], lifted[1])
    again = steps.MultiStep.from_dict(json.loads(json.dumps(step.to_dict())))
    assert again == step and again.noise == step.noise


@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda: (steps.batch(), steps.normal(4), steps.normal(4)),
         "phase 'p' calls model 'encoder' with 3 inputs; it takes 2 (1 without its noise)"),
        (lambda: (steps.batch(), steps.uniform(4)),
         "phase 'p' fills model 'encoder''s normal noise 'randn_like' with uniform noise"),
    ],
)  # fmt: skip
def test_a_noisy_model_called_with_other_inputs_is_refused_in_one_line(inputs, message):
    encode = steps.Model("encoder", outputs=3)
    sgd = steps.OptimizerOver(ut.optim.SGD(0.1), ["encoder"])
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        steps.MultiStep({"encoder": noisy_encoder()}, {"sgd": sgd},
                        [steps.Phase("p", (encode(*inputs())[0] ** 2).mean(), "sgd")])  # fmt: skip
    assert "\n" not in str(caught.value)


NOISY_NETS = """
from unitrain import ops
from unitrain.graph import Graph, Input
from unitrain.layers import Linear


def encoder():
    x = Input((1, 8, 8), name="x")
    hidden, mu, logvar = Linear(64, 12), Linear(12, 4), Linear(12, 4)
    h = hidden(x.flatten()).relu()
    mean, log_variance = mu(h), logvar(h)
    z = mean + ops.randn_like(log_variance) * (0.5 * log_variance).exp()
    return Graph(x, [z, mean, log_variance], {"hidden": hidden, "mu": mu, "logvar": logvar})


def decoder():
    z = Input((4,), name="z")
    fc = Linear(4, 64)
    return Graph(z, fc(z).sigmoid().reshape(-1, 1, 8, 8), {"fc": fc})
"""

NOISY_RECIPE = """
seed = 1
batch_size = 8
epochs = 1
[data]
dataset = "tiny.npz"
normalize = { mean = [0.0], std = [255.0] }
[models]
encoder = "noisynets:encoder"
decoder = "noisynets:decoder"
[optimizers.adam]
type = "Adam"
models = ["encoder", "decoder"]
[values]
z = "encoder(batch)[0]"
mu = "encoder(batch)[1]"
logvar = "encoder(batch)[2]"
[[phases]]
name = "vae"
loss = "bce(decoder(z), batch, reduction='sum') - 0.5 * (1 + logvar - mu ** 2 - exp(logvar)).sum()"
optimizer = "adam"
[pictures]
reconstructions = "decoder(z)"
count = 4
"""


def test_a_recipe_s_noisy_model_trains_and_evaluates_drawing_as_its_predict(tmp_path, monkeypatch, capsys):
    """From a recipe: training draws the model's noise from the step's stream (above); the test
    loss (``evaluate``, and ``evaluate --model``) and the pictures call the model as its loop's
    ``predict`` does, drawing its evaluation noise itself: the figure computed here by hand."""
    from test_hostile_runs import run_cli
    from unitrain.conformance.tolerances import tolerance

    from unitrain import multi_run
    from unitrain.model_report import evaluate_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "noisynets.py").write_text(NOISY_NETS)
    (tmp_path / "vae.toml").write_text(NOISY_RECIPE)
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", x_train=images[:32], y_train=np.zeros(32, np.uint8), x_test=images[32:],
             y_test=np.zeros(8, np.uint8))  # fmt: skip
    status, _, err = run_cli(capsys, "train", "vae.toml", "--max-steps", "2", "--plot", "p.png", "--save", "w")
    assert status == 0 and (tmp_path / "p.png").is_file(), err
    run = multi_run.load_multi_recipe(tmp_path / "vae.toml")
    test = run.datasets()[1]
    loops = steps.MultiModelLoop(run.build()[0], "numpy", seed=run.seed).loops
    for name, loop in loops.items():
        loop.load_weights(tmp_path / "w" / f"{name}.safetensors")
    z, mu, logvar = (np.asarray(value, np.float64) for value in loops["encoder"].predict(test.x))
    decoded = loops["decoder"].predict(z.astype(np.float32)).astype(np.float64)
    reconstruction = -(test.x * np.log(decoded) + (1 - test.x) * np.log(1 - decoded)).sum()
    expected = (reconstruction - 0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum()) / len(test)
    allowed = tolerance(np.float32, len(test) * 64, reconstruction) / len(test)  # a float32 sum of 8 x 64 terms
    assert multi_run.test_losses(run, loops, test) == {"vae": pytest.approx(expected, abs=allowed)}
    assert evaluate_model(run, loops, test, "encoder").losses == {"vae": pytest.approx(expected, abs=allowed)}


def test_a_batch_a_noisy_model_cannot_take_is_refused_in_one_line():
    """A model called on the batch and its lifted noise checks the batch as its own loop's input."""
    from unitrain.loop import InputError

    loop = steps.MultiModelLoop(vae_step(), "numpy")
    for batch, message in ((np.zeros((4, 11)), "expects 12 input features"), (np.full((4, 12), np.nan), "NaN")):
        with pytest.raises(InputError, match=message) as caught:
            loop.step(batch)
        assert "\n" not in str(caught.value)
