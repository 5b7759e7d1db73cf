"""Framework-neutral layer specs.

A spec describes a layer; it holds no weights. Each backend builds the native equivalent
(``torch.nn.Linear``, ``mindspore.nn.Dense``, ``chainer.links.Linear``, NumPy arrays).
Class names, argument names, defaults and equations are PyTorch's, and a model's weight
names are exactly the ``state_dict`` keys and shapes of the equivalent ``torch.nn`` model.

A model is a tree: containers (:class:`Sequential`, :class:`Residual`) whose leaves are
layers. Backends build the tree recursively, so a residual add happens where the spec puts it.
Pair arguments (``kernel_size``, ``stride``, ...) accept an int or a 2-tuple and are stored
as ``(h, w)`` tuples.

Shape inference (:meth:`Layer.output_shape`) lets the core reject a batch or a model that
does not fit, before any framework sees it, with a message naming the layer's dotted path.

The package holds one module per family, as Keras' layers are grouped: ``base`` (:class:`Layer`),
``core`` (Linear, Identity), ``convolutional``, ``pooling``, ``normalization``, ``activations``,
``reshaping`` (Flatten, Upsample), ``regularization`` (Dropout), ``containers`` and ``presets``;
every name is imported from here. The sequence layers are :mod:`unitrain.sequences`.
"""

from __future__ import annotations

from .activations import ELU, GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, SiLU, Softmax, Tanh
from .base import Layer, Pair, Shape
from .base import _positive_int as _positive_int
from .containers import (
    INIT_SCHEMES,
    MAX_LAYERS,
    MAX_NESTING,
    Container,
    Residual,
    Sequential,
    check_buildable,
    check_init,
)
from .containers import _trace as _trace
from .convolutional import Conv2d, ConvTranspose2d
from .core import Identity, Linear
from .normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from .normalization import _BatchNorm as _BatchNorm
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .presets import (
    FACTORY_PATTERN,
    MODEL_PATTERN,
    PRESETS,
    cnn,
    lenet,
    mlp,
    mnist_resnet18,
    model_from_name,
    preset,
    resnet18,
)
from .regularization import Dropout
from .reshaping import UPSAMPLE_MODES, Flatten, Upsample

__all__ = [
    "ELU",
    "FACTORY_PATTERN",
    "GELU",
    "INIT_SCHEMES",
    "MAX_LAYERS",
    "MAX_NESTING",
    "MODEL_PATTERN",
    "PRESETS",
    "UPSAMPLE_MODES",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Container",
    "Conv2d",
    "ConvTranspose2d",
    "Dropout",
    "Flatten",
    "Identity",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MaxPool2d",
    "Pair",
    "ReLU",
    "Residual",
    "Sequential",
    "Shape",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "Upsample",
    "check_buildable",
    "check_init",
    "cnn",
    "lenet",
    "mlp",
    "mnist_resnet18",
    "model_from_name",
    "preset",
    "resnet18",
]
