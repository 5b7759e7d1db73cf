"""One model of a multi-model run on the test set: ``unitrain evaluate --recipe RECIPE --weights
DIR --model NAME`` and :func:`evaluate_model`.

A GAN's or a VAE's models have no accuracy of their own; what a user asks of one is what its
recipe trains it on. The report of model ``NAME``, over the test set with every model in eval mode
and noise from the recipe's seed (as ``evaluate`` without ``--model``), holds:

- the test loss of each phase whose optimizer updates ``NAME`` (the generator's
  ``bce(discriminator(fake), 1.0)``; a VAE's encoder and decoder share the one loss);
- each of ``NAME``'s outputs that those losses use, read from their text (``detach`` left out:
  it changes no value): its mean and standard deviation over every element, as the DCGAN
  tutorial prints ``D(x)`` and ``D(G(z))``; a VAE encoder's ``mu`` and ``logvar``;
- each ``bce(output, target)`` of those losses on such an output: its value (a decoder's
  reconstruction loss, ``bce(decoder(...), batch, reduction='sum')``), and where the target is the
  label 0 or 1, the accuracy: the share of elements on the label's side of 0.5 (``p > 0.5`` reads
  as 1) — the discriminator's accuracy on real and on generated images.

A loss or ``bce`` that is a mean over the batch is averaged over the test set, one that is a sum
over it is given per test sample, as :func:`unitrain.multi_run.test_losses`. Only the models these
expressions call need weights.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import expr, steps
from .multi_recipe import MultiRun, _output_count, _Reader
from .multi_run import batch_share, forward_all


@dataclass
class ModelReport:
    """What :func:`evaluate_model` found (the module's doc)."""

    model: str
    samples: int
    #: each phase whose optimizer updates the model: its test loss
    losses: dict[str, float] = field(default_factory=dict)
    #: each output's text: ``mean``, ``std``, and per ``bce`` target ``bce <target>`` and, for a 0/1
    #: label, ``accuracy <label>``
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        shown = [f"test {phase} loss {value:.4f}" for phase, value in self.losses.items()]
        for text, figures in self.outputs.items():
            parts = []
            for key, value in figures.items():
                if key.startswith("accuracy"):
                    parts.append(f"{key} {100 * value:.2f}%")
                else:
                    parts.append(f"{key} {value:.4f}")
            shown.append(f"{text}: {'  '.join(parts)}")
        return shown


class _Recorder(_Reader):
    """Reads the recipe's expressions as :meth:`MultiRun.build` does, noting the nodes of one
    model's outputs and of the ``bce`` terms on them, with their text."""

    def __init__(self, outputs: Mapping[str, int], model: str):
        super().__init__(outputs, {})
        self.model = model
        #: output text -> its node
        self.found: dict[str, expr.Expr] = {}
        #: (output text, target text, 0/1 label or None, the bce's node)
        self.terms: list[tuple[str, str, float | None, expr.Expr]] = []

    def _node(self, node, where):
        value = super()._node(node, where)
        if self._is_output(node):
            self.found.setdefault(_text(node), value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "bce" and node.args:
            output = _without_detach(node.args[0])
            if self._is_output(output) and len(node.args) > 1:
                target = node.args[1]
                label = target.value if isinstance(target, ast.Constant) and target.value in (0, 1) else None
                self.terms.append((_text(output), _text(target), label, value))
        return value

    def _is_output(self, node) -> bool:
        call = node.value if isinstance(node, ast.Subscript) else node
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == self.model):
            return False
        return isinstance(node, ast.Subscript) or self.outputs[self.model] == 1


def _without_detach(node):
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "detach" and node.args:
        node = node.args[0]
    return node


class _Undetached(ast.NodeTransformer):
    def visit_Call(self, node):
        self.generic_visit(node)
        return _without_detach(node)


def _text(node) -> str:
    return ast.unparse(_Undetached().visit(ast.parse(ast.unparse(node), mode="eval")).body)


def report_expressions(run: MultiRun, model: str):
    """``(phases, outputs, terms)``: the losses of the phases whose optimizer updates ``model``
    (name -> node), its outputs those losses use (text -> node) and the ``bce`` terms on them,
    read from the recipe in :meth:`MultiRun.build`'s order, so that the noise is drawn as there."""
    specs = run.model_specs()
    recorder = _Recorder({name: _output_count(spec) for name, spec in specs.items()}, model)
    losses = run.read_losses(recorder)
    owner = {member: name for name, options in run.optimizers.items() for member in options["models"]}.get(model)
    mine = {phase["name"]: loss for phase, loss in zip(run.phases, losses, strict=True)
            if owner is not None and phase.get("optimizer") == owner}  # fmt: skip
    under = set(steps.postorder([loss.node for loss in mine.values()]))
    outputs = {text: node for text, node in recorder.found.items() if node.node in under}
    terms = list({term[:2]: term for term in recorder.terms if term[3].node in under}.values())
    return mine, outputs, terms


def evaluate_model(run: MultiRun, loops: Mapping[str, Any], test, model: str, batch_size: int = 1000) -> ModelReport:
    """Model ``model`` of ``run`` over ``test`` with the weights ``loops`` hold (the module's doc);
    ``loops``: a loop per model the report calls (:func:`models_called`)."""
    phases, outputs, terms = report_expressions(run, model)
    roots = [*phases.values(), *outputs.values(), *(term[3] for term in terms)]
    leaves = steps.noise_leaves(root.node for root in roots)
    stream = steps.NoiseStream(run.seed)
    report = ModelReport(model, len(test))
    sums = {}  # figure -> running sum over the test set

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + float(value)

    for start in range(0, len(test), batch_size):
        x = test.x[start : start + batch_size]
        values = forward_all(roots, loops, x, stream.draw(leaves, len(x), np.float32))
        for name, loss in phases.items():
            add(("loss", name), values[loss.node] * batch_share(loss.node, len(x)))
        for text, node in outputs.items():
            value = np.asarray(values[node.node], np.float64)
            add((text, "count"), value.size)
            add((text, "sum"), value.sum())
            add((text, "squares"), np.square(value).sum())
        for text, target, label, node in terms:
            add((text, f"bce against {target}"), values[node.node] * batch_share(node.node, len(x)))
            if label is not None:
                probabilities = np.asarray(values[outputs[text].node])
                add((text, f"accuracy as {target}"), ((probabilities > 0.5) == bool(label)).sum())
    report.losses = {name: sums[("loss", name)] / len(test) for name in phases}
    for text in outputs:
        count = sums[(text, "count")]
        mean = sums[(text, "sum")] / count
        figures = {"mean": mean, "std": float(np.sqrt(max(sums[(text, "squares")] / count - mean**2, 0.0)))}
        for key in [key for owner, key in sums if owner == text and key.startswith(("bce", "accuracy"))]:
            figures[key] = sums[(text, key)] / (count if key.startswith("accuracy") else len(test))
        report.outputs[text] = figures
    return report


def models_called(run: MultiRun, model: str) -> list[str]:
    """The models whose weights :func:`evaluate_model` of ``model`` needs, in the recipe's order."""
    phases, outputs, terms = report_expressions(run, model)
    roots = [*phases.values(), *outputs.values(), *(term[3] for term in terms)]
    called = {node[1] for node in steps.postorder(root.node for root in roots) if node[0] == "call"}
    return [name for name in run.models if name in called or name == model]
