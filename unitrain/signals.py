"""How the ``unitrain`` command ends on Ctrl-C and SIGTERM, from its first instant.

Imports nothing but the standard library, so that :mod:`unitrain.__main__` installs these before
NumPy or a framework loads: an early Ctrl-C then ends with ``unitrain: interrupted`` and exit code
130 (SIGTERM: 143), not a traceback or a silent death. During training,
:func:`unitrain.checkpoint.stop_on_signals` takes over (it checkpoints first).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGUSR1, how ``unitrain train --nproc`` stops mpiexec's ranks), raised where
    Ctrl-C raises KeyboardInterrupt, so that all end a command alike."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def ending_on_signals() -> Iterator[None]:
    """While active, Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGUSR1 :class:`Terminated`."""
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
        signal.SIGUSR1: signal.signal(signal.SIGUSR1, _raise_terminated),
    }
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def interrupted(interrupt: KeyboardInterrupt) -> int:
    """Say so, once; the exit status a shell gives a process that the signal ended (128 + signum)."""
    print("unitrain: interrupted", file=sys.stderr)
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
