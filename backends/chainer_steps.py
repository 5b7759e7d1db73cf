"""The Chainer backend's evaluator of a multi-model step (:mod:`unitrain.steps`): each node as a
Chainer function (the CustomLoss table of the Chainer adapter), each model call through its loop's
link, and ``loss.backward()``: Chainer's own autograd differentiates the phase."""

from __future__ import annotations

import chainer

from unitrain.steps import PhaseEvaluator

from .chainer import _EXPR_OPS


class Evaluator(PhaseEvaluator):
    def compute(self, node, op, arguments, static, x, noise):
        if op == "batch":
            return x
        if op == "noise":
            return noise[node]
        if op == "detach":  # the array alone: no graph behind it
            return arguments[0].array if isinstance(arguments[0], chainer.Variable) else arguments[0]
        if op == "call":
            return self.loops[static["model"]]._forward(arguments[0] if len(arguments) == 1 else tuple(arguments))
        if op == "output":
            return arguments[0][static["index"]]
        return _EXPR_OPS[op](*arguments, **static)

    def backward(self, phase, updated, order, cache, keep):
        cache[phase.loss].backward()

    def loss_value(self, value):
        return float(value.array)
