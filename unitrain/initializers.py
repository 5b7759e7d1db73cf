"""How a layer's first weights are drawn: the portable initialisers of ``weight_init=`` /
``bias_init=`` and of a model's ``init=``.

Each draws from the NumPy generator :func:`unitrain.weights.init_weights` passes along (float64,
rounded to float32 afterwards), so every backend starts from the same numbers. Formulas and fans
are ``torch.nn.init``'s: for a tensor of shape ``(out, in, *kernel)``, ``fan_in = in *
prod(kernel)`` and ``fan_out = out * prod(kernel)`` (a grouped convolution's weight holds ``in /
groups`` input channels, as PyTorch's), and a 1-d tensor has no fans. ``gain`` is
``torch.nn.init.calculate_gain``'s. Written as text they read like calls: ``"xavier_uniform"``,
``"normal(0.02)"``, ``"kaiming_normal(mode='fan_out', nonlinearity='relu')"``.

=====================  ====================================================================
``pytorch``            PyTorch's layer default: ``U(-1/sqrt(k), 1/sqrt(k))``, ``k`` the layer's
                       fan in (weight and bias alike; ``kaiming_uniform_(a=sqrt(5))`` on weights)
``xavier_uniform``     ``U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))`` (Keras' ``glorot_uniform``)
``xavier_normal``      ``N(0, gain^2 * 2 / (fan_in + fan_out))`` (not truncated, as PyTorch's)
``kaiming_uniform``    ``U(-b, b)``, ``b = gain * sqrt(3 / fan)``, ``fan`` by ``mode`` (Keras' ``he_uniform``)
``kaiming_normal``     ``N(0, gain^2 / fan)`` (not truncated, as PyTorch's)
``lecun_uniform``      ``U(-b, b)``, ``b = sqrt(3 / fan_in)``
``lecun_normal``       ``N(0, 1 / fan_in)``: Chainer's ``LeCunNormal`` (Keras' is truncated)
``normal``             ``N(mean, std^2)``
``truncated_normal``   ``N(mean, std^2)`` redrawn outside ``mean ± 2 std`` (Keras' ``TruncatedNormal``)
``variance_scaling``   Keras' ``VarianceScaling(scale, mode, distribution)``: by default truncated,
                       variance ``1 / fan_in`` after truncation (Keras' ``lecun_normal``)
``glorot_normal``      Keras': truncated, variance ``2 / (fan_in + fan_out)`` after truncation
``he_normal``          Keras': truncated, variance ``2 / fan_in`` after truncation
``uniform``            ``U(a, b)``
``orthogonal``         ``torch.nn.init.orthogonal_``: QR of a normal matrix, rows flattened, times ``gain``
``zeros``, ``ones``,   constants
``constant(val)``
=====================  ====================================================================
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # NumPy loads with the first weights drawn, not with the layers (the command line's help)
    import numpy as np


def _gain_squared(nonlinearity: str, param: float | None = None) -> float:
    """``torch.nn.init.calculate_gain(nonlinearity, param) ** 2``, exact where PyTorch's is a root."""
    if nonlinearity in _LINEAR:
        return 1.0
    if nonlinearity == "tanh":
        return (5.0 / 3) ** 2
    if nonlinearity == "relu":
        return 2.0
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        return 2.0 / (1 + slope**2)
    if nonlinearity == "selu":
        return (3.0 / 4) ** 2
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}; expected one of {', '.join(NONLINEARITIES)}")


_LINEAR = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "sigmoid")  # fmt: skip
NONLINEARITIES = (*_LINEAR, "tanh", "relu", "leaky_relu", "selu")


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """``torch.nn.init._calculate_fan_in_and_fan_out``: ``(in * receptive, out * receptive)``."""
    if len(shape) < 2:
        raise ValueError(f"needs the fans of a tensor of 2 or more dimensions, got shape {tuple(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


@dataclass(frozen=True)
class Initializer:
    """Base of the initialisers; ``draw`` gives float64 values of ``shape``."""

    #: needs a tensor of 2 or more dimensions (a fan or a matrix)
    needs_matrix = False

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], layer_fan_in: int) -> np.ndarray:
        raise NotImplementedError

    def check_applies(self, what: str, shape: tuple[int, ...]) -> None:
        """ValueError naming ``what`` when this cannot initialise a tensor of ``shape``."""
        if self.needs_matrix and len(shape) < 2:
            raise ValueError(f"{what} {self} cannot apply to a tensor of shape {tuple(shape)}: it needs 2 or "
                             "more dimensions (a bias takes zeros, constant(v), normal(std), uniform(a, b) or "
                             "pytorch)")  # fmt: skip

    def __str__(self) -> str:
        defaults = type(self)()
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if getattr(self, f.name) != getattr(defaults, f.name)]  # fmt: skip
        return f"{self.name}({', '.join(shown)})" if shown else self.name

    @property
    def name(self) -> str:
        return next(name for name, cls in INITIALIZERS.items() if cls is type(self))


