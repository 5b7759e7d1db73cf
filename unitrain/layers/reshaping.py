"""Layers that change the shape: Flatten and Upsample."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Layer, Pair, _image_shape, _pair

UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class Upsample(Layer):
    """Resizes NCHW images to ``size`` or by ``scale_factor`` (exactly one of them;
    ``torch.nn.Upsample``), as pairs once constructed. The output size is ``size``, or
    ``floor(size * scale_factor)`` per axis. Each output index ``i`` reads the input at source
    position ``src(i)`` with PyTorch's rules (:mod:`unitrain.upsampling`): ``"nearest"`` takes
    element ``min(floor(src), size - 1)``, ``"bilinear"`` interpolates linearly between
    ``floor(src)`` and the next element along each axis. ``align_corners`` (bilinear only;
    ``None`` means ``False``) maps the corner pixels' centres onto each other."""

    size: int | Pair | None = None
    scale_factor: float | tuple[float, float] | None = None
    mode: str = "nearest"
    align_corners: bool | None = None

    def __post_init__(self):
        if (self.size is None) == (self.scale_factor is None):
            raise ValueError(f"Upsample: give exactly one of size and scale_factor, got size={self.size!r} and "
                             f"scale_factor={self.scale_factor!r}")  # fmt: skip
        if self.size is not None:
            _pair(self, "size", 1)
        else:
            factor = self.scale_factor
            pair = (factor, factor) if not isinstance(factor, (tuple, list)) else tuple(factor)
            if len(pair) != 2 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in pair
            ):
                raise ValueError(f"Upsample: scale_factor must be a positive number or a pair of them, got {factor!r}")
            object.__setattr__(self, "scale_factor", tuple(float(v) for v in pair))
        if self.mode not in UPSAMPLE_MODES:
            raise ValueError(f"Upsample: mode must be one of {UPSAMPLE_MODES}, got {self.mode!r}")
        if self.align_corners is not None and (self.mode == "nearest" or not isinstance(self.align_corners, bool)):
            wanted = "None with mode 'nearest'" if self.mode == "nearest" else "True, False or None"
            raise ValueError(f"Upsample: align_corners must be {wanted}, got {self.align_corners!r}")

    def output_shape(self, input_shape):
        _image_shape(self, input_shape)
        if self.size is not None:
            return (input_shape[0], *self.size)
        out = tuple(math.floor(size * factor) for size, factor in zip(input_shape[1:], self.scale_factor, strict=True))
        if min(out) < 1:
            raise ValueError(f"{self}: input {input_shape[1]}x{input_shape[2]} gives an empty output {out}")
        return (input_shape[0], *out)


@dataclass(frozen=True)
class Flatten(Layer):
    """Merges dimensions ``start_dim`` to ``end_dim`` (both included; counted with the batch
    axis as 0, negative from the end) into one, in C order (``torch.nn.Flatten``). The default
    flattens every dimension but the batch one; the batch axis itself always stays."""

    start_dim: int = 1
    end_dim: int = -1

    def __post_init__(self):
        for name in ("start_dim", "end_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Flatten: {name} must be an integer, got {value!r}")

    def flattened_dims(self, rank: int) -> tuple[int, int]:
        """``(start, end)``, non-negative, for a batch of ``rank`` dimensions."""
        start, end = (dim + rank if dim < 0 else dim for dim in (self.start_dim, self.end_dim))
        if not (1 <= start < rank and 1 <= end < rank) or start > end:
            raise ValueError(
                f"{self}: for a batch of rank {rank} start_dim and end_dim must lie in 1..{rank - 1} "
                f"(or {-(rank - 1)}..-1) with start_dim <= end_dim; the batch axis 0 is never flattened"
            )
        return start, end

    def output_shape(self, input_shape):
        start, end = self.flattened_dims(len(input_shape) + 1)
        return (*input_shape[: start - 1], math.prod(input_shape[start - 1 : end]), *input_shape[end:])
