"""The check of weights tied across two layers (a graph's ``tied``, capability ``graph``): the word
language model's output layer computing with its embedding table, against the float64 reference
of :mod:`.graph_reference`. Tolerance sizes as in :mod:`.graph_checks`."""

from __future__ import annotations

from unitrain import layers as L
from unitrain import ops
from unitrain.graph import Graph, Input
from unitrain.losses import CrossEntropyLoss
from unitrain.sequences import Embedding

from .checks import check, fail, labels
from .graph_checks import _graph_case, one_sgd_step


def tied_embedding_model() -> Graph:
    """Token ids ``(N, 3)`` below 7: ``decoder.weight`` is ``encoder.weight`` (7 x 5)."""
    tokens = Input((3,), name="tokens")
    encoder, decoder = Embedding(7, 5), L.Linear(5, 7)
    return Graph(tokens, decoder(ops.tanh(encoder(tokens).mean(1))), {"encoder": encoder, "decoder": decoder},
                 tied={"decoder.weight": "encoder.weight"})  # fmt: skip


@check("graph")
def check_graph_tied_across_layers(adapter):
    """An Embedding's table used as a Linear's weight: one state_dict key, its gradient the sum of the
    lookup's and the product's, and one SGD step moves it once by lr times that sum."""
    model = tied_embedding_model()
    x, y = labels(n=24, classes=7, seed=1).reshape(8, 3), labels(classes=7)
    loop, state = _graph_case(adapter, "tied embedding", model, x, CrossEntropyLoss(), y)
    if list(loop.state_dict()) != ["encoder.weight", "decoder.bias"]:
        fail(f"state_dict() keys of a graph tying decoder.weight to encoder.weight: got {list(loop.state_dict())}")
    one_sgd_step(adapter, "tied embedding", model, state, x, y)
