"""Hostile input to the surfaces of models and sequences: a model spec from JSON of any shape
(``unitrain.graph.from_dict``), text and token ids (``unitrain.text``), multi-model checkpoints
(``unitrain.steps``). Each is read correctly or refused in one line (``ValueError`` /
``DataError`` / ``WeightsError``) naming the value and what was expected: no other exception,
no unbounded memory."""

import json

import numpy as np
import pytest
from conftest import installed_backends
from unitrain.backends.numpy import NumpyLoop

import unitrain as ut
from unitrain import layers as L
from unitrain import ops, text
from unitrain.data import DataError
from unitrain.graph import Graph, Input, from_dict
from unitrain.loop import InputError


def _graph_dict():
    x = Input((4,), name="x")
    fc1, fc2 = L.Linear(4, 8), L.Linear(8, 2)
    return Graph(x, fc2(ops.relu(fc1(x))), {"fc1": fc1, "fc2": fc2}).to_dict()


def _nested_sequential(depth):
    entry = {"type": "Linear", "in_features": 4, "out_features": 4}
    for _ in range(depth):
        entry = {"type": "Sequential", "children": {"0": entry}}
    return entry


def _edited(change):
    data = _graph_dict()
    change(data)
    return data


GRAPH_ENTRIES = {  # JSON a file could hold where a graph entry is expected -> the message's words
    "inputs a list": (_edited(lambda d: d.__setitem__("inputs", ["x"])), "'inputs' must be a mapping"),
    "inputs null": (_edited(lambda d: d.__setitem__("inputs", None)), "'inputs' must be a mapping"),
    "modules a list": (_edited(lambda d: d.__setitem__("modules", [1])), "'modules' must be a mapping"),
    "nodes a string": (_edited(lambda d: d.__setitem__("nodes", "abc")), "'nodes' must be a list"),
    "node a number": (_edited(lambda d: d["nodes"].__setitem__(0, 5)), "a graph node must be a mapping"),
    "target a list": (_edited(lambda d: d["nodes"][0].__setitem__("target", ["fc1"])), "target must be a string"),
    "args a string": (_edited(lambda d: d["nodes"][0].__setitem__("args", "x")), "args must be a list"),
    "args nested": (_edited(lambda d: d["nodes"][0].__setitem__("args", [["x"]])), "args must be a list"),
    "kwargs a list": (_edited(lambda d: d["nodes"][0].__setitem__("kwargs", [1])), "kwargs must be a mapping"),
    "children null": ({"type": "Sequential", "children": None}, "'children' must be a mapping"),
    "3000 deep": (_nested_sequential(3000), "nests containers more than 100 deep"),
    "noise a list": (_edited(lambda d: d.__setitem__("noise", ["x"])), "'noise' must be a mapping"),
    "noise of no input": (_edited(lambda d: d.__setitem__("noise", {"eps": "normal"})), "noise 'eps' is not one of"),
    "noise kind a list": (_edited(lambda d: d.__setitem__("noise", {"x": [1]})), r"noise 'x' has kind \[1\]"),
    "only noise": (_edited(lambda d: d.__setitem__("noise", {"x": "normal"})), "every input is noise"),
    "states on a Linear": (
        _edited(lambda d: d["nodes"][0].__setitem__("kwargs", {"final_states": True})),
        "takes no argument 'final_states'; expected none",
    ),
    "getitem of a tensor": (
        _edited(lambda d: d["nodes"].__setitem__(1, {**d["nodes"][1], "target": "getitem", "kwargs": {"index": 0}})),
        "only getitem reads a recurrent layer's tuple",
    ),
}


@pytest.mark.parametrize("name", GRAPH_ENTRIES)
def test_a_model_entry_of_any_shape_is_refused_in_one_line(name):
    data, words = GRAPH_ENTRIES[name]
    with pytest.raises(ValueError, match=words) as caught:
        from_dict(data)
    assert "\n" not in str(caught.value)


