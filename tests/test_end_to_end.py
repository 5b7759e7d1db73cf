"""The tutorial's accuracy, on the real command line: MNIST, the tutorial MLP, its default settings."""

import json
import subprocess
import sys

import pytest
from conftest import installed_backends


@pytest.mark.slow
@pytest.mark.parametrize("backend", installed_backends())
def test_three_tutorial_epochs_reach_the_published_accuracy(backend, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "unitrain", "train", "--backend", backend, "--metrics", str(metrics), "--no-progress"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"backend", "epoch", "train_loss", "test_loss", "test_accuracy", "samples_per_sec"} <= set(records[0])
    assert records[0]["test_accuracy"] >= 0.90, records
    assert records[2]["test_accuracy"] >= 0.92, records
    assert records[2]["train_loss"] < records[0]["train_loss"]
    assert result.stdout.count("test accuracy") == 3
