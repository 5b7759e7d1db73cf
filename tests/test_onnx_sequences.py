"""ONNX export of sequence models: Embedding as ``Gather``, RNN/LSTM/GRU as ONNX's own operators (gates
reordered, one node per layer, lengths as ``sequence_lens``, states as ``initial_h``/``initial_c`` and
``Y_h``/``Y_c``), Linear on ``(N, T, features)``.

Each export passes ``onnx.checker``'s full check, and onnxruntime's outputs lie within PyTorch's own
float32 drift (torch backend, float32 against float64, times sqrt of the longest sum:
``drift_tolerances``) of the float64 run of the same weights, as the NumPy and torch backends'
float32 ``predict`` do; an exporter that stacks the gates in PyTorch's order fails that bound."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from test_sequence_states import seq2seq
from torch_reference import assert_within_drift, drift_tolerances
from unitrain.conformance.checks import longest_sum

import unitrain as ut
from unitrain import ops, padded
from unitrain.convert import convert
from unitrain.graph import Graph, Input
from unitrain.sequences import GRU, LSTM, _Recurrent
from unitrain.weights import WeightsError, save_safetensors

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
from unitrain import onnx_export, onnx_recurrent  # noqa: E402  (they import onnx)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BATCH = 6


def char_lm() -> Graph:
    """examples/char_lm.py's model at its own widths (embedding 32, hidden 128), on windows of 16."""
    spec = importlib.util.spec_from_file_location("examples_char_lm", EXAMPLES / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.char_lm(30, 16, 32, 128)


def lstm_classifier() -> Graph:
    """The sentiment tutorials' bidirectional 2-layer LSTM over padded token ids, started from given
    states, classified on ``cat(h_n[-2], h_n[-1])``; its output (zero past each length) and ``c_n``
    are outputs too."""
    tokens, lengths = Input((12,), name="tokens"), Input((), name="lengths")
    h0, c0 = Input((4, 16), name="h0"), Input((4, 16), name="c0")
    modules = {"embedding": ut.Embedding(40, 8), "head": ut.Linear(32, 3),
               "lstm": ut.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True)}  # fmt: skip
    out, (h, c) = modules["lstm"](modules["embedding"](tokens), (h0, c0), lengths=lengths)
    return Graph([tokens, lengths, h0, c0], [modules["head"](ops.cat([h[-2], h[-1]], dim=1)), out, c], modules)


def gru_tagger() -> Graph:
    """A 2-layer GRU over float features from a given ``h0``, Linear at every position, ``h_n`` out."""
    x, h0 = Input((9, 5), name="x"), Input((2, 12), name="h0")
    gru, head = ut.GRU(5, 12, num_layers=2, batch_first=True), ut.Linear(12, 4)
    out, h = gru(x, h0)
    return Graph([x, h0], [head(out), h], {"gru": gru, "head": head})


def rnn(nonlinearity: str) -> ut.Sequential:
    """A time-first bidirectional 2-layer RNN in a Sequential (the loop's axis 0 is time), Linear after."""
    return ut.Sequential(ut.RNN(5, 8, num_layers=2, nonlinearity=nonlinearity, bidirectional=True), ut.Linear(16, 3))


def lstm_tagger() -> ut.Sequential:
    """Token ids into a bidirectional 2-layer LSTM (dropout between its layers) in a Sequential, Linear at
    every position."""
    return ut.Sequential(ut.Embedding(40, 8), ut.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True,
                                                      dropout=0.3), ut.Linear(32, 3))  # fmt: skip


#: a Sequential's per-sample input (it declares none): BATCH sequences of 7 steps, time first, or 12 token ids
SEQUENTIAL_INPUTS = {"rnn_tanh": (BATCH, 5), "rnn_relu": (BATCH, 5), "lstm_tagger": (12,)}


def conv_classifier() -> Graph:
    """A convolutional text classifier: token embeddings as channels, Conv1d (grouped, strided, dilated),
    every 1-d pool, Linear."""
    tokens = Input((24,), name="tokens")
    embedding, head = ut.Embedding(40, 8), ut.Linear(12, 3)
    body = ut.Sequential(ut.Conv1d(8, 6, 3, padding=1), ut.ReLU(), ut.MaxPool1d(2),
                         ut.Conv1d(6, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                         ut.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), ut.AdaptiveAvgPool1d(2),
                         ut.Flatten())  # fmt: skip
    return Graph(tokens, head(body(embedding(tokens).permute(0, 2, 1))), {"embedding": embedding, "body": body,
                                                                         "head": head})  # fmt: skip


