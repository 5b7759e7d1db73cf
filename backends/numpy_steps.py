"""The NumPy backend's evaluator of a multi-model step (:mod:`unitrain.steps`).

Forward: each node once, with the operations' NumPy forward rules of :mod:`unitrain.expr`; a model
call runs a tree of its own, built from the model's layers as a graph builds a module called at
several nodes (shallow copies: the parameters, gradients and buffers are the model's, the caches
the call's own), so each call keeps what its backward needs until the phase that differentiates it.

Backward: reverse-mode over the step's nodes, in reverse order of computation, with
:data:`unitrain.expr.NUMPY_OPS`' vector-Jacobian products and each call's tree's backward; a
gradient goes only where it can reach the parameters the phase updates.
"""

from __future__ import annotations

import numpy as np

from unitrain import expr
from unitrain.steps import PhaseEvaluator, split

from .numpy_graph import _replicas
from .numpy_layers import _build


class Evaluator(PhaseEvaluator):
    def __init__(self, step, loops):
        super().__init__(step, loops)
        self.trees = {}  # call node -> its own tree of the model's layers
        self.dtype = next(iter(loops.values())).dtype

    def _tree(self, node, model):
        if node not in self.trees:
            loop = self.loops[model]
            copies = _replicas(loop._leaves, {id(leaf) for leaf in loop._leaves})
            self.trees[node] = _build(loop.model_spec, copies, False, loop._make_leaf)[0]
        return self.trees[node]

    def compute(self, node, op, arguments, static, x, noise):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if op == "batch":
                return x
            if op == "noise":
                return noise[node]
            if op == "detach":
                return arguments[0]
            if op == "call":
                tree = self._tree(node, static["model"])
                return tree.forward(arguments[0] if len(arguments) == 1 else tuple(arguments), True, True)
            if op == "output":
                return arguments[0][static["index"]]
            if op == "const":
                return np.asarray(static["value"], self.dtype)
            return np.asarray(expr.NUMPY_OPS[op][0](*arguments, **static), self.dtype)

    def backward(self, phase, updated, order, cache, keep):
        requires = {}
        for node in order:
            op, children, static = split(node)
            through = op != "detach" and any(requires[child] for child in children)
            requires[node] = through or (op == "call" and static["model"] in updated)
        grads = {phase.loss: np.ones((), self.dtype)}
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for node in reversed(order):
                grad = grads.pop(node, None)
                if grad is None or not requires[node]:
                    continue
                op, children, static = split(node)
                if op == "output":
                    call = children[0]
                    parts = grads.setdefault(call, [None] * len(cache[call]))
                    parts[static["index"]] = grad if parts[static["index"]] is None else parts[static["index"]] + grad
                    continue
                if op == "call":
                    need = [requires[child] for child in children]
                    outputs = cache[node]
                    if isinstance(grad, list):  # several outputs; an unused one gets zeros
                        grad = tuple(np.zeros_like(out) if g is None else np.array(g, self.dtype)
                                     for g, out in zip(grad, outputs, strict=True))  # fmt: skip
                    else:
                        grad = np.array(np.broadcast_to(grad, outputs.shape), self.dtype)  # the tree may overwrite it
                    parts = self.trees[node].backward(grad, any(need))
                    if parts is None:  # no input needs a gradient (a model called on the batch and noise)
                        parts = (None,) * len(children)
                    parts = parts if isinstance(parts, tuple) else (parts,)
                else:
                    values = [cache[child] for child in children]
                    parts = expr.NUMPY_OPS[op][1](grad, *values, cache[node], **static)
                    parts = [expr._reduce_to(np.asarray(part, self.dtype), np.shape(value))
                             for part, value in zip(parts, values, strict=True)]  # fmt: skip
                for child, part in zip(children, parts, strict=True):
                    if requires[child] and part is not None:
                        grads[child] = part if child not in grads else grads[child] + part
