"""Dropout."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Layer


@dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: in training zero each element with probability ``p`` and scale the
    survivors by ``1/(1-p)``; identity in eval mode."""

    p: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {self.p!r}")
