"""The checks of graph models (:class:`unitrain.graph.Graph`, capability ``graph``): every tensor
operation forward and backward, shared weights, concatenation and split, several outputs and a
sub-model used alone, each against the float64 reference of :mod:`.graph_reference`.

Tolerance sizes: no value in these small graphs sums more terms than the batch's elements of the
largest value the graph computes (a dot product's fan-in, a reduction's axis, a mean loss's
outputs), so that is the ``size`` of the forward and the loss; gradients, as in the layer checks,
allow 8 times it.
"""

from __future__ import annotations

import math

from unitrain import layers as L
from unitrain import ops
from unitrain.graph import Graph, Input
from unitrain.losses import CrossEntropyLoss, MSELoss, PerOutputLoss
from unitrain.optim import SGD

from . import reference
from .checks import check, compare, compare_states, fail, inputs, labels, loaded, state_of, tutorial_gradients
from .graph_reference import GraphReference


def every_op_model() -> Graph:
    """Inputs ``x (N, 12)`` and ``z (N, 4)``; every operation of :data:`unitrain.ops.OPS` between
    two Linear layers and a head, so that each one's backward reaches a parameter."""
    x, z = Input((12,), name="x"), Input((4,), name="z")
    fc, gate, head = L.Linear(12, 24), L.Linear(4, 4), L.Linear(8, 3)
    h = fc(x).reshape(-1, 2, 3, 4)
    g = gate(z).reshape(-1, 1, 1, 4)
    a = h * g + h[:, 1:2]  # broadcasting in both products' directions
    c = 2.0 / ((a - 0.5) * (a - 0.5) + 1.0)
    d = (1.0 - c) / (h * h + 1.0) - h[:, 0:1] * 0.5
    e = ops.cat([d, -h], dim=1)
    first, rest = e.split([1, 3], dim=1)
    f = ops.stack([first.select(1, 0), rest.mean(1)], dim=1)
    m = f.permute(0, 1, 3, 2) @ f
    u = ops.sigmoid(m).sum(3) + ops.tanh(m.transpose(2, 3)).sum(-1, keepdim=True).flatten(2, 3)
    v = ops.softmax(u.flatten(), dim=1) + ops.log_softmax(u, dim=2).flatten(1)
    w = ops.relu(v) + ops.gelu(v) + ops.silu(v) + ops.elu(v) + ops.leaky_relu(v, 0.2) + ops.tanh(v)
    return Graph([x, z], head(w), {"fc": fc, "gate": gate, "head": head})


def tied_model() -> Graph:
    """Input ``(N, 6)``: one Linear called twice, a skip connection."""
    x = Input((6,))
    shared, fc = L.Linear(6, 6), L.Linear(6, 3)
    return Graph(x, fc(shared(ops.tanh(shared(x))) + x), {"shared": shared, "fc": fc})


def concat_split_model() -> Graph:
    """Input ``(N, 5)``: two branches of different widths concatenated, split at another boundary."""
    x = Input((5,))
    left, right, head1, head2 = L.Linear(5, 3), L.Linear(5, 4), L.Linear(2, 2), L.Linear(5, 2)
    first, second = ops.cat([left(x), right(x)], dim=1).split([2, 5], dim=1)
    out = head1(first) * head2(second)
    return Graph(x, out, {"left": left, "right": right, "head1": head1, "head2": head2})


def two_output_model() -> Graph:
    """Input ``(N, 6)``; outputs class scores ``(N, 4)`` and values ``(N, 2)``."""
    x = Input((6,))
    trunk, classes, values = L.Linear(6, 8), L.Linear(8, 4), L.Linear(8, 2)
    h = ops.tanh(trunk(x))
    return Graph(x, [classes(h), values(h)], {"trunk": trunk, "classes": classes, "values": values})


def autoencoder_model() -> Graph:
    """Input ``(N, 2, 3)``: an encoder Sequential and a decoder."""
    x = Input((2, 3))
    encoder = L.Sequential(L.Flatten(), L.Linear(6, 4), L.Tanh())
    decoder = L.Sequential(L.Linear(4, 6))
    return Graph(x, decoder(encoder(x)).reshape(-1, 2, 3), {"encoder": encoder, "decoder": decoder})


def _size(model: Graph, n: int) -> int:
    return n * max(math.prod(shape) for shape in (*model.shapes.values(), *model.input_shapes))


def _outputs(value, count):
    return tuple(value) if count > 1 else (value,)


