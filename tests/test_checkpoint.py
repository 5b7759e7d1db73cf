"""Checkpoints: exact resume on every backend, resume across backends, crashes, Ctrl-C, divergence
and the bad-input list of `unitrain train --resume` / `evaluate` / `predict`."""

import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import installed_backends
from torch_reference import assert_within_drift, drift_tolerances, gradient_size

import unitrain
from unitrain.checkpoint import (
    MANIFEST,
    RANDOM,
    Checkpointer,
    CheckpointError,
    Diverged,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
)
from unitrain.optim import SGD, Adam
from unitrain.weights import load_safetensors, save_safetensors

BACKENDS = installed_backends()
OPTIMIZERS = {"sgd-momentum": SGD(lr=0.05, momentum=0.9), "adam": Adam(lr=0.002)}
BATCH, STEPS_PER_EPOCH = 32, 8


@pytest.fixture(scope="module")
def small_train(mnist_train):
    """8 batches per epoch: runs cross epoch boundaries in a handful of steps."""
    return mnist_train.subset(np.arange(BATCH * STEPS_PER_EPOCH - 5))  # a short last batch too


def fit(loop, data, checkpointer=None, resume=None, epochs=2):
    loop.fit(
        data,
        epochs=epochs,
        batch_size=BATCH,
        extensions=[checkpointer] if checkpointer else [],
        start_epoch=resume.epoch if resume else 0,
        start_batch=resume.batch if resume else 0,
    )
    return loop


def resumed(backend, checkpoint, data):
    loop = unitrain.make_loop(backend, unitrain.mlp(), optimizer=checkpoint.optimizer_spec(), seed=checkpoint.seed)
    checkpoint.restore(loop)
    return fit(loop, data, resume=checkpoint)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key} differs by {np.abs(a[key] - b[key]).max()}"


# --- resume in-process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed_runs(small_train, tmp_path_factory):
    """``checkpointed_runs(backend, optimizer)``: a 2-epoch run that checkpointed every 3 steps."""
    runs = {}

    def run(backend, opt_name):
        if (backend, opt_name) not in runs:
            folder = tmp_path_factory.mktemp(f"{backend}-{opt_name}")
            loop = unitrain.make_loop(backend, unitrain.mlp(), optimizer=OPTIMIZERS[opt_name], seed=3)
            fit(loop, small_train, Checkpointer(folder, every=3, keep=None))
            runs[backend, opt_name] = loop, folder
        return runs[backend, opt_name]

    return run


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_on_the_same_backend_is_bit_identical(backend, opt_name, checkpointed_runs, small_train):
    loop, folder = checkpointed_runs(backend, opt_name)
    steps = [int(p.name.split("-")[1]) for p in checkpoint_paths(folder)]
    assert steps == [3, 6, 8, 9, 12, 15, 16], steps  # every 3 steps and each epoch's end
    for step in (3, 8, 9):  # mid-epoch, an epoch's end, just after one
        checkpoint = load_checkpoint(folder / f"step-{step:08d}")
        again = resumed(backend, checkpoint, small_train)
        assert again.step_count == loop.step_count == 16
        assert_same_state(again.state_dict(), loop.state_dict())
        assert_same_state(again.optimizer_state_dict(), loop.optimizer_state_dict())


