"""Plain PyTorch as ground truth for the backend tests: hand-written twins of unitrain's networks, a
translation of any layer spec into ``torch.nn``, a hand-written training loop, and state comparisons."""

import contextlib
import copy
import functools
import math
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from unitrain.conformance.checks import longest_sum
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain.randomness import dropout_stream

SEED = 0


def torch_mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def torch_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 12, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(192, 120), nn.ReLU(), nn.Linear(120, 60), nn.ReLU(), nn.Linear(60, 10),
    )  # fmt: skip


def bn_spec(image_size=28, padding=0):
    """Every layer kind, for 1 x image_size x image_size inputs; ``torch_bn`` is its hand-written twin."""
    pooled = (image_size + 2 * padding - 2) // 2
    return ut.Sequential(
        ut.Conv2d(1, 4, 3, padding=padding), ut.BatchNorm2d(4), ut.ReLU(), ut.MaxPool2d(2), ut.Flatten(),
        ut.Sequential(ut.Linear(4 * pooled * pooled, 32), ut.BatchNorm1d(32, eps=1e-3, momentum=0.2)),
        ut.ReLU(), ut.Dropout(0.3), ut.Linear(32, 10),
    )  # fmt: skip


def torch_bn(image_size=28, padding=0):
    pooled = (image_size + 2 * padding - 2) // 2
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=padding), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Sequential(nn.Linear(4 * pooled * pooled, 32), nn.BatchNorm1d(32, eps=1e-3, momentum=0.2)),
        nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10),
    )  # fmt: skip


def network_spec(name, **bn_geometry):
    """The unitrain spec of "mlp", "cnn" or "bn" (``bn_geometry``: ``bn_spec``'s arguments)."""
    return bn_spec(**bn_geometry) if name == "bn" else {"mlp": ut.mlp, "cnn": ut.cnn}[name]()


def reference(name, dtype=torch.float32, **bn_geometry):
    """The hand-written torch twin of ``network_spec(name)`` holding the initial weights unitrain draws with SEED."""
    model = torch_bn(**bn_geometry) if name == "bn" else {"mlp": torch_mlp, "cnn": torch_cnn}[name]()
    return load_state(model.to(dtype), ut.init_weights(network_spec(name, **bn_geometry), SEED))


def torch_layers(spec):
    """Any unitrain layer spec translated into the equivalent ``torch.nn.Sequential``."""
    if isinstance(spec, ut.Sequential):
        return nn.Sequential(*map(torch_layers, spec))
    if isinstance(spec, ut.Linear):
        return nn.Linear(spec.in_features, spec.out_features, spec.bias)
    if isinstance(spec, ut.Conv2d):
        return nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                         bias=spec.bias)  # fmt: skip
    if isinstance(spec, ut.MaxPool2d):
        return nn.MaxPool2d(spec.kernel_size, spec.stride)
    if isinstance(spec, (ut.BatchNorm1d, ut.BatchNorm2d)):
        kind = nn.BatchNorm1d if isinstance(spec, ut.BatchNorm1d) else nn.BatchNorm2d
        return kind(spec.num_features, spec.eps, spec.momentum)
    if isinstance(spec, ut.Dropout):
        return nn.Dropout(spec.p)
    return {ut.ReLU: nn.ReLU, ut.Flatten: nn.Flatten}[type(spec)]()


def load_state(model, state):
    """``model`` holding ``state`` (NumPy arrays under PyTorch's names)."""
    model.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})
    return model


def listed_once(module):
    """PyTorch's state_dict lists a shared tensor under each of its names; unitrain's once, under the
    first (``named_parameters``' name): hooks that read and write the twin's state as unitrain does."""
    names = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = {other: names[0] for names in names.values() for other in names[1:]}

    def drop(module, state, prefix, local_metadata):
        for key in tied:
            del state[prefix + key]

    def fill(module, state, prefix, *_):
        state.update({prefix + key: state[prefix + source] for key, source in tied.items()})

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_pre_hook(fill)
    return module


