"""Hostile runs as described (recipes, flags, model functions): a run that cannot work is refused
in one line, exit code 2, before any data loads or any framework is imported where that can be
known; nothing of the user's is touched."""

import numpy as np
import pytest
from conftest import installed_backends
from test_hostile_runs import TINY_RUN, one_error_line, run_cli, snapshot

import unitrain
from unitrain import run as run_module
from unitrain.checkpoint import checkpoint_paths
from unitrain.layers import MAX_LAYERS, MAX_NESTING
from unitrain.run import MAX_RECIPE_BYTES, MAX_RECIPE_NESTING, toml_nesting

ONE_CYCLE = "OneCycleLR(max_lr=0.1, total_steps=5)"


@pytest.fixture
def no_data_loads(monkeypatch):
    """Fails the test if any dataset is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(run_module, "load_datasets", refuse)


# --- OneCycleLR shorter than the run ---------------------------------------------------------------


def test_a_one_cycle_schedule_shorter_than_the_run_is_refused_before_the_data_loads(tmp_path, capsys, no_data_loads):
    recipe = tmp_path / "run.toml"
    recipe.write_text(f'epochs = 1\nlr_schedule = "{ONE_CYCLE}"\n')
    expected = "lr_schedule: OneCycleLR covers 5 steps, but the run takes up to 938;"
    for argv in (["train", "--lr-schedule", ONE_CYCLE, "--epochs", "1"], ["train", str(recipe)],
                 ["compare", "--backends", "numpy,torch", str(recipe)]):  # fmt: skip
        status, _, err = run_cli(capsys, *argv)
        assert status == 2
        one_error_line(err, expected)
    status, _, err = run_cli(capsys, "train", str(recipe), "--val-split", "54000", "--batch-size", "1000")
    assert status == 2  # the held-out samples are not trained on
    one_error_line(err, "OneCycleLR covers 5 steps, but the run takes up to 6;")


def test_resuming_past_a_one_cycle_schedule_is_refused(tmp_path, capsys):
    directory = tmp_path / "D"
    status, _, err = run_cli(capsys, "train", *TINY_RUN, "--lr-schedule", ONE_CYCLE, "--max-steps", "4",
                             "--checkpoint-dir", str(directory), "--checkpoint-every", "2")  # fmt: skip
    assert status == 0, err
    before = snapshot(directory)
    step_2 = checkpoint_paths(directory)[0]
    status, _, err = run_cli(capsys, "train", "--no-progress", "--resume", str(step_2), "--max-steps", "6",
                             "--checkpoint-dir", str(tmp_path / "branch"))  # fmt: skip
    assert status == 2
    one_error_line(err, "lr_schedule: OneCycleLR covers 5 steps, but the run takes up to 6;")
    assert snapshot(directory) == before and not (tmp_path / "branch").exists()


def test_a_one_cycle_schedule_is_checked_against_the_users_own_training_set(tmp_path, capsys):
    """Its size is known once it is read (before any framework is imported)."""
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 256, (48, 28, 28), np.uint8), y_train=np.arange(48) % 2,
             x_test=rng.integers(0, 256, (8, 28, 28), np.uint8), y_test=np.arange(8) % 2)  # fmt: skip
    status, _, err = run_cli(capsys, "train", "--dataset", str(data), "--lr-schedule", ONE_CYCLE, "--batch-size", "8",
                             "--epochs", "1")  # fmt: skip
    assert status == 2
    one_error_line(err, "lr_schedule: OneCycleLR covers 5 steps, but the run takes up to 6;")


# --- recipes too deep or too large for the TOML reader -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a = " + "[" * 100_000 + "]" * 100_000, f"is larger than {MAX_RECIPE_BYTES} bytes"),
        ("a = " + "[" * 1000 + "]" * 1000, "nests arrays, tables or dotted keys 1000 deep; expected at most 16"),
        ("a = " + "{b = " * 1000 + "}" * 1000, "nests arrays, tables or dotted keys 1000 deep"),
        ("".join(f"[{'.'.join(['t'] * depth)}]\n" for depth in range(1, 60)), "dotted keys 58 deep"),
        ("a" + ".b" * 1000 + " = 1", "dotted keys 1000 deep"),
        ("".join(f"[a{i}.b.c]\n" for i in range(100_000)), f"is larger than {MAX_RECIPE_BYTES} bytes"),
    ],
    ids=[
        "100k nested arrays",
        "1000 nested arrays",
        "1000 inline tables",
        "deeper headers",
        "dotted key",
        "100k headers",
    ],
)
@pytest.mark.parametrize("command", ["train", "compare", "evaluate", "predict"])
def test_a_recipe_too_deep_or_too_large_is_refused_before_it_is_parsed(tmp_path, capsys, no_data_loads, command,
                                                                       text, expected):  # fmt: skip
    recipe = tmp_path / "run.toml"
    recipe.write_text(text)
    argv = (
        [command, str(recipe)]
        if command in ("train", "compare")
        else [command, "--weights", "w", "--recipe", str(recipe)]
    )
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    one_error_line(err, f"recipe {recipe} ")
    assert expected in err


@pytest.mark.parametrize(
    ("text", "nesting"),
    [
        ('model = "mlp"\n[data]\nnormalize = {mean = [0.5, 0.25], std = [1.5, 2.0]}\nresize = [32, 32]', 2),
        ('dataset = "a/[[[[/{{{.b.c.d.e"', 0),  # brackets and dots inside strings do not nest
        ("dataset = 'a[[[['\n# [[[[ a.b.c.d\nx = '''\n[[[[\n'''", 0),
        ('x = """\\"""[[[["""', 0),
        ('x = "]]]]"\ny = [["]"]]', 2),  # closing brackets in a string hide no depth
        ("at = 1979-05-27T07:32:00.999", 1),
        ('"a"."b"."c" = 1', 2),
    ],
)
def test_toml_nesting_counts_what_the_parser_nests(text, nesting):
    assert toml_nesting(text) == nesting <= MAX_RECIPE_NESTING


