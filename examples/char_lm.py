"""A character-level LSTM language model on the text shipped with unitrain (the tz database's NEWS,
public domain), trained on any backend, with its validation perplexity and a sampled continuation.

The model, as PyTorch's char-RNN examples write it: ``Embedding`` -> ``LSTM(batch_first=True)`` ->
``Linear`` to one logit per character, as a :class:`~unitrain.graph.Graph` whose last operation puts
the class axis second, ``(N, vocabulary, T)``, the layout ``CrossEntropyLoss`` takes for per-position
targets (``F.cross_entropy(logits.permute(0, 2, 1), targets)`` in PyTorch). The text is cut into
consecutive windows of ``--length`` characters, each target the next character
(:func:`unitrain.text.language_model_data`); the last tenth is the validation text.

The bar the validation perplexity must fall below is derived from the data, not chosen: the
perplexity of the best model that sees one character of context, the bigram model counted on the
training text (add-one smoothing, so that an unseen pair has a probability). A recurrent model that
beats it has learned more than which letter follows which. The script prints both and exits 1 if
the LSTM does not beat it. Run: ``python examples/char_lm.py --backend chainer``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import unitrain
from unitrain import text
from unitrain.graph import Graph, Input


def char_lm(vocabulary: int, length: int, embedding: int, hidden: int) -> Graph:
    tokens = Input((length,), name="tokens")
    embed = unitrain.Embedding(vocabulary, embedding)
    lstm = unitrain.LSTM(embedding, hidden, batch_first=True)
    decoder = unitrain.Linear(hidden, vocabulary)
    logits = decoder(lstm(embed(tokens))).permute(0, 2, 1)  # (N, vocabulary, T)
    return Graph(tokens, logits, modules={"embedding": embed, "lstm": lstm, "decoder": decoder})


def bigram_perplexity(train_ids: np.ndarray, val_ids: np.ndarray, vocabulary: int) -> float:
    """Perplexity on ``val_ids`` of next-character probabilities counted on ``train_ids``, add-one smoothed."""
    counts = np.ones((vocabulary, vocabulary))
    np.add.at(counts, (train_ids[:-1], train_ids[1:]), 1)
    probabilities = counts / counts.sum(1, keepdims=True)
    return float(np.exp(-np.log(probabilities[val_ids[:-1], val_ids[1:]]).mean()))


def sample(loop, vocabulary: text.Vocabulary, prompt: str, count: int, length: int, temperature: float,
           seed: int) -> str:  # fmt: skip
    """``count`` characters after ``prompt``, each drawn from the model's softmax at the last position
    of the latest ``length`` characters (a prompt shorter than that is padded on the left with its first
    character), divided by ``temperature``."""
    rng = np.random.default_rng(seed)
    ids = list(vocabulary.encode(prompt))
    for _ in range(count):
        window = ([ids[0]] * length + ids)[-length:]
        logits = loop.predict(np.array([window], np.int64))[0, :, -1].astype(np.float64) / temperature
        probabilities = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(probabilities), p=probabilities / probabilities.sum())))
    return vocabulary.decode(ids[len(prompt) :])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("UNITRAIN_BACKEND", "numpy"))
    parser.add_argument("--chars", type=int, default=60000, help="the first CHARS characters of the text")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=120, help="characters to sample after training")
    args = parser.parse_args(argv)

    data = text.language_model_data(text.shipped_text()[: args.chars], args.length)
    size = len(data.vocabulary)
    model = char_lm(size, args.length, 32, 128)
    loop = unitrain.make_loop(args.backend, model, unitrain.CrossEntropyLoss(), unitrain.Adam(lr=args.lr),
                              seed=args.seed)  # fmt: skip
    for record in loop.fit(data.train, epochs=args.epochs, batch_size=args.batch_size, max_steps=args.max_steps,
                           val_data=data.val):  # fmt: skip
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, "
              f"val perplexity {np.exp(record['val_loss']):.2f}")  # fmt: skip

    # the windows are consecutive: their inputs and the last target are the token stream
    train_ids, val_ids = (np.append(part.x.reshape(-1), part.y[-1, -1]) for part in (data.train, data.val))
    result = {
        "perplexity": text.perplexity(loop.evaluate(data.val)),
        "bigram_perplexity": bigram_perplexity(train_ids, val_ids, size),
    }
    print(f"validation perplexity {result['perplexity']:.2f} (bigram model: {result['bigram_perplexity']:.2f}, "
          f"uniform: {size})")  # fmt: skip
    print("sample:", repr(sample(loop, data.vocabulary, "Release 2024a", args.sample, args.length, 0.8, args.seed)))
    return result


if __name__ == "__main__":
    main()  # a run cut short by --max-steps need not beat the bigram model: the figures say whether it did
