"""One multi-model step on several backends side by side: the ``--compare`` option of scripts such
as ``examples/dcgan.py``. Each backend trains from the same initial weights, batches and noise (the
script draws them from its seed; the step's noise comes from the loop's seeded stream); then one
line per loss per backend gives its final value and its largest distance from the first backend's
loss over the steps, and ``--plot FILE`` draws one curve per backend in one panel per loss.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence

#: each backend's losses at every step: ``{backend: [{phase: loss}, ...]}``
Histories = Mapping[str, Sequence[Mapping[str, float]]]


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare", nargs="?", const="", metavar="B,B,...",
                        help="train on each of these backends (default: every installed one that runs several "
                             "models in one step) from the same weights and noise, and compare their losses; "
                             "--plot FILE then draws the loss curves")  # fmt: skip


def backends_to_compare(args: argparse.Namespace) -> list[str]:
    """The backends ``--compare`` names, or every installed one with the 'multi-model' capability;
    a name that is unknown, not installed or not capable, or a checkpoint or --save-weights option
    beside it, is refused (ValueError, one line)."""
    from .registry import backend_specs, get_backend, usable_spec

    if getattr(args, "checkpoint_dir", None) is not None or getattr(args, "resume", False):
        raise ValueError("--compare runs every backend from the start: it takes no --checkpoint-dir or --resume")
    if getattr(args, "save_weights", None) is not None:
        raise ValueError("--compare saves no weights: train one --backend with --save-weights DIR")
    if args.compare:
        names = [name.strip() for name in args.compare.split(",")]
        for name in names:
            usable_spec(name)  # an unknown or missing backend: BackendError, a ValueError
            if "multi-model" not in get_backend(name).capabilities:
                raise ValueError(f"--compare: the {name} backend cannot run several models in one step")
        if len(set(names)) != len(names):
            raise ValueError(f"--compare: a backend named twice in {args.compare!r}")
        return names
    installed = [name for name, spec in backend_specs().items() if spec.installed()]
    return [name for name in installed if "multi-model" in get_backend(name).capabilities]


def compare(train: Callable[[str], Sequence[Mapping[str, float]]], backends: Sequence[str], plot_path=None) -> dict:
    """Run ``train(backend)`` (the losses of every step) on each backend, print
    :func:`comparison_lines`, draw the curves to ``plot_path`` if given; returns the histories."""
    histories = {backend: list(train(backend)) for backend in backends}
    print("\n".join(comparison_lines(histories)))
    if plot_path is not None:
        from . import plot

        plot.save_step_losses(plot_path, histories)
    return histories


def comparison_lines(histories: Histories) -> list[str]:
    """For each loss, one line per backend: the final value and the largest |difference| from the
    first backend's loss at the same step."""
    reference, *_ = histories
    lines = []
    for phase in histories[reference][-1]:
        expected = [losses[phase] for losses in histories[reference]]
        for backend, history in histories.items():
            values = [losses[phase] for losses in history]
            largest = max(abs(value - other) for value, other in zip(values, expected, strict=True))
            lines.append(f"{phase:<14} {backend:<10} final {values[-1]:.6f}   largest |difference| from "
                         f"{reference} over {len(values)} steps: {largest:.2e}")  # fmt: skip
    return lines
