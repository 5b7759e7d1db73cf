"""PyTorch's "Sequence Models and Long Short-Term Memory Networks" tutorial (Robert Guthrie): the LSTM
part-of-speech tagger, with its inline data, on any backend.

What maps to what (PyTorch -> unitrain):

* ``LSTMTagger`` (``word_embeddings`` -> ``lstm`` -> ``hidden2tag`` -> ``log_softmax(dim=1)``) ->
  a ``Sequential`` with the same child names, so the ``state_dict`` keys are the tutorial model's
  (``word_embeddings.weight``, ``lstm.weight_ih_l0`` ...). The tutorial feeds one sentence as
  ``(len(sentence), 1, EMBEDDING_DIM)`` to a time-first ``nn.LSTM`` and views its output as
  ``(len(sentence), HIDDEN_DIM)``: here the input is the sentence's ids as ``(len(sentence), 1)``,
  ``Embedding`` makes it ``(len(sentence), 1, 6)``, the time-first ``LSTM`` keeps that layout and
  ``Flatten`` is the tutorial's ``view``. The loop's "samples" are the sentence's words: exactly the
  rows ``NLLLoss`` averages over in the tutorial.
* ``prepare_sequence`` -> :func:`prepare_sequence` (NumPy int64 instead of a ``torch.tensor``); the
  ids go in as integers.
* ``nn.NLLLoss()``, ``optim.SGD(lr=0.1)``, 300 epochs of one step per sentence -> ``NLLLoss()``,
  ``SGD(lr=0.1)``, ``loop.step((sentence_in, targets))``.
* ``torch.manual_seed(1)`` -> ``seed=1`` (every backend starts from the same ``init_weights``; they
  are not torch's draws, so the printed scores differ from the tutorial's, not the outcome).

After training, the tutorial expects the first sentence ("The dog ate the apple") tagged
``0 1 2 0 1``: DET NN V DET NN. Run: ``python examples/lstm_tagger.py --backend chainer``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import unitrain

training_data = [  # as the tutorial writes it
    # Tags are: DET - determiner; NN - noun; V - verb
    # For example, the word "The" is a determiner
    ("The dog ate the apple".split(), ["DET", "NN", "V", "DET", "NN"]),  # noqa: SIM905
    ("Everybody read that book".split(), ["NN", "V", "DET", "NN"]),  # noqa: SIM905
]
word_to_ix: dict[str, int] = {}
for sent, _ in training_data:
    for word in sent:
        if word not in word_to_ix:  # word has not been assigned an index yet
            word_to_ix[word] = len(word_to_ix)  # Assign each word with a unique index
tag_to_ix = {"DET": 0, "NN": 1, "V": 2}  # Assign each tag with a unique index

# These will usually be more like 32 or 64 dimensional.
# We will keep them small, so we can see how the weights change as we train.
EMBEDDING_DIM = 6
HIDDEN_DIM = 6


def prepare_sequence(seq, to_ix) -> np.ndarray:
    return np.array([to_ix[w] for w in seq], np.int64)


def lstm_tagger(embedding_dim: int, hidden_dim: int, vocab_size: int, tagset_size: int) -> unitrain.Sequential:
    return unitrain.Sequential({
        "word_embeddings": unitrain.Embedding(vocab_size, embedding_dim),
        "lstm": unitrain.LSTM(embedding_dim, hidden_dim),  # time first, as the tutorial's
        "flatten": unitrain.Flatten(),  # lstm_out.view(len(sentence), -1)
        "hidden2tag": unitrain.Linear(hidden_dim, tagset_size),
        "log_softmax": unitrain.LogSoftmax(dim=1),
    })  # fmt: skip


def main(argv=None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("UNITRAIN_BACKEND", "numpy"))
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args(argv)

    model = lstm_tagger(EMBEDDING_DIM, HIDDEN_DIM, len(word_to_ix), len(tag_to_ix))
    loop = unitrain.make_loop(args.backend, model, unitrain.NLLLoss(), unitrain.SGD(lr=0.1), seed=1)

    # See what the scores are before training
    # Note that element i,j of the output is the score for tag j for word i.
    inputs = prepare_sequence(training_data[0][0], word_to_ix)[:, None]  # (len(sentence), 1)
    print(np.round(loop.predict(inputs), 4))

    for _ in range(args.epochs):  # again, normally you would NOT do 300 epochs, it is toy data
        for sentence, tags in training_data:
            sentence_in = prepare_sequence(sentence, word_to_ix)[:, None]
            targets = prepare_sequence(tags, tag_to_ix)
            loop.step((sentence_in, targets))

    # See what the scores are after training
    tag_scores = loop.predict(inputs)
    print(np.round(tag_scores, 4))
    # The sentence is "the dog ate the apple". i,j corresponds to score for tag j for word i. The
    # predicted tag is the maximum scoring tag: the tutorial expects 0 1 2 0 1, DET NOUN VERB DET NOUN.
    predicted = [int(i) for i in tag_scores.argmax(1)]
    print("predicted tags:", " ".join(map(str, predicted)))
    return predicted


if __name__ == "__main__":
    main()
