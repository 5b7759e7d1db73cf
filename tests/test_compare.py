"""`unitrain compare`: the same run on several backends, one report."""

import json
import subprocess
import sys

import pytest
from conftest import installed_backends

import unitrain
from unitrain.compare import compare_backends, format_report
from unitrain.run import Run

OTHERS = [name for name in installed_backends() if name != "numpy"]
needs_two = pytest.mark.skipif(not OTHERS, reason="only NumPy is installed")
PAIR = f"numpy,{OTHERS[0]}" if OTHERS else "numpy,torch"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, cwd=cwd)


def one_relu_crossing(mnist_train, steps):
    """How far one ReLU crossing can move a weight in the report's run (plain SGD, lr 0.01, the default
    shuffled batches): float32 rounding, which differs between CPUs and kernels, can put one sample's
    pre-activation on the other side of zero on one backend, changing that sample's share of its step;
    at most lr x the largest one-sample share of a step, measured along the float64 run
    (torch_reference.largest_sample_share)."""
    torch = pytest.importorskip("torch")
    from torch_reference import largest_sample_share, load_state, torch_layers

    model = load_state(torch_layers(unitrain.mlp()).double(), unitrain.init_weights(unitrain.mlp(), seed=0))
    batches = [batch for _, batch in zip(range(steps), mnist_train.batches(64, shuffle=True, seed=0), strict=False)]
    return 0.01 * largest_sample_share(model, torch.optim.SGD(model.parameters(), lr=0.01), batches)


@needs_two
def test_the_report_puts_backends_side_by_side(tmp_path, mnist_train):
    report = tmp_path / "report.json"
    result = run("compare", "--backends", PAIR, "--epochs", "2", "--max-steps", "40", "--no-progress",
                 "--json", str(report))  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\n\n")[-1].splitlines()
    assert table[0].split()[:2] == ["backend", "version"]
    assert [line.split()[0] for line in table[1:]] == ["numpy", OTHERS[0]]
    assert "same predictions as numpy" in table[0]
    records = json.loads(report.read_text())
    assert records["run"]["max_steps"] == 40 and records["run"]["seed"] == 0
    first, second = records["results"]
    assert first["steps"] == second["steps"] == 40 and len(first["history"]) == 1  # max-steps ends epoch 1
    assert first["max_weight_difference"] is None
    assert 0 < second["max_weight_difference"] <= one_relu_crossing(mnist_train, 40)
    assert second["same_predictions"] >= 9990
    # accuracies of predictions that differ on k of the 10000 test samples differ by at most k / 10000
    differing = 10000 - second["same_predictions"]
    correct = [round(result["test_accuracy"] * 10000) for result in (first, second)]
    assert abs(correct[0] - correct[1]) <= differing


@needs_two
def test_every_backend_starts_from_the_given_weights(mnist_train, mnist_test, tmp_path):
    model = unitrain.mlp()
    reference = unitrain.make_loop("numpy", model)
    reference.load_state_dict(unitrain.init_weights(model, seed=7))  # not the loops' seed
    reference.save_weights(tmp_path / "start.safetensors")
    run = Run(init_weights=str(tmp_path / "start.safetensors"), epochs=1, max_steps=0)
    results = compare_backends(["numpy", OTHERS[0]], run, data=(mnist_train, None, mnist_test))
    expected = reference.evaluate(mnist_test)["num_correct"]
    assert [result["num_correct"] for result in results] == [expected, expected]
    assert results[1]["max_weight_difference"] == 0 and results[1]["same_predictions"] == len(mnist_test)
    table = format_report(results, len(mnist_test)).splitlines()
    assert "(untrained)" in table[1] and table[2].endswith(f"{len(mnist_test):,}/{len(mnist_test):,}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backends", "numpy"], "--backends needs two or more different backends, got 'numpy'"),
        (["--backends", "numpy,numpy"], "--backends needs two or more different backends, got 'numpy,numpy'"),
        (["--backends", "numpy,jax"], "unknown backend 'jax'; available: numpy, torch, mindspore, chainer"),
        (["--backends", PAIR, "--lr", "0"], "argument --lr: must be > 0, got 0"),
        pytest.param(["--backends", PAIR, "--data-dir", "nowhere"], "data.data_dir nowhere does not", marks=needs_two),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message):
    result = run("compare", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@needs_two
def test_weights_of_another_model_and_an_existing_report_are_refused(tmp_path):
    cnn_weights = tmp_path / "cnn.safetensors"
    unitrain.make_loop("numpy", unitrain.cnn()).save_weights(cnn_weights)
    result = run("compare", "--backends", PAIR, "--init-weights", str(cnn_weights))
    assert result.returncode == 2 and f"init_weights {cnn_weights}" in result.stderr and "0.weight" in result.stderr
    report = tmp_path / "report.json"
    report.write_text("the user's")
    result = run("compare", "--backends", PAIR, "--json", str(report))
    assert result.returncode == 2 and "already exists; pass --overwrite" in result.stderr
    assert report.read_text() == "the user's"
