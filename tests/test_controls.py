"""Training controls (unitrain.controls): frozen parameters, parameter groups, gradient accumulation
and early stopping on every backend, each against a hand-written PyTorch loop doing the same
(float64: the equations; float32: within the drift PyTorch's own float32 loop shows, as
tests/torch_reference.py derives it), and the bad input they can meet."""

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import installed_backends

import unitrain as ut
from unitrain import optim, schedules
from unitrain.checkpoint import checkpoint_paths, load_checkpoint
from unitrain.weights import load_safetensors

torch = pytest.importorskip("torch")
F = torch.nn.functional

from torch_reference import (  # noqa: E402 (after the importorskip)
    SEED,
    TorchRun,
    TorchRuns,
    assert_within_drift,
    expected_run,
    load_state,
    numpy_state,
    optimizer_buffers,
    torch_layers,
    torch_optimizer_arguments,
)

BACKENDS = installed_backends()
# MindSpore compiles a graph per loop (~5-15 s each on a busy 2-core machine): its cases run with -m slow
CHEAP_BACKENDS = [pytest.param(name, marks=pytest.mark.slow) if name == "mindspore" else name for name in BACKENDS]
FEATURES, CLASSES = 20, 3


def small_net():
    """Every kind of parameter a group or a freeze names: Linear weights and biases, a BatchNorm."""
    return ut.Sequential(ut.Linear(FEATURES, 16), ut.BatchNorm1d(16), ut.ReLU(), ut.Linear(16, CLASSES))


