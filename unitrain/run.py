"""A run as one value: everything that decides what a training run computes, in one frozen,
serialisable description (as Keras' ``get_config`` or Lightning's config file).

:class:`Run` names the model, the data and its transforms (:class:`DataSpec`), the loss, the
optimizer, the lr schedule, gradient clipping, batch size, epochs, step limit, shuffling, seed and
initial weights. It is not the backend, the thread count or where outputs go: the same run gives
the same numbers on any backend. ``unitrain train`` and ``compare`` build one from a recipe file
and their flags (flags override the file); checkpoints record it, and a resumed run is the
recorded one; :func:`~unitrain.compare.compare_backends` takes one; :meth:`Run.train` trains one
from Python. A recipe is the run's :meth:`~Run.to_dict` in TOML (``unitrain train ...
--print-recipe > run.toml``, then ``unitrain train run.toml``)::

    model = "mlp"
    loss = "cross-entropy"
    batch_size = 64
    epochs = 3
    shuffle = true
    seed = 0
    lr_schedule = "StepLR(step_size=1, gamma=0.7)"   # optional, as are clip_grad_norm,
                                                     # clip_grad_value, max_steps, init_weights,
                                                     # dialect and init
    frozen = ["0"]                # optional: parameters or layers left untrained (unitrain.controls)
    accumulate_grad_batches = 1   # optional: batches per optimizer step
    [data]
    dataset = "fashion-mnist"     # a packaged dataset, or the path of your own
    val_split = 0
    pad = 0                       # optional: normalize = {mean = [...], std = [...]}, resize = [H, W]
    random_crop_padding = 0
    random_horizontal_flip = false
    task = "classification"       # or regression, multi-label (an .npz of x, y), reconstruction (y = x)

    [optimizer]
    type = "SGD"                  # PyTorch's class name; every argument explicit
    lr = 0.01
    ...

    [initializers]                # optional: parameter pattern = initialiser (unitrain.initializers)
    "conv1.weight" = "kaiming_normal(mode='fan_out', nonlinearity='relu')"

    [[param_groups]]              # optional, repeatable: options of the optimizer for some parameters
    params = ["*.bias", "BatchNorm2d"]
    weight_decay = 0.0

    [early_stopping]              # optional: unitrain.controls.EarlyStopping's fields
    monitor = "val_loss"
    patience = 3

A field left out takes its default; an unknown one is an error (a misspelt name would otherwise
be silently ignored). Relative paths are relative to the current directory, as on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import dialects, optim, registry
from .choices import TASKS
from .controls import EarlyStopping, resolve_groups
from .data import MAX_DATA_BYTES, PACKAGED, PACKAGED_TRAIN_SAMPLES, DataError, num_batches
from .datasets import load_datasets, load_target_arrays
from .graph import entry_layer
from .initializers import initializer, with_initializers
from .layers import MODEL_PATTERN, Sequential, check_init, model_from_name
from .losses import LOSSES
from .reading import Int, Nullable, Number, OneOf, Optional, Text, check_json, path_problem, read_capped, short
from .schedules import LRSchedule, check_schedule_length, parse_schedule, scheduled_optimizer
from .sequences import Embedding
from .weights import check_state, load_safetensors


class RunError(ValueError):
    """A run description (recipe file, checkpoint record or flags) that cannot describe a run."""


#: a recipe is a few hundred bytes; anything far larger is not one (and is not read whole)
MAX_RECIPE_BYTES = 1 << 16
#: a recipe nests two levels (``[data]``, ``normalize = {mean = [...]}``); the TOML reader recurses
#: once per level, so a deeper one is refused before it is parsed
MAX_RECIPE_NESTING = 16
#: resized and padded samples, float32, at most: four times the raw bytes a dataset may have
MAX_TRANSFORMED_BYTES = 4 * MAX_DATA_BYTES


@dataclass(frozen=True)
class DataSpec:
    """The data of a run and its transforms, done once in NumPy (see :mod:`unitrain.transforms`).

    ``dataset``: a packaged name (``mnist``, ``fashion-mnist``) or the path of your own
    (:func:`~unitrain.datasets.load_datasets`); ``data_dir``: a packaged dataset's IDX files
    from elsewhere. ``val_split``: training samples held out (a count, or a fraction in (0, 1)), taken
    as ``val_from`` says: ``random`` (by the run's seed, Chainer's ``split_dataset_random``),
    ``first`` or ``last`` (in file order; Keras' ``validation_split`` is the last fraction), for
    ``val_loss``/``val_accuracy``. Static transforms, on every split: ``normalize``
    (``(mean, std)`` per channel; None: the packaged dataset's own, or your training set's),
    then ``resize`` (``(height, width)``, bilinear), then ``pad`` (pixels of normalised black on
    every side). Random ones, on training batches only: ``random_crop_padding`` (torchvision's
    ``RandomCrop(size, padding)``) and ``random_horizontal_flip``.

    ``task``: what the targets are. ``classification``: class indices (one-hot vectors for the
    elementwise losses). ``regression`` and ``multi-label``: the dataset is an .npz of ``x_train,
    y_train, x_test, y_test`` of any shapes, taken as given
    (:func:`~unitrain.datasets.load_target_arrays`; ``layout="NHWC"``: 4-d samples channels-last,
    transposed once to channels-first; multi-label's ``y`` are 0/1 vectors, for
    ``bce-with-logits``). ``reconstruction``: the target is the (transformed) input itself,
    reshaped to the model's output (autoencoders)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    val_split: int | float = 0
    val_from: str = "random"
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    resize: tuple[int, int] | None = None
    pad: int = 0
    random_crop_padding: int = 0
    random_horizontal_flip: bool = False
    task: str = "classification"
    layout: str = "NCHW"

    def __post_init__(self):
        _require(isinstance(self.dataset, str) and self.dataset != "", "data.dataset", self.dataset,
                 "a dataset name or path")  # fmt: skip
        _require(self.data_dir is None or isinstance(self.data_dir, str), "data.data_dir", self.data_dir, "a path")
        split = self.val_split
        _require(_is_int(split, 0) or (_is_number(split) and 0 < split < 1), "data.val_split", split,
                 "a count of samples >= 0 or a fraction in (0, 1)")  # fmt: skip
        _require(self.val_from in ("random", "first", "last"), "data.val_from", self.val_from,
                 "random, first or last")  # fmt: skip
        for name in ("pad", "random_crop_padding"):
            _require(_is_int(getattr(self, name), 0), f"data.{name}", getattr(self, name), "an integer >= 0")
        _require(isinstance(self.random_horizontal_flip, bool), "data.random_horizontal_flip",
                 self.random_horizontal_flip, "true or false")  # fmt: skip
        _require(self.task in TASKS, "data.task", self.task, f"one of {', '.join(TASKS)}")
        _require(self.layout in ("NCHW", "NHWC"), "data.layout", self.layout, "NCHW or NHWC")
        _require(self.layout == "NCHW" or self.task in ("regression", "multi-label"), "data.layout", self.layout,
                 "NCHW: image datasets are read channels-first (an .npz's channels-last images are transposed "
                 "when read)")  # fmt: skip
        if self.task in ("regression", "multi-label"):
            image_only = [name for name in ("normalize", "resize") if getattr(self, name) is not None]
            image_only += [name for name in ("pad", "random_crop_padding", "random_horizontal_flip")
                           if getattr(self, name)]  # fmt: skip
            _require(not image_only, "data", f"{self.task} with {', '.join(image_only)}",
                     "no image transforms: regression and multi-label arrays are used as given")  # fmt: skip
        if self.task == "reconstruction":
            _require(
                not (self.random_crop_padding or self.random_horizontal_flip),
                "data",
                "reconstruction with random augmentation",
                "no random transforms (the target is the input)",
            )
        if self.resize is not None:
            object.__setattr__(self, "resize", tuple(self.resize))
            _require(len(self.resize) == 2 and all(_is_int(side, 1) for side in self.resize), "data.resize",
                     self.resize, "[height, width], each an integer >= 1")  # fmt: skip
        if self.normalize is not None:
            try:
                mean, std = (tuple(values) for values in self.normalize)
            except (TypeError, ValueError):
                raise RunError(f"data.normalize: expected (mean, std), one number each per channel, got "
                               f"{short(self.normalize)}") from None  # fmt: skip
            _require(len(mean) == len(std) >= 1 and all(map(_is_number, mean + std)), "data.normalize",
                     self.normalize, "as many finite means as stds")  # fmt: skip
            _require(all(s > 0 for s in std), "data.normalize", self.normalize, "stds > 0")
            object.__setattr__(self, "normalize", (tuple(map(float, mean)), tuple(map(float, std))))

    def to_dict(self) -> dict[str, Any]:
        normalize = None if self.normalize is None else dict(mean=list(self.normalize[0]), std=list(self.normalize[1]))
        values = {
            "dataset": self.dataset, "data_dir": self.data_dir, "val_split": self.val_split,
            "val_from": None if self.val_from == "random" else self.val_from, "normalize": normalize,
            "resize": None if self.resize is None else list(self.resize), "pad": self.pad,
            "random_crop_padding": self.random_crop_padding, "random_horizontal_flip": self.random_horizontal_flip,
            "task": None if self.task == "classification" else self.task,
            "layout": None if self.layout == "NCHW" else self.layout,
        }  # fmt: skip
        return {key: value for key, value in values.items() if value is not None}

    def static_transforms(self, data):
        """``data`` (an :class:`~unitrain.data.ArrayDataset`, normalised) resized, then padded."""
        if self.resize is not None:
            data = data.resized(*self.resize)
        return data.padded(self.pad) if self.pad else data

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataSpec:
        _check_fields(values, _DATA_SCHEMA, "data")
        values = dict(values)
        if "normalize" in values:
            values["normalize"] = (values["normalize"]["mean"], values["normalize"]["std"])
        return cls(**values)


@dataclass(frozen=True)
class Run:
    """One training run (see the module's doc). ``model``: a preset name or
    ``package.module:function`` returning a spec; ``loss``: a name of :data:`unitrain.losses.LOSSES`;
    ``optimizer``: a spec of :mod:`unitrain.optim`; ``lr_schedule``: a spec of
    :mod:`unitrain.schedules` or its text; ``init_weights``: a safetensors file to start from
    (None: :func:`~unitrain.weights.init_weights` of the seed); ``dialect``: another framework's
    defaults for the model and equations for the optimizer (:mod:`unitrain.dialects`; None:
    PyTorch's, the optimizer as given); ``init``: the model's ``init`` scheme or initialiser for
    every weight (None: the model's own); ``initializers``: parameter pattern -> initialiser, for
    some layers' weights or biases (:func:`unitrain.initializers.with_initializers`); ``frozen``,
    ``param_groups``, ``accumulate_grad_batches`` and ``early_stopping``: the training controls of
    :mod:`unitrain.controls`; ``compile``: compile the model where the backend offers it (torch:
    ``torch.compile``). Invalid values raise :class:`RunError` naming the field."""

    model: str = "mlp"
    data: DataSpec = field(default_factory=DataSpec)
    loss: str = "cross-entropy"
    optimizer: optim.Optimizer = field(default_factory=lambda: optim.SGD(lr=0.01))
    lr_schedule: LRSchedule | None = None
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    batch_size: int = 64
    epochs: int = 3
    max_steps: int | None = None
    shuffle: bool = True
    seed: int = 0
    init_weights: str | None = None
    dialect: str | None = None
    init: str | None = None
    initializers: Mapping[str, str] | None = None
    frozen: tuple[str, ...] = ()
    param_groups: tuple[Mapping[str, Any], ...] = ()
    accumulate_grad_batches: int = 1
    early_stopping: EarlyStopping | None = None
    drop_last: bool = False
    test_batch_size: int = 1000
    compile: bool = False

    def __post_init__(self):
        if self.dialect is not None:
            try:
                dialect = dialects.get(self.dialect)
            except ValueError as error:
                raise RunError(f"dialect: {error}") from None
            if isinstance(self.optimizer, optim.Optimizer):
                object.__setattr__(self, "optimizer", dialect.optimizer(self.optimizer))
        if self.init is not None:
            try:
                object.__setattr__(self, "init", check_init(self.init))
            except ValueError as error:
                raise RunError(str(error)) from None
        if self.initializers is not None:
            _require(isinstance(self.initializers, Mapping) and all(isinstance(key, str) and key and isinstance(
                value, str) for key, value in self.initializers.items()), "initializers", self.initializers,
                "a table of parameter pattern = initialiser")  # fmt: skip
            try:
                for value in self.initializers.values():
                    initializer(value)
            except ValueError as error:
                raise RunError(f"initializers: {error}") from None
            object.__setattr__(self, "initializers", dict(self.initializers))
        _require(isinstance(self.model, str) and re.fullmatch(MODEL_PATTERN, self.model) is not None, "model",
                 self.model, "a preset name or package.module:function")  # fmt: skip
        _require(isinstance(self.data, DataSpec), "data", self.data, "a DataSpec")
        _require(self.loss in LOSSES, "loss", self.loss, f"one of {', '.join(LOSSES)}")
        _require(isinstance(self.optimizer, optim.Optimizer), "optimizer", self.optimizer, "an optimizer spec")
        if isinstance(self.lr_schedule, str):
            try:
                object.__setattr__(self, "lr_schedule", parse_schedule(self.lr_schedule))
            except ValueError as error:
                raise RunError(f"lr_schedule: {error}") from None
        _require(self.lr_schedule is None or isinstance(self.lr_schedule, LRSchedule), "lr_schedule",
                 self.lr_schedule, "a schedule like 'StepLR(step_size=1, gamma=0.7)'")  # fmt: skip
        try:  # OneCycleLR cycling momentum needs an optimizer with momentum or betas (as PyTorch)
            scheduled_optimizer(self.optimizer, self.lr_schedule)
        except ValueError as error:
            raise RunError(f"lr_schedule: {error}") from None
        for name in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self, name)
            _require(value is None or (_is_number(value) and value > 0), name, value, "a finite number > 0")
        if self.clip_grad_norm is not None and self.clip_grad_value is not None:
            raise RunError("clip_grad_norm and clip_grad_value exclude each other: clip by norm or by value")
        _require(_is_int(self.batch_size, 1), "batch_size", self.batch_size, "an integer >= 1")
        _require(_is_int(self.test_batch_size, 1), "test_batch_size", self.test_batch_size, "an integer >= 1")
        _require(isinstance(self.drop_last, bool), "drop_last", self.drop_last, "true or false")
        _require(isinstance(self.compile, bool), "compile", self.compile, "true or false")
        _require(_is_int(self.epochs, 0), "epochs", self.epochs, "an integer >= 0")
        _require(self.max_steps is None or _is_int(self.max_steps, 0), "max_steps", self.max_steps, "an integer >= 0")
        _require(isinstance(self.shuffle, bool), "shuffle", self.shuffle, "true or false")
        _require(_is_int(self.seed, 0), "seed", self.seed, "an integer >= 0")
        _require(self.init_weights is None or isinstance(self.init_weights, str), "init_weights", self.init_weights,
                 "the path of a safetensors file")  # fmt: skip
        self._check_controls()

    def _check_controls(self) -> None:
        """The training controls' shapes and values; :meth:`check_parameters` matches them to the model."""
        frozen = [self.frozen] if isinstance(self.frozen, str) else self.frozen
        _require(isinstance(frozen, (list, tuple)) and all(isinstance(p, str) and p for p in frozen), "frozen",
                 self.frozen, "a list of parameter names, layer paths or globs")  # fmt: skip
        object.__setattr__(self, "frozen", tuple(frozen))
        _require(isinstance(self.param_groups, (list, tuple)), "param_groups", self.param_groups, "a list of tables")
        groups = []
        for index, group in enumerate(self.param_groups):
            where = f"param_groups[{index}]"
            _require(isinstance(group, Mapping) and "params" in group, where, group,
                     "a table with params and optimizer options")  # fmt: skip
            params = [group["params"]] if isinstance(group["params"], str) else group["params"]
            _require(isinstance(params, (list, tuple)) and len(params) > 0 and all(isinstance(p, str) and p
                     for p in params), f"{where}.params", group["params"], "a list of patterns")  # fmt: skip
            groups.append(
                {
                    **group,
                    "params": list(params),
                    **({"betas": list(group["betas"])} if isinstance(group.get("betas"), tuple) else {}),
                }
            )
        object.__setattr__(self, "param_groups", tuple(groups))
        _require(_is_int(self.accumulate_grad_batches, 1), "accumulate_grad_batches", self.accumulate_grad_batches,
                 "an integer >= 1")  # fmt: skip
        if isinstance(self.early_stopping, Mapping):
            try:
                object.__setattr__(self, "early_stopping", EarlyStopping(**self.early_stopping))
            except (TypeError, ValueError) as error:
                raise RunError(f"early_stopping: {error}") from None
        _require(self.early_stopping is None or isinstance(self.early_stopping, EarlyStopping), "early_stopping",
                 self.early_stopping, "an EarlyStopping or a table of its fields")  # fmt: skip
        if self.early_stopping is not None:
            try:
                classes = LOSSES[self.loss].class_targets and self.data.task == "classification"
                self.early_stopping.check_available(self.data.val_split > 0, True, classes, not classes)
            except ValueError as error:
                raise RunError(str(error)) from None
        try:  # the groups' options against the optimizer (the parameters they name: check_parameters)
            resolve_groups({}, self.optimizer, self.lr_schedule, (), [{**g, "params": []} for g in self.param_groups])
        except ValueError as error:
            raise RunError(str(error)) from None

    def check_parameters(self) -> None:
        """RunError unless every pattern of ``frozen`` and ``param_groups`` names parameters of the
        model, and no parameter is in two groups (imports a ``package.module:function`` model)."""
        spec = self.model_spec()
        types = {f"{path}.{key}": type(layer).__name__ for path, layer in spec.named_layers()
                 for key in layer.param_shapes()}  # fmt: skip
        try:
            resolve_groups(types, self.optimizer, self.lr_schedule, self.frozen, self.param_groups)
        except ValueError as error:
            raise RunError(str(error)) from None

    # --- as a value ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON/TOML values, every field explicit but those that are None (TOML has no
        null; a field left out is None or the default)."""
        values = {
            "model": self.model, "loss": self.loss, "batch_size": self.batch_size, "epochs": self.epochs,
            "max_steps": self.max_steps, "shuffle": self.shuffle, "seed": self.seed,
            "init_weights": self.init_weights,
            "lr_schedule": None if self.lr_schedule is None else str(self.lr_schedule),
            "clip_grad_norm": self.clip_grad_norm, "clip_grad_value": self.clip_grad_value,
            "data": self.data.to_dict(), "optimizer": self.optimizer.to_config(),
            "dialect": self.dialect, "init": self.init, "initializers": self.initializers,
            "frozen": list(self.frozen) or None, "param_groups": [dict(group) for group in self.param_groups] or None,
            "accumulate_grad_batches": self.accumulate_grad_batches if self.accumulate_grad_batches > 1 else None,
            "early_stopping": None if self.early_stopping is None else self.early_stopping.to_dict(),
            "drop_last": self.drop_last or None,
            "test_batch_size": None if self.test_batch_size == 1000 else self.test_batch_size,
            "compile": self.compile or None,
        }  # fmt: skip
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Run:
        """The run :meth:`to_dict` gave (or a recipe: any field may be left out)."""
        _check_fields(values, _RUN_SCHEMA, "")
        values = dict(values)
        if "data" in values:
            values["data"] = DataSpec.from_dict(values["data"])
        if "optimizer" in values:
            try:
                with dialects.dialect(values.get("dialect") or "torch"):  # its defaults for arguments left out
                    values["optimizer"] = optim.optimizer_from_config(values["optimizer"])
            except ValueError as error:
                raise RunError(f"optimizer: {error}") from None
        return cls(**values)

    def to_toml(self) -> str:
        """The run as a recipe (:func:`load_recipe` reads it back: tomli-w escapes every control
        character; a path that is not UTF-8, which a recipe cannot hold, raises RunError)."""
        import tomli_w

        values = self.to_dict()
        for name, value in [*values.items(), *(("data." + key, v) for key, v in values["data"].items())]:
            if isinstance(value, str) and _not_utf8(value):
                raise RunError(f"{name} {value!r} is not UTF-8 text, which a recipe holds; rename the file")
        return tomli_w.dumps(values)

    def replace(self, **changes: Any) -> Run:
        """A copy with ``changes``; ``data`` may be a dict of :class:`DataSpec` fields to change."""
        if isinstance(changes.get("data"), Mapping):
            changes["data"] = dataclasses.replace(self.data, **changes["data"])
        return dataclasses.replace(self, **changes)

    # --- what it builds -------------------------------------------------------------------------

    def model_spec(self):
        """The model's spec (imports a ``package.module:function``), built with the dialect's
        defaults and the run's ``init``; RunError if it names none."""
        try:
            with dialects.dialect(self.dialect or "torch"):
                model = model_from_name(self.model)
        except ValueError as error:
            raise RunError(str(error)) from None
        if self.init is not None:
            if not isinstance(model, Sequential):
                raise RunError(f"init: model {self.model} is a {type(model).__name__}, expected a Sequential to set "
                               "its init on")  # fmt: skip
            model = Sequential(dict(model.children), init=self.init)
        try:
            return with_initializers(model, self.initializers or {})
        except ValueError as error:
            raise RunError(str(error)) from None

    def loop_options(self) -> dict[str, Any]:
        """A loop's constructor arguments besides the model: ``adapter(model, **options)``."""
        return {
            # None: the loop's default, CrossEntropyLoss, which the native loops use too
            "loss": None if self.loss == "cross-entropy" else LOSSES[self.loss](),
            "optimizer": self.optimizer, "seed": self.seed, "lr_schedule": self.lr_schedule,
            "clip_grad_norm": self.clip_grad_norm, "clip_grad_value": self.clip_grad_value,
            "frozen": self.frozen, "param_groups": self.param_groups,
        }  # fmt: skip

    def compiled(self, loop):
        """``loop``, its model compiled if the run says so and the adapter can (``loop.compile()``: torch.
        MindSpore's steps are compiled graphs anyway; NumPy and Chainer have no compiler)."""
        if self.compile and callable(getattr(loop, "compile", None)):
            loop.compile()
        return loop

    def fit_options(self) -> dict[str, Any]:
        """:meth:`~unitrain.TrainingLoop.fit`'s arguments that the run decides."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "max_steps": self.max_steps, "accumulate_grad_batches": self.accumulate_grad_batches,
                "early_stopping": self.early_stopping, "drop_last": self.drop_last,
                "test_batch_size": self.test_batch_size}  # fmt: skip

    def initial_weights(self) -> dict | None:
        """``init_weights``' tensors, checked against the model from the file's header before
        any is read (WeightsError otherwise); None without."""
        if self.init_weights is None:
            return None
        shapes, name = self.model_spec().state_shapes(), f"init_weights {self.init_weights}"
        return load_safetensors(Path(self.init_weights), lambda declared: check_state(shapes, declared, name),
                                name=name)[0]  # fmt: skip

    def datasets(self):
        """``(train, validation or None, test)``: the data loaded, transformed and split, checked
        to fit the model and loss (DataError / RunError naming the problem)."""
        spec = self.data
        if spec.data_dir is not None and (problem := path_problem(spec.data_dir, "a directory")):
            raise RunError(f"data.data_dir {spec.data_dir} {problem}")
        if spec.task != "classification" and LOSSES[self.loss].class_targets:
            raise RunError(f"loss: {self.loss} trains classifiers; data.task {spec.task} needs an elementwise loss "
                           "such as mse, l1 or bce-with-logits")  # fmt: skip
        if spec.dataset in PACKAGED and self._training_part(PACKAGED_TRAIN_SAMPLES) > 0:  # its size is known
            self.check_schedule_length(self._training_part(PACKAGED_TRAIN_SAMPLES))
        if spec.task in ("regression", "multi-label"):
            train, test = load_target_arrays(spec.dataset)
            if spec.layout == "NHWC":  # channels-last arrays, transposed once
                if train.x.ndim != 4:
                    raise DataError(f"data.layout NHWC: {spec.dataset}'s x_train has shape {train.x.shape}; "
                                    "expected (N, H, W, C)")  # fmt: skip
                train, test = (dataclasses.replace(data, x=np.ascontiguousarray(data.x.transpose(0, 3, 1, 2)))
                               for data in (train, test))  # fmt: skip
            self._check_targets(train, self._model_output(train.x.shape[1:]))
        else:
            train, test = load_datasets(spec.dataset, data_dir=spec.data_dir, normalization=spec.normalize,
                                        check_size=self._check_transformed_size)  # fmt: skip
            train, test = spec.static_transforms(train), spec.static_transforms(test)
        self._check_token_ids(train, test)
        if spec.task == "reconstruction":
            output = self._model_output(train.x.shape[1:])
            if math.prod(output) != math.prod(train.x.shape[1:]):
                raise DataError(f"data.task reconstruction: model {self.model} gives outputs of shape {output}, "
                                f"{math.prod(output)} values for inputs of {math.prod(train.x.shape[1:])}; expected "
                                "as many (the target is the input)")  # fmt: skip
            train, test = (dataclasses.replace(data, y=data.x.reshape(len(data.x), *output), classes=None)
                           for data in (train, test))  # fmt: skip
        elif spec.task == "classification":
            output = self._output_shape(train.x.shape[1:], train.classes)
            if not LOSSES[self.loss].class_targets:  # an elementwise loss compares the outputs with one-hot labels
                train, test = (dataclasses.replace(data, y=np.eye(output[0], dtype=np.float32)[data.y])
                               for data in (train, test))  # fmt: skip
        val = None
        if spec.val_split:
            # a fraction as Keras' validation_split: the training part is int(N * (1 - fraction))
            kept = self._training_part(len(train))
            if not 0 < kept < len(train):
                left = "no training" if kept <= 0 else "no validation"
                raise DataError(f"data.val_split {spec.val_split} leaves {left} data: the training set has "
                                f"{len(train)} samples")  # fmt: skip
            if spec.val_from == "random":  # by the run's seed: the same samples on every backend and in a resume
                train, val = train.split(kept, seed=self.seed)
            elif spec.val_from == "last":
                train, val = train.subset(np.arange(kept)), train.subset(np.arange(kept, len(train)))
            else:
                held = len(train) - kept
                train, val = train.subset(np.arange(held, len(train))), train.subset(np.arange(held))
        self.check_schedule_length(len(train))
        if spec.random_crop_padding or spec.random_horizontal_flip:  # training batches only, not validation's
            train = train.augmented(spec.random_crop_padding, spec.random_horizontal_flip)
        return train, val, test

    def _training_part(self, num_samples: int) -> int:
        """How many of ``num_samples`` training samples ``data.val_split`` leaves for training: a
        fraction as Keras' validation_split (``int(N * (1 - fraction))``), else a count."""
        split = self.data.val_split
        return int(num_samples * (1 - split)) if isinstance(split, float) else num_samples - split

    def check_schedule_length(self, num_train_samples: int) -> None:
        """A OneCycleLR must cover every step the run takes on ``num_train_samples`` (RunError)."""
        try:
            batches = num_batches(num_train_samples, self.batch_size, self.drop_last)
            steps_per_epoch = -(-batches // self.accumulate_grad_batches)
            check_schedule_length(self.lr_schedule, self.epochs, steps_per_epoch, self.max_steps)
        except ValueError as error:
            raise RunError(f"lr_schedule: {error}") from None

    def _check_transformed_size(self, samples: int, sample_shape: tuple[int, ...]) -> None:
        """Resizing and padding may not grow ``samples`` of ``sample_shape`` (C, H, W) beyond
        :data:`MAX_TRANSFORMED_BYTES`, nor the random crop pad a sample by more than its size
        (bounded memory whatever the flags; called as the dataset declares them, before reading)."""
        spec, (channels, height, width) = self.data, sample_shape
        if spec.resize is not None:
            height, width = spec.resize
        height, width = height + 2 * spec.pad, width + 2 * spec.pad
        size = samples * channels * height * width * 4
        if size > MAX_TRANSFORMED_BYTES:
            transforms = [*([f"resize {'x'.join(map(str, spec.resize))}"] if spec.resize else []),
                          *([f"pad {spec.pad}"] if spec.pad else [])]  # fmt: skip
            raise DataError(f"data: {' and '.join(transforms)} make {samples} samples of "
                            f"{channels}x{height}x{width}, {size / 2**30:.1f} GiB of float32; expected at most "
                            f"{MAX_TRANSFORMED_BYTES // 2**30} GiB")  # fmt: skip
        if spec.random_crop_padding > max(height, width):
            raise DataError(f"data.random_crop_padding {spec.random_crop_padding} is more than the "
                            f"{height}x{width} samples' size; expected at most {max(height, width)}")  # fmt: skip

    def _check_token_ids(self, *datasets) -> None:
        """A model that starts with an Embedding takes integer ids within its table: checked here
        for the whole data, before any framework is imported (the loop checks each batch too)."""
        path, first = entry_layer(self.model_spec()) or (None, None)
        if not isinstance(first, Embedding):
            return
        for data in datasets:
            if problem := first.ids_problem(np.asarray(data.x)):
                raise DataError(f"model {self.model} does not take {self.data.dataset}'s samples: {path}: {problem}")

    def _model_output(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        try:
            return self.model_spec().output_shape(sample_shape)
        except ValueError as error:
            raise DataError(f"model {self.model} does not take {self.data.dataset}'s "
                            f"{'x'.join(map(str, sample_shape))} samples: {error}") from None  # fmt: skip

    def _check_targets(self, train, output: tuple[int, ...]) -> None:
        if train.y.shape[1:] != output:
            raise DataError(f"model {self.model} gives outputs of shape {output}, {self.data.dataset}'s y_train "
                            f"samples have shape {train.y.shape[1:]}; expected the same")  # fmt: skip
        if self.data.task == "multi-label" and not np.isin(train.y, (0, 1)).all():
            raise DataError(f"data.task multi-label: {self.data.dataset}'s y_train holds values other than 0 and 1")

    def _output_shape(self, sample_shape: tuple[int, ...], classes: tuple[str, ...] | None) -> tuple[int, ...]:
        output = self._model_output(sample_shape)
        if len(output) != 1 or (classes is not None and output[0] < len(classes)):
            many = f"; {self.data.dataset} has {len(classes)} classes" if classes is not None else ""
            raise DataError(f"model {self.model} gives outputs of shape {output}, expected one score per class{many}")
        return output

    def make_loop(self, backend: str | None = None, *, distributed: bool = False):
        """A loop of ``backend`` (default: ``$UNITRAIN_BACKEND`` or numpy) set up for this run:
        its model, loss, optimizer, seed, schedule, clipping and initial weights."""
        loop = self.compiled(registry.get_backend(backend)(self.model_spec(), distributed=distributed,
                                                          **self.loop_options()))  # fmt: skip
        if (initial := self.initial_weights()) is not None:
            loop.load_state_dict(initial, source=self.init_weights)
        return loop

    def train(self, backend: str | None = None, *, extensions: Iterable[Any] = (), data=None):
        """Train the run on ``backend``; returns ``(loop, history)``. ``data``: its
        :meth:`datasets`, when already loaded."""
        train, val, test = self.datasets() if data is None else data
        loop = self.make_loop(backend)
        history = loop.fit(train, eval_data=test, val_data=val, extensions=extensions, **self.fit_options())
        return loop, history


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's undecodable bytes (Python's surrogateescape)
        return True
    return False


def load_recipe(path: str | Path) -> Run:
    """The run a TOML recipe file describes (RunError naming the file and the field)."""
    values = recipe_values(path)
    try:
        return Run.from_dict(values)
    except RunError as error:
        raise RunError(f"recipe {path}: {error}") from None


def recipe_values(path: str | Path) -> dict[str, Any]:
    """A TOML recipe file's values, read within the limits on its size and nesting (RunError)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = Path(path)
    if problem := path_problem(path, "a TOML recipe file"):
        raise RunError(f"recipe {path} {problem}")
    if (text := read_capped(path, MAX_RECIPE_BYTES)) is None:
        raise RunError(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a few hundred")
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError:
        raise RunError(f"recipe {path} is not UTF-8 text") from None
    if (nesting := toml_nesting(text)) > MAX_RECIPE_NESTING:
        raise RunError(f"recipe {path} nests arrays, tables or dotted keys {nesting} deep; expected at most "
                       f"{MAX_RECIPE_NESTING} (a recipe nests two)")  # fmt: skip
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RunError(f"recipe {path} is not valid TOML: {error}") from None


def toml_nesting(text: str) -> int:
    """How deep TOML ``text`` nests, at most: its deepest run of open brackets and braces, or of dots
    in one key, outside strings and comments. One pass with no recursion, so that a document is
    measured before a recursive parser meets it (invalid TOML is left to the parser)."""
    deepest = depth = dots = 0
    i, size = 0, len(text)
    while i < size:
        char = text[i]
        if char in "\"'":
            quote = text[i : i + 3] if text.startswith(char * 3, i) else char
            i += len(quote)
            while i < size and not text.startswith(quote, i):
                if len(quote) == 1 and text[i] == "\n":  # an unterminated one-line string ends at its line
                    break
                i += 2 if char == '"' and text[i] == "\\" else 1  # a basic string's escape: skip what follows
            i += len(quote)
            continue
        if char == "#":
            i = text.find("\n", i)
            i = size if i < 0 else i
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == ".":  # a dotted key nests a table per dot (a number has one dot at most)
            dots += 1
        if char in "[]{}=,\n":
            dots = 0
        deepest = max(deepest, depth, dots)
        i += 1
    return deepest


# --- validation -------------------------------------------------------------------------------


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise RunError(f"{name}: expected {expected}, got {short(value)}")


def _check_fields(values, schema: Mapping[str, Any], where: str) -> None:
    """``values`` against ``schema``, refusing fields it does not name (a typo)."""
    if not isinstance(values, Mapping):
        raise RunError(f"{where or 'the run'}: expected a table of fields, got {short(values)}")
    if unknown := sorted(set(values) - set(schema)):
        inside = f" in {where}" if where else ""
        raise RunError(f"unknown field {short(unknown[0])}{inside}; expected some of {', '.join(schema)}")
    try:
        check_json(dict(values), schema, where)
    except ValueError as error:
        raise RunError(str(error)) from None


_DATA_SCHEMA = {
    "dataset": Optional(str),
    "data_dir": Optional(str),
    "val_split": Optional(Number(0)),
    "val_from": Optional(OneOf(("random", "first", "last"))),
    "normalize": Optional({"mean": list, "std": list}),
    "resize": Optional([Int(1), Int(1)]),
    "pad": Optional(Int()),
    "random_crop_padding": Optional(Int()),
    "random_horizontal_flip": Optional(bool),
    "task": Optional(str),
    "layout": Optional(str),
}
_RUN_SCHEMA = {
    "model": Optional(str),
    "loss": Optional(OneOf(tuple(LOSSES))),
    "data": Optional(dict),
    "optimizer": Optional(dict),
    "lr_schedule": Optional(Nullable(str)),
    "clip_grad_norm": Optional(Nullable(Number(0))),
    "clip_grad_value": Optional(Nullable(Number(0))),
    "batch_size": Optional(Int(1)),
    "epochs": Optional(Int()),
    "max_steps": Optional(Nullable(Int())),
    "shuffle": Optional(bool),
    "seed": Optional(Int()),
    "init_weights": Optional(Nullable(Text(".+"))),
    "dialect": Optional(Nullable(OneOf(tuple(dialects.DIALECTS)))),
    "init": Optional(Nullable(str)),
    "initializers": Optional(dict),
    "frozen": Optional(list),
    "param_groups": Optional(list),
    "accumulate_grad_batches": Optional(Int(1)),
    "early_stopping": Optional(dict),
    "drop_last": Optional(bool),
    "test_batch_size": Optional(Int(1)),
    "compile": Optional(bool),
}
