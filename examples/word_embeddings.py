"""PyTorch's "Word Embeddings: Encoding Lexical Semantics" tutorial (Robert Guthrie): the N-gram language
model on Shakespeare's Sonnet 2, with its inline data, on any backend.

What maps to what (PyTorch -> unitrain):

* ``NGramLanguageModeler`` (``embeddings`` -> ``view((1, -1))`` -> ``linear1`` -> ``relu`` -> ``linear2``
  -> ``log_softmax(dim=1)``) -> a ``Sequential`` with the same child names, so the ``state_dict`` keys
  are the tutorial model's (``embeddings.weight``, ``linear1.weight`` ...); ``Flatten`` is the view.
* the tutorial feeds one context of ``CONTEXT_SIZE`` word ids per step -> ``(1, CONTEXT_SIZE)`` int64
  ids, the loop's one sample.
* ``nn.NLLLoss()``, ``optim.SGD(lr=0.001)``, 10 epochs of one step per n-gram, the total loss per epoch
  printed -> ``NLLLoss()``, ``SGD(lr=0.001)``, ``loop.step``, the same totals.
* ``torch.manual_seed(1)`` -> ``seed=1`` (the same ``init_weights`` on every backend, not torch's draws,
  so the totals differ from the tutorial's; they fall every epoch as there).

The tutorial prints the loss decreasing every epoch and the embedding of "beauty"; so does this script.
Run: ``python examples/word_embeddings.py --backend mindspore``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import unitrain

CONTEXT_SIZE = 2
EMBEDDING_DIM = 10
# We will use Shakespeare Sonnet 2
test_sentence = """When forty winters shall besiege thy brow,
And dig deep trenches in thy beauty's field,
Thy youth's proud livery so gazed on now,
Will be a totter'd weed of small worth held:
Then being asked, where all thy beauty lies,
Where all the treasure of thy lusty days;
To say, within thine own deep sunken eyes,
Were an all-eating shame, and thriftless praise.
How much more praise deserv'd thy beauty's use,
If thou couldst answer 'This fair child of mine
Shall sum my count, and make my old excuse,'
Proving his beauty by succession thine!
This were to be new made when thou art old,
And see thy blood warm when thou feel'st it cold.""".split()  # noqa: SIM905 (as the tutorial writes it)
# we should tokenize the input, but we will ignore that for now
# build a list of tuples.
# Each tuple is ([ word_i-CONTEXT_SIZE, ..., word_i-1 ], target word)
ngrams = [
    ([test_sentence[i - j - 1] for j in range(CONTEXT_SIZE)], test_sentence[i])
    for i in range(CONTEXT_SIZE, len(test_sentence))
]
vocab = set(test_sentence)
word_to_ix = {word: i for i, word in enumerate(sorted(vocab))}  # sorted: the same ids in every run


def ngram_language_modeler(vocab_size: int, embedding_dim: int, context_size: int) -> unitrain.Sequential:
    return unitrain.Sequential({
        "embeddings": unitrain.Embedding(vocab_size, embedding_dim),
        "view": unitrain.Flatten(),  # embeds.view((1, -1))
        "linear1": unitrain.Linear(context_size * embedding_dim, 128),
        "relu": unitrain.ReLU(),
        "linear2": unitrain.Linear(128, vocab_size),
        "log_softmax": unitrain.LogSoftmax(dim=1),
    })  # fmt: skip


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("UNITRAIN_BACKEND", "numpy"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)

    model = ngram_language_modeler(len(vocab), EMBEDDING_DIM, CONTEXT_SIZE)
    loop = unitrain.make_loop(args.backend, model, unitrain.NLLLoss(), unitrain.SGD(lr=0.001), seed=1)
    losses = []
    for _ in range(args.epochs):
        total_loss = 0
        for context, target in ngrams:
            # Step 1. Turn the words into integer indices
            context_idxs = np.array([[word_to_ix[w] for w in context]], np.int64)
            # Steps 2 to 5: zero_grad, forward, NLL loss, backward, update, as one step
            loss = loop.step((context_idxs, np.array([word_to_ix[target]], np.int64)))
            # Get the Python number from the loss
            total_loss += loop.to_float(loss)
        losses.append(total_loss)
    print(losses)  # The loss decreased every iteration over the training data!

    # To get the embedding of a particular word, e.g. "beauty"
    print(loop.state_dict()["embeddings.weight"][word_to_ix["beauty"]])
    return losses


if __name__ == "__main__":
    main()
