"""A model spec and its weights as an ONNX graph (inference: BatchNorm uses its running
statistics, Dropout is the identity). Imported only by ``unitrain convert`` when it writes
``.onnx``; needs the ``onnx`` extra.

Every layer is one standard operator (opset 20) with PyTorch's attributes, so any ONNX runtime
computes what unitrain's eval mode does; the recurrent layers are ONNX's own ``RNN``/``LSTM``/``GRU``
(:mod:`unitrain.onnx_recurrent`). The tensors keep unitrain's names as initializers; the graph's input
``input`` is ``(N, *input_shape)`` with N free, float32 (int64 where it holds token ids or sequence
lengths), its output ``output`` (a graph of several inputs or outputs: each under its graph name). A
graph's noise (``randn_like``, ``rand_like``) is drawn inside the ONNX graph, by ``RandomNormalLike`` /
``RandomUniformLike``: sampled at every run, as PyTorch's module samples (the runtime's generator, not
unitrain's stream).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import layers, ops, padded
from .graph import Graph, entry_layer, get_submodule, tie_source
from .onnx_recurrent import recurrent
from .sequences import ONE_D, Embedding, _Recurrent
from .weights import State, WeightsError

OPSET = 20  # the first with Gelu


class _Graph:
    def __init__(self, state: State, tied: dict[str, str]):
        self.state, self.nodes, self.initializers, self._count, self._named = state, [], [], 0, set()
        self.tied = tied

    def tensor(self, name: str, value: np.ndarray | None = None, dtype=np.float32) -> str:
        """Add unitrain's tensor ``name`` (or ``value`` under that name) as an initializer, once
        (a module a graph calls twice reads the same weights; a tied key reads its source's, or its
        transpose: a ``Transpose`` node)."""
        if name in self.tied:
            source, transposed = tie_source(self.tied[name])
            return self.op("Transpose", [self.tensor(source)], name) if transposed else self.tensor(source)
        if name not in self._named:
            array = self.state[name] if value is None else value
            self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype), name))
            self._named.add(name)
        return name

    def ints(self, path: str, values) -> str:
        """An int64 initializer (axes, starts, shapes, sizes: inputs of Slice, Reshape, Unsqueeze, Reduce*,
        Resize)."""
        self._count += 1
        return self.tensor(f"{path}:ints{self._count}", np.asarray(values, np.int64), np.int64)

    def op(self, kind: str, inputs: list[str], path: str, **attributes) -> str:
        return self.node(kind, inputs, path, [True], **attributes)[0]

    def node(self, kind: str, inputs: list[str], path: str, wanted: list[bool], **attributes) -> list[str]:
        """A node of several outputs, each named if ``wanted``, else ``""`` (ONNX: not computed)."""
        self._count += 1
        name = f"{path or kind}:{self._count}"
        outputs = [(f"{name}.{index}" if index else name) if want else "" for index, want in enumerate(wanted)]
        while not outputs[-1]:  # ONNX omits trailing optional outputs
            outputs.pop()
        self.nodes.append(helper.make_node(kind, inputs, outputs, name=name, **attributes))
        return outputs + [""] * (len(wanted) - len(outputs))


_SIMPLE = {layers.ReLU: "Relu", layers.Tanh: "Tanh", layers.Sigmoid: "Sigmoid"}


def _pads(padding) -> list[int]:
    return [*padding, *padding]  # ONNX: all begins, then all ends


def _leaf(graph: _Graph, layer: layers.Layer, x: str, path: str, shape: tuple[int, ...]) -> str:
    """The node(s) computing ``layer`` on ``x``, whose per-sample shape is ``shape``."""
    weight, bias = f"{path}.weight", f"{path}.bias"
    if type(layer) in _SIMPLE:
        return graph.op(_SIMPLE[type(layer)], [x], path)
    if isinstance(layer, (layers.Identity, layers.Dropout)):
        return x
    if isinstance(layer, layers.Linear):
        if len(shape) == 1:
            inputs = [x, graph.tensor(weight)] + ([graph.tensor(bias)] if layer.bias else [])
            return graph.op("Gemm", inputs, path, transB=1)
        # over the last axis of (N, ..., features): Gemm takes matrices only, MatMul broadcasts
        product = graph.op("MatMul", [x, graph.op("Transpose", [graph.tensor(weight)], path)], path)
        return graph.op("Add", [product, graph.tensor(bias)], path) if layer.bias else product
    if isinstance(layer, Embedding):
        return graph.op("Gather", [graph.tensor(weight), x], path, axis=0)
    if isinstance(layer, _Recurrent):  # in a Sequential: zero initial states, the output only
        return recurrent(graph, layer, x, path)[0]
    # Conv1d and the 1-d pools: ONNX's operators over one axis, with their 2-d twins' arguments but the first
    spec = layer  # named in messages as the user wrote it
    layer, axes = (layer.as_2d(), slice(1, None)) if isinstance(layer, ONE_D) else (layer, slice(None))
    if isinstance(layer, layers.Conv2d):
        inputs = [x, graph.tensor(weight)] + ([graph.tensor(bias)] if layer.bias else [])
        return graph.op("Conv", inputs, path, kernel_shape=list(layer.kernel_size[axes]),
                        strides=list(layer.stride[axes]), pads=_pads(layer.padding[axes]),
                        dilations=list(layer.dilation[axes]), group=layer.groups)  # fmt: skip
    if isinstance(layer, layers.ConvTranspose2d):  # the same weight layout and output size rule as PyTorch
        inputs = [x, graph.tensor(weight)] + ([graph.tensor(bias)] if layer.bias else [])
        return graph.op("ConvTranspose", inputs, path, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                        pads=_pads(layer.padding), output_padding=list(layer.output_padding),
                        dilations=list(layer.dilation), group=layer.groups)  # fmt: skip
    if isinstance(layer, layers.Upsample):
        return _resize(graph, layer, x, path, shape)
    if isinstance(layer, layers._BatchNorm):
        inputs = [graph.tensor(f"{path}.{key}") for key in ("weight", "bias", "running_mean", "running_var")]
        return graph.op("BatchNormalization", [x, *inputs], path, epsilon=layer.eps)
    if isinstance(layer, layers.LayerNorm):
        ones, zeros = np.ones(layer.normalized_shape), np.zeros(layer.normalized_shape)
        affine = layer.elementwise_affine
        scale = graph.tensor(weight) if affine else graph.tensor(weight, ones)
        shift = graph.tensor(bias) if affine else graph.tensor(bias, zeros)
        return graph.op("LayerNormalization", [x, scale, shift], path, axis=-len(layer.normalized_shape),
                        epsilon=layer.eps)  # fmt: skip
    if isinstance(layer, (layers.MaxPool2d, layers.AvgPool2d)):
        window = {"kernel_shape": list(layer.kernel_size[axes]), "strides": list(layer.stride[axes]),
                  "pads": _pads(layer.padding[axes])}  # fmt: skip
        if isinstance(layer, layers.MaxPool2d):
            return graph.op("MaxPool", [x], path, **window)
        return graph.op("AveragePool", [x], path, count_include_pad=int(layer.count_include_pad), **window)
    if isinstance(layer, layers.AdaptiveAvgPool2d):
        sizes, outputs = shape[1:], layer.output_size[axes]
        if set(outputs) == {1}:
            return graph.op("GlobalAveragePool", [x], path)
        if any(size % out for size, out in zip(sizes, outputs, strict=True)):
            raise WeightsError(f"{path}: ONNX has no adaptive pooling; {spec} on {'x'.join(map(str, sizes))} "
                               "input has windows of unequal sizes")  # fmt: skip
        window = [size // out for size, out in zip(sizes, outputs, strict=True)]
        return graph.op("AveragePool", [x], path, kernel_shape=window, strides=window)
    if isinstance(layer, layers.SiLU):
        return graph.op("Mul", [x, graph.op("Sigmoid", [x], path)], path)
    if isinstance(layer, layers.GELU):
        return graph.op("Gelu", [x], path, approximate=layer.approximate)
    if isinstance(layer, layers.LeakyReLU):
        return graph.op("LeakyRelu", [x], path, alpha=layer.negative_slope)
    if isinstance(layer, layers.ELU):
        return graph.op("Elu", [x], path, alpha=layer.alpha)
    if isinstance(layer, (layers.Softmax, layers.LogSoftmax)):
        return graph.op(type(layer).__name__, [x], path, axis=layer.dim)
    if isinstance(layer, layers.Flatten):
        if layer.flattened_dims(len(shape) + 1) == (1, len(shape)):
            return graph.op("Flatten", [x], path, axis=1)
        # Reshape: 0 keeps the batch size, the rest is the per-sample output shape
        return graph.op("Reshape", [x, graph.ints(path, [0, *layer.output_shape(shape)])], path)
    raise WeightsError(f"{path}: unitrain cannot export {spec} to ONNX")


def _resize(graph: _Graph, layer: layers.Upsample, x: str, path: str, shape: tuple[int, ...]) -> str:
    """``Resize`` to the output size (``axes`` 2 and 3): ONNX then maps output ``i`` to input ``i * in /
    out`` (asymmetric; nearest floors) or ``(i + 0.5) * in / out - 0.5`` (half_pixel, or align_corners),
    PyTorch's positions wherever PyTorch's scale is ``in / out``: a given size, integer scale factors,
    align_corners. For a fractional scale factor PyTorch uses ``1 / scale_factor``, which ONNX would
    pair with its own ``floor(size * scale)`` computed in float32: such a layer is refused."""
    fractional = layer.scale_factor is not None and not all(factor.is_integer() for factor in layer.scale_factor)
    if fractional and not layer.align_corners:
        raise WeightsError(f"{path}: ONNX Resize cannot index as PyTorch does for {layer}; give the "
                           "output size instead of a fractional scale_factor")  # fmt: skip
    sizes = graph.ints(path, layer.output_shape(shape)[1:])
    if layer.mode == "nearest":
        transform = {"coordinate_transformation_mode": "asymmetric", "mode": "nearest", "nearest_mode": "floor"}
    else:
        corners = "align_corners" if layer.align_corners else "pytorch_half_pixel"
        transform = {"coordinate_transformation_mode": corners, "mode": "linear"}
    return graph.op("Resize", [x, "", "", sizes], path, axes=[2, 3], **transform)


def _node(graph: _Graph, layer: layers.Layer, x: str, path: str, shape) -> tuple[str, tuple[int, ...]]:
    """``layer`` (a leaf or a container) applied to ``x``: its output and per-sample shape."""
    join = (lambda name: f"{path}.{name}") if path else (lambda name: name)
    if isinstance(layer, Graph):
        return _graph(graph, layer, x, path, shape)
    if isinstance(layer, layers.Sequential):
        for name, child in layer.children:
            x, shape = _node(graph, child, x, join(name), shape)
        return x, shape
    if isinstance(layer, layers.Residual):
        body, body_shape = x, shape
        for name, child in layer.body.children:
            body, body_shape = _node(graph, child, body, join(name), body_shape)
        shortcut = x
        if layer.shortcut is not None:
            shortcut, _ = _node(graph, layer.shortcut, x, join("downsample"), shape)
        x = graph.op("Add", [body, shortcut], path)
        if layer.post is not None:
            return _node(graph, layer.post, x, join("post"), body_shape)
        return x, body_shape
    return _leaf(graph, layer, x, path, shape), tuple(layer.output_shape(shape))


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}


def _function(graph: _Graph, op: str, args: list[str], kw: dict, path: str, shapes: list) -> str:
    """A graph operation (:data:`unitrain.ops.OPS`) as ONNX nodes; ``shapes``: its inputs' per-sample shapes."""
    if op in _BINARY:
        if len(args) == 1:
            other = graph.tensor(f"{path}.other", np.asarray(kw["other"]))
            args = [other, args[0]] if kw.get("reverse") else [args[0], other]
        return graph.op(_BINARY[op], args, path)
    if op in ("neg", "exp", "log"):
        return graph.op(op.capitalize(), args, path)
    if op == "cat":
        return graph.op("Concat", args, path, axis=kw["dim"])
    if op == "stack":
        dim = kw["dim"] % (len(shapes[0]) + 2)
        return graph.op("Concat", [graph.op("Unsqueeze", [a, graph.ints(path, [dim])], path) for a in args], path,
                        axis=dim)  # fmt: skip
    if op == "narrow":
        start, dim = kw["start"], kw["dim"]
        bounds = [graph.ints(path, [value]) for value in (start, start + kw["length"], dim)]
        return graph.op("Slice", [args[0], *bounds], path)
    if op == "select":
        index = kw["index"] % shapes[0][kw["dim"] % (len(shapes[0]) + 1) - 1]
        return graph.op("Gather", [args[0], graph.ints(path, index)], path, axis=kw["dim"])
    if op in ("reshape", "flatten"):
        out = ops.infer(op, shapes, kw, path)
        return graph.op("Reshape", [args[0], graph.ints(path, [0, *out])], path)  # 0: the batch as it is
    if op == "permute":
        return graph.op("Transpose", args, path, perm=[d % (len(shapes[0]) + 1) for d in kw["dims"]])
    if op == "transpose":
        perm = list(range(len(shapes[0]) + 1))
        a, b = (kw[name] % len(perm) for name in ("dim0", "dim1"))
        perm[a], perm[b] = perm[b], perm[a]
        return graph.op("Transpose", args, path, perm=perm)
    if op in ("sum", "mean"):
        axes = graph.ints(path, ops.reduced_dims(kw.get("dim"), len(shapes[0]) + 1, op))
        kind = "ReduceSum" if op == "sum" else "ReduceMean"
        return graph.op(kind, [args[0], axes], path, keepdims=int(kw.get("keepdim", False)))
    if op == "matmul":
        return graph.op("MatMul", args, path)
    if op == "getitem":  # an item of a recurrent call's [output, h_n, c_n]
        return args[0][kw["index"]]
    return _leaf(graph, ops.ACTIVATIONS[op](**kw), args[0], path, shapes[0])


