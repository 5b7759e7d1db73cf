"""Every optimizer's update equations, learning-rate and momentum schedules, gradient clipping,
frozen parameters, parameter groups and gradient accumulation.
"""

from __future__ import annotations

from unitrain.losses import (
    CrossEntropyLoss,
)
from unitrain.optim import SGD, Adadelta, Adagrad, Adam, AdamW, RMSprop
from unitrain.schedules import StepLR, parse_schedule

from . import reference
from .checks import (
    check,
    compare,
    compare_exact,
    compare_states,
    dense_model,
    fail,
    inputs,
    labels,
    loaded,
    params_of,
    state_of,
    tutorial_gradients,
)
from .reference import F64

# --- 6-7. optimizers ------------------------------------------------------------------------------


def _optimizer_steps(adapter, spec, steps=3, loop=None, ref_optimizer=None, buffers=True):
    """``steps`` tutorial steps; after each, parameters and optimizer buffers must equal the
    reference optimizer applied to the same gradients. Returns the loop and the reference."""
    model = dense_model()
    loop = loop or loaded(adapter, model, state_of(model), optimizer=spec)
    ref_optimizer = ref_optimizer or reference.Optimizer(spec)
    params = {k: v.astype(F64) for k, v in params_of(loop).items()}
    for step in range(1, steps + 1):
        tutorial_gradients(loop, inputs((3, 4), seed=step), labels(seed=step))
        params = ref_optimizer.update(params, loop.gradients())
        loop.update()
        label = f"{spec} step {step}"
        compare_states(f"{label}: parameter", params_of(loop), params, dtype=loop.dtype, size=4 * step)
        if not buffers:
            continue
        state = loop.optimizer_state_dict()
        if int(state.get("step", -1)) != loop.step_count:
            fail(f"{label}: optimizer_state_dict()['step'] is {state.get('step')}, expected {loop.step_count}")
        for key, value in ref_optimizer.state.items():
            if key not in state:
                fail(f"{label}: optimizer_state_dict() lacks {key!r}")
            compare(f"{label}: {key}", state[key], value, dtype=loop.dtype, size=4 * step)
    return loop, ref_optimizer


@check()
def check_sgd_updates(adapter):
    """Plain SGD, with and without weight decay: 3 steps match the closed form."""
    _optimizer_steps(adapter, SGD(lr=0.1))
    _optimizer_steps(adapter, SGD(lr=0.1, weight_decay=0.05))


@check()
def check_sgd_momentum(adapter):
    """SGD with momentum (and dampening, weight decay): parameters and momentum buffers match."""
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9))
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01))


@check()
def check_sgd_nesterov(adapter):
    """Nesterov momentum with weight decay matches the closed form."""
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01))


@check()
def check_sgd_momentum_new_lr(adapter):
    """Resuming momentum SGD from saved weights and optimizer state with a new learning rate continues
    PyTorch's trajectory.

    The momentum buffer must hold gradients, not velocities with the old lr folded in (Chainer's
    convention). Only parameters are compared here; buffers are check_sgd_momentum's."""
    first = SGD(lr=0.1, momentum=0.9)
    loop, ref_optimizer = _optimizer_steps(adapter, first, steps=2, buffers=False)
    second = SGD(lr=0.02, momentum=0.9)
    resumed = loaded(adapter, dense_model(), loop.state_dict(), optimizer=second)
    resumed.load_optimizer_state_dict(loop.optimizer_state_dict())
    resumed.step_count = loop.step_count
    ref_optimizer.spec, ref_optimizer.lr = second, second.lr
    _optimizer_steps(adapter, second, steps=2, loop=resumed, ref_optimizer=ref_optimizer, buffers=False)


@check()
def check_adam_updates(adapter):
    """Adam (with and without L2 weight decay): parameters and both moments match, bias correction included."""
    _optimizer_steps(adapter, Adam(lr=0.01, eps=1e-4))
    _optimizer_steps(adapter, Adam(lr=0.01, betas=(0.8, 0.9), eps=1e-4, weight_decay=0.1))


