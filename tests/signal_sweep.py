"""Signals swept over the start of ``unitrain train``: each run gets one SIGINT or SIGTERM (alternately)
at its own instant, spread over the first ``span`` seconds, and how it ended is classified.
``tests/test_hostile_processes.py`` runs a sample; the figures in docs/hostile-input.md come from

    python tests/signal_sweep.py 120 [COMMAND ...]   (default: this Python's ``-m unitrain``)

How a run may end:

- ``said``: unitrain's handler ended it: exit status 128 + signum, ``unitrain: interrupted`` last,
  nothing but unitrain's lines before it;
- ``by the signal``: the signal's default action ended it, silently, before any handler (SIGTERM
  before unitrain's; SIGINT before Python installs its own, in the interpreter's first milliseconds):
  a shell reports 128 + signum, as for ``said``;
- ``traceback``: anything else, such as Python's ``KeyboardInterrupt`` traceback for a Ctrl-C that
  came after Python's handler and before unitrain's (in ``site``'s ``.pth`` files or ``runpy``).
"""

import random
import signal
import subprocess
import sys
import time
from collections import Counter

SPAN = 1.5


def instants(count: int, span: float = SPAN) -> list[tuple[signal.Signals, float]]:
    """``count`` (signal, seconds after start): alternately SIGINT and SIGTERM, one at a random place
    in each of ``count`` equal slices of ``span`` (seeded: the same every time)."""
    pick = random.Random(0)
    return [((signal.SIGINT, signal.SIGTERM)[i % 2], span * (i + pick.random()) / count) for i in range(count)]


def _default_actions() -> None:
    # as a terminal starts a command: a runner started in the background (`cmd &` in a script) ignores
    # SIGINT, and a program started with SIGINT ignored keeps ignoring it until it sets a handler
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def signal_run(command: list[str], signum: int, instant: float, cwd) -> tuple[int, str]:
    """Start ``command``, send ``signum`` ``instant`` seconds later; its exit status and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               preexec_fn=_default_actions)  # fmt: skip
    time.sleep(instant)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def outcome(signum: int, returncode: int, lines: list[str]) -> str:
    """``said``, ``by the signal`` or ``traceback`` (see the module's docstring) for a run's exit status
    and its stderr lines."""
    lines = [line for line in lines if line]  # the stop notice first ends a progress bar's line
    said = [line for line in lines if line.startswith(("unitrain: interrupted", "unitrain: stopping"))]
    if returncode == 128 + signum and lines and said == lines and "interrupted" in lines[-1]:
        return "said"
    if returncode == -signum and not lines:
        return "by the signal"
    return "traceback"


def main(count: int, command: list[str]) -> None:
    import tempfile

    counts, late = Counter(), {}
    with tempfile.TemporaryDirectory() as directory:
        for signum, instant in instants(count):
            returncode, err = signal_run(command, signum, instant, directory)
            kind = outcome(signum, returncode, err.splitlines())
            counts[signum.name, kind] += 1
            if kind != "said":
                late[kind] = max(late.get(kind, 0.0), instant)
                print(f"{signum.name} at {instant * 1000:.0f} ms: {kind} ({returncode}) {err.splitlines()[-1:]}")
    print(dict(counts))
    print("latest instant of each other outcome (ms):", {kind: round(t * 1000) for kind, t in late.items()})


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:] or [sys.executable, "-m", "unitrain", "train", "--no-progress"])
