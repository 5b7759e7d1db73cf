"""Frameworks side by side: one run repeated on several backends, from the same initial weights,
over the same batches in the same order, with the same hyperparameters, summarised in one report.

What differs between the rows is the framework alone: its kernels' float32 rounding, and its
speed. Each row gives the backend's test accuracy after every epoch, its final test loss and
samples/s, and how far its final weights and test-set predictions are from the first backend's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import registry
from .data import ArrayDataset
from .layers import Sequential
from .optim import Optimizer


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
    loop_options: Mapping[str, Any] | None = None,
    **fit_options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` on each backend in turn, every one from ``initial_weights`` (default: the
    seed's :func:`~unitrain.weights.init_weights`), with :meth:`~unitrain.TrainingLoop.fit`'s
    ``fit_options`` (``epochs``, ``batch_size``, ``shuffle``, ``max_steps``), the fit
    extensions ``extensions(backend)`` and the loops' further constructor arguments
    ``loop_options`` (``lr_schedule``, ``clip_grad_norm``, ``clip_grad_value``).

    Returns one result per backend: ``backend``, ``version``, ``history`` (fit's records),
    ``steps``, ``test_accuracy``, ``test_loss``, ``num_correct``, ``samples_per_sec`` (mean over
    the epochs) and, against the first backend (None for the first itself),
    ``max_weight_difference`` (the largest absolute difference of any weight) and
    ``same_predictions`` (test samples given the same label)."""
    adapters = {name: registry.get_backend(name) for name in backends}  # all resolved before any training
    results: list[dict[str, Any]] = []
    reference = None  # the first backend's final weights and test labels
    for name, adapter in adapters.items():
        loop = adapter(model, optimizer=optimizer, seed=seed, **(loop_options or {}))
        if initial_weights is not None:
            loop.load_state_dict(initial_weights)
        history = loop.fit(train_data, eval_data=test_data, extensions=extensions(name), **fit_options)
        metrics = loop.evaluate(test_data)
        speeds = [record["samples_per_sec"] for record in history if np.isfinite(record["samples_per_sec"])]
        weights, labels = loop.state_dict(), loop.predict(test_data.x).argmax(1)
        if reference is None:
            reference = weights, labels
        differences = [np.abs(weights[key].astype(np.float64) - value).max() for key, value in reference[0].items()]
        results.append({
            "backend": name,
            "version": registry.backend_specs()[name].version(),
            "history": history,
            "steps": loop.step_count,
            "test_accuracy": metrics["accuracy"],
            "test_loss": metrics["loss"],
            "num_correct": metrics["num_correct"],
            "samples_per_sec": float(np.mean(speeds)) if speeds else None,
            "max_weight_difference": float(max(differences)) if results else None,
            "same_predictions": int((labels == reference[1]).sum()) if results else None,
        })  # fmt: skip
    return results


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
