"""The conformance suite (imported as ``unitrain.conformance``): shared checks that prove an
adapter obeys the :class:`unitrain.TrainingLoop` protocol.

Three ways to run it: ``unitrain conformance``; :func:`parametrize_with_checks` in a test
module; :func:`run_checks`, which returns one :class:`CheckResult` per check.
"""

# importing a family of checks registers it in CHECKS; this order is the order they run in
# isort: off
from . import (  # noqa: F401
    forward_checks,
    optimizer_checks,
    step_checks,
    state_checks,
    layer_checks,
    training_checks,
    graph_checks,
    noise_checks,
    multi_model_checks,
    attention_checks,
    token_checks,
    tie_checks,
)

# isort: on
from .checks import CHECKS, CheckFailure, CheckSkipped
from .pytest_helpers import parametrize_with_checks
from .runner import CheckResult, format_matrix, run_check, run_checks

__all__ = [
    "CHECKS", "CheckFailure", "CheckResult", "CheckSkipped", "format_matrix", "parametrize_with_checks",
    "run_check", "run_checks",
]  # fmt: skip
