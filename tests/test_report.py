"""Figures: `compare --report DIR`, `unitrain plot`, `train --plot`, and what they draw
from: every step's loss and each layer's weight divergence, recorded during `compare`."""

import html
import json
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from conftest import installed_backends

import unitrain
from unitrain import cli
from unitrain.compare import compare_backends, layer_differences, sample_interval, sampled
from unitrain.report import first_departure, layer_names, rounding_allowances
from unitrain.run import Run

pytest.importorskip("matplotlib")
needs_torch = pytest.mark.skipif("torch" not in installed_backends(), reason="PyTorch is not installed")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def command(*args):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True)


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000, path


@pytest.mark.slow  # about 19 s on a busy 2-core machine
@needs_torch
def test_compare_report_writes_a_page_whose_figures_all_exist(tmp_path):
    report = tmp_path / "report"
    result = command("compare", "--backends", "numpy,torch", "--max-steps", "60", "--epochs", "1", "--no-progress",
                     "--threads", "1", "--report", str(report), "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"report written to {report / 'index.html'}" in result.stdout
    page = html.unescape((report / "index.html").read_text())
    parser = _Links()
    parser.feed(page)
    names = {"loss.png", "loss-difference.png", "accuracy.png", "divergence.png", "speed.png"}
    assert set(parser.links) == names  # nothing external, nothing missing
    for name in names:
        assert_png(report / name)
    assert "max |Δw| vs numpy" in page and "at steps 1, 2, 4, ... and every 2 steps" in page  # 60 steps / 50 samples
    assert "torch: the weights first differ at step " in page and "Dotted: one step's float32 rounding" in page
    records = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [len(r["step_losses"]) for r in records] == [60, 60]  # --json keeps every step
    assert records[1]["divergence"]["steps"] == [1, *range(2, 61, 2)]

    # the same folder again is refused, and nothing in it changes; --overwrite writes into it
    before = {path.name: path.read_bytes() for path in report.iterdir()}
    again = command("compare", "--backends", "numpy,torch", "--max-steps", "1", "--report", str(report))
    assert again.returncode == 2 and "is a directory that is not empty; pass --overwrite" in again.stderr
    assert {path.name: path.read_bytes() for path in report.iterdir()} == before


@needs_torch
def test_step_losses_and_divergence_are_those_of_the_loops_themselves(mnist_train, mnist_test, torch_single_thread):
    """What compare records equals what the two loops give when driven by hand, step by step."""
    model, steps, every = unitrain.mlp(), 6, 2
    results = compare_backends(["numpy", "torch"], Run(epochs=1, max_steps=steps), sample_every=every,
                               data=(mnist_train, None, mnist_test))  # fmt: skip
    loops = [unitrain.make_loop(name, model, seed=0) for name in ("numpy", "torch")]
    losses, divergence = [[], []], {}
    for step, batch in enumerate(mnist_train.batches(64, shuffle=True, seed=0, epoch=0), start=1):
        if step > steps:
            break
        for loop, recorded in zip(loops, losses, strict=True):
            recorded.append(loop.to_float(loop.step(batch)))
        if sampled(step, every):
            divergence[step] = layer_differences(loops[1].state_dict(), loops[0].state_dict())
    assert [r["step_losses"] for r in results] == losses
    recorded = results[1]["divergence"]
    assert recorded["steps"] == [1, 2, 4, 6] and set(recorded["layers"]) == {"1", "3", "5"}
    for layer, values in recorded["layers"].items():
        assert values == [divergence[step][layer] for step in (1, 2, 4, 6)]
    assert results[0]["divergence"] is None


@needs_torch
def test_the_native_loop_row_is_plain_pytorch_trained_on_the_same_batches(mnist_train, mnist_test,
                                                                          torch_single_thread):  # fmt: skip
    """PyTorch's own tutorial loop and unitrain's torch adapter do the same arithmetic: the same
    losses and weights, to the bit (a difference would be overhead or a bug in the adapter)."""
    run = Run(optimizer=unitrain.SGD(lr=0.05), epochs=1, max_steps=6)
    results = compare_backends(["numpy", "torch"], run, data=(mnist_train, None, mnist_test), sample_every=3,
                               native=True)  # fmt: skip
    assert [r.get("label", r["backend"]) for r in results] == ["numpy", "torch", "torch (native loop)"]
    adapter, native = results[1], results[2]
    assert native["native"] and native["steps"] == 6 and native["samples_per_sec"] > 0
    assert native["step_losses"] == adapter["step_losses"] and native["divergence"] == adapter["divergence"]
    assert native["max_weight_difference"] == adapter["max_weight_difference"]
    assert native["num_correct"] == adapter["num_correct"] and len(native["history"]) == 1


@needs_torch
def test_native_loops_refuse_what_the_tutorials_do_not_do(capsys):
    status, _, err = run_cli(capsys, "compare", "--backends", "numpy,torch", "--native", "--optimizer", "rmsprop")
    assert status == 2
    assert "--native: the native loops train with the frameworks' SGD(lr, momentum) or Adam(lr, betas, eps), " \
           "not RMSprop(" in err  # fmt: skip


def test_a_framework_whose_adam_puts_eps_elsewhere_has_no_native_row(capsys, tmp_path, torch_single_thread):
    """PyTorch's dialect adds Adam's eps after the bias correction, Chainer's Adam before it."""
    rng = np.random.default_rng(0)
    data = tmp_path / "small.npz"
    np.savez(data, x_train=rng.random((8, 28, 28), np.float32), y_train=np.arange(8) % 10,
             x_test=rng.random((4, 28, 28), np.float32), y_test=np.arange(4))  # fmt: skip
    status, out, _ = run_cli(capsys, "compare", "--backends", "numpy,chainer,torch", "--native", "--optimizer",
                             "adam", "--dataset", str(data), "--batch-size", "4", "--no-progress")  # fmt: skip
    assert status == 0
    assert "no chainer native loop: chainer's own Adam adds eps before the bias correction, this run's after " \
           "the bias correction" in out  # fmt: skip
    assert "torch (native loop)" in out and "chainer (native loop)" not in out


def test_the_sample_interval_bounds_the_snapshots():
    assert [sample_interval(steps) for steps in (0, 1, 50, 51, 2814)] == [1, 1, 1, 2, 57]
    assert [step for step in range(1, 200) if sampled(step, 57)] == [1, 2, 4, 8, 16, 32, 57, 114, 171]


def test_the_rounding_allowance_is_the_conformance_tolerance_of_one_dot_product():
    allowances = rounding_allowances(unitrain.mlp())
    assert allowances == pytest.approx({layer: 8 * np.finfo(np.float32).eps * fan_in
                                        for layer, fan_in in (("1", 784), ("3", 512), ("5", 512))})  # fmt: skip


def test_the_departure_sentence_names_the_layer_whose_difference_jumps_first():
    result = {"label": "torch", "divergence": {"every": 10, "steps": [1, 10, 20, 30], "layers": {
        "1": [0.0, 1e-8, 2e-8, 4e-8],       # differs, grows slowly: never departs
        "3": [0.0, 2e-8, 6e-6, 9e-6],       # jumps 300-fold at step 20
        "5": [0.0, 0.0, 1e-7, 1e-5],        # first differs at step 20, jumps at step 30, largest at the end
    }}}  # fmt: skip
    assert first_departure(result, layer_names(unitrain.mlp())) == (
        "torch: the weights first differ at step 10 (largest in layer 3 Linear 512→512: 2e-08). Layer 3 Linear "
        "512→512 departs first: at step 20 its difference jumps 10-fold or more, to 6e-06; layer 5 Linear 512→10 "
        "at step 30; 1 Linear 784→512 never. At step 30, layer 5 Linear 512→10 differs most (1e-05)."
    )
    equal = {"label": "mindspore", "divergence": {"every": 1, "steps": [1], "layers": {"1": [0.0]}}}
    assert first_departure(equal, {}) == (
        "mindspore: every layer equals the reference to the bit at every sampled step, to step 1."
    )


@pytest.mark.slow  # two framework imports and evaluations for an edge case
@needs_torch
def test_a_run_without_steps_gets_a_page_without_figures(tmp_path):
    report = tmp_path / "report"
    result = command("compare", "--backends", "numpy,torch", "--max-steps", "0", "--threads", "1", "--no-progress",
                     "--report", str(report))  # fmt: skip
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert [path.name for path in report.iterdir()] == ["index.html"]
    assert "No training step was taken: nothing to draw." in (report / "index.html").read_text()


@needs_torch
def test_a_report_path_that_is_no_new_or_empty_folder_is_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("the user's")
    status, _, err = run_cli(capsys, "compare", "--backends", "numpy,torch", "--report", str(a_file))
    assert status == 2 and f"--report {a_file} is a regular file, expected a directory" in err
    status, _, err = run_cli(capsys, "compare", "--backends", "numpy,torch", "--report", str(tmp_path / "no" / "r"))
    assert status == 2 and "directory" in err and "does not exist" in err
    assert a_file.read_text() == "the user's"


def test_train_plot_and_unitrain_plot_draw_the_runs(tmp_path, capsys):
    metrics, figure = tmp_path / "a.jsonl", tmp_path / "a.png"
    status, out, err = run_cli(capsys, "train", "--no-progress", "--epochs", "2", "--batch-size", "1000",
                               "--max-steps", "70", "--metrics", str(metrics), "--plot", str(figure))  # fmt: skip
    assert status == 0, err
    assert f"drew the curves in {figure}" in out
    assert_png(figure)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    other = tmp_path / "b.jsonl"
    other.write_text("".join(json.dumps({**r, "backend": "torch", "test_loss": r["test_loss"] * 1.1}) + "\n"
                             for r in records))  # fmt: skip
    both = tmp_path / "both.png"
    status, out, err = run_cli(capsys, "plot", str(metrics), str(other), "-o", str(both))
    assert status == 0 and out.strip() == f"unitrain: drew 2 runs in {both}", err
    assert_png(both)
    status, _, err = run_cli(capsys, "plot", str(metrics), "-o", str(both))
    assert status == 2 and "already exists; pass --overwrite" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no records"),
        (b"not json\n", "line 1 is not JSON"),
        (b"[1, 2]\n", "line 1 is a JSON list, expected an object"),
        (b'{"epoch": 1}\n{"epoch": 0}\n', "line 2: 'epoch' is 0, expected an integer >= 1"),
        (b'{"epoch": 1, "test_loss": "low"}\n', "'test_loss' is 'low', expected a number"),
        (b'{"epoch": 1, "x": "' + b"a" * 70_000 + b'"}\n', "line 1 is over 65,536 bytes"),
        (b"\xff\xfe\n", "line 1 is not JSON"),
    ],
)
def test_bad_metrics_files_are_one_line_and_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "m.jsonl"
    path.write_bytes(content)
    status, _, err = run_cli(capsys, "plot", str(path), "-o", str(tmp_path / "out.png"))
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out.png").exists()


