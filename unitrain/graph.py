"""Models as graphs: any wiring of layers, as torch.fx's ``GraphModule`` holds it.

API summary::

    from unitrain import layers as L
    from unitrain.graph import Graph, Input
    from unitrain import ops

    x = Input((1, 28, 28), name="image")             # a symbolic batch: shape (None, 1, 28, 28)
    encoder = L.Sequential(L.Flatten(), L.Linear(784, 32), L.ReLU())
    decoder = L.Sequential(L.Linear(32, 784), L.Sigmoid())
    code = encoder(x)                                 # calling a layer spec records a node
    out = decoder(code).reshape(-1, 1, 28, 28)        # tensor operations record nodes too
    model = Graph(x, out, modules={"encoder": encoder, "decoder": decoder})

    model.encoder                  # the Sequential: a sub-model of its own (its weights: encoder.*)
    model.nodes                    # the flat node list, in execution order (Node: name op target args kwargs)
    Graph.from_dict(model.to_dict())  # == model: JSON-ready, every layer spec included
    loop = NumpyLoop(model); enc = loop.submodule("encoder")  # the trained encoder as a loop of its own

A :class:`Graph` is a :class:`~unitrain.layers.Container` like ``Sequential``: it holds named
modules (``children``, in ``state_dict`` order; keys are ``encoder.1.weight``, PyTorch's) and a
node list. Nodes are torch.fx's, minus ``get_attr`` and ``output``:

* ``input``: a named input with its per-sample shape (:func:`Input`);
* ``call_module``: ``target`` is a module path (``encoder`` or ``encoder.1``); calling one module
  at several nodes shares its weights (tied weights: one key in the ``state_dict``, the gradient
  is the sum over the uses, BatchNorm statistics update at each use, as in PyTorch);
* ``call_function``: ``target`` is an operation of :data:`unitrain.ops.OPS` (``cat``, ``narrow``,
  ``reshape``, ``relu``, ...), ``kwargs`` its arguments (PyTorch's names).

Two different layers can share one tensor too, as PyTorch's ``decoder.weight = encoder.weight``
(the word language model's tied embedding and output weights): ``tied={"decoder.weight":
"encoder.weight"}`` makes the key on the left the tensor on the right. The ``state_dict`` holds it
once, under its first name (as ``named_parameters`` does), and its gradient is the sum over both
layers' uses. Ties are between Linear, Embedding, Conv2d and ConvTranspose2d parameters of one
shape (:data:`TIEABLE`).

Noise inside a model (a VAE's ``mu + ops.randn_like(logvar) * (0.5 * logvar).exp()``) is an input
of the graph, listed in ``noise`` after the data inputs, that the loop fills from its seeded stream
(:mod:`unitrain.graph_noise`); a batch's ``x`` holds the data inputs only. A graph that draws noise,
called as a module on its data inputs only, lifts its noise inputs into the caller's (one set per
call, in the order the caller's nodes meet them).

``outputs`` names the output nodes: one (predictions are an array) or several (a tuple, in this
order; train them with :class:`~unitrain.losses.PerOutputLoss`, one loss per output, summed).
Several inputs take a batch ``x`` that is a tuple in ``inputs`` order or a dict by input name.

Two ways to build one, checked alike: calling layer specs and operations on symbolic tensors
(:mod:`unitrain.ops`, as Keras' functional API), or :meth:`Graph.from_nodes` with the node list
itself (what ``from_dict`` and importers use). A layer called but not named in ``modules`` is
refused, except a weightless activation (``ReLU()(x)``), which becomes its function (``relu``).

Construction refuses, in one line naming the node: a cycle, an argument that names no input or
node (a dangling input), an input no output uses, a node no output uses, an output that depends
on no input, a module never called, and any shape clash (inferred from the inputs' shapes through
every node, with both shapes in the message).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

from . import layers, ops, padded, sequences
from .layers import Container, Layer, Shape
from .ops import Tensor

_NAME = re.compile(r"[A-Za-z_]\w*")
_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def Input(shape: Sequence[int], name: str = "input") -> Tensor:
    """A graph input: a batch of samples of per-sample ``shape`` (the batch axis is implied; ``()``:
    one number per sample, such as each sequence's length, :mod:`unitrain.padded`)."""
    shape = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"Input {name!r}: shape must be per-sample sizes (positive integers), got {shape}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"Input: name must be an identifier, got {name!r}")
    return Tensor("input", name, (), {}, shape)


def _frozen(value):
    """Keyword arguments as hashable values (lists become tuples)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _plain(value):
    """The inverse of :func:`_frozen`, for JSON (tuples become lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Node:
    """One step of a graph, as a torch.fx node: ``op`` is ``"call_module"`` or
    ``"call_function"``; ``args`` name its tensor inputs (graph inputs or earlier nodes)."""

    name: str
    op: str
    target: str
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def options(self) -> dict:
        return dict(self.kwargs)

    def __str__(self):
        extra = "".join(f", {key}={value!r}" for key, value in self.kwargs)
        return f"%{self.name} = {self.op}[{self.target}](%{', %'.join(self.args)}{extra})"


@dataclass(frozen=True, init=False)
class Graph(Container):
    """A directed acyclic graph of layer calls and tensor operations (see the module doc)."""

    inputs: tuple[tuple[str, Shape], ...]
    children: tuple[tuple[str, Layer], ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    #: each node's per-sample output shape, inferred from the inputs' shapes
    shapes: dict = field(compare=False, repr=False)
    #: the weights every loop starts from instead of ``init_weights``' draws (an imported model's own:
    #: ``unitrain.from_torch``); not part of the spec's value or its JSON
    initial_state: dict | None = field(default=None, compare=False, repr=False)
    #: ``(key, source)`` pairs: the parameter ``key`` is the tensor ``source`` (see the module doc)
    tied: tuple[tuple[str, str], ...] = ()
    #: ``(input, kind)`` pairs: the inputs that are noise (:func:`~unitrain.ops.randn_like`), which
    #: the loop fills (:mod:`unitrain.graph_noise`); they come after the data inputs
    noise: tuple[tuple[str, str], ...] = ()

    def __init__(self, inputs, outputs, modules: Mapping[str, Layer] | None = None, *,
                 initial_state: Mapping | None = None, tied: Mapping[str, str] | None = None):  # fmt: skip
        """``inputs``: a :func:`Input` tensor or a sequence of them; ``outputs``: a tensor or a
        sequence of them (several outputs); ``modules``: name -> layer spec for every layer
        called (weightless activations excepted), in ``state_dict`` order; ``initial_state``:
        the weights to start from (``state_dict`` keys and shapes); ``tied``: parameter key ->
        the key of the tensor it is (``{"decoder.weight": "encoder.weight"}``)."""
        input_tensors = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        output_tensors = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        modules = dict(modules or {})
        paths = _module_paths(modules)
        for tensor in (*input_tensors, *output_tensors):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"Graph: inputs and outputs must be symbolic Tensors, got {type(tensor).__name__}")
        for tensor in input_tensors:
            if tensor.op != "input":
                raise ValueError(f"Graph: {tensor} is not an Input; inputs must come from unitrain.graph.Input")
        names, nodes, taken, noise = {}, [], {tensor.target for tensor in input_tensors}, []
        for tensor in input_tensors:
            names[id(tensor)] = tensor.target
        for tensor in _walk(output_tensors):
            if tensor.op == "noise":  # torch.fx's name for it: randn_like, rand_like
                names[id(tensor)] = _fresh("randn_like" if tensor.target == "normal" else "rand_like", taken)
                noise.append((names[id(tensor)], tensor.target, tensor.sample_shape))
                continue
            if tensor.op == "input":
                if id(tensor) not in names:
                    raise ValueError(f"Graph: an output depends on input {tensor.target!r}, which is not among "
                                     f"the graph's inputs {[t.target for t in input_tensors]}")  # fmt: skip
                continue
            op, target, kwargs = tensor.op, tensor.target, tensor.kwargs
            if op == "call_module":
                path = paths.get(id(target))
                if path is None:
                    function = _as_function(target)
                    if function is None:
                        raise ValueError(
                            f"Graph: {target} is called but not named in modules; name it "
                            "(modules={'name': layer}) so its weights have state_dict keys"
                        )
                    op, target, kwargs = "call_function", *function
                else:
                    target = path
            name = _fresh(
                re.sub(r"^(?=\d)", "_", target.replace(".", "_")), taken
            )  # torch.fx's names: 0.conv -> _0_conv
            names[id(tensor)] = name
            args = tuple(names[id(arg)] for arg in tensor.args)
            nodes.append(Node(name, op, target, args, tuple((k, _frozen(v)) for k, v in kwargs.items())))
        for tensor in _walk(output_tensors):
            items = getattr(tensor, "_items", None)  # the call itself and its unpacked items: two calls
            if items is not None and id(items[0].args[0]) in names:
                raise ValueError(f"Graph: {tensor.target} is used both as its call and unpacked (out, h = "
                                 "layer(x)); use the unpacked output, or the layer would run twice")  # fmt: skip
        input_specs = [(tensor.target, tensor.sample_shape) for tensor in input_tensors]
        input_specs += [(name, shape) for name, _, shape in noise]
        self._setup(input_specs, tuple(modules.items()), nodes, [names[id(tensor)] for tensor in output_tensors],
                    tied, {name: kind for name, kind, _ in noise})  # fmt: skip
        if initial_state is not None:
            shapes = self.state_shapes()
            state = dict(initial_state)
            if list(state) != list(shapes) or any(tuple(state[k].shape) != shapes[k] for k in shapes):
                given = {key: tuple(value.shape) for key, value in state.items()}
                raise ValueError(f"Graph: initial_state has {given}, the modules' state_dict {shapes}")
            object.__setattr__(self, "initial_state", state)

    @classmethod
    def from_nodes(cls, inputs: Mapping[str, Sequence[int]], nodes: Sequence[Node], outputs: Sequence[str],
                   modules: Mapping[str, Layer] | None = None, tied: Mapping[str, str] | None = None,
                   noise: Mapping[str, str] | None = None) -> Graph:  # fmt: skip
        """A graph from its node list (any order; sorted topologically), as torch.fx holds one;
        ``noise``: which of ``inputs`` are noise, and of which kind (``"normal"``, ``"uniform"``)."""
        graph = cls.__new__(cls)
        nodes = [node if isinstance(node, Node) else Node(**node) for node in nodes]
        graph._setup([(name, tuple(shape)) for name, shape in inputs.items()], tuple(dict(modules or {}).items()),
                     nodes, list(outputs), tied, noise)  # fmt: skip
        return graph

    def _setup(self, inputs, children, nodes, outputs, tied, noise=None) -> None:
        for name, shape in inputs:
            Input(shape, name)  # validates both
        object.__setattr__(self, "noise", _check_noise([name for name, _ in inputs], dict(noise or {})))
        for name, child in children:
            if not isinstance(name, str) or not _PATH.fullmatch(name) or "." in name:
                raise ValueError(f"Graph: module name {name!r} must be a non-empty name without '.'")
            if not isinstance(child, Layer):
                raise TypeError(f"Graph: module {name!r} is {child!r}, expected a unitrain layer spec")
        seen_ids: dict[int, str] = {}
        for name, child in children:
            if id(child) in seen_ids:
                raise ValueError(f"Graph: one layer is registered twice, as {seen_ids[id(child)]!r} and {name!r}; "
                                 "call one name at several nodes to share its weights")  # fmt: skip
            seen_ids[id(child)] = name
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "children", tuple(children))
        ordered = _check_structure(self, nodes, outputs)
        object.__setattr__(self, "nodes", tuple(ordered))
        object.__setattr__(self, "outputs", tuple(outputs))
        object.__setattr__(self, "shapes", {})
        object.__setattr__(self, "shapes", self._infer([shape for _, shape in inputs], "", {}))
        object.__setattr__(self, "tied", _check_ties(self, dict(tied or {})))
        _check_lifted_noise(self)

    # --- structure ----------------------------------------------------------------------------

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.inputs)

    @property
    def data_inputs(self) -> tuple[tuple[str, Shape], ...]:
        """The inputs a batch's ``x`` holds: all but the noise."""
        noise = dict(self.noise)
        return tuple((name, shape) for name, shape in self.inputs if name not in noise)

    @property
    def input_shapes(self) -> tuple[Shape, ...]:
        return tuple(shape for _, shape in self.inputs)

    @property
    def modules(self) -> dict[str, Layer]:
        return dict(self.children)

    def _shapes(self, of) -> dict[str, Shape]:
        ties = dict(self.tied)
        return {key: shape for key, shape in super()._shapes(of).items() if key not in ties}

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: model.encoder is the module named "encoder"
        if name.startswith("_") or name in {f.name for f in fields(Graph)}:
            raise AttributeError(name)
        for child_name, child in object.__getattribute__(self, "children"):
            if child_name == name:
                return child
        raise AttributeError(f"Graph has no module or attribute {name!r}")

    def to_dict(self) -> dict:
        return to_dict(self)

    @staticmethod
    def from_dict(data: Mapping) -> Layer:
        return from_dict(data)

    def get_submodule(self, path: str) -> Layer:
        """The module at dotted ``path`` (``encoder``, ``encoder.1``), as ``nn.Module.get_submodule``."""
        return get_submodule(self, path)

    def __str__(self):
        noise = dict(self.noise)
        lines = [f"%{name} = {noise.get(name, 'input')}{list(shape)}" for name, shape in self.inputs]
        lines += [str(node) for node in self.nodes]
        return "\n".join([*lines, f"return %{', %'.join(self.outputs)}"])

    # --- shapes -------------------------------------------------------------------------------

    def infer_shapes(self, input_shapes: Sequence[Shape]) -> tuple[Shape, ...]:
        """The outputs' per-sample shapes for inputs of per-sample ``input_shapes``."""
        shapes = self._infer(input_shapes, "", {})
        return tuple(shapes[name] for name in self.outputs)

    def output_shape(self, input_shape):
        """One input: its shape; several: a tuple of shapes. One output: its shape; several: a tuple."""
        return self._trace(input_shape, "", {})

    def _trace(self, input_shape, path, seen):
        if self.noise and all(isinstance(size, int) for size in input_shape):  # one shape: a container's call
            raise ValueError(f"{path or 'Graph'}: a graph that draws noise takes it from the Graph that calls it "
                             "(unitrain.graph_noise); call it in a Graph, not in a Sequential or Residual")  # fmt: skip
        given = [tuple(input_shape)] if len(self.inputs) == 1 else [tuple(shape) for shape in input_shape]
        shapes = self._infer(given, path, seen)
        outputs = tuple(shapes[name] for name in self.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def _infer(self, input_shapes, path: str, seen: dict) -> dict[str, Shape]:
        where = f"{path}: " if path else ""
        if len(input_shapes) != len(self.inputs):
            raise ValueError(f"{where}the graph takes {len(self.inputs)} inputs {list(self.input_names)}, "
                             f"got {len(input_shapes)}")  # fmt: skip
        shapes = {}
        for (name, declared), shape in zip(self.inputs, input_shapes, strict=True):
            shape = tuple(shape)
            if len(shape) != len(declared):
                raise ValueError(f"{where}input {name!r} has per-sample shape {declared}, got {shape}")
            shapes[name] = shape
        for node in self.nodes:
            args = [shapes[arg] for arg in node.args]
            what = f"{where}node {node.name!r} ({node.target})"
            if node.op == "call_module":
                module = self.get_submodule(node.target)
                full = f"{path}.{node.target}" if path else node.target
                try:
                    if isinstance(module, Graph):
                        out = module._infer(args, full, seen)
                        shapes[node.name] = out[module.outputs[0]]
                        continue
                    if len(args) != 1 and hasattr(module, "output_shape_of"):  # a leaf of several inputs (attention)
                        shapes[node.name] = module.output_shape_of(tuple(args))
                        continue
                    if any(map(padded.is_group, args)):
                        raise ValueError(f"{module}: an input is a recurrent layer's tuple; read an item of it "
                                         "(getitem)")  # fmt: skip
                    padded.argument_roles(module, len(args), node.options)  # the inputs' count and options
                    if len(args) == 2 and not node.options and (problem := padded.lengths_problem(module, *args)):
                        raise ValueError(problem)
                    traced: dict[str, Shape] = {}  # this call's leaves only: a copy of `seen` per node is quadratic
                    shapes[node.name] = layers._trace(module, args[0], full, traced)
                    if isinstance(module, sequences._Recurrent):
                        shapes[node.name] = padded.call_shape(module, shapes[node.name], args, node.options)
                    for key, value in traced.items():  # a shared leaf: keep its fewest values per channel
                        if key not in seen or math.prod(value[1:]) <= math.prod(seen[key][1:]):
                            seen[key] = value
                except ValueError as error:  # the message starts with the module's path
                    raise ValueError(f"{where}node {node.name!r} calls {error}") from None
            else:
                if any(map(padded.is_group, args)) != (node.target == "getitem"):
                    raise ValueError(f"{what}: only getitem reads a recurrent layer's tuple (output, h_n[, c_n]), "
                                     "and it reads nothing else")  # fmt: skip
                shapes[node.name] = ops.infer(node.target, args, node.options, what)
        for name in self.outputs:
            if padded.is_group(shapes[name]):
                raise ValueError(f"{where}output {name!r} is a recurrent layer's tuple; output its items (getitem)")
        return shapes


def _check_noise(inputs: list[str], noise: dict) -> tuple[tuple[str, str], ...]:
    """``noise`` as ``(input, kind)`` pairs, or ``ValueError``: each a noise kind of an input after the data inputs."""
    for name, kind in noise.items():
        if name not in inputs:
            raise ValueError(f"Graph: noise {name!r} is not one of the inputs {inputs}")
        if kind not in ops.NOISE_KINDS:
            raise ValueError(f"Graph: noise {name!r} has kind {kind!r}; expected one of {list(ops.NOISE_KINDS)}")
    if noise and not set(inputs[-len(noise) :]) == set(noise):
        raise ValueError(f"Graph: the noise inputs {list(noise)} must come after the data inputs, got {inputs}")
    if len(noise) == len(inputs):
        raise ValueError("Graph: every input is noise; it needs at least one data input (the batch)")
    return tuple((name, noise[name]) for name in inputs if name in noise)


def _check_lifted_noise(graph: Graph) -> None:
    """A module graph's noise input, where the calling graph's noise fills it, takes noise of its kind."""
    outer = dict(graph.noise)
    for node in graph.nodes:
        module = graph.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, Graph) and module.noise:
            inner = dict(module.noise)
            for (name, _), arg in zip(module.inputs, node.args, strict=True):
                if name in inner and arg in outer and outer[arg] != inner[name]:
                    raise ValueError(f"Graph: node {node.name!r} fills {node.target}'s {inner[name]} noise "
                                     f"{name!r} with {arg!r}, which is {outer[arg]} noise")  # fmt: skip


