"""Running checks: structured results, expected failures, the matrix and the ``unitrain conformance`` command."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from unitrain import registry
from unitrain.loop import TrainingLoop

from .checks import CHECKS, CheckFailure, CheckSkipped

#: statuses that make a run fail: a check failing, a declared failure passing, a broken declaration
UNEXPECTED = frozenset({"fail", "xpass", "error"})


@dataclass(frozen=True)
class CheckResult:
    check: str
    backend: str
    #: ``pass``, ``fail``, ``xfail`` (declared and failed), ``xpass`` (declared but passed), ``skip``,
    #: or ``error`` (a declared expected failure that names no check)
    status: str
    message: str = ""
    max_error: float | None = None
    tolerance: float | None = None
    seconds: float = 0.0

    @property
    def unexpected(self) -> bool:
        return self.status in UNEXPECTED


def adapter_label(adapter: type[TrainingLoop]) -> str:
    """The backend name if the registry resolves it to this very class, else ``module:Class``."""
    spec = registry.backend_specs().get(getattr(adapter, "name", None))
    if spec is not None and spec.target == f"{adapter.__module__}:{adapter.__qualname__}":
        return adapter.name
    if spec is not None and spec.installed():
        try:
            if registry.load_adapter(spec.target) is adapter:
                return adapter.name
        except registry.BackendError:
            pass
    return f"{adapter.__module__}:{adapter.__qualname__}"


def reproduce_command(adapter: type[TrainingLoop], check: str) -> str:
    """The command that runs ``check`` alone on ``adapter``."""
    label = adapter_label(adapter)
    option = f"--adapter {label}" if ":" in label else f"--backend {label}"
    return f"unitrain conformance {option} --check {check}"


def declared_xfails(adapter: type[TrainingLoop], xfails: Mapping[str, str] | None = None) -> dict[str, str]:
    """The adapter's ``conformance_xfails`` plus the caller's (the caller's reasons win)."""
    return {**getattr(adapter, "conformance_xfails", {}), **(xfails or {})}


def run_check(adapter: type[TrainingLoop], name: str, xfail_reason: str | None = None) -> CheckResult:
    """Run one check; failures carry the command that reproduces them."""
    backend = adapter_label(adapter)
    started = time.perf_counter()
    status, message, max_error, tolerance = "pass", "", None, None
    try:
        record = CHECKS[name](adapter)
        max_error, tolerance = record.max_error, record.tolerance
    except CheckSkipped as skip:
        status, message = "skip", str(skip)
    except CheckFailure as failure:
        status, message = "fail", failure.message
        max_error, tolerance = failure.max_error, failure.tolerance
    except Exception as error:  # a crash inside the adapter is a failure of the check, with its origin
        origin = traceback.extract_tb(error.__traceback__)[-1]
        status = "fail"
        message = f"raised {type(error).__name__}: {error} ({Path(origin.filename).name}:{origin.lineno})"
    seconds = time.perf_counter() - started
    if status == "fail":
        message = f"{message}\n  reproduce: {reproduce_command(adapter, name)}"
        if xfail_reason is not None:
            status, message = "xfail", f"expected failure ({xfail_reason}): {message}"
    elif status == "pass" and xfail_reason is not None:
        status, message = (
            "xpass",
            f"declared as an expected failure ({xfail_reason}) but passed; remove the declaration",
        )
    return CheckResult(name, backend, status, message, max_error, tolerance, seconds)


def run_checks(
    adapter: type[TrainingLoop], checks: Iterable[str] | None = None, xfails: Mapping[str, str] | None = None
) -> list[CheckResult]:
    """Run the suite (or the named ``checks``) on ``adapter``. ``xfails`` adds expected failures
    ``{check: reason}`` to those the adapter declares; one naming no check is an ``error`` result."""
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    declared = declared_xfails(adapter, xfails)
    backend = adapter_label(adapter)
    results = [
        CheckResult(name, backend, "error", f"declared expected failure {name!r} ({reason}) names no known check")
        for name, reason in declared.items()
        if name not in CHECKS
    ]
    return results + [run_check(adapter, name, declared.get(name)) for name in names]


# --- reporting --------------------------------------------------------------------------------

_CELLS = {"pass": "pass", "fail": "FAIL", "xfail": "xfail", "xpass": "XPASS", "skip": "skip", "error": "ERROR"}


def format_matrix(results: list[CheckResult]) -> str:
    """Checks down, backends across."""
    backends = list(dict.fromkeys(r.backend for r in results))
    checks = list(dict.fromkeys(r.check for r in results))
    cells = {(r.check, r.backend): _CELLS[r.status] for r in results}
    widths = [max(len(c) for c in [*checks, "check"])] + [max(len(b), 5) for b in backends]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(["check", *backends], widths, strict=True))]
    for name in checks:
        row = [name] + [cells.get((name, b), "-") for b in backends]
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def format_report(results: list[CheckResult]) -> str:
    """The matrix of results, then one line per failure, skip or expected failure."""
    lines = [format_matrix(results)]
    notes = [r for r in results if r.status in ("fail", "xpass", "error", "xfail", "skip")]
    if notes:
        lines.append("")
    for r in notes:
        lines.append(f"{_CELLS[r.status]} {r.backend} {r.check}: {r.message}")
    counts = {status: sum(r.status == status for r in results) for status in _CELLS}
    lines.append("")
    lines.append(", ".join(f"{n} {status}" for status, n in counts.items() if n))
    return "\n".join(lines)


def run_matrix(backends: list[str] | None, adapters: list[str] | None, checks: list[str] | None) -> list[CheckResult]:
    """``unitrain conformance``'s run: the named backends and adapter classes (default: every
    installed backend) through the named checks (default: all), reporting progress on stderr."""
    selected = [registry.load_adapter(target) for target in adapters or []]
    names = backends or ([] if adapters else [n for n, s in registry.backend_specs().items() if s.installed()])
    selected += [registry.get_backend(name) for name in names]
    unknown = [name for name in checks or [] if name not in CHECKS]
    if unknown:
        raise registry.BackendError(f"unknown check {unknown[0]!r}; known checks: {', '.join(CHECKS)}")
    results = []
    for adapter in selected:
        results += run_checks(adapter, checks)
        print(f"unitrain: {adapter_label(adapter)} done", file=sys.stderr, flush=True)
    return results


def results_json(results: list[CheckResult]) -> list[dict]:
    """The results as JSON values (``unitrain conformance --json``)."""
    return [asdict(r) for r in results]
