"""`unitrain evaluate` and `unitrain predict`: one weights file, the same answers on every backend."""

import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import installed_backends
from unitrain.conformance.checks import longest_sum
from unitrain.conformance.tolerances import tolerance

import unitrain
from unitrain.optim import SGD

BACKENDS = installed_backends()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory, mnist_train):
    """An MLP trained for 300 NumPy steps (about 90% accuracy: many samples near a decision boundary)."""
    path = tmp_path_factory.mktemp("weights") / "mlp.safetensors"
    loop = unitrain.make_loop("numpy", unitrain.mlp(), optimizer=SGD(lr=0.05, momentum=0.9), seed=1)
    loop.fit(mnist_train, max_steps=300)
    loop.save_weights(path)
    return path


def test_the_same_file_gives_the_same_predictions_on_every_backend(trained_weights, mnist_test):
    predictions = {}
    for backend in BACKENDS:
        loop = unitrain.make_loop(backend, unitrain.mlp())
        loop.load_weights(trained_weights)
        predictions[backend] = loop.predict(mnist_test.x).argmax(1)
    for backend, labels in predictions.items():
        differ = np.flatnonzero(labels != predictions["numpy"])
        assert differ.size == 0, f"{backend} and numpy disagree on test samples {differ[:10]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_reports_the_same_accuracy_on_every_backend(backend, trained_weights, mnist_test):
    loop = unitrain.make_loop("numpy", unitrain.mlp())
    loop.load_weights(trained_weights)
    expected = loop.evaluate(mnist_test)
    result = cli("evaluate", "--weights", str(trained_weights), "--backend", backend)
    assert result.returncode == 0, result.stderr
    match = re.search(r"on (\w+): test accuracy ([\d.]+)% \((\d+)/10000\)  test loss ([\d.]+)", result.stdout)
    assert match, result.stdout
    assert match[1] == backend and int(match[3]) == expected["num_correct"] > 8500
    # printed to 4 decimals; both float32 evaluations within the formula over the logits' longest sum, the
    # softmax over 10 classes and a batch's sum of 1000 losses (the batches' sums add up in float64)
    size = longest_sum(unitrain.mlp(), (1, 28, 28), 1000) + 10 + 1000
    computed = 2 * tolerance(np.float32, size, expected["loss"])
    assert float(match[4]) == pytest.approx(expected["loss"], rel=0, abs=0.5e-4 + computed)


def test_predict_a_test_image_and_the_same_image_as_png(trained_weights, mnist_test, tmp_path):
    from PIL import Image

    index = 7
    raw = np.rint((mnist_test.x[index, 0] * unitrain.data.MNIST_STD + unitrain.data.MNIST_MEAN) * 255).astype(np.uint8)
    Image.fromarray(raw, mode="L").save(tmp_path / "digit.png")
    by_index = cli("predict", "--weights", str(trained_weights), "--index", str(index))
    by_png = cli("predict", "--weights", str(trained_weights), "--image", str(tmp_path / "digit.png"))
    assert by_index.returncode == by_png.returncode == 0, by_index.stderr + by_png.stderr
    label = int(mnist_test.y[index])
    assert f"test image {index} (true label {label}): label {label} (probability" in by_index.stdout
    # the PNG holds exactly the test image's pixels, so the probabilities are the same
    assert by_index.stdout.splitlines()[1] == by_png.stdout.splitlines()[1]
    probabilities = [float(item.split(": ")[1]) for item in by_png.stdout.splitlines()[1].split("  ")]
    # ten float64 probabilities that add up to 1, each printed to 4 decimals
    printing = 10 * 0.5e-4 + tolerance(np.float64, 10)
    assert len(probabilities) == 10 and sum(probabilities) == pytest.approx(1, rel=0, abs=printing)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--index", "10000"], "--index 10000 is out of range: the test set has 10000 images"),
        (["--index", "3", "--image", "x.png"], "argument --image: not allowed with argument --index"),
        (["--image", "missing.png"], "--image missing.png does not exist"),
    ],
)
def test_predict_argument_errors(args, message, trained_weights):
    result = cli("predict", "--weights", str(trained_weights), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
