"""Chainer backend: ``chainer.links`` and ``chainer.functions`` in a tree of Chains that mirrors the
spec's containers (a ``Residual`` adds its body and shortcut in its own ``forward``), trained by a
``chainer.Optimizer`` whose update rules run PyTorch's equations (:mod:`unitrain.optim`).

What is special about Chainer:

* Children are registered under the spec's names, so Chainer's paths mirror PyTorch's keys
  (``layer2/0/downsample/0/W`` is ``layer2.0.downsample.0.weight``). A name Chain already uses as an
  attribute (``forward``, ``params``) gets a trailing ``_`` in Chainer only.
* What Chainer lacks is written from its primitives with PyTorch's equations: exact GELU (``F.erf``),
  SiLU, adaptive average pooling, upsampling other than nearest doubling, label smoothing and
  probability targets of the cross-entropy, BCE with float targets and on probabilities, and
  tie-splitting ``maximum``/``minimum`` for ``CustomLoss``.

* A :class:`~unitrain.graph.Graph` is a Chain of its modules whose forward runs the node list
  (:mod:`.chainer_graph`); several inputs are passed as several arguments.
* Training vs. eval is not model state but ``chainer.config.train``; the loop sets it around every
  call. ``predict`` / ``evaluate`` also turn off ``enable_backprop``.
* Chainer names weights ``W``/``b`` and BatchNorm state ``gamma``/``beta``/``avg_mean``/``avg_var``;
  they are mapped to PyTorch's names (layouts already agree). A native Chain keeps Chainer's own
  names, ``/l1/W`` becoming ``l1.W``.
* Gradients accumulate in ``param.grad`` across ``backward`` calls until ``cleargrads``.
* BatchNorm's float32 batch statistics are NumPy float32 reductions (PyTorch's CPU kernel
  accumulates in double); ``_BatchNorm`` hands them a C-contiguous input so that NumPy sums pairwise.
"""

from __future__ import annotations

import functools
import operator
import os
import sys
import warnings
from collections.abc import Mapping

import numpy as np

# Chainer 7.8 imports numpy.distutils, which needs the standard library's distutils (Python < 3.12).
# setuptools' distutils-precedence.pth installs, at interpreter start-up, an import shim serving its
# own copy (which lacks distutils.msvccompiler): drop the shim before anything imported distutils,
# and set the variable so that a later `import setuptools` does not swap its copy back in.
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
if os.environ["SETUPTOOLS_USE_DISTUTILS"] == "stdlib" and "distutils" not in sys.modules:
    _shim = sys.modules.get("_distutils_hack")
    if _shim is not None:
        _shim.remove_shim()

# Importing Chainer warns about its environment checks (numpy.distutils, pkg_resources), which a
# user cannot act on.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from chainer.serializers import DictionarySerializer, NpzDeserializer

from unitrain import attention, expr, layers, losses, ops, sequences
from unitrain.graph import Graph, tie_source
from unitrain.loop import TrainingLoop
from unitrain.optim import clip_grad_norm_scale, initial_buffer_value, optimizer_update, starts_as_gradient
from unitrain.randomness import dropout_stream, set_stream_state, stream_state

from . import chainer_attention, chainer_graph
from .chainer_layers import (
    _BN_NAMES,
    _FUNCTIONS,
    _LINK_NAMES,
    _BatchNorm,
    _ConvTranspose2d,
    _Dropout,
    _Embedding,
    _Graph,
    _LayerNorm,
    _Linear,
    _Recurrent,
    _Residual,
    _Sequence,
    _TransposedTie,
)


def _class_rows(spec, pred, y):
    """``(N, C, d1, ...)`` predictions as rows ``(N * d1 * ..., C)`` (classes last) with their
    targets, and the rows whose class index is ``ignore_index`` left out (PyTorch's mean divides
    by the rows that count)."""
    if pred.ndim > 2:
        classes = pred.shape[1]
        pred = F.reshape(F.moveaxis(pred, 1, -1), (-1, classes))
        y = np.moveaxis(y, 1, -1).reshape(-1, classes) if y.dtype.kind == "f" else y.reshape(-1)
    if y.dtype.kind != "f" and (y == spec.ignore_index).any():
        kept = np.flatnonzero(y != spec.ignore_index)
        pred, y = F.get_item(pred, kept), y[kept]
    return pred, y


