"""Image transforms, done once in NumPy so that every backend sees identical bits.

Static transforms run when a dataset is loaded: channels-last to NCHW, scaling to [0, 1],
:class:`Normalization`, :func:`pad` and :func:`resize`. The random ones (:class:`Augmentation`: random crop with
padding, horizontal flip) run per batch as a pure function of ``(seed, epoch, batch index)``, so
the same run augments the same way on every backend and a resumed run continues exactly.
Padding fills with the normalised value of a black pixel (``-mean/std``), which is what
torchvision's ``Pad``/``RandomCrop`` on an image followed by ``Normalize`` give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: chunk of samples over which training-set statistics are accumulated (bounded temporaries)
_STATS_CHUNK = 4096


@dataclass(frozen=True)
class Normalization:
    """``x = (pixel / 255 - mean[c]) / std[c]`` per channel ``c`` (pixels given as uint8; float
    pixels are taken as already in [0, 1]). ``source`` says where mean and std come from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"normalisation needs one mean and one std per channel, got {self.mean} and {self.std}")
        if not all(np.isfinite(self.mean)) or not all(s > 0 and np.isfinite(s) for s in self.std):
            raise ValueError(f"normalisation std must be finite and > 0, mean finite; got {self.mean}, {self.std}")

    @classmethod
    def of_training_set(cls, images: np.ndarray, source: str) -> Normalization:
        """Per-channel mean and (population) standard deviation of ``images`` ``(N, C, H, W)``
        scaled to [0, 1], accumulated in float64 over chunks."""
        channels = images.shape[1]
        count, total, squares = 0, np.zeros(channels), np.zeros(channels)
        for begin in range(0, len(images), _STATS_CHUNK):
            chunk = _unit_scale(images[begin : begin + _STATS_CHUNK], np.float64)
            count += chunk.size // channels
            total += chunk.sum(axis=(0, 2, 3))
            squares += np.square(chunk).sum(axis=(0, 2, 3))
        if count == 0:
            raise ValueError(f"{source} is empty: no statistics to normalise with")
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
        std[std == 0] = 1.0  # a constant channel: centre it, do not divide by zero
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std), source)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Normalised float32 copy of ``images`` ``(N, C, H, W)``; in place in float32, so no
        float64 temporaries of the whole set (MNIST's: bit for bit the tutorials' formula)."""
        if images.shape[1] != len(self.mean):
            raise ValueError(f"images have {images.shape[1]} channels, the normalisation {len(self.mean)}")
        x = _unit_scale(images, np.float32)
        for channel, (mean, std) in enumerate(zip(self.mean, self.std, strict=True)):
            x[:, channel] -= np.float32(mean)
            x[:, channel] /= np.float32(std)
        return x

    def fill(self) -> tuple[float, ...]:
        """The normalised value of a black pixel, per channel: what padding fills with."""
        return tuple(float((np.float32(0) - np.float32(m)) / np.float32(s)) for m, s in zip(self.mean, self.std))  # noqa: B905

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}


def _unit_scale(images: np.ndarray, dtype) -> np.ndarray:
    """A ``dtype`` copy of ``images`` in [0, 1]: uint8 pixels divided by 255, floats as they are."""
    x = images.astype(dtype)  # always a copy
    if images.dtype == np.uint8:
        x /= dtype(255)
    return x


def channels_last_to_nchw(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` to a contiguous ``(N, C, H, W)``."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def pad(x: np.ndarray, padding: int, fill: tuple[float, ...]) -> np.ndarray:
    """``x`` ``(N, C, H, W)`` with ``padding`` pixels on every side filled with ``fill[c]``
    (e.g. MNIST's 28x28 to LeNet's 32x32 with ``padding=2``)."""
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    out = np.empty((n, c, h + 2 * padding, w + 2 * padding), x.dtype)
    out[...] = np.asarray(fill, x.dtype).reshape(1, c, 1, 1)
    out[:, :, padding : padding + h, padding : padding + w] = x
    return out


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``x`` ``(N, C, H, W)`` float32 resized to ``size = (height, width)`` with Pillow's
    bilinear filter (antialiased when shrinking, as torchvision's ``Resize`` on an image), one
    float channel (mode ``F``) at a time: the same bits whatever backend trains on them."""
    from PIL import Image

    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"resize needs a size of at least 1x1, got {height}x{width}")
    out = np.empty((*x.shape[:2], height, width), np.float32)
    for i, sample in enumerate(x):
        for c, channel in enumerate(sample):
            image = Image.fromarray(np.ascontiguousarray(channel, np.float32), mode="F")
            out[i, c] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return out


@dataclass(frozen=True)
class Augmentation:
    """torchvision's ``RandomCrop(size of the input, padding=crop_padding)`` then
    ``RandomHorizontalFlip(p=0.5)`` when ``flip``, per sample. The random numbers of batch ``b``
    of epoch ``e`` come from ``numpy.random.default_rng([seed, e, b])``: a pure function of
    the run's seed and the batch's place in it."""

    crop_padding: int = 0
    flip: bool = False
    fill: tuple[float, ...] = (0.0,)

    def __post_init__(self):
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")

    def __call__(self, x: np.ndarray, seed: int, epoch: int, batch: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch, batch])
        n, _, h, w = x.shape
        p = self.crop_padding
        offsets = rng.integers(0, 2 * p + 1, size=(n, 2))  # drawn even when p == 0: one stream layout
        flips = rng.random(n) < 0.5
        padded = pad(x, p, self.fill) if p else x
        out = np.empty_like(x)
        for i, (top, left) in enumerate(offsets):
            crop = padded[i, :, top : top + h, left : left + w]
            out[i] = crop[:, :, ::-1] if self.flip and flips[i] else crop
        return out

    def to_json(self) -> dict:
        return {"crop_padding": self.crop_padding, "flip": self.flip}
