"""Text for language models: a vocabulary of characters or words, a text as fixed-length windows of
token ids (inputs and next-token targets), a token dataset of padded sequences with their lengths
(``.npz``), the text shipped with the package, and perplexity.

A language model's windows are what PyTorch's word-language-model example and char-RNN tutorials
train on: the token stream cut into consecutive pieces of ``length`` ids, ``x = ids[i : i + length]``
and ``y = ids[i + 1 : i + length + 1]``. The model's output is ``(N, vocabulary, length)`` logits (the
class axis second, as ``CrossEntropyLoss`` takes it), and the loss its mean per token; perplexity is
``exp`` of that mean.

The validation text is the last ``val_fraction`` of the stream, a contiguous piece (windows cut
from a shuffled stream would put the same sentences on both sides).
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .data import MAX_DATA_BYTES, ArrayDataset, DataError

LEVELS = ("char", "word")

#: the text shipped in ``unitrain/datafiles/``: name -> (file, sha256 of its decompressed bytes)
SHIPPED = {"tz-news": ("tz-news/NEWS.gz", "800d5b6bddf7fff2b15b6165c9a3b863902f83ad6c294fa4f9b28a5d6a180951")}


def shipped_text(name: str = "tz-news") -> str:
    """A public-domain text shipped with the package (see ``unitrain/datafiles/tz-news/README.md``):
    ``"tz-news"``, the tz database's NEWS file (239 kB of English prose about time zones)."""
    if not isinstance(name, str) or name not in SHIPPED:
        raise DataError(f"no shipped text named {name!r}; expected one of {', '.join(SHIPPED)}")
    relative, _ = SHIPPED[name]
    with resources.files("unitrain").joinpath("datafiles", relative).open("rb") as file:
        return gzip.decompress(file.read()).decode("utf-8")


def _tokens(text: str, level: str) -> list[str]:
    if not isinstance(text, str):  # bytes would give integer "characters"
        raise DataError(f"text must be a str (decode a file's bytes first), got {type(text).__name__}")
    if level not in LEVELS:
        raise DataError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return list(text) if level == "char" else text.split()


@dataclass(frozen=True)
class Vocabulary:
    """Tokens (characters or whitespace-separated words) in sorted order; a token's id is its index."""

    tokens: tuple[str, ...]
    level: str = "char"

    @classmethod
    def of(cls, text: str, level: str = "char") -> Vocabulary:
        """The vocabulary of every token in ``text``."""
        return cls(tuple(sorted(set(_tokens(text, level)))), level)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of ``text``; a token outside the vocabulary is refused in one line."""
        index = {token: i for i, token in enumerate(self.tokens)}
        ids = []
        for token in _tokens(text, self.level):
            if token not in index:
                raise DataError(f"token {token!r} is not in the vocabulary of {len(self)} {self.level} tokens")
            ids.append(index[token])
        return np.array(ids, np.int64)

    def decode(self, ids) -> str:
        """The text of token ids (words joined by single spaces)."""
        separator = "" if self.level == "char" else " "
        return separator.join(self.tokens[i] for i in _ids(np.asarray(ids).reshape(-1), len(self), "decode"))


def windows(ids: np.ndarray, length: int, stride: int | None = None) -> ArrayDataset:
    """Inputs ``ids[i : i + length]`` and targets ``ids[i + 1 : i + length + 1]`` for ``i = 0, stride,
    2 * stride, ...`` (``stride``: ``length`` by default, consecutive windows that do not overlap)."""
    stride = length if stride is None else stride
    for name, value in (("length", length), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"windows: {name} must be an integer >= 1, got {value!r}")
    ids = _ids(ids, None, "windows")
    if len(ids) < length + 1:
        raise DataError(f"windows: {len(ids)} tokens cannot make one window of {length} inputs and its targets")
    starts = np.arange(0, len(ids) - length, stride)
    if (need := 2 * len(starts) * length * ids.itemsize) > MAX_DATA_BYTES:  # inputs and targets, copied
        raise DataError(f"windows: {len(starts)} windows of {length} tokens need {need} bytes; at most "
                        f"{MAX_DATA_BYTES} (use a larger stride or shorter windows)")  # fmt: skip
    offsets = np.arange(length)
    return ArrayDataset(ids[starts[:, None] + offsets], ids[starts[:, None] + offsets + 1])


@dataclass(frozen=True)
class LanguageModelData:
    """A text as a language model's training and validation windows, with its vocabulary."""

    train: ArrayDataset
    val: ArrayDataset
    vocabulary: Vocabulary


