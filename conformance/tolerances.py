"""Every numerical tolerance of the suite, in one place.

A comparison of a backend's result against the float64 reference allows

    tolerance = MULTIPLE * eps(dtype) * size * max(1, max |expected|)

where ``size`` is the length of the longest chain of rounded operations behind one output element
(a dot product of ``n`` terms has size ``n``): the classic worst-case bound for summation is
``n * eps`` relative, and ``MULTIPLE`` leaves room for the few extra roundings around it
(bias, activation, loss). Values below 1 are compared absolutely, larger ones relatively.

Checks whose error grows beyond that model (trajectories, where rounding errors are fed back
through many steps) scale it by a factor from :data:`OVERRIDES`, each with its reason.
"""

from __future__ import annotations

import numpy as np

MULTIPLE = 8

#: check name -> (factor applied to the tolerance, why)
_RELU_KINKS = (
    "ReLU networks are only piecewise smooth: float32 rounding, which differs between CPUs and kernels, "
    "can leave one sample's pre-activation on the other side of 0 than float64 does; from then on that "
    "unit's weights get a different gradient share of one sample in a batch of 16, and Adam (eps 1e-4, "
    "steps of at most ~lr = 1e-3) moves them apart by up to lr / 16 per remaining step: 6e-3 after 100 "
    "mlp steps, 8x the mlp base tolerance 8 eps 784 = 7.5e-4 (cnn: 1.25e-3 after 20 steps, 7x its base "
    "8 eps 192). 20 allows two such crossings with a 1.25 margin, while any systematic error in the step "
    "moves weights by far more"
)
OVERRIDES: dict[str, tuple[float, str]] = {
    "check_trajectory_mlp": (20.0, _RELU_KINKS),
    "check_trajectory_cnn": (20.0, _RELU_KINKS),
}


def eps(dtype) -> float:
    """The machine epsilon of ``dtype``."""
    return float(np.finfo(np.dtype(dtype)).eps)


def tolerance(dtype, size: float, expected_scale: float = 1.0, check: str | None = None) -> float:
    """Absolute tolerance for a result of ``dtype`` whose exact value has magnitude up to
    ``expected_scale``, computed through ``size`` rounded operations, in check ``check``."""
    factor = OVERRIDES.get(check, (1.0, ""))[0]
    return factor * MULTIPLE * eps(dtype) * max(1.0, size) * max(1.0, expected_scale)


#: central differences ``(f(w + h) - f(w - h)) / 2h`` in float64: truncation error ~ h**2 * f''' (1e-12)
#: plus cancellation ~ eps * |f| / h (1e-10), far below this relative tolerance
FINITE_DIFFERENCE_STEP = 1e-6
FINITE_DIFFERENCE_TOLERANCE = 1e-6
