"""``fit`` extensions the command line uses, for Python runs too (``Run.train(extensions=[...])``):
duck-typed hooks as :meth:`~unitrain.TrainingLoop.fit` documents them, in the manner of Chainer's
trainer extensions."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

from . import files


class EpochReport:
    """One line per epoch: train loss (and accuracy), validation and test accuracy, average loss
    and (value targets) mean squared and absolute errors, samples/s."""

    def __init__(self, epochs: int, prefix: str = ""):
        self.epochs, self.prefix = epochs, prefix

    def on_epoch_end(self, loop, record):
        parts = [f"{self.prefix}epoch {record['epoch']}/{self.epochs}", f"train loss {record['train_loss']:.4f}"]
        if "train_accuracy" in record:
            parts.append(f"train accuracy {100 * record['train_accuracy']:.2f}%")
        for name in ("val", "test"):
            if f"{name}_loss" in record:
                if math.isfinite(accuracy := record[f"{name}_accuracy"]):  # NaN: targets that are not classes
                    parts.append(f"{name} accuracy {100 * accuracy:.2f}%")
                parts.append(f"{name} loss {record[f'{name}_loss']:.4f}")
                if f"{name}_mse" in record:  # value targets: mean squared and absolute errors
                    parts.append(f"{name} mse {record[f'{name}_mse']:.4g}  {name} mae {record[f'{name}_mae']:.4g}")
        parts.append(f"lr {record['lr']:.4g}")
        print("  ".join([*parts, f"{record['samples_per_sec']:.0f} samples/s"]), flush=True)


class ProgressBar:
    """tqdm's progress bar on stderr while an epoch runs, removed at the epoch's end (where
    :class:`EpochReport` prints its line). Reads the loss, a host sync, at most every ``interval``
    seconds."""

    interval = 0.2

    def on_fit_start(self, loop, plan):
        self.total, self.bar = plan["steps_per_epoch"], None

    def on_epoch_start(self, loop, epoch):
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=f"epoch {epoch + 1}", unit="step", leave=False, file=sys.stderr,
                        mininterval=self.interval, dynamic_ncols=True)  # fmt: skip
        self.loss_read = 0.0

    def on_step_end(self, loop, index, loss):
        now = time.monotonic()
        if now - self.loss_read >= self.interval:
            self.loss_read = now
            self.bar.set_postfix_str(f"loss {loop.to_float(loss):.4f}", refresh=False)
        self.bar.update(index + 1 - self.bar.n)  # a resumed epoch starts at its batch, not at 0

    def on_epoch_end(self, loop, record):
        self.bar.close()

    def finalize(self, loop):
        if self.bar is not None:
            self.bar.close()


class MetricsWriter:
    """JSON Lines, one object per epoch, written through as each epoch ends. Written where asked, or
    beside it when something appeared there since start-up (``path`` says where, see
    :func:`files.create_output`). A line that cannot be written whole (a full disk) is cut off
    again, and a file left with no line is removed: a rerun is not refused by an empty file."""

    def __init__(self, path: Path, fields: dict, overwrite: bool = False):
        self.file, self.path = files.create_output(path, overwrite=overwrite)
        self.fields, self.size = fields, 0
        # a run that raises may not call finalize: the file is closed, and removed if no line was
        # written, when the writer goes (at the latest when the interpreter exits)
        self._abandoned = weakref.finalize(self, _close_keeping_lines, self.file, self.path)

    def on_epoch_end(self, loop, record):
        # JSON has no NaN: an accuracy is NaN where the targets are not classes (--loss mse ...), left
        # out; any other value that is not finite is written as null
        known = {key: value for key, value in record.items() if not (key.endswith("_accuracy") and value != value)}
        finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in {**self.fields, **known}.items()}  # fmt: skip
        line = (json.dumps(finite, allow_nan=False) + "\n").encode()
        try:
            with files.naming(self.path):
                files.write_all(self.file, line)
        except OSError:
            files.cut_back(self.file, self.path, self.size)
            raise
        self.size += len(line)

    def finalize(self, loop):
        self._abandoned.detach()
        with files.naming(self.path):
            self.file.close()


def _close_keeping_lines(file, path: Path) -> None:
    if not file.closed:
        files.cut_back(file, path, os.fstat(file.fileno()).st_size)


def check_tensorboard_dir(path: Path, flag: str, subfolders: Iterable[str] = ()) -> None:
    """Before a run: tensorboardX is installed, and ``path`` is a writable directory, or nothing yet
    (created with its missing parents, as TensorBoard loggers do, below a writable directory), as is
    each ``path/<subfolder>`` (``compare``: one per backend). Event files get names of their own,
    so a directory holding other runs is fine: nothing in it is replaced.
    :class:`files.OutputError` names ``flag`` and what is wrong."""
    import importlib.util

    if importlib.util.find_spec("tensorboardX") is None:
        raise files.OutputError(f"{flag} needs tensorboardX: pip install 'unitrain[tensorboard]'")
    path = Path(path)
    if files.describe(path) == "nothing":
        existing = next(parent for parent in path.parents if files.describe(parent) != "nothing")
        if (kind := files.describe(existing)) != "a directory":
            raise files.OutputError(f"{flag} {path}: {existing} is {kind}, expected a directory")
        if not os.access(existing, os.W_OK):
            raise files.OutputError(f"{flag} {path}: directory {existing} is not writable")
        return  # the subfolders will be new too
    for directory in [path, *(path / name for name in subfolders)]:
        kind = files.describe(directory)
        if kind not in ("nothing", "a directory"):
            raise files.OutputError(f"{flag} {directory} is {kind}, expected a directory")
        if kind == "a directory" and not os.access(directory, os.W_OK):
            raise files.OutputError(f"{flag} {directory} is not writable")


class TensorBoardWriter:
    """TensorBoard event files in ``log_dir`` (created if missing; event files get names of their
    own, so nothing there is replaced), written with tensorboardX's ``SummaryWriter``:

    - every step: ``step/loss`` and ``step/lr`` (the lr that step used), at the loop's optimizer
      step count, so a resumed run continues its curves;
    - every epoch: each number of :meth:`~unitrain.TrainingLoop.fit`'s record as ``epoch/<key>``
      (``epoch/train_loss``, ``epoch/train_accuracy``, ``epoch/test_accuracy``, ``epoch/lr``,
      ``epoch/samples_per_sec``, ...), at the epoch number.

    Reading each step's loss is one host sync per step. ``tensorboard --logdir DIR`` shows them;
    ``unitrain train --tensorboard DIR`` and ``compare --tensorboard DIR`` (one run per backend,
    ``DIR/<backend>``) use this class."""

    def __init__(self, log_dir: str | Path):
        check_tensorboard_dir(log_dir, "TensorBoardWriter")
        from tensorboardX import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(logdir=str(self.log_dir))
        self.lr = None

    def on_epoch_start(self, loop, epoch):
        self.lr = loop.lr

    def on_step_end(self, loop, index, loss):
        # fit steps the lr schedule before this hook: loop.lr is already the next step's
        self.writer.add_scalar("step/loss", loop.to_float(loss), loop.step_count)
        self.writer.add_scalar("step/lr", self.lr, loop.step_count)
        self.lr = loop.lr

    def on_epoch_end(self, loop, record):
        for key, value in record.items():
            if key not in ("epoch", "steps", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.writer.flush()

    def finalize(self, loop):
        self.writer.close()


class PhaseProgressBar(ProgressBar):
    """:class:`ProgressBar` for a run of several models (:mod:`unitrain.multi_run`): each step's
    losses, one per phase, arrive as numbers already."""

    def on_step_end(self, loop, index, losses):
        now = time.monotonic()
        if now - self.loss_read >= self.interval:
            self.loss_read = now
            self.bar.set_postfix_str("  ".join(f"{phase} {value:.4f}" for phase, value in losses.items()),
                                     refresh=False)  # fmt: skip
        self.bar.update(index + 1 - self.bar.n)


class PhaseTensorBoardWriter(TensorBoardWriter):
    """:class:`TensorBoardWriter` for a run of several models: every step ``step/<phase>_loss`` at
    the step count (a resumed run continues its curves), every epoch its record's numbers as
    ``epoch/<key>`` (``epoch/<phase>_loss``: the phase's mean over the epoch)."""

    def on_epoch_start(self, loop, epoch):
        pass  # no learning rate: each phase's optimizer has its own

    def on_step_end(self, loop, index, losses):
        self.log_steps([losses], loop.step_count)

    def log_steps(self, history, first: int = 1) -> None:
        """Each step's ``{phase: loss}`` of ``history``, the first at step ``first`` (``compare``)."""
        for step, losses in enumerate(history, first):
            for phase, value in losses.items():
                self.writer.add_scalar(f"step/{phase}_loss", value, step)
