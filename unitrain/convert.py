"""``unitrain convert``: a model's weights between unitrain's file and each framework's own.

The format follows the file's extension (:data:`FORMATS`): ``.safetensors`` (unitrain's),
``.pt``/``.pth`` (a PyTorch ``state_dict``), ``.ckpt`` (MindSpore), ``.npz`` (Chainer's
``serializers.save_npz``) and, to write only, ``.onnx``. Each format is one small class that
imports its library inside its methods, so this module never imports a framework.

Every framework stores these layers' tensors in PyTorch's layouts (Linear/Dense ``(out, in)``,
Conv2d ``(out, in/groups, kh, kw)``); only the names differ, and :func:`native_names` derives
them from the model spec as each framework names the equivalent network:

* PyTorch: the ``state_dict`` keys, unitrain's own names.
* MindSpore: the same dotted cell paths (a ``SequentialCell`` numbers every cell, as
  ``nn.Sequential``); BatchNorm ``gamma``/``beta``/``moving_mean``/``moving_variance``,
  LayerNorm ``gamma``/``beta``.
* Chainer: ``/``-separated link paths as ``save_npz`` writes them; ``W``/``b``, BatchNormalization
  ``gamma``/``beta``/``avg_mean``/``avg_var`` plus its fine-tuning counter ``N``. A positional
  ``Sequential`` is a ``chainer.ChainList`` of its links (the children with weights) in order:
  ``mlp``'s ``1.weight`` is Chainer's ``0/W``. (``chainer.Sequential`` means to number its links
  so too, but 7.8.1's ``insert`` puts every link after the first one second: with three links
  or more its names are out of order.)

MindSpore and Chainer have no ``num_batches_tracked``: it is written under that name beside the
layer's tensors (their loaders ignore keys the network lacks) so round trips are exact, and a file
without it (one the framework wrote) reads as 0.

Reading refuses what does not fit before converting anything, in one line naming the key, shape
or dtype; nothing is unpickled except by ``torch.load(weights_only=True)``, and no file much
larger than the model's weights is opened (memory stays bounded whatever the file).
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from . import files
from .graph import Graph
from .layers import Container, LayerNorm, Sequential, _BatchNorm
from .reading import open_npz, path_problem, short, short_list
from .weights import Declared, State, WeightsError, check_state, describe, load_safetensors, save_safetensors

#: the per-sample input of every preset model (MNIST); an exported ONNX graph takes (N, 1, 28, 28)
INPUT_SHAPE = (1, 28, 28)
COUNTER = "num_batches_tracked"

#: framework -> (separator, names of Linear/Conv2d tensors, names of BatchNorm/LayerNorm tensors)
_NAMING = {
    "torch": (".", {}, {}),
    "mindspore": (".", {}, {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                            "running_var": "moving_variance"}),
    "chainer": ("/", {"weight": "W", "bias": "b"}, {"weight": "gamma", "bias": "beta", "running_mean": "avg_mean",
                                                     "running_var": "avg_var"}),
}  # fmt: skip


def native_names(model: Container, framework: str) -> dict[str, str]:
    """unitrain's name of each tensor -> ``framework``'s name for it (see the module's text)."""
    separator, plain, norm = _NAMING[framework]
    names = {}
    for path, layer in _native_paths(model, framework == "chainer"):
        renames = norm if isinstance(layer, (_BatchNorm, LayerNorm)) else plain
        for key in {**layer.param_shapes(), **layer.buffer_shapes()}:
            names[".".join((*path[0], key))] = separator.join((*path[1], renames.get(key, key)))
    return names


def _native_paths(container: Container, links_only: bool, prefix=((), ())) -> Iterator:
    """Each leaf with ``((unitrain path parts), (native path parts))``; with ``links_only``
    (Chainer), a positional Sequential numbers only its children that are links."""
    names = [name for name, _ in container.children]
    renumber = links_only and isinstance(container, Sequential) and names == [str(i) for i in range(len(names))]
    links = 0
    for name, child in container.children:
        is_link = isinstance(child, Container) or bool(child.param_shapes() or child.buffer_shapes())
        native = name
        if renumber and is_link:
            native, links = str(links), links + 1
        path = ((*prefix[0], name), (*prefix[1], native))
        if isinstance(child, Container):
            yield from _native_paths(child, links_only, path)
        elif is_link:
            yield path, child


def _file_limit(model: Container) -> int:
    """The largest file a model's weights fill: every tensor float64, plus room for names and
    headers (1 KiB a tensor; a torch.save archive's records take under 200 bytes) and 16 MiB, so
    that a file for another small model gets to the message naming its keys."""
    shapes = model.state_shapes()
    return 8 * sum(math.prod(shape) for shape in shapes.values()) + 1024 * len(shapes) + (16 << 20)


def _refuse_large(path: Path, name: str, model: Container) -> None:
    size, limit = path.stat().st_size, _file_limit(model)
    if size > limit:
        raise WeightsError(f"{name} has {size} bytes, more than this model's weights fill even in float64 ({limit})")


def _reason(error: BaseException) -> str:
    """A library's error in one line of at most 200 characters: torch.load's weights-only refusal
    wraps the reason ("Unsupported global: GLOBAL posix.system ...") in paragraphs of advice."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    paragraphs = [p.replace("WeightsUnpickler error:", "").strip() for p in str(error).split("\n\n")]
    reasons = [p for p in paragraphs if p and not p.startswith(advice)]
    line = " ".join(reasons[0].split()) if reasons else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _import(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise WeightsError(f"this needs {module}: pip install 'unitrain[{extra}]'") from None


# --- formats: one small class each; a library is imported only when its format is used -------------


class Format:
    """A file format: ``read`` returns unitrain's state (checked against the model), ``write``
    stores one. ``naming`` is whose tensor names the file holds."""

    suffixes: tuple[str, ...] = ()
    title = ""
    naming = "torch"
    readable = True

    def read(self, path: Path, model: Container, name: str) -> State:
        raise NotImplementedError

    def write(self, path: Path, model: Container, state: State) -> None:
        raise NotImplementedError

    # the shared steps of reading a framework's file

    def _expected(self, model: Container) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
        """native name -> unitrain name, and native name -> shape."""
        to_native = native_names(model, self.naming)
        shapes = model.state_shapes()
        return {native: key for key, native in to_native.items()}, {to_native[k]: s for k, s in shapes.items()}

    def _checked(self, model: Container, declared: Mapping[str, Declared], name: str) -> dict[str, str]:
        """Check a file's tensors (native names) against the model; returns the native names to
        read with their unitrain names. A framework without ``num_batches_tracked`` may omit it."""
        to_unitrain, shapes = self._expected(model)
        if self.naming != "torch":
            shapes = {key: shape for key, shape in shapes.items() if key in declared or not key.endswith(COUNTER)}
        check_state(shapes, declared, name)
        return {native: to_unitrain[native] for native in shapes}

    @staticmethod
    def _state(model: Container, tensors: Mapping[str, np.ndarray], name: str) -> State:
        """unitrain's state in ``state_dict`` order, missing counters 0; floats must be finite."""
        state = {}
        for key in model.state_shapes():
            value = tensors.get(key)
            if value is None:  # a counter the framework does not keep
                value = np.zeros((), np.int64)
            elif value.dtype.kind == "f" and not np.isfinite(value).all():
                raise WeightsError(f"{name}: tensor {key!r} contains NaN or infinite values")
            state[key] = value.astype(value.dtype.newbyteorder("="), copy=False)  # an npz may be big-endian
        return state


class Safetensors(Format):
    """unitrain's own weights files (``--save``, ``--init-weights``)."""

    suffixes, title = (".safetensors",), "safetensors weights"

    def read(self, path, model, name):
        shapes = model.state_shapes()
        tensors = load_safetensors(path, lambda declared: check_state(shapes, declared, name), name=name)[0]
        return self._state(model, tensors, name)

    def write(self, path, model, state):
        save_safetensors(path, state, {"format": "pt", "producer": "unitrain/convert"})


class TorchStateDict(Format):
    """A PyTorch ``state_dict`` saved with ``torch.save``, read with ``torch.load(weights_only=True)``."""

    suffixes, title = (".pt", ".pth"), "PyTorch state_dict"

    def read(self, path, model, name):
        torch = _import("torch", "torch")
        _refuse_large(path, name, model)
        with open(path, "rb") as file:
            archive = file.read(4) == b"PK\x03\x04"  # torch.save's zip format maps; the legacy one cannot
        try:
            with warnings.catch_warnings():  # its advice on pickle protocols is not the user's to act on
                warnings.simplefilter("ignore")
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
        except Exception as error:  # a hostile file raises whatever the unpickler meets; all say "not readable"
            raise WeightsError(f"{name} is not a file torch.load(weights_only=True) reads: {_reason(error)}") from None
        if not isinstance(loaded, Mapping) or not all(isinstance(key, str) for key in loaded):
            raise WeightsError(f"{name} holds a {type(loaded).__name__}, expected a state_dict (names -> tensors)")
        nested = [key for key, value in loaded.items() if isinstance(value, Mapping)]
        if nested:
            raise WeightsError(f"{name} is a checkpoint of dictionaries ({short_list(nested)}), expected a model's "
                               "state_dict: save model.state_dict() itself")  # fmt: skip
        for key, value in loaded.items():
            if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
                kind = type(value).__name__ if not isinstance(value, torch.Tensor) else f"{value.layout} tensor"
                raise WeightsError(f"{name}: {short(key)} is a {kind}, expected a dense tensor")
        declared = {key: Declared(tuple(value.shape), self._dtype(torch, value)) for key, value in loaded.items()}
        wanted = self._checked(model, declared, name)
        tensors = {key: np.array(loaded[native].numpy()) for native, key in wanted.items()}  # copied out of the map
        return self._state(model, tensors, name)

    @staticmethod
    def _dtype(torch, tensor) -> str:
        try:
            return describe(np.empty(0, torch.empty(0, dtype=tensor.dtype).numpy().dtype)).dtype
        except TypeError:  # bfloat16 and others NumPy lacks
            return str(tensor.dtype).removeprefix("torch.")

    def write(self, path, model, state):
        torch = _import("torch", "torch")
        # Into memory first: torch's C++ zip writer reports a full disk as an unnamed RuntimeError.
        buffer = io.BytesIO()
        torch.save({key: torch.from_numpy(np.array(value, order="C")) for key, value in state.items()}, buffer)
        path.write_bytes(buffer.getbuffer())


class MindSporeCheckpoint(Format):
    """A MindSpore ``.ckpt`` (``mindspore.save_checkpoint``), with MindSpore's parameter names."""

    suffixes, title, naming = (".ckpt",), "MindSpore checkpoint", "mindspore"

    def read(self, path, model, name):
        ms = self._mindspore()
        _refuse_large(path, name, model)
        try:
            params = ms.load_checkpoint(str(path))
            arrays = {key: param.asnumpy() for key, param in params.items()}
        except Exception as error:  # MindSpore's parser raises ValueError, RuntimeError or TypeError
            raise WeightsError(f"{name} is not a MindSpore checkpoint: {_reason(error)}") from None
        wanted = self._checked(model, {key: describe(value) for key, value in arrays.items()}, name)
        return self._state(model, {key: arrays[native] for native, key in wanted.items()}, name)

    def write(self, path, model, state):
        ms = self._mindspore()
        names = native_names(model, self.naming)
        entries = [{"name": names[key], "data": ms.Tensor(np.array(value, order="C"))} for key, value in state.items()]
        # save_checkpoint appends ".ckpt" to any other name and stages its own temporary file, which
        # it leaves behind on a full disk: it writes into a folder of ours, removed whatever happens.
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".ms"))
        try:
            ms.save_checkpoint(entries, str(folder / "weights.ckpt"))
            os.replace(folder / "weights.ckpt", path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @staticmethod
    def _mindspore():
        ms = _import("mindspore", "mindspore")
        # The adapter chooses MindSpore's device, which can be chosen only before its first tensor.
        _import("unitrain.backends.mindspore", "mindspore")
        # Its failures are raised as exceptions, which say it once: not also logged to stderr (it
        # logs a failed save as CRITICAL).
        ms.log._get_logger().setLevel(logging.CRITICAL + 1)  # MindSpore has no public handle on its logger
        return ms


class ChainerNpz(Format):
    """A Chainer ``.npz`` (``chainer.serializers.save_npz``), read with ``allow_pickle=False``."""

    suffixes, title, naming = (".npz",), "Chainer npz (serializers.save_npz)", "chainer"
    #: what ``numpy.load`` accepts as a member's header (NumPy's own default)
    _MAX_HEADER = 10000

    def read(self, path, model, name):
        _refuse_large(path, name, model)
        self._refuse_large_directory(path, name, model)
        try:
            with open_npz(path, name, WeightsError) as archive:
                declared = {key: self._header(archive, key, name) for key in self._members(archive, name)}
                wanted = self._checked(model, declared, name)
                tensors = {key: self._array(archive, native) for native, key in wanted.items()}
        except ValueError as error:
            if isinstance(error, WeightsError):
                raise
            raise WeightsError(f"{name} is not an npz archive NumPy reads: {_reason(error)}") from None
        return self._state(model, tensors, name)

    @staticmethod
    def _refuse_large_directory(path: Path, name: str, model: Container) -> None:
        """Python's zipfile holds every member's entry in memory, about ten times its size in the
        file's central directory: that size, from the end record, must fit the model's tensors
        (an entry is 46 bytes and the name; 1 KiB each and 64 KiB in all is ample)."""
        with open(path, "rb") as file:
            if file.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
                raise WeightsError(f"{name} is not an npz archive (a zip file)")
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - (1 << 16) - 22))  # the end record, after a comment of up to 64 KiB
            tail = file.read()
        at = tail.rfind(b"PK\x05\x06")
        directory = int.from_bytes(tail[at + 12 : at + 16], "little") if at >= 0 else 0
        limit = 1024 * (2 * len(model.state_shapes())) + (1 << 16)  # with Chainer's N: twice the tensors
        if directory > limit:
            raise WeightsError(f"{name}: its zip directory of {directory} bytes lists far more members than this "
                               f"model's tensors (at most {limit} bytes)")  # fmt: skip

    def _members(self, archive: zipfile.ZipFile, name: str) -> list[str]:
        members = archive.namelist()
        others = [member for member in members if not member.endswith(".npy")]
        if others:
            raise WeightsError(f"{name}: members {short_list(others)} are not .npy arrays")
        if len(set(members)) != len(members):
            twice = sorted({member for member in members if members.count(member) > 1})
            raise WeightsError(f"{name}: members {short_list(twice)} appear more than once")
        # ``N`` is BatchNormalization's fine-tuning counter; unitrain has no use for it.
        keys = [member.removesuffix(".npy") for member in members]
        chainer_counters = {key for key in keys if key.endswith("/N") and f"{key[:-2]}/avg_mean" in keys}
        return [key for key in keys if key not in chainer_counters]

    @staticmethod
    def _array(archive: zipfile.ZipFile, key: str) -> np.ndarray:
        with archive.open(f"{key}.npy") as member:
            return np.lib.format.read_array(member, allow_pickle=False)

    def _header(self, zip_file: zipfile.ZipFile, key: str, name: str) -> Declared:
        """A member's shape and dtype from its .npy header, before its data is read."""
        with zip_file.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member, max_header_size=self._MAX_HEADER)
        if dtype.hasobject:
            raise WeightsError(f"{name}: {short(key)} holds Python objects; unitrain never unpickles")
        return describe(np.empty((0,) * len(shape), dtype))._replace(shape=tuple(shape))

    def write(self, path, model, state):
        names = native_names(model, self.naming)
        arrays = {names[key]: value for key, value in state.items()}
        for key in names.values():  # what every BatchNormalization saves: its fine-tuning counter, unused
            if key.endswith("/avg_mean"):
                arrays[f"{key[: -len('avg_mean')]}N"] = np.zeros((), np.int64)
        # Into memory first: a full disk inside zipfile ends in a second error from its __del__.
        buffer = io.BytesIO()  # a file object: savez given a name would append ".npz"
        np.savez_compressed(buffer, **arrays)  # what save_npz(compression=True) calls
        path.write_bytes(buffer.getbuffer())


