"""unitrain.from_torch / to_torch: the tutorial nn.Modules (tests/torch_tutorials.py), written as
their tutorials write them, and the two networks of the examples (PyTorch's "Training with PyTorch"
classifier, a torchvision-style ResNet-18 in plain torch), imported with torch.fx and trained on every
backend against the module itself trained by a plain PyTorch loop from the same weights.

Each case trains STEPS SGD-momentum steps (ResNet-18 one, the recurrent classifiers twenty: CASE_STEPS).
In float64 a backend must match PyTorch's float64 loop within the conformance formula; in float32
within sqrt(n) times the drift PyTorch's own float32 loop shows on the case (torch_reference.expected_run),
n the batch's elements of the largest value the graph computes (as tests/test_graph.py derives it). Dropout is set
to p=0 in the copies that train here: PyTorch draws its masks from its own generator and in sample
order, so no derived bound covers two backends' masks (the dropout stream's equality across backends
is tested in test_graph.py); that the import keeps each Dropout's p is checked on its own.
"""

import collections
import copy
import functools
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_tutorials as T
from conftest import installed_backends
from torch import nn
from torch_reference import (
    GarmentClassifier,
    ResNet18,
    assert_states_equal,
    assert_within_drift,
    expected_run,
    float64_tolerances,
    listed_once,
    numpy_state,
    torch_output,
    torch_runs,
)

import unitrain
from unitrain import layers as L
from unitrain.graph import Graph
from unitrain.losses import CrossEntropyLoss, MSELoss, NLLLoss
from unitrain.optim import SGD
from unitrain.registry import get_backend

pytestmark = pytest.mark.usefixtures("torch_single_thread")

STEPS, BATCH, LR, MOMENTUM = 4, 4, 0.05, 0.9
# ResNet-18 from torchvision's initialisation on four samples is chaotic: its BatchNorms normalise a few
# values per channel (four in layer4) and each rescales its convolution's gradient by the inverse of a
# small weight norm, so PyTorch's own float32 loop leaves its float64 twin by 6e-6 after one step and by
# 0.05 after four (conv1.weight, lr 0.01 to 0.05 alike): past the first step sqrt(n) x that drift bounds
# nothing. One step (forward, backward, update) keeps the float32 bound meaningful (1.4e-3).
# The two classifiers on recurrent states train twenty, as every sequence layer does against torch.nn.
CASE_STEPS = {"resnet18": 1, "bilstm-classifier": 20, "gru-encoder-decoder": 20}
SENTENCE = 5  # the tagger's batch is one sentence: its words are the samples, as in the tutorial
# MindSpore compiles each case's step (4-13 s each on two cores): these cases keep the suite's time;
# they cover every kind of node the import makes: functional pools, views, a layer called twice, two
# inputs, an Embedding, an LSTM's tuple, a Dropout called twice and weights tied across two layers (the
# word language model; a run of all ten cases before it on MindSpore passed: 70 s), and the two networks
# the examples train (ResNet-18's compile: about 20 s of CPU, so it runs with the slow tests)
MINDSPORE_CASES = (
    "lenet",
    "dynamic-net",
    "two-inputs",
    "word-language-model",
    "training-with-pytorch",
    "resnet18",
    "gru-encoder-decoder",
)
SLOW_CASES = {("resnet18", "mindspore")}
TOKEN_CASES = ("bilstm-classifier", "gru-encoder-decoder")  # their inputs are token ids below 9

