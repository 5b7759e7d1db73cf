"""Initial states in and final states out of RNN/LSTM/GRU in a graph (``out, (h, c) = lstm(x, (h0, c0))``):
a seq2seq-shaped graph (an encoder LSTM over padded sequences, whose final states are the decoder LSTM's
initial states, and a GRU whose initial state is a graph input) and a bidirectional 2-layer LSTM classifier
on its final states train 20 steps within PyTorch's own float32 drift of the same models in plain PyTorch
(NumPy also in float64, within the conformance formula); shapes are checked before any framework work,
the errors naming the node."""

import numpy as np
import pytest
import torch
from conftest import installed_backends
from test_padded import momentum_loop
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch_reference import SEED, assert_run_within_drift, load_state, torch_runs
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain import ops
from unitrain.graph import Graph, Input, Node

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCABULARY, EMBEDDING, HIDDEN, LENGTH, BATCH, STEPS, CLASSES = 7, 3, 4, 5, 4, 20, 3


def seq2seq() -> Graph:
    """Embedding; a 2-layer encoder LSTM (given each sequence's length) whose final ``(h, c)`` start a
    2-layer decoder LSTM over the same embeddings; a GRU started from the graph input ``h0``; Linear at
    every position, ``(N, classes, T)``. The encoder reaches the loss only through its final states."""
    tokens, lengths, h0 = Input((LENGTH,), name="tokens"), Input((), name="lengths"), Input((1, HIDDEN), name="h0")
    modules = {"embedding": ut.Embedding(VOCABULARY, EMBEDDING),
               "encoder": ut.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True),
               "decoder": ut.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True),
               "gru": ut.GRU(HIDDEN, HIDDEN, batch_first=True), "head": ut.Linear(HIDDEN, CLASSES)}  # fmt: skip
    x = modules["embedding"](tokens)
    _, (h, c) = modules["encoder"](x, lengths=lengths)
    y, _ = modules["decoder"](x, (h, c))
    z, _ = modules["gru"](y, h0)
    return Graph([tokens, lengths, h0], modules["head"](z).permute(0, 2, 1), modules=modules)


