"""``parametrize_with_checks``: one pytest test per (adapter, check), in the style of scikit-learn's.

from unitrain.conformance import parametrize_with_checks

@parametrize_with_checks([MyLoop])
def test_conformance(adapter, check):
    check(adapter)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from unitrain.loop import TrainingLoop

from .checks import CHECKS
from .runner import declared_xfails, run_check


class BoundCheck:
    """A check as a pytest parameter: calling it runs the check, skipping or failing the test."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, adapter: type[TrainingLoop]) -> None:
        import pytest

        result = run_check(adapter, self.name)
        if result.status == "skip":
            pytest.skip(result.message)
        if result.status == "fail":
            pytest.fail(result.message, pytrace=False)

    def __repr__(self) -> str:
        return self.name


def parametrize_with_checks(
    adapters: Iterable[type[TrainingLoop]],
    *,
    checks: Iterable[str] | None = None,
    xfails: Mapping[str, str] | None = None,
):
    """A ``pytest.mark.parametrize("adapter, check", ...)`` over every adapter and check.

    Expected failures (the adapter's ``conformance_xfails`` plus ``xfails``) become strict
    ``xfail`` marks, so one that starts passing fails the run; one naming no check raises here.
    """
    import pytest

    names = list(CHECKS) if checks is None else list(checks)
    params = []
    for adapter in adapters:
        declared = declared_xfails(adapter, xfails)
        unknown = sorted(set(declared) - set(CHECKS)) + [name for name in names if name not in CHECKS]
        if unknown:
            raise ValueError(f"{adapter.__name__}: {unknown} name no known check; known: {', '.join(CHECKS)}")
        for name in names:
            marks = [pytest.mark.xfail(reason=declared[name], strict=True)] if name in declared else []
            params.append(pytest.param(adapter, BoundCheck(name), marks=marks, id=f"{adapter.name}-{name}"))
    return pytest.mark.parametrize("adapter, check", params)
