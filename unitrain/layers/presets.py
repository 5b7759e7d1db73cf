"""The preset models (the tutorials' MLP, CNN, LeNet and ResNet-18) and models named by a user's
factory function."""

from __future__ import annotations

import importlib
import os
import re
import sys

from .activations import ReLU
from .base import _positive_int
from .containers import Container, Residual, Sequential, check_buildable
from .convolutional import Conv2d
from .core import Linear
from .normalization import BatchNorm2d
from .pooling import AdaptiveAvgPool2d, MaxPool2d
from .reshaping import Flatten


def mlp() -> Sequential:
    """The MindSpore beginner tutorial's network: 784-512-512-10."""
    return Sequential(Flatten(), Linear(784, 512), ReLU(), Linear(512, 512), ReLU(), Linear(512, 10))


def cnn() -> Sequential:
    """The CNN tutorial's LeNet-style network for 1x28x28 input."""
    return Sequential(
        Conv2d(1, 6, 5), ReLU(), MaxPool2d(2),
        Conv2d(6, 12, 5), ReLU(), MaxPool2d(2),
        Flatten(),
        Linear(192, 120), ReLU(), Linear(120, 60), ReLU(), Linear(60, 10),
    )  # fmt: skip


def lenet() -> Sequential:
    """LeNet-5 as PyTorch's "Training with PyTorch" tutorial's ``GarmentClassifier`` for
    1x28x28 input, with its ``state_dict`` names (``conv1``, ``conv2``, ``fc1``..``fc3``)."""
    return Sequential({
        "conv1": Conv2d(1, 6, 5), "relu1": ReLU(), "pool1": MaxPool2d(2, 2),
        "conv2": Conv2d(6, 16, 5), "relu2": ReLU(), "pool2": MaxPool2d(2, 2),
        "flatten": Flatten(),
        "fc1": Linear(16 * 4 * 4, 120), "relu3": ReLU(),
        "fc2": Linear(120, 84), "relu4": ReLU(),
        "fc3": Linear(84, 10),
    })  # fmt: skip


def _basic_block(in_planes: int, planes: int, stride: int) -> Residual:
    """torchvision's ``BasicBlock``: two 3x3 convs with BatchNorm, a 1x1-conv downsample
    when the shape changes, ReLU after the add."""
    body = Sequential({
        "conv1": Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False), "bn1": BatchNorm2d(planes),
        "relu": ReLU(),
        "conv2": Conv2d(planes, planes, 3, padding=1, bias=False), "bn2": BatchNorm2d(planes),
    })  # fmt: skip
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = Sequential(Conv2d(in_planes, planes, 1, stride=stride, bias=False), BatchNorm2d(planes))
    return Residual(body, downsample, ReLU())


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> Sequential:
    """torchvision's ``resnet18()``: the same module names, shapes, forward and
    initialisation scheme (``init="resnet"``), so its ``state_dict`` loads unchanged.
    Input size rule: any H, W >= 1; each stride-2 step (stem conv, max pool, layers 2-4)
    takes a size to ``ceil(size / 2)``, so the last stage sees ``ceil(H / 32)``: 224 gives
    7x7, MNIST's 28x28 gives 1x1 (BatchNorm training there needs batches of 2 or more)."""
    _positive_int("resnet18", "num_classes", num_classes)
    _positive_int("resnet18", "in_channels", in_channels)
    stages, in_planes = {}, 64
    for index, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        stages[f"layer{index}"] = Sequential(_basic_block(in_planes, planes, stride), _basic_block(planes, planes, 1))
        in_planes = planes
    return Sequential(
        {
            "conv1": Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            "bn1": BatchNorm2d(64),
            "relu": ReLU(),
            "maxpool": MaxPool2d(3, stride=2, padding=1),
            **stages,
            "avgpool": AdaptiveAvgPool2d(1),
            "flatten": Flatten(),
            "fc": Linear(512, num_classes),
        },
        init="resnet",
    )