def numpy_state(model):
    return {key: value.detach().numpy() for key, value in model.state_dict().items()}


def numpy_gradients(model):
    return {name: param.grad.numpy() for name, param in model.named_parameters()}


def optimizer_buffers(model, optimizer):
    """A torch optimizer's per-parameter buffers under the keys of ``Loop.optimizer_state_dict`` ("step" aside)."""
    return {
        f"{name}.{key}": value.numpy()
        for name, param in model.named_parameters()
        for key, value in optimizer.state[param].items()
        if key != "step"
    }


def _tensors(value, dtype=None):
    """An array, or a tuple of arrays (several inputs or targets), as tensors (floats in ``dtype``)."""
    if isinstance(value, tuple):
        return tuple(_tensors(part, dtype) for part in value)
    tensor = torch.from_numpy(value)
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _reversed(value):
    return tuple(map(_reversed, value)) if isinstance(value, tuple) else value[::-1].copy()


def torch_optimizer_arguments(spec) -> dict:
    """An optimizer spec's fields as ``torch.optim``'s arguments of the same names, but for the switches
    of other frameworks' equations (dialects), which must be at PyTorch's values."""
    arguments = {name: getattr(spec, name) for name in spec.__dataclass_fields__}
    assert arguments.pop("lr_in_velocity", False) is False
    assert arguments.pop("eps_placement", "after_correction") == "after_correction"
    return arguments


def train_torch(model, optimizer, batches, scheduler=None, criterion=F.cross_entropy):
    """The hand-written PyTorch training loop (``criterion(output, target)``, cross-entropy by default;
    inputs in the model's dtype, a tuple of them passed as several arguments; ``scheduler`` stepped
    after each optimizer step, as OneCycleLR wants); returns each loss."""
    dtype = next(model.parameters()).dtype
    model.train()
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        x = _tensors(x, dtype)
        loss = criterion(model(*x) if isinstance(x, tuple) else model(x), _tensors(y, dtype))
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def assert_states_equal(actual, expected):
    """The same keys in the same order, and identical values and dtypes."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


def assert_states_close(actual, expected, *, rtol, atol, scale_atol=False):
    """The same keys in the same order and close values; returns the largest absolute difference.
    ``scale_atol``: ``atol`` grows with arrays whose largest magnitude exceeds 1
    (gradients of summed losses, say), where rounding grows with the values."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        scale = max(1.0, float(np.abs(value).max(initial=0))) if scale_atol else 1.0
        np.testing.assert_allclose(actual[key], value, rtol=rtol, atol=atol * scale, equal_nan=False, err_msg=key)
    return max(float(np.abs(actual[key] - value).max(initial=0)) for key, value in expected.items())


# How far a backend's float32 result may lie from PyTorch's float32 result of the same case, derived
# rather than tuned. Both approximate one exact result, which the float64 runs pin down (there the
# backends agree with PyTorch to ~1e-14), so |ours32 - torch32| <= |ours32 - exact| + |torch32 - exact|.
# PyTorch's own float32 drift on the case is measured in the test itself, on whatever CPU runs it: the
# hand-written loop in float32, once as given and once with each batch's samples in reverse order
# (the same exact result, other summation orders), against the loop in float64. It shows how strongly
# the case amplifies rounding: BatchNorm makes a conv weight gradient a sum of 12544 terms that nearly
# cancel, Adam turns the rounding noise of a near-zero gradient into a step of order lr, and which
# key's noise grows most is chance, so the drift is the largest over all keys. Kernels also differ in
# how they add up n terms: blocked or pairwise (error ~ eps log n) or in one running sum (error ~ eps
# sqrt(n) for random rounding errors, Higham, Accuracy and Stability, ch. 4), and which runs depends
# on the CPU (oneDNN limited to SSE4.1 makes PyTorch's bn_cnn drift 8x smaller than with AVX2, while
# Chainer's OpenBLAS GEMM keeps its drift). So a backend may drift sqrt(n) times as far as PyTorch,
# n bounding the longest sum of one step (the elements of one input batch). Wrong equations are
# caught by the float64 runs; here the float32 path must stay within rounding of them. The floor is
# one float32 rounding of the value (conformance/tolerances.py, size 1).