def _cross_entropy(spec: losses.CrossEntropyLoss, logits, y):
    """Per row (:func:`_class_rows`). Class indices without smoothing: Chainer's own softmax cross-entropy.
    Otherwise PyTorch's ``-sum(((1 - ε) * target + ε / C) * log_softmax(logits))``, where ``target`` is
    the given probabilities or the one-hot rows of the class indices (Chainer has no label smoothing)."""
    logits, y = _class_rows(spec, logits, y)
    if y.dtype.kind != "f" and not spec.label_smoothing:
        return F.softmax_cross_entropy(logits, y.astype(np.int32), reduce="no")
    classes = logits.shape[1]
    target = y if y.dtype.kind == "f" else np.eye(classes, dtype=logits.dtype)[y]
    target = (1 - spec.label_smoothing) * target + spec.label_smoothing / classes
    return -F.sum(target * F.log_softmax(logits), axis=1)


def _negative_log_likelihood(spec: losses.NLLLoss, log_probs, y):
    log_probs, y = _class_rows(spec, log_probs, y)
    return -F.select_item(log_probs, y.astype(np.int32))


def _bce_with_logits(spec, logits, y):
    """PyTorch's stable form ``(1 - y) * x - log_sigmoid(x)``, ``-log_sigmoid(x) = softplus(-x)``
    (Chainer's sigmoid_cross_entropy takes only 0/1 integer labels)."""
    return (1 - y) * logits + F.softplus(-logits)


class _BinaryCrossEntropy(chainer.FunctionNode):
    """PyTorch's BCELoss per element (Chainer's losses take logits): ``(t - 1) * max(log1p(-p), -100)
    - t * max(log(p), -100)``, and PyTorch's gradient ``(p - t) / max(p * (1 - p), 1e-12)``, finite where
    a clamped logarithm's derivative is not."""

    def forward(self, inputs):
        p, t = inputs
        self.coefficient = (p - t) / np.maximum((1 - p) * p, p.dtype.type(losses.BCE_GRAD_EPSILON))
        floor = p.dtype.type(losses.BCE_LOG_FLOOR)
        with np.errstate(divide="ignore"):  # log(0) is -inf, floored just below
            return ((t - 1) * np.maximum(np.log1p(-p), floor) - t * np.maximum(np.log(p), floor),)

    def backward(self, indexes, grad_outputs):
        return grad_outputs[0] * self.coefficient, None


def _smooth_l1(spec, pred, y):
    """PyTorch's ``SmoothL1Loss(beta)`` is ``HuberLoss(delta=beta) / beta``; ``beta=0`` is L1."""
    if spec.beta == 0:
        return F.absolute_error(pred, y)
    return F.huber_loss(pred, y, spec.beta, reduce="no") / spec.beta


#: Per-sample (class losses) or per-element terms of each loss; ``reduction`` sums or averages them.
_LOSS_TERMS = {
    losses.CrossEntropyLoss: _cross_entropy,
    losses.NLLLoss: _negative_log_likelihood,
    losses.MSELoss: lambda spec, pred, y: F.squared_error(pred, y),
    losses.BCEWithLogitsLoss: _bce_with_logits,
    losses.BCELoss: lambda spec, p, y: _BinaryCrossEntropy().apply((p, y))[0],
    losses.L1Loss: lambda spec, pred, y: F.absolute_error(pred, y),
    losses.SmoothL1Loss: _smooth_l1,
    losses.HuberLoss: lambda spec, pred, y: F.huber_loss(pred, y, spec.delta, reduce="no"),
}


#: the losses Chainer averages itself exactly as PyTorch's mean does, where :func:`_averaged_by_chainer` says so
_CHAINER_MEANS = {
    losses.CrossEntropyLoss: lambda spec, pred, y: F.softmax_cross_entropy(
        pred, y.astype(np.int32), ignore_label=spec.ignore_index
    ),
    losses.MSELoss: lambda spec, pred, y: F.mean_squared_error(pred, y),
}