def test_a_model_entry_at_the_nesting_bound_still_loads():
    assert isinstance(from_dict(_nested_sequential(99)), L.Sequential)


TEXT_CALLS = {  # a call with hostile arguments -> the message's words
    "bytes as text": (lambda: text.Vocabulary.of(b"abc"), "text must be a str"),
    "None as text": (lambda: text.language_model_data(None, 4), "text must be a str"),
    "float ids": (lambda: text.windows(np.array([0.5, 1.7, 2.2, 3.0]), 2), "integer token ids, got float64"),
    "2-d ids": (
        lambda: text.windows(np.arange(100).reshape(10, 10), 2),
        r"1-d integer token ids, got int64 \(10,",
    ),
    "negative ids": (lambda: text.windows(-np.arange(10), 2), "token id -9 is outside"),
    "671 GiB of windows": (lambda: text.windows(np.arange(10**6), 10**5, 1), "900000 windows of 100000 tokens"),
    "id past the vocabulary": (lambda: text.Vocabulary.of("abc").decode([5]), r"token id 5 is outside 0\.\.2"),
    "negative id decoded": (lambda: text.Vocabulary.of("abc").decode([-1]), r"token id -1 is outside 0\.\.2"),
    "no loss to exponentiate": (lambda: text.perplexity({"accuracy": 1.0}), "expected a loss"),
    "shipped text by list": (lambda: text.shipped_text(["tz-news"]), "no shipped text named"),
    "no sequences saved": (lambda: text.save_tokens("unused.npz", []), "at least one sequence"),
    "a 2-d sequence saved": (lambda: text.save_tokens("unused.npz", [[[1, 2], [3, 4]]]), "1-d integer token ids"),
}