@check()
def check_sgd_lr_in_velocity(adapter):
    """Chainer's and Keras' momentum (``SGD(lr_in_velocity=True)``): the velocity holds past
    steps' lrs, so a new lr reaches only new gradients; parameters and ``velocity`` match."""
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, lr_in_velocity=True, weight_decay=0.01))
    _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, lr_in_velocity=True, nesterov=True))
    loop, ref_optimizer = _optimizer_steps(adapter, SGD(lr=0.1, momentum=0.9, lr_in_velocity=True), steps=2)
    second = SGD(lr=0.02, momentum=0.9, lr_in_velocity=True)  # resumed with a new lr, as check_sgd_momentum_new_lr
    resumed = loaded(adapter, dense_model(), loop.state_dict(), optimizer=second)
    resumed.load_optimizer_state_dict(loop.optimizer_state_dict())
    resumed.step_count = loop.step_count
    ref_optimizer.spec, ref_optimizer.lr = second, second.lr
    _optimizer_steps(adapter, second, steps=2, loop=resumed, ref_optimizer=ref_optimizer)


@check()
def check_adam_eps_before_correction(adapter):
    """Chainer's, Keras' and MindSpore's Adam (``eps_placement="before_correction"``): eps joins
    the uncorrected ``sqrt(v)``; a large eps makes the difference from PyTorch's visible."""
    _optimizer_steps(adapter, Adam(lr=0.01, eps=1e-2, eps_placement="before_correction"))
    _optimizer_steps(adapter, Adam(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1,
                                   eps_placement="before_correction"))  # fmt: skip


@check()
def check_adamw_updates(adapter):
    """AdamW (decoupled weight decay): parameters and both moments match."""
    _optimizer_steps(adapter, AdamW(lr=0.01, eps=1e-4, weight_decay=0.1))


@check("optimizers")
def check_rmsprop_updates(adapter):
    """RMSprop (plain; centered with momentum and weight decay): parameters and buffers match."""
    _optimizer_steps(adapter, RMSprop(lr=0.01, alpha=0.9, eps=0.01))
    _optimizer_steps(adapter, RMSprop(lr=0.01, alpha=0.9, eps=0.01, momentum=0.5, centered=True, weight_decay=0.1))


@check("optimizers")
def check_adagrad_updates(adapter):
    """Adagrad with lr decay, an initial accumulator and weight decay: parameters and ``sum`` match."""
    _optimizer_steps(adapter, Adagrad(lr=0.1, lr_decay=0.5, initial_accumulator_value=0.1, weight_decay=0.1))


@check("optimizers")
def check_adadelta_updates(adapter):
    """Adadelta (with weight decay): parameters and both accumulators match."""
    _optimizer_steps(adapter, Adadelta(lr=1.0, rho=0.8, eps=1e-3, weight_decay=0.1))


@check("optimizers")
def check_set_lr_and_schedule(adapter):
    """``set_lr`` changes the live loop's next updates; ``fit`` steps a StepLR per epoch (the lr in
    each record), and ``seek_schedule`` resumes it mid-schedule."""
    spec = SGD(lr=0.1, momentum=0.9)
    loop, ref_optimizer = _optimizer_steps(adapter, spec, steps=1, buffers=False)
    loop.set_lr(0.03)
    ref_optimizer.lr = 0.03
    _optimizer_steps(adapter, spec, steps=2, loop=loop, ref_optimizer=ref_optimizer, buffers=False)
    model = dense_model()
    schedule = StepLR(step_size=1, gamma=0.5)
    scheduled = loaded(adapter, model, state_of(model), optimizer=SGD(lr=0.2), lr_schedule=schedule)
    history = scheduled.fit((inputs((3, 4)), labels()), epochs=3, batch_size=4, shuffle=False)
    lrs = [record.get("lr") for record in history]
    if lrs != [0.2, 0.1, 0.05] or scheduled.lr != 0.025 or scheduled.schedule_position != 3:
        got = f"records' lr {lrs}, then lr {scheduled.lr} at position {scheduled.schedule_position}"
        fail(f"StepLR(step_size=1, gamma=0.5) from lr 0.2 over 3 epochs: {got}; expected [0.2, 0.1, 0.05], 0.025, 3")
    resumed = loaded(adapter, model, scheduled.state_dict(), optimizer=SGD(lr=0.2), lr_schedule=schedule)
    resumed.seek_schedule(2)
    if resumed.lr != 0.05:
        fail(f"seek_schedule(2) on StepLR(step_size=1, gamma=0.5) from lr 0.2: lr {resumed.lr}, expected 0.05")


