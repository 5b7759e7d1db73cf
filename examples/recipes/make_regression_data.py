"""Writes ``regression.npz`` beside this file (Keras' layout: ``x_train, y_train, x_test, y_test``):
800 + 200 samples of 8 standard-normal features and 2 smooth nonlinear targets plus noise, a small
stand-in for a tabular regression set (California housing's 8 features)."""

from pathlib import Path

import numpy as np


def make(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1000, 8)).astype(np.float32)
    y = np.stack([np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2], np.tanh(x[:, 3] - x[:, 4]) + 0.1 * x[:, 5:].sum(1)], 1)
    y = (y + 0.05 * rng.standard_normal(y.shape)).astype(np.float32)
    np.savez(path, x_train=x[:800], y_train=y[:800], x_test=x[800:], y_test=y[800:])


if __name__ == "__main__":
    make(Path(__file__).with_name("regression.npz"))
