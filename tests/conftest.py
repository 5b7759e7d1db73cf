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


@pytest.fixture(scope="session")
def mnist_batches(mnist_train):
    """The first 50 unshuffled training batches of 64 (views into ``mnist_train``)."""
    return [batch for _, batch in zip(range(50), mnist_train.batches(64), strict=False)]


@pytest.fixture(scope="module")
def torch_single_thread():
    """For modules whose PyTorch references are small: PyTorch's thread pool only contends for a busy
    machine's cores (about 10x slower on two)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
