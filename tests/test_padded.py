"""Padded batches of sequences with their lengths (``lstm(x, lengths)`` in a graph):
20 training steps of a language model over padded sequences land within PyTorch's own float32 drift of
``torch.nn`` with ``pack_padded_sequence`` (float64 within the conformance formula), a padded batch
predicts what each sequence predicts alone, unpadded, and bad lengths are refused in one line before
any framework work."""

import importlib

import numpy as np
import pytest
import torch
from conftest import installed_backends
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch_reference import SEED, assert_run_within_drift, load_state, torch_runs
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain.graph import Graph, Input
from unitrain.loop import InputError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCABULARY, EMBEDDING, HIDDEN, LENGTH, BATCH, STEPS = 9, 3, 4, 6, 4, 20


def tagger(bidirectional_gru: bool = True, lstm_layers: int = 2, dropout: float = 0.0) -> Graph:
    """Embedding, a 2-layer bidirectional LSTM and (optionally) a bidirectional GRU, each given the
    lengths, then Linear: one score per class at every position, ``(N, classes, T)``."""
    tokens, lengths = Input((LENGTH,), name="tokens"), Input((), name="lengths")
    embedding = ut.Embedding(VOCABULARY, EMBEDDING, padding_idx=0)
    lstm = ut.LSTM(EMBEDDING, HIDDEN, num_layers=lstm_layers, batch_first=True, bidirectional=True, dropout=dropout)
    modules = {"embedding": embedding, "lstm": lstm}
    h = lstm(embedding(tokens), lengths)
    if bidirectional_gru:
        modules["gru"] = ut.GRU(2 * HIDDEN, HIDDEN, batch_first=True, bidirectional=True)
        h = modules["gru"](h, lengths)
    modules["head"] = ut.Linear(2 * HIDDEN, 3)
    return Graph([tokens, lengths], modules["head"](h).permute(0, 2, 1), modules=modules)


class Tagger(nn.Module):
    """The same model as PyTorch writes it for padded batches: pack, run, pad back."""

    def __init__(self, bidirectional_gru: bool = True, lstm_layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, EMBEDDING, padding_idx=0)
        self.lstm = nn.LSTM(EMBEDDING, HIDDEN, num_layers=lstm_layers, batch_first=True, bidirectional=True)
        if bidirectional_gru:
            self.gru = nn.GRU(2 * HIDDEN, HIDDEN, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * HIDDEN, 3)

    def forward(self, tokens, lengths):
        h = self.embedding(tokens)
        for rnn in [self.lstm] + ([self.gru] if hasattr(self, "gru") else []):
            packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            h = pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=tokens.shape[1])[0]
        return self.head(h).permute(0, 2, 1)


def batches():
    """Sequences of lengths 1..6 padded with id 0, their lengths, and tags with the padding ignored."""
    rng = np.random.default_rng(SEED)
    out = []
    for _ in range(STEPS):
        lengths = rng.integers(1, LENGTH + 1, BATCH)
        lengths[0] = LENGTH  # the padded axis is the longest sequence's, as pad_packed_sequence gives it
        padding = np.arange(LENGTH) >= lengths[:, None]
        tokens = np.where(padding, 0, rng.integers(1, VOCABULARY, (BATCH, LENGTH)))
        tags = np.where(padding, -100, rng.integers(0, 3, (BATCH, LENGTH)))
        out.append(((tokens, lengths), tags))
    return out


def momentum_loop(backend, model, dtype="float32"):
    """``backend``'s loop over ``model``: cross-entropy, SGD lr 0.1 momentum 0.9, the shared seed."""
    module = importlib.import_module(f"unitrain.backends.{backend}")
    cls = next(value for value in vars(module).values() if isinstance(value, type) and getattr(value, "name", None)
               == backend and issubclass(value, ut.TrainingLoop))  # fmt: skip
    return cls(model, loss=ut.CrossEntropyLoss(), optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=SEED, dtype=dtype)


#: the longest sum of one step: a weight gradient through time adds batch x steps terms of the widest input
SIZE = BATCH * LENGTH * 2 * HIDDEN


#: per backend, the tagger's arguments: MindSpore unrolls every step of a native cell given seq_length into
#: the graphs it compiles (a minute for the whole tagger on two cores), so it trains the one-layer
#: bidirectional LSTM without the GRU (whose loss once came out biased: MindSpore's LogSoftmax kernel)
CASES = {"numpy": {}, "torch": {}, "chainer": {}, "mindspore": {"bidirectional_gru": False, "lstm_layers": 1}}


