"""Hostile runs (the writing and process half; the files read are in test_hostile_files.py):
outputs that appear, or are not regular files, while unitrain writes; resuming an older checkpoint;
early signals; full disks; malformed command lines. Every case ends with one line on stderr and
exit code 2 (130/143 for signals), and every file the user had is byte-identical afterwards."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import installed_backends

import unitrain
from unitrain import cli, files
from unitrain import run as run_module
from unitrain.checkpoint import Checkpointer, CheckpointError, checkpoint_paths, load_checkpoint, save_checkpoint
from unitrain.data import DataError
from unitrain.weights import load_safetensors

TINY_RUN = ["--no-progress", "--epochs", "1", "--batch-size", "8"]  # numpy, a few steps


def command(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "unitrain", *args], capture_output=True, text=True, **kwargs)


def snapshot(*paths):
    """sha256 of every file under ``paths`` (what the user had), and what each path is."""
    found = {}
    for root in paths:
        found[str(root)] = files.describe(root)
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_file() and not path.is_symlink():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def digests(folder):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def one_error_line(stderr: str, expected: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in stderr, stderr


def run_cli(capsys, *argv):
    """``unitrain ARGV`` in this process: (exit code, stdout, stderr)."""
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def small_loop():
    return unitrain.make_loop("numpy", unitrain.mlp(), seed=0)


@pytest.fixture
def appears_during_the_run(monkeypatch):
    """Files that a user (or another job) creates at the given paths after unitrain's start-up
    checks, while the run loads its data."""
    created = {}
    load_datasets = run_module.load_datasets

    def load_then_create(*args, **kwargs):
        for path, content in created.items():
            if not path.exists():
                path.write_bytes(content)
        return load_datasets(*args, **kwargs)

    monkeypatch.setattr(run_module, "load_datasets", load_then_create)
    return created


# --- outputs: never clobbered, only regular files replaced ------------------------------------


def test_outputs_that_appear_during_the_run_are_kept_and_ours_go_beside_them(tmp_path, capsys, appears_during_the_run):
    weights, metrics = tmp_path / "w.safetensors", tmp_path / "m.jsonl"
    appears_during_the_run.update({weights: b"the user's weights", metrics: b"the user's metrics"})
    status, out, err = run_cli(capsys, "train", *TINY_RUN, "--max-steps", "2", "--save", str(weights),
                               "--metrics", str(metrics))  # fmt: skip
    assert status == 2
    assert weights.read_bytes() == b"the user's weights" and metrics.read_bytes() == b"the user's metrics"
    lines = err.splitlines()
    assert lines == [
        f"unitrain: --metrics {metrics} appeared during the run; kept it and wrote the metrics to "
        f"{tmp_path / 'm.1.jsonl'} instead",
        f"unitrain: --save {weights} appeared during the run; kept it and wrote the weights to "
        f"{tmp_path / 'w.1.safetensors'} instead",
    ]
    tensors, _ = load_safetensors(tmp_path / "w.1.safetensors")
    assert set(tensors) == set(unitrain.mlp().state_shapes())
    assert json.loads((tmp_path / "m.1.jsonl").read_text())["steps"] == 2
    assert f"saved weights to {tmp_path / 'w.1.safetensors'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.1.jsonl", "m.jsonl", "w.1.safetensors", "w.safetensors"]


def test_overwrite_replaces_a_regular_file_whole(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"old")
    status, _, err = run_cli(capsys, "train", *TINY_RUN, "--max-steps", "0", "--save", str(weights), "--overwrite")
    assert status == 0, err
    assert set(load_safetensors(weights)[0]) == set(unitrain.mlp().state_shapes())
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


@pytest.mark.parametrize("flag", ["--save", "--metrics"])
@pytest.mark.parametrize("kind", ["symbolic link", "FIFO", "directory"])
def test_only_a_regular_file_is_ever_replaced(tmp_path, flag, kind):
    target, precious = tmp_path / "out", tmp_path / "precious.safetensors"
    precious.write_bytes(b"what the link points to")
    {"symbolic link": lambda: target.symlink_to(precious), "FIFO": lambda: os.mkfifo(target),
     "directory": target.mkdir}[kind]()  # fmt: skip
    before = snapshot(tmp_path)
    result = command("train", flag, str(target), "--overwrite", timeout=60)  # a FIFO opened for writing would hang
    assert result.returncode == 2
    one_error_line(result.stderr, f"{flag} {target} is a {kind}")
    assert snapshot(tmp_path) == before


def test_a_device_node_is_never_replaced():
    """As root, replacing /dev/null by a regular file would break the system."""
    before = os.stat("/dev/null")
    result = command("train", "--save", "/dev/null", "--overwrite")
    assert result.returncode == 2
    one_error_line(result.stderr, "--save /dev/null is a character device; only a regular file is ever replaced")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)


def test_publish_keeps_whatever_appeared_and_never_follows_links(tmp_path):
    target, precious = tmp_path / "report.json", tmp_path / "precious"
    precious.write_bytes(b"keep")

    def write_while_a_link_appears(staged):
        target.symlink_to(precious)
        staged.write_bytes(b"ours")

    for overwrite in (False, True):  # with consent too: a link is not a regular file
        final = files.publish(target, write_while_a_link_appears, overwrite=overwrite)
        assert final == tmp_path / "report.1.json" and final.read_bytes() == b"ours"
        assert target.is_symlink() and precious.read_bytes() == b"keep"
        target.unlink(), final.unlink()


def test_publish_without_hard_links_uses_an_atomic_rename_that_never_replaces(tmp_path, monkeypatch):
    """Filesystems without hard links (FAT, some network mounts): renameat2(RENAME_NOREPLACE)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")

    def no_hard_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_hard_links)
    target = tmp_path / "w.safetensors"
    assert files.publish(target, lambda staged: staged.write_bytes(b"first"), overwrite=False) == target
    final = files.publish(target, lambda staged: staged.write_bytes(b"second"), overwrite=False)
    assert final == tmp_path / "w.1.safetensors"
    assert (target.read_bytes(), final.read_bytes()) == (b"first", b"second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.1.safetensors", "w.safetensors"]


