"""The tutorial ports in examples/ run on every installed backend and print what their tutorials print."""

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import installed_backends

import unitrain

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(path.stem for path in EXAMPLES.glob("*.py"))
STEPS = ["--max-steps", "20"]
NUMBER = r"(\d+\.\d+)"
SIGNED = r"(-?\d+\.\d+)"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=installed_backends())
def backend(request):
    if request.param == "torch":  # its thread pool only contends for two busy cores
        request.getfixturevalue("torch_single_thread")
    return request.param


@pytest.mark.parametrize("name", SCRIPTS)
def test_examples_import_no_framework_and_are_listed_in_the_readme(name):
    tree = ast.parse((EXAMPLES / f"{name}.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "os", "numpy", "unitrain"}
    assert ast.get_docstring(tree) and f"{name}.py" in (EXAMPLES / "README.md").read_text()


def test_chainer_training_loop_trains_saves_and_reloads(backend, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    example("chainer_training_loop").main(["--backend", backend, *STEPS, "--out", str(out), "--show", "8"])
    printed = capsys.readouterr().out
    (loss, val_loss, val_accuracy) = map(
        float, re.search(rf"epoch:01 train_loss:{NUMBER} val_loss:{NUMBER} val_accuracy:{NUMBER}", printed).groups()
    )
    assert loss < 2.4 and val_loss < 2.4 and 0.1 < val_accuracy <= 1
    assert len(re.findall(r"predicted label: \d  true label: \d", printed)) == 8
    assert "the loaded model classifies like the trained one: True" in printed and out.stat().st_size > 0


def test_pytorch_training_loop_on_fashion_mnist_saves_and_reloads_the_best_model(backend, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    example("pytorch_training_loop").main(["--backend", backend, *STEPS, "--log-every", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "Training set has 60000 instances\nValidation set has 10000 instances\n" in printed
    garments = printed.splitlines()[2].split("  ")  # the first batch's 4 labels, by name
    assert len(garments) == 4 and set(garments) <= set(unitrain.data.PACKAGED["fashion-mnist"].classes)
    assert re.findall(r"  batch (\d+) loss: \d+\.\d+", printed) == ["10", "20"]
    train_loss, valid_loss = map(float, re.search(rf"LOSS train {NUMBER} valid {NUMBER}", printed).groups())
    assert 0 < train_loss < 2.4 and 0 < valid_loss < 2.4  # ln(10) = 2.30 at chance, lr 0.001 moves slowly
    reloaded, best = map(float, re.search(rf"reloaded: valid loss {NUMBER} \(best {NUMBER}\)", printed).groups())
    assert reloaded == best and out.stat().st_size > 0


def test_mindspore_model_training_prints_the_tutorials_lines(backend, capsys):
    accuracies = example("mindspore_model_training").main(["--backend", backend, *STEPS])
    printed = capsys.readouterr().out
    assert "loss: " in printed and "[  0/938]" in printed
    (accuracy,) = map(float, re.findall(r"Test: \n Accuracy: (\d+\.\d)%, Avg loss: \d+\.\d{6} \n", printed))
    # printed to one decimal, so within half of it; chance: 10%
    assert accuracy == pytest.approx(100 * accuracies[0], rel=0, abs=0.05) and accuracy > 15
    assert printed.rstrip().endswith("Done!")


def builds_resnet(name: str) -> bool:
    """Whether the backend's adapter declares branches (ResNet-18's Residual blocks)."""
    return "residual" in unitrain.get_backend(name).capabilities


#: The case the cross-backend comparison takes; the test of its ReLU inputs and max pool ties checks the
#: premise that makes its rounding bound apply.
COMPARED_SEED = "23"


def test_single_training_step_is_the_same_on_every_backend(torch_single_thread, capsys):
    backends = [name for name in installed_backends() if builds_resnet(name)]
    module = example("single_training_step")
    module.main(["--compare", "--backends", ",".join(backends), "--seed", COMPARED_SEED])
    *lines, bound = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == backends
    for line in lines:
        before, after = map(float, re.search(rf"loss before {SIGNED}  after {SIGNED}", line).groups())
        assert after < before
    differences = [float(d) for line in lines[1:] for d in re.findall(r"weights differ from \w+ by (\S+) of its", line)]
    assert len(differences) == len(lines) - 1
    assert bound == f"float32 rounding allows {module.ROUNDING_ALLOWS:.1e} of the update"
    assert max(differences, default=0) <= module.ROUNDING_ALLOWS


def test_the_compared_case_has_no_relu_input_or_max_pool_tie_within_float32_rounding(torch_single_thread):
    """The rounding bound holds only while no ReLU input lies within float32 rounding of zero and no max
    pool window holds two elements within rounding of each other: there two backends' rounding can send a
    unit down different branches, a whole gradient contribution apart (seed 0 has a ReLU input at -9.7e-7
    that MindSpore rounds to the other side). Which way a CPU rounds is not measured here (it differs
    between CPUs); ``RoundingModel`` gives every decision's distance in float64 and the scale of float32
    rounding around it, the same on any CPU (seed 4, compared before, has a ReLU input 2.5 rounding scales
    from zero; seed 23's closest is 8 scales away, its closest max pool tie 22)."""
    torch = pytest.importorskip("torch")
    from torch_reference import ResNet18, RoundingModel

    seed = int(COMPARED_SEED)
    weights = unitrain.init_weights(unitrain.resnet18(), seed)
    x = np.random.default_rng(seed).random((1, 3, 64, 64), dtype=np.float32)  # as the example draws it
    model = ResNet18()
    model.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})
    for name, index, margin in RoundingModel(model, torch.from_numpy(x)).margins():
        assert margin > RoundingModel.MARGIN, f"{name} call {index}: {margin:.1f} rounding scales from flipping"


def test_single_training_step_on_one_backend(backend, capsys):
    if not builds_resnet(backend):
        pytest.skip(f"the {backend} adapter does not declare 'residual' yet")
    example("single_training_step").main(["--backend", backend])
    line = capsys.readouterr().out
    match = re.fullmatch(rf" *{backend}: loss before {SIGNED}  after {SIGNED}  largest parameter change (\S+)\n", line)
    before, after, change = map(float, match.groups())
    assert after < before and change > 0


def test_single_training_step_loads_torchvision_weights(torch_single_thread, tmp_path, capsys):
    """The tutorial's pretrained weights come as a torchvision state_dict saved with safetensors."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    from torch_reference import ResNet18

    torch.manual_seed(1)
    path = tmp_path / "resnet18.safetensors"
    save_file(ResNet18().state_dict(), path)
    example("single_training_step").main(["--backend", "torch", "--weights", str(path)])
    example("single_training_step").main(["--backend", "torch"])
    loaded, default = capsys.readouterr().out.splitlines()
    assert loaded.startswith("     torch: loss before") and loaded != default
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    save_file({"fc.weight": torch.zeros(10, 512)}, tmp_path / "other.safetensors")
    for name, message in [("broken", "broken.safetensors"), ("other", "missing keys ['conv1.weight'")]:
        with pytest.raises(SystemExit) as exit_info:
            example("single_training_step").main(["--weights", str(tmp_path / f"{name}.safetensors")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_single_training_step_refuses_unknown_backends(capsys):
    with pytest.raises(SystemExit) as exit_info:
        example("single_training_step").main(["--compare", "--backends", "torch,tensorflow"])
    assert exit_info.value.code == 2 and "unknown backends ['tensorflow']" in capsys.readouterr().err


def test_cnn_training_prints_total_correct_and_loss(backend, capsys):
    example("cnn_training").main(["--backend", backend, *STEPS])
    match = re.fullmatch(r"epoch 0 total_correct: (\d+) loss: (\S+)\n", capsys.readouterr().out)
    correct, total_loss = int(match[1]), float(match[2])
    # Adam lr 0.01 on Fashion-MNIST learns within 20 batches of 100: above chance (10%), loss below ln(10)
    assert 10 * 20 < correct <= 20 * 100 and 0 < total_loss < 20 * 2.31


@pytest.mark.slow
def test_mindspore_model_training_full_run_matches_the_tutorial():
    accuracies = example("mindspore_model_training").main(["--backend", "numpy"])
    assert len(accuracies) == 3 and accuracies[0] >= 0.90 and accuracies[2] >= 0.92


RECIPES = sorted(path.stem for path in (EXAMPLES / "recipes").glob("*.toml"))


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_is_listed_loads_and_trains(name, monkeypatch):
    """Every tutorial recipe describes a valid run whose model takes its data, and takes steps (a
    recipe of several models: three steps of 8 images; how --nproc would weigh its losses)."""
    from unitrain import multi_run, phase_losses, steps
    from unitrain.run import load_recipe

    monkeypatch.chdir(EXAMPLES.parent)  # its module:function models import from the repository's root
    assert f"recipes/{name}.toml" in (EXAMPLES / "README.md").read_text()
    path = EXAMPLES / "recipes" / f"{name}.toml"
    if multi_run.is_multi_recipe(path):
        multi = multi_run.load_multi_recipe(path)
        step, pictures = multi.build()
        loop, images = steps.MultiModelLoop(step, "numpy", seed=multi.seed), multi.datasets()[0].x
        losses = [loop.step(images[8 * i : 8 * (i + 1)]) for i in range(3)]
        assert loop.step_count == 3 and np.isfinite([list(step_losses.values()) for step_losses in losses]).all()
        assert "samples" in pictures  # the DCGAN's losses are means over the batch, the VAE's sums
        weightings = {phase_losses.batch_weighting(phase.loss) for phase in step.phases}
        assert weightings == {"sum" if name == "vae" else "mean"}
        return
    run = load_recipe(path)
    train = run.datasets()[0]
    loop = run.make_loop("numpy")
    history = loop.fit(train.subset(np.arange(3 * run.batch_size)), **{**run.fit_options(), "epochs": 1})
    assert loop.step_count == 3 and np.isfinite(history[0]["train_loss"])


@pytest.mark.slow
@pytest.mark.skipif("torch" not in installed_backends(), reason="PyTorch is not installed")
def test_pytorch_official_mnist_example_as_a_recipe_reaches_its_first_epoch_accuracy(tmp_path):
    """pytorch/examples' mnist/main.py reaches 98-99 % test accuracy after its first epoch; its
    recipe, trained by unitrain on the torch backend, does too."""
    recipe = EXAMPLES / "recipes" / "pytorch_mnist.toml"
    metrics = tmp_path / "metrics.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "unitrain", "train", str(recipe), "--backend", "torch", "--epochs", "1",
         "--no-progress", "--metrics", str(metrics)],
        cwd=EXAMPLES.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (record,) = map(json.loads, metrics.read_text().splitlines())
    assert record["test_accuracy"] >= 0.98 and record["lr"] == 1.0


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[] if name == "numpy" else [pytest.mark.slow]) for name in installed_backends()],
)
def test_lstm_tagger_tags_the_tutorials_sentence_as_the_tutorial_does(name, request, capsys):
    """300 epochs of PyTorch's part-of-speech tutorial tag "The dog ate the apple" DET NN V DET NN (0 1 2 0 1)
    on every backend (600 steps: a few seconds on NumPy; the others in the slow suite)."""
    if name == "torch":
        request.getfixturevalue("torch_single_thread")
    assert example("lstm_tagger").main(["--backend", name]) == [0, 1, 2, 0, 1]
    assert "predicted tags: 0 1 2 0 1" in capsys.readouterr().out


def test_transformer_classifier_trains_from_token_ids_and_a_padding_mask(capsys):
    """20 steps on NumPy: token ids and the padding mask reach the graph as its two inputs (the full run,
    above 0.9 test accuracy on every backend, takes minutes)."""
    accuracy = example("transformer_classifier").main(["--backend", "numpy", *STEPS])
    assert 0 <= accuracy <= 1 and re.search(rf"epoch 1: mean training loss {NUMBER}\ntest accuracy: {NUMBER}\n",
                                            capsys.readouterr().out)  # fmt: skip


@pytest.mark.slow
def test_char_lm_beats_the_bigram_model_and_samples(capsys):
    """The character LSTM's validation perplexity after its 4 epochs (NumPy, ~15 s) falls below the bigram
    model's counted on the same training text (the bar its docstring derives); a sample is printed."""
    outcome = example("char_lm").main(["--backend", "numpy"])
    assert outcome["perplexity"] < outcome["bigram_perplexity"] < 98  # 98 characters: the uniform model
    assert "sample: '" in capsys.readouterr().out


def test_char_lm_runs_a_few_steps_and_samples(capsys):
    """The script's mechanics on NumPy (its model trains like torch's on every backend in test_token_losses)."""
    example("char_lm").main(["--backend", "numpy", "--epochs", "1", "--max-steps", "2", "--chars", "3000",
                             "--sample", "5"])  # fmt: skip
    printed = capsys.readouterr().out
    assert re.search(rf"validation perplexity {NUMBER} \(bigram model: {NUMBER}", printed)
    assert re.search(r"sample: '.{5}'", printed, re.DOTALL)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[] if name in ("numpy", "torch") else [pytest.mark.slow])
        for name in installed_backends()
    ],
)
def test_word_embeddings_loss_falls_every_epoch_as_in_the_tutorial(name, request, capsys):
    """PyTorch's N-gram tutorial: epochs of 113 steps, the total loss lower after every epoch (the
    tutorial's own claim), starting near 113 * ln(97) = 517 (97 words); the embedding of "beauty" printed.
    The tutorial's 10 epochs on NumPy and torch; 3 on Chainer and MindSpore (one step per n-gram is slow
    there, and the claim is the same)."""
    if name == "torch":
        request.getfixturevalue("torch_single_thread")
    epochs = 10 if name in ("numpy", "torch") else 3
    losses = example("word_embeddings").main(["--backend", name, "--epochs", str(epochs)])
    assert len(losses) == epochs and all(np.diff(losses) < 0)
    assert abs(losses[0] - 113 * np.log(97)) < 0.05 * losses[0]
    printed = capsys.readouterr().out
    assert len(re.findall(SIGNED, printed[printed.index("]\n") + 2 :])) == 10  # the embedding, EMBEDDING_DIM values
