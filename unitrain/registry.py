"""Backend registry: the four built-in adapters plus third-party ones from entry points.

Nothing here imports a framework. Whether a framework is installed is answered from package
metadata; which framework a native model belongs to is answered from ``sys.modules`` (if a
framework was never imported, no object of it can exist), as array-api-compat does.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

#: entry-point group under which third-party packages register ``name = "module:Class"``
ENTRY_POINT_GROUP = "unitrain.backends"
DEFAULT_BACKEND = "numpy"
ENV_VAR = "UNITRAIN_BACKEND"


class BackendError(ValueError):
    """An unknown backend, one whose framework is not installed, or a model it cannot run."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    target: str  # "module:Class"
    framework: str | None = None  # import name whose presence the backend needs
    distribution: str | None = None  # package whose version is reported
    install_hint: str | None = None
    #: the launcher of the framework's distributed engine (``unitrain train --nproc``), if supported
    launcher: str | None = None

    def installed(self) -> bool:
        return self.framework is None or importlib.util.find_spec(self.framework) is not None

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution) if self.distribution else None
        except importlib.metadata.PackageNotFoundError:
            return None


BUILTIN = {
    spec.name: spec
    for spec in (
        BackendSpec("numpy", "unitrain.backends.numpy:NumpyLoop", "numpy", "numpy", launcher="mpiexec"),
        BackendSpec("torch", "unitrain.backends.torch:TorchLoop", "torch", "torch",
                    "pip install 'unitrain[torch]'", launcher="torchrun"),
        BackendSpec("mindspore", "unitrain.backends.mindspore:MindSporeLoop", "mindspore", "mindspore",
                    "pip install 'unitrain[mindspore]'", launcher="msrun"),
        BackendSpec("chainer", "unitrain.backends.chainer:ChainerLoop", "chainer", "chainer",
                    "pip install 'unitrain[chainer]' (see DEVELOPERS.md for its build quirks)", launcher="mpiexec"),
    )
}  # fmt: skip


def _entry_point_backends() -> dict[str, BackendSpec]:
    found = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in BUILTIN:
            dist = entry.dist.name if entry.dist is not None else None
            found[entry.name] = BackendSpec(entry.name, entry.value, distribution=dist)
    return found


def backend_specs() -> dict[str, BackendSpec]:
    """Every backend by name: the built-in ones and those registered under the ``unitrain.backends`` entry points."""
    return {**BUILTIN, **_entry_point_backends()}


def available_backends() -> list[str]:
    """Names of every known backend, installed or not."""
    return list(backend_specs())


def load_adapter(target: str) -> type:
    """Import an adapter class from ``"module:Class"``."""
    from .loop import TrainingLoop

    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise BackendError(f"adapter {target!r} must be written 'module:Class'")
    try:
        adapter = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise BackendError(f"cannot load adapter {target!r}: {error}") from None
    if not (isinstance(adapter, type) and issubclass(adapter, TrainingLoop)):
        raise BackendError(f"adapter {target!r} is not a unitrain.TrainingLoop subclass")
    return adapter


def usable_spec(name: str) -> BackendSpec:
    """The spec of backend ``name``, checked to be known and installed (nothing is imported)."""
    specs = backend_specs()
    if name not in specs:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(specs)}")
    spec = specs[name]
    if not spec.installed():
        raise BackendError(f"backend {name!r} needs {spec.framework}, which is not installed: {spec.install_hint}")
    return spec


def backend_name(name: str | None = None) -> str:
    """``name``, or the default backend: ``$UNITRAIN_BACKEND`` or ``numpy``."""
    return name or os.environ.get(ENV_VAR) or DEFAULT_BACKEND


def get_backend(name: str | None = None) -> type:
    """The adapter class of backend ``name`` (default: ``$UNITRAIN_BACKEND`` or ``numpy``)."""
    return load_adapter(usable_spec(backend_name(name)).target)


def backend_of(model: Any) -> str | None:
    """The built-in backend whose framework ``model`` belongs to, or ``None``."""
    for spec in BUILTIN.values():
        native_capable = spec.framework not in (None, "numpy") and spec.framework in sys.modules
        if native_capable and load_adapter(spec.target).is_native_model(model):
            return spec.name
    return None


def make_loop(backend: str | None = None, model: Any = None, loss=None, optimizer=None, *, seed: int = 0, **options):
    """Build a training loop. A native model picks its own backend when ``backend`` is None.
    ``options``: the loop's other keyword arguments (``dtype``, ``lr_schedule``, ``clip_grad_norm``,
    ``distributed``: join the process group of the engine's launcher, see ``TrainingLoop``)."""
    if model is None:
        raise TypeError("make_loop() needs a model (a unitrain Sequential or a native model)")
    if backend is None:
        backend = backend_of(model)
    return get_backend(backend)(model, loss, optimizer, seed=seed, **options)
