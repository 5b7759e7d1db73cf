"""unitrain: one training loop, four deep-learning backends (PyTorch, MindSpore, Chainer, NumPy).

Importing this package imports no framework; only the backend that is asked for does.
"""

from .data import ArrayDataset, load_mnist
from .layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
    cnn,
    mlp,
)  # fmt: skip
from .loop import TrainingLoop
from .losses import CrossEntropyLoss, MSELoss, NLLLoss
from .optim import SGD, Adam, AdamW
from .registry import available_backends, get_backend, make_loop
from .weights import init_weights

__version__ = "0.1.0"

__all__ = [
    "SGD", "Adam", "AdamW", "ArrayDataset", "BatchNorm1d", "BatchNorm2d", "Conv2d",
    "CrossEntropyLoss", "Dropout", "Flatten", "Linear", "MSELoss", "MaxPool2d", "NLLLoss", "ReLU",
    "Sequential", "TrainingLoop", "available_backends", "cnn", "get_backend", "init_weights",
    "load_mnist", "make_loop", "mlp",
]  # fmt: skip
