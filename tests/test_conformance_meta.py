"""The conformance suite has teeth: deliberately broken adapters are caught by the right check,
with the exact message. Each is the NumPy backend with one thing done wrong."""

import dataclasses
import json
import math
import re
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
from unitrain.backends import numpy_attention, numpy_graph, numpy_layers, numpy_sequences, numpy_steps
from unitrain.backends.numpy import LossValue, NumpyLoop, _loss_terms
from unitrain.conformance import CHECKS, run_check, run_checks

from unitrain import steps
from unitrain.initializers import KaimingNormal
from unitrain.layers import Sequential
from unitrain.loop import TrainingLoop
from unitrain.losses import BCELoss
from unitrain.optim import Adagrad, Adam, RMSprop, momentum
from unitrain.weights import init_weights


class _NumpyAdamVariant(NumpyLoop):
    """The NumPy backend with its Adam step replaced by :meth:`adam`."""

    def _update(self):
        if not isinstance(self.optimizer_spec, Adam):
            return super()._update()
        # the protocol counts this step after _update returns
        spec, state, t = self.optimizer_spec, self._optimizer_state, self.step_count + 1
        for name, param in self._params.items():
            grad = self._grads[name] + (0 if spec.decoupled_weight_decay else spec.weight_decay * param)
            if spec.decoupled_weight_decay:
                param *= 1 - spec.lr * spec.weight_decay
            m = spec.betas[0] * state.get(f"{name}.exp_avg", 0) + (1 - spec.betas[0]) * grad
            v = spec.betas[1] * state.get(f"{name}.exp_avg_sq", 0) + (1 - spec.betas[1]) * grad * grad
            state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"] = m, v
            param -= self.adam(m, v, t, spec)

    def adam(self, m, v, t, spec):
        raise NotImplementedError


class AdamWithoutBiasCorrection(_NumpyAdamVariant):
    def adam(self, m, v, t, spec):
        return spec.lr * m / (np.sqrt(v) + spec.eps)


class EpsilonInsideSqrt(_NumpyAdamVariant):
    def adam(self, m, v, t, spec):
        m_hat, v_hat = m / (1 - spec.betas[0] ** t), v / (1 - spec.betas[1] ** t)
        return spec.lr * m_hat / np.sqrt(v_hat + spec.eps)


class EpsAlwaysAfterCorrection(_NumpyAdamVariant):
    """PyTorch's eps placement whatever the spec says (``eps_placement`` ignored)."""

    def adam(self, m, v, t, spec):
        m_hat, v_hat = m / (1 - spec.betas[0] ** t), v / (1 - spec.betas[1] ** t)
        return spec.lr * m_hat / (np.sqrt(v_hat) + spec.eps)


class KaimingModeIgnored(NumpyLoop):
    """Draws kaiming initialisers with ``fan_in`` whatever their ``mode`` (the wrong fan)."""

    def __init__(self, model, *args, seed=0, **kwargs):
        super().__init__(model, *args, seed=seed, **kwargs)
        if isinstance(model, Sequential):
            fan_in = {
                name: dataclasses.replace(layer, weight_init=dataclasses.replace(layer.weight_init, mode="fan_in"))
                if isinstance(getattr(layer, "weight_init", None), KaimingNormal)
                else layer
                for name, layer in model.children
            }
            self.load_state_dict(init_weights(Sequential(fan_in, init=model.init), seed))


# --- adapters broken inside the NumPy backend's model tree --------------------------------------------


def _nodes(node):
    """Every node of the NumPy backend's model tree, depth first."""
    yield node
    if isinstance(node, numpy_layers._Layer):
        return
    for child in getattr(node, "nodes", None) or (node.body, node.shortcut, node.post):
        if child is not None:
            yield from _nodes(child)


class _BrokenTree(NumpyLoop):
    """The NumPy backend with :meth:`breaks` applied to every node of its built tree."""

    capabilities = NumpyLoop.capabilities | {"residual", "activations", "pooling"}

    def _build(self, model):
        super()._build(model)
        for node in list(_nodes(self._root)):
            self.breaks(node)

    def breaks(self, node):
        raise NotImplementedError


class _DropoutAlwaysOn(numpy_layers._Dropout):
    def forward(self, x, training, record):
        return super().forward(x, True, record)


class DropoutInEval(_BrokenTree):
    def breaks(self, node):
        if type(node) is numpy_layers._Dropout:
            node.__class__ = _DropoutAlwaysOn


class _BatchNormUpdatingInEval(numpy_layers._BatchNorm):
    def forward(self, x, training, record):
        if not training:
            axes = (0, *range(2, x.ndim))
            count = x.size // x.shape[1]
            self._update_running(x.mean(axes), x.var(axes) * count / (count - 1))
        return super().forward(x, training, record)


class BatchNormStatisticsInEval(_BrokenTree):
    def breaks(self, node):
        if type(node) is numpy_layers._BatchNorm:
            node.__class__ = _BatchNormUpdatingInEval


class RunningVarAlwaysUnbiased(_BrokenTree):
    """Keras' ``running_var="biased"`` ignored: the running variance gets the unbiased batch variance."""

    def breaks(self, node):
        if type(node) is numpy_layers._BatchNorm:
            node.spec = dataclasses.replace(node.spec, running_var="unbiased")


class ChainerStyleMomentum(NumpyLoop):
    """Chainer's MomentumSGD: the velocity has the learning rate folded in (``v = m*v + lr*g``,
    ``p -= v``), and it is what the optimizer state holds."""

    def _update(self):
        if not self.optimizer_spec.momentum:
            return super()._update()
        spec = self.optimizer_spec
        for name, param in self._params.items():
            key = f"{name}.momentum_buffer"
            velocity = spec.lr * self._grads[name]
            if key in self._optimizer_state:
                velocity += spec.momentum * self._optimizer_state[key]
            self._optimizer_state[key] = velocity
            param -= velocity