# name: (module factory, per-sample input shapes (None: the tagger's sentence), target kind, loss, criterion)
CASES = {
    "mnist-net": (T.MnistNet, [(1, 28, 28)], 10, NLLLoss(), F.nll_loss),
    "cifar10-net": (T.CifarNet, [(3, 32, 32)], 10, CrossEntropyLoss(), F.cross_entropy),
    "lenet": (T.LeNet, [(1, 32, 32)], 10, CrossEntropyLoss(), F.cross_entropy),
    "dropout-mlp": (T.DropoutMLP, [(1, 8, 8)], 10, CrossEntropyLoss(), F.cross_entropy),
    "autoencoder": (T.Autoencoder, [(64,)], "input", MSELoss(), F.mse_loss),
    "unet": (T.UNet, [(1, 8, 8)], "pixels", MSELoss(), F.mse_loss),
    "inception": (T.GoogLeNetBlock, [(4, 8, 8)], 3, CrossEntropyLoss(), F.cross_entropy),
    "dynamic-net": (T.DynamicNet, [(8,)], 3, CrossEntropyLoss(), F.cross_entropy),
    "two-inputs": (T.TwoInputNet, [(3, 6, 6), (5,)], 3, CrossEntropyLoss(), F.cross_entropy),
    "lstm-tagger": (T.LSTMTagger, None, 3, NLLLoss(), F.nll_loss),
    "word-language-model": (T.WordLanguageModel, None, 9, NLLLoss(), F.nll_loss),
    "bilstm-classifier": (T.BiLSTMClassifier, [(6,)], 3, CrossEntropyLoss(), F.cross_entropy),
    "gru-encoder-decoder": (T.GRUEncoderDecoder, [(5,), (4,)], 3, CrossEntropyLoss(), F.cross_entropy),
    "training-with-pytorch": (GarmentClassifier, [(1, 28, 28)], 10, CrossEntropyLoss(), F.cross_entropy),
    "resnet18": (functools.partial(ResNet18, 10, 1), [(1, 28, 28)], 10, CrossEntropyLoss(), F.cross_entropy),
}  # fmt: skip


def without_dropout(module: nn.Module) -> nn.Module:
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0
    return module


@functools.cache
def case_module(case) -> nn.Module:
    """The tutorial's module with PyTorch's own initial weights (seeded), dropout off."""
    torch.manual_seed(0)
    return without_dropout(CASES[case][0]())


@functools.cache
def batches_for(case):
    _, shapes, target, _, _ = CASES[case]
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(CASE_STEPS.get(case, STEPS)):
        if shapes is None:
            x, n = rng.integers(0, 9, (SENTENCE, 1)), SENTENCE
        else:
            xs = tuple(rng.integers(0, 9, (BATCH, *shape)) if case in TOKEN_CASES else
                       rng.random((BATCH, *shape)).astype(np.float32) for shape in shapes)  # fmt: skip
            x, n = (xs[0] if len(xs) == 1 else xs), BATCH
        if target == "input":
            y = x
        elif target == "pixels":
            y = rng.random((n, 2, 8, 8)).astype(np.float32)
        else:
            y = rng.integers(0, target, n)
        batches.append((x, y))
    return batches


def example(case):
    x = batches_for(case)[0][0]
    return tuple(torch.from_numpy(part) for part in x) if isinstance(x, tuple) else torch.from_numpy(x)


@functools.cache
def imported(case) -> Graph:
    return unitrain.from_torch(case_module(case), example(case))


@functools.cache
def reference_runs(case):
    criterion = CASES[case][4]
    return torch_runs(
        lambda dtype: listed_once(copy.deepcopy(case_module(case))).to(dtype),
        lambda params: torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=False),
        batches_for(case),
        criterion=criterion,
    )


def longest_sum(case) -> int:
    """The batch's elements of the largest value the graph computes."""
    model, batch = imported(case), SENTENCE if CASES[case][1] is None else BATCH
    # a recurrent layer's value with its final states is a tuple of shapes: (output, h_n[, c_n])
    shapes = [part for shape in model.shapes.values() for part in (shape if isinstance(shape[0], tuple) else [shape])]
    return batch * max(math.prod(shape) for shape in (*shapes, *model.input_shapes))


def _cast(value, dtype):
    if isinstance(value, tuple):
        return tuple(_cast(part, dtype) for part in value)
    return value.astype(dtype) if value.dtype.kind == "f" else value


