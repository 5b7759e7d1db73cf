"""Branches, the layers and losses beyond a stack, and the user's own loss."""

from __future__ import annotations

import math

import numpy as np

from unitrain import layers, sequences
from unitrain.losses import (
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    CustomLoss,
    HuberLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
)

from . import reference
from .checks import (
    check,
    compare,
    compare_states,
    expect_error,
    fail,
    identity_loop,
    inputs,
    labels,
    loaded,
    longest_sum,
    state_of,
    tutorial_gradients,
)
from .reference import F64

# --- 20-26. graphs with branches, the layers and losses beyond a stack, the user's own loss -----


def _layer_case(adapter, what, model, input_shape, *, scale=1.0, x=None):
    """Eval-mode forward and training-mode loss (MSE, sum) and gradients of ``model`` (random weights)
    match the reference; ``scale`` widens the inputs so that activations see their curved regions.
    Tolerance sizes: the forward's :func:`longest_sum`; the loss adds up every output too; and
    gradients, as in ``_check_gradients``, allow 8 times the loss's. ``x``: the inputs, if not those
    (token ids, say)."""
    state = state_of(model)
    loss = MSELoss(reduction="sum")
    loop = loaded(adapter, model, state, loss=loss)
    x = scale * inputs(input_shape) if x is None else x
    ref = reference.Reference(model, state)
    size = longest_sum(model, input_shape, len(x))
    compare(f"{what}: predict()", loop.predict(x), ref.forward(x), dtype=loop.dtype, size=size)
    output = model.output_shape(input_shape)
    target = inputs(output, seed=1, n=len(x))
    size = max(size, len(x) * math.prod(output))
    expected, grad = reference.loss(loss, ref.forward(x, training=True), target)
    compare(f"{what}: training loss", tutorial_gradients(loop, x, target), expected, dtype=loop.dtype, size=size)
    compare_states(f"{what}: gradient", loop.gradients(), ref.backward(grad), dtype=loop.dtype, size=8 * size)


def _between_convs(*middle, channels=4, image=(6, 5)) -> layers.Sequential:
    """Input ``(N, 2, *image)``: a convolution feeds the ``middle`` layers (so their backward
    reaches a parameter) and a Linear reads their output."""
    stem = layers.Conv2d(2, channels, 3, padding=1)
    out = layers.Sequential(*middle).output_shape((channels, *image))
    return layers.Sequential(stem, *middle, layers.Flatten(), layers.Linear(math.prod(out), 3))


@check("conv")
def check_conv2d_options(adapter):
    """Conv2d with pair kernel/stride/padding, dilation, groups (depthwise) and no bias matches the reference."""
    strided = layers.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2)
    cases = {
        repr(strided): layers.Sequential(
            strided, layers.Flatten(), layers.Linear(math.prod(strided.output_shape((2, 6, 5))), 3)
        ),
        "depthwise Conv2d(4, 4, 3, groups=4, bias=False)": _between_convs(
            layers.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        ),
    }
    for what, model in cases.items():
        _layer_case(adapter, what, model, (2, 6, 5))


@check("conv", "pooling")
def check_pooling(adapter):
    """MaxPool2d with padding, AvgPool2d (count_include_pad True and False) and AdaptiveAvgPool2d
    (uneven bins) match the reference; two pools per model keep the number of models small."""
    cases = (
        (layers.MaxPool2d(3, stride=2, padding=1), layers.AvgPool2d(3, stride=2, padding=1)),
        (layers.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)),
         layers.AvgPool2d((2, 3), stride=(1, 2), padding=(1, 1), count_include_pad=False)),
        (layers.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), layers.AdaptiveAvgPool2d((4, 3))),
    )  # fmt: skip
    for pools in cases:
        what = " then ".join(map(repr, pools))
        _layer_case(adapter, what, _between_convs(*pools), (2, 6, 5))


