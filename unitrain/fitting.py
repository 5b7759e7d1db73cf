"""Training and evaluating over a whole dataset: :meth:`~unitrain.TrainingLoop.fit` and
:meth:`~unitrain.TrainingLoop.evaluate`, built on the protocol's step and hooks (the contract is
:mod:`unitrain.loop`'s docstring)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import class_targets, expr, graph_batches
from .controls import EarlyStopping, EarlyStoppingState
from .data import ArrayDataset, DataError
from .losses import BCELoss, BCEWithLogitsLoss, CustomLoss
from .schedules import check_schedule_length

if TYPE_CHECKING:
    from .loop import TrainingLoop


class Fitting:
    """The part of :class:`~unitrain.loop.TrainingLoop` that runs epochs and measures datasets."""

    def evaluate(self, dataset: ArrayDataset | tuple, batch_size: int = 1000) -> dict[str, float]:
        """``{"loss", "accuracy", "num_correct", "num_samples"}`` over the whole dataset in eval
        mode; ``loss`` is the mean per-sample loss whatever the loss spec's reduction. What the
        targets are decides the rest (:meth:`_measures`): ``accuracy`` counts ``argmax(pred) == y``
        for class indices, ``argmax(pred) == argmax(y)`` for class probabilities of the class
        losses and one-hot targets of the other elementwise losses, and for ``BCEWithLogitsLoss``
        and ``BCELoss`` the share of labels whose logit's sign (probability's side of 0.5) matches
        the 0/1 target (Keras' ``binary_accuracy``); NaN otherwise (a CustomLoss, regression). The
        elementwise losses but the binary ones add ``mse`` and ``mae``, the mean squared and
        absolute errors per element."""
        dataset = ArrayDataset.of(dataset)
        if len(dataset) == 0:  # no mean loss, no accuracy: only NaN and 0/0
            raise DataError("evaluate: the dataset holds no samples; expected at least one")
        if self._output_count > 1:
            return graph_batches.evaluate(self, dataset, batch_size)
        total_loss, correct, squared, absolute = 0.0, 0, 0.0, 0.0
        accuracy, errors = self._measures(np.asarray(dataset.y))
        class_indices = self._counts_correct(np.asarray(dataset.y))
        with eval_mode(self):
            for x, y in dataset.batches(batch_size):
                x, y = self._check_batch((x, y))
                if isinstance(self.loss_spec, CustomLoss):
                    tree, pred = self.loss_spec.tree, self._predict(x)
                    total_loss += sum(expr.numpy_value(tree, pred[i : i + 1], y[i : i + 1]) for i in range(len(x)))
                    continue
                batch_loss, batch_correct = self._evaluate_batch(x, y)
                total_loss += batch_loss
                if class_indices:
                    correct += batch_correct
                elif accuracy or errors:  # measured from the predictions, in float64
                    pred, target = self._predict(x).astype(np.float64), y.astype(np.float64)
                    if (threshold := _BINARY_THRESHOLDS.get(type(self.loss_spec))) is not None:
                        correct += int(((pred > threshold) == (target > 0.5)).sum())
                    elif accuracy:
                        correct += int((pred.argmax(1) == target.argmax(1)).sum())
                    if errors:
                        squared += float(np.square(pred - target).sum())
                        absolute += float(np.abs(pred - target).sum())
        n = len(dataset)
        # class indices: means over the targets that count (every position's, ignored ones left out)
        targets = class_targets.counted(self.loss_spec, dataset.y) if class_indices else n
        per_sample = total_loss / targets
        elements = max(1, int(np.prod(dataset.y.shape[1:])))
        if not self.loss_spec.class_targets and not isinstance(self.loss_spec, CustomLoss):
            per_sample /= elements  # elementwise losses average elements
        counted = n * elements if type(self.loss_spec) in _BINARY_THRESHOLDS else targets
        metrics = {
            "loss": per_sample,
            "accuracy": correct / counted if counted and accuracy else float("nan"),
            "num_correct": correct,
            "num_samples": n,
        }
        if errors:
            metrics["mse"] = squared / (n * elements) if n else float("nan")
            metrics["mae"] = absolute / (n * elements) if n else float("nan")
        return metrics

    def _measures(self, y: np.ndarray) -> tuple[bool, bool]:
        """``(accuracy, errors)``: whether :meth:`evaluate` measures an accuracy and the mean
        squared and absolute errors for targets like ``y``."""
        if isinstance(self.loss_spec, CustomLoss):
            return False, False
        if self.loss_spec.class_targets:
            return True, False
        if type(self.loss_spec) in _BINARY_THRESHOLDS:
            return True, False
        one_hot = y.ndim == 2 and y.size > 0 and bool(np.isin(y, (0, 1)).all() and (y.sum(1) == 1).all())
        return one_hot, True

    def fit(
        self,
        train_data: ArrayDataset | tuple,
        *,
        epochs: int = 1,
        batch_size: int = 64,
        shuffle: bool = True,
        max_steps: int | None = None,
        eval_data: ArrayDataset | tuple | None = None,
        val_data: ArrayDataset | tuple | None = None,
        extensions: Iterable[Any] = (),
        start_epoch: int = 0,
        start_batch: int = 0,
        accumulate_grad_batches: int = 1,
        early_stopping: EarlyStopping | None = None,
        drop_last: bool = False,
        test_batch_size: int = 1000,
    ) -> list[dict[str, float]]:
        """Train for ``epochs`` epochs (or until ``max_steps`` optimizer steps in total).

        Batch order is :meth:`ArrayDataset.batches` with this loop's seed: identical on every
        backend. Returns one record per epoch: ``epoch``, ``steps``, ``train_loss`` (mean of the
        epoch's step losses), ``lr`` (the lr of the epoch's first step), ``samples_per_sec``; with
        integer class targets ``train_accuracy`` (of the training forward passes, in training mode,
        as the weights moved: no extra pass; absent if the adapter's ``_step_correct`` is ``None``;
        data parallel: the ranks' counts summed, as one process would count);
        with ``val_data`` (a validation split) ``val_loss`` / ``val_accuracy``; with ``eval_data``
        ``test_loss`` / ``test_accuracy`` (both from :meth:`evaluate` after the epoch). The
        ``lr_schedule`` steps after each step (per-batch schedules) or after each epoch that ran all
        its batches, before the extensions' ``on_step_end`` / ``on_epoch_end`` (a checkpoint written
        there holds the schedule's new position).

        ``extensions`` are duck-typed hooks, as in Chainer's trainer; each may define any of
        ``on_fit_start(loop, plan)``, ``on_epoch_start(loop, epoch)``,
        ``on_step_end(loop, step_in_epoch, loss)`` (``loss`` native; read it only when needed, it
        syncs; the step's ``loop.last_batch_size`` and ``loop.last_batch_correct``, native or None
        where not counted, tally ``train_accuracy``), ``on_epoch_end(loop, record)`` and
        ``finalize(loop)``, which always runs, even when training raises.

        ``start_epoch`` / ``start_batch`` resume a run: training begins at that batch of that
        epoch (0-based), in the order an uninterrupted run would have used (``train_loss`` and
        ``train_accuracy`` of the resumed epoch then cover its remaining batches).

        ``drop_last`` leaves out each epoch's last batch when it is smaller than ``batch_size``
        (PyTorch's DataLoader); ``test_batch_size`` is the batch size of the evaluations.

        ``accumulate_grad_batches=K`` (Lightning's name and rule): each optimizer step applies the
        gradients of K consecutive batches of an epoch, each batch's loss divided by K (an epoch's
        last step may have fewer batches; it is still divided by K); ``steps``, ``max_steps``,
        the schedules and ``on_step_end`` count optimizer steps (whose loss is the mean of its
        batches' losses), and a resume starts at a step's first batch. BatchNorm normalises each
        batch with its own statistics.

        ``early_stopping`` (:class:`~unitrain.controls.EarlyStopping`) watches a metric of the
        epoch records and stops after the epoch whose record exhausts its patience (setting
        :attr:`stop_training` before the extensions' ``on_epoch_end``); the history keeps every
        epoch trained. :attr:`early_stopping` holds the best value, epoch and weights, which are
        loaded at the end with ``restore_best_weights``. A loop whose ``early_stopping`` state a
        checkpoint restored (same spec) continues it.
        """
        train_data = ArrayDataset.of(train_data)
        evaluated = {prefix: ArrayDataset.of(data) for prefix, data in (("val", val_data), ("test", eval_data))
                     if data is not None}  # fmt: skip
        _check_count("epochs", epochs, minimum=0)
        _check_count("batch_size", batch_size, minimum=1)
        _check_count("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        _check_count("test_batch_size", test_batch_size, minimum=1)
        group = accumulate_grad_batches
        if max_steps is not None:
            _check_count("max_steps", max_steps, minimum=0)
        if group > 1 and self.world_size > 1:
            raise ValueError("accumulate_grad_batches > 1 is not available in data-parallel runs; "
                             "a larger global batch is the same")  # fmt: skip
        if start_batch % group:
            raise ValueError(f"start_batch {start_batch} is inside an optimizer step of {group} batches; "
                             f"a resume starts at a multiple of {group}")  # fmt: skip
        count_correct = self._counts_correct(np.asarray(train_data.y))
        if early_stopping is not None:
            if not isinstance(early_stopping, EarlyStopping):
                raise TypeError(f"early_stopping must be a unitrain.controls.EarlyStopping, got {early_stopping!r}")
            accuracy, errors = self._measures(np.asarray(train_data.y))
            early_stopping.check_available("val" in evaluated, "test" in evaluated, accuracy, errors)
            if self.early_stopping is None or self.early_stopping.spec != early_stopping:
                self.early_stopping = EarlyStoppingState(early_stopping)
        extensions = list(extensions)
        batches_per_epoch = train_data.num_batches(batch_size, drop_last)
        if batches_per_epoch == 0 and epochs > start_epoch:
            raise ValueError(f"drop_last with batch_size {batch_size} leaves no batch of {len(train_data)} samples")
        steps_per_epoch = -(-batches_per_epoch // group)
        steps_left = None if max_steps is None else max_steps - self.step_count
        if epochs > start_epoch and (steps_left is None or steps_left > 0) and self.model_spec is not None:
            # the epoch's last batch is reached unless max_steps ends the run before it
            reached = steps_left is None or steps_left * group >= batches_per_epoch - start_batch
            self._check_epoch_batches(train_data, batch_size, drop_last, reached)
        check_schedule_length(self.lr_schedule, epochs, steps_per_epoch, max_steps)
        _call(extensions, "on_fit_start", self, {"epochs": epochs, "steps_per_epoch": batches_per_epoch})
        history = []
        self.stop_training = bool(self.early_stopping is not None and self.early_stopping.stopped and early_stopping)
        try:
            for epoch in range(start_epoch, epochs):
                if (max_steps is not None and self.step_count >= max_steps) or self.stop_training:
                    break
                self.train()
                _call(extensions, "on_epoch_start", self, epoch)
                losses, corrects, seen, started, epoch_lr = [], [], 0, time.perf_counter(), self.lr
                scored = 0  # class-index targets that count, what train_accuracy divides by
                first = start_batch if epoch == start_epoch else 0
                batches = train_data.batches(batch_size, shuffle=shuffle, seed=self.seed, epoch=epoch, start=first,
                                             drop_last=drop_last)  # fmt: skip
                pending = []  # an accumulated step's batches: (index, x, y)
                for index, (x, y) in enumerate(batches, start=first):
                    if max_steps is not None and self.step_count >= max_steps:
                        break
                    if group > 1:
                        pending.append((index, x, y))
                        if len(pending) < group and index + 1 < batches_per_epoch:
                            continue
                        loss, correct = self._accumulated_step(pending, group, count_correct)
                        samples = sum(_samples(y) for _, _, y in pending)
                        scored += sum(_scored(self, y, count_correct) for _, _, y in pending)
                        pending = []
                    else:
                        loss = self.step((x, y))
                        if count_correct:
                            correct = self._shard_correct if self.world_size > 1 else self._step_correct(y)
                        samples = _samples(y)
                        scored += _scored(self, y, count_correct)
                    losses.append(loss)
                    seen += samples
                    self.last_batch_size, self.last_batch_correct = samples, None
                    if count_correct:
                        self.last_batch_correct = correct
                        corrects.append(correct)
                    if self._scheduler is not None and self.lr_schedule.per_batch:
                        self._step_schedule()
                    _call(extensions, "on_step_end", self, index, loss)
                elapsed = time.perf_counter() - started
                record = {
                    "epoch": epoch + 1,
                    "steps": self.step_count,
                    "train_loss": float(np.mean([self.to_float(v) for v in losses])) if losses else float("nan"),
                    "lr": epoch_lr,
                    "samples_per_sec": seen / elapsed if elapsed > 0 else float("nan"),
                }
                if count_correct and None not in corrects:
                    correct_total = sum(self.to_float(c) for c in corrects)
                    record["train_accuracy"] = correct_total / scored if scored else float("nan")
                if self.rank == 0:  # evaluation on rank 0 only (module docstring)
                    for prefix, data in evaluated.items():
                        metrics = self.evaluate(data, test_batch_size)
                        record[f"{prefix}_loss"] = metrics["loss"]
                        record[f"{prefix}_accuracy"] = metrics["accuracy"]
                        record.update({f"{prefix}_{key}": metrics[key] for key in ("mse", "mae") if key in metrics})
                history.append(record)
                completed = first // group + len(losses) == steps_per_epoch
                if self._scheduler is not None and not self.lr_schedule.per_batch and completed:
                    self._step_schedule()
                if early_stopping is not None and completed:
                    self.stop_training = self.early_stopping.update(record, self.state_dict)
                _call(extensions, "on_epoch_end", self, record)
        finally:
            _call(extensions, "finalize", self)
        if early_stopping is not None and early_stopping.restore_best_weights and self.early_stopping.best_weights:
            self.load_state_dict(self.early_stopping.best_weights, source="early stopping's best weights")
        return history

    def _accumulated_step(self, batches, group: int, count_correct: bool) -> tuple[Any, Any]:
        """One optimizer step on the gradients of ``batches`` (``(index, x, y)``), each batch's
        loss divided by ``group``; returns the mean of the batches' losses and the number of
        correct training predictions (native scalars; None when not counted)."""
        self.zero_grad()
        losses, correct = [], 0 if count_correct else None
        for _, x, y in batches:
            pred = self.forward(x)
            loss = self.loss(pred, y)
            self.backward(loss)
            losses.append(loss)
            if count_correct:
                counted = self._count_correct(pred, self._check_y(y, len(x), x.shape[1:]))
                correct = None if counted is None or correct is None else correct + counted
        self._scale_gradients(1 / group)
        self.update()
        return sum(self.to_float(loss) for loss in losses) / len(losses), correct


class eval_mode:
    """Temporarily switch a loop to eval mode, restoring the previous mode."""

    def __init__(self, loop: TrainingLoop):
        self.loop = loop

    def __enter__(self):
        self.was_training = self.loop.training
        if self.was_training:
            self.loop._set_training(False)
            self.loop.training = False  # what the batch checks read (a graph's noise: evaluation's)

    def __exit__(self, *exc):
        if self.was_training:
            self.loop._set_training(True)
            self.loop.training = True


def _call(extensions, hook: str, *args) -> None:
    for extension in extensions:
        method = getattr(extension, hook, None)
        if method is not None:
            method(*args)


#: the binary losses' decision threshold on a prediction: a logit's sign, a probability's half
_BINARY_THRESHOLDS = {BCEWithLogitsLoss: 0.0, BCELoss: 0.5}


def _scored(loop, y, count_correct: bool) -> int:
    """How many of a batch's class-index targets a training accuracy divides by (0 if not counted)."""
    return class_targets.counted(loop.loss_spec, np.asarray(y)) if count_correct else 0


def _samples(y) -> int:
    """How many samples a batch's targets hold (a tuple: one array per output)."""
    return len(y[0]) if isinstance(y, tuple) else len(y)


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
