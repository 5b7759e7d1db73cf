"""unitrain: one training loop, four deep-learning backends (PyTorch, MindSpore, Chainer, NumPy).

Importing this package imports no framework; only the backend that is asked for does. Its names
load on first use (PEP 562), so that the ``unitrain`` command handles Ctrl-C before NumPy loads:
when this process is the command, its signal handling starts here, the first of its code to run.
"""

# first, before anything else is read: the command's handlers (unitrain.signals imports only what
# the interpreter has loaded already), so that a signal during start-up ends it in one line
from . import signals as _signals

if _signals.is_the_command():
    _signals.exit_at_once()

import importlib

__version__ = "0.1.0"

#: each public name and the submodule that defines it
_EXPORTS = {
    "ArrayDataset": "data", "load_mnist": "data", "load_dataset": "datasets", "load_datasets": "datasets",
    "ELU": "layers", "GELU": "layers", "AdaptiveAvgPool2d": "layers", "AvgPool2d": "layers",
    "BatchNorm1d": "layers", "BatchNorm2d": "layers", "Conv2d": "layers", "ConvTranspose2d": "layers",
    "Dropout": "layers",
    "Flatten": "layers", "Identity": "layers", "LayerNorm": "layers", "LeakyReLU": "layers",
    "Linear": "layers", "LogSoftmax": "layers", "MaxPool2d": "layers", "ReLU": "layers",
    "Residual": "layers", "Sequential": "layers", "Sigmoid": "layers", "SiLU": "layers",
    "Softmax": "layers", "Tanh": "layers", "Upsample": "layers", "cnn": "layers", "lenet": "layers", "mlp": "layers",
    "resnet18": "layers",
    "EarlyStopping": "controls",
    "Graph": "graph", "Input": "graph", "from_torch": "backends.torch_import", "to_torch": "backends.torch_export",
    "Embedding": "sequences", "RNN": "sequences", "LSTM": "sequences", "GRU": "sequences", "Conv1d": "sequences",
    "MaxPool1d": "sequences", "AvgPool1d": "sequences", "AdaptiveAvgPool1d": "sequences",
    "MultiheadAttention": "attention", "PositionalEncoding": "attention", "TransformerEncoder": "attention",
    "TransformerEncoderLayer": "attention",
    "TrainingLoop": "loop",
    "BCELoss": "losses", "BCEWithLogitsLoss": "losses", "CrossEntropyLoss": "losses", "CustomLoss": "losses",
    "HuberLoss": "losses", "L1Loss": "losses", "MSELoss": "losses", "NLLLoss": "losses",
    "PerOutputLoss": "losses", "SmoothL1Loss": "losses",
    "SGD": "optim", "Adam": "optim", "AdamW": "optim", "RMSprop": "optim", "Adagrad": "optim", "Adadelta": "optim",
    "DataSpec": "run", "Run": "run", "load_recipe": "run", "Job": "job",
    "available_backends": "registry", "get_backend": "registry", "make_loop": "registry",
    "init_weights": "weights", "dialect": "dialects",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # a submodule not imported yet, as ``import unitrain`` used to import them all
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'unitrain' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
