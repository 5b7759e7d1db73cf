"""The torch backend's evaluator of a multi-model step (:mod:`unitrain.steps`): each node as a
torch operation (the CustomLoss table of the torch adapter), each model call through its loop's
module, and ``loss.backward()``: torch's autograd differentiates the phase.

The step runs what a hand-written PyTorch loop runs: a loss that is a sum of terms sharing no graph
is back-propagated one term at a time, as soon as the term is computed (:mod:`unitrain.phase_losses`),
and :func:`unitrain.steps.bce` against a 0/1 label is ``F.binary_cross_entropy``, ``nn.BCELoss``'s
one operation forward and one backward (the expression's logarithm, floor, negation and mean are
four each way, and round differently)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unitrain.phase_losses import backward_passes
from unitrain.steps import PhaseEvaluator, postorder

from .torch import _DTYPES, _expr_ops


def _bce_label(node) -> tuple | None:
    """``(probabilities, label)`` of a node that is ``steps.bce(p, label)`` for a label 0 or 1:
    ``mean`` or ``sum`` of ``-maximum(log(p), -100)`` (label 1) or ``-maximum(log(1 - p), -100)``."""
    if node[0] not in ("mean", "sum") or node[2] is not None or node[1][0] != "neg":
        return None
    floored = node[1][1]
    if floored[0] != "maximum" or floored[2] != ("const", -100.0) or floored[1][0] != "log":
        return None
    logged = floored[1][1]
    if logged[0] == "sub" and logged[1] == ("const", 1.0):
        return logged[2], 0.0
    return logged, 1.0


class Evaluator(PhaseEvaluator):
    def __init__(self, step, loops):
        super().__init__(step, loops)
        first = next(iter(loops.values()))
        self.device = first._device
        self.ops = _expr_ops(_DTYPES[first.dtype], self.device)
        self._tensor = first._tensor  # copies what from_numpy refuses (negative strides) or warns on (read-only)
        for node, (op, _, _) in list(self.splits.items()):
            if op in ("mean", "sum") and (bce := _bce_label(node)):
                self.splits[node] = ("bce", (bce[0],), {"label": bce[1], "reduction": op})
        self.passes = [
            [(backward.root, backward.keep, self._order(backward.root)) for backward in phase]
            for phase in backward_passes(self.phases, self.calls)
        ]  # fmt: skip
        self.orders = [self._order(phase.loss) for phase, _, _ in self.phases]

    def _order(self, root):
        """The nodes to compute for ``root``, each after its children (a bce's own parts left out)."""
        return postorder([root], lambda node: self.splits[node][1])

    def differentiate(self, index, cache, x, noise):
        for root, keep, order in self.passes[index]:
            self.evaluate(order, cache, x, noise)
            cache[root].backward(retain_graph=keep)
        self.evaluate(self.orders[index], cache, x, noise)  # a sum of terms: its value

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
        if op == "bce":
            return self._bce(arguments[0], **static)
        return self.ops[op](*arguments, **static)

    def _bce(self, probabilities, label, reduction):
        try:
            return F.binary_cross_entropy(probabilities, torch.full_like(probabilities, label), reduction=reduction)
        except RuntimeError:  # a value outside [0, 1] (or NaN): the expression's NaN, as on the other backends
            ops = self.ops
            p = probabilities if label else ops["sub"](ops["const"](1.0), probabilities)
            return ops[reduction](ops["neg"](ops["maximum"](ops["log"](p), ops["const"](-100.0))), None)

    def loss_value(self, value):
        return value.item()
