"""Hostile multi-model steps (``unitrain.steps``, recipes with ``[models]``): a batch that is not
one finite numeric array, a model called on a value of another shape, and ``[pictures]`` that
are no images, are refused in one line, exit code 2, before any phase runs: no traceback from
inside a backend's layers, no step trained on it silently, no epoch trained and then lost,
nothing written. The recipe's other refusals are in ``test_multi_run.py``."""

import re
import warnings

import numpy as np
import pytest
from conftest import installed_backends
from test_hostile_runs import on_a_full_disk, one_error_line, run_cli
from test_multi_run import RECIPE, tiny  # noqa: F401 (tiny: the tiny GAN's directory, a fixture)

from unitrain import expr, ops, steps
from unitrain.graph import Graph, Input
from unitrain.input_checks import InputError
from unitrain.layers import BatchNorm1d, Flatten, Linear, Sequential, Sigmoid
from unitrain.optim import SGD
from unitrain.sequences import Embedding
from unitrain.step_shapes import check_step_shapes, node_shapes

OUTPUTS = ["out", "ck", "m.jsonl", "p.png"]  # what the runs below would write


RECIPES = {  # (text replaced, by) -> the line's words
    # each was a NumPy matmul traceback from inside the first phase
    "noise of another size": (
        ("generator(normal(4))", "generator(normal(5))"),
        "phase 'discriminator': model 'generator': node 'first' calls first: Linear(in_features=4, out_features=12, "
        "bias=True) expects 4 input features per sample, got per-sample shape (5,)",
    ),
    "noise of another rank": (
        ("generator(normal(4))", "generator(normal(2, 2))"),
        "phase 'discriminator': model 'generator': input 'z' has per-sample shape (4,), got (2, 2)",
    ),
    "the discriminator given the noise": (
        ("bce(discriminator(batch), 1.0)", "bce(discriminator(normal(4)), 1.0)"),
        "phase 'discriminator': model 'discriminator': 1: Linear(in_features=64, out_features=12, bias=True) expects "
        "64 input features per sample, got per-sample shape (4,)",
    ),
    # found only when the first epoch's pictures were drawn: the epoch's training lost, no checkpoint
    "pictures from noise the generator does not take": (
        ('samples = "generator(uniform(4) * 2 - 1)"', 'samples = "generator(uniform(5))"'),
        "pictures.samples: model 'generator': node 'first' calls first: Linear(in_features=4",
    ),
    # drawn as a strip of 4x1 pixels, or as one pixel, without a word
    "pictures of the discriminator's scores": (
        ('samples = "generator(uniform(4) * 2 - 1)"', 'samples = "discriminator(batch)"'),
        "pictures.samples: gives values of shape (4, 1); expected grayscale images, (N, H, W) or (N, 1, H, W)",
    ),
    # a NumPy or PyTorch error from inside BatchNorm at the first step; Chainer trained on it silently
    "one sample a step through BatchNorm": (
        ("batch_size = 8", "batch_size = 1"),
        "phase 'discriminator': model 'discriminator': 2: BatchNorm in training needs more than one value per "
        "channel, but a batch of 1 gives 1 there",
    ),
    "a picture of one number": (
        ('samples = "generator(uniform(4) * 2 - 1)"', 'samples = "generator(uniform(4)).mean()"'),
        "pictures.samples: gives values of shape (); expected grayscale images",
    ),
}


@pytest.mark.parametrize("case", RECIPES)
def test_a_model_given_values_of_another_shape_is_refused_before_any_step(tiny, capsys, case):  # noqa: F811
    (old, new), words = RECIPES[case]
    assert old in RECIPE
    (tiny / "bad.toml").write_text(RECIPE.replace(old, new))
    status, _, err = run_cli(capsys, "train", "bad.toml", "--epochs", "1", "--save", "out", "--checkpoint-dir", "ck",
                             "--metrics", "m.jsonl", "--plot", "p.png", "--no-progress")  # fmt: skip
    assert status == 2
    one_error_line(err, words)
    assert not [name for name in OUTPUTS if (tiny / name).exists()]