@check("optimizers")
def check_one_cycle_momentum(adapter):
    """OneCycleLR with PyTorch's default ``cycle_momentum=True`` sets the live loop's momentum
    (Adam: ``betas[0]``) at every step as it sets the lr: ``fit`` matches the reference optimizer run
    with the schedule's lr and momentum (SGD without momentum gains a momentum buffer, as in
    PyTorch), and a loop restored mid-schedule with ``seek_schedule`` continues it."""
    text, steps, batch = "OneCycleLR(max_lr=0.5, total_steps=4)", 4, 2
    schedule = parse_schedule(text)
    x, y = inputs((3, 4)), labels()
    for spec in (SGD(lr=0.1), Adam(lr=0.01, eps=1e-4)):
        model = dense_model()
        state = state_of(model)
        # the lr and momentum floats are unitrain.schedules' (checked against torch.optim.lr_scheduler in
        # unitrain's tests); what is checked here is that the adapter trains with them
        running, ref_optimizer = schedule.start(spec.lr), reference.Optimizer(spec)
        ref = reference.Reference(model, {key: value.astype(F64) for key, value in state.items()})
        expected = []
        for step in range(steps):
            ref_optimizer.lr, ref_optimizer.momentum = running.lr, running.momentum
            reference.train_step(
                ref, CrossEntropyLoss(), ref_optimizer, *(v[step * batch : (step + 1) * batch] for v in (x, y))
            )
            running.step()
            expected.append({key: ref.state[key] for key in model.param_shapes()})
        first = loaded(adapter, model, state, optimizer=spec, lr_schedule=schedule)
        first.fit((x, y), epochs=1, batch_size=batch, shuffle=False, max_steps=steps // 2)
        label = f"{spec} with {text}"
        compare_states(f"{label}, step {steps // 2}: parameter", params_of(first), expected[steps // 2 - 1],
                       dtype=first.dtype, size=4 * steps // 2)  # fmt: skip
        resumed = loaded(adapter, model, first.state_dict(), optimizer=spec, lr_schedule=schedule)
        resumed.load_optimizer_state_dict(first.optimizer_state_dict())
        resumed.seek_schedule(first.schedule_position)
        resumed.fit((x, y), epochs=1, batch_size=batch, shuffle=False, start_batch=steps // 2)
        compare_states(f"{label}, resumed at step {steps // 2}, step {steps}: parameter", params_of(resumed),
                       expected[-1], dtype=resumed.dtype, size=4 * steps)  # fmt: skip


@check("clipping")
def check_gradient_clipping(adapter):
    """Clipping by global norm (``clip_grad_norm_``: one factor for all gradients) and by value,
    between the gradients and the update."""
    model = dense_model()
    for options in ({"clip_grad_norm": 0.05}, {"clip_grad_value": 0.02}):
        loop = loaded(adapter, model, state_of(model), optimizer=SGD(lr=0.5), **options)
        params = {key: value.astype(F64) for key, value in params_of(loop).items()}
        for step in range(1, 3):
            tutorial_gradients(loop, inputs((3, 4), seed=step), labels(seed=step))
            grads = reference.clip_gradients(
                loop.gradients(), max_norm=options.get("clip_grad_norm"), max_value=options.get("clip_grad_value")
            )
            params = {key: value - 0.5 * grads[key] for key, value in params.items()}
            loop.update()
            compare_states(
                f"{options} step {step}: parameter", params_of(loop), params, dtype=loop.dtype, size=4 * step
            )


@check("training-controls")
def check_frozen_parameters_and_groups(adapter):
    """``frozen`` parameters never move and have no gradient or optimizer state; a ``param_groups``
    entry updates its parameters with its own lr, momentum and weight decay, the others with the
    optimizer's; ``set_lr`` scales every group's lr alike."""
    model, spec = dense_model(), SGD(lr=0.1, momentum=0.9)
    group = SGD(lr=0.02, momentum=0.5, weight_decay=0.1)
    loop = loaded(adapter, model, state_of(model), optimizer=spec, frozen=["1.bias"],
                  param_groups=[{"params": ["3"], "lr": 0.02, "momentum": 0.5, "weight_decay": 0.1}])  # fmt: skip
    start = params_of(loop)
    optimizers = {"1.weight": reference.Optimizer(spec), "3.weight": reference.Optimizer(group)}
    optimizers["3.bias"] = optimizers["3.weight"]
    params = {key: value.astype(F64) for key, value in start.items() if key != "1.bias"}
    for step in range(1, 4):
        if step == 3:  # the group keeps its lr's ratio to the optimizer's: 0.02 * 0.05 / 0.1
            loop.set_lr(0.05)
            optimizers["1.weight"].lr, optimizers["3.weight"].lr = 0.05, 0.01
        tutorial_gradients(loop, inputs((3, 4), seed=step), labels(seed=step))
        grads = loop.gradients()
        if "1.bias" in grads:
            fail("gradients() holds the frozen '1.bias'; a frozen parameter has no gradient")
        for names in (["1.weight"], ["3.weight", "3.bias"]):
            params.update(optimizers[names[0]].update({key: params[key] for key in names}, grads))
        loop.update()
        got = params_of(loop)
        compare_exact(f"step {step}: frozen parameter '1.bias'", got["1.bias"], start["1.bias"])
        compare_states(f"step {step}: parameter", {key: got[key] for key in params}, params, dtype=loop.dtype,
                       size=4 * step)  # fmt: skip
    state = loop.optimizer_state_dict()
    if extra := [key for key in state if key.startswith("1.bias.")]:
        fail(f"optimizer_state_dict() holds {extra} for the frozen '1.bias'; a frozen parameter has no state")


@check("training-controls")
def check_gradient_accumulation_in_fit(adapter):
    """``fit(accumulate_grad_batches=3)`` on 4 batches: one step on the first three batches' mean
    gradient, one on the last batch's gradient divided by 3 (Lightning's rule)."""
    model, spec = dense_model(), SGD(lr=0.1, momentum=0.9)
    state, x, y = state_of(model), inputs((3, 4), n=8), labels(n=8)
    loop = loaded(adapter, model, state, optimizer=spec)
    history = loop.fit((x, y), epochs=1, batch_size=2, shuffle=False, accumulate_grad_batches=3)
    if loop.step_count != 2 or history[0].get("steps") != 2:
        fail(f"4 batches 3 to a step: {loop.step_count} optimizer steps, record {history[0]}; expected 2")
    ref, optimizer = reference.Reference(model, {k: v.astype(F64) for k, v in state.items()}), reference.Optimizer(spec)
    for batches in ((0, 1, 2), (3,)):
        total = {}
        for b in batches:
            _, grad = reference.loss(CrossEntropyLoss(), ref.forward(x[2 * b : 2 * b + 2], training=True),
                                     y[2 * b : 2 * b + 2])  # fmt: skip
            for key, value in ref.backward(grad).items():
                total[key] = total.get(key, 0.0) + value / 3
        ref.state.update(optimizer.update({key: ref.state[key] for key in total}, total))
    compare_states("after 2 accumulated steps: parameter", params_of(loop),
                   {key: ref.state[key] for key in model.param_shapes()}, dtype=loop.dtype, size=4 * 4)  # fmt: skip