@pytest.fixture(scope="module")
def float64_runs(small_train):
    """``float64_runs(optimizer)``: the checkpointed runs' case in float64 on NumPy, the exact trajectory
    to within ~1e-14, from which a float32 run's drift is measured."""
    runs = {}

    def run(opt_name):
        if opt_name not in runs:
            loop = unitrain.make_loop("numpy", unitrain.mlp(), optimizer=OPTIMIZERS[opt_name], seed=3, dtype="float64")
            runs[opt_name] = fit(loop, small_train)
        return runs[opt_name]

    return run


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize(("first", "second"), list(itertools.permutations(BACKENDS, 2)))
def test_resume_on_another_backend_ends_within_float32_tolerance(first, second, opt_name, checkpointed_runs,
                                                                 float64_runs, small_train):  # fmt: skip
    loop, folder = checkpointed_runs(first, opt_name)
    checkpoint = load_checkpoint(folder / "step-00000006")
    assert checkpoint.backend == first and len(checkpoint.optimizer_state) > 1  # momentum / moments carried
    moved = resumed(second, checkpoint, small_train)
    assert moved.step_count == 16
    # both float32 runs approximate the float64 one: the moved run may drift sqrt(n) times as far as the
    # uninterrupted run measurably does (torch_reference.drift_tolerances), n the longest sum of one step
    exact = float64_runs(opt_name)
    size = gradient_size(unitrain.mlp(), small_train.x.shape[1:], BATCH) + 10  # + the softmax over 10 classes
    for part in ("state_dict", "optimizer_state_dict"):
        reference, result, truth = (getattr(run, part)() for run in (loop, moved, exact))
        assert result.keys() == reference.keys()  # in the order of the backend's own state
        result = {key: result[key] for key in reference}
        tolerances = drift_tolerances([reference], truth, size)
        assert_within_drift(result, reference, {key: 2 * value for key, value in tolerances.items()})
        if part == "state_dict":  # a move that trained nothing would keep the checkpoint's bits
            for key, value in result.items():
                assert not np.array_equal(value, checkpoint.weights[key]), f"{second} did not train {key}"


def dropout_mlp():
    return unitrain.Sequential(unitrain.Flatten(), unitrain.Linear(784, 64), unitrain.ReLU(), unitrain.Dropout(0.3),
                               unitrain.Linear(64, 10))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropout_model_resumes_with_the_masks_an_uninterrupted_run_draws(backend, small_train, tmp_path):
    if "random-state" not in unitrain.get_backend(backend).capabilities:
        pytest.skip(f"{backend} does not declare random-state: it draws fresh dropout masks after a resume")
    optimizer = OPTIMIZERS["adam"]
    loop = unitrain.make_loop(backend, dropout_mlp(), optimizer=optimizer, seed=3)
    fit(loop, small_train, Checkpointer(tmp_path, every=5, keep=None))
    checkpoint = load_checkpoint(tmp_path / "step-00000005")
    assert (checkpoint.path / "random.safetensors").is_file() and checkpoint.random_state
    again = unitrain.make_loop(backend, dropout_mlp(), optimizer=optimizer, seed=3)
    checkpoint.restore(again)
    assert_same_state(fit(again, small_train, resume=checkpoint).state_dict(), loop.state_dict())
    for other in (name for name in BACKENDS if name != backend):
        moved = unitrain.make_loop(other, dropout_mlp(), optimizer=optimizer, seed=3)
        checkpoint.restore(moved)
        final = fit(moved, small_train, resume=checkpoint).state_dict()
        difference = max(float(np.abs(final[key] - value).max()) for key, value in loop.state_dict().items())
        # NumPy, Chainer and MindSpore keep one kind of stream (unitrain.randomness): the same masks. Other
        # masks give the dropped units other gradients, so their weights' Adam steps (of about lr each)
        # differ at every step; float32 rounding moves no weight by a whole step (1e-7 measured)
        same_stream = "torch" not in (backend, other)
        one_step = optimizer.lr
        assert (difference < one_step) == same_stream, f"{backend} -> {other}: weights differ by {difference}"


def loop_state(loop):
    """Everything a restore assigns: weights, optimizer state, step count, random stream."""
    return {**{f"w/{k}": v for k, v in loop.state_dict().items()},
            **{f"o/{k}": v for k, v in loop.optimizer_state_dict().items()},
            **{f"r/{k}": v for k, v in loop.random_state().items()}, "step": np.array(loop.step_count)}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_refused_at_its_last_part_leaves_the_loop_as_it_was(backend, tmp_path):
    """The random stream is checked last: its refusal used to come after the weights and the
    optimizer state were loaded, leaving a live loop half resumed."""
    if "random-state" not in unitrain.get_backend(backend).capabilities:
        pytest.skip(f"{backend} keeps no random state")
    trained = unitrain.make_loop(backend, dropout_mlp(), optimizer=OPTIMIZERS["adam"], seed=3)
    batch = (np.random.default_rng(0).random((8, 1, 28, 28), np.float32), np.arange(8) % 10)
    trained.step(batch)
    save_checkpoint(tmp_path / "good", trained, epoch=0, batch=1)
    good = load_checkpoint(tmp_path / "good")
    folder = tmp_path / "bad" / good.path.name
    shutil.copytree(good.path, folder)
    (key,) = trained.random_state()
    save_safetensors(folder / RANDOM, {key: np.frombuffer(b"[" * 40, np.uint8)})
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / RANDOM).read_bytes()
    manifest["files"][RANDOM] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    fresh = unitrain.make_loop(backend, dropout_mlp(), optimizer=OPTIMIZERS["adam"], seed=3)
    for _ in range(2):  # a live loop with weights and optimizer state of its own
        fresh.step(batch)
    before = loop_state(fresh)
    with pytest.raises(CheckpointError, match=f"is not a {backend} random state"):
        load_checkpoint(folder).restore(fresh)
    assert_same_state(loop_state(fresh), before)
    good.restore(fresh)  # and the good one loads whole
    assert_same_state(loop_state(fresh), loop_state(trained))


