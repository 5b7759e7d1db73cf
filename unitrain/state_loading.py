"""Loading a training loop's state all or nothing: every part checked before any is assigned.

A checkpoint holds several parts (each model's weights, optimizer state and random stream): a
part refused after another was loaded would leave the loop half resumed, its weights the
checkpoint's and its optimizer its own. So each part is first turned into what the adapter's
loader takes (:func:`checked_weights`, :func:`checked_optimizer_state`,
:func:`checked_random_state`, or :func:`resumable_random_state` for another backend's: ``WeightsError``
naming the part and key), and only once all are
checked are they assigned (:func:`assign`), which cannot refuse any more. The loop's own
``load_state_dict`` / ``load_optimizer_state_dict`` / ``load_random_state`` are these two steps
for one part.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from . import graph_noise
from .weights import WeightsError, check_state

if TYPE_CHECKING:
    from .loop import TrainingLoop


def checked_weights(loop: TrainingLoop, state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``state`` as the loop's weights (its keys and shapes, finite, in the loop's dtype)."""
    check_state(loop.state_shapes(), state, source)
    converted = {
        key: np.asarray(value, np.int64 if key.endswith("num_batches_tracked") else loop.dtype)
        for key, value in state.items()
    }
    for key, value in converted.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise WeightsError(f"{source}: {key!r} contains NaN or infinite values")
    return converted


def checked_optimizer_state(loop: TrainingLoop, state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``state`` as the loop's optimizer state: ``step`` (int64) plus, per parameter, all of the
    optimizer's buffers or none (not created yet), each of the parameter's shape."""
    shapes = loop.param_shapes()
    expected = {f"{param}.{name}": shape for param, shape in shapes.items() for name in loop._state_names(param)}
    unknown = sorted(set(state) - set(expected) - {"step"})
    if "step" not in state or unknown:
        names = sorted({name for param in shapes for name in loop._state_names(param)})
        raise WeightsError(
            f"{source} does not fit {loop.update_spec}: it needs 'step' and keys among "
            f"'<param>.{{{', '.join(names)}}}'; missing 'step'={'step' not in state}, unexpected {unknown}"
        )
    for key, value in state.items():
        if key != "step" and tuple(np.shape(value)) != tuple(expected[key]):
            raise WeightsError(
                f"{source}: {key!r} has shape {tuple(np.shape(value))}, the model expects {tuple(expected[key])}"
            )
    for param in shapes:
        names = loop._state_names(param)
        present = [name for name in names if f"{param}.{name}" in state]
        if present and len(present) != len(names):
            raise WeightsError(f"{source}: {param!r} has buffers {present}, needs all of {list(names)}")
    step = np.asarray(state["step"])
    if step.shape != () or step.dtype.kind not in "iuf" or not 0 <= step < 2**62 or step != np.floor(step):
        raise WeightsError(f"{source}: 'step' must be one whole number >= 0, got {str(step)[:40]}")
    return {
        "step": np.array(int(step), np.int64),
        **{key: np.asarray(value, loop.dtype) for key, value in state.items() if key != "step"},
    }


def checked_random_state(loop: TrainingLoop, state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``state`` as the loop's random streams: a graph's noise stream (every rank draws the same
    noise) and the adapter's dropout stream, left out on ranks other than 0, whose stream is their
    own. Each is tried on a copy or put back, so that checking changes nothing."""
    expected = set(loop.random_state())
    if set(state) != expected:
        raise WeightsError(
            f"{source} has keys {sorted(state)}, the {loop.name} backend's random state has {sorted(expected)}"
        )
    try:
        stream = graph_noise.load_state(copy.deepcopy(loop._noise), dict(state))
    except ValueError as error:
        raise WeightsError(f"{source} is not a graph noise state: {error}") from None
    noise = {key: value for key, value in state.items() if key not in stream}
    if not stream or loop.rank != 0:
        return noise
    converted = {key: np.asarray(value, np.uint8) for key, value in stream.items()}
    current = loop._random_state()
    try:
        loop._load_random_state(converted)
    except ValueError as error:
        raise WeightsError(f"{source} is not a {loop.name} random state: {error}") from None
    loop._load_random_state(current)
    return {**noise, **converted}


def resumable_random_state(loop: TrainingLoop, state: Mapping[str, np.ndarray], source: str):
    """What ``loop`` resumes of another loop's random state: all of it from a loop that keeps the
    same kind of dropout stream (:func:`checked_random_state`), else only a graph's noise stream,
    which unitrain draws itself the same way on every backend; None when nothing fits."""
    if set(state) == set(loop.random_state()):
        return checked_random_state(loop, state, source)
    if loop._noise is None or graph_noise.NOISE_KEY not in state:
        return None
    noise = {graph_noise.NOISE_KEY: state[graph_noise.NOISE_KEY]}
    try:
        graph_noise.load_state(copy.deepcopy(loop._noise), noise)
    except ValueError as error:
        raise WeightsError(f"{source} is not a graph noise state: {error}") from None
    return noise


#: the checker of each part of a loop's state that a checkpoint holds, by the part's name
CHECKERS = {"weights": checked_weights, "optimizer": checked_optimizer_state, "random": checked_random_state}


def assign(loop: TrainingLoop, part: str, checked: dict[str, np.ndarray] | None) -> None:
    """Load one part that its checker returned (:data:`CHECKERS`)."""
    if part == "weights":
        loop._load_state_dict(checked)
    elif part == "optimizer":
        loop._load_optimizer_state_dict(checked)
        loop.step_count = int(checked["step"])
    elif checked is not None:  # None: a checkpoint without this loop's kind of stream
        stream = graph_noise.load_state(loop._noise, checked)
        if stream:
            loop._load_random_state(stream)
