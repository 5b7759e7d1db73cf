"""RMSprop, Adagrad, Adadelta on every backend against torch.optim; the LR schedules against
torch.optim.lr_scheduler (resumed mid-schedule too); gradient clipping; the CLI flags."""

import functools
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import installed_backends

import unitrain
from unitrain import optim, schedules
from unitrain.checkpoint import load_checkpoint, save_checkpoint

torch = pytest.importorskip("torch")

from torch_reference import (  # noqa: E402 (after the importorskip)
    SEED,
    assert_within_drift,
    expected_run,
    load_state,
    random_batches,
    reference,
    steps_tolerance,
    torch_runs,
)
from unitrain.conformance.tolerances import tolerance  # noqa: E402

NEW_OPTIMIZERS = [
    (optim.RMSprop(lr=0.001, momentum=0.5, centered=True, weight_decay=0.01), "RMSprop"),
    (optim.RMSprop(lr=0.001), "RMSprop"),
    (optim.Adagrad(lr=0.01, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01), "Adagrad"),
    (optim.Adadelta(lr=1.0, weight_decay=0.01), "Adadelta"),
]


def _torch_optimizer(spec, params):
    arguments = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    return getattr(torch.optim, type(spec).__name__)(params, **arguments, foreach=False)


@functools.cache
def _torch_runs(spec):
    """The batches and PyTorch's runs on them, once per spec for all backends."""
    batches = random_batches((784,), 10, 20, batch_size=8)
    return batches, torch_runs(
        lambda dtype: reference("mlp", dtype), lambda params: _torch_optimizer(spec, params), batches
    )


def _slow_on_mindspore(backends):
    """MindSpore compiles a graph per optimizer (~5-15 s each on a busy 2-core machine)."""
    return [pytest.param(name, marks=pytest.mark.slow) if name == "mindspore" else name for name in backends]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", _slow_on_mindspore(installed_backends()))
@pytest.mark.parametrize("spec", [case[0] for case in NEW_OPTIMIZERS], ids=[str(case[0]) for case in NEW_OPTIMIZERS])
def test_new_optimizers_land_where_torch_optim_lands_after_20_steps(backend, spec, dtype, torch_single_thread):
    """From the same weights and batches. Float64: the equations (conformance formula, ~1e-13).
    Float32: within sqrt(n) times the drift of PyTorch's own float32 loop against float64
    (torch_reference.expected_run). That drift is ~3e-8 for Adagrad and Adadelta, but RMSprop's first steps
    divide each gradient by about its own magnitude, so PyTorch's float32 run itself lands up to 6e-3
    (centered) from its float64 run on this case."""
    loop_class = unitrain.get_backend(backend)
    if dtype == "float64" and "float64" not in loop_class.capabilities:
        pytest.skip(f"{backend} has no float64")
    batches, runs = _torch_runs(spec)
    expected, tolerances = expected_run(runs, dtype, size=batches[0][0].size)
    loop = unitrain.make_loop(backend, unitrain.mlp(), optimizer=spec, seed=SEED, dtype=dtype)
    for batch in batches:
        loop.step(batch)
    state = loop.state_dict()
    assert_within_drift({key: state[key] for key in expected.state}, expected.state, tolerances.state)
    buffers = loop.optimizer_state_dict()
    assert int(buffers.pop("step")) == len(batches)
    assert sorted(buffers) == sorted(expected.buffers), "PyTorch's buffer names"
    assert_within_drift({key: buffers[key] for key in expected.buffers}, expected.buffers, tolerances.buffers)


@pytest.mark.parametrize("spec", [case[0] for case in NEW_OPTIMIZERS] + [optim.SGD(momentum=0.9), optim.AdamW()])
def test_in_place_updates_give_the_same_bits(spec):
    """What the NumPy and Chainer adapters use (no temporaries per operation) equals the functional form."""
    rng = np.random.default_rng(0)
    param = rng.standard_normal(50).astype(np.float32)
    functional, in_place = (param.copy(), ()), (param.copy(), ())
    buffers = {}
    for step in range(1, 6):
        grad = rng.standard_normal(50).astype(np.float32)
        if not buffers and not isinstance(spec, optim.SGD):
            start = tuple(np.full_like(param, optim.initial_buffer_value(spec, n)) for n in spec.state_names)
            buffers = {"functional": start, "in_place": tuple(b.copy() for b in start)}
        elif not buffers:
            buffers = {"functional": (None,) * len(spec.state_names), "in_place": (None,) * len(spec.state_names)}
        new_param, buffers["functional"] = optim.optimizer_update(
            spec, functional[0], grad, buffers["functional"], step, 0.01, np.sqrt
        )
        functional = (new_param, ())
        _, buffers["in_place"] = optim.optimizer_update(
            spec, in_place[0], grad, buffers["in_place"], step, 0.01, np.sqrt, in_place=True
        )
        np.testing.assert_array_equal(in_place[0], functional[0])
        for a, b in zip(buffers["in_place"], buffers["functional"], strict=True):
            np.testing.assert_array_equal(a, b)


