"""Multi-model runs from recipes (unitrain.multi_run) through the command line: train with
checkpoints, resume, metrics, pictures and weights; compare, evaluate, convert; the shipped
recipes; a SIGKILL mid-run resumed bit for bit; the refusals, one line each."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import installed_backends
from test_examples import EXAMPLES
from test_generative import killed_mid_run
from test_hostile_runs import on_a_full_disk, run_cli
from unitrain.conformance.tolerances import tolerance

from unitrain import multi_run, steps
from unitrain.model_report import evaluate_model, models_called
from unitrain.step_checkpoints import CHECKPOINT_FILE
from unitrain.weights import load_safetensors, save_safetensors

NETS = """
from unitrain.graph import Graph, Input
from unitrain.layers import BatchNorm1d, Flatten, LeakyReLU, Linear, Sequential, Sigmoid


def generator():
    z = Input((4,), name="z")
    first, second = Linear(4, 12), Linear(12, 64)
    return Graph(z, second(first(z).relu()).tanh().reshape(-1, 1, 8, 8), modules={"first": first, "second": second})


def discriminator():
    return Sequential(Flatten(), Linear(64, 12), BatchNorm1d(12), LeakyReLU(0.2), Linear(12, 1), Sigmoid())


def plain_discriminator():
    return Sequential(Flatten(), Linear(64, 12), LeakyReLU(0.2), Linear(12, 1), Sigmoid())


def no_parameters():
    return Sequential(Sigmoid())
"""

RECIPE = """
seed = 3
batch_size = 8
epochs = 2
[data]
dataset = "tiny.npz"
normalize = {mean = [0.5], std = [0.5]}
[models]
generator = "tinynets:generator"
discriminator = "tinynets:discriminator"
[optimizers.d]
type = "Adam"
lr = 0.01
betas = [0.5, 0.999]
models = ["discriminator"]
[optimizers.g]
type = "Adam"
lr = 0.01
betas = [0.5, 0.999]
models = ["generator"]
[values]
fake = "generator(normal(4))"
[[phases]]
name = "discriminator"
loss = "bce(discriminator(batch), 1.0) + bce(discriminator(detach(fake)), 0.0)"
optimizer = "d"
[[phases]]
name = "generator"
loss = "bce(discriminator(fake), 1.0)"
optimizer = "g"
[pictures]
samples = "generator(uniform(4) * 2 - 1)"
count = 4
"""

BACKENDS = [name for name in ("numpy", "torch", "chainer", "mindspore") if name in installed_backends()]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A directory holding the tiny GAN's recipe, its models' module and 32 training images of 8x8
    (4 steps an epoch), as the current directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocesses' thread count, as this process's torch
    (tmp_path / "tinynets.py").write_text(NETS)
    (tmp_path / "gan.toml").write_text(RECIPE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", x_train=images[:32], y_train=np.zeros(32, np.uint8), x_test=images[32:],
             y_test=np.zeros(8, np.uint8))  # fmt: skip
    return tmp_path


def _records(path):
    """A metrics file's records, refusing anything but strict JSON (no NaN or Infinity)."""
    return [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {path}"))
            for line in path.read_text().splitlines()]  # fmt: skip


def _weights(directory):
    return {name: load_safetensors(directory / f"{name}.safetensors")[0] for name in ("generator", "discriminator")}


