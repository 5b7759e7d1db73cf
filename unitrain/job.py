"""A training job: a :class:`~unitrain.run.Run` on a backend with its checkpoints, its output
files and its processes, exactly as ``unitrain train`` runs it (the command only parses its flags
into a :class:`Job`), for Python users with the same guarantees::

    from unitrain import Job, Run

    outcome = Job(Run(model="cnn", epochs=2), "torch", checkpoint_dir="ckpt", save="cnn.safetensors").train()
    # killed midway? continue the run its newest checkpoint records, on any backend:
    outcome = Job(resume="ckpt", backend="numpy").train()
    # data-parallel: the backend's launcher (torchrun, mpiexec, msrun) starts two processes
    outcome = Job(Run(model="cnn"), "torch", nproc=2, save="cnn.safetensors").train()

What the job guarantees: every setting is checked before the framework is imported and before
any training (outputs can be created and replace nothing they should not, nor a file the run
reads; the checkpoint directory is writable and holds no other run's checkpoints); a resumed run
is the one its checkpoint records (only where it ends may change: ``epochs``, ``max_steps``) at a
position the run reaches on its data; one job writes into a checkpoint directory at a time;
Ctrl-C, SIGTERM and a launcher's stop signal checkpoint at the next step boundary; outputs are
published without replacing what appeared meanwhile (see :func:`unitrain.files.publish`). A
setting that cannot work raises :class:`JobError` (or the reading modules' own errors) in one
line that names it by its command-line flag (``--checkpoint-dir``, ``--resume``, ...), which is
what the command prints. The job prints what the command prints: the run, one line per epoch,
where outputs went.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json as json_module
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import distributed, files, plot, registry
from .checkpoint import (
    WEIGHTS,
    Checkpoint,
    Checkpointer,
    Diverged,
    Interrupted,
    checkpoint_paths,
    load_checkpoint,
    stop_on_signals,
)
from .extensions import EpochReport, MetricsWriter, ProgressBar, TensorBoardWriter, check_tensorboard_dir
from .run import DataSpec, Run, RunError


class JobError(ValueError):
    """A job that cannot work as asked: one line naming the setting by its command-line flag."""


#: the :class:`~unitrain.run.Run` fields that command-line flags set one by one, in the order a
#: resumed run reports the first that differs (then the data's fields, the optimizer, early stopping)
RUN_FLAGS = ("model", "loss", "lr_schedule", "clip_grad_norm", "clip_grad_value", "batch_size", "epochs",
             "max_steps", "shuffle", "seed", "init_weights", "frozen", "param_groups",
             "accumulate_grad_batches", "drop_last", "test_batch_size", "dialect", "init", "compile")  # fmt: skip
#: what a resumed run may change: where it ends, and whether its steps are compiled (the same steps)
_RESUME_MAY_CHANGE = ("epochs", "max_steps", "compile")


def resumable_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at ``path`` (:func:`~unitrain.checkpoint.load_checkpoint`: a step folder, or
    a directory's newest), refused if its run has finished."""
    checkpoint = load_checkpoint(path)
    if checkpoint.finished:
        raise JobError(
            f"--resume {path}: the run finished at step {checkpoint.step}, there is nothing to resume; start a "
            f"new run from its weights with --init-weights {checkpoint.path / WEIGHTS}"
        )
    return checkpoint


@dataclass
class Outcome:
    """What :meth:`Job.train` did. ``status`` is the command's exit status: 0 done; 1 the loss
    diverged (NaN/Inf; the last good checkpoint is kept); 2 an output went beside the path asked
    for (something appeared there meanwhile; ``outputs`` says where); 128 + N stopped by signal N
    after a checkpoint (``checkpoint``), or a launched job's rank killed by it."""

    status: int
    #: the trained loop (rank 0's in a data-parallel process); None in the process that launched workers
    loop: Any = None
    #: fit's records, one per epoch (None where ``loop`` is)
    history: list[dict[str, float]] | None = None
    #: where each output went: ``{"save": path, "metrics": path, "plot": path}``, those written
    outputs: dict[str, Path] = field(default_factory=dict)
    #: the newest checkpoint the run wrote (or resumed from)
    checkpoint: Path | None = None
    #: :meth:`Job.compare`'s: one result per backend (see :func:`~unitrain.compare.compare_backends`)
    results: list[dict[str, Any]] | None = None


