"""The step: the loss it returns, the tutorial-shaped sequence, training and evaluation modes,
dropout, BatchNorm's statistics, and evaluate/predict changing nothing.
"""

from __future__ import annotations

import math

import numpy as np

from unitrain import layers
from unitrain.losses import (
    CrossEntropyLoss,
    MSELoss,
)
from unitrain.optim import SGD, Adam

from . import reference
from .checks import (
    DENSE_FAN_IN,
    CheckSkipped,
    batchnorm2d_model,
    batchnorm_model,
    check,
    compare,
    compare_correct,
    compare_exact,
    compare_states,
    dense_model,
    dropout_model,
    expect_error,
    fail,
    inputs,
    labels,
    loaded,
    mode_model,
    params_of,
    state_of,
    tutorial_gradients,
)
from .reference import F64

# --- 8-10. the step ---------------------------------------------------------------------------------


@check()
def check_zero_grad(adapter):
    """zero_grad() clears every accumulated gradient."""
    loop = adapter(dense_model())
    tutorial_gradients(loop, inputs((3, 4)), labels())
    if not any(np.any(g != 0) for g in loop.gradients().values()):
        fail("backward() left every gradient zero")
    loop.zero_grad()
    for key, grad in loop.gradients().items():
        if np.any(grad != 0):
            fail(f"after zero_grad(), gradient {key!r} is not zero: max |g| = {float(np.abs(grad).max()):.3g}")


@check()
def check_gradient_accumulation(adapter):
    """Without zero_grad, gradients accumulate: two half-batches (sum reduction) equal the full batch."""
    loop = adapter(dense_model(), loss=CrossEntropyLoss(reduction="sum"))
    x, y = inputs((3, 4)), labels()
    tutorial_gradients(loop, x, y)
    full = loop.gradients()
    tutorial_gradients(loop, x[:4], y[:4])
    loop.backward(loop.loss(loop.forward(x[4:]), y[4:]))
    compare_states("two accumulated half-batches vs. the full batch: gradient", loop.gradients(),
                   {k: v.astype(F64) for k, v in full.items()}, dtype=loop.dtype, size=8 * DENSE_FAN_IN)  # fmt: skip


@check()
def check_loss_expressions(adapter):
    """``backward(f(loss))`` for the expressions tutorials write (``loss * 0.5``, ``loss / n``,
    ``loss + loss``, ``loss ** 2``, ``2 - loss``) gives ``f'(loss)`` times the loss's gradient, as
    torch's and Chainer's autograd do, and ``to_float(f(loss))`` gives ``f(loss)``."""
    model = dense_model()
    state = state_of(model)
    x, y = inputs((3, 4)), labels()
    ref = reference.Reference(model, state)
    value, grad = reference.loss(CrossEntropyLoss(), ref.forward(x, training=True), y)
    expected_grads = ref.backward(grad)
    expressions = [  # (text, f, f' at the loss)
        ("loss * 0.5", lambda loss: loss * 0.5, 0.5), ("0.25 * loss", lambda loss: 0.25 * loss, 0.25),
        ("loss / 4", lambda loss: loss / 4, 0.25), ("loss + loss", lambda loss: loss + loss, 2.0),
        ("loss ** 2", lambda loss: loss**2, 2 * value), ("2 - loss", lambda loss: 2 - loss, -1.0),
    ]  # fmt: skip
    for text, f, slope in expressions:
        loop = loaded(adapter, model, state)
        loop.zero_grad()
        loss = loop.loss(loop.forward(x), y)
        try:
            expression = f(loss)
            loop.backward(expression)
        except Exception as error:  # the expression or backward refused: the check fails, naming it
            fail(f"backward({text}) raised {type(error).__name__}: {error}")
        compare(f"to_float({text})", loop.to_float(expression), f(value), dtype=loop.dtype, size=DENSE_FAN_IN)
        compare_states(f"gradient of {text}", loop.gradients(), {k: slope * v for k, v in expected_grads.items()},
                       dtype=loop.dtype, size=8 * DENSE_FAN_IN)  # fmt: skip