def _one_input_one_output(model: Graph, path: str) -> None:
    if len(model.data_inputs) != 1 or len(model.outputs) != 1:
        raise WeightsError(f"{path}: ONNX export takes graphs called as modules with one input and one output, "
                           f"this one has {len(model.data_inputs)} and {len(model.outputs)}")  # fmt: skip


#: a noise kind's ONNX operator: a fresh draw at every run, shaped like its input tensor
_NOISE = {"normal": "RandomNormalLike", "uniform": "RandomUniformLike"}


def _noise(graph: _Graph, model: Graph, batch_of: str) -> list[str]:
    """The graph's noise inputs drawn inside the ONNX graph, each ``(N, *shape)`` with N that of the
    input ``batch_of``: zeros of that shape (``ConstantOfShape``) given to ``RandomNormalLike`` /
    ``RandomUniformLike``, whose defaults are unitrain's (mean 0, scale 1; low 0, high 1) and
    whose float32 output is the model's dtype."""
    shapes = dict(model.inputs)
    drawn = []
    for name, kind in model.noise:
        batch = graph.op("Shape", [batch_of], name, start=0, end=1)
        shape = graph.op("Concat", [batch, graph.ints(name, shapes[name])], name, axis=0)
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0])
        zeros = graph.op("ConstantOfShape", [shape], name, value=zero)
        drawn.append(graph.op(_NOISE[kind], [zeros], name, dtype=TensorProto.FLOAT))
    return drawn


