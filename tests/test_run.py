"""A run as one value: :class:`unitrain.run.Run` round-trips through dicts and
TOML recipes, refuses what it cannot describe in one line, and is what ``train``, ``compare``,
checkpoints and ``--resume`` share: a recipe trains exactly as the flags it was printed from, flags
override it, a checkpoint records it, and a resumed run with transforms lands where the
uninterrupted one does."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tomllib
from test_model_and_loss_flags import _dataset
from unitrain.conformance.tolerances import tolerance

import unitrain
from unitrain.optim import Adam, RMSprop
from unitrain.run import MAX_RECIPE_BYTES, DataSpec, Run, RunError, load_recipe
from unitrain.schedules import LRSchedule, parse_schedule
from unitrain.weights import load_safetensors


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, cwd=cwd)


#: every field away from its default
FULL = Run(
    model="cnn",
    data=DataSpec(
        dataset="fashion-mnist",
        val_split=100,
        normalize=((0.5,), (0.25,)),
        resize=(30, 30),
        pad=1,
        random_crop_padding=2,
        random_horizontal_flip=True,
    ),
    loss="nll",
    optimizer=Adam(lr=0.003, betas=(0.8, 0.99), weight_decay=0.1),
    lr_schedule="SequentialLR(schedulers=[LinearLR(start_factor=0.1, total_iters=2), "
    "ExponentialLR(gamma=0.9)], milestones=[2])",
    clip_grad_value=0.5,
    batch_size=32,
    epochs=5,
    max_steps=1000,
    shuffle=False,
    seed=7,
    init_weights="w.safetensors",
)


def test_a_run_is_a_value_that_round_trips_through_dicts_json_and_toml():
    assert isinstance(FULL.lr_schedule, LRSchedule)  # parsed from its text
    assert Run.from_dict(FULL.to_dict()) == FULL
    assert Run.from_dict(json.loads(json.dumps(FULL.to_dict()))) == FULL
    assert Run.from_dict(tomllib.loads(FULL.to_toml())) == FULL
    assert Run.from_dict({}) == Run()  # every field may be left out
    assert Run.from_dict(tomllib.loads(Run().to_toml())) == Run()
    assert "init_weights" not in Run().to_dict()  # None is left out (TOML has no null)
    assert Run().optimizer == unitrain.SGD(lr=0.01) and Run().data.dataset == "mnist"


def test_replace_changes_fields_and_data_fields():
    changed = Run().replace(epochs=1, data={"val_split": 10})
    assert (changed.epochs, changed.data.val_split, changed.data.dataset) == (1, 10, "mnist")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate = 0.1", "unknown field 'learning_rate'; expected some of model, loss"),
        ("[data]\nval_splits = 3", "unknown field 'val_splits' in data"),
        ("epochs = -1", "field 'epochs': expected an integer in 0..2^63-1, got -1"),
        ("epochs = 1.5", "field 'epochs': expected an integer"),
        ("shuffle = 'yes'", "field 'shuffle': expected true or false, got 'yes'"),
        ("loss = 'hinge'", "field 'loss': expected one of 'cross-entropy'"),
        ("model = 'os.system'", "model: expected a preset name or package.module:function, got 'os.system'"),
        ("lr_schedule = 'StepLR(gamma=0.5)'", "lr_schedule: StepLR needs step_size"),
        ("lr_schedule = '__import__(\"os\")'", "lr_schedule:"),
        ("clip_grad_norm = 1.0\nclip_grad_value = 1.0", "clip_grad_norm and clip_grad_value exclude each other"),
        ("[optimizer]\ntype = 'LBFGS'", "optimizer: unknown optimizer type 'LBFGS'; expected one of SGD, Adam"),
        ("[optimizer]\ntype = 'SGD'\nbetas = [0.9, 0.99]", "optimizer: SGD has no argument 'betas'"),
        ("[optimizer]\ntype = 'SGD'\nlr = 0", "optimizer: lr must be > 0, got 0"),
        ("[optimizer]\ntype = 'Adam'\nbetas = 0.9", "betas"),
        ("[data]\nresize = [32]", "field 'data.resize': expected a list of 2"),
        ("[data]\nnormalize = {mean = [0.5], std = [0.0]}", "data.normalize: expected stds > 0"),
        ("[data]\nnormalize = {mean = [0.5, 0.5], std = [0.2]}", "data.normalize: expected as many finite means"),
        ("[data]\nnormalize = {mean = ['0.5'], std = [0.2]}", "data.normalize: expected as many finite means"),
        ("epochs = ", "is not valid TOML"),
        ("data = 3", "field 'data': expected an object, got 3"),
    ],
)
def test_a_bad_recipe_is_one_line_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(RunError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"recipe {path}") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_recipe_files_that_are_not_recipes(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(RunError, match="is a directory"):
        load_recipe(tmp_path)
    (tmp_path / "huge.toml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(RunError, match=f"larger than {MAX_RECIPE_BYTES} bytes"):
        load_recipe(tmp_path / "huge.toml")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RunError, match="not UTF-8"):
        load_recipe(tmp_path / "binary.toml")


def test_values_are_checked_from_python_too():
    with pytest.raises(RunError, match="batch_size: expected an integer >= 1, got 0"):
        Run(batch_size=0)
    with pytest.raises(RunError, match="data.pad: expected an integer >= 0, got -2"):
        DataSpec(pad=-2)
    with pytest.raises(RunError, match="optimizer: expected an optimizer spec"):
        Run(optimizer="sgd")
    with pytest.raises(RunError, match="clip_grad_norm: expected a finite number > 0"):
        Run(clip_grad_norm=float("inf"))


def test_datasets_apply_the_transforms_in_order_and_augment_training_batches_only():
    run = Run(data=DataSpec(dataset="mnist", val_split=50, resize=(24, 24), pad=2, random_crop_padding=3,
                            random_horizontal_flip=True))  # fmt: skip
    train, val, test = run.datasets()
    assert train.x.shape[1:] == val.x.shape[1:] == test.x.shape[1:] == (1, 28, 28)
    assert (len(train), len(val)) == (59950, 50)
    assert train.augmentation is not None and val.augmentation is None and test.augmentation is None
    black = train.normalization.fill()[0]  # the padding is normalised black
    assert np.all(test.x[:, :, :2, :] == np.float32(black)) and np.all(test.x[:, :, :, -2:] == np.float32(black))
    again = run.datasets()[0]  # the same split, from the run's seed
    assert np.array_equal(next(train.batches(8, seed=run.seed))[0], next(again.batches(8, seed=run.seed))[0])


def test_run_train_is_the_loop_driven_by_hand(tmp_path):
    """From Python, ``Run.train`` is make_loop + fit with the run's settings, and loads its data
    (an .npz: 512 samples, 64 held out: 14 batches of 32 per epoch)."""
    _dataset(tmp_path / "digits.npz")
    run = Run(optimizer=RMSprop(lr=0.001, momentum=0.5), lr_schedule="ExponentialLR(gamma=0.5)", epochs=2,
              batch_size=32, data=DataSpec(dataset=str(tmp_path / "digits.npz"), val_split=64))  # fmt: skip
    loop, history = run.train("numpy")
    assert [record["lr"] for record in history] == [0.001, 0.0005] and loop.step_count == 28
    assert all("val_loss" in record and "test_loss" in record for record in history)

    train = run.datasets()[0]
    by_hand = unitrain.make_loop("numpy", unitrain.mlp(), optimizer=RMSprop(lr=0.001, momentum=0.5), seed=0,
                                 lr_schedule=parse_schedule("ExponentialLR(gamma=0.5)"))  # fmt: skip
    by_hand.fit(train, epochs=2, batch_size=32)
    for key, value in by_hand.state_dict().items():
        np.testing.assert_array_equal(loop.state_dict()[key], value)


# --- the command line -------------------------------------------------------------------------

#: 512 training samples, 64 held out: 14 batches of 32 per epoch; the run ends at step 24, in epoch 2
FLAGS = ["--dataset", "digits.npz", "--optimizer", "adadelta", "--lr", "1.0", "--lr-schedule",
         "StepLR(step_size=1, gamma=0.7)", "--clip-grad-norm", "1", "--val-split", "64", "--batch-size", "32",
         "--epochs", "2", "--max-steps", "24", "--random-crop-padding", "2", "--random-horizontal-flip",
         "--seed", "3"]  # fmt: skip
OUTPUTS = ["--backend", "numpy", "--threads", "1", "--no-progress"]


def _losses(path):
    return [(r["train_loss"], r["test_loss"], r["lr"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_printed_recipe_trains_exactly_as_its_flags_and_flags_override_it(tmp_path):
    _dataset(tmp_path / "digits.npz")
    printed = cli("train", *FLAGS, "--print-recipe", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "run.toml").write_text(printed.stdout)
    recipe = load_recipe(tmp_path / "run.toml")
    assert recipe.optimizer == unitrain.Adadelta(lr=1.0) and recipe.data.random_crop_padding == 2
    assert recipe.data.random_horizontal_flip and recipe.seed == 3 and recipe.max_steps == 24

    by_flags = cli("train", *FLAGS, *OUTPUTS, "--metrics", "flags.jsonl", "--save", "flags.safetensors", cwd=tmp_path)
    by_recipe = cli("train", "run.toml", *OUTPUTS, "--metrics", "recipe.jsonl", "--save", "recipe.safetensors",
                    cwd=tmp_path)  # fmt: skip
    assert by_flags.returncode == 0 and by_recipe.returncode == 0, by_flags.stderr + by_recipe.stderr
    assert _losses(tmp_path / "flags.jsonl") == _losses(tmp_path / "recipe.jsonl")
    lrs = [r[2] for r in _losses(tmp_path / "recipe.jsonl")]
    assert lrs == pytest.approx([1.0, 0.7], rel=0, abs=tolerance(np.float64, 1))  # a float64 product per epoch
    flags_weights = load_safetensors(tmp_path / "flags.safetensors")[0]
    for key, value in load_safetensors(tmp_path / "recipe.safetensors")[0].items():
        np.testing.assert_array_equal(flags_weights[key], value)

    overridden = cli("train", "run.toml", "--optimizer", "sgd", "--no-random-horizontal-flip", "--epochs", "1",
                     "--print-recipe", cwd=tmp_path)  # fmt: skip
    (tmp_path / "changed.toml").write_text(overridden.stdout)
    changed = load_recipe(tmp_path / "changed.toml")
    # another optimizer keeps the run's lr; everything not typed stays the recipe's
    assert changed == recipe.replace(optimizer=unitrain.SGD(lr=1.0), epochs=1, data={"random_horizontal_flip": False})


def test_the_checkpoint_records_the_run_and_a_resume_with_transforms_follows_the_uninterrupted_run(tmp_path):
    _dataset(tmp_path / "digits.npz")
    whole = cli("train", *FLAGS, *OUTPUTS, "--save", "whole.safetensors", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    first = cli("train", *FLAGS, *OUTPUTS, "--checkpoint-dir", "ck", "--checkpoint-every", "5", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    middle = tmp_path / "ck" / "step-00000020"  # batch 6 of epoch 2
    manifest = json.loads((middle / "checkpoint.json").read_text())
    assert Run.from_dict(manifest["run"]) == Run.from_dict(
        tomllib.loads(cli("train", *FLAGS, "--print-recipe", cwd=tmp_path).stdout)
    )
    assert manifest["normalization"]["source"] == "training set of digits.npz"

    resume = ["train", "--resume", str(middle), "--checkpoint-dir", "branch", *OUTPUTS]
    resumed = cli(*resume, "--save", "resumed.safetensors", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    whole_weights = load_safetensors(tmp_path / "whole.safetensors")[0]
    for key, value in load_safetensors(tmp_path / "resumed.safetensors")[0].items():
        np.testing.assert_array_equal(whole_weights[key], value)

    refused = cli("train", "--resume", str(middle), "--checkpoint-dir", "other", "--no-random-horizontal-flip",
                  cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert "--random-horizontal-flip False differs from the resumed run's True" in refused.stderr
    (tmp_path / "run.toml").write_text("epochs = 1\n")
    refused = cli("train", "run.toml", "--resume", str(middle), cwd=tmp_path)
    assert refused.returncode == 2 and "a RECIPE starts a new run" in refused.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run.toml"], "recipe run.toml does not exist"),
        (["--normalize", "0.5"], "argument --normalize: expected MEAN/STD"),
        (["--normalize", "0.5/0"], "argument --normalize: expected MEAN/STD"),
        (["--resize", "0x28"], "argument --resize: expected HEIGHTxWIDTH such as 32x32, got '0x28'"),
        (["--pad", "-1"], "argument --pad: must be >= 0, got -1"),
        (["--resize", "20x20"], "model mlp does not take mnist's 1x20x20 samples"),
        (["--optimizer", "adagrad", "--nesterov"], "--nesterov does not apply to --optimizer adagrad"),
        (["--normalize", "0.5,0.5/0.2,0.2"], "mnist is grayscale: its normalisation takes one mean and one std, got 2"),
        (["--resize", "5000x5000"], "data: resize 5000x5000 make 70000 samples of 1x5000x5000, 6519.3 GiB of float32"),
        (["--pad", "100000"], "data: pad 100000 make 70000 samples of 1x200028x200028"),
        (["--random-crop-padding", "29"], "data.random_crop_padding 29 is more than the 28x28 samples' size"),
    ],
)
def test_bad_run_flags_are_one_line_before_training(tmp_path, args, message):
    result = cli("train", *args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_compare_takes_a_recipe_and_records_it(tmp_path):
    (tmp_path / "run.toml").write_text(Run(epochs=1, max_steps=3, data=DataSpec(pad=2, resize=(24, 24))).to_toml())
    result = cli("compare", "run.toml", "--backends", "numpy,numpy", cwd=tmp_path)
    assert result.returncode == 2 and "two or more different backends" in result.stderr
    printed = cli("compare", "run.toml", "--lr", "0.1", "--print-recipe", cwd=tmp_path)
    assert Run.from_dict(tomllib.loads(printed.stdout)).optimizer == unitrain.SGD(lr=0.1)


def test_evaluate_and_predict_take_the_runs_model_and_transforms_from_its_recipe(tmp_path):
    _dataset(tmp_path / "digits.npz")
    (tmp_path / "run.toml").write_text(
        Run(data=DataSpec(dataset="digits.npz", resize=(24, 24), pad=2), epochs=1, max_steps=6).to_toml()
    )
    trained = cli("train", "run.toml", *OUTPUTS, "--save", "w.safetensors", "--metrics", "m.jsonl", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    (record,) = map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())
    evaluated = cli("evaluate", "--weights", "w.safetensors", "--recipe", "run.toml", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"test loss {record['test_loss']:.4f}" in evaluated.stdout

    from PIL import Image

    with np.load(tmp_path / "digits.npz") as arrays:
        Image.fromarray(arrays["x_test"][3]).save(tmp_path / "digit.png")
    by_index = cli("predict", "--weights", "w.safetensors", "--recipe", "run.toml", "--index", "3", cwd=tmp_path)
    by_image = cli("predict", "--weights", "w.safetensors", "--recipe", "run.toml", "--image", "digit.png",
                   cwd=tmp_path)  # fmt: skip
    assert by_index.returncode == 0 and by_image.returncode == 0, by_index.stderr + by_image.stderr
    assert by_index.stdout.splitlines()[1] == by_image.stdout.splitlines()[1]  # the same probabilities

    refused = cli("evaluate", "--weights", "w.safetensors", "--recipe", "run.toml", "--model", "cnn", cwd=tmp_path)
    assert refused.returncode == 2 and "--model and --recipe exclude each other" in refused.stderr


def test_a_run_from_init_weights_resumes_without_them(tmp_path):
    """The recorded run names its initial weights; a resume starts from its checkpoint instead, so
    the file may be gone."""
    _dataset(tmp_path / "digits.npz")
    unitrain.make_loop("numpy", unitrain.mlp(), seed=5).save_weights(tmp_path / "start.safetensors")
    flags = ["--dataset", "digits.npz", "--init-weights", "start.safetensors", "--epochs", "2", *OUTPUTS]
    first = cli("train", *flags, "--checkpoint-dir", "ck", "--checkpoint-every", "5", "--save", "whole.safetensors",
                cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr
    (tmp_path / "start.safetensors").unlink()
    resume = ["train", "--resume", "ck/step-00000010", "--checkpoint-dir", "branch", *OUTPUTS]
    resumed = cli(*resume, "--save", "resumed.safetensors", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    whole = load_safetensors(tmp_path / "whole.safetensors")[0]
    for key, value in load_safetensors(tmp_path / "resumed.safetensors")[0].items():
        np.testing.assert_array_equal(whole[key], value)
