"""Data parallel on each framework's own engine: ``unitrain train --nproc N`` runs the
backend's launcher (torchrun, mpiexec), and two processes splitting each global batch reproduce one
process on the whole batch. CPU is scarce: 2 ranks, the MLP, 20 steps."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from torch_reference import drift_tolerances, gradient_size, twin_tolerance

from unitrain import cli, distributed, registry
from unitrain.checkpoint import checkpoint_paths, load_checkpoint
from unitrain.data import load_mnist
from unitrain.job import Job
from unitrain.layers import preset
from unitrain.randomness import dropout_stream, rank_seed
from unitrain.run import Run
from unitrain.signals import RANK_RECORDS
from unitrain.weights import init_weights, load_safetensors, save_safetensors

#: backends whose engine unitrain drives, and the variable their launcher sets to each worker's rank
ENGINES = {"numpy": "OMPI_COMM_WORLD_RANK", "torch": "RANK", "chainer": "OMPI_COMM_WORLD_RANK", "mindspore": "RANK_ID"}
STEPS = 20
RUN = ["--no-progress", "--epochs", "1", "--max-steps", str(STEPS), "--no-shuffle", "--batch-size", "64"]

# Two ranks each averaging half of a batch of 64, weighted 1/2, sum the same 64 per-sample gradients
# as one process does, in another order. Both float32 runs approximate the same float64 run: two
# processes may drift sqrt(n) times as far from it as one process measurably does
# (torch_reference.drift_tolerances; n = 858, one step's longest sum), twice that between the two runs;
# a sharding mistake (one row of 64 lost or counted twice: 1/64 of a gradient, ~1e-2 * lr per step)
# moves them by 1e-4 or more.


@pytest.fixture(scope="module")
def float64_weights(initial) -> dict:
    """The weights of ``RUN`` from ``initial`` on MNIST, in float64 on NumPy: the exact trajectory to ~1e-14."""
    loop = registry.get_backend("numpy")(preset("mlp"), dtype="float64")
    loop.load_state_dict({key: value.astype(np.float64) for key, value in load_safetensors(initial)[0].items()})
    loop.fit(load_mnist("train").subset(slice(0, STEPS * 64)), epochs=1, batch_size=64, shuffle=False)
    return loop.state_dict()


def drift_bound(one: Path, exact: dict, size: int = gradient_size(preset("mlp"), (1, 28, 28), 64) + 10) -> float:
    """Twice sqrt(size) times the largest drift of the float32 weights in ``one`` from ``exact``."""
    weights = load_safetensors(one)[0]
    return 2 * max(drift_tolerances([weights], {key: exact[key] for key in weights}, size).values())


def sharding_bound(size: int, steps: int, lr: float) -> float:
    """How far ``steps`` plain-SGD steps of two ranks may land from one process when neither measured
    drift nor a float64 run is at hand: each gradient element is the same sum of per-sample terms in
    another order, both within the conformance formula over ``size`` (the longest sum of one gradient,
    |g| <= 1), and an update moves a weight by ``lr`` times it. A sharding mistake moves a weight by a
    whole sample's share of a gradient times ``lr`` per step, orders of magnitude more."""
    return steps * lr * twin_tolerance(np.float32, size, 1.0)


def backends_with_engine():
    names = []
    for name, variable in ENGINES.items():
        spec = registry.backend_specs()[name]
        try:
            distributed.check_engine(name, spec.launcher)
        except distributed.LaunchError:
            continue
        if spec.installed():
            names.append(pytest.param(name, variable, id=name))
    return names


def command(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, **kwargs)


def max_difference(path_a: Path, path_b: Path) -> float:
    a, b = load_safetensors(path_a)[0], load_safetensors(path_b)[0]
    assert a.keys() == b.keys()
    return max(float(np.abs(a[key].astype(np.float64) - b[key]).max()) for key in a)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """Initial weights other than the seed's own, so that --init-weights is what both runs start from."""
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_safetensors(path, init_weights(preset("mlp"), seed=123))
    return path


# --- the arithmetic and the launchers' reports (no process started) ---------------------------


