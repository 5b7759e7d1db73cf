import gzip
import shutil
import struct

import numpy as np
import pytest
from unitrain.conformance.tolerances import tolerance

from unitrain.data import MNIST_FILES, ArrayDataset, DataError, load_mnist, parse_idx


def test_packaged_mnist_is_the_real_one(mnist_train, mnist_test):
    assert mnist_train.x.shape == (60000, 1, 28, 28) and mnist_train.x.dtype == np.float32
    assert mnist_test.x.shape == (10000, 1, 28, 28) and mnist_test.y.dtype == np.int64
    # class counts from the data README: a check that the files are the originals
    assert np.bincount(mnist_train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(mnist_test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # (x/255 - 0.1307)/0.3081: a black pixel, a few float32 roundings from the exact value
    black = (0 - 0.1307) / 0.3081
    assert mnist_train.x.min() == pytest.approx(black, rel=0, abs=tolerance(np.float32, 3, abs(black)))
    # the overall statistics: 0.1307 and 0.3081 are the true ones rounded to 4 decimals, which moves the
    # normalised mean and std by at most 0.5e-4 / 0.3081; then one float32 rounding of each value and
    # float64 sums of the 47M values
    x = mnist_train.x
    allowed = 0.5e-4 / 0.3081 + tolerance(np.float32, 1, float(np.abs(x).max())) + tolerance(np.float64, x.size)
    mean = float(x.mean(dtype=np.float64))
    std = np.sqrt(float(np.square(x).mean(dtype=np.float64)) - mean**2)
    assert abs(mean) <= allowed and abs(std - 1) <= allowed


def _idx(dims, payload=None, magic=None):
    header = magic if magic is not None else struct.pack(">HBB", 0, 8, len(dims))
    data = payload if payload is not None else bytes(int(np.prod(dims)))
    return header + struct.pack(f">{len(dims)}I", *dims) + data


def test_parse_idx_reads_dimensions():
    array = parse_idx(_idx((2, 3), bytes(range(6))))
    assert array.shape == (2, 3) and array[1, 2] == 5


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "too short"),
        (_idx((2,), magic=b"\x00\x00\x0d\x01"), "bad magic number 0x00000d01"),
        (_idx((2,), magic=b"\x12\x34\x08\x01"), "bad magic number"),
        (struct.pack(">HBB", 0, 8, 3) + b"\x00\x00\x00\x02", "truncated header"),
        (_idx((4, 4), bytes(10)), "truncated: dimensions (4, 4) need 16 data bytes, found 10"),
        (_idx((2,), bytes(5)), "has trailing bytes"),
    ],
)
def test_parse_idx_rejects_malformed_files(data, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_idx(data, "file")


@pytest.fixture
def mnist_copy(tmp_path):
    """The packaged files, decompressed, in a folder the test may damage."""
    from unitrain.data import packaged_mnist_dir

    for stem in MNIST_FILES:
        with gzip.open(packaged_mnist_dir() / f"{stem}.gz") as src, open(tmp_path / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tmp_path


def test_data_dir_reads_raw_files(mnist_copy, mnist_test):
    test = load_mnist("test", mnist_copy)
    np.testing.assert_array_equal(test.x, mnist_test.x)
    np.testing.assert_array_equal(test.y, mnist_test.y)


def test_checksum_mismatch_is_reported(mnist_copy):
    path = mnist_copy / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[100] = (data[100] + 1) % 10
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 .* does not match the original MNIST file"):
        load_mnist("test", mnist_copy)


def test_truncated_file_is_reported(mnist_copy):
    path = mnist_copy / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated"):
        load_mnist("test", mnist_copy, verify=False)


def test_missing_files_and_directories(tmp_path):
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\(.gz\) not found"):
        load_mnist("test", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_mnist("test", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown MNIST split 'valid'"):
        load_mnist("valid")


def test_corrupt_gzip_is_reported(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="corrupt gzip data"):
        load_mnist("test", tmp_path)


def test_batches_cover_every_sample_once_and_keep_the_last_partial_batch():
    data = ArrayDataset(np.arange(10, dtype=np.float32)[:, None], np.arange(10))
    for shuffle in (False, True):
        batches = list(data.batches(4, shuffle=shuffle, seed=3, epoch=1))
        assert [len(x) for x, _ in batches] == [4, 4, 2]
        assert sorted(np.concatenate([y for _, y in batches]).tolist()) == list(range(10))
    assert data.num_batches(4) == 3


def test_batch_order_is_a_function_of_seed_and_epoch():
    data = ArrayDataset(np.zeros((100, 1), np.float32), np.arange(100))

    def order(seed, epoch):
        return np.concatenate([y for _, y in data.batches(16, shuffle=True, seed=seed, epoch=epoch)])

    np.testing.assert_array_equal(order(0, 0), order(0, 0))
    assert not np.array_equal(order(0, 0), order(1, 0))
    assert not np.array_equal(order(0, 0), order(0, 1))
    resumed = np.concatenate([y for _, y in data.batches(16, shuffle=True, seed=0, epoch=0, start=2)])
    np.testing.assert_array_equal(resumed, order(0, 0)[32:])


def test_unshuffled_batches_are_views(mnist_test):
    x, _ = next(mnist_test.batches(64))
    assert np.shares_memory(x, mnist_test.x)


def test_chainer_tutorial_split(mnist_train):
    train, valid = mnist_train.split(50000, seed=0)
    assert (len(train), len(valid)) == (50000, 10000)
    again, _ = mnist_train.split(50000, seed=0)
    np.testing.assert_array_equal(train.y, again.y)
    with pytest.raises(ValueError, match="split size must be in 0..60000"):
        mnist_train.split(70000)


@pytest.mark.parametrize("backend", ["numpy", "torch", "chainer", "mindspore"])
def test_fit_records_train_accuracy_of_its_own_steps_and_validation_metrics(backend, mnist_test):
    """``train_accuracy`` counts the argmax of the very forward passes the steps made: a
    tutorial-shaped loop from the same seed, counting its ``forward`` outputs read through
    ``to_numpy``, gets the same count exactly; ``val_*`` are ``evaluate`` on the split."""
    import unitrain

    pytest.importorskip(backend)
    train, val = mnist_test.subset(slice(0, 300)).split(200, seed=3)
    (record,) = unitrain.make_loop(backend, unitrain.mlp(), seed=0).fit(
        train, epochs=1, batch_size=32, val_data=val, eval_data=val
    )
    manual, correct = unitrain.make_loop(backend, unitrain.mlp(), seed=0), 0
    for x, y in train.batches(32, shuffle=True, seed=0, epoch=0):
        pred = manual.to_numpy(manual.forward(x))  # the weights the step's own forward pass sees
        assert isinstance(pred, np.ndarray) and pred.dtype == np.float32 and pred.shape == (len(x), 10)
        correct += int((pred.argmax(1) == y).sum())
        manual.step((x, y))
    assert record["train_accuracy"] == correct / len(train)
    assert (record["val_loss"], record["val_accuracy"]) == (record["test_loss"], record["test_accuracy"])
    assert record["val_accuracy"] == manual.evaluate(val)["accuracy"]
