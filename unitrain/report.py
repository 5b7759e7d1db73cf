"""``unitrain compare --report DIR``: the comparison as a web page, ``DIR/index.html`` with PNG
figures beside it (no script, no external resource: the folder can be copied or mailed whole).

The page holds the run's settings, the table of :func:`unitrain.compare.format_report`, and the
figures of :mod:`unitrain.plot`: every step's loss on every backend, its difference from the
reference's on a log scale, test accuracy per epoch, each layer's weight divergence over the
steps with a sentence saying which layer departs first and when, and samples/s.

Files are published with :func:`unitrain.files.publish`: an existing file of the same name is
replaced only with ``overwrite``, and one that appears while the run trains is kept (the new file
goes beside it, and the page links to where it went).
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import files, plot
from .conformance.tolerances import tolerance
from .layers import Sequential


def layer_names(model: Sequential) -> dict[str, str]:
    """``{"1": "1 Linear 784→512", ...}`` for the layers that hold weights or statistics."""
    names = {}
    for name, layer in model.named_layers():
        shape = layer.param_shapes().get("weight")
        if shape is not None:  # (out, in, *kernel) or, for BatchNorm, (channels,)
            size = f"{shape[1]}→{shape[0]}" if len(shape) > 1 else str(shape[0])
            kernel = f" {'×'.join(map(str, shape[2:]))}" if len(shape) > 2 else ""
            names[name] = f"{name} {type(layer).__name__} {size}{kernel}"
    return names


def rounding_allowances(model: Sequential) -> dict[str, float]:
    """Per layer, how far one float32 step may move its weights by rounding alone: the conformance
    suite's tolerance for a dot product of fan-in terms, ``8 · eps(float32) · fan_in``
    (:func:`unitrain.conformance.tolerances.tolerance`). A layer further apart than that has
    departed: rounding differences fed back through many steps, not one step's rounding."""
    allowances = {}
    for name, layer in model.named_layers():
        shape = layer.param_shapes().get("weight")
        if shape is not None:
            allowances[name] = tolerance("float32", size=math.prod(shape[1:]))
    return allowances


#: a layer "departs" when its difference from the reference grows this many times between two
#: samples: rounding differences accumulate slowly, while a ReLU unit whose pre-activation ends on
#: the other side of zero on one backend changes that unit's update at once, by orders of magnitude
DEPARTURE_JUMP = 10.0


def first_departure(result: dict[str, Any], names: dict[str, str]) -> str:
    """In words: at which sampled step the weights first differ from the reference at all, which
    layer departs first (its difference jumps :data:`DEPARTURE_JUMP`-fold between two samples)
    and when the others do, and which differs most at the last sample."""
    label, divergence = result["label"], result.get("divergence")
    if not divergence or not divergence["steps"]:
        return f"{label}: no step was sampled."
    steps, layers = divergence["steps"], divergence["layers"]

    def name(layer: str) -> str:
        return names.get(layer, layer)

    differing = {
        layer: next((i for i, value in enumerate(values) if value > 0), None) for layer, values in layers.items()
    }
    differing = {layer: index for layer, index in differing.items() if index is not None}
    if not differing:
        return f"{label}: every layer equals the reference to the bit at every sampled step, to step {steps[-1]}."
    earliest = min(differing.values())
    largest = max((layer for layer, index in differing.items() if index == earliest),
                  key=lambda layer: layers[layer][earliest])  # fmt: skip
    text = f"{label}: the weights first differ at step {steps[earliest]} (largest in layer {name(largest)}: " \
           f"{layers[largest][earliest]:.2g})."  # fmt: skip
    departed = {layer: index for layer, values in layers.items() if (index := _jump(values)) is not None}
    order = sorted(departed, key=lambda layer: (departed[layer], -layers[layer][departed[layer]]))
    if order:
        first, *others = order
        text += (f" Layer {name(first)} departs first: at step {steps[departed[first]]} its difference jumps "
                 f"{DEPARTURE_JUMP:g}-fold or more, to {layers[first][departed[first]]:.2g}")  # fmt: skip
        text += "".join(f"; layer {name(layer)} at step {steps[departed[layer]]}" for layer in others)
        never = [name(layer) for layer in layers if layer not in departed]
        text += f"; {', '.join(never)} never." if never else "."
    else:
        text += f" No layer's difference jumps {DEPARTURE_JUMP:g}-fold between two samples."
    last = max(layers, key=lambda layer: layers[layer][-1])
    return text + f" At step {steps[-1]}, layer {name(last)} differs most ({layers[last][-1]:.2g})."