@check("layernorm")
def check_layer_norm(adapter):
    """LayerNorm over the last dim and over several trailing dims, with and without affine parameters."""
    vector = layers.Sequential(layers.Linear(6, 8), layers.LayerNorm(8, eps=1e-3), layers.Linear(8, 4))
    _layer_case(adapter, "LayerNorm(8)", vector, (6,))
    plain = layers.Sequential(layers.Linear(6, 8), layers.LayerNorm(8, elementwise_affine=False), layers.Linear(8, 4))
    _layer_case(adapter, "LayerNorm(8, elementwise_affine=False)", plain, (6,))
    if "conv" in adapter.capabilities:
        _layer_case(adapter, "LayerNorm((4, 6, 5))", _between_convs(layers.LayerNorm((4, 6, 5))), (2, 6, 5))


#: Activations, each between two Linear layers; inputs scaled by 3 so that GELU, ELU, SiLU ...
#: are compared where they curve (where GELU's tanh form is up to 5e-4 off the erf form).
ACTIVATIONS = (
    layers.Identity(), layers.Tanh(), layers.Sigmoid(), layers.GELU(), layers.GELU(approximate="tanh"),
    layers.LeakyReLU(0.2), layers.SiLU(), layers.ELU(alpha=0.7), layers.Softmax(dim=1), layers.LogSoftmax(dim=-1),
)  # fmt: skip


@check("activations")
def check_activations(adapter):
    """Identity, Tanh, Sigmoid, GELU (exact and tanh), LeakyReLU, SiLU, ELU, Softmax and LogSoftmax
    (over the feature axis, and LogSoftmax over the channels of an image batch) match their formulas."""
    for layer in ACTIVATIONS:
        model = layers.Sequential(layers.Linear(6, 8), layer, layers.Linear(8, 4))
        _layer_case(adapter, repr(layer), model, (6,), scale=3.0)
    if "conv" in adapter.capabilities:
        layer = layers.LogSoftmax(dim=1)
        _layer_case(adapter, f"{layer!r} of (N, C, H, W)", _between_convs(layer), (2, 6, 5), scale=3.0)


@check("sequences")
def check_sequence_layers(adapter):
    """Embedding (with padding_idx, integer ids), a stacked bidirectional batch-first LSTM, stacked tanh
    and bias-free bidirectional ReLU RNNs; a stacked bidirectional time-first GRU feeding Conv1d and the
    1-d pools; Linear over the last axis: predictions, training loss and gradients through time match
    the float64 reference (two models, so that compiling backends compile little)."""
    # three steps: MindSpore unrolls every step of nn.GRU and nn.RNN into the graphs it compiles
    ids = np.random.default_rng(0).integers(0, 7, (8, 3))
    ids[0, :2] = 2  # the padding row is read, and gets no gradient
    recurrent = layers.Sequential(
        sequences.Embedding(7, 3, padding_idx=2),
        sequences.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True),
        sequences.RNN(8, 4, num_layers=2, batch_first=True),
        sequences.RNN(4, 3, nonlinearity="relu", bias=False, batch_first=True, bidirectional=True),
        layers.Linear(6, 2),
    )
    _layer_case(adapter, "Embedding, LSTM, RNN (tanh, relu), batch first", recurrent, (3,), x=ids)
    # per sample (3 sequences, 3 features): the GRU's batch becomes Conv1d's channels
    convolved = layers.Sequential(
        layers.Linear(3, 3), sequences.GRU(3, 8, num_layers=2, bidirectional=True),
        sequences.Conv1d(3, 4, 3, stride=2, padding=1), sequences.MaxPool1d(2, padding=1),
        sequences.Conv1d(4, 4, 2, dilation=2, groups=2, bias=False),
        sequences.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), sequences.AdaptiveAvgPool1d(2),
    )  # fmt: skip
    _layer_case(adapter, "GRU time first, Conv1d and the 1-d pools", convolved, (3, 3), x=inputs((3, 3), n=3))


