"""A model written as a unitrain Graph against the same model as a Sequential: training-step time.

    .venv/bin/python benchmarks/bench_graph.py [--steps N] [--repeats R] [--backends numpy,torch]

The tutorial CNN (``unitrain.cnn()``, batch 100, SGD lr 0.01) twice from the same weights and
batches: as the Sequential, and as a Graph calling each of its twelve layers as a module of its own
(the most nodes the model can have, so the graph's per-node work shows most). Both sides are timed
alternately ``R`` times and the best of each is kept; the ratio is graph speed over Sequential speed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import unitrain as ut
from unitrain.graph import Graph, Input


def layer_by_layer(model: ut.Sequential) -> Graph:
    x = Input((1, 28, 28))
    h, modules = x, {}
    for name, layer in model.children:
        h = layer(h)
        modules[f"layer{name}"] = layer
    return Graph(x, h, modules)


def seconds_per_step(loop, batches) -> float:
    loop.step(batches[0])  # warm-up: first-call allocations
    started = time.perf_counter()
    for batch in batches:
        loop.step(batch)
    return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="numpy,torch")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    batches = [(rng.random((100, 1, 28, 28), np.float32), rng.integers(0, 10, 100)) for _ in range(args.steps)]
    print("| backend | Sequential s/step | Graph s/step | graph / sequential speed |")
    print("| --- | ---: | ---: | ---: |")
    for backend in args.backends.split(","):
        adapter = ut.get_backend(backend)
        adapter.set_threads(1)
        sides = {"sequential": ut.cnn(), "graph": layer_by_layer(ut.cnn())}
        best = dict.fromkeys(sides, float("inf"))
        for _ in range(args.repeats):
            for side, model in sides.items():
                best[side] = min(best[side], seconds_per_step(adapter(model), batches))
        print(
            f"| {backend} | {best['sequential']:.4f} | {best['graph']:.4f} | {best['sequential'] / best['graph']:.2f} |"
        )


if __name__ == "__main__":
    main()