@pytest.mark.parametrize(
    ("case", "backend"),
    [pytest.param(case, backend, marks=[pytest.mark.slow] if (case, backend) in SLOW_CASES else [])
     for case in CASES for backend in installed_backends() if backend != "mindspore" or case in MINDSPORE_CASES],
)  # fmt: skip
def test_tutorial_module_trains_on_every_backend_as_in_pytorch(case, backend):
    model = imported(case)
    loss = CASES[case][3]
    runs = reference_runs(case)
    dtypes = ["float32", "float64"] if "float64" in get_backend(backend).capabilities else ["float32"]
    for dtype in dtypes:
        loop = get_backend(backend)(model, loss=loss, optimizer=SGD(lr=LR, momentum=MOMENTUM), dtype=dtype)
        start = loop.state_dict()
        own = numpy_state(listed_once(copy.deepcopy(case_module(case))))
        assert list(start) == list(own)  # PyTorch's keys, in its order (a tied tensor once)
        assert_states_equal(
            {key: value.astype(np.float32) if value.dtype.kind == "f" else value for key, value in start.items()},
            own,
        )  # the module's own weights: every backend starts from them
        expected, tolerances = expected_run(runs, dtype, size=longest_sum(case))
        losses = {"loss": np.array([float(loop.step(_cast(batch, dtype))) for batch in batches_for(case)])}
        assert_within_drift(losses, expected.losses, tolerances.losses)
        assert_within_drift(loop.state_dict(), expected.state, tolerances.state)


def test_to_torch_gives_the_module_back():
    """A torch.fx GraphModule with the module's state_dict that computes what the module does;
    importing it again gives the same graph. Not yet for the recurrent states' cases: to_torch hands the
    graph h_n batch-first, h_n.transpose(0, 1), which imports as one more node (a permute), and a state
    transposed back for the next layer's hx is refused."""
    for case in CASES:
        module = copy.deepcopy(case_module(case)).eval()
        graph = imported(case)
        back = unitrain.to_torch(graph).eval()
        assert isinstance(back, torch.fx.GraphModule)
        assert list(back.state_dict()) == list(module.state_dict())
        assert_states_equal(numpy_state(back), numpy_state(module))
        x = example(case)
        inputs = x if isinstance(x, tuple) else (x,)
        with torch.no_grad():
            torch.testing.assert_close(back(*inputs), module(*inputs), rtol=0, atol=0)
        if case not in TOKEN_CASES:
            assert unitrain.from_torch(back, x) == graph, case


def test_the_import_keeps_dropout_and_the_node_list_reads_as_the_tutorial():
    torch.manual_seed(0)
    graph = unitrain.from_torch(T.MnistNet(), torch.zeros(2, 1, 28, 28))
    assert graph.dropout1 == L.Dropout(0.25) and graph.dropout2 == L.Dropout(0.5)
    assert [(node.op, node.target) for node in graph.nodes] == [
        ("call_module", "conv1"), ("call_function", "relu"), ("call_module", "conv2"), ("call_function", "relu"),
        ("call_module", "max_pool2d"), ("call_module", "dropout1"), ("call_function", "flatten"),
        ("call_module", "fc1"), ("call_function", "relu"), ("call_module", "dropout2"), ("call_module", "fc2"),
        ("call_function", "log_softmax"),
    ]  # fmt: skip
    assert graph.max_pool2d == L.MaxPool2d(2)  # F.max_pool2d(x, 2): a weightless module of its own
    tagger = imported("lstm-tagger")
    assert tagger.lstm == unitrain.LSTM(6, 6) and tagger.input_shapes == ((1,),)
    assert [node.target for node in tagger.nodes] == ["word_embeddings", "reshape", "lstm", "reshape",
                                                      "hidden2tag", "log_softmax"]  # fmt: skip
    # the tutorial's view(len(sentence), ...) is the batch: a sentence of another length runs too
    assert unitrain.make_loop("numpy", tagger).predict(np.arange(7)[:, None]).shape == (7, 3)
    unet = imported("unet")
    assert unet.get_submodule("up1.conv.double_conv.1") == L.BatchNorm2d(4)