# --- schedules ---------------------------------------------------------------------------------

T = torch.optim.lr_scheduler
SCHEDULE_CASES = [
    ("StepLR(step_size=1, gamma=0.7)", lambda o: T.StepLR(o, step_size=1, gamma=0.7)),
    ("StepLR(step_size=3)", lambda o: T.StepLR(o, 3)),
    ("MultiStepLR(milestones=[2, 5, 5], gamma=0.3)", lambda o: T.MultiStepLR(o, [2, 5, 5], 0.3)),
    ("ExponentialLR(gamma=0.93)", lambda o: T.ExponentialLR(o, 0.93)),
    ("CosineAnnealingLR(T_max=7, eta_min=0.001)", lambda o: T.CosineAnnealingLR(o, 7, 0.001)),
    ("LinearLR()", lambda o: T.LinearLR(o)),
    ("LinearLR(0.1, 0.5, 4)", lambda o: T.LinearLR(o, 0.1, 0.5, 4)),
    ("OneCycleLR(max_lr=0.5, total_steps=30, cycle_momentum=False)",
     lambda o: T.OneCycleLR(o, 0.5, 30, cycle_momentum=False)),
    ("OneCycleLR(max_lr=0.5, epochs=3, steps_per_epoch=10, three_phase=True, anneal_strategy='linear', "
     "cycle_momentum=False)",
     lambda o: T.OneCycleLR(o, 0.5, epochs=3, steps_per_epoch=10, three_phase=True, anneal_strategy="linear",
                            cycle_momentum=False)),
    ("SequentialLR(schedulers=[LinearLR(start_factor=0.1, total_iters=3), CosineAnnealingLR(T_max=5)], milestones=[3])",
     lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, total_iters=3), T.CosineAnnealingLR(o, 5)], [3])),
    ("SequentialLR([ExponentialLR(0.9), StepLR(2, 0.5), CosineAnnealingLR(4)], [4, 9])",
     lambda o: T.SequentialLR(o, [T.ExponentialLR(o, 0.9), T.StepLR(o, 2, 0.5), T.CosineAnnealingLR(o, 4)], [4, 9])),
]  # fmt: skip


@pytest.mark.parametrize(("text", "make_torch"), SCHEDULE_CASES, ids=[case[0][:40] for case in SCHEDULE_CASES])
def test_schedules_give_torch_lr_schedulers_floats(text, make_torch):
    steps = 30
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the scheduler without training steps
        scheduler = make_torch(optimizer)
        expected = [optimizer.param_groups[0]["lr"]]
        for _ in range(steps):
            scheduler.step()
            expected.append(optimizer.param_groups[0]["lr"])
    spec = schedules.parse_schedule(text)
    assert schedules.parse_schedule(str(spec)) == spec
    running = spec.start(0.1)
    assert [running.lr] + [running.step() for _ in range(steps)] == expected  # exactly, float for float
    assert running.seek(7) == expected[7] and running.seek(19) == expected[19]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Foo(step_size=1)", "unknown schedule 'Foo'"),
        ("StepLR(step=1)", "StepLR has no argument 'step'"),
        ("StepLR(step_size=__import__('os').getcwd())", "is not a schedule call"),
        ("StepLR(step_size=x)", "'x' is not a literal value"),
        ("StepLR()", "StepLR needs step_size"),
        ("StepLR(step_size=0)", "step_size must be an integer >= 1"),
        ("OneCycleLR(max_lr=0.1, total_steps=10, max_momentum=1.0)", "max_momentum must be in (0, 1)"),
        ("OneCycleLR(max_lr=0.1, total_steps=10, base_momentum=0.0)", "base_momentum must be in (0, 1)"),
        ("OneCycleLR(max_lr=0.1, total_steps=10, cycle_momentum=1)", "cycle_momentum must be True or False"),
        ("1 + 2", "is not a schedule call"),
    ],
)
def test_bad_schedules_are_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedules.parse_schedule(text)