def residual_dense_model() -> layers.Sequential:
    """Input ``(N, 6)``: an identity shortcut with a layer after the add, a projection shortcut,
    and a Residual nested in a Residual's body, under named children."""
    inner = layers.Residual(layers.Sequential({"fc": layers.Linear(8, 8), "act": layers.Tanh()}))
    return layers.Sequential({
        "stem": layers.Linear(6, 8),
        "block": layers.Residual(
            layers.Sequential({"fc1": layers.Linear(8, 8), "relu": layers.ReLU(), "fc2": layers.Linear(8, 8)}),
            post=layers.ReLU(),
        ),
        "down": layers.Residual(
            layers.Sequential({"fc1": layers.Linear(8, 5), "inner": layers.Sequential(layers.ReLU())}),
            shortcut=layers.Sequential(layers.Linear(8, 5)),
        ),
        "nested": layers.Residual(
            layers.Sequential({"pre": layers.Linear(5, 8), "res": inner, "post_fc": layers.Linear(8, 5)})
        ),
        "head": layers.Linear(5, 4),
    })  # fmt: skip


def mini_resnet(batchnorm: bool) -> layers.Sequential:
    """Input ``(N, 2, 7, 7)``: ResNet-18's stem and two BasicBlocks (the second with a strided
    1x1-conv downsample) at 4-6 channels, with torchvision's names."""
    norm = layers.BatchNorm2d if batchnorm else (lambda channels: layers.Identity())

    def block(cin, cout, stride):
        body = layers.Sequential({
            "conv1": layers.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), "bn1": norm(cout),
            "relu": layers.ReLU(), "conv2": layers.Conv2d(cout, cout, 3, padding=1, bias=False), "bn2": norm(cout),
        })  # fmt: skip
        downsample = None
        if stride != 1 or cin != cout:
            downsample = layers.Sequential(layers.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))
        return layers.Residual(body, downsample, layers.ReLU())

    return layers.Sequential({
        "conv1": layers.Conv2d(2, 4, 3, stride=1, padding=1, bias=False), "bn1": norm(4), "relu": layers.ReLU(),
        "maxpool": layers.MaxPool2d(3, stride=2, padding=1) if batchnorm else layers.Identity(),
        "layer1": layers.Sequential(block(4, 4, 1)), "layer2": layers.Sequential(block(4, 6, 2)),
        "avgpool": layers.AdaptiveAvgPool2d(1) if batchnorm else layers.Flatten(), "flatten": layers.Flatten(),
        "fc": layers.Linear(6 if batchnorm else 6 * 4 * 4, 3),
    })  # fmt: skip


@check("residual")
def check_residual(adapter):
    """Residual blocks (identity and projection shortcuts, a layer after the add, nesting) under named
    children: forward, loss and every gradient match the reference, and state_dict() uses the dotted names."""
    model = residual_dense_model()
    _layer_case(adapter, "dense residual model", model, (6,))
    keys = list(adapter(model).state_dict())
    if keys != list(model.state_shapes()):
        fail(f"state_dict() keys of the residual model: expected {list(model.state_shapes())}, got {keys}")
    if "conv" in adapter.capabilities:
        _layer_case(adapter, "convolutional residual model", mini_resnet(batchnorm=False), (2, 7, 7))


@check("residual", "conv", "batchnorm", "pooling")
def check_mini_resnet(adapter):
    """ResNet-18's structure at toy size (stem, max pool, BasicBlocks with BatchNorm and a strided
    downsample, global average pool): eval forward and training-mode gradients match the reference."""
    _layer_case(adapter, "mini ResNet", mini_resnet(batchnorm=True), (2, 7, 7))


@check("residual", "conv", "batchnorm")
def check_resnet18_state_dict(adapter):
    """unitrain.resnet18()'s state_dict() has torchvision's keys and shapes, in torchvision's order."""
    state = adapter(layers.resnet18(num_classes=10, in_channels=1)).state_dict()
    expected = reference.torchvision_resnet18_state_shapes(num_classes=10, in_channels=1)
    got = {key: tuple(np.shape(value)) for key, value in state.items()}
    if list(got) != list(expected):
        fail(f"resnet18 state_dict() keys: expected {list(expected)}, got {list(got)}")
    wrong = {key: (got[key], shape) for key, shape in expected.items() if got[key] != shape}
    if wrong:
        fail(f"resnet18 state_dict() shapes (got, expected): {wrong}")


