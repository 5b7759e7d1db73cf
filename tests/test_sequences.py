"""Sequence layers (Embedding, RNN, LSTM, GRU, Conv1d, the 1-d pools, Linear over the last axis) on
every backend against their ``torch.nn`` twins: 20 training steps from the same weights within
PyTorch's own float32 drift (``tests/torch_reference.py``), float64 runs within the conformance
formula, evaluation alike, initial and final states, integer token ids and their refusals."""

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import installed_backends
from torch import nn
from torch_reference import (
    SEED,
    assert_within_drift,
    expected_run,
    load_state,
    torch_output,
    torch_runs,
)
from unitrain.conformance.tolerances import tolerance

import unitrain as ut
from unitrain.loop import InputError

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class OutputOnly:
    """A recurrent module whose forward gives ``output`` alone, as a spec's does inside a Sequential."""

    def forward(self, x):
        return super().forward(x)[0]


class LSTMOutput(OutputOnly, nn.LSTM):
    pass


class GRUOutput(OutputOnly, nn.GRU):
    pass


class RNNOutput(OutputOnly, nn.RNN):
    pass


def _ids(shape, vocabulary):
    return lambda rng, n: rng.integers(0, vocabulary, (n, *shape))


def _floats(shape):
    return lambda rng, n: rng.standard_normal((n, *shape)).astype(np.float32)


#: name -> (spec, its hand-written torch.nn twin, input maker ``(rng, batch) -> x``)
CASES = {
    "embedding_lstm_gru_rnn_batch_first": (
        ut.Sequential(ut.Embedding(12, 5, padding_idx=0),
                      ut.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True),
                      ut.GRU(12, 4, batch_first=True),
                      ut.RNN(4, 4, nonlinearity="relu", bias=False, batch_first=True, bidirectional=True),
                      ut.Linear(8, 4), ut.Flatten(), ut.Linear(20, 3)),
        lambda: nn.Sequential(nn.Embedding(12, 5, padding_idx=0),
                              LSTMOutput(5, 6, num_layers=2, batch_first=True, bidirectional=True),
                              GRUOutput(12, 4, batch_first=True),
                              RNNOutput(4, 4, nonlinearity="relu", bias=False, batch_first=True, bidirectional=True),
                              nn.Linear(8, 4), nn.Flatten(), nn.Linear(20, 3)),
        _ids((5,), 12),
    ),
    "gru_rnn_stacked_time_first": (
        ut.Sequential(ut.GRU(3, 5, num_layers=2, bidirectional=True), ut.RNN(10, 4, num_layers=2), ut.Flatten(),
                      ut.Linear(12, 3)),
        lambda: nn.Sequential(GRUOutput(3, 5, num_layers=2, bidirectional=True), RNNOutput(10, 4, num_layers=2),
                              nn.Flatten(), nn.Linear(12, 3)),
        _floats((3, 3)),  # the loop's samples are time steps of 3 sequences
    ),
    "conv1d_pools": (
        ut.Sequential(ut.Conv1d(3, 4, 3, stride=2, padding=1), ut.MaxPool1d(2, padding=1),
                      ut.Conv1d(4, 4, 2, dilation=2, groups=2, bias=False),
                      ut.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), ut.AvgPool1d(2, padding=1),
                      ut.AdaptiveAvgPool1d(3), ut.Flatten(), ut.Linear(12, 3)),
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.MaxPool1d(2, padding=1),
                              nn.Conv1d(4, 4, 2, dilation=2, groups=2, bias=False),
                              nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), nn.AvgPool1d(2, padding=1),
                              nn.AdaptiveAvgPool1d(3), nn.Flatten(), nn.Linear(12, 3)),
        _floats((3, 13)),
    ),
}  # fmt: skip

STEPS, BATCH = 20, 4
SGD_MOMENTUM = ut.SGD(lr=0.1, momentum=0.9)


def _case(name):
    spec, twin, make_x = CASES[name]
    rng = np.random.default_rng(SEED)
    batches = [(make_x(rng, BATCH), rng.integers(0, 3, BATCH)) for _ in range(STEPS)]
    return spec, twin, batches


def longest_sum(spec, batches):
    """The elements of the largest layer input of one batch: every sum of one step (a weight gradient
    through time adds batch x steps terms of a layer's input width) has at most that many terms."""
    x = batches[0][0]
    return len(x) * max(int(np.prod(shape)) for shape in spec.leaf_input_shapes(x.shape[1:]).values())


