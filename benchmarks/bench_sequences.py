"""Sequence models' training-step throughput: unitrain's adapters against each framework's
hand-written loop, same run.

    .venv/bin/python benchmarks/bench_sequences.py [--models char-lm,transformer] [--backends numpy,torch,...]
        [--steps N] [--repeats R] [--threads N] [--cpu-time] [--json FILE]

The models: examples/char_lm.py's character LSTM language model (Embedding -> LSTM(batch_first) ->
Linear per position, cross-entropy over ``(N, vocabulary, T)``) on windows of the shipped text, and
examples/transformer_classifier.py's Transformer-encoder classifier (token ids and a padding mask).
Each is timed through ``loop.step`` and through the framework's own tutorial loop written here by hand
(plain SGD, ``zero_grad / forward / backward / step`` and the like): PyTorch's ``nn.LSTM`` /
``nn.TransformerEncoder``, Chainer's ``NStepLSTM``, MindSpore's ``nn.LSTM`` in one ``@jit`` step.
NumPy has no native loop; its ratio is against PyTorch's. Both sides are timed alternately, ``R``
times, each first in every other repeat, keeping each side's best (other processes' load only slows
a side down). The natives start from their frameworks' own initial weights: an LSTM's or attention's
cost does not depend on the values. The Transformer has native loops for PyTorch (and NumPy against
it) only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import unitrain
from unitrain import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from char_lm import char_lm  # noqa: E402  (the examples are scripts, not a package)
from transformer_classifier import D_MODEL, LENGTH, VOCAB, make_data, transformer_classifier  # noqa: E402

LR = 0.05
LM_LENGTH, LM_EMBEDDING, LM_HIDDEN, LM_BATCH = 64, 32, 128, 32
TRANSFORMER_BATCH = 32


def lm_batches(count: int):
    data = text.language_model_data(text.shipped_text()[:60000], LM_LENGTH)
    x, y = data.train.x, data.train.y
    size = len(data.vocabulary)
    return size, [(x[i : i + LM_BATCH], y[i : i + LM_BATCH]) for i in range(0, LM_BATCH * count, LM_BATCH)]


def transformer_batches(count: int):
    (tokens, padding), labels = make_data(TRANSFORMER_BATCH * count, np.random.default_rng(0))
    return [((tokens[i : i + TRANSFORMER_BATCH], padding[i : i + TRANSFORMER_BATCH]), labels[i : i + TRANSFORMER_BATCH])
            for i in range(0, len(labels), TRANSFORMER_BATCH)]  # fmt: skip


# --- the hand-written loops ------------------------------------------------------------------------


def torch_lm(vocabulary: int):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocabulary, LM_EMBEDDING)
            self.lstm = nn.LSTM(LM_EMBEDDING, LM_HIDDEN, batch_first=True)
            self.decoder = nn.Linear(LM_HIDDEN, vocabulary)

        def forward(self, x):
            out, _ = self.lstm(self.embed(x))
            return self.decoder(out).permute(0, 2, 1)

    net = CharLM()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)

    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def chainer_lm(vocabulary: int):
    import chainer
    import chainer.functions as F
    import chainer.links as L

    model = chainer.Chain()
    with model.init_scope():
        model.embed = L.EmbedID(vocabulary, LM_EMBEDDING)
        model.lstm = L.NStepLSTM(1, LM_EMBEDDING, LM_HIDDEN, 0.0)
        model.decoder = L.Linear(LM_HIDDEN, vocabulary)
    optimizer = chainer.optimizers.SGD(lr=LR)
    optimizer.setup(model)

    def step(x, y):
        embedded = model.embed(x)  # (N, T, E): NStepLSTM takes a list of (T, E) sequences
        _, _, hs = model.lstm(None, None, list(F.separate(embedded, axis=0)))
        logits = model.decoder(F.concat(hs, axis=0))
        loss = F.softmax_cross_entropy(logits, y.reshape(-1).astype(np.int32))
        model.cleargrads()
        loss.backward()
        optimizer.update()
        return float(loss.array)

    return step


def mindspore_lm(vocabulary: int):
    import mindspore as ms
    from mindspore import nn, ops

    ms.set_device("CPU")

    class CharLM(nn.Cell):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocabulary, LM_EMBEDDING)
            self.lstm = nn.LSTM(LM_EMBEDDING, LM_HIDDEN, batch_first=True)
            self.decoder = nn.Dense(LM_HIDDEN, vocabulary)

        def construct(self, x):
            out, _ = self.lstm(self.embed(x))
            return self.decoder(out)

    net = CharLM()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = nn.SGD(net.trainable_params(), learning_rate=LR)

    def forward(x, y):
        logits = net(x)
        return loss_fn(ops.reshape(logits, (-1, vocabulary)), ops.reshape(y, (-1,)))

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    @ms.jit
    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        optimizer(grads)
        return loss

    def step(x, y):
        return float(train_step(ms.Tensor.from_numpy(x.astype(np.int32)), ms.Tensor.from_numpy(y.astype(np.int32))))

    return step


def torch_transformer():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, D_MODEL, padding_idx=0)
            layer = nn.TransformerEncoderLayer(D_MODEL, 2, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.classifier = nn.Linear(D_MODEL, 3)
            position = unitrain.PositionalEncoding(D_MODEL, max_len=LENGTH, batch_first=True).table(LENGTH)
            self.register_buffer("pe", torch.from_numpy(position).float()[None], persistent=False)

        def forward(self, tokens, padding):
            h = self.encoder(self.embedding(tokens) + self.pe, src_key_padding_mask=padding != 0)
            return self.classifier(h[:, 0])

    net = Classifier()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)

    def step(x, y):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(*(torch.from_numpy(part) for part in x)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


#: model -> (unitrain graph of the data's vocabulary, batches, {framework: native step of the vocabulary})
MODELS = {
    "char-lm": (lambda size: char_lm(size, LM_LENGTH, LM_EMBEDDING, LM_HIDDEN), lm_batches,
                {"torch": torch_lm, "chainer": chainer_lm, "mindspore": mindspore_lm}),
    "transformer": (lambda size: transformer_classifier(), lambda count: (VOCAB, transformer_batches(count)),
                    {"torch": lambda size: torch_transformer()}),
}  # fmt: skip


#: the timer of the step loops: wall-clock, or with --cpu-time the process's CPU time, which other processes'
#: load disturbs far less (with one thread per framework, both sides are counted alike)
clock = time.perf_counter


def _time(step, batches, steps, warmup) -> float:
    """Samples per second over ``steps`` steps after ``warmup`` (each step returns a float: synced)."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    started = clock()
    for i in range(steps):
        step(*batches[i % len(batches)])
    return steps * len(batches[0][1]) / (clock() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", default="numpy,torch,chainer,mindspore")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="time both sides this often, alternately; keep the best")
    parser.add_argument("--threads", type=int, help="compute threads of every framework (default: their own)")
    parser.add_argument("--cpu-time", action="store_true", help="time the steps in process CPU time, not wall-clock")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    frameworks = set(args.backends.split(","))
    # MindSpore's own pool defaults to 25 threads whatever the cores: on a loaded 2-core machine its
    # steps then swing by 10x from one to the next, which is how its hand-written loop measured 60 samples/s
    for backend in frameworks | ({"torch"} if "numpy" in frameworks else set()) if args.threads else ():
        unitrain.get_backend(backend).set_threads(args.threads)  # its pool and the BLAS's, shared by the natives

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; framework threads: "
          f"{args.threads or 'their defaults'}; clock: {'CPU time' if args.cpu_time else 'wall'}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("\n| model | backend | unitrain samples/s | native loop | native samples/s | unitrain / native |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    results = []
    for model_name in args.models.split(","):
        make_graph, make_batches, natives = MODELS[model_name]
        size, batches = make_batches(max(args.steps, 4))
        for backend in args.backends.split(","):
            reference = "torch" if backend == "numpy" else backend
            if reference not in natives:
                continue
            native_step = natives[reference](size)
            loop = unitrain.make_loop(backend, make_graph(size), unitrain.CrossEntropyLoss(), unitrain.SGD(lr=LR),
                                      seed=0)  # fmt: skip
            sides = {"ours": lambda x, y, loop=loop: loop.to_float(loop.step((x, y))), "native": native_step}
            best = dict.fromkeys(sides, 0.0)
            for repeat in range(args.repeats):  # each side first in every other repeat: no order favours one
                for side in sorted(sides, reverse=repeat % 2 == 1):
                    best[side] = max(best[side], _time(sides[side], batches, args.steps, args.warmup))
            ours, native = best["ours"], best["native"]
            results.append({"model": model_name, "backend": backend, "unitrain_samples_per_sec": ours,
                            "native": reference, "native_samples_per_sec": native, "ratio": ours / native})  # fmt: skip
            r = results[-1]
            print(f"| {r['model']} | {r['backend']} | {ours:.0f} | {reference} | {native:.0f} | {r['ratio']:.2f} |",
                  flush=True)  # fmt: skip
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