@pytest.mark.parametrize(
    "command_line", [["compare", "--backends", ",".join(installed_backends()[:2])], ["conformance"]]
)
def test_json_reports_refuse_an_existing_file_without_overwrite(tmp_path, command_line):
    if command_line[0] == "compare" and len(installed_backends()) < 2:
        pytest.skip("compare needs two installed backends")
    report = tmp_path / "report.json"
    report.write_text("the user's report")
    result = command(*command_line, "--json", str(report))
    assert result.returncode == 2
    one_error_line(result.stderr, f"--json {report} already exists; pass --overwrite to replace it")
    assert report.read_text() == "the user's report"


def test_conformance_json_is_published_beside_a_file_that_appeared(tmp_path, capsys, monkeypatch):
    from unitrain.conformance import runner

    report, check = tmp_path / "results.json", "check_losses"
    run_checks = runner.run_checks

    def run_checks_while_a_file_appears(*args, **kwargs):
        report.write_text("the user's results")
        return run_checks(*args, **kwargs)

    monkeypatch.setattr(runner, "run_checks", run_checks_while_a_file_appears)
    status, _, err = run_cli(capsys, "conformance", "--backend", "numpy", "--check", check, "--json", str(report))
    assert status == 2
    beside = tmp_path / "results.1.json"
    one_error_line(
        err.replace("unitrain: numpy done\n", ""),
        f"--json {report} appeared during the run; kept it and wrote the results to {beside} instead",
    )
    assert report.read_text() == "the user's results"
    assert [(r["check"], r["backend"], r["status"]) for r in json.loads(beside.read_text())] == [
        (check, "numpy", "pass")
    ]