def _number(owner: str, name: str, value, condition=lambda v: True, expected="a finite number") -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not condition(value)
    ):
        raise ValueError(f"{owner}: {name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class PyTorchDefault(Initializer):
    def draw(self, rng, shape, layer_fan_in):
        bound = 1.0 / math.sqrt(layer_fan_in)
        return rng.uniform(-bound, bound, shape)


@dataclass(frozen=True)
class _Gained(Initializer):
    gain: float = 1.0
    needs_matrix = True

    def __post_init__(self):
        _number(self.name, "gain", self.gain, lambda v: v > 0, "a finite number > 0")


@dataclass(frozen=True)
class XavierUniform(_Gained):
    def draw(self, rng, shape, layer_fan_in):
        fan_in, fan_out = fans(shape)
        bound = math.sqrt(3.0 * self.gain**2 * 2.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, shape)


@dataclass(frozen=True)
class XavierNormal(_Gained):
    def draw(self, rng, shape, layer_fan_in):
        fan_in, fan_out = fans(shape)
        return rng.normal(0.0, math.sqrt(self.gain**2 * 2.0 / (fan_in + fan_out)), shape)


@dataclass(frozen=True)
class _Kaiming(Initializer):
    a: float = 0.0
    mode: str = "fan_in"
    nonlinearity: str = "leaky_relu"
    needs_matrix = True

    def __post_init__(self):
        _number(self.name, "a", self.a)
        if self.mode not in ("fan_in", "fan_out"):
            raise ValueError(f"{self.name}: mode must be 'fan_in' or 'fan_out', got {self.mode!r}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"{self.name}: nonlinearity must be one of {', '.join(NONLINEARITIES)}, "
                             f"got {self.nonlinearity!r}")  # fmt: skip

    def variance(self, shape) -> float:
        fan_in, fan_out = fans(shape)
        return _gain_squared(self.nonlinearity, self.a) / (fan_in if self.mode == "fan_in" else fan_out)


@dataclass(frozen=True)
class KaimingUniform(_Kaiming):
    def draw(self, rng, shape, layer_fan_in):
        bound = math.sqrt(3.0 * self.variance(shape))
        return rng.uniform(-bound, bound, shape)


@dataclass(frozen=True)
class KaimingNormal(_Kaiming):
    def draw(self, rng, shape, layer_fan_in):
        return rng.normal(0.0, math.sqrt(self.variance(shape)), shape)


@dataclass(frozen=True)
class LecunUniform(Initializer):
    needs_matrix = True

    def draw(self, rng, shape, layer_fan_in):
        bound = math.sqrt(3.0 / fans(shape)[0])
        return rng.uniform(-bound, bound, shape)


@dataclass(frozen=True)
class LecunNormal(Initializer):
    needs_matrix = True

    def draw(self, rng, shape, layer_fan_in):
        return rng.normal(0.0, math.sqrt(1.0 / fans(shape)[0]), shape)


@dataclass(frozen=True)
class Normal(Initializer):
    std: float = 1.0
    mean: float = 0.0

    def __post_init__(self):
        _number("normal", "std", self.std, lambda v: v > 0, "a finite number > 0")
        _number("normal", "mean", self.mean)

    def draw(self, rng, shape, layer_fan_in):
        return rng.normal(self.mean, self.std, shape)


def _truncated_normal(rng: np.random.Generator, mean: float, std: float, shape) -> np.ndarray:
    """``N(mean, std^2)`` with values outside ``mean ± 2 std`` drawn again (Keras' truncation)."""
    values = rng.normal(mean, std, shape)
    outside = abs(values - mean) > 2 * std
    while outside.any():  # each round keeps about 95% of what it redraws
        values[outside] = rng.normal(mean, std, int(outside.sum()))
        outside = abs(values - mean) > 2 * std
    return values


@dataclass(frozen=True)
class TruncatedNormal(Normal):
    def draw(self, rng, shape, layer_fan_in):
        return _truncated_normal(rng, self.mean, self.std, shape)


#: the standard deviation of a standard normal truncated to [-2, 2]: Keras divides by it, so that a
#: truncated draw keeps the variance asked for (keras/src/initializers/random_initializers.py)
_TRUNCATED_STD = 0.87962566103423978


@dataclass(frozen=True)
class VarianceScaling(Initializer):
    """Keras' ``VarianceScaling``: variance ``scale / n``, ``n`` the fan by ``mode`` (``fan_avg``:
    their mean; at least 1); ``truncated_normal`` draws ``N(0, scale / n) / 0.8796`` truncated at two
    of its standard deviations (the variance after truncation is ``scale / n``), ``untruncated_normal``
    the plain normal, ``uniform`` ``U(-b, b)``, ``b = sqrt(3 scale / n)``. Its default is Keras'
    ``lecun_normal``."""

    scale: float = 1.0
    mode: str = "fan_in"
    distribution: str = "truncated_normal"
    needs_matrix = True

    def __post_init__(self):
        _number(self.name, "scale", self.scale, lambda v: v > 0, "a finite number > 0")
        if self.mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"{self.name}: mode must be 'fan_in', 'fan_out' or 'fan_avg', got {self.mode!r}")
        if self.distribution not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ValueError(f"{self.name}: distribution must be 'truncated_normal', 'untruncated_normal' or "
                             f"'uniform', got {self.distribution!r}")  # fmt: skip

    def draw(self, rng, shape, layer_fan_in):
        fan_in, fan_out = fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
        variance = self.scale / max(1.0, fan)
        if self.distribution == "truncated_normal":
            return _truncated_normal(rng, 0.0, math.sqrt(variance) / _TRUNCATED_STD, shape)
        if self.distribution == "untruncated_normal":
            return rng.normal(0.0, math.sqrt(variance), shape)
        bound = math.sqrt(3.0 * variance)
        return rng.uniform(-bound, bound, shape)