def data(samples, seed=SEED):
    """Float32 inputs, labels a fixed linear teacher gives (learnable, so that losses fall)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, FEATURES)).astype(np.float32)
    teacher = np.random.default_rng(99).standard_normal((FEATURES, CLASSES))
    return x, (x @ teacher).argmax(1)


def torch_optimizer(spec, groups):
    arguments = torch_optimizer_arguments(spec)
    return getattr(torch.optim, type(spec).__name__)(groups, **arguments, foreach=False)


def hand_loop(dtype, x, y, *, spec, frozen=(), groups=(), accumulate=1, epochs=1, batch_size=8, step_lr=None,
              reverse=False):  # fmt: skip
    """The fine-tuning tutorial's loop: ``requires_grad_(False)`` on the frozen parameters, torch.optim
    param groups (the rest last, with the optimizer's own options), ``(loss / K).backward()`` for K
    batches before each ``step()`` (Lightning's rule), StepLR stepped per epoch; batches in order."""
    model = load_state(torch_layers(small_net()).to(dtype), ut.init_weights(small_net(), SEED))
    named = dict(model.named_parameters())
    for name in frozen:
        named[name].requires_grad_(False)
    taken = set(frozen)
    param_groups = []
    for names, options in groups:
        param_groups.append({"params": [named[name] for name in names], **options})
        taken |= set(names)
    param_groups.append({"params": [param for name, param in named.items() if name not in taken]})
    optimizer = torch_optimizer(spec, param_groups)
    scheduler = None if step_lr is None else torch.optim.lr_scheduler.StepLR(optimizer, *step_lr)
    model.train()
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if reverse:
        batches = [(bx[::-1].copy(), by[::-1].copy()) for bx, by in batches]
    for _ in range(epochs):
        for start in range(0, len(batches), accumulate):
            optimizer.zero_grad()
            for bx, by in batches[start : start + accumulate]:
                loss = F.cross_entropy(model(torch.from_numpy(bx).to(dtype)), torch.from_numpy(by))
                (loss / accumulate).backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return TorchRun(numpy_state(model), optimizer_buffers(model, optimizer), {"loss": np.zeros(1)})


CASES = {
    # a frozen BatchNorm (its statistics still follow the batches) and first layer's bias; biases
    # without weight decay at a higher lr; SGD momentum under StepLR. "torch": the parameters the
    # patterns name, spelt out for the hand-written loop.
    "freeze-and-groups": dict(
        spec=optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01), frozen=["BatchNorm1d", "0.bias"],
        groups=[(["*.bias"], {"weight_decay": 0.0, "lr": 0.2})], step_lr=(1, 0.5), epochs=2,
        torch=dict(frozen=["0.bias", "1.weight", "1.bias"], groups=[(["3.bias"], {"weight_decay": 0.0, "lr": 0.2})]),
    ),
    # Adam with its own betas and lr for the last layer; 7 batches in steps of 3, 3 and 1. The bias
    # before the BatchNorm is frozen in both cases: its gradient is zero but for rounding, which
    # Adam would scale up to lr-sized steps in directions no two summation orders agree on.
    "accumulate": dict(
        spec=optim.Adam(lr=0.01), frozen=["0.bias"], groups=[(["3"], {"lr": 0.003, "betas": (0.8, 0.99)})],
        accumulate=3, epochs=2,
        torch=dict(frozen=["0.bias"], groups=[(["3.weight", "3.bias"], {"lr": 0.003, "betas": (0.8, 0.99)})]),
    ),
}  # fmt: skip
SAMPLES = 52  # batches of 8: six full ones and one of 4


def unitrain_run(backend, dtype, x, y, case):
    groups = [{"params": patterns, **options} for patterns, options in case.get("groups", ())]
    schedule = schedules.StepLR(*case["step_lr"]) if "step_lr" in case else None
    loop = ut.make_loop(backend, small_net(), optimizer=case["spec"], seed=SEED, dtype=dtype, lr_schedule=schedule,
                        frozen=case.get("frozen", ()), param_groups=groups)  # fmt: skip
    history = loop.fit((x, y), epochs=case["epochs"], batch_size=8, shuffle=False,
                       accumulate_grad_batches=case.get("accumulate", 1))  # fmt: skip
    return loop, history


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", CHEAP_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_controls_land_where_the_hand_written_torch_loop_lands(name, backend, dtype, torch_single_thread):
    if dtype == "float64" and "float64" not in ut.get_backend(backend).capabilities:
        pytest.skip(f"{backend} has no float64")
    case = CASES[name]
    x, y = data(SAMPLES)
    options = {key: case[key] for key in ("spec", "accumulate", "epochs", "step_lr") if key in case}
    frozen, groups = case["torch"]["frozen"], case["torch"]["groups"]
    runs = TorchRuns(*(hand_loop(torch_dtype, x, y, frozen=frozen, groups=groups, reverse=reverse, **options)
                       for torch_dtype, reverse in ((torch.float32, False), (torch.float64, False),
                                                    (torch.float32, True))))  # fmt: skip
    # the longest sum of one step: the inputs of the batches one optimizer step accumulates
    expected, tolerances = expected_run(runs, dtype, size=case.get("accumulate", 1) * 8 * FEATURES)
    loop, history = unitrain_run(backend, dtype, x, y, case)
    steps_per_epoch = -(-7 // case.get("accumulate", 1))
    assert [record["steps"] for record in history] == [steps_per_epoch * (e + 1) for e in range(case["epochs"])]
    state = loop.state_dict()
    assert_within_drift(state, expected.state, tolerances.state)
    buffers = loop.optimizer_state_dict()
    assert int(buffers.pop("step")) == steps_per_epoch * case["epochs"]
    assert sorted(buffers) == sorted(expected.buffers), "no optimizer state for frozen parameters"
    assert_within_drift({key: buffers[key] for key in expected.buffers}, expected.buffers, tolerances.buffers)
    initial = ut.init_weights(small_net(), SEED)
    for key in frozen:  # not one bit moved
        np.testing.assert_array_equal(state[key], initial[key].astype(dtype), err_msg=key)
    assert not set(frozen) & set(loop.gradients()), "gradients() leaves frozen parameters out"
    if "BatchNorm1d" in case.get("frozen", ()):
        assert not np.array_equal(state["1.running_mean"], initial["1.running_mean"]), "statistics still follow"


def noisy_data():
    """48 training samples with 20 % of the labels moved to another class, 40 clean validation
    samples: the validation loss falls for one epoch, then rises (see the margins test below)."""
    x, y = data(48)
    flip = np.random.default_rng(5).random(len(y)) < 0.3
    return (x, np.where(flip, (y + 1) % CLASSES, y)), data(40, seed=1)


def hand_early_stopping(dtype, train, val, *, lr, patience, epochs, reverse=False):
    """Keras' EarlyStopping(monitor="val_loss", patience, restore_best_weights=True) around the
    hand-written loop: returns the best epoch's state, each epoch's validation loss, the epochs run
    and the best epoch (1-based)."""
    model = load_state(torch_layers(small_net()).to(dtype), ut.init_weights(small_net(), SEED))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=False)
    (x, y), (vx, vy) = train, val
    best, best_state, best_epoch, wait, losses = np.inf, None, 0, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        for i in range(0, len(x), 8):
            bx, by = (x[i : i + 8][::-1].copy(), y[i : i + 8][::-1].copy()) if reverse else (x[i : i + 8], y[i : i + 8])
            optimizer.zero_grad()
            F.cross_entropy(model(torch.from_numpy(bx).to(dtype)), torch.from_numpy(by)).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(torch.from_numpy(vx).to(dtype)), torch.from_numpy(vy)).item())
        if losses[-1] < best:
            best, best_epoch, wait = losses[-1], epoch, 0
            best_state = {key: value.copy() for key, value in numpy_state(model).items()}
        else:
            wait += 1
            if wait >= patience:
                break
    return TorchRun(best_state, {}, {"val_loss": np.array(losses)}), epoch, best_epoch


