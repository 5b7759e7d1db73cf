"""Every benchmark in one table: each backend against its framework's hand-written loop, every model.

    .venv/bin/python benchmarks/bench_all.py [--backends numpy,torch,chainer,mindspore] [--repeats R]
        [--threads N] [--cpu-time] [--control] [--processes K] [--quick] [--markdown FILE]

Runs, one process each (a framework's thread pools and compiled graphs do not outlive its bench),
``bench_step.py`` (the MLP, the CNN, LeNet and ResNet-18 on MNIST; ``torch-compile`` too),
``bench_graph.py`` (the CNN as a Graph of twelve nodes), ``bench_sequences.py`` (the LSTM language
model and the Transformer classifier) and ``bench_generative.py`` (the DCGAN step), each with
``--json``, and prints their rows as one table headed by the machine (CPU, BLAS, threads, load
average at the start and the end). Every ratio is unitrain's speed over the hand-written loop's of
the same framework, timed alternately in the same process, best of ``R``; NumPy, which has no loop
of its own, is measured against PyTorch's. ``--control`` adds the A/A rows (``mindspore-native``: the
hand-written loop against a second instance of itself), whose distance from 1.00 is the noise of the
machine at that moment. ``--quick`` times a few steps of each (a smoke run: the figures then mean
little).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEP_MODELS = "mlp,cnn,lenet,resnet18-1x28x28"


def _benches(backends: list[str], args) -> list[tuple[str, list[str]]]:
    """The scripts to run and their arguments, for ``backends`` (each script's own subset)."""

    def among(*names: str) -> str:
        return ",".join(name for name in names if name in backends)

    common = ["--repeats", str(args.repeats), *(["--cpu-time"] if args.cpu_time else [])]
    threads = ["--threads", str(args.threads)]
    frameworks = among("numpy", "torch", "chainer", "mindspore")
    step_backends = among("numpy", "torch", "torch-compile", "mindspore", "chainer")
    if args.control:  # each framework's hand-written loop against itself: the A/A rows
        step_backends += "".join(
            f",{name}-native" for name in among("torch", "mindspore", "chainer").split(",") if name
        )
    benches = [
        ("bench_step.py", ["--models", STEP_MODELS, "--backends", step_backends.lstrip(","), *threads, *common,
                           "--processes", str(args.processes), *(["--steps", "3"] if args.quick else [])]),
        ("bench_graph.py", ["--backends", frameworks, *common, "--steps", "3" if args.quick else "50"]),
        ("bench_sequences.py", ["--backends", frameworks, *threads, *common,
                                *(["--steps", "2", "--warmup", "1"] if args.quick else [])]),
        ("bench_generative.py", ["--backends", among("torch", "chainer", "mindspore"), *threads, *common,
                                 "--steps", "2" if args.quick else "10"]),
    ]  # fmt: skip
    return [(script, arguments) for script, arguments in benches if arguments[arguments.index("--backends") + 1]]


def rows(report: dict) -> list[tuple[str, str, str, float, float | None]]:
    """``(model, backend, against, unitrain / native speed, median of the paired blocks' ratios)`` of
    one script's JSON report: its results in samples per second (higher is faster) or seconds per step
    (lower is), and the NumPy MLP's sgemm ceiling where measured; the median where the script reports
    it (bench_step.py)."""
    table = []
    for result in report["results"]:
        if "ratio" in result:  # bench_step.py, bench_sequences.py
            table.append((result["model"], result["backend"], result["native"], result["ratio"],
                          result.get("median_paired_ratio")))  # fmt: skip
        elif result.get("native_seconds_per_step") is not None:  # bench_graph.py, bench_generative.py
            table.append((result["model"], result["backend"], result["backend"],
                          result["native_seconds_per_step"] / result["unitrain_seconds_per_step"], None))  # fmt: skip
        if "sequential_seconds_per_step" in result:  # a Graph against the same Sequential
            speed = result["sequential_seconds_per_step"] / result["unitrain_seconds_per_step"]
            table.append((f"{result['model']} / Sequential", result["backend"], "unitrain Sequential", speed, None))
        if result["model"] == "mlp" and result["backend"] == "numpy" and report.get("numpy_mlp_ceiling"):
            table.append(("mlp", "numpy", "its sgemm calls alone", result["unitrain_samples_per_sec"]
                          / report["numpy_mlp_ceiling"], None))  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="numpy,torch,torch-compile,chainer,mindspore")
    parser.add_argument("--repeats", type=int, default=3, help="time both sides this often, alternately; keep the best")
    parser.add_argument("--threads", type=int, default=1, help="compute threads of every framework")
    parser.add_argument("--cpu-time", action="store_true", help="time the steps in process CPU time, not wall-clock")
    parser.add_argument("--control", action="store_true",
                        help="also time each hand-written step loop against a second instance of itself (A/A: "
                        "the machine's noise)")  # fmt: skip
    parser.add_argument("--processes", type=int, default=1, help="bench_step.py's rows: the median of this many "
                        "processes")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few steps of each: a smoke run")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_step import machine  # after the path: the scripts are not a package

    backends = args.backends.split(",")
    clock = "CPU time" if args.cpu_time else "wall"
    header = f"machine: {machine()}; framework threads: {args.threads}; clock: {clock}"
    print(header, flush=True)
    table = []
    with tempfile.TemporaryDirectory() as scratch:
        for script, arguments in _benches(backends, args):
            out = Path(scratch) / f"{script}.json"
            command = [sys.executable, str(HERE / script), *arguments, "--json", str(out)]
            print(f"\n$ {' '.join(command[1:])}", flush=True)
            finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if finished.returncode or not out.exists():
                print(f"{script} failed (exit {finished.returncode}); its rows are missing", flush=True)
                continue
            table += [(script, *row) for row in rows(json.loads(out.read_text()))]
    lines = [
        header + f"; load average at the end {os.getloadavg()[0]:.1f}",
        "",
        "| bench | model | backend | against | unitrain / native speed | median pair |",
        "| --- | --- | --- | --- | ---: | ---: |",
        *(f"| {script} | {model} | {backend} | {against} | {ratio:.2f} | {'' if median is None else f'{median:.2f}'} |"
          for script, model, backend, against, ratio, median in table),
    ]  # fmt: skip
    print("\n" + "\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
