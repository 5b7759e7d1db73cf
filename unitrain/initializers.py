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
``uniform``            ``U(a, b)``
``orthogonal``         ``torch.nn.init.orthogonal_``: QR of a normal matrix, rows flattened, times ``gain``
``zeros``, ``ones``,   constants
``constant(val)``
=====================  ====================================================================
"""

from __future__ import annotations

import ast
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


@dataclass(frozen=True)
class TruncatedNormal(Normal):
    def draw(self, rng, shape, layer_fan_in):
        values = rng.normal(self.mean, self.std, shape)
        outside = abs(values - self.mean) > 2 * self.std
        while outside.any():  # each round keeps about 95% of what it redraws
            values[outside] = rng.normal(self.mean, self.std, int(outside.sum()))
            outside = abs(values - self.mean) > 2 * self.std
        return values


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
}  # fmt: skip
#: other frameworks' names of the same draws (their *_normal are truncated, so only the uniform ones)
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