def _graph_case(adapter, what, model, x, loss, target):
    """Eval forward, training loss and every gradient of ``model`` (random weights) match the reference."""
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=loss)
    ref = GraphReference(model, state)
    n, count = len(x[0]) if isinstance(x, tuple) else len(x), len(model.outputs)
    size = _size(model, n)
    for index, (got, expected) in enumerate(
        zip(_outputs(loop.predict(x), count), _outputs(ref.forward(x), count), strict=True)
    ):
        compare(f"{what}: predict() output {index}", got, expected, dtype=loop.dtype, size=size)
    specs = loss.losses if isinstance(loss, PerOutputLoss) else (loss,)
    preds, targets = _outputs(ref.forward(x, training=True), count), _outputs(target, count)
    parts = [reference.loss(spec, pred, t) for spec, pred, t in zip(specs, preds, targets, strict=True)]
    expected = sum(value for value, _ in parts)
    got = tutorial_gradients(loop, x, target)
    compare(f"{what}: training loss", got, expected, dtype=loop.dtype, size=size)
    grads = tuple(grad for _, grad in parts)
    compare_states(f"{what}: gradient", loop.gradients(), ref.backward(grads if count > 1 else grads[0]),
                   dtype=loop.dtype, size=8 * size)  # fmt: skip
    return loop, state


@check("graph")
def check_graph_ops(adapter):
    """Every graph operation (arithmetic with broadcasting and numbers, cat, stack, split/narrow, select,
    reshape, flatten, permute, transpose, sum, mean, matmul, the activations) on two inputs: forward,
    loss and every gradient match the float64 reference."""
    x = (inputs((12,)), inputs((4,), seed=1))
    _graph_case(adapter, "every-op graph", every_op_model(), x, MSELoss(reduction="sum"), inputs((3,), seed=2))


@check("graph")
def check_graph_shared_weights(adapter):
    """A Linear called at two nodes: one state_dict key, its gradient the sum over both calls, and one
    SGD step moves it once by lr times that sum."""
    model = tied_model()
    x, y = inputs((6,)), labels(classes=3)
    loop, state = _graph_case(adapter, "tied weights", model, x, CrossEntropyLoss(), y)
    if list(loop.state_dict()) != ["shared.weight", "shared.bias", "fc.weight", "fc.bias"]:
        fail(f"state_dict() keys of a graph calling 'shared' twice: got {list(loop.state_dict())}")
    one_sgd_step(adapter, "tied weights", model, state, x, y)


def one_sgd_step(adapter, what, model, state, x, y) -> None:
    """One SGD step (cross-entropy) moves each parameter once by lr times its reference gradient."""
    ref = GraphReference(model, state)
    _, grad = reference.loss(CrossEntropyLoss(), ref.forward(x, training=True), y)
    grads = ref.backward(grad)
    lr = 0.1
    loop = loaded(adapter, model, state, optimizer=SGD(lr=lr))
    loop.step((x, y))
    expected = {key: state[key] - lr * grads[key] for key in grads}
    compare_states(f"{what} after one SGD step", loop.state_dict(), expected, dtype=loop.dtype,
                   size=8 * _size(model, len(x)))  # fmt: skip


@check("graph")
def check_graph_concat_split(adapter):
    """Branches of widths 3 and 4 concatenated and split at 2: each piece reaches the right head and
    each gradient the right branch."""
    _graph_case(adapter, "concat then split", concat_split_model(), inputs((5,)), MSELoss(), inputs((2,), seed=1))


@check("graph")
def check_graph_several_outputs(adapter):
    """Two outputs with a loss each (PerOutputLoss: cross-entropy plus MSE): predictions are a tuple,
    loss and gradients match the reference, and evaluate() reports the sum of each output's loss."""
    model = two_output_model()
    x, y = inputs((6,)), (labels(), inputs((2,), seed=1))
    loss = PerOutputLoss(CrossEntropyLoss(), MSELoss())
    loop, state = _graph_case(adapter, "two outputs", model, x, loss, y)
    predictions = loop.predict(x)
    if not isinstance(predictions, tuple) or len(predictions) != 2:
        fail(f"predict() of a two-output graph gave {type(predictions).__name__}, expected a tuple of 2 arrays")
    logits, values = GraphReference(model, state).forward(x)
    expected = reference.loss(CrossEntropyLoss(), logits, y[0])[0] + reference.loss(MSELoss(), values, y[1])[0]
    compare("two outputs: evaluate() loss", loop.evaluate((x, y))["loss"], expected, dtype=loop.dtype,
            size=_size(model, len(x)))  # fmt: skip


@check("graph")
def check_graph_submodule(adapter):
    """submodule("encoder") of an autoencoder graph predicts as the encoder alone, with the encoder's
    weights under its own keys."""
    model = autoencoder_model()
    state = state_of(model)
    loop = loaded(adapter, model, state, loss=MSELoss())
    encoder = loop.submodule("encoder")
    expected = {key[len("encoder.") :]: value for key, value in state.items() if key.startswith("encoder.")}
    compare_states("submodule('encoder').state_dict()", encoder.state_dict(), expected)
    x = inputs((2, 3))
    alone = reference.Reference(model.encoder, expected).forward(x)
    compare("submodule('encoder').predict()", encoder.predict(x), alone, dtype=loop.dtype, size=_size(model, len(x)))
