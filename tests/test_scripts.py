"""The two commands of the README and the getting-started page (scripts/unitrain, scripts/test)
skip the set-up when nothing it depends on changed: on a set-up machine they start at once. (The
slow path, a fresh clone installing everything, is what CI's `bash .ci/run` runs.)"""

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def set_up_copy(tmp_path: Path) -> Path:
    """A checkout whose .venv scripts/setup.sh completed: its stamp matches, its python runs."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    shutil.copy(ROOT / "pyproject.toml", root)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "unitrain").write_text('#!/bin/sh\necho "unitrain ran with: $*"\n')
    (bin_dir / "unitrain").chmod(0o755)
    parts = [root / "pyproject.toml", root / "scripts/constraints.txt", root / "scripts/setup.sh"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in parts) + f"{root}\n".encode()).hexdigest()
    (root / ".venv" / ".unitrain-setup").write_text(key + "\n")
    return root


def test_both_commands_start_at_once_when_set_up(tmp_path):
    root = set_up_copy(tmp_path)
    started = time.perf_counter()
    run = subprocess.run([root / "scripts/unitrain", "train", "--epochs", "1"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)  # fmt: skip
    assert run.returncode == 0 and run.stderr == "", run.stderr  # no set-up step announced
    assert run.stdout == "unitrain ran with: train --epochs 1\n"
    run = subprocess.run([root / "scripts/test", "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "pytest" in run.stdout + run.stderr and "set-up" not in run.stderr
    assert time.perf_counter() - started < 10  # measured 0.3 s for both on the 2-core machine


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_readme_and_getting_started_open_with_the_two_commands_and_ci_runs_the_second(page):
    text = (ROOT / page).read_text()
    first_block = text.split("```", 2)[1]
    commands = first_block.splitlines()[1:]  # after the fence's language tag
    assert [line for line in commands if line.strip()] == ["scripts/unitrain train --backend torch", "scripts/test"]
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set "))]
    assert ci == ['cd "$(dirname "$0")/.."', "scripts/test"]
