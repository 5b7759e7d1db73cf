"""Training-step throughput: unitrain's adapters against hand-written native loops, same run.

    .venv/bin/python benchmarks/bench_step.py [--steps 200] [--backends numpy,torch,...] [--json FILE]

For each backend and model (the tutorial MLP at batch 64, the tutorial CNN at batch 100) it times
``steps`` SGD steps on the same MNIST batches, after a warm-up, through ``loop.step`` and through
the framework's own tutorial loop written by hand, and reports samples/s and the ratio
unitrain/native (1.00 = no overhead). NumPy has no native loop; its ratio is against PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import unitrain
from unitrain.native import native_loop

WARMUP = 20
MODELS = {"mlp": 64, "cnn": 100}


def _time(step, batches, steps) -> float:
    for x, y in batches[:WARMUP]:
        step(x, y)
    started = time.perf_counter()
    last = None
    for i in range(steps):
        x, y = batches[i % len(batches)]
        last = step(x, y)
    float(last)  # wait for asynchronous frameworks to finish
    return steps * len(batches[0][0]) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backends", default="numpy,torch,mindspore,chainer")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    started = time.perf_counter()
    train = unitrain.load_mnist("train")
    load_seconds = time.perf_counter() - started
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"MNIST train+cache load {load_seconds:.2f} s")  # fmt: skip
    results = []
    for model_name, batch_size in MODELS.items():
        batches = list(train.batches(batch_size))[: args.steps]
        state = unitrain.init_weights(unitrain.layers.preset(model_name), seed=0)
        for backend in args.backends.split(","):
            loop = unitrain.make_loop(backend, unitrain.layers.preset(model_name), seed=0)
            ours = _time(lambda x, y, loop=loop: loop.step((x, y)), batches, args.steps)
            reference = "torch" if backend == "numpy" else backend
            native = _time(native_loop(reference, model_name, state).step, batches, args.steps)
            results.append({"model": model_name, "batch": batch_size, "backend": backend,
                            "unitrain_samples_per_sec": ours, "native": reference,
                            "native_samples_per_sec": native, "ratio": ours / native})  # fmt: skip

    print("\n| model | backend | unitrain samples/s | native loop | native samples/s | unitrain / native |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for r in results:
        print(f"| {r['model']} (batch {r['batch']}) | {r['backend']} | {r['unitrain_samples_per_sec']:.0f} | "
              f"{r['native']} | {r['native_samples_per_sec']:.0f} | {r['ratio']:.2f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mnist_load_seconds": load_seconds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
