"""unitrain: one training loop, four deep-learning backends (PyTorch, MindSpore, Chainer, NumPy).

Importing this package imports no framework; only the backend that is asked for does.
"""

from . import expr
from .data import ArrayDataset, load_mnist
from .layers import (
    ELU,
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Identity,
    LayerNorm,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
    cnn,
    lenet,
    mlp,
    resnet18,
)  # fmt: skip
from .loop import TrainingLoop
from .losses import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    CustomLoss,
    HuberLoss,
    L1Loss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
)  # fmt: skip
from .optim import SGD, Adam, AdamW
from .registry import available_backends, get_backend, make_loop
from .weights import init_weights

__version__ = "0.1.0"

__all__ = [
    "ELU", "GELU", "SGD", "Adam", "AdamW", "AdaptiveAvgPool2d", "ArrayDataset", "AvgPool2d",
    "BCEWithLogitsLoss", "BatchNorm1d", "BatchNorm2d", "Conv2d", "CrossEntropyLoss", "CustomLoss",
    "Dropout", "Flatten", "HuberLoss", "Identity", "L1Loss", "LayerNorm", "LeakyReLU", "Linear",
    "LogSoftmax", "MSELoss", "MaxPool2d", "NLLLoss", "ReLU", "Residual", "Sequential", "SiLU", "Sigmoid",
    "SmoothL1Loss", "Softmax", "Tanh", "TrainingLoop", "available_backends", "cnn", "expr",
    "get_backend", "init_weights", "lenet", "load_mnist", "make_loop", "mlp", "resnet18",
]  # fmt: skip
