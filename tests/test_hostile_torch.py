"""Hostile PyTorch modules through the command line: a ``--model`` function returning an
``nn.Module`` that ``unitrain.from_torch`` cannot import (control flow on values, operations and
layers with no unitrain twin, outputs that are no tensors, a forward that raises or is
interrupted). Each is one line, exit code 2 (130 for Ctrl-C), before any data loads, nothing
written. The factories' own failures (a tuple of the wrong length, NaN or complex weights,
``sys.exit`` in ``forward``) are in ``test_hostile_models.py``."""

import pytest
from test_hostile_runs import one_error_line, run_cli

pytest.importorskip("torch")

MODULES = """
import torch
from torch import nn

X = torch.zeros(2, 1, 28, 28)


class Net(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.fc, self.body = nn.Linear(784, 10), forward

    def forward(self, x):
        return self.body(self, x.flatten(1))


def branches(self, x):
    if x.sum() > 0:  # control flow on a value: torch.fx traces no branch
        return self.fc(x)
    return -self.fc(x)


def raises(self, x):
    raise ValueError("no forward today")


def interrupted(self, x):
    raise KeyboardInterrupt


def build(body):
    return Net(body), X


def data_dependent():
    return build(branches)


def sort():
    return build(lambda self, x: torch.sort(self.fc(x), dim=1).values)


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Bilinear(784, 784, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.b(x, x)


def bilinear():
    return Bilinear(), X


def a_dict():
    return build(lambda self, x: {"logits": self.fc(x)})


def in_place():
    return build(lambda self, x: self.fc(x).relu_())


def a_forward_that_raises():
    return build(raises)


def ctrl_c():
    return build(interrupted)
"""

CASES = {  # the function -> the line's words after "model 'torchnets:NAME': from_torch: "
    "data_dependent": "torch.fx cannot trace Net.forward: symbolically traced variables cannot be used as inputs to "
                      "control flow",
    "sort": "node 'sort' (torch.sort): has no unitrain operation",
    "bilinear": "module 'b' (Bilinear) has no unitrain layer; supported: Linear, ",
    "a_dict": "node 'output' (output): the module returns something other than tensors",
    "in_place": "node 'relu_' (Tensor.relu_): has no unitrain operation",
    "a_forward_that_raises": "torch.fx cannot trace Net.forward: no forward today",
}  # fmt: skip


@pytest.fixture
def torchnets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "torchnets.py").write_text(MODULES)
    return tmp_path


def test_modules_from_torch_cannot_import_are_one_line_and_exit_2(torchnets, capsys):
    for function, words in CASES.items():
        status, out, err = run_cli(capsys, "train", "--model", f"torchnets:{function}", "--save", "w.safetensors")
        assert status == 2 and out == "", function
        one_error_line(err, f"argument --model: model 'torchnets:{function}': from_torch: {words}")
        assert not (torchnets / "w.safetensors").exists()


def test_ctrl_c_while_a_module_is_traced_ends_the_command_as_interrupted(torchnets, capsys):
    status, out, err = run_cli(capsys, "train", "--model", "torchnets:ctrl_c")
    assert status == 130 and out == "" and err == "unitrain: interrupted\n"


COUNTED = """
import sys
import torch
from torch import nn

CALLS = []


def build():
    CALLS.append("build")
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), torch.zeros(2, 1, 28, 28)
"""


def test_one_command_calls_the_model_function_and_traces_the_module_once(tmp_path, monkeypatch, capsys):
    """It was called (and the module traced, twice each time) six times by one train: a model of 318 MB
    peaked at 4.2 GB of memory, against 1.5 GB for the same model written with unitrain's layers."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "counted_torch.py").write_text(COUNTED)
    status, _, err = run_cli(capsys, "train", "--model", "counted_torch:build", "--max-steps", "1", "--no-progress",
                             "--save", "w.safetensors")  # fmt: skip
    assert status == 0, err
    import counted_torch

    assert counted_torch.CALLS == ["build"]
    status, _, err = run_cli(capsys, "evaluate", "--model", "counted_torch:build", "--weights", "w.safetensors")
    assert status == 0, err
    assert counted_torch.CALLS == ["build"] * 2  # each command builds its own