class RMSpropEpsilonInsideSqrt(NumpyLoop):
    """RMSprop dividing by ``sqrt(square_avg + eps)`` instead of ``sqrt(square_avg) + eps``."""

    def _update(self):
        spec = self.optimizer_spec
        if not isinstance(spec, RMSprop) or spec.momentum or spec.centered:
            return super()._update()
        for name, param in self._params.items():
            grad = self._grads[name] + spec.weight_decay * param
            key = f"{name}.square_avg"
            square_avg = spec.alpha * self._optimizer_state.get(key, 0) + (1 - spec.alpha) * grad * grad
            self._optimizer_state[key] = square_avg
            param -= self.lr * grad / np.sqrt(square_avg + spec.eps)


class AdagradWithoutLrDecay(NumpyLoop):
    """Adagrad ignoring ``lr_decay`` (every step at the full lr)."""

    def _update(self):
        specs = [group.spec for group in self.param_groups]
        for group in self.param_groups:
            if isinstance(group.spec, Adagrad):
                group.spec = dataclasses.replace(group.spec, lr_decay=0.0)
        try:
            super()._update()
        finally:
            for group, spec in zip(self.param_groups, specs, strict=True):
                group.spec = spec


class MomentumNotCycled(NumpyLoop):
    """Ignores OneCycleLR's momentum cycling: every update keeps the momentum the optimizer was
    built with (``max_momentum``, where PyTorch's OneCycleLR puts it at construction)."""

    def _update(self):
        live = [group.momentum for group in self.param_groups]
        for group in self.param_groups:
            group.momentum = momentum(group.spec)
        try:
            super()._update()
        finally:
            for group, value in zip(self.param_groups, live, strict=True):
                group.momentum = value


class ClipPerTensor(NumpyLoop):
    """Gradient clipping by each gradient's own norm instead of the norm of all of them together."""

    def _clip_gradients(self):
        if self.clip_grad_norm is None:
            return super()._clip_gradients()
        for grad in self._grads.values():
            grad *= min(1.0, self.clip_grad_norm / (float(np.linalg.norm(grad)) + 1e-6))


class ZeroGradDoesNothing(NumpyLoop):
    def _zero_grad(self):
        pass


class LossSummedNotAveraged(NumpyLoop):
    def _loss(self, pred, y):
        terms, grad = _loss_terms(self.loss_spec, pred, y)
        return LossValue(terms.sum(), lambda: grad(1), self._forward_id)


class ExportTransposesAWeight(NumpyLoop):
    def _state_dict(self):
        state = super()._state_dict()
        first = next(key for key, value in state.items() if value.ndim == 2)
        state[first] = state[first].T
        return state


class LoadOptimizerStateMerges(NumpyLoop):
    """Keeps buffers the loaded state does not have, as a compiled step holding its own copies might."""

    def _load_optimizer_state_dict(self, state):
        self._optimizer_state.update({key: np.array(value) for key, value in state.items() if key != "step"})


class RandomStateNotRestored(NumpyLoop):
    def _load_random_state(self, state):
        pass


class TrainAccuracyAfterTheUpdate(NumpyLoop):
    """Counts a second forward pass, with the updated weights: an extra pass, and the wrong one."""

    def _step_correct(self, y):
        return int((self._run(self._step_input, record=False).argmax(1) == y).sum())

    def _step(self, x, y):
        self._step_input = x
        return super()._step(x, y)


class LossAndGradientsForwardsTwice(NumpyLoop):
    """A one-pass step that runs the forward pass twice (as MindSpore's backward re-run would):
    BatchNorm's running statistics move twice and Dropout draws a second mask."""

    def _loss_and_gradients(self, x, y):
        self._forward(x)
        return super()._loss_and_gradients(x, y)


class LossAndGradientsCountsNothing(NumpyLoop):
    """A one-pass step whose in-graph count takes the targets for no class indices (as MindSpore's
    would, given int64 targets where its graph tests for int32) and counts none correct."""

    def _loss_and_gradients(self, x, y):
        loss, _ = super()._loss_and_gradients(x, y)
        return loss, 0


class BackwardIgnoresTheExpression(NumpyLoop):
    """Differentiates the loss whatever expression of it backward() is given, as MindSpore's
    adapter did (its backward runs forward and loss again)."""

    def _backward(self, loss):
        self._root.backward(loss.origin.grad(), False)


class PredictionsAsAList(NumpyLoop):
    @staticmethod
    def to_numpy(value):
        return value.tolist()


class FrozenParameterMoves(NumpyLoop):
    """Leaves the frozen parameters out of gradients() but computes their gradients and updates
    them with the rest."""

    def _stop_frozen_gradients(self, owners):
        pass

    def _resolve_controls(self, names):
        groups = super()._resolve_controls(names)
        groups[-1].names += tuple(self.frozen)
        return groups


class GroupLrIgnored(NumpyLoop):
    """Every group trains at the optimizer's lr (its momentum and weight decay are kept)."""

    def _update(self):
        for group in self.param_groups:
            group.lr = self.lr
        super()._update()


class AccumulationNotAveraged(NumpyLoop):
    """Sums the accumulated batches' gradients instead of dividing each batch's loss by K."""

    def _scale_gradients(self, factor):
        pass


def failure(adapter, check):
    result = run_check(adapter, check)
    assert result.status == "fail", result
    message, reproduce = result.message.split("\n  reproduce: ")
    assert reproduce == f"unitrain conformance --adapter {__name__}:{adapter.__name__} --check {check}"
    return message, result


