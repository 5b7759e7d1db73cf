"""Reading what users hand over: what is at a path, and JSON values checked against a schema.

Every reader (weights, checkpoints, MNIST files, images) asks :func:`path_problem` before it
opens anything, so a FIFO, a device, a symlink loop or a directory is named as what it is, and
nothing blocks on a FIFO or reads ``/dev/zero`` forever. JSON read from files (checkpoint
manifests, the dropout stream's state) is checked against a small declarative schema with
:func:`check_json` before any of it is used.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def path_kind(path: str | os.PathLike) -> str:
    """What is at ``path`` (symlinks followed), in words: ``"a regular file"``, ``"a directory"``,
    ``"a FIFO"``, ``"a character device"``, ..., ``"a symlink loop"``, ``"a broken symlink"`` or
    ``"nothing"``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(path) else "nothing"
    except NotADirectoryError:  # a path through a regular file: a/file/b
        return "nothing"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symlink loop"
        return f"unreadable ({error.strerror})"
    return next((name for is_kind, name in _KINDS if is_kind(mode)), "an unknown kind of file")


def path_problem(path: str | os.PathLike, expected: str = "a regular file") -> str | None:
    """``None`` if ``path`` is what a reader expects, else what is wrong, to follow the path in
    a message: ``"does not exist"`` or ``"is a FIFO, expected a safetensors file"``. ``expected``
    names the wanted thing; it is a directory when it ends in "directory", else a regular file."""
    wanted = "a directory" if expected.endswith("directory") else "a regular file"
    kind = path_kind(path)
    if kind == wanted:
        return None
    if kind == "nothing":
        return "does not exist"
    return f"is {kind}, expected {expected}"


def read_capped(path: str | os.PathLike, limit: int) -> bytes | None:
    """The bytes of the file at ``path``, or None if it holds more than ``limit`` (reading at most
    ``limit + 1``: memory stays bounded whatever the file)."""
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    return data if len(data) <= limit else None


