"""The ``unitrain`` command (``python -m unitrain``, and the console script). Signal handling comes
first, before the command line module imports NumPy (see :mod:`unitrain.signals`)."""

from unitrain.signals import ending_on_signals, interrupted


def main() -> int:
    with ending_on_signals():
        try:
            from unitrain.cli import main as run_command
        except KeyboardInterrupt as interrupt:
            return interrupted(interrupt)
        return run_command()


if __name__ == "__main__":
    raise SystemExit(main())