@dataclass(frozen=True)
class GlorotNormal(VarianceScaling):
    """Keras' ``glorot_normal``: truncated, variance ``1 / fan_avg`` (PyTorch's ``xavier_normal`` is not truncated)."""

    mode: str = "fan_avg"


@dataclass(frozen=True)
class HeNormal(VarianceScaling):
    """Keras' ``he_normal``: truncated, variance ``2 / fan_in`` (PyTorch's ``kaiming_normal`` is not truncated)."""

    scale: float = 2.0


@dataclass(frozen=True)
class Uniform(Initializer):
    a: float = 0.0
    b: float = 1.0

    def __post_init__(self):
        _number("uniform", "a", self.a)
        _number("uniform", "b", self.b, lambda v: v > self.a, f"a finite number > a ({self.a!r})")

    def draw(self, rng, shape, layer_fan_in):
        return rng.uniform(self.a, self.b, shape)


@dataclass(frozen=True)
class Orthogonal(_Gained):
    def draw(self, rng, shape, layer_fan_in):
        import numpy as np

        rows = shape[0]
        cols = math.prod(shape) // rows
        flat = rng.normal(0.0, 1.0, (rows, cols))
        if rows < cols:
            flat = flat.T
        q, r = np.linalg.qr(flat)
        q *= np.sign(np.diag(r))  # as PyTorch: the decomposition made unique
        if rows < cols:
            q = q.T
        return (self.gain * q).reshape(shape)


@dataclass(frozen=True)
class Constant(Initializer):
    val: float = 0.0

    def __post_init__(self):
        _number("constant", "val", self.val)

    def draw(self, rng, shape, layer_fan_in):
        import numpy as np

        return np.full(shape, float(self.val))


@dataclass(frozen=True)
class Zeros(Initializer):
    def draw(self, rng, shape, layer_fan_in):
        import numpy as np

        return np.zeros(shape)


@dataclass(frozen=True)
class Ones(Initializer):
    def draw(self, rng, shape, layer_fan_in):
        import numpy as np

        return np.ones(shape)


INITIALIZERS = {
    "pytorch": PyTorchDefault, "xavier_uniform": XavierUniform, "xavier_normal": XavierNormal,
    "kaiming_uniform": KaimingUniform, "kaiming_normal": KaimingNormal, "lecun_uniform": LecunUniform,
    "lecun_normal": LecunNormal, "normal": Normal, "truncated_normal": TruncatedNormal, "uniform": Uniform,
    "orthogonal": Orthogonal, "zeros": Zeros, "ones": Ones, "constant": Constant,
    "variance_scaling": VarianceScaling, "glorot_normal": GlorotNormal, "he_normal": HeNormal,
}  # fmt: skip
#: other frameworks' names of the same draws (Keras' *_normal are truncated: variance_scaling, glorot_normal,
#: he_normal; its lecun_normal is variance_scaling's default, not Chainer's lecun_normal)
ALIASES = {"glorot_uniform": "xavier_uniform", "he_uniform": "kaiming_uniform"}
_MAX_TEXT = 200