@pytest.mark.parametrize("name", TEXT_CALLS)
def test_hostile_text_arguments_are_refused_in_one_line(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call, words = TEXT_CALLS[name]
    with pytest.raises(DataError, match=words) as caught:
        call()
    assert "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_perplexity_past_float64_is_infinite_as_torch_exp():
    assert text.perplexity(1e6) == float("inf") and np.isnan(text.perplexity(float("nan")))


TOKEN_FILES = {  # arrays of a token dataset -> the message's words
    "negative ids": (dict(tokens=-np.ones((3, 4), np.int64)), "token id -1 is outside"),
    "uint64 past int64": (dict(tokens=np.full((3, 4), 2**63 + 5, np.uint64)), "token id 9223372036854775813"),
    "no sequences": (dict(tokens=np.ones((0, 4), np.int64), lengths=np.zeros(0, np.int64)), "N >= 1"),
}


@pytest.mark.parametrize("name", TOKEN_FILES)
def test_hostile_token_datasets_are_refused_in_one_line(name, tmp_path):
    arrays, words = TOKEN_FILES[name]
    arrays = {"tokens": np.ones((3, 4), np.int64), "lengths": np.array([1, 2, 4]), **arrays}
    np.savez(tmp_path / "tokens.npz", **arrays)
    with pytest.raises(DataError, match=words) as caught:
        text.load_tokens(tmp_path / "tokens.npz")
    assert "\n" not in str(caught.value) and str(tmp_path / "tokens.npz") in str(caught.value)


# --- a multi-model step's checkpoint ----------------------------------------------------------


def _step_loop(seed=0, backend="numpy"):
    from unitrain import steps
    from unitrain.optim import Adam

    net = steps.Model("net")
    step = steps.MultiStep({"net": L.Sequential(L.Linear(4, 1), L.Sigmoid())},
                           {"adam": steps.OptimizerOver(Adam(0.01), ["net"])},
                           [steps.Phase("fit", steps.bce(net(steps.batch()), 1.0), "adam")])  # fmt: skip
    return steps.MultiModelLoop(step, backend, seed=seed)


def _noise(**changes):
    state = {"bit_generator": "PCG64", "state": {"state": 1, "inc": 3}, "has_uint32": 0, "uinteger": 0}
    return json.dumps({**state, **changes})


CHECKPOINT_EDITS = {  # (tensors changed, metadata changed) -> the message's words
    "negative step count": ({}, {"step_count": "-5"}, "step count '-5'; expected a whole number >= 0"),
    "fractional step count": ({}, {"step_count": "1.5"}, "step count '1.5'"),
    "noise null": ({}, {"noise": "null"}, "noise stream is not a PCG64 state: the value: expected an object"),
    "noise a number": ({}, {"noise": "NaN"}, "noise stream is not a PCG64 state"),
    "noise of another generator": ({}, {"noise": _noise(bit_generator="MT19937")}, "expected one of 'PCG64'"),
    "noise state a string": ({}, {"noise": _noise(state={"state": "x", "inc": 3})}, "field 'state.state'"),
    "noise 100k deep": ({}, {"noise": "[" * 100_000 + "]" * 100_000}, "noise stream is not a PCG64 state"),
    "optimizer step -1": ({"net/optimizer/step": np.array(-1)}, {}, "'step' must be one whole number >= 0"),
    "optimizer step a vector": ({"net/optimizer/step": np.zeros(3, np.int64)}, {}, "'step' must be one whole"),
}


@pytest.mark.parametrize("name", CHECKPOINT_EDITS)
def test_a_tampered_multi_model_checkpoint_is_refused_in_one_line(name, tmp_path):
    from unitrain.weights import WeightsError, load_safetensors, save_safetensors

    tensors_changed, metadata_changed, words = CHECKPOINT_EDITS[name]
    _step_loop().save_checkpoint(tmp_path / "good.safetensors")
    tensors, metadata = load_safetensors(tmp_path / "good.safetensors")
    save_safetensors(tmp_path / "bad.safetensors", {**tensors, **tensors_changed}, {**metadata, **metadata_changed})
    resumed = _step_loop(seed=1)
    with pytest.raises(WeightsError, match=words) as caught:
        resumed.load_checkpoint(tmp_path / "bad.safetensors")
    assert "\n" not in str(caught.value) and str(tmp_path / "bad.safetensors") in str(caught.value)
    assert resumed.step_count == 0


def _everything(multi):
    """Each model's weights, optimizer state, step count and random stream, and the noise stream."""
    return {(name, part, key): np.array(value) for name, loop in multi.loops.items()
            for part, state in (("w", loop.state_dict()), ("o", loop.optimizer_state_dict()),
                                ("r", loop.random_state()), ("n", {"step": loop.step_count}))
            for key, value in state.items()} | {("noise",): np.array(json.dumps(multi.noise.state()))}  # fmt: skip


@pytest.mark.parametrize("backend", installed_backends())
@pytest.mark.parametrize("part", ["optimizer", "random"])
def test_a_multi_model_checkpoint_refused_at_a_later_part_leaves_every_loop_as_it_was(backend, part, tmp_path):
    """The weights come first in the file: a refused optimizer state or random stream used to
    leave them loaded. Every part is checked before any is assigned."""
    from unitrain.weights import WeightsError, load_safetensors, save_safetensors

    trained = _step_loop(backend=backend)
    batch = np.random.default_rng(0).random((6, 4), np.float32)
    trained.step(batch)
    trained.save_checkpoint(tmp_path / "good.safetensors")
    tensors, metadata = load_safetensors(tmp_path / "good.safetensors")
    (random_key,) = [key for key in tensors if key.startswith("net/random/")]
    bad = {"optimizer": {"net/optimizer/step": np.array(-1)}, "random": {random_key: np.zeros(3, np.uint8)}}[part]
    save_safetensors(tmp_path / "bad.safetensors", {**tensors, **bad}, metadata)
    live = _step_loop(seed=1, backend=backend)
    live.step(batch)
    before = _everything(live)
    with pytest.raises(WeightsError, match=f"net {part}"):
        live.load_checkpoint(tmp_path / "bad.safetensors")
    after = _everything(live)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    live.load_checkpoint(tmp_path / "good.safetensors")
    loaded, expected = _everything(live), _everything(trained)
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


# --- a --model function returning a torch module ------------------------------------------------

TORCH_FACTORIES = {  # the function's body (torch, nn, sys imported; X a batch of two images) -> the line's words
    "a 1-tuple": (
        "return (net(),)",
        "returned a tuple of 1 items; expected a torch module",
    ),
    "a 3-tuple": ("return (net(), X, 'extra')", "returned a tuple of 3 items"),
    "NaN weights": ("m = net()\n    m[1].weight.data.fill_(float('nan'))\n    return m, X", "1.weight holds NaN or"),
    "complex weights": (
        "return nn.Sequential(nn.Flatten(), nn.Linear(784, 10, dtype=torch.complex64)), X.cfloat()",
        "1.weight holds complex values; expected finite real weights",
    ),
    "forward exits": ("return Exits(), X", "torch.fx cannot trace Exits.forward: it called sys.exit(0)"),
}
TORCH_MODULE = """
import sys
import torch
from torch import nn

X = torch.zeros(2, 1, 28, 28)


def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


class Exits(nn.Module):
    def forward(self, x):
        sys.exit(0)


def build():
    {body}
"""


@pytest.mark.parametrize("name", TORCH_FACTORIES)
def test_a_torch_model_that_cannot_be_imported_is_one_line_and_exit_2(name, tmp_path, monkeypatch, capsys):
    """A 1-tuple raised IndexError; NaN weights trained to NaN; complex weights lost their imaginary
    parts with a warning; a forward calling sys.exit(0) ended unitrain with exit code 0."""
    pytest.importorskip("torch")
    from test_hostile_runs import one_error_line, run_cli

    body, words = TORCH_FACTORIES[name]
    monkeypatch.chdir(tmp_path)
    module = "torch_factory_" + name.replace(" ", "_").replace("-", "_")
    (tmp_path / f"{module}.py").write_text(TORCH_MODULE.format(body=body))
    status, out, err = run_cli(capsys, "train", "--model", f"{module}:build", "--epochs", "0")
    assert status == 2 and out == ""
    one_error_line(err, f"model '{module}:build': " + ("" if "tuple" in name else "from_torch: ") + words)


# --- batches: none of the samples, or none of the targets, count --------------------------------


@pytest.mark.parametrize("what", ["step", "evaluate"])
def test_a_batch_whose_every_target_is_ignored_is_refused_in_one_line(what):
    """A mean over no targets divided by zero (ZeroDivisionError) in step and evaluate."""
    loop = NumpyLoop(L.Sequential(L.Linear(4, 3)), loss=ut.CrossEntropyLoss(), optimizer=ut.SGD(lr=0.1), seed=0)
    with pytest.raises(InputError, match=r"every target of the batch is ignore_index=-100") as caught:
        getattr(loop, what)((np.zeros((2, 4)), np.full(2, -100)))
    assert "\n" not in str(caught.value)


def test_an_empty_batch_is_refused_in_one_line():
    loop = NumpyLoop(L.Sequential(L.Linear(4, 3)), loss=ut.CrossEntropyLoss(), optimizer=ut.SGD(lr=0.1), seed=0)
    with pytest.raises(InputError, match="a batch must hold at least one sample, got 0"):
        loop.step((np.zeros((0, 4)), np.zeros(0, np.int64)))


def test_several_arrays_where_a_model_takes_one_are_refused_in_one_line():
    """np.asarray stacked a list or tuple of same-shape arrays: ``predict([x1, x2])`` of a model
    on rows of 4 values returned outputs of shape (2, 5, 3), and a step refused the targets'
    count instead. A multi-model step refuses them too (tests/test_hostile_steps.py); rows as
    plain lists, and a list of a graph's several inputs, are what they were."""
    loop = NumpyLoop(L.Sequential(L.Linear(4, 3)), loss=ut.CrossEntropyLoss(), optimizer=ut.SGD(lr=0.1), seed=0)
    x, y = np.ones((5, 4), np.float32), np.zeros(5, np.int64)
    expected = "^the model takes one input, an array of shape \\(N, ...\\); got a {} of 2 arrays of shapes \\(5, 4\\), "
    for several in ([x, x], (x, x)):
        words = expected.format(type(several).__name__)
        for method, argument in ((loop.predict, several), (loop.step, (several, y)), (loop.forward, several)):
            with pytest.raises(InputError, match=words) as caught:
                method(argument)
            assert "\n" not in str(caught.value)
    assert loop.step_count == 0
    assert np.array_equal(loop.predict(x.tolist()), loop.predict(x))
    a, b = Input((4,), name="a"), Input((4,), name="b")
    fc = L.Linear(4, 3)
    two = NumpyLoop(Graph([a, b], fc(a + b), {"fc": fc}), loss=ut.CrossEntropyLoss(), optimizer=ut.SGD(lr=0.1))
    assert np.array_equal(two.predict([x, x]), two.predict((x, x)))


def test_sequence_lengths_are_checked_against_the_batchs_padded_axis():
    """Lengths were checked against the padded axis the graph declared (6), not the batch's: 5 for
    3 steps raised IndexError inside the recurrent layer; 9 for 9 steps was refused."""
    tokens, lengths = Input((6,), name="tokens"), Input((), name="lengths")
    modules = {"embedding": ut.Embedding(5, 3), "lstm": ut.LSTM(3, 4, batch_first=True), "head": L.Linear(4, 2)}
    h = modules["lstm"](modules["embedding"](tokens), lengths)
    graph = Graph([tokens, lengths], modules["head"](h).permute(0, 2, 1), modules=modules)
    loop = NumpyLoop(graph, loss=ut.CrossEntropyLoss(), optimizer=ut.SGD(lr=0.1), seed=0)
    with pytest.raises(InputError, match=r"^input 'lengths': sequence length 5 is outside 1\.\.3 \(the padded axis"):
        loop.predict((np.ones((2, 3), np.int64), np.array([5, 5])))
    assert loop.predict((np.ones((2, 9), np.int64), np.array([9, 4]))).shape == (2, 2, 9)


def test_a_permutation_naming_an_axis_the_batch_lacks_is_refused():
    """dims [0, 5, 1] of a rank-3 batch were taken modulo 3 (as [0, 2, 1]) where PyTorch refuses them."""
    data = {"type": "Graph", "inputs": {"x": [4, 6]}, "modules": {}, "outputs": ["p"],
            "nodes": [{"name": "p", "op": "call_function", "target": "permute", "args": ["x"],
                       "kwargs": {"dims": [0, 5, 1]}}]}  # fmt: skip
    with pytest.raises(ValueError, match=r"dims must order all 3 axes with the batch axis 0 first, got \(0, 5, 1\)"):
        from_dict(data)
    assert from_dict({**data, "nodes": [{**data["nodes"][0], "kwargs": {"dims": [0, -1, 1]}}]}).output_shape(
        (4, 6)
    ) == (6, 4)


def _nested_list(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda data: data.pop("models"), "KeyError: 'models'"),
        (lambda data: data.__setitem__("optimizers", None), "TypeError: 'NoneType' object is not iterable"),
        (lambda data: data["phases"][0].__setitem__(1, []), "IndexError"),
        (lambda data: data["phases"][0].__setitem__(1, _nested_list(5000)), "RecursionError"),
    ],
    ids=["no models", "optimizers null", "an empty loss", "a loss 5000 deep"],
)
def test_a_multi_step_from_json_of_another_shape_is_one_line(change, words):
    from unitrain import steps

    data = json.loads(json.dumps(_step_loop().step_spec.to_dict()))
    change(data)
    with pytest.raises(ValueError, match=f"the data does not fit to_dict's models, optimizers and phases: {words}"):
        steps.MultiStep.from_dict(data)
