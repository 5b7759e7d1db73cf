"""The MindSpore backend's evaluator of a multi-model step (:mod:`unitrain.steps`), compiled.

MindSpore's autograd is functional: ``mindspore.value_and_grad`` differentiates a function of the
parameters. So each phase is one Cell, :class:`_PhaseLoss`, that computes the phase's loss from
the batch, the noise and the dropout masks, with the models' own Cells, differentiated with
respect to the weights of the phase's optimizer inside one ``mindspore.jit`` graph that also writes
the gradients into the loops' buffers; each loop's own compiled ``update`` then steps its
optimizer. This is how MindSpore's DCGAN tutorial writes its step (a loss Cell per phase,
``value_and_grad`` of it in graph mode), with the noise and masks as inputs drawn by the loop.
Data parallel (under ``msrun``), each phase's gradients are summed over the ranks, times the
rank's share, by the loops' ``AllReduce`` in the same graph, before the phase's update.

Graph mode compiles ``construct`` from its source and cannot walk an expression tree, so the
phase's nodes become one Cell each at construction (as :mod:`.mindspore_graph` does for a graph):
each reads its arguments by position from the tuple of values computed so far, and
:class:`_PhaseLoss` appends each node's value to it. A model called at several nodes is one Cell
held by several :class:`_Call` nodes: its Parameters appear once, and ``value_and_grad`` sums the
gradients of their uses.

A value an earlier phase of the step computed is computed again inside the phase (the graph must
see the path to the weights); the rule of :mod:`unitrain.steps` that such a value is computed
once is kept for what it changes: a repeated call (:class:`_RepeatedCall`) gets the dropout masks
of its first call, and puts its model's BatchNorm statistics back after it runs, as the adapter's
own ``backward`` does after its re-run, so each call of the step counts once even where the phase
also calls the model afresh (a generator on new noise beside its earlier fake). With ``compiled = False``
on the adapter the same Cells run eagerly (PyNative).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from unitrain.randomness import dropout_mask
from unitrain.step_shapes import node_shapes
from unitrain.steps import PhaseEvaluator, split

from .mindspore import _EXPR_OPS, _dropout_shapes, _TakesMasks


class _Input(nn.Cell):
    """The batch (position 0 of the phase's inputs) or one noise array."""

    def __init__(self, position: int):
        super().__init__(auto_prefix=False)
        self.position = position

    def construct(self, values, inputs, masks):
        return inputs[self.position]


class _Detach(nn.Cell):
    def __init__(self, position: int):
        super().__init__(auto_prefix=False)
        self.position = position

    def construct(self, values, inputs, masks):
        return ops.stop_gradient(values[self.position])


class _Output(nn.Cell):
    """One output of a model with several."""

    def __init__(self, position: int, index: int):
        super().__init__(auto_prefix=False)
        self.position, self.index = position, index

    def construct(self, values, inputs, masks):
        return values[self.position][self.index]


class _Call(nn.Cell):
    """A model's Cell called on the values at ``positions``, with the step's masks at
    ``mask_positions``. No prefix: the Parameters keep the PyTorch names their loop gave them."""

    def __init__(self, net: nn.Cell, positions: tuple[int, ...], mask_positions: tuple[int, ...]):
        super().__init__(auto_prefix=False)
        self.net, self.positions, self.mask_positions = net, positions, mask_positions
        self.masked = isinstance(net, _TakesMasks)

    def construct(self, values, inputs, masks):
        args = ()
        for position in self.positions:
            args = (*args, values[position])
        x = args[0] if len(args) == 1 else args
        if not self.masked:
            return self.net(x)
        call_masks = ()
        for position in self.mask_positions:
            call_masks = (*call_masks, masks[position])
        return self.net(x, call_masks)


class _RepeatedCall(_Call):
    """A call that repeats one an earlier phase of the step computed (the graph computes it again
    to see the path to the weights): its model's BatchNorm statistics, which that call updated
    already, are put back after it, so each call of the step counts once, whatever else the phase
    calls the model on."""

    def __init__(self, net: nn.Cell, positions: tuple[int, ...], mask_positions: tuple[int, ...], buffers: list):
        super().__init__(net, positions, mask_positions)
        self.buffers = ms.ParameterTuple(buffers)

    def construct(self, values, inputs, masks):
        saved = ()
        for buffer in self.buffers:
            saved = (*saved, buffer + 0)
        output = super().construct(values, inputs, masks)
        for buffer, kept in zip(self.buffers, saved):  # noqa: B905
            ops.assign(buffer, kept)
        return output


class _Operation(nn.Cell):
    """A CustomLoss operation: ``fn(*operands, *static)``."""

    def __init__(self, fn, positions: tuple[int, ...], static: tuple):
        super().__init__(auto_prefix=False)
        self.fn, self.positions, self.static = fn, positions, static

    def construct(self, values, inputs, masks):
        args = ()
        for position in self.positions:
            args = (*args, values[position])
        return self.fn(*args, *self.static)


class _PhaseLoss(nn.Cell):
    """A phase's nodes in evaluation order; its loss is the last one's value."""

    def __init__(self, nodes: list[nn.Cell]):
        super().__init__(auto_prefix=False)
        self.nodes = nn.CellList(nodes, auto_prefix=False)

    def construct(self, inputs, masks):
        values = ()
        for node in self.nodes:
            values = (*values, node(values, inputs, masks))
        return values[-1]


class Evaluator(PhaseEvaluator):
    def __init__(self, step, loops):
        super().__init__(step, loops)
        for name, loop in loops.items():  # one graph holds Parameters of several loops: their names must differ
            optimizer_buffers = [buffer for state in loop._opt_state for buffer in state.values()]
            for param in (*loop._params.values(), *loop._grads, *optimizer_buffers):
                param.name = f"{name}.{param.name}"
            loop.train()
        self.plan = self._plan()
        self._step = None  # built at the first step, when the masks' positions are known

    def _plan(self) -> list:
        """For each phase: its calls in evaluation order and those that run afresh (the others
        repeat a call of an earlier phase of the step, whose masks they reuse and whose
        BatchNorm statistics they leave as that call made them)."""
        computed: set = set()  # the nodes an earlier phase of the step computed, still valid
        plan = []
        for _, updated, order in self.phases:
            calls = [node for node in order if node[0] == "call"]
            plan.append((calls, {node for node in calls if node not in computed}))
            computed = {node for node in computed | set(order) if not self.calls[node] & set(updated)}
        return plan

    def _build(self, mask_positions: list[dict]):
        phases = []
        for (_, updated, order), (_, fresh), positions in zip(self.phases, self.plan, mask_positions, strict=True):
            updated = [self.loops[name] for name in updated]
            weights = [loop._params[name] for loop in updated for name in loop._grad_names]
            phases.append((
                ms.value_and_grad(self._phase_cell(order, fresh, positions), None, weights),
                [buffer for loop in updated for buffer in loop._grads],
                [loop._fn.update_in_graph for loop in updated],
            ))  # fmt: skip
        first = next(iter(self.loops.values()))
        step = _train_step(phases, first._allreduce if first.world_size > 1 else None)
        return ms.jit(step) if all(loop.compiled for loop in self.loops.values()) else step

    def _phase_cell(self, order, fresh: set, mask_positions: dict) -> _PhaseLoss:
        position = {node: index for index, node in enumerate(order)}
        inputs = {leaf: 1 + index for index, leaf in enumerate(self.step.noise)}
        cells = []
        for node in order:
            op, children, static = split(node)
            at = tuple(position[child] for child in children)
            if op in ("batch", "noise"):
                cells.append(_Input(0 if op == "batch" else inputs[node]))
            elif op == "detach":
                cells.append(_Detach(*at))
            elif op == "output":
                cells.append(_Output(*at, static["index"]))
            elif op == "call" and node in fresh:
                cells.append(_Call(self.loops[static["model"]]._net, at, mask_positions.get(node, ())))
            elif op == "call":
                loop = self.loops[static["model"]]
                cells.append(_RepeatedCall(loop._net, at, mask_positions.get(node, ()), loop._buffers))
            else:
                cells.append(_Operation(_EXPR_OPS[op], at, tuple(static.values())))
        return _PhaseLoss(cells)

    def _masks(self, x) -> tuple[list, list[dict]]:
        """Every dropout mask of the step, drawn before it runs from each model's loop stream in
        the order its calls run, and per phase each call's positions among them (a repeated
        call: those of the call it repeats)."""
        shapes, masks, drawn, positions = None, [], {}, []
        for calls, fresh in self.plan:
            for node in calls:
                if node in fresh and self.loops[node[1]]._has_dropout:
                    shapes = shapes or node_shapes(self.step, x.shape)
                    inputs = [shapes[argument] for argument in node[2:]]
                    new = _draw_masks(self.loops[node[1]], inputs[0] if len(inputs) == 1 else tuple(inputs))
                    drawn[node] = tuple(range(len(masks), len(masks) + len(new)))
                    masks.extend(new)
            positions.append({node: drawn[node] for node in calls if node in drawn})
        return masks, positions

    def run(self, x, noise, weights=None):
        inputs = ms.mutable((Tensor.from_numpy(x), *(Tensor.from_numpy(noise[leaf]) for leaf in self.step.noise)))
        masks, positions = self._masks(x)
        if self._step is None:
            self._step = self._build(positions)
        ahead = dict.fromkeys(self.loops, 0)
        tensors, flags = [], []
        for _, updated, _ in self.phases:
            for name in updated:
                t, first, lr, momentum = self.loops[name]._step_args(ahead[name])
                tensors.extend((t, lr, momentum))
                flags.append(first)
                ahead[name] += 1
        # mutable: tensors in a plain tuple would be constants of the graph, compiled again at every step
        # data parallel: each phase's share, by which its gradients are weighted in the sum over the ranks
        shares = () if weights is None else ms.mutable(tuple(Tensor(weight, ms.float32) for weight in weights))
        losses = self._step(inputs, ms.mutable(tuple(masks)) if masks else (), ms.mutable(tuple(tensors)),
                            tuple(flags), shares)  # fmt: skip
        for name, count in ahead.items():
            self.loops[name].step_count += count
            self.loops[name]._opt_ready |= count > 0
        return [float(value) for value in losses.asnumpy()]


def _train_step(phases, allreduce):
    """The whole step as one function of the inputs, the masks, the optimizers' step numbers,
    lrs and momenta (``tensors``, three per update), first-step flags and, data parallel, each
    phase's share (``shares``): per phase, the loss and its gradients (``value_and_grad``), summed
    over the ranks times the share by ``allreduce`` (None in one process), the gradients into their
    buffers and each updated loop's own update; returns the phases' losses stacked.
    (MindSpore's graph syntax has no ``zip(strict=)``.)"""

    def train_step(inputs, masks, tensors, flags, shares):
        losses = ()
        update = 0
        for index, (value_and_grad, grads, updates) in enumerate(phases):
            value, gradients = value_and_grad(inputs, masks)
            if allreduce is not None:  # before the update, which reads the buffers
                gradients = [allreduce(gradient * shares[index]) for gradient in gradients]
            for buffer, gradient in zip(grads, gradients):  # noqa: B905
                ops.assign(buffer, gradient)
            for update_in_graph in updates:
                update_in_graph(tensors[3 * update], flags[update], tensors[3 * update + 1], tensors[3 * update + 2])
                update += 1
            losses = (*losses, value)
        return ops.stack(losses)  # one output: several cost the whole graph time (see .mindspore)

    return train_step


def _draw_masks(loop, shapes) -> tuple:
    """Masks for one call of ``loop``'s model on inputs of ``shapes``, from the loop's own stream."""
    several = isinstance(shapes[0], tuple)
    samples = shapes[0][0] if several else shapes[0]
    sample_shape = tuple(shape[1:] for shape in shapes) if several else shapes[1:]
    _dropout_shapes(loop.model_spec, sample_shape, found := [])
    return tuple(Tensor.from_numpy(dropout_mask(loop._rng, (samples, *shape), p, np.float32)) for p, shape in found)
