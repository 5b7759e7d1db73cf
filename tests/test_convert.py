"""`unitrain convert`: unitrain's weights to and from each framework's own file, and ONNX export.

Each framework's own loader reads what unitrain writes into the network a user of that framework
writes; a network trained by that framework's tutorial-style loop converts into unitrain and
evaluates as it did natively; round trips are bit for bit; hostile files end in one line."""

import importlib.util
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import installed_backends
from unitrain.conformance.tolerances import tolerance

from unitrain import convert, layers
from unitrain.cli import main
from unitrain.layers import (
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    LayerNorm,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
    SiLU,
    Upsample,
)  # fmt: skip
from unitrain.registry import get_backend
from unitrain.weights import WeightsError, init_weights, save_safetensors


def has(module):
    return importlib.util.find_spec(module) is not None


#: the extension of each framework's file, and the module that reads it
NATIVE = {"torch": ".pt", "mindspore": ".ckpt", "chainer": ".npz"}


def rich_model():
    """Every kind of layer that has weights, in every kind of container."""
    block = Residual(
        Sequential({"conv1": Conv2d(4, 4, 3, padding=1, bias=False), "bn1": BatchNorm2d(4), "relu": ReLU(),
                    "conv2": Conv2d(4, 4, 3, padding=1, groups=2), "bn2": BatchNorm2d(4)}),
        Sequential(Conv2d(4, 4, 1, bias=False), BatchNorm2d(4)),
        SiLU(),
    )  # fmt: skip
    return Sequential(
        {"stem": Conv2d(1, 4, 3, stride=2, padding=1), "bn": BatchNorm2d(4), "act": ReLU(), "block": block,
         "gap": AdaptiveAvgPool2d(7), "pool": AvgPool2d(3, stride=2, padding=1), "flat": Flatten(),
         "head": Sequential(Linear(64, 16), LayerNorm(16), BatchNorm1d(16), GELU(), Dropout(0.2),
                            Linear(16, 10, bias=False))}
    )  # fmt: skip


def resampling_model():
    """ConvTranspose2d, Upsample in each mode ONNX can index as PyTorch does, Flatten(start_dim, end_dim)."""
    return Sequential(
        Conv2d(1, 4, 3, stride=2, padding=1), ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1),
        ReLU(), ConvTranspose2d(4, 4, (3, 2), (2, 1), (1, 0), (1, 0), groups=2, bias=False, dilation=(1, 2)),
        Upsample(size=(20, 17), mode="bilinear"), Upsample(scale_factor=2), Conv2d(4, 4, 3, stride=3),  # 4x13x11
        Upsample(scale_factor=(1.5, 0.7), mode="bilinear", align_corners=True), Upsample(scale_factor=(2, 3),
        mode="bilinear"), Conv2d(4, 2, 5, stride=5), Flatten(1, 2), Flatten(), Linear(56, 10),
    )  # fmt: skip


def trained_state(model, seed=0):
    """init_weights with every tensor moved off its initial value, as after training."""
    rng = np.random.default_rng(seed)
    state = init_weights(model, seed)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(rng.integers(1, 1000), np.int64)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        else:
            state[key] = (value + rng.uniform(-0.5, 0.5, value.shape)).astype(np.float32)
    return state


def assert_identical(got, expected):
    assert list(got) == list(expected)  # state_dict order too
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key


# --- names ----------------------------------------------------------------------------------------


def test_names_follow_each_framework():
    mlp = layers.preset("mlp")
    assert convert.native_names(mlp, "torch")["1.weight"] == "1.weight"
    assert convert.native_names(mlp, "mindspore")["5.bias"] == "5.bias"  # a SequentialCell numbers every cell
    chainer = convert.native_names(mlp, "chainer")  # chainer.Sequential numbers its links only
    assert [chainer[f"{i}.weight"] for i in (1, 3, 5)] == ["0/W", "1/W", "2/W"]
    resnet = layers.preset("resnet18")
    ms = convert.native_names(resnet, "mindspore")
    assert ms["layer2.0.downsample.1.running_var"] == "layer2.0.downsample.1.moving_variance"
    assert ms["bn1.weight"] == "bn1.gamma" and ms["fc.weight"] == "fc.weight"
    ch = convert.native_names(resnet, "chainer")
    assert ch["layer2.0.downsample.1.running_mean"] == "layer2/0/downsample/1/avg_mean"
    assert ch["layer1.1.conv2.weight"] == "layer1/1/conv2/W" and ch["bn1.bias"] == "bn1/beta"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt", ".npz"])
