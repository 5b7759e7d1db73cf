"""Noise inside a model: a graph's :func:`~unitrain.ops.randn_like` / :func:`~unitrain.ops.rand_like`.

A noise tensor is an input of the graph (``Graph.noise`` names them, after the data inputs) that
the loop fills, so that every backend builds and differentiates it as any other input, and data
parallel ranks take their rows of it as of the batch:

* **training** (``loop.training``): drawn anew at every batch check (each ``step``, each
  ``forward``) from the loop's noise stream, a child of the seed of its own, the same on every
  rank (each rank draws the whole batch's and keeps its rows) and on every backend; drawn in
  float64 and cast to the loop's dtype (a float32 and a float64 run see the same noise, rounded);
  its state is part of ``random_state()`` (a checkpoint resumes it);
* **evaluation and predict** (``loop.eval()``): sampled too, as PyTorch's VAE example samples in
  its test pass, but from a stream restarted from the seed at every batch, so ``predict(x)`` is
  repeatable and evaluating never moves the training stream.
"""

from __future__ import annotations

import numpy as np

from .graph import Graph
from .randomness import set_stream_state, stream_state

#: the noise stream's key in ``TrainingLoop.random_state()``
NOISE_KEY = "unitrain_graph_noise"
#: the spawn keys of the two streams, children of the seed (the dropout stream is child 0 of rank 0)
TRAINING_CHILD, EVALUATION_CHILD = 0x6E6F6973, 0x6E6F6965


def _stream(seed: int, child: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(child,)))


class GraphNoise:
    """The noise inputs of one loop's graph and the stream that fills them."""

    def __init__(self, graph: Graph, seed: int):
        shapes = dict(graph.inputs)
        self.inputs = [(name, kind, shapes[name]) for name, kind in graph.noise]
        self.seed = seed
        self.generator = _stream(seed, TRAINING_CHILD)

    def draw(self, samples: int, dtype, training: bool) -> list[np.ndarray]:
        """One array ``(samples, *shape)`` per noise input, in input order."""
        generator = self.generator if training else _stream(self.seed, EVALUATION_CHILD)
        drawn = []
        for _, kind, shape in self.inputs:
            size = (samples, *shape)
            values = generator.standard_normal(size) if kind == "normal" else generator.random(size)
            drawn.append(values.astype(dtype))
        return drawn


def of(model, seed: int) -> GraphNoise | None:
    """The noise of ``model``, or None if it draws none."""
    return GraphNoise(model, seed) if isinstance(model, Graph) and model.noise else None


def state(noise: GraphNoise | None) -> dict[str, np.ndarray]:
    return {} if noise is None else stream_state(noise.generator, NOISE_KEY)


def load_state(noise: GraphNoise | None, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Restore the noise stream from ``state`` (ValueError if it is not one); returns the rest."""
    if noise is None:
        return state
    set_stream_state(noise.generator, state, NOISE_KEY)
    return {key: value for key, value in state.items() if key != NOISE_KEY}
