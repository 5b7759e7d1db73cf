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
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from . import native as native_models
from . import registry
from .data import ArrayDataset
from .run import Run
from .weights import init_weights

#: weight snapshots the reference keeps for the divergence curves, at most (MLP: 2.7 MB each)
DIVERGENCE_SAMPLES = 50


def sampled(step: int, every: int) -> bool:
    """Whether the weights are compared at ``step``: every ``every`` steps, and at the powers of two
    before the first of those (1, 2, 4, ...), when the early steps would otherwise go unseen."""
    return step % every == 0 or (step < every and step & (step - 1) == 0)


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
    """A fit extension: every step's loss, and at the :func:`sampled` steps each layer's largest
    weight difference from ``reference`` (the first backend's snapshots by step; ``None`` on the
    first backend itself, which takes the snapshots).

    Losses are kept as the native scalars ``step`` returns and read at the epoch's end, after fit
    has read them for the epoch's mean: no host sync beyond the loop's own. The snapshots are one
    ``state_dict()`` copy (and, on an asynchronous framework, one sync) per sampled step."""

    def __init__(self, sample_every: int, reference: dict[int, dict[str, np.ndarray]] | None):
        self.every, self.reference = sample_every, reference
        self.losses: list[float] = []
        self.pending: list[Any] = []
        self.snapshots: dict[int, dict[str, np.ndarray]] = {}
        self.divergence: dict[str, Any] = {"every": sample_every, "steps": [], "layers": {}}

    def on_step_end(self, loop, index, loss):
        self.pending.append(loss)
        step = loop.step_count
        if not sampled(step, self.every):
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
    run: Run,
    *,
    data: tuple[ArrayDataset, ArrayDataset | None, ArrayDataset] | None = None,
    extensions: Callable[[str], Iterable[Any]] = lambda backend: (),
    sample_every: int | None = None,
    threads: int | None = None,
    native: bool = False,
) -> list[dict[str, Any]]:
    """Train ``run`` on each backend in turn, every one from the run's initial weights (its
    ``init_weights``, or the seed's :func:`~unitrain.weights.init_weights`) over ``data`` (the
    run's :meth:`~unitrain.run.Run.datasets`, loaded if not given), with the fit extensions
    ``extensions(backend)``.

    Returns one result per backend: ``backend``, ``version``, ``history`` (fit's records),
    ``steps``, ``step_losses`` (every step's loss), ``test_accuracy``, ``test_loss``,
    ``num_correct``, ``samples_per_sec`` (mean over the epochs) and, against the first backend
    (None for the first itself), ``max_weight_difference`` (the largest absolute difference of
    any weight), ``same_predictions`` (test samples given the same label) and ``divergence``:
    ``{"every": k, "steps": [...], "layers": {layer: [largest difference at each step]}}``,
    at the :func:`sampled` steps of ``sample_every`` (default: :func:`sample_interval` of the run).
    ``threads``: each backend's :meth:`~unitrain.TrainingLoop.set_threads` before it trains.

    ``native``: after each backend whose framework has one, its hand-written tutorial loop
    (:mod:`unitrain.native`; preset models, the framework's own SGD, momentum SGD or Adam where it
    computes the run's equations: :func:`~unitrain.native.native_frameworks`) trains too, from the same weights
    over the same batches, in a result of its own with ``native`` True and ``label``
    ``"<backend> (native loop)"``; its test metrics are those of its weights loaded into the
    backend's unitrain loop."""
    train_data, val_data, test_data = run.datasets() if data is None else data
    model, initial_weights = run.model_spec(), run.initial_weights()
    fit_options = {**run.fit_options(), "val_data": val_data}
    adapters = {name: registry.get_backend(name) for name in backends}  # all resolved before any training
    model_name = native_models.check_run(run) if native else None
    if sample_every is None:
        sample_every = sample_interval(planned_steps(train_data, **run.fit_options()))
    results: list[dict[str, Any]] = []
    reference = None  # the first backend's final weights and test labels
    snapshots = None  # the first backend's weights every sample_every steps
    for name, adapter in adapters.items():
        if threads is not None:
            adapter.set_threads(threads)
        loop = run.compiled(adapter(model, **run.loop_options()))
        if initial_weights is not None:
            loop.load_state_dict(initial_weights)
        recorder = StepRecorder(sample_every, snapshots)
        history = loop.fit(train_data, eval_data=test_data, extensions=[*extensions(name), recorder], **fit_options)
        metrics = loop.evaluate(test_data)
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
            "samples_per_sec": _mean_speed(history),
            "max_weight_difference": max(differences.values(), default=0.0) if results else None,
            "same_predictions": int((labels == reference[1]).sum()) if results else None,
            "divergence": recorder.divergence if results else None,
        })  # fmt: skip
        if model_name is not None and name in native_models.native_frameworks(run.optimizer):
            start = initial_weights if initial_weights is not None else init_weights(model, run.seed)
            recorder = StepRecorder(sample_every, snapshots)
            native_loop = native_models.native_loop(name, model_name, start, run.optimizer)
            native_options = {key: fit_options[key] for key in ("epochs", "batch_size", "shuffle", "max_steps",
                                                                 "val_data")}  # fmt: skip
            history = _train_native(native_loop, loop, recorder, train_data, test_data, seed=run.seed,
                                    **native_options)  # fmt: skip
            loop.load_state_dict(native_loop.state_dict())
            metrics, labels = loop.evaluate(test_data), loop.predict(test_data.x).argmax(1)
            differences = layer_differences(native_loop.state_dict(), reference[0])
            results.append({
                **results[-1],
                "label": f"{name} (native loop)",
                "native": True,
                "history": history,
                "steps": native_loop.step_count,
                "step_losses": recorder.losses,
                "test_accuracy": metrics["accuracy"],
                "test_loss": metrics["loss"],
                "num_correct": metrics["num_correct"],
                "samples_per_sec": _mean_speed(history),
                "max_weight_difference": max(differences.values(), default=0.0),
                "same_predictions": int((labels == reference[1]).sum()),
                "divergence": recorder.divergence,
            })  # fmt: skip
    return results