def test_a_directory_or_nothing_is_no_metrics_file(tmp_path, capsys):
    status, _, err = run_cli(capsys, "plot", str(tmp_path), "-o", str(tmp_path / "out.png"))
    assert status == 2 and "is a directory, expected a metrics file" in err
    status, _, err = run_cli(capsys, "plot", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "out.png"))
    assert status == 2 and "does not exist" in err


@needs_torch
def test_threads_reach_the_framework_and_blas():
    script = (
        "from unitrain.backends.torch import TorchLoop; import torch; from threadpoolctl import threadpool_info; "
        "TorchLoop.set_threads(1); print(torch.get_num_threads(), {p['num_threads'] for p in threadpool_info()})"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.split(maxsplit=1) == ["1", "{1}\n"], result.stderr


def test_threads_must_be_positive(capsys):
    status, _, err = run_cli(capsys, "train", "--threads", "0")
    assert status == 2 and "argument --threads: must be >= 1, got 0" in err


def test_the_progress_bar_shows_steps_and_loss_then_gives_way_to_the_epoch_line(capsys, monkeypatch):
    # redraw at every step: three fast steps may all fall inside one refresh interval of 0.2 s
    monkeypatch.setattr(unitrain.extensions.ProgressBar, "interval", 0)
    status, out, err = run_cli(
        capsys, "train", "--progress", "--epochs", "1", "--batch-size", "1000", "--max-steps", "3"
    )
    assert status == 0, err
    assert "epoch 1:" in err and "/60" in err and "loss 2." in err  # tqdm's bar: 3 of 60 steps, the loss
    assert "epoch 1/1  train loss" in out