def mnist_resnet18() -> Sequential:
    """``--model resnet18``: ResNet-18 for 1x28x28 images and 10 classes."""
    return resnet18(num_classes=10, in_channels=1)


PRESETS = {"mlp": mlp, "cnn": cnn, "lenet": lenet, "resnet18": mnist_resnet18}


def preset(name: str) -> Sequential:
    """A new spec of the preset ``name`` (``mlp``, ``cnn``, ``lenet``, ``resnet18``); ValueError naming the presets."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(PRESETS)}") from None


#: ``package.module:function``, a user's function that returns a model spec
FACTORY_PATTERN = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*"
#: what a run may name as its model: a preset or a factory (checkpoints record it)
MODEL_PATTERN = "|".join([*map(re.escape, PRESETS), FACTORY_PATTERN])


def model_from_name(name: str) -> Container:
    """The model ``name`` names: a :data:`PRESETS` name, or ``package.module:function``, a
    function importable with the current directory first on ``sys.path`` (as ``python -m``
    has it) that takes no arguments and returns a :class:`Container`, or a ``torch.nn.Module``
    as ``(module, example_inputs)`` or with an ``example_input_array``, which
    ``unitrain.from_torch`` imports. ``ValueError`` (one line, naming ``name``) for anything else."""
    from .. import dialects
    from ..built_models import BUILT

    built, key = BUILT.get(), (name, dialects.current().name)
    if built is not None and key in built:
        return built[key]
    model = _model_from_name(name)
    if built is not None:
        built[key] = model
    return model


def _model_from_name(name: str) -> Container:
    if name in PRESETS:
        return preset(name)
    expected = f"one of {', '.join(PRESETS)} or package.module:function returning a unitrain model spec"
    if not re.fullmatch(FACTORY_PATTERN, name):
        raise ValueError(f"unknown model {name!r}; expected {expected}")
    module_name, function_name = name.split(":")
    here = os.getcwd()
    sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # the user's module may raise anything on import, or exit
        reason = _one_line(error) if isinstance(error, Exception) else f"importing it {_what_happened(error)}"
        raise ValueError(f"model {name!r}: cannot import {module_name}: {reason}") from None
    finally:
        sys.path.remove(here)
    function = getattr(module, function_name, None)
    if not callable(function):
        found = "has no attribute" if function is None else f"has a {type(function).__name__}, not a function, named"
        raise ValueError(f"model {name!r}: module {module_name} {found} {function_name!r}; expected {expected}")
    try:
        model = function()
    except (Exception, SystemExit) as error:  # the user's code: an exit would end unitrain unexplained
        raise ValueError(f"model {name!r}: {function_name}() {_what_happened(error)}") from None
    if _is_torch_model(model):  # the user's code imported torch already: trace it into a Graph
        from ..backends.torch_import import imported_model

        model = imported_model(model, name)
    if not isinstance(model, Container):
        raise ValueError(f"model {name!r}: {function_name}() returned {type(model).__name__}, expected a unitrain "
                         "model spec (a unitrain.layers Container such as Sequential)")  # fmt: skip
    try:
        check_buildable(model)
    except ValueError as error:
        raise ValueError(f"model {name!r}: {error}") from None
    return model


def _is_torch_model(value) -> bool:
    """A ``torch.nn.Module``, or ``(module, example_inputs)``, without importing torch."""
    torch = sys.modules.get("torch")
    module = value[0] if isinstance(value, tuple) and value else value
    return torch is not None and isinstance(module, torch.nn.Module)


def _what_happened(error: BaseException) -> str:
    """The user's code's failure, for a message: ``raised ValueError: ...`` or ``called sys.exit(3)``."""
    return f"called sys.exit({error.code!r})" if isinstance(error, SystemExit) else f"raised {_one_line(error)}"


def _one_line(error: Exception) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 200 else text[:197] + "..."
