"""Training-step throughput: unitrain's adapters against hand-written native loops, same run.

    .venv/bin/python benchmarks/bench_step.py [--steps N] [--models mlp,...] [--backends numpy,torch,...] [--repeats R]
        [--threads N] [--cpu-time] [--json FILE]

For each backend and model (see ``BENCHES``: the tutorial MLP and CNN, LeNet, ResNet-18 on MNIST-sized
and 3x64x64 input) it times SGD steps on the same batches, after a warm-up, through ``loop.step`` and
through the framework's own tutorial loop written by hand, and reports samples/s and the ratio
unitrain/native (1.00 = no overhead). NumPy has no native loop; its ratio is against PyTorch.
``torch-compile`` is the torch adapter after ``loop.compile()`` (``torch.compile``) against PyTorch's eager
hand-written loop: compiled / eager. ``<framework>-native`` (``mindspore-native``, ...) is the A/A control: a
second instance of the hand-written loop in the adapter's place, whose ratio is this machine's noise alone.
Each ratio is the best block of each side (``--repeats`` alternated blocks); the median of the paired
blocks' ratios is printed beside it. The header names the CPU, the BLAS and the thread counts; for the
NumPy MLP the table is followed by its ceiling: the step's own matrix products alone (sgemm, same
shapes), timed in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import unitrain
from unitrain.native import native_loop, torch_loop

# the plain-PyTorch twins of unitrain's networks (ResNet-18 from torchvision's source) live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class Bench(NamedTuple):
    spec: object  # () -> the unitrain model
    batch: int
    steps: int  # timed steps (--steps overrides)
    warmup: int
    image: tuple[int, int, int] | None  # None: MNIST batches; else random images of this shape, 1000 classes


BENCHES = {
    "mlp": Bench(unitrain.mlp, 64, 200, 20, None),
    "cnn": Bench(unitrain.cnn, 100, 200, 20, None),
    "lenet": Bench(unitrain.lenet, 64, 200, 20, None),
    "resnet18-1x28x28": Bench(lambda: unitrain.resnet18(num_classes=10, in_channels=1), 16, 20, 3, None),
    "resnet18-3x64x64": Bench(unitrain.resnet18, 16, 10, 2, (3, 64, 64)),
}


def _batches(bench: Bench, train: unitrain.ArrayDataset, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    if bench.image is None:
        return list(train.batches(bench.batch))[:steps]
    rng = np.random.default_rng(0)
    count = min(steps, 4)  # a few distinct batches, cycled: the step's cost does not depend on the values
    return [
        (rng.standard_normal((bench.batch, *bench.image), np.float32), rng.integers(0, 1000, bench.batch))
        for _ in range(count)
    ]


#: the timer of the step loops: wall-clock, or with --cpu-time the process's CPU time, which other processes'
#: load disturbs far less (with one thread per framework, both sides are counted alike)
clock = time.perf_counter


def _time(step, batches, steps, warmup) -> float:
    for i in range(warmup):
        step(*batches[i % len(batches)])
    started = clock()
    last = None
    for i in range(steps):
        x, y = batches[i % len(batches)]
        last = step(x, y)
    float(last)  # wait for asynchronous frameworks to finish
    return steps * len(batches[0][0]) / (clock() - started)


def machine() -> str:
    """The CPU, the BLAS NumPy calls and the threads, and the load average (other processes' work)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    blas = f"{blas['name']} {blas.get('version', '')}"
    with contextlib.suppress(ImportError):  # the library actually loaded, its kernel and threads
        from threadpoolctl import threadpool_info

        libraries = [info for info in threadpool_info() if info["user_api"] == "blas"]
        blas = ", ".join(f"{info['internal_api']} {info['version']} ({info.get('architecture')}, "
                         f"{info['num_threads']} threads)" for info in libraries)  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"{cpu}, {cores} cores; BLAS {blas}; OMP_NUM_THREADS {threads}; load average {os.getloadavg()[0]:.1f}"


def numpy_mlp_ceiling(batch: int, repeats: int = 20) -> float:
    """Samples/s of the MLP step's matrix products alone in float32 (forward, weight gradients, input
    gradients but the first layer's), on preallocated arrays: what the NumPy backend could reach."""
    rng = np.random.default_rng(0)
    sizes = (784, 512, 512, 10)
    weights = [rng.standard_normal((n_out, n_in), np.float32) for n_in, n_out in itertools.pairwise(sizes)]
    acts = [rng.standard_normal((batch, n), np.float32) for n in sizes]
    outs = [np.empty((batch, n), np.float32) for n in sizes]
    grads = [np.empty_like(w) for w in weights]

    def step():
        for i, w in enumerate(weights):
            np.matmul(acts[i], w.T, out=outs[i + 1])
        for i, w in reversed(list(enumerate(weights))):
            np.matmul(acts[i + 1].T, acts[i], out=grads[i])
            if i:
                np.matmul(acts[i + 1], w, out=outs[i])

    step()
    best = min(_seconds(step, 10) for _ in range(repeats))
    return batch / best


def _seconds(fn, count: int) -> float:
    started = clock()
    for _ in range(count):
        fn()
    return (clock() - started) / count


def native_torch(model_name, state):
    from torch_reference import GarmentClassifier, ResNet18, torch_cnn, torch_mlp

    net = {
        "mlp": torch_mlp, "cnn": torch_cnn, "lenet": GarmentClassifier,
        "resnet18-1x28x28": lambda: ResNet18(num_classes=10, in_channels=1), "resnet18-3x64x64": ResNet18,
    }[model_name]()  # fmt: skip
    return torch_loop(net, state, unitrain.SGD(0.01)).step


def native_tutorial_loop(framework):
    """MindSpore's and Chainer's hand-written tutorial loops (unitrain/native.py, which
    ``unitrain compare --native`` runs too for the MLP and the CNN); the ResNet-18 benches share one
    network, its input channels and classes read from the weights."""

    def make(model_name, state):
        return native_loop(framework, model_name.split("-")[0], state).step

    return make


def across_processes(args) -> None:
    """This script's table as the median of ``args.processes`` runs, one process each: where a
    framework's heap and threads land differs from process to process, and moves a ratio more than
    alternating in one process can even out (MindSpore's LeNet, the same command three times:
    1.05, 1.01, 0.85). Each row's ratios per process follow it."""
    argv = ["--models", args.models, "--backends", args.backends, "--repeats", str(args.repeats),
            *(["--steps", str(args.steps)] if args.steps else []), *(["--cpu-time"] if args.cpu_time else []),
            *(["--threads", str(args.threads)] if args.threads else [])]  # fmt: skip
    reports = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.processes):
            out = Path(scratch) / f"{index}.json"
            subprocess.run([sys.executable, __file__, *argv, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            reports.append(json.loads(out.read_text()))
            print(f"process {index + 1} of {args.processes} done; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\nmachine: {reports[0]['machine']}; framework threads: {args.threads or 'their defaults'}; clock: "
          f"{'CPU time' if args.cpu_time else 'wall'}; median of {args.processes} processes")  # fmt: skip
    print("\n| model | backend | unitrain samples/s | native loop | native samples/s | unitrain / native "
          "| median pair | per process |")  # fmt: skip
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    results = []
    for runs in zip(*(report["results"] for report in reports), strict=True):
        ratios = [run["ratio"] for run in runs]
        results.append({**runs[0], **{key: statistics.median(run[key] for run in runs) for key in (
            "unitrain_samples_per_sec", "native_samples_per_sec", "ratio", "median_paired_ratio")},
            "process_ratios": ratios})  # fmt: skip
        r = results[-1]
        print(f"{_row(r)} {', '.join(f'{ratio:.2f}' for ratio in ratios)} |")
    ceilings = [report["numpy_mlp_ceiling"] for report in reports if report["numpy_mlp_ceiling"]]
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": reports[0]["machine"], "processes": args.processes,
            "mnist_load_seconds": statistics.median(report["mnist_load_seconds"] for report in reports),
            "numpy_mlp_ceiling": statistics.median(ceilings) if ceilings else None, "results": results,
        }, indent=1))  # fmt: skip


