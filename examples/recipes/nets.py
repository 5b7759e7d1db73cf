"""Models of the recipes beside this file that no preset covers, as ``module:function`` factories
(run the recipes from the repository's root, where ``examples.recipes.nets`` imports)."""

from unitrain.layers import (
    AvgPool2d,
    Conv2d,
    Dropout,
    Flatten,
    Linear,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
)


def pytorch_mnist_net() -> Sequential:
    """``Net`` of PyTorch's official MNIST example (pytorch/examples, ``mnist/main.py``), with its
    ``state_dict`` keys: conv1, conv2, fc1, fc2 (the functional ReLUs, pooling, flatten and
    log-softmax become layers of their own)."""
    return Sequential({
        "conv1": Conv2d(1, 32, 3, 1), "relu1": ReLU(),
        "conv2": Conv2d(32, 64, 3, 1), "relu2": ReLU(),
        "pool": MaxPool2d(2), "dropout1": Dropout(0.25), "flatten": Flatten(),
        "fc1": Linear(9216, 128), "relu3": ReLU(), "dropout2": Dropout(0.5),
        "fc2": Linear(128, 10), "log_softmax": LogSoftmax(dim=1),
    })  # fmt: skip


def regressor() -> Sequential:
    """A two-hidden-layer MLP from the 8 features of ``regression.npz`` to its 2 targets."""
    return Sequential(Linear(8, 64), ReLU(), Linear(64, 64), ReLU(), Linear(64, 2))


def autoencoder() -> Sequential:
    """Keras' "simplest possible autoencoder" (784 -> 32 -> 784) on 28x28 images, whose outputs are
    the flattened image: ReLU code, linear decoder (the inputs are normalised, not in [0, 1])."""
    return Sequential(Flatten(), Linear(784, 32), ReLU(), Linear(32, 784))


def d2l_lenet() -> Sequential:
    """d2l.ai's LeNet (chapter "Convolutional Neural Networks (LeNet)"): sigmoid activations,
    average pooling, a padded first convolution for 28x28 input, and its ``init_cnn``: Xavier-uniform
    weights on every Conv2d and Linear (``nn.init.xavier_uniform_``), biases left at PyTorch's default."""
    return Sequential(
        Conv2d(1, 6, 5, padding=2), Sigmoid(), AvgPool2d(2, 2),
        Conv2d(6, 16, 5), Sigmoid(), AvgPool2d(2, 2), Flatten(),
        Linear(16 * 5 * 5, 120), Sigmoid(), Linear(120, 84), Sigmoid(), Linear(84, 10),
        init="xavier_uniform",
    )  # fmt: skip
