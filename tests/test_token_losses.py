"""Per-position class losses and ``ignore_index`` (``CrossEntropyLoss``/``NLLLoss`` over ``(N, C, T)``
as PyTorch takes them) on every backend against ``torch.nn.functional``: 20 training steps of a small
language model from the same weights within PyTorch's own float32 drift (float64 within the
conformance formula), evaluation's per-token mean and accuracy, and bad targets refused in one line."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import installed_backends
from torch import nn
from torch_reference import SEED, assert_within_drift, expected_run, load_state, torch_runs
from unitrain.backends.numpy import _loss_terms
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain.graph import Graph, Input
from unitrain.loop import InputError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VOCABULARY, EMBEDDING, HIDDEN, LENGTH, BATCH, STEPS = 7, 4, 5, 6, 4, 20
IGNORED = -100


def language_model():
    tokens = Input((LENGTH,), name="tokens")
    embedding, lstm, decoder = ut.Embedding(VOCABULARY, EMBEDDING), ut.LSTM(EMBEDDING, HIDDEN, batch_first=True), \
        ut.Linear(HIDDEN, VOCABULARY)  # fmt: skip
    logits = decoder(lstm(embedding(tokens))).permute(0, 2, 1)
    return Graph(tokens, logits, modules={"embedding": embedding, "lstm": lstm, "decoder": decoder})


class LanguageModel(nn.Module):
    """The same model written in PyTorch, as its char-RNN examples do."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, EMBEDDING)
        self.lstm = nn.LSTM(EMBEDDING, HIDDEN, batch_first=True)
        self.decoder = nn.Linear(HIDDEN, VOCABULARY)

    def forward(self, tokens):
        return self.decoder(self.lstm(self.embedding(tokens))[0]).permute(0, 2, 1)


def batches():
    """Token windows and next-token targets with a padded tail per sequence (ignored targets): every
    batch has some, and one batch's first row is ignored entirely."""
    rng = np.random.default_rng(SEED)
    out = []
    for step in range(STEPS):
        x = rng.integers(0, VOCABULARY, (BATCH, LENGTH))
        y = rng.integers(0, VOCABULARY, (BATCH, LENGTH))
        for row, length in enumerate(rng.integers(1, LENGTH + 1, BATCH)):
            y[row, length:] = IGNORED
        if step == 3:
            y[0] = IGNORED
        out.append((x, y))
    return out


#: each loss with the torch.nn.functional criterion a PyTorch loop writes for it
LOSSES = {
    "cross_entropy": (ut.CrossEntropyLoss(), F.cross_entropy),
    "smoothed_sum": (ut.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"),
                     lambda pred, y: F.cross_entropy(pred, y, label_smoothing=0.1, reduction="sum")),
}  # fmt: skip


def _loop(backend, loss, dtype="float32"):
    module = importlib.import_module(f"unitrain.backends.{backend}")
    cls = next(value for value in vars(module).values() if isinstance(value, type) and getattr(value, "name", None)
               == backend and issubclass(value, ut.TrainingLoop))  # fmt: skip
    return cls(language_model(), loss=loss, optimizer=ut.SGD(lr=0.1, momentum=0.9), seed=SEED, dtype=dtype)


def _cases():
    """(backend, loss). MindSpore compiles for seconds per case: its per-position loss with ignored targets
    is trained in tests/test_padded.py (padded tags) and checked by check_per_position_losses."""
    for backend in installed_backends():
        if backend != "mindspore":
            yield from (pytest.param(backend, name, id=f"{backend}-{name}") for name in LOSSES)


