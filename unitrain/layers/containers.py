"""Containers (Sequential, Residual), the model-wide init scheme, and the limits every backend
builds within."""

from __future__ import annotations

import functools
import math
import os
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .. import dialects
from ..initializers import initializer
from .base import Layer, Shape


class Container(Layer):
    """A layer made of named children. Its leaves' weights are named by dotted paths
    (``layer1.0.conv1.weight``), in ``state_dict`` order."""

    children: tuple[tuple[str, Layer], ...]

    @functools.cached_property
    def named_children(self) -> Mapping[str, Layer]:
        """``children`` by name (built once: a lookup per node of a 20,000-layer model must not scan them)."""
        return types.MappingProxyType(dict(self.children))

    def named_layers(self, prefix: str = "") -> Iterator[tuple[str, Layer]]:
        """Every leaf layer with its dotted path, in ``state_dict`` order."""
        for name, child in self.children:
            if isinstance(child, Container):
                yield from child.named_layers(f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", child

    def _shapes(self, of) -> dict[str, Shape]:
        return {f"{name}.{key}": shape for name, layer in self.named_layers() for key, shape in of(layer).items()}

    def param_shapes(self):
        return self._shapes(lambda layer: layer.param_shapes())

    def buffer_shapes(self):
        return self._shapes(lambda layer: layer.buffer_shapes())

    def state_shapes(self) -> dict[str, Shape]:
        """Every key of the weight file, in ``torch.nn.Module.state_dict()`` order."""
        return self._shapes(lambda layer: {**layer.param_shapes(), **layer.buffer_shapes()})

    def output_shape(self, input_shape):
        return self._trace(tuple(input_shape), "", {})

    def leaf_input_shapes(self, input_shape: Shape) -> dict[str, Shape]:
        """The per-sample input shape of every leaf, by dotted path (``ValueError`` as
        :meth:`output_shape`)."""
        shapes: dict[str, Shape] = {}
        self._trace(tuple(input_shape), "", shapes)
        return shapes

    def _trace(self, input_shape: Shape, path: str, seen: dict[str, Shape]) -> Shape:
        raise NotImplementedError

    def has(self, kind: type[Layer]) -> bool:
        return any(isinstance(layer, kind) for _, layer in self.named_layers())


def _trace(layer: Layer, input_shape: Shape, path: str, seen: dict[str, Shape]) -> Shape:
    """``layer``'s output shape; a leaf's error is prefixed with its dotted path, and ``seen``
    records each leaf's input shape."""
    if isinstance(layer, Container):
        return layer._trace(input_shape, path, seen)
    seen[path] = input_shape
    try:
        return tuple(layer.output_shape(input_shape))
    except ValueError as error:
        raise ValueError(f"{path}: {error}" if path else str(error)) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass(frozen=True, init=False)
class Sequential(Container):
    """An ordered stack, ``Sequential(a, b, ...)`` (children named ``"0"``, ``"1"``, ...) or
    ``Sequential({"conv1": a, "bn1": b})`` (children named by the keys), as
    ``torch.nn.Sequential``. ``init`` chooses how :func:`unitrain.init_weights` draws the
    first weights of the layers that name no ``weight_init`` / ``bias_init`` when this is the
    outermost container: a scheme of :data:`INIT_SCHEMES` (``"pytorch"``: each layer's PyTorch
    default; ``"resnet"``: torchvision's ResNet; ``"keras"``, ``"chainer"``: their Dense/Linear and
    convolution defaults), or an initialiser for every weight (``"xavier_uniform"``; biases keep
    PyTorch's default). Left out: the dialect's scheme."""

    children: tuple[tuple[str, Layer], ...] = field(default_factory=tuple)
    init: str = "pytorch"

    def __init__(self, *layers, init: str | None = None):
        if len(layers) == 1 and isinstance(layers[0], Mapping):
            items = list(layers[0].items())
            for name, _ in items:
                if not isinstance(name, str) or not name or "." in name:
                    raise ValueError(f"Sequential: child name {name!r} must be a non-empty string without '.'")
        else:
            if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
                layers = tuple(layers[0])
            items = [(str(index), layer) for index, layer in enumerate(layers)]
        for name, layer in items:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {name} is {layer!r}, expected a unitrain layer spec")
        object.__setattr__(self, "children", tuple(items))
        object.__setattr__(self, "init", _sequential_init(init))

    @property
    def layers(self) -> tuple[Layer, ...]:
        return tuple(layer for _, layer in self.children)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.children)

    def _trace(self, input_shape, path, seen):
        for name, layer in self.children:
            input_shape = _trace(layer, input_shape, _join(path, name), seen)
        return input_shape