def test_round_trips_are_exact(tmp_path, suffix):
    framework = {".pt": "torch", ".ckpt": "mindspore"}.get(suffix)
    if framework and not has(framework):
        pytest.skip(f"{framework} is not installed")
    model = rich_model()
    state = trained_state(model)
    save_safetensors(tmp_path / "w.safetensors", state)
    there = convert.convert(tmp_path / "w.safetensors", tmp_path / f"there{suffix}", model)
    back = convert.convert(there, tmp_path / "back.safetensors", model)
    assert_identical(convert.read(back, model), state)
    assert_identical(convert.read(there, model), state)


# --- each framework's loader, and its own trained network -----------------------------------------

SMALL = Sequential(Conv2d(1, 3, 3), BatchNorm2d(3), ReLU(), MaxPool2d(2), Flatten(), Linear(3 * 13 * 13, 10))
#: rounded operations behind one output: 9 (conv) + batchnorm and pooling + 507 (linear)
SMALL_CHAIN = 9 + 4 + 507


def native_torch():
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(507, 10))  # fmt: skip

    def train(batches):  # PyTorch's "Optimizing model parameters" tutorial loop
        optimizer, loss_fn = torch.optim.SGD(net.parameters(), lr=0.05), nn.CrossEntropyLoss()
        net.train()
        for x, y in batches:
            loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def predict(x):
        net.eval()
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    def save(path):
        torch.save(net.state_dict(), path)

    def load(path):  # what a PyTorch user runs on unitrain's file
        net.load_state_dict(torch.load(path, weights_only=True), strict=True)

    return train, predict, save, load


def native_mindspore():
    import mindspore as ms
    from mindspore import nn

    get_backend("mindspore")  # the adapter sets MindSpore's device, which must come before any tensor
    ms.set_seed(0)
    net = nn.SequentialCell([nn.Conv2d(1, 3, 3, pad_mode="valid", has_bias=True), nn.BatchNorm2d(3), nn.ReLU(),
                             nn.MaxPool2d(2, 2), nn.Flatten(), nn.Dense(507, 10)])  # fmt: skip

    def train(batches):  # MindSpore's beginner tutorial loop
        optimizer, loss_fn = nn.SGD(net.trainable_params(), 0.05), nn.CrossEntropyLoss()
        grad_fn = ms.value_and_grad(lambda x, y: loss_fn(net(x), y), None, optimizer.parameters)
        net.set_train()
        for x, y in batches:
            _, grads = grad_fn(ms.Tensor(x), ms.Tensor(y.astype(np.int32)))
            optimizer(grads)

    def predict(x):
        net.set_train(False)
        return net(ms.Tensor(x)).asnumpy()

    def save(path):
        ms.save_checkpoint(net, str(path))

    def load(path):
        not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(str(path)), strict_load=True)
        assert not_loaded == []

    return train, predict, save, load


def native_chainer():
    from unitrain.backends import chainer as adapter  # imports Chainer past its environment's quirks

    chainer, F, L = adapter.chainer, adapter.F, adapter.L

    class Net(chainer.ChainList):  # chainer.Sequential would misnumber its third link (see unitrain.convert)
        def __init__(self):
            super().__init__(L.Convolution2D(1, 3, 3), L.BatchNormalization(3), L.Linear(507, 10))

        def forward(self, x):
            conv, bn, fc = self
            return fc(F.max_pooling_2d(F.relu(bn(conv(x))), 2))

    net = Net()

    def train(batches):  # Chainer's "write a training loop" tutorial
        optimizer = chainer.optimizers.SGD(lr=0.05)
        optimizer.setup(net)
        with chainer.using_config("train", True):
            for x, y in batches:
                loss = F.softmax_cross_entropy(net(x), y)
                net.cleargrads()
                loss.backward()
                optimizer.update()

    def predict(x):
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            return net(x).array

    def save(path):
        chainer.serializers.save_npz(str(path), net)

    def load(path):
        chainer.serializers.load_npz(str(path), net, strict=True)

    return train, predict, save, load