@check()
def check_step_returns_pre_update_loss(adapter):
    """step() returns the loss of the weights before its update."""
    model = dense_model()
    state = state_of(model)
    loop = loaded(adapter, model, state, optimizer=SGD(lr=0.5))
    x, y = inputs((3, 4)), labels()
    expected, _ = reference.loss(loop.loss_spec, reference.Reference(model, state).forward(x), y)
    compare("step() return value", loop.to_float(loop.step((x, y))), expected, dtype=loop.dtype, size=DENSE_FAN_IN)
    if loop.step_count != 1:
        fail(f"step_count after one step() is {loop.step_count}, expected 1")


@check()
def check_predictions_as_numpy_and_train_accuracy(adapter):
    """``to_numpy(forward(x))`` is a NumPy array of the loop's dtype, in eval mode what
    ``predict(x)`` gives; ``fit``'s ``train_accuracy`` (where the adapter reports it) counts the
    step's own predictions: those of the weights before the update."""
    model = dense_model()
    state = state_of(model)
    loop = loaded(adapter, model, state, optimizer=SGD(lr=0.5))
    x, y = inputs((3, 4)), labels()
    loop.eval()
    pred = loop.to_numpy(loop.forward(x))
    if not isinstance(pred, np.ndarray) or pred.dtype != loop.dtype:
        fail(f"to_numpy(forward(x)) gave {type(pred).__name__} of dtype {getattr(pred, 'dtype', None)}, "
             f"expected a numpy.ndarray of {loop.dtype}")  # fmt: skip
    compare("to_numpy(forward(x)) vs. predict(x)", pred, loop.predict(x), dtype=loop.dtype, size=DENSE_FAN_IN)
    expected = reference.Reference(model, state).forward(x)
    (record,) = loop.fit((x, y), epochs=1, batch_size=len(x), shuffle=False)
    if "train_accuracy" in record:
        correct = float(np.mean(expected.argmax(axis=1) == y))
        if record["train_accuracy"] != correct:
            fail(f"train_accuracy {record['train_accuracy']} after one step, expected {correct}: the argmax of "
                 "that step's own forward pass")  # fmt: skip


@check()
def check_tutorial_sequence_equals_step(adapter):
    """zero_grad, forward, loss, backward, update gives bit-for-bit what step() gives, with
    BatchNorm and with Dropout (the same masks), also inside a Residual, where the adapter has them."""
    models = [("a dense", dense_model(), (3, 4))]
    if "batchnorm" in adapter.capabilities:
        models.append(("a BatchNorm1d", batchnorm_model(), (6,)))
    if "dropout" in adapter.capabilities:
        models.append(("a Dropout", dropout_model(), (3, 4)))
    if "residual" in adapter.capabilities:
        models.append(("a residual", mode_model(adapter), (6,)))
    for what, model, shape in models:
        state = state_of(model)
        whole = loaded(adapter, model, state, optimizer=SGD(lr=0.1, momentum=0.9))
        parts = loaded(adapter, model, state, optimizer=SGD(lr=0.1, momentum=0.9))
        for step in range(3):
            x, y = inputs(shape, seed=step), labels(seed=step)
            whole.step((x, y))
            tutorial_gradients(parts, x, y)
            parts.update()
        compare_states(f"after 3 steps of {what} model, tutorial sequence vs. step():", parts.state_dict(),
                       whole.state_dict())  # fmt: skip
        compare_states(f"optimizer state of {what} model, tutorial sequence vs. step():",
                       parts.optimizer_state_dict(), whole.optimizer_state_dict())  # fmt: skip
        if parts.step_count != whole.step_count:
            fail(f"step_count: tutorial sequence {parts.step_count}, step() {whole.step_count}")


