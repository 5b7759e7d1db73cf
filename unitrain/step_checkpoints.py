"""Crash-safe checkpoints of a run of a multi-model step (a :class:`~unitrain.steps.MultiModelLoop`
driven by a script such as ``examples/dcgan.py``): the ``--checkpoint-dir DIR``,
``--checkpoint-every N`` and ``--resume`` options of those scripts.

The run's whole state (every model's weights, optimizer state and random stream, the step count
and the noise stream) is one file, ``DIR/checkpoint.safetensors``, replaced atomically
(:func:`unitrain.files.atomic_write`): a crash at any instant, SIGKILL included, leaves either the
previous checkpoint or the new one. The directory is locked for the run
(:func:`unitrain.files.directory_lock`), so two runs never write into it at once. The script's
settings that fix the run's course (seed, batch size, model sizes) are recorded beside the state
and a resume with other values is refused; how many steps to train is not one of them, so a
resumed run may go further than the first one meant to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .checkpoint import CheckpointError
from .files import directory_lock
from .reading import path_problem

#: the checkpoint's file name inside ``--checkpoint-dir``
CHECKPOINT_FILE = "checkpoint.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The three options, as the scripts take them."""
    group = parser.add_argument_group("checkpoints")
    where = f"write the run's state to DIR/{CHECKPOINT_FILE} (atomically) every N steps and at the end"
    group.add_argument("--checkpoint-dir", type=Path, metavar="DIR", help=where)
    group.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="steps between checkpoints")
    group.add_argument("--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir")


class StepCheckpoints:
    """Checkpoints every ``every`` steps into ``directory`` (None: none) and at the run's end.
    ``settings`` (JSON values) are what a resumed run must share with the checkpointed one.
    ``keep``: how many of the newest checkpoints stay; the newest is always
    ``DIR/checkpoint.safetensors`` (what ``--resume`` continues), each earlier one kept as
    ``DIR/checkpoint-<step>.safetensors`` (a hard link made before the newest replaces it, so a
    crash still leaves a whole newest checkpoint); the oldest beyond ``keep`` are deleted."""

    def __init__(self, directory: Path | None, every: int, settings: Mapping[str, object], *, resume: bool = False,
                 keep: int = 1):  # fmt: skip
        if every < 1:
            raise CheckpointError(f"--checkpoint-every must be a positive integer, got {every}")
        if keep < 1:
            raise CheckpointError(f"--keep must be a positive integer, got {keep}")
        if resume and directory is None:
            raise CheckpointError("--resume needs --checkpoint-dir DIR (the run to continue)")
        self.directory, self.every, self.resume, self.keep = directory, every, resume, keep
        self.saved_step: int | None = None  # the step the newest checkpoint holds (None: none yet)
        self.metadata: dict[str, str] = {}  # the resumed checkpoint's
        self.settings = json.loads(json.dumps(dict(settings)))  # as they come back from the file
        self.path = None if directory is None else directory / CHECKPOINT_FILE
        if directory is not None and directory.exists() and not directory.is_dir():
            raise CheckpointError(f"--checkpoint-dir {directory} is a file, expected a directory")
        if self.path is not None and not resume and self.path.exists():
            raise CheckpointError(f"--checkpoint-dir {directory} already holds a run's checkpoint; "
                                  "pass --resume to continue it, or choose another directory")  # fmt: skip
        if resume and (problem := path_problem(self.path, "a checkpoint")):
            raise CheckpointError(f"--resume: {self.path} {problem}")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, settings: Mapping[str, object]) -> StepCheckpoints:
        return cls(args.checkpoint_dir, args.checkpoint_every, settings, resume=args.resume)

    @contextlib.contextmanager
    def held(self) -> Iterator[StepCheckpoints]:
        """While the run goes on: the directory is this run's alone."""
        if self.directory is None:
            yield self
            return
        with directory_lock(self.directory, f"--checkpoint-dir {self.directory}"):
            yield self

    def remaining(self, loop, max_steps: int) -> range:
        """The indices of the steps still to run up to ``max_steps``, after loading the checkpoint
        into ``loop`` when resuming (refused when it is of other settings or already that far)."""
        if self.resume:
            metadata = self.metadata = loop.load_checkpoint(self.path)
            recorded = json.loads(metadata.get("settings", "null"))
            if recorded != self.settings:
                differ = sorted(key for key in {**self.settings, **(recorded or {})}
                                if (recorded or {}).get(key) != self.settings.get(key))  # fmt: skip
                shown = ", ".join(f"{key} {(recorded or {}).get(key)!r} there, {self.settings.get(key)!r} now"
                                  for key in differ)  # fmt: skip
                raise CheckpointError(f"--resume: {self.path} is a run with other settings ({shown})")
            if loop.step_count >= max_steps:
                raise CheckpointError(f"--max-steps {max_steps}: the checkpoint is already at step {loop.step_count}")
            self.saved_step = loop.step_count
        return range(loop.step_count, max_steps)

    def steps(self, loop, max_steps: int) -> Iterator[int]:
        """The indices of the steps still to run (:meth:`remaining`), with the directory held;
        each one is checkpointed when due (:meth:`after_step`) once the loop's body has run it."""
        with self.held():
            for index in self.remaining(loop, max_steps):
                yield index
                self.after_step(loop, last=index == max_steps - 1)

    def after_step(self, loop, last: bool) -> None:
        """Checkpoint when ``every`` steps have passed since the start, or the run ends."""
        if self.path is not None and (last or loop.step_count % self.every == 0):
            self.save(loop, {"settings": json.dumps(self.settings)})

    def save(self, loop, metadata: Mapping[str, str]) -> None:
        """Write the newest checkpoint, keeping the earlier ones ``keep`` asks for."""
        if self.keep > 1 and self.saved_step is not None and self.saved_step != loop.step_count:
            earlier = self.directory / f"checkpoint-{self.saved_step}.safetensors"
            earlier.unlink(missing_ok=True)  # a killed run's, of the same step: the same state
            os.link(self.path, earlier)
        loop.save_checkpoint(self.path, metadata)
        self.saved_step = loop.step_count
        kept = sorted((path for path in self.directory.glob("checkpoint-*.safetensors") if _step_of(path) >= 0),
                      key=_step_of)  # fmt: skip
        for old in kept[: max(len(kept) - (self.keep - 1), 0)]:
            old.unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    """The step in a kept checkpoint's name (``checkpoint-<step>.safetensors``); -1 for another
    name, which is none of the run's and is left alone."""
    step = path.name[len("checkpoint-") : -len(".safetensors")]
    return int(step) if step.isdigit() else -1


#: a run without checkpoints
NO_CHECKPOINTS = StepCheckpoints(None, 1, {})