@pytest.mark.parametrize("backend", CHEAP_BACKENDS)
def test_early_stopping_stops_where_the_hand_written_keras_rule_stops(backend, torch_single_thread):
    train, val = noisy_data()
    options = dict(lr=0.005, patience=2, epochs=10)
    (run32, stopped, best_epoch), (run64, *_), (reversed32, *_) = (
        hand_early_stopping(dtype, train, val, reverse=reverse, **options)
        for dtype, reverse in ((torch.float32, False), (torch.float64, False), (torch.float32, True))
    )
    expected, tolerances = expected_run(TorchRuns(run32, run64, reversed32), "float32", size=8 * FEATURES)
    # the premise: each "better than the best so far?" decision is by more than two of the tolerances a
    # backend's validation loss may lie from the exact one (its own and the best's), so none decides otherwise
    losses, allowed = run64.losses["val_loss"], tolerances.losses["val_loss"]
    assert min(abs(losses[i] - min(losses[:i])) for i in range(1, len(losses))) > 2 * allowed
    assert (stopped, best_epoch) == (4, 2), "the case is one that stops after improving"
    loop = ut.make_loop(backend, small_net(), optimizer=optim.SGD(lr=0.005, momentum=0.9), seed=SEED)
    spec = ut.EarlyStopping(monitor="val_loss", patience=2)
    history = loop.fit(train, epochs=10, batch_size=8, shuffle=False, val_data=val, early_stopping=spec)
    assert [record["epoch"] for record in history] == [1, 2, 3, 4], "the history keeps every epoch trained"
    assert loop.stop_training and loop.early_stopping.best_epoch == 2 and loop.early_stopping.wait == 2
    assert_within_drift({"val_loss": np.array([r["val_loss"] for r in history])}, expected.losses, tolerances.losses)
    assert_within_drift(loop.state_dict(), expected.state, tolerances.state)  # the best epoch's weights


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """A Keras-style .npz of 240 + 60 random 28x28 images: ``mlp`` trains on it in moments."""
    path = tmp_path_factory.mktemp("data") / "small.npz"
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), rng.integers(0, 10, 300)
    np.savez(path, x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    return path


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--freeze", "9"], "frozen: '9' matches no parameter of the model; its parameters: 1.weight"),
        (["--param-group", "*.bias:lr=0.1", "--param-group", "5:lr=0.2"],
         "param_groups[1]: parameter '5.bias' is in param_groups[0] too"),
        (["--freeze", "1", "--param-group", "1:lr=0.1"], "param_groups[0]: every parameter it names is frozen"),
        (["--param-group", "*.bias:foo=1"], "param_groups[0]: SGD has no option 'foo'"),
        (["--param-group", "*.bias:lr=-1"], "param_groups[0]: lr must be > 0, got -1"),
        (["--param-group", "*.bias"], "argument --param-group: expected PATTERNS:OPTION=VALUE"),
        (["--early-stopping", "val_loss"], "val_loss needs validation data (val_split)"),
        (["--early-stopping", "val_f1"], "argument --early-stopping: invalid choice: 'val_f1'"),
        (["--early-stopping", "test_accuracy", "--loss", "mse"], "test_accuracy needs integer class targets"),
        (["--patience", "2"], "--patience needs --early-stopping METRIC"),
        (["--accumulate-grad-batches", "0"], "argument --accumulate-grad-batches: must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_controls_are_one_line_exit_2(args, message, small_npz):
    result = cli("train", "--dataset", str(small_npz), "--no-progress", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stdout == ""


def test_a_recipe_holds_the_controls(tmp_path):
    run = ut.Run(
        frozen=("1",), param_groups=({"params": ["*.bias"], "weight_decay": 0.0},), accumulate_grad_batches=2,
        early_stopping=ut.EarlyStopping(monitor="val_accuracy", patience=3), data=ut.DataSpec(val_split=100),
    )  # fmt: skip
    (tmp_path / "run.toml").write_text(run.to_toml())
    assert ut.load_recipe(tmp_path / "run.toml") == run
    loop = run.make_loop("numpy")
    assert loop.frozen == {"1.weight", "1.bias"}
    assert [(group.names, group.spec.weight_decay) for group in loop.param_groups] == [
        (("3.bias", "5.bias"), 0.0), (("3.weight", "5.weight"), 0.0)]  # fmt: skip


def control_args(backend, folder, small_npz, *extra):
    """13 batches an epoch in steps of 2 (the last of 1), a frozen first layer, biases in their own
    group, early stopping on the validation loss with a kept best: every control checkpointed."""
    return ["train", "--no-progress", "--backend", backend, "--dataset", str(small_npz), "--val-split", "40",
            "--batch-size", "16", "--epochs", "4", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
            "--weight-decay", "0.01", "--freeze", "1", "--param-group", "*.bias:weight_decay=0,lr=0.1",
            "--accumulate-grad-batches", "2", "--early-stopping", "val_loss", "--patience", "1",
            "--checkpoint-dir", str(folder), "--checkpoint-every", "1", *extra]  # fmt: skip


def newest_step(folder):
    paths = checkpoint_paths(folder) if folder.is_dir() else []
    return int(paths[-1].name.split("-")[1]) if paths else 0


def sigkill_and_resume_with_controls(backend, tmp_path, small_npz, kills=2):
    """SIGKILL at random steps, resume; the finished run's checkpoint (weights, optimizer state, early
    stopping's record and best weights) and its saved weights equal an uninterrupted run's bit for bit."""
    reference = tmp_path / "reference"
    result = cli(*control_args(backend, reference, small_npz, "--save", str(tmp_path / "reference.safetensors")))
    assert result.returncode == 0, result.stderr
    assert "stopped early" in result.stdout, "the case stops early, so the resumed run must stop alike"
    last = newest_step(reference)
    folder, chooser, killed = tmp_path / "killed", random.Random(backend), 0
    for _ in range(3 * kills):
        if killed == kills or newest_step(folder) >= last - 2:
            break
        resume = ["--resume", str(folder)] if newest_step(folder) else []
        process = subprocess.Popen([sys.executable, "-m", "unitrain", *control_args(backend, folder, small_npz,
                                    *resume)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        target = chooser.randint(newest_step(folder) + 1, last - 2)
        while newest_step(folder) < target and process.poll() is None:
            time.sleep(0.002)
        time.sleep(chooser.uniform(0, 0.02))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        killed += process.returncode == -signal.SIGKILL
    assert killed, "no kill landed"
    assert not load_checkpoint(folder).finished
    saved = tmp_path / "resumed.safetensors"
    result = cli(*control_args(backend, folder, small_npz, "--resume", str(folder), "--save", str(saved)))
    assert result.returncode == 0, result.stderr
    assert "stopped early" in result.stdout
    ours, theirs = load_checkpoint(folder), load_checkpoint(reference)
    assert ours.finished and ours.step == theirs.step
    assert ours.manifest["early_stopping"] == theirs.manifest["early_stopping"]
    for part in ("weights", "optimizer_state", "best_weights"):
        mine, expected = getattr(ours, part), getattr(theirs, part)
        assert list(mine) == list(expected) and expected
        for key, value in expected.items():
            np.testing.assert_array_equal(mine[key], value, err_msg=f"{part} {key}")
    # the tensors, not the files' bytes: safetensors writes its metadata map in a per-process order
    (mine, _), (expected, _) = (load_safetensors(path) for path in (saved, tmp_path / "reference.safetensors"))
    assert list(mine) == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(mine[key], value, err_msg=f"saved {key}")


def test_sigkill_and_resume_with_every_control_is_bit_identical_numpy(tmp_path, small_npz):
    sigkill_and_resume_with_controls("numpy", tmp_path, small_npz)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "numpy"])
def test_sigkill_and_resume_with_every_control_is_bit_identical(backend, tmp_path, small_npz):
    sigkill_and_resume_with_controls(backend, tmp_path, small_npz)