class TorchRun(NamedTuple):
    """A hand-written PyTorch run: final state, optimizer buffers, and ``{"loss": each step's loss}``."""

    state: dict
    buffers: dict
    losses: dict


class TorchRuns(NamedTuple):
    """The same case as ``float32``, ``float64``, and ``reversed``: float32 with each batch's samples
    in reverse order."""

    float32: TorchRun
    float64: TorchRun
    reversed: TorchRun


def torch_runs(make_model, make_optimizer, batches, make_scheduler=None, criterion=F.cross_entropy, masks=None):
    """The hand-written loop trained on ``batches`` from the same initial weights (``make_model(dtype)``),
    with ``make_scheduler(optimizer)`` stepped per batch if given, as ``TorchRuns``. The models must
    hold no dropout (its masks follow the sample order), unless ``masks(reversed)`` gives the context
    in which they draw known masks (``loop_masks``); mean losses and batch statistics ignore the order."""
    batches_reversed = [(_reversed(x), _reversed(y)) for x, y in batches]
    runs = []
    for dtype, data in ((torch.float32, batches), (torch.float64, batches), (torch.float32, batches_reversed)):
        model = make_model(dtype)
        optimizer = make_optimizer(model.parameters())
        scheduler = None if make_scheduler is None else make_scheduler(optimizer)
        with contextlib.nullcontext() if masks is None else masks(data is batches_reversed):
            losses = np.array(train_torch(model, optimizer, data, scheduler, criterion))
        runs.append(TorchRun(numpy_state(model), optimizer_buffers(model, optimizer), {"loss": losses}))
    return TorchRuns(*runs)


def _weights_path(forward, *args, **kwargs):
    return forward(*args, **{**kwargs, "need_weights": True})


def dropout_through_python(model: nn.Module) -> nn.Module:
    """``model`` with each ``nn.MultiheadAttention`` taking its ``need_weights=True`` path, the one
    that drops attention weights with ``F.dropout`` (the other, ``scaled_dot_product_attention``,
    draws inside ATen, out of ``loop_masks``' reach); the same equations."""
    for child in model.modules():
        if isinstance(child, nn.MultiheadAttention):
            child.forward = functools.partial(_weights_path, child.forward)
    return model


@contextlib.contextmanager
def loop_masks(seed: int, draw, batch: int, reversed_batch: bool = False):
    """Within it ``F.dropout`` (``nn.Dropout``'s, and ``nn.MultiheadAttention``'s after
    ``dropout_through_python``) drops what the NumPy, Chainer and MindSpore loops drop from ``seed``:
    the dropout stream's ``random(shape, draw) >= p``, scaled by ``1 / (1 - p)``, one draw per call in
    the order the calls run (``unitrain.randomness``); ``reversed_batch``: the batch of ``batch``
    samples (its leading axis; ``(N * heads, L, S)`` for attention weights) is in reverse order."""
    rng = dropout_stream(seed)

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        keep = rng.random(tuple(input.shape), draw) >= p
        if reversed_batch:
            keep = keep.reshape(batch, -1)[::-1].reshape(keep.shape)
        mask = np.multiply(keep, 1 / (1 - p), dtype=np.float64 if input.dtype == torch.float64 else np.float32)
        return input * torch.from_numpy(mask)

    with mock.patch.object(F, "dropout", dropout):
        yield


def drift_tolerances(runs32, run64, size):
    """Per key of ``run64`` (a part of a TorchRun): sqrt(size) times PyTorch's float32 drift, the largest
    ``|float32 - float64|`` over all keys of ``runs32``, at least one float32 rounding of the key's
    values; ``size``: the longest sum of one step."""
    differences = (np.abs(run32[key] - value.astype(np.float64)) for run32 in runs32 for key, value in run64.items())
    drift = max((float(difference.max(initial=0)) for difference in differences), default=0.0)
    return {
        key: max(np.sqrt(size) * drift, tolerance(np.float32, 1, float(np.abs(value).max(initial=0))))
        for key, value in run64.items()
    }


