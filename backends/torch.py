"""PyTorch backend: the spec tree built with ``torch.nn`` (an ``nn.Sequential`` with the spec's child
names for each ``Sequential``, a small module for each ``Residual``), so native ``state_dict`` keys are
the canonical ones (torchvision's for ``resnet18()``); ``torch.nn.functional`` losses, a ``CustomLoss``
evaluated on torch tensors (autograd differentiates it); the ``torch.optim`` class of the spec's name with
``foreach=False`` (PyTorch's single-tensor equations, which unitrain.optim reproduces).

Dropout draws from this loop's own random stream (the one ``torch.manual_seed(seed)`` starts),
swapped into the device's default generator only for training forwards: results depend on the
seed alone, and the user's global torch RNG is neither reset nor advanced. Layers are built with ``skip_init`` for the
same reason (their weights come from ``init_weights`` anyway).

A native ``torch.nn.Module`` is trained on the device of its parameters (CPU or CUDA); it is cast
to the loop's dtype in place.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from unitrain import attention, expr, layers, losses, optim, sequences
from unitrain.graph import Graph
from unitrain.loop import CAPABILITIES, TrainingLoop
from unitrain.randomness import rank_seed

from . import torch_attention
from .torch_graph import GraphModule

_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}

#: Leaves without weights whose spec fields are ``torch.nn``'s constructor arguments, name for name.
_PLAIN_LEAVES = (
    layers.Identity, layers.ReLU, layers.Tanh, layers.Sigmoid, layers.GELU, layers.LeakyReLU, layers.SiLU,
    layers.ELU, layers.Softmax, layers.LogSoftmax, layers.Flatten, layers.Dropout, layers.MaxPool2d,
    layers.AvgPool2d, layers.AdaptiveAvgPool2d, layers.Upsample, sequences.MaxPool1d, sequences.AvgPool1d,
    sequences.AdaptiveAvgPool1d,
)  # fmt: skip

#: The built-in loss specs' ``torch.nn.functional`` twins; each spec's fields (``reduction``,
#: ``label_smoothing``, ``beta``, ``delta``) are the function's keyword arguments, name for name.
_FUNCTIONAL_LOSSES = {
    losses.CrossEntropyLoss: F.cross_entropy, losses.NLLLoss: F.nll_loss, losses.MSELoss: F.mse_loss,
    losses.BCEWithLogitsLoss: F.binary_cross_entropy_with_logits, losses.BCELoss: F.binary_cross_entropy,
    losses.L1Loss: F.l1_loss,
    losses.SmoothL1Loss: F.smooth_l1_loss, losses.HuberLoss: F.huber_loss,
}  # fmt: skip


def _expr_ops(dtype: torch.dtype, device: torch.device) -> dict:
    """``unitrain.expr``'s operations as torch functions; constants become tensors of the loop's dtype."""
    return {
        "const": lambda value: torch.tensor(value, dtype=dtype, device=device),
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "neg": torch.neg,
        "pow": lambda a, exponent: torch.pow(a, exponent),
        "sum": lambda a, axis: a.sum() if axis is None else a.sum(axis),
        "mean": lambda a, axis: a.mean() if axis is None else a.mean(axis),
        "abs": torch.abs, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "square": torch.square,
        "maximum": torch.maximum, "minimum": torch.minimum,
        "log_softmax": lambda a, axis: torch.log_softmax(a, axis), "softmax": lambda a, axis: torch.softmax(a, axis),
        "item": lambda a, index: a[index],
    }  # fmt: skip


class _Residual(nn.Module):
    """``post(body(x) + downsample(x))``. The body's layers are registered directly on the block
    and the shortcut as ``downsample``, so parameter names are torchvision's BasicBlock's
    (``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``)."""

    def __init__(self, body: dict[str, nn.Module], downsample: nn.Module | None, post: nn.Module | None):
        super().__init__()
        for name, module in body.items():
            self.add_module(name, module)
        self.body_names = tuple(body)
        self.downsample = downsample
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.body_names:
            out = self._modules[name](out)
        out = out + (x if self.downsample is None else self.downsample(x))
        return out if self.post is None else self.post(out)


class _OutputOnly:
    """A recurrent module in a Sequential: only ``output`` flows on (``h_n``, ``c_n`` stay behind);
    a subclass, so that the ``state_dict`` keys stay ``nn.LSTM``'s. In a graph it may take each
    sequence's length (``lstm(x, lengths)``, batch first): PyTorch's packed sequences then; and
    initial states or return the final ones (the node's ``initial_states``, ``final_states``), which
    a graph holds batch-first, ``(N, num_layers * num_directions, hidden_size)``."""

    def forward(self, input: torch.Tensor, *rest: torch.Tensor, initial_states: bool = False,
                final_states: bool = False):  # fmt: skip
        lstm = isinstance(self, nn.LSTM)
        state_count = (2 if lstm else 1) if initial_states else 0  # after the optional lengths
        lengths = rest[0] if len(rest) > state_count else None
        hx = tuple(state.transpose(0, 1).contiguous() for state in rest[len(rest) - state_count :])
        hx = (hx if lstm else hx[0]) if hx else None
        if lengths is None:
            output, final = super().forward(input, hx)
        else:
            packed = nn.utils.rnn.pack_padded_sequence(input, lengths.cpu(), batch_first=True, enforce_sorted=False)
            output, final = super().forward(packed, hx)
            output = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=input.shape[1])[0]
        if not final_states:
            return output
        return (output, *(state.transpose(0, 1) for state in (final if isinstance(final, tuple) else (final,))))


class _RNN(_OutputOnly, nn.RNN):
    pass


class _LSTM(_OutputOnly, nn.LSTM):
    pass


class _GRU(_OutputOnly, nn.GRU):
    pass


_RECURRENT = {sequences.RNN: _RNN, sequences.LSTM: _LSTM, sequences.GRU: _GRU}


class _BiasedRunningVar:
    """Keras' BatchNorm (``running_var="biased"``): torch's kernel feeds the running variance the
    unbiased batch variance, so a training forward gives the kernel a copy to update and updates
    the buffer itself with the biased one (not in place of the kernel's update: autograd saved the
    kernel's input and checks that nothing changed it)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        running_var = self.running_var
        self.running_var = running_var.clone()
        try:
            output = super().forward(input)
        finally:
            self.running_var = running_var
        with torch.no_grad():
            biased = input.var([0, *range(2, input.ndim)], correction=0)
            running_var.mul_(1 - self.momentum).add_(biased, alpha=self.momentum)
        return output


class _BiasedBatchNorm1d(_BiasedRunningVar, nn.BatchNorm1d):
    pass


class _BiasedBatchNorm2d(_BiasedRunningVar, nn.BatchNorm2d):
    pass


_BIASED = {layers.BatchNorm1d: _BiasedBatchNorm1d, layers.BatchNorm2d: _BiasedBatchNorm2d}


def _module(spec: layers.Layer, dtype: torch.dtype) -> nn.Module:
    if isinstance(spec, Graph):
        return GraphModule(spec, {name: _module(child, dtype) for name, child in spec.children})
    if isinstance(spec, layers.Sequential):
        return nn.Sequential(OrderedDict((name, _module(child, dtype)) for name, child in spec.children))
    if isinstance(spec, layers.Residual):
        body = {name: _module(child, dtype) for name, child in spec.body.children}
        shortcut = None if spec.shortcut is None else _module(spec.shortcut, dtype)
        post = None if spec.post is None else _module(spec.post, dtype)
        return _Residual(body, shortcut, post)
    if type(spec) in attention.LEAVES.values():
        return torch_attention.module(spec, dtype)
    if isinstance(spec, layers.Linear):
        return skip_init(nn.Linear, spec.in_features, spec.out_features, bias=spec.bias, dtype=dtype)
    if isinstance(spec, (layers.Conv2d, sequences.Conv1d)):
        return skip_init(
            nn.Conv2d if isinstance(spec, layers.Conv2d) else nn.Conv1d, spec.in_channels, spec.out_channels,
            spec.kernel_size, stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
            bias=spec.bias, dtype=dtype,
        )  # fmt: skip
    if isinstance(spec, layers.ConvTranspose2d):
        return skip_init(
            nn.ConvTranspose2d, spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
            padding=spec.padding, output_padding=spec.output_padding, groups=spec.groups, bias=spec.bias,
            dilation=spec.dilation, dtype=dtype,
        )  # fmt: skip
    if isinstance(spec, layers._BatchNorm):
        cls = _BIASED[type(spec)] if spec.running_var == "biased" else getattr(nn, type(spec).__name__)
        return skip_init(cls, spec.num_features, eps=spec.eps, momentum=spec.momentum, dtype=dtype)
    if isinstance(spec, layers.LayerNorm):
        return skip_init(
            nn.LayerNorm, spec.normalized_shape, eps=spec.eps, elementwise_affine=spec.elementwise_affine, dtype=dtype
        )
    if isinstance(spec, sequences.Embedding):
        return skip_init(nn.Embedding, spec.num_embeddings, spec.embedding_dim, spec.padding_idx, dtype=dtype)
    if type(spec) in _RECURRENT:  # every spec field is the torch class's argument of the same name
        arguments = {field.name: getattr(spec, field.name) for field in fields(spec)}
        # skip_init by hand (it wants a named device argument, nn.RNNBase takes **kwargs)
        return _RECURRENT[type(spec)](**arguments, device="meta", dtype=dtype).to_empty(device="cpu")
    if isinstance(spec, _PLAIN_LEAVES):
        return getattr(nn, type(spec).__name__)(**{field.name: getattr(spec, field.name) for field in fields(spec)})
    raise TypeError(f"the torch backend cannot build {spec!r}")


#: the spec fields that choose other frameworks' equations, at PyTorch's values here
_EQUATIONS = ("eps_placement", "lr_in_velocity")


class _OtherEquations(torch.optim.Optimizer):
    """A spec with another framework's equations (``Adam(eps_placement="before_correction")``,
    ``SGD(lr_in_velocity=True)``), which ``torch.optim`` lacks: :func:`unitrain.optim.optimizer_update`
    on the tensors, with ``torch.optim``'s param groups (``lr``, ``momentum``/``betas``, which
    ``_set_lr`` and a cycling schedule change) and per-parameter state (the spec's ``state_names``,
    and ``step`` where PyTorch's optimizer of the same kind keeps one)."""

    @staticmethod
    def needed(spec: optim.Optimizer) -> bool:
        return getattr(spec, "eps_placement", "after_correction") != "after_correction" or getattr(
            spec, "lr_in_velocity", False
        )

    def __init__(self, params, spec: optim.Optimizer):
        super().__init__(params, self.group([], spec, spec.lr))
        self.spec = spec

    @staticmethod
    def group(params, spec: optim.Optimizer, lr: float) -> dict:
        """A param group of ``params`` following ``spec`` (a parameter group's own weight decay,
        momentum or betas) at ``lr``."""
        group = {"params": params, "lr": lr, "spec": spec}
        if isinstance(spec, optim.Adam):
            group["betas"] = spec.betas
        elif optim.momentum(spec) is not None:
            group["momentum"] = spec.momentum
        return group

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            spec = group["spec"]
            names = spec.state_names
            live_momentum = group["betas"][0] if "betas" in group else group.get("momentum")
            for param in group["params"]:
                if param.grad is None:  # as torch.optim: no gradient, no step
                    continue
                state = self.state[param]
                if not state and not isinstance(spec, optim.SGD):
                    state["step"] = torch.tensor(0.0)
                    state.update(
                        {name: torch.full_like(param, optim.initial_buffer_value(spec, name)) for name in names}
                    )
                if "step" in state:
                    state["step"] += 1
                buffers = tuple(state.get(name) for name in names)
                step = int(state["step"]) if "step" in state else 1
                new_param, buffers = optim.optimizer_update(
                    spec, param, param.grad, buffers, step, group["lr"], torch.sqrt, momentum=live_momentum
                )
                param.copy_(new_param)
                state.update(zip(names, buffers, strict=True))


def _compiled(module: nn.Module) -> nn.Module:
    """``torch.compile(module)``, or ``module`` itself (said in one line) where TorchInductor cannot
    compile: CPU code needs the C++ compiler its config names (``$CXX``, else ``g++``:
    ``torch._inductor.config.cpp.cxx``)."""
    on_cpu = all(param.device.type == "cpu" for param in module.parameters())
    compiler = os.environ.get("CXX", "g++")
    if on_cpu and shutil.which(compiler) is None:
        print(f"unitrain: no C++ compiler ({compiler}) for torch.compile on the CPU; training eagerly", file=sys.stderr)
        return module
    return torch.compile(module)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A host copy that does not alias the tensor (one copy whatever the device)."""
    return tensor.detach().to("cpu", copy=True).numpy()


def _end_process_group() -> None:
    """At exit, while the interpreter is whole: free the process group, joining its threads (its
    ranks met last in the job's final collective). A program that destroyed it already is left be."""
    if dist.is_initialized():
        dist.destroy_process_group()


class TorchLoop(TrainingLoop):
    name = "torch"
    framework = "torch"
    capabilities = CAPABILITIES  # every one

    # --- building -------------------------------------------------------------------------

    def _build(self, model: layers.Container) -> None:
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
        self._forward_module = model  # compile() puts torch.compile's wrapper here
        self._params = dict(model.named_parameters())
        self._device = next(iter(self._params.values())).device if self._params else torch.device("cpu")
        if self._device.type == "cpu":
            self._generator = torch.default_generator
        elif self._device.type == "cuda":
            self._generator = torch.cuda.default_generators[self._device.index]
        else:
            raise TypeError(f"the torch backend trains CPU or CUDA models, got one on {self._device}")
        self._rng_state = torch.Generator(self._device).manual_seed(rank_seed(self.seed, self.rank)).get_state()
        self._criterion = self._make_criterion(self.loss_spec)
        groups = self._resolve_controls(self._params)
        for name in self.frozen:  # as a fine-tuning tutorial freezes: no gradient, left out of the optimizer
            self._params[name].requires_grad_(False)
        spec = self.update_spec  # torch.optim's optimizer as a cycling OneCycleLR leaves it at construction
        if _OtherEquations.needed(spec):
            self.optimizer = _OtherEquations(
                [_OtherEquations.group([self._params[name] for name in group.names], group.spec, group.lr)
                 for group in groups], spec,
            )  # fmt: skip
            return

        # torch.optim's param groups, each with its spec's arguments (every other spec field is the
        # torch.optim class's argument of the same name); the run's spec's are the defaults too
        # (Adagrad fills its sums from them at construction)
        def arguments(spec):
            return {field.name: getattr(spec, field.name) for field in fields(spec) if field.name not in _EQUATIONS}

        self.optimizer = getattr(torch.optim, type(spec).__name__)(
            [{"params": [self._params[name] for name in group.names], **arguments(group.spec), "lr": group.lr}
             for group in groups],
            **arguments(spec), foreach=False,
        )  # fmt: skip

    def compile(self) -> None:
        """From now on run the model's forward and backward as ``torch.compile`` makes them (TorchInductor;
        on the CPU it compiles C++, so without a C++ compiler the loop says so in one line and stays
        eager). The first step of each input shape compiles (seconds to minutes); the equations are the
        same, the rounding and dropout's random draws are the compiled kernels'."""
        self._forward_module = _compiled(self.model)

    # --- helpers --------------------------------------------------------------------------

    def _make_criterion(self, spec: losses.Loss):
        """``criterion(pred, y, reduction=None)``: the loss as torch computes it (None: the spec's reduction)."""
        if isinstance(spec, losses.PerOutputLoss):  # loss1(out1, y1) + loss2(out2, y2), as a PyTorch loop writes it
            criteria = [self._make_criterion(part) for part in spec.losses]
            return lambda preds, ys, reduction=None: sum(
                criterion(pred, y, reduction) for criterion, pred, y in zip(criteria, preds, ys, strict=True)
            )
        if isinstance(spec, losses.CustomLoss):
            # the user's own loss: its recorded expression on torch tensors, differentiated by autograd;
            # it reduces itself (the core evaluates it per sample)
            ops = _expr_ops(_DTYPES[self.dtype], self._device)
            return lambda pred, y, reduction=None: expr.evaluate(spec.tree, pred, y, ops)
        function = _FUNCTIONAL_LOSSES[type(spec)]
        arguments = {field.name: getattr(spec, field.name) for field in fields(spec) if field.name != "reduction"}
        return lambda pred, y, reduction=None: function(pred, y, **arguments, reduction=reduction or spec.reduction)

    def _tensor(self, array: np.ndarray | tuple) -> torch.Tensor | tuple:
        if isinstance(array, tuple):  # several inputs or targets of a graph
            return tuple(self._tensor(part) for part in array)
        # from_numpy shares the batch's memory; it rejects negative strides and warns on
        # read-only arrays, so those (rare) are copied first.
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = np.array(array)
        tensor = torch.from_numpy(array)
        return tensor if self._device.type == "cpu" else tensor.to(self._device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward; in training, random draws (dropout) come from the loop's stream."""
        if not self.model.training:
            return self._call(x)
        outer = self._generator.get_state()
        self._generator.set_state(self._rng_state)
        try:
            return self._call(x)
        finally:
            self._rng_state = self._generator.get_state()
            self._generator.set_state(outer)

    def _call(self, x: torch.Tensor | tuple) -> torch.Tensor | tuple:
        return self._forward_module(*x) if isinstance(x, tuple) else self._forward_module(x)

    def _loss_of(self, pred: torch.Tensor, y: np.ndarray, reduction: str | None = None) -> torch.Tensor:
        return self._criterion(pred, self._tensor(y), reduction)

    # --- hooks ----------------------------------------------------------------------------

    @classmethod
    def set_threads(cls, count: int) -> None:
        super().set_threads(count)
        torch.set_num_threads(count)  # intra-op pool; its default (all physical cores) crawls on a busy machine

    @staticmethod
    def to_float(value: torch.Tensor | float) -> float:
        # float() warns on a tensor that requires grad (what loss() returns); item() reads both kinds
        return value.item() if isinstance(value, torch.Tensor) else float(value)

    def _set_training(self, mode: bool) -> None:
        self.model.train(mode)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def _forward(self, x: np.ndarray) -> torch.Tensor:
        return self._run(self._tensor(x))

    def _loss(self, pred: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        return self._loss_of(pred, y)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _update(self) -> None:
        self._clip_gradients()
        self.optimizer.step()

    def _clip_gradients(self) -> None:
        if self.clip_grad_norm is None and self.clip_grad_value is None:
            return
        params = [param for name, param in self._params.items() if name not in self.frozen]
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=False)
        elif self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.clip_grad_value, foreach=False)

    def _set_lr(self, lr: float) -> None:
        for native, group in zip(self.optimizer.param_groups, self.param_groups, strict=True):
            native["lr"] = group.lr

    def _scale_gradients(self, factor: float) -> None:
        for param in self._params.values():
            if param.grad is not None:
                param.grad.mul_(factor)

    def _set_momentum(self, momentum: float) -> None:
        for group in self.optimizer.param_groups:  # as torch.optim.lr_scheduler.OneCycleLR does
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum

    def _step(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        self.optimizer.zero_grad()
        pred = self._run(self._tensor(x))
        loss = self._loss_of(pred, y)
        loss.backward()
        self._update()
        self._step_pred = pred.detach() if isinstance(pred, torch.Tensor) else None
        return loss.detach()

    def _step_correct(self, y: np.ndarray) -> torch.Tensor:
        return self._count_correct(self._step_pred, y)

    def _count_correct(self, pred: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        return (pred.detach().argmax(1) == self._tensor(y)).sum()

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        return _numpy(value)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            pred = self._call(self._tensor(x))
            return tuple(map(_numpy, pred)) if isinstance(pred, tuple) else _numpy(pred)

    def _evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        with torch.no_grad():
            pred = self._call(self._tensor(x))
            if isinstance(self.loss_spec, losses.PerOutputLoss):
                criteria = [self._make_criterion(part) for part in self.loss_spec.losses]
                sums = [float(c(p, self._tensor(t), "sum")) for c, p, t in zip(criteria, pred, y, strict=True)]
                return tuple(sums), 0
            total = self._loss_of(pred, y, "sum")
            if y.dtype.kind != "i":  # not class indices: no accuracy
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
            if "step" in buffers and float(buffers["step"]) == 0:  # Adagrad's state exists before its first step
                continue
            for key in self._state_names(name) if name not in self.frozen else ():
                if buffers.get(key) is not None:
                    state[f"{name}.{key}"] = _numpy(buffers[key])
        return state

    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        loaded = {}
        for name, p in self._params.items():
            if name in self.frozen:
                continue
            names = self._state_names(name)
            if names and f"{name}.{names[0]}" in state:  # all buffers or none (checked by the caller)
                buffers = {key: torch.tensor(state[f"{name}.{key}"], device=p.device) for key in names}
                if not isinstance(self.optimizer_spec, optim.SGD):
                    # the others keep a step count per parameter (Adam's bias correction, Adagrad's lr decay)
                    buffers["step"] = torch.tensor(float(state["step"]))
                loaded[p] = buffers
            elif isinstance(self.optimizer_spec, optim.Adagrad):  # torch creates its sum at construction
                initial = self._group_of[name].spec.initial_accumulator_value
                loaded[p] = {
                    "step": torch.tensor(0.0),
                    "sum": torch.full_like(p, initial, memory_format=torch.preserve_format),
                }
        self.optimizer.state.clear()
        self.optimizer.state.update(loaded)

    # --- data parallel: torch.distributed (launched by torchrun) ----------------------------

    def _setup_distributed(self) -> tuple[int, int]:
        if not dist.is_initialized():
            # torch.distributed.nn.functional (and FSDP's grad scaler, ZeroRedundancyOptimizer) write
            # `group.WORLD` into their functions' defaults. torch._dynamo imports them, and the first
            # torch.optim optimizer imports torch._dynamo: imported after init_process_group, those
            # defaults held the process group, which destroy_process_group then could not free, and
            # its gloo threads lived into the interpreter's teardown, where a rank now and then died
            # of SIGABRT ("terminate called without an active exception") or SIGSEGV after training.
            # Imported first, the defaults are None.
            import torch._dynamo  # noqa: F401

            dist.init_process_group()  # gloo for CPU tensors, NCCL for CUDA ones where built in
            atexit.register(_end_process_group)
        return dist.get_rank(), dist.get_world_size()

    def _reduce_gradients(self, weight: float) -> None:
        params = list(self._params.values())
        for param in params:
            if param.grad is None:  # zero_grad sets them to None; a rank without rows has none
                param.grad = torch.zeros_like(param)
        flat = torch.cat([param.grad.reshape(-1) for param in params])  # one all_reduce for all parameters
        flat.mul_(weight)
        dist.all_reduce(flat)
        for param, reduced in zip(params, flat.split([param.numel() for param in params]), strict=True):
            param.grad.copy_(reduced.view_as(param))

    def _all_sum(self, values: np.ndarray) -> np.ndarray:
        # a tensor of torch's own memory: one that shares NumPy's frees it under the GIL, which a
        # gloo worker thread releasing the finished collective would have to take
        total = torch.tensor(np.asarray(values, np.float64))
        dist.all_reduce(total)
        return total.numpy()

    def _random_state(self) -> dict[str, np.ndarray]:
        return {"torch_generator": self._rng_state.numpy().copy()}

    def _load_random_state(self, state: Mapping[str, np.ndarray]) -> None:
        restored = torch.from_numpy(np.array(state["torch_generator"]))
        try:  # set_state validates the bytes (size, and the generator's own checks)
            torch.Generator(self._device).set_state(restored)
        except RuntimeError as error:
            raise ValueError(str(error)) from None
        self._rng_state = restored