def _assert_same_weights(got, expected):
    for name, state in expected.items():
        assert got[name].keys() == state.keys()
        for key, value in state.items():
            np.testing.assert_array_equal(got[name][key], value, err_msg=f"{name}.{key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_writes_metrics_pictures_and_weights_and_resumes_mid_epoch(tiny, backend, capsys, torch_single_thread):
    """Metrics, pictures and weights on every backend; on NumPy, stopped after 3 of 8 steps (mid-epoch)
    and resumed: the same weights bit for bit, and the epoch that the resume split holds the losses
    of all its steps."""
    steps_run = 4 if backend == "mindspore" else 8  # MindSpore's eager ops: slow, and bit-reproducible within
    status, out, err = run_cli(
        capsys,
        "train",
        "gan.toml",
        "--backend",
        backend,
        "--metrics",
        "straight.jsonl",
        "--save",
        "straight",
        "--plot",
        "pictures.png",
        "--max-steps",
        f"{steps_run}",
    )
    assert status == 0, err
    straight = _records(tiny / "straight.jsonl")
    assert [(r["backend"], r["epoch"], r["step"]) for r in straight] == [(backend, 1, 4), (backend, 2, 8)][
        : steps_run // 4
    ]
    assert all(np.isfinite([r["discriminator_loss"], r["generator_loss"]]).all() for r in straight)
    assert (tiny / "pictures.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"drew the pictures of {steps_run // 4} epoch" in out
    if backend != "numpy":  # the resume on torch and chainer: the SIGKILL test (slow); MindSpore: one process only
        return
    args = ("train", "gan.toml", "--backend", backend, "--checkpoint-dir", "ckpt", "--checkpoint-every", "3")
    assert run_cli(capsys, *args, "--max-steps", "3")[0] == 0
    assert load_safetensors(tiny / "ckpt" / CHECKPOINT_FILE)[1]["step_count"] == "3"
    status, out, err = run_cli(capsys, "train", "--resume", "ckpt", "--backend", backend, "--max-steps", "8",
                               "--save", "resumed", "--metrics", "resumed.jsonl")  # fmt: skip
    assert status == 0, err
    _assert_same_weights(_weights(tiny / "resumed"), _weights(tiny / "straight"))
    assert _records(tiny / "resumed.jsonl") == straight  # epoch 1's mean over its 4 steps, 3 before the resume
    status, _, err = run_cli(capsys, "train", "--resume", "ckpt", "--backend", backend)
    assert status == 2 and err == "unitrain: error: --max-steps 8: the checkpoint is already at step 8\n"


def test_compare_evaluate_convert_and_print_recipe(tiny, capsys, torch_single_thread):
    from test_tensorboard import scalars

    status, out, err = run_cli(capsys, "compare", "gan.toml", "--backends", "numpy,torch", "--max-steps", "3",
                               "--json", "c.json", "--report", "report", "--tensorboard", "tb")  # fmt: skip
    assert status == 0, err
    report = json.loads((tiny / "c.json").read_text())
    for backend in ("numpy", "torch"):  # one run per backend, each step's losses (event files hold float32)
        logged = scalars(tiny / "tb" / backend)
        for phase in ("discriminator", "generator"):
            assert logged[f"step/{phase}_loss"] == [
                (step, pytest.approx(losses[phase], rel=2**-23))
                for step, losses in enumerate(report["losses"][backend], 1)
            ]
    lines = [line.split() for line in out.splitlines() if "largest |difference|" in line]
    assert [line[:2] for line in lines] == [[phase, backend] for phase in ("discriminator", "generator")
                                           for backend in ("numpy", "torch")]  # fmt: skip
    for phase, backend, _, final, *_ in lines:
        assert len(report["losses"][backend]) == 3 and final == f"{report['losses'][backend][-1][phase]:.6f}"
    for figure in ("losses.png", "pictures.png"):
        assert (tiny / "report" / figure).read_bytes().startswith(b"\x89PNG")
    # each backend's compared run is the one train makes
    assert run_cli(capsys, "train", "gan.toml", "--max-steps", "3", "--save", "w", "--metrics", "m.jsonl")[0] == 0
    assert _records(tiny / "m.jsonl")[0]["generator_loss"] == pytest.approx(
        np.mean([losses["generator"] for losses in report["losses"]["numpy"]]), rel=1e-12
    )
    status, out, err = run_cli(capsys, "evaluate", "--recipe", "gan.toml", "--weights", "w")
    assert status == 0 and out.startswith("w on numpy: test discriminator loss ") and "test generator loss" in out
    run = multi_run.load_multi_recipe(tiny / "gan.toml")
    loop = steps.MultiModelLoop(run.build()[0], "numpy")
    for name in ("generator", "discriminator"):
        loop.loops[name].load_state_dict(load_safetensors(tiny / "w" / f"{name}.safetensors")[0])
    expected = multi_run.test_losses(run, loop.loops, run.datasets()[1])
    assert f"test discriminator loss {expected['discriminator']:.4f}" in out
    status, _, err = run_cli(capsys, "convert", "w/discriminator.safetensors", "d.pt", "--model",
                             "tinynets:discriminator")  # fmt: skip
    assert status == 0, err
    import torch

    converted = torch.load(tiny / "d.pt")
    np.testing.assert_array_equal(converted["1.weight"].numpy(), _weights(tiny / "w")["discriminator"]["1.weight"])
    status, out, _ = run_cli(capsys, "train", "gan.toml", "--epochs", "7", "--print-recipe")
    assert status == 0 and "epochs = 7" in out and 'fake = "generator(normal(4))"' in out


def test_train_draws_a_progress_bar_logs_to_tensorboard_and_keeps_the_newest_checkpoints(tiny, capsys):
    """``--progress``, ``--tensorboard`` and ``--keep`` as a one-model run has them: each step's
    phase losses and each epoch's record in the event files (read with TensorBoard's own reader),
    the newest K checkpoints kept, an earlier one a checkpoint that resumes to the same weights."""
    from test_tensorboard import scalars

    status, _, err = run_cli(capsys, "train", "gan.toml", "--max-steps", "8", "--checkpoint-dir", "ckpt",
                               "--checkpoint-every", "2", "--keep", "2", "--tensorboard", "tb", "--metrics",
                               "m.jsonl", "--save", "straight", "--progress")  # fmt: skip
    assert status == 0, err
    assert "\repoch 1:" in err and "\repoch 2:" in err and "/4 [" in err  # tqdm's bar, one per epoch of 4 steps
    logged, records = scalars(tiny / "tb"), _records(tiny / "m.jsonl")
    for phase in ("discriminator", "generator"):
        assert [step for step, _ in logged[f"step/{phase}_loss"]] == list(range(1, 9))
        losses = np.array([value for _, value in logged[f"step/{phase}_loss"]]).reshape(2, 4)
        for record, epoch_losses in zip(records, losses, strict=True):  # event files hold float32: rounded once
            np.testing.assert_allclose(epoch_losses.mean(), record[f"{phase}_loss"], rtol=2**-23)
        assert logged[f"epoch/{phase}_loss"] == [(r["epoch"], pytest.approx(r[f"{phase}_loss"], rel=2**-23))
                                                 for r in records]  # fmt: skip
    assert "epoch/step" not in logged
    kept = sorted(path.name for path in (tiny / "ckpt").glob("*.safetensors"))
    assert kept == ["checkpoint-6.safetensors", CHECKPOINT_FILE]
    assert load_safetensors(tiny / "ckpt" / "checkpoint-6.safetensors")[1]["step_count"] == "6"
    shutil.copy(tiny / "ckpt" / "checkpoint-6.safetensors", tiny / "ckpt" / CHECKPOINT_FILE)
    status, _, err = run_cli(capsys, "train", "--resume", "ckpt", "--max-steps", "8", "--save", "resumed")
    assert status == 0, err
    _assert_same_weights(_weights(tiny / "resumed"), _weights(tiny / "straight"))


def _loops_with(run, directory, backend="numpy"):
    loop = steps.MultiModelLoop(run.build()[0], backend, seed=run.seed)
    for name, state in _weights(directory).items():
        loop.loops[name].load_state_dict(state)
    return loop


def test_evaluate_of_one_model_reports_what_its_phase_trains_it_on(tiny, capsys, torch_single_thread):
    """``evaluate --model discriminator``: its phase's loss, and its outputs on real and generated
    images with the bce and the accuracy against their labels, computed here by hand from each
    model's own predictions; the same on every backend; an unknown model refused in one line."""
    assert run_cli(capsys, "train", "gan.toml", "--max-steps", "3", "--save", "w")[0] == 0
    run = multi_run.load_multi_recipe(tiny / "gan.toml")
    step, test = run.build()[0], run.datasets()[1]
    loop = _loops_with(run, tiny / "w")
    (leaf,) = step.noise  # fake's normal(4), drawn for the test set as evaluate draws it
    noise = steps.NoiseStream(run.seed).draw([leaf], len(test), np.float32)[leaf]
    real = loop.loops["discriminator"].predict(test.x).astype(np.float64)
    fake = loop.loops["discriminator"].predict(loop.loops["generator"].predict(noise)).astype(np.float64)
    real_bce, fake_bce = -np.log(real).mean(), -np.log(1 - fake).mean()
    expected = {
        "discriminator(batch)": {"mean": real.mean(), "std": real.std(), "bce against 1.0": real_bce,
                                 "accuracy as 1.0": (real > 0.5).mean()},
        "discriminator(fake)": {"mean": fake.mean(), "std": fake.std(), "bce against 0.0": fake_bce,
                                "accuracy as 0.0": (fake <= 0.5).mean()},
    }  # fmt: skip
    allowed = tolerance(np.float32, 2 * len(test), 1.0)  # a mean of logarithms over the batch, in float32
    for backend in BACKENDS:
        report = evaluate_model(run, _loops_with(run, tiny / "w", backend).loops, test, "discriminator")
        assert report.outputs.keys() == expected.keys() and report.samples == len(test)
        for text, figures in expected.items():
            assert report.outputs[text].keys() == figures.keys()
            for key, value in figures.items():
                assert report.outputs[text][key] == pytest.approx(value, abs=allowed), (backend, text, key)
        assert report.losses == {"discriminator": pytest.approx(real_bce + fake_bce, abs=allowed)}, backend
    status, out, err = run_cli(capsys, "evaluate", "--recipe", "gan.toml", "--weights", "w", "--model", "discriminator")
    report = evaluate_model(run, loop.loops, test, "discriminator")
    assert status == 0 and out.splitlines() == ["w on numpy: discriminator over 8 test images",
                                                *(f"  {line}" for line in report.lines())], err  # fmt: skip
    assert "  discriminator(fake): mean " in out and "accuracy as 0.0 " in out
    generator = evaluate_model(run, loop.loops, test, "generator")
    assert list(generator.losses) == ["generator"] and list(generator.outputs) == ["generator(normal(4))"]
    assert generator.losses["generator"] == pytest.approx(-np.log(fake).mean(), abs=allowed)
    status, out, err = run_cli(capsys, "evaluate", "--recipe", "gan.toml", "--weights", "w", "--model", "encoder")
    assert (
        status == 2
        and out == ""
        and err
        == ("unitrain: error: --model 'encoder': expected one of the recipe's models, generator, discriminator\n")
    )


def test_evaluate_of_a_vae_s_decoder_and_encoder(monkeypatch, tmp_path):
    """The shipped VAE recipe from its first weights: the decoder's reconstruction loss per test
    image (``bce(..., reduction='sum')``, about 784 log 2 untrained), the encoder's mu and logvar,
    each computed here by hand from the models' predictions and the recipe's noise."""
    monkeypatch.chdir(EXAMPLES.parent)
    run = multi_run.load_multi_recipe(EXAMPLES / "recipes" / "vae.toml")
    step, test = run.build()[0], run.datasets()[1]
    test = test.subset(np.arange(4))  # one batch: a float32 sum of 4 * 784 terms
    loops = steps.MultiModelLoop(step, "numpy", seed=run.seed).loops
    (leaf,) = step.noise
    eps = steps.NoiseStream(run.seed).draw([leaf], len(test), np.float32)[leaf]
    mu, logvar = (np.asarray(value, np.float64) for value in loops["encoder"].predict(test.x))
    decoded = loops["decoder"].predict((mu + eps * np.exp(0.5 * logvar)).astype(np.float32)).astype(np.float64)
    reconstruction = -(test.x * np.log(decoded) + (1 - test.x) * np.log(1 - decoded)).sum()
    decoder = evaluate_model(run, loops, test, "decoder")
    (text,) = decoder.outputs
    assert text == "decoder(mu + normal(20) * exp(0.5 * logvar))" and list(decoder.losses) == ["vae"]
    assert 500 < reconstruction / len(test) < 600
    allowed = tolerance(np.float32, 4 * 784, reconstruction) / len(test)
    assert decoder.outputs[text]["bce against batch"] == pytest.approx(reconstruction / len(test), abs=allowed)
    kl = -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum()
    assert decoder.losses["vae"] == pytest.approx((reconstruction + kl) / len(test), abs=allowed)
    encoder = evaluate_model(run, loops, test, "encoder")
    assert encoder.losses == decoder.losses and list(encoder.outputs) == ["encoder(batch)[0]", "encoder(batch)[1]"]
    for figures, values in zip(encoder.outputs.values(), (mu, logvar), strict=True):  # float64 sums of 80 terms
        assert figures == pytest.approx({"mean": values.mean(), "std": values.std()}, abs=tolerance(np.float64, 80))
    assert models_called(run, "encoder") == ["encoder", "decoder"]


def _mutated(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


HOSTILE = {
    "a model named twice": (
        lambda r: _mutated(
            r,
            'discriminator = "tinynets:discriminator"',
            'discriminator = "tinynets:discriminator"\ngenerator = "tinynets:generator"',
        ),
        "is not valid TOML",
    ),
    "a phase that updates no parameters": (
        lambda r: _mutated(r, 'optimizer = "g"\n', ""),
        "phase 'generator' updates no parameters",
    ),
    "an optimizer without parameters": (
        lambda r: _mutated(r, 'models = ["generator"]', "models = []"),
        "optimizer 'g' has no parameters to update",
    ),
    "an optimizer over a model without parameters": (
        lambda r: _mutated(
            r, "[optimizers.d]", '[optimizers.n]\ntype = "SGD"\nlr = 0.1\nmodels = ["plain"]\n[optimizers.d]'
        ).replace("[models]", '[models]\nplain = "tinynets:no_parameters"'),
        "optimizer 'n' has no parameters to update",
    ),
    "an unknown model in a phase": (
        lambda r: _mutated(r, "bce(discriminator(fake), 1.0)", "bce(critic(fake), 1.0)"),
        "phases[1].loss: unknown function 'critic'; expected a model (generator, discriminator)",
    ),
    "an unknown model in an optimizer": (
        lambda r: _mutated(r, 'models = ["generator"]', 'models = ["gen"]'),
        "optimizer 'g' names model 'gen'",
    ),
    "a model in two optimizers": (
        lambda r: _mutated(r, 'models = ["generator"]', 'models = ["discriminator"]'),
        "model 'discriminator' is in two optimizers",
    ),
    "a loss its optimizer cannot lower": (
        lambda r: _mutated(r, "bce(discriminator(fake), 1.0)", "bce(discriminator(detach(fake)), 1.0)"),
        "phase 'generator': its loss does not depend on the parameters of ['generator']",
    ),
    "code in a loss": (
        lambda r: _mutated(r, "bce(discriminator(fake), 1.0)", "__import__('os').system('true')"),
        "phases[1].loss: cannot call \"__import__('os').system\"",
    ),
    "a lambda in a value": (
        lambda r: _mutated(r, '"generator(normal(4))"', '"(lambda: 1)()"'),
        "values.fake: cannot call 'lambda: 1'",
    ),
    "a multi-output model uncalled by index": (
        lambda r: _mutated(r, "generator(normal(4))", "generator(normal(4))[1]"),
        "output 1 of model 'generator', which has 1",
    ),
    "a bad noise shape": (
        lambda r: _mutated(r, "generator(normal(4))", "generator(normal(0))"),
        "normal: shape must be per-sample sizes",
    ),
    "a loss nested a thousand deep": (
        lambda r: _mutated(r, '"bce(discriminator(fake), 1.0)"', '"bce(discriminator(fake), 1.0)' + "+1" * 980 + '"'),
        "phases[1].loss: nests 984 deep; expected at most 100",
    ),
    "noise no memory holds": (  # 8 PB a batch: NumPy's allocation error was a traceback
        lambda r: _mutated(r, "generator(normal(4))", "generator(normal(1000000000000000))"),
        "phases: its noise is 1,000,000,000,000,000 values a sample",
    ),
    "pictures no memory holds": (
        lambda r: _mutated(r, "count = 4", "count = 1000000000000000"),
        "pictures: its noise is 4 values a sample",
    ),
    "a flag the recipe owns": (lambda r: r, "--lr does not apply to a multi-model recipe"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_bad_recipes_are_refused_in_one_line(tiny, case, capsys):
    mutate, message = HOSTILE[case]
    (tiny / "bad.toml").write_text(mutate(RECIPE))
    extra = ["--lr", "0.1"] if case == "a flag the recipe owns" else []
    status, _, err = run_cli(capsys, "train", "bad.toml", "--max-steps", "1", "--save", "out", *extra)
    assert status == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tiny / "out").exists()


def test_a_loss_no_split_of_the_batch_computes_is_refused_before_processes_start(tiny, capsys):
    mixed = RECIPE.replace("bce(discriminator(fake), 1.0)", "bce(discriminator(fake), 1.0) + (fake ** 2).sum()")
    (tiny / "mixed.toml").write_text(mixed)
    status, _, err = run_cli(capsys, "train", "mixed.toml", "--nproc", "2", "--max-steps", "1")
    assert status == 2 and err == ("unitrain: error: phase 'generator' cannot be split over processes: it adds a "
                                   "mean over the batch to a sum over it\n")  # fmt: skip
    status, _, err = run_cli(capsys, "train", "gan.toml", "--nproc", "9", "--max-steps", "1")
    assert status == 2 and err == "unitrain: error: batch_size 8: 9 processes need a row each\n"


def test_an_evaluator_that_takes_no_shares_is_refused_data_parallel(tiny, capsys, monkeypatch):
    """Every built-in evaluator sums each phase's gradients over the ranks; another adapter's whose
    ``run`` takes no shares (``weights``) runs in one process, and ``--nproc`` says so in one line."""
    from unitrain import registry

    assert all(steps.runs_data_parallel(steps.evaluator_of(registry.get_backend(name))) for name in BACKENDS)
    numpy_loop = registry.get_backend("numpy")

    class OneProcessOnly(steps.evaluator_of(numpy_loop)):
        def run(self, x, noise):
            return super().run(x, noise)

    monkeypatch.setattr(numpy_loop, "multi_model_evaluator", OneProcessOnly, raising=False)
    status, _, err = run_cli(capsys, "train", "gan.toml", "--nproc", "2", "--max-steps", "1")
    assert (
        status == 2
        and err == "unitrain: error: --nproc: the numpy backend runs a multi-model step in one process only\n"
    )


def test_a_checkpoint_whose_records_were_tampered_with_is_refused_in_one_line(tiny, capsys):
    assert run_cli(capsys, "train", "gan.toml", "--max-steps", "1", "--checkpoint-dir", "run")[0] == 0
    path = tiny / "run" / CHECKPOINT_FILE
    tensors, metadata = load_safetensors(path)
    progress = json.loads(metadata["progress"])
    for field, value, message in (("steps", -1, "field 'progress.steps': expected an integer"),
                                  ("sums", {"d": "1"}, "field 'progress.sums.d': expected a number, got '1'"),
                                  ("pictures", [{"samples": '[[1, 2], "AAAA"]'}], "a picture of shape [1, 2]"),
                                  ("pictures", [{"samples": '[[1, 1, 1, 9], "AAAA"]'}], "cannot reshape")):  # fmt: skip
        save_safetensors(path, tensors, {**metadata, "progress": json.dumps({**progress, field: value})})
        status, _, err = run_cli(capsys, "train", "--resume", "run", "--max-steps", "2")
        assert status == 2 and err.count("\n") == 1 and "holds no multi-model run's progress" in err, err
        assert message in err, err
    save_safetensors(path, tensors, {**metadata, "multi_run": '{"models": 5}'})
    status, _, err = run_cli(capsys, "train", "--resume", "run", "--max-steps", "2")
    assert status == 2 and err.count("\n") == 1 and "records no multi-model run" in err, err


def test_a_metrics_file_on_a_full_disk_is_one_line(tiny):
    result, lines, listing = on_a_full_disk(tiny, "train", "gan.toml", "--max-steps", "1", "--metrics",
                                            "DISK/m.jsonl")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert lines[-1] == f"unitrain: error: {tiny / 'disk' / 'm.jsonl'}: No space left on device"
    assert "Traceback" not in result.stderr and listing == ["user.txt"]


def test_a_weights_file_that_appeared_during_the_run_is_kept_and_ours_goes_beside_it(tiny, capsys, monkeypatch):
    """As the one-model --save: it was published beside it with exit code 0 and no word on stderr."""
    from unitrain import datasets

    load_datasets = datasets.load_datasets

    def load_then_create(*args, **kwargs):  # after the start-up checks, as a user (or another job) would
        (tiny / "out").mkdir()
        (tiny / "out" / "generator.safetensors").write_bytes(b"the user's")
        return load_datasets(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_datasets", load_then_create)
    status, out, err = run_cli(capsys, "train", "gan.toml", "--max-steps", "1", "--save", "out", "--no-progress")
    assert status == 2
    assert err.splitlines() == ["unitrain: --save out/generator.safetensors appeared during the run; kept it and wrote "
                                "the generator's weights to out/generator.1.safetensors instead"]  # fmt: skip
    assert "saved generator's weights to out/generator.1.safetensors" in out
    assert (tiny / "out" / "generator.safetensors").read_bytes() == b"the user's"
    assert sorted(path.name for path in (tiny / "out").iterdir()) == [
        "discriminator.safetensors", "generator.1.safetensors", "generator.safetensors"]  # fmt: skip


def test_weights_on_a_full_disk_leave_no_partial_directory(tiny):
    """4 KiB free: the generator's file fits, the discriminator's does not. The generator's alone
    was left in DIR, which then made the rerun refuse DIR as "not empty"."""
    result, lines, listing = on_a_full_disk(tiny, "train", "gan.toml", "--max-steps", "1", "--save", "DISK/out",
                                            free_kib=4)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert lines == [f"unitrain: error: {tiny / 'disk' / 'out' / 'discriminator.safetensors'}: No space left on device"]
    assert listing == ["user.txt"] and "saved" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "mindspore"])  # eager: not across processes
def test_a_sigkilled_cli_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny, backend, capsys,
                                                                           torch_single_thread):  # fmt: skip
    """The killed process ran with one thread, as this one's torch (another count sums in another order)."""
    common = ["--backend", backend, "--epochs", "100000"]
    command = [sys.executable, "-m", "unitrain", "train", "gan.toml", *common, "--checkpoint-dir", "killed",
               "--checkpoint-every", "2"]  # fmt: skip
    done = killed_mid_run(command, tiny / "killed" / CHECKPOINT_FILE)
    target = str(done + 3)  # chosen after the kill: no race with how far the killed run got
    for argv in (["--resume", "killed", "--backend", backend, "--max-steps", target, "--save", "resumed"],
                 ["gan.toml", *common, "--max-steps", target, "--save", "straight"]):  # fmt: skip
        status, _, err = run_cli(capsys, "train", *argv)
        assert status == 0, err
    _assert_same_weights(_weights(tiny / "resumed"), _weights(tiny / "straight"))
    assert load_safetensors(tiny / "killed" / CHECKPOINT_FILE)[1]["step_count"] == target


def test_ctrl_c_checkpoints_at_a_step_boundary_and_exits_130(tiny):
    command = [sys.executable, "-m", "unitrain", "train", "gan.toml", "--epochs", "100000", "--checkpoint-dir",
               "run", "--checkpoint-every", "1000000"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while "steps of 8" not in process.stdout.readline():  # training has begun
            pass
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    step = load_safetensors(tiny / "run" / CHECKPOINT_FILE)[1]["step_count"]
    assert process.returncode == 130 and err.splitlines()[-1] == (
        f"unitrain: stopped at step {step}; checkpoint in {os.path.join('run', CHECKPOINT_FILE)}"
    ), err


# The run's own SIGTERM, sent after its stop flag went into the ranks' vote on step 3 (the moment a
# rank blocked in the vote's all-reduce runs its handler; one process votes alone).
SIGNAL_DURING_THE_VOTE = """
import os, signal, sys
from unitrain.cli import main
from unitrain.steps import MultiModelLoop
vote, sent = MultiModelLoop.any_rank, []
def any_rank(self, flag):
    if self.step_count == 3 and not sent:
        sent.append(os.kill(os.getpid(), signal.SIGTERM))
    return vote(self, flag)
MultiModelLoop.any_rank = any_rank
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_during_the_vote_stops_the_next_step(tiny):
    """The vote's result overwrote the flag that the signal's handler had just set: the stop was
    lost, and the run trained to its end (exit 0)."""
    command = [sys.executable, "-c", SIGNAL_DURING_THE_VOTE, "train", "gan.toml", "--max-steps", "8",
               "--checkpoint-dir", "run", "--checkpoint-every", "100"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM and result.stderr.splitlines()[-1] == (
        f"unitrain: stopped at step 4; checkpoint in {os.path.join('run', CHECKPOINT_FILE)}"
    ), result.stderr
    assert load_safetensors(tiny / "run" / CHECKPOINT_FILE)[1]["step_count"] == "4"


@pytest.mark.slow
def test_a_batch_size_leaving_a_rank_one_row_at_batchnorm_is_refused_before_training(tiny):
    """batch_size 3 over 2 processes: rank 0 normalises one row at the discriminator's BatchNorm.
    Each rank checks every rank's share as the run starts, so both refuse alike, one line, exit 2,
    nothing written (a rank's models see only its rows; one refusing alone left the other in an
    allreduce)."""
    (tiny / "three.toml").write_text(RECIPE.replace("batch_size = 8", "batch_size = 3"))
    command = [sys.executable, "-m", "unitrain", "train", "three.toml", "--backend", "torch", "--nproc", "2",
               "--max-steps", "2", "--checkpoint-dir", "run"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "unitrain: error: phase 'discriminator': model 'discriminator': 2: BatchNorm in training needs more than one "
        "value per channel, and each of 2 processes normalises its own rows: a batch of 3 gives rank 0 one row; use "
        "batches of 4 or more (2 rows per process), or eval mode"
    ], result.stderr
    assert not (tiny / "run").exists()


# Two ranks each computing half of a batch of 8, weighted 1/2, sum the same per-sample gradients as
# one process in another order: the case of tests/test_distributed.py (plain SGD at lr 0.01, BCE
# gradients of a sigmoid's output), whose derivation of its bound holds here with fewer steps. The
# discriminator has no BatchNorm: each rank would normalise its own rows (per replica, as documented).
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_train_a_multi_model_run_as_one_does(tiny, backend, capsys, torch_single_thread):
    from test_distributed import sharding_bound

    sgd = RECIPE.replace('type = "Adam"\nlr = 0.01\nbetas = [0.5, 0.999]', 'type = "SGD"\nlr = 0.01')
    (tiny / "sgd.toml").write_text(sgd.replace("tinynets:discriminator", "tinynets:plain_discriminator"))
    common = ["train", "sgd.toml", "--backend", backend, "--max-steps", "6"]
    assert run_cli(capsys, *common, "--save", "one")[0] == 0
    command = [sys.executable, "-m", "unitrain", *common, "--nproc", "2", "--save", "two", "--metrics", "two.jsonl"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "over 2 processes" in result.stdout and len(_records(tiny / "two.jsonl")) == 2
    one, two = _weights(tiny / "one"), _weights(tiny / "two")
    largest = max(np.abs(two[name][key] - value).max() for name, state in one.items() for key, value in state.items())
    # a phase's longest gradient sum: the discriminator's and generator's fan-ins (64 + 12 + 12 + 4) and the
    # batch of 8, plus the loss; two phases a step
    bound = sharding_bound(64 + 12 + 12 + 4 + 8 + 2, steps=2 * 6, lr=0.01)
    # measured 7.5e-9 (numpy, mindspore); a share of 5/8 for 4/8 rows: 2.0e-3; no share on MindSpore (each
    # phase's gradients summed, not averaged): 7.7e-3
    assert largest <= bound