CAUGHT = {
    (AdamWithoutBiasCorrection, "check_adam_updates"):
        "Adam(lr=0.01, eps=0.0001) step 1: parameter '1.weight': "
        "expected 0.269192, got 0.290257 at index (6, 6); max error 0.0211 > tolerance 3.81e-06",
    (EpsilonInsideSqrt, "check_adam_updates"):
        "Adam(lr=0.01, eps=0.0001) step 1: parameter '1.weight': "
        "expected -0.249878, got -0.257934 at index (4, 11); max error 0.00806 > tolerance 3.81e-06",
    (EpsAlwaysAfterCorrection, "check_adam_eps_before_correction"):
        "Adam(lr=0.01, eps=0.01, eps_placement='before_correction') step 1: parameter '1.weight': "
        "expected 0.271631, got 0.278611 at index (7, 7); max error 0.00698 > tolerance 3.81e-06",
    (KaimingModeIgnored, "check_initializers"):
        "initial state_dict() with per-layer initialisers: '0.weight': expected -0.452629, got -0.905257 at index "
        "(2, 0, 2, 0); max error 0.453 > tolerance 9.54e-07",
    (RMSpropEpsilonInsideSqrt, "check_rmsprop_updates"):
        "RMSprop(lr=0.01, alpha=0.9, eps=0.01) step 1: parameter '1.weight': "
        "expected 0.202825, got 0.217777 at index (3, 1); max error 0.015 > tolerance 3.81e-06",
    (AdagradWithoutLrDecay, "check_adagrad_updates"):
        "Adagrad(lr=0.1, weight_decay=0.1, lr_decay=0.5, initial_accumulator_value=0.1) step 2: parameter "
        "'1.weight': expected 0.0445752, got 0.057831 at index (6, 9); max error 0.0133 > tolerance 7.63e-06",
    (MomentumNotCycled, "check_one_cycle_momentum"):
        "SGD(lr=0.1) with OneCycleLR(max_lr=0.5, total_steps=4), step 2: parameter '1.weight': "
        "expected -0.129366, got -0.140081 at index (3, 0); max error 0.0107 > tolerance 7.63e-06",
    (ClipPerTensor, "check_gradient_clipping"):
        "{'clip_grad_norm': 0.05} step 1: parameter '1.weight': "
        "expected 0.26568, got 0.267114 at index (6, 6); max error 0.00143 > tolerance 3.81e-06",
    (DropoutInEval, "check_forward_dropout_eval"):
        "predict(): expected 0.567939, got 0.833644 at index (3, 2); max error 0.266 > tolerance 7.63e-06",
    (BatchNormStatisticsInEval, "check_batchnorm_running_stats"):
        "1.running_mean after an eval-mode forward: expected 0.311676, got 0.164939 at index (5,); "
        "max error 0.147 > tolerance 0 (must be bit-exact)",
    (RunningVarAlwaysUnbiased, "check_batchnorm_running_stats"):
        "1.running_var (running_var='biased') after one training forward: expected 0.819916, got 0.832514 at "
        "index (4,); max error 0.0126 > tolerance 1.79e-05",
    (ChainerStyleMomentum, "check_sgd_momentum_new_lr"):
        "SGD(lr=0.02, momentum=0.9) step 1: parameter '1.weight': "
        "expected 0.0293309, got 0.0435649 at index (6, 9); max error 0.0142 > tolerance 3.81e-06",
    (ZeroGradDoesNothing, "check_zero_grad"): "after zero_grad(), gradient '1.weight' is not zero: max |g| = 0.111",
    (LossSummedNotAveraged, "check_losses"):
        "CrossEntropyLoss(reduction='mean'): expected 3.17645, got 25.4116; max error 22.2 > tolerance 0.000121",
    (ExportTransposesAWeight, "check_weights_round_trip"):
        "state_dict() after load_state_dict(): '0.weight': expected shape (8, 6), got shape (6, 8)",
    (LoadOptimizerStateMerges, "check_step_follows_state_changes"):
        "SGD(lr=0.1, momentum=0.9), step 1 after load_state_dict/load_optimizer_state_dict (batch of 8): parameter "
        "'1.weight': expected 0.0551669, got 0.0341758 at index (2, 10); max error 0.021 > tolerance 3.81e-06",
    (RandomStateNotRestored, "check_random_state_resumes_dropout"):
        "after a restore, the next steps' weights '1.weight': expected 0.220625, got 0.171773 at index (6, 11); "
        "max error 0.0489 > tolerance 0 (must be bit-exact)",
    (TrainAccuracyAfterTheUpdate, "check_predictions_as_numpy_and_train_accuracy"):
        "train_accuracy 0.5 after one step, expected 0.25: the argmax of that step's own forward pass",
    (LossAndGradientsForwardsTwice, "check_loss_and_gradients_in_one_pass"):
        "a BatchNorm/Dropout model, _loss_and_gradients vs. the tutorial sequence: loss: expected 1.36991, "
        "got 1.33508; max error 0.0348 > tolerance 0.000125",
    (LossAndGradientsCountsNothing, "check_loss_and_gradients_in_one_pass"):
        "a dense model, _loss_and_gradients vs. the tutorial sequence: correct predictions: expected 2, got 0",
    (BackwardIgnoresTheExpression, "check_loss_expressions"):
        "gradient of loss * 0.5 '3.weight': expected -0.0902389, got -0.180478 at index (2, 7); "
        "max error 0.0902 > tolerance 9.16e-05",
    (PredictionsAsAList, "check_predictions_as_numpy_and_train_accuracy"):
        "to_numpy(forward(x)) gave list of dtype None, expected a numpy.ndarray of float32",
    (FrozenParameterMoves, "check_frozen_parameters_and_groups"):
        "step 1: frozen parameter '1.bias': expected -0.0898877, got -0.0961883 at index (0,); max error 0.0063 > "
        "tolerance 0 (must be bit-exact)",
    (GroupLrIgnored, "check_frozen_parameters_and_groups"):
        "step 1: parameter '3.weight': expected -0.306081, got -0.290677 at index (2, 0); max error 0.0154 > "
        "tolerance 3.81e-06",
    (AccumulationNotAveraged, "check_gradient_accumulation_in_fit"):
        "after 2 accumulated steps: parameter '1.weight': expected 0.252193, got 0.202459 at index (2, 3); "
        "max error 0.0497 > tolerance 1.53e-05",
}  # fmt: skip


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def assert_same_report(message: str, expected: str) -> None:
    """``message`` says what ``expected`` says, each number within one unit of its last printed digit
    (and 1e-4 relative): the values a broken float32 adapter gives differ between CPUs in their last
    bits, which can change a printed digit, while a wrong check, index or equation changes the text or
    moves a number by far more."""
    assert _NUMBER.sub("#", message) == _NUMBER.sub("#", expected), message
    for got, want in zip(_NUMBER.findall(message), _NUMBER.findall(expected), strict=True):
        mantissa = want.split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        unit = 10.0 ** (-digits) * (10.0 ** int(want.split("e")[1]) if "e" in want else 1.0)
        assert abs(float(got) - float(want)) <= unit + 1e-4 * abs(float(want)), f"{got} != {want} in {message}"