@pytest.mark.parametrize("framework", list(NATIVE))
def test_native_network_converts_both_ways(tmp_path, framework, mnist_batches, mnist_test, torch_single_thread):
    """Train natively a few steps, save natively, convert into unitrain: evaluates as natively.
    Then unitrain writes the native file back and the framework's own loader reads it, bit for bit."""
    if not has(framework):
        pytest.skip(f"{framework} is not installed")
    train, predict, save, load = globals()[f"native_{framework}"]()
    train(mnist_batches[:5])
    x, y = mnist_test.x[:500], mnist_test.y[:500]
    native = predict(x)
    save(tmp_path / f"native{NATIVE[framework]}")

    loop = get_backend(framework)(SMALL)
    state = convert.read(convert.convert(tmp_path / f"native{NATIVE[framework]}", tmp_path / "u.safetensors", SMALL),
                         SMALL)  # fmt: skip
    loop.load_state_dict(state)
    ours = loop.predict(x)
    # The same framework's kernels on the same weights; allowed: float32 rounding along the chain
    np.testing.assert_allclose(ours, native, rtol=0, atol=tolerance(np.float32, SMALL_CHAIN, np.abs(native).max()))
    assert (ours.argmax(1) == native.argmax(1)).all()
    assert loop.evaluate((x, y))["num_correct"] == int((native.argmax(1) == y).sum())

    convert.convert(tmp_path / "u.safetensors", tmp_path / f"back{NATIVE[framework]}", SMALL)
    before = {key: value.copy() for key, value in state.items()}
    train(mnist_batches[5:6])  # move the native weights, so that loading must bring them back
    load(tmp_path / f"back{NATIVE[framework]}")
    assert (predict(x) == native).all()
    assert_identical(convert.read(tmp_path / f"back{NATIVE[framework]}", SMALL), before)


# --- ONNX -----------------------------------------------------------------------------------------


#: rounded operations behind one output, as SMALL_CHAIN counts them: each convolution's or Linear's terms
#: (in_channels / groups x kernel, or in_features), 4 per normalisation or smooth activation, a pool's window
ONNX_CHAINS = {
    # stem 9, block (conv1 36, conv2 18, shortcut 4, the add and SiLU), the pools' 4 and 9, Linear 64,
    # LayerNorm (a mean and a variance of 16), Linear 16; four BatchNorms and GELU
    "rich": 9 + 36 + 18 + 4 + 1 + 4 + 4 + 9 + 64 + 2 * 16 + 16 + 5 * 4,
    # conv 9, transposed convs 36 and 12, three bilinear resamplings of 4 terms, convs 36 and 100, Linear 56
    "resampling": 9 + 36 + 12 + 3 * 4 + 36 + 100 + 56,
    "lenet": 25 + 150 + 256 + 120 + 84,
}


@pytest.mark.skipif(not has("onnxruntime"), reason="the onnx extra is not installed")
@pytest.mark.parametrize("name", ["rich", "resampling", "lenet"])
def test_onnx_export_runs_as_unitrain(tmp_path, name, mnist_test):
    import onnxruntime

    model = {"rich": rich_model, "resampling": resampling_model}.get(name, lambda: layers.preset(name))()
    state = init_weights(model, 3) if name == "lenet" else trained_state(model)
    save_safetensors(tmp_path / "w.safetensors", state)
    if name == "lenet":  # through the command line
        assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "m.onnx"), "--model", name]) == 0
    else:
        convert.convert(tmp_path / "w.safetensors", tmp_path / "m.onnx", model)
    x = mnist_test.x[:200]
    loop = get_backend("numpy")(model)
    loop.load_state_dict(state)
    expected = loop.predict(x)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["output"], {"input": x})[0]
    # onnxruntime's float32 kernels and ours each lie within the conformance formula of the exact output
    allowed = 2 * tolerance(np.float32, ONNX_CHAINS[name], float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=allowed)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.ptp(expected.argmax(1)) > 0  # the weights discriminate: not one class everywhere


def test_onnx_is_export_only_and_unexportable_layers_are_named(tmp_path):
    model = Sequential(AdaptiveAvgPool2d(3), Flatten(), Linear(9, 2))  # 28 is not a multiple of 3
    save_safetensors(tmp_path / "w.safetensors", init_weights(model, 0))
    if has("onnx"):
        with pytest.raises(WeightsError, match=r"^0: ONNX has no adaptive pooling"):
            convert.convert(tmp_path / "w.safetensors", tmp_path / "m.onnx", model)
        assert not (tmp_path / "m.onnx").exists()
        fractional = Sequential(Upsample(scale_factor=1.5), Flatten(), Linear(42 * 42, 2))
        save_safetensors(tmp_path / "u.safetensors", init_weights(fractional, 0))
        with pytest.raises(WeightsError, match=r"^0: ONNX Resize cannot index as PyTorch does for Upsample\("):
            convert.convert(tmp_path / "u.safetensors", tmp_path / "m.onnx", fractional)
    with pytest.raises(WeightsError, match=r"IN .*m\.onnx: unknown extension '\.onnx', expected one of"):
        convert.read(tmp_path / "m.onnx", model)