def float64_tolerances(expected, size):
    """Per key, the conformance formula for float64 (8 eps n max(1, |x|)): the equations themselves,
    checked where rounding is ~1e-16. ``size``: the longest sum in one step; the elements of one input
    batch bound every sum of these networks (a conv weight gradient adds batch x output pixels terms)."""
    return {key: tolerance(np.float64, size, float(np.abs(value).max(initial=0))) for key, value in expected.items()}


def gradient_size(spec, input_shape, n):
    """The ``size`` (conformance/tolerances.py) of ``spec``'s weight gradients on ``n`` samples: each summed
    product carries the forward's longest sum (``longest_sum``), and a weight's gradient adds one product
    per sample and output position (n for a Linear on flat input, n x output pixels for a convolution)."""
    shapes = spec.leaf_input_shapes(tuple(input_shape))
    products = [n]
    for path, layer in spec.named_layers():
        if layer.param_shapes():
            out = layer.output_shape(shapes[path])
            if isinstance(layer, ut.Linear):  # features last
                positions = math.prod(out[:-1])
            elif isinstance(layer, ut.LayerNorm):
                positions = math.prod(out) // math.prod(layer.normalized_shape)
            else:  # channels first
                positions = math.prod(out[1:])
            products.append(n * positions)
    return longest_sum(spec, input_shape, n) + max(products)


def accumulation_tolerances(loop, x, y, full):
    """Per key, how far gradients accumulated over parts of the batch ``(x, y)`` may lie from ``full``, the
    loop's float32 gradients of the whole batch: twice sqrt(n) times ``full``'s measured drift from the same
    gradients in float64 on NumPy (``drift_tolerances``; n: ``gradient_size`` plus the softmax over the
    outputs), both approximating them."""
    from unitrain.backends.numpy import NumpyLoop

    exact = NumpyLoop(loop.model_spec, loss=loop.loss_spec, dtype="float64")
    exact.load_state_dict({key: value.astype(np.float64) for key, value in loop.state_dict().items()})
    exact.backward(exact.loss(exact.forward(x.astype(np.float64)), y))
    size = gradient_size(loop.model_spec, x.shape[1:], len(x)) + loop.model_spec.output_shape(x.shape[1:])[0]
    return {key: 2 * value for key, value in drift_tolerances([full], exact.gradients(), size).items()}


def steps_tolerance(spec, batches, dtype, loss_size=0):
    """Ours against PyTorch after SGD steps (lr x (1 + momentum) <= 1) on ``batches`` from the same weights,
    per unit of scale (``assert_states_close(scale_atol=True)``): each step's gradients carry the formula over
    ``gradient_size`` plus the loss's own sum (``loss_size``), the update scales that error by at most 1, and
    the steps add up."""
    x = batches[0][0]
    return twin_tolerance(dtype, len(batches) * (gradient_size(spec, x.shape[1:], len(x)) + loss_size), 1)


def twin_tolerance(dtype, size, expected):
    """How far two computations of ``expected`` in ``dtype`` (ours and PyTorch's, or two orders of one sum)
    may differ: each lies within the conformance formula of the exact value over ``size`` roundings."""
    return 2 * tolerance(dtype, size, float(np.abs(expected).max(initial=0)))


def expected_run(runs, dtype, size):
    """For a backend's run in ``dtype`` ("float32" or "float64"): PyTorch's run of that dtype and, per
    part and key, the tolerance (``drift_tolerances`` in float32, ``float64_tolerances`` in float64);
    ``size``: the longest sum of one step."""
    if np.dtype(dtype) == np.float64:
        return runs.float64, TorchRun(*(float64_tolerances(part, size) for part in runs.float64))
    parts = zip(runs.float32, runs.reversed, runs.float64, strict=True)
    return runs.float32, TorchRun(*(drift_tolerances((part32, reversed32), part64, size)
                                    for part32, reversed32, part64 in parts))  # fmt: skip