@check()
def check_loss_and_gradients_in_one_pass(adapter):
    """The data-parallel step's ``_loss_and_gradients(x, y)`` gives the loss, the number of correct
    predictions (``None`` where the adapter's ``_count_correct`` counts nothing) and the gradients of
    zero_grad, forward, loss, backward (replacing earlier gradients), and leaves the same state:
    BatchNorm's running statistics updated once, the same Dropout masks drawn."""
    models = [("a dense", dense_model(), (3, 4)), ("a BatchNorm/Dropout", mode_model(adapter), (6,))]
    for what, model, shape in models:
        state = state_of(model)
        fused, parts = loaded(adapter, model, state), loaded(adapter, model, state)
        for loop in (fused, parts):  # gradients to be replaced
            tutorial_gradients(loop, inputs(shape, seed=1), labels(seed=1))
        x, y = inputs(shape), labels()
        loss, correct = fused._loss_and_gradients(x, y)
        parts.zero_grad()
        expected_pred = parts.forward(x)
        expected_loss = parts.loss(expected_pred, y)
        parts.backward(expected_loss)
        size = 8 * DENSE_FAN_IN  # the widest sum: a weight's gradient over the 8 samples' fan-ins
        compare(f"{what} model, _loss_and_gradients vs. the tutorial sequence: loss", fused.to_float(loss),
                parts.to_float(expected_loss), dtype=fused.dtype, size=size)  # fmt: skip
        counted = f"{what} model, _loss_and_gradients vs. the tutorial sequence: correct predictions"
        if parts._count_correct(expected_pred, y) is not None:
            compare_correct(counted, correct, parts.to_numpy(expected_pred), y, dtype=fused.dtype, size=size)
        elif correct is not None:  # counting is optional, but then both ways alike
            fail(f"{counted}: expected None (the adapter's _count_correct counts nothing), got {correct}")
        compare_states(f"{what} model, _loss_and_gradients vs. the tutorial sequence: gradient", fused.gradients(),
                       parts.gradients(), dtype=fused.dtype, size=size)  # fmt: skip
        compare_states(f"{what} model, _loss_and_gradients vs. the tutorial sequence: state", fused.state_dict(),
                       parts.state_dict(), dtype=fused.dtype, size=size)  # fmt: skip


@check()
def check_step_follows_state_changes(adapter):
    """step() follows what changed since the last step (a compiled step must not keep stale copies):
    after load_state_dict and load_optimizer_state_dict with fresh optimizer state, and across a
    smaller batch, each step returns the reference loss and lands on the reference parameters."""
    model = dense_model()
    for spec in (SGD(lr=0.1, momentum=0.9), Adam(lr=0.01, eps=1e-4)):
        loop = loaded(adapter, model, state_of(model), optimizer=spec)
        for step in range(2):  # whatever the adapter compiles or caches is now warm
            loop.step((inputs((3, 4), seed=step), labels(seed=step)))
        state = state_of(model, seed=1)
        loop.load_state_dict(state)
        loop.load_optimizer_state_dict({"step": np.array(0)})  # no buffers: momentum and moments start afresh
        ref, ref_optimizer = reference.Reference(model, state), reference.Optimizer(spec)
        for step, n in enumerate((8, 5, 8), start=1):
            x, y = inputs((3, 4), seed=10 + step, n=n), labels(n, seed=10 + step)
            expected = reference.train_step(ref, loop.loss_spec, ref_optimizer, x, y)
            label = f"{spec}, step {step} after load_state_dict/load_optimizer_state_dict (batch of {n})"
            compare(f"{label}: step() return value", loop.to_float(loop.step((x, y))), expected,
                    dtype=loop.dtype, size=DENSE_FAN_IN)  # fmt: skip
            compare_states(f"{label}: parameter", params_of(loop), {k: ref.state[k] for k in model.param_shapes()},
                           dtype=loop.dtype, size=4 * step)  # fmt: skip


# --- 11-13. modes, dropout, BatchNorm ---------------------------------------------------------------


