"""The core's model and loss specs: containers, naming, shape inference, validation, presets,
and the CustomLoss expression language (NumPy gradients vs finite differences)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from unitrain.conformance.reference import torchvision_resnet18_state_shapes
from unitrain.conformance.tolerances import FINITE_DIFFERENCE_STEP, FINITE_DIFFERENCE_TOLERANCE, tolerance

import unitrain
from unitrain import expr
from unitrain.layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    Conv2d,
    Flatten,
    Identity,
    LayerNorm,
    Linear,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
)


def test_resnet18_has_torchvisions_state_dict_keys_and_shapes():
    shapes = unitrain.resnet18().state_shapes()
    # torchvision's keys and shapes, written from its resnet.py, in state_dict order
    assert list(shapes.items()) == list(torchvision_resnet18_state_shapes().items())
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer2.0.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer4.1.bn2.running_var"] == (512,)
    assert shapes["fc.weight"] == (1000, 512)
    # 11,689,512 parameters: the count torchvision documents for resnet18.
    assert sum(int(np.prod(s)) for s in unitrain.resnet18().param_shapes().values()) == 11_689_512
    assert unitrain.resnet18().output_shape((3, 224, 224)) == (1000,)
    mnist = unitrain.resnet18(num_classes=10, in_channels=1)
    assert mnist.output_shape((1, 28, 28)) == (10,) and mnist == unitrain.layers.preset("resnet18")


def test_lenet_is_the_garment_classifier():
    model = unitrain.lenet()
    assert model.state_shapes() == {
        "conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,), "conv2.weight": (16, 6, 5, 5), "conv2.bias": (16,),
        "fc1.weight": (120, 256), "fc1.bias": (120,), "fc2.weight": (84, 120), "fc2.bias": (84,),
        "fc3.weight": (10, 84), "fc3.bias": (10,),
    }  # fmt: skip
    assert model.output_shape((1, 28, 28)) == (10,)


def test_named_children_and_nesting():
    block = Residual(Sequential({"a": Linear(4, 4), "act": ReLU()}), Sequential(Linear(4, 4)), post=ReLU())
    model = Sequential({"stem": Linear(3, 4), "blocks": Sequential(block, Residual(Sequential(Identity())))})
    assert [name for name, _ in model.named_layers()] == [
        "stem", "blocks.0.a", "blocks.0.act", "blocks.0.downsample.0", "blocks.0.post", "blocks.1.0",
    ]  # fmt: skip
    assert list(model.param_shapes()) == [
        "stem.weight", "stem.bias", "blocks.0.a.weight", "blocks.0.a.bias",
        "blocks.0.downsample.0.weight", "blocks.0.downsample.0.bias",
    ]  # fmt: skip
    assert model.output_shape((3,)) == (4,)
    assert model.children[0] == ("stem", Linear(3, 4)) and model.layers[0] == Linear(3, 4)
    assert Sequential(ReLU(), Flatten()).children == (("0", ReLU()), ("1", Flatten()))


def test_shape_errors_name_the_layer_path_and_both_shapes():
    bad_block = Residual(Sequential({"conv1": Conv2d(2, 4, 3, stride=2, padding=1)}))
    with pytest.raises(ValueError, match=r"^layer2\.0: body gives \(4, 4, 4\), shortcut gives \(2, 7, 7\)$"):
        Sequential({"layer2": Sequential(bad_block)}).output_shape((2, 7, 7))
    with pytest.raises(
        ValueError, match=r"^layer1\.0\.conv1: Conv2d\(in_channels=3.* got per-sample shape \(1, 8, 8\)"
    ):
        Sequential({"layer1": Sequential(Residual(Sequential({"conv1": Conv2d(3, 3, 3)})))}).output_shape((1, 8, 8))
    with pytest.raises(ValueError, match=r"^3: Linear\(in_features=5"):
        Sequential(Linear(4, 4), ReLU(), Identity(), Linear(5, 2)).output_shape((4,))
    with pytest.raises(ValueError, match=r"^0\.downsample: .*expects 2 input features"):
        Sequential(Residual(Sequential(ReLU()), Linear(2, 3))).output_shape((4,))


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2), (4, 9, 5), (6, 4, 5)),
        (MaxPool2d(3, stride=2, padding=1), (2, 7, 7), (2, 4, 4)),
        (AvgPool2d((2, 3), padding=(1, 1)), (2, 5, 6), (2, 3, 2)),
        (AdaptiveAvgPool2d((3, 2)), (2, 7, 5), (2, 3, 2)),
        (AdaptiveAvgPool2d(1), (2, 7, 5), (2, 1, 1)),
        (LayerNorm((3, 4)), (2, 3, 4), (2, 3, 4)),
        (LogSoftmax(dim=-1), (2, 3), (2, 3)),
        (unitrain.ConvTranspose2d(2, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 7, 5), (6, 14, 10)),
        (unitrain.ConvTranspose2d(2, 4, (3, 2), dilation=(2, 1), output_padding=(1, 0)), (2, 4, 4), (4, 9, 5)),
        (unitrain.Upsample(scale_factor=(1.7, 0.5)), (3, 7, 5), (3, 11, 2)),
        (unitrain.Upsample(size=4, mode="bilinear", align_corners=True), (3, 7, 5), (3, 4, 4)),
        (Flatten(1, 2), (2, 3, 4), (6, 4)),
        (Flatten(-2), (2, 3, 4), (2, 12)),
    ],
)
def test_output_shapes_follow_pytorch(layer, shape, expected):
    assert layer.output_shape(shape) == expected


def test_pairs_are_normalised_and_groups_shape_the_weight():
    conv = Conv2d(4, 6, 3, groups=2, bias=False)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 3), (1, 1), (0, 0), (1, 1))
    assert conv.param_shapes() == {"weight": (6, 2, 3, 3)} and conv.fan_in() == 18
    assert MaxPool2d(2).stride == (2, 2) and AvgPool2d(3, 1).stride == (1, 1)
    assert LayerNorm(5).normalized_shape == (5,) and LayerNorm([2, 3]).param_shapes()["bias"] == (2, 3)
    assert LayerNorm(5, elementwise_affine=False).param_shapes() == {}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Conv2d(3, 4, 3, groups=2), r"divisible by groups \(2\)"),
        (lambda: Conv2d(2, 2, (3, 0)), r"kernel_size must be an integer >= 1 or a pair of them, got \(3, 0\)"),
        (lambda: Conv2d(2, 2, 3, dilation=(1, 2, 3)), r"dilation must be .* got \(1, 2, 3\)"),
        (lambda: MaxPool2d(2, padding=2), r"padding \(2, 2\) must be at most half the window \(2, 2\)"),
        (lambda: AvgPool2d(3, stride=0), "stride must be an integer >= 1"),
        (lambda: AdaptiveAvgPool2d(0), "output_size must be an integer >= 1"),
        (lambda: LayerNorm(()), "normalized_shape must be"),
        (lambda: LayerNorm(4, eps=0), "eps must be > 0"),
        (
            lambda: unitrain.BatchNorm2d(4, running_var="sample"),
            "BatchNorm2d: running_var must be one of unbiased, biased, got 'sample'",
        ),
        (lambda: unitrain.GELU("fast"), "approximate must be 'none' or 'tanh', got 'fast'"),
        (lambda: unitrain.ConvTranspose2d(4, 3, 3, groups=2), r"divisible by groups \(2\)"),
        (
            lambda: unitrain.ConvTranspose2d(2, 2, 3, stride=2, output_padding=2),
            r"output_padding \(2, 2\) must be smaller than either stride \(2, 2\) or dilation \(1, 1\)",
        ),
        (lambda: unitrain.Upsample(), "give exactly one of size and scale_factor"),
        (lambda: unitrain.Upsample(size=4, scale_factor=2), "give exactly one of size and scale_factor"),
        (lambda: unitrain.Upsample(scale_factor=0), "scale_factor must be a positive number or a pair of them, got 0"),
        (lambda: unitrain.Upsample(scale_factor=2, mode="bicubic"), "mode must be one of"),
        (lambda: unitrain.Upsample(scale_factor=2, align_corners=True), "align_corners must be None with mode"),
        (lambda: Flatten(1.5), "start_dim must be an integer, got 1.5"),
        (lambda: Flatten(0).output_shape((3, 4)), "the batch axis 0 is never flattened"),
        (lambda: Flatten(2, 1).output_shape((3, 4)), "start_dim <= end_dim"),
        (lambda: unitrain.BCELoss("none"), "reduction must be one of"),
        (lambda: unitrain.LeakyReLU("x"), "negative_slope must be a finite number, got 'x'"),
        (lambda: unitrain.Softmax(1.5), "dim must be an integer, got 1.5"),
        (lambda: Sequential({"a.b": ReLU()}), "child name 'a.b' must be a non-empty string without '.'"),
        (lambda: Sequential(ReLU(), init="xavier"), "init must be one of"),
        (lambda: Residual(ReLU()), "body must be a unitrain Sequential"),
        (lambda: Residual(Sequential({"post": ReLU()})), r"may not be named \['post'\]"),
        (lambda: unitrain.CrossEntropyLoss(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
        (lambda: unitrain.HuberLoss(delta=0), "delta must be a positive number, got 0"),
        (lambda: unitrain.SmoothL1Loss(beta=-1), "beta must be a non-negative number"),
        (lambda: unitrain.L1Loss("none"), "reduction must be one of"),
        (lambda: unitrain.CustomLoss(lambda p, t: p - t), "must return a scalar"),
        (lambda: unitrain.CustomLoss(lambda p, t: (p - t).sum(1)), "must return a scalar"),
        (lambda: unitrain.CustomLoss(lambda p, t: t.sum()), "depends on pred"),
        (lambda: unitrain.CustomLoss(lambda p, t: (p * np.ones(3)).sum()), "cannot enter the loss expression"),
        (lambda: unitrain.CustomLoss(lambda p, t: (p**p).sum()), "exponent of \\*\\* must be a Python number"),
        (lambda: unitrain.CustomLoss(lambda p, t: p.sum() if p.sum() else 0), "has no truth value"),
        (lambda: unitrain.CustomLoss(lambda p, t: 1.0), "must return an expression"),
        (lambda: unitrain.CustomLoss(lambda p, t: (p > t).sum()), "comparisons are not among"),
        (lambda: unitrain.CustomLoss(lambda p, t: (np.ones(3) * p).sum()), "cannot enter the loss expression"),
    ],
)
def test_specs_reject_nonsense(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_loss_target_kinds():
    assert unitrain.CrossEntropyLoss().class_targets and unitrain.CrossEntropyLoss().float_targets
    assert unitrain.NLLLoss().class_targets and not unitrain.NLLLoss().float_targets
    for loss in (
        unitrain.MSELoss(),
        unitrain.BCEWithLogitsLoss(),
        unitrain.HuberLoss(),
        unitrain.CustomLoss(lambda p, t: (p - t).sum()),
    ):
        assert not loss.class_targets and loss.float_targets


def test_init_weights_follows_pytorch_and_torchvision():
    state = unitrain.init_weights(unitrain.resnet18(), seed=0)
    assert set(state) == set(unitrain.resnet18().state_shapes())
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / (out * kh * kw)).
    for key, fan_out in (("conv1.weight", 64 * 49), ("layer4.1.conv2.weight", 512 * 9)):
        assert abs(state[key].std() / np.sqrt(2 / fan_out) - 1) < 0.02  # 0.02: >5 sigma of the std's spread
    assert np.abs(state["fc.weight"]).max() <= 1 / np.sqrt(512)
    assert (state["bn1.weight"] == 1).all() and (state["bn1.bias"] == 0).all()
    grouped = unitrain.init_weights(Sequential(Conv2d(4, 4, 3, groups=4), LayerNorm((4, 1, 1))), seed=1)
    assert np.abs(grouped["0.weight"]).max() <= 1 / 3 < np.abs(grouped["0.weight"]).max() * 1.2
    assert (grouped["1.weight"] == 1).all() and grouped["1.bias"].shape == (4, 1, 1)


# --- the expression language ----------------------------------------------------------------

EXPRESSIONS = {
    "sum of differences": lambda p, t: (p - t).sum(),
    "squares and division": lambda p, t: ((p - t) ** 2 / 2.0 + 1 - p * 0.5).mean(),
    "abs exp log sqrt square": lambda p, t: (
        (abs(p) + expr.exp(-p) + expr.log(1 + p * p)).mean() + expr.sqrt(expr.square(p) + 1.0).sum()
    ),
    "maximum minimum": lambda p, t: (expr.maximum(p, t) - 2 * expr.minimum(p, 0.1)).sum(),
    "axis reductions": lambda p, t: (p * t).sum(1).mean() - (p.mean(0) ** 3).sum() / 4,
    "soft cross entropy": lambda p, t: -(t * expr.log_softmax(p, 1)).sum(axis=-1).mean(),
    "softmax": lambda p, t: (expr.softmax(p, axis=0) * t).sum() + (3 - p / (t + 2)).sum(),
}


@pytest.mark.parametrize("name", EXPRESSIONS)
def test_numpy_gradient_matches_finite_differences(name):
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(3, 4)), rng.uniform(0.1, 1, size=(3, 4))
    tree = unitrain.CustomLoss(EXPRESSIONS[name]).tree
    value, grad = expr.numpy_value_and_grad(tree, pred, target)
    assert value == expr.numpy_value(tree, pred, target)  # the same float64 operations in the same order
    numeric = np.zeros_like(pred)
    for index in np.ndindex(pred.shape):
        step = np.zeros_like(pred)
        step[index] = FINITE_DIFFERENCE_STEP
        plus = expr.numpy_value_and_grad(tree, pred + step, target)[0]
        minus = expr.numpy_value_and_grad(tree, pred - step, target)[0]
        numeric[index] = (plus - minus) / (2 * FINITE_DIFFERENCE_STEP)
    # central differences in float64: the conformance suite's bound (conformance/tolerances.py derives it)
    np.testing.assert_allclose(grad, numeric, rtol=FINITE_DIFFERENCE_TOLERANCE, atol=FINITE_DIFFERENCE_TOLERANCE)


def test_tree_is_plain_and_broadcasts_constants():
    tree = unitrain.CustomLoss(lambda pred, labels: (pred - labels).sum()).tree
    assert tree == ("sum", ("sub", ("pred",), ("target",)), None)
    assert unitrain.CustomLoss(lambda p, t: (2 - p).mean(0).sum()).tree == (
        "sum", ("mean", ("sub", ("const", 2.0), ("pred",)), 0), None,
    )  # fmt: skip
    assert set(expr.OPS) == set(expr.NUMPY_OPS) | {"const"}
    value, grad = expr.numpy_value_and_grad(("sum", ("mul", ("pred",), ("target",)), None), np.ones((2, 3)),
                                            np.arange(3.0))  # fmt: skip
    assert value == 6.0 and (grad == np.arange(3.0)).all()
    _, grad32 = expr.numpy_value_and_grad(tree, np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32))
    assert grad32.dtype == np.float32


# --- the loop's checks of targets and of models with branches (core code, run through NumPy) ---------


def _loop(loss, model=None):
    from unitrain.backends.numpy import NumpyLoop

    return NumpyLoop(model or Sequential(Linear(4, 3)), loss=loss)


def test_targets_are_checked_against_the_loss_and_the_output_shape():
    from unitrain.loop import InputError

    x = np.ones((2, 4), np.float32)
    cases = [
        (unitrain.CrossEntropyLoss(), np.ones((2, 4), np.float32), r"probabilities of shape \(2, 4\) .*\(2, 3\)"),
        (unitrain.CrossEntropyLoss(), np.zeros(2, np.float32), r"class indices must be an integer array"),
        (unitrain.NLLLoss(), np.zeros((2, 3), np.float32), "NLLLoss needs integer class indices"),
        (unitrain.L1Loss(), np.zeros((2, 4), np.float32), r"targets of shape \(2, 4\) do not match"),
        (unitrain.BCEWithLogitsLoss(), np.full((2, 3), np.nan, np.float32), "NaN"),
        (unitrain.CustomLoss(lambda p, t: (p * t).sum()), np.zeros((2, 2)), r"mul of shapes \(2, 3\) and \(2, 2\)"),
        (unitrain.CustomLoss(lambda p, t: p.sum(2).sum()), np.zeros((2, 3)), r"sum over axis 2 of .* \(2, 3\)"),
        (unitrain.CrossEntropyLoss(), np.array(["a", "b"]), "targets must be numeric"),
    ]  # fmt: skip
    for loss, y, message in cases:
        with pytest.raises(InputError, match=message):
            _loop(loss).step((x, y))
    image = Sequential(Conv2d(1, 2, 3), LogSoftmax(dim=1))
    with pytest.raises(InputError, match=r"class indices needs model outputs of shape \(N, classes\)"):
        _loop(unitrain.NLLLoss(), image).step((np.ones((2, 1, 5, 5), np.float32), np.zeros(2, np.int64)))


def test_accepted_targets_reach_the_backend_in_the_right_dtype():
    x = np.ones((2, 4), np.float32)
    soft = _loop(unitrain.CrossEntropyLoss(label_smoothing=0.1))
    assert soft._check_y(np.full((2, 3), 1 / 3), 2, (4,)).dtype == np.float32
    assert soft._check_y(np.array([0, 2], np.int32), 2, (4,)).dtype == np.int64
    custom = _loop(unitrain.CustomLoss(lambda p, t: (p - t).sum()))
    assert custom._check_y(np.array([[1], [2]], np.int64), 2, (4,)).dtype == np.float32  # broadcasts over (2, 3)
    assert np.isfinite(custom.to_float(custom.step((x, np.zeros((2, 3))))))


def test_evaluate_of_a_custom_loss_is_the_mean_of_each_samples_loss():
    loop = _loop(unitrain.CustomLoss(lambda p, t: ((p - t) ** 2).sum()))
    x, y = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32), np.ones((5, 3), np.float32)
    pred = loop.predict(x).astype(np.float64)
    expected = ((pred - 1) ** 2).sum() / 5
    metrics = loop.evaluate((x, y), batch_size=2)
    # the same float32 predictions; each side adds a sample's 3 squares and the 5 samples' losses
    allowed = 2 * tolerance(np.float32, 3 + 5, expected)
    assert metrics["loss"] == pytest.approx(expected, rel=0, abs=allowed) and np.isnan(metrics["accuracy"])


def test_batchnorm_training_needs_two_values_per_channel():
    from unitrain.loop import InputError

    model = Sequential({"conv": Conv2d(1, 2, 3), "norms": Sequential(unitrain.BatchNorm2d(2)), "flat": Flatten()})
    loop = _loop(unitrain.MSELoss(), model)
    one, target = np.ones((1, 1, 3, 3), np.float32), np.zeros((1, 2), np.float32)
    message = r"^norms\.0: BatchNorm in training needs more than one value per channel, but a batch of 1 gives 1"
    with pytest.raises(InputError, match=message):
        loop.step((one, target))
    with pytest.raises(InputError, match=message):
        loop.forward(one)
    loop.step((np.ones((2, 1, 3, 3), np.float32), np.zeros((2, 2), np.float32)))
    loop.eval()
    assert loop.predict(one).shape == (1, 2)
    assert unitrain.resnet18().leaf_input_shapes((3, 64, 64))["layer4.1.bn2"] == (512, 2, 2)


def test_fit_refuses_an_epoch_whose_batches_batchnorm_cannot_normalise_before_training():
    """5 samples in batches of 2 end each epoch in a batch of 1, which the step refused only when
    it came, after the epoch's other steps had trained. Refused before the first step, with
    PyTorch's remedy (drop_last); trained where the run ends before it or leaves it out."""
    from unitrain.loop import InputError

    model = Sequential(Linear(4, 3), unitrain.BatchNorm1d(3))
    x, y = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32), np.zeros((5, 3), np.float32)
    loop = _loop(unitrain.MSELoss(), model)
    before = loop.state_dict()
    message = ("batch_size 2 on 5 samples leaves a last batch of 1 (drop_last=True, --drop-last, leaves it out): 1: "
               "BatchNorm in training needs more than one value per channel, but a batch of 1 gives 1")  # fmt: skip
    with pytest.raises(InputError, match=f"^{re.escape(message)}"):
        loop.fit((x, y), epochs=1, batch_size=2, shuffle=False)
    with pytest.raises(InputError, match=r"^batch_size 1 on 5 samples: 1: BatchNorm in training"):
        loop.fit((x, y), epochs=1, batch_size=1, shuffle=False)
    assert loop.step_count == 0 and all(np.array_equal(v, loop.state_dict()[k]) for k, v in before.items())
    loop.fit((x, y), epochs=1, batch_size=2, shuffle=False, max_steps=2)  # the last batch is never reached
    loop.fit((x, y), epochs=2, batch_size=2, shuffle=False, drop_last=True)
    assert loop.step_count == 2 + 4