def initializer(value: Initializer | str) -> Initializer:
    """``value`` as an :class:`Initializer`: itself, or the one its text names
    (``"normal(0.02)"``); ValueError (one line) naming what is wrong."""
    if isinstance(value, Initializer):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an initialiser such as 'xavier_uniform' or 'normal(0.02)', got {value!r}")
    text = value.strip()
    try:
        node = ast.parse(text, mode="eval").body if len(text) <= _MAX_TEXT else None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        node = None
    if isinstance(node, ast.Name):
        name, args, keywords = node.id, [], []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, args, keywords = node.func.id, node.args, node.keywords
    else:
        raise ValueError(f"{value[:100]!r} is not an initialiser such as 'xavier_uniform' or 'normal(0.02)'")
    name = ALIASES.get(name, name)
    if name not in INITIALIZERS:
        raise ValueError(f"unknown initialiser {name[:100]!r}; expected one of {', '.join(INITIALIZERS)}")
    cls = INITIALIZERS[name]
    names = [f.name for f in fields(cls)]
    if len(args) > len(names):
        raise ValueError(f"{name} takes at most {len(names)} arguments ({', '.join(names) or 'none'}), got {len(args)}")
    try:
        arguments = {key: ast.literal_eval(arg) for key, arg in zip(names, args, strict=False)}
        for keyword in keywords:
            if keyword.arg not in names:
                raise ValueError(f"{name} has no argument {str(keyword.arg)[:100]!r}; its arguments: "
                                 f"{', '.join(names) or 'none'}")  # fmt: skip
            if keyword.arg in arguments:
                raise ValueError(f"{name} got {keyword.arg!r} twice")
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
    except (TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{value[:100]!r}: arguments must be literal values") from None
    except ValueError as error:
        if "malformed node" in str(error):
            raise ValueError(f"{value[:100]!r}: arguments must be literal values") from None
        raise
    return cls(**arguments)


def with_initializers(model, patterns):
    """``model`` with the first weights of the parameters each pattern of ``patterns`` (a mapping
    of pattern to initialiser) names drawn by that initialiser: a recipe's ``[initializers]``.
    Patterns are :func:`unitrain.controls.matches`' (a dotted name, a layer path, an ``fnmatch``
    glob or a layer class: ``"conv1.weight"``, ``"*.bias"``, ``"Linear"``); each names the
    ``weight_init`` / ``bias_init`` of Linear, Conv2d, ConvTranspose2d and BatchNorm layers, inside
    nested Sequentials.
    ValueError (one line) for a pattern naming nothing, a parameter named twice, a parameter no
    initialiser draws, or an initialiser that cannot apply."""
    from .controls import matches
    from .layers import Sequential

    leaves = dict(model.named_layers())
    chosen: dict[str, tuple[str, Initializer]] = {}
    for pattern, text in patterns.items():
        try:
            drawn_by = initializer(text)
        except ValueError as error:
            raise ValueError(f"initializers: {str(pattern)[:100]!r}: {error}") from None
        names = [f"{path}.{key}" for path, layer in leaves.items() for key in layer.param_shapes()
                 if matches(pattern, f"{path}.{key}", type(layer).__name__)]  # fmt: skip
        if not names:
            raise ValueError(f"initializers: {str(pattern)[:100]!r} names no parameter of the model")
        for name in names:
            if name in chosen:
                raise ValueError(f"initializers: {name} is named by {chosen[name][0]!r} and by {pattern!r}")
            chosen[name] = (pattern, drawn_by)
    changes: dict[str, dict[str, Initializer]] = {}
    for name, (pattern, drawn_by) in chosen.items():
        path, _, key = name.rpartition(".")
        if not hasattr(leaves[path], f"{key}_init"):
            raise ValueError(f"initializers: {pattern!r} names {name}, a {type(leaves[path]).__name__} parameter; "
                             "initialisers draw Linear, Conv2d, ConvTranspose2d and "
                             "BatchNorm weights and biases")  # fmt: skip
        changes.setdefault(path, {})[f"{key}_init"] = drawn_by

    def rebuild(container, prefix):
        if not isinstance(container, Sequential):
            raise ValueError(f"initializers: the model holds a {type(container).__name__}; name weight_init "
                             "/ bias_init in its Python factory (recipes reach nested Sequentials only)")  # fmt: skip
        children = {}
        for name, child in container.children:
            path = f"{prefix}{name}"
            if hasattr(child, "children"):
                children[name] = rebuild(child, f"{path}.") if any(p.startswith(f"{path}.") for p in changes) else child
            else:
                children[name] = dataclasses.replace(child, **changes[path]) if path in changes else child
        return Sequential(children, init=container.init)

    return rebuild(model, "") if changes else model
