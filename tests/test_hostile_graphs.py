"""Hostile graphs from the command line: a ``--model`` function that reads a graph's JSON file
(``Graph.from_dict``), as a user keeps one, run as ``unitrain train``. Each file is trained or
refused in one line with exit code 2 (no traceback) before any data loads; the spec-level cases
of any JSON shape are in ``test_hostile_models.py``."""

import json

import numpy as np
import pytest
from test_hostile_runs import one_error_line, run_cli

from unitrain import layers as L
from unitrain import ops
from unitrain.graph import Graph, Input, from_dict

READER = """
import json, os
from unitrain.graph import Graph


def build():
    with open(os.environ["GRAPH_JSON"]) as file:
        return Graph.from_dict(json.load(file))
"""


def _mnist_graph() -> dict:
    x = Input((1, 28, 28), name="x")
    fc1, fc2 = L.Linear(784, 16), L.Linear(16, 10)
    return Graph(x, fc2(ops.relu(fc1(x.flatten(1)))), {"fc1": fc1, "fc2": fc2}).to_dict()


def _relu_chain(length: int, reverse: bool) -> dict:
    """fc1, then ``length`` relus, then fc2; the node list in reverse when ``reverse`` (any order
    is sorted topologically, as the docs promise)."""
    data = _mnist_graph()
    chain, previous = [], "fc1"
    for index in range(length):
        chain.append({"name": f"r{index}", "op": "call_function", "target": "relu", "args": [previous], "kwargs": {}})
        previous = f"r{index}"
    flatten, fc1, _, fc2 = data["nodes"]
    data["nodes"] = [flatten, fc1, *chain, {**fc2, "args": [previous]}]
    if reverse:
        data["nodes"].reverse()
    return data


def _nested(graph: dict, depth: int) -> dict:
    for _ in range(depth):
        graph = {"type": "Graph", "inputs": {"x": [1, 28, 28]}, "modules": {"m": graph}, "outputs": ["m"],
                 "nodes": [{"name": "m", "op": "call_module", "target": "m", "args": ["x"], "kwargs": {}}]}  # fmt: skip
    return graph


def _edited(change) -> dict:
    data = _mnist_graph()
    change(data)
    return data


def _node(data, index, **changes):
    data["nodes"][index].update(changes)


GRAPH_FILES = {  # a graph file's content -> the line's words
    "a cycle": (_edited(lambda d: _node(d, 0, args=["fc2"])), "node 'flatten' is in a cycle: flatten -> fc2 -> relu"),
    "a node reading itself": (_edited(lambda d: _node(d, 2, args=["relu"])), "node 'relu' is in a cycle: relu -> relu"),
    "a dangling argument": (_edited(lambda d: _node(d, 2, args=["nowhere"])), "reads 'nowhere', which is neither"),
    "an unknown operation": (_edited(lambda d: _node(d, 2, target="frobnicate")), "unknown operation 'frobnicate'"),
    "an unknown layer": (
        _edited(lambda d: d["modules"]["fc1"].__setitem__("type", "Nonsense")),
        "unknown layer type 'Nonsense'",
    ),
    "relu of three tensors": (_edited(lambda d: _node(d, 2, args=["fc1"] * 3)), "relu takes 1 tensor inputs, got 3"),
    "add of one tensor": (_edited(lambda d: _node(d, 2, target="add")), "add takes 2 tensor inputs, got 1"),
    "a module of two tensors": (_edited(lambda d: _node(d, 1, args=["flatten"] * 2)), "takes one tensor input"),
    "a get_attr node": (_edited(lambda d: _node(d, 2, op="get_attr")), "has op 'get_attr', expected call_module"),
    "two nodes of one name": (_edited(lambda d: d["nodes"].append(dict(d["nodes"][3]))), "'fc2' is used twice"),
    "an unknown output": (_edited(lambda d: d.__setitem__("outputs", ["nope"])), "output 'nope' names neither"),
    "nested 200 deep": (_nested(_mnist_graph(), 200), "nests containers more than 100 deep"),
    "a shape as a string": (  # its characters were read as sizes
        _edited(lambda d: d["inputs"].__setitem__("x", "1x28x28")),
        "graph input 'x': shape must be a list of sizes, got '1x28x28'",
    ),
    "bias as a string": (  # "false" read as True: a bias the file did not want
        _edited(lambda d: d["modules"]["fc1"].__setitem__("bias", "false")),
        "Linear: bias must be true or false, got 'false'",
    ),
    "a feature count as a string": (
        _edited(lambda d: d["modules"]["fc1"].__setitem__("out_features", "16")),
        "Linear: out_features must be a positive integer, got '16'",
    ),
}


