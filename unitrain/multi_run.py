"""Runs of several models from a recipe: ``unitrain train gan.toml``, ``compare``, ``evaluate``.

The recipe, a :class:`~unitrain.multi_recipe.MultiRun` (its models, optimizers, phases and their
loss expressions), is read and checked in :mod:`unitrain.multi_recipe`; this module trains it.

The run trains its step over the training set's images (labels unused) in shuffled batches
(each epoch's order drawn from the seed and the epoch, so a resumed run sees the same batches;
the last partial batch is dropped), and checkpoints into ``--checkpoint-dir`` (one file,
replaced atomically, with the recipe, the step's whole state and the epoch's running sums:
:mod:`unitrain.step_checkpoints`) every ``--checkpoint-every`` steps (default: each epoch's end)
and at the end. ``--resume DIR`` continues it bit for bit on the same backend and machine.
``--metrics`` writes one JSON object per epoch (``<phase>_loss``: the phase's mean loss over the
epoch's steps), ``--plot`` the pictures of every epoch, ``--save DIR`` each model's weights as
``DIR/<model>.safetensors``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import distributed, expr, files, phase_losses, steps
from .multi_recipe import (  # the recipe's names, importable from here as before it had its own module
    FUNCTIONS,  # noqa: F401
    MAX_EXPRESSION_CHARS,  # noqa: F401
    MAX_EXPRESSION_DEPTH,  # noqa: F401
    PICTURES,
    MultiRun,
    is_multi_recipe,  # noqa: F401
    load_multi_recipe,  # noqa: F401
)
from .reading import Closed, Int, ListOf, MapOf, OneOf, check_json, short
from .run import RunError
from .step_checkpoints import CHECKPOINT_FILE, StepCheckpoints
from .step_shapes import check_run_shapes


def batch_order(seed: int, epoch: int, samples: int) -> np.ndarray:
    """The samples' order in ``epoch``: from the seed and the epoch alone, so a resume sees it too."""
    return np.random.default_rng([seed, epoch]).permutation(samples)


def forward(root: expr.Expr, loops: Mapping[str, Any], x, noise: Mapping) -> np.ndarray:
    """``root``'s value with the models in eval mode (``predict``), no gradient: pictures, evaluate."""
    return forward_all([root], loops, x, noise)[root.node]


def forward_all(roots: Sequence[expr.Expr], loops: Mapping[str, Any], x, noise: Mapping) -> dict:
    """Every node's value under ``roots`` (each computed once), as :func:`forward`'s."""
    values = {}
    for node in steps.postorder([root.node for root in roots]):
        op, children, static = steps.split(node)
        arguments = [values[child] for child in children]
        if op == "batch":
            values[node] = x
        elif op == "noise":
            values[node] = noise[node]
        elif op == "detach":
            values[node] = arguments[0]
        elif op == "call":
            values[node] = steps.predict_call(loops[static["model"]], arguments)
        elif op == "output":
            values[node] = arguments[0][static["index"]]
        elif op == "const":
            values[node] = np.float32(static["value"])
        else:
            values[node] = np.asarray(expr.NUMPY_OPS[op][0](*arguments, **static), np.float32)
    return values


