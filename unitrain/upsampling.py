"""PyTorch's index rules of ``Upsample`` (ATen's ``UpSample.h`` and CPU kernels), as NumPy arrays
for the backends that build the layer from indexing or matrix products.

Along one axis of ``size`` input elements and ``out`` output elements, output ``i`` reads source
position ``src(i)``. PyTorch computes it in the input's floating type (``float`` for float32):

* ``scale``: ``(size - 1) / (out - 1)`` with ``align_corners`` (0 when ``out == 1``), else
  ``1 / scale_factor`` where the layer was given a scale factor, else ``size / out``;
* nearest: element ``min(floor(i * scale), size - 1)`` (the scale always in float32);
* bilinear: ``src = scale * i`` with ``align_corners``, else ``max(scale * (i + 0.5) - 0.5, 0)``;
  elements ``i0 = floor(src)`` and ``i1 = min(i0 + 1, size - 1)`` weighted ``1 - l`` and ``l``,
  ``l = clip(src - i0, 0, 1)``.
"""

from __future__ import annotations

import numpy as np

from .layers import Upsample


def source_scale(spec: Upsample, axis: int, size: int, out: int) -> float:
    """The distance in the input between neighbouring output positions along ``axis`` (0: rows)."""
    if spec.align_corners:
        return (size - 1) / (out - 1) if out > 1 else 0.0
    if spec.scale_factor is not None:
        return 1.0 / spec.scale_factor[axis]
    return size / out


def source_indices(spec: Upsample, axis: int, size: int, out: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, l)`` along ``axis``: output ``i`` is ``(1 - l[i]) * x[i0[i]] + l[i] * x[i1[i]]``
    (nearest: ``l`` is 0 and ``i1 == i0``); ``l`` in ``dtype``, the input's."""
    positions = np.arange(out)
    if spec.mode == "nearest":
        if out == size:
            index = positions
        elif out == 2 * size:  # ATen's shortcut, exact where the float product might not be
            index = positions >> 1
        else:
            scale = np.float32(source_scale(spec, axis, size, out))
            index = np.minimum(np.floor(positions.astype(np.float32) * scale).astype(np.int64), size - 1)
        return index, index, np.zeros(out, dtype)
    scale = np.asarray(source_scale(spec, axis, size, out), dtype)
    if spec.align_corners:
        source = scale * positions.astype(dtype)
    else:
        source = np.maximum(scale * (positions.astype(dtype) + dtype.type(0.5)) - dtype.type(0.5), 0)
    first = source.astype(np.int64)  # truncation is the floor of these non-negative positions
    weight = np.clip(source - first.astype(dtype), 0, 1).astype(dtype)
    return first, np.minimum(first + 1, size - 1), weight


def interpolation_matrix(spec: Upsample, axis: int, size: int, out: int, dtype) -> np.ndarray:
    """The ``(out, size)`` matrix ``A`` with ``y = A @ x`` along ``axis``."""
    first, second, weight = source_indices(spec, axis, size, out, np.dtype(dtype))
    matrix = np.zeros((out, size), dtype)
    rows = np.arange(out)
    np.add.at(matrix, (rows, first), 1 - weight)
    np.add.at(matrix, (rows, second), weight)
    return matrix
