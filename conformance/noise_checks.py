"""The check of a graph that draws noise (:func:`unitrain.ops.randn_like` / ``rand_like``, capability
``graph``): every training forward feeds the noise inputs the loop's next draws, which the contract
fixes (:mod:`unitrain.graph_noise`: NumPy's PCG64 child of the seed with spawn key
``TRAINING_CHILD``, the noise inputs in order, each drawn whole in float64), so every backend
trains on the same noise; the reference is fed those values as inputs.

Tolerance size: as the graph checks', the batch times the largest value the graph computes.
"""

from __future__ import annotations

import numpy as np

from unitrain import layers as L
from unitrain import ops
from unitrain.graph import Graph, Input
from unitrain.graph_noise import TRAINING_CHILD
from unitrain.losses import MSELoss

from . import reference
from .checks import check, compare, compare_states, inputs, loaded, state_of, tutorial_gradients
from .graph_reference import GraphReference

SAMPLES = 8


def noise_model() -> Graph:
    """Input ``(N, 5)``; a VAE's reparameterisation ``mu + eps * exp(0.5 logvar)`` (normal noise) and
    ``log(u + 0.5) * mu`` (uniform noise), then a head of 3."""
    x = Input((5,))
    fc_mu, fc_logvar, head = L.Linear(5, 4), L.Linear(5, 4), L.Linear(4, 3)
    mu, logvar = fc_mu(x), fc_logvar(x)
    z = mu + ops.randn_like(logvar) * (0.5 * logvar).exp() + (ops.rand_like(mu) + 0.5).log() * mu
    return Graph(x, head(z), {"fc_mu": fc_mu, "fc_logvar": fc_logvar, "head": head})


@check("graph")
def check_graph_noise(adapter):
    """A graph drawing normal and uniform noise (with exp and log): two training forwards in a row
    each use the loop's next draws of the noise stream (new noise at each, the same on every backend):
    loss and every gradient match the float64 reference fed those values."""
    model, loss = noise_model(), MSELoss(reduction="sum")
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=loss)
    x, target = inputs((5,)), inputs((3,), seed=1)
    stream = np.random.default_rng(np.random.SeedSequence(loop.seed, spawn_key=(TRAINING_CHILD,)))
    ref = GraphReference(model, state)
    size = SAMPLES * 5
    for forward in ("first", "second"):
        noise = (stream.standard_normal((SAMPLES, 4)), stream.random((SAMPLES, 4)))
        expected, grad = reference.loss(loss, ref.forward((x, *noise), training=True), target)
        got = tutorial_gradients(loop, x, target)
        compare(f"noise graph, {forward} training forward: loss", got, expected, dtype=loop.dtype, size=size)
        compare_states(f"noise graph, {forward} training forward: gradient", loop.gradients(), ref.backward(grad),
                       dtype=loop.dtype, size=8 * size)  # fmt: skip