def _graph(graph: _Graph, model: Graph, x: str, path: str, shape) -> tuple[str, tuple[int, ...]]:
    """A Graph called as a module (one input, one output)."""
    _one_input_one_output(model, path)
    outputs, shapes = _graph_values(graph, model, [x], [shape], path)
    return outputs[0], shapes[0]


def _graph_values(graph: _Graph, model: Graph, xs: list[str], input_shapes, path: str) -> tuple[list, list]:
    """A Graph's nodes, in order, on inputs ``xs``: its outputs and their per-sample shapes."""
    join = (lambda name: f"{path}.{name}") if path else (lambda name: name)
    shapes = model._infer(input_shapes, path, {})
    values = dict(zip(model.input_names, xs, strict=True))
    for node in model.nodes:
        args = [values[arg] for arg in node.args]
        module = get_submodule(model, node.target) if node.op == "call_module" else None
        if isinstance(module, Graph):  # its noise inputs, if any, are the caller's (lifted)
            _one_input_one_output(module, join(node.target))
            results, _ = _graph_values(graph, module, args, [shapes[arg] for arg in node.args], join(node.target))
            values[node.name] = results[0]
        elif isinstance(module, _Recurrent):
            values[node.name] = _recurrent_call(graph, model, node, module, args, join(node.target))
        elif module is not None:
            values[node.name], _ = _node(graph, module, args[0], join(node.target), shapes[node.args[0]])
        else:
            arg_shapes = [shapes[arg] for arg in node.args]
            values[node.name] = _function(graph, node.target, args, node.options, join(node.name), arg_shapes)
    return [values[name] for name in model.outputs], [shapes[name] for name in model.outputs]