def _small_run():
    model = unitrain.Sequential([unitrain.Linear(6, 8), unitrain.Tanh(), unitrain.Linear(8, 3)])
    rng = np.random.default_rng(1)
    data = unitrain.ArrayDataset(rng.standard_normal((40, 6)).astype(np.float32), rng.integers(0, 3, 40))
    return model, data


@pytest.mark.parametrize(
    "text", ["StepLR(step_size=1, gamma=0.7)", "OneCycleLR(max_lr=0.5, total_steps=40, cycle_momentum=False)"]
)
def test_a_resumed_run_follows_the_uninterrupted_runs_lr(tmp_path, text):
    model, data = _small_run()
    spec = schedules.parse_schedule(text)
    options = {"optimizer": optim.Adadelta(), "lr_schedule": spec, "clip_grad_norm": 0.5}
    whole = unitrain.make_loop("numpy", model, **options)
    history = whole.fit(data, epochs=4, batch_size=10)
    first = unitrain.make_loop("numpy", model, **options)
    first.fit(data, epochs=2, batch_size=10, max_steps=6)  # stops mid-epoch 1, batch 2
    save_checkpoint(tmp_path, first, epoch=1, batch=2)
    resumed = unitrain.make_loop("numpy", model, **options)
    load_checkpoint(tmp_path).restore(resumed)
    assert resumed.lr == first.lr and resumed.schedule_position == first.schedule_position
    rest = resumed.fit(data, epochs=4, batch_size=10, start_epoch=1, start_batch=2)
    assert [record["lr"] for record in rest[1:]] == [record["lr"] for record in history[2:]]
    for key, value in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value)
    other = unitrain.make_loop("numpy", model, optimizer=optim.Adadelta(), lr_schedule=schedules.StepLR(step_size=2))
    with pytest.raises(unitrain.checkpoint.CheckpointError, match="lr_schedule"):
        load_checkpoint(tmp_path).restore(other)


# --- clipping and set_lr -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", installed_backends())
@pytest.mark.parametrize("clipping", [{"clip_grad_norm": 0.5}, {"clip_grad_value": 0.01}])
def test_clipping_is_torchs_on_every_backend(backend, clipping, torch_single_thread):
    """Float64 where the backend has it (the equations, within ~1e-15), float32 on MindSpore."""
    model, data = _small_run()
    dtype = "float32" if backend == "mindspore" else "float64"
    loop = unitrain.make_loop(backend, model, optimizer=optim.SGD(lr=0.5, momentum=0.9), dtype=dtype, **clipping)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(getattr(torch, dtype))
    load_state(net, loop.state_dict())
    reference_optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, foreach=False)
    for x, y in data.batches(10):
        loop.step((x, y))
        reference_optimizer.zero_grad()
        torch.nn.functional.cross_entropy(
            net(torch.from_numpy(x).to(getattr(torch, dtype))), torch.from_numpy(y)
        ).backward()
        if "clip_grad_norm" in clipping:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clipping["clip_grad_norm"], foreach=False)
        else:
            torch.nn.utils.clip_grad_value_(net.parameters(), clipping["clip_grad_value"], foreach=False)
        reference_optimizer.step()
    # each of the 4 steps' gradients within the formula, the clipping's norm adding every gradient element
    parameters = sum(value.numel() for value in net.parameters())
    bound = steps_tolerance(model, list(data.batches(10)), dtype, loss_size=3 + parameters)  # + the softmax
    for key, value in net.state_dict().items():
        value = value.detach().numpy()
        assert np.abs(loop.state_dict()[key] - value).max() <= bound * max(1, np.abs(value).max()), key


def test_clipping_is_global_not_per_tensor():
    """The factor comes from all gradients' norm together: clipping each by its own norm (a broken
    adapter) gives other gradients here."""
    model, data = _small_run()
    loop = unitrain.make_loop("numpy", model, optimizer=optim.SGD(lr=0.5), dtype="float64", clip_grad_norm=0.1)
    x, y = next(iter(data.batches(10)))
    loop.zero_grad()
    loop.backward(loop.loss(loop.forward(x), y))
    raw = loop.gradients()
    total = np.sqrt(sum(float((g**2).sum()) for g in raw.values()))
    loop.update()  # clips the accumulated gradients in place, as clip_grad_norm_ does
    clipped = loop.gradients()
    per_tensor = {key: grad * min(1.0, 0.1 / (np.linalg.norm(grad) + 1e-6)) for key, grad in raw.items()}
    # float64: the factor's norm adds every gradient element's square, in another order here
    count = sum(grad.size for grad in raw.values())
    for key, grad in raw.items():
        atol = 2 * tolerance(np.float64, count, float(np.abs(grad).max()))
        np.testing.assert_allclose(clipped[key], grad * min(1.0, 0.1 / (total + 1e-6)), rtol=0, atol=atol)
    assert any(not np.allclose(clipped[key], per_tensor[key]) for key in raw)


