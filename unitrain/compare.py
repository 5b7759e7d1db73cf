"""Frameworks side by side: one run repeated on several backends, from the same initial weights,
over the same batches in the same order, with the same hyperparameters, summarised in one report.

What differs between the rows is the framework alone: its kernels' float32 rounding, and its
speed. Each row gives the backend's test accuracy after every epoch, its final test loss and
samples/s, and how far its final weights and test-set predictions are from the first backend's.

Every run also records each step's loss and, every ``sample_every`` steps, each layer's largest
weight difference from the first backend's weights at the same step (:class:`StepRecorder`):
which layer departs first, and when. :mod:`unitrain.report` draws them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from . import registry
from .data import ArrayDataset
from .layers import Sequential
from .optim import Optimizer

#: weight snapshots the reference keeps for the divergence curves, at most (MLP: 2.7 MB each)
DIVERGENCE_SAMPLES = 50


def sample_interval(total_steps: int, samples: int = DIVERGENCE_SAMPLES) -> int:
    """Every how many steps to compare weights so that a run of ``total_steps`` takes at most
    ``samples`` snapshots (one state_dict copy each; the reference keeps them in memory)."""
    return max(1, math.ceil(total_steps / samples))


def layer_of(key: str) -> str:
    """The layer a state key belongs to: ``"3"`` for ``"3.weight"``, ``"2.0"`` for ``"2.0.bias"``."""
    return key.rpartition(".")[0]


def layer_differences(state: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Each layer's largest absolute difference over its floating tensors (weights, biases,
    BatchNorm statistics), in float64."""
    differences: dict[str, float] = {}
    for key, value in reference.items():
        if value.dtype.kind == "f":
            difference = float(np.abs(state[key].astype(np.float64) - value).max()) if value.size else 0.0
            differences[layer_of(key)] = max(differences.get(layer_of(key), 0.0), difference)
    return differences


class StepRecorder:
    """A fit extension: every step's loss, and every ``sample_every`` steps each layer's largest
    weight difference from ``reference`` (the first backend's snapshots by step; ``None`` on the
    first backend itself, which takes the snapshots).

    Losses are kept as the native scalars ``step`` returns and read at the epoch's end, after fit
    has read them for the epoch's mean: no host sync beyond the loop's own. The snapshots are one
    ``state_dict()`` copy (and, on an asynchronous framework, one sync) every ``sample_every`` steps."""

    def __init__(self, sample_every: int, reference: dict[int, dict[str, np.ndarray]] | None):
        self.every, self.reference = sample_every, reference
        self.losses: list[float] = []
        self.pending: list[Any] = []
        self.snapshots: dict[int, dict[str, np.ndarray]] = {}
        self.divergence: dict[str, Any] = {"every": sample_every, "steps": [], "layers": {}}

    def on_step_end(self, loop, index, loss):
        self.pending.append(loss)
        step = loop.step_count
        if step % self.every:
            return
        if self.reference is None:
            self.snapshots[step] = loop.state_dict()
        elif step in self.reference:
            self.divergence["steps"].append(step)
            for layer, value in layer_differences(loop.state_dict(), self.reference[step]).items():
                self.divergence["layers"].setdefault(layer, []).append(value)

    def on_epoch_end(self, loop, record):
        self.losses.extend(loop.to_float(loss) for loss in self.pending)
        self.pending.clear()