#: a Sequential for 3x20x24 images, and a graph declaring that input; ``--model shapenets:...``
SHAPE_NETS = """
from unitrain.graph import Graph, Input
from unitrain.layers import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential

def sequential():
    return Sequential(Conv2d(3, 4, 3, padding=1), BatchNorm2d(4), ReLU(), MaxPool2d(2), Flatten(), Linear(480, 10))

def graph():
    image = Input((3, 20, 24), name="image")
    body = sequential()
    return Graph(image, body(image), modules={"body": body})

def two_inputs():
    a, b = Input((4,), name="a"), Input((4,), name="b")
    fc = Linear(4, 2)
    return Graph([a, b], fc(a + b), modules={"fc": fc})
"""


@pytest.fixture
def shape_nets(tmp_path, monkeypatch):
    """The current directory holds ``shapenets.py`` and each model's trained-looking weights."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "shapenets", raising=False)  # another test's directory had one
    (tmp_path / "shapenets.py").write_text(SHAPE_NETS)
    for name in ("sequential", "graph", "two_inputs"):
        save_safetensors(tmp_path / f"{name}.safetensors", trained_state(layers.model_from_name(f"shapenets:{name}")))
    yield tmp_path
    sys.modules.pop("shapenets", None)


@pytest.mark.skipif(not has("onnxruntime"), reason="the onnx extra is not installed")
def test_a_sequential_exports_to_onnx_on_the_input_shape_given(shape_nets, capsys):
    """A Sequential does not know its input's shape: --input-shape gives it (no batch dimension)."""
    import onnxruntime

    code, _, err = run(capsys, "sequential.safetensors", "m.onnx", "--model", "shapenets:sequential",
                       "--input-shape", "3,20,24")  # fmt: skip
    assert code == 0 and err == "", err
    model = layers.model_from_name("shapenets:sequential")
    state = convert.read(shape_nets / "sequential.safetensors", model)
    x = np.random.default_rng(0).standard_normal((64, 3, 20, 24)).astype(np.float32)
    session = onnxruntime.InferenceSession("m.onnx", providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("input", ["N", 3, 20, 24])]
    got = session.run(["output"], {"input": x})[0]
    for backend in installed_backends():  # each backend's own prediction (MindSpore's: one compile)
        loop = get_backend(backend)(model)
        loop.load_state_dict(state)
        expected = np.asarray(loop.predict(x))
        # conv 27 terms, BatchNorm 4, the pool's window 4, Linear 480: each side within the formula
        allowed = 2 * tolerance(np.float32, 27 + 4 + 4 + 480, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=allowed, err_msg=backend)
    assert np.ptp(expected.argmax(1)) > 0  # the weights discriminate: not one class everywhere
    # a graph declares its input: --input-shape may be left out, or repeat it
    for repeated in ([], ["--input-shape", "3,20,24"]):
        code, _, err = run(capsys, "graph.safetensors", "g.onnx", "--model", "shapenets:graph", "--overwrite",
                           *repeated)  # fmt: skip
        assert code == 0 and err == "", err
        graph = onnxruntime.InferenceSession("g.onnx", providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(graph.run(["output"], {"input": x})[0], expected, rtol=0, atol=allowed)


SHAPE_REFUSALS = {  # (model, IN's model, OUT, --input-shape) -> the line
    "not a shape": ("sequential", "m.onnx", "abc", "argument --input-shape: expected one sample's sizes without the "
                    "batch dimension, positive integers separated by commas such as 1,28,28, got 'abc'"),
    "a zero size": ("sequential", "m.onnx", "0,28", "got '0,28'"),
    "a negative size": ("sequential", "m.onnx", "-1", "got '-1'"),
    "a trailing comma": ("sequential", "m.onnx", "3,20,24,", "got '3,20,24,'"),
    "a shape the model cannot take": ("sequential", "m.onnx", "1,28,28", "--input-shape 1,28,28: 0: Conv2d("
                                      "in_channels=3"),
    "a shape its Linear cannot take": ("sequential", "m.onnx", "3,20,20", "--input-shape 3,20,20: 5: Linear("
                                       "in_features=480, out_features=10, bias=True) expects 480 input features "
                                       "per sample, got per-sample shape (400,)"),
    "one a graph does not declare": ("graph", "m.onnx", "3,24,20", "--input-shape 3,24,20 disagrees with the "
                                     "graph's declared input (image 3,20,24); leave --input-shape out"),
    "one for a graph of two inputs": ("two_inputs", "m.onnx", "4", "--input-shape 4 is one input's shape; the "
                                      "graph declares 2 inputs (a 4, b 4); leave --input-shape out"),
    "a format without one": ("sequential", "m.npz", "3,20,24", "--input-shape is for ONNX export (OUT .onnx); OUT "
                             "m.npz is a Chainer npz"),
}  # fmt: skip


@pytest.mark.parametrize("case", SHAPE_REFUSALS)
def test_a_bad_input_shape_is_one_line_and_writes_nothing(shape_nets, capsys, case):
    model, out, shape, message = SHAPE_REFUSALS[case]
    code, stdout, err = run(capsys, f"{model}.safetensors", out, "--model", f"shapenets:{model}",
                            "--input-shape", shape)  # fmt: skip
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("unitrain: error: ") and message in err, err
    assert "Traceback" not in err and not (shape_nets / out).exists()


def test_a_sequential_that_cannot_take_mnist_is_told_to_give_its_input_shape(shape_nets, capsys):
    code, _, err = run(capsys, "sequential.safetensors", "m.onnx", "--model", "shapenets:sequential")
    assert code == 2 and err.count("\n") == 1, err
    assert err.endswith("a Sequential declares no input shape and is exported on per-sample input 1,28,28 (MNIST's) "
                        "unless told: give its input's with --input-shape (input_shape= from Python), such as "
                        "3,32,32\n")  # fmt: skip
    assert not (shape_nets / "m.onnx").exists()


# --- the command line and hostile files -------------------------------------------------------------


def run(capsys, *args):
    code = main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_safetensors(path, init_weights(layers.preset("mlp"), 0))
    return path


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys, mlp_file):
    out = tmp_path / "out.npz"
    out.write_bytes(b"mine")
    code, _, err = run(capsys, mlp_file, out)
    assert code == 2 and err == f"unitrain: error: OUT {out} already exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == b"mine"
    code, stdout, err = run(capsys, mlp_file, out, "--overwrite")
    assert code == 0 and err == "" and f"wrote {out}" in stdout
    assert_identical(convert.read(out, layers.preset("mlp")), convert.read(mlp_file, layers.preset("mlp")))


