"""The ``unitrain`` command (``python -m unitrain``, and the console script). A signal ends it at
once until its modules are loaded (see :mod:`unitrain.signals`; ``unitrain/__init__.py``, which
runs first, installs that)."""

from unitrain.signals import exit_at_once, record


def main() -> int:
    exit_at_once()  # already, when unitrain/__init__.py saw the command; here for any other caller of main
    from unitrain.cli import main as run_command

    # a rank of `unitrain train --nproc` notes how it ended: the parent tells a clean stop from a crash by it
    try:
        status = run_command()
    except Exception as error:
        record(f"raised {type(error).__name__}")
        raise
    record(f"exit {status}")
    from unitrain.distributed import status_for_launcher

    return status_for_launcher(status)


if __name__ == "__main__":
    raise SystemExit(main())
