"""OneCycleLR with ``cycle_momentum=True`` (PyTorch's default) cycles the optimizer's momentum (Adam's
``betas[0]``): the lr and momentum floats of torch.optim.lr_scheduler.OneCycleLR, training on every
backend landing where the hand-written torch loop with that scheduler lands, a resumed run
continuing the uninterrupted one, and what PyTorch refuses refused in one line."""

import functools
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import installed_backends

import unitrain
from unitrain import optim, schedules
from unitrain.checkpoint import load_checkpoint, save_checkpoint
from unitrain.run import Run, RunError

torch = pytest.importorskip("torch")

from test_optim_schedules import _slow_on_mindspore, _small_run  # noqa: E402 (after the importorskip)
from torch_reference import (  # noqa: E402
    SEED,
    assert_within_drift,
    expected_run,
    random_batches,
    reference,
    torch_optimizer_arguments,
    torch_runs,
)

T = torch.optim.lr_scheduler


def _live_momentum(group):
    """What torch's OneCycleLR sets: ``betas[0]`` where the optimizer has betas, else ``momentum``."""
    return group["betas"][0] if "betas" in group else group["momentum"]


# (schedule, the torch optimizer it runs, the torch scheduler)
SCHEDULES = [
    ("OneCycleLR(max_lr=0.5, total_steps=30)", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
     lambda o: T.OneCycleLR(o, 0.5, 30)),
    ("OneCycleLR(max_lr=0.5, total_steps=30)", lambda p: torch.optim.SGD(p, lr=0.1),
     lambda o: T.OneCycleLR(o, 0.5, 30)),
    ("OneCycleLR(max_lr=0.01, epochs=3, steps_per_epoch=10)", lambda p: torch.optim.Adam(p),
     lambda o: T.OneCycleLR(o, 0.01, epochs=3, steps_per_epoch=10)),
    ("OneCycleLR(max_lr=0.01, total_steps=30, three_phase=True, base_momentum=0.8, max_momentum=0.9)",
     lambda p: torch.optim.AdamW(p), lambda o: T.OneCycleLR(o, 0.01, 30, three_phase=True, base_momentum=0.8,
                                                            max_momentum=0.9)),
    ("OneCycleLR(max_lr=0.5, total_steps=30, anneal_strategy='linear', pct_start=0.25, base_momentum=0.5, "
     "max_momentum=0.99)", lambda p: torch.optim.RMSprop(p),
     lambda o: T.OneCycleLR(o, 0.5, 30, anneal_strategy="linear", pct_start=0.25, base_momentum=0.5,
                            max_momentum=0.99)),
    ("OneCycleLR(max_lr=0.5, total_steps=30, three_phase=True, anneal_strategy='linear')",
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True),
     lambda o: T.OneCycleLR(o, 0.5, 30, three_phase=True, anneal_strategy="linear")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "make_optimizer", "make_scheduler"), SCHEDULES,
    ids=["SGD", "SGD-without-momentum", "Adam-epochs", "AdamW-three-phase", "RMSprop-linear", "nesterov-three-linear"],
)  # fmt: skip
def test_lr_and_momentum_are_torchs_floats(text, make_optimizer, make_scheduler):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([param])
    group = optimizer.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the scheduler without training steps
        scheduler = make_scheduler(optimizer)
        expected = [(group["lr"], _live_momentum(group))]
        for _ in range(30):
            scheduler.step()
            expected.append((group["lr"], _live_momentum(group)))
    running = schedules.parse_schedule(text).start(group["initial_lr"])
    got = [(running.lr, running.momentum)]
    for _ in range(30):
        running.step()
        got.append((running.lr, running.momentum))
    assert got == expected  # exactly, float for float
    running.seek(11)
    assert (running.lr, running.momentum) == expected[11]


def test_momentum_is_none_where_nothing_cycles_it():
    schedule = schedules.parse_schedule("OneCycleLR(max_lr=0.5, total_steps=30, cycle_momentum=False)")
    assert schedule.start(0.1).momentum is None
    loop = unitrain.make_loop("numpy", unitrain.mlp(), optimizer=optim.Adagrad())
    assert loop.momentum is None


# --- training against the hand-written torch loop ----------------------------------------------------

STEPS = 20
TRAINED = [
    (optim.SGD(lr=0.01, momentum=0.9), "OneCycleLR(max_lr=0.05, total_steps=20)"),
    (optim.Adam(lr=0.001), "OneCycleLR(max_lr=0.003, total_steps=20)"),
]