class Seq2Seq(nn.Module):
    """The same model in plain PyTorch (states layer-major: the graph input ``h0`` transposed)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, EMBEDDING)
        self.encoder = nn.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True)
        self.decoder = nn.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True)
        self.gru = nn.GRU(HIDDEN, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, tokens, lengths, h0):
        x = self.embedding(tokens)
        _, (h, c) = self.encoder(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        y, _ = self.decoder(x, (h, c))
        z, _ = self.gru(y, h0.transpose(0, 1).contiguous())
        return self.head(z).permute(0, 2, 1)


def classifier() -> Graph:
    """A bidirectional 2-layer LSTM read by its last layer's final states, both directions: PyTorch's
    ``cat((h_n[-2], h_n[-1]), 1)``, plus the last cell state, into Linear."""
    x = Input((LENGTH, EMBEDDING), name="x")
    lstm = ut.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
    head = ut.Linear(3 * HIDDEN, CLASSES)
    _, (h, c) = lstm(x)
    return Graph(x, head(ops.cat([h[-2], h[-1], c[-1]], dim=1)), modules={"lstm": lstm, "head": head})


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(3 * HIDDEN, CLASSES)

    def forward(self, x):
        _, (h, c) = self.lstm(x)
        return self.head(torch.cat((h[-2], h[-1], c[-1]), 1))


def bridge() -> Graph:
    """The seq2seq wiring in two one-layer GRUs, no embedding or lengths: an encoder started from the
    graph input ``h0`` whose final state starts the decoder, whose final state is classified (what
    MindSpore compiles in a fraction of the seq2seq graph's time; the conformance suite's
    check_recurrent_states holds its LSTM to initial and final ``(h, c)``)."""
    x, h0 = Input((LENGTH, EMBEDDING), name="x"), Input((1, HIDDEN), name="h0")
    modules = {"encoder": ut.GRU(EMBEDDING, HIDDEN, batch_first=True),
               "decoder": ut.GRU(EMBEDDING, HIDDEN, batch_first=True), "head": ut.Linear(HIDDEN, CLASSES)}  # fmt: skip
    _, h = modules["encoder"](x, h0)
    _, state = modules["decoder"](x, h)
    return Graph([x, h0], modules["head"](state[-1]), modules=modules)


class Bridge(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.GRU(EMBEDDING, HIDDEN, batch_first=True)
        self.decoder = nn.GRU(EMBEDDING, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, h0):
        _, h = self.encoder(x, h0.transpose(0, 1).contiguous())
        _, state = self.decoder(x, h)
        return self.head(state[-1])


def bridge_batches():
    rng = np.random.default_rng(SEED + 2)
    return [((rng.standard_normal((BATCH, LENGTH, EMBEDDING)).astype(np.float32),
              rng.standard_normal((BATCH, 1, HIDDEN)).astype(np.float32)), rng.integers(0, CLASSES, BATCH))
            for _ in range(STEPS)]  # fmt: skip


def seq2seq_batches():
    """Token sequences padded with id 0 (lengths 1..5, the first of each batch full), their lengths,
    an initial GRU state per sequence, and a class per position."""
    rng = np.random.default_rng(SEED)
    out = []
    for _ in range(STEPS):
        sizes = rng.integers(1, LENGTH + 1, BATCH)
        sizes[0] = LENGTH
        tokens = np.where(np.arange(LENGTH) >= sizes[:, None], 0, rng.integers(1, VOCABULARY, (BATCH, LENGTH)))
        h0 = rng.standard_normal((BATCH, 1, HIDDEN)).astype(np.float32)
        out.append(((tokens, sizes, h0), rng.integers(0, CLASSES, (BATCH, LENGTH))))
    return out


def classifier_batches():
    rng = np.random.default_rng(SEED + 1)
    return [(rng.standard_normal((BATCH, LENGTH, EMBEDDING)).astype(np.float32), rng.integers(0, CLASSES, BATCH))
            for _ in range(STEPS)]  # fmt: skip


#: the longest sum of one step: a weight gradient through time adds batch x steps terms of the widest input
SIZE = BATCH * LENGTH * 2 * HIDDEN

#: (graph, plain PyTorch model, batches) per case
CASES = {"seq2seq": (seq2seq, Seq2Seq, seq2seq_batches), "classifier": (classifier, Classifier, classifier_batches),
         "bridge": (bridge, Bridge, bridge_batches)}  # fmt: skip
#: MindSpore compiles each case's step for tens of seconds on two cores (unrolling a native cell given
#: seq_length): it trains the bridge, the seq2seq wiring in one-layer cells; the others the two larger cases
PAIRS = [(backend, case) for backend in installed_backends()
         for case in (["bridge"] if backend == "mindspore" else ["seq2seq", "classifier"])]  # fmt: skip


@pytest.mark.parametrize(("backend", "case"), PAIRS)
def test_states_train_like_plain_torch(backend, case):
    """20 SGD-momentum steps: losses, weights and momentum buffers within PyTorch's float32 drift of its
    float64 run (NumPy in float64, its hand-written backward through the states, within the conformance
    formula)."""
    make_graph, make_module, make_batches = CASES[case]
    _trains_like_torch(backend, make_graph, make_module, make_batches())


def _trains_like_torch(backend, make_graph, make_module, data):
    initial = ut.init_weights(make_graph(), SEED)
    runs = torch_runs(lambda dtype: load_state(make_module().to(dtype), initial),
                      lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False), data)  # fmt: skip
    dtype = "float64" if backend == "numpy" else "float32"
    loop = momentum_loop(backend, make_graph(), dtype)
    losses = np.array([loop.to_float(loop.step(batch)) for batch in data])
    assert_run_within_drift(loop, losses, runs, dtype, SIZE)


# --- from_torch and to_torch ---------------------------------------------------------------------------------


class EncoderDecoder(nn.Module):
    """PyTorch's own writing of states: ``out, (h, c) = self.lstm(x, (h0, c0))`` from another LSTM's
    final states, ``out, h = self.gru(x)``, ``h[-1]``, both directions of the last layer."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, EMBEDDING)
        self.encoder = nn.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.decoder = nn.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(2 * HIDDEN, HIDDEN, batch_first=True)
        self.head = nn.Linear(3 * HIDDEN, CLASSES)

    def forward(self, tokens):
        x = self.embedding(tokens)
        _, (h, c) = self.encoder(x)
        out, (h, c) = self.decoder(x, (h, c))
        _, state = self.gru(out)
        return self.head(torch.cat((h[-2], h[-1], state[-1]), dim=1))


