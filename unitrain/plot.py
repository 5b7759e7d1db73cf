"""Figures of training runs: files drawn by matplotlib's headless renderers (PNG, or the format a
path's suffix names).

matplotlib is an optional dependency (``pip install 'unitrain[report]'``), imported only when a
figure is drawn. Figures are ``matplotlib.figure.Figure`` objects, never pyplot's global state,
so nothing here opens a window or depends on the user's matplotlib backend.

:func:`curves_figure` draws per-epoch records (``train --metrics`` files, ``fit``'s history) of
one or several runs; the others draw what :func:`unitrain.compare.compare_backends` returns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .reading import path_problem

#: a metrics file holds one record per epoch: anything longer than this per line is not one
MAX_LINE_BYTES = 64 * 1024
#: and no training run has this many epochs
MAX_RECORDS = 100_000


class PlotError(ValueError):
    """A metrics file that cannot be plotted, or matplotlib missing."""


def require_matplotlib(what: str) -> None:
    """Fail before a run, not after it, when matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise PlotError(f"{what} needs matplotlib: pip install 'unitrain[report]'")


def check_figure_path(flag: str, path: str | Path) -> None:
    """Before a run: ``path``'s suffix names a format matplotlib writes (see :func:`save_figure`)."""
    path = Path(path)
    if (suffix := path.suffix.lower().removeprefix(".")) not in _formats():
        named = f"names the format {suffix!r}" if suffix else "has no suffix naming a figure format"
        raise PlotError(f"{flag} {path} {named}; expected one of .{', .'.join(_formats())}")


def _formats() -> list[str]:
    """The suffixes of the figure formats matplotlib writes, but PGF (LaTeX code that needs LaTeX)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return [name for name in FigureCanvasBase.get_supported_filetypes() if name != "pgf"]


def _figure(rows: int = 1, columns: int = 1, width: float = 6.4, height: float = 4.0, **subplots: Any):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False, **subplots)


def save_figure(figure, path: Path, suffix: str = ".png") -> None:
    """Write ``figure`` to ``path`` in the format ``suffix`` names (``files.publish`` stages a
    ``.part`` file, so the format cannot come from ``path``)."""
    figure.savefig(path, format=suffix.lower().removeprefix("."), dpi=100)


# --- per-epoch curves: unitrain plot, train --plot ------------------------------------------

_EPOCH_PANELS = (("train_loss", "train loss (mean over the epoch)"), ("test_loss", "test loss"),
                 ("test_accuracy", "test accuracy (%)"))  # fmt: skip


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``--metrics`` JSON Lines file, each checked: ``epoch`` a positive integer,
    the plotted fields numbers (or absent). Reads at most :data:`MAX_RECORDS` lines of
    :data:`MAX_LINE_BYTES` each, whatever the file."""
    if problem := path_problem(path, "a metrics file (JSON Lines)"):
        raise PlotError(f"{path} {problem}")
    records = []
    with open(path, "rb") as file:
        for number in range(1, MAX_RECORDS + 2):
            line = file.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            if number > MAX_RECORDS or len(line) > MAX_LINE_BYTES:
                what = f"more than {MAX_RECORDS:,} lines" if number > MAX_RECORDS else f"over {MAX_LINE_BYTES:,} bytes"
                raise PlotError(f"{path}: line {number} is {what}; expected one JSON object per epoch")
            if line.strip():
                records.append(_record(path, number, line))
    if not records:
        raise PlotError(f"{path} holds no records; expected one JSON object per epoch (train --metrics)")
    return records