@functools.cache
def _torch_runs(spec, text):
    """The batches and PyTorch's runs (optimizer stepped, then its OneCycleLR), once for all backends."""
    batches = random_batches((784,), 10, STEPS, batch_size=8)
    arguments = torch_optimizer_arguments(spec)
    spec_schedule = schedules.parse_schedule(text)
    return batches, torch_runs(
        lambda dtype: reference("mlp", dtype),
        lambda params: getattr(torch.optim, type(spec).__name__)(params, **arguments, foreach=False),
        batches,
        lambda optimizer: T.OneCycleLR(optimizer, spec_schedule.max_lr, spec_schedule.total_steps),
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", _slow_on_mindspore(installed_backends()))
@pytest.mark.parametrize(("spec", "text"), TRAINED, ids=[str(case[0]) for case in TRAINED])
def test_training_lands_where_torch_with_one_cycle_lands(backend, spec, text, dtype, torch_single_thread):
    """From the same weights and batches, 20 steps with the momentum cycling. Float64: the
    conformance formula (the equations, ~1e-13); float32: within sqrt(n) times PyTorch's own
    float32 drift (torch_reference.expected_run)."""
    loop_class = unitrain.get_backend(backend)
    if dtype == "float64" and "float64" not in loop_class.capabilities:
        pytest.skip(f"{backend} has no float64")
    batches, runs = _torch_runs(spec, text)
    expected, tolerances = expected_run(runs, dtype, size=batches[0][0].size)
    loop = unitrain.make_loop(
        backend, unitrain.mlp(), optimizer=spec, seed=SEED, dtype=dtype, lr_schedule=schedules.parse_schedule(text)
    )
    data = unitrain.ArrayDataset(np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches]))
    loop.fit(data, epochs=1, batch_size=len(batches[0][0]), shuffle=False)
    state = loop.state_dict()
    assert_within_drift({key: state[key] for key in expected.state}, expected.state, tolerances.state)
    buffers = loop.optimizer_state_dict()
    assert int(buffers.pop("step")) == STEPS
    assert sorted(buffers) == sorted(expected.buffers), "PyTorch's buffer names"
    assert_within_drift({key: buffers[key] for key in expected.buffers}, expected.buffers, tolerances.buffers)
    assert loop.optimizer_spec == spec  # the run's spec stays; the live value follows the schedule
    running = schedules.parse_schedule(text).start(spec.lr)
    running.seek(STEPS)
    assert (loop.lr, loop.momentum) == (running.lr, running.momentum)


# --- resuming ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "spec"),
    [("numpy", optim.SGD(lr=0.05)), ("torch", optim.Adam(lr=0.01)), ("torch", optim.SGD(lr=0.05))],
    ids=["numpy-SGD-without-momentum", "torch-Adam", "torch-SGD-without-momentum"],
)
def test_a_resumed_run_continues_with_the_uninterrupted_runs_momentum(tmp_path, backend, spec, torch_single_thread):
    """Stopped mid-epoch, checkpointed and restored: the schedule replays to its position and the
    run continues bit for bit (SGD without momentum: OneCycleLR gives it a momentum buffer, which
    the checkpoint holds)."""
    model, data = _small_run()
    options = {"optimizer": spec, "lr_schedule": schedules.OneCycleLR(max_lr=0.5, total_steps=16)}
    whole = unitrain.make_loop(backend, model, **options)
    history = whole.fit(data, epochs=4, batch_size=10)
    first = unitrain.make_loop(backend, model, **options)
    first.fit(data, epochs=2, batch_size=10, max_steps=6)  # stops mid-epoch 1, batch 2
    save_checkpoint(tmp_path, first, epoch=1, batch=2)
    resumed = unitrain.make_loop(backend, model, **options)
    load_checkpoint(tmp_path).restore(resumed)
    assert (resumed.lr, resumed.momentum) == (first.lr, first.momentum) and resumed.momentum != whole.momentum
    rest = resumed.fit(data, epochs=4, batch_size=10, start_epoch=1, start_batch=2)
    assert [record["lr"] for record in rest[1:]] == [record["lr"] for record in history[2:]]
    assert resumed.momentum == whole.momentum
    for key, value in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value)
    for key, value in whole.optimizer_state_dict().items():
        np.testing.assert_array_equal(resumed.optimizer_state_dict()[key], value)


# --- what PyTorch refuses -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [optim.Adagrad(), optim.Adadelta()], ids=["Adagrad", "Adadelta"])
def test_an_optimizer_without_momentum_or_betas_is_refused(spec):
    schedule = schedules.OneCycleLR(max_lr=0.1, total_steps=10)
    message = f"{type(spec).__name__} does not have"
    with pytest.raises(ValueError, match=message):
        unitrain.make_loop("numpy", unitrain.mlp(), optimizer=spec, lr_schedule=schedule)
    with pytest.raises(RunError, match=f"lr_schedule: .*{message}"):
        Run(optimizer=spec, lr_schedule=str(schedule))
    # without cycling, as in PyTorch, any optimizer runs it
    unitrain.make_loop("numpy", unitrain.mlp(), optimizer=spec, lr_schedule=schedules.parse_schedule(
        "OneCycleLR(max_lr=0.1, total_steps=10, cycle_momentum=False)"))  # fmt: skip


def test_cli_refuses_adagrad_with_cycling_before_training():
    result = subprocess.run(
        [sys.executable, "-m", "unitrain", "train", "--optimizer", "adagrad",
         "--lr-schedule", "OneCycleLR(max_lr=0.1, total_steps=10)", "--epochs", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Adagrad does not have" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# --- MindSpore: the momentum is an input of the compiled step ------------------------------------


@pytest.mark.skipif("mindspore" not in installed_backends(), reason="MindSpore is not installed")
def test_cycling_momentum_compiles_nothing_on_mindspore(monkeypatch):
    """As test_optim_schedules' set_lr test: counting MindSpore's graph compilations while the
    schedule changes lr and momentum at every step."""
    from mindspore.graph import api

    compiled = []
    original = api._check_recompile
    monkeypatch.setattr(api, "_check_recompile", lambda *args: compiled.append(args[3]) or original(*args))
    model, data = _small_run()
    loop = unitrain.make_loop("mindspore", model, optimizer=optim.Adam(lr=0.01),
                              lr_schedule=schedules.OneCycleLR(max_lr=0.1, total_steps=4))  # fmt: skip
    loop.fit(data, epochs=1, batch_size=10, max_steps=1)
    before, momentum = len(compiled), loop.momentum
    assert before >= 1, "the counter sees the first compilation"
    loop.fit(data, epochs=1, batch_size=10, start_batch=1)
    assert len(compiled) == before
    assert loop.momentum != momentum and loop.schedule_position == 4