@pytest.mark.parametrize(("backend", "name"), list(_cases()))
def test_per_position_loss_with_ignored_targets_trains_like_torch(backend, name):
    """20 SGD-momentum steps: losses, weights and momentum buffers within PyTorch's float32 drift of its
    float64 run (NumPy also in float64, within the conformance formula); then evaluate's loss is the mean
    over the targets that count and its accuracy counts only those, as computed from torch's outputs."""
    loss, criterion = LOSSES[name]
    data = batches()
    initial = ut.init_weights(language_model(), SEED)
    runs = torch_runs(lambda dtype: load_state(LanguageModel().to(dtype), initial),
                      lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False), data,
                      criterion=criterion)  # fmt: skip
    # the longest sum of one step: a weight gradient through time adds batch x steps terms of the widest input
    size = BATCH * LENGTH * max(HIDDEN, EMBEDDING, VOCABULARY)
    for dtype in ("float32", "float64") if backend == "numpy" else ("float32",):
        loop = _loop(backend, loss, dtype)
        losses = np.array([loop.to_float(loop.step(batch)) for batch in data])
        expected, tolerances = expected_run(runs, dtype, size)
        assert_within_drift({"loss": losses}, expected.losses, tolerances.losses)
        assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
        buffers = {key: value for key, value in loop.optimizer_state_dict().items() if key != "step"}
        assert_within_drift(buffers, expected.buffers, tolerances.buffers)

    x = np.concatenate([x for x, _ in data[:3]])
    y = np.concatenate([y for _, y in data[:3]])
    model = load_state(LanguageModel().double().eval(), loop.state_dict())
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        mean = float(F.cross_entropy(logits, torch.from_numpy(y), label_smoothing=loss.label_smoothing))
    counted = y != IGNORED
    correct = int((logits.argmax(1).numpy() == y)[counted].sum())
    metrics = loop.evaluate((x, y), batch_size=5)
    # the loop's forward (float32 on most backends) against float64: the formula over the step's longest
    # sum, then the mean over every position's loss
    allowed = tolerance(loop.dtype, size + y.size, mean)
    assert metrics["loss"] == pytest.approx(mean, rel=0, abs=allowed)
    assert (metrics["num_correct"], metrics["num_samples"]) == (correct, len(x))
    assert metrics["accuracy"] == pytest.approx(correct / counted.sum(), rel=0, abs=tolerance(np.float64, 1))


def test_numpy_nll_loss_with_an_ignore_index_inside_the_classes():
    """NLLLoss(ignore_index=0) over (N, C, T) log-probabilities: value and gradient equal torch's in float64
    (a class index may be the ignored one: padding's id)."""
    rng = np.random.default_rng(SEED)
    logp = torch.log_softmax(torch.from_numpy(rng.standard_normal((3, 4, 5))), 1).requires_grad_()
    y = rng.integers(0, 4, (3, 5))
    expected = F.nll_loss(logp, torch.from_numpy(y), ignore_index=0)
    expected.backward()
    terms, grad = _loss_terms(ut.NLLLoss(ignore_index=0), logp.detach().numpy(), y)
    allowed = 2 * tolerance(np.float64, terms.size, expected.item())  # two float64 means of the same terms
    assert terms.size == np.count_nonzero(y) and terms.mean() == pytest.approx(expected.item(), rel=0, abs=allowed)
    # one rounding of each scaled entry, in float64 (the conformance formula over a chain of 1)
    want = logp.grad.numpy()
    np.testing.assert_allclose(grad(1 / terms.size), want, rtol=0, atol=tolerance(np.float64, 1, np.abs(want).max()))


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (np.full((2, LENGTH), VOCABULARY), f"label {VOCABULARY} is out of range: the model has {VOCABULARY} classes "
                                           f"(0..{VOCABULARY - 1}, or ignore_index=-100)"),
        (np.full((2, LENGTH), -1), "label -1 is out of range"),
        (np.zeros((2, LENGTH + 1), np.int64), f"needs model outputs of shape (N, classes, {LENGTH + 1}) for targets "
                                              f"of shape (2, {LENGTH + 1}), the model gives per-sample shape "
                                              f"({VOCABULARY}, {LENGTH})"),
        (np.zeros(2, np.int64), "needs model outputs of shape (N, classes)"),
    ],
)  # fmt: skip
def test_bad_per_position_targets_are_refused_in_one_line_before_any_framework_work(y, message):
    loop = _loop("numpy", ut.CrossEntropyLoss())
    with pytest.raises(InputError) as error:
        loop.step((np.zeros((2, LENGTH), np.int64), y))
    assert message in str(error.value) and "\n" not in str(error.value)
