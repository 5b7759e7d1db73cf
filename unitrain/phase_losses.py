"""What a multi-model step's phase losses are made of: how each adds up over a batch's rows
(:func:`batch_weighting`, which data parallel needs) and the backward passes a hand-written PyTorch
loop makes of them (:func:`backward_passes`).

PyTorch frees a graph as it back-propagates through it, and a hand-written loop calls ``backward``
as soon as a loss term exists: the DCGAN tutorial's discriminator phase is

    errD_real = criterion(netD(real), label); errD_real.backward()
    errD_fake = criterion(netD(fake.detach()), label); errD_fake.backward()

so the activations ``netD(real)`` saved for its backward are freed before ``netD(fake)`` is computed.
Back-propagating ``errD_real + errD_fake`` once instead holds both graphs at the same time: the same
operations, but a larger peak of memory, which the C allocator gives back to the system and takes
again, page by page, at every step (docs/speed.md counts the page faults).

:func:`backward_passes` plans each phase's passes: a loss that is a sum of terms which share no
graph (each term's gradient reaches its own nodes only, ``detach`` cutting the rest) is one pass
per term, each right after its term is computed; any other loss is one pass. A pass keeps its graph
(``retain_graph``) only where a later pass goes back through a node it went through, and that node
is still the cached value then (no model it calls was updated in between). The gradients are the
sum of the terms' as one pass computes them: the same bits where each parameter gets at most two
contributions (addition of two numbers commutes); with more, they are summed term by term, as the
hand-written loop sums them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .expr import Node
from .steps import postorder, split


@dataclass(frozen=True)
class BackwardPass:
    """Back-propagate ``root`` (a phase's loss, or one of its terms); ``keep``: retain its graph."""

    root: Node
    keep: bool


def terms(loss: Node) -> list[Node]:
    """The terms of ``loss`` as a sum ``a + b + ...`` (itself alone if it is no sum)."""
    if loss[0] != "add":
        return [loss]
    _, (left, right), _ = split(loss)
    return terms(left) + terms(right)


def graph_nodes(root: Node, calls: Mapping[Node, frozenset[str]]) -> frozenset[Node]:
    """The nodes a backward pass from ``root`` goes through: those with a graph (that call a model),
    reached from it other than through ``detach``."""
    reached, pending = set(), [root]
    while pending:
        node = pending.pop()
        if node in reached or not calls[node]:
            continue
        reached.add(node)
        op, children, _ = split(node)
        if op != "detach":
            pending.extend(children)
    return frozenset(reached)


def backward_passes(phases: Sequence[tuple], calls: Mapping[Node, frozenset[str]]) -> list[list[BackwardPass]]:
    """Each phase's passes, in order. ``phases``: a :class:`~unitrain.steps.PhaseEvaluator`'s
    ``(phase, updated models, order)``; ``calls``: the models each node calls."""
    planned = []  # (phase index, root, the nodes its pass goes through)
    for index, (phase, _, _) in enumerate(phases):
        roots = terms(phase.loss)
        through = [graph_nodes(root, calls) for root in roots]
        separate = len(roots) > 1 and all(through) and sum(map(len, through)) == len(frozenset().union(*through))
        if not separate:
            roots, through = [phase.loss], [graph_nodes(phase.loss, calls)]
        planned.extend((index, root, nodes) for root, nodes in zip(roots, through, strict=True))
    passes: list[list[BackwardPass]] = [[] for _ in phases]
    for position, (index, root, nodes) in enumerate(planned):
        keep = False
        for later_index, _, later_nodes in planned[position + 1 :]:
            updated = frozenset().union(*(phases[between][1] for between in range(index, later_index)))
            keep = keep or any(not calls[node] & updated for node in nodes & later_nodes)
        passes[index].append(BackwardPass(root, keep))
    return passes


def batch_weighting(loss: Node) -> str:
    """How ``loss`` adds up over a batch's rows, which data parallel needs: ``"mean"`` (a
    combination of means over every element: the global loss is the ranks' losses weighted by
    their shares of the batch) or ``"sum"`` (of sums: the ranks' losses added). ValueError for a
    loss that is neither (a constant term, a mean beside a sum, a reduction over the batch inside
    another), which no split of the batch computes exactly."""
    op, children, static = split(loss)
    if op == "neg":
        return batch_weighting(children[0])
    if op in ("add", "sub"):
        kinds = {batch_weighting(child) for child in children}
        if len(kinds) == 1:
            return kinds.pop()
        raise ValueError("it adds a mean over the batch to a sum over it")
    if op in ("mul", "div"):
        constant = [_constant(child) for child in children]
        if op == "mul" and constant.count(True) == 1:
            return batch_weighting(children[constant.index(False)])
        if op == "div" and constant == [False, True]:
            return batch_weighting(children[0])
    if op in ("sum", "mean") and static["axis"] is None and _per_sample(children[0]):
        return op
    raise ValueError("it is not a sum or mean over the batch of per-sample terms (times constants)")


def _constant(node: Node) -> bool:
    return not any(part[0] in ("batch", "noise", "call") for part in postorder([node]))


def _per_sample(node: Node) -> bool:
    """Whether each row of ``node`` depends on its own batch row alone (no reduction over the batch axis)."""
    for part in postorder([node]):
        op, _, static = split(part)
        if op in ("sum", "mean", "softmax", "log_softmax") and static.get("axis") in (None, 0):
            return False
    return True