def _runs(name):
    spec, twin, batches = _case(name)
    initial = ut.init_weights(spec, SEED)
    runs = torch_runs(lambda dtype: load_state(twin().to(dtype), initial),
                      lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False), batches)  # fmt: skip
    return spec, twin, batches, runs


def _loop(backend, spec, dtype):
    module = importlib.import_module(f"unitrain.backends.{backend}")
    cls = next(value for value in vars(module).values() if isinstance(value, type) and getattr(value, "name", None)
               == backend and issubclass(value, ut.TrainingLoop))  # fmt: skip
    return cls(spec, optimizer=SGD_MOMENTUM, seed=SEED, dtype=dtype)


#: the dtypes each backend trains the cases in: float64 checks NumPy's hand-written equations (torch's
#: float64 run is the reference itself; the frameworks' own kernels are checked in float32, where a
#: wrong gate order or direction would stand out by orders of magnitude)
DTYPES = {"numpy": ("float32", "float64"), "torch": ("float32",), "chainer": ("float32",), "mindspore": ("float32",)}


def _training_cases():
    """(case, backend) pairs. MindSpore compiles each case's step for 15 to 60 s on two cores (nn.GRU and
    nn.RNN unroll their time loops into the graph), so its runs are in the slow suite."""
    for name in CASES:
        for backend in installed_backends():
            yield pytest.param(name, backend, marks=[pytest.mark.slow] if backend == "mindspore" else [])


@pytest.mark.parametrize(("name", "backend"), list(_training_cases()))
def test_trains_and_evaluates_like_torch_nn(name, backend):
    """20 SGD-momentum steps from the same weights: losses, weights and momentum buffers within PyTorch's own
    float32 drift of its float64 run (float64: within the conformance formula), then eval outputs alike."""
    spec, twin, batches, runs = _runs(name)
    size = longest_sum(spec, batches)
    for dtype in DTYPES[backend]:
        loop = _loop(backend, spec, dtype)
        assert list(loop.state_dict()) == list(twin().state_dict())
        losses = [loop.to_float(loop.step((x.astype(dtype) if x.dtype.kind == "f" else x, y))) for x, y in batches]
        expected, tolerances = expected_run(runs, dtype, size)
        assert_within_drift({"loss": np.array(losses)}, expected.losses, tolerances.losses)
        assert_within_drift(loop.state_dict(), expected.state, tolerances.state)
        buffers = {key: value for key, value in loop.optimizer_state_dict().items() if key != "step"}
        assert_within_drift(buffers, expected.buffers, tolerances.buffers)
    x = batches[-1][0]
    model = load_state(twin().eval(), {key: value.astype(np.float32) for key, value in loop.state_dict().items()})
    with torch.no_grad():
        out, out_tolerances = torch_output(model, x)
    assert_within_drift({"out": loop.predict(x).astype(np.float32)}, out, out_tolerances)


STATE_SPECS = {
    "lstm": (ut.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True), nn.LSTM),
    "gru": (ut.GRU(3, 4, num_layers=2, bidirectional=True), nn.GRU),
    "rnn": (ut.RNN(3, 4, nonlinearity="relu"), nn.RNN),
}


def _states_of(backend, layer_loop, native, x, h0, c0):
    """(output, h_n, c_n) of a loop's first layer (``native``: its torch.nn class), given initial states."""
    if backend == "torch":
        hx = torch.from_numpy(h0) if c0 is None else (torch.from_numpy(h0), torch.from_numpy(c0))
        with torch.no_grad():  # the whole forward of the module the adapter built
            out, state = native.forward(layer_loop.model[0], torch.from_numpy(x), hx)
        h, c = (state, None) if c0 is None else state
        return out.numpy(), h.numpy(), None if c is None else c.numpy()
    if backend == "numpy":
        return layer_loop._root.nodes[0].run(x, h0, c0, False, False)
    if backend == "chainer":
        import chainer

        with chainer.using_config("train", False):
            values = layer_loop.model._calls[0].run(x, h0, c0)
        return tuple(None if value is None else value.array for value in values)
    from mindspore import Tensor

    layer_loop._set_training(False)
    values = layer_loop._net.layers[0].run(Tensor(x), Tensor(h0), None if c0 is None else Tensor(c0))
    return tuple(None if value is None else value.asnumpy() for value in values)


