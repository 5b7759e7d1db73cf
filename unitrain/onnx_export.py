"""A model spec and its weights as an ONNX graph (inference: BatchNorm uses its running
statistics, Dropout is the identity). Imported only by ``unitrain convert`` when it writes
``.onnx``; needs the ``onnx`` extra.

Every layer is one standard operator (opset 20) with PyTorch's attributes, so any ONNX runtime
computes what unitrain's eval mode does. The tensors keep unitrain's names as initializers; the
graph's input ``input`` is ``(N, *input_shape)`` float32 with N free, its output ``output``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import layers
from .weights import State, WeightsError

OPSET = 20  # the first with Gelu


class _Graph:
    def __init__(self, state: State):
        self.state, self.nodes, self.initializers, self._count = state, [], [], 0

    def tensor(self, name: str, value: np.ndarray | None = None) -> str:
        """Add unitrain's tensor ``name`` (or ``value`` under that name) as a float32 initializer."""
        array = self.state[name] if value is None else value
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def integers(self, name: str, values) -> str:
        """An int64 initializer (a shape, sizes) named ``name``."""
        self.initializers.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def op(self, kind: str, inputs: list[str], path: str, **attributes) -> str:
        self._count += 1
        output = f"{path or kind}:{self._count}"
        self.nodes.append(helper.make_node(kind, inputs, [output], name=output, **attributes))
        return output


_SIMPLE = {layers.ReLU: "Relu", layers.Tanh: "Tanh", layers.Sigmoid: "Sigmoid"}


def _pads(padding) -> list[int]:
    return [padding[0], padding[1], padding[0], padding[1]]  # ONNX: all begins, then all ends


def _leaf(graph: _Graph, layer: layers.Layer, x: str, path: str, shape: tuple[int, ...]) -> str:
    """The node(s) computing ``layer`` on ``x``, whose per-sample shape is ``shape``."""
    weight, bias = f"{path}.weight", f"{path}.bias"
    if type(layer) in _SIMPLE:
        return graph.op(_SIMPLE[type(layer)], [x], path)
    if isinstance(layer, (layers.Identity, layers.Dropout)):
        return x
    if isinstance(layer, layers.Linear):
        inputs = [x, graph.tensor(weight)] + ([graph.tensor(bias)] if layer.bias else [])
        return graph.op("Gemm", inputs, path, transB=1)
    if isinstance(layer, layers.Conv2d):
        inputs = [x, graph.tensor(weight)] + ([graph.tensor(bias)] if layer.bias else [])
        return graph.op("Conv", inputs, path, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                        pads=_pads(layer.padding), dilations=list(layer.dilation), group=layer.groups)  # fmt: skip
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
        window = {"kernel_shape": list(layer.kernel_size), "strides": list(layer.stride), "pads": _pads(layer.padding)}
        if isinstance(layer, layers.MaxPool2d):
            return graph.op("MaxPool", [x], path, **window)
        return graph.op("AveragePool", [x], path, count_include_pad=int(layer.count_include_pad), **window)
    if isinstance(layer, layers.AdaptiveAvgPool2d):
        (height, width), (out_h, out_w) = shape[1:], layer.output_size
        if (out_h, out_w) == (1, 1):
            return graph.op("GlobalAveragePool", [x], path)
        if height % out_h or width % out_w:
            raise WeightsError(f"{path}: ONNX has no adaptive pooling; {layer} on {height}x{width} input has "
                               "windows of unequal sizes")  # fmt: skip
        window = [height // out_h, width // out_w]
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
        return graph.op("Reshape", [x, graph.integers(f"{path}.shape", [0, *layer.output_shape(shape)])], path)
    raise WeightsError(f"{path}: unitrain cannot export {layer} to ONNX")


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
    sizes = graph.integers(f"{path}.sizes", layer.output_shape(shape)[1:])
    if layer.mode == "nearest":
        transform = {"coordinate_transformation_mode": "asymmetric", "mode": "nearest", "nearest_mode": "floor"}
    else:
        corners = "align_corners" if layer.align_corners else "pytorch_half_pixel"
        transform = {"coordinate_transformation_mode": corners, "mode": "linear"}
    return graph.op("Resize", [x, "", "", sizes], path, axes=[2, 3], **transform)


def _node(graph: _Graph, layer: layers.Layer, x: str, path: str, shape) -> tuple[str, tuple[int, ...]]:
    """``layer`` (a leaf or a container) applied to ``x``: its output and per-sample shape."""
    join = (lambda name: f"{path}.{name}") if path else (lambda name: name)
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


def to_onnx(model: layers.Container, state: State, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    model.output_shape(input_shape)  # a model that does not fit the input fails here, naming the layer
    graph = _Graph(state)
    output, shape = _node(graph, model, "input", "", tuple(input_shape))
    graph.nodes.append(helper.make_node("Identity", [output], ["output"], name="output"))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", *shape])]
    body = helper.make_graph(graph.nodes, "unitrain", inputs, outputs, graph.initializers)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="unitrain")
