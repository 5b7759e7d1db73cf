"""Initialisers and dialects from Python, recipes and the CLI: torch.nn.init's fans and gains,
one-line errors, what a dialect changes, and resuming the velocity of Chainer's/Keras' momentum."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from unitrain.conformance.tolerances import eps, tolerance

import unitrain
from unitrain import ArrayDataset, layers, optim
from unitrain.initializers import INITIALIZERS, NONLINEARITIES, _gain_squared, fans, initializer, with_initializers
from unitrain.run import Run, RunError
from unitrain.schedules import StepLR
from unitrain.weights import init_weights


@pytest.mark.parametrize("shape", [(5, 3), (8, 2, 3, 3), (4, 1, 5, 1), (6, 4, 1, 1)])
def test_fans_are_torch_nn_init_s(shape):
    torch = pytest.importorskip("torch")
    assert fans(shape) == torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_gains_are_torch_nn_init_s(nonlinearity):
    torch = pytest.importorskip("torch")
    for param in (None, 0.2) if nonlinearity == "leaky_relu" else (None,):
        expected = torch.nn.init.calculate_gain(nonlinearity, param) ** 2
        # a few float64 roundings on either side (a square root, its square, a quotient)
        allowed = tolerance(np.float64, 3, expected)
        assert _gain_squared(nonlinearity, param) == pytest.approx(expected, rel=0, abs=allowed)


def test_every_initialiser_round_trips_through_its_text():
    for name, cls in INITIALIZERS.items():
        assert initializer(str(cls())) == cls()
        assert str(initializer(name)) == name
    assert str(initializer("kaiming_normal(0.1, 'fan_out', nonlinearity='relu')")) == (
        "kaiming_normal(a=0.1, mode='fan_out', nonlinearity='relu')"
    )
    assert initializer("glorot_uniform") == initializer("xavier_uniform")


def test_draws_follow_their_formulas():
    rng = np.random.default_rng(0)
    q = initializer("orthogonal(gain=2.0)").draw(rng, (6, 3, 2, 2), 12).reshape(6, 12)
    # rows < cols: orthonormal rows, times gain 2; float64 QR's reflections and the product each add 12 terms
    np.testing.assert_allclose(q @ q.T, 4 * np.eye(6), rtol=0, atol=tolerance(np.float64, 2 * 12, 4))
    values = initializer("truncated_normal(0.5, mean=1.0)").draw(rng, (200, 50), 50)
    assert np.abs(values - 1.0).max() <= 1.0 and abs(values.mean() - 1.0) < 0.01
    bound = np.sqrt(6 / (30 + 20))  # xavier_uniform of a (20, 30) weight
    values = initializer("xavier_uniform").draw(rng, (20, 30), 30)
    assert bound * 0.98 < np.abs(values).max() <= bound


@pytest.mark.parametrize(("ours", "keras_name"), [("glorot_normal", "GlorotNormal"), ("he_normal", "HeNormal"),
                                                 ("variance_scaling", "LecunNormal")])  # fmt: skip
def test_keras_truncated_normals_draw_what_keras_draws(ours, keras_name):
    """Keras 3's own initialiser (torch backend) and unitrain's, on a conv kernel (Keras' layout
    (kh, kw, in, out) is PyTorch's (out, in, kh, kw) transposed, the same fans): a two-sample
    Kolmogorov-Smirnov test at the 1e-6 level accepts the two samples and rejects PyTorch's
    untruncated normal of the same variance, and both lie within Keras' truncation bound (Keras on
    torch draws four normals per element and keeps the first within it, or the first of the four when
    none is: about 4e-6 of its elements lie outside)."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    stats = pytest.importorskip("scipy.stats")
    shape = (128, 64, 3, 3)
    keras_values = np.asarray(getattr(keras.initializers, keras_name)(seed=0)(shape[::-1])).ravel()
    values = initializer(ours).draw(np.random.default_rng(0), shape, 64 * 9).ravel()
    fan_in, fan_out = 64 * 9, 128 * 9
    variance = {"GlorotNormal": 2 / (fan_in + fan_out), "HeNormal": 2 / fan_in, "LecunNormal": 1 / fan_in}[keras_name]
    untruncated = np.random.default_rng(0).normal(0.0, np.sqrt(variance), values.size)
    bound = 2 * np.sqrt(variance) / 0.87962566103423978
    # Keras' float32 values and its float32 bound: a rounding of each
    above = np.count_nonzero(np.abs(keras_values) > bound * (1 + 2 * eps(np.float32)))
    assert above <= 3 and np.abs(values).max() <= bound
    assert stats.ks_2samp(values, keras_values).pvalue > 1e-6
    assert stats.ks_2samp(untruncated, keras_values).pvalue < 1e-6


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: layers.Linear(3, 4, bias_init="orthogonal"),
         "Linear: bias_init orthogonal cannot apply to a tensor of shape (4,)"),
        (lambda: layers.Conv2d(1, 2, 3, weight_init="normal(std=-1)"),
         "Conv2d: weight_init: normal: std must be a finite number > 0, got -1"),
        (lambda: layers.Linear(3, 4, weight_init="he_truncated"),
         "Linear: weight_init: unknown initialiser 'he_truncated'"),
        (lambda: layers.Linear(3, 4, bias=False, bias_init="zeros"),
         "Linear: bias_init zeros is given, but the layer has no bias (bias=False)"),
        (lambda: layers.Linear(3, 4, weight_init="uniform(1, 0)"),
         "Linear: weight_init: uniform: b must be a finite number > a (1), got 0"),
        (lambda: layers.Sequential(layers.Linear(3, 4), init="keras()"),
         "Sequential: init must be one of pytorch, resnet, keras, chainer or an initialiser"),
        (lambda: unitrain.dialect("jax").__enter__(), "unknown dialect 'jax'; expected one of torch, chainer"),
    ],
)  # fmt: skip
def test_bad_initialisers_and_dialects_are_one_line_errors(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_dialect_defaults_and_explicit_arguments():
    with unitrain.dialect("mindspore"):
        conv, explicit = layers.Conv2d(1, 2, 3), layers.Conv2d(1, 2, 3, bias=True)
        adam = optim.Adam()
    assert (conv.bias, explicit.bias, adam.eps_placement) == (False, True, "before_correction")
    with unitrain.dialect("keras"):
        norm, kept = layers.BatchNorm2d(4), layers.BatchNorm2d(4, momentum=0.3)
        model, sgd = unitrain.mlp(), optim.SGD(momentum=0.9)
    assert (norm.eps, norm.momentum, kept.momentum, model.init, sgd.lr_in_velocity) == (1e-3, 0.01, 0.3, "keras", True)
    assert norm.running_var == "biased" and layers.BatchNorm2d(4).running_var == "unbiased"
    assert (layers.Conv2d(1, 2, 3).bias, optim.Adam().eps, unitrain.mlp().init) == (True, 1e-8, "pytorch")
    state = init_weights(model, 0)
    assert not state["1.bias"].any() and np.abs(state["1.weight"]).max() <= np.sqrt(6 / (784 + 512))


def test_a_run_s_dialect_reaches_model_optimizer_and_recipe():
    run = Run(model="cnn", dialect="mindspore", optimizer=optim.Adam(eps=1e-6))
    assert run.optimizer == optim.Adam(eps=1e-6, eps_placement="before_correction")
    assert "0.bias" not in run.model_spec().param_shapes()  # MindSpore's Conv2d has no bias
    again = Run.from_dict(run.to_dict())
    assert again == run and again.to_dict()["dialect"] == "mindspore"
    recipe = {"dialect": "chainer", "init": "normal(0.02)", "optimizer": {"type": "SGD", "momentum": 0.9}}
    chainer = Run.from_dict(recipe)
    assert chainer.optimizer.lr_in_velocity and chainer.model_spec().init == "normal(std=0.02)"
    with pytest.raises(RunError, match="^dialect: unknown dialect 'tf'"):
        Run(dialect="tf")


def test_a_recipe_s_initializers_draw_the_layers_it_names(tmp_path):
    """``[initializers]`` in a recipe: the same first weights as the model written in Python with
    those ``weight_init`` / ``bias_init``, and the recipe reads back unchanged."""
    from unitrain.run import load_recipe

    recipe = tmp_path / "run.toml"
    recipe.write_text('model = "lenet"\n[initializers]\n"conv*.weight" = "he_normal"\n"*.bias" = "zeros"\n'
                      '"fc3.weight" = "normal(0.02)"\n')  # fmt: skip
    run = load_recipe(recipe)
    expected = layers.lenet()
    children = {name: dataclasses.replace(layer, weight_init="he_normal") if name.startswith("conv") else layer
                for name, layer in expected.children}  # fmt: skip
    children = {name: dataclasses.replace(layer, bias_init="zeros") if hasattr(layer, "bias_init") else layer
                for name, layer in children.items()}  # fmt: skip
    children["fc3"] = dataclasses.replace(children["fc3"], weight_init="normal(0.02)")
    drawn, wanted = init_weights(run.model_spec(), 0), init_weights(layers.Sequential(children), 0)
    assert list(drawn) == list(wanted) and not drawn["fc1.bias"].any()
    for key, value in wanted.items():
        np.testing.assert_array_equal(drawn[key], value, err_msg=key)
    recipe.write_text(run.to_toml())
    assert load_recipe(recipe) == run


@pytest.mark.parametrize(
    ("initializers", "message"),
    [
        ({"conv9.weight": "zeros"}, "initializers: 'conv9.weight' names no parameter of the model"),
        ({"*.bias": "zeros", "fc3": "ones"}, "initializers: fc3.bias is named by '*.bias' and by 'fc3'"),
        ({"fc1.bias": "orthogonal"}, "Linear: bias_init orthogonal cannot apply to a tensor of shape (120,)"),
        ({"fc1.weight": "he_truncated"}, "initializers: unknown initialiser 'he_truncated'"),
        ({"fc1.weight": 3}, "initializers: expected a table of parameter pattern = initialiser"),
    ],
)  # fmt: skip
def test_a_recipe_s_bad_initializers_are_one_line_errors(initializers, message):
    with pytest.raises(RunError) as error:
        Run(model="lenet", initializers=initializers).model_spec()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    with pytest.raises(RunError, match="^BatchNorm2d: weight_init pytorch draws from a fan in, which a BatchNorm"):
        Run(model="resnet18", initializers={"bn1.weight": "pytorch"}).model_spec()
    with pytest.raises(ValueError, match="^initializers: '1' names 1.weight, a LayerNorm parameter"):
        with_initializers(layers.Sequential(layers.Linear(4, 4), layers.LayerNorm(4)), {"1": "zeros"})
    with pytest.raises(RunError, match="^initializers: the model holds a Residual; name weight_init"):
        Run(model="resnet18", initializers={"layer1.0.conv1.weight": "zeros"}).model_spec()
    assert (
        Run(model="resnet18", initializers={"fc.weight": "zeros"}).model_spec().children[-1][1].weight_init.name
        == "zeros"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dialect", "tf"], "argument --dialect: invalid choice: 'tf'"),
        (["--init", "orthogonal("], "init must be one of pytorch, resnet, keras, chainer or an initialiser"),
    ],
)
def test_cli_refuses_unknown_dialects_and_initialisers_in_one_line(flags, message):
    result = subprocess.run([sys.executable, "-m", "unitrain", "train", *flags, "--print-recipe"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ('dialect = "jax"', "field 'dialect': expected one of 'torch', 'chainer', 'keras', 'mindspore', got 'jax'"),
        ('[initializers]\n"fc1.bias" = "orthogonal"',
         "Linear: bias_init orthogonal cannot apply to a tensor of shape (120,): it needs 2 or more dimensions"),
    ],
)  # fmt: skip
def test_cli_refuses_a_recipe_s_unknown_dialect_and_an_init_that_cannot_apply(recipe, message, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(f'model = "lenet"\n{recipe}\n')
    result = subprocess.run([sys.executable, "-m", "unitrain", "train", str(path), "--max-steps", "1", "--no-progress"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_velocity_resumes_bit_for_bit():
    """Chainer's/Keras' momentum keeps its ``velocity`` in the optimizer state; stopping after 3
    steps under a changing lr and resuming gives the uninterrupted run's bits."""
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8))
    model = layers.Sequential(layers.Linear(6, 5), layers.ReLU(), layers.Linear(5, 3))
    spec = optim.SGD(0.1, momentum=0.9, lr_in_velocity=True)

    def loop():
        return unitrain.make_loop("numpy", model, optimizer=spec, lr_schedule=StepLR(2, 0.5))

    whole = loop()
    whole.fit(data, epochs=5, batch_size=8)
    first = loop()
    first.fit(data, epochs=3, batch_size=8)
    assert [key.split(".")[-1] for key in first.optimizer_state_dict() if key != "step"] == ["velocity"] * 4
    resumed = loop()
    resumed.load_state_dict(first.state_dict())
    resumed.load_optimizer_state_dict(first.optimizer_state_dict())
    resumed.step_count = first.step_count
    resumed.seek_schedule(first.schedule_position)
    resumed.fit(data, epochs=2, batch_size=8)
    for key, value in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize(("dialect", "model"), [("chainer", "mlp"), ("mindspore", "cnn")])
def test_compare_native_takes_a_dialect_s_run(dialect, model, torch_single_thread):
    """``compare --native`` under a dialect: plain SGD is every dialect's equation, and the native
    loop builds the dialect's model (MindSpore's bias-free convolutions); PyTorch's tutorial loop and
    the torch adapter then give the same losses and weights to the bit."""
    pytest.importorskip("torch")
    from unitrain.compare import compare_backends

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(48, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 48))
    run = Run(model=model, dialect=dialect, optimizer=optim.SGD(lr=0.05), epochs=1, batch_size=16)
    assert model == "mlp" or "0.bias" not in run.model_spec().param_shapes()
    results = compare_backends(["numpy", "torch"], run, data=(data, None, data), native=True)
    adapter, native = results[1], results[2]
    assert native["native"] and native["steps"] == 3 and native["step_losses"] == adapter["step_losses"]
    assert native["max_weight_difference"] == adapter["max_weight_difference"]