def test_from_torch_maps_states_and_to_torch_writes_them_back():
    """The imported graph predicts what the module does (NumPy in float64 and the torch backend in float32,
    within the conformance formula), and ``to_torch`` of it is a module that computes the same."""
    module = EncoderDecoder().double()
    tokens = np.random.default_rng(SEED).integers(0, VOCABULARY, (BATCH, LENGTH))
    graph = ut.from_torch(module, torch.from_numpy(tokens[:2]))
    assert "initial_states=True, final_states=True" in str(graph)
    expected = module(torch.from_numpy(tokens)).detach().numpy()
    for backend, dtype in (("numpy", "float64"), ("torch", "float32")):
        got = momentum_loop(backend, graph, dtype).predict(tokens)
        bound = tolerance(np.dtype(dtype), SIZE, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=bound)
    exported = ut.to_torch(graph).double()(torch.from_numpy(tokens)).detach().numpy()
    bound = tolerance(np.dtype("float64"), SIZE, float(np.abs(expected).max()))
    np.testing.assert_allclose(exported, expected, rtol=0, atol=bound)


class StateFromAnArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(EMBEDDING, HIDDEN, batch_first=True)

    def forward(self, x, h0):
        return self.gru(x, h0)[0]


def test_from_torch_refuses_an_initial_state_from_a_forward_argument():
    with pytest.raises(ValueError, match=r"^from_torch: node 'gru' \(gru\): an initial state that is not another "
                       r"recurrent layer's final state .* a graph input holds its batch first$"):  # fmt: skip
        ut.from_torch(StateFromAnArgument(), (torch.zeros(2, LENGTH, EMBEDDING), torch.zeros(1, 2, HIDDEN)))