@check()
def check_train_eval_toggles(adapter):
    """train()/eval() are idempotent, return the loop and reach layers inside nested Sequentials."""
    if not {"dropout", "batchnorm"} & adapter.capabilities:
        raise CheckSkipped("needs dropout or batchnorm: without them training and eval mode compute the same")
    model = mode_model(adapter)
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=MSELoss(reduction="sum"))
    x, target = inputs((6,)), np.zeros((8, 4), np.float32)
    eval_loss, _ = reference.loss(loop.loss_spec, reference.Reference(model, state).forward(x), target)

    def observed_loss():
        return loop.to_float(loop.loss(loop.forward(x), target))

    for calls in (["eval"], ["eval", "eval"], ["train", "eval"]):
        for call in calls:
            if getattr(loop, call)() is not loop:
                fail(f"{call}() must return the loop itself")
        if loop.training:
            fail(f"after {'(), '.join(calls)}() the loop reports training=True")
        compare(f"loss after {'(), '.join(calls)}()", observed_loss(), eval_loss, dtype=loop.dtype, size=8)
    for calls in (["train"], ["train", "train"], ["eval", "train"]):
        for call in calls:
            getattr(loop, call)()
        if not loop.training:
            fail(f"after {'(), '.join(calls)}() the loop reports training=False")
        if abs(observed_loss() - eval_loss) <= 1e-3 * abs(eval_loss):
            fail(f"after {'(), '.join(calls)}() the nested {model.layers[1]} still computes as in eval mode")


@check("dropout")
def check_dropout_statistics(adapter):
    """In training, Dropout zeroes a fraction p of elements (within 5 standard deviations) and scales
    survivors by 1/(1-p); two forwards draw different masks."""
    p, n = 0.3, 4000
    model = layers.Sequential(layers.Dropout(p), layers.Linear(n, 1, bias=False))
    loop = loaded(adapter, model, {"1.weight": np.ones((1, n), np.float32)}, loss=MSELoss(reduction="sum"))
    x, target = np.ones((1, n), np.float32), np.zeros((1, 1), np.float32)
    masks = []
    for _ in range(2):
        # loss = out**2 with out = sum(kept) / (1 - p), and d loss / d w = 2 * out * kept / (1 - p)
        out = math.sqrt(tutorial_gradients(loop, x, target))
        scaled = loop.gradients()["1.weight"][0] / (2 * out)
        kept = scaled > 0.5 / (1 - p)
        compare("survivor scale", scaled, kept / (1 - p), dtype=loop.dtype, size=n)
        dropped = 1 - kept.mean()
        bound = 5 * math.sqrt(p * (1 - p) / n)
        if abs(dropped - p) > bound:
            fail(f"dropped fraction {dropped:.4f}, expected p = {p} within {bound:.4f}", abs(dropped - p), bound)
        masks.append(kept)
    if np.array_equal(*masks):
        fail("two training forwards used the same dropout mask")


@check("dropout", "random-state")
def check_random_state_resumes_dropout(adapter):
    """random_state() is uint8 arrays that predict/evaluate leave alone; a loop restored from
    state_dict, optimizer_state_dict and random_state draws the original's dropout masks (its next
    steps give bit-identical weights); bytes that are not a state are refused, naming the key."""
    model = dropout_model()
    optimizer = SGD(lr=0.1, momentum=0.9)
    loop = loaded(adapter, model, state_of(model), optimizer=optimizer)
    batches = [(inputs((3, 4), seed=i), labels(seed=i)) for i in range(3)]
    loop.step(batches[0])
    saved = loop.state_dict(), loop.optimizer_state_dict(), loop.random_state()
    if not saved[2] or any(np.asarray(value).dtype != np.uint8 for value in saved[2].values()):
        fail(f"random_state() must be a non-empty dict of uint8 arrays, got {saved[2]!r:.200}")
    loop.predict(batches[1][0])
    loop.evaluate(batches[1])
    compare_states("random_state() after predict/evaluate", loop.random_state(), saved[2])
    for batch in batches[1:]:
        loop.step(batch)
    restored = adapter(model, optimizer=optimizer, seed=1)  # another seed: the state alone decides
    restored.load_state_dict(saved[0])
    restored.load_optimizer_state_dict(saved[1])
    restored.load_random_state(saved[2])
    for batch in batches[1:]:
        restored.step(batch)
    compare_states("after a restore, the next steps' weights", restored.state_dict(), loop.state_dict())
    key = next(iter(saved[2]))
    garbage, unknown = {key: np.zeros(3, np.uint8)}, {"bogus": saved[2][key]}
    expect_error("load_random_state() of 3 zero bytes", lambda: restored.load_random_state(garbage), adapter.name)
    expect_error("load_random_state() with an unknown key", lambda: restored.load_random_state(unknown), "bogus")


