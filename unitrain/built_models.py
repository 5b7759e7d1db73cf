"""The models a command has built by name (standard library only: the command line opens the scope
before it parses, and parsing loads no NumPy)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

#: the models built so far by ``(name, dialect)``, inside :func:`one_model_per_name` (None outside)
BUILT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("unitrain_models_built", default=None)


@contextlib.contextmanager
def one_model_per_name() -> Iterator[None]:
    """Within the block (a command), :func:`unitrain.layers.model_from_name` calls a user's function
    once per name and dialect and gives every later check the same spec: one ``train`` called it six
    times, a torch module was traced six times (a model of 318 MB peaked at 4.2 GB), and a function
    with side effects (printing, downloading weights) repeated them."""
    token = BUILT.set({})
    try:
        yield
    finally:
        BUILT.reset(token)
