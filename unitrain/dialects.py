"""Framework dialects: the defaults and optimizer equations of PyTorch, Chainer, Keras or MindSpore.

unitrain's specs speak PyTorch's dialect: its argument names and conventions (a BatchNorm's
``momentum`` weighs the new batch), its defaults and its equations. A port of another framework's
script says ``dialect="keras"`` (:class:`unitrain.Run`, a recipe's ``dialect``, ``--dialect``) or
builds its specs inside ``with unitrain.dialect("keras"):``, and then

- arguments a layer or optimizer spec leaves out take that framework's defaults (a model's
  ``init`` scheme, a Conv2d's bias, BatchNorm's ``eps``, ``momentum`` and ``running_var``, Adam's ``eps``), still
  written in PyTorch's conventions (Keras' ``BatchNormalization(momentum=0.99)`` is
  ``momentum=0.01`` here);
- a :class:`~unitrain.Run`'s optimizer follows that framework's equations (Adam's
  ``eps_placement``, SGD's ``lr_in_velocity``), whatever its spec was built with.

Every value below was read in the framework's own source; docs/dialects.md names the files.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    """One framework's defaults, in PyTorch's conventions."""

    name: str
    #: the model-wide initialisation scheme (:data:`unitrain.layers.INIT_SCHEMES`)
    init: str
    conv_bias: bool
    batchnorm_eps: float
    #: PyTorch's convention: the weight of the new batch's statistics (1 - Keras'/MindSpore's/Chainer's)
    batchnorm_momentum: float
    #: the batch variance fed to the running variance: "unbiased" (PyTorch) or "biased" (Keras)
    batchnorm_running_var: str
    adam_eps: float
    adam_eps_placement: str
    sgd_lr_in_velocity: bool

    def optimizer(self, spec):
        """``spec`` with this framework's equations."""
        changes = {}
        if hasattr(spec, "eps_placement"):
            changes["eps_placement"] = self.adam_eps_placement
        if hasattr(spec, "lr_in_velocity") and not spec.dampening:
            changes["lr_in_velocity"] = self.sgd_lr_in_velocity
        return dataclasses.replace(spec, **changes)


DIALECTS = {
    # torch/nn/modules/{linear,conv,batchnorm}.py, torch/optim/{adam,sgd}.py
    "torch": Dialect("torch", "pytorch", True, 1e-5, 0.1, "unbiased", 1e-8, "after_correction", False),
    # chainer/links/connection/{linear,convolution_2d}.py (LeCunNormal, bias 0),
    # links/normalization/batch_normalization.py (decay=0.9, eps=2e-5; functions/normalization/
    # batch_normalization.py: adjust = m / (m - 1), the unbiased variance), optimizers/{adam,momentum_sgd}.py
    "chainer": Dialect("chainer", "chainer", True, 2e-5, 0.1, "unbiased", 1e-8, "before_correction", True),
    # keras/src/layers/core/dense.py, convolutional/base_conv.py (glorot_uniform, zeros),
    # normalization/batch_normalization.py (momentum=0.99, epsilon=1e-3; ops.moments' biased variance
    # updates moving_variance), optimizers/{adam,sgd}.py (epsilon=1e-7)
    "keras": Dialect("keras", "keras", True, 1e-3, 0.01, "biased", 1e-7, "before_correction", True),
    # mindspore/nn/layer/{basic,conv}.py (HeUniform(sqrt(5)), Uniform(1/sqrt(fan_in)); Conv2d has_bias=False),
    # nn/layer/normalization.py (momentum=0.9, eps=1e-5), nn/optim/adam.py (the Adam primitive), momentum.py
    "mindspore": Dialect("mindspore", "pytorch", False, 1e-5, 0.1, "unbiased", 1e-8, "before_correction", False),
}

_current: contextvars.ContextVar[Dialect] = contextvars.ContextVar("unitrain_dialect", default=DIALECTS["torch"])


def get(name: str) -> Dialect:
    """The dialect ``name`` names; ValueError (one line) otherwise."""
    if name not in DIALECTS:
        raise ValueError(f"unknown dialect {str(name)[:100]!r}; expected one of {', '.join(DIALECTS)}")
    return DIALECTS[name]


def current() -> Dialect:
    """The dialect whose defaults specs built now take (PyTorch's outside :func:`dialect`)."""
    return _current.get()


@contextmanager
def dialect(name: str) -> Iterator[Dialect]:
    """Build specs with ``name``'s defaults inside the ``with`` block."""
    token = _current.set(get(name))
    try:
        yield _current.get()
    finally:
        _current.reset(token)