# --- crash safety ---------------------------------------------------------------------------


def test_keeps_the_newest_k_and_ignores_a_half_written_one(tmp_path, small_train):
    loop = unitrain.make_loop("numpy", unitrain.mlp(), seed=0)
    checkpointer = Checkpointer(tmp_path, every=2, keep=3)
    fit(loop, small_train, checkpointer, epochs=1)
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step-00000004", "step-00000006", "step-00000008"]
    # what a crash mid-write leaves: a hidden staging folder (here even a complete-looking one)
    staging = tmp_path / ".tmp-step-00000010-x"
    staging.mkdir()
    (staging / "checkpoint.json").write_text("{")
    assert load_checkpoint(tmp_path).step == 8
    save_checkpoint(tmp_path, loop, epoch=1, batch=0, keep=3, run_id=checkpointer.run_id)
    assert not staging.exists(), "stale staging folders are swept on the next write"


def test_a_damaged_newest_checkpoint_is_reported_with_the_intact_previous_one(tmp_path, small_train):
    loop = unitrain.make_loop("numpy", unitrain.mlp(), seed=0)
    fit(loop, small_train, Checkpointer(tmp_path, every=3), epochs=1)
    newest = checkpoint_paths(tmp_path)[-1]
    with open(newest / "weights.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    with pytest.raises(CheckpointError, match=r"sha256 .*--resume .*step-00000006"):
        load_checkpoint(tmp_path)


def test_divergence_stops_at_the_step_and_writes_no_bad_checkpoint(tmp_path, small_train):
    loop = unitrain.make_loop("numpy", unitrain.mlp(), optimizer=SGD(lr=1e30), seed=0)
    with pytest.raises(Diverged, match="loss is nan at step 2 "):
        fit(loop, small_train, Checkpointer(tmp_path, every=1))
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step-00000001"]
    assert load_checkpoint(tmp_path).step == 1


# --- the command line -------------------------------------------------------------------------


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, **kwargs)


def start(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "unitrain", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)  # fmt: skip


def train_args(backend, folder, *extra):
    return ["train", "--no-progress", "--backend", backend, "--optimizer", "adam", "--lr", "0.001",
            "--max-steps", "12", "--checkpoint-dir", str(folder), "--checkpoint-every", "1", *extra]  # fmt: skip


def newest_step(folder):
    paths = checkpoint_paths(folder) if folder.is_dir() else []
    return int(paths[-1].name.split("-")[1]) if paths else 0


def final_state(folder):
    checkpoint = load_checkpoint(folder)
    assert checkpoint.finished and checkpoint.step == 12
    return {**checkpoint.weights, **{f"optimizer.{k}": v for k, v in checkpoint.optimizer_state.items()}}


