"""The torch backend's evaluator of a multi-model step (:mod:`unitrain.steps`): each node as a
torch operation (the CustomLoss table of the torch adapter), each model call through its loop's
module, and ``loss.backward()``: torch's autograd differentiates the phase."""

from __future__ import annotations

from unitrain.steps import PhaseEvaluator

from .torch import _DTYPES, _expr_ops


class Evaluator(PhaseEvaluator):
    def __init__(self, step, loops):
        super().__init__(step, loops)
        first = next(iter(loops.values()))
        self.device = first._device
        self.ops = _expr_ops(_DTYPES[first.dtype], self.device)
        self._tensor = first._tensor  # copies what from_numpy refuses (negative strides) or warns on (read-only)

    def compute(self, node, op, arguments, static, x, noise):
        if op == "batch":
            return self._tensor(x)
        if op == "noise":
            return self._tensor(noise[node])
        if op == "detach":
            return arguments[0].detach()
        if op == "call":
            return self.loops[static["model"]]._run(arguments[0] if len(arguments) == 1 else tuple(arguments))
        if op == "output":
            return arguments[0][static["index"]]
        return self.ops[op](*arguments, **static)

    def backward(self, phase, updated, order, cache, keep):
        cache[phase.loss].backward(retain_graph=keep)

    def loss_value(self, value):
        return value.item()
