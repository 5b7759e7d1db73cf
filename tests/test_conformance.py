"""The conformance suite on every installed built-in backend, and on an example third-party
backend registered through the ``unitrain.backends`` entry point."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import installed_backends
from unitrain.conformance import parametrize_with_checks

import unitrain

THIRD_PARTY = Path(__file__).parent / "third_party"


@parametrize_with_checks([unitrain.get_backend(name) for name in installed_backends()])
def test_conformance(adapter, check):
    check(adapter)


def _registered_env(tmp_path) -> dict:
    """An environment in which the example package is installed: importable, with the entry-point
    metadata ``pip install`` would have written."""
    dist_info = tmp_path / "unitrain_tinydense-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: unitrain-tinydense\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[unitrain.backends]\ntinydense = unitrain_tinydense:TinyDenseLoop\n")
    path = os.pathsep.join([str(tmp_path), str(THIRD_PARTY), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _run(args, env, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_a_third_party_backend_is_listed_and_runs_through_the_cli(tmp_path):
    env = _registered_env(tmp_path)
    listing = _run(["-m", "unitrain", "backends"], env, tmp_path)
    assert listing.returncode == 0 and any(line.split()[:3] == ["tinydense", "installed", "0.1"]
                                           for line in listing.stdout.splitlines())  # fmt: skip
    result = _run(["-m", "unitrain", "conformance", "--backend", "tinydense", "--json", "out.json"], env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_forward_dense" in result.stdout and "skip tinydense check_forward_conv: needs capability conv" in (
        result.stdout
    )


def test_a_third_party_project_runs_the_suite_with_the_pytest_helper(tmp_path):
    env = _registered_env(tmp_path)
    (tmp_path / "test_tinydense.py").write_text(
        "from unitrain_tinydense import TinyDenseLoop\n"
        "from unitrain.conformance import parametrize_with_checks\n\n\n"
        "@parametrize_with_checks([TinyDenseLoop], xfails={'check_losses': 'pretend it is broken'})\n"
        "def test_conformance(adapter, check):\n"
        "    check(adapter)\n"
    )
    result = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "test_tinydense.py"], env, tmp_path)
    # check_losses passes, so its strict xfail declaration fails the run: that is the helper working
    assert result.returncode == 1, result.stdout
    assert "[XPASS(strict)] pretend it is broken" in result.stdout
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("1 failed, 32 passed, 46 skipped"), result.stdout
