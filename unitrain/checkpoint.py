"""Checkpoints that survive crashes and move between backends.

A checkpoint directory holds the newest ``keep`` checkpoints of one run, one folder per step::

    DIR/step-00001200/weights.safetensors    canonical state (a plain weights file: --weights / --init-weights)
    DIR/step-00001200/optimizer.safetensors  {"step", "<param>.<momentum_buffer|exp_avg|exp_avg_sq>"}
    DIR/step-00001200/random.safetensors     the dropout stream (backends with ``random-state``; opaque bytes)
    DIR/step-00001200/best.safetensors       early stopping's best weights so far (runs with early stopping)
    DIR/step-00001200/checkpoint.json        manifest: position, run configuration and id, versions, sha256 of the files

A directory holds one run: its manifests carry the run's id, a resume continues it, and a
checkpoint of another run, or of a step older than one already there (a branch from an older
checkpoint), is refused rather than interleaved; ``keep`` deletes only the run's own.

A checkpoint is written into a hidden ``.tmp-*`` folder (each file fsynced, the manifest last) which
is then renamed into place and the directory fsynced, so a crash at any instant leaves either no new
checkpoint or a complete one; leftover ``.tmp-*`` folders are ignored and swept on the next write.
Loading verifies the manifest's sizes and sha256 digests and never unpickles anything (the format,
the manifest's schema and its reading: :mod:`unitrain.checkpoint_format`).

The batch order needs no RNG state beyond the run's seed: the order of epoch ``e`` is a pure
function of ``(seed, e)`` (see :mod:`unitrain.data`), so the position ``(epoch, batch)`` restarts the
data stream where it stopped. The checkpoint also keeps the loop's dropout stream
(``TrainingLoop.random_state()``) and a resume restores it into a loop that keeps the same kind
of stream, so dropout masks continue exactly too: the same backend, or NumPy, Chainer and
MindSpore among themselves (:mod:`unitrain.randomness`); PyTorch's generator is its own. A graph's
noise stream (:mod:`unitrain.graph_noise`) is unitrain's own on every backend, so it resumes on any.

Python API::

    loop.fit(data, extensions=[Checkpointer("ckpt", every=100)], ...)
    checkpoint = load_checkpoint("ckpt")                # the newest one, verified
    loop = make_loop("torch", mlp(), optimizer=checkpoint.optimizer_spec(), seed=checkpoint.seed)
    checkpoint.restore(loop)
    loop.fit(data, start_epoch=checkpoint.epoch, start_batch=checkpoint.batch, ...)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import optim, registry, schedules, state_loading
from .checkpoint_format import (  # the format's names, importable from here as before it had its own module
    BEST,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_SCHEMA,  # noqa: F401
    MAX_WORLD_SIZE,  # noqa: F401
    OPTIMIZER,
    RANDOM,
    RUN_ID_PATTERN,
    WEIGHTS,
    CheckpointError,
    file_digest,
    read_manifest,
)
from .controls import EarlyStoppingState
from .data import num_batches
from .files import atomic_write, current_umask, directory_lock, fsync_dir
from .layers import PRESETS
from .losses import LOSSES
from .reading import (
    path_kind,
    path_problem,
    short,
    short_list,
)
from .run import Run, RunError
from .signals import STOP_SIGNALS, handled
from .weights import Declared, State, WeightsError, check_state, load_safetensors, save_safetensors

_NAME = re.compile(r"step-(\d{8,})")


class Diverged(RuntimeError):
    """Training produced a NaN or infinite loss (or weights); the run stops."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(Exception):
    """Training stopped at a step boundary because the user asked (Ctrl-C, SIGTERM)."""


# --- writing --------------------------------------------------------------------------------


def optimizer_from_config(config: Mapping[str, Any]) -> optim.Optimizer:
    """The optimizer spec a manifest records; a bad record is a :class:`CheckpointError`."""
    try:
        return optim.optimizer_from_config(config)
    except ValueError as error:
        raise CheckpointError(f"checkpoint optimizer: {error}") from None