#: the layers whose parameters a tie may share: Linear and Embedding (a language model's tied
#: embedding and output), Conv2d and ConvTranspose2d (a convolutional autoencoder's decoder as its
#: encoder's transpose: ``ConvTranspose2d(D, C)`` holds its weight as ``Conv2d(C, D)`` does, (D, C, kh, kw))
TIEABLE = (layers.Linear, sequences.Embedding, layers.Conv2d, layers.ConvTranspose2d)


#: a tie's source ending in it names its transpose: a tied autoencoder's decoder ``Linear(h, d)``
#: computing with ``encoder.weight.t()`` of its encoder ``Linear(d, h)`` is ``{"decoder.weight": "encoder.weight.T"}``
TRANSPOSED = ".T"


def tie_source(source: str) -> tuple[str, bool]:
    """A tie's source parameter key, and whether the tied parameter is its transpose (:data:`TRANSPOSED`)."""
    return (source[: -len(TRANSPOSED)], True) if source.endswith(TRANSPOSED) else (source, False)


def _check_ties(graph: Graph, tied: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """``tied`` as ``(key, source)`` pairs in ``state_dict`` order, or ``ValueError`` naming the key."""
    leaves = dict(graph.named_layers())
    params = {f"{path}.{key}": (layer, shape) for path, layer in leaves.items()
              for key, shape in layer.param_shapes().items()}  # fmt: skip
    order = list(params)
    for path, child in graph.children:
        if isinstance(child, Graph) and child.tied:
            raise ValueError(f"Graph: module {path!r} is a graph with tied weights; tie them in the outermost graph")
    for key, given in tied.items():
        source, transposed = tie_source(given) if isinstance(given, str) else (given, False)
        for name in (key, source):
            if name not in params:
                raise ValueError(f"Graph: tied {name!r} is not a parameter of the graph; expected one of {order}")
            if not isinstance(params[name][0], TIEABLE):
                raise ValueError(f"Graph: tied {name!r} belongs to {params[name][0]}; ties are between "
                                 "Linear, Embedding, Conv2d and ConvTranspose2d parameters")  # fmt: skip
        if source in tied or key == source:
            raise ValueError(f"Graph: {key!r} is tied to {source!r}, which is not a tensor of its own")
        if transposed and not all(isinstance(params[name][0], layers.Linear) and name.endswith(".weight")
                                  for name in (key, source)):  # fmt: skip
            raise ValueError(f"Graph: {key!r} is tied to the transpose of {source!r}; a transposed tie is "
                             "between two Linear weights")  # fmt: skip
        shape, wanted = params[key][1], params[source][1][::-1] if transposed else params[source][1]
        if shape != wanted:
            reversed_ = not transposed and shape == wanted[::-1]
            hint = f" (a transposed tie: tie it to {source + TRANSPOSED!r})" if reversed_ else ""
            raise ValueError(f"Graph: tied {key!r} has shape {shape}, {given!r} has {wanted}; tied weights have "
                             f"one shape{hint}")  # fmt: skip
        if order.index(source) > order.index(key):
            raise ValueError(f"Graph: tied {key!r} comes before its source {source!r} in the state_dict; register "
                             "the source's module first (PyTorch names a shared tensor by its first path)")  # fmt: skip
    return tuple(sorted(tied.items(), key=lambda pair: order.index(pair[0])))


def entry_layer(model: Container) -> tuple[str, Layer] | None:
    """``(path, leaf)`` of the layer the model's input meets first (an Embedding takes token ids):
    a container's first leaf; a graph's that of the first module node reading an input."""
    if not isinstance(model, Graph):
        return next(model.named_layers(), None)
    for node in model.nodes:
        if node.op == "call_module" and set(node.args) & set(model.input_names):
            module = model.get_submodule(node.target)
            if not isinstance(module, Container):
                return node.target, module
            inner = entry_layer(module)
            return None if inner is None else (f"{node.target}.{inner[0]}", inner[1])
    return None


def get_submodule(model: Layer, path: str) -> Layer:
    """The module of ``model`` at dotted ``path``; ``ValueError`` naming the missing part."""
    module = model
    for depth, part in enumerate(path.split(".")):
        children = module.named_children if isinstance(module, Container) else {}
        if part not in children:
            where = ".".join(path.split(".")[:depth]) or "the model"
            raise ValueError(f"no module {path!r}: {where} has modules {list(children)}")
        module = children[part]
    return module


def _module_paths(modules: Mapping[str, Layer]) -> dict[int, str]:
    """id(layer) -> dotted path, for every module and nested module (the first path wins)."""
    paths: dict[int, str] = {}

    def visit(layer, path):
        paths.setdefault(id(layer), path)
        if isinstance(layer, Container):
            for name, child in layer.children:
                visit(child, f"{path}.{name}")

    for name, layer in modules.items():
        visit(layer, name)
    return paths


def _as_function(layer: Layer):
    """A weightless activation layer as its function ``(op, kwargs)``, else None."""
    for op, kind in ops.ACTIVATIONS.items():
        if type(layer) is kind:
            return op, {f.name: getattr(layer, f.name) for f in fields(layer)}
    return None


def _walk(outputs: list[Tensor]) -> Iterator[Tensor]:
    """Every tensor the outputs depend on, each once, inputs before their users (iterative DFS)."""
    done: set[int] = set()
    for output in outputs:
        stack = [(output, False)]
        while stack:
            tensor, expanded = stack.pop()
            if id(tensor) in done:
                continue
            if expanded:
                done.add(id(tensor))
                yield tensor
                continue
            stack.append((tensor, True))
            stack.extend((arg, False) for arg in reversed(tensor.args) if id(arg) not in done)


def _fresh(base: str, taken: set[str]) -> str:
    name, index = base, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def _check_structure(graph: Graph, nodes: list[Node], outputs: list[str]) -> list[Node]:
    """The nodes in topological order (stable), or ``ValueError`` naming the offending node."""
    inputs = set(graph.input_names)
    by_name: dict[str, Node] = {}
    for node in nodes:
        if not isinstance(node.name, str) or not _NAME.fullmatch(node.name):
            raise ValueError(f"Graph: node name {node.name!r} must be an identifier")
        if node.name in by_name or node.name in inputs:
            raise ValueError(f"Graph: node name {node.name!r} is used twice")
        if node.op not in ("call_module", "call_function"):
            raise ValueError(f"Graph: node {node.name!r} has op {node.op!r}, expected call_module or call_function")
        if node.op == "call_function" and node.target not in ops.OPS:
            raise ValueError(f"Graph: node {node.name!r} calls unknown operation {node.target!r}; "
                             f"expected one of {', '.join(ops.OPS)}")  # fmt: skip
        if node.op == "call_module":
            try:
                get_submodule(graph, node.target)
            except ValueError as error:
                raise ValueError(f"Graph: node {node.name!r} calls {error}") from None
        if not node.args:
            raise ValueError(f"Graph: node {node.name!r} ({node.target}) depends on no input")
        by_name[node.name] = node
    for node in nodes:
        for arg in node.args:
            if arg not in by_name and arg not in inputs:
                raise ValueError(f"Graph: node {node.name!r} reads {arg!r}, which is neither an input nor a node "
                                 "(a dangling input)")  # fmt: skip
    if not outputs:
        raise ValueError("Graph: it needs at least one output")
    for name in outputs:
        if name not in by_name and name not in inputs:
            raise ValueError(f"Graph: output {name!r} names neither an input nor a node")
    ordered, state = [], {}  # state: 1 on the DFS path, 2 done
    for node in nodes:  # stable: the given order wherever dependencies allow
        if node.name in state:
            continue
        state[node.name] = 1
        path = [(node.name, iter(node.args))]  # iterative: a chain of any length, listed in any order
        while path:
            name, pending = path[-1]
            arg = next(pending, None)
            if arg is None:
                path.pop()
                state[name] = 2
                ordered.append(by_name[name])
            elif arg not in inputs and state.get(arg) != 2:
                if state.get(arg) == 1:
                    trail = [entry for entry, _ in path]
                    cycle = [*trail[trail.index(arg) :], arg]
                    if len(cycle) > 12:  # a line, not a page
                        cycle = [*cycle[:5], f"... {len(cycle) - 10} more ...", *cycle[-5:]]
                    raise ValueError(f"Graph: node {arg!r} is in a cycle: {' -> '.join(cycle)}")
                state[arg] = 1
                path.append((arg, iter(by_name[arg].args)))
    used = set(outputs)
    for node in reversed(ordered):
        if node.name in used:
            used.update(node.args)
    for node in ordered:
        if node.name not in used:
            raise ValueError(f"Graph: node {node.name!r} ({node.target}) feeds no output")
    for name in graph.input_names:
        if name not in used:
            raise ValueError(f"Graph: input {name!r} is used by no output (a dangling input)")
    called = {node.target.split(".")[0] for node in ordered if node.op == "call_module"}
    for name, _ in graph.children:
        if name not in called:
            raise ValueError(f"Graph: module {name!r} is never called")
    return ordered


def released_after(graph: Graph) -> tuple[tuple[str, ...], ...]:
    """For each node in order, the values (inputs and nodes) that no later node reads and no output
    is: what an eager backend's run of the nodes lets go of after it, so that evaluating a deep graph
    holds a few values at a time as a Sequential does (a chain of 100 ReLUs over a batch of
    1000x4096 held 1.6 GB where the same Sequential held 76 MB)."""
    last = {}
    for index, node in enumerate(graph.nodes):
        for arg in node.args:
            last[arg] = index
    released: list[list[str]] = [[] for _ in graph.nodes]
    for name, index in last.items():
        if name not in graph.outputs:
            released[index].append(name)
    return tuple(map(tuple, released))


# --- serialisation ----------------------------------------------------------------------------

_LAYER_TYPES = {cls.__name__: cls for module in (layers, sequences) for cls in vars(module).values()
                if isinstance(cls, type) and issubclass(cls, Layer) and not cls.__name__.startswith("_")
                and cls not in (Layer, Container)}  # fmt: skip


def to_dict(model: Layer) -> dict:
    """A layer spec, container or graph as plain JSON data (``{"type": ..., fields}``)."""
    kind = type(model).__name__
    if isinstance(model, Graph) and "arguments" in vars(model):  # built from arguments (an encoder)
        return {"type": kind, **{key: to_dict(value) if isinstance(value, Layer) else value
                                 for key, value in model.arguments}}  # fmt: skip
    if isinstance(model, Graph):
        return {
            "type": kind,
            "inputs": {name: list(shape) for name, shape in model.inputs},
            "modules": {name: to_dict(child) for name, child in model.children},
            "nodes": [
                {
                    "name": n.name,
                    "op": n.op,
                    "target": n.target,
                    "args": list(n.args),
                    "kwargs": {key: _plain(value) for key, value in n.kwargs},
                }
                for n in model.nodes
            ],
            "outputs": list(model.outputs),
            **({"tied": dict(model.tied)} if model.tied else {}),
            **({"noise": dict(model.noise)} if model.noise else {}),
        }
    if isinstance(model, layers.Sequential):
        return {"type": kind, "children": {name: to_dict(child) for name, child in model.children}, "init": model.init}
    if isinstance(model, layers.Residual):
        return {"type": kind, "body": to_dict(model.body),
                "shortcut": None if model.shortcut is None else to_dict(model.shortcut),
                "post": None if model.post is None else to_dict(model.post)}  # fmt: skip
    if kind not in _LAYER_TYPES and type(model).__module__ != "unitrain.attention":
        raise TypeError(f"cannot serialise {model!r}: not a unitrain layer spec")
    return {"type": kind, **{f.name: _plain(getattr(model, f.name)) for f in fields(model)}}


def from_dict(data: Mapping) -> Layer:
    """The spec :func:`to_dict` wrote; ``ValueError`` naming what does not fit (data from a file is
    checked here: any shape of JSON gets one line, nesting deeper than the backends build included)."""
    return _from_entry(data, 1)


def _from_entry(data: Mapping, depth: int) -> Layer:
    if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
        raise ValueError(f"a model entry must be a mapping with a 'type', got {str(data)[:80]}")
    if depth > layers.MAX_NESTING:
        raise ValueError(f"the model entry nests containers more than {layers.MAX_NESTING} deep; "
                         f"expected at most {layers.MAX_NESTING}")  # fmt: skip
    kind, rest = data["type"], {key: value for key, value in data.items() if key != "type"}

    def child(value):
        return _from_entry(value, depth + 1)

    try:
        if kind == "Graph":
            modules = {name: child(spec) for name, spec in _field(rest, "modules", Mapping).items()}
            nodes = [_node(n) for n in _field(rest, "nodes", list)]
            tied = _field(rest, "tied", Mapping) if "tied" in rest else None
            noise = _field(rest, "noise", Mapping) if "noise" in rest else None
            inputs = _field(rest, "inputs", Mapping)
            for name, shape in inputs.items():
                if not isinstance(shape, list):  # a string's characters are no sizes
                    raise ValueError(f"graph input {str(name)[:40]!r}: shape must be a list of sizes, got "
                                     f"{str(shape)[:80]!r}")  # fmt: skip
            return Graph.from_nodes(inputs, nodes, _field(rest, "outputs", list), modules, tied, noise)
        if kind == "Sequential":
            children = {name: child(spec) for name, spec in _field(rest, "children", Mapping).items()}
            return layers.Sequential(children, init=rest.get("init", "pytorch"))
        if kind == "Residual":
            return layers.Residual(*(None if rest.get(part) is None else child(rest[part])
                                     for part in ("body", "shortcut", "post")))  # fmt: skip
        from . import attention  # it builds graphs

        if kind in attention.ENCODERS:
            nested = {key: child(value) if isinstance(value, Mapping) else value for key, value in rest.items()}
            return attention.ENCODERS[kind](**nested)
        kinds = {**_LAYER_TYPES, **attention.LEAVES}
        if kind not in kinds:
            raise ValueError(f"unknown layer type {kind!r}")
        for flag in (f.name for f in fields(kinds[kind]) if f.type in ("bool", "bool | None")):
            if not isinstance(rest.get(flag, False), bool | None):  # a file's "false" would read as True
                raise ValueError(f"{kind}: {flag} must be true or false, got {str(rest[flag])[:80]!r}")
        return kinds[kind](**{key: _frozen(value) for key, value in rest.items()})
    except (KeyError, TypeError) as error:
        raise ValueError(f"model entry of type {kind!r} does not fit: {type(error).__name__}: {error}") from None


def _field(entry: Mapping, key: str, kind: type):
    """``entry[key]``, refused in one line unless it is a ``kind`` (a mapping or a list)."""
    value = entry.get(key)
    if not isinstance(value, kind):
        expected = "a mapping" if kind is Mapping else "a list"
        raise ValueError(f"a model entry's {key!r} must be {expected}, got {str(value)[:80]}")
    return value


def _node(entry) -> Node:
    """One node of a graph entry: ``name``, ``op``, ``target`` strings, ``args`` a list of names,
    ``kwargs`` a mapping (the node list's own checks follow in :meth:`Graph.from_nodes`)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"a graph node must be a mapping with name, op, target, args, got {str(entry)[:80]}")
    where = f"graph node {str(entry.get('name'))[:40]!r}"
    if not isinstance(entry.get("target"), str):
        raise ValueError(f"{where}: target must be a string, got {str(entry.get('target'))[:80]}")
    args = entry.get("args")
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise ValueError(f"{where}: args must be a list of input or node names, got {str(args)[:80]}")
    kwargs = entry.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: kwargs must be a mapping, got {str(kwargs)[:80]}")
    return Node(entry.get("name"), entry.get("op"), entry["target"], tuple(args),
                tuple((key, _frozen(value)) for key, value in kwargs.items()))  # fmt: skip