def assert_run_within_drift(loop, losses, runs, dtype, size):
    """A loop's ``losses``, final state and optimizer buffers after the case of ``runs`` in ``dtype``
    within :func:`expected_run`'s tolerances."""
    assert_run_close(loop, losses, *expected_run(runs, dtype, size))


def assert_run_close(loop, losses, expected, tolerances):
    """A loop's ``losses``, final state and optimizer buffers within ``tolerances`` (a TorchRun of
    tolerances per part and key) of the TorchRun ``expected``."""
    assert_within_drift({"loss": np.array(losses)}, expected.losses, tolerances.losses)
    assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
    buffers = {key: value for key, value in loop.optimizer_state_dict().items() if key != "step"}
    assert_within_drift(buffers, expected.buffers, tolerances.buffers)


def torch_output(model, x, function=None):
    """``model``'s float32 output for ``x`` in its current mode (a training-mode BatchNorm records its
    statistics), or ``function`` of it, and the tolerances PyTorch's own float32 drift gives it (a float64
    copy computes the same; drift_tolerances): ``assert_within_drift``'s ``expected, tolerances``."""
    twin = copy.deepcopy(model).double()
    outputs = []
    inputs = torch.from_numpy(x)
    for network, dtype in ((model, torch.float32), (twin, torch.float64)):
        out = network(inputs.to(dtype) if inputs.is_floating_point() else inputs)
        outputs.append({"out": (function(out) if function else out).detach().numpy()})
    return outputs[0], drift_tolerances(outputs[:1], outputs[1], x.size)


