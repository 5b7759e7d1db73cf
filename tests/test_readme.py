"""The README's code runs as written."""

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str, language: str = "python") -> list[str]:
    text = README.read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.mark.slow
def test_the_python_api_example_trains_and_saves(tmp_path):
    (example,) = python_blocks("The Python API")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # the printed evaluate() dict
    assert metrics["num_samples"] == 10000 and metrics["accuracy"] >= 0.92
    assert (tmp_path / "mlp.safetensors").stat().st_size > 2_000_000


def test_the_models_section_examples_run():
    model_example, loss_example, _torchvision_example = python_blocks("Models, layers and losses")
    namespace = {}
    exec(model_example, namespace)  # the README's own code
    assert namespace["model"].output_shape((3, 32, 32)) == (10,)
    assert list(namespace["model"].state_shapes())[:3] == ["stem.weight", "stem.bias", "block.conv1.weight"]
    exec(loss_example, namespace)
    assert namespace["seed_tutorial"].tree == ("sum", ("sub", ("pred",), ("target",)), None)


def test_the_conformance_matrix_lists_every_check_in_order():
    from unitrain.conformance import CHECKS

    text = README.read_text().split("## The conformance suite\n", 1)[1]
    assert re.findall(r"^\| `(check_\w+)` \|", text, re.M) == list(CHECKS)


@pytest.mark.slow
def test_the_recipe_section_shows_what_print_recipe_prints_and_its_python_runs(tmp_path):
    section = "A run is one value: recipes"
    commands = python_blocks(section, "")[0]  # the first plain block
    (recipe,) = python_blocks(section, "toml")
    (example,) = python_blocks(section)
    first = commands.replace("\\\n", " ").splitlines()[0].split(">")[0]
    unitrain = [sys.executable, "-m", "unitrain"]
    printed = subprocess.run([*unitrain, *shlex.split(first)[1:]], cwd=tmp_path, capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == recipe
    (tmp_path / "adadelta.toml").write_text(recipe)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 0.5 < float(result.stdout.splitlines()[0]) <= 1  # the test accuracy after 200 Adadelta steps
    assert 'model = "mlp"' in result.stdout  # the printed recipe
