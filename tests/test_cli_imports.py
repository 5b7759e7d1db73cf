"""What the ``unitrain`` command imports before it answers ``--help`` or a mistyped flag: not NumPy,
no framework, none of the modules that load data, weights or training loops (each would add tens of
milliseconds to every such answer). Checked by the module list of ``python -X importtime``, not by
timing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import unitrain
from unitrain import choices, data

#: modules whose import the answers below must not pay for
HEAVY = ("numpy", "torch", "mindspore", "chainer", "matplotlib", "safetensors", "unitrain.run", "unitrain.data",
         "unitrain.loop", "unitrain.checkpoint", "unitrain.weights", "unitrain.plot", "unitrain.expr")  # fmt: skip


def _imported_by_command(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "unitrain", *args], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    # importtime writes "import time: self [us] | cumulative | imported package" to stderr, one line a module
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return modules, done


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("--help",), 0),
        (("train", "--help"), 0),
        (("train", "--epochs", "x"), 2),  # argparse's own check
        (("train", "--model", "nosuch"), 2),  # the model check that runs while parsing
        (("train", "--lr-schedule", "StepLR(gamma=0.5)"), 2),  # the schedule check that runs while parsing
    ],
)
def test_help_and_argument_errors_import_no_numpy(args, status):
    modules, done = _imported_by_command(*args)
    assert done.returncode == status, done.stderr[-2000:]
    assert "unitrain.cli" in modules  # the listing is read correctly
    assert sorted(name for name in modules if name.split(".")[0] in HEAVY or name in HEAVY) == []


def test_a_command_that_trains_does_import_them():
    """The check above can fail: a command past parsing loads NumPy and the run."""
    modules, done = _imported_by_command("train", "--optimizer", "adam", "--momentum", "0.9")
    assert done.returncode == 2 and "--momentum does not apply" in done.stderr
    assert {"numpy", "unitrain.run"} <= modules


def test_the_packaged_dataset_names_are_the_packaged_datasets():
    assert tuple(data.PACKAGED) == choices.PACKAGED_DATASETS


def test_the_commands_signal_handlers_come_before_any_other_import(tmp_path):
    """A signal before unitrain's handlers are installed meets Python's (a Ctrl-C traceback), so the
    package's first statement installs them, and what that imports must already be loaded by the
    interpreter: after runpy (``-m``), the first module whose import ends is ``unitrain.signals``,
    with nothing under it (it imported enum, signal and contextlib's kin before). Without ``site``
    (``-S``, the package found on PYTHONPATH), so that an editable install's finder, which loads much
    of the standard library first, cannot hide such an import."""
    package_root = Path(unitrain.__file__).parent.parent
    done = subprocess.run([sys.executable, "-S", "-X", "importtime", "-m", "unitrain", "train", "--epochs", "x"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(package_root)})  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    modules = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    after_runpy = modules[modules.index("runpy") + 1 :]
    assert after_runpy[:2] == ["unitrain.signals", "unitrain"], after_runpy[:8]
