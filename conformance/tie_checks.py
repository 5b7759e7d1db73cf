"""The check of weights tied across two layers (a graph's ``tied``, capability ``graph``): the word
language model's output layer computing with its embedding table, and a tied autoencoder's decoder
with its encoder's weight transposed, against the float64 reference of :mod:`.graph_reference`.
Tolerance sizes as in :mod:`.graph_checks`."""

from __future__ import annotations

from unitrain import layers as L
from unitrain import ops
from unitrain.graph import Graph, Input
from unitrain.losses import CrossEntropyLoss
from unitrain.sequences import Embedding

from .checks import check, fail, inputs, labels
from .graph_checks import _graph_case, one_sgd_step


def tied_embedding_model() -> Graph:
    """Token ids ``(N, 3)`` below 7: ``decoder.weight`` is ``encoder.weight`` (7 x 5)."""
    tokens = Input((3,), name="tokens")
    encoder, decoder = Embedding(7, 5), L.Linear(5, 7)
    return Graph(tokens, decoder(ops.tanh(encoder(tokens).mean(1))), {"encoder": encoder, "decoder": decoder},
                 tied={"decoder.weight": "encoder.weight"})  # fmt: skip


def tied_autoencoder_model() -> Graph:
    """Inputs ``(N, 6)``: the decoder ``Linear(3, 6)`` computes with ``encoder.weight`` (3 x 6) transposed."""
    x = Input((6,))
    encoder, decoder = L.Linear(6, 3), L.Linear(3, 6, bias=False)
    return Graph(x, decoder(ops.tanh(encoder(x))), {"encoder": encoder, "decoder": decoder},
                 tied={"decoder.weight": "encoder.weight.T"})  # fmt: skip


@check("graph")
def check_graph_tied_across_layers(adapter):
    """An Embedding's table used as a Linear's weight, and a Linear's weight used transposed by another
    (a tied autoencoder): one state_dict key, its gradient the sum of both uses', and one SGD step
    moves it once by lr times that sum."""
    model = tied_embedding_model()
    x, y = labels(n=24, classes=7, seed=1).reshape(8, 3), labels(classes=7)
    loop, state = _graph_case(adapter, "tied embedding", model, x, CrossEntropyLoss(), y)
    if list(loop.state_dict()) != ["encoder.weight", "decoder.bias"]:
        fail(f"state_dict() keys of a graph tying decoder.weight to encoder.weight: got {list(loop.state_dict())}")
    one_sgd_step(adapter, "tied embedding", model, state, x, y)
    model, x, y = tied_autoencoder_model(), inputs((6,)), labels(classes=6)
    loop, state = _graph_case(adapter, "transposed tie", model, x, CrossEntropyLoss(), y)
    if list(loop.state_dict()) != ["encoder.weight", "encoder.bias"]:
        fail(f"state_dict() keys of a graph tying decoder.weight to encoder.weight.T: got {list(loop.state_dict())}")
    one_sgd_step(adapter, "transposed tie", model, state, x, y)