class Onnx(Format):
    """The model as an ONNX graph (opset 20, eval mode) with its weights as initializers; export only."""

    suffixes, title, readable = (".onnx",), "ONNX model (export only)", False

    def write(self, path, model, state, input_shape=INPUT_SHAPE):
        onnx = _import("onnx", "onnx")  # before onnx_export, which imports it
        from .onnx_export import to_onnx

        graph = to_onnx(model, state, input_shape)
        onnx.checker.check_model(graph, full_check=True)
        onnx.save_model(graph, str(path))


def export_shape(model: Container, given: Sequence[int] | None = None) -> tuple[int, ...]:
    """The per-sample input shape (no batch dimension) to export ``model`` on: a graph's declared
    one, which ``given`` (``--input-shape``) may only repeat; else ``given``, which the model must
    take; else the presets' MNIST shape (:data:`INPUT_SHAPE`). Refused in one line naming it."""
    given = None if given is None else tuple(given)
    flag = None if given is None else f"--input-shape {','.join(map(str, given))}"
    if given is not None and (not given or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in given)):
        raise WeightsError(f"{flag}: expected one sample's sizes, positive integers (no batch dimension)")
    if isinstance(model, Graph):  # its inputs declare their shapes (a graph has at least one)
        declared = model.data_inputs
        if given is not None and [shape for _, shape in declared] != [given]:
            inputs = ", ".join(f"{name} {','.join(map(str, shape)) or '(one number)'}" for name, shape in declared)
            why = (f"is one input's shape; the graph declares {len(declared)} inputs" if len(declared) > 1
                   else "disagrees with the graph's declared input")  # fmt: skip
            raise WeightsError(f"{flag} {why} ({inputs}); leave --input-shape out")
        return declared[0][1]
    shape = INPUT_SHAPE if given is None else given
    try:  # a model that does not take the input fails here, naming the layer, before any file is read
        model.output_shape(shape)
    except ValueError as error:
        if given is not None:
            raise WeightsError(f"{flag}: {error}") from None
        raise WeightsError(f"{error}; a {type(model).__name__} declares no input shape and is exported on "
                           f"per-sample input {','.join(map(str, shape))} (MNIST's) unless told: give its input's "
                           "with --input-shape (input_shape= from Python), such as 3,32,32") from None  # fmt: skip
    return shape