def test_shards_cover_the_batch_in_order():
    for size in (1, 2, 7, 64, 65):
        for world in range(1, min(size, 5) + 1):
            bounds = [distributed.shard(size, rank, world) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_dropout_streams_are_distinct_per_rank_and_rank_0s_is_the_one_process_stream():
    draws = [dropout_stream(7, rank).random(8) for rank in range(3)]
    assert np.array_equal(draws[0], np.random.default_rng(np.random.SeedSequence(7).spawn(1)[0]).random(8))
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
    assert np.array_equal(draws[1], dropout_stream(7, 1).random(8))  # reproducible
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, rank) for rank in range(4)}) == 4


def test_failed_rank_is_read_from_each_launchers_report():
    torchrun = """Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 11)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 12)
"""
    assert distributed._failure(torchrun) == "rank 1: killed by SIGKILL"
    mpiexec = """prterun noticed that process rank 1 with PID 20501 on node vm exited on
signal 9 (Killed)."""
    assert distributed._failure(mpiexec) == "rank 1: killed by SIGKILL"  # named as the other launchers'
    assert distributed._failure(mpiexec.replace("on\nsignal 9 (Killed)", "with status 3")) == "rank 1: exit code 3"
    assert distributed._failure("MPI_ABORT was invoked on rank 3 in communicator MPI_COMM_WORLD with errorcode 2") == (
        "rank 3: errorcode 2"
    )
    msrun = "ERROR ... Worker process 689 exit with exception. Error code: -9."
    assert distributed._failure(msrun, {687: 0, 689: 1}) == "rank 1: killed by SIGKILL"
    assert distributed._failure("nothing recognisable") is None


def test_only_a_launcher_that_started_no_rank_is_launched_again():
    """Open MPI's start-up race (seen once in a CI run's 2,441 tests) is the launcher's own: the job
    runs again; a rank's failure, or another launcher's report, is the job's and is reported."""
    race = b"""--------------------------------------------------------------------------
The PMIx server's listener thread failed to start. We cannot
continue.
--------------------------------------------------------------------------
"""
    assert distributed.failed_before_ranks("mpiexec", race)
    assert not distributed.failed_before_ranks("torchrun", race)
    killed = b"prterun noticed that process rank 1 with PID 20501 on node vm exited on\nsignal 9 (Killed)."
    assert not distributed.failed_before_ranks("mpiexec", killed)


def test_a_stop_counts_as_clean_only_if_every_rank_that_trained_ended_it_cleanly(tmp_path):
    """Each rank notes its rank once its loop is made, then how it ended (unitrain/__main__.py): 0 or
    128 + a stop signal ends a stop cleanly; another status, an exception, or no word at all (a
    segfault, named by the launcher's report where it says so) is a crash. A process that never made
    its loop (stopped while it started, or msrun's scheduler) had nothing to save."""
    notes = {101: "rank 0\nexit 143", 102: "rank 1\nexit 138", 103: "exit 1", 104: "rank 2\nexit 0",
             105: "rank 3\nexit 130", 106: "rank 4\nexit 2", 107: "rank 5\nraised OSError", 108: "rank 6",
             109: "rank 7"}  # fmt: skip
    for pid, text in notes.items():
        (tmp_path / str(pid)).write_text(text + "\n")
    (tmp_path / "logs").mkdir()  # torchrun's log folders share the folder
    report = b"prterun noticed that process rank 6 with PID 108 on node vm exited on\nsignal 11 (Segmentation fault)."
    assert distributed._unfinished_stops(str(tmp_path), report, None) == {
        4: ("exit code 2", 2), 5: ("raised OSError", 1), 6: ("killed by SIGSEGV", 128 + signal.SIGSEGV),
        7: ("did not finish stopping", 1)}  # fmt: skip
    for pid in (106, 107, 108, 109):
        (tmp_path / str(pid)).unlink()
    assert distributed._unfinished_stops(str(tmp_path), report, None) == {}


