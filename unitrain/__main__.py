"""The ``unitrain`` command (``python -m unitrain``, and the console script). A signal ends it at
once until its modules are loaded (see :mod:`unitrain.signals`; ``unitrain/__init__.py``, which
runs first, installs that)."""

from unitrain.signals import exit_at_once


def main() -> int:
    exit_at_once()  # already, when unitrain/__init__.py saw the command; here for any other caller of main
    from unitrain.cli import main as run_command

    return run_command()


if __name__ == "__main__":
    raise SystemExit(main())
