"""BatchNorm1d, BatchNorm2d and LayerNorm."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import dialects
from ..initializers import Initializer, PyTorchDefault
from .base import Layer, _initializers, _positive_int

#: what a BatchNorm feeds its running variance: the unbiased batch variance (PyTorch, Chainer,
#: MindSpore) or the biased one it normalised with (Keras)
RUNNING_VARIANCES = ("unbiased", "biased")


@dataclass(frozen=True)
class _Norm(Layer):
    """Shared validation of the normalisation layers' ``eps``."""

    def _check_eps(self):
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {self.eps!r}")


@dataclass(frozen=True)
class _BatchNorm(_Norm):
    """PyTorch's BatchNorm. Training: normalise with the batch mean and biased variance and
    update ``running = (1 - momentum) * running + momentum * batch_stat`` where the variance
    fed to the running estimate is the *unbiased* one (``running_var="unbiased"``: PyTorch,
    Chainer, MindSpore) or the biased one that normalised the batch (``"biased"``: Keras'
    ``BatchNormalization``). Eval: normalise with the running statistics.
    ``num_batches_tracked`` counts training batches, as in PyTorch. ``eps``, ``momentum`` and
    ``running_var`` left out: the dialect's (PyTorch's 1e-5, 0.1 and ``"unbiased"``).
    ``weight_init`` / ``bias_init`` left out: weight 1 and bias 0, as every framework's; the DCGAN
    tutorial's ``weights_init`` is ``weight_init="normal(std=0.02, mean=1.0)"``."""

    num_features: int
    eps: float | None = None
    momentum: float | None = None
    running_var: str | None = None
    weight_init: Initializer | str | None = field(default=None, repr=False)
    bias_init: Initializer | str | None = field(default=None, repr=False)

    _input_rank = 0

    def __post_init__(self):
        if self.eps is None:
            object.__setattr__(self, "eps", dialects.current().batchnorm_eps)
        if self.momentum is None:
            object.__setattr__(self, "momentum", dialects.current().batchnorm_momentum)
        if self.running_var is None:
            object.__setattr__(self, "running_var", dialects.current().batchnorm_running_var)
        _positive_int(type(self).__name__, "num_features", self.num_features)
        self._check_eps()
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in (0, 1], got {self.momentum!r}")
        if self.running_var not in RUNNING_VARIANCES:
            raise ValueError(
                f"{type(self).__name__}: running_var must be one of {', '.join(RUNNING_VARIANCES)}, "
                f"got {str(self.running_var)[:100]!r}"
            )
        _initializers(self)
        for key in ("weight", "bias"):  # PyTorch's default draw is a layer's U(-1/sqrt(fan_in), ...): no fan here
            if isinstance(getattr(self, f"{key}_init"), PyTorchDefault):
                raise ValueError(f"{type(self).__name__}: {key}_init pytorch draws from a fan in, which a "
                                 "BatchNorm has not; PyTorch starts it at weight ones, bias zeros")  # fmt: skip

    def param_shapes(self):
        return {"weight": (self.num_features,), "bias": (self.num_features,)}

    def buffer_shapes(self):
        n = (self.num_features,)
        return {"running_mean": n, "running_var": n, "num_batches_tracked": ()}

    def output_shape(self, input_shape):
        if len(input_shape) != self._input_rank or input_shape[0] != self.num_features:
            raise ValueError(
                f"{self} expects per-sample input of rank {self._input_rank} with "
                f"{self.num_features} channels first, got {input_shape}"
            )
        return input_shape


@dataclass(frozen=True)
class BatchNorm1d(_BatchNorm):
    """Over (N, C) input."""

    _input_rank = 1


@dataclass(frozen=True)
class BatchNorm2d(_BatchNorm):
    """Over (N, C, H, W) input, statistics per channel."""

    _input_rank = 3


@dataclass(frozen=True)
class LayerNorm(_Norm):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` over the trailing
    ``normalized_shape`` dims of each sample, biased variance (``torch.nn.LayerNorm``).
    ``normalized_shape`` (int or tuple) is stored as a tuple of ints."""

    normalized_shape: int | tuple[int, ...]
    eps: float = 1e-5
    elementwise_affine: bool = True

    def __post_init__(self):
        shape = self.normalized_shape
        shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
        if (
            not isinstance(shape, (tuple, list))
            or not shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
        ):
            raise ValueError(
                f"LayerNorm: normalized_shape must be a positive integer or a non-empty tuple of them, "
                f"got {self.normalized_shape!r}"
            )
        object.__setattr__(self, "normalized_shape", tuple(shape))
        self._check_eps()

    def param_shapes(self):
        if not self.elementwise_affine:
            return {}
        return {"weight": self.normalized_shape, "bias": self.normalized_shape}

    def output_shape(self, input_shape):
        n = len(self.normalized_shape)
        if tuple(input_shape[len(input_shape) - n :]) != self.normalized_shape:
            raise ValueError(
                f"{self} expects per-sample input ending in {self.normalized_shape}, got per-sample shape {input_shape}"
            )
        return input_shape
