"""Hostile process events: two runs on one checkpoint directory, a launcher or a rank killed,
signals at any instant of start-up. Each ends in one line with exit code 2 (130/143 for signals,
137 for a killed rank), no process left behind, and nothing of the user's lost."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from signal_sweep import instants, outcome, signal_run
from test_distributed import backends_with_engine, descendants, ended, start_long_run, worker
from test_hostile_runs import TINY_RUN, one_error_line, run_cli

from unitrain.checkpoint import checkpoint_paths
from unitrain.files import LOCK_FILE


def start(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "unitrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def wait_for(condition, timeout=60.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- two runs on one checkpoint directory ----------------------------------------------------------


def test_a_second_run_on_a_checkpoint_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    """One run's sweep deleted the other's checkpoint in progress, and the other died at its first
    checkpoint. The directory is locked while a run writes there; the lock dies with its process."""
    directory = tmp_path / "D"
    first = start("train", "--no-progress", "--batch-size", "8", "--checkpoint-dir", str(directory),
                  "--checkpoint-every", "1000000")  # fmt: skip
    try:
        lock = directory / LOCK_FILE
        wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), what="the first run's lock")
        for argv in (["train", *TINY_RUN, "--checkpoint-dir", str(directory)],
                     ["train", *TINY_RUN, "--checkpoint-dir", str(directory), "--nproc", "2"]):  # fmt: skip
            status, _, err = run_cli(capsys, *argv)
            assert status == 2
            one_error_line(err, f"--checkpoint-dir {directory} is in use by another run (pid {first.pid}); wait for "
                                "it to end, or choose another directory")  # fmt: skip
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.communicate()
    status, _, err = run_cli(capsys, "train", *TINY_RUN, "--max-steps", "2", "--checkpoint-dir", str(directory))
    assert status == 0, err  # the killed run's lock went with it
    assert [path.name for path in checkpoint_paths(directory)] == ["step-00000002"]
    fresh = tmp_path / "fresh" / "D"
    status, _, err = run_cli(capsys, "train", *TINY_RUN, "--dataset", str(tmp_path / "none.npz"), "--checkpoint-dir",
                             str(fresh))  # fmt: skip
    assert status == 2 and "none.npz does not exist" in err
    assert not fresh.exists(), "a run that wrote nothing leaves no directory"


# --- a data-parallel job whose launcher is killed ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc")
@pytest.mark.parametrize(("backend", "rank_variable"), [e for e in backends_with_engine() if e.id != "mindspore"])
def test_a_sigkilled_launcher_leaves_no_process_behind(backend, rank_variable, tmp_path):
    """torchrun and both ranks trained on, writing checkpoints; NumPy's ranks ran 163 s more."""
    job = start_long_run(backend, tmp_path)
    started = descendants(job.pid)  # the launcher (torchrun, mpiexec) and the ranks
    assert worker(job.pid, rank_variable, 0) in started and worker(job.pid, rank_variable, 1) in started
    job.kill()
    job.wait()  # not communicate(): the job's pipes stay open as long as any of its processes lives
    try:
        assert all(ended(pid, within=10) for pid in started)
    finally:
        job.stdout.close()
        job.stderr.close()


# --- signals over start-up ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_signal_at_any_instant_of_start_up_ends_train_in_one_line(tmp_path):
    """A sample of the sweep over the first 1.5 s of ``train`` (interpreter start, imports, data
    loading, the first steps): SIGINT and SIGTERM alternately, at spread instants. A signal that comes
    before the interpreter has run the package's first code (``-X importtime`` has not reported
    ``unitrain``) cannot be handled by it, and on a busy machine (other tests beside this one) start-up
    can outlast the earliest instants: such a run is excused, and most runs must come later."""
    failures, excused = [], []
    for signum, instant in instants(10):
        returncode, err = signal_run([sys.executable, "-X", "importtime", "-m", "unitrain", "train", "--no-progress"],
                                     signum, instant, tmp_path)  # fmt: skip
        imported = [line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")]
        lines = [line for line in err.splitlines() if line and not line.startswith("import time:")]
        if outcome(signum, returncode, lines) != "said":  # once training runs: the stop notice, then where
            (failures if "unitrain" in imported else excused).append((signum.name, round(instant, 3), returncode,
                                                                      lines[-3:]))  # fmt: skip
    assert not failures, failures
    assert len(excused) <= 5, f"most signals came before unitrain's code ran: {excused}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_an_import_ends_the_command_at_once(signum, tmp_path):
    """While a command runs (``ending_on_signals``) it imports NumPy and the run's modules on demand;
    a signal then raised KeyboardInterrupt inside the import, which NumPy's C extensions turn into
    "Error importing numpy" and Cython's into a warning, the command going on (the start-up sweep
    met both under load). Inside an import the command now ends at once, in one line."""
    (tmp_path / "slow_module.py").write_text(f"import os, time\nos.kill(os.getpid(), {int(signum)})\ntime.sleep(30)\n")
    code = ("import sys\nfrom unitrain.signals import ending_on_signals\nsys.path.insert(0, sys.argv[1])\n"
            "with ending_on_signals():\n    import slow_module\nprint('went on')\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (128 + signum, "", "unitrain: interrupted\n")


def test_a_train_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path):
    """A shell script's background job (``unitrain train &``) starts with SIGINT ignored, so that the
    Ctrl-C meant for the script leaves it running, as Python leaves it ignored. unitrain installed its
    handlers over the ignore, at start-up and during training: the Ctrl-C stopped the job too. SIGTERM,
    not ignored, still stops it in one line."""

    def ctrl_c_ignored():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    process = start("train", "--no-progress", "--epochs", "1", cwd=tmp_path, preexec_fn=ctrl_c_ignored)
    assert process.stdout.readline().startswith("unitrain: backend numpy")
    time.sleep(0.5)  # into the epoch (stop_on_signals' handlers)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "resume with: unitrain train --resume" in stderr