# --- checkpoints: a resume never deletes or interleaves -----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run checkpointed at steps 2, 4 and 6 (finished)."""
    directory = tmp_path_factory.mktemp("run") / "D"
    result = command("train", *TINY_RUN, "--max-steps", "6", "--checkpoint-dir", str(directory),
                     "--checkpoint-every", "2", "--keep", "5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [path.name for path in checkpoint_paths(directory)] == ["step-00000002", "step-00000004", "step-00000006"]
    return directory


def test_resuming_an_older_checkpoint_in_its_own_directory_is_refused(finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    older = finished_run / "step-00000002"
    status, _, err = run_cli(capsys, "train", "--no-progress", "--resume", str(older), "--max-steps", "5")
    assert status == 2
    one_error_line(err, f"--resume {older} is not the newest checkpoint in {finished_run} (step-00000006 is); "
                        "to branch from it, pass a new --checkpoint-dir DIR")  # fmt: skip
    assert snapshot(finished_run) == before

    branch = tmp_path / "branch"
    status, _, err = run_cli(capsys, "train", "--no-progress", "--resume", str(older), "--max-steps", "5",
                             "--checkpoint-dir", str(branch))  # fmt: skip
    assert status == 0, err
    assert snapshot(finished_run) == before, "the branch left the original run alone"
    assert [path.name for path in checkpoint_paths(branch)] == ["step-00000005"]
    assert load_checkpoint(finished_run).step == 6 and load_checkpoint(finished_run).finished
    assert load_checkpoint(branch).step == 5 and load_checkpoint(branch).finished


def test_a_checkpoint_directory_holds_one_run_and_keep_deletes_no_other(finished_run, tmp_path, small_loop):
    directory = tmp_path / "D"
    shutil.copytree(finished_run, directory)
    before = snapshot(directory)
    for loop_step in (3, 8):  # older than the run's newest, and newer: both another run's
        small_loop.step_count = loop_step
        with pytest.raises(CheckpointError, match="holds step-00000002 of another run"):
            save_checkpoint(directory, small_loop, epoch=0, batch=loop_step, keep=1, run_id="another")
    assert snapshot(directory) == before


def test_keep_spares_another_runs_checkpoint_that_appears_mid_write(finished_run, tmp_path, small_loop):
    """Two jobs started at once on one directory: the other one's checkpoint lands while ours is
    written; ``keep`` prunes only our run's."""
    directory, theirs = tmp_path / "D", tmp_path / "D" / "step-00000001"
    checkpointer = Checkpointer(directory, keep=1)
    state_dict = small_loop.state_dict

    def state_dict_while_another_run_writes():
        shutil.copytree(finished_run / "step-00000002", theirs)
        return state_dict()

    for step in (2, 4):
        small_loop.step_count = step
        if step == 4:
            small_loop.state_dict = state_dict_while_another_run_writes
        save_checkpoint(directory, small_loop, epoch=0, batch=step, keep=1, run_id=checkpointer.run_id)
    assert [path.name for path in checkpoint_paths(directory)] == ["step-00000001", "step-00000004"]
    assert digests(theirs) == digests(finished_run / "step-00000002")


def test_keep_deletes_only_checkpoints_known_to_be_this_runs(tmp_path, small_loop):
    """One whose manifest cannot be read is neither another run's (no refusal) nor ours to delete;
    checkpoints written before runs had ids (run_id None) continue as one run."""
    unreadable = tmp_path / "step-00000001"
    unreadable.mkdir()
    (unreadable / "checkpoint.json").write_text("{")
    for step in (2, 4, 6):
        small_loop.step_count = step
        save_checkpoint(tmp_path, small_loop, epoch=0, batch=step, keep=1)
    assert [path.name for path in checkpoint_paths(tmp_path)] == ["step-00000001", "step-00000006"]
    assert (unreadable / "checkpoint.json").read_text() == "{"


# --- signals from the first instant ---------------------------------------------------------------


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_early_signal_ends_the_command_in_one_line(signum, status):
    """The signal arrives while NumPy is still being imported (``-X importtime`` reports each
    import as it completes): before today's handler would have been installed. A command past
    parsing (this one is refused after the run is built) imports NumPy; parsing alone does not."""
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "unitrain", "train", "--optimizer", "adam",
                                "--momentum", "0.9"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "numpy" in line:
            process.send_signal(signum)
            break
    lines += process.stderr.readlines()
    process.wait(timeout=60)
    assert any("numpy" in line for line in lines), "NumPy was never imported"
    assert process.returncode == status
    assert [line for line in lines if not line.startswith("import time:")] == ["unitrain: interrupted\n"]


def signalled(cwd, signum, marker: str, delay: float, *argv) -> tuple[int, list[str]]:
    """``unitrain ARGV`` sent ``signum`` ``delay`` seconds after the first import whose line
    (``-X importtime``) names ``marker``: its exit status and its stderr lines but those."""
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "unitrain", *argv], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = []
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            time.sleep(delay)
            process.send_signal(signum)
            break
    lines += process.stderr.readlines()
    process.wait(timeout=120)
    assert any(marker in line for line in lines), f"{marker} was never imported"
    return process.returncode, [line for line in lines if not line.startswith("import time:")]


@pytest.mark.parametrize("marker", ["numpy.core._multiarray_umath", "unitrain.cli"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_loads_ends_it_at_once(tmp_path, signum, marker):
    """Inside NumPy's C extension's import, a KeyboardInterrupt came out as NumPy's "Error importing
    numpy: you should not try to import numpy from its source directory"."""
    status, lines = signalled(tmp_path, signum, marker, 0.0, "train", *TINY_RUN)
    assert (status, lines) == (128 + signum, ["unitrain: interrupted\n"])


@pytest.mark.slow
def test_signals_sampled_over_the_first_seconds_all_end_the_run_cleanly(tmp_path):
    """A sample of the sweep over start-up (data loading, the first steps): exit 130/143, no
    traceback. Delays count from NumPy's first import, when unitrain's own code runs (before it,
    the interpreter starts; the full sweep from the process's start: ``python
    tests/test_hostile_runs.py N``)."""
    for number, delay in enumerate(np.random.default_rng(19).uniform(0.0, 1.5, 6)):
        signum = (signal.SIGINT, signal.SIGTERM)[number % 2]
        status, lines = signalled(tmp_path, signum, "numpy", delay, "train", "--no-progress", "--max-steps", "100000")
        said = f"signal {signum} {delay:.3f} s after NumPy's import: exit {status}, stderr:\n{''.join(lines)}"
        assert status == 128 + signum, said  # a string: pytest shows it whole, a traceback included
        assert lines and lines[-1].startswith("unitrain: interrupted"), said
        assert not any("Error" in line for line in lines), said


def sweep(count: int, seed: int = 0) -> dict:
    """Signals at uniformly random instants of the first 1.5 s of ``unitrain train`` (the console
    script): how many runs ended which way. Counts a death by the signal itself (exit -N: before
    the interpreter could run any code) apart."""
    import collections
    import random
    import tempfile

    script = shutil.which("unitrain") or os.path.join(os.path.dirname(sys.executable), "unitrain")
    draw, outcomes = random.Random(seed), collections.Counter()
    for _ in range(count):
        delay, signum = draw.uniform(0.0, 1.5), draw.choice([signal.SIGINT, signal.SIGTERM])
        with tempfile.TemporaryDirectory() as cwd:
            process = subprocess.Popen([script, "train", "--no-progress", "--max-steps", "100000"], cwd=cwd,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
            time.sleep(delay)
            process.send_signal(signum)
            err = process.communicate(timeout=120)[1]
        clean = "Traceback" not in err and "Error" not in err
        outcome = ("exit 128+N" if process.returncode == 128 + signum else f"exit {process.returncode}") + (
            "" if clean else " with a traceback or error"
        )
        outcomes[f"{signal.Signals(signum).name}: {outcome}"] += 1
    return dict(outcomes)


# --- messages: one line each ---------------------------------------------------------------------


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """ENOSPC often surfaces only at fsync (delayed allocation)."""

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", disk_full)
    target = tmp_path / "w.safetensors"
    for write in (lambda: files.atomic_write(target, [b"x"]),
                  lambda: files.publish(target, lambda staged: staged.write_bytes(b"x"), overwrite=False)):  # fmt: skip
        with pytest.raises(OSError) as raised:
            write()
        assert cli._one_line(raised.value) == f"{target}: No space left on device"
        assert list(tmp_path.iterdir()) == [], "no temporary file is left behind"


def test_files_published_together_are_all_or_none(tmp_path, monkeypatch):
    """A full disk at the second of two files: the first is not published either (no partial
    output), the files the user had there stay as they were though ``overwrite`` allowed replacing
    them, no temporary file is left, and the error names the file that did not fit."""
    old = {name: f"the user's {name}".encode() for name in ("a", "b")}
    for name, data in old.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)

    def disk_full(staged):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    outputs = [(tmp_path / "a.safetensors", lambda staged: staged.write_bytes(b"new a")),
               (tmp_path / "b.safetensors", disk_full), (tmp_path / "c.safetensors", disk_full)]  # fmt: skip
    for overwrite in (True, False):
        with pytest.raises(OSError) as raised:
            files.publish_together(outputs, overwrite=overwrite)
        assert cli._one_line(raised.value) == f"{tmp_path / 'b.safetensors'}: No space left on device"
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == {
            f"{name}.safetensors": data for name, data in old.items()
        }
    real_link = files.os.link

    def link_fails_second(source, target):  # naming fails after one file was named: that one goes again
        if os.path.basename(target).startswith("b"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_link(source, target)

    monkeypatch.setattr(files.os, "link", link_fails_second)
    writes = [(tmp_path / "new" / name, lambda staged: staged.write_bytes(b"x")) for name in ("a", "b")]
    with pytest.raises(OSError, match="No space left on device"), files.output_directory(tmp_path / "new"):
        files.publish_together(writes, overwrite=False)
    assert not (tmp_path / "new").exists(), "the directory made for them goes too"


def on_a_full_disk(tmp_path, *argv, free_kib=0):
    """``unitrain ARGV`` with ``DISK`` in ARGV a 1 MiB tmpfs (mounted in a user namespace where the
    system allows one) holding the user's ``user.txt`` and ``free_kib`` KiB free: the result, and
    stderr split into unitrain's lines, the disk's listing and user.txt's digest."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        'd="$1"; k="$2"; shift 2; mount -t tmpfs -o size=1m tmpfs "$d" && echo kept > "$d/user.txt" && '
        'head -c $((1024 * (1020 - k))) /dev/zero > "$d/.fill" && "$@"; status=$?; rm "$d/.fill"; '
        'ls -A "$d" | tr "\\n" " " >&2; echo >&2; sha256sum "$d/user.txt" >&2; exit $status'
    )
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {disk}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    argv = [str(arg).replace("DISK", str(disk)) for arg in argv]
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(disk), str(free_kib), sys.executable,
                             "-m", "unitrain", *argv], capture_output=True, text=True)  # fmt: skip
    *lines, listing, digest = result.stderr.splitlines()
    assert digest.split()[0] == hashlib.sha256(b"kept\n").hexdigest(), result.stderr
    return result, lines, listing.split()


def test_a_full_disk_ends_a_run_in_one_line_naming_the_file(tmp_path):
    result, lines, listing = on_a_full_disk(tmp_path, "train", *TINY_RUN, "--max-steps", "1", "--save",
                                            "DISK/w.safetensors", free_kib=512)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert lines == [f"unitrain: error: {tmp_path / 'disk' / 'w.safetensors'}: No space left on device"]
    assert listing == ["user.txt"], "the weights' temporary file is gone; nothing else was touched"


def test_a_full_disk_leaves_no_empty_metrics_file_to_refuse_the_rerun(tmp_path):
    result, lines, listing = on_a_full_disk(tmp_path, "train", *TINY_RUN, "--max-steps", "1", "--metrics",
                                            "DISK/m.jsonl")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert lines[-1] == f"unitrain: error: {tmp_path / 'disk' / 'm.jsonl'}: No space left on device"
    assert "Traceback" not in result.stderr
    assert listing == ["user.txt"]


@pytest.mark.parametrize(("suffix", "framework"), [(".pt", "torch"), (".npz", None), (".ckpt", "mindspore")])
def test_a_full_disk_during_convert_is_one_line_and_leaves_nothing(tmp_path, suffix, framework):
    """torch's C++ zip writer, zipfile's destructor and MindSpore's own temporary file each failed
    differently on a full disk."""
    if framework is not None and framework not in installed_backends():
        pytest.skip(f"{framework} is not installed")
    source = tmp_path / "w.safetensors"
    unitrain.make_loop("numpy", unitrain.mlp(), seed=0).save_weights(source)  # 2.6 MB: more than the disk
    result, lines, listing = on_a_full_disk(tmp_path, "convert", source, f"DISK/out{suffix}", free_kib=512)
    assert result.returncode == 2, result.stderr
    assert lines == [f"unitrain: error: {tmp_path / 'disk' / f'out{suffix}'}: No space left on device"]
    assert listing == ["user.txt"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lr"], "unitrain: error: argument --lr: expected one argument (see: unitrain train --help)"),
        (["train", "--bogus"], "unitrain: error: unrecognized arguments: --bogus"),
        (["trian"], "unitrain: error: argument COMMAND: invalid choice: 'trian'"),
        (["evaluate"], "unitrain: error: the following arguments are required: --weights"),
        (["predict", "--weights", "w", "--index", "1", "--image", "x.png"], "not allowed with argument --index"),
        (["train", "--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
        (["train", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
        (["compare", "--lr=-inf"], "argument --lr: expected a finite number, got '-inf'"),
        (["train", "--weight-decay", "inf"], "argument --weight-decay: expected a finite number, got 'inf'"),
        (["train", "--weight-decay", "nan"], "argument --weight-decay: expected a finite number, got 'nan'"),
        (["train", "--momentum", "inf"], "argument --momentum: expected a finite number, got 'inf'"),
    ],
)
def test_a_malformed_command_line_is_one_line_and_exit_2(capsys, argv, message):
    status, out, err = run_cli(capsys, *argv)
    assert status == 2 and out == ""
    one_error_line(err, message)


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        (unitrain.SGD, {"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        (unitrain.SGD, {"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0, got inf"),
        (unitrain.SGD, {"momentum": float("nan")}, "momentum must be a finite number in [0, 1), got nan"),
        (unitrain.Adam, {"betas": (0.9, float("inf"))}, "betas[1] must be a finite number in [0, 1), got inf"),
        (unitrain.AdamW, {"eps": float("inf")}, "eps must be a finite number > 0, got inf"),
    ],
)
def test_optimizers_refuse_infinite_and_nan_hyperparameters(spec, options, message):
    """For the Python API and for resumed checkpoints, whose optimizer settings come from a file."""
    with pytest.raises(ValueError) as raised:
        spec(**options)
    assert str(raised.value) == message


# --- empty test sets: refused, never NaN ---------------------------------------------------------


def test_an_empty_test_set_is_refused_and_never_evaluated_to_nan(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), np.uint8)
    dataset = tmp_path / "d.npz"
    np.savez(dataset, x_train=images, y_train=np.arange(20) % 10, x_test=images[:0], y_test=np.zeros(0, np.int64))
    metrics = tmp_path / "m.jsonl"
    status, out, err = run_cli(capsys, "train", *TINY_RUN, "--dataset", str(dataset), "--metrics", str(metrics))
    assert status == 2 and out == ""
    one_error_line(err, f"{dataset}: the test set is empty; expected at least one sample")
    assert not metrics.exists()
    with pytest.raises(DataError, match="evaluate: the dataset holds no samples"):
        unitrain.make_loop("numpy", unitrain.mlp(), seed=0).evaluate((images[:0, None] / 255, np.zeros(0, int)))


def test_the_metrics_file_is_strict_json_whatever_the_values(tmp_path):
    from unitrain.extensions import MetricsWriter

    writer = MetricsWriter(tmp_path / "m.jsonl", {"backend": "numpy"})
    writer.on_epoch_end(None, {"epoch": 1, "train_loss": float("inf"), "test_loss": float("nan"),
                               "test_accuracy": float("nan")})  # fmt: skip
    writer.finalize(None)

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    record = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=no_constants)
    assert record == {"backend": "numpy", "epoch": 1, "train_loss": None, "test_loss": None}


# --- an output that is an input: refused by every command ------------------------------------------


def test_no_command_writes_over_a_file_it_reads(tmp_path, capsys):
    """The same file by path, by another path and by a hard link, even with --overwrite."""
    weights, metrics, recipe = tmp_path / "w.safetensors", tmp_path / "m.jsonl", tmp_path / "r.toml"
    unitrain.make_loop("numpy", unitrain.mlp(), seed=0).save_weights(weights)
    metrics.write_text('{"epoch": 1, "train_loss": 2.0}\n')
    recipe.write_text("epochs = 1\n")
    (tmp_path / "sub").mkdir()
    linked, roundabout = tmp_path / "linked.jsonl", tmp_path / "sub" / ".." / "w.safetensors"
    os.link(metrics, linked)
    dataset = tmp_path / "d.npz"
    images = np.zeros((4, 28, 28), np.uint8)
    np.savez(dataset, x_train=images, y_train=np.arange(4), x_test=images, y_test=np.arange(4))
    cases = [
        (["plot", metrics, "-o", metrics], "-o", metrics, "a metrics file to draw", metrics),
        (["plot", metrics, "-o", linked], "-o", linked, "a metrics file", metrics),
        (["convert", weights, roundabout], "OUT", roundabout, "IN", weights),
        (["train", "--init-weights", weights, "--save", weights], "--save", weights, "the initial weights", weights),
        (["train", recipe, "--metrics", recipe], "--metrics", recipe, "the recipe", recipe),
        (["train", "--dataset", dataset, "--plot", dataset], "--plot", dataset, "the dataset", dataset),
        (["compare", "--dataset", dataset, "--json", dataset], "--json", dataset, "the dataset", dataset),
    ]  # fmt: skip
    before = snapshot(tmp_path)
    for argv, flag, output, what, source in cases:
        status, out, err = run_cli(capsys, *map(str, argv), "--overwrite")
        assert status == 2 and out == "", err
        one_error_line(err, f"{flag} {output} is {what}")
        assert f"({source}), which this command reads; expected another file" in err
    assert snapshot(tmp_path) == before


# --- a recipe's model is imported before any data loads, as --model's is ---------------------------


@pytest.mark.parametrize("command_line", [["train"], ["compare"], ["evaluate", "--weights", "w"],
                                          ["predict", "--weights", "w"]])  # fmt: skip
def test_a_recipe_naming_a_missing_module_is_refused_before_the_data_loads(tmp_path, capsys, monkeypatch,
                                                                           command_line):  # fmt: skip
    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded")

    monkeypatch.setattr(run_module, "load_datasets", no_data)
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "no_such_module_here:net"\n')
    recipe_flag = ["--recipe"] if command_line[0] in ("evaluate", "predict") else []
    status, out, err = run_cli(capsys, *command_line, *recipe_flag, str(recipe))
    assert status == 2 and out == ""
    one_error_line(err, "unitrain: error: model 'no_such_module_here:net': cannot import no_such_module_here: "
                        "ModuleNotFoundError")  # fmt: skip


# --- --print-recipe prints what reads back ----------------------------------------------------------


def test_print_recipe_reads_back_whatever_the_paths_hold(tmp_path, capsys):
    odd = str(tmp_path / 'we\nird "quoted"\t\\d.npz')
    status, out, err = run_cli(capsys, "train", "--dataset", odd, "--init-weights", odd + "\r", "--print-recipe")
    assert status == 0, err
    recipe = tmp_path / "r.toml"
    recipe.write_text(out)
    run = run_module.load_recipe(recipe)
    assert (run.data.dataset, run.init_weights) == (odd, odd + "\r")

    undecodable = os.fsdecode(b"\xff.npz")  # a file name that is not UTF-8: no recipe can hold it
    status, out, err = run_cli(capsys, "train", "--dataset", undecodable, "--print-recipe")
    assert status == 2 and out == ""
    one_error_line(err, "data.dataset '\\udcff.npz' is not UTF-8 text, which a recipe holds; rename the file")


def test_an_error_naming_a_path_with_a_newline_stays_one_line(tmp_path, capsys):
    status, _, err = run_cli(capsys, "train", "--dataset", str(tmp_path / "no\nsuch.npz"))
    assert status == 2
    one_error_line(err, f"dataset {tmp_path}/no\\nsuch.npz does not exist")


# --- messages say what is wrong, in the user's terms ---------------------------------------------------


def _keras_npz(path, **changes):
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), np.uint8)
    arrays = {"x_train": images, "y_train": np.arange(8) % 4, "x_test": images[:4], "y_test": np.arange(4)}
    np.savez(path, **{**arrays, **changes})
    return path


def test_messages_name_the_problem_as_the_user_sees_it(tmp_path, capsys, small_loop):
    import io
    import zipfile

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"a file, not a folder")
    huge_label = np.full(8, 2**63 + 5, np.uint64)
    wide = _keras_npz(tmp_path / "u64.npz", y_train=huge_label)
    negative = tmp_path / "negative.npz"
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (-8, 28, 28)})
    member.write(bytes(8 * 28 * 28))
    with zipfile.ZipFile(_keras_npz(tmp_path / "k.npz")) as source, zipfile.ZipFile(negative, "w") as target:
        for name in source.namelist():
            target.writestr(name, member.getvalue() if name == "x_train.npy" else source.read(name))
    cases = [
        (["--save", weights / "out.safetensors"], f"--save {weights}/out.safetensors: {weights} is a regular file, "
                                                  "expected a directory"),
        (["--dataset", wide], f"{wide}: label {2**63 + 5} is out of range; expected class indices 0..99999"),
        (["--dataset", negative], f"{negative}: x_train declares shape (-8, 28, 28); expected lengths >= 0"),
    ]  # fmt: skip
    for argv, message in cases:
        status, out, err = run_cli(capsys, "train", *TINY_RUN, *map(str, argv))
        assert status == 2 and out == ""
        assert err == f"unitrain: error: {message}\n"

    small_loop.step_count = 1
    save_checkpoint(tmp_path / "D", small_loop, epoch=0, batch=1, keep=1, run_id="one")
    with pytest.raises(CheckpointError) as raised:
        save_checkpoint(tmp_path / "D", small_loop, epoch=0, batch=1, keep=1, run_id="another")
    assert str(raised.value).endswith(f"(or continue that run: unitrain train --resume {tmp_path / 'D'})")


@pytest.mark.parametrize("suffix", [".jpg", ".svg", ".pdf"])
def test_a_figure_is_written_in_the_format_its_suffix_names(tmp_path, capsys, suffix):
    pytest.importorskip("matplotlib")
    metrics, figure = tmp_path / "m.jsonl", tmp_path / f"curves{suffix}"
    metrics.write_text('{"epoch": 1, "train_loss": 2.0, "test_loss": 1.9, "test_accuracy": 0.3}\n')
    status, _, err = run_cli(capsys, "plot", str(metrics), "-o", str(figure))
    assert status == 0, err
    signature = {".jpg": b"\xff\xd8\xff", ".svg": b"<?xml", ".pdf": b"%PDF"}[suffix]
    assert figure.read_bytes().startswith(signature)


def test_a_figure_format_matplotlib_cannot_write_is_refused_before_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for name in ("curves.xyz", "curves"):
        status, out, err = run_cli(capsys, "train", "--plot", str(tmp_path / name))
        assert status == 2 and out == ""
        one_error_line(err, f"--plot {tmp_path / name} ")
        assert "expected one of .eps, " in err and ".png" in err
    assert list(tmp_path.iterdir()) == []


# --- found while porting tutorial scripts ----------------------------------------------------------


def test_a_framework_model_on_another_backend_is_told_where_it_trains():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError) as raised:
        unitrain.make_loop("numpy", torch.nn.Linear(784, 10))
    assert str(raised.value) == (
        "model must be a unitrain model spec (Sequential, Residual), got torch.nn.modules.linear.Linear, a torch "
        "model: train it with make_loop('torch', model)"
    )


def test_a_custom_loss_that_would_pair_every_sample_with_every_target_is_refused():
    """(N, 1) predictions minus (N,) targets broadcast to (N, N); PyTorch's mse_loss only warns."""
    loss = unitrain.CustomLoss(lambda pred, target: ((pred - target) ** 2).mean())
    loop = unitrain.make_loop("numpy", unitrain.Sequential(unitrain.Flatten(), unitrain.Linear(4, 1)), loss=loss)
    x = np.zeros((8, 1, 2, 2), np.float32)
    with pytest.raises(unitrain.loop.InputError) as raised:
        loop.step((x, np.zeros(8, np.float32)))
    assert str(raised.value) == (
        "CustomLoss on outputs of shape (8, 1), targets (8,): sub of shapes (8, 1) and (8,) would broadcast the "
        "samples of one against another axis of the other, to (8, 8); give both the same axes (reshape the "
        "prediction or the target)"
    )
    assert loop.step_count == 0
    loop.step((x, np.zeros((8, 1), np.float32)))  # the same axes: accepted
    assert loop.step_count == 1


if __name__ == "__main__":  # the full sweep: python tests/test_hostile_runs.py [COUNT]
    print(sweep(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