#: (loss spec, kind of targets) of the checks below: class indices, class probabilities, floats, [0, 1]
NEW_LOSSES = (
    (CrossEntropyLoss(label_smoothing=0.2), "indices"),
    (CrossEntropyLoss(), "probabilities"),
    (CrossEntropyLoss(label_smoothing=0.2), "probabilities"),
    (BCEWithLogitsLoss(), "unit"),
    (L1Loss(), "floats"),
    (SmoothL1Loss(beta=0.5), "floats"),
    (HuberLoss(delta=0.7), "floats"),
)


def _targets(kind: str, n: int = 8, classes: int = 5) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "indices":
        return labels(n, classes)
    if kind == "probabilities":
        return rng.dirichlet(np.ones(classes), n).astype(np.float32)
    if kind == "unit":
        return rng.uniform(0, 1, (n, classes)).astype(np.float32)
    return (2 * inputs((classes,), seed=4, n=n)).astype(np.float32)


#: the loss checks' tolerance size: every one of the 8 x 5 predictions' terms is summed into the loss
LOSS_TERMS = 40


def _loss_and_gradients(adapter, loss, pred, target, what):
    """Through :func:`identity_loop`, the tutorial sequence's loss and gradients (``grad.T @ pred``
    and ``grad.sum(0)`` for ``grad`` = dloss/dpred) match the reference; returns the loop and the loss."""
    loop = identity_loop(adapter, loss)
    expected, grad = reference.loss(loss, pred, target)
    compare(f"{what}: loss", tutorial_gradients(loop, pred, target), expected, dtype=loop.dtype, size=LOSS_TERMS)
    gradients = {"0.weight": grad.T @ np.asarray(pred, F64), "0.bias": grad.sum(0)}
    compare_states(f"{what}: gradient", loop.gradients(), gradients, dtype=loop.dtype, size=LOSS_TERMS)
    return loop, expected


@check("losses")
def check_losses_new(adapter):
    """CrossEntropyLoss with label smoothing and class-probability targets, BCEWithLogitsLoss, L1Loss,
    SmoothL1Loss and HuberLoss: values (mean, and sum for two), gradients and evaluate() match their formulas."""
    pred = (3 * inputs((5,), seed=2)).astype(np.float32)
    for spec, kind in NEW_LOSSES:
        target = _targets(kind)
        what = f"{spec} with {kind} targets"
        loop, _ = _loss_and_gradients(adapter, spec, pred, target, what)
        per_sample = reference.loss_terms(spec, pred, target)[0].mean()
        compare(f"{what}: evaluate()['loss']", loop.evaluate((pred, target))["loss"], per_sample, dtype=loop.dtype,
                size=LOSS_TERMS)  # fmt: skip
    # "sum" adds what "mean" averages: over samples for class probabilities, over elements for the rest
    for spec, kind in ((CrossEntropyLoss(reduction="sum"), "probabilities"), (L1Loss(reduction="sum"), "floats")):
        target = _targets(kind)
        loop = identity_loop(adapter, spec)
        expected, _ = reference.loss(spec, pred, target)
        compare(f"{spec} with {kind} targets: loss", loop.to_float(loop.loss(loop.forward(pred), target)), expected,
                dtype=loop.dtype, size=LOSS_TERMS)  # fmt: skip


@check("conv", "pooling")
def check_transposed_conv_and_upsample(adapter):
    """ConvTranspose2d (stride, padding, output_padding below and beyond the stride, groups, dilation,
    no bias), Upsample (nearest and bilinear, by size and by integer and fractional scale factors,
    align_corners) and Flatten(start_dim, end_dim) match the reference; three layers per model keep
    the number of models small."""
    cases = (
        (layers.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1),  # -> 12x10
         layers.Upsample(scale_factor=(1.7, 0.6)), layers.Upsample(size=(9, 7), mode="bilinear")),
        (layers.ConvTranspose2d(4, 4, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
         layers.Upsample(scale_factor=2), layers.Upsample(scale_factor=(1.5, 0.5), mode="bilinear")),
        (layers.ConvTranspose2d(4, 4, 3, output_padding=1, dilation=2),
         layers.Upsample(scale_factor=0.7, mode="bilinear", align_corners=True), layers.Flatten(1, 2)),
    )  # fmt: skip
    for middle in cases:
        what = " then ".join(map(repr, middle))
        _layer_case(adapter, what, _between_convs(*middle), (2, 6, 5))