@pytest.mark.parametrize("backend", installed_backends())
def test_padded_batches_train_like_torch_with_packed_sequences(backend):
    """20 SGD-momentum steps on padded batches: losses, weights and momentum buffers within PyTorch's
    float32 drift of its float64 run (NumPy in float64, within the conformance formula); then each
    sequence of a padded batch predicts, at its real steps, what it predicts alone, unpadded (within the
    conformance formula of the run's dtype; not on MindSpore, which would compile a graph per length: the
    conformance suite's check_padded_sequences holds it, as every backend, to the float64 reference run on
    each sequence alone)."""
    data, case = batches(), CASES[backend]
    initial = ut.init_weights(tagger(**case), SEED)
    runs = torch_runs(lambda dtype: load_state(Tagger(**case).to(dtype), initial),
                      lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False), data)  # fmt: skip
    # NumPy in float64: its hand-written masked steps and their backward, at the equations' precision
    dtype = "float64" if backend == "numpy" else "float32"
    loop = momentum_loop(backend, tagger(**case), dtype)
    losses = np.array([loop.to_float(loop.step(batch)) for batch in data])
    assert_run_within_drift(loop, losses, runs, dtype, SIZE)
    if backend == "mindspore":
        return
    (tokens, lengths), _ = data[-1]
    padded = loop.predict((tokens, lengths))
    for row in range(BATCH):
        length = int(lengths[row])
        alone = loop.predict((tokens[row : row + 1, :length], lengths[row : row + 1]))
        bound = tolerance(np.dtype(dtype), SIZE, float(np.abs(alone).max()))
        np.testing.assert_allclose(padded[row : row + 1, :, :length], alone, rtol=0, atol=bound)


@pytest.mark.skipif("chainer" not in installed_backends(), reason="Chainer is not installed")
def test_dropout_between_layers_with_lengths_draws_the_same_masks_on_numpy_and_chainer():
    """Training forwards and gradients with dropout between the LSTM's layers and lengths: NumPy and Chainer
    draw the loop's masks alike (shaped like the layer's output, in the batch's order), so they agree in
    float64 within the conformance formula; dropout did act (eval differs)."""
    (tokens, lengths), tags = batches()[0]
    results = []
    for backend in ("numpy", "chainer"):
        loop = momentum_loop(backend, tagger(dropout=0.5), "float64")
        loop.zero_grad()
        pred = loop.forward((tokens, lengths))
        loop.backward(loop.loss(pred, tags))
        results.append((loop.to_numpy(pred), loop.gradients(), loop.eval().predict((tokens, lengths))))
    (pred, gradients, evaluated), (other, other_gradients, _) = results
    bound = tolerance(np.float64, SIZE, 1.0)
    np.testing.assert_allclose(other, pred, rtol=0, atol=bound)
    for key, value in gradients.items():
        np.testing.assert_allclose(other_gradients[key], value, rtol=0, atol=8 * bound, err_msg=key)
    assert np.abs(evaluated - pred).max() > 1e3 * bound


def test_states_stop_at_each_sequences_end_on_numpy():
    """What a padded position holds cannot leak into the real ones: changing the padding tokens changes
    no prediction at a real position (and PyTorch's pad_packed_sequence zeros reach the head there)."""
    loop = momentum_loop("numpy", tagger(), "float64")
    (tokens, lengths), _ = batches()[0]
    other = np.where(np.arange(LENGTH) >= lengths[:, None], 5, tokens)
    first, second = loop.predict((tokens, lengths)), loop.predict((other, lengths))
    real = np.arange(LENGTH) < lengths[:, None]
    np.testing.assert_array_equal(first.transpose(0, 2, 1)[real], second.transpose(0, 2, 1)[real])


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        ([6, 7], "input 'lengths': sequence length 7 is outside 1..6 (the padded axis of lstm)"),
        ([0, 3], "input 'lengths': sequence length 0 is outside 1..6 (the padded axis of lstm)"),
        ([2.0, 3.0], "input 'lengths': sequence lengths must be integers, got float64"),
    ],
)
def test_bad_lengths_are_refused_in_one_line_before_any_framework_work(lengths, message):
    loop = momentum_loop("numpy", tagger())
    with pytest.raises(InputError) as error:
        loop.predict((np.ones((2, LENGTH), np.int64), np.array(lengths)))
    assert str(error.value) == message


def test_lengths_need_a_batch_first_recurrent_layer():
    x, lengths = Input((LENGTH, 3), name="x"), Input((), name="lengths")
    with pytest.raises(ValueError, match=r"sequence lengths need batch_first=True"):
        ut.LSTM(3, 4)(x, lengths)
    with pytest.raises(ValueError, match=r"only RNN, LSTM and GRU take a second one"):
        ut.Linear(3, 4)(x, lengths)
    with pytest.raises(ValueError, match=r"lengths must have per-sample shape \(\)"):
        ut.LSTM(3, 4, batch_first=True)(x, Input((1,), name="counts"))
    with pytest.raises(ValueError, match=r"takes its initial states as a tuple \(h0, c0\), got one tensor$"):
        ut.LSTM(3, 4, batch_first=True, bidirectional=True)(x, Input((2, 4), name="h_0"))