def test_a_clean_stop_under_msrun_exits_0_to_msrun_alone(monkeypatch, tmp_path):
    """msrun SIGKILLs the other workers when one exits non-zero, and its scheduler then waits 30 s for
    them: a rank of `unitrain train --nproc` that stopped cleanly exits 0 to it; the parent reads
    the status from the rank's record (and still returns 128 + N)."""
    monkeypatch.setenv(RANK_RECORDS, str(tmp_path))
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    assert [distributed.status_for_launcher(status) for status in (143, 138, 130, 0, 1, 2)] == [0, 0, 0, 0, 1, 2]
    monkeypatch.delenv("MS_WORKER_NUM")  # torchrun, mpiexec: their own status
    assert distributed.status_for_launcher(143) == 143
    (tmp_path / "11").write_text("rank 0\nexit 143\n")
    (tmp_path / "12").write_text("rank 1\nexit 143\n")
    assert distributed._stop_status(str(tmp_path)) == 143
    assert distributed._unfinished_stops(str(tmp_path), b"", None) == {}
    monkeypatch.delenv(RANK_RECORDS)  # not launched by unitrain (msrun by hand): the rank's status
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    assert distributed.status_for_launcher(143) == 143


def test_workers_get_the_job_without_nproc(tmp_path):
    """Each worker runs ``unitrain train`` on the same job, its world size from the launcher (torchrun's
    parser takes ``--nproc`` for an abbreviation of its own ``--nproc-per-node``); a path that starts
    with a dash stays a value."""
    recipe = tmp_path / "run.toml"
    job = Job(Run(epochs=1), "numpy", nproc=2, save="-w.safetensors", checkpoint_dir=tmp_path / "c", keep=2)
    argv = job.worker_command("numpy", recipe, progress=False)
    assert not any(token.startswith("--np") for token in argv)
    args = cli.build_parser().parse_args(argv)
    chosen = (args.recipe, args.backend, args.save, args.checkpoint_dir, args.keep, args.progress)
    assert chosen == (recipe, "numpy", Path("-w.safetensors"), tmp_path / "c", 2, False)


def test_threads_are_shared_among_ranks():
    cores = len(os.sched_getaffinity(0))
    assert distributed.threads_per_rank(1) == cores
    assert distributed.threads_per_rank(cores * 4) == 1


def test_a_rank_killed_by_a_fatal_signal_leaves_its_python_stack(tmp_path):
    """The launchers' environment turns Python's fault handler on: a rank that a framework aborts
    writes where it was before it dies (here a stand-in rank, aborted while it sleeps)."""
    script = tmp_path / "rank.py"
    script.write_text("import time\ndef waiting():\n    print('ready', flush=True)\n    time.sleep(60)\nwaiting()\n")
    rank = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=distributed.environment("torchrun", 2))  # fmt: skip
    assert rank.stdout.readline() == "ready\n"
    rank.send_signal(signal.SIGABRT)
    _, err = rank.communicate(timeout=60)
    assert rank.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err and "in waiting" in err, err


# --- bad input: one line, exit code 2, nothing started ----------------------------------------