def _averaged_by_chainer(spec, pred, y) -> bool:
    """Whether ``spec``'s mean over ``pred`` and ``y`` is Chainer's own loss function's: cross-entropy of
    ``(N, C)`` logits and class indices without label smoothing (Chainer's mean, as PyTorch's, divides by
    the rows not ignored; a batch with none is refused before), the squared error of same-shaped values.
    Otherwise the loss is the mean of the per-row terms of ``_LOSS_TERMS``."""
    if isinstance(spec, losses.CrossEntropyLoss):
        return pred.ndim == 2 and y.dtype.kind in "iu" and not spec.label_smoothing
    return isinstance(spec, losses.MSELoss) and pred.shape == y.shape and pred.dtype == y.dtype


def _broadcast(a, b):
    """Two operands (Variables, arrays or Python numbers) as Variables of one shape and dtype."""
    dtype = next(v.dtype for v in (a, b) if hasattr(v, "dtype"))
    return F.broadcast(*(v if hasattr(v, "dtype") else np.asarray(v, dtype) for v in (a, b)))


def _maximum(a, b):
    """``torch.maximum``: ties split the gradient evenly (``F.maximum`` gives it all to ``a``). The two
    selections are the same value, so their mean is exact, and at a tie each side gets half."""
    a, b = _broadcast(a, b)
    return 0.5 * (F.where(a.array >= b.array, a, b) + F.where(a.array > b.array, a, b))


def _minimum(a, b):
    a, b = _broadcast(a, b)
    return 0.5 * (F.where(a.array <= b.array, a, b) + F.where(a.array < b.array, a, b))


#: CustomLoss's operations (:mod:`unitrain.expr`) as Chainer functions; Chainer's autograd differentiates them.
_EXPR_OPS = {
    "const": lambda value: value,
    "neg": operator.neg,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "pow": lambda a, exponent: a**exponent,
    "abs": F.absolute,
    "exp": F.exp,
    "log": F.log,
    "sqrt": F.sqrt,
    "square": F.square,
    "sum": lambda a, axis: F.sum(a, axis=axis),
    "mean": lambda a, axis: F.mean(a, axis=axis),
    "maximum": _maximum,
    "minimum": _minimum,
    "log_softmax": lambda a, axis: F.log_softmax(a, axis=axis),
    "softmax": lambda a, axis: F.softmax(a, axis=axis),
    "item": lambda a, index: a[index],
}


class _Rule(chainer.UpdateRule):
    """A parameter's update rule; its ``state`` holds PyTorch's buffers under PyTorch's names."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def update(self, param):
        # PyTorch skips parameters without a gradient rather than stepping them with zeros.
        if param.grad is not None:
            super().update(param)

    def load(self, state: dict, t: int) -> None:
        """Replace the state (``None`` until the first update creates it) and the step count."""
        self._state = state or None
        self.t = t if state else 0


class _PyTorchRule(_Rule):
    """Any spec's update (:func:`unitrain.optim.optimizer_update`), in place on the parameter's
    arrays; ``spec``, ``lr`` and ``momentum`` are its parameter group's (``set_lr`` and a schedule
    change the last two)."""

    def __init__(self, group):
        super().__init__(group.spec)
        self.group = group

    def init_state(self, param):
        if not starts_as_gradient(self.spec):  # PyTorch's momentum buffer starts as the first gradient
            for name in self.spec.state_names:
                self.state[name] = np.full_like(param.array, initial_buffer_value(self.spec, name))

    def update_core_cpu(self, param):
        names = self.spec.state_names
        buffers = tuple(self.state.get(name) for name in names)
        _, buffers = optimizer_update(
            self.spec, param.array, param.grad, buffers, self.t, self.group.lr, np.sqrt, True, self.group.momentum,
        )  # fmt: skip
        self.state.update(zip(names, buffers, strict=True))


class _ClipGradNorm:
    """A Chainer optimizer hook (timing ``pre``): ``clip_grad_norm_``'s global-norm clipping.
    Chainer's own ``GradientClipping`` leaves out PyTorch's ``+ 1e-6`` and scales only above the norm."""

    name, timing, call_for_each_param = "ClipGradNorm", "pre", False

    def __init__(self, max_norm):
        self.max_norm = max_norm

    def __call__(self, optimizer):
        grads = [param.grad for param in optimizer.target.params()
                 if param.grad is not None and param.update_rule.enabled]  # frozen ones are not clipped  # fmt: skip
        if grads:
            norms = [np.linalg.norm(grad.reshape(-1)) for grad in grads]
            scale = clip_grad_norm_scale(norms, self.max_norm, np.sqrt, np.minimum).astype(grads[0].dtype)
            for grad in grads:
                grad *= scale


def _stop_gradient(param):
    """No gradient for ``param`` at all, as PyTorch's ``requires_grad=False``: Chainer's backward
    computes the gradients of the inputs whose variable node requires one (``FunctionNode``'s
    ``target_input_indexes``), and a layer whose inputs need none is left out of the graph. Chainer
    has no public switch for it (``Link.disable_update`` only stops the update), so the parameter's
    flag and its node's are cleared."""
    param._requires_grad = False
    param.node._requires_grad = False