def sigkill_and_resume(backend, tmp_path, kills):
    """Kill training with SIGKILL `kills` times at random steps, resuming each time; every checkpoint
    on disk must verify after each kill. The finished run must equal an uninterrupted one bit for bit."""
    reference = tmp_path / "reference"
    result = cli(*train_args(backend, reference))
    assert result.returncode == 0, result.stderr
    folder, chooser, killed = tmp_path / "killed", random.Random(f"{backend}-{kills}"), 0
    for _ in range(3 * kills):  # a kill can land after the run finished: then start over
        if killed == kills:
            break
        if newest_step(folder) and load_checkpoint(folder).finished:
            shutil.rmtree(folder)
        if newest_step(folder) >= 10:  # leave a few steps for the final resume
            break
        resume = ["--resume", str(folder)] if newest_step(folder) else []
        target = chooser.randint(newest_step(folder) + 1, 10)
        process = start(*train_args(backend, folder, *resume))
        while newest_step(folder) < target and process.poll() is None:
            time.sleep(0.002)
        time.sleep(chooser.uniform(0, 0.03))  # land anywhere: mid-step, mid-write, mid-rename
        process.send_signal(signal.SIGKILL)
        process.communicate()
        killed += process.returncode == -signal.SIGKILL
        for path in checkpoint_paths(folder):
            load_checkpoint(path)  # never a corrupt checkpoint
    assert killed, "no kill landed before the run finished"
    if not load_checkpoint(folder).finished:
        result = cli(*train_args(backend, folder, "--resume", str(folder)))
        assert result.returncode == 0, result.stderr
        assert "resuming" in result.stdout
    assert_same_state(final_state(folder), final_state(reference))