CASES = {"char_lm": char_lm, "lstm_classifier": lstm_classifier, "gru_tagger": gru_tagger, "seq2seq": seq2seq,
         "rnn_tanh": lambda: rnn("tanh"), "rnn_relu": lambda: rnn("relu"), "lstm_tagger": lstm_tagger,
         "conv_classifier": conv_classifier}  # fmt: skip


def _inputs(case_name, model, rng) -> list[np.ndarray]:
    """A batch for the case ``case_name``: token ids within the table, lengths 1..T (the longest among them), floats."""
    if not isinstance(model, Graph):
        embedding = next(model.named_layers())[1]
        if isinstance(embedding, ut.Embedding):
            return [rng.integers(0, embedding.num_embeddings, (BATCH, *SEQUENTIAL_INPUTS[case_name]))]
        return [rng.normal(size=(7, *SEQUENTIAL_INPUTS[case_name])).astype(np.float32)]
    roles = padded.input_roles(model)
    batch = []
    for name, shape in model.data_inputs:
        role = roles.get(name)
        if role is not None and role.kind == "ids":
            batch.append(rng.integers(0, role.layer.num_embeddings, (BATCH, *shape)))
        elif role is not None:
            batch.append(np.append(role.steps, rng.integers(1, role.steps + 1, BATCH - 1)))
        else:
            batch.append(rng.normal(size=(BATCH, *shape)).astype(np.float32))
    return batch


def _loop(backend, model, dtype="float32"):
    outputs = len(model.outputs) if isinstance(model, Graph) else 1
    loss = ut.PerOutputLoss(*[ut.MSELoss()] * outputs) if outputs > 1 else None
    return ut.make_loop(backend, model, loss, seed=3, dtype=dtype)


def _as_dict(outputs) -> dict[str, np.ndarray]:
    return {f"out{index}": value for index, value in enumerate(outputs if isinstance(outputs, tuple) else (outputs,))}


def _export(model, state, batch, tmp_path):
    """``model`` with ``state`` as ONNX, full-checked, and an onnxruntime session of it: a graph through
    the file converter ``unitrain convert`` runs, a Sequential (no declared input shape) directly."""
    if isinstance(model, Graph):
        save_safetensors(tmp_path / "w.safetensors", state)
        convert(tmp_path / "w.safetensors", tmp_path / "m.onnx", model)
        exported = onnx.load(tmp_path / "m.onnx")
    else:
        exported = onnx_export.to_onnx(model, state, batch[0].shape[1:])
        onnx.save(exported, tmp_path / "m.onnx")
    onnx.checker.check_model(exported, full_check=True)  # every node's shapes and types inferred
    return exported, onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """A case's model, weights, batch, the float64 run of it (torch backend) and the tolerances its
    float32 run's drift gives (sqrt of the longest sum times the drift, at least one rounding)."""
    model = CASES[request.param]()
    batch = _inputs(request.param, model, np.random.default_rng(0))
    torch32 = _loop("torch", model)
    state = torch32.state_dict()
    torch64 = _loop("torch", model, "float64")
    torch64.load_state_dict(state)
    x = batch[0] if len(batch) == 1 else tuple(batch)
    exact = _as_dict(torch64.predict(x))
    shape = model.input_shapes if isinstance(model, Graph) and len(batch) > 1 else batch[0].shape[1:]
    tolerances = drift_tolerances([_as_dict(torch32.predict(x))], exact, longest_sum(model, shape, BATCH))
    return request.param, model, state, batch, exact, tolerances