@pytest.mark.parametrize(("adapter", "check"), CAUGHT, ids=[a.__name__ for a, _ in CAUGHT])
def test_a_broken_adapter_is_caught_by_the_right_check(adapter, check):
    message, result = failure(adapter, check)
    assert_same_report(message, CAUGHT[adapter, check])
    if "tolerance" in message:
        assert result.max_error > result.tolerance


def test_chainer_style_momentum_also_fails_on_its_buffer_convention():
    message, _ = failure(ChainerStyleMomentum, "check_sgd_momentum")
    # the velocity holds lr * buffer: 0.1 times PyTorch's
    assert_same_report(
        message,
        "SGD(lr=0.1, momentum=0.9) step 1: 1.weight.momentum_buffer: "
        "expected -0.174412, got -0.0174412 at index (6, 6); max error 0.157 > tolerance 3.81e-06",
    )


def test_the_intact_backend_passes_every_check_the_broken_ones_fail():
    intact = type("NumpyLoop", (NumpyLoop,), {"capabilities": _BrokenTree.capabilities})
    for check in {check for _, check in (*CAUGHT, *CAUGHT_TREES, *CAUGHT_RESAMPLING)}:
        assert run_check(intact, check).status == "pass", check


def test_missing_capability_is_a_skip_with_its_reason():
    (result,) = run_checks(NumpyLoop, ["check_native_model"])
    assert result.status == "skip"
    assert result.message == "needs capability native-model, which NumpyLoop does not declare"


def test_a_declared_expected_failure_is_xfail_with_its_reason():
    (result,) = run_checks(ZeroGradDoesNothing, ["check_zero_grad"], xfails={"check_zero_grad": "tracker #42"})
    assert result.status == "xfail" and not result.unexpected
    assert result.message.startswith("expected failure (tracker #42): after zero_grad()")


def test_a_declared_expected_failure_that_passes_is_reported():
    class Declares(NumpyLoop):
        conformance_xfails: ClassVar[dict[str, str]] = {"check_zero_grad": "believed broken"}

    (result,) = run_checks(Declares, ["check_zero_grad"])
    assert result.status == "xpass" and result.unexpected
    assert "believed broken" in result.message


def test_a_declared_expected_failure_naming_no_check_is_an_error():
    results = run_checks(NumpyLoop, ["check_zero_grad"], xfails={"check_zero_gradient": "typo"})
    assert [(r.check, r.status) for r in results] == [("check_zero_gradient", "error"), ("check_zero_grad", "pass")]
    assert "names no known check" in results[0].message


def test_an_adapter_that_crashes_fails_the_check_naming_the_error():
    class Crashes(NumpyLoop):
        def _gradients(self):
            raise RuntimeError("boom")

    result = run_check(Crashes, "check_zero_grad")
    assert result.status == "fail"
    assert result.message.startswith("raised RuntimeError: boom (test_conformance_meta.py:")


def test_an_adapter_that_cannot_set_the_momentum_fails_the_one_cycle_check():
    """A third-party adapter written before momentum cycling (``_set_lr`` only) is not silently wrong."""

    class LrOnly(NumpyLoop):
        _set_momentum = TrainingLoop._set_momentum

    result = run_check(LrOnly, "check_one_cycle_momentum")
    assert result.status == "fail"
    assert result.message.startswith("raised NotImplementedError: the numpy backend cannot change the momentum")


def test_every_check_has_a_one_line_summary_and_a_unique_name():
    assert len(CHECKS) >= 22
    for name, check in CHECKS.items():
        assert name.startswith("check_") and check.summary.endswith(".")


def test_cli_reproduces_a_single_failing_check_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "unitrain", "conformance", "--adapter", f"{__name__}:ZeroGradDoesNothing",
               "--check", "check_zero_grad", "--check", "check_losses", "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path.parent), env=_env())
    assert result.returncode == 1, result.stderr
    assert "check_zero_grad  FAIL" in result.stdout and "check_losses     pass" in result.stdout
    rows = json.loads(out.read_text())
    assert [(r["check"], r["status"]) for r in rows] == [("check_zero_grad", "fail"), ("check_losses", "pass")]
    assert math.isfinite(rows[1]["max_error"]) and rows[1]["max_error"] <= rows[1]["tolerance"]


def test_cli_errors_are_one_line(tmp_path):
    for argv, needle in ((["--check", "check_nope", "--backend", "numpy"], "unknown check 'check_nope'"),
                         (["--backend", "nope"], "unknown backend 'nope'")):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "unitrain", "conformance", *argv], capture_output=True,
                                text=True)  # fmt: skip
        assert result.returncode == 2 and needle in result.stderr and "Traceback" not in result.stderr


def _env():
    import os
    from pathlib import Path

    return {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}


# --- broken graphs and layers -------------------------------------------------------------


class _ResidualWithoutShortcut(numpy_layers._Residual):
    def forward(self, x, training, record):
        out = self.body.forward(x, training, record)
        return out if self.post is None else self.post.forward(out, training, record)


class ResidualDropsShortcut(_BrokenTree):
    def breaks(self, node):
        if type(node) is numpy_layers._Residual:
            node.__class__ = _ResidualWithoutShortcut


class AvgPoolDividesByUnpaddedCount(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_layers._AvgPool2d):
            node.spec = dataclasses.replace(node.spec, count_include_pad=False)


class GeluTanhForExact(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_layers._GELU):
            node.spec = dataclasses.replace(node.spec, approximate="tanh")


class LogSoftmaxOverLastAxis(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_layers._LogSoftmax):
            node.spec = dataclasses.replace(node.spec, dim=-1)


class _GatesInChainersDocumentedOrder(numpy_sequences._LSTMDirection):
    """Reads an LSTM's stacked gates as ``i, f, o, g`` (the order Chainer's n_step_lstm docstring gives
    ``W0..W3``) instead of PyTorch's ``i, f, g, o``."""

    def forward(self, x, h, c, record, mask=None):
        hidden = self.w_hh.shape[1]
        rows = np.r_[: 2 * hidden, 3 * hidden : 4 * hidden, 2 * hidden : 3 * hidden]
        saved = self.w_ih, self.w_hh, self.b_ih, self.b_hh
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = (None if a is None else a[rows] for a in saved)
        try:
            return super().forward(x, h, c, record, mask)
        finally:
            self.w_ih, self.w_hh, self.b_ih, self.b_hh = saved


