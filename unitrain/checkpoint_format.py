"""A checkpoint folder's files and its manifest, ``checkpoint.json``: their names, what the
manifest must hold (:data:`MANIFEST_SCHEMA`), reading it, and the digests that tie each file to it.

:mod:`unitrain.checkpoint` writes and loads checkpoints (checking each file against the manifest
before reading it); this module holds what describes their format. A manifest is read here both to
load its checkpoint and to learn which run wrote it, before another run's is written beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import optim
from .layers import MODEL_PATTERN
from .losses import LOSSES, CustomLoss
from .reading import (
    Closed,
    Int,
    ListOf,
    MapOf,
    Nullable,
    Number,
    OneOf,
    Optional,
    Text,
    check_json,
    path_problem,
    read_capped,
    short,
)
from .weights import WeightsError

FORMAT, FORMAT_VERSION = "unitrain-checkpoint", 1
MANIFEST, WEIGHTS, OPTIMIZER = "checkpoint.json", "weights.safetensors", "optimizer.safetensors"
RANDOM = "random.safetensors"  # only when the loop has a random state
BEST = "best.safetensors"  # only when the loop's early stopping has a best epoch
#: a run's id: Checkpointer's is uuid4().hex; a name of the caller's own is a short token (never a path)
RUN_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
#: the most processes a data-parallel run records (no launcher here starts more)
MAX_WORLD_SIZE = 1 << 16


class CheckpointError(WeightsError):
    """A checkpoint that is missing, damaged, or does not fit the run resuming from it."""


def file_digest(path: Path) -> dict[str, Any]:
    """A file's size and sha256, as the manifest records them."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):  # in pieces: memory stays bounded
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


_DIGEST = {"bytes": Int(), "sha256": Text("[0-9a-f]{64}")}
_PER_CHANNEL, _PER_CHANNEL_POSITIVE = ListOf(Number(), 1, 4), ListOf(Number(0, above=True), 1, 4)
#: what a manifest must hold (fields it may add are ignored); see unitrain.checkpoint.save_checkpoint
MANIFEST_SCHEMA = {
    "format": OneOf((FORMAT,)),
    "format_version": OneOf((FORMAT_VERSION,)),
    "step": Int(),
    "epoch": Int(),
    "batch": Int(),
    "finished": bool,
    "backend": str,
    # every process of a data-parallel run has a rank; no launcher here starts more than this many
    "world_size": Optional(Int(1, MAX_WORLD_SIZE)),
    "versions": Optional(MapOf(str, Nullable(str))),
    "seed": Int(),
    "dtype": Optional(OneOf(("float32", "float64"))),
    "optimizer": {
        "type": OneOf(tuple(cls.__name__ for cls in optim.OPTIMIZERS.values())),
        "lr": Number(),
        "weight_decay": Number(),
        "momentum": Optional(Number()),
        "dampening": Optional(Number()),
        "nesterov": Optional(bool),
        "lr_in_velocity": Optional(bool),
        "betas": Optional([Number(), Number()]),
        "eps": Optional(Number()),
        "eps_placement": Optional(OneOf(optim.EPS_PLACEMENTS)),
        "alpha": Optional(Number()),
        "centered": Optional(bool),
        "lr_decay": Optional(Number()),
        "initial_accumulator_value": Optional(Number()),
        "rho": Optional(Number()),
    },
    # the live lr, the schedule and its position (steps taken), clipping; absent in older checkpoints
    "lr": Optional(Number(0)),
    # restoring replays the schedule step by step (PyTorch's floats depend on the path), a few µs each:
    # 10^8 steps bounds that at minutes, and no run takes as many (90 ImageNet epochs per batch: 4.5e5)
    "lr_schedule": Optional(Nullable({"schedule": str, "position": Int(0, 10**8)})),
    "clip_grad": Optional({"norm": Nullable(Number(0)), "value": Nullable(Number(0))}),
    "loss": Optional(OneOf((*(spec.__name__ for spec in LOSSES.values()), CustomLoss.__name__))),
    "data_order": Optional(str),
    "epoch_loss": {"sum": Number(), "count": Int()},  # count: the steps into the epoch, `batch` (checked on loading)
    "epoch_correct": Optional(Nullable({"correct": Int(), "samples": Int()})),  # absent in older checkpoints
    # the run (unitrain.run.Run.to_dict(), checked when resumed; a checkpoint written from Python may
    # have none); its model is checked here, as the weights are read against a preset's shapes
    "run": {"model": Optional(Text(MODEL_PATTERN))},
    # per channel: a dataset has 1..4 (Keras-style .npz, image folders, CIFAR-10: at most RGBA)
    "normalization": Optional(Nullable({"mean": _PER_CHANNEL, "std": _PER_CHANNEL_POSITIVE, "source": str})),
    "created": Optional(str),
    # which run wrote it; absent in older checkpoints
    "run_id": Optional(Nullable(Text(RUN_ID_PATTERN))),
    # unitrain.controls.EarlyStoppingState.to_json(); absent in older checkpoints
    "early_stopping": Optional(
        Nullable({"spec": dict, "best": Nullable(Number()), "best_epoch": Int(), "wait": Int(), "stopped": bool})
    ),
    "files": Closed({WEIGHTS: _DIGEST, OPTIMIZER: _DIGEST, RANDOM: Optional(_DIGEST), BEST: Optional(_DIGEST)}),
}
#: a manifest is about 1.5 kB; anything far larger is not one
_MAX_MANIFEST_BYTES = 1 << 20


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, parsed and validated against :data:`MANIFEST_SCHEMA`."""

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path.parent} is damaged: {why}")

    if problem := path_problem(path):
        raise damaged(f"{MANIFEST} {problem}")
    if (text := read_capped(path, _MAX_MANIFEST_BYTES)) is None:
        raise damaged(f"{MANIFEST} is over {_MAX_MANIFEST_BYTES} bytes, not a manifest")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as error:  # ValueError: not JSON, or an integer of over 4300 digits
        raise damaged(f"{MANIFEST} is not valid JSON ({str(error)[:200]})") from None
    version = manifest.get("format_version", FORMAT_VERSION) if isinstance(manifest, dict) else FORMAT_VERSION
    if version != FORMAT_VERSION and manifest.get("format") == FORMAT:
        raise CheckpointError(f"checkpoint {path.parent} has format version {short(version)}; "
                              f"this unitrain reads version {FORMAT_VERSION}")  # fmt: skip
    try:
        check_json(manifest, MANIFEST_SCHEMA)
    except ValueError as error:
        raise damaged(f"{MANIFEST} {error}") from None
    return manifest