class BatchBySize(nn.Module):
    """``x.view(x.size(0), -1)``: the batch read from the input, as ResNet-style code writes it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).view(x.size(0), -1))


@pytest.mark.parametrize("backend", [name for name in installed_backends() if name != "mindspore"])
@pytest.mark.parametrize(
    "make", [GarmentClassifier, lambda: case_module("mnist-net"), BatchBySize],
    ids=["view(-1, 256)", "flatten(x, 1)", "view(x.size(0), -1)"],
)  # fmt: skip
def test_a_model_traced_with_two_samples_trains_with_sixty_four(make, backend):
    """The batch axis of an imported view is symbolic: the graph traced on two samples is the one traced
    on 64, and a step on 64 samples has PyTorch's loss (within its own float32 drift)."""
    torch.manual_seed(0)
    module = make()
    graph = unitrain.from_torch(module, torch.zeros(2, 1, 28, 28))
    assert graph == unitrain.from_torch(module, torch.zeros(64, 1, 28, 28))
    rng = np.random.default_rng(3)
    x, y = rng.random((64, 1, 28, 28), np.float32), rng.integers(0, 10, 64)
    loss = NLLLoss() if isinstance(module, T.MnistNet) else CrossEntropyLoss()
    criterion = F.nll_loss if isinstance(module, T.MnistNet) else F.cross_entropy
    expected, tolerances = torch_output(module.train(), x, lambda out: criterion(out, torch.from_numpy(y)))
    got = get_backend(backend)(graph, loss=loss, optimizer=SGD(lr=LR)).step((x, y))
    assert_within_drift({"out": np.asarray(float(got))}, expected, tolerances)


