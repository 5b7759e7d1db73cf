import pickle

import numpy as np
import pytest

import unitrain
from unitrain.weights import WeightsError, check_state, init_weights, load_safetensors, save_safetensors


def test_init_weights_follow_pytorch_default_bounds_and_are_seeded():
    state = init_weights(unitrain.mlp(), seed=0)
    assert list(state) == list(unitrain.mlp().state_shapes())
    bound = 1 / np.sqrt(784)
    assert state["1.weight"].dtype == np.float32
    assert -bound <= state["1.weight"].min() and state["1.weight"].max() <= bound
    # uniform's std, within five standard errors of a sample's std: sqrt((kurtosis - 1) / 4n), kurtosis 1.8
    weight = state["1.weight"]
    assert weight.std() == pytest.approx(bound / np.sqrt(3), rel=5 * np.sqrt(0.8 / (4 * weight.size)))
    np.testing.assert_array_equal(state["5.bias"], init_weights(unitrain.mlp(), seed=0)["5.bias"])
    assert not np.array_equal(state["1.weight"], init_weights(unitrain.mlp(), seed=1)["1.weight"])


def test_batchnorm_state_has_pytorch_buffers():
    model = unitrain.Sequential(unitrain.Linear(4, 3), unitrain.BatchNorm1d(3))
    state = init_weights(model, seed=0)
    assert list(state) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
    ]  # fmt: skip
    assert state["1.num_batches_tracked"].dtype == np.int64 and state["1.running_var"].tolist() == [1, 1, 1]


def test_state_matches_torch_sequential_state_dict():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    native = nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 12, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(192, 120), nn.ReLU(), nn.Linear(120, 60), nn.ReLU(), nn.Linear(60, 10),
    )  # fmt: skip
    expected = {key: tuple(value.shape) for key, value in native.state_dict().items()}
    assert unitrain.cnn().state_shapes() == expected
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    spec = unitrain.Sequential(unitrain.Conv2d(1, 2, 3), unitrain.BatchNorm2d(2))
    assert list(spec.state_shapes()) == list(bn.state_dict())


def test_round_trip_and_interoperability_with_the_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = {**init_weights(unitrain.mlp(), 0), "count": np.array(7, np.int64), "f64": np.arange(3.0)}
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, state, {"format": "pt"})
    loaded, metadata = load_safetensors(ours)
    assert metadata == {"format": "pt"}
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    # the reference implementation reads our files and we read its files
    for key, value in safetensors_numpy.load_file(ours).items():
        np.testing.assert_array_equal(value, state[key])
    theirs = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file(state, theirs)
    for key, value in load_safetensors(theirs)[0].items():
        np.testing.assert_array_equal(value, state[key])


def test_torch_loads_our_weight_file_strictly(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "mlp.safetensors"
    save_safetensors(path, init_weights(unitrain.mlp(), 3))
    nn = torch.nn
    native = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                           nn.Linear(512, 10))  # fmt: skip
    native.load_state_dict(safetensors_torch.load_file(path), strict=True)
    np.testing.assert_array_equal(native[5].bias.detach().numpy(), init_weights(unitrain.mlp(), 3)["5.bias"])


def test_check_state_names_the_key_and_both_shapes():
    expected = unitrain.mlp().state_shapes()
    state = init_weights(unitrain.mlp(), 0)
    with pytest.raises(WeightsError, match=r"key '3.weight' has shape \(512, 10\), the model expects \(512, 512\)"):
        check_state(expected, {**state, "3.weight": np.zeros((512, 10), np.float32)})
    del state["5.bias"]
    with pytest.raises(WeightsError, match=r"missing keys \['5.bias'\]; unexpected keys \['extra'\]"):
        check_state(expected, {**state, "extra": np.zeros(1)})


def _valid_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)})
    return path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"", "is empty, expected a safetensors file"),
        (lambda data: data[:5], "header too small"),
        (lambda data: data[:-4], "file not fully covered"),
        (lambda data: data + b"\0" * 8, "file not fully covered"),
        (lambda data: b"\xff" * 8 + data[8:], "over unitrain's limit"),
        (lambda data: data[:8] + b"#" + data[9:], "invalid JSON in header"),
        (lambda data: pickle.dumps({"a": 1}), "looks like a pickle"),
        (lambda data: b"PK\x03\x04" + data, "looks like a pickle or torch.save archive"),
    ],
)
def test_malformed_files_are_rejected_with_a_reason(tmp_path, damage, message):
    path = _valid_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(WeightsError, match=message):
        load_safetensors(path)


def test_a_header_of_128_bytes_is_not_mistaken_for_a_pickle(tmp_path):
    """The header length is little-endian: 128 (mod 256) makes the first byte 0x80, pickle's marker."""
    path = tmp_path / "w.safetensors"
    for length in range(1, 300):
        state = {"k" * length: np.zeros(3, np.float32)}
        save_safetensors(path, state)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    tensors, _ = load_safetensors(path)
    assert list(tensors) == list(state)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors does not exist"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="is a directory"):
        load_safetensors(tmp_path)


def test_atomic_save_leaves_no_temporary_files_and_replaces_whole(tmp_path):
    path = _valid_file(tmp_path)
    save_safetensors(path, {"c": np.zeros(1, np.float32)})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert list(load_safetensors(path)[0]) == ["c"]
