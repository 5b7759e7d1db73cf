"""PyTorch backend: ``torch.nn`` layers in an ``nn.Sequential`` with the spec's indices (so native
``state_dict`` keys are the canonical ones), ``torch.nn.functional`` losses and ``torch.optim``
SGD/Adam/AdamW with ``foreach=False`` (PyTorch's single-tensor equations, which unitrain.optim
reproduces).

Dropout draws from this loop's own random stream (the one ``torch.manual_seed(seed)`` starts),
swapped into the device's default generator only for training forwards: results depend on the
seed alone, and the user's global torch RNG is neither reset nor advanced. Layers are built with ``skip_init`` for the
same reason (their weights come from ``init_weights`` anyway).

A native ``torch.nn.Module`` is trained on the device of its parameters (CPU or CUDA); it is cast
to the loop's dtype in place.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from unitrain import layers
from unitrain.loop import TrainingLoop
from unitrain.losses import CrossEntropyLoss, MSELoss, NLLLoss
from unitrain.optim import SGD, Adam

_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_CRITERIA = {CrossEntropyLoss: F.cross_entropy, NLLLoss: F.nll_loss, MSELoss: F.mse_loss}


def _module(spec: layers.Layer, dtype: torch.dtype) -> nn.Module:
    if isinstance(spec, layers.Sequential):
        return nn.Sequential(*(_module(layer, dtype) for layer in spec))
    if isinstance(spec, layers.Linear):
        return skip_init(nn.Linear, spec.in_features, spec.out_features, bias=spec.bias, dtype=dtype)
    if isinstance(spec, layers.Conv2d):
        return skip_init(
            nn.Conv2d, spec.in_channels, spec.out_channels, spec.kernel_size,
            stride=spec.stride, padding=spec.padding, bias=spec.bias, dtype=dtype,
        )  # fmt: skip
    if isinstance(spec, layers._BatchNorm):
        cls = nn.BatchNorm1d if isinstance(spec, layers.BatchNorm1d) else nn.BatchNorm2d
        return skip_init(cls, spec.num_features, eps=spec.eps, momentum=spec.momentum, dtype=dtype)
    if isinstance(spec, layers.MaxPool2d):
        return nn.MaxPool2d(spec.kernel_size, stride=spec.step)
    if isinstance(spec, layers.Dropout):
        return nn.Dropout(spec.p)
    if isinstance(spec, layers.ReLU):
        return nn.ReLU()
    if isinstance(spec, layers.Flatten):
        return nn.Flatten()
    raise TypeError(f"the torch backend cannot build {spec!r}")


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A host copy that does not alias the tensor (one copy whatever the device)."""
    return tensor.detach().to("cpu", copy=True).numpy()