@pytest.mark.parametrize("backend", installed_backends())
def test_a_refused_step_leaves_every_model_and_the_noise_stream_as_they_were(backend):
    z = Input((3,), name="z")
    first = Linear(3, 6)
    generator = Graph(z, first(z), {"first": first})
    critic = Sequential(Linear(6, 1), Sigmoid())
    g, d = steps.Model("g"), steps.Model("d")
    wrong = steps.MultiStep({"g": generator, "d": critic}, {"sgd": steps.OptimizerOver(SGD(0.1), ["g", "d"])},
                            [steps.Phase("fit", steps.bce(d(g(steps.normal(4))), 1.0), "sgd")])  # fmt: skip
    loop = steps.MultiModelLoop(wrong, backend, seed=0)
    before = ({name: state.copy() for name, state in loop.state_dicts()["g"].items()}, dict(loop.noise.state()))
    with pytest.raises(InputError, match=r"^phase 'fit': model 'g': node 'first' calls first: Linear\(in_features=3"):
        loop.step(np.zeros((5, 6), np.float32))
    after = loop.state_dicts()["g"]
    assert all(np.array_equal(after[key], value) for key, value in before[0].items())
    assert loop.noise.state() == before[1] and loop.step_count == 0


def _batch_steps() -> dict[str, steps.MultiStep]:
    """Two steps on samples of 4 values: one whose model reads the batch (through BatchNorm),
    one that uses the batch only as the target of a generator's output."""
    d, g = steps.Model("d"), steps.Model("g")
    reader = Sequential(Linear(4, 3), BatchNorm1d(3), Linear(3, 1), Sigmoid())
    reads = steps.MultiStep({"d": reader}, {"sgd": steps.OptimizerOver(SGD(0.1), ["d"])},
                            [steps.Phase("d", steps.bce(d(steps.batch()), 1.0), "sgd")])  # fmt: skip
    fit = ((g(steps.normal(2)) - steps.batch()) ** 2).mean()
    targets = steps.MultiStep({"g": Sequential(Linear(2, 4))}, {"sgd": steps.OptimizerOver(SGD(0.1), ["g"])},
                              [steps.Phase("g", fit, "sgd")])  # fmt: skip
    return {"reads": reads, "targets": targets}


@pytest.fixture(scope="module", params=installed_backends())
def batch_loops(request):
    """Each step of :func:`_batch_steps` as a loop of one backend (none compiles: every case is refused)."""
    return {name: steps.MultiModelLoop(step, request.param, seed=0) for name, step in _batch_steps().items()}


X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
ONE = "a multi-model step's batch is one array of shape (N, ...) (`batch` in its losses); got "
BATCHES = {  # the batch -> the line, on both steps
    # a NumPy traceback ("setting an array element with a sequence"), a backend's TypeError, or (the
    # batch used as a target alone) trained on NumPy
    "(x, y)": ((X, np.zeros(5, np.int64)), ONE + "a tuple of 2 values of shapes (5, 4), (5,)"),
    "(x1, x2)": ((X, X), ONE + "a tuple of 2 values of shapes (5, 4), (5, 4)"),
    "a dict": ({"x": X}, ONE + "a dict of 1 values of shapes (5, 4)"),
    # np.asarray stacked it: rows of shape (5, 4), refused by the reading model's width or, the batch a
    # target alone, trained on 2 "samples"
    "[x1, x2]": ([X, X], ONE + "a list of 2 arrays of shapes (5, 4), (5, 4) (np.stack them if they are its rows)"),
    # the rest trained as a target (NaN or inf losses, booleans as numbers), or was a traceback
    "booleans": (X > 0, "the batch must be numeric, got dtype bool"),
    "strings": (X.astype(str), "the batch must be numeric, got dtype <U"),
    "NaN": (np.where(X > 1, np.nan, X), "NaN or infinite values"),  # "inputs contain ...": the reader's check
    "beyond float32": (X.astype(np.float64) * 1e39, "NaN or infinite values"),
    "no rows": (X[:0], "a batch must hold at least one sample, got 0"),
    "one row as a 1-d array": (X[0], "the batch must be of shape (N, ...), got shape (4,)"),
    "a number": (1.0, "the batch must be of shape (N, ...), got shape ()"),
    "ragged rows": ([[1.0, 2.0], [3.0]], "the batch must be one array of shape (N, ...); got a list of rows of diff"),
}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # a reading model's check casts, then refuses
@pytest.mark.parametrize("case", BATCHES)
def test_a_batch_that_is_not_one_finite_array_is_refused_before_any_phase(batch_loops, case):
    batch, words = BATCHES[case]
    for name, loop in batch_loops.items():
        (model,) = loop.loops
        before = ({key: value.copy() for key, value in loop.state_dicts()[model].items()}, dict(loop.noise.state()))
        with pytest.raises(InputError) as raised:
            loop.step(batch)
        assert words in str(raised.value) and "\n" not in str(raised.value), (name, str(raised.value))
        after = loop.state_dicts()[model]
        assert all(np.array_equal(after[key], value) for key, value in before[0].items())
        assert loop.noise.state() == before[1] and loop.step_count == 0