def assert_within_drift(actual, expected, tolerances):
    """The same keys in the same order, integers equal, floats within ``tolerances`` (per key);
    returns the largest difference as a fraction of its key's tolerance."""
    assert list(actual) == list(expected)
    worst = 0.0
    for key, value in expected.items():
        if value.dtype.kind in "iu":
            np.testing.assert_array_equal(actual[key], value, err_msg=key)
            continue
        difference = float(np.abs(actual[key].astype(np.float64) - value.astype(np.float64)).max(initial=0))
        assert difference <= tolerances[key], (
            f"{key}: max difference {difference:.3g} > {tolerances[key]:.3g} (drift_tolerances, float64_tolerances)"
        )
        worst = max(worst, difference / tolerances[key])
    return worst


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convolutions with BatchNorm, plus the input (or its
    ``downsample``) added before the last ReLU. Attribute names give torchvision's ``state_dict`` keys."""

    def __init__(self, in_planes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18()`` written out in plain PyTorch (torchvision itself is not a dependency):
    the same module names, shapes, initialisation and forward, for ``in_channels`` x H x W inputs."""

    def __init__(self, num_classes=1000, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, stride=1)
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    @staticmethod
    def _stage(in_planes, planes, stride):
        """torchvision's ``_make_layer`` for two BasicBlocks; the first downsamples when the shape changes."""
        downsample = None
        if stride != 1 or in_planes != planes:
            downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        return nn.Sequential(BasicBlock(in_planes, planes, stride, downsample), BasicBlock(planes, planes))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class GarmentClassifier(nn.Module):
    """The LeNet of PyTorch's "Training with PyTorch" tutorial (``unitrain.lenet()``'s twin), for 1x28x28 input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def leaf_cases():
    """Every leaf layer, each in a small trainable network, with its hand-written ``torch.nn`` twin:
    ``{name: (spec, torch module, per-sample input shape)}``. A convolution (images) or a linear layer
    (vectors) in front gives the leaf trainable inputs; a linear head maps to 3 classes."""
    image, vector = (2, 7, 7), (6,)
    image_leaves = {
        "conv2d_tuple_args": (ut.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                              nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
        "conv2d_depthwise": (ut.Conv2d(4, 4, 3, groups=4, bias=False), nn.Conv2d(4, 4, 3, groups=4, bias=False)),
        "conv2d_groups_dilation": (ut.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
                                   nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)),
        "maxpool2d_padding": (ut.MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(3, stride=2, padding=1)),
        "avgpool2d_padding": (ut.AvgPool2d(3, stride=2, padding=1), nn.AvgPool2d(3, stride=2, padding=1)),
        "avgpool2d_exclude_pad": (ut.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
                                  nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)),
        "avgpool2d_default_stride": (ut.AvgPool2d(2), nn.AvgPool2d(2)),
        "adaptiveavgpool2d_1": (ut.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)),
        "adaptiveavgpool2d_3x2": (ut.AdaptiveAvgPool2d((3, 2)), nn.AdaptiveAvgPool2d((3, 2))),
        "layernorm_chw": (ut.LayerNorm((4, 7, 7)), nn.LayerNorm((4, 7, 7))),
        "softmax_channels": (ut.Softmax(dim=1), nn.Softmax(dim=1)),
        "logsoftmax_last": (ut.LogSoftmax(dim=-1), nn.LogSoftmax(dim=-1)),
        "convtranspose2d_output_padding": (ut.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
                                           nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)),
        "convtranspose2d_tuple_groups_dilation": (
            ut.ConvTranspose2d(4, 6, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
            nn.ConvTranspose2d(4, 6, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2))),
        "convtranspose2d_output_padding_beyond_stride": (
            ut.ConvTranspose2d(4, 4, 3, output_padding=1, dilation=2),
            nn.ConvTranspose2d(4, 4, 3, output_padding=1, dilation=2)),
        "upsample_nearest_double": (ut.Upsample(scale_factor=2), nn.Upsample(scale_factor=2)),
        "upsample_nearest_fractional": (ut.Upsample(scale_factor=(1.7, 0.6)), nn.Upsample(scale_factor=(1.7, 0.6))),
        "upsample_nearest_size": (ut.Upsample(size=(10, 5)), nn.Upsample(size=(10, 5))),
        "upsample_bilinear": (ut.Upsample(scale_factor=2, mode="bilinear"),
                              nn.Upsample(scale_factor=2, mode="bilinear")),
        "upsample_bilinear_fractional": (ut.Upsample(scale_factor=1.7, mode="bilinear"),
                                         nn.Upsample(scale_factor=1.7, mode="bilinear")),
        "upsample_bilinear_align_corners": (ut.Upsample(size=(9, 12), mode="bilinear", align_corners=True),
                                            nn.Upsample(size=(9, 12), mode="bilinear", align_corners=True)),
        "flatten_channels_rows": (ut.Flatten(1, 2), nn.Flatten(1, 2)),
        "flatten_from_rows": (ut.Flatten(start_dim=-2), nn.Flatten(start_dim=-2)),
    }  # fmt: skip
    vector_leaves = {
        "identity": (ut.Identity(), nn.Identity()),
        "tanh": (ut.Tanh(), nn.Tanh()),
        "sigmoid": (ut.Sigmoid(), nn.Sigmoid()),
        "gelu": (ut.GELU(), nn.GELU()),
        "gelu_tanh": (ut.GELU(approximate="tanh"), nn.GELU(approximate="tanh")),
        "leakyrelu": (ut.LeakyReLU(0.2), nn.LeakyReLU(0.2)),
        "silu": (ut.SiLU(), nn.SiLU()),
        "elu": (ut.ELU(alpha=0.5), nn.ELU(alpha=0.5)),
        "softmax": (ut.Softmax(dim=1), nn.Softmax(dim=1)),
        "logsoftmax": (ut.LogSoftmax(dim=-1), nn.LogSoftmax(dim=-1)),
        "layernorm": (ut.LayerNorm(5), nn.LayerNorm(5)),
        "layernorm_no_affine": (ut.LayerNorm(5, eps=1e-3, elementwise_affine=False),
                                nn.LayerNorm(5, eps=1e-3, elementwise_affine=False)),
    }  # fmt: skip
    cases = {}
    for leaves, shape, spec_front, torch_front in [
        (image_leaves, image, ut.Conv2d(2, 4, 3, padding=1), lambda: nn.Conv2d(2, 4, 3, padding=1)),
        (vector_leaves, vector, ut.Linear(6, 5), lambda: nn.Linear(6, 5)),
    ]:
        for name, (spec_leaf, torch_leaf) in leaves.items():
            features = int(np.prod(ut.Sequential(spec_front, spec_leaf).output_shape(shape)))
            spec = ut.Sequential(spec_front, spec_leaf, ut.Flatten(), ut.Linear(features, 3))
            twin = nn.Sequential(torch_front(), torch_leaf, nn.Flatten(), nn.Linear(features, 3))
            cases[name] = (spec, twin, shape)
    return cases


def random_batches(shape, classes, count, batch_size=4, seed=SEED):
    """``count`` batches of standard-normal float32 inputs (per-sample ``shape``), int64 labels below ``classes``."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((batch_size, *shape)).astype(np.float32), rng.integers(0, classes, batch_size))
        for _ in range(count)
    ]