@check("losses")
def check_bce_loss(adapter):
    """BCELoss on probabilities, with mean and sum reduction, soft and hard targets, including
    predictions of exactly 0 and 1 (logarithms floored at -100, PyTorch's finite gradient there):
    values, gradients and evaluate() match the formula."""
    rng = np.random.default_rng(9)
    pred = rng.uniform(0.02, 0.98, (8, 5)).astype(np.float32)
    pred[0, :2], pred[1, 3] = (0.0, 1.0), 1.0
    for spec, target in (
        (BCELoss(), _targets("unit")),
        (BCELoss(reduction="sum"), (rng.uniform(0, 1, (8, 5)) > 0.5).astype(np.float32)),
    ):
        what = f"{spec} on probabilities"
        loop, _ = _loss_and_gradients(adapter, spec, pred, target, what)
        if spec.reduction == "mean":
            per_element = reference.loss_terms(spec, pred, target)[0].mean()
            compare(f"{what}: evaluate()['loss']", loop.evaluate((pred, target))["loss"], per_element,
                    dtype=loop.dtype, size=LOSS_TERMS)  # fmt: skip


@check("custom-loss")
def check_custom_loss(adapter):
    """CustomLoss: the seed tutorial's (pred - labels).sum(), a hand-written soft cross-entropy and an
    expression using every operation give the closed-form loss and gradients, through the tutorial
    sequence and through step()."""
    pred = inputs((5,), seed=2)
    target = np.random.default_rng(8).uniform(0.1, 1.0, (8, 5)).astype(np.float32)
    for tree, (fn, _) in reference.CUSTOM_LOSSES.items():
        what = f"CustomLoss {tree[0]}(...)"
        loop, expected = _loss_and_gradients(adapter, CustomLoss(fn), pred, target, what)
        compare(f"{what}: step() return value", loop.to_float(loop.step((pred, target))), expected,
                dtype=loop.dtype, size=LOSS_TERMS)  # fmt: skip


@check()
def check_bad_input_branches(adapter):
    """Branches that do not fit and targets that do not fit the loss are refused before any framework
    work, naming the layer path or both shapes."""
    x = inputs((4,))
    mismatch = layers.Sequential({"block": layers.Residual(layers.Sequential(layers.Linear(4, 5)))})
    loop = adapter(mismatch)
    expect_error("step() through a Residual whose body changes the shape", lambda: loop.step((x, labels())),
                 "block: body gives (5,), shortcut gives (4,)")  # fmt: skip
    model = layers.Sequential(layers.Linear(4, 4))
    cases = (
        (CrossEntropyLoss(), np.full((8, 3), 1 / 3, np.float32), ("(8, 3)", "(8, 4)")),
        (NLLLoss(), np.zeros((8, 4), np.float32), ("NLLLoss", "integer class indices")),
        (MSELoss(), np.zeros((8, 5), np.float32), ("(8, 5)", "(8, 4)")),
        (CustomLoss(lambda pred, target: (pred - target).sum()), np.zeros((8, 3), np.float32),
         ("(8, 4)", "(8, 3)", "do not broadcast")),
    )  # fmt: skip
    for loss, target, needles in cases:
        loop = adapter(model, loss=loss)
        expect_error(f"step() with {loss} and targets of shape {target.shape}", lambda: loop.step((x, target)),  # noqa: B023
                     *needles)  # fmt: skip
        if loop.step_count != 0:
            fail(f"a rejected batch changed step_count to {loop.step_count}")