def _recurrent_call(graph: _Graph, model: Graph, node, layer: _Recurrent, args: list[str], path: str):
    """A recurrent layer's call node: its output, or with ``final_states`` the tuple ``[output, h_n[,
    c_n]]`` of which only the items the graph's ``getitem`` nodes read are computed."""
    roles = dict(zip(padded.argument_roles(layer, len(args), node.options), args, strict=True))
    states = node.options.get("final_states")
    reads = {item.options["index"] for item in model.nodes if item.target == "getitem" and item.args[0] == node.name}
    results = recurrent(graph, layer, args[0], path, reads if states else {0}, roles.get("lengths"),
                        roles.get("h_0"), roles.get("c_0"))  # fmt: skip
    return results if states else results[0]


def _input_type(model: layers.Container, name: str) -> int:
    """A graph input's ONNX type: int64 for token ids and sequence lengths, float32 otherwise."""
    role = padded.input_roles(model).get(name) if isinstance(model, Graph) else None
    if role is not None and role.kind in ("ids", "lengths"):
        return TensorProto.INT64
    first = entry_layer(model)
    single = not isinstance(model, Graph) or len(model.data_inputs) == 1
    return TensorProto.INT64 if single and first is not None and isinstance(first[1], Embedding) else TensorProto.FLOAT