def compare_backends(
    backends: Sequence[str],
    model: Sequential,
    optimizer: Optimizer,
    train_data: ArrayDataset,
    test_data: ArrayDataset,
    *,
    seed: int = 0,
    initial_weights: dict[str, np.ndarray] | None = None,
    extensions: Callable[[str], Iterable[Any]] = lambda backend: (),
    sample_every: int | None = None,
    threads: int | None = None,
    **fit_options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` on each backend in turn, every one from ``initial_weights`` (default: the
    seed's :func:`~unitrain.weights.init_weights`), with :meth:`~unitrain.TrainingLoop.fit`'s
    ``fit_options`` (``epochs``, ``batch_size``, ``shuffle``, ``max_steps``) and the fit
    extensions ``extensions(backend)``.

    Returns one result per backend: ``backend``, ``version``, ``history`` (fit's records),
    ``steps``, ``step_losses`` (every step's loss), ``test_accuracy``, ``test_loss``,
    ``num_correct``, ``samples_per_sec`` (mean over the epochs) and, against the first backend
    (None for the first itself), ``max_weight_difference`` (the largest absolute difference of
    any weight), ``same_predictions`` (test samples given the same label) and ``divergence``:
    ``{"every": k, "steps": [...], "layers": {layer: [largest difference at each step]}}``,
    sampled every ``sample_every`` steps (default: :func:`sample_interval` of the run's steps).
    ``threads``: each backend's :meth:`~unitrain.TrainingLoop.set_threads` before it trains."""
    adapters = {name: registry.get_backend(name) for name in backends}  # all resolved before any training
    if sample_every is None:
        sample_every = sample_interval(planned_steps(train_data, **fit_options))
    results: list[dict[str, Any]] = []
    reference = None  # the first backend's final weights and test labels
    snapshots = None  # the first backend's weights every sample_every steps
    for name, adapter in adapters.items():
        if threads is not None:
            adapter.set_threads(threads)
        loop = adapter(model, optimizer=optimizer, seed=seed)
        if initial_weights is not None:
            loop.load_state_dict(initial_weights)
        recorder = StepRecorder(sample_every, snapshots)
        history = loop.fit(train_data, eval_data=test_data, extensions=[*extensions(name), recorder], **fit_options)
        metrics = loop.evaluate(test_data)
        speeds = [record["samples_per_sec"] for record in history if np.isfinite(record["samples_per_sec"])]
        weights, labels = loop.state_dict(), loop.predict(test_data.x).argmax(1)
        if reference is None:
            reference, snapshots = (weights, labels), recorder.snapshots
        differences = layer_differences(weights, reference[0])
        results.append({
            "backend": name,
            "version": registry.backend_specs()[name].version(),
            "history": history,
            "steps": loop.step_count,
            "step_losses": recorder.losses,
            "test_accuracy": metrics["accuracy"],
            "test_loss": metrics["loss"],
            "num_correct": metrics["num_correct"],
            "samples_per_sec": float(np.mean(speeds)) if speeds else None,
            "max_weight_difference": max(differences.values(), default=0.0) if results else None,
            "same_predictions": int((labels == reference[1]).sum()) if results else None,
            "divergence": recorder.divergence if results else None,
        })  # fmt: skip
    return results


def planned_steps(data: ArrayDataset, *, epochs: int = 1, batch_size: int = 64, max_steps: int | None = None,
                  **_: Any) -> int:  # fmt: skip
    """How many optimizer steps :meth:`~unitrain.TrainingLoop.fit` takes with these options."""
    steps = epochs * data.num_batches(batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def format_report(results: Sequence[dict[str, Any]], num_test: int) -> str:
    """The results as a table, one row per backend."""
    first = results[0]["backend"]
    header = ("backend", "version", "test accuracy by epoch", "test loss", "samples/s",
              f"max |Δw| vs {first}", f"same predictions as {first}")  # fmt: skip
    rows = [header]
    for result in results:
        accuracies = " ".join(f"{100 * record['test_accuracy']:.2f}%" for record in result["history"])
        rows.append((
            result["backend"],
            result["version"] or "-",
            accuracies or f"{100 * result['test_accuracy']:.2f}% (untrained)",
            f"{result['test_loss']:.4f}",
            "-" if result["samples_per_sec"] is None else f"{result['samples_per_sec']:,.0f}",
            "-" if result["max_weight_difference"] is None else f"{result['max_weight_difference']:.2g}",
            "-" if result["same_predictions"] is None else f"{result['same_predictions']:,}/{num_test:,}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip
