"""The MindSpore backend's evaluator of a multi-model step (:mod:`unitrain.steps`).

MindSpore's autograd is functional: ``mindspore.value_and_grad`` differentiates a function of the
parameters, so a phase is one function that computes its loss from the batch and the noise,
calling the models' cells and the CustomLoss table of the MindSpore adapter, differentiated
with respect to the weights of the phase's optimizer. A value an earlier phase of the step computed
is computed again inside it (the function must see the path to the weights); the rule of
:mod:`unitrain.steps` that such a value is computed once is kept for what it changes, BatchNorm's
running statistics: a model whose calls in the phase all repeat earlier ones gets its buffers back
afterwards, as the adapter's own ``backward`` does after its re-run. Runs eagerly (PyNative).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops

from unitrain.steps import PhaseEvaluator, split

from .mindspore import _EXPR_OPS, _TakesMasks, _write


class Evaluator(PhaseEvaluator):
    def __init__(self, step, loops):
        super().__init__(step, loops)
        for name, loop in loops.items():
            if loop._has_dropout:
                raise ValueError(f"model {name!r}: dropout inside a multi-model step is not supported on MindSpore yet")
            loop.train()

    def _value(self, node, op, arguments, static, x, noise):
        if op == "batch":
            return Tensor(x) if not isinstance(x, tuple) else tuple(Tensor(part) for part in x)
        if op == "noise":
            return Tensor(noise[node])
        if op == "detach":
            return ops.stop_gradient(arguments[0])
        if op == "call":
            net = self.loops[static["model"]]._net
            inputs = arguments[0] if len(arguments) == 1 else tuple(arguments)
            return net(inputs, ()) if isinstance(net, _TakesMasks) else net(inputs)  # no dropout: no masks
        if op == "output":
            return arguments[0][static["index"]]
        return _EXPR_OPS[op](*arguments, *static.values())

    def run(self, x, noise):
        computed: set = set()  # the nodes an earlier phase of this step computed, still valid
        losses = []
        for phase, updated, order in self.phases:
            loops = [self.loops[name] for name in updated]
            weights = [loop._params[name] for loop in loops for name in loop._grad_names]
            calls = [node for node in order if node[0] == "call"]
            repeated = {node[1] for node in calls if node in computed} - {node[1] for node in calls
                                                                          if node not in computed}  # fmt: skip
            saved = {name: [buffer.asnumpy().copy() for buffer in self.loops[name]._buffers] for name in repeated}

            def loss(order=order, phase=phase):
                values = {}
                for node in order:
                    op, children, static = split(node)
                    values[node] = self._value(node, op, [values[child] for child in children], static, x, noise)
                return values[phase.loss]

            value, gradients = ms.value_and_grad(loss, None, weights)()
            for name, buffers in saved.items():
                for buffer, array in zip(self.loops[name]._buffers, buffers, strict=True):
                    _write(buffer, array)
            position = 0
            for loop in loops:
                for buffer in loop._grads:
                    ops.assign(buffer, gradients[position])
                    position += 1
                loop.update()
            losses.append(float(value.asnumpy()))
            computed |= set(order)
            computed = {node for node in computed if not self.calls[node] & set(updated)}
        return losses