@pytest.mark.parametrize("backend", installed_backends())
@pytest.mark.parametrize("kind", STATE_SPECS)
def test_initial_states_in_and_final_states_out(kind, backend):
    """Each adapter's recurrent layer from given initial states gives torch.nn's output, h_n and c_n."""
    spec, native = STATE_SPECS[kind]
    dtype = DTYPES[backend][-1]
    loop = _loop(backend, ut.Sequential(spec), dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3)).astype(dtype)
    h0 = rng.standard_normal(spec.state_shape(2 if spec.batch_first else 5)).astype(dtype)
    c0 = rng.standard_normal(h0.shape).astype(dtype) if kind == "lstm" else None
    fields = ("num_layers", "bias", "batch_first", "bidirectional", "nonlinearity")
    arguments = {field: getattr(spec, field) for field in fields if hasattr(spec, field)}
    twin = load_state(native(3, 4, **arguments).to(getattr(torch, dtype)),
                      {key.removeprefix("0."): value for key, value in loop.state_dict().items()})  # fmt: skip
    hx = torch.from_numpy(h0) if c0 is None else (torch.from_numpy(h0), torch.from_numpy(c0))
    with torch.no_grad():
        out, state = twin(torch.from_numpy(x), hx)
    expected = (out, *((state,) if c0 is None else state))
    atol = tolerance(np.dtype(dtype), size=100)  # 5 steps of 2 layers, sums of at most 8 terms each
    for actual, wanted in zip(_states_of(backend, loop, native, x, h0, c0), expected, strict=False):
        np.testing.assert_allclose(actual, wanted.numpy(), rtol=0, atol=atol)


def test_numpy_gradients_of_initial_states_match_torch_autograd():
    """The hand-written backward through time gives the initial states' gradients too (float64)."""
    from unitrain.backends.numpy import NumpyLoop

    spec = ut.LSTM(3, 4, num_layers=2, bidirectional=True, dropout=0.0)
    loop = NumpyLoop(ut.Sequential(spec), dtype="float64")
    rng = np.random.default_rng(2)
    x, grad_out = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 2, 8))
    h0, c0, grad_h, grad_c = (rng.standard_normal(spec.state_shape(2)) for _ in range(4))
    layer = loop._root.nodes[0]
    layer.run(x, h0, c0, True, True)
    grad_x, grad_h0, grad_c0 = layer.backward_states(grad_out, grad_h, grad_c)
    twin = load_state(nn.LSTM(3, 4, num_layers=2, bidirectional=True).double(),
                      {key.removeprefix("0."): value for key, value in loop.state_dict().items()})  # fmt: skip
    inputs = [torch.tensor(array, requires_grad=True) for array in (x, h0, c0)]
    out, (h_n, c_n) = twin(inputs[0], (inputs[1], inputs[2]))
    ((out * torch.from_numpy(grad_out)).sum() + (h_n * torch.from_numpy(grad_h)).sum()
     + (c_n * torch.from_numpy(grad_c)).sum()).backward()  # fmt: skip
    for actual, tensor in zip((grad_x, grad_h0, grad_c0), inputs, strict=True):
        np.testing.assert_allclose(actual, tensor.grad.numpy(), rtol=0, atol=tolerance(np.float64, size=100))
    for name, param in twin.named_parameters():
        np.testing.assert_allclose(layer.grads[name], param.grad.numpy(), rtol=0, atol=tolerance(np.float64, 100))