def hostile_files(tmp_path):
    """name -> (file, the error it must end in)."""
    cases = {}
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"1.weight": Evil()}))
    cases["pickle that runs a command"] = (tmp_path / "evil.pt", r"is not a file torch\.load\(weights_only=True\) "
                                           r"reads: .*(posix\.system|Unsupported)")  # fmt: skip
    np.save(tmp_path / "object.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "object.npz", "w") as archive:
        archive.write(tmp_path / "object.npy", "0/W.npy")
    cases["npz holding objects"] = (tmp_path / "object.npz", r"'0/W' holds Python objects; unitrain never unpickles")
    with zipfile.ZipFile(tmp_path / "script.npz", "w") as archive:
        archive.writestr("run.py", "print('hi')")
    cases["npz with a non-array member"] = (tmp_path / "script.npz", r"members \['run\.py'\] are not \.npy arrays")
    with zipfile.ZipFile(tmp_path / "directory.npz", "w") as archive:
        for index in range(5000):  # bounded memory: refused from the zip's end record
            archive.writestr(f"{index}.npy", b"")
    cases["npz listing thousands of members"] = (tmp_path / "directory.npz", r"lists far more members than")
    np.save(tmp_path / "plain.npz", np.zeros(3))  # np.save writes .npy whatever the name
    (tmp_path / "plain.npz.npy").rename(tmp_path / "plain.npz")
    cases["an .npy file named .npz"] = (tmp_path / "plain.npz", r"is not an npz archive \(a zip file\)")
    (tmp_path / "garbage.ckpt").write_bytes(b"\x80\x04garbage" * 10)
    cases["garbage checkpoint"] = (tmp_path / "garbage.ckpt", r"is not a MindSpore checkpoint: Failed to read")
    with open(tmp_path / "huge.npz", "wb") as file:
        file.truncate(64 << 20)  # sparse: no disk used
    cases["file larger than the model"] = (tmp_path / "huge.npz", r"has 67108864 bytes, more than this model's")
    wrong = {f"{i}/{k}": np.zeros((2, 2), np.float32) for i in range(3) for k in "Wb"}
    np.savez(tmp_path / "shapes.npz", **wrong)
    cases["wrong shapes"] = (tmp_path / "shapes.npz", r"key '0/W' has shape \(2, 2\), the model expects \(512, 784\)")
    state = {key: np.zeros(shape, np.int32) for key, shape in layers.preset("mlp").state_shapes().items()}
    names = convert.native_names(layers.preset("mlp"), "chainer")
    np.savez(tmp_path / "ints.npz", **{names[key]: value for key, value in state.items()})
    cases["integer weights"] = (tmp_path / "ints.npz", r"key '0/W' has dtype I32, expected a floating dtype")
    return cases, marker


def test_hostile_files_end_in_one_line(tmp_path, capsys):
    cases, marker = hostile_files(tmp_path)
    for why, (path, message) in cases.items():
        if not has({".pt": "torch", ".ckpt": "mindspore"}.get(path.suffix, "numpy")):
            continue
        before = path.read_bytes()
        code, stdout, err = run(capsys, path, tmp_path / "out.safetensors")
        assert code == 2 and stdout == "", why
        assert err.count("\n") == 1 and err.startswith(f"unitrain: error: IN {path}"), (why, err)
        assert re.search(message, err), (why, err)
        assert path.read_bytes() == before and not (tmp_path / "out.safetensors").exists()
    assert not marker.exists()


@pytest.mark.skipif(not has("torch"), reason="torch is not installed")
def test_torch_files_that_are_not_a_state_dict(tmp_path, capsys):
    import torch

    model = layers.preset("mlp")
    state = {key: torch.zeros(shape) for key, shape in model.state_shapes().items()}
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "checkpoint.pt")
    code, _, err = run(capsys, tmp_path / "checkpoint.pt", tmp_path / "o.safetensors")
    assert code == 2 and "is a checkpoint of dictionaries (['model_state_dict']), expected a model's state_dict" in err
    torch.save({**state, "1.weight": state["1.weight"].bfloat16()}, tmp_path / "bf16.pt")
    code, _, err = run(capsys, tmp_path / "bf16.pt", tmp_path / "o.safetensors")
    assert code == 2 and "key '1.weight' has dtype bfloat16, expected a floating dtype" in err
    torch.save({**state, "1.bias": torch.full((512,), float("nan"))}, tmp_path / "nan.pt")
    code, _, err = run(capsys, tmp_path / "nan.pt", tmp_path / "o.safetensors")
    assert code == 2 and "tensor '1.bias' contains NaN or infinite values" in err


