import importlib.util

import pytest

import unitrain

BACKENDS = ["numpy", "torch", "mindspore", "chainer"]


def installed_backends():
    return [name for name in BACKENDS if importlib.util.find_spec(name) is not None]


@pytest.fixture(scope="session")
def mnist_train():
    return unitrain.load_mnist("train")


@pytest.fixture(scope="session")
def mnist_test():
    return unitrain.load_mnist("test")