@check("batchnorm")
def check_batchnorm_running_stats(adapter):
    """Running statistics follow PyTorch's momentum and unbiased-variance convention (Keras' biased
    variance with ``running_var="biased"``), and change only in training (not in eval forwards,
    predict or evaluate)."""
    models = [(batchnorm_model(), (6,))]
    if "conv" in adapter.capabilities:
        models.append((batchnorm2d_model(), (2, 5, 5)))
    models.append((batchnorm_model("biased"), (6,)))
    if "conv" in adapter.capabilities:
        models.append((batchnorm2d_model("biased"), (2, 5, 5)))
    for model, shape in models:
        state = state_of(model)
        loop = loaded(adapter, model, state)
        ref = reference.Reference(model, state)
        x, y = inputs(shape), labels()
        loop.forward(x)
        ref.forward(x, training=True)
        buffers = {k: v for k, v in ref.state.items() if k.startswith("1.running") or k.startswith("1.num")}
        got = loop.state_dict()
        biased = " (running_var='biased')" if model.children[1][1].running_var == "biased" else ""
        for key, value in buffers.items():
            what = f"{key}{biased} after one training forward"
            if key.endswith("num_batches_tracked"):
                compare_exact(what, got[key], value)
            else:
                compare(what, got[key], value, dtype=loop.dtype, size=2 * len(x))
        loop.eval()
        before = loop.state_dict()
        actions = {"an eval-mode forward": loop.forward, "predict": loop.predict, "evaluate": loop.evaluate}
        for action, run in actions.items():
            run((x, y) if action == "evaluate" else x)
            for key in buffers:
                compare_exact(f"{key} after {action}", loop.state_dict()[key], before[key])


@check("batchnorm")
def check_batchnorm_eval_batch_independence(adapter):
    """In eval mode a sample's BatchNorm output does not depend on the other samples of its batch."""
    model = batchnorm_model()
    loop = loaded(adapter, model, state_of(model))
    x = inputs((6,))
    batch = loop.predict(x)
    alone = np.concatenate([loop.predict(x[i : i + 1]) for i in range(len(x))])
    compare("predict() of each sample alone vs. in the batch", alone, batch, dtype=loop.dtype, size=8)


# --- 14. evaluate/predict change nothing ---------------------------------------------------------


@check()
def check_evaluate_predict_change_nothing(adapter):
    """predict and evaluate leave parameters, buffers, gradients, optimizer state, step count and mode alone."""
    model = mode_model(adapter)
    loop = loaded(adapter, model, state_of(model), optimizer=Adam(lr=0.01))
    x, y = inputs((6,)), labels()
    for step in range(2):
        loop.step((inputs((6,), seed=step), labels(seed=step)))
    for mode in ("train", "eval"):
        getattr(loop, mode)()
        before = (loop.state_dict(), loop.gradients(), loop.optimizer_state_dict(), loop.step_count, loop.training)
        loop.predict(x)
        loop.evaluate((x, y), batch_size=3)
        after = (loop.state_dict(), loop.gradients(), loop.optimizer_state_dict(), loop.step_count, loop.training)
        for what, got, expected in zip(
            ("state_dict()", "gradients()", "optimizer_state_dict()"), after, before, strict=False
        ):
            compare_states(f"in {mode} mode, predict/evaluate changed {what}", got, expected)
        if after[3:] != before[3:]:
            fail(f"in {mode} mode, predict/evaluate changed (step_count, training) from {before[3:]} to {after[3:]}")