class BiRNN(nn.Module):
    """yunjey/pytorch-tutorial's bidirectional RNN: ``h0``, ``c0`` built in forward as zeros (``initial``:
    how; None: not given, the layer's own zeros)."""

    def __init__(self, initial=None):
        super().__init__()
        self.initial, self.num_layers, self.hidden_size = initial, 2, HIDDEN
        self.lstm = nn.LSTM(EMBEDDING, HIDDEN, self.num_layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(HIDDEN * 2, CLASSES)
        self.hidden = (torch.zeros(4, 2, HIDDEN), torch.zeros(4, 2, HIDDEN))  # init_hidden(2)'s

    def forward(self, x):
        shape = (self.num_layers * 2, x.size(0), self.hidden_size)
        states = {"zeros": lambda: (torch.zeros(*shape).to(torch.device("cpu")), torch.zeros(*shape)),
                  "device": lambda: (torch.zeros(*shape, device=x.device), x.new_zeros(shape)),
                  "like": lambda: (torch.zeros_like(h0 := torch.zeros(*shape, dtype=x.dtype)), h0),
                  "ones": lambda: (torch.ones(*shape), torch.zeros(*shape)),
                  "mixed": lambda: (torch.zeros(*shape), self.lstm(x)[1][1]),
                  "attribute": lambda: self.hidden}  # fmt: skip
        out, _ = self.lstm(x) if self.initial is None else self.lstm(x, states[self.initial]())
        return self.fc(out[:, -1, :])


def test_from_torch_takes_zeros_built_in_forward_as_the_layers_default():
    """Zeros are the layer's own initial states: the call imports without them (checked on the example's
    values); anything else built in forward is refused naming the node, and a fixed-batch ``init_hidden``
    attribute as a forward that depends on the example's batch size."""
    x = torch.zeros(2, LENGTH, EMBEDDING)
    plain = ut.from_torch(BiRNN(), x)
    assert "initial_states" not in str(plain)
    for initial in ("zeros", "device", "like"):
        torch.manual_seed(0)
        module = BiRNN(initial)
        torch.manual_seed(0)
        assert ut.from_torch(module, x) == ut.from_torch(BiRNN(), x), initial
    assert _message(lambda: ut.from_torch(BiRNN("ones"), x)) == (
        "from_torch: node 'lstm' (lstm): an initial state built in forward must be zeros (the layer's default), "
        "got values other than zeros")  # fmt: skip
    assert _message(lambda: ut.from_torch(BiRNN("mixed"), x)).endswith(
        ": initial states (h0, c0) with one built as zeros in forward and the other not; give both as zeros or "
        "both as another layer's final states")  # fmt: skip
    assert _message(lambda: ut.from_torch(BiRNN("attribute"), x)).startswith(
        "from_torch: BiRNN.forward depends on the example's batch size 2: with 3 samples, node 'lstm' (lstm) fails "
        "on the example inputs: RuntimeError: Expected hidden[0] size (4, 3, 4), got [4, 2, 4]")  # fmt: skip


# --- refusals, before any framework work -------------------------------------------------------------------


def _message(action) -> str:
    with pytest.raises((ValueError, IndexError)) as error:
        action()
    return str(error.value)


def test_a_graph_with_states_round_trips_through_json():
    for make in (seq2seq, classifier, bridge):
        graph = make()
        assert Graph.from_dict(graph.to_dict()) == graph


def test_state_shapes_and_uses_are_checked_naming_the_layer_or_node():
    x = Input((LENGTH, EMBEDDING), name="x")
    stacked = ut.LSTM(EMBEDDING, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
    wrong = (Input((2, HIDDEN), name="h0"), Input((2, HIDDEN), name="c0"))
    assert _message(lambda: stacked(x, wrong)).endswith(
        ": h_0 has per-sample shape (2, 4), expected (num_layers * num_directions, hidden_size) = (4, 4) "
        "(a graph's states are batch-first)")  # fmt: skip
    assert _message(lambda: stacked(x, wrong[0])).endswith(
        "takes its initial states as a tuple (h0, c0), got one tensor"
    )
    assert _message(lambda: ut.GRU(EMBEDDING, HIDDEN)(x, wrong[0])).endswith(
        "initial and final states in a graph need batch_first=True (the loop's samples must be the sequences)"
    )
    gru = ut.GRU(EMBEDDING, HIDDEN, batch_first=True)
    _, h = gru(x)
    assert h.shape == (1, None, HIDDEN)  # PyTorch's (num_layers * num_directions, N, hidden_size)
    assert _message(lambda: ut.Linear(HIDDEN, 2)(h)).startswith(
        "Linear: h_n is read as PyTorch's (num_layers * num_directions, N, hidden_size); index it (h_n[-1]) or put "
        "its batch axis first (h_n.transpose(0, 1))")  # fmt: skip
    assert _message(lambda: h[:, 0]).startswith("indexing h_n: index its first axis only")
    call = gru(x)
    _, h = call
    assert _message(lambda: Graph(x, [call, h[-1]], modules={"gru": gru})).endswith(
        "is used both as its call and unpacked (out, h = layer(x)); use the unpacked output, or the layer would run "
        "twice")  # fmt: skip
    nodes = [Node("gru", "call_module", "gru", ("x", "h0"), (("initial_states", True),))]
    assert _message(lambda: Graph.from_nodes({"x": [LENGTH, EMBEDDING], "h0": [2, HIDDEN]}, nodes, ["gru"],
                                             {"gru": gru})).startswith("node 'gru' calls GRU(")  # fmt: skip
    tuple_out = [Node("gru", "call_module", "gru", ("x",), (("final_states", True),))]
    assert _message(lambda: Graph.from_nodes({"x": [LENGTH, EMBEDDING]}, tuple_out, ["gru"], {"gru": gru})) == (
        "output 'gru' is a recurrent layer's tuple; output its items (getitem)"
    )
    misread = [*tuple_out, Node("relu", "call_function", "relu", ("gru",))]
    assert _message(lambda: Graph.from_nodes({"x": [LENGTH, EMBEDDING]}, misread, ["relu"], {"gru": gru})) == (
        "node 'relu' (relu): only getitem reads a recurrent layer's tuple (output, h_n[, c_n]), and it reads nothing "
        "else")  # fmt: skip
    unknown = [Node("gru", "call_module", "gru", ("x",), (("hx", True),))]
    assert _message(lambda: Graph.from_nodes({"x": [LENGTH, EMBEDDING]}, unknown, ["gru"], {"gru": gru})).endswith(
        "takes no argument 'hx'; expected among ['initial_states', 'final_states']"
    )


def shared_gru() -> Graph:
    """One GRU called at two nodes: over the sequence from zeros, then again from its own final state
    (its weights shared: the gradient is the sum over both calls)."""
    x = Input((LENGTH, EMBEDDING), name="x")
    gru, head = ut.GRU(EMBEDDING, HIDDEN, batch_first=True), ut.Linear(HIDDEN, CLASSES)
    _, h = gru(x)
    _, again = gru(x, h)
    return Graph(x, head(again[-1]), modules={"gru": gru, "head": head})


class SharedGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(EMBEDDING, HIDDEN, batch_first=True), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        _, h = self.gru(x)
        return self.head(self.gru(x, h)[1][-1])


@pytest.mark.parametrize("backend", [backend for backend in installed_backends() if backend in ("numpy", "torch")])
def test_a_recurrent_layer_called_twice_keeps_each_calls_caches(backend):
    """NumPy runs each call of a shared layer on a replica whose directions hold their own caches (sharing
    them, the second call's forward overwrote what the first call's backward reads)."""
    _trains_like_torch(backend, shared_gru, SharedGRU, classifier_batches())
