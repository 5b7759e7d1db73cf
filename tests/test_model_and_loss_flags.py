"""``--model package.module:function`` and ``--loss`` from the command line: a
one-command recipe (.npz data, the user's own model, LogSoftmax + NLL, Adadelta with
StepLR, clipping, a validation split), its checkpoint and resume, and every way a
``module:function`` can fail, each refused in one line before any training."""

import json
import subprocess
import sys

import numpy as np
import pytest
from unitrain.conformance.tolerances import tolerance

NETWORK = """
from unitrain.layers import Flatten, Linear, LogSoftmax, ReLU, Sequential


def build():
    return Sequential(Flatten(), Linear(784, 32), ReLU(), Linear(32, 10), LogSoftmax(dim=1))
"""


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, cwd=cwd)


def _dataset(path, train=512, test=128, seed=0):
    """A learnable 10-class .npz: each class lights its own band of rows, over noise."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, 10, size=n)
        x = rng.integers(0, 96, size=(n, 28, 28), dtype=np.uint8)  # Keras's (N, H, W)
        for index, label in enumerate(y):
            x[index, 2 * label : 2 * label + 3] = 255
        return x, y

    (x_train, y_train), (x_test, y_test) = split(train), split(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_the_issues_recipe_trains_in_one_command_and_resumes_with_its_model_and_loss(tmp_path):
    (tmp_path / "netdef.py").write_text(NETWORK)
    _dataset(tmp_path / "digits.npz")
    recipe = ["--dataset", "digits.npz", "--model", "netdef:build", "--loss", "nll", "--optimizer", "adadelta",
              "--lr", "1.0", "--lr-schedule", "StepLR(step_size=1, gamma=0.7)", "--clip-grad-norm", "1",
              "--val-split", "64", "--backend", "numpy", "--no-progress"]  # fmt: skip
    result = run("train", *recipe, "--epochs", "3", "--metrics", "m.jsonl", "--checkpoint-dir", "ck", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    # StepLR's lr for epoch e is lr * gamma**e; the record carries the lr its epoch trained with
    # products of gamma in float64, as torch's scheduler takes them: a rounding per epoch
    assert [record["lr"] for record in records] == pytest.approx([1.0, 0.7, 0.49], rel=0, abs=tolerance(np.float64, 2))
    assert all(record["model"] == "netdef:build" for record in records)
    for record in records:
        assert np.isfinite(record["val_loss"]) and 0 <= record["val_accuracy"] <= 1
    assert records[-1]["val_accuracy"] > 0.5  # chance is 0.1: the bands are learnt, so NLL got log-probabilities

    middle = tmp_path / "ck" / "step-00000014"  # the end of epoch 2 (the last one is the finished run's)
    manifest = json.loads((middle / "checkpoint.json").read_text())
    assert manifest["run"]["model"] == "netdef:build" and manifest["run"]["loss"] == "nll"
    assert manifest["loss"] == "NLLLoss"

    resume = ["train", "--resume", str(middle), "--checkpoint-dir", "branch", "--no-progress"]
    refused = run(*resume, "--loss", "cross-entropy", cwd=tmp_path)
    assert refused.returncode == 2
    assert "--loss cross-entropy differs from the resumed run's nll" in refused.stderr
    resumed = run(*resume, cwd=tmp_path)  # re-imports netdef:build
    assert resumed.returncode == 0, resumed.stderr
    assert "model netdef:build" in resumed.stdout
    last_epoch = next(line for line in resumed.stdout.splitlines() if line.startswith("epoch 3/3"))
    assert "lr 0.49" in last_epoch

    (tmp_path / "netdef.py").rename(tmp_path / "moved.py")  # reading the checkpoint imports nothing; resuming does
    gone = run("train", "--resume", str(middle), "--checkpoint-dir", "other", cwd=tmp_path)
    assert gone.returncode == 2
    assert f"--resume {middle}: model 'netdef:build': cannot import netdef" in gone.stderr


MODULES = {
    "broken.py": "import no_such_dependency_of_theirs\n",
    "raising.py": "def build():\n    raise RuntimeError('no GPU here')\n",
    "wrong.py": "build = 3\n\ndef weights():\n    return {'w': 1}\n",
}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("resnet", "unknown model 'resnet'; expected one of mlp, cnn, lenet, resnet18 or package.module:function"),
        ("no_such_module:build", "cannot import no_such_module: ModuleNotFoundError: No module named 'no_such_module'"),
        ("broken:build", "cannot import broken: ModuleNotFoundError: No module named 'no_such_dependency_of_theirs'"),
        ("raising:missing", "module raising has no attribute 'missing'"),
        ("wrong:build", "module wrong has a int, not a function, named 'build'"),
        ("raising:build", "build() raised RuntimeError: no GPU here"),
        ("wrong:weights", "weights() returned dict, expected a unitrain model spec"),
    ],
)
def test_a_model_that_is_no_spec_is_refused_in_one_line_before_training(tmp_path, model, message):
    for name, text in MODULES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "digits.npz").write_bytes(b"")  # never read: the model is refused first
    for command in (["train", "--dataset", "digits.npz"], ["evaluate", "--weights", "w.safetensors"]):
        result = run(*command, "--model", model, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.startswith(f"unitrain: error: argument --model: model '{model}'") or model == "resnet"
        assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stdout == ""  # nothing announced, nothing trained


def test_elementwise_losses_train_on_one_hot_labels_and_native_loops_keep_cross_entropy(tmp_path):
    _dataset(tmp_path / "digits.npz", train=64, test=16)
    result = run("train", "--dataset", "digits.npz", "--loss", "mse", "--epochs", "1", "--batch-size", "32",
                 "--backend", "numpy", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mse loss" in result.stdout and "epoch 1/1" in result.stdout
    # one-hot targets: a test accuracy (argmax) but no train accuracy (that counts class indices), and MSE
    assert "train accuracy" not in result.stdout and "test accuracy" in result.stdout and "test mse" in result.stdout
    native = run("compare", "--backends", "numpy,torch", "--native", "--loss", "nll", cwd=tmp_path)
    assert native.returncode == 2
    assert "--native: the native loops train with cross-entropy, not nll" in native.stderr