def test_exports_run_as_unitrain_predicts(case, tmp_path):
    _, model, state, batch, exact, tolerances = case
    exported, session = _export(model, state, batch, tmp_path)
    recurrent = [node.op_type for node in exported.graph.node if node.op_type in ("LSTM", "GRU", "RNN")]
    layers = [layer for _, layer in model.named_layers() if isinstance(layer, _Recurrent)]
    assert len(recurrent) == sum(layer.num_layers for layer in layers)  # ONNX's own operator, one per layer
    integers = [value.type.tensor_type.elem_type == onnx.TensorProto.INT64 for value in exported.graph.input]
    assert integers == [array.dtype.kind == "i" for array in batch]  # ids and lengths are int64 inputs
    got = _as_dict(tuple(session.run(None, dict(zip([i.name for i in session.get_inputs()], batch, strict=True)))))
    assert_within_drift(got, exact, tolerances)
    x = batch[0] if len(batch) == 1 else tuple(batch)
    for backend in ("numpy", "torch"):
        loop = _loop(backend, model)
        loop.load_state_dict(state)
        ours = _as_dict(loop.predict(x))
        assert_within_drift(ours, exact, tolerances)
        assert_within_drift(got, ours, {key: 2 * value for key, value in tolerances.items()})


@pytest.mark.parametrize("case", ["char_lm", "gru_tagger", "rnn_tanh", "lstm_tagger"], indirect=True)
def test_onnxs_reference_implementation_computes_the_same(case, tmp_path):
    """onnx.reference, the operators' definitions in NumPy and no runtime's kernels, agrees within the same
    bound: the gate order and GRU's equation are the spec's, not only onnxruntime's. (It ignores
    ``sequence_lens`` and knows no ``Relu`` for RNN, so the cases with lengths and ReLU are onnxruntime's
    alone.)"""
    from onnx.reference import ReferenceEvaluator

    _, model, state, batch, exact, tolerances = case
    exported, _ = _export(model, state, batch, tmp_path)
    names = [value.name for value in exported.graph.input]
    got = _as_dict(tuple(ReferenceEvaluator(exported).run(None, dict(zip(names, batch, strict=True)))))
    assert_within_drift(got, exact, tolerances)


def _gates_in_pytorchs_order(kind):
    def breaks(monkeypatch):
        monkeypatch.setitem(onnx_recurrent.GATE_ORDER, kind, tuple(range(kind.gates)))

    return breaks


def _reset_gate_before_the_product(monkeypatch):  # ONNX's default GRU, not PyTorch's equation
    attributes = onnx_recurrent._attributes
    monkeypatch.setattr(onnx_recurrent, "_attributes", lambda layer: {**attributes(layer), "linear_before_reset": 0})


BROKEN = {"lstm_gates_unordered": _gates_in_pytorchs_order(LSTM), "gru_gates_unordered": _gates_in_pytorchs_order(GRU),
          "gru_linear_after_reset": _reset_gate_before_the_product}  # fmt: skip


@pytest.mark.parametrize(("case", "broken"), [("char_lm", "lstm_gates_unordered"),
                         ("lstm_classifier", "lstm_gates_unordered"), ("gru_tagger", "gru_gates_unordered"),
                         ("gru_tagger", "gru_linear_after_reset")], indirect=["case"])  # fmt: skip
def test_a_wrong_gate_order_or_equation_fails_the_bound(case, broken, monkeypatch, tmp_path):
    """The same comparison catches an exporter that leaves the gates in PyTorch's order, or gives GRU
    ONNX's default equation (reset gate before ``R_h``); measured: 8e4 to 5e5 times the bound."""
    _, model, state, batch, exact, tolerances = case
    BROKEN[broken](monkeypatch)
    _, session = _export(model, state, batch, tmp_path)
    got = _as_dict(tuple(session.run(None, dict(zip([i.name for i in session.get_inputs()], batch, strict=True)))))
    with pytest.raises(AssertionError, match="max difference"):
        assert_within_drift(got, exact, tolerances)


def test_a_sequential_that_does_not_fit_mnists_shape_is_refused_in_one_line(tmp_path):
    """``unitrain convert`` exports a Sequential on MNIST's per-sample shape (it declares none): a sequence
    model that does not fit it is one line naming the layer and the way out, and no file."""
    model = ut.Sequential(ut.Embedding(30, 8), ut.LSTM(8, 16, batch_first=True))
    save_safetensors(tmp_path / "w.safetensors", ut.init_weights(model, 0))
    with pytest.raises(WeightsError, match=r"^1: LSTM\(.*got per-sample shape \(1, 28, 28, 8\); a Sequential declares "
                       r"no input shape .* unless told: give its input's with --input-shape \(input_shape= from "
                       r"Python\)") as error:  # fmt: skip
        convert(tmp_path / "w.safetensors", tmp_path / "m.onnx", model)
    assert "\n" not in str(error.value) and not (tmp_path / "m.onnx").exists()