FORMATS: tuple[Format, ...] = (Safetensors(), TorchStateDict(), MindSporeCheckpoint(), ChainerNpz(), Onnx())


def format_of(path: Path, role: str) -> Format:
    """The format a path's extension names; ``role`` is "IN" or "OUT" in messages."""
    suffix = path.suffix.lower()
    for candidate in FORMATS:
        if suffix in candidate.suffixes and (role == "OUT" or candidate.readable):
            return candidate
    usable = [s for f in FORMATS if role == "OUT" or f.readable for s in f.suffixes]
    raise WeightsError(f"{role} {path}: unknown extension {suffix or '(none)'!r}, expected one of {', '.join(usable)}")


def read(path: Path, model: Container, name: str | None = None) -> State:
    """The weights in ``path`` (by extension) as unitrain's state for ``model``."""
    path = Path(path)
    source = format_of(path, "IN")
    name = name or str(path)
    if problem := path_problem(path, f"a {source.title} file"):
        raise WeightsError(f"{name} {problem}")
    return source.read(path, model, name)


def convert(
    source: Path, target: Path, model: Container, *, overwrite: bool = False, input_shape: Sequence[int] | None = None
) -> Path:
    """Read ``source``, write ``target`` (formats by extension); returns where the file went (see
    :func:`unitrain.files.publish`: never replacing a file unless ``overwrite``). ``input_shape``:
    one sample's shape for ONNX export (see :func:`export_shape`)."""
    source, target = Path(source), Path(target)
    target_format = format_of(target, "OUT")
    options = {}
    if isinstance(target_format, Onnx):
        options["input_shape"] = export_shape(model, input_shape)
    elif input_shape is not None:
        raise WeightsError(f"--input-shape is for ONNX export (OUT .onnx); OUT {target} is a {target_format.title} "
                           "file, whose weights need no input shape")  # fmt: skip
    files.check_output(target, "OUT", overwrite, [("IN", source)])
    state = read(source, model, f"IN {source}")
    return files.publish(target, lambda staged: target_format.write(staged, model, state, **options),
                         overwrite=overwrite)  # fmt: skip
