"""unitrain.Job from Python: what ``unitrain train`` guarantees (resume after a kill, refused
resumes, outputs that replace nothing, a launched data-parallel run), without the command line."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from unitrain import Adam, Job, Run, cli, mlp
from unitrain.checkpoint import checkpoint_paths, load_checkpoint
from unitrain.files import OutputError
from unitrain.job import JobError
from unitrain.weights import init_weights, load_safetensors, save_safetensors

#: the MLP on MNIST, a checkpoint every step: the run of tests/test_checkpoint.py's SIGKILL test
RUN = Run(optimizer=Adam(lr=0.001), epochs=1, max_steps=12)
STEPS = 12


def newest_step(folder):
    paths = checkpoint_paths(folder) if folder.is_dir() else []
    return int(paths[-1].name.split("-")[1]) if paths else 0


def final_state(folder):
    checkpoint = load_checkpoint(folder)
    assert checkpoint.finished and checkpoint.step == STEPS
    return {**checkpoint.weights, **{f"optimizer.{k}": v for k, v in checkpoint.optimizer_state.items()}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted job: every checkpoint kept, its weights saved; returns its folder and outcome."""
    folder = tmp_path_factory.mktemp("reference")
    outcome = Job(RUN, "numpy", checkpoint_dir=folder / "ck", checkpoint_every=1, keep=STEPS,
                  save=folder / "w.safetensors", progress=False).train()  # fmt: skip
    assert outcome.status == 0 and outcome.outputs == {"save": folder / "w.safetensors"}
    assert outcome.checkpoint == folder / "ck" / f"step-{STEPS:08d}"
    return folder, outcome


def test_a_job_killed_with_sigkill_resumes_bit_identical(reference, tmp_path):
    folder = tmp_path / "ck"
    job = (f"from unitrain import Job, Run; Job(Run.from_dict({RUN.to_dict()!r}), 'numpy', "
           f"checkpoint_dir={str(folder)!r}, checkpoint_every=1, progress=False).train()")  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", job], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while newest_step(folder) < 3 and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr
    assert not load_checkpoint(folder).finished, "the kill landed after the run finished"
    outcome = Job(resume=folder, save=tmp_path / "w.safetensors", progress=False).train()  # backend: the checkpoint's
    assert outcome.status == 0 and outcome.checkpoint.parent == folder
    expected = final_state(reference[0] / "ck")
    for key, value in final_state(folder).items():
        assert np.array_equal(value, expected[key]), key
    saved, expected = (
        load_safetensors(tmp_path / "w.safetensors")[0],
        load_safetensors(reference[0] / "w.safetensors")[0],
    )
    assert all(np.array_equal(saved[key], expected[key]) for key in expected)


@pytest.fixture
def mid_run(reference, tmp_path):
    """A copy of the reference's checkpoint at step 4, alone in its directory."""
    import shutil

    folder = tmp_path / "mid"
    shutil.copytree(reference[0] / "ck" / "step-00000004", folder / "step-00000004")
    return folder


def refusals(reference, mid_run):
    """(a job's settings, the flags that ask the command for the same) that cannot work."""
    finished, step_4 = reference[0] / "ck", reference[0] / "ck" / "step-00000004"
    return [
        (dict(resume=mid_run, run=RUN.replace(seed=1)), ["--resume", mid_run, "--seed", "1"],
         "--seed 1 differs from the resumed run's 0; a resumed run keeps its settings"),
        (dict(resume=finished), ["--resume", finished], f"the run finished at step {STEPS}, there is nothing"),
        (dict(resume=mid_run, run=RUN.replace(max_steps=4)), ["--resume", mid_run, "--max-steps", "4"],
         "is already past the run's end (--epochs 1, --max-steps 4)"),
        (dict(resume=step_4), ["--resume", step_4], "is not the newest checkpoint in"),
        (dict(run=RUN, checkpoint_dir=mid_run), ["--checkpoint-dir", mid_run], "already holds a run's checkpoints"),
    ]  # fmt: skip