def largest_sample_share(model, optimizer, batches):
    """Trains ``model`` (float64, Linear layers) on ``batches``; returns the largest element of one
    sample's share of any step's mean-loss gradient. A Linear layer's weight gradient from one sample is
    the outer product of the gradient at its output (already divided by the batch size) and its input,
    so the largest element is their two largest magnitudes multiplied (the bias: the first alone)."""
    seen = []

    def record(_, args, out):
        out.retain_grad()
        seen.append((args[0].detach(), out))

    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(record)
    largest = 0.0
    for x, y in batches:
        seen.clear()
        optimizer.zero_grad()
        F.cross_entropy(model(torch.from_numpy(x).double()), torch.from_numpy(y)).backward()
        optimizer.step()
        for inputs, out in seen:
            per_sample = out.grad.abs().amax(1) * torch.clamp(inputs.flatten(1).abs().amax(1), min=1)
            largest = max(largest, float(per_sample.max()))
    return largest


#: float32's unit roundoff: one rounding moves a value by at most this fraction of it
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


class RoundingModel:
    """A CPU-independent model of how far float32 rounding can move each value of a forward pass.

    Float32 results differ between CPUs (BLAS and oneDNN pick their summation order per CPU), so a
    premise such as "no ReLU input within rounding of zero" cannot be measured with the CPU's own float32:
    it would hold on one CPU and not on another. Instead, ``model`` runs in float64 (exact to 1e-16, nine
    orders below what is modelled, on any CPU) ``runs`` times, each time with rounding errors drawn from
    a seeded normal distribution injected where a float32 forward rounds, at the size the standard
    probabilistic model of rounding gives them (each rounding a relative error of variance u²/3):

    * a dot product of ``n`` terms ``t_j`` summed one after the other errs by ``sum_i s_i d_i`` over its
      partial sums ``s_i``: variance ``u²/3 sum_i s_i²``, which ``n (sum_j t_j² + y²)`` bounds for a
      random walk of partial sums drifting to ``y`` (blocked, SIMD or pairwise orders, as BLAS and oneDNN
      use, err less);
    * BatchNorm's batch mean and variance are sums over the batch and the spatial positions (``m``
      values): the same model gives each channel a shift of its normalised output (mean) and a relative
      change of its scale (variance), common to the whole channel, plus one rounding per element;
    * a ReLU's input (an addition in residual blocks) is rounded once more.

    The spread of a value over the runs is then its rounding scale ``sigma``. Measured against PyTorch's
    own float32 on an AMD EPYC, ResNet-18's largest float32 error over all its ReLU inputs (about 10^5 of
    them) was 2.2 to 3.3 sigma for 8 seeds: the model does not understate rounding there, and a premise
    asked to hold at ``MARGIN`` sigma keeps nearly a factor of two beyond that for CPUs whose order is worse.
    """

    MARGIN = 6.0

    def __init__(self, model: nn.Module, x: torch.Tensor, runs: int = 16):
        model = copy.deepcopy(model).double()
        self.exact = self._forward(model, x.double(), None)
        self.noisy = [self._forward(model, x.double(), torch.Generator().manual_seed(run)) for run in range(runs)]

    @staticmethod
    def _forward(model, x, generator):
        """The inputs of every ReLU and MaxPool2d call, in call order, with rounding drawn from ``generator``."""
        u, seen, handles = FLOAT32_UNIT_ROUNDOFF, [], []

        def normal(shape, like):
            return torch.randn(shape, generator=generator, dtype=like.dtype)

        def dot_products(layer, inputs, output):
            (x,) = inputs
            if isinstance(layer, nn.Conv2d):
                geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
                squares = F.conv2d(x**2, layer.weight**2, None, *geometry)
            else:
                squares = F.linear(x**2, layer.weight**2)
            n = layer.weight[0].numel()
            return output + u * torch.sqrt(n * (squares + output**2) / 3) * normal(output.shape, output)

        def batch_norm(layer, inputs, output):
            (x,) = inputs
            axes = (0, *range(2, x.dim()))
            m = x.numel() // x.shape[1]
            mean, std = x.mean(axes, keepdim=True), x.std(axes, keepdim=True, unbiased=False)
            channel = [1] * x.dim()
            channel[1] = x.shape[1]
            shift = u / 3**0.5 * torch.sqrt(m * mean**2 / (3 * std**2) + 0.5)
            scale = u / 3**0.5 * (m / 3 + 0.5) ** 0.5
            gamma, beta = layer.weight.view(channel), layer.bias.view(channel)
            output = output + gamma * shift * normal(channel, output)
            output = output + (output - beta) * scale * normal(channel, output)
            return output + u * output.abs() * normal(output.shape, output)

        def record(layer, inputs):
            (x,) = inputs
            if generator is not None and isinstance(layer, nn.ReLU):
                x = x + u / 3**0.5 * x.abs() * normal(x.shape, x)
            seen.append((layer, x.detach().clone()))
            return (x,)

        for layer in model.modules():
            if generator is not None and isinstance(layer, (nn.Conv2d, nn.Linear)):
                handles.append(layer.register_forward_hook(dot_products))
            elif generator is not None and isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
                handles.append(layer.register_forward_hook(batch_norm))
            if isinstance(layer, (nn.ReLU, nn.MaxPool2d)):
                handles.append(layer.register_forward_pre_hook(record))
        with torch.no_grad():
            model(x)
        for handle in handles:
            handle.remove()
        return seen

    def margins(self):
        """(name, call index, margin in sigma) of each ReLU and MaxPool2d call: how many rounding scales
        its closest decision lies from flipping. A ReLU decides on the sign of its input; a max pool on
        which element of a window is largest (windows whose largest element is not positive carry no
        gradient through the ReLU before them and are left out)."""
        for index, (layer, exact) in enumerate(self.exact):
            noisy = torch.stack([run[index][1] for run in self.noisy])
            if isinstance(layer, nn.ReLU):
                distance, spread = exact.abs(), noisy.std(0)
            else:
                distance, spread = self._max_pool_gaps(layer, exact, noisy)
            yield type(layer).__name__, index, float((distance / spread.clamp_min(1e-300)).min())

    @staticmethod
    def _max_pool_gaps(layer, exact, noisy):
        """Each window's gap between its two largest elements, and the spread of that gap over the runs."""

        def windows(x):
            padded = F.pad(x, (layer.padding,) * 4, value=-torch.inf) if layer.padding else x
            columns = F.unfold(padded, layer.kernel_size, layer.dilation, 0, layer.stride)
            return columns.view(x.shape[0], x.shape[1], -1, columns.shape[-1])  # (N, C, window, L)

        top = windows(exact).topk(2, dim=2)
        largest = top.values[:, :, 0] > 0
        gaps = torch.stack([windows(run).gather(2, top.indices).diff(dim=2).squeeze(2).neg() for run in noisy])
        distance = (top.values[:, :, 0] - top.values[:, :, 1])[largest]
        return distance, gaps.std(0)[largest]
