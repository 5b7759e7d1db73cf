"""Hostile dialects: ``--dialect`` and a recipe's ``dialect`` of any value and type, for every
command that reads one, and the dialect where it cannot apply (a multi-model recipe, a resumed
run). Each is one line, exit code 2, before any data loads."""

import pytest
from test_hostile_recipes import no_data_loads  # noqa: F401 (a fixture)
from test_hostile_runs import one_error_line, run_cli
from test_multi_run import NETS, RECIPE

EXPECTED = "field 'dialect': expected one of 'torch', 'chainer', 'keras', 'mindspore', got "


@pytest.mark.parametrize(
    ("value", "shown"),
    [("5", "5"), ('"nonsense"', "'nonsense'"), ('""', "''"), ('"KERAS"', "'KERAS'"), ('["keras"]', "['keras']"),
     ('{name = "keras"}', "{'name': 'keras'}"), ("true", "True")],
)  # fmt: skip
def test_a_recipe_dialect_of_any_other_value_is_one_line_for_every_command(tmp_path, capsys, no_data_loads,  # noqa: F811
                                                                           value, shown):  # fmt: skip
    recipe = tmp_path / "run.toml"
    recipe.write_text(f"dialect = {value}\n")
    for argv in (["train", str(recipe)], ["compare", "--backends", "numpy,torch", str(recipe)],
                 ["evaluate", "--weights", "w", "--recipe", str(recipe)],
                 ["predict", "--weights", "w", "--recipe", str(recipe)]):  # fmt: skip
        status, out, err = run_cli(capsys, *argv)
        assert status == 2 and out == "", argv
        one_error_line(err, f"recipe {recipe}: {EXPECTED}{shown}")


@pytest.mark.parametrize("value", ["nonsense", "", "KERAS", "torch,keras"])
def test_a_dialect_flag_of_another_value_is_one_line(capsys, value):
    status, _, err = run_cli(capsys, "train", "--dialect", value)
    assert status == 2
    one_error_line(err, f"argument --dialect: invalid choice: {value!r}")


def test_a_dialect_where_it_cannot_apply_is_one_line(tmp_path, capsys, monkeypatch, no_data_loads):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinynets.py").write_text(NETS)
    (tmp_path / "gan.toml").write_text(RECIPE)
    (tmp_path / "keras_gan.toml").write_text('dialect = "keras"\n' + RECIPE)
    status, _, err = run_cli(capsys, "train", "gan.toml", "--dialect", "keras")
    assert status == 2
    one_error_line(err, "--dialect does not apply to a multi-model recipe: set it in the recipe's tables")
    status, _, err = run_cli(capsys, "train", "keras_gan.toml")
    assert status == 2
    one_error_line(err, "recipe keras_gan.toml: unknown field 'dialect'; expected some of models, optimizers, phases")