def test_sigkill_at_random_steps_then_resume_is_bit_identical_numpy(tmp_path):
    sigkill_and_resume("numpy", tmp_path, kills=3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_at_random_steps_then_resume_is_bit_identical(backend, tmp_path):
    sigkill_and_resume(backend, tmp_path, kills=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_checkpoints_at_a_step_boundary_and_says_how_to_resume(backend, tmp_path):
    folder = tmp_path / "run"
    process = start(*train_args(backend, folder, "--checkpoint-every", "4"))
    while newest_step(folder) < 4 and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    # MindSpore's own SIGINT handler turns Ctrl-C into SIGTERM, which stops the run the same way
    assert process.returncode == 128 + (signal.SIGTERM if backend == "mindspore" else signal.SIGINT), stderr
    assert f"resume with: unitrain train --resume {folder}" in stderr and "Traceback" not in stderr
    interrupted = load_checkpoint(folder)
    assert not interrupted.finished and interrupted.batch == interrupted.step  # a step boundary
    result = cli(*train_args(backend, folder, "--resume", str(folder)))
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "reference"
    assert cli(*train_args(backend, reference)).returncode == 0
    assert_same_state(final_state(folder), final_state(reference))


def test_ctrl_c_without_a_checkpoint_dir_still_checkpoints_into_a_new_folder(tmp_path):
    (tmp_path / "unitrain-interrupted-keep.txt").write_text("the user's")
    process = start("train", "--no-progress", "--epochs", "1", cwd=tmp_path)
    assert process.stdout.readline().startswith("unitrain: backend numpy")
    time.sleep(0.5)  # into the epoch
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    assert process.returncode == 130, stderr
    [folder] = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert folder.name.startswith("unitrain-interrupted-")
    assert f"resume with: unitrain train --resume {folder.name}\n" in stderr and "Traceback" not in stderr
    interrupted = load_checkpoint(folder)
    assert not interrupted.finished and interrupted.step > 0
    assert (tmp_path / "unitrain-interrupted-keep.txt").read_text() == "the user's"
    result = cli("train", "--no-progress", "--resume", folder.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(folder).finished


def test_sigterm_stops_at_a_step_boundary_like_ctrl_c(tmp_path):
    folder = tmp_path / "run"
    process = start(*train_args("numpy", folder, "--checkpoint-every", "4"))
    while newest_step(folder) < 4 and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert f"resume with: unitrain train --resume {folder}" in stderr
    assert not load_checkpoint(folder).finished


def test_cross_backend_resume_from_the_command_line(tmp_path):
    if "torch" not in BACKENDS:
        pytest.skip("torch is not installed")
    folder = tmp_path / "run"
    first = cli(*train_args("numpy", folder, "--max-steps", "12"))
    assert first.returncode == 0, first.stderr
    # extend the run (a new --max-steps) from a mid-run checkpoint, on torch, into a fresh directory
    moved = tmp_path / "moved"
    result = cli("train", "--no-progress", "--resume", str(folder / "step-00000010"), "--backend", "torch",
                 "--max-steps", "12", "--checkpoint-dir", str(moved))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "backend torch" in result.stdout and "trained on numpy" in result.stdout
    # both float32 runs approximate the run's float64 trajectory: the moved one may drift sqrt(n) times as far
    # as the uninterrupted one measurably does (drift_tolerances), n the longest sum of one step
    run = load_checkpoint(folder).run_spec()
    exact = unitrain.get_backend("numpy")(run.model_spec(), dtype="float64", **run.loop_options())
    exact.fit(run.datasets()[0], **run.fit_options())
    reference, result = final_state(folder), final_state(moved)
    truth = {**exact.state_dict(), **{f"optimizer.{k}": v for k, v in exact.optimizer_state_dict().items()}}
    truth = {key: np.asarray(truth[key]) for key in reference}
    size = gradient_size(run.model_spec(), (1, 28, 28), run.batch_size) + 10  # + the softmax over 10 classes
    tolerances = drift_tolerances([reference], truth, size)
    assert_within_drift(result, reference, {key: 2 * value for key, value in tolerances.items()})


def test_divergence_from_the_command_line(tmp_path):
    result = cli("train", "--no-progress", "--lr", "1e30", "--max-steps", "5", "--checkpoint-dir", str(tmp_path),
                 "--checkpoint-every", "1")  # fmt: skip
    assert result.returncode == 1
    assert "training diverged: loss is nan at step 2" in result.stderr and "step-00000001" in result.stderr
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["step-00000001"]


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished run, an unfinished one, and assorted bad files."""
    root = tmp_path_factory.mktemp("inputs")
    loop = unitrain.make_loop("numpy", unitrain.mlp(), seed=0)
    run = {"model": "mlp", "dataset": "mnist", "optimizer": "sgd", "batch_size": 64, "epochs": 1, "max_steps": 5,
           "shuffle": True}  # fmt: skip
    save_checkpoint(root / "finished", loop, epoch=0, batch=0, run=run, finished=True)
    for name in ("truncated", "corrupted", "unfinished"):
        save_checkpoint(root / name, loop, epoch=0, batch=0, run=run)
    weights = root / "truncated" / "step-00000000" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with open(root / "corrupted" / "step-00000000" / "weights.safetensors", "r+b") as f:
        f.seek(5000)
        f.write(b"\x01\x02\x03")
    cnn = unitrain.make_loop("numpy", unitrain.cnn(), seed=0)
    save_checkpoint(root / "cnn-run", cnn, epoch=0, batch=0, run={**run, "model": "cnn"})
    state = loop.state_dict()
    save_safetensors(root / "good.safetensors", state)
    save_safetensors(root / "missing.safetensors", {k: v for k, v in state.items() if k != "5.bias"})
    save_safetensors(root / "extra.safetensors", {**state, "6.weight": np.zeros((3, 3), np.float32)})
    save_safetensors(root / "misshaped.safetensors", {**state, "5.bias": np.zeros(11, np.float32)})
    (root / "model.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's opening bytes
    (root / "empty.safetensors").write_bytes(b"")
    (root / "a-directory").mkdir()
    (root / "not-a-dir").write_text("a file")
    from PIL import Image

    Image.new("L", (32, 32)).save(root / "big.png")
    Image.new("RGB", (28, 28)).save(root / "rgb.png")
    return root


def tree_digest(root: Path):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


BAD_INPUTS = [
    ("truncated checkpoint", ["train", "--resume", "{r}/truncated"], "bytes, the manifest says"),
    ("corrupted checkpoint", ["train", "--resume", "{r}/corrupted"], "does not match its sha256"),
    ("checkpoint of another model", ["train", "--resume", "{r}/cnn-run", "--model", "mlp"],
     "--model mlp differs from the resumed run's cnn"),
    ("weights of another model", ["evaluate", "--weights", "{r}/cnn-run/step-00000000/weights.safetensors"],
     "does not match the model: missing keys ['1.weight', '1.bias'"),
    ("missing key", ["evaluate", "--weights", "{r}/missing.safetensors"], "missing keys ['5.bias']"),
    ("extra key", ["predict", "--weights", "{r}/extra.safetensors"], "unexpected keys ['6.weight']"),
    ("mis-shaped key", ["evaluate", "--weights", "{r}/misshaped.safetensors"],
     "key '5.bias' has shape (11,), the model expects (10,)"),
    ("pickle", ["evaluate", "--weights", "{r}/model.pt"], "looks like a pickle"),
    ("empty file", ["evaluate", "--weights", "{r}/empty.safetensors"], "is empty, expected a safetensors file"),
    ("directory for a file", ["evaluate", "--weights", "{r}/a-directory"], "is a directory, expected a safetensors"),
    ("file for a directory", ["train", "--resume", "{r}/not-a-dir"], "is a regular file, expected a checkpoint"),
    ("finished run", ["train", "--resume", "{r}/finished"], "the run finished at step 0, there is nothing to resume"),
    ("unwritable checkpoint dir", ["train", "--checkpoint-dir", "{r}/not-a-dir/checkpoints"], "is not writable"),
    ("checkpoint dir of another run", ["train", "--checkpoint-dir", "{r}/unfinished"], "already holds a run's"),
    ("PNG of the wrong size", ["predict", "--weights", "{r}/good.safetensors", "--image", "{r}/big.png"],
     "is 32x32 pixels, expected 28x28"),
    ("PNG of the wrong mode", ["predict", "--weights", "{r}/good.safetensors", "--image", "{r}/rgb.png"],
     "has mode RGB, expected 8-bit grayscale"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clear_line_exit_2_and_overwrites_nothing(args, message, files):
    before = tree_digest(files)
    result = cli(*(arg.format(r=files) for arg in args))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("unitrain: error: ")
    assert tree_digest(files) == before


def test_a_read_only_checkpoint_dir_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only directories")
    tmp_path.chmod(0o555)
    try:
        result = cli("train", "--checkpoint-dir", str(tmp_path / "ckpt"))
    finally:
        tmp_path.chmod(0o755)
    assert result.returncode == 2 and "is not writable" in result.stderr


def test_manifest_records_what_a_resume_needs(files):
    manifest = json.loads((files / "unfinished" / "step-00000000" / "checkpoint.json").read_text())
    assert manifest["versions"]["unitrain"] == unitrain.__version__ and manifest["versions"]["numpy"]
    assert {"step", "epoch", "batch", "seed", "optimizer", "run", "files", "data_order"} <= manifest.keys()
    tensors, _ = load_safetensors(files / "unfinished" / "step-00000000" / "optimizer.safetensors")
    assert tensors["step"].dtype == np.int64


@pytest.mark.parametrize("backend", [name for name in ("numpy", "torch") if name in BACKENDS])
def test_every_metric_of_a_run_resumed_mid_epoch_is_the_uninterrupted_runs(backend, tmp_path, capsys):
    """The epoch's correct predictions before the resume are checkpointed with its losses: the
    resumed epoch's train_accuracy counted only the batches after it (0.76-0.87 against 0.744)."""
    from unitrain import cli as cli_module

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.integers(0, 256, (56, 28, 28), np.uint8), y_train=np.arange(56) % 10,
             x_test=rng.integers(0, 256, (16, 28, 28), np.uint8), y_test=np.arange(16) % 10)  # fmt: skip
    run = ["train", "--backend", backend, "--dataset", str(data), "--epochs", "2", "--batch-size", "8", "--no-progress"]
    records = {}
    for name, extra in (("full", ["--checkpoint-dir", str(tmp_path / "a"), "--checkpoint-every", "3", "--keep", "9"]),
                        ("resumed", ["--resume", str(tmp_path / "a" / "step-00000009"), "--checkpoint-dir",
                                     str(tmp_path / "b")])):  # fmt: skip
        metrics = tmp_path / f"{name}.jsonl"
        assert cli_module.main([*(run if name == "full" else run[:3]), *extra, "--metrics", str(metrics)]) == 0
        capsys.readouterr()
        records[name] = [json.loads(line) for line in metrics.read_text().splitlines()]
    full, (resumed,) = records["full"], records["resumed"]
    assert "train_accuracy" in resumed
    for key in resumed.keys() - {"samples_per_sec"}:
        assert resumed[key] == full[1][key], key
    assert load_checkpoint(tmp_path / "a" / "step-00000009").epoch_correct[1] == 2 * 8  # 2 batches into epoch 2