class _Optimizer(chainer.optimizer.GradientMethod):
    """Chainer's optimizer machinery (setup, per-parameter rules, ``t``) with PyTorch's rules, each
    parameter's those of its group (``groups``: ``id(parameter)`` ->
    :class:`~unitrain.controls.ParamGroup`; a frozen one has none, and its rule is disabled)."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def setup(self, link):
        chainer.Optimizer.setup(self, link)  # GradientMethod's would give every parameter one kind of rule
        for param in link.params():
            group = self.groups.get(id(param))
            param.update_rule = _PyTorchRule(group) if group is not None else _Rule(None)
            param.update_rule.enabled = group is not None
        return self

    def reallocate_cleared_grads(self):
        """Keep cleared gradients ``None`` (GradientMethod would fill them with zeros)."""


class ChainerLoop(TrainingLoop):
    name = "chainer"
    framework = "chainer"
    capabilities = frozenset({
        "dropout", "batchnorm", "conv", "native-model", "float64", "random-state",
        "residual", "activations", "layernorm", "pooling", "losses", "custom-loss", "optimizers", "clipping",
        "distributed", "training-controls", "sequences", "graph", "multi-model", "attention",
    })  # fmt: skip

    # --- building ---------------------------------------------------------------------------

    def _build(self, model):
        self._rng = dropout_stream(self.seed, self.rank)
        paths = {}  # canonical name -> Chainer serializer path
        self._natives = {}  # dotted module path -> its native callable, for graphs' call_module nodes
        root = self._node(model, "", "", paths)
        self._paths = {key: paths[key] for key in model.state_shapes()}  # in state_dict order
        self._adopt(root)

    def _node(self, spec, name: str, path: str, paths: dict):
        """The native callable of ``spec`` (a container or a leaf). ``name`` and ``path`` prefix its state
        entries' canonical names and Chainer paths (``layer1.0.`` and ``layer1/0/``; empty at the root);
        each entry's path goes into ``paths``. The tree of Chains mirrors the spec's, so the two agree."""
        if isinstance(spec, layers.Residual):
            block = _Residual()
            self._fill(block, spec.body.children, name, path, paths)
            for role, child in (("downsample", spec.shortcut), ("post", spec.post)):
                if child is not None:
                    block.attach(role, *self._child(block, role, child, name, path, paths))
            return block
        if isinstance(spec, layers.Sequential):
            chain = _Sequence()
            self._fill(chain, spec.children, name, path, paths)
            return chain
        if isinstance(spec, Graph):
            chain = _Graph(spec)
            for child_name, child in spec.children:
                chain.register(*self._child(chain, child_name, child, name, path, paths))
            for node in spec.nodes:
                if node.op == "call_module":
                    call = self._natives[f"{name}{node.target}"]
                    if node.options:  # a recurrent call with initial or final states
                        call = functools.partial(call.call_states, **node.options)
                elif node.target in ops.ACTIVATIONS:
                    call = self._leaf(ops.ACTIVATIONS[node.target](**node.options))
                else:
                    call = functools.partial(chainer_graph.FUNCTIONS[node.target], **node.options)
                chain._steps.append((node.name, call, node.args))
            for key, given in spec.tied:
                source, transposed = tie_source(given)
                (leaf_path, attribute), (source_path, source_attribute) = key.rsplit(".", 1), source.rsplit(".", 1)
                link = self._natives[f"{name}{leaf_path}"]
                shared = getattr(self._natives[f"{name}{source_path}"], _LINK_NAMES[source_attribute])
                # no longer a parameter of this link (Chainer's optimizer updates each parameter it
                # lists), but the tensor it computes with; Chainer sums the gradients of both uses
                delattr(link, _LINK_NAMES[attribute])
                if transposed:
                    link.add_hook(_TransposedTie(_LINK_NAMES[attribute], shared))
                else:
                    setattr(link, _LINK_NAMES[attribute], shared)
            return chain
        layer = self._leaf(spec)
        if isinstance(layer, chainer.Link):
            names = (
                _LINK_NAMES
                if isinstance(layer, (L.Linear, L.Convolution2D, L.ConvolutionND, L.EmbedID, L.Deconvolution2D))
                else _BN_NAMES
            )
            for key in {**spec.param_shapes(), **spec.buffer_shapes()}:
                # a recurrent layer's parameters carry PyTorch's names already, attention's with _ for .
                torch_named = isinstance(layer, (_Recurrent, chainer_attention.MultiheadAttention))
                paths[f"{name}{key}"] = f"{path}{key.replace('.', '_') if torch_named else names[key]}"
        return layer

    def _child(self, chain: _Sequence, child_name: str, spec, name: str, path: str, paths: dict):
        """``(attribute, native callable)`` of ``chain``'s child ``child_name``."""
        attribute = chain.child_name(child_name)
        native = self._node(spec, f"{name}{child_name}.", f"{path}{attribute}/", paths)
        self._natives[f"{name}{child_name}"] = native
        return attribute, native

    def _fill(self, chain: _Sequence, children, name: str, path: str, paths: dict) -> None:
        """Append ``children`` ((name, spec) pairs) to ``chain``."""
        for child_name, spec in children:
            chain.append(*self._child(chain, child_name, spec, name, path, paths))

    def _leaf(self, spec):
        """The native link or function of a leaf spec."""
        if isinstance(spec, (layers.Linear, layers.Conv2d, sequences.Conv1d)):
            zero = chainer.initializers.Zero(self.dtype)  # init_weights is loaded right after
            init = {"nobias": not spec.bias, "initialW": zero, "initial_bias": zero}
            if isinstance(spec, layers.Linear):
                return _Linear(spec.in_features, spec.out_features, **init)
            size = spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding
            native = L.Convolution2D if isinstance(spec, layers.Conv2d) else L.Convolution1D
            return native(*size, dilate=spec.dilation, groups=spec.groups, **init)
        if type(spec) in attention.LEAVES.values():
            return chainer_attention.leaf(spec, self.dtype, self._rng)
        if isinstance(spec, sequences.Embedding):
            return _Embedding(spec, self.dtype)
        if isinstance(spec, sequences._Recurrent):
            return _Recurrent(spec, self.dtype, self._rng)
        if isinstance(spec, layers.ConvTranspose2d):
            return _ConvTranspose2d(spec, self.dtype)
        if isinstance(spec, layers._BatchNorm):
            return _BatchNorm(spec, self.dtype)
        if isinstance(spec, layers.LayerNorm):
            return _LayerNorm(spec, self.dtype)
        if isinstance(spec, layers.Dropout):
            return _Dropout(spec.p, self._rng)
        return _FUNCTIONS[type(spec)](spec)

    def _wrap_native(self, model):
        uninitialized = [path for path, param in model.namedparams() if param.array is None]
        if uninitialized:
            raise ValueError(
                f"Chainer parameters {uninitialized} are not initialized yet: give the links their input "
                "sizes or run one forward pass before handing the model to the loop"
            )
        flat = DictionarySerializer()
        flat.save(model)
        # Parameters and floating-point persistents (avg_mean ...); scalar ones such as
        # BatchNormalization.N (the count of its fine-tuning mode, unused here) stay out.
        paths = sorted(path for path, value in flat.target.items() if np.asarray(value).dtype.kind == "f")
        self._paths = {path.replace("/", "."): path for path in paths}
        self._adopt(model)

    def _adopt(self, model):
        self.model = model
        model.cleargrads()  # new links hold NaN gradients, which a first backward would add to
        params = {path.lstrip("/"): param for path, param in model.namedparams()}
        self._params = {name: params[path] for name, path in self._paths.items() if path in params}
        groups = self._resolve_controls(self._params)
        self.optimizer = _Optimizer({id(self._params[name]): group for group in groups for name in group.names})
        self.optimizer.setup(model)
        for name in self.frozen:
            _stop_gradient(self._params[name])
        if self.clip_grad_norm is not None:
            self.optimizer.add_hook(_ClipGradNorm(self.clip_grad_norm))
        elif self.clip_grad_value is not None:  # Chainer's own hook clamps like torch.clamp_
            bound = self.clip_grad_value
            self.optimizer.add_hook(chainer.optimizer_hooks.GradientHardClipping(-bound, bound))

    @classmethod
    def is_native_model(cls, model):
        framework = sys.modules.get("chainer")
        return framework is not None and isinstance(model, framework.Link)

    @classmethod
    def native_example_model(cls):
        return chainer.Sequential(L.Linear(8, 16), F.relu, L.Linear(16, 3))

    # --- the step ---------------------------------------------------------------------------

    def _set_training(self, mode):
        self._train = mode

    def _zero_grad(self):
        self.model.cleargrads()

    def _forward(self, x):
        with chainer.using_config("train", self._train):
            return self._call(x)

    def _call(self, x):
        return self.model(*x) if isinstance(x, tuple) else self.model(x)  # a tuple: a graph's inputs

    def _loss(self, pred, y):
        return self._compute_loss(pred, y)

    def _compute_loss(self, pred, y, reduction=None, spec=None):
        """The value of the loss spec (default: the loop's); ``reduction`` overrides the spec's
        own (a CustomLoss has none). A PerOutputLoss sums its losses, as a PyTorch loop writes it."""
        spec = spec or self.loss_spec
        if isinstance(spec, losses.PerOutputLoss):
            parts = [self._compute_loss(p, t, reduction, part) for p, t, part in zip(pred, y, spec.losses, strict=True)]
            return functools.reduce(operator.add, parts)
        if isinstance(spec, losses.CustomLoss):
            return expr.evaluate(spec.tree, pred, y, _EXPR_OPS)
        mean = (reduction or spec.reduction) == "mean"
        if mean and _averaged_by_chainer(spec, pred, y):
            # Chainer's own averaged loss: one function node, where per-row terms and F.mean take three
            # (about a tenth of a small MLP's step)
            return _CHAINER_MEANS[type(spec)](spec, pred, y)
        terms = _LOSS_TERMS[type(spec)](spec, pred, y)
        return F.mean(terms) if mean else F.sum(terms)

    def _backward(self, loss):
        loss.backward()

    def _update(self):
        self.optimizer.update()

    def _step(self, x, y):
        self._zero_grad()
        pred = self._forward(x)
        loss = self._loss(pred, y)
        loss.backward()
        self.optimizer.update()
        # arrays, not Variables: a Variable keeps its graph
        self._step_pred = tuple(p.array for p in pred) if isinstance(pred, tuple) else pred.array
        return loss.array

    def _set_lr(self, lr):
        pass  # each rule reads its group's lr

    def _set_momentum(self, momentum):
        pass  # each rule reads its group's momentum

    def _scale_gradients(self, factor):
        for param in self.model.params():
            if param.grad is not None:
                param.grad *= self.dtype.type(factor)

    def _step_correct(self, y):
        return self._count_correct(self._step_pred, y)

    def _count_correct(self, pred, y):
        pred = getattr(pred, "array", pred)  # forward's are Variables
        xp = chainer.backend.get_array_module(pred)
        return (pred.argmax(axis=1) == xp.asarray(y)).sum()

    @staticmethod
    def to_numpy(value):
        return chainer.backend.CpuDevice().send(getattr(value, "array", value)).copy()

    @staticmethod
    def to_float(value):
        return float(getattr(value, "array", value))  # float() does not take a chainer.Variable

    # --- data parallel: ChainerMN over MPI (launched by mpiexec) ------------------------------

    def _setup_distributed(self):
        import chainermn  # imports mpi4py

        # 'naive': MPI allreduce of NumPy arrays ('flat' and the NCCL ones need CuPy). Not
        # create_multi_node_optimizer: it averages inside update(), where the core's weighted sum
        # of shards already did, and its first update() only broadcasts the weights.
        self._communicator = chainermn.create_communicator("naive")
        return self._communicator.rank, self._communicator.size

    def _reduce_gradients(self, weight):
        scale = self.dtype.type(weight * self._communicator.size)  # the mean below divides the sum by the size
        for param in self.model.params():
            if param.grad is not None:
                param.grad *= scale
        # zero_fill: a rank without rows (or a parameter without a gradient) still takes part
        self._communicator.multi_node_mean_grad(self.model, zero_fill=True)

    def _all_sum(self, values):
        return self._communicator.allreduce(values)

    def _predict(self, x):
        with chainer.using_config("train", self._train), chainer.no_backprop_mode():
            pred = self._call(x)
        return tuple(p.array for p in pred) if isinstance(pred, tuple) else pred.array

    def _evaluate_batch(self, x, y):
        with chainer.using_config("train", self._train), chainer.no_backprop_mode():
            pred = self._call(x)
            if isinstance(self.loss_spec, losses.PerOutputLoss):  # each output's sum
                parts = zip(pred, y, self.loss_spec.losses, strict=True)
                return tuple(float(self._compute_loss(p, t, "sum", part).array) for p, t, part in parts), 0
            loss = self._compute_loss(pred, y, "sum")
        correct = int((pred.array.argmax(axis=1) == y).sum()) if y.dtype.kind == "i" else 0  # class indices
        return float(loss.array), correct

    # --- state ------------------------------------------------------------------------------

    def _gradients(self):
        return {name: np.zeros_like(p.array) if p.grad is None else p.grad.copy() for name, p in self._params.items()}

    def _state_dict(self):
        flat = DictionarySerializer()
        flat.save(self.model)
        return {name: np.array(flat.target[path]) for name, path in self._paths.items()}

    def _load_state_dict(self, state):
        # strict=False: entries outside the canonical state (BatchNormalization.N) keep their values.
        NpzDeserializer({path: state[name] for name, path in self._paths.items()}, strict=False).load(self.model)

    def _optimizer_state_dict(self):
        state = {"step": np.array(self.optimizer.t, np.int64)}
        for name, param in self._params.items():
            for key, value in (param.update_rule.state or {}).items():
                state[f"{name}.{key}"] = value.copy()
        return state

    def _load_optimizer_state_dict(self, state: Mapping[str, np.ndarray]):
        step = int(state["step"])
        for name, param in self._params.items():
            names = () if name in self.frozen else self._state_names(name)
            entries = {key: np.array(state[f"{name}.{key}"]) for key in names if f"{name}.{key}" in state}
            param.update_rule.load(entries, step)
        self.optimizer.t = step

    def _random_state(self):
        # a native Chain's F.dropout draws from NumPy's global RNG, which the loop does not own
        return stream_state(self._rng) if self.model_spec is not None else {}

    def _load_random_state(self, state):
        set_stream_state(self._rng, state)