class TorchLoop(TrainingLoop):
    name = "torch"
    framework = "torch"
    capabilities = frozenset({"dropout", "batchnorm", "conv", "native-model", "float64", "random-state"})

    # --- building -------------------------------------------------------------------------

    def _build(self, model: layers.Sequential) -> None:
        self._adopt(_module(model, _DTYPES[self.dtype]))

    def _wrap_native(self, model: nn.Module) -> None:
        self._adopt(model.to(dtype=_DTYPES[self.dtype]))

    @classmethod
    def is_native_model(cls, model: Any) -> bool:
        framework = sys.modules.get("torch")
        return framework is not None and isinstance(model, framework.nn.Module)

    @classmethod
    def native_example_model(cls) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def _adopt(self, model: nn.Module) -> None:
        self.model = model
        self._params = dict(model.named_parameters())
        self._device = next(iter(self._params.values())).device if self._params else torch.device("cpu")
        if self._device.type == "cpu":
            self._generator = torch.default_generator
        elif self._device.type == "cuda":
            self._generator = torch.cuda.default_generators[self._device.index]
        else:
            raise TypeError(f"the torch backend trains CPU or CUDA models, got one on {self._device}")
        self._rng_state = torch.Generator(self._device).manual_seed(self.seed).get_state()
        self._criterion = _CRITERIA[type(self.loss_spec)]
        spec = self.optimizer_spec
        params = list(self._params.values())
        if isinstance(spec, SGD):
            self.optimizer = torch.optim.SGD(
                params, lr=spec.lr, momentum=spec.momentum, dampening=spec.dampening,
                weight_decay=spec.weight_decay, nesterov=spec.nesterov, foreach=False,
            )  # fmt: skip
        else:
            cls = torch.optim.AdamW if spec.decoupled_weight_decay else torch.optim.Adam
            self.optimizer = cls(
                params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, foreach=False
            )

    # --- helpers --------------------------------------------------------------------------

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        # from_numpy shares the batch's memory; it rejects negative strides and warns on
        # read-only arrays, so those (rare) are copied first.
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = np.array(array)
        return torch.from_numpy(array).to(self._device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward; in training, random draws (dropout) come from the loop's stream."""
        if not self.model.training:
            return self.model(x)
        outer = self._generator.get_state()
        self._generator.set_state(self._rng_state)
        try:
            return self.model(x)
        finally:
            self._rng_state = self._generator.get_state()
            self._generator.set_state(outer)

    def _loss_of(self, pred: torch.Tensor, y: np.ndarray, reduction: str) -> torch.Tensor:
        return self._criterion(pred, self._tensor(y), reduction=reduction)

    # --- hooks ----------------------------------------------------------------------------

    @staticmethod
    def to_float(value: torch.Tensor) -> float:
        # float() warns on a tensor that requires grad (what loss() returns); item() reads both kinds
        return value.item()

    def _set_training(self, mode: bool) -> None:
        self.model.train(mode)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def _forward(self, x: np.ndarray) -> torch.Tensor:
        return self._run(self._tensor(x))

    def _loss(self, pred: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        return self._loss_of(pred, y, self.loss_spec.reduction)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _update(self) -> None:
        self.optimizer.step()

    def _step(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        self.optimizer.zero_grad()
        pred = self._run(self._tensor(x))
        loss = self._loss_of(pred, y, self.loss_spec.reduction)
        loss.backward()
        self.optimizer.step()
        self._step_pred = pred.detach()
        return loss.detach()

    def _step_correct(self, y: np.ndarray) -> torch.Tensor:
        return (self._step_pred.argmax(1) == self._tensor(y)).sum()

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        return _numpy(value)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return _numpy(self.model(self._tensor(x)))

    def _evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        with torch.no_grad():
            pred = self.model(self._tensor(x))
            total = self._loss_of(pred, y, "sum")
            if not self.loss_spec.class_targets:
                return float(total), 0
            correct = (pred.argmax(1) == self._tensor(y)).sum()
            return float(total), int(correct)

    def _gradients(self) -> dict[str, np.ndarray]:
        # zero_grad sets gradients to None (PyTorch's default), which reads as zeros
        return {name: _numpy(torch.zeros_like(p) if p.grad is None else p.grad) for name, p in self._params.items()}

    def _state_dict(self) -> dict[str, np.ndarray]:
        return {key: _numpy(value) for key, value in self.model.state_dict().items()}

    def _load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        # torch.tensor copies: the arrays may be read-only, and the parameters are copied into in place anyway
        self.model.load_state_dict({key: torch.tensor(value) for key, value in state.items()})

    def _optimizer_state_dict(self) -> dict[str, np.ndarray]:
        state = {"step": np.array(self.step_count, np.int64)}
        for name, p in self._params.items():
            buffers = self.optimizer.state.get(p, {})
            for key in self.optimizer_spec.state_names:
                if buffers.get(key) is not None:
                    state[f"{name}.{key}"] = _numpy(buffers[key])
        return state

    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        names = self.optimizer_spec.state_names
        loaded = {}
        for name, p in self._params.items():
            if names and f"{name}.{names[0]}" in state:  # all buffers or none (checked by the caller)
                buffers = {key: torch.tensor(state[f"{name}.{key}"], device=p.device) for key in names}
                if isinstance(self.optimizer_spec, Adam):
                    # Adam keeps its bias-correction count per parameter
                    buffers["step"] = torch.tensor(float(state["step"]))
                loaded[p] = buffers
        self.optimizer.state.clear()
        self.optimizer.state.update(loaded)

    def _random_state(self) -> dict[str, np.ndarray]:
        return {"torch_generator": self._rng_state.numpy().copy()}

    def _load_random_state(self, state: Mapping[str, np.ndarray]) -> None:
        restored = torch.from_numpy(np.array(state["torch_generator"]))
        try:  # set_state validates the bytes (size, and the generator's own checks)
            torch.Generator(self._device).set_state(restored)
        except RuntimeError as error:
            raise ValueError(str(error)) from None
        self._rng_state = restored
