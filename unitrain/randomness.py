"""The dropout stream that the NumPy, Chainer and MindSpore backends draw themselves.

One rule for all three, so that from the same seed they drop the same units: a child stream of
the seed (independent of :func:`~unitrain.weights.init_weights`' and the batch order's draws), and
per Dropout layer with ``p > 0``, in forward order, ``random(shape, dtype) >= p`` scaled by
``1/(1-p)``, PyTorch's inverted dropout. (PyTorch itself draws from its own generator.)
"""

from __future__ import annotations

import json

import numpy as np


def dropout_stream(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])


def dropout_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float, dtype) -> np.ndarray:
    """0 or ``1/(1-p)`` per element; ``p == 0`` draws nothing."""
    dtype = np.dtype(dtype)
    if not p:
        return np.ones(shape, dtype)
    return np.multiply(rng.random(shape, dtype) >= p, 1 / (1 - p), dtype=dtype)


def generator_state(rng: np.random.Generator) -> np.ndarray:
    """A NumPy Generator's state as uint8 bytes (its JSON), for ``TrainingLoop.random_state``."""
    return np.frombuffer(json.dumps(rng.bit_generator.state).encode(), np.uint8)


def set_generator_state(rng: np.random.Generator, state: np.ndarray) -> None:
    """Restore :func:`generator_state` bytes into ``rng``; ValueError if they are not one."""
    try:
        rng.bit_generator.state = json.loads(np.asarray(state, np.uint8).tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as error:
        raise ValueError(f"not a {type(rng.bit_generator).__name__} state ({error})") from None
