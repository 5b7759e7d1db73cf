import subprocess
import sys

import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "jax"], "unknown backend 'jax'; available: numpy, torch, mindspore, chainer"),
        (["--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["--lr", "-0.5"], "argument --lr: must be > 0, got -0.5"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--epochs", "-1"], "argument --epochs: must be >= 0, got -1"),
        (["--max-steps", "-3"], "argument --max-steps: must be >= 0, got -3"),
        (["--model", "resnet"], "argument --model: unknown model 'resnet'; expected one of mlp, cnn, lenet, resnet18"),
        (["--momentum", "1.5"], r"--optimizer sgd: momentum must be in [0, 1), got 1.5"),
        (["--optimizer", "adam", "--momentum", "0.9"], "--momentum does not apply to --optimizer adam"),
        (["--init-weights", "missing.safetensors"], "init_weights missing.safetensors does not exist"),
        (["--data-dir", "no/such/dir"], "data.data_dir no/such/dir does not exist"),
        (["--save", "no/such/dir/w.safetensors"], "directory no/such/dir does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_no_traceback(args, message):
    result = run("train", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_existing_outputs_are_never_overwritten_without_consent(tmp_path):
    for flag in ("--save", "--metrics"):
        target = tmp_path / f"precious{flag}"
        target.write_text("user data")
        result = run("train", flag, str(target), "--max-steps", "0")
        assert result.returncode == 2 and "already exists; pass --overwrite" in result.stderr
        assert target.read_text() == "user data"


def test_environment_variable_picks_the_backend():
    import os

    result = run("train", env={**os.environ, "UNITRAIN_BACKEND": "jax"})
    assert result.returncode == 2 and "unknown backend 'jax'" in result.stderr


def test_backends_lists_every_backend_with_its_version():
    result = run("backends")
    assert result.returncode == 0
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert set(lines) >= {"numpy", "torch", "mindspore", "chainer"}
    for name, fields in lines.items():
        assert fields[1] in ("installed", "missing")
        if fields[1] == "installed":
            assert fields[2][0].isdigit(), f"{name} shows no version: {fields}"


def test_help_and_console_script():
    result = run("--help")
    assert result.returncode == 0 and "train" in result.stdout and "backends" in result.stdout
    result = run("train", "--help")
    assert "--init-weights" in result.stdout and "--max-steps" in result.stdout


def test_max_steps_zero_evaluates_and_saves(tmp_path):
    """A zero-step run still evaluates, reports and saves the (initial) weights."""
    metrics, weights = tmp_path / "m.jsonl", tmp_path / "w.safetensors"
    result = run("train", "--max-steps", "0", "--epochs", "1", "--metrics", str(metrics), "--save", str(weights))
    assert result.returncode == 0, result.stderr
    assert weights.stat().st_size > 4 * 500_000
    assert metrics.read_text() == ""  # no epoch ran, so no epoch record


@pytest.fixture
def torch_uninstalled(monkeypatch):
    """The torch backend as it looks on a machine without PyTorch."""
    from unitrain import registry

    spec = registry.BUILTIN["torch"]
    missing = registry.BackendSpec(spec.name, spec.target, "torch_is_not_installed_here", None, spec.install_hint)
    monkeypatch.setitem(registry.BUILTIN, "torch", missing)


def test_a_missing_framework_names_the_extra_to_install(torch_uninstalled, capsys):
    from unitrain.cli import main

    assert main(["train", "--backend", "torch"]) == 2
    message = "backend 'torch' needs torch_is_not_installed_here, which is not installed: pip install 'unitrain[torch]'"
    assert message in capsys.readouterr().err
    assert main(["backends"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("torch")]
    assert line.split()[:3] == ["torch", "missing", "-"] and "pip install 'unitrain[torch]'" in line


def test_sigterm_outside_training_ends_the_command_like_ctrl_c(monkeypatch, capsys):
    """MindSpore's own SIGINT handler turns Ctrl-C into SIGTERM; either ends a command cleanly."""
    import os
    import signal
    import time

    from unitrain import cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        return 0

    monkeypatch.setattr(cli, "cmd_backends", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["backends"]) == 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    assert capsys.readouterr().err == "unitrain: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_refusal_is_one_write_even_when_python_writes_through(tmp_path, monkeypatch):
    """The ranks of a data-parallel job share their launcher's stderr pipe; with PYTHONUNBUFFERED a
    ``print`` wrote the text and its newline apart, and two ranks' refusals ran into one line."""
    import io

    from unitrain import cli

    class Writes(io.RawIOBase):
        def __init__(self):
            self.calls = []

        def writable(self):
            return True

        def write(self, data):
            self.calls.append(bytes(data))
            return len(data)

    raw = Writes()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, write_through=True))  # as PYTHONUNBUFFERED makes it
    assert cli.main(["train", "--dataset", str(tmp_path / "missing.npz"), "--max-steps", "1"]) == 2
    assert [call.count(b"\n") for call in raw.calls] == [1] and raw.calls[0].startswith(b"unitrain: error: ")