class Pictures:
    """What ``--plot`` draws at each epoch's end: ``samples`` from noise drawn once (from the seed),
    ``reconstructions`` of the first test images; as 8-bit images in [0, 1] (un-normalised)."""

    def __init__(self, run: MultiRun, expressions: Mapping[str, expr.Expr], test):
        self.expressions = expressions
        self.count = (run.pictures or {}).get("count", PICTURES)
        norm = test.normalization
        self.mean, self.std = (
            (np.float32(0), np.float32(1))
            if norm is None
            else (
                np.asarray(norm.mean, np.float32).reshape(-1, 1, 1),
                np.asarray(norm.std, np.float32).reshape(-1, 1, 1),
            )
        )
        self.inputs = test.x[: self.count]
        leaves = steps.noise_leaves(e.node for e in expressions.values())
        self.noise = steps.NoiseStream(run.seed).draw(leaves, self.count, np.float32)

    def images(self, values) -> np.ndarray:
        return np.clip(np.asarray(values, np.float32) * self.std + self.mean, 0, 1)

    def draw(self, loops) -> dict[str, str]:
        """This epoch's pictures, each as base64 of 8-bit pixels (small enough for a checkpoint)."""
        drawn = {}
        for name, expression in self.expressions.items():
            pixels = np.round(self.images(forward(expression, loops, self.inputs, self.noise)) * 255).astype(np.uint8)
            drawn[name] = json.dumps([list(pixels.shape), base64.b64encode(pixels.tobytes()).decode()])
        return drawn

    def figure(self, labelled: Sequence[tuple[str, Mapping[str, str]]]):
        """One row per ``(label, drawn)``: an epoch's, or a backend's, samples and reconstructions
        (the test images first when reconstructed)."""
        from . import plot

        rows = []
        for label, drawn in labelled:
            row = [("test images", self.images(self.inputs))] if "reconstructions" in drawn else []
            for name, text in drawn.items():
                shape, data = json.loads(text)
                row.append((f"{label}: {name}", np.frombuffer(base64.b64decode(data), np.uint8)
                            .reshape(shape) / 255.0))  # fmt: skip
            rows.append(row)
        figure, axes = plot._figure(len(rows), len(rows[0]), width=3.0, height=0.6 + 3.0 * -(-self.count // 8) / 8)
        for axes_row, row in zip(axes, rows, strict=True):
            for ax, (title, images) in zip(axes_row, row, strict=True):
                ax.imshow(_grid(images), cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
        return figure


def _grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    images = images.reshape(len(images), *images.shape[-2:])
    height, width = images.shape[1:]
    rows = -(-len(images) // columns)
    grid = np.ones((rows * (height + 2) + 2, columns * (width + 2) + 2))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[2 + row * (height + 2) : 2 + row * (height + 2) + height,
             2 + column * (width + 2) : 2 + column * (width + 2) + width] = image  # fmt: skip
    return grid


class RunCheckpoints(StepCheckpoints):
    """:class:`~unitrain.step_checkpoints.StepCheckpoints` that also keep the recipe and the
    epoch's running record (losses summed so far, earlier epochs' records and pictures)."""

    def __init__(self, run: MultiRun, directory, every, *, resume=False, keep=1):
        super().__init__(directory, every, run.settings(), resume=resume, keep=keep)
        self.run, self.progress = run, {"sums": {}, "steps": 0, "records": [], "pictures": []}
        # what unitrain.checkpoint.stop_on_signals sets on Ctrl-C, SIGTERM or a launcher's SIGUSR1
        self.stop_requested, self.stop_signal = False, None

    def remaining(self, loop, max_steps):
        left = super().remaining(loop, max_steps)
        if self.resume:
            self.progress = _checked_progress(self.metadata.get("progress"), self.path)
        return left

    def after_step(self, loop, last, stopping=False):
        if self.path is not None and (last or stopping or loop.step_count % self.every == 0):
            self.save(
                loop,
                {
                    "settings": json.dumps(self.settings),
                    "multi_run": json.dumps(self.run.to_dict()),
                    "progress": json.dumps(self.progress),
                },
            )


class _Float:
    """A number, NaN and infinities included (a diverged loss is still a record)."""

    def describe(self) -> str:
        return "a number"

    def accepts(self, value) -> bool:
        return type(value) in (float, int)


_PROGRESS = Closed({"sums": MapOf(str, _Float()), "steps": Int(), "records": ListOf(MapOf(str, _Float()), 0, 10**6),
                    "pictures": ListOf(MapOf(OneOf(("samples", "reconstructions")), str), 0, 10**6)})  # fmt: skip


def _checked_progress(text, path) -> dict:
    """A checkpoint's record of the epoch in progress, refused (CheckpointError) unless it is the
    shape :class:`RunCheckpoints` writes, its pictures 8-bit images of their stated shapes."""
    from .checkpoint import CheckpointError

    try:
        progress = json.loads(text)
        check_json(progress, _PROGRESS, "progress")
        for drawn in progress["pictures"]:
            for value in drawn.values():
                shape, data = json.loads(value)
                if not (isinstance(shape, list) and 3 <= len(shape) <= 4):
                    raise ValueError(f"a picture of shape {short(shape)}; expected (N, C, H, W) or (N, H, W)")
                np.frombuffer(base64.b64decode(data, validate=True), np.uint8).reshape(shape)
    except (TypeError, ValueError, RecursionError) as error:  # not JSON, another shape, pixels that do not fit
        raise CheckpointError(f"--resume: {path} holds no multi-model run's progress: {str(error)[:200]}") from None
    return progress


def resumed_run(directory: Path) -> MultiRun:
    """The run a multi-model checkpoint directory records (RunError if it is not one)."""
    from .weights import WeightsError, load_safetensors

    path = Path(directory) / CHECKPOINT_FILE
    try:
        recorded = json.loads(load_safetensors(path)[1].get("multi_run", "null"))
        return MultiRun.from_dict(recorded)
    except (ValueError, RecursionError, WeightsError) as error:
        raise RunError(f"--resume {directory}: {path} records no multi-model run: {str(error)[:200]}") from None


@dataclass
class MultiJob:
    """A :class:`MultiRun` on a backend with its outputs: what ``unitrain train`` does with it."""

    run: MultiRun
    backend: str | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    save: Path | None = None
    metrics: Path | None = None
    plot: Path | None = None
    overwrite: bool = False
    #: a rank of a data-parallel job (its launcher started it): rank 0 alone writes and prints
    distributed: bool = False
    #: event files of each step's and epoch's losses (:class:`~unitrain.extensions.PhaseTensorBoardWriter`)
    tensorboard: Path | None = None
    #: how many of the newest checkpoints stay (:class:`~unitrain.step_checkpoints.StepCheckpoints`)
    keep: int = 3
    #: a progress bar on stderr (None: when stderr is a terminal)
    progress: bool | None = None

    def check(self) -> None:
        from . import plot
        from .extensions import check_tensorboard_dir

        files.check_output(self.metrics, "--metrics", self.overwrite)
        if self.tensorboard is not None:
            check_tensorboard_dir(self.tensorboard, "--tensorboard")
        files.check_output(self.plot, "--plot", self.overwrite)
        if self.plot is not None:
            plot.require_matplotlib("--plot")
            plot.check_figure_path("--plot", self.plot)
            if not self.run.pictures:
                raise RunError('--plot draws the recipe\'s [pictures]: add samples = "model(normal(...))" there')
        if self.save is not None:
            files.check_output_dir(self.save, "--save", self.overwrite)

    def train(self) -> tuple[steps.MultiModelLoop, list[dict], int]:
        """Train; returns the loop, the epochs' records and the exit status: 0, or 128 + N when
        signal N (Ctrl-C, SIGTERM) stopped the run at a step boundary, checkpointed into
        ``--checkpoint-dir`` if there is one."""
        from .checkpoint import stop_on_signals
        from .extensions import MetricsWriter
        from .registry import get_backend

        if not self.distributed:  # a launched job's ranks: rank 0 alone, below (the outputs are its own)
            self.check()
        step, expressions = self.run.build()
        train, test = self.run.datasets()
        backend = get_backend(self.backend).name
        try:
            loop = steps.MultiModelLoop(step, backend, seed=self.run.seed, distributed=self.distributed)
        except ValueError as error:  # a backend without the capability; data parallel: a loss no split computes
            raise RunError(str(error)) from None
        if self.distributed:
            distributed.record_rank(loop.rank)
        if loop.world_size > self.run.batch_size:
            raise RunError(f"batch_size {self.run.batch_size}: {loop.world_size} processes need a row each")
        # before anything is written; data parallel: on every rank alike (BatchNorm on each rank's rows)
        check_run_shapes(self.run, step, expressions, train.x.shape[1:], world_size=loop.world_size)
        per_epoch, total = len(train) // self.run.batch_size, self.run.total_steps(len(train))
        if total < 1:
            raise RunError(f"epochs {self.run.epochs}, max_steps {self.run.max_steps}: no step to train")
        every = self.checkpoint_every or per_epoch
        checkpoints = RunCheckpoints(self.run, self.checkpoint_dir, every, resume=self.resume, keep=self.keep)
        pictures = Pictures(self.run, expressions, test) if expressions else None
        lead = loop.rank == 0  # the one that writes: checkpoints, metrics, pictures, weights, lines
        if self.distributed and lead:
            self.check()
        writer = MetricsWriter(self.metrics, {"backend": backend}, self.overwrite) if self.metrics and lead else None
        extensions = self._extensions(per_epoch) if lead else []
        order, progress, stopped = None, checkpoints.progress, False

        def notice():
            if lead:
                print("\nunitrain: stopping at the next step boundary (Ctrl-C again to abort)", file=sys.stderr,
                      flush=True)  # fmt: skip

        with checkpoints.held() if lead else contextlib.nullcontext(), stop_on_signals(checkpoints, notice):
            # announced once a stop signal would checkpoint: from here, Ctrl-C stops at a step boundary
            if lead:
                print(f"unitrain: {', '.join(self.run.models)} on {backend}: {total} steps of {self.run.batch_size}"
                      f"{f' over {loop.world_size} processes' if loop.world_size > 1 else ''}, phases "
                      f"{', '.join(p['name'] for p in self.run.phases)}", flush=True)  # fmt: skip
            for index in checkpoints.remaining(loop, total):
                epoch, position = divmod(index, per_epoch)
                if order is None or position == 0:
                    order = batch_order(self.run.seed, epoch, len(train))
                    for extension in extensions:
                        extension.on_epoch_start(loop, epoch)
                rows = order[position * self.run.batch_size : (position + 1) * self.run.batch_size]
                losses = loop.step(train.x[rows])
                for extension in extensions:
                    extension.on_step_end(loop, position, losses)
                progress = checkpoints.progress
                for phase, value in losses.items():
                    progress["sums"][phase] = progress["sums"].get(phase, 0.0) + value
                progress["steps"] += 1
                ended = position == per_epoch - 1
                if ended or index == total - 1:  # a run ending mid-epoch reports it, and its checkpoint keeps the sums
                    means = {f"{phase}_loss": value / progress["steps"] for phase, value in progress["sums"].items()}
                    record, drawn = {"epoch": epoch + 1, "step": index + 1, **means}, []
                    if pictures is not None and lead:
                        drawn = [pictures.draw(loop.loops)]
                    if ended:
                        progress.update(sums={}, steps=0, records=[*progress["records"], record],
                                        pictures=[*progress["pictures"], *drawn])  # fmt: skip
                    for extension in [*extensions, *([writer] if writer is not None else [])]:
                        extension.on_epoch_end(loop, record)  # the progress bar first goes: the line replaces it
                    if lead:
                        print("  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                                        for key, value in record.items()), flush=True)  # fmt: skip
                # all ranks at once, on the flag read once. A signal whose handler runs during the vote, after
                # the flag was read, stops the next step: the vote's False must not overwrite what it set
                if stopped := loop.any_rank(checkpoints.stop_requested):
                    checkpoints.stop_requested = True
                if lead:
                    checkpoints.after_step(loop, last=index == total - 1, stopping=stopped)
                if stopped and index < total - 1:
                    break
        for extension in extensions:
            extension.finalize(loop)
        if writer is not None:
            writer.finalize(loop)
            print(f"unitrain: wrote the metrics to {writer.path}")
        if stopped and index < total - 1:
            if lead:
                where = (
                    f"checkpoint in {checkpoints.path}" if checkpoints.path else "no --checkpoint-dir, no checkpoint"
                )
                print(f"unitrain: stopped at step {loop.step_count}; {where}", file=sys.stderr, flush=True)
            return loop, progress["records"], 128 + (checkpoints.stop_signal or signal.SIGINT)
        partial = not ended
        placed = self._publish(loop, pictures, progress["pictures"] + (drawn if partial else [])) if lead else True
        if loop.world_size > 1:  # the ranks end together, after rank 0's files
            loop.any_rank(False)
        return loop, progress["records"] + ([record] if partial else []), 0 if placed else 2

    def _extensions(self, per_epoch: int) -> list:
        """Rank 0's progress bar and TensorBoard writer, as ``fit`` drives a one-model run's."""
        from .extensions import PhaseProgressBar, PhaseTensorBoardWriter

        chosen = []
        if sys.stderr.isatty() if self.progress is None else self.progress:
            chosen.append(PhaseProgressBar())
            chosen[-1].on_fit_start(None, {"steps_per_epoch": per_epoch})
        if self.tensorboard is not None:
            chosen.append(PhaseTensorBoardWriter(self.tensorboard))
        return chosen

    def _publish(self, loop, pictures, drawn: list) -> bool:
        """``--save`` and ``--plot``, as the one-model run's; whether each file went where asked
        (if not, stderr says where: :func:`unitrain.job.published`)."""
        from . import plot
        from .job import published

        placed = True
        if self.save is not None:  # every model's file or none: a full disk at the last one leaves no partial DIR
            with files.output_directory(self.save) as directory:
                weights = [(directory / f"{name}.safetensors", one.save_weights) for name, one in loop.loops.items()]
                finals = files.publish_together(weights, overwrite=self.overwrite)
            for name, (asked, _), final in zip(loop.loops, weights, finals, strict=True):
                placed = published("--save", asked, final, f"{name}'s weights", self.overwrite) and placed
                print(f"unitrain: saved {name}'s weights to {final}")
        if self.plot is not None and drawn:
            figure = pictures.figure([(f"epoch {number}", epoch) for number, epoch in enumerate(drawn, 1)])
            final = files.publish(self.plot, lambda staged: plot.save_figure(figure, staged, self.plot.suffix),
                                  overwrite=self.overwrite)  # fmt: skip
            placed = published("--plot", self.plot, final, "pictures", self.overwrite) and placed
            print(f"unitrain: drew the pictures of {len(drawn)} epoch{'s' * (len(drawn) > 1)} in {final}")
        return placed


def histories_of(run: MultiRun, backends: Sequence[str]) -> tuple[dict[str, list[dict[str, float]]], dict]:
    """Each backend's losses at every step, from the same weights, batches and noise (``compare``),
    and its pictures at the end (empty without ``[pictures]``)."""
    step, expressions = run.build()
    train, test = run.datasets()
    check_run_shapes(run, step, expressions, train.x.shape[1:])
    pictures = Pictures(run, expressions, test) if expressions else None
    per_epoch, total = len(train) // run.batch_size, run.total_steps(len(train))
    histories, drawn = {}, {}
    for backend in backends:
        loop = steps.MultiModelLoop(step, backend, seed=run.seed)
        history = []
        for index in range(total):
            epoch, position = divmod(index, per_epoch)
            rows = batch_order(run.seed, epoch, len(train))[position * run.batch_size :][: run.batch_size]
            history.append(loop.step(train.x[rows]))
        histories[backend] = history
        if pictures is not None:
            drawn[backend] = pictures.draw(loop.loops)
    return histories, (pictures, drawn)


def test_losses(run: MultiRun, loops: Mapping[str, Any], test, batch_size: int = 1000) -> dict[str, float]:
    """Each phase's loss over the test set with the models in eval mode, no update (noise from the
    run's seed): a mean over the batch averaged over the test set, a sum over it per test sample
    (the VAE's, as PyTorch's example prints it; :func:`batch_share`)."""
    step, _ = run.build()
    stream, sums = steps.NoiseStream(run.seed), {}
    for start in range(0, len(test), batch_size):
        x = test.x[start : start + batch_size]
        noise = stream.draw(step.noise, len(x), np.float32)
        for phase in step.phases:
            value = float(forward(expr.Expr(phase.loss), loops, x, noise))
            sums[phase.name] = sums.get(phase.name, 0.0) + value * batch_share(phase.loss, len(x))
    return {name: total / len(test) for name, total in sums.items()}


def batch_share(loss: steps.Node, samples: int) -> int:
    """A test batch's weight in a figure over the test set that is divided by its size: the batch's
    size for a loss that is a mean over the batch, 1 for a sum over it (the figure is then per
    sample); the size for a loss that is neither (:func:`unitrain.phase_losses.batch_weighting`)."""
    try:
        return 1 if phase_losses.batch_weighting(loss) == "sum" else samples
    except ValueError:
        return samples
