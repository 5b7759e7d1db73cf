"""A Transformer-encoder text classifier (Keras' "Text classification with Transformer" and PyTorch's
``nn.TransformerEncoder`` put together) on a synthetic task that only attention solves, on any backend.

The task: each sequence is a ``[CLS]`` token, then 4 to 11 words: filler words, the marker ``?``
and each of the three label words once; the label is the word right after the marker. Every sequence
holds the same label words, so counting words (a bag of words, a mean of embeddings) is at chance
(1/3): the model must relate each word to its position next to the marker. Sequences are padded to
one length with token 0, and the padding is masked out of attention.

What maps to what (PyTorch -> unitrain):

* ``nn.Embedding(VOCAB, D, padding_idx=0)``, word_language_model's ``PositionalEncoding``,
  ``nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 64, dropout=0, batch_first=True), 2)``
  and ``nn.Linear(D, 3)`` on the ``[CLS]`` position -> the same specs in a :class:`unitrain.Graph`
  with two inputs, the token ids and the padding mask (the ``state_dict`` keys are PyTorch's:
  ``encoder.layers.0.self_attn.in_proj_weight`` ...);
* ``encoder(x, src_key_padding_mask=tokens == 0)`` -> the graph input ``padding`` (1 where padded);
* ``nn.CrossEntropyLoss()`` and ``optim.Adam(lr=3e-3)`` -> ``CrossEntropyLoss()``, ``Adam(lr=3e-3)``.

Run: ``python examples/transformer_classifier.py --backend chainer`` (it prints the test accuracy;
after the default 10 epochs it is above 0.9 on every backend).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import unitrain
from unitrain.graph import Input

PAD, CLS, MARKER = 0, 1, 2
CLASSES = 3  # the words 3, 4, 5 are the labels' words
VOCAB = 12
LENGTH = 12  # [CLS] and up to 11 words
D_MODEL = 32


def make_data(count: int, rng: np.random.Generator) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """``((tokens, padding), labels)``: ``count`` padded sequences of ids, their masks (1 = padding)."""
    tokens = np.zeros((count, LENGTH), np.int64)
    labels = rng.integers(0, CLASSES, count)
    for row, label in zip(tokens, labels, strict=True):
        size = rng.integers(CLASSES + 1, LENGTH)
        words = rng.integers(MARKER + 1 + CLASSES, VOCAB, size)  # filler words
        at = rng.integers(0, size - 1)
        words[at], words[at + 1] = MARKER, MARKER + 1 + label
        elsewhere = rng.choice([i for i in range(size) if i not in (at, at + 1)], CLASSES - 1, replace=False)
        words[elsewhere] = [MARKER + 1 + other for other in range(CLASSES) if other != label]
        row[0], row[1 : 1 + len(words)] = CLS, words
    return (tokens, (tokens == PAD).astype(np.float32)), labels


def transformer_classifier() -> unitrain.Graph:
    tokens, padding = Input((LENGTH,), "tokens"), Input((LENGTH,), "padding")
    layer = unitrain.TransformerEncoderLayer(D_MODEL, 2, 64, batch_first=True, seq_len=LENGTH, padding_mask=True)
    modules = {
        "embedding": unitrain.Embedding(VOCAB, D_MODEL, padding_idx=PAD),
        "position": unitrain.PositionalEncoding(D_MODEL, max_len=LENGTH, batch_first=True),
        "encoder": unitrain.TransformerEncoder(layer, 2),
        "classifier": unitrain.Linear(D_MODEL, CLASSES),
    }
    hidden = modules["encoder"](modules["position"](modules["embedding"](tokens)), padding)
    return unitrain.Graph([tokens, padding], modules["classifier"](hidden.select(1, 0)), modules)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("UNITRAIN_BACKEND", "numpy"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    (train_x, train_y), (test_x, test_y) = make_data(2048, rng), make_data(512, rng)
    loop = unitrain.make_loop(args.backend, transformer_classifier(), unitrain.CrossEntropyLoss(),
                              unitrain.Adam(lr=3e-3), seed=0)  # fmt: skip
    steps, batch = 0, 32
    for epoch in range(args.epochs):
        order = rng.permutation(len(train_y))
        losses = []
        for start in range(0, len(order), batch):
            if args.max_steps is not None and steps >= args.max_steps:
                break
            index = order[start : start + batch]
            losses.append(loop.to_float(loop.step(((train_x[0][index], train_x[1][index]), train_y[index]))))
            steps += 1
        if losses:
            print(f"epoch {epoch + 1}: mean training loss {np.mean(losses):.4f}")
    accuracy = float((loop.predict(test_x).argmax(1) == test_y).mean())
    print(f"test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