def _mean_speed(history: list[dict[str, float]]) -> float | None:
    speeds = [record["samples_per_sec"] for record in history if np.isfinite(record["samples_per_sec"])]
    return float(np.mean(speeds)) if speeds else None


def _train_native(native_loop, evaluator, recorder, train_data, test_data, *, seed, epochs=1, batch_size=64,
                  shuffle=True, max_steps=None, val_data=None) -> list[dict[str, float]]:  # fmt: skip
    """:meth:`~unitrain.TrainingLoop.fit`'s epochs, batches and records for a native loop; the test
    metrics are its weights' in ``evaluator`` (a unitrain loop of the same framework)."""
    history = []
    for epoch in range(epochs):
        if max_steps is not None and native_loop.step_count >= max_steps:
            break
        losses, seen, started = [], 0, time.perf_counter()
        for index, (x, y) in enumerate(train_data.batches(batch_size, shuffle=shuffle, seed=seed, epoch=epoch)):
            if max_steps is not None and native_loop.step_count >= max_steps:
                break
            losses.append(native_loop.step(x, y))
            seen += len(x)
            recorder.on_step_end(native_loop, index, losses[-1])
        elapsed = time.perf_counter() - started
        evaluator.load_state_dict(native_loop.state_dict())
        metrics = evaluator.evaluate(test_data)
        record = {
            "epoch": epoch + 1,
            "steps": native_loop.step_count,
            "train_loss": float(np.mean([native_loop.to_float(loss) for loss in losses])) if losses else float("nan"),
            "samples_per_sec": seen / elapsed if elapsed > 0 else float("nan"),
            "test_loss": metrics["loss"],
            "test_accuracy": metrics["accuracy"],
        }
        if val_data is not None:  # as fit's records: the validation split's metrics
            metrics = evaluator.evaluate(val_data)
            record.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
        recorder.on_epoch_end(native_loop, record)
        history.append(record)
    return history


def planned_steps(data: ArrayDataset, *, epochs: int = 1, batch_size: int = 64, max_steps: int | None = None,
                  accumulate_grad_batches: int = 1, drop_last: bool = False, **_: Any) -> int:  # fmt: skip
    """How many optimizer steps :meth:`~unitrain.TrainingLoop.fit` takes with these options."""
    steps = epochs * -(-data.num_batches(batch_size, drop_last) // accumulate_grad_batches)
    return steps if max_steps is None else min(steps, max_steps)


def format_report(results: Sequence[dict[str, Any]], num_test: int) -> str:
    """The results as a table, one row per backend."""
    first = results[0]["backend"]
    # value targets (regression, reconstruction) have no accuracy: their test MSE by epoch instead
    errors = all("test_mse" in record for result in results for record in result["history"]) and any(
        result["history"] for result in results
    )
    header = ("backend", "version", f"test {'mse' if errors else 'accuracy'} by epoch", "test loss", "samples/s",
              f"max |Δw| vs {first}", f"same predictions as {first}")  # fmt: skip
    rows = [header]
    for result in results:
        accuracies = " ".join(f"{record['test_mse']:.4g}" if errors else f"{100 * record['test_accuracy']:.2f}%"
                              for record in result["history"])  # fmt: skip
        rows.append((
            result.get("label", result["backend"]),
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
