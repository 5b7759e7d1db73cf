"""The documentation: the site builds strictly (a broken link, reference or nav entry fails), every
public name is in its API reference, the gallery shows each example's real output, and the code
in its pages runs as written."""

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import installed_backends

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def page_blocks(page: str, language: str = "python") -> list[str]:
    """The fenced ``language`` blocks of ``docs/<page>`` ("" for plain fences)."""
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), re.S)


def build_site(site: Path, **env: str) -> subprocess.CompletedProcess:
    missing = [name for name in DOCS_TOOLS if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)}): pip install 'unitrain[docs]'")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", **env}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


def test_the_site_builds_strictly_with_every_public_name_in_the_api_reference(tmp_path):
    import unitrain

    built = build_site(tmp_path / "site", UNITRAIN_GALLERY="off")
    assert built.returncode == 0, built.stderr[-3000:]
    reference = "".join(path.read_text() for path in (tmp_path / "site" / "api").rglob("*.html"))
    reference += (tmp_path / "site" / "contract" / "index.html").read_text()
    # mkdocstrings renders only names with a docstring of their own: an anchor is a documented name
    anchors = set(re.findall(r'id="(unitrain\.[\w.]+)"', reference))
    assert [name for name, module in unitrain._EXPORTS.items() if f"unitrain.{module}.{name}" not in anchors] == []
    listed = re.findall(r"^\| \[`(\w+)`\]\[unitrain\.([\w.]+)\.\1\] \|", (DOCS / "api" / "index.md").read_text(), re.M)
    assert listed == sorted(unitrain._EXPORTS.items())
    for example in sorted((ROOT / "examples").glob("*.py")):  # each example has its gallery page
        assert (tmp_path / "site" / "gallery" / example.stem / "index.html").is_file()


@pytest.mark.slow
def test_the_gallery_shows_each_examples_output_from_the_build(tmp_path):
    # two backends keep it short: the rendering is the same for each, and test_examples.py runs
    # every example on every backend
    backends = [name for name in ("numpy", "torch") if name in installed_backends()]
    built = build_site(tmp_path / "site", UNITRAIN_GALLERY_STEPS="3", UNITRAIN_GALLERY_BACKENDS=",".join(backends),
                       UNITRAIN_GALLERY_CACHE=str(tmp_path / "cache"))  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    for example in sorted((ROOT / "examples").glob("*.py")):
        page = (tmp_path / "site" / "gallery" / example.stem / "index.html").read_text()
        runs = ["compare"] if '"--compare"' in example.read_text() else backends
        for run in runs:  # a row per run with exit status 0, and its output in a tab
            assert re.search(rf"<td>{run}</td>\s*<td>0</td>", page), (example.name, run)
        assert "Ports:" in page and "What maps to what" in page


@pytest.mark.slow
def test_the_python_api_example_trains_and_saves(tmp_path):
    example = page_blocks("python-api.md")[0]
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    metrics = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # the printed evaluate() dict
    assert metrics["num_samples"] == 10000 and metrics["accuracy"] >= 0.92
    assert (tmp_path / "mlp.safetensors").stat().st_size > 2_000_000


def test_the_models_section_examples_run():
    model_example, loss_example, _torchvision_example = page_blocks("models.md")
    namespace = {}
    exec(model_example, namespace)  # the page's own code
    assert namespace["model"].output_shape((3, 32, 32)) == (10,)
    assert list(namespace["model"].state_shapes())[:3] == ["stem.weight", "stem.bias", "block.conv1.weight"]
    exec(loss_example, namespace)
    assert namespace["seed_tutorial"].tree == ("sum", ("sub", ("pred",), ("target",)), None)


def test_the_conformance_matrix_lists_every_check_in_order():
    from unitrain.conformance import CHECKS

    text = (DOCS / "conformance.md").read_text()
    assert re.findall(r"^\| `(check_\w+)` \|", text, re.M) == list(CHECKS)


@pytest.mark.slow
def test_the_recipe_section_shows_what_print_recipe_prints_and_its_python_runs(tmp_path):
    commands = page_blocks("recipes.md", "")[0]  # the first plain block
    (recipe,) = page_blocks("recipes.md", "toml")
    (example,) = page_blocks("recipes.md")
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


def test_the_job_example_trains_resumes_and_prints_what_it_says(tmp_path):
    example = page_blocks("jobs.md")[0]
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    said = [line.split("  # ")[1] for line in example.splitlines() if line.startswith("print(")]
    assert [line for line in result.stdout.splitlines() if not line.startswith(("unitrain:", "epoch"))] == said


@pytest.mark.slow
def test_the_tensorboard_example_writes_events(tmp_path):
    pytest.importorskip("tensorboardX")
    (example,) = page_blocks("tensorboard.md")
    if "chainer" not in installed_backends():
        pytest.skip("the example trains on chainer")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "runs" / "chainer").glob("events.out.tfevents.*"))


def test_the_readme_is_a_front_page_whose_links_exist_and_whose_code_the_api_page_runs():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") < 150
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    tested = {line.split("  #")[0] for line in page_blocks("python-api.md")[0].splitlines()}
    assert [line for line in snippet.splitlines() if line not in tested] == []
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        assert target.startswith("http") or (ROOT / target).exists(), target