class LSTMGatesSwapped(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_sequences._Recurrent):
            for directions in node.layers:
                for direction in directions:
                    if isinstance(direction, numpy_sequences._LSTMDirection):
                        direction.__class__ = _GatesInChainersDocumentedOrder


class _ReadsForwards:
    """Undoes the caller's reversal: the reverse direction reads the sequence first step first."""

    def forward(self, x, h, c, record, mask=None):
        outputs, h, c = super().forward(x[::-1], h, c, record, mask)
        return outputs[::-1], h, c


#: the direction classes with their reversal undone
_READING_FORWARDS = {kind: type(f"ReadsForwards{kind.__name__}", (_ReadsForwards, kind), {})
                     for kind in (numpy_sequences._Direction, numpy_sequences._LSTMDirection)}  # fmt: skip


class ReverseDirectionNotReversed(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_sequences._Recurrent):
            for directions in node.layers:
                if len(directions) == 2:
                    directions[-1].__class__ = _READING_FORWARDS[type(directions[-1])]


CAUGHT_TREES = {
    (ResidualDropsShortcut, "check_residual"):
        "dense residual model: predict(): expected -0.678236, got -0.0745026 at index (3, 3); "
        "max error 0.604 > tolerance 7.63e-06",
    (AvgPoolDividesByUnpaddedCount, "check_pooling"):
        "MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)) then AvgPool2d(kernel_size=(3, 3), "
        "stride=(2, 2), padding=(1, 1), count_include_pad=True): predict(): expected 0.599038, got 1.49855 at "
        "index (6, 0); max error 0.9 > tolerance 1.72e-05",
    # the tanh form is at most ~5e-4 off the erf form: still 25 times the tolerance
    (GeluTanhForExact, "check_activations"):
        "GELU(approximate='none'): predict(): expected 0.510459, got 0.510251 at index (3, 1); "
        "max error 0.000208 > tolerance 8.45e-06",
    (LogSoftmaxOverLastAxis, "check_activations"):
        "LogSoftmax(dim=1) of (N, C, H, W): predict(): expected -0.527043, got 0.683132 at index (7, 2); "
        "max error 1.21 > tolerance 0.000541",
}  # fmt: skip


CAUGHT_SEQUENCES = {
    (LSTMGatesSwapped, "check_sequence_layers"):
        "Embedding, LSTM, RNN (tanh, relu), batch first: predict(): expected 0.206039, got 0.187047 at index "
        "(0, 1, 1); max error 0.019 > tolerance 6.87e-05",
    (ReverseDirectionNotReversed, "check_sequence_layers"):
        "Embedding, LSTM, RNN (tanh, relu), batch first: predict(): expected 0.177376, got 0.0695094 at index "
        "(0, 0, 1); max error 0.108 > tolerance 6.87e-05",
}  # fmt: skip


CAUGHT_LAYERS = CAUGHT_TREES | CAUGHT_SEQUENCES


def assert_caught(adapter, check, expected):
    """``check`` fails ``adapter`` with the report ``expected``, by more than its tolerance."""
    message, result = failure(adapter, check)
    assert_same_report(message, expected)
    assert result.max_error > result.tolerance


@pytest.mark.parametrize(("adapter", "check"), CAUGHT_LAYERS, ids=[a.__name__ for a, _ in CAUGHT_LAYERS])
def test_a_broken_graph_or_layer_is_caught_by_the_right_check(adapter, check):
    assert_caught(adapter, check, CAUGHT_LAYERS[adapter, check])


# --- broken graph execution ---------------------------------------------------------------------------


def _graph_steps(node):
    """Every step of the NumPy backend's graph runners in the built tree, nested graphs included."""
    for step in getattr(node, "steps", ()):
        yield step
        yield from _graph_steps(getattr(step, "tree", None))


class _BrokenGraph(NumpyLoop):
    """The NumPy backend with :meth:`breaks` applied to every step of its graph runners."""

    def _build(self, model):
        super()._build(model)
        for step in list(_graph_steps(self._root)):
            self.breaks(step)

    def breaks(self, step):
        raise NotImplementedError


class ConcatSwapsItsInputs(_BrokenGraph):
    def breaks(self, step):
        if isinstance(step, numpy_graph._Function) and step.forward_rule is numpy_graph.FUNCTIONS["cat"][0]:
            forward, backward = step.forward_rule, step.backward_rule
            step.forward_rule = lambda args, kwargs: forward(args[::-1], kwargs)
            step.backward_rule = lambda grad, cache, kwargs, need: backward(grad, cache, kwargs, need)[::-1]


class SliceOffByOne(_BrokenGraph):
    def breaks(self, step):
        narrow = isinstance(step, numpy_graph._Function) and step.forward_rule is numpy_graph.FUNCTIONS["narrow"][0]
        if narrow and step.kwargs["start"] > 0:  # one element early: still in bounds, the wrong values
            step.kwargs = {**step.kwargs, "start": step.kwargs["start"] - 1}


class TiedWeightsUpdatedTwice(NumpyLoop):
    """Applies the SGD step once more to the parameters of a module called at several nodes, as an
    adapter would that registered the tied weight once per call."""

    def _update(self):
        super()._update()
        spec = self.model_spec
        calls = [node.target for node in getattr(spec, "nodes", ()) if node.op == "call_module"]
        for name, param in self._params.items():
            if calls.count(name.rsplit(".", 1)[0]) > 1:
                param -= self.lr * self._grads[name]


class TiedAcrossLayersUpdatedTwice(NumpyLoop):
    """Applies the SGD step once more to a tensor tied to two layers, as an adapter would that
    listed it once per layer."""

    def _update(self):
        super()._update()
        for _, source in getattr(self.model_spec, "tied", ()):
            self._params[source] -= self.lr * self._grads[source]


class TransposedTieOwnGradient(NumpyLoop):
    """Gives the layer of a transposed tie a gradient array of its own, as an adapter would that tied
    the values but not the gradients: the source misses the decoder's share."""

    def _build(self, model):
        super()._build(model)
        leaves = dict(zip((path for path, _ in model.named_layers()), self._leaves, strict=True))
        for key, source in getattr(model, "tied", ()):
            if source.endswith(".T"):
                path, name = key.rsplit(".", 1)
                leaves[path].grads[name] = np.zeros_like(leaves[path].grads[name])