class EveryOperation(nn.Module):
    """The functions and methods the import maps, between layers (two outputs)."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.bn = nn.Linear(12, 12), nn.LayerNorm(12), nn.BatchNorm1d(12)
        self.conv1d, self.gru = nn.Conv1d(2, 4, 3, padding=1), nn.GRU(4, 5, batch_first=True)

    def forward(self, x):
        h = self.bn(self.ln(self.fc(x)))
        a, b = torch.split(h, [4, 8], dim=1)
        c = torch.stack([a, b[:, :4]], dim=1)
        d = c.permute(0, 2, 1) @ c
        e = torch.softmax(d, dim=-1).sum(dim=2) + d.transpose(1, 2).mean(2)
        f = F.gelu(e) * torch.sigmoid(e) - F.elu(e, alpha=0.5) / 2
        g = self.conv1d(F.leaky_relu(h.view(-1, 2, 6), 0.2))
        o, _ = self.gru(g.transpose(1, 2))
        k = o[:, -1] + o[..., 0:1].squeeze(-1)[:, :5]
        z = torch.cat([f, k, h.unsqueeze(1).flatten(1)], 1)
        return F.log_softmax(z, 1), torch.tanh(k.chunk(5, 1)[2])


class Images(nn.Module):
    """The functional pools and interpolation, SiLU and ConvTranspose2d."""

    def __init__(self):
        super().__init__()
        self.conv, self.up = nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(F.avg_pool2d(F.silu(self.conv(x)), 2), (2, 2))
        u = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        return self.up(u).mean((2, 3)) + F.interpolate(y, size=(3, 3)).sum((2, 3)).narrow(1, 0, 2)


@pytest.mark.parametrize(
    ("make", "shape"),
    [(EveryOperation, (12,)), (Images, (3, 8, 8))],
    ids=["every-operation", "images"],
)  # fmt: skip
def test_more_modules_import_as_torch_computes_them(make, shape):
    """In float64 (the module's float32 weights, widened): the NumPy backend's eval-mode outputs
    within the conformance formula of the module's; to_torch gives it back, bit for bit."""
    torch.manual_seed(0)
    module = make()
    x = torch.rand(2, *shape)
    graph = unitrain.from_torch(module, x)
    loss = unitrain.PerOutputLoss(NLLLoss(), MSELoss()) if len(graph.outputs) > 1 else None
    loop = get_backend("numpy")(graph, loss=loss, dtype="float64")
    loop.eval()
    got = loop.predict(x.numpy().astype(np.float64))
    with torch.no_grad():
        want = copy.deepcopy(module).double().eval()(x.double())
        back = unitrain.to_torch(graph).eval()(x)
        own = module.eval()(x)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    expected = {f"output{k}": value.numpy() for k, value in enumerate(want)}
    size = 2 * max(math.prod(s) for s in (*graph.shapes.values(), shape))
    assert_within_drift({f"output{k}": value for k, value in enumerate(got)}, expected,
                        float64_tolerances(expected, size))  # fmt: skip
    for mine, theirs in zip(back if isinstance(back, tuple) else (back,), own if isinstance(own, tuple) else (own,),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


class TiedNorms(nn.Module):  # b.weight = a.weight, between layers unitrain does not tie
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.spare = nn.Linear(4, 2), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


class Forward(nn.Module):
    """A module with ``layers`` whose forward is ``function(self, x)``."""

    def __init__(self, forward, **layers):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.function = forward

    def forward(self, x):
        return self.function(self, x)


@pytest.mark.parametrize(
    ("make", "x", "message"),
    [
        (lambda: Forward(lambda self, x: torch.sort(x, 1)[0]), (2, 4),
         r"^from_torch: node 'sort' \(torch.sort\): has no unitrain operation"),
        (lambda: Forward(lambda self, x: self.cell(x), cell=nn.GRUCell(4, 4)),
         (2, 4), r"^from_torch: module 'cell' \(GRUCell\) has no unitrain layer"),
        (lambda: Forward(lambda self, x: self.lstm(x)[1][0].sum(0), lstm=nn.LSTM(4, 3)), (2, 5, 4),
         r"^from_torch: node 'getitem' \(_operator.getitem\): LSTM\(.*\): initial and final states in a graph need "
         r"batch_first=True"),
        (lambda: Forward(lambda self, x: self.lstm(x)[1][0].sum(0), lstm=nn.LSTM(4, 3, batch_first=True)), (2, 5, 4),
         r"^from_torch: node 'sum_1' \(Tensor.sum\): sum: h_n is read as PyTorch's \(num_layers \* num_directions, N, "
         r"hidden_size\); index it"),
        (lambda: Forward(lambda self, x: x.view(2, -1, 4)), (2, 8),
         r"^from_torch: Forward.forward depends on the example's batch size 2: with 3 samples, node 'view' "
         r"\(Tensor.view\): it turns a batch of 3 into \(2,\).*; write the batch as x.size\(0\), len\(x\) or -1$"),
        (lambda: Forward(lambda self, x: x.view(-1)), (2, 4),
         r"^from_torch: node 'view' \(Tensor.view\): it turns a batch of 2 into \(8,\): the batch axis must stay"),
        (lambda: Forward(lambda self, x: F.pad(x, [1, 1])), (2, 4),
         r"^from_torch: node 'pad' \(F.pad\): padding by \[1, 1\] is not supported"),
        (lambda: Forward(lambda self, x: x if x.sum() > 0 else -x), (2, 4),
         r"^from_torch: torch.fx cannot trace Forward.forward: symbolically traced variables cannot be used as "
         r"inputs to control flow"),
        (lambda: Forward(lambda self, x: x.mean()), (2, 4),
         r"^from_torch: node 'mean' \(Tensor.mean\): mean over every axis reduces the batch too"),
        (lambda: Forward(lambda self, x: self.pool(x), pool=nn.MaxPool2d(2, ceil_mode=True)), (2, 1, 5, 5),
         r"^from_torch: module 'pool' \(MaxPool2d\) has ceil_mode=True; unitrain's MaxPool2d has only "
         r"ceil_mode=False$"),
        (lambda: Forward(lambda self, x: torch.cat([x, x], 0)), (2, 4),
         r"^from_torch: node 'cat' \(torch.cat\): cat: dim 0 is the batch axis"),
        (lambda: Forward(lambda self, x: torch.div(x, 2.0, rounding_mode="floor")), (2, 4),
         r"^from_torch: node 'div' \(torch.div\): argument rounding_mode='floor' is not supported$"),
        (TiedNorms, (2, 4), r"^from_torch: Graph: tied 'b.weight' belongs to BatchNorm1d\(.*\); ties are between "
         r"Linear, Embedding, Conv2d and ConvTranspose2d parameters$"),
        (lambda: Forward(lambda self, x: self.enc(x) @ self.enc.weight, enc=nn.Linear(4, 3)), (2, 4),
         r"^from_torch: node 'matmul' \(_operator.matmul\): uses the weight enc.weight outside its layer other than as "
         r"F.linear's weight \(F.linear\(x, encoder.weight.t\(\)\)\); keep it in its layer$"),
        (lambda: Forward(lambda self, x: F.linear(self.enc(x), self.enc.weight.t(), self.enc.bias),
                         enc=nn.Linear(3, 3)), (2, 3),
         r"^from_torch: node 'enc_bias' \(enc.bias\): reads the module's attribute 'enc.bias' directly; unitrain "
         r"graphs hold weights only in layers"),
        (Unused, (2, 4), r"^from_torch: spare.weight belongs to a layer that forward never calls"),
        (Scaled, (2, 4), r"^from_torch: node 'scale' \(scale\): reads the module's attribute 'scale' directly"),
    ],
)  # fmt: skip
def test_what_cannot_be_imported_is_refused_in_one_line(make, x, message):
    with pytest.raises(ValueError, match=message) as error:
        unitrain.from_torch(make(), torch.rand(*x))
    assert "\n" not in str(error.value)


def test_the_core_reaches_torch_only_through_the_importer():
    """``unitrain.from_torch`` is the torch-side module's; importing unitrain loads neither."""
    import subprocess
    import sys

    code = "import sys, unitrain; unitrain.Graph; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


NETWORK = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


def build():
    torch.manual_seed(0)
    return Net(), torch.zeros(2, 1, 8, 8)


def lightning():
    net = Net()
    net.example_input_array = torch.zeros(2, 1, 8, 8)  # LightningModule's attribute
    return net


def bare():
    return Net()


def whole_batch():
    return nn.Flatten(0), torch.zeros(2, 4)
"""


def test_a_model_function_returning_a_torch_module_trains_from_the_command_line(tmp_path, monkeypatch, capsys):
    from unitrain.cli import main

    (tmp_path / "tutorial_net.py").write_text(NETWORK)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.random((16, 8, 8), np.float32), y_train=rng.integers(0, 3, 16),
             x_test=rng.random((8, 8, 8), np.float32), y_test=rng.integers(0, 3, 8))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", "data.npz", "--backend", "numpy", "--epochs", "1", "--batch-size", "8", "--no-progress"]
    for function in ("build", "lightning"):
        assert main(["train", "--model", f"tutorial_net:{function}", *common]) == 0, capsys.readouterr().err
        assert f"model tutorial_net:{function}" in capsys.readouterr().out
    for function, message in (
        ("bare", "model 'tutorial_net:bare': returned a torch Net without an example input; return (module, "
                 "example_inputs) or set module.example_input_array"),
        ("whole_batch", "model 'tutorial_net:whole_batch': from_torch: node 'flatten' (Tensor.flatten): flatten: "
                        "dim 0 is the batch axis"),
    ):  # fmt: skip
        assert main(["train", "--model", f"tutorial_net:{function}", *common]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err


def test_importing_a_long_chain_costs_work_in_proportion_to_its_length(monkeypatch):
    """A chain of 20,000 layers took minutes: the graph's shape inference copied every leaf's shape
    per node and looked each module up by scanning its container's children, and every node undid
    fx's patches of nn.Module (class attribute writes, ~1 ms each) to run on the examples. Measured
    as work, not time: the Python calls made (``sys.setprofile``) for 2n layers are about twice
    those for n (they were 2.8 times, growing), and fx's patches are undone once per trace, not per node."""
    from torch.fx import _symbolic_trace

    undone = []
    revert = _symbolic_trace._Patcher.revert_all_patches
    monkeypatch.setattr(_symbolic_trace._Patcher, "revert_all_patches", lambda self: undone.append(1) or revert(self))

    def work(layers: int) -> int:
        body = nn.Sequential(*(nn.Linear(4, 4) if i % 2 == 0 else nn.ReLU() for i in range(layers)))
        module = nn.Sequential(collections.OrderedDict(body=body))  # "body.0", ...: dotted paths
        calls = 0

        def count(frame, event, arg):
            nonlocal calls
            calls += 1

        undone.clear()
        sys.setprofile(count)
        try:
            unitrain.from_torch(module, torch.zeros(2, 4))
        finally:
            sys.setprofile(None)
        # once per trace: with the example's batch and with one more sample (the batch axis check)
        assert len(undone) == 2, f"fx's patches undone {len(undone)} times for {layers} layers"
        return calls

    small, large = work(400), work(800)
    assert large <= 2.2 * small, f"{large} calls for 800 layers, {small} for 400: more than linear"
