"""TensorBoard logs: :class:`unitrain.extensions.TensorBoardWriter` on every backend, and
``--tensorboard DIR`` on ``train`` and ``compare``, read back with TensorBoard's own reader
(``tensorboard.backend.event_processing.event_accumulator``)."""

import numpy as np
import pytest
from conftest import installed_backends

import unitrain
from unitrain import SGD, CrossEntropyLoss
from unitrain.extensions import TensorBoardWriter
from unitrain.schedules import OneCycleLR

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

STEPS_PER_EPOCH, EPOCHS = 5, 2


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``directory``, as TensorBoard loads them: tag -> (step, value)."""
    reader = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    reader.Reload()
    return {tag: [(event.step, event.value) for event in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def torch_one_cycle_lrs(steps: int) -> list[float]:
    """The lr each step uses under ``torch.optim.lr_scheduler.OneCycleLR`` itself."""
    torch = pytest.importorskip("torch")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps, cycle_momentum=False)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("backend", installed_backends())
def test_the_writer_logs_each_steps_loss_and_lr_and_each_epochs_record(backend, mnist_test, tmp_path):
    data, test = mnist_test.split(STEPS_PER_EPOCH * 32, seed=0)
    schedule = OneCycleLR(max_lr=0.1, total_steps=STEPS_PER_EPOCH * EPOCHS, cycle_momentum=False)
    loop = unitrain.make_loop(backend, unitrain.mlp(), CrossEntropyLoss(), SGD(lr=0.1), lr_schedule=schedule, seed=0)
    history = loop.fit(data, epochs=EPOCHS, batch_size=32, eval_data=test.subset(slice(500)),
                       extensions=[TensorBoardWriter(tmp_path / "tb")])  # fmt: skip
    logged = scalars(tmp_path / "tb")

    steps = list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert [step for step, _ in logged["step/loss"]] == steps
    assert [step for step, _ in logged["step/lr"]] == steps
    # event files hold float32: each value is the loop's own, rounded once
    np.testing.assert_allclose([lr for _, lr in logged["step/lr"]], torch_one_cycle_lrs(len(steps)), rtol=2**-23)
    losses = np.array([loss for _, loss in logged["step/loss"]]).reshape(EPOCHS, STEPS_PER_EPOCH)
    for record, epoch_losses in zip(history, losses, strict=True):  # an epoch's train loss: its steps' mean
        np.testing.assert_allclose(epoch_losses.mean(), record["train_loss"], rtol=2**-23)  # each rounded once
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "samples_per_sec"):
        np.testing.assert_allclose(logged[f"epoch/{key}"], [(r["epoch"], r[key]) for r in history], rtol=2**-23)
    assert "epoch/epoch" not in logged and "epoch/steps" not in logged


def run_cli(capsys, *argv):
    from unitrain import cli

    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_train_tensorboard_logs_the_run_and_a_resumed_run_continues_its_curves(capsys, tmp_path):
    train = ["train", "--backend", "numpy", "--no-progress", "--max-steps", "4"]
    status, _, err = run_cli(capsys, *train, "--tensorboard", str(tmp_path / "tb"),
                             "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2")  # fmt: skip
    assert status == 0, err
    older = tmp_path / "ck" / "step-00000002"  # resumed from an older checkpoint: a new branch of the run
    status, _, err = run_cli(capsys, *train, "--tensorboard", str(tmp_path / "tb-resumed"), "--resume", str(older),
                             "--checkpoint-dir", str(tmp_path / "ck2"))  # fmt: skip
    assert status == 0, err
    logged, resumed = scalars(tmp_path / "tb"), scalars(tmp_path / "tb-resumed")
    assert [step for step, _ in logged["step/loss"]] == [1, 2, 3, 4]
    assert resumed["step/loss"] == logged["step/loss"][2:]  # on numpy a resumed run is bit-identical
    assert [step for step, _ in logged["epoch/test_accuracy"]] == [1]  # stopped inside epoch 1
    assert 0 < logged["epoch/test_accuracy"][0][1] <= 1


def test_compare_tensorboard_writes_one_run_per_backend(capsys, tmp_path):
    backends = [name for name in ("numpy", "torch") if name in installed_backends()]
    if len(backends) < 2:
        pytest.skip("compare needs two backends")
    status, _, err = run_cli(capsys, "compare", "--backends", ",".join(backends), "--max-steps", "3",
                             "--no-progress", "--tensorboard", str(tmp_path / "tb"))  # fmt: skip
    assert status == 0, err
    assert sorted(path.name for path in (tmp_path / "tb").iterdir()) == sorted(backends)
    for backend in backends:
        logged = scalars(tmp_path / "tb" / backend)
        assert [step for step, _ in logged["step/loss"]] == [1, 2, 3]
        assert len(logged["epoch/test_loss"]) == 1


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_tensorboard_path_that_is_a_file_is_refused_before_training(command, capsys, tmp_path):
    (tmp_path / "tb").write_text("mine")
    status, out, err = run_cli(capsys, command, "--tensorboard", str(tmp_path / "tb"), "--max-steps", "1")
    assert status == 2 and not out
    assert err == f"unitrain: error: --tensorboard {tmp_path / 'tb'} is a regular file, expected a directory\n"
    assert (tmp_path / "tb").read_text() == "mine"


def test_a_tensorboard_dir_below_a_file_is_refused_and_missing_parents_are_created(capsys, tmp_path):
    (tmp_path / "file").write_text("mine")
    below = tmp_path / "file" / "tb"
    status, _, err = run_cli(capsys, "train", "--tensorboard", str(below), "--max-steps", "1")
    assert status == 2
    assert err == f"unitrain: error: --tensorboard {below}: {below.parent} is a regular file, expected a directory\n"
    TensorBoardWriter(tmp_path / "runs" / "a" / "b").finalize(None)
    assert list((tmp_path / "runs" / "a" / "b").glob("events.out.tfevents.*"))