def _row(r: dict) -> str:
    """One result as a row of the table (its columns up to the median pair)."""
    return (
        f"| {r['model']} (batch {r['batch']}) | {r['backend']} | {r['unitrain_samples_per_sec']:.0f} | "
        f"{r['native']} | {r['native_samples_per_sec']:.0f} | {r['ratio']:.2f} | {r['median_paired_ratio']:.2f} |"
    )


def _framework(backend: str) -> str:
    """The framework a ``--backends`` entry runs: ``torch-compile`` and ``mindspore-native`` name their
    framework's adapter compiled and the A/A control."""
    return backend.removesuffix("-compile").removesuffix("-native")


NATIVE = {
    "torch": native_torch,
    "torch-compile": native_torch,
    "mindspore": native_tutorial_loop("mindspore"),
    "chainer": native_tutorial_loop("chainer"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="timed steps per model (default: each model's own, see BENCHES)")
    parser.add_argument("--models", default=",".join(BENCHES), help="comma-separated, from BENCHES")
    parser.add_argument("--backends", default="numpy,torch,torch-compile,mindspore,chainer")
    parser.add_argument("--repeats", type=int, default=1, help="time both sides this often, alternately; keep the best")
    parser.add_argument("--threads", type=int, help="compute threads of every framework (default: their own)")
    parser.add_argument("--cpu-time", action="store_true", help="time the steps in process CPU time, not wall-clock")
    parser.add_argument("--processes", type=int, default=1, help="run it all in this many processes, one after "
                        "another; each row's median of theirs")  # fmt: skip
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.processes > 1:
        return across_processes(args)
    global clock
    clock = time.process_time if args.cpu_time else time.perf_counter

    frameworks = {_framework(backend) for backend in args.backends.split(",")}
    for backend in frameworks | ({"torch"} if "numpy" in frameworks else set()) if args.threads else ():
        # the adapter's set_threads sets its framework's pool and the BLAS's, which the native loops (and
        # for NumPy PyTorch's) share
        unitrain.get_backend(backend).set_threads(args.threads)
    started = time.perf_counter()
    train = unitrain.load_mnist("train")
    load_seconds = time.perf_counter() - started
    print(f"machine: {machine()}; framework threads: {args.threads or 'their defaults'}; "
          f"clock: {'CPU time' if args.cpu_time else 'wall'}; MNIST train+cache load {load_seconds:.2f} s")  # fmt: skip
    print(
        "\n| model | backend | unitrain samples/s | native loop | native samples/s | unitrain / native | median pair |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    results = []
    for model_name in args.models.split(","):
        bench = BENCHES[model_name]
        steps = args.steps or bench.steps
        batches = _batches(bench, train, steps)
        state = unitrain.init_weights(bench.spec(), seed=0)
        for backend in args.backends.split(","):
            framework = _framework(backend)
            reference = "torch" if framework == "numpy" else framework
            native_step = NATIVE[reference](model_name, state)
            if backend.endswith("-native"):  # the A/A control
                step = NATIVE[reference](model_name, state)
            else:
                loop = unitrain.make_loop(framework, bench.spec(), seed=0)
                if backend == "torch-compile":
                    loop.compile()
                step = lambda x, y, loop=loop: loop.step((x, y))  # noqa: E731
            ours, native = [], []
            for _ in range(args.repeats):  # alternated, best of each: load from other processes only slows down
                ours.append(_time(step, batches, steps, bench.warmup))
                native.append(_time(native_step, batches, steps, bench.warmup))
            paired = statistics.median(a / b for a, b in zip(ours, native, strict=True))
            results.append({"model": model_name, "batch": bench.batch, "backend": backend,
                            "unitrain_samples_per_sec": max(ours), "native": reference,
                            "native_samples_per_sec": max(native), "ratio": max(ours) / max(native),
                            "median_paired_ratio": paired})  # fmt: skip
            r = results[-1]  # as soon as measured: a long run's rows are not lost if it is stopped
            print(_row(r), flush=True)
    ceiling = None
    if "mlp" in args.models.split(",") and "numpy" in args.backends.split(","):
        ceiling = numpy_mlp_ceiling(BENCHES["mlp"].batch)
        ours = next(r["unitrain_samples_per_sec"] for r in results if r["model"] == "mlp" and r["backend"] == "numpy")
        print(
            f"\nNumPy MLP ceiling (the step's sgemm calls alone, same shapes): {ceiling:.0f} samples/s; "
            f"the numpy backend reaches {ours / ceiling:.0%} of it"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine(),
                    "mnist_load_seconds": load_seconds,
                    "numpy_mlp_ceiling": ceiling,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