CAUGHT_GRAPHS = {
    (ConcatSwapsItsInputs, "check_graph_concat_split"):
        "concat then split: predict() output 0: expected -0.297431, got 0.242469 at index (4, 0); "
        "max error 0.54 > tolerance 5.34e-05",
    (SliceOffByOne, "check_graph_concat_split"):
        "concat then split: predict() output 0: expected -0.297431, got 0.42935 at index (4, 0); "
        "max error 0.727 > tolerance 5.34e-05",
    (SliceOffByOne, "check_graph_ops"):
        "every-op graph: predict() output 0: expected 0.883586, got -0.015956 at index (6, 0); "
        "max error 0.9 > tolerance 0.00054",
    (TiedWeightsUpdatedTwice, "check_graph_shared_weights"):
        "tied weights after one SGD step 'shared.weight': expected -0.277868, got -0.248965 at index (3, 3); "
        "max error 0.0289 > tolerance 0.000366",
    (TiedAcrossLayersUpdatedTwice, "check_graph_tied_across_layers"):
        "tied embedding after one SGD step 'encoder.weight': expected 0.141053, got 0.134917 at index (4, 3); "
        "max error 0.00614 > tolerance 0.000916",
    (TransposedTieOwnGradient, "check_graph_tied_across_layers"):
        "transposed tie: gradient 'encoder.weight': expected -0.197224, got -0.0390963 at index (0, 0); "
        "max error 0.158 > tolerance 0.000366",
}  # fmt: skip


@pytest.mark.parametrize(("adapter", "check"), CAUGHT_GRAPHS, ids=[f"{a.__name__}-{c}" for a, c in CAUGHT_GRAPHS])
def test_a_broken_graph_execution_is_caught_by_the_right_check(adapter, check):
    assert_caught(adapter, check, CAUGHT_GRAPHS[adapter, check])


def test_the_intact_backend_passes_the_graph_checks():
    for check in {check for _, check in CAUGHT_GRAPHS}:
        assert run_check(NumpyLoop, check).status == "pass", check


# --- broken noise inside a graph ---------------------------------------------------------------------


class GraphNoiseOfItsOwn(NumpyLoop):
    """Draws a graph's noise itself, of the right kinds, from a generator of its own seeded with the
    loop's seed, instead of taking the loop's: noise that differs between backends."""

    def _forward(self, x):
        kinds = [kind for _, kind in self.model_spec.noise]
        if kinds:
            own = np.random.default_rng(self.seed)
            drawn = [own.standard_normal(v.shape) if kind == "normal" else own.random(v.shape)
                     for kind, v in zip(kinds, x[-len(kinds) :], strict=True)]  # fmt: skip
            x = (*x[: -len(kinds)], *(v.astype(self.dtype) for v in drawn))
        return super()._forward(x)


class NoiseIgnoredInTraining(NumpyLoop):
    """Trains as if the noise were zero (a model sampling only its mean)."""

    def _forward(self, x):
        if self.model_spec.noise:
            x = (*x[: -len(self.model_spec.noise)], *(np.zeros_like(v) for v in x[-len(self.model_spec.noise) :]))
        return super()._forward(x)


CAUGHT_NOISE = {
    GraphNoiseOfItsOwn: "noise graph, first training forward: loss: expected 36.8865, got 23.7345; "
    "max error 13.2 > tolerance 0.00141",
    NoiseIgnoredInTraining: "noise graph, first training forward: loss: expected 36.8865, got 15.2968; "
    "max error 21.6 > tolerance 0.00141",
}


@pytest.mark.parametrize("adapter", CAUGHT_NOISE, ids=[a.__name__ for a in CAUGHT_NOISE])
def test_broken_noise_is_caught(adapter):
    assert_caught(adapter, "check_graph_noise", CAUGHT_NOISE[adapter])
    assert run_check(NumpyLoop, "check_graph_noise").status == "pass"


# --- broken resampling layers and BCELoss -----------------------------------------------------------


class _ConvTransposePaddingTheOutput(numpy_layers._ConvTranspose2d):
    """``output_padding`` as zero rows and columns added to the finished output (MindSpore's
    ``nn.Conv2dTranspose``), instead of rows of the uncut transpose."""

    def forward(self, x, training, record):
        spec, self.spec = self.spec, dataclasses.replace(self.spec, output_padding=(0, 0))
        try:
            out = super().forward(x, training, record)
        finally:
            self.spec = spec
        (eh, ew) = spec.output_padding
        return np.pad(out, ((0, 0), (0, 0), (0, eh), (0, ew)))

    def backward(self, grad, need_input_grad):
        (eh, ew), (h, w) = self.spec.output_padding, grad.shape[2:]
        spec, self.spec = self.spec, dataclasses.replace(self.spec, output_padding=(0, 0))
        try:
            return super().backward(np.ascontiguousarray(grad[:, :, : h - eh, : w - ew]), need_input_grad)
        finally:
            self.spec = spec


class ConvTransposePadsTheOutput(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_layers._ConvTranspose2d):
            node.__class__ = _ConvTransposePaddingTheOutput


class BilinearFlipsAlignCorners(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_layers._Upsample) and node.spec.mode == "bilinear":
            node.spec = dataclasses.replace(node.spec, align_corners=not node.spec.align_corners)


class _UpsampleScaledBySizes(numpy_layers._Upsample):
    """A scale factor's output size, but indices scaled by input over output size (Chainer's
    ``resize_images``, MindSpore's ``interpolate``), not by ``1 / scale_factor``."""

    def forward(self, x, training, record):
        spec = self.spec
        size = spec.output_shape(x.shape[1:])[1:]
        self.spec = dataclasses.replace(spec, size=size, scale_factor=None)
        try:
            return super().forward(x, training, record)
        finally:
            self.spec = spec


class UpsampleScaledBySizes(_BrokenTree):
    def breaks(self, node):
        if isinstance(node, numpy_layers._Upsample):
            node.__class__ = _UpsampleScaledBySizes


