"""Models of the recipes beside this file that no preset covers, as ``module:function`` factories
(run the recipes from the repository's root, where ``examples.recipes.nets`` imports)."""

from unitrain.graph import Graph, Input
from unitrain.layers import (
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
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


def dcgan_generator() -> Sequential:
    """examples/dcgan.py's generator (PyTorch's DCGAN tutorial scaled to 28x28; nz 100, ngf 16), its
    weights drawn as the tutorial's ``weights_init``: transposed convolutions N(0, 0.02), BatchNorm
    weights N(1, 0.02) and biases 0."""
    nz, ngf, conv, norm = 100, 16, "normal(std=0.02)", "normal(std=0.02, mean=1.0)"
    return Sequential(
        ConvTranspose2d(nz, ngf * 4, 7, 1, 0, bias=False, weight_init=conv), BatchNorm2d(ngf * 4, weight_init=norm),
        ReLU(),
        ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False, weight_init=conv),
        BatchNorm2d(ngf * 2, weight_init=norm), ReLU(),
        ConvTranspose2d(ngf * 2, 1, 4, 2, 1, bias=False, weight_init=conv), Tanh(),
    )  # fmt: skip


def dcgan_discriminator() -> Sequential:
    """examples/dcgan.py's discriminator (ndf 16), its weights drawn as the tutorial's
    ``weights_init``: convolutions N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    ndf, conv, norm = 16, "normal(std=0.02)", "normal(std=0.02, mean=1.0)"
    return Sequential(
        Conv2d(1, ndf, 4, 2, 1, bias=False, weight_init=conv), LeakyReLU(0.2),
        Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False, weight_init=conv), BatchNorm2d(ndf * 2, weight_init=norm),
        LeakyReLU(0.2),
        Conv2d(ndf * 2, 1, 7, 1, 0, bias=False, weight_init=conv), Sigmoid(),
    )  # fmt: skip


def vae_encoder() -> Graph:
    """``VAE.encode`` of PyTorch's examples/vae on 1x28x28 images: fc1 (784 -> 400), ReLU, then fc21
    and fc22 (400 -> 20), two outputs: ``mu`` and ``logvar``."""
    x = Input((1, 28, 28), name="x")
    fc1, fc21, fc22 = Linear(784, 400), Linear(400, 20), Linear(400, 20)
    h1 = fc1(x.flatten()).relu()
    return Graph(x, [fc21(h1), fc22(h1)], modules={"fc1": fc1, "fc21": fc21, "fc22": fc22})


def vae_decoder() -> Graph:
    """``VAE.decode``: fc3 (20 -> 400), ReLU, fc4 (400 -> 784), sigmoid, viewed as 1x28x28 images
    (the shape of the batch its reconstructions are compared with)."""
    z = Input((20,), name="z")
    fc3, fc4 = Linear(20, 400), Linear(400, 784)
    return Graph(z, fc4(fc3(z).relu()).sigmoid().reshape(-1, 1, 28, 28), modules={"fc3": fc3, "fc4": fc4})
