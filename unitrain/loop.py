"""The TrainingLoop protocol: the contract every backend adapter implements.

Every framework's tutorial repeats five parts: a **dataset**, a **model**, a **loss**, an
**optimizer** and a **step**. ``TrainingLoop`` names them once. An adapter (one per framework,
in ``unitrain.backends``) subclasses it and implements the underscored hooks natively; everything
public is defined in the core, with its checks and bookkeeping, so the contract lives in one place:
here, with two parts of the class in their own modules (:mod:`unitrain.fitting`: ``fit`` and
``evaluate``; :mod:`unitrain.input_checks`: what a batch must be).

Construction::

    loop = Backend(model, loss=CrossEntropyLoss(), optimizer=SGD(lr=0.01), seed=0)

``model`` is a tree of layer specs (a :class:`~unitrain.layers.Sequential`, possibly holding
:class:`~unitrain.layers.Residual` blocks and further containers; built natively and
recursively, starting from :func:`~unitrain.weights.init_weights` ``(model, seed)``, so every
backend starts from identical weights) or the framework's own model object
(``torch.nn.Module``, MindSpore ``nn.Cell``, Chainer ``Chain``) when the adapter has the
``native-model`` capability.

Data: batches are ``(x, y)`` NumPy arrays; ``x`` of shape ``(N, *features)``, in the loop's
dtype (float32 by default; integer inputs of a native model stay integers, int64: token ids for
its embedding; a spec model that starts with an :class:`~unitrain.sequences.Embedding` takes
integer token ids, all within its table, passed on as int64; a spec model's other inputs are
converted). The dtype of ``y`` says what the targets are, checked against the loss spec
(:mod:`unitrain.losses`) and the model's output shape before any framework sees them:

* integer ``y`` of shape ``(N,)``: class indices in ``0..C-1`` (``CrossEntropyLoss``,
  ``NLLLoss``; the model's per-sample output must be ``(C,)``), or of shape ``(N, d1, ...)``
  against outputs ``(C, d1, ...)``, each may equal the loss's ``ignore_index``
  (:mod:`unitrain.class_targets`); passed on as int64;
* floating ``y`` shaped like the model's output: class probabilities for
  ``CrossEntropyLoss`` (soft or one-hot targets), regression targets for the elementwise
  losses (``MSELoss``, ``L1Loss``, ``BCEWithLogitsLoss``, ``SmoothL1Loss``, ``HuberLoss``;
  integers are accepted and converted); passed on in the loop's dtype;
* ``CustomLoss``: any numeric ``y`` whose shape the user's expression can combine with the
  output's (NumPy broadcasting); passed on in the loop's dtype (float32 by default).

Adapters wrap the arrays without copying where the framework allows. A training forward also
needs more than one value per BatchNorm channel (batch size times the spatial size there, as
PyTorch demands); that too is refused before any framework work.

A :class:`~unitrain.graph.Graph` model (capability ``graph``) may take several inputs and give
several outputs: ``x`` is then a tuple of arrays in the graph's input order (or a dict by input
name), predictions are a tuple, and the loss is a :class:`~unitrain.losses.PerOutputLoss` (one
loss per output, summed) whose targets ``y`` are a tuple, each checked as above against its own
loss and output; ``evaluate`` reports the sum of each output's loss. :meth:`submodule` gives a
part of the model (an autoencoder's encoder) as a loop of its own.

The user's own loss: ``CustomLoss(fn)`` records ``fn(pred, target)`` once as an expression
tree over a small set of portable operations (:mod:`unitrain.expr`: arithmetic, powers,
``sum``/``mean``, ``abs exp log sqrt square maximum minimum log_softmax softmax``). An
adapter evaluates the tree with :func:`unitrain.expr.evaluate` and its framework's own
functions, so the framework's autograd differentiates it; the NumPy adapter uses
:func:`unitrain.expr.numpy_value_and_grad`, whose forward and backward rules are written
once. ``step``/``loss`` return ``fn``'s value on the batch; ``evaluate`` reports the mean
over samples of ``fn`` applied to each sample alone (computed by the core from ``predict``).

Contract of the two ways to drive a loop (both on every backend):

* **whole step**: ``step((x, y))`` does zero_grad, forward, loss, backward and update, and returns
  the loss computed with the *pre-update* weights. :meth:`fit` and :meth:`evaluate` build on it.
* **tutorial-shaped step**: ``zero_grad()``, ``pred = forward(x)``, ``l = loss(pred, y)``,
  ``backward(l)``, ``update()``. Gradients accumulate across ``backward`` calls until
  ``zero_grad``; ``update`` applies the optimizer to the accumulated gradients. The sequence
  gives the same result as ``step``, bit for bit, dropout masks included. Frameworks that compute
  gradients functionally (MindSpore) record what ``forward`` and ``loss`` saw (masks included)
  and differentiate in ``backward``.

Modes: a new loop is in training mode. ``train()`` / ``eval()`` switch every layer: Dropout is
active and BatchNorm normalises with batch statistics and updates its running statistics only
in training. ``predict`` and ``evaluate`` always run in eval mode without gradients and leave
mode, parameters, buffers, optimizer state and ``step_count`` untouched.

Dtype: ``dtype="float32"`` (default) or ``"float64"`` (capability ``float64``) sets parameters,
inputs, outputs, gradients and optimizer state alike.

Weights: ``state_dict()`` returns NumPy copies (``self.dtype``) with the keys and layouts of the
equivalent PyTorch model's ``state_dict()``: each leaf's dotted path (``1.weight`` of shape
``(512, 784)``, ``layer1.0.bn1.running_mean``; see :meth:`~unitrain.layers.Container.named_layers`),
BatchNorm adds ``running_mean``, ``running_var``, ``num_batches_tracked``. ``load_state_dict``
accepts exactly those keys and shapes. ``save_weights`` / ``load_weights`` are safetensors files.

Optimizer: the update equations are PyTorch's on every backend (see :mod:`unitrain.optim`), or
another framework's where the spec says so (``Adam(eps_placement=...)``, ``SGD(lr_in_velocity=...)``).
``optimizer_state_dict()`` returns ``{"step": int64 scalar, "<param>.<buffer>": array}`` with
``<buffer>`` in the spec's ``state_names`` (PyTorch's: ``momentum_buffer``, or ``velocity`` with
``lr_in_velocity``; ``exp_avg``, ``exp_avg_sq``; ``square_avg``, ``momentum_buffer``, ``grad_avg``;
``sum``; ``square_avg``, ``acc_delta``); buffers not created yet are absent (Adagrad's ``sum`` too,
until the first step).

Learning rate: ``loop.lr`` is the lr the next update uses; it starts as ``optimizer.lr``, and
``set_lr(lr)`` changes it on the live loop (no rebuilding; MindSpore feeds it into its compiled
step as an input, so nothing is compiled again). ``lr_schedule`` (:mod:`unitrain.schedules`)
makes :meth:`fit` step it as PyTorch's scheduler would (per epoch, or per batch for OneCycleLR);
``schedule_position`` counts those steps and ``seek_schedule(position)`` replays the schedule to
one (a checkpoint restores it). ``optimizer_spec.lr`` stays the initial lr.

Momentum: ``loop.momentum`` is the momentum the next update uses (SGD's and RMSprop's
``momentum``, Adam's and AdamW's ``betas[0]``; ``None`` for the others): the spec's, except under
a schedule that cycles it (``OneCycleLR(cycle_momentum=True)``, PyTorch's default), which sets it
at every schedule step as PyTorch's does (the adapter's ``_set_momentum``, on the live loop like
the lr). Such a schedule also runs the optimizer as PyTorch's OneCycleLR leaves it:
``update_spec`` (:func:`~unitrain.schedules.scheduled_optimizer`: momentum at ``max_momentum``,
so SGD without momentum keeps a ``momentum_buffer``) decides the structure of the updates and of
the optimizer state, while ``optimizer_spec`` stays the run's spec (checkpoints record it); an
optimizer without momentum or betas is refused at construction, as PyTorch refuses it.

Gradient clipping (``clip_grad_norm=`` or ``clip_grad_value=``, not both) happens inside
``update``/``step``, between the gradients and the optimizer: by global norm with
``torch.nn.utils.clip_grad_norm_``'s semantics (every gradient times ``min(1, max_norm /
(total 2-norm + 1e-6))``, :func:`~unitrain.optim.clip_grad_norm_scale`), or by value (each
element clamped to ``[-v, v]``); natively where the framework has it.

Training controls (capability ``training-controls``, :mod:`unitrain.controls`): ``frozen=``
patterns name parameters that get no update, no optimizer state and no entry in ``gradients()``
or clipping (BatchNorm's running statistics, buffers, still follow training mode);
``param_groups=`` gives some parameters their own optimizer options, each group with its own lr
(``param_groups[i].lr``) and scheduler; ``fit(accumulate_grad_batches=K)`` makes one optimizer
step from K batches, each batch's loss divided by K; ``fit(early_stopping=EarlyStopping(...))``
stops on a monitored metric and keeps the best weights.

Randomness: dropout masks come from the loop's own random stream, started from ``seed``; the
user's global RNGs are neither reset nor advanced where the framework allows. With the
``random-state`` capability, ``random_state()`` captures that stream as ``{key: uint8 array}``,
opaque bytes whose keys name the kind of stream; ``load_random_state`` takes a state with the
loop's own keys, so that a restored loop draws the masks an uninterrupted one would have drawn.
Without it, ``random_state()`` is ``{}``.

Data parallel (capability ``distributed``): a process started by the backend's engine launcher
(``torchrun``, ``mpiexec``, ``msrun``, named in the backend's registry entry; ``unitrain train
--nproc N`` runs it, see :mod:`unitrain.distributed`) passes ``distributed=True`` to join that
engine's process group (the adapter's ``_setup_distributed``; ``_reduce_gradients`` and
``_all_sum`` are the engine's allreduce); ``rank`` and ``world_size`` say
where it stands (``0`` and ``1`` otherwise). Every rank builds the same initial weights (the same
seed, or loads the same weights) and calls ``step``/``fit`` with the same *global* batches; rank
``r`` computes rows :func:`~unitrain.distributed.shard` ``(N, r, world_size)`` of each, contiguous
and in the order one process would use, and the engine sums each rank's gradients weighted by its
share of the batch, so every rank applies the gradients of the whole global batch: the run equals
a one-process run on the global batch to float32 rounding of that sum. ``step`` returns the loss
of the global batch on every rank, and ``fit``'s ``train_accuracy`` counts the whole global batch
(each rank counts its rows' training predictions: the sum rides on the loss's allreduce). The
tutorial-shaped step stays per rank: each rank feeds its own rows, and ``update`` averages the
accumulated gradients across ranks with equal weights.
BatchNorm normalises each replica's shard with its own statistics (per-replica, not synchronised:
its running statistics are rank 0's in checkpoints); a batch leaving a rank one row there is
refused by every rank alike, before any collective (``input_checks.norm_problem``). Dropout masks
come from a stream per rank, from ``(seed, rank)`` (rank 0's is the one-process stream): distinct
and reproducible; a resumed multi-process run restores rank 0's stream, the others restart theirs. ``fit`` evaluates on
rank 0 only (the other ranks' records lack the test metrics); the caller keeps metrics, progress,
checkpoints and saved weights to rank 0, whose checkpoints record ``world_size``, and has the
ranks stop together (:meth:`any_rank`: :class:`~unitrain.checkpoint.Checkpointer` agrees on a
Ctrl-C at every step and epoch end). A checkpoint
resumes with any number of processes (and on any backend): the global batches are the same.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from . import graph_batches, graph_noise, state_loading
from . import weights as weights_io
from .controls import EarlyStoppingState, ParamGroup, resolve_groups
from .distributed import shard
from .fitting import Fitting, eval_mode
from .graph import entry_layer
from .input_checks import InputChecks, InputError  # noqa: F401 (the protocol's error, importable from here)
from .layers import Container, check_buildable
from .losses import CrossEntropyLoss, Loss
from .optim import SGD, Optimizer
from .optim import momentum as momentum_of
from .schedules import LRSchedule, scheduled_optimizer
from .sequences import Embedding

#: Capability tags an adapter may declare (checks gated on a missing one are skipped).
CAPABILITIES = frozenset({
    "float64", "dropout", "batchnorm", "conv", "native-model", "random-state",
    # graphs with branches, the layers and losses real tutorials use, the user's own loss
    "residual", "activations", "layernorm", "pooling", "losses", "custom-loss",
    # RMSprop/Adagrad/Adadelta, set_lr and schedules; gradient clipping
    "optimizers", "clipping",
    # data parallel on the framework's own engine (``launcher`` names its launcher)
    "distributed",
    # frozen parameters and parameter groups (unitrain.controls), gradient accumulation
    "training-controls",
    # unitrain.graph.Graph models (several inputs and outputs, shared layers, tensor operations)
    "graph",
    # Embedding (integer inputs), RNN/LSTM/GRU, Conv1d and the 1-d pools
    "sequences",
    # several models and optimizers in one step (unitrain.steps: GANs, VAEs)
    "multi-model",
    # MultiheadAttention, the Transformer encoders, PositionalEncoding (unitrain.attention)
    "attention",
})  # fmt: skip


class TrainingLoop(Fitting, InputChecks, ABC):
    """The protocol every backend implements: the contract is this module's docstring and each
    public method's; an adapter implements the underscored hooks and declares its ``capabilities``."""

    #: registry name, e.g. ``"torch"``
    name: ClassVar[str]
    #: import name of the framework, e.g. ``"torch"``; ``None`` for NumPy-only adapters
    framework: ClassVar[str | None] = None
    #: subset of :data:`CAPABILITIES`
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: conformance checks this adapter is known to fail, ``{check name: reason}`` (see ``unitrain.conformance``)
    conformance_xfails: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        model: Any,
        loss: Loss | None = None,
        optimizer: Optimizer | None = None,
        *,
        seed: int = 0,
        dtype: str = "float32",
        lr_schedule: LRSchedule | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        distributed: bool = False,
        frozen: Iterable[str] = (),
        param_groups: Iterable[Mapping[str, Any]] = (),
    ):
        loss = CrossEntropyLoss() if loss is None else loss
        optimizer = SGD() if optimizer is None else optimizer
        if not isinstance(loss, Loss):
            raise TypeError(f"loss must be a unitrain loss spec, got {loss!r}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a unitrain optimizer spec, got {optimizer!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if dtype not in ("float32", "float64") or (dtype == "float64" and "float64" not in self.capabilities):
            supported = "float32, float64" if "float64" in self.capabilities else "float32"
            raise ValueError(f"dtype {dtype!r} is not supported by the {self.name} backend; expected: {supported}")
        #: floating dtype of parameters, inputs, outputs and optimizer state
        self.dtype = np.dtype(dtype)
        if lr_schedule is not None and not isinstance(lr_schedule, LRSchedule):
            raise TypeError(f"lr_schedule must be a unitrain.schedules spec, got {lr_schedule!r}")
        for name, value in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):  # fmt: skip
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if clip_grad_norm is not None and clip_grad_value is not None:
            raise ValueError("clip_grad_norm and clip_grad_value exclude each other: clip one way")
        self.loss_spec = loss
        self.optimizer_spec = optimizer
        #: the optimizer whose structure the updates follow (the module docstring's Momentum)
        self.update_spec = scheduled_optimizer(optimizer, lr_schedule)
        #: the momentum (Adam: ``betas[0]``) the next update uses; None for optimizers without
        self.momentum = momentum_of(self.update_spec)
        #: the lr the next update uses (``set_lr``, or the schedule, changes it)
        self.lr = float(optimizer.lr)
        self.lr_schedule = lr_schedule
        self._scheduler = None if lr_schedule is None else lr_schedule.start(self.lr)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.clip_grad_value = None if clip_grad_value is None else float(clip_grad_value)
        self.seed = seed
        self._frozen_patterns = [frozen] if isinstance(frozen, str) else list(frozen)
        self._group_options = list(param_groups)
        if (self._frozen_patterns or self._group_options) and "training-controls" not in self.capabilities:
            raise ValueError(f"the {self.name} backend cannot freeze parameters or group them "
                             "(no 'training-controls' capability)")  # fmt: skip
        #: names of the frozen parameters and the parameter groups (:mod:`unitrain.controls`), set
        #: by :meth:`_resolve_controls` while the model is built
        self.frozen: frozenset[str] = frozenset()
        self.param_groups: list[ParamGroup] | None = None
        #: set to stop :meth:`fit` after the current epoch (early stopping sets it)
        self.stop_training = False
        #: the early stopping state of the last :meth:`fit` with ``early_stopping`` (a checkpoint restores it)
        self.early_stopping: EarlyStoppingState | None = None
        if distributed and "distributed" not in self.capabilities:
            raise ValueError(f"the {self.name} backend cannot train data-parallel (no 'distributed' capability)")
        #: this process's place in a data-parallel run (see the module docstring)
        self.rank, self.world_size = self._setup_distributed() if distributed else (0, 1)
        #: optimizer steps taken (``update`` / ``step`` calls)
        self.step_count = 0
        self.training = True
        #: per-sample input shape -> (per-sample output shape, the BatchNorm with the fewest values
        #: per channel and sample as (path, count), or None)
        self._shape_facts: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[str, int] | None]] = {}
        self._forward_shape: tuple[int, ...] | None = None
        #: the last data-parallel step's correct predictions, summed over ranks; None if not counted
        self._shard_correct: float | None = None
        #: ``fit``'s last training batch: its samples and correct predictions (native; None if not counted)
        self.last_batch_size, self.last_batch_correct = 0, None
        #: a graph's numbers of inputs and outputs (see :mod:`unitrain.graph`); 1 for other models
        self._input_count, self._output_count = graph_batches.check_model(self, model, loss)
        #: the noise inputs a graph's randn_like / rand_like draw (None without)
        self._noise = graph_noise.of(model, seed)
        #: (path, spec) of the Embedding a spec model starts with: its inputs are token ids
        self._embedding: tuple[str, Embedding] | None = None
        if isinstance(model, Container):
            check_buildable(model, self.dtype.itemsize)
            self.model_spec: Container | None = model
            first = entry_layer(model)
            if first is not None and isinstance(first[1], Embedding):
                self._embedding = first
            self._build(model)
            self.load_state_dict(weights_io.init_weights(model, seed))
        elif self.is_native_model(model):
            self.model_spec = None
            self._wrap_native(model)
        else:
            raise TypeError(self._not_a_model(model))
        if self.param_groups is None:  # an adapter that builds its optimizer without asking for the groups
            self._resolve_controls(self.param_shapes())
        self._set_training(True)
        if self._scheduler is not None:  # LinearLR, OneCycleLR start elsewhere
            self._follow_schedule()

    def _not_a_model(self, model: Any) -> str:
        from .registry import backend_of  # the registry imports this module

        native = f" or a {self.name} model" if "native-model" in self.capabilities else ""
        kind = type(model)
        found = f"got {kind.__module__}.{kind.__qualname__}"
        if (owner := backend_of(model)) is not None:
            found += f", a {owner} model: train it with make_loop({owner!r}, model)"
        return f"model must be a unitrain model spec (Sequential, Residual){native}, {found}"

    # --- hooks an adapter implements ------------------------------------------------------

    @abstractmethod
    def _build(self, model: Container) -> None:
        """Build the native model, loss and optimizer from specs (weights are loaded after)."""

    def _wrap_native(self, model: Any) -> None:
        """Adopt the framework's own model (only with the ``native-model`` capability)."""
        raise TypeError(f"the {self.name} backend cannot train native models")

    @classmethod
    def is_native_model(cls, model: Any) -> bool:
        """Whether ``model`` is this framework's model type. Must not import the framework:
        if it is not in ``sys.modules`` yet, ``model`` cannot be one of its objects."""
        return False

    @classmethod
    def native_example_model(cls) -> Any:
        """For the conformance suite (capability ``native-model``): a small native model of the
        framework mapping float inputs of shape ``(N, 8)`` to 3 class logits; ``None`` if not offered."""
        return None

    @abstractmethod
    def _set_training(self, mode: bool) -> None: ...

    @abstractmethod
    def _zero_grad(self) -> None: ...

    @abstractmethod
    def _forward(self, x: np.ndarray) -> Any:
        """Forward pass, recording what ``_backward`` needs; returns native predictions."""

    @abstractmethod
    def _loss(self, pred: Any, y: np.ndarray) -> Any:
        """Loss of native predictions; returns a native scalar."""

    @abstractmethod
    def _backward(self, loss: Any) -> None:
        """Add the gradients of ``loss`` to the accumulated ones."""

    @abstractmethod
    def _update(self) -> None:
        """Apply one optimizer step (PyTorch's equations) to the accumulated gradients."""

    @abstractmethod
    def _step(self, x: np.ndarray, y: np.ndarray) -> Any:
        """The whole step; returns the pre-update loss as a native scalar (no host sync)."""

    def _loss_and_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """The gradients of the loss on ``(x, y)`` replace the accumulated ones (no update), from one
        forward pass; returns the native loss and its predictions' :meth:`_count_correct` (read only where
        :meth:`_counts_correct`). A data-parallel step uses it between its allreduces. The default composes
        the tutorial hooks; MindSpore's, whose ``_backward`` runs the forward pass again, makes one pass."""
        self._zero_grad()
        pred = self._forward(x)
        loss = self._loss(pred, y)
        self._backward(loss)
        return loss, self._count_correct(pred, y) if self._counts_correct(y) else None

    @abstractmethod
    def _predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs for ``x`` without gradients, in the current mode (the caller set eval)."""

    @abstractmethod
    def _evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """``(sum of per-sample losses, number correct)`` in the current mode, no gradients.
        Elementwise losses: the sum over all elements. ``number correct`` counts
        ``argmax(pred) == y`` for integer class targets; it is ignored otherwise (return 0).
        Not called for a ``CustomLoss``."""

    @abstractmethod
    def _gradients(self) -> dict[str, np.ndarray]:
        """Accumulated gradients by parameter name (zeros after ``zero_grad``)."""

    @abstractmethod
    def _state_dict(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Load an already validated state (``self.dtype`` arrays, int64 ``num_batches_tracked``)."""

    @abstractmethod
    def _optimizer_state_dict(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Load validated optimizer state: ``step`` plus, per parameter, all buffers or none
        (``self.dtype`` arrays). The caller sets ``step_count``."""

    def _set_lr(self, lr: float) -> None:
        """Make the next updates use ``lr``, and each of ``param_groups`` its ``lr`` (the
        optimizer, its state and compiled code stay)."""
        raise NotImplementedError(f"the {self.name} backend cannot change the lr of a live loop")

    def _set_momentum(self, momentum: float) -> None:
        """Make the next updates use ``momentum`` (Adam: ``betas[0]``) in every group, as
        :meth:`_set_lr` the lr."""
        raise NotImplementedError(f"the {self.name} backend cannot change the momentum of a live loop")

    def _scale_gradients(self, factor: float) -> None:
        """Multiply the accumulated gradients by ``factor`` (gradient accumulation's mean)."""
        raise NotImplementedError(f"the {self.name} backend cannot scale its gradients")

    def _setup_distributed(self) -> tuple[int, int]:
        """Join the process group the engine's launcher set up (called before ``_build``, so
        that the dropout stream can depend on the rank); returns ``(rank, world_size)``."""
        raise NotImplementedError

    def _reduce_gradients(self, weight: float) -> None:
        """Replace the accumulated gradients, on every rank, by the sum over ranks of ``weight``
        times each rank's own (``weight`` may differ between ranks), with the engine's allreduce."""
        raise NotImplementedError

    def _all_sum(self, values: np.ndarray) -> np.ndarray:
        """The elementwise sum over ranks of a small float64 array (the engine's allreduce)."""
        raise NotImplementedError

    def _random_state(self) -> dict[str, np.ndarray]:
        """The loop's random stream as uint8 arrays (only with the ``random-state`` capability)."""
        return {}

    def _load_random_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``_random_state`` returned; raise ValueError on anything else."""
        raise ValueError(f"the {self.name} backend keeps no random state")

    def _step_correct(self, y: np.ndarray) -> Any:
        """How many of the last ``_step``'s training predictions ``argmax`` to the class indices
        ``y`` (that step's targets), as a native scalar (no host sync), computed from the forward
        pass the step already made; ``None`` if the adapter does not keep it (then epoch records
        have no ``train_accuracy``)."""
        return None

    def _count_correct(self, pred: Any, y: np.ndarray) -> Any:
        """How many rows of native predictions ``pred`` (as ``_forward`` returns them) ``argmax`` to
        the class indices ``y``: a native scalar, or a Python int where that is cheaper; ``None`` if
        the adapter does not count (then data-parallel epoch records have no ``train_accuracy``)."""
        return None

    @classmethod
    def set_threads(cls, count: int) -> None:
        """Compute on ``count`` CPU threads, process-wide, from now on (before the first loop is
        built). The base class limits the BLAS and OpenMP pools loaded in the process (NumPy's,
        with threadpoolctl); an adapter whose framework keeps its own pool sets that too."""
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=count)  # applies now, process-wide; the returned handle only restores

    @staticmethod
    def to_float(value: Any) -> float:
        """A native scalar (as returned by ``step``/``loss``; a data-parallel ``step`` returns a
        Python float) as a Python float (syncs)."""
        return float(value)

    @staticmethod
    def to_numpy(value: Any) -> np.ndarray:
        """A native tensor (as returned by ``forward``, ``loss``, ``step``) as a NumPy array, a
        host copy (syncs): ``loop.to_numpy(loop.forward(x))`` on every backend."""
        return np.array(value)

    def _resolve_controls(self, names: Iterable[str]) -> list[ParamGroup]:
        """Resolve ``frozen`` and ``param_groups`` against the model's parameters ``names`` (in
        the model's order); an adapter calls it where it builds its optimizer, and updates each
        group's parameters with the group's ``spec``, ``lr`` and ``momentum``. ValueError for a
        pattern that matches nothing, a parameter in two groups or an option the optimizer lacks."""
        types = {}
        if self.model_spec is not None:
            types = {f"{path}.{key}": type(layer).__name__ for path, layer in self.model_spec.named_layers()
                     for key in layer.param_shapes()}  # fmt: skip
        self.frozen, self.param_groups = resolve_groups(
            {name: types.get(name) for name in names}, self.optimizer_spec, self.lr_schedule,
            self._frozen_patterns, self._group_options,
        )  # fmt: skip
        self._group_of = {name: group for group in self.param_groups for name in group.names}
        return self.param_groups

    def _state_names(self, param: str) -> tuple[str, ...]:
        """The optimizer buffers of a trainable parameter (its group's spec's ``state_names``)."""
        return self._group_of[param].spec.state_names

    # --- the tutorial-shaped step ---------------------------------------------------------

    def zero_grad(self) -> None:
        """Clear the accumulated gradients."""
        self._zero_grad()

    def forward(self, x: np.ndarray) -> Any:
        """Model output for a batch (native tensor); in training mode it is differentiable."""
        x = self._check_x(x)
        self._check_batch_statistics(x)
        self._forward_shape = x.shape if self._input_count == 1 else (len(x[0]), tuple(a.shape[1:] for a in x))
        return self._forward(x)

    def loss(self, pred: Any, y: np.ndarray) -> Any:
        """Loss of ``pred`` (the output of the last :meth:`forward`) against targets ``y``."""
        if self._forward_shape is None:
            raise RuntimeError("loss() needs the predictions of a forward() call first")
        n, *sample_shape = self._forward_shape
        return self._loss(pred, self._check_y(y, n, tuple(sample_shape) if self._input_count == 1 else sample_shape[0]))

    def backward(self, loss: Any) -> None:
        """Accumulate the gradients of ``loss`` (as returned by :meth:`loss`)."""
        self._backward(loss)

    def update(self) -> None:
        """One optimizer step on the accumulated gradients (data parallel: averaged over ranks);
        counts towards ``step_count``."""
        if self.world_size > 1:
            self._reduce_gradients(1 / self.world_size)
        self._update()
        self.step_count += 1

    def set_lr(self, lr: float) -> None:
        """Use ``lr`` from the next update on (a schedule's zero included)."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        for group in self.param_groups:  # every group keeps its lr's ratio to the spec's
            group.lr = float(lr) * (group.spec.lr / self.optimizer_spec.lr) if group.options else float(lr)
        self._set_lr(float(lr))
        self.lr = float(lr)

    @property
    def schedule_position(self) -> int:
        """Steps the ``lr_schedule`` has taken (0 without one)."""
        return 0 if self._scheduler is None else self._scheduler.position

    def seek_schedule(self, position: int) -> None:
        """Put the ``lr_schedule`` at ``position`` (replayed from its start) and use its lr (and
        momentum, where it cycles it)."""
        if self._scheduler is None:
            raise ValueError("this loop has no lr_schedule")
        for scheduler in self._schedulers():
            scheduler.seek(position)
        self._follow_schedule()

    def _step_schedule(self) -> None:
        for scheduler in self._schedulers():
            scheduler.step()
        self._follow_schedule()

    def _schedulers(self):
        return [self._scheduler, *(group.scheduler for group in self.param_groups or ())]

    def _follow_schedule(self) -> None:
        """Train with the schedule's lr (each group with its own scheduler's), and its momentum
        where it cycles it."""
        groups = self.param_groups or ()
        if self._scheduler.lr != self.lr or any(group.scheduler.lr != group.lr for group in groups):
            for group in groups:
                group.lr = group.scheduler.lr
            self._set_lr(self._scheduler.lr)
            self.lr = self._scheduler.lr
        if self._scheduler.momentum is not None:
            for group in groups:
                group.momentum = self._scheduler.momentum
            self._set_momentum(self._scheduler.momentum)
            self.momentum = self._scheduler.momentum

    # --- the whole step and what builds on it ---------------------------------------------

    def step(self, batch: tuple[np.ndarray, np.ndarray]) -> Any:
        """zero_grad, forward, loss, backward, update; returns the pre-update loss (native
        scalar: ``float(...)`` or :meth:`to_float` reads it)."""
        x, y = self._check_batch(batch)
        self._check_batch_statistics(x, self.world_size)  # every rank the same: before any collective
        if self.world_size > 1:
            loss, self._shard_correct = self._shard_step(x, y)
        else:
            loss = self._step(x, y)
        self.step_count += 1
        return loss

    def _counts_correct(self, y: np.ndarray) -> bool:
        """Whether a step on checked targets ``y`` counts its correct predictions: class indices, one output."""
        return self._output_count == 1 and self.loss_spec.class_targets and y.dtype.kind in "iu"

    def _shard_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
        """This rank's rows of a global batch; returns the global batch's loss and its number of
        correct training predictions (``None`` if not counted), summed over the ranks in one
        allreduce (see the module docstring)."""
        n = graph_batches.length(x)  # x and y: arrays, or tuples of them (a graph's inputs and outputs)
        start, stop = shard(n, self.rank, self.world_size)
        weight = (stop - start) / n
        local_loss = local_correct = 0.0
        if stop > start:  # a last batch smaller than the world leaves some ranks without rows
            x_rows, y_rows = graph_batches.rows(x, start, stop), graph_batches.rows(y, start, stop)
            loss, correct = self._loss_and_gradients(x_rows, y_rows)
            # read after the loss's sync and summed in the loss's allreduce: no sync or collective of its own
            local_loss = self.to_float(loss)
            counted = correct is not None and self._counts_correct(y)
            local_correct = self.to_float(correct) if counted else math.nan  # NaN: not counted, on every rank
        else:
            self._zero_grad()
        self._reduce_gradients(weight)
        self._update()
        total_loss, total_correct = self._all_sum(np.array([weight * local_loss, local_correct]))
        return float(total_loss), None if math.isnan(total_correct) else float(total_correct)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank must call it at the same point)."""
        if self.world_size == 1:
            return bool(flag)
        return bool(self._all_sum(np.array([float(flag)]))[0] > 0)

    def train(self, mode: bool = True) -> TrainingLoop:
        self.training = bool(mode)
        self._set_training(self.training)
        return self

    def eval(self) -> TrainingLoop:
        return self.train(False)

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Model outputs (NumPy, ``self.dtype``) in eval mode; changes no state."""
        with eval_mode(self):  # a graph's noise is evaluation's (unitrain.graph_noise)
            x = self._check_x(x)
        if self._input_count > 1 or self._output_count > 1:
            return graph_batches.predict(self, x, batch_size)
        with eval_mode(self):
            outputs = [self._predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), self.dtype)

    # --- weights --------------------------------------------------------------------------

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes that :meth:`load_state_dict` accepts."""
        if self.model_spec is not None:
            return self.model_spec.state_shapes()
        return {key: value.shape for key, value in self._state_dict().items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        return self._state_dict()

    def gradients(self) -> dict[str, np.ndarray]:
        """Accumulated gradients (NumPy copies) by name of the trainable (not frozen) parameters."""
        return {name: grad for name, grad in self._gradients().items() if name not in self.frozen}

    def load_state_dict(self, state: Mapping[str, np.ndarray], source: str = "state") -> None:
        state_loading.assign(self, "weights", state_loading.checked_weights(self, state, source))

    def save_weights(self, path) -> None:
        weights_io.save_safetensors(path, self.state_dict(), {"format": "pt", "producer": f"unitrain/{self.name}"})

    def load_weights(self, path) -> None:
        shapes = self.state_shapes()  # checked from the file's header, before any tensor is read
        tensors, _ = weights_io.load_safetensors(path, lambda declared: weights_io.check_state(shapes, declared, path))
        self.load_state_dict(tensors, source=str(path))

    def submodule(self, path: str, loss: Loss | None = None, optimizer: Optimizer | None = None) -> TrainingLoop:
        """The module at dotted ``path`` of the model (``"encoder"`` of an autoencoder
        :class:`~unitrain.graph.Graph`) as a new loop of this backend holding its current weights
        (keys without the ``path.`` prefix) and this loop's mode: predict, evaluate, save or train
        it alone; this loop is not changed."""
        return graph_batches.submodule(self, path, loss, optimizer)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trainable parameters' names and shapes (the keys of :meth:`gradients`: frozen ones left out)."""
        if self.model_spec is not None:
            shapes = self.model_spec.param_shapes()
        else:
            shapes = {key: value.shape for key, value in self._gradients().items()}
        return {key: shape for key, shape in shapes.items() if key not in self.frozen}

    def optimizer_state_dict(self) -> dict[str, np.ndarray]:
        return self._optimizer_state_dict()

    def load_optimizer_state_dict(self, state: Mapping[str, np.ndarray], source: str = "optimizer state") -> None:
        """Restore optimizer buffers and the step count. Each parameter has all of the spec's
        ``state_names`` buffers or none (not created yet)."""
        state_loading.assign(self, "optimizer", state_loading.checked_optimizer_state(self, state, source))

    def random_state(self) -> dict[str, np.ndarray]:
        """The dropout stream's state (``{}`` without the ``random-state`` capability) and a
        graph's noise stream's."""
        return {**self._random_state(), **graph_noise.state(self._noise)}

    def load_random_state(self, state: Mapping[str, np.ndarray], source: str = "random state") -> None:
        """Restore a :meth:`random_state` of this backend; other keys or bytes are an error (the
        other ranks' streams are their own: see the module docstring)."""
        state_loading.assign(self, "random", state_loading.checked_random_state(self, state, source))