def language_model_data(text: str, length: int, *, level: str = "char", val_fraction: float = 0.1,
                        stride: int | None = None) -> LanguageModelData:  # fmt: skip
    """``text`` split into a training stream and the last ``val_fraction`` of its tokens, each cut
    into :func:`windows`; the vocabulary is the whole text's (so every validation token has an id)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be a number between 0 and 1, got {val_fraction!r}")
    vocabulary = Vocabulary.of(text, level)
    ids = vocabulary.encode(text)
    cut = len(ids) - round(len(ids) * val_fraction)
    return LanguageModelData(windows(ids[:cut], length, stride), windows(ids[cut:], length, stride), vocabulary)


def perplexity(loss: float | dict) -> float:
    """``exp`` of a mean per-token cross-entropy (natural log), or of ``evaluate``'s ``"loss"``
    (``inf`` past float64's range, as ``torch.exp``)."""
    value = loss.get("loss") if isinstance(loss, dict) else loss
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise DataError(f"perplexity: expected a loss (a number, or evaluate's results with 'loss'), got {loss!r}")
    return math.inf if value > 709 else math.exp(value)


def save_tokens(path: str | Path, sequences, labels=None, padding: int = 0) -> None:
    """Variable-length token sequences as a token dataset: ``tokens`` ``(N, T)`` int64 padded with
    ``padding`` to the longest, ``lengths`` ``(N,)``, and ``labels`` if given."""
    sequences = list(sequences)
    for i, sequence in enumerate(sequences):  # an empty list would be named as float64 ids
        if np.size(sequence) == 0:
            raise DataError(f"save_tokens: sequence {i} is empty; expected at least one token")
    sequences = [_ids(sequence, None, f"save_tokens: sequence {i}") for i, sequence in enumerate(sequences)]
    if not sequences:
        raise DataError("save_tokens: expected at least one sequence, each of at least one token")
    _ids([padding], None, "save_tokens: padding")  # what load_tokens refuses is never written
    lengths = np.array([len(sequence) for sequence in sequences], np.int64)
    tokens = np.full((len(sequences), int(lengths.max(initial=0))), padding, np.int64)
    for row, sequence in zip(tokens, sequences, strict=True):
        row[: len(sequence)] = sequence
    arrays = {"tokens": tokens, "lengths": lengths}
    if labels is not None:
        arrays["labels"] = _checked_labels(np.asarray(labels), len(sequences), "save_tokens")
    np.savez_compressed(path, **arrays)


def load_tokens(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(tokens, lengths, labels or None)`` of a token dataset written by :func:`save_tokens` (or
    any ``.npz`` with those members), read with the dataset readers' checks (headers before data)
    and checked: integer ``tokens`` ``(N, T)``, ``lengths`` ``(N,)`` in ``1..T``, ``labels`` with
    ``N`` rows."""
    from .datasets import MAX_DATA_BYTES, _npy_bytes, _npy_header, _read_npy
    from .reading import open_npz, path_problem

    if problem := path_problem(path, "an .npz file"):
        raise DataError(f"{path} {problem}")
    with open_npz(path, str(path), DataError) as archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        missing = [name for name in ("tokens", "lengths") if name not in members]
        if missing:
            raise DataError(f"{path}: a token dataset needs the arrays tokens and lengths; missing {missing[0]}")
        keys = [key for key in ("tokens", "lengths", "labels") if key in members]
        headers = {key: _npy_header(archive, members[key], key, f"{path}: {key}", values=True) for key in keys}
        if sum(_npy_bytes(shape, dtype) for shape, _, dtype in headers.values()) > MAX_DATA_BYTES:
            raise DataError(f"{path}: its arrays declare more than {MAX_DATA_BYTES} bytes together")
        arrays = {key: _read_npy(archive, members[key], f"{path}: {key}", headers[key]) for key in keys}
    tokens, lengths, labels = arrays["tokens"], arrays["lengths"], arrays.get("labels")
    if tokens.dtype.kind not in "iu" or tokens.ndim != 2 or not len(tokens):
        raise DataError(
            f"{path}: tokens must be integer ids of shape (N, T), N >= 1, got {tokens.dtype} {tokens.shape}"
        )
    _ids(tokens, None, f"{path}: tokens", ndim=2)
    if lengths.dtype.kind not in "iu" or lengths.shape != (len(tokens),):
        raise DataError(f"{path}: lengths must be {len(tokens)} integers, got {lengths.dtype} {lengths.shape}")
    bad = lengths[(lengths < 1) | (lengths > tokens.shape[1])]
    if bad.size:
        raise DataError(f"{path}: length {int(bad[0])} is outside 1..{tokens.shape[1]} (the padded axis)")
    if labels is not None:
        _checked_labels(labels, len(tokens), str(path))
    return tokens.astype(np.int64), lengths.astype(np.int64), labels


def _checked_labels(labels: np.ndarray, sequences: int, where: str) -> np.ndarray:
    """``labels`` unless they are not numbers with one row per sequence (DataError)."""
    if labels.dtype.kind not in "biuf" or labels.ndim < 1 or len(labels) != sequences:
        count = len(labels) if labels.ndim else "not a list of"
        raise DataError(f"{where}: {count} labels for {sequences} sequences ({labels.dtype} {labels.shape}); "
                        "expected one number per sequence")  # fmt: skip
    return labels


def _ids(ids, vocabulary: int | None, what: str, ndim: int = 1) -> np.ndarray:
    """``ids`` as int64 token ids, one line unless they are integers in ``0..vocabulary - 1`` (or
    any id int64 holds) with ``ndim`` axes."""
    array = np.asarray(ids)
    if array.dtype.kind not in "iu" or array.ndim != ndim:
        raise DataError(f"{what}: expected {ndim}-d integer token ids, got {array.dtype} {array.shape}")
    if array.size:
        low, high = array.min(), array.max()
        limit = np.iinfo(np.int64).max if vocabulary is None else vocabulary - 1
        if low < 0 or high > limit:
            bad = low if low < 0 else high
            raise DataError(f"{what}: token id {int(bad)} is outside 0..{limit}")
    return array.astype(np.int64)