def _record(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise PlotError(f"{path}: line {number} is not JSON; expected one object per epoch (train --metrics)") from None
    if not isinstance(record, dict):
        raise PlotError(f"{path}: line {number} is a JSON {type(record).__name__}, expected an object")
    epoch = record.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise PlotError(f"{path}: line {number}: 'epoch' is {str(epoch)[:40]}, expected an integer >= 1")
    for key, _ in _EPOCH_PANELS:
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PlotError(f"{path}: line {number}: {key!r} is {str(value)[:40]!r}, expected a number")
    return record


def curves_figure(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]):
    """Train loss, test loss and test accuracy by epoch, one line per ``(label, records)`` run."""
    figure, axes = _figure(1, 3, width=4.6, height=3.6)
    for (key, title), ax in zip(_EPOCH_PANELS, axes[0], strict=True):
        for label, records in runs:
            points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                epochs, values = np.array(points, np.float64).T
                ax.plot(epochs, 100 * values if key == "test_accuracy" else values, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        _epoch_ticks(ax, [r["epoch"] for _, records in runs for r in records])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    return figure


# --- unitrain compare --report ------------------------------------------------------------

_STYLES = ("-", "--", "-.", ":")


def _style(index: int) -> dict[str, Any]:
    """The reference thick and solid, the others thinner with their own dashes (and smaller
    markers), so that curves lying on top of each other all stay visible."""
    return {"linestyle": _STYLES[index % len(_STYLES)], "linewidth": 2.2 if index == 0 else 1.2,
            "markersize": 8 if index == 0 else 5}  # fmt: skip


def _epoch_ticks(ax, epochs) -> None:
    """Whole epochs on the x axis, however few."""
    epochs = sorted(set(epochs))
    if len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def loss_figure(results: Sequence[dict[str, Any]]):
    """Every step's training loss, backends overlaid."""
    figure, axes = _figure(width=8.0, height=4.2)
    ax = axes[0][0]
    for index, result in enumerate(results):
        losses = result["step_losses"]
        ax.plot(np.arange(1, len(losses) + 1), losses, label=result["label"], **_style(index))
    ax.set_title("training loss at every step (before the step's update)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def loss_difference_figure(results: Sequence[dict[str, Any]]):
    """|loss − reference loss| at every step, log scale; steps where they are equal to the bit
    (a zero has no logarithm) are left out."""
    figure, axes = _figure(width=9.0, height=4.6)
    ax = axes[0][0]
    reference = np.asarray(results[0]["step_losses"], np.float64)
    size = 4 if len(reference) <= 300 else 1.5  # thousands of points: small enough not to bury each other
    for index, result in enumerate(results[1:], start=1):
        losses = np.asarray(result["step_losses"], np.float64)
        steps = min(len(losses), len(reference))
        difference = np.abs(losses[:steps] - reference[:steps])
        equal = int((difference == 0).sum())
        difference[difference == 0] = np.nan
        # points, not lines: the steps equal to the bit leave gaps that a line would hide; a native
        # loop's hollow and larger, so that it stays visible where it equals its backend's
        hollow = {"markerfacecolor": "none", "markersize": 2 * size} if result.get("native") else {"markersize": size}
        ax.plot(np.arange(1, steps + 1), difference, marker="o", linestyle="none", color=f"C{index}", **hollow,
                label=f"{result['label']} ({equal:,}/{steps:,} steps bit-equal)")  # fmt: skip
    ax.set_yscale("log")
    ax.set_title(f"|loss − {results[0]['label']}'s loss| at every step (log scale)")
    ax.set_xlabel("step")
    ax.set_ylabel("absolute difference")
    ax.grid(alpha=0.3, which="both")
    figure.legend(
        loc="outside lower center",
        ncols=min(3, len(results) - 1) if len(results) <= 4 else 2,
        fontsize="small",
        markerscale=6 / size,
    )
    return figure


def accuracy_figure(results: Sequence[dict[str, Any]]):
    """Test accuracy after each epoch."""
    figure, axes = _figure(width=6.4, height=4.0)
    ax = axes[0][0]
    for index, result in enumerate(results):
        epochs = [record["epoch"] for record in result["history"]]
        accuracy = [100 * record["test_accuracy"] for record in result["history"]]
        ax.plot(epochs, accuracy, marker="o", label=result["label"], **_style(index))
    ax.set_title("test accuracy after each epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    _epoch_ticks(ax, [record["epoch"] for result in results for record in result["history"]])
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def divergence_figure(results: Sequence[dict[str, Any]], layer_names: dict[str, str], allowances: dict[str, float]):
    """Each layer's largest weight difference from the reference over the steps, one panel per
    backend, log scale; ``allowances`` (per layer) are drawn as dotted lines of the layer's colour."""
    others = [result for result in results[1:] if result["divergence"] and result["divergence"]["steps"]]
    columns = min(3, max(1, len(others)))
    figure, axes = _figure(math.ceil(max(1, len(others)) / columns), columns, width=4.6, height=3.6, sharey=True)
    for ax in axes.flat[len(others) :]:
        ax.set_visible(False)
    for ax, result in zip(axes.flat, others, strict=False):
        divergence = result["divergence"]
        for index, (layer, values) in enumerate(divergence["layers"].items()):
            values = np.asarray(values, np.float64)
            values[values == 0] = np.nan
            ax.plot(divergence["steps"], values, marker=".", color=f"C{index}", label=layer_names.get(layer, layer))
            if layer in allowances:
                ax.axhline(allowances[layer], color=f"C{index}", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{result['label']} vs {results[0]['label']}")
        ax.set_xlabel(f"step (1, 2, 4, ... then every {divergence['every']})")
        ax.grid(alpha=0.3, which="both")
    for row in axes:
        row[0].set_ylabel("max |Δw| in the layer (log scale)")
    axes[0][0].legend(fontsize="small")
    return figure


def speed_figure(rows: Sequence[tuple[str, float]]):
    """Training samples/s, one bar per ``(label, samples/s)``."""
    figure, axes = _figure(width=6.4, height=0.9 + 0.45 * len(rows))
    ax = axes[0][0]
    labels, speeds = [label for label, _ in rows][::-1], [speed for _, speed in rows][::-1]
    bars = ax.barh(labels, speeds, color="tab:blue")
    ax.bar_label(bars, labels=[f"{speed:,.0f}" for speed in speeds], padding=3)
    ax.set_xlim(0, max(speeds, default=1) * 1.2)
    ax.set_xlabel("training samples per second (higher is faster)")
    ax.grid(alpha=0.3, axis="x")
    return figure


# --- pictures a model draws: the generative examples' --plot ---------------------------------


def save_image_grids(path: str | Path, panels: Sequence[tuple[str, Any]], columns: int = 8) -> None:
    """Write one grid per ``(title, images)`` panel, side by side, to ``path`` (its suffix names the
    format): grayscale images ``(N, 1, H, W)`` with values in [0, 1], ``columns`` to a row."""
    path = Path(path)
    save_figure(image_grid_figure(panels, columns), path, path.suffix)


def image_grid_figure(panels: Sequence[tuple[str, Any]], columns: int = 8):
    """The figure of :func:`save_image_grids`."""
    figure, axes = _figure(1, len(panels), width=4.0, height=4.4)
    for ax, (title, images) in zip(axes[0], panels, strict=True):
        images = np.clip(np.asarray(images, np.float64), 0, 1)
        height, width = images.shape[-2:]
        rows = -(-len(images) // columns)
        grid = np.ones((rows * (height + 2) + 2, columns * (width + 2) + 2))
        for index, image in enumerate(images):
            row, column = divmod(index, columns)
            top, left = 2 + row * (height + 2), 2 + column * (width + 2)
            grid[top : top + height, left : left + width] = image.reshape(height, width)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    return figure


def save_step_losses(path: str | Path, histories: Mapping[str, Sequence[Mapping[str, float]]]) -> None:
    """Write :func:`step_losses_figure` to ``path`` (its suffix names the format)."""
    path = Path(path)
    save_figure(step_losses_figure(histories), path, path.suffix)


def step_losses_figure(histories: Mapping[str, Sequence[Mapping[str, float]]]):
    """A multi-model step's losses at every step on several backends (``{backend: [{phase: loss}]}``):
    one panel per loss, one curve per backend, the first thick and the others dashed over it."""
    phases = list(next(iter(histories.values()))[-1])
    figure, axes = _figure(1, len(phases), width=5.0, height=3.8)
    for ax, phase in zip(axes[0], phases, strict=True):
        for index, (backend, history) in enumerate(histories.items()):
            ax.plot(np.arange(1, len(history) + 1), [losses[phase] for losses in history], label=backend,
                    **_style(index))  # fmt: skip
        ax.set_title(f"{phase} loss at every step")
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure
