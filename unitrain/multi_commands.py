"""The commands of a multi-model run (:mod:`unitrain.multi_run`): what ``unitrain train``,
``compare`` and ``evaluate`` do with a recipe that has a ``[models]`` table, or with ``--resume``
of a directory holding a multi-model checkpoint; ``cli.py`` only hands such a command line here."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import distributed, files, registry, steps
from .multi_recipe import MultiRun, is_multi_recipe, load_multi_recipe
from .multi_run import MultiJob, histories_of, resumed_run, test_losses
from .reading import short
from .run import RunError
from .step_checkpoints import CHECKPOINT_FILE

#: the run settings a flag may set over a multi-model recipe (a resumed run: where it ends only)
FLAGS = ("epochs", "max_steps", "batch_size", "seed")
_RESUME_FLAGS = ("epochs", "max_steps")


def wanted(args) -> bool:
    """Whether the command line trains a multi-model run: its recipe has ``[models]``, or
    ``--resume`` names a directory holding a multi-model checkpoint."""
    if getattr(args, "recipe", None) is not None:
        return is_multi_recipe(args.recipe)
    resume = getattr(args, "resume", None)
    return resume is not None and (Path(resume) / CHECKPOINT_FILE).is_file()


def _with_flags(run: MultiRun, typed: Mapping[str, Any], allowed: Sequence[str], why: str) -> MultiRun:
    for key in typed:
        if key not in allowed:
            raise RunError(f"--{key.replace('_', '-')} does not apply {why}")
    return run.replace(**typed)


def _print_recipe(run: MultiRun) -> int:
    import tomli_w

    print(tomli_w.dumps(run.to_dict()), end="")
    return 0


def train_command(args, typed: Mapping[str, Any]) -> int:
    """``unitrain train RECIPE.toml`` / ``--resume DIR`` of a multi-model run."""

    if args.resume is not None:
        if args.recipe is not None:
            raise RunError("--resume continues the run its checkpoint records; a RECIPE starts a new run")
        run = _with_flags(resumed_run(args.resume), typed, _RESUME_FLAGS, "to a resumed run: it keeps its recipe")
        if args.checkpoint_dir is not None and Path(args.checkpoint_dir).resolve() != Path(args.resume).resolve():
            raise RunError(f"--checkpoint-dir {args.checkpoint_dir}: a resumed multi-model run checkpoints where it "
                           f"was, {args.resume}")  # fmt: skip
        directory = Path(args.resume)
    else:
        run = _with_flags(load_multi_recipe(args.recipe), typed, FLAGS,
                          "to a multi-model recipe: set it in the recipe's tables")  # fmt: skip
        directory = args.checkpoint_dir
    if args.print_recipe:
        return _print_recipe(run)
    spec = registry.usable_spec(registry.backend_name(args.backend))
    world_size = distributed.launched_world_size(spec.launcher)  # None: not started by the engine's launcher
    job = MultiJob(run, spec.name, directory, args.checkpoint_every, args.resume is not None, args.save,
                   args.metrics, args.plot, args.overwrite, distributed=world_size is not None,
                   tensorboard=args.tensorboard, keep=args.keep, progress=args.progress)  # fmt: skip
    if world_size is None and (args.nproc or 1) > 1:
        return _launch(job, args, spec)
    if world_size is not None:
        distributed.die_with_parent()  # the launcher's: no rank outlives the job
    if args.threads or world_size:  # a launched rank: its share of the cores, as a one-model run's
        registry.get_backend(spec.name).set_threads(args.threads or distributed.threads_per_rank(world_size))
    return job.train()[2]


def _launch(job: MultiJob, args, spec) -> int:
    """Start ``--nproc`` ranks of this command with the backend's launcher (torchrun, mpiexec), each
    on the same run (written to a temporary recipe, or resumed from the checkpoint), and wait."""

    import tomli_w

    job.check()
    if job.run.batch_size < args.nproc:
        raise RunError(f"batch_size {job.run.batch_size}: {args.nproc} processes need a row each")
    step, _ = job.run.build()
    for phase in step.phases:  # refused here, before any process starts
        try:
            steps.MultiModelLoop._weighting(phase)
        except ValueError as error:
            raise RunError(str(error)) from None
    if not steps.runs_data_parallel(steps.evaluator_of(registry.get_backend(spec.name))):
        raise RunError(f"--nproc: the {spec.name} backend runs a multi-model step in one process only")
    distributed.check_engine(spec.name, spec.launcher)
    if args.master_port is not None:
        distributed.check_port(args.master_port)
    with tempfile.TemporaryDirectory(prefix="unitrain-job-") as folder:
        if job.resume:
            argv = ["train", f"--resume={job.checkpoint_dir}"]
            argv += [f"--{key.replace('_', '-')}={getattr(job.run, key)}" for key in _RESUME_FLAGS
                     if getattr(job.run, key) is not None]  # fmt: skip
        else:
            recipe = Path(folder) / "run.toml"
            recipe.write_text(tomli_w.dumps(job.run.to_dict()), encoding="utf-8")
            argv = ["train", str(recipe)]
        settings = (("--backend", spec.name), ("--checkpoint-dir", None if job.resume else job.checkpoint_dir),
                    ("--checkpoint-every", job.checkpoint_every), ("--save", job.save), ("--metrics", job.metrics),
                    ("--plot", job.plot), ("--threads", args.threads), ("--tensorboard", job.tensorboard),
                    ("--keep", job.keep))  # fmt: skip
        argv += [f"{flag}={value}" for flag, value in settings if value is not None]
        # the workers' stderr is the launcher's pipe: whether to draw the bar is decided here
        argv.append(
            "--progress" if (sys.stderr.isatty() if job.progress is None else job.progress) else "--no-progress"
        )
        return distributed.run(spec.launcher, args.nproc, [*argv, *(["--overwrite"] if job.overwrite else [])],
                               args.master_port)  # fmt: skip


def compare_command(args, typed: Mapping[str, Any]) -> int:
    """``unitrain compare RECIPE.toml --backends A,B``: each backend from the same weights, batches
    and noise; one line per loss per backend, ``--json`` every step's losses, ``--report DIR`` the
    loss curves (``DIR/losses.png``, one panel per loss, one curve per backend) and each backend's
    ``[pictures]`` after training (``DIR/pictures.png``, one row per backend); ``--tensorboard DIR``
    each step's losses as ``DIR/<backend>``'s ``step/<phase>_loss``."""
    from . import plot
    from .step_compare import comparison_lines

    if getattr(args, "sample_every", None) is not None:
        raise RunError("--sample-every does not apply to a multi-model run")
    if args.native:
        raise RunError("--native: the frameworks' hand-written loops are of one model")
    run = _with_flags(load_multi_recipe(args.recipe), typed, FLAGS, "to a multi-model recipe")
    if args.print_recipe:
        return _print_recipe(run)
    if args.backends is None:
        backends = [name for name, spec in registry.backend_specs().items() if spec.installed()]
    else:
        backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if len(backends) < 2 or len(set(backends)) != len(backends):
        raise RunError(f"--backends needs two or more different backends, got {','.join(backends)!r}")
    for name in backends:
        if "multi-model" not in registry.get_backend(name).capabilities:
            raise RunError(f"--backends: the {name} backend cannot run several models in one step")
    files.check_output(args.json, "--json", args.overwrite)
    if args.tensorboard is not None:
        from .extensions import check_tensorboard_dir

        check_tensorboard_dir(args.tensorboard, "--tensorboard", backends)
    if args.report is not None:
        plot.require_matplotlib("--report")
        files.check_output_dir(args.report, "--report", args.overwrite)
    histories, (pictures, drawn) = histories_of(run, backends)
    print("\n".join(comparison_lines(histories)))
    if args.tensorboard is not None:  # one run per backend, as a one-model compare's
        from .extensions import PhaseTensorBoardWriter

        for backend, history in histories.items():
            writer = PhaseTensorBoardWriter(args.tensorboard / backend)
            writer.log_steps(history)
            writer.finalize(None)
        print(f"unitrain: wrote TensorBoard event files to {args.tensorboard}/<backend>")
    if args.json is not None:
        finite = {
            backend: [
                {phase: value if math.isfinite(value) else None for phase, value in losses.items()}
                for losses in history
            ]
            for backend, history in histories.items()
        }  # JSON has no NaN
        text = json.dumps({"backends": backends, "losses": finite}, allow_nan=False)
        final = files.publish(args.json, lambda staged: staged.write_text(text + "\n"), overwrite=args.overwrite)
        print(f"unitrain: wrote the losses to {final}")
    if args.report is not None:
        args.report.mkdir(exist_ok=True)
        figure = plot.step_losses_figure(histories)
        final = files.publish(args.report / "losses.png", lambda staged: plot.save_figure(figure, staged, ".png"),
                              overwrite=args.overwrite)  # fmt: skip
        print(f"unitrain: drew the losses in {final}")
        if drawn:  # the same noise and test images through each backend's trained models: one row each
            figure = pictures.figure(list(drawn.items()))
            final = files.publish(args.report / "pictures.png", lambda staged: plot.save_figure(figure, staged, ".png"),
                                  overwrite=args.overwrite)  # fmt: skip
            print(f"unitrain: drew each backend's pictures in {final}")
    return 0


def evaluate_command(args) -> int:
    """``unitrain evaluate --recipe RECIPE.toml --weights DIR``: each phase's loss over the test set
    with the weights ``train --save DIR`` wrote (``DIR/<model>.safetensors``), in eval mode;
    ``--model NAME``: that model's report (:mod:`unitrain.model_report`), which reads the weights of
    the models it calls only."""
    from .model_report import evaluate_model, models_called
    from .step_shapes import check_run_shapes
    from .weights import check_state, load_safetensors

    typed = [f"--{key.replace('_', '-')}" for key in ("dataset", "data_dir") if hasattr(args, key)]
    if typed:
        raise RunError(f"{typed[0]} and --recipe exclude each other: the recipe names the models and data")
    run = load_multi_recipe(args.recipe)
    step, _ = run.build()
    model = getattr(args, "model", None)
    if model is not None and model not in run.models:
        raise RunError(f"--model {short(model)}: expected one of the recipe's models, {', '.join(run.models)}")
    if not Path(args.weights).is_dir():
        raise RunError(f"--weights {args.weights}: expected the directory train --save wrote (DIR/<model>.safetensors)")
    backend = registry.get_backend(args.backend).name
    loop = steps.MultiModelLoop(step, backend, seed=run.seed)
    needed = run.models if model is None else models_called(run, model)
    for name, spec in step.models:
        if name not in needed:
            continue
        path = Path(args.weights) / f"{name}.safetensors"
        shapes, source = spec.state_shapes(), f"--weights {path}"
        state = load_safetensors(path, lambda declared, s=shapes, n=source: check_state(s, declared, n), name=source)[0]
        loop.loops[name].load_state_dict(state, source=str(path))
    _, test = run.datasets()
    # a model given values of another shape: its phase named (BatchNorm in eval mode: one sample is fine)
    check_run_shapes(run, step, {}, test.x.shape[1:], training=False)
    if model is not None:
        report = evaluate_model(run, loop.loops, test, model)
        print(f"{args.weights} on {backend}: {model} over {report.samples} test images")
        print("\n".join(f"  {line}" for line in report.lines()))
        return 0
    losses = test_losses(run, loop.loops, test)
    shown = "  ".join(f"test {name} loss {value:.4f}" for name, value in losses.items())
    print(f"{args.weights} on {backend}: {shown}")
    return 0
