"""A model written as a unitrain Graph against the same model as a Sequential: training-step time.

    .venv/bin/python benchmarks/bench_graph.py [--steps N] [--repeats R] [--backends numpy,torch]
        [--cpu-time] [--json FILE]

The tutorial CNN (``unitrain.cnn()``, batch 100, SGD lr 0.01) twice from the same weights and
batches: as the Sequential, and as a Graph calling each of its twelve layers as a module of its own
(the most nodes the model can have, so the graph's per-node work shows most). Both sides are timed
alternately ``R`` times and the best of each is kept; the ratio is graph speed over Sequential speed.
For torch, MindSpore and Chainer the framework's own hand-written loop of the same CNN
(``unitrain.native``) is timed in the same alternation: graph speed over native speed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import unitrain as ut
from unitrain.graph import Graph, Input
from unitrain.native import FRAMEWORKS, native_loop


def layer_by_layer(model: ut.Sequential) -> Graph:
    x = Input((1, 28, 28))
    h, modules = x, {}
    for name, layer in model.children:
        h = layer(h)
        modules[f"layer{name}"] = layer
    return Graph(x, h, modules)


def seconds_per_step(loop, batches) -> float:
    """``loop``: a unitrain loop, or a native one, whose ``step`` takes the batch's two arrays."""
    step = loop.step if isinstance(loop, ut.TrainingLoop) else lambda batch: loop.step(*batch)
    step(batches[0])  # warm-up: first-call allocations
    started = clock()
    for batch in batches:
        last = step(batch)
    loop.to_float(last)  # an asynchronous framework finishes
    return (clock() - started) / len(batches)


#: wall-clock, or with --cpu-time the process's CPU time (as benchmarks/bench_step.py's)
clock = time.perf_counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="numpy,torch")
    parser.add_argument("--cpu-time", action="store_true", help="time the steps in process CPU time, not wall-clock")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter
    results = []
    rng = np.random.default_rng(0)
    batches = [(rng.random((100, 1, 28, 28), np.float32), rng.integers(0, 10, 100)) for _ in range(args.steps)]
    print("| backend | Sequential s/step | Graph s/step | graph / sequential speed | native s/step | graph / native |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    state = ut.init_weights(ut.cnn(), seed=0)
    for backend in args.backends.split(","):
        adapter = ut.get_backend(backend)
        adapter.set_threads(1)
        sides = {"sequential": adapter(ut.cnn()), "graph": adapter(layer_by_layer(ut.cnn()))}
        if backend in FRAMEWORKS:
            sides["native"] = native_loop(backend, "cnn", state)
        best = dict.fromkeys(sides, float("inf"))
        for _ in range(args.repeats):
            for side, loop in sides.items():
                best[side] = min(best[side], seconds_per_step(loop, batches))
        native = f"{best['native']:.4f} | {best['native'] / best['graph']:.2f}" if "native" in best else "— | —"
        results.append({"model": "cnn as a graph", "backend": backend, "unitrain_seconds_per_step": best["graph"],
                        "sequential_seconds_per_step": best["sequential"],
                        "native_seconds_per_step": best.get("native")})  # fmt: skip
        print(f"| {backend} | {best['sequential']:.4f} | {best['graph']:.4f} | "
              f"{best['sequential'] / best['graph']:.2f} | {native} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