@pytest.mark.parametrize("kind", [ut.LSTM, ut.GRU])
def test_numpy_recurrent_layer_called_twice_in_a_graph_has_torch_s_gradients(kind):
    """A graph that calls one recurrent module on two inputs: NumPy's second call records its own
    forward (the copy the graph makes for it once shared its first call's directions, and the first
    call's backward read the second's states: 0.07 off in float64)."""
    from unitrain.graph import Graph, Input

    first, second = Input((5, 3), name="first"), Input((5, 3), name="second")
    layer = kind(3, 4, batch_first=True, bidirectional=True)
    graph = Graph([first, second], layer(first) + layer(second), modules={"rnn": layer})
    rng = np.random.default_rng(4)
    x, y = tuple(rng.standard_normal((2, 2, 5, 3))), rng.standard_normal((2, 5, 8))
    loops = [ut.make_loop(backend, graph, ut.MSELoss(), ut.SGD(lr=0.1), seed=0, dtype="float64")
             for backend in ("numpy", "torch")]  # fmt: skip
    loops[1].load_state_dict(loops[0].state_dict())
    for loop in loops:
        loop.step((x, y))
    for name, wanted in loops[1].gradients().items():
        np.testing.assert_allclose(loops[0].gradients()[name], wanted, rtol=0, atol=tolerance(np.float64, 100))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_numpy_lstm_buffers_reused_across_steps_change_no_result(bidirectional):
    """The NumPy LSTM keeps what its backward reads in buffers reused from one training step to the
    next: an evaluation between a training forward and its backward, the next training steps (the
    last with longer sequences, which replaces the buffers) and the outputs already handed on are
    left exactly as by a layer whose every step is its first."""
    from unitrain.backends.numpy import NumpyLoop

    spec = ut.LSTM(3, 4, num_layers=2, bidirectional=bidirectional, batch_first=True)
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((2, steps, 3)), rng.standard_normal((2, steps, 4 * spec.directions)))
               for steps in (5, 5, 7)]  # fmt: skip
    layer = NumpyLoop(ut.Sequential(spec), dtype="float64", seed=0)._root.nodes[0]

    def first_step(x, grad):
        fresh = NumpyLoop(ut.Sequential(spec), dtype="float64", seed=0)._root.nodes[0]
        return fresh.forward(x, True, True), fresh.backward(grad, True), fresh.grads

    kept = layer.forward(batches[0][0], True, True)
    kept_copy = kept.copy()
    layer.forward(batches[1][0], False, False)  # an evaluation before the backward
    for k, (x, grad) in enumerate(batches):
        for name in layer.grads:
            layer.grads[name].fill(0)
        output = kept if k == 0 else layer.forward(x, True, True)
        wanted_output, wanted_grad, wanted_grads = first_step(x, grad)
        np.testing.assert_array_equal(output, wanted_output)
        np.testing.assert_array_equal(layer.backward(grad, True), wanted_grad)
        for name, value in layer.grads.items():
            np.testing.assert_array_equal(value, wanted_grads[name])
    np.testing.assert_array_equal(kept, kept_copy)


@pytest.mark.parametrize(
    "backend",
    [pytest.param(name, marks=[pytest.mark.slow] if name == "mindspore" else []) for name in installed_backends()],
)
def test_dropout_between_layers_only_in_training(backend):
    """Eval mode ignores the inter-layer dropout; training applies it (masks from the loop's stream: NumPy,
    Chainer and MindSpore draw the same ones). MindSpore compiles two graphs here: slow suite."""
    spec = ut.Sequential(ut.Embedding(6, 3), ut.LSTM(3, 4, num_layers=2, batch_first=True, dropout=0.5),
                         ut.Flatten(), ut.Linear(16, 2))  # fmt: skip
    plain = ut.Sequential(ut.Embedding(6, 3), ut.LSTM(3, 4, num_layers=2, batch_first=True), ut.Flatten(),
                          ut.Linear(16, 2))  # fmt: skip
    x = np.random.default_rng(3).integers(0, 6, (3, 4))
    loop, reference = _loop(backend, spec, "float32"), _loop(backend, plain, "float32")
    atol = tolerance(np.float32, size=50)
    np.testing.assert_allclose(loop.predict(x), reference.predict(x), rtol=0, atol=atol)
    dropped, kept = loop.to_numpy(loop.forward(x)), reference.to_numpy(reference.forward(x))
    assert np.abs(dropped - kept).max() > 100 * atol