@dataclass
class Job:
    """``run`` on ``backend`` (default: ``$UNITRAIN_BACKEND`` or numpy), as ``unitrain train``
    runs it; see the module's documentation for what it guarantees. Each field is the flag of the
    same name:

    - ``resume``: a checkpoint folder or directory (its newest checkpoint) to continue; ``run``
      is then the run it records (None) or that run with another ``epochs`` / ``max_steps``, and
      ``backend`` and ``checkpoint_dir`` default to the checkpoint's. ``checkpoint``: that
      checkpoint, when already loaded (:func:`resumable_checkpoint`).
    - ``checkpoint_dir``: checkpoints at each epoch's end, every ``checkpoint_every`` steps and on a
      stop signal, the newest ``keep`` kept; without one, a stop signal checkpoints into a new
      ``unitrain-interrupted-<time>`` folder of the current directory.
    - ``save`` (the weights, safetensors), ``metrics`` (one JSON object per epoch), ``plot`` (the
      curves, by its suffix), ``tensorboard`` (event files); ``overwrite`` lets them replace a
      regular file. ``recipe``: the file ``run`` was read from, which no output may replace.
    - ``nproc``: data-parallel over that many processes, started by the backend's launcher on a
      free port or ``master_port``; inside a launched process, the launcher's world size.
    - ``threads``: the kernels' CPU threads (default every core this process may use; a
      launched rank, its share); ``progress``: a progress bar on stderr (None: when it is a terminal).
    - ``extensions``: more :meth:`~unitrain.TrainingLoop.fit` extensions (rank 0's loop; not with
      ``nproc`` > 1 from here, whose ranks are other processes).

    :meth:`train` runs it as ``unitrain train``; :meth:`compare` runs it on several backends as
    ``unitrain compare``.
    """

    run: Run | None = None
    backend: str | None = None
    resume: str | os.PathLike | None = None
    checkpoint: Checkpoint | None = None
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = None
    keep: int = 3
    save: str | os.PathLike | None = None
    metrics: str | os.PathLike | None = None
    plot: str | os.PathLike | None = None
    tensorboard: str | os.PathLike | None = None
    overwrite: bool = False
    nproc: int | None = None
    master_port: int | None = None
    threads: int | None = None
    progress: bool | None = None
    recipe: str | os.PathLike | None = None
    extensions: Sequence[Any] = ()

    def __post_init__(self):
        for name in ("checkpoint_dir", "save", "metrics", "plot", "tensorboard", "recipe"):
            if (value := getattr(self, name)) is not None:
                setattr(self, name, Path(value))
        if self.resume is None:
            if self.checkpoint is not None:
                raise JobError("checkpoint: pass the resume path it was loaded from too")
            self.run = Run() if self.run is None else self.run
            return
        if self.checkpoint is None:
            self.checkpoint = resumable_checkpoint(self.resume)
        self.run = self._resumed_run(self.run)
        self.backend = self.backend or self.checkpoint.backend
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.checkpoint.path.parent

    def _resumed_run(self, run: Run | None) -> Run:
        """The run the checkpoint records; ``run``, if given, may end elsewhere, and differ in nothing else."""
        recorded = self.checkpoint.run_spec()
        run = recorded if run is None else run
        changed = [(name, getattr(run, name), getattr(recorded, name)) for name in RUN_FLAGS
                   if name not in _RESUME_MAY_CHANGE and getattr(run, name) != getattr(recorded, name)]  # fmt: skip
        changed += [(field.name, getattr(run.data, field.name), getattr(recorded.data, field.name))
                    for field in dataclasses.fields(DataSpec)
                    if getattr(run.data, field.name) != getattr(recorded.data, field.name)]  # fmt: skip
        others = [field.name for field in dataclasses.fields(Run) if field.name not in (*RUN_FLAGS, "data")]
        changed += [(name, getattr(run, name), getattr(recorded, name)) for name in others
                    if getattr(run, name) != getattr(recorded, name)]  # fmt: skip
        if changed:
            name, value, kept = changed[0]
            raise JobError(f"--{name.replace('_', '-')} {value} differs from the resumed run's {kept}; a resumed "
                           "run keeps its settings")  # fmt: skip
        try:  # a package.module:function run imports its model again, as it did when it started
            run.model_spec()
        except RunError as error:
            raise JobError(f"--resume {self.resume}: {error}") from None
        return run

    def check(self) -> None:
        """Everything that can be checked before the framework is imported and any data is read:
        the run's parameters and initial weights, the outputs, the checkpoint directory."""
        run = self.run
        run.check_parameters()
        # a resumed run starts from its checkpoint
        self._initial = run.initial_weights() if self.checkpoint is None else None
        for flag, path in self._outputs().items():
            files.check_output(path, flag, self.overwrite, self._reads())
        if self.tensorboard is not None:
            check_tensorboard_dir(self.tensorboard, "--tensorboard")
        outputs = {flag: path.resolve() for flag, path in self._outputs().items()}
        if len(set(outputs.values())) < len(outputs):
            raise JobError(f"{' and '.join(outputs)} must name different files")
        if self.plot is not None:
            plot.require_matplotlib("--plot")
            plot.check_figure_path("--plot", self.plot)
        self._check_checkpoint_dir()
        if self.extensions and (self.nproc or 1) > 1:
            raise JobError(f"extensions: a job of {self.nproc} processes trains in processes of its launcher; "
                           "use --metrics or --tensorboard")  # fmt: skip

    def _reads(self) -> list[tuple[str, object]]:
        """The files the job reads, and what they are (for :func:`files.check_output`)."""
        run = self.run
        return [
            ("the recipe", self.recipe),
            ("the dataset", run.data.dataset),
            ("the initial weights", run.init_weights),
        ]

    def _outputs(self) -> dict[str, Path]:
        return {flag: path for flag, path in (("--save", self.save), ("--metrics", self.metrics),
                                              ("--plot", self.plot)) if path is not None}  # fmt: skip

    def _check_checkpoint_dir(self) -> None:
        """``checkpoint_dir`` must be creatable and writable, and hold no other run's checkpoints."""
        directory, resume = self.checkpoint_dir, self.checkpoint
        if directory is None:
            if self.checkpoint_every is not None:
                raise JobError("--checkpoint-every needs --checkpoint-dir DIR")
            return
        if directory.exists() and not directory.is_dir():
            raise JobError(f"--checkpoint-dir {directory} is a file, expected a directory")
        resumed_here = resume is not None and directory.resolve() == resume.path.parent.resolve()
        existing = checkpoint_paths(directory) if directory.is_dir() else []
        if existing and not resumed_here:
            raise JobError(
                f"--checkpoint-dir {directory} already holds a run's checkpoints; continue it with --resume "
                f"{directory} or choose another directory"
            )
        if resumed_here and existing and existing[-1].resolve() != resume.path.resolve():
            # continuing there would interleave two futures of the run (and keep= delete the newer one)
            raise JobError(
                f"--resume {resume.path} is not the newest checkpoint in {directory} ({existing[-1].name} is); "
                "to branch from it, pass a new --checkpoint-dir DIR"
            )
        nearest = next(path for path in (directory.absolute(), *directory.absolute().parents) if path.exists())
        try:
            if not nearest.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{nearest} is not a directory")
            with tempfile.TemporaryFile(dir=nearest):  # what os.access cannot tell: read-only mounts, root
                pass
        except OSError as error:
            raise JobError(f"--checkpoint-dir {directory} is not writable: {error.strerror}") from None

    def train(self) -> Outcome:
        """Check everything (:meth:`check`), then train: in this process, in this rank of a
        launched job, or by starting ``nproc`` processes with the backend's launcher."""
        self.check()
        run = self.run
        spec = registry.usable_spec(registry.backend_name(self.backend))
        world_size = distributed.launched_world_size(spec.launcher)  # None: not started by the engine's launcher
        show_progress = sys.stderr.isatty() if self.progress is None else self.progress
        if world_size is None and (self.nproc or 1) > 1:
            return self._launch(spec, show_progress)
        if world_size is not None:
            distributed.die_with_parent()  # the launcher's: no rank outlives the job
            if self.nproc is not None and self.nproc != world_size:
                raise JobError(f"--nproc {self.nproc}, but {spec.launcher} started {world_size} processes")
            _check_world(run, world_size)
        with ExitStack() as held:
            # one run writes into a checkpoint directory at a time: held from here by one process, from
            # rank 0's loop on (its rank is known then) by a data-parallel run
            directory = self.checkpoint_dir
            hold = () if directory is None else (directory, f"--checkpoint-dir {directory}")
            if hold and world_size is None:
                held.enter_context(files.directory_lock(*hold))
            data = run.datasets()
            if self.checkpoint is not None:
                self._check_resume_position(len(data[0]))
            adapter = registry.load_adapter(spec.target)
            # one process: every core; a data-parallel rank: its share (what the launcher's OMP_NUM_THREADS says)
            adapter.set_threads(self.threads or distributed.threads_per_rank(world_size or 1))
            loop = run.compiled(adapter(run.model_spec(), distributed=world_size is not None, **run.loop_options()))
            if world_size is not None:
                distributed.record_rank(loop.rank)
            if hold and loop.rank == 0:
                held.enter_context(files.directory_lock(*hold))
            outcome = self._fit(loop, data, show_progress)
            if loop.world_size > 1:  # the ranks end together: after rank 0's files, and as engines' teardowns need
                loop.any_rank(False)
        return outcome

    def _check_resume_position(self, num_samples: int) -> None:
        """The checkpoint's position must be one the run reaches on its training data, before its end."""
        run, checkpoint = self.run, self.checkpoint
        checkpoint.check_position(num_samples, run.batch_size, run.accumulate_grad_batches, run.drop_last)
        if checkpoint.epoch >= run.epochs or (run.max_steps is not None and checkpoint.step >= run.max_steps):
            raise JobError(f"--resume {self.resume}: the checkpoint at step {checkpoint.step} is already past the "
                           f"run's end (--epochs {run.epochs}, --max-steps {run.max_steps})")  # fmt: skip

    def _launch(self, spec, show_progress: bool) -> Outcome:
        """Start ``nproc`` workers with the backend's launcher, each running ``unitrain train`` on
        this job (:meth:`worker_command`), and wait for them."""
        _check_world(self.run, self.nproc)
        distributed.check_engine(spec.name, spec.launcher)
        if self.master_port is not None:
            distributed.check_port(self.master_port)
        if self.checkpoint_dir is not None:  # refused now if another run holds it (rank 0 holds it for the run)
            with files.directory_lock(self.checkpoint_dir, f"--checkpoint-dir {self.checkpoint_dir}"):
                pass
        with tempfile.TemporaryDirectory(prefix="unitrain-job-") as folder:
            recipe = Path(folder) / "run.toml"
            recipe.write_text(self.run.to_toml(), encoding="utf-8")
            # the workers' stderr is a pipe (the failure report is read from it): the progress bar is decided here
            argv = self.worker_command(spec.name, recipe, show_progress)
            status = distributed.run(spec.launcher, self.nproc, argv, self.master_port)
        return Outcome(status)

    def worker_command(self, backend: str, recipe: Path, progress: bool) -> list[str]:
        """The ``unitrain`` command line each launched worker runs: this job on ``backend``, its run
        read from ``recipe`` (or, resumed, its checkpoint), without ``--nproc``: a worker learns the
        world size from its launcher (and torchrun's own parser would take ``--nproc`` for an
        ambiguous abbreviation of its ``--nproc-per-node``)."""
        run = self.run
        if self.checkpoint is not None and run.max_steps is None and self.checkpoint.run_spec().max_steps is not None:
            raise JobError("max_steps: a resumed run launched over several processes ends at a step count; give one")
        if self.checkpoint is not None:
            argv = ["train", f"--resume={self.resume}", f"--epochs={run.epochs}"]
            argv += [] if run.max_steps is None else [f"--max-steps={run.max_steps}"]
        else:
            argv = ["train", str(recipe)]
        settings = (("--backend", backend), ("--checkpoint-dir", self.checkpoint_dir),
                    ("--checkpoint-every", self.checkpoint_every), ("--keep", self.keep), ("--save", self.save),
                    ("--metrics", self.metrics), ("--plot", self.plot), ("--tensorboard", self.tensorboard),
                    ("--threads", self.threads))  # fmt: skip
        argv += [f"{flag}={value}" for flag, value in settings if value is not None]  # "=": a value may start with -
        return [*argv, *(["--overwrite"] if self.overwrite else []), "--progress" if progress else "--no-progress"]

    def _fit(self, loop, data, show_progress: bool) -> Outcome:
        """The run on ``loop``, once everything it needs is checked and loaded (``data``: train,
        validation or None, test)."""
        run, resume = self.run, self.checkpoint
        train_data, val_data, test_data = data
        lead = loop.rank == 0  # the other ranks train in silence: metrics, progress and files come from rank 0
        if self._initial is not None:
            loop.load_state_dict(self._initial, source=run.init_weights)
        if resume is not None:
            resume.restore(loop)
        if lead:
            _announce(run, loop, resume, data)
        # checkpoints, NaN/Inf detection and Ctrl-C; before EpochReport, whose train loss it completes after a resume
        checkpointer = Checkpointer(
            self.checkpoint_dir if lead else None,
            every=self.checkpoint_every,
            keep=self.keep,
            max_steps=run.max_steps,
            run=run,
            normalization=train_data.normalization.to_json(),
            resume=resume,
            interrupt_directory=_interrupt_directory() if self.checkpoint_dir is None and lead else None,
        )
        extensions = [checkpointer]
        placed, outputs = True, {}  # placed: every output went where the user asked
        if lead:
            extensions.append(EpochReport(run.epochs))
            if show_progress:
                extensions.insert(0, ProgressBar())
            if self.metrics is not None:
                fields = {"backend": loop.name, "model": run.model, "dataset": run.data.dataset,
                          "normalization": train_data.normalization.to_json(),
                          "world_size": loop.world_size}  # fmt: skip
                metrics = MetricsWriter(self.metrics, fields, self.overwrite)
                placed = published("--metrics", self.metrics, metrics.path, "metrics", self.overwrite)
                outputs["metrics"] = metrics.path
                extensions.append(metrics)
            if self.tensorboard is not None:
                extensions.append(TensorBoardWriter(self.tensorboard))
            extensions += self.extensions

        def notice():
            if lead:
                print("\nunitrain: stopping at the next step boundary (Ctrl-C again to abort)", file=sys.stderr,
                      flush=True)  # fmt: skip

        def ended(status: int, history=None) -> Outcome:
            return Outcome(status, loop, history, outputs, checkpointer.last_saved)

        try:
            with stop_on_signals(checkpointer, notice):
                history = loop.fit(
                    train_data,
                    **run.fit_options(),
                    eval_data=test_data,
                    val_data=val_data,
                    extensions=extensions,
                    start_epoch=resume.epoch if resume is not None else 0,
                    start_batch=resume.batch if resume is not None else 0,
                )
                checkpointer.finish(loop)
        except Interrupted:
            if not lead:
                return ended(128 + checkpointer.stop_signal)
            if checkpointer.directory is None:
                how = "no checkpoint written: the current directory is not writable (use --checkpoint-dir DIR)"
            else:
                how = (f"checkpoint {checkpointer.last_saved}; resume with: unitrain train --resume "
                       f"{checkpointer.directory}")  # fmt: skip
            print(f"unitrain: interrupted at step {loop.step_count}; {how}", file=sys.stderr)
            return ended(128 + checkpointer.stop_signal)
        except Diverged as error:
            kept = f"; the last good checkpoint is {checkpointer.last_saved}" if checkpointer.last_saved else ""
            if lead:
                print(f"unitrain: error: training diverged: {error}; stopped{kept}", file=sys.stderr)
            return ended(1)
        if not lead:
            return ended(0, history)
        if (stopping := loop.early_stopping) is not None and stopping.best is not None:
            kept = "loaded" if stopping.spec.restore_best_weights else "kept in the checkpoints"
            how = f"stopped early after epoch {history[-1]['epoch']}: " if loop.stop_training else ""
            print(f"unitrain: {how}the best {stopping.spec.monitor} {stopping.best:.4f} was epoch "
                  f"{stopping.best_epoch}'s; its weights are {kept}")  # fmt: skip
        if not history:  # epochs 0 or max_steps 0: still report the model as it is
            metrics = loop.evaluate(test_data)
            print(f"no training step taken  test accuracy {100 * metrics['accuracy']:.2f}%  test loss "
                  f"{metrics['loss']:.4f}")  # fmt: skip
        if self.save is not None:
            outputs["save"] = files.publish(self.save, loop.save_weights, overwrite=self.overwrite)
            placed = published("--save", self.save, outputs["save"], "weights", self.overwrite) and placed
            print(f"unitrain: saved weights to {outputs['save']}")
        if self.plot is not None and not history:
            print(f"unitrain: no epoch was trained, so there is nothing to draw; --plot {self.plot} not written")
        elif self.plot is not None:
            figure = plot.curves_figure([(f"{loop.name} {run.model}", history)])
            suffix = self.plot.suffix
            outputs["plot"] = files.publish(self.plot, lambda staged: plot.save_figure(figure, staged, suffix),
                                            overwrite=self.overwrite)  # fmt: skip
            placed = published("--plot", self.plot, outputs["plot"], "figure", self.overwrite) and placed
            print(f"unitrain: drew the curves in {outputs['plot']}")
        return ended(0 if placed else 2, history)

    def compare(
        self,
        backends: Sequence[str],
        *,
        native: bool = False,
        sample_every: int | None = None,
        json: str | os.PathLike | None = None,
        report: str | os.PathLike | None = None,
    ) -> Outcome:
        """The run on each of ``backends`` in turn, as ``unitrain compare`` does: checked first
        (the backends are installed; ``json``, ``report``, ``tensorboard`` can be written), then
        :func:`~unitrain.compare.compare_backends` (``native``, ``sample_every``: its arguments) with
        each backend's epoch lines and ``tensorboard``/<backend> event files; the table printed, the
        results published as JSON (``json``) and a web page (``report``, a directory). Status 2 if
        a file went beside the path asked for. Checkpoints, ``save``/``metrics``/``plot`` and
        ``nproc`` are ``train``'s."""
        from .compare import compare_backends, format_report

        if given := [name for name in ("resume", "checkpoint_dir", "save", "metrics", "plot", "nproc")
                     if getattr(self, name) is not None]:  # fmt: skip
            raise JobError(f"{given[0]}: compare trains each backend once, in this process; that is train's")
        run = self.run
        for name in backends:
            registry.usable_spec(name)
        run.initial_weights()  # checked now, before any training
        json, report = (None if path is None else Path(path) for path in (json, report))
        files.check_output(json, "--json", self.overwrite, self._reads())
        files.check_output_dir(report, "--report", self.overwrite)
        if self.tensorboard is not None:
            check_tensorboard_dir(self.tensorboard, "--tensorboard", backends)
        if report is not None:
            plot.require_matplotlib("--report")
        if native:
            from .native import FRAMEWORKS, check_run, optimizer_problem

            try:
                check_run(run)
            except ValueError as error:
                raise JobError(f"--native: {error}") from None
            for name in [name for name in backends if name in FRAMEWORKS]:
                if problem := optimizer_problem(name, run.optimizer):
                    print(f"unitrain compare: no {name} native loop: {problem}", flush=True)
        data = run.datasets()
        print(
            f"unitrain compare: {', '.join(backends)}; model {run.model}, {run.loss} loss, {run.optimizer}, "
            f"batch {run.batch_size}, seed {run.seed}: the same initial weights and batches on every backend",
            flush=True,
        )
        show_progress = sys.stderr.isatty() if self.progress is None else self.progress

        def extensions(backend):
            chosen = [ProgressBar()] if show_progress else []
            chosen.append(EpochReport(run.epochs, prefix=f"{backend}: "))
            if self.tensorboard is not None:
                chosen.append(TensorBoardWriter(self.tensorboard / backend))
            return [*chosen, *self.extensions]

        threads = self.threads or distributed.threads_per_rank(1)
        results = compare_backends(backends, run, data=data, extensions=extensions, threads=threads,
                                   sample_every=sample_every, native=native)  # fmt: skip
        table = format_report(results, len(data[2]))
        print()
        print(table)
        placed = True
        if json is not None:
            placed = write_json(json, {"run": run.to_dict(), "threads": threads, "results": results}, "report",
                                self.overwrite)  # fmt: skip
        if report is not None:
            placed = self._write_report(report, results, table, threads) and placed
        return Outcome(0 if placed else 2, results=results)

    def _write_report(self, directory: Path, results, table: str, threads: int) -> bool:
        """``compare``'s web page and its figures; says where files went that could not go
        where asked (see :func:`files.publish`)."""
        from .report import write_report

        run = self.run
        backends = [result for result in results if not result.get("native")]
        recorded = run.to_dict()
        settings = {
            "backends": ", ".join(f"{r['backend']} {r['version'] or ''}".strip() for r in backends),
            **{key.replace("_", " "): value for key, value in recorded.items() if key not in ("data", "optimizer")},
            **{key.replace("_", " "): value for key, value in recorded["data"].items()},
            "optimizer": str(run.optimizer),
            "threads": threads,
            "steps": results[0]["steps"],
            "initial weights": run.init_weights or f"init_weights(model, seed={run.seed})",
            "machine": f"{platform.machine()}, {distributed.threads_per_rank(1)} cores; "
            f"{platform.platform(terse=True)}",
            "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        native = " and their native loops" if len(backends) < len(results) else ""
        title = f"unitrain compare: {', '.join(r['backend'] for r in backends)}{native} on {run.model}"
        index, sidestepped = write_report(directory, results, title=title, settings=settings, table=table,
                                          model=run.model_spec(), overwrite=self.overwrite)  # fmt: skip
        for asked, final in sidestepped:
            published("--report", asked, final, "file", self.overwrite)
        print(f"unitrain: report written to {index}")
        return not sidestepped


def write_json(path: Path, report, what: str, overwrite: bool) -> bool:
    """``--json``: ``report`` as JSON, published without replacing a file that appeared meanwhile;
    whether it went to ``path`` (see :func:`published`)."""
    text = json_module.dumps(report, indent=1) + "\n"
    final = files.publish(path, lambda staged: staged.write_text(text, encoding="utf-8"), overwrite=overwrite)
    return published("--json", path, final, what, overwrite)


def published(flag: str, path: Path, final: Path, what: str, overwrite: bool) -> bool:
    """Whether ``what`` went to ``path`` as asked; if not (see :func:`files.publish`), say where on stderr."""
    if final == path:
        return True
    found = f"is {files.describe(path)}, never replaced" if overwrite else "appeared during the run"
    print(f"unitrain: {flag} {path} {found}; kept it and wrote the {what} to {final} instead", file=sys.stderr)
    return False


def _check_world(run: Run, world_size: int) -> None:
    """Every rank needs rows of every full global batch."""
    if world_size > run.batch_size:
        raise JobError(f"--nproc {world_size} is more processes than the global batch size {run.batch_size}; "
                       f"use at most {run.batch_size}")  # fmt: skip


def _announce(run: Run, loop, resume: Checkpoint | None, data) -> None:
    train_data, val_data, test_data = data
    version = registry.backend_specs()[loop.name].version()
    processes = f", {loop.world_size} processes" if loop.world_size > 1 else ""
    print(
        f"unitrain: backend {loop.name}{f' {version}' if version else ''}{processes}, model {run.model}, "
        f"{run.loss} loss, {run.optimizer}, batch {run.batch_size}, {run.data.dataset} {len(train_data)} train"
        f"{f' / {len(val_data)} validation' if val_data is not None else ''} / {len(test_data)} test",
        flush=True,
    )
    if resume is not None:
        print(f"unitrain: resuming {resume.path} (trained on {resume.backend}): step {resume.step}, "
              f"epoch {resume.epoch + 1} from batch {resume.batch}", flush=True)  # fmt: skip


def _interrupt_directory() -> Path | None:
    """Where a stop signal checkpoints a run that has no checkpoint directory: a new folder in the
    current directory, named after the run's start; None if the current directory is not writable."""
    stem = f"unitrain-interrupted-{time.strftime('%Y%m%d-%H%M%S')}"
    candidates = itertools.chain([stem], (f"{stem}-{n}" for n in itertools.count(2)))
    name = next(name for name in candidates if not Path(name).exists())
    try:
        with tempfile.TemporaryFile(dir="."):
            return Path(name)
    except OSError:
        return None