def test_one_sample_through_batchnorm_is_refused_before_any_phase(batch_loops):
    """PyTorch raised inside its BatchNorm (a traceback); Chainer trained on it silently."""
    words = ("phase 'd': model 'd': 1: BatchNorm in training needs more than one value per channel, but a batch of "
             "1 gives 1 there; use batches of 2 or more (or eval mode)")  # fmt: skip
    with pytest.raises(InputError, match=f"^{re.escape(words)}$"):
        batch_loops["reads"].step(X[:1])
    assert batch_loops["reads"].step_count == 0


def test_rows_as_lists_and_integers_train_as_the_float_array_does():
    """What the refusals above must not catch: a list of rows (plain numbers) is its array,
    integers (pixels) are cast to the step's dtype, as a model's own loop takes them."""
    pixels = np.arange(20).reshape(5, 4) % 7
    for name, step in _batch_steps().items():
        same = [steps.MultiModelLoop(step, "numpy", seed=0).step(batch) for batch in
                (pixels.astype(np.float32), pixels, pixels.tolist())]  # fmt: skip
        assert same[0] == same[1] == same[2], name


def test_a_batch_that_leaves_a_data_parallel_rank_one_row_through_batchnorm_is_refused():
    """Over 2 processes each rank normalises its own rows: every rank checks every rank's shard of
    the global batch (the same numbers on each, so all refuse alike before any collective)."""
    step = _batch_steps()["reads"]
    one_row = ("phase 'd': model 'd': 1: BatchNorm in training needs more than one value per channel, and each of "
               "{world} processes normalises its own rows: a batch of {rows} gives {ranks} one row; use batches of "
               "{least} or more (2 rows per process), or eval mode")  # fmt: skip
    for rows, world, ranks in ((3, 2, "rank 0"), (5, 3, "rank 0"), (4, 3, "ranks 0, 1"), (2, 2, "ranks 0, 1")):
        with pytest.raises(
            InputError, match=f"^{re.escape(one_row.format(world=world, rows=rows, ranks=ranks, least=2 * world))}$"
        ):
            check_step_shapes(step, (rows, 4), world_size=world)
    with pytest.raises(
        InputError, match="^a batch of 1 over 2 processes leaves a process without rows; use batches of 2"
    ):
        check_step_shapes(step, (1, 4), world_size=2)
    with pytest.raises(InputError, match="a batch of 1 gives 1 there"):
        check_step_shapes(step, (1, 4))
    for rows, world in ((4, 2), (6, 3), (2, 1)):
        check_step_shapes(step, (rows, 4), world_size=world)