def _jump(values: Sequence[float]) -> int | None:
    """The first sample at which ``values`` exceed :data:`DEPARTURE_JUMP` times every earlier one."""
    peak = 0.0
    for index, value in enumerate(values):
        if peak > 0 and value > DEPARTURE_JUMP * peak:
            return index
        peak = max(peak, value)
    return None


def write_report(
    directory: Path,
    results: Sequence[dict[str, Any]],
    *,
    title: str,
    settings: dict[str, Any],
    table: str,
    model: Sequential,
    overwrite: bool,
) -> tuple[Path, list[tuple[Path, Path]]]:
    """Draw the figures and write ``directory/index.html``; returns the page's path and the
    ``(asked, written)`` paths of files that went beside an existing one of the same name."""
    results = [{**result, "label": result.get("label", result["backend"])} for result in results]
    names, allowances = layer_names(model), rounding_allowances(model)
    directory.mkdir(exist_ok=True)
    stepped = any(result["step_losses"] for result in results)
    sampled = any(result.get("divergence") and result["divergence"]["steps"] for result in results)
    figures = [  # (file, whether there is anything to draw, drawing, caption)
        ("loss.png", stepped, lambda: plot.loss_figure(results), "Training loss at every step, all backends overlaid."),
        ("loss-difference.png", stepped, lambda: plot.loss_difference_figure(results),
         f"How far each backend's loss is from {results[0]['label']}'s at the same step; steps where the two are "
         "equal to the bit have no logarithm and are not drawn."),
        ("accuracy.png", any(result["history"] for result in results), lambda: plot.accuracy_figure(results),
         "Test accuracy (10,000 images) after each epoch."),
        ("divergence.png", sampled, lambda: plot.divergence_figure(results, names, allowances),
         f"The largest weight difference in each layer from {results[0]['label']}'s weights at the same step, "
         f"at steps 1, 2, 4, ... and every {_sample_every(results)} steps. Dotted: one step's float32 rounding "
         "allowance per layer (8 · eps · fan-in); a layer above it has departed from the reference."),
        ("speed.png", bool(_speeds(results)), lambda: plot.speed_figure(_speeds(results)),
         "Training throughput (mean over the epochs)."),
    ]  # fmt: skip
    sidestepped: list[tuple[Path, Path]] = []
    drawn = []
    for name, anything, draw, caption in figures:
        if anything:
            figure = draw()
            path = _publish(directory / name, functools.partial(plot.save_figure, figure), overwrite, sidestepped)
            drawn.append((path, caption))
    departures = [first_departure(result, names) for result in results[1:]]
    page = _page(title, settings, table, drawn, departures)
    index = _publish(directory / "index.html", lambda staged: staged.write_text(page, encoding="utf-8"), overwrite,
                     sidestepped)  # fmt: skip
    return index, sidestepped


def _sample_every(results: Sequence[dict[str, Any]]) -> int | None:
    return next((result["divergence"]["every"] for result in results if result.get("divergence")), None)


def _speeds(results: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(result["label"], result["samples_per_sec"]) for result in results if result["samples_per_sec"]]


def _publish(path: Path, write, overwrite: bool, sidestepped: list) -> Path:
    final = files.publish(path, write, overwrite=overwrite)
    if final != path:
        sidestepped.append((path, final))
    return final


def _page(title, settings, table, figures, departures) -> str:
    escape = html.escape
    rows = "".join(
        f"<tr><th>{escape(str(key))}</th><td>{escape(str(value))}</td></tr>" for key, value in settings.items()
    )
    figure_html = "".join(
        f'<figure><img src="{escape(path.name)}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption>'
        "</figure>"
        for path, caption in figures
    )
    departure_items = "".join(f"<li>{escape(line)}</li>" for line in departures)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 0.15em 0.8em 0.15em 0; }}
pre {{ background: #f4f4f4; padding: 0.8em; overflow-x: auto; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; }}
</style>
</head>
<body>
<h1>{escape(title)}</h1>
<table>{rows}</table>
<h2>Results</h2>
<pre>{escape(table)}</pre>
<h2>Which layer departs first</h2>
<ul>{departure_items}</ul>
<h2>Figures</h2>
{figure_html or "<p>No training step was taken: nothing to draw.</p>"}
</body>
</html>
"""