def test_core_imports_no_framework():
    """Reading and writing .safetensors and .npz (Chainer's layout) needs NumPy only."""
    code = ("import sys, numpy as np; from unitrain import convert, layers, weights; m = layers.preset('cnn');"
            "import tempfile, pathlib; d = pathlib.Path(tempfile.mkdtemp());"
            "weights.save_safetensors(d / 'w.safetensors', weights.init_weights(m, 0));"
            "convert.convert(d / 'w.safetensors', d / 'w.npz', m); convert.read(d / 'w.npz', m);"
            "print(sorted({'torch', 'mindspore', 'chainer', 'onnx'} & set(sys.modules)))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"


@pytest.mark.skipif(not (has("torch") and has("mindspore")), reason="torch and mindspore are needed")
def test_the_command_says_one_line_and_nothing_else(tmp_path):
    """In a real process: neither torch's warnings nor MindSpore's own logging reach stderr."""
    cases, marker = hostile_files(tmp_path)
    for why in ("pickle that runs a command", "garbage checkpoint"):
        path = cases[why][0]
        run = subprocess.run([sys.executable, "-m", "unitrain", "convert", str(path), str(tmp_path / "o.safetensors")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 2 and run.stdout == "", why
        assert run.stderr.count("\n") == 1 and re.search(cases[why][1], run.stderr), (why, run.stderr)
    assert not marker.exists()