# --- a model function that exits ---------------------------------------------------------------------

EXITING_MODULES = {
    "on import": "import sys\nsys.exit({code})\n",
    "when called": "import sys\n\ndef build():\n    sys.exit({code})\n",
}


@pytest.mark.parametrize("code", [0, 3, "'bye'"])
@pytest.mark.parametrize("where", ["on import", "when called"])
def test_a_model_function_that_calls_sys_exit_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, code, where):
    """sys.exit(0) ended unitrain with exit code 0, nothing trained and nothing said."""
    monkeypatch.chdir(tmp_path)
    module = f"exits_{where.replace(' ', '_')}_{str(code).strip(chr(39))}"
    (tmp_path / f"{module}.py").write_text(EXITING_MODULES[where].format(code=code))
    model = f"{module}:build"
    (tmp_path / "run.toml").write_text(f'model = "{model}"\nepochs = 0\n')
    (tmp_path / "w.safetensors").write_bytes(b"never read")
    expected = (f"cannot import {module}: importing it called sys.exit({code})" if where == "on import"
                else f"build() called sys.exit({code})")  # fmt: skip
    for argv in (["train", "--model", model], ["train", "run.toml"], ["evaluate", "--weights", "w.safetensors",
                 "--model", model], ["convert", "w.safetensors", "w.pt", "--model", model]):  # fmt: skip
        status, out, err = run_cli(capsys, *argv)
        assert status == 2, argv
        one_error_line(err, expected)
        assert out == ""
    written = {path.name for path in tmp_path.iterdir()} - {"__pycache__", f"{module}.py", "run.toml", "w.safetensors"}
    assert not written and (tmp_path / "w.safetensors").read_bytes() == b"never read"


# --- models that cannot be built --------------------------------------------------------------------

UNBUILDABLE = """
from unitrain.layers import Flatten, Linear, Sequential


def nested(depth):
    model = Sequential(Flatten(), Linear(784, 10))
    for _ in range(depth - 1):
        model = Sequential(model)
    return model


def deepest():
    return nested(MAX_NESTING)


def too_deep():
    return nested(500)


def too_wide():
    return Sequential(Flatten(), Linear(784, 10**6), Linear(10**6, 10**6), Linear(10**6, 10))


def shared_exponentially():
    model = Sequential(Flatten(), Linear(784, 10))
    for _ in range(40):
        model = Sequential(model, model)  # 2**40 layers, 40 deep
    return model
"""
UNBUILDABLE_NAMESPACE = {"MAX_NESTING": MAX_NESTING}
exec(UNBUILDABLE, UNBUILDABLE_NAMESPACE)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("too_deep", f"the model nests containers more than {MAX_NESTING} deep; expected at most {MAX_NESTING}"),
        ("too_wide", "the model has 1,000,796,000,010 weights, 3,728.3 GiB at 4 bytes each and as much again for "
                     "their gradients; this machine has "),
        ("shared_exponentially", f"the model has more than {MAX_LAYERS} layers"),
    ],
)  # fmt: skip
def test_a_model_that_cannot_be_built_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys, no_data_loads,
                                                                         function, expected):  # fmt: skip
    """Linear(10**6, 10**6) was a NumPy _ArrayMemoryError traceback (3.6 TiB asked for), a Sequential
    nested 500 deep a RecursionError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unbuildable.py").write_text(f"MAX_NESTING = {MAX_NESTING}\n{UNBUILDABLE}")
    model = f"unbuildable:{function}"
    for argv in (["train", "--model", model], ["convert", "w.safetensors", "w.pt", "--model", model]):
        status, _, err = run_cli(capsys, *argv)
        assert status == 2
        one_error_line(err, f"argument --model: model '{model}': {expected}")
    spec = UNBUILDABLE_NAMESPACE[function]()
    with pytest.raises(ValueError, match=expected.split(";")[0]):  # the library too, before anything is built
        unitrain.make_loop("numpy", spec)


@pytest.mark.slow
def test_a_model_nested_as_deep_as_allowed_trains_on_every_backend():
    spec = UNBUILDABLE_NAMESPACE["deepest"]()
    x, y = np.zeros((2, 1, 28, 28), np.float32), np.array([3, 7])
    for backend in installed_backends():
        loop = unitrain.make_loop(backend, spec, seed=0)
        loop.step((x, y))
        assert list(loop.state_dict()) == ["0." * (MAX_NESTING - 1) + f"1.{name}" for name in ("weight", "bias")]
