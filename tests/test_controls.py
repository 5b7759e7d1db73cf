"""Training controls (unitrain.controls): frozen parameters, parameter groups, gradient accumulation
and early stopping on every backend, each against a hand-written PyTorch loop doing the same
(float64: the equations; float32: within the drift PyTorch's own float32 loop shows, as
tests/torch_reference.py derives it), and the bad input they can meet."""

import numpy as np
import pytest
from conftest import installed_backends

import unitrain as ut
from unitrain import optim, schedules

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
)

BACKENDS = installed_backends()
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
    arguments = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
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
@pytest.mark.parametrize("backend", BACKENDS)
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