def test_token_ids_are_checked_before_any_framework_work():
    from unitrain.backends.numpy import NumpyLoop

    loop = NumpyLoop(ut.Sequential(ut.Embedding(5, 2), ut.Flatten(), ut.Linear(6, 2)))
    with pytest.raises(InputError, match=r"^0: Embedding\(num_embeddings=5.*expects integer token ids, got float32"):
        loop.predict(np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match=r"^0: Embedding\(.*token id 5 is out of range; expected 0\.\.4$"):
        loop.step((np.array([[0, 1, 5], [1, 2, 3]]), np.array([0, 1])))
    with pytest.raises(InputError, match=r"token id -1 is out of range"):
        loop.forward(np.array([[0, -1, 2]]))
    assert loop.step_count == 0
    assert loop.predict(np.array([[0, 4, 2]], np.uint8)).shape == (1, 2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ut.Embedding(0, 3), "num_embeddings must be a positive integer"),
        (lambda: ut.Embedding(4, 3, padding_idx=4), r"padding_idx must be None or an integer in -4\.\.3, got 4"),
        (lambda: ut.LSTM(3, 4, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (lambda: ut.RNN(3, 4, nonlinearity="sigmoid"), "nonlinearity must be 'tanh' or 'relu'"),
        (lambda: ut.GRU(3, 4, batch_first=1), "batch_first must be True or False"),
        (lambda: ut.Conv1d(4, 6, 3, groups=4), r"must be divisible by groups \(4\)"),
        (lambda: ut.MaxPool1d(2, padding=2), "padding 2 must be at most half the window 2"),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_shapes_and_state_keys_are_torch_nn_s():
    lstm = ut.LSTM(3, 4, num_layers=2, bias=False, bidirectional=True)
    twin = nn.LSTM(3, 4, num_layers=2, bias=False, bidirectional=True)
    assert lstm.param_shapes() == {key: tuple(value.shape) for key, value in twin.state_dict().items()}
    assert ut.Embedding(7, 3, padding_idx=-1).padding_idx == nn.Embedding(7, 3, padding_idx=-1).padding_idx == 6
    assert ut.Sequential(ut.Embedding(7, 3), ut.Linear(3, 5)).output_shape((2, 4)) == (2, 4, 5)
    assert ut.GRU(3, 4, batch_first=True, bidirectional=True).output_shape((9, 3)) == (9, 8)
    with pytest.raises(ValueError, match=r"expects per-sample input \(T, input_size\) with input_size=3"):
        ut.LSTM(3, 4, batch_first=True).output_shape((9, 5))
    assert ut.Conv1d(2, 4, 3, stride=2, padding=1).output_shape((2, 9)) == (4, 5)
    with pytest.raises(ValueError, match="input length 2 is shorter than the window"):
        ut.Conv1d(2, 4, 3).output_shape((2, 2))


def test_init_weights_follow_torch_defaults():
    spec = ut.Sequential(ut.Embedding(50, 40, padding_idx=3), ut.GRU(40, 25), ut.Conv1d(4, 6, 5, groups=2))
    state = ut.init_weights(spec, 0)
    table = state["0.weight"]
    assert not table[3].any() and abs(table.std() - 1) < 0.05 and abs(table.mean()) < 0.05  # N(0, 1), 2000 draws
    for key in ("1.weight_ih_l0", "1.weight_hh_l0", "1.bias_hh_l0"):
        assert 0.19 < np.abs(state[key]).max() <= 0.2  # U(-1/sqrt(25), 1/sqrt(25))
    assert np.abs(state["2.weight"]).max() <= 1 / np.sqrt(10)  # fan_in = 4 / 2 * 5


def test_a_run_refuses_float_data_for_an_embedding_in_one_line_before_any_framework(tmp_path):
    (tmp_path / "tokens.py").write_text(
        "import unitrain as ut\n\n\n"
        "def tagger():\n    return ut.Sequential(ut.Embedding(10, 4), ut.Flatten(), ut.Linear(4 * 6, 3))\n"
    )
    rng = np.random.default_rng(0)
    arrays = {
        f"{kind}_{split}": value
        for split in ("train", "test")
        for kind, value in (("x", rng.standard_normal((8, 2, 3)).astype(np.float32)), ("y", rng.integers(0, 3, 8)))
    }
    np.savez(tmp_path / "floats.npz", **arrays)  # fmt: skip
    command = ["train", "--dataset", "floats.npz", "--model", "tokens:tagger", "--backend", "mindspore"]
    result = subprocess.run([sys.executable, "-m", "unitrain", *command], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""  # nothing announced: no loop was built
    assert result.stderr == (
        "unitrain: error: model tokens:tagger does not take floats.npz's samples: 0: Embedding(num_embeddings=10, "
        "embedding_dim=4, padding_idx=None) expects integer token ids, got float32 input\n"
    )