@pytest.mark.parametrize("backend", installed_backends())
def test_set_lr_changes_the_live_loop(backend):
    model, data = _small_run()
    x, y = next(iter(data.batches(10)))
    loops = [unitrain.make_loop(backend, model, optimizer=optim.RMSprop(lr=0.01)) for _ in range(2)]
    reference = unitrain.make_loop("numpy", model, optimizer=optim.RMSprop(lr=0.003))
    loops[0].set_lr(0.003)
    for loop in (loops[0], reference):
        loop.step((x, y))
    loops[1].step((x, y))
    difference = max(np.abs(loops[0].state_dict()[k] - reference.state_dict()[k]).max() for k in reference.state_dict())
    moved = max(np.abs(loops[1].state_dict()[k] - reference.state_dict()[k]).max() for k in reference.state_dict())
    # one float32 step on two backends (weights below 1): each within the formula (+ the softmax over 3)
    allowed = steps_tolerance(model, [(x, y)], np.float32, loss_size=3)
    assert difference <= allowed < moved
    with pytest.raises(ValueError, match="lr must be"):
        loops[0].set_lr(float("nan"))


# --- the command line ----------------------------------------------------------------------------


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    "schedule", ["Foo(1)", "StepLR(step=1)", "StepLR(step_size=open('x'))", "StepLR(step_size=1", "StepLR(1, 2, 3)"]
)
def test_cli_refuses_bad_schedules_before_training(schedule):
    result = _cli("train", "--lr-schedule", schedule, "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--lr-schedule" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_cli_adadelta_with_steplr_and_clipping_shows_the_lr_per_epoch(tmp_path):
    metrics = tmp_path / "m.jsonl"
    result = _cli(
        "train", "--backend", "numpy", "--optimizer", "adadelta", "--lr", "1.0",
        "--lr-schedule", "StepLR(step_size=1, gamma=0.7)", "--clip-grad-norm", "1", "--epochs", "3",
        "--batch-size", "2000", "--metrics", str(metrics),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [record["lr"] for record in records] == [1.0, 0.7, 0.7 * 0.7]  # torch's StepLR floats
    assert [line.split("  lr ")[1].split()[0] for line in result.stdout.splitlines() if "  lr " in line] == [
        "1", "0.7", "0.49",
    ]  # fmt: skip


@pytest.mark.skipif("mindspore" not in installed_backends(), reason="MindSpore is not installed")
def test_set_lr_compiles_nothing_on_mindspore(monkeypatch):
    """The lr is an input of the compiled step: counting MindSpore's graph compilations (its
    ``_check_recompile`` runs once per compilation, after its cache lookup) around set_lr."""
    from mindspore.graph import api

    compiled = []
    original = api._check_recompile
    monkeypatch.setattr(api, "_check_recompile", lambda *args: compiled.append(args[3]) or original(*args))
    model, data = _small_run()
    loop = unitrain.make_loop("mindspore", model, optimizer=optim.Adadelta(), clip_grad_norm=1.0)
    x, y = next(iter(data.batches(10)))
    loop.step((x, y))
    before = len(compiled)
    assert before >= 1, "the counter sees the first compilation"
    for lr in (0.5, 0.25, 0.125):
        loop.set_lr(lr)
        loop.step((x, y))
    assert len(compiled) == before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("position", 10**8 + 1, "lr_schedule.position"),
        ("schedule", "StepLR(step_size=__import__('os'))", "its lr_schedule is invalid"),
        ("schedule", "Foo()", "unknown schedule 'Foo'"),
    ],
)
def test_a_hostile_schedule_in_a_manifest_is_refused(tmp_path, field, value, message):
    import json

    model, data = _small_run()
    loop = unitrain.make_loop("numpy", model, optimizer=optim.SGD(), lr_schedule=schedules.StepLR(step_size=1))
    loop.fit(data, epochs=1, batch_size=10)
    folder = save_checkpoint(tmp_path, loop, epoch=1, batch=0)
    manifest = json.loads((folder / "checkpoint.json").read_text())
    manifest["lr_schedule"][field] = value
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(unitrain.checkpoint.CheckpointError, match=re.escape(message)):
        load_checkpoint(tmp_path)
