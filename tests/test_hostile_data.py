"""Hostile data files (the user's own datasets, and the .npz weights ``convert`` reads): odd zip
members, samples without pixels, images of unusual depth. Each is read correctly or refused in one
line naming the file, exit code 2; no pixel is silently changed."""

import struct
import zipfile

import numpy as np
import pytest
from PIL import Image
from test_hostile_runs import one_error_line, run_cli
from unitrain.conformance.tolerances import tolerance

from unitrain.data import DataError
from unitrain.datasets import load_datasets


def _digits(n, shape=(28, 28), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), np.uint8), np.arange(n) % 10


def _dataset_npz(path, shape=(28, 28)):
    (x_train, y_train), (x_test, y_test) = _digits(20, shape), _digits(10, shape, seed=1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _patched_members(path, *, flag_bits=None, method=None):
    """``path`` with every member's general-purpose flags or compression method rewritten, in its
    local header and in the central directory alike (as a zip tool that wrote them would)."""
    data = bytearray(path.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at >= 0:
            if flag_bits is not None:
                data[at + flags_at : at + flags_at + 2] = struct.pack("<H", flag_bits)
            if method is not None:
                data[at + flags_at + 2 : at + flags_at + 4] = struct.pack("<H", method)
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))
    return path


ODD_MEMBERS = [
    ({"flag_bits": 0x1}, "is encrypted; expected the unencrypted arrays numpy.savez writes"),
    ({"method": 99}, "is compressed with zip method 99; expected stored or deflated"),
    ({"method": zipfile.ZIP_BZIP2}, "is compressed with zip method 12; expected stored or deflated"),
]


@pytest.mark.parametrize(("patch", "expected"), ODD_MEMBERS, ids=["encrypted", "method 99", "bzip2"])
def test_an_npz_dataset_with_odd_zip_members_is_one_line(tmp_path, capsys, patch, expected):
    data = _patched_members(_dataset_npz(tmp_path / "d.npz"), **patch)
    status, _, err = run_cli(capsys, "train", "--dataset", str(data), "--no-progress")
    assert status == 2
    one_error_line(err, f"{data}: member ")
    assert expected in err


@pytest.mark.parametrize(("patch", "expected"), ODD_MEMBERS, ids=["encrypted", "method 99", "bzip2"])
def test_an_npz_to_convert_with_odd_zip_members_is_one_line(tmp_path, capsys, patch, expected):
    weights = tmp_path / "w.npz"
    np.savez(weights, **{"0/W": np.zeros((4, 4), np.float32)})
    _patched_members(weights, **patch)
    status, _, err = run_cli(capsys, "convert", str(weights), str(tmp_path / "w.safetensors"))
    assert status == 2
    one_error_line(err, "member '0/W.npy'")
    assert expected in err
    assert not (tmp_path / "w.safetensors").exists()


def _idx(array):
    return struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_samples_without_pixels_are_refused_in_one_line(tmp_path, capsys):
    npz = _dataset_npz(tmp_path / "d.npz", shape=(0, 28))
    idx = tmp_path / "idx"
    idx.mkdir()
    for prefix in ("train", "t10k"):
        (idx / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(np.zeros((100, 0, 28), np.uint8)))
        (idx / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(np.zeros(100, np.uint8)))
    for data, model in ((npz, "mlp"), (idx, "mlp"), (idx, "cnn")):
        status, _, err = run_cli(capsys, "train", "--dataset", str(data), "--model", model, "--no-progress")
        assert status == 2
        one_error_line(err, f"{data}: samples of shape 1x0x28 (channels x height x width) hold no pixels")


def _save_image(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_16_bit_grayscale_images_are_read_at_full_depth(tmp_path):
    """Pillow opens them in mode I;16, which its ``convert`` clips to 255: every pixel above 255
    would have come out white."""
    rng = np.random.default_rng(0)
    pixels = {(split, label, i): rng.integers(0, 65536, (6, 5), dtype=np.uint16)
              for split in ("train", "test") for label in ("a", "b") for i in range(2)}  # fmt: skip
    for (split, label, i), image in pixels.items():
        _save_image(tmp_path / split / label / f"{i}.png", image)
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode == "I;16"
    train, test = load_datasets(tmp_path, normalization=((0.0,), (1.0,)))
    for data, split in ((train, "train"), (test, "test")):
        expected = [pixels[split, label, i] / np.float32(65535) for label in ("a", "b") for i in range(2)]
        # a float32 quotient (or a float64 one rounded to float32) of values up to 1
        np.testing.assert_allclose(data.x[:, 0], np.array(expected, np.float32), rtol=0, atol=tolerance(np.float32, 2))
    _save_image(tmp_path / "train" / "a" / "8bit.png", np.full((6, 5), 255, np.uint8))  # white: 1.0 either way
    train, _ = load_datasets(tmp_path, normalization=((0.0,), (1.0,)))
    assert train.x[2].min() == 1.0


def test_images_that_no_scale_maps_to_pixels_are_refused(tmp_path, capsys):
    _save_image(tmp_path / "train" / "a" / "0.png", np.zeros((6, 5), np.uint16))
    _save_image(tmp_path / "train" / "a" / "1.tif", np.zeros((6, 5), np.float32))
    _save_image(tmp_path / "test" / "a" / "0.png", np.zeros((6, 5), np.uint16))
    with pytest.raises(DataError, match=r"1.tif has mode F \(32-bit float pixels\); expected 8-bit"):
        load_datasets(tmp_path)
    _save_image(tmp_path / "train" / "a" / "1.tif", np.zeros((6, 5, 3), np.uint8))
    status, _, err = run_cli(capsys, "train", "--dataset", str(tmp_path), "--no-progress")
    assert status == 2
    one_error_line(err, f"image {tmp_path / 'train' / 'a' / '0.png'} is 16-bit grayscale but ")
