import importlib.util
import os
from collections import Counter

import pytest

import unitrain  # loads nothing of NumPy or a framework yet

# Under pytest-xdist (scripts/test) each worker gets its share of the cores before any framework loads:
# PyTorch's, OpenBLAS's and the other pools size themselves to the whole machine, and two workers' pools
# on two cores contend (PyTorch ~10x slower per step). Subprocesses the tests start inherit it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist with a test file per worker (scripts/test), the files with the most ``slow``
    tests (minutes each) start first, then the others by their number of tests, so that no worker is
    left running a long file while the others have finished; each file's tests keep their order."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    slow, size = Counter(), Counter()
    for item in items:
        size[item.path] += 1
        slow[item.path] += item.get_closest_marker("slow") is not None
    items.sort(key=lambda item: (-slow[item.path], -size[item.path], str(item.path)))