class BCEFloorsProbabilities(NumpyLoop):
    """BCELoss with ``p`` and ``1 - p`` floored at 1e-12 inside the logarithms (MindSpore's ``nn.BCELoss``)
    rather than the logarithms floored at -100."""

    def _loss(self, pred, y):
        if not isinstance(self.loss_spec, BCELoss):
            return super()._loss(pred, y)
        eps = self.dtype.type(1e-12)
        terms = -(y * np.log(np.maximum(pred, eps)) + (1 - y) * np.log(np.maximum(1 - pred, eps)))
        scale = 1 / terms.size if self.loss_spec.reduction == "mean" else 1

        def grad():
            return (pred - y) / np.maximum(pred * (1 - pred), 1e-12) * scale

        return LossValue(self.dtype.type(terms.sum() * scale), grad, self._forward_id)


#: the first model of check_transposed_conv_and_upsample, which each broken layer fails
FIRST_RESAMPLING_MODEL = (
    "ConvTranspose2d(in_channels=4, out_channels=4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
    "output_padding=(1, 1), groups=1, bias=True, dilation=(1, 1)) then Upsample(size=None, "
    "scale_factor=(1.7, 0.6), mode='nearest', align_corners=None) then Upsample(size=(9, 7), scale_factor=None, "
    "mode='bilinear', align_corners=None)"
)
CAUGHT_RESAMPLING = {
    (ConvTransposePadsTheOutput, "check_transposed_conv_and_upsample"):
        f"{FIRST_RESAMPLING_MODEL}: predict(): expected -0.143921, got -0.199014 at index (7, 0); "
        "max error 0.0551 > tolerance 0.00024",
    (BilinearFlipsAlignCorners, "check_transposed_conv_and_upsample"):
        f"{FIRST_RESAMPLING_MODEL}: predict(): expected -0.143921, got 0.0906937 at index (7, 0); "
        "max error 0.235 > tolerance 0.00024",
    (UpsampleScaledBySizes, "check_transposed_conv_and_upsample"):
        f"{FIRST_RESAMPLING_MODEL}: predict(): expected -0.259061, got -0.420592 at index (2, 2); "
        "max error 0.162 > tolerance 0.00024",
    # the predictions of exactly 0 and 1 cost 27.6 each instead of 100
    (BCEFloorsProbabilities, "check_bce_loss"):
        "BCELoss(reduction='mean') on probabilities: loss: expected 3.30245, got 1.6184; "
        "max error 1.68 > tolerance 0.000126",
}  # fmt: skip


@pytest.mark.parametrize(("adapter", "check"), CAUGHT_RESAMPLING, ids=[a.__name__ for a, _ in CAUGHT_RESAMPLING])
def test_a_broken_resampling_layer_or_bce_is_caught_by_the_right_check(adapter, check):
    assert_caught(adapter, check, CAUGHT_RESAMPLING[adapter, check])


# --- broken multi-model steps --------------------------------------------------------------------


def _without_detach(node):
    """``node`` with every ``detach`` replaced by its operand."""
    if not isinstance(node, tuple) or not node:
        return node
    if node[0] == "detach":
        return _without_detach(node[1])
    return tuple(_without_detach(part) for part in node)


class _DetachLeaks(numpy_steps.Evaluator):
    def __init__(self, step, loops):
        phases = [dataclasses.replace(phase, loss=_without_detach(phase.loss)) for phase in step.phases]
        super().__init__(steps.MultiStep(step.models, step.optimizers, phases), loops)


class DetachLeaks(NumpyLoop):
    """``detach`` lets the gradient through (as a framework's identity would)."""

    multi_model_evaluator = _DetachLeaks


class _UpdatesEveryModel(numpy_steps.Evaluator):
    def __init__(self, step, loops):
        super().__init__(step, loops)
        self.phases = [(phase, tuple(loops), order) for phase, _, order in self.phases]


class GeneratorPhaseUpdatesDiscriminator(NumpyLoop):
    """Each phase zeroes and steps every model, not only its optimizer's: the generator's phase moves
    the discriminator down the generator's loss."""

    multi_model_evaluator = _UpdatesEveryModel


class _OwnNoise(numpy_steps.Evaluator):
    def compute(self, node, op, arguments, static, x, noise):
        if op == "noise":  # a backend drawing from its own generator instead of the step's stream
            return np.random.default_rng(0).standard_normal((len(x), *static["shape"]))
        return super().compute(node, op, arguments, static, x, noise)


class NoiseOfItsOwn(NumpyLoop):
    """Draws the step's noise from a generator of its own."""

    multi_model_evaluator = _OwnNoise


CAUGHT_STEPS = {
    DetachLeaks: "GAN step 1: the discriminator phase's loss: expected 1.48348, got 1.48307; "
                 "max error 0.000408 > tolerance 2.53e-13",
    GeneratorPhaseUpdatesDiscriminator: "GAN step 1: the discriminator phase's loss: expected 1.48348, "
                                        "got 1.49435; max error 0.0109 > tolerance 2.53e-13",
    NoiseOfItsOwn: "GAN step 0: the discriminator phase's loss: expected 1.71342, got 1.42957; "
                   "max error 0.284 > tolerance 2.92e-13",
}  # fmt: skip


@pytest.mark.parametrize("adapter", CAUGHT_STEPS, ids=[adapter.__name__ for adapter in CAUGHT_STEPS])
def test_a_broken_multi_model_step_is_caught(adapter):
    assert_caught(adapter, "check_multi_model_step", CAUGHT_STEPS[adapter])


def test_the_intact_backend_passes_the_multi_model_check():
    assert run_check(NumpyLoop, "check_multi_model_step").status == "pass"


# --- broken attention ---------------------------------------------------------------------------------


class _ScaledByEmbedDim(numpy_attention._MultiheadAttention):
    def scale(self):
        return 1 / self.spec.head_dim


class _PaddingIgnored(numpy_attention._MultiheadAttention):
    def masks(self, length, keys, masks):
        return super().masks(length, keys, tuple(mask for mask in masks if mask.ndim != 2))


class _MasksOfAnotherSpec(numpy_attention._MultiheadAttention):
    """The masks as the spec with ``changes`` computes them."""

    changes: ClassVar[dict] = {}

    def masks(self, length, keys, masks):
        spec, self.spec = self.spec, dataclasses.replace(self.spec, **self.changes)
        try:
            return super().masks(length, keys, masks)
        finally:
            self.spec = spec


