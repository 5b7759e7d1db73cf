"""The framework-neutral core: specs, shape inference, registry, and that it imports no framework."""

import json
import subprocess
import sys

import pytest

import unitrain
from unitrain import registry
from unitrain.optim import SGD, Adam, AdamW

FRAMEWORKS = ("torch", "mindspore", "chainer")


def _modules_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import unitrain, unitrain.backends, unitrain.conformance, unitrain.compare, unitrain.checkpoint",
        "from unitrain.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass",
        "from unitrain.cli import main; main(['backends'])",
        "import unitrain; unitrain.load_mnist('test'); unitrain.init_weights(unitrain.cnn(), 0)",
    ],
)
def test_core_imports_no_framework(code):
    loaded = _modules_after(code)
    assert [name for name in FRAMEWORKS if name in loaded] == []


def test_presets_are_the_tutorial_networks():
    assert [type(layer).__name__ for layer in unitrain.mlp()] == [
        "Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear",
    ]  # fmt: skip
    assert unitrain.mlp().output_shape((1, 28, 28)) == (10,)
    assert unitrain.cnn().output_shape((1, 28, 28)) == (10,)
    assert unitrain.cnn().state_shapes()["7.weight"] == (120, 192)


def test_shape_inference_names_the_layer():
    with pytest.raises(ValueError, match=r"Linear\(in_features=784.* expects 784 input features.*\(100,\)"):
        unitrain.mlp().output_shape((1, 10, 10))
    with pytest.raises(ValueError, match="Conv2d.* expects per-sample input"):
        unitrain.cnn().output_shape((3, 28, 28))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: unitrain.Linear(0, 3), "in_features must be a positive integer, got 0"),
        (lambda: unitrain.Conv2d(1, 2, 3, padding=-1), "padding must be an integer >= 0 or a pair of them, got -1"),
        (lambda: unitrain.Dropout(1.0), r"p must be in \[0, 1\), got 1.0"),
        (lambda: unitrain.BatchNorm1d(4, momentum=0), r"momentum must be in \(0, 1\]"),
        (lambda: unitrain.Sequential(unitrain.ReLU(), "relu"), "item 1 is 'relu', expected a unitrain layer spec"),
        (lambda: SGD(lr=0), "lr must be > 0, got 0"),
        (lambda: SGD(lr=-1), "lr must be > 0, got -1"),
        (lambda: SGD(momentum=1.5), r"momentum must be in \[0, 1\), got 1.5"),
        (lambda: SGD(nesterov=True), "nesterov requires momentum > 0"),
        (lambda: Adam(betas=(0.9, 1.0)), r"betas\[1\] must be in \[0, 1\)"),
        (lambda: AdamW(weight_decay=-0.1), "weight_decay must be >= 0"),
        (lambda: unitrain.CrossEntropyLoss("avg"), "reduction must be one of"),
    ],
)
def test_specs_reject_nonsense_with_the_value(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_optimizer_state_names():
    assert SGD().state_names == () and SGD(momentum=0.9).state_names == ("momentum_buffer",)
    assert Adam().state_names == AdamW().state_names == ("exp_avg", "exp_avg_sq")


def test_registry_errors_name_the_alternatives(monkeypatch):
    with pytest.raises(
        registry.BackendError, match="unknown backend 'jax'; available: numpy, torch, mindspore, chainer"
    ):
        registry.get_backend("jax")
    missing = registry.BackendSpec("ghost", "ghost:Loop", "ghost_framework_not_installed", None, "pip install ghost")
    monkeypatch.setitem(registry.BUILTIN, "ghost", missing)
    with pytest.raises(registry.BackendError, match="needs ghost_framework_not_installed, which is not installed: pip"):
        registry.get_backend("ghost")


def test_environment_variable_chooses_the_default_backend(monkeypatch):
    monkeypatch.setenv("UNITRAIN_BACKEND", "jax")
    with pytest.raises(registry.BackendError, match="unknown backend 'jax'"):
        registry.get_backend()
    monkeypatch.delenv("UNITRAIN_BACKEND")
    assert registry.get_backend().name == "numpy"


def test_adapter_targets_must_be_training_loops():
    with pytest.raises(registry.BackendError, match="must be written 'module:Class'"):
        registry.load_adapter("unitrain.loop")
    with pytest.raises(registry.BackendError, match="is not a unitrain.TrainingLoop subclass"):
        registry.load_adapter("unitrain.data:ArrayDataset")