#: how a member of an .npz is stored: what ``numpy.savez`` (stored) and ``savez_compressed`` write
NPZ_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, name: str, error: type[Exception] = ValueError) -> Iterator[zipfile.ZipFile]:
    """The .npz (zip) file at ``path`` as an open :class:`zipfile.ZipFile` whose every member
    NumPy could have written: not encrypted, stored or deflated. Anything else raises ``error``
    naming the member (``name`` names the file), before any member is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.flag_bits & 0x1:
                    raise error(f"{name}: member {short(member.filename)} is encrypted; expected the unencrypted "
                                "arrays numpy.savez writes")  # fmt: skip
                if member.compress_type not in NPZ_METHODS:
                    raise error(f"{name}: member {short(member.filename)} is compressed with zip method "
                                f"{member.compress_type}; expected {' or '.join(NPZ_METHODS.values())}, as "
                                "numpy.savez writes")  # fmt: skip
            yield archive
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as problem:
        raise error(f"{name} is not a readable .npz file: {str(problem)[:200]}") from None


# --- JSON schemas ---------------------------------------------------------------------------
# A schema is a type (str, bool), an Int/Number range, a OneOf set of values, a Text pattern, a
# list of schemas (a list of that length), ListOf, a dict of fields (Optional(...) for those that may
# be absent; unknown fields are ignored, but Closed refuses them), MapOf, or Nullable.


@dataclass(frozen=True)
class Int:
    low: int = 0
    high: int = 2**63 - 1  # what every framework's int64 step and seed counters hold

    def describe(self) -> str:
        power = (self.high + 1).bit_length() - 1
        high = f"2^{power}-1" if power > 32 and self.high == 2**power - 1 else str(self.high)
        return f"an integer in {self.low}..{high}"

    def accepts(self, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class Number:
    low: float = -math.inf
    above: bool = False  # strictly greater than ``low``

    def describe(self) -> str:
        return "a finite number" + (f" {'>' if self.above else '>='} {self.low}" if self.low > -math.inf else "")

    def accepts(self, value) -> bool:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > self.low if self.above else value >= self.low)
        )


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def describe(self) -> str:
        return "one of " + ", ".join(repr(value) for value in self.values)

    def accepts(self, value) -> bool:
        return any(type(value) is type(allowed) and value == allowed for allowed in self.values)


@dataclass(frozen=True)
class Text:
    pattern: str

    def describe(self) -> str:
        return f"a string matching {self.pattern}"

    def accepts(self, value) -> bool:
        # DOTALL: "." matches a newline too, which a file name may hold
        return isinstance(value, str) and re.fullmatch(self.pattern, value, re.DOTALL) is not None


@dataclass(frozen=True)
class Optional:
    """A dict field that may be absent."""

    schema: Any


@dataclass(frozen=True)
class Nullable:
    schema: Any


@dataclass(frozen=True)
class MapOf:
    """A JSON object with any keys that ``keys`` accepts, each value a ``values``."""

    keys: Any
    values: Any


@dataclass(frozen=True)
class ListOf:
    """A JSON list of ``low..high`` items, each an ``item``."""

    item: Any
    low: int
    high: int


@dataclass(frozen=True)
class Closed:
    """A JSON object of ``fields`` (a dict schema) and no others."""

    fields: Mapping


_TYPE_NAMES = {str: "a string", bool: "true or false", list: "a list", dict: "an object"}


def check_json(value, schema, where: str = "") -> None:
    """Raise ``ValueError("field 'a.b': expected ..., got ...")`` at the first part of
    ``value`` that ``schema`` does not accept (``where``: the field path so far)."""
    if isinstance(schema, Nullable):
        if value is not None:
            check_json(value, schema.schema, where)
    elif isinstance(schema, Mapping):
        _expect(type(value) is dict, value, "an object", where)
        for key, field in schema.items():
            inner = f"{where}.{key}" if where else key
            if isinstance(field, Optional):
                if key in value:
                    check_json(value[key], field.schema, inner)
            elif key not in value:
                raise ValueError(f"field {inner!r} is missing")
            else:
                check_json(value[key], field, inner)
    elif isinstance(schema, Closed):
        _expect(type(value) is dict, value, "an object", where)
        if unknown := sorted(set(value) - set(schema.fields)):
            raise ValueError(f"field {where!r} holds {short(unknown[0])}; expected only {', '.join(schema.fields)}")
        check_json(value, schema.fields, where)
    elif isinstance(schema, ListOf):
        _expect(type(value) is list and schema.low <= len(value) <= schema.high, value,
                f"a list of {schema.low}..{schema.high} items", where)  # fmt: skip
        for index, item in enumerate(value):
            check_json(item, schema.item, f"{where}[{index}]")
    elif isinstance(schema, MapOf):
        _expect(type(value) is dict, value, "an object", where)
        for key, item in value.items():
            check_json(key, schema.keys, f"{where} (a key)")
            check_json(item, schema.values, f"{where}.{key}" if where else key)
    elif isinstance(schema, list):
        _expect(type(value) is list and len(value) == len(schema), value, f"a list of {len(schema)}", where)
        for index, (item, item_schema) in enumerate(zip(value, schema, strict=True)):
            check_json(item, item_schema, f"{where}[{index}]")
    elif isinstance(schema, type):
        _expect(type(value) is schema, value, _TYPE_NAMES[schema], where)
    else:
        _expect(schema.accepts(value), value, schema.describe(), where)


def _expect(condition: bool, value, expected: str, where: str) -> None:
    if not condition:
        raise ValueError(f"{f'field {where!r}' if where else 'the value'}: expected {expected}, got {short(value)}")


def short_list(items, shown: int = 5) -> str:
    """A list cut for a one-line message: its first ``shown`` items and how many more."""
    items = list(items)
    listed = "[" + ", ".join(short(item) for item in items[:shown]) + "]"  # each item cut too
    return listed if len(items) <= shown else f"{listed} and {len(items) - shown} more"


def short(value) -> str:
    """A value for a one-line message: long values cut, huge integers by their size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        power = value.bit_length() - 1
        return f"2^{power}" if value == 1 << power else f"an integer of {power + 1} bits"
    text = repr(value) if not isinstance(value, int) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
