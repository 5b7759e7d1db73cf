"""Data-parallel throughput: samples/s of one process against N processes on each backend's own
engine, and what the engine's communication costs per step.

    .venv/bin/python benchmarks/bench_distributed.py [--backends numpy,torch,chainer] [--nproc 2] [--steps 200]
        [--repeats 3]

The MLP at global batch 64, SGD lr 0.01, MNIST in file order. One process is a plain loop using
every core; N processes are started by the backend's launcher (as ``unitrain train --nproc N``
does), each with cores / N threads, and each computes its shard of every global batch. The
communication cost is the time of what a data-parallel step adds: one allreduce of all gradients
(``_reduce_gradients``) and two of a scalar (the global loss, and the stop flag of Ctrl-C), timed
back to back after the training steps so that no rank waits for a slower one. ``--repeats R``
runs each case R times, alternating, and keeps the best figures (a shared machine's load only
ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

import unitrain
from unitrain import distributed, registry
from unitrain.data import load_mnist

WARMUP, COMMUNICATION_REPEATS = 20, 50


def worker(backend: str, steps: int, batch_size: int) -> dict:
    """Runs in each process (alone, or started by the launcher); rank 0 returns the figures."""
    spec = registry.backend_specs()[backend]
    launched = distributed.launched_world_size(spec.launcher) is not None
    loop = unitrain.make_loop(backend, unitrain.mlp(), seed=0, distributed=launched)
    batches = list(load_mnist("train").batches(batch_size))[: WARMUP + steps]
    for batch in batches[:WARMUP]:
        loop.to_float(loop.step(batch))
    started = time.perf_counter()
    for batch in batches[WARMUP:]:
        loop.to_float(loop.step(batch))  # a data-parallel step syncs anyway (the global loss)
    elapsed = time.perf_counter() - started
    figures = {"backend": backend, "processes": loop.world_size, "samples_per_sec": steps * batch_size / elapsed}
    if loop.world_size > 1:
        loop.any_rank(False)  # line the ranks up
        started = time.perf_counter()
        for _ in range(COMMUNICATION_REPEATS):
            loop._reduce_gradients(1 / loop.world_size)
            loop._all_sum(np.zeros(1))
            loop._all_sum(np.zeros(1))
        figures["communication_ms_per_step"] = 1e3 * (time.perf_counter() - started) / COMMUNICATION_REPEATS
        figures["step_ms"] = 1e3 * elapsed / steps
    loop.any_rank(False)  # the ranks end together (msrun's teardown needs it)
    return figures if loop.rank == 0 else {}


def measure(backend: str, nproc: int, steps: int, batch_size: int) -> dict:
    arguments = [__file__, "--as-worker", "--backends", backend, "--steps", str(steps), "--batch-size", str(batch_size)]
    launcher = registry.backend_specs()[backend].launcher
    with tempfile.TemporaryDirectory() as logs:  # msrun's workers' output
        if nproc == 1:
            run = [sys.executable, *arguments]
        else:
            run = distributed.command(launcher, nproc, arguments, log_dir=logs)
        env = distributed.environment(launcher, nproc)
        output = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy,torch,chainer")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    # not --worker: msrun's parser would take it for an abbreviation of its --worker_num
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        figures = worker(args.backends, args.steps, args.batch_size)
        if figures:
            print(json.dumps(figures), flush=True)
        return
    print("| backend | processes | samples/s | step ms | communication ms/step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for backend in args.backends.split(","):
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for nproc in (1, args.nproc):
                figures = measure(backend, nproc, args.steps, args.batch_size)
                kept = best.setdefault(nproc, figures)
                for key, value in figures.items():
                    if isinstance(value, float):
                        kept[key] = max(kept[key], value) if key == "samples_per_sec" else min(kept[key], value)
        for nproc, figures in best.items():
            step = figures.get("step_ms")
            communication = figures.get("communication_ms_per_step")
            print(f"| {backend} | {nproc} | {figures['samples_per_sec']:.0f} | {f'{step:.2f}' if step else '-'} | "
                  f"{f'{communication:.2f}' if communication else '-'} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