def one_error_line(capsys, argv, expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err


def test_bad_process_counts(capsys):
    one_error_line(capsys, ["train", "--nproc", "0"], "--nproc: must be >= 1, got 0")
    one_error_line(capsys, ["train", "--nproc", "9", "--batch-size", "8"], "--nproc 9 is more processes than")


def test_backend_without_engine(capsys, monkeypatch):
    without_launcher = [name for name, spec in registry.backend_specs().items() if spec.launcher is None]
    for name in without_launcher:
        if registry.backend_specs()[name].installed():
            one_error_line(capsys, ["train", "--backend", name, "--nproc", "2"], "no multi-process engine")
    real_find_spec = distributed.importlib.util.find_spec
    monkeypatch.setattr(
        distributed.importlib.util, "find_spec", lambda name, *a: None if name == "mpi4py" else real_find_spec(name, *a)
    )
    one_error_line(capsys, ["train", "--backend", "numpy", "--nproc", "2"], "unitrain[distributed]")


@pytest.mark.skipif(not registry.backend_specs()["torch"].installed(), reason="torch not installed")
def test_busy_port(capsys):
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        one_error_line(capsys, ["train", "--backend", "torch", "--nproc", "2", "--master-port", str(port)], "not free")


# --- real runs on the engines -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "rank_variable"), backends_with_engine())
def test_two_processes_equal_one(backend, rank_variable, initial, float64_weights, tmp_path):
    common = ["train", "--backend", backend, *RUN, "--init-weights", str(initial)]
    records = {}
    for run, nproc in (("one", "1"), ("two", "2")):
        arguments = [*common, "--nproc", nproc, "--save", str(tmp_path / f"{run}.safetensors"), "--metrics",
                     str(tmp_path / f"{run}.jsonl")]  # fmt: skip
        result = command(*arguments)
        assert result.returncode == 0, result.stderr
        (records[run],) = [json.loads(line) for line in (tmp_path / f"{run}.jsonl").read_text().splitlines()]
    assert "2 processes" in result.stdout and result.stdout.count("epoch 1/1") == 1  # rank 0 reports, alone
    assert records["two"]["world_size"] == 2
    bound = drift_bound(tmp_path / "one.safetensors", float64_weights)
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") <= bound
    # The training forward passes of the same weights (within that bound) on the same global batches:
    # a prediction flips only where its two largest logits lie within the logits' float32 spread
    # (~1e-7 here), which none of the 1280 does in practice; one flip is allowed, a count that
    # misses a rank's rows or counts them twice is off by hundreds.
    samples = STEPS * 64
    assert abs(records["two"]["train_accuracy"] - records["one"]["train_accuracy"]) * samples <= 1, records


@pytest.mark.slow
def test_resume_with_another_process_count(initial, float64_weights, tmp_path):
    """Two processes checkpoint at step 10; one process resumes there and ends where one process
    running all 20 steps ends."""
    common = ["train", "--backend", "numpy", *RUN]
    first = command(*common, "--init-weights", str(initial), "--nproc", "2", "--checkpoint-dir", str(tmp_path / "a"),
                    "--checkpoint-every", "10")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(tmp_path / "a" / "step-00000010").manifest["world_size"] == 2
    resumed = command(*common, "--resume", str(tmp_path / "a" / "step-00000010"), "--checkpoint-dir",
                      str(tmp_path / "b"), "--save", str(tmp_path / "resumed.safetensors"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    whole = command(*common, "--init-weights", str(initial), "--save", str(tmp_path / "whole.safetensors"))
    assert whole.returncode == 0, whole.stderr
    bound = drift_bound(tmp_path / "whole.safetensors", float64_weights)
    assert max_difference(tmp_path / "whole.safetensors", tmp_path / "resumed.safetensors") <= bound


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def worker(pid: int, variable: str, rank: int) -> int | None:
    """The pid of the unitrain worker of ``rank`` under the job started by ``pid``."""
    for candidate in descendants(pid):
        try:
            environment = Path(f"/proc/{candidate}/environ").read_bytes().split(b"\0")
            command_line = Path(f"/proc/{candidate}/cmdline").read_bytes()
        except OSError:
            continue
        if f"{variable}={rank}".encode() in environment and b"unitrain" in command_line:
            return candidate
    return None


def start_long_run(backend, tmp_path, env=None):
    """A full epoch on two processes, checkpointed every 3 steps (only the newest kept); returns
    once the first checkpoint is there: both ranks are training (they take each step together),
    with their stop handlers in place. A signal before that ends the job with nothing to save."""
    job = subprocess.Popen([sys.executable, "-m", "unitrain", "train", "--backend", backend, "--nproc", "2",
                            "--no-progress", "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                            "--checkpoint-every", "3", "--keep", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((tmp_path / "ck").glob("step-*")):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    return job


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
@pytest.mark.parametrize(("backend", "rank_variable"), backends_with_engine())
def test_a_killed_worker_ends_the_job(backend, rank_variable, tmp_path):
    job = start_long_run(backend, tmp_path)
    victim, survivor = worker(job.pid, rank_variable, 1), worker(job.pid, rank_variable, 0)
    assert victim is not None and survivor is not None
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGKILL and time.monotonic() - killed < 120  # as a shell reports it
    (line,) = err.splitlines()  # torchrun's page of two tracebacks and its report are kept aside
    assert line.startswith(f"unitrain: error: the {registry.backend_specs()[backend].launcher} job of 2 processes "
                           "failed (rank 1: killed by SIGKILL)"), err  # fmt: skip
    _, kept, logs = line.partition("the workers' logs are in ")  # msrun's, kept for the user
    if kept:
        shutil.rmtree(logs)
    _, kept, report = line.partition("its report is in ")
    if kept:
        assert distributed._failure(Path(report).read_text()) == "rank 1: killed by SIGKILL"  # the launcher's words
        Path(report).unlink()
    assert ended(survivor, within=10)  # no orphan: the other rank is gone too


def ended(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state in "ZX":  # exited, waiting for its parent to collect the status
            return True
        time.sleep(0.1)
    print(f"{pid} is still running: {Path(f'/proc/{pid}/cmdline').read_bytes()}")
    return False


@pytest.mark.slow
@pytest.mark.parametrize("backend", [engine.id for engine in backends_with_engine()
                                     if engine.id in ("numpy", "torch", "mindspore")])  # fmt: skip
def test_a_refusal_every_rank_meets_is_one_line(backend, tmp_path):
    """Each rank reads the dataset and refuses its labels (one is 12, the model scores 10 classes):
    the user read the line once per rank, then the job's failure line naming a report of the
    launcher's noise. torchrun (torch), mpiexec (NumPy) and msrun (MindSpore, which showed its own
    start notes, failure lines and traceback, and kept its log folder): nothing is left behind."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), np.arange(64) % 10
    labels[40] = 12
    np.savez(tmp_path / "bad.npz", x_train=images, y_train=labels, x_test=images[:16], y_test=labels[:16])
    (tmp_path / "tmp").mkdir()
    result = command("train", "--dataset", "bad.npz", "--backend", backend, "--nproc", "2", "--max-steps", "2",
                     "--batch-size", "16", "--no-progress", cwd=tmp_path, timeout=120,
                     env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["unitrain: error: model mlp gives outputs of shape (10,), expected one score "
                                          "per class; bad.npz has 13 classes"]  # fmt: skip
    assert result.stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.npz", "tmp"] and left_in(tmp_path / "tmp") == []


def left_in(temporary: Path) -> list[str]:
    """What a job left in its temporary directory, but torch's compile cache, which every program that
    imports torch._dynamo keeps there (``torchinductor_<user>``)."""
    return [path.name for path in temporary.iterdir() if not path.name.startswith("torchinductor_")]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "rank_variable"), backends_with_engine())
def test_sigterm_checkpoints_once_and_stops_every_rank(backend, rank_variable, tmp_path):
    (tmp_path / "tmp").mkdir()
    job = start_long_run(backend, tmp_path, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, err
    saved = checkpoint_paths(tmp_path / "ck")
    assert len(saved) == 1, saved  # the interrupted step's (--keep 1)
    # msrun shows worker 0's stdout and stderr together, on stdout
    assert f"checkpoint {saved[0]}" in out + err and "Traceback" not in out + err
    assert all(line.startswith("unitrain: ") for line in err.splitlines()), err
    assert load_checkpoint(saved[0]).manifest["world_size"] == 2
    assert left_in(tmp_path / "tmp") == []  # the launchers' folders (torchrun's torchelastic_*, msrun's logs)


# A rank that crashes in its stop path: every rank calls Checkpointer._save_interrupted once the ranks
# voted to stop; there, the rank named raises (as a failed checkpoint write would) or segfaults (as a
# collective can). Injected from a sitecustomize module on the ranks' PYTHONPATH, since the parent
# starts them itself (`python -m unitrain`).
CRASHING_STOP = """
import os, signal, sys
ranks = {"RANK", "OMPI_COMM_WORLD_RANK"} & os.environ.keys() or os.environ.get("MS_ROLE") == "MS_WORKER"
if "unitrain" in sys.orig_argv and ranks:  # a rank (not the parent, nor its launcher)
    from unitrain.checkpoint import Checkpointer
    crash, rank = os.environ["CRASH_WHILE_STOPPING"].split(":")
    original = Checkpointer._save_interrupted
    def crashing(self, loop):
        if loop.rank == int(rank):
            if crash == "raise":
                raise RuntimeError("injected: the checkpoint write failed")
            os.kill(os.getpid(), signal.SIGSEGV)
        return original(self, loop)
    Checkpointer._save_interrupted = crashing
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "crash", "said", "status"),
    [pytest.param("torch", "raise:0", "rank 0: raised RuntimeError", 1, id="torch-rank-0-raises"),
     pytest.param("numpy", "segv:1", "rank 1: killed by SIGSEGV", 128 + signal.SIGSEGV, id="numpy-rank-1-segfaults")],
)  # fmt: skip
def test_a_rank_that_crashes_while_stopping_fails_the_job(backend, crash, said, status, tmp_path):
    """After a stop the parent shows only the ranks' own lines: a rank that crashed while stopping
    looked like a clean stop (exit 143, no word). Now the job fails in one line naming the rank and
    the report (the traceback, or the fault handler's stack), with the crash's status."""
    if backend not in [engine.id for engine in backends_with_engine()]:
        pytest.skip(f"no {backend} engine")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(CRASHING_STOP)
    path = os.pathsep.join(filter(None, [str(tmp_path / "inject"), os.environ.get("PYTHONPATH")]))
    job = start_long_run(backend, tmp_path, env={**os.environ, "PYTHONPATH": path, "CRASH_WHILE_STOPPING": crash})
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == status, err
    last = err.splitlines()[-1]
    launcher = registry.backend_specs()[backend].launcher
    assert last.startswith(f"unitrain: error: the {launcher} job of 2 processes failed while stopping ({said}"), err
    report = Path(last.partition("its report is in ")[2])
    assert ("injected: the checkpoint write failed" if "raise" in crash else "Segmentation fault") in report.read_text()
    report.unlink()


# A torchrun job in which one rank gets its stop signal where the ranks' decisions can part: while
# they vote on a step's stop (its flag already read: the moment a rank blocked in the vote's
# all-reduce, waiting for the other, runs its handler), or while rank 0 alone evaluates at an
# epoch's end. The signal is the rank's own, sent at that call, so the moment is the same on any
# machine; "rank R exit S" at the end says how each rank ended.
SIGNAL_WORKER = """
import os, signal, sys
from unitrain.cli import main
from unitrain.loop import TrainingLoop
method, signalled, at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
original, sent = getattr(TrainingLoop, method), []
def with_signal(self, *args, **kwargs):
    if self.rank == signalled and self.step_count == at and not sent:
        sent.append(os.kill(os.getpid(), signal.SIGTERM))
    return original(self, *args, **kwargs)
setattr(TrainingLoop, method, with_signal)
status = main(sys.argv[4:])
os.write(1, f"rank {os.environ['RANK']} exit {status}\\n".encode())
sys.exit(status)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "signalled", "at", "stop"),
    [pytest.param("any_rank", 1, 5, 6, id="rank-1-during-the-vote"),
     pytest.param("evaluate", 0, 10, 10, id="rank-0-evaluating-at-the-epoch-end")],
)  # fmt: skip
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(method, signalled, at, stop, tmp_path):
    """Every rank stops at the step where the signalled one does, and the lead rank says where it
    checkpointed. A rank that stopped alone left the other in the next step's all-reduce: gloo's
    collective mismatch (SIGABRT, or "Connection reset by peer") ended the job, and when rank 0 was
    the one left, without its line."""
    pytest.importorskip("torch")
    worker = tmp_path / "worker.py"
    worker.write_text(SIGNAL_WORKER)
    # batches of 6000: 10 steps an epoch, so that step 10 is an epoch's end
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
               method, str(signalled), str(at), "train", "--backend", "torch", "--no-progress", "--epochs", "10",
               "--batch-size", "6000", "--checkpoint-dir", str(tmp_path / "ck")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=120)  # fmt: skip
    output = result.stdout + result.stderr
    assert "rank 0 exit 143" in result.stdout and "rank 1 exit 143" in result.stdout, output[-3000:]
    saved = checkpoint_paths(tmp_path / "ck")[-1]
    assert saved.name == f"step-{stop:08d}" and load_checkpoint(saved).manifest["world_size"] == 2
    assert f"unitrain: interrupted at step {stop}; checkpoint {saved}" in result.stderr, output[-3000:]


# A graph with two outputs (a loss on each) from the Python API: the worker steps through the
# batches of test_graph's case; rank 0 writes its weights. Two ranks each take 4 rows of 8; float32
# sums in another order move the weights apart by ulps of the gradients, accumulated by momentum 0.9
# over 20 steps, within twice sqrt(n) times the one-process run's measured drift from the same run in
# float64 (drift_bound), while a sharding mistake (a row of 8 lost or counted twice, 1/8 of a gradient)
# moves them by 1e-3.
TEARDOWN_WORKER = """
import atexit, os
def threads():
    return sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
# one write, whole (both ranks share the pipe); registered first, it runs after those registered later
atexit.register(lambda: os.write(1, f"threads at exit: {threads()}\\n".encode()))
from unitrain.backends.torch import TorchLoop
from unitrain.layers import preset
loop = TorchLoop(preset("mlp"), distributed=True)  # its optimizer imports torch._dynamo
loop.any_rank(False)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads' names in /proc")
def test_a_torch_rank_frees_its_process_group_before_the_interpreter_ends(tmp_path):
    """Modules that torch._dynamo imports held the process group in their functions' defaults when
    imported after it was made: destroy_process_group could not free it, and its gloo threads
    (``pt_gloo_runloop``, ``gloo_tcp_loop``) ran on into the interpreter's teardown, where now and then
    a rank died of SIGABRT or SIGSEGV after training. At exit they are gone."""
    pytest.importorskip("torch")
    worker = tmp_path / "worker.py"
    worker.write_text(TEARDOWN_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    at_exit = [line for line in result.stdout.splitlines() if line.startswith("threads at exit:")]
    assert len(at_exit) == 2 and not any("gloo" in line for line in at_exit), at_exit


GRAPH_WORKER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_graph import CASES, LR, MOMENTUM, batches_for, two_outputs
from unitrain.backends.torch import TorchLoop
from unitrain.optim import SGD
from unitrain.weights import save_safetensors
loss = CASES["two-outputs"][4]
loop = TorchLoop(two_outputs(), loss=loss, optimizer=SGD(lr=LR, momentum=MOMENTUM), distributed=sys.argv[3] == "2")
for batch in batches_for("two-outputs"):
    loop.step(batch)
if loop.rank == 0:
    save_safetensors(sys.argv[1], loop.state_dict())
"""


@pytest.mark.slow
def test_a_graph_with_two_outputs_trains_on_two_processes_as_on_one(tmp_path):
    pytest.importorskip("torch")
    worker = tmp_path / "worker.py"
    worker.write_text(GRAPH_WORKER)
    tests = str(Path(__file__).parent)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                              "--master-port", port])):  # fmt: skip
        result = subprocess.run([sys.executable, *launch, str(worker), str(tmp_path / f"{run}.safetensors"), tests,
                                 "2" if launch else "1"], capture_output=True, text=True, env=environment,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    from test_graph import CASES, LR, MOMENTUM, _cast, batches_for, longest_sum, two_outputs
    from unitrain.backends.torch import TorchLoop

    from unitrain.optim import SGD

    exact = TorchLoop(two_outputs(), loss=CASES["two-outputs"][4], optimizer=SGD(lr=LR, momentum=MOMENTUM),
                      dtype="float64")  # fmt: skip
    for batch in batches_for("two-outputs"):
        exact.step(_cast(batch, "float64"))
    bound = drift_bound(tmp_path / "one.safetensors", exact.state_dict(), longest_sum(two_outputs()))
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") <= bound


# --- BatchNorm on each rank's rows: every rank decides alike, before any collective ------------

BATCHNORM_WORKER = """
import sys
import numpy as np
from unitrain import MSELoss, steps
from unitrain.backends.torch import TorchLoop
from unitrain.layers import BatchNorm1d, Linear, Sequential, Sigmoid
from unitrain.loop import InputError
from unitrain.optim import SGD

rng = np.random.default_rng(0)
one = TorchLoop(Sequential(Linear(4, 3), BatchNorm1d(3)), loss=MSELoss(), optimizer=SGD(lr=0.1), distributed=True)
d = steps.Model("d")
step = steps.MultiStep({"d": Sequential(Linear(4, 3), BatchNorm1d(3), Linear(3, 1), Sigmoid())},
                       {"sgd": steps.OptimizerOver(SGD(0.1), ["d"])},
                       [steps.Phase("d", steps.bce(d(steps.batch()), 1.0), "sgd")])
several = steps.MultiModelLoop(step, "torch", seed=0, distributed=True)
lines = []
for rows in (3, 1, 4):  # 3: rank 0's one row; 1: rank 0 without rows, rank 1's one row; 4: two rows each
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    for name, call in (("one model", lambda: one.step((x, np.zeros((rows, 3), np.float32)))),
                       ("multi-model", lambda: several.step(x))):
        try:
            call()
            lines.append(f"{name}, {rows} rows: trained")
        except InputError as error:
            lines.append(f"{name}, {rows} rows: {error}")
with open(f"{sys.argv[1]}/rank{one.rank}.txt", "w") as out:  # the ranks share the launcher's pipe
    out.write("\\n".join(lines))
"""


@pytest.mark.slow
def test_a_batch_leaving_a_rank_one_row_through_batchnorm_is_refused_alike_on_every_rank(tmp_path):
    """Each rank checked its own shard: rank 0 (one row of 3) refused, and rank 1 waited in the
    gradients' allreduce until gloo reported rank 0's end ("Connection closed by peer"), or a rank
    that caught the refusal and went on met the other's earlier collective. Now both ranks refuse
    the same batches in the same words, and the next batch trains on both (its collectives meet)."""
    pytest.importorskip("torch")
    worker = tmp_path / "worker.py"
    worker.write_text(BATCHNORM_WORKER)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
              str(tmp_path)]  # fmt: skip
    result = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [(tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert ranks[0] == ranks[1], ranks
    words = set(ranks[0])
    one_row = ("BatchNorm in training needs more than one value per channel, and each of 2 processes normalises its "
               "own rows: a batch of {rows} gives rank {rank} one row; use batches of 4 or more (2 rows per process), "
               "or eval mode")  # fmt: skip
    assert words == {
        "one model, 3 rows: 1: " + one_row.format(rows=3, rank=0),
        "multi-model, 3 rows: phase 'd': model 'd': 1: " + one_row.format(rows=3, rank=0),
        "one model, 1 rows: 1: " + one_row.format(rows=1, rank=1),
        "multi-model, 1 rows: a batch of 1 over 2 processes leaves a process without rows; use batches of 2 or more",
        "one model, 4 rows: trained",
        "multi-model, 4 rows: trained",
    }, words


@pytest.mark.slow
@pytest.mark.parametrize("backend", [engine.id for engine in backends_with_engine() if engine.id != "mindspore"])
def test_a_last_batch_leaving_a_rank_one_row_is_refused_before_training(backend, tmp_path):
    """67 samples in batches of 64 over 2 processes: the last batch of 3 gives rank 0 one row at
    a BatchNorm. Refused in one line before the first step, as PyTorch's DataLoader users fix it:
    --drop-last (which then trains; on torch). torchrun and mpiexec (NumPy, Chainer): the two ways
    a job's output is read; msrun keeps its own failure line after a rank's refusal."""
    (tmp_path / "bnnet.py").write_text(
        "from unitrain.layers import BatchNorm1d, Flatten, Linear, Sequential\n"
        "def build():\n"
        "    return Sequential(Flatten(), Linear(64, 8), BatchNorm1d(8), Linear(8, 10))\n"
    )
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (67, 8, 8), dtype=np.uint8), np.arange(67) % 10
    np.savez(tmp_path / "d.npz", x_train=images, y_train=labels, x_test=images[:16], y_test=labels[:16])
    common = ["train", "--dataset", "d.npz", "--model", "bnnet:build", "--backend", backend, "--nproc", "2",
              "--batch-size", "64", "--epochs", "1", "--no-progress", "--checkpoint-dir", "runs"]  # fmt: skip
    result = command(*common, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "unitrain: error: batch_size 64 on 67 samples leaves a last batch of 3 (drop_last=True, --drop-last, leaves it "
        "out): 2: BatchNorm in training needs more than one value per channel, and each of 2 processes normalises "
        "its own rows: a batch of 3 gives rank 0 one row; use batches of 4 or more (2 rows per process), or eval mode"
    ]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    if backend == "torch":
        result = command(*common, "--drop-last", "--overwrite", cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr
