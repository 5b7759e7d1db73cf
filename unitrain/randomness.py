"""The dropout stream that the NumPy, Chainer and MindSpore backends draw themselves.

One rule for all three, so that from the same seed they drop the same units: a child stream of
the seed (independent of :func:`~unitrain.weights.init_weights`' and the batch order's draws), and
per Dropout layer with ``p > 0``, in forward order, ``random(shape, dtype) >= p`` scaled by
``1/(1-p)``, PyTorch's inverted dropout. (PyTorch itself draws from its own generator.)
"""

from __future__ import annotations

import json

import numpy as np

from .reading import Int, OneOf, check_json


def dropout_stream(seed: int, rank: int = 0) -> np.random.Generator:
    """The stream of data-parallel rank ``rank`` (its own child of the seed; rank 0's is the
    one-process stream)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(rank + 1)[rank])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s framework generator (PyTorch's): ``seed`` itself on rank 0."""
    return seed if rank == 0 else int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, np.uint64)[0])


def dropout_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float, dtype) -> np.ndarray:
    """0 or ``1/(1-p)`` per element; ``p == 0`` draws nothing."""
    dtype = np.dtype(dtype)
    if not p:
        return np.ones(shape, dtype)
    return np.multiply(rng.random(shape, dtype) >= p, 1 / (1 - p), dtype=dtype)


#: the key of this stream in ``TrainingLoop.random_state()``: loops whose keys match can load each
#: other's state (a checkpoint resumed on another of these backends keeps its masks)
STREAM_KEY = "unitrain_dropout_stream"


def stream_state(rng: np.random.Generator, key: str = STREAM_KEY) -> dict[str, np.ndarray]:
    """``{key: the generator's state as uint8 bytes (its JSON)}``."""
    return {key: np.frombuffer(json.dumps(rng.bit_generator.state).encode(), np.uint8)}


#: what ``numpy.random.PCG64().state`` holds: 128-bit state and increment, a cached 32-bit half
PCG64_STATE = {
    "bit_generator": OneOf(("PCG64",)),
    "state": {"state": Int(0, 2**128 - 1), "inc": Int(0, 2**128 - 1)},
    "has_uint32": Int(0, 1),
    "uinteger": Int(0, 2**32 - 1),
}


def set_stream_state(rng: np.random.Generator, state: dict[str, np.ndarray], key: str = STREAM_KEY) -> None:
    """Restore :func:`stream_state` into ``rng``; ValueError if the bytes are not one."""
    try:
        decoded = json.loads(np.asarray(state[key], np.uint8).tobytes())
        check_json(decoded, PCG64_STATE)
    except (ValueError, RecursionError, TypeError, KeyError) as error:  # ValueError: bad JSON, or the schema's
        raise ValueError(f"not a {type(rng.bit_generator).__name__} state ({str(error)[:200]})") from None
    rng.bit_generator.state = decoded