def _versions(backend: str) -> dict[str, str | None]:
    from . import __version__

    spec = registry.backend_specs().get(backend)
    return {"unitrain": __version__, backend: spec.version() if spec else None}


def save_checkpoint(
    directory: str | os.PathLike,
    loop,
    *,
    epoch: int,
    batch: int,
    run: Mapping[str, Any] | None = None,
    normalization: Mapping[str, Any] | None = None,
    finished: bool = False,
    epoch_loss: tuple[float, int] = (0.0, 0),
    epoch_correct: tuple[int, int] | None = None,
    keep: int | None = 3,
    run_id: str | None = None,
) -> Path:
    """Write a checkpoint of ``loop`` whose training continues at batch ``batch`` of epoch
    ``epoch``; keep the newest ``keep`` (None: all) of the run ``run_id`` (a resumed run keeps
    its id; another run's checkpoints are never deleted). ``run`` is the run's
    :meth:`~unitrain.run.Run.to_dict`, ``normalization`` its data's (``Normalization.to_json()``);
    ``epoch_loss`` the (sum, count) of the current epoch's step losses so far, ``epoch_correct``
    the (correct predictions, samples) of its training batches so far (None: not counted).

    A directory holds one run, its steps only growing: another run's checkpoint there, or one
    later than this step (a resume of an older checkpoint), is refused with
    :class:`CheckpointError`, so that ``load_checkpoint(directory)`` never picks a mixed run."""
    if run_id is not None and not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise ValueError(f"run_id {run_id!r}: expected 1 to 64 letters, digits, '_' or '-'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = loop.step_count
    name = f"step-{step:08d}"
    for existing in checkpoint_paths(directory):  # one run per directory, its steps only growing
        if _run_id(existing) not in (run_id, _UNKNOWN_RUN):
            raise CheckpointError(f"{directory} holds {existing.name} of another run; a directory keeps one run's "
                                  "checkpoints: write this run's into a new directory (or continue that run: "
                                  f"unitrain train --resume {directory})")  # fmt: skip
        if _step(existing) > step:
            raise CheckpointError(f"{directory} holds {existing.name}, later than step {step}: writing there would "
                                  "interleave two futures of the run; write the branch's checkpoints into a new "
                                  "directory")  # fmt: skip
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": loop.step_count,
        "epoch": epoch,
        "batch": batch,
        "finished": finished,
        "backend": loop.name,
        "world_size": loop.world_size,  # processes that trained it (data parallel); any number may resume it
        "versions": _versions(loop.name),
        "seed": loop.seed,
        "dtype": str(loop.dtype),
        "optimizer": loop.optimizer_spec.to_config(),
        "lr": loop.lr,
        "lr_schedule": None
        if loop.lr_schedule is None
        else {
            "schedule": str(loop.lr_schedule),
            "position": loop.schedule_position,
        },
        "clip_grad": {"norm": loop.clip_grad_norm, "value": loop.clip_grad_value},
        "loss": type(loop.loss_spec).__name__,
        "data_order": "numpy.random.default_rng([seed, epoch]).permutation(num_samples), batches from `batch` on",
        "epoch_loss": {"sum": float(epoch_loss[0]), "count": int(epoch_loss[1])},
        "epoch_correct": None if epoch_correct is None else {"correct": epoch_correct[0], "samples": epoch_correct[1]},
        "run": dict(run or {}),
        "normalization": normalization,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "early_stopping": None if loop.early_stopping is None else loop.early_stopping.to_json(),
    }
    _sweep(directory, ".tmp-")
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=directory))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the checkpoint from others
    try:
        save_safetensors(staging / WEIGHTS, loop.state_dict(), {"format": "pt", "producer": f"unitrain/{loop.name}"})
        save_safetensors(staging / OPTIMIZER, loop.optimizer_state_dict())
        files = [WEIGHTS, OPTIMIZER]
        if random_state := loop.random_state():
            save_safetensors(staging / RANDOM, random_state, {"producer": f"unitrain/{loop.name}"})
            files.append(RANDOM)
        if loop.early_stopping is not None and loop.early_stopping.best_weights:
            save_safetensors(staging / BEST, loop.early_stopping.best_weights, {"format": "pt"})
            files.append(BEST)
        manifest["files"] = {file: file_digest(staging / file) for file in files}
        atomic_write(staging / MANIFEST, [json.dumps(manifest, indent=1).encode()])  # last: marks it complete
        final = directory / name
        if final.exists():  # the same step again (a resumed run): the old copy goes first
            final.rename(Path(tempfile.mkdtemp(prefix=".trash-", dir=directory)) / name)
        staging.rename(final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep is not None:
        for old in [path for path in checkpoint_paths(directory) if _run_id(path) == run_id][:-keep]:
            # renamed first, so a half-deleted folder never looks like a checkpoint
            old.rename(Path(tempfile.mkdtemp(prefix=".trash-", dir=directory)) / old.name)
    _sweep(directory, ".trash-")
    return final


#: the run of a checkpoint whose manifest cannot be read: not known to be another run's, nor ours to delete
_UNKNOWN_RUN = object()


def _run_id(folder: Path) -> object:
    """The run a checkpoint belongs to, as its manifest says (None: written before runs had ids)."""
    try:
        return read_manifest(folder / MANIFEST).get("run_id")
    except (OSError, CheckpointError):
        return _UNKNOWN_RUN


def _sweep(directory: Path, prefix: str) -> None:
    for leftover in directory.glob(f"{prefix}*"):
        shutil.rmtree(leftover, ignore_errors=True)


# --- reading --------------------------------------------------------------------------------


def checkpoint_paths(directory: str | os.PathLike) -> list[Path]:
    """The checkpoint folders in ``directory``, oldest first (by step)."""
    found = [p for p in Path(directory).iterdir() if _NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=_step)


def _step(folder: Path) -> int:
    return int(_NAME.fullmatch(folder.name).group(1))


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]
    weights: State
    optimizer_state: State
    #: the loop's dropout stream (``TrainingLoop.random_state()``; empty if it kept none)
    random_state: State
    #: early stopping's best weights so far (empty without)
    best_weights: State = dataclasses.field(default_factory=dict)

    step = property(lambda self: self.manifest["step"])
    epoch = property(lambda self: self.manifest["epoch"], doc="epoch to continue at (0-based)")
    batch = property(lambda self: self.manifest["batch"], doc="batch of that epoch to continue at")
    finished = property(lambda self: self.manifest["finished"])
    backend = property(lambda self: self.manifest["backend"])
    seed = property(lambda self: self.manifest["seed"])
    run = property(lambda self: self.manifest["run"])

    @property
    def epoch_loss(self) -> tuple[float, int]:
        return self.manifest["epoch_loss"]["sum"], self.manifest["epoch_loss"]["count"]

    @property
    def epoch_correct(self) -> tuple[int, int] | None:
        """The current epoch's (correct predictions, samples) so far; None where not counted (or
        recorded: checkpoints written before it was)."""
        counted = self.manifest.get("epoch_correct")
        return None if counted is None else (counted["correct"], counted["samples"])

    def optimizer_spec(self) -> optim.Optimizer:
        return optimizer_from_config(self.manifest["optimizer"])

    def run_spec(self) -> Run:
        """The run that wrote the checkpoint, which a resume continues."""
        recorded = self.run
        if not recorded:
            raise CheckpointError(f"checkpoint {self.path} records no run (it was written from Python without one); "
                                  "resume it from Python with Checkpoint.restore(loop)")  # fmt: skip
        if "data" not in recorded:  # written before runs were one value: the command line's flat record
            recorded = {
                "data": {"dataset": recorded.get("dataset", "mnist"), "val_split": recorded.get("val_split", 0)},
                "optimizer": self.manifest["optimizer"], "seed": self.seed,
                **{key: value for key, value in recorded.items() if key in _FLAT_RUN_FIELDS},
            }  # fmt: skip
        try:
            return Run.from_dict(recorded)
        except RunError as error:
            raise CheckpointError(f"{MANIFEST}: its run is invalid: {error}") from None

    def lr_schedule(self) -> schedules.LRSchedule | None:
        recorded = self.manifest.get("lr_schedule")
        if recorded is None:
            return None
        try:
            return schedules.parse_schedule(recorded["schedule"])
        except ValueError as error:
            raise CheckpointError(f"checkpoint {self.path}: its lr_schedule is invalid: {error}") from None

    def clipping(self) -> dict[str, float | None]:
        """``{"clip_grad_norm": ..., "clip_grad_value": ...}`` as the loop's constructor takes them."""
        recorded = self.manifest.get("clip_grad", {"norm": None, "value": None})
        return {"clip_grad_norm": recorded["norm"], "clip_grad_value": recorded["value"]}

    def check_position(self, num_samples: int, batch_size: int, accumulate: int = 1, drop_last: bool = False) -> None:
        """Refuse a position the run cannot have reached on data of ``num_samples`` samples in
        batches of ``batch_size``, ``accumulate`` batches per optimizer step (raises
        :class:`CheckpointError` naming the field and its range): ``batch`` within an epoch at a
        step's first batch, and ``step == epoch * steps per epoch + batch / accumulate``, which
        every run started from step 0 keeps."""
        per_epoch = num_batches(num_samples, batch_size, drop_last)
        steps = -(-per_epoch // accumulate)
        where = f"checkpoint {self.path}: {num_samples} samples in batches of {batch_size} make {per_epoch} per epoch"
        if not self.batch < per_epoch:
            raise CheckpointError(f"{where}, so its batch {short(self.batch)} must be in 0..{per_epoch - 1}")
        if self.batch % accumulate:
            raise CheckpointError(f"{where}, {accumulate} to a step, so its batch {short(self.batch)} must be a "
                                  f"multiple of {accumulate}")  # fmt: skip
        if self.step != self.epoch * steps + self.batch // accumulate:
            expected = self.epoch * steps + self.batch // accumulate
            per_step = f" / {accumulate}" if accumulate > 1 else ""
            raise CheckpointError(f"{where}, so its step {short(self.step)} must be epoch {short(self.epoch)} "
                                  f"x {steps} + batch {self.batch}{per_step} = {short(expected)}")  # fmt: skip

    def restore(self, loop) -> None:
        """Load weights, optimizer state and step count into ``loop`` (any backend), which must
        use the checkpoint's optimizer and seed; and the random state where ``loop`` keeps the
        same kind of stream (the same backend, or NumPy, Chainer and MindSpore among themselves),
        a graph's noise stream on every backend."""
        if loop.optimizer_spec != self.optimizer_spec():
            raise CheckpointError(
                f"{self.path} was trained with {self.optimizer_spec()}, the loop uses {loop.optimizer_spec}"
            )
        if loop.seed != self.seed:
            raise CheckpointError(f"{self.path} was trained with seed {self.seed} (it fixes the data order), "
                                  f"the loop uses seed {loop.seed}")  # fmt: skip
        schedule, clipping = self.lr_schedule(), self.clipping()
        if loop.lr_schedule != schedule:
            raise CheckpointError(
                f"{self.path} was trained with lr_schedule {schedule}, the loop uses {loop.lr_schedule}"
            )
        if {"clip_grad_norm": loop.clip_grad_norm, "clip_grad_value": loop.clip_grad_value} != clipping:
            used = f"clip_grad_norm={loop.clip_grad_norm}, clip_grad_value={loop.clip_grad_value}"
            raise CheckpointError(f"{self.path} was trained with {clipping}, the loop clips with {used}")
        # every part checked before any is loaded: a checkpoint refused leaves the loop as it was
        weights = state_loading.checked_weights(loop, self.weights, str(self.path / WEIGHTS))
        try:
            optimizer_state = state_loading.checked_optimizer_state(loop, self.optimizer_state, "optimizer state")
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{self.path / OPTIMIZER} does not fit the model: {error}") from None
        if schedule is not None:
            # fit steps a per-batch schedule after every step, a per-epoch one after every whole epoch
            position = self.manifest["lr_schedule"]["position"]
            expected = self.step if schedule.per_batch else self.epoch
            if position != expected:
                raise CheckpointError(f"checkpoint {self.path}: lr_schedule position {short(position)} does not fit "
                                      f"{'step' if schedule.per_batch else 'epoch'} {short(expected)}")  # fmt: skip
        early_stopping = loop.early_stopping
        if (recorded := self.manifest.get("early_stopping")) is not None:
            try:
                early_stopping = EarlyStoppingState.from_json(recorded, self.best_weights or None)
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"checkpoint {self.path}: its early_stopping is invalid: {error}") from None
        try:  # the dropout stream where the loop keeps its kind, a graph's noise stream on any backend
            random_state = state_loading.resumable_random_state(loop, self.random_state, str(self.path / RANDOM))
        except WeightsError as error:
            raise CheckpointError(str(error)) from None
        state_loading.assign(loop, "weights", weights)
        state_loading.assign(loop, "optimizer", optimizer_state)
        state_loading.assign(loop, "random", random_state)
        if schedule is not None:
            loop.seek_schedule(self.manifest["lr_schedule"]["position"])
        elif "lr" in self.manifest:  # an lr set by hand (set_lr)
            loop.set_lr(self.manifest["lr"])
        loop.early_stopping = early_stopping


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at ``path``: a checkpoint folder, or a checkpoint directory (its newest
    checkpoint). Validates the manifest against :data:`~unitrain.checkpoint_format.MANIFEST_SCHEMA`,
    then each file's size, sha256 and header before reading its tensors; raises
    :class:`CheckpointError`."""
    path = Path(path)
    if problem := path_problem(path, "a checkpoint directory"):
        raise CheckpointError(f"checkpoint {path} {problem}")
    if _NAME.fullmatch(path.name) or path_kind(path / MANIFEST) != "nothing":
        return _verified(path)
    candidates = checkpoint_paths(path)
    if not candidates:
        raise CheckpointError(f"{path} holds no checkpoint (no step-NNNNNNNN folder)")
    try:
        return _verified(candidates[-1])
    except CheckpointError as error:
        if len(candidates) == 1:
            raise
        raise CheckpointError(f"{error}; the previous checkpoint {candidates[-2]} may be intact: "
                              f"pass --resume {candidates[-2]} to continue from it") from None  # fmt: skip


#: the backends' random states are PCG64's JSON (about 170 bytes) or torch's CPU generator (5 kB)
_MAX_RANDOM_STATE_BYTES = 1 << 20


def _verified(folder: Path) -> Checkpoint:
    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {folder} is damaged: {why}")

    manifest = read_manifest(folder / MANIFEST)
    try:
        recorded = Checkpoint(folder, manifest, {}, {}, {})
        # the buffers follow the optimizer as the schedule runs it (OneCycleLR cycling momentum)
        spec, schedule = optimizer_from_config(manifest["optimizer"]), recorded.lr_schedule()
        try:
            spec = schedules.scheduled_optimizer(spec, schedule)
        except ValueError as error:  # an optimizer the schedule cannot run
            raise CheckpointError(f"its lr_schedule is invalid: {error}") from None
        state_names, accumulate = set(spec.state_names), 1
        if manifest["run"]:  # checked now, though only a resume uses it (importing nothing)
            run = recorded.run_spec()
            accumulate = run.accumulate_grad_batches
            if manifest.get("loss", run_loss := LOSSES[run.loss].__name__) != run_loss:
                raise CheckpointError(f"its loss {manifest['loss']} is not its run's, {run.loss} ({run_loss})")
            for group in run.param_groups:  # a group may keep buffers the run's spec does not (momentum)
                options = {key: value for key, value in group.items() if key != "params"}
                state_names |= set(schedules.scheduled_optimizer(dataclasses.replace(spec, **options), schedule)
                                   .state_names)  # fmt: skip
    except CheckpointError as error:
        raise damaged(str(error)) from None
    # one loss an optimizer step: the epoch's steps so far, `accumulate` batches each (none recorded, 0 and
    # 0.0: written from Python without them)
    total, count = manifest["epoch_loss"]["sum"], manifest["epoch_loss"]["count"]
    if count != -(-manifest["batch"] // accumulate) and (count, total) != (0, 0):
        raise damaged(f"epoch_loss.count {count} is not the {-(-manifest['batch'] // accumulate)} steps taken in "
                      "its epoch")  # fmt: skip
    if (normalization := manifest.get("normalization")) and len(normalization["mean"]) != len(normalization["std"]):
        raise damaged(f"normalization has {len(normalization['mean'])} means but {len(normalization['std'])} stds")
    files = manifest["files"]
    for file in (WEIGHTS, OPTIMIZER, RANDOM, BEST):
        if file not in files:
            continue
        if problem := path_problem(folder / file):
            raise damaged(f"{file} {problem}")
        declared, size = files[file], (folder / file).stat().st_size
        if size != declared["bytes"]:  # before reading any of it
            raise damaged(f"{file} has {size} bytes, the manifest says {declared['bytes']} (truncated?)")
        if file_digest(folder / file)["sha256"] != declared["sha256"]:
            raise damaged(f"{file} does not match its sha256 in the manifest (corrupted bytes)")

    def read(file: str, check) -> State:
        return load_safetensors(folder / file, check, name=f"checkpoint file {folder / file}")[0]

    weights_layout: dict[str, Declared] = {}

    def check_weights(declared):  # the run's model where the manifest names one, else the file's own keys
        model = manifest["run"].get("model")
        # reading a checkpoint runs no code it names: a package.module:function model is imported only
        # where a run is resumed (the loop then checks these weights against it)
        shapes = PRESETS[model]().state_shapes() if model in PRESETS else {k: d.shape for k, d in declared.items()}
        check_state(shapes, declared, f"checkpoint file {folder / WEIGHTS}")
        weights_layout.update(declared)

    def check_optimizer(declared):  # "step" and, per parameter, buffers of its shape
        buffers = {f"{key}.{name}": d.shape for key, d in weights_layout.items() for name in state_names}
        expected = {"step": (), **buffers}
        unknown = [key for key in declared if key not in expected]
        wrong = [key for key in declared if key in expected and tuple(declared[key].shape) != expected[key]]
        if "step" not in declared or unknown or wrong or declared["step"].dtype != "I64":
            raise damaged(f"{OPTIMIZER} does not fit {spec} and the weights: needs an I64 scalar 'step' "
                          f"and '<param>.{{{', '.join(spec.state_names)}}}' buffers of the parameters' shapes; "
                          f"unexpected {short_list(unknown)}, mis-shaped {short_list(wrong)}")  # fmt: skip

    def check_random(declared):  # opaque bytes, and small
        size = sum(math.prod(d.shape) for d in declared.values())
        if any(d.dtype != "U8" or len(d.shape) != 1 for d in declared.values()) or size > _MAX_RANDOM_STATE_BYTES:
            raise damaged(f"{RANDOM} must hold 1-D U8 arrays of at most {_MAX_RANDOM_STATE_BYTES} bytes in all")

    weights = read(WEIGHTS, check_weights)
    optimizer_state = read(OPTIMIZER, check_optimizer)
    random_state = read(RANDOM, check_random) if RANDOM in files else {}

    def check_best(declared):  # the same tensors as the weights
        check_state({key: d.shape for key, d in weights_layout.items()}, declared, f"checkpoint file {folder / BEST}")

    best_weights = read(BEST, check_best) if BEST in files else {}
    if int(optimizer_state["step"]) != manifest["step"]:
        raise damaged(f"optimizer step {int(optimizer_state['step'])} differs from the manifest's {manifest['step']}")
    return Checkpoint(folder, manifest, weights, optimizer_state, random_state, best_weights)


# --- the training extension -----------------------------------------------------------------


class Checkpointer:
    """A :meth:`~unitrain.loop.TrainingLoop.fit` extension: writes checkpoints every ``every``
    steps and at each epoch's end (``directory`` None: none), stops on a NaN/Inf loss
    (:class:`Diverged`, before any checkpoint of the diverged state is written) and, once
    :attr:`stop_requested` is set (Ctrl-C, see :func:`stop_on_signals`), writes a checkpoint at
    the next step boundary and raises :class:`Interrupted`. That one goes to ``directory``, or
    when there is none to ``interrupt_directory``, so that an interrupted run is never lost.

    Losses are read (a host sync) in bulk: every ``check_every`` steps, before a checkpoint
    and at epoch ends. ``run`` (a :class:`~unitrain.run.Run`) and ``normalization`` (its
    data's) are recorded in each checkpoint. ``resume`` is the checkpoint the run continues
    from, if any: the run keeps its id, so ``directory`` may be that checkpoint's own when it is
    the newest there."""

    def __init__(
        self,
        directory: str | os.PathLike | None,
        *,
        every: int | None = None,
        keep: int | None = 3,
        max_steps: int | None = None,
        run: Run | None = None,
        normalization: Mapping[str, Any] | None = None,
        resume: Checkpoint | None = None,
        check_every: int = 100,
        interrupt_directory: str | os.PathLike | None = None,
    ):
        self.directory = None if directory is None else Path(directory)
        self.interrupt_directory = None if interrupt_directory is None else Path(interrupt_directory)
        self.every, self.keep, self.max_steps = every, keep, max_steps
        self.run, self.normalization = None if run is None else run.to_dict(), normalization
        self.check_every = every if every else check_every
        #: the resumed epoch's loss (sum, count) and correct predictions (count, samples) before the resume
        self.carried = {resume.epoch: (resume.epoch_loss, resume.epoch_correct)} if resume is not None else {}
        #: which checkpoints are this run's (``keep`` deletes no other's); a resume continues the run
        self.run_id = resume.manifest.get("run_id") if resume is not None else uuid.uuid4().hex
        self.stop_requested = False
        self.stop_signal: int | None = None
        #: the newest checkpoint written by this run
        self.last_saved: Path | None = resume.path if resume is not None else None
        self.last_saved_step: int | None = None
        self.position = (resume.epoch, resume.batch) if resume is not None else (0, 0)
        self.unchecked: list[tuple[int, int, Any, Any, int]] = []
        self._held = ExitStack()

    def on_fit_start(self, loop, plan):
        self.epochs, self.steps_per_epoch = plan["epochs"], plan["steps_per_epoch"]
        if self.directory is not None:  # one run writes there at a time (another's sweep would delete ours)
            self._held.enter_context(directory_lock(self.directory, f"checkpoint directory {self.directory}"))

    def finalize(self, loop):
        self._held.close()

    def on_epoch_start(self, loop, epoch):
        self.epoch = epoch
        (self.loss_sum, self.loss_count), correct = self.carried.pop(epoch, ((0.0, 0), (0, 0)))
        self.resumed_mid_epoch = self.loss_count > 0
        #: correct predictions and samples of the epoch's checked steps; None once a step is not counted
        self.correct, self.samples = correct if correct is not None else (None, 0)

    def on_step_end(self, loop, index, loss):
        stopping = self._stopping(loop)
        self.unchecked.append((loop.step_count, index, loss, loop.last_batch_correct, loop.last_batch_size))
        self.position = (self.epoch, index + 1)
        if index + 1 == self.steps_per_epoch or (self.max_steps is not None and loop.step_count >= self.max_steps):
            return  # on_epoch_end comes next and checkpoints there
        due = self.every is not None and loop.step_count % self.every == 0
        if due or stopping or len(self.unchecked) >= self.check_every:
            self._check_losses(loop)
        if due and self.directory is not None:
            self._save(loop, finished=False)
        if stopping:
            self._save_interrupted(loop)
            raise Interrupted()

    def on_epoch_end(self, loop, record):
        stopping = self._stopping(loop)  # rank 0 alone evaluated since the last step's vote
        self._check_losses(loop)
        if self.position[1] >= self.steps_per_epoch:
            self.position = (self.epoch + 1, 0)
        if self.resumed_mid_epoch:  # the records cover the steps before the resume too
            record["train_loss"] = self.loss_sum / self.loss_count
            if self.correct is None:  # not counted before the resume (an older checkpoint): not known
                record.pop("train_accuracy", None)
            elif "train_accuracy" in record:
                record["train_accuracy"] = self.correct / self.samples
        finished = (self.position[0] >= self.epochs or loop.stop_training
                    or (self.max_steps is not None and loop.step_count >= self.max_steps))  # fmt: skip
        if self.directory is not None:
            self._save(loop, finished=finished)
        if stopping and not finished:
            self._save_interrupted(loop)  # saved just above when the run has a directory
            raise Interrupted()

    def _stopping(self, loop) -> bool:
        """:attr:`stop_requested` (which a signal handler sets at any instant) read once; on several
        ranks their vote on it, which alone decides: a rank whose signal came after its vote stops with
        the others at the next boundary, not alone, leaving them in a collective it never joins."""
        stopping = self.stop_requested
        if loop.world_size > 1 and loop.any_rank(stopping):
            stopping = self.stop_requested = True
            self.stop_signal = self.stop_signal or signal.SIGTERM
        return stopping

    def finish(self, loop) -> None:
        """After ``fit`` returned: make sure the newest checkpoint is the finished state."""
        if self.directory is not None and self.last_saved_step != loop.step_count:
            self._check_losses(loop)
            self._save(loop, finished=True)

    def _check_losses(self, loop) -> None:
        for step, index, loss, correct, samples in self.unchecked:
            value = loop.to_float(loss)
            if not np.isfinite(value):
                raise Diverged(f"loss is {value} at step {step} (epoch {self.epoch + 1}, batch {index + 1})", step)
            self.loss_sum += value
            self.loss_count += 1
            self.correct = (
                None if correct is None or self.correct is None else self.correct + round(loop.to_float(correct))
            )
            self.samples += samples
        self.unchecked.clear()

    def _save_interrupted(self, loop) -> None:
        if self.directory is None:
            if self.interrupt_directory is None:
                return
            self.directory = self.interrupt_directory
        if self.last_saved_step != loop.step_count:
            self._save(loop, finished=False)

    def _save(self, loop, finished: bool) -> None:
        for kind, state in (("weights", loop.state_dict()), ("optimizer state", loop.optimizer_state_dict())):
            bad = [key for key, value in state.items() if value.dtype.kind == "f" and not np.isfinite(value).all()]
            if bad:
                raise Diverged(f"{kind} {bad[0]!r} became NaN or infinite at step {loop.step_count}", loop.step_count)
        self.last_saved = save_checkpoint(
            self.directory,
            loop,
            epoch=self.position[0],
            batch=self.position[1],
            run=self.run,
            normalization=self.normalization,
            finished=finished,
            epoch_loss=(self.loss_sum, self.loss_count) if self.position[1] else (0.0, 0),
            epoch_correct=(self.correct, self.samples) if self.position[1] and self.correct is not None else None,
            keep=self.keep,
            run_id=self.run_id,
        )
        self.last_saved_step = loop.step_count


#: the fields a checkpoint written before runs were one value recorded as they are now
_FLAT_RUN_FIELDS = ("model", "loss", "batch_size", "epochs", "max_steps", "shuffle", "lr_schedule", "clip_grad_norm",
                    "clip_grad_value")  # fmt: skip


@contextmanager
def stop_on_signals(checkpointer: Checkpointer, notice=None):
    """While active, the first SIGINT (Ctrl-C) or SIGTERM asks ``checkpointer`` to stop at the
    next step boundary (calling ``notice()``) and is recorded in ``checkpointer.stop_signal``;
    a second one aborts at once (KeyboardInterrupt, or SIGTERM's default)."""

    def handler(signum, frame):
        checkpointer.stop_requested = True
        checkpointer.stop_signal = signum
        for stop, abort in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if stop in previous:
                signal.signal(stop, abort)
        if notice is not None:
            notice()

    previous = {signum: signal.signal(signum, handler) for signum in handled(STOP_SIGNALS)}
    try:
        yield checkpointer
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)