@pytest.fixture
def graph_file(tmp_path, monkeypatch):
    """Writes a graph's JSON where the model function ``graphreader:build`` reads it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "graphreader.py").write_text(READER)
    path = tmp_path / "graph.json"
    monkeypatch.setenv("GRAPH_JSON", str(path))

    def write(data):
        path.write_text(json.dumps(data))

    return write


def test_hostile_graph_files_are_one_line_and_exit_2_before_the_data_loads(graph_file, capsys, tmp_path):
    for name, (data, words) in GRAPH_FILES.items():
        graph_file(data)
        status, out, err = run_cli(capsys, "train", "--model", "graphreader:build", "--save", "w.safetensors")
        assert status == 2 and out == "", name
        one_error_line(err, "argument --model: model 'graphreader:build': build() raised ValueError: ")
        assert words in err and not (tmp_path / "w.safetensors").exists(), name


def test_a_long_chain_listed_in_reverse_is_sorted_as_the_docs_promise():
    """The topological sort recursed once per node: 20,000 relus listed last-first raised RecursionError
    (listed first-first, the same graph loaded)."""
    forward, backward = (from_dict(_relu_chain(20_000, reverse)) for reverse in (False, True))
    assert [node.name for node in backward.nodes] == [node.name for node in forward.nodes]


def test_a_cycle_through_a_long_chain_is_named_in_a_short_line():
    data = _relu_chain(3_000, reverse=True)
    data["nodes"][-1]["args"] = ["r2999"]  # flatten now reads the chain's end: a cycle of 3,002 nodes
    with pytest.raises(ValueError) as caught:
        from_dict(data)
    assert str(caught.value) == ("Graph: node 'r2999' is in a cycle: r2999 -> r2998 -> r2997 -> r2996 -> r2995 -> "
                                 "... 2993 more ... -> r1 -> r0 -> fc1 -> flatten -> r2999")  # fmt: skip


@pytest.mark.parametrize("flag", ["bias", "count_include_pad", "batch_first"])
def test_every_true_or_false_field_of_a_layer_entry_refuses_another_type(flag):
    kind = {"bias": "Linear", "count_include_pad": "AvgPool2d", "batch_first": "LSTM"}[flag]
    entry = {"Linear": {"in_features": 4, "out_features": 2}, "AvgPool2d": {"kernel_size": 2},
             "LSTM": {"input_size": 4, "hidden_size": 2}}[kind]  # fmt: skip
    for value in ("false", 0, 1, [True]):
        with pytest.raises(ValueError, match=f"^{kind}: {flag} must be true or false, got "):
            from_dict({"type": kind, **entry, flag: value})
    assert getattr(from_dict({"type": kind, **entry, flag: False}), flag) is False


def test_a_recipe_naming_a_graph_reader_reports_its_file_in_one_line(graph_file, tmp_path, capsys):
    graph_file(GRAPH_FILES["bias as a string"][0])
    (tmp_path / "run.toml").write_text('model = "graphreader:build"\n')
    status, _, err = run_cli(capsys, "train", "run.toml")
    assert status == 2
    one_error_line(err, "Linear: bias must be true or false, got 'false'")


def test_a_graph_mindspore_cannot_compile_is_refused_before_it_compiles(graph_file, capsys, tmp_path):
    """MindSpore's graph mode unrolls a graph into about two nested calls per node, within its limit
    of 1,000: 500 nodes raised a RuntimeError of 20 lines at the first step and left
    rank_0/om/analyze_fail.ir in the current directory."""
    pytest.importorskip("mindspore")
    import unitrain
    from unitrain.registry import BackendError

    data = _relu_chain(460, reverse=False)
    with pytest.raises(BackendError, match=r"^the mindspore backend compiles .* this one needs about 926; use fewer"):
        unitrain.make_loop("mindspore", from_dict(data))
    graph_file(data)
    status, _, err = run_cli(capsys, "train", "--backend", "mindspore", "--model", "graphreader:build")
    assert status == 2
    one_error_line(err, "unitrain: error: the mindspore backend compiles a model's layers and graph nodes into about")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["graph.json", "graphreader.py"]
    assert unitrain.make_loop("mindspore", from_dict(_relu_chain(100, reverse=False)))  # built; compiles 3 s


def _deep_chain(length: int, width: int) -> Graph:
    x = Input((16,), name="x")
    first, last = L.Linear(16, width), L.Linear(width, 2)
    h = first(x)
    for _ in range(length):
        h = ops.relu(h)
    return Graph(x, last(h), {"first": first, "last": last})


@pytest.mark.parametrize("backend", ["numpy", "chainer"])
def test_evaluating_a_deep_graph_holds_a_few_values_at_a_time(backend):
    """Every node's value was held until the graph's end: a chain of 100 ReLUs over a batch of 1000x4096
    held 1.6 GB on NumPy (1.7 GB on Chainer, 1.9 GB on PyTorch) where the same Sequential held 76 MB.
    NumPy's arrays (Chainer's too) are traced by tracemalloc: the peak counts the values alive at once."""
    import tracemalloc

    pytest.importorskip(backend)
    import unitrain

    loop = unitrain.make_loop(backend, _deep_chain(50, 1024), seed=0)
    x = np.zeros((500, 16), np.float32)
    loop.predict(x[:2])  # the first call's one-time allocations
    tracemalloc.start()
    try:
        loop.predict(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    value = 500 * 1024 * 4  # one node's value; the 50 of the chain: 102 MB
    assert peak < 8 * value, f"{peak / value:.1f} values alive at once"


def test_a_torch_graph_lets_go_of_each_value_its_last_reader_has_read():
    torch = pytest.importorskip("torch")
    import gc

    import unitrain

    loop = unitrain.make_loop("torch", _deep_chain(50, 1024), seed=0)
    alive = []

    def count(module, args):
        gc.collect()
        tensors = [obj for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)]
        alive.append(sum(1 for tensor in tensors if tensor.shape[-1:] == (1024,)))

    loop.model.get_submodule("last").register_forward_pre_hook(count)
    loop.predict(np.zeros((8, 16), np.float32))
    assert alive and alive[0] <= 3, alive  # the last ReLU's value (and the weights of first, 1024 x 16)