class _CausalIgnored(_MasksOfAnotherSpec):
    changes: ClassVar[dict] = {"causal": False}


class _AttentionMaskIgnored(numpy_attention._MultiheadAttention):
    def masks(self, length, keys, masks):
        return super().masks(length, keys, tuple(mask for mask in masks if mask.ndim == 2))


class _FloatMasksAsBoolean(_MasksOfAnotherSpec):
    """Any non-zero float masks its key: what the float key padding mask did before it was added."""

    changes: ClassVar[dict] = {"additive_masks": False}


class _SeparateProjectionsUntrained(numpy_attention._MultiheadAttention):
    """``q/k/v_proj_weight`` read by the forward, left without gradients by the backward (as if only
    ``in_proj_weight`` had one)."""

    def backward(self, grad, need_input_grad):
        separate = {key: value.copy() for key, value in self.grads.items() if key[0] in "qkv"}
        result = super().backward(grad, need_input_grad)
        for key, value in separate.items():
            self.grads[key][...] = value
        return result


class _BrokenAttention(_BrokenGraph):
    broken: ClassVar[type]

    def breaks(self, step):
        if isinstance(getattr(step, "tree", None), numpy_attention._MultiheadAttention):
            step.tree.__class__ = self.broken


class AttentionScaledByD(_BrokenAttention):
    broken = _ScaledByEmbedDim


class KeyPaddingMaskIgnored(_BrokenAttention):
    broken = _PaddingIgnored


class CausalMaskIgnored(_BrokenAttention):
    broken = _CausalIgnored


class AttentionMaskIgnored(_BrokenAttention):
    broken = _AttentionMaskIgnored


class FloatMasksAsBoolean(_BrokenAttention):
    broken = _FloatMasksAsBoolean


class SeparateProjectionsUntrained(_BrokenAttention):
    broken = _SeparateProjectionsUntrained


CAUGHT_ATTENTION = {
    AttentionScaledByD:
        "causal self-attention with a key padding mask: predict(): expected 0.653416, got 1.05291 at index "
        "(5, 2, 7); max error 0.399 > tolerance 0.000502",
    KeyPaddingMaskIgnored:
        "causal self-attention with a key padding mask: predict(): expected -0.381669, got 0.770145 at index "
        "(4, 3, 5); max error 1.15 > tolerance 0.000502",
    CausalMaskIgnored:
        "causal self-attention with a key padding mask: predict(): expected -1.3761, got 0.494221 at index "
        "(2, 0, 7); max error 1.87 > tolerance 0.000502",
    AttentionMaskIgnored:
        "causal self-attention with additive key padding and attention masks: predict(): expected -0.834444, "
        "got 0.0916875 at index (2, 4, 7); max error 0.926 > tolerance 0.000556",
    SeparateProjectionsUntrained:
        "cross-attention to keys and values of other widths: gradient 'attend.q_proj_weight': expected 2.55122, "
        "got 0 at index (4, 1); max error 2.55 > tolerance 0.00623",
    FloatMasksAsBoolean:  # every key of a query with a non-zero float masked: NaN, as PyTorch gives
        "causal self-attention with additive key padding and attention masks: predict(): expected -1.06507, "
        "got nan at index (0, 0, 0); max error inf > tolerance 0.000556",
}  # fmt: skip


@pytest.mark.parametrize("adapter", CAUGHT_ATTENTION, ids=[a.__name__ for a in CAUGHT_ATTENTION])
def test_a_broken_attention_is_caught_by_the_attention_check(adapter):
    assert_caught(adapter, "check_attention", CAUGHT_ATTENTION[adapter])
    assert run_check(NumpyLoop, "check_attention").status == "pass"


# --- broken per-position losses and padded sequences -------------------------------------------------


class IgnoreIndexIgnored(NumpyLoop):
    """Class losses that count every target: an ignored one (padding) scores as class 0."""

    def _loss_value(self, spec, pred, y):
        if getattr(spec, "ignore_index", None) is not None and y.dtype.kind in "iu":
            y = np.where(y == spec.ignore_index, 0, y)
        return super()._loss_value(spec, pred, y)


def test_a_loss_that_ignores_no_target_is_caught_by_the_per_position_check():
    assert_caught(
        IgnoreIndexIgnored,
        "check_per_position_losses",
        "CrossEntropyLoss(reduction='mean', label_smoothing=0.2, ignore_index=-100) over (N, C, T) with ignored "
        "targets: loss: expected 2.30303, got 2.25374; max error 0.0493 > tolerance 0.000264",
    )


class LengthsIgnored(NumpyLoop):
    """Recurrent layers that read every padded step: the lengths reach them and are dropped."""

    def _build(self, model):
        super()._build(model)
        for step in list(_graph_steps(self._root)):
            tree = getattr(step, "tree", None)
            if isinstance(tree, numpy_sequences._Recurrent):
                forward = tree.forward
                tree.forward = lambda x, training, record, forward=forward: forward(x[0], training, record)


def test_lengths_ignored_are_caught_by_the_padded_sequences_check():
    assert_caught(
        LengthsIgnored,
        "check_padded_sequences",
        "LSTM(bidirectional, batch_first) with lengths [5, 2, 4, 1]: predict(): expected 0, got 0.52929 at index "
        "(1, 3, 2); max error 0.529 > tolerance 0.00021",
    )


class InitialStatesIgnored(_BrokenGraph):
    """Recurrent calls that start from zeros: the initial states reach them and are dropped."""

    def breaks(self, step):
        if isinstance(step, numpy_graph._StatesCall):
            run = step.layer.run
            step.layer.run = lambda x, h0, c0, *rest: run(x, None, None, *rest)


def test_initial_states_ignored_are_caught_by_the_recurrent_states_check():
    assert_caught(
        InitialStatesIgnored,
        "check_recurrent_states",
        "LSTM(bidirectional, 2 layers) from initial states with lengths [4, 2, 3, 1], final states read: predict(): "
        "expected 0.313702, got -0.193669 at index (3, 46); max error 0.507 > tolerance 0.000137",
    )
