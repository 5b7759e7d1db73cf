"""How the ``unitrain`` command ends on Ctrl-C and SIGTERM, from its first instant.

Imports nothing but the standard library. While the command starts (``unitrain/__init__.py``,
the package's first code to run, calls :func:`exit_at_once` when it is the command), a signal
ends the process at once with ``unitrain: interrupted`` and exit code 130 (SIGTERM: 143): an
exception raised inside an import would surface as a traceback, or as another error where
C code turns it into an ImportError (NumPy's "Error importing numpy: you should not try to import
numpy from its source directory"). Once its modules are loaded, :func:`ending_on_signals` raises
KeyboardInterrupt instead, so that a command cleans up what it was writing; during training,
:func:`unitrain.checkpoint.stop_on_signals` takes over (it checkpoints first).
"""

# only modules the interpreter has loaded before running any of unitrain (``_signal`` is built in;
# ``signal`` would import enum; contextlib, collections and functools): the package's first
# statement installs the handlers below, and nothing it imports may lengthen the time before
import _signal as signal
import os
import sys

#: the signals that end a command: Ctrl-C; SIGTERM, a cluster's preemption notice and what MindSpore turns
#: Ctrl-C into (its own SIGINT handler, installed at every graph run, kills the process with SIGTERM); and
#: SIGUSR1, how ``unitrain train --nproc`` stops the ranks of an mpiexec job (mpiexec forwards only that one)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def is_the_command() -> bool:
    """Whether this process runs the ``unitrain`` command (its console script, or ``python -m
    unitrain``), not a program that imports unitrain."""
    argv = getattr(sys, "orig_argv", [])
    run_as_module = any(argv[i : i + 2] == ["-m", "unitrain"] for i in range(len(argv) - 1))
    return run_as_module or os.path.basename(sys.argv[0] if sys.argv else "") == "unitrain"


#: the folder where each rank of ``unitrain train --nproc`` notes which rank it is and how it ended:
#: set in the launcher's environment by the parent (:func:`unitrain.distributed.run`), which reads
#: there how a requested stop ended on every rank (torchrun, once stopped, says nothing of its workers)
RANK_RECORDS = "UNITRAIN_RANK_RECORDS"


def record(note: str) -> None:
    """Add the line ``note`` to this process's record, when it is a rank of ``unitrain train --nproc``."""
    folder = os.environ.get(RANK_RECORDS)
    if not folder:
        return
    try:
        file = os.open(os.path.join(folder, str(os.getpid())), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:  # the parent is gone, and its folder with it
        return
    try:
        os.write(file, note.encode() + b"\n")
    finally:
        os.close(file)


def _exit_now(signum, frame):
    os.write(2, b"unitrain: interrupted\n")
    status = 128 + (signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
    record(f"exit {status}")
    os._exit(status)


def handled(signals=STOP_SIGNALS) -> tuple:
    """Those of ``signals`` this process does not ignore. A program started with a signal ignored keeps
    ignoring it, as Python itself does: a shell script's background job (``unitrain train &``) is
    started with SIGINT ignored, so that the Ctrl-C meant for the script does not stop the job too."""
    return tuple(signum for signum in signals if signal.getsignal(signum) != signal.SIG_IGN)


def exit_at_once() -> None:
    """From now on, until :func:`ending_on_signals`, a stop signal ends the process at once."""
    for signum in handled():
        signal.signal(signum, _exit_now)


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGUSR1, how ``unitrain train --nproc`` stops mpiexec's ranks), raised where
    Ctrl-C raises KeyboardInterrupt, so that all end a command alike."""


def _in_an_import(frame) -> bool:
    """Whether ``frame`` runs inside an import (a command imports NumPy and the run's modules on
    demand): an exception raised there would not end the command in one line, as a C extension's
    initialisation turns it into an ImportError ("Error importing numpy") or, in Cython's, a warning
    and a traceback, after which the command went on (exit 0)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _raise_interrupt(signum, frame):
    if _in_an_import(frame):  # nothing is half-written by an import: end at once, as at start-up
        _exit_now(signum, frame)
    raise Terminated() if signum != signal.SIGINT else KeyboardInterrupt()


class _EndingOnSignals:
    def __enter__(self) -> None:
        self.previous = {}
        try:
            for signum in handled():
                self.previous[signum] = signal.signal(signum, _raise_interrupt)
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, action in self.previous.items():
            signal.signal(signum, action)


def ending_on_signals() -> _EndingOnSignals:
    """While active (``with ending_on_signals():``), Ctrl-C raises KeyboardInterrupt, SIGTERM and
    SIGUSR1 :class:`Terminated`. A signal while the handlers change raises there, with those
    changed so far put back."""
    return _EndingOnSignals()


def interrupted(interrupt: KeyboardInterrupt) -> int:
    """Say so, once; the exit status a shell gives a process that the signal ended (128 + signum)."""
    print("unitrain: interrupted", file=sys.stderr)
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