#: a model's ``init`` schemes: the weight and bias initialisers of Linear and Conv2d layers
#: (torchvision's ResNet: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` on Conv2d
#: weights; Keras' Dense and Conv2D: ``glorot_uniform`` and zeros; Chainer's Linear and
#: Convolution2D: ``LeCunNormal`` and zeros)
INIT_SCHEMES = ("pytorch", "resnet", "keras", "chainer")


def check_init(init) -> str:
    """``init`` (a scheme or an initialiser's text, for every weight) in its canonical text;
    ValueError otherwise."""
    if init in INIT_SCHEMES:
        return init
    try:
        value = initializer(init)
    except ValueError as error:
        raise ValueError(f"init must be one of {', '.join(INIT_SCHEMES)} or an initialiser for every weight "
                         f"({error})") from None  # fmt: skip
    return str(value)


def _sequential_init(init) -> str:
    try:
        return check_init(dialects.current().init if init is None else init)
    except ValueError as error:
        raise ValueError(f"Sequential: {error}") from None


@dataclass(frozen=True)
class Residual(Container):
    """``y = post(body(x) + shortcut(x))``: a skip connection (torchvision's BasicBlock).
    ``shortcut=None`` is the identity, ``post=None`` means nothing after the add. Naming:
    the body's children live directly in the Residual's namespace (``conv1``, ``bn1``, ...),
    the shortcut is ``downsample`` and ``post`` is ``post``."""

    body: Sequential
    shortcut: Layer | None = None
    post: Layer | None = None

    def __post_init__(self):
        if not isinstance(self.body, Sequential):
            raise TypeError(f"Residual: body must be a unitrain Sequential, got {self.body!r}")
        for name, value in (("shortcut", self.shortcut), ("post", self.post)):
            if value is not None and not isinstance(value, Layer):
                raise TypeError(f"Residual: {name} must be a unitrain layer spec or None, got {value!r}")
        clash = {name for name, _ in self.body.children} & {"downsample", "post"}
        if clash:
            raise ValueError(
                f"Residual: body children may not be named {sorted(clash)}: those name the shortcut and post"
            )

    @property
    def children(self) -> tuple[tuple[str, Layer], ...]:
        named = list(self.body.children)
        if self.shortcut is not None:
            named.append(("downsample", self.shortcut))
        if self.post is not None:
            named.append(("post", self.post))
        return tuple(named)

    def _trace(self, input_shape, path, seen):
        body = self.body._trace(input_shape, path, seen)
        shortcut = input_shape
        if self.shortcut is not None:
            shortcut = _trace(self.shortcut, input_shape, _join(path, "downsample"), seen)
        if body != shortcut:
            raise ValueError(f"{path or 'Residual'}: body gives {body}, shortcut gives {shortcut}")
        if self.post is not None:
            return _trace(self.post, body, _join(path, "post"), seen)
        return body


#: how deep containers may nest. Every backend builds and runs the tree recursively: PyTorch's
#: module calls take about four Python frames a level (300 levels pass Python's default limit of
#: 1000 frames), and MindSpore names a parameter by its path, in at most 1024 characters.
MAX_NESTING = 100
#: layers in a model at most (a container listed many times in another counts each time)
MAX_LAYERS = 100_000


def check_buildable(model: Container, itemsize: int = 4) -> None:
    """ValueError, before anything is built, for a model that nests containers deeper than
    :data:`MAX_NESTING`, holds more than :data:`MAX_LAYERS` layers, or whose weights and their
    gradients (``itemsize`` bytes a value) need more than this machine's memory. Walks the tree
    without recursion, so that any tree is measured."""
    stack, layers = [(model, 1)], 0
    while stack:
        container, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ValueError(f"the model nests containers more than {MAX_NESTING} deep; expected at most "
                             f"{MAX_NESTING} (every backend builds and runs the tree recursively)")  # fmt: skip
        layers += len(container.children)
        if layers > MAX_LAYERS:
            raise ValueError(f"the model has more than {MAX_LAYERS} layers; expected at most {MAX_LAYERS}")
        stack.extend((child, depth + 1) for _, child in container.children if isinstance(child, Container))
    values = sum(math.prod(shape) for shape in model.state_shapes().values())
    memory = physical_memory()
    if memory is not None and 2 * values * itemsize > memory:
        raise ValueError(f"the model has {values:,} weights, {values * itemsize / 2**30:,.1f} GiB at {itemsize} bytes "
                         f"each and as much again for their gradients; this machine has {memory / 2**30:,.1f} GiB "
                         "of memory")  # fmt: skip


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