def test_a_refused_resume_is_the_commands_refusal(reference, mid_run, capsys):
    """The job refuses what the command refuses, in the same words, before training."""
    for settings, flags, message in refusals(reference, mid_run):
        with pytest.raises(JobError) as refused:
            Job(**{"backend": "numpy", "progress": False, **settings}).train()
        assert message in str(refused.value)
        capsys.readouterr()
        argv = ["train", "--backend", "numpy", "--no-progress", "--optimizer", "adam", "--lr", "0.001",
                "--epochs", "1", "--max-steps", str(STEPS)]  # fmt: skip
        resumed = "--resume" in flags
        assert cli.main([*(argv[:4] if resumed else argv), *map(str, flags)]) == 2
        assert capsys.readouterr().err == f"unitrain: error: {refused.value}\n"
    assert newest_step(mid_run) == 4 and len(checkpoint_paths(mid_run)) == 1  # nothing trained or written


class AppearsDuringTheRun:
    """A fit extension: another program writes ``path`` while the job trains."""

    def __init__(self, path):
        self.path = path

    def on_epoch_start(self, loop, epoch):
        self.path.write_bytes(b"someone else's")


def test_outputs_replace_nothing_and_go_beside_a_file_that_appeared(tmp_path, capsys):
    small = RUN.replace(max_steps=2)
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    with pytest.raises(OutputError, match="taken.safetensors already exists; pass --overwrite to replace it"):
        Job(small, "numpy", save=tmp_path / "taken.safetensors").train()
    start = tmp_path / "start.safetensors"
    save_safetensors(start, init_weights(mlp(), seed=1))
    with pytest.raises(OutputError, match=r"is the initial weights \(.*\), which this command reads"):
        Job(small.replace(init_weights=str(start)), "numpy", save=start, overwrite=True).train()
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"

    asked = tmp_path / "w.safetensors"
    outcome = Job(small, "numpy", save=asked, progress=False, extensions=[AppearsDuringTheRun(asked)]).train()
    assert outcome.status == 2  # as the command's exit status: not where asked
    assert asked.read_bytes() == b"someone else's"
    assert outcome.outputs["save"] == tmp_path / "w.1.safetensors"
    assert load_safetensors(outcome.outputs["save"])[0].keys() == outcome.loop.state_dict().keys()
    assert f"kept it and wrote the weights to {tmp_path / 'w.1.safetensors'} instead" in capsys.readouterr().err


@pytest.mark.slow
def test_a_job_of_two_processes_is_launched_and_equals_one(tmp_path):
    """nproc=2 from Python: the backend's launcher (mpiexec for NumPy) starts two workers of the
    same job; their weights equal one process's within tests/test_distributed.py's bound."""
    from test_distributed import max_difference, sharding_bound
    from torch_reference import gradient_size

    small = Run(epochs=1, max_steps=10, shuffle=False)
    one = Job(small, "numpy", save=tmp_path / "one.safetensors", progress=False).train()
    two = Job(small, "numpy", nproc=2, save=tmp_path / "two.safetensors", checkpoint_dir=tmp_path / "ck",
              progress=False).train()  # fmt: skip
    assert (one.status, two.status, two.loop) == (0, 0, None)
    assert load_checkpoint(tmp_path / "ck").manifest["world_size"] == 2
    size = gradient_size(mlp(), (1, 28, 28), small.batch_size) + 10  # the run's mlp; the softmax over 10 classes
    bound = sharding_bound(size, steps=10, lr=small.optimizer.lr)
    assert max_difference(tmp_path / "one.safetensors", tmp_path / "two.safetensors") <= bound


def test_a_job_compares_backends_as_the_command_does(tmp_path, capsys):
    """compare from Python: the same run on two backends, the table printed, the JSON report
    published; train's settings refused."""
    pytest.importorskip("torch")
    small = Run(epochs=1, max_steps=3)
    with pytest.raises(JobError, match="^save: compare trains each backend once"):
        Job(small, save=tmp_path / "w.safetensors").compare(["numpy", "torch"])
    outcome = Job(small, progress=False).compare(["numpy", "torch"], json=tmp_path / "report.json")
    assert outcome.status == 0 and [result["backend"] for result in outcome.results] == ["numpy", "torch"]
    assert [result["steps"] for result in outcome.results] == [3, 3]
    recorded = json.loads((tmp_path / "report.json").read_text())
    assert recorded["run"] == small.to_dict()
    assert recorded["results"][1]["max_weight_difference"] == outcome.results[1]["max_weight_difference"]
    assert "max |Δw| vs numpy" in capsys.readouterr().out