def to_onnx(model: layers.Container, state: State, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """The spec ``model`` with the weights ``state`` as an ONNX model taking ``(N, *input_shape)``
    as ``input`` and giving ``output``; a graph of several inputs takes each under its name, with
    its declared shape, and one of several outputs gives each under its node's name."""
    graph = _Graph(state, dict(getattr(model, "tied", ())))
    if isinstance(model, Graph):
        data = model.data_inputs
        shapes = [tuple(input_shape)] if len(data) == 1 else [tuple(shape) for _, shape in data]
        names = ["input"] if len(data) == 1 else [name for name, _ in data]
        noise_shapes = [shape for name, shape in model.inputs[len(data) :]]
        every = [*shapes, *noise_shapes]
        model.output_shape(every[0] if len(every) == 1 else every)  # a misfit fails here, naming the node
        results, out_shapes = _graph_values(graph, model, [*names, *_noise(graph, model, names[0])], every, "")
        out_names = ["output"] if len(results) == 1 else list(model.outputs)
    else:
        try:  # a model that does not fit the input fails here, naming the layer
            model.output_shape(input_shape)
        except ValueError as error:  # a container declares no input shape: ``unitrain convert`` gives MNIST's
            raise WeightsError(f"{error}; a {type(model).__name__} declares no input shape and is exported on "
                               f"per-sample input {tuple(input_shape)}: export a Graph, whose Input declares it, "
                               "or call unitrain.onnx_export.to_onnx(model, state, input_shape)") from None  # fmt: skip
        names, shapes, out_names = ["input"], [tuple(input_shape)], ["output"]
        result, shape = _node(graph, model, "input", "", tuple(input_shape))
        results, out_shapes = [result], [shape]
    for result, name in zip(results, out_names, strict=True):
        graph.nodes.append(helper.make_node("Identity", [result], [name], name=name))
    types = [_input_type(model, name) for name in (model.input_names[: len(names)] if isinstance(model, Graph)
                                                   else names)]  # fmt: skip
    inputs = [helper.make_tensor_value_info(name, kind, ["N", *shape])
              for name, kind, shape in zip(names, types, shapes, strict=True)]  # fmt: skip
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])
               for name, shape in zip(out_names, out_shapes, strict=True)]  # fmt: skip
    body = helper.make_graph(graph.nodes, "unitrain", inputs, outputs, graph.initializers)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="unitrain")