@pytest.mark.parametrize("backend", installed_backends())
def test_a_reversed_or_read_only_batch_trains_as_its_copy_does(backend):
    """PyTorch's from_numpy refused the reversed view (a ValueError traceback) and warned on the
    read-only one; the other backends copied them."""
    plain = np.arange(40, dtype=np.float32).reshape(10, 4) / 40
    reversed_view = np.ascontiguousarray(plain[::-1])[::-1]
    reversed_view.flags.writeable = False
    step = _batch_steps()["targets"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert steps.MultiModelLoop(step, backend, seed=0).step(reversed_view) == steps.MultiModelLoop(
            step, backend, seed=0
        ).step(plain)


def _token_step(first, *, target: bool = False) -> steps.MultiStep:
    """A model reading the batch through ``first`` (an Embedding of 10 ids, or its one-hot Linear),
    the batch also a target when ``target``."""
    d = steps.Model("d")
    loss = steps.bce(d(steps.batch()), 1.0) + (((steps.batch() - 1) ** 2).mean() if target else 0.0)
    return steps.MultiStep({"d": Sequential(first, Flatten(), Linear(12, 1), Sigmoid())},
                           {"sgd": steps.OptimizerOver(SGD(0.1), ["d"])}, [steps.Phase("d", loss, "sgd")])  # fmt: skip


@pytest.mark.parametrize("backend", installed_backends())
def test_token_ids_reach_a_model_that_starts_with_an_embedding(backend):
    """They were cast to float32 with any other batch: NumPy's IndexError, PyTorch's and Chainer's
    dtype errors, from inside the first phase."""
    ids = np.arange(20).reshape(5, 4) % 7
    tokens = steps.MultiModelLoop(_token_step(Embedding(10, 3)), backend, seed=0)
    one_hot = steps.MultiModelLoop(_token_step(Linear(10, 3, bias=False)), backend, seed=0)
    state = tokens.loops["d"].state_dict()
    one_hot.loops["d"].load_state_dict({**state, "0.weight": np.ascontiguousarray(state["0.weight"].T)})
    # a one-hot row times the table is that row exactly (the other products are zeros): the same bits
    assert tokens.step(ids) == one_hot.step(np.eye(10, dtype=np.float32)[ids])


def test_token_ids_also_used_as_values_are_refused():
    loop = steps.MultiModelLoop(_token_step(Embedding(10, 3), target=True), "numpy", seed=0)
    words = ("model 'd' takes the batch as token ids (it starts with an Embedding), but phase 'd' (its sub) uses "
             "it as values; a step's batch is one or the other")  # fmt: skip
    with pytest.raises(InputError, match=f"^{re.escape(words)}$"):
        loop.step(np.arange(20).reshape(5, 4) % 7)


def _vae_step(decoded: int) -> steps.MultiStep:
    """A VAE-shaped step on samples of 8 values: an encoder of two outputs, the reparameterisation,
    a summed loss; its decoder gives ``decoded`` values."""
    x = Input((8,), name="x")
    mu, logvar = Linear(8, 2), Linear(8, 2)
    encoder = Graph(x, [mu(x), logvar(x)], {"mu": mu, "logvar": logvar})
    e, d = steps.Model("encoder", outputs=2), steps.Model("decoder")
    m, v = e(steps.batch())
    z = m + expr.exp(0.5 * v) * steps.normal(2)
    loss = steps.bce(d(z), steps.batch(), reduction="sum") - 0.5 * (1 + v - m**2 - expr.exp(v)).sum()
    return steps.MultiStep({"encoder": encoder, "decoder": Sequential(Linear(2, decoded), Sigmoid())},
                           {"sgd": steps.OptimizerOver(SGD(0.1), ["encoder", "decoder"])},
                           [steps.Phase("vae", loss, "sgd")])  # fmt: skip


def test_shapes_are_inferred_through_several_outputs_noise_and_reductions():
    check_step_shapes(_vae_step(8), (4, 8))
    mismatch = r"^phase 'vae': mul of shapes \(4, 8\) and \(4, 7\) \(they do not broadcast\)$"
    with pytest.raises(InputError, match=mismatch):
        check_step_shapes(_vae_step(7), (4, 8))


def _noisy_encoder_step(decoded_from: int) -> steps.MultiStep:
    """An encoder drawing its own noise (``randn_like``: the step lifts it into the call) of 3
    values per sample, then a decoder taking ``decoded_from``."""
    x = Input((6,), name="x")
    mu, logvar = Linear(6, 3), Linear(6, 3)
    encoder = Graph(x, mu(x) + ops.randn_like(logvar(x)) * (0.5 * logvar(x)).exp(), {"mu": mu, "logvar": logvar})
    e, d = steps.Model("encoder"), steps.Model("decoder")
    return steps.MultiStep({"encoder": encoder, "decoder": Sequential(Linear(decoded_from, 6), Sigmoid())},
                           {"sgd": steps.OptimizerOver(SGD(0.1), ["encoder", "decoder"])},
                           [steps.Phase("vae", steps.bce(d(e(steps.batch())), steps.batch()), "sgd")])  # fmt: skip


def test_shapes_are_inferred_through_a_model_drawing_its_own_noise():
    """A decoder of another width after it went unchecked (the encoder's output was "not known"), to
    a traceback from inside the backend's layers; MindSpore draws the decoder's dropout masks from
    these shapes."""
    shapes = node_shapes(_noisy_encoder_step(3), (4, 6))
    assert {node[1]: shape for node, shape in shapes.items() if node[0] == "call"} == {"encoder": (4, 3),
                                                                                       "decoder": (4, 6)}  # fmt: skip
    words = r"^phase 'vae': model 'decoder': 0: Linear\(in_features=2, out_features=6, bias=True\) expects 2 input"
    with pytest.raises(InputError, match=words):
        check_step_shapes(_noisy_encoder_step(2), (4, 6))


def test_a_dataset_whose_images_the_models_cannot_take_is_refused_before_anything_is_written(tiny, capsys):  # noqa: F811
    images = np.random.default_rng(0).integers(0, 256, (40, 9, 9), dtype=np.uint8)
    np.savez(tiny / "nine.npz", x_train=images[:32], y_train=np.zeros(32, np.uint8), x_test=images[32:],
             y_test=np.zeros(8, np.uint8))  # fmt: skip
    (tiny / "bad.toml").write_text(RECIPE.replace('dataset = "tiny.npz"', 'dataset = "nine.npz"'))
    status, _, err = run_cli(capsys, "train", "bad.toml", "--epochs", "1", "--save", "out", "--checkpoint-dir", "ck",
                             "--metrics", "m.jsonl", "--plot", "p.png", "--no-progress")  # fmt: skip
    assert status == 2
    one_error_line(err, "phase 'discriminator': model 'discriminator': 1: Linear(in_features=64, out_features=12, "
                        "bias=True) expects 64 input features per sample, got per-sample shape (81,)")  # fmt: skip
    assert not [name for name in OUTPUTS if (tiny / name).exists()]


def test_evaluate_names_the_phase_of_a_model_given_values_of_another_shape(tiny, capsys):  # noqa: F811
    """It was the model's own batch check, naming neither the phase nor the model."""
    assert run_cli(capsys, "train", "gan.toml", "--max-steps", "1", "--save", "w", "--no-progress")[0] == 0
    (old, new), words = RECIPES["noise of another size"]
    (tiny / "bad.toml").write_text(RECIPE.replace(old, new))
    for model in ("generator", "discriminator", None):
        chosen = [] if model is None else ["--model", model]
        status, out, err = run_cli(capsys, "evaluate", "--recipe", "bad.toml", "--weights", "w", *chosen)
        assert status == 2 and out == ""
        one_error_line(err, words)
    # evaluation runs BatchNorm on its running statistics: one sample a batch is no error there
    (tiny / "one.toml").write_text(RECIPE.replace("batch_size = 8", "batch_size = 1"))
    assert run_cli(capsys, "evaluate", "--recipe", "one.toml", "--weights", "w")[0] == 0


def test_a_full_disk_under_the_checkpoint_directory_is_named_and_leaves_nothing(tiny):  # noqa: F811
    """Its lock file's pid could not be written: "No space left on device" named no file, and the
    directory, its lock file and an empty --metrics file (never closed: the run raised) stayed,
    so that the rerun was refused as "already exists"."""
    result, lines, listing = on_a_full_disk(tiny, "train", "gan.toml", "--max-steps", "2", "--checkpoint-dir",
                                            "DISK/ck", "--metrics", "m.jsonl")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == f"unitrain: error: {tiny / 'disk' / 'ck' / '.unitrain.lock'}: No space left on device"
    assert listing == ["user.txt"] and not (tiny / "m.jsonl").exists()


def test_a_metrics_file_a_failed_run_leaves_without_a_line_is_removed(tmp_path):
    """The multi-model loop calls no finalize when a step raises: the writer's file goes with it."""
    import gc

    from unitrain.extensions import MetricsWriter

    for path, lines in ((tmp_path / "finished.jsonl", 0), (tmp_path / "raised.jsonl", 0), (tmp_path / "one.jsonl", 1)):
        writer = MetricsWriter(path, {"backend": "numpy"})
        for epoch in range(lines):
            writer.on_epoch_end(None, {"epoch": epoch + 1, "loss": 0.5})
        if path.stem == "finished":
            writer.finalize(None)
        del writer
        gc.collect()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["finished.jsonl", "one.jsonl"]  # a run of 0 steps
    assert (tmp_path / "one.jsonl").read_text() == '{"backend": "numpy", "epoch": 1, "loss": 0.5}\n'


def test_sigterm_mid_run_checkpoints_and_the_resume_equals_an_uninterrupted_run(tiny, capsys):  # noqa: F811
    """As Ctrl-C (test_multi_run.py): SIGTERM stops at a step boundary with a checkpoint and 143; the
    resumed run's weights are the uninterrupted run's, bit for bit on NumPy."""
    import os
    import signal
    import subprocess
    import sys

    from test_multi_run import _assert_same_weights, _weights

    from unitrain.step_checkpoints import CHECKPOINT_FILE
    from unitrain.weights import load_safetensors

    command = [sys.executable, "-m", "unitrain", "train", "gan.toml", "--epochs", "100000", "--checkpoint-dir",
               "run", "--checkpoint-every", "1000000", "--no-progress"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        while "steps of 8" not in process.stdout.readline():  # training has begun
            pass
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    step = int(load_safetensors(tiny / "run" / CHECKPOINT_FILE)[1]["step_count"])
    assert process.returncode == 143 and err.splitlines()[-1] == (
        f"unitrain: stopped at step {step}; checkpoint in {os.path.join('run', CHECKPOINT_FILE)}"
    ), err
    for argv in (["--resume", "run", "--max-steps", str(step + 3), "--save", "resumed"],
                 ["gan.toml", "--epochs", "100000", "--max-steps", str(step + 3), "--save", "straight"]):  # fmt: skip
        status, _, err = run_cli(capsys, "train", *argv, "--no-progress")
        assert status == 0, err
    _assert_same_weights(_weights(tiny / "resumed"), _weights(tiny / "straight"))
