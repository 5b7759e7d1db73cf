"""An example third-party backend: a dense-only NumPy adapter in one file.

It supports Flatten, Linear and ReLU in float32 and declares no capability, so the conformance
suite skips its convolution, dropout, BatchNorm, float64, native-model and issue-8 (residual,
layers, losses, custom-loss) checks with a reason and runs every other one. A package registers
it under the ``unitrain.backends`` entry-point group::

    [project.entry-points."unitrain.backends"]
    tinydense = "unitrain_tinydense:TinyDenseLoop"
"""

from __future__ import annotations

import numpy as np

from unitrain.layers import Flatten, Linear, ReLU
from unitrain.loop import TrainingLoop
from unitrain.loss_value import LossExpression
from unitrain.losses import MSELoss, NLLLoss
from unitrain.optim import Adam, adam_update, sgd_update


def _loss_terms(spec, pred, y):
    """Per-sample (MSE: per-element) losses and the gradient of their sum w.r.t. ``pred``."""
    if isinstance(spec, MSELoss):
        return (pred - y) ** 2, 2 * (pred - y)
    rows = np.arange(len(y))
    one_hot = np.zeros_like(pred)
    one_hot[rows, y] = 1
    if isinstance(spec, NLLLoss):
        return -pred[rows, y], -one_hot
    shifted = pred - pred.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return -log_probs[rows, y], np.exp(log_probs) - one_hot


class TinyDenseLoop(TrainingLoop):
    name = "tinydense"

    def _build(self, model):
        self._layers = list(model.named_layers())
        for _, layer in self._layers:
            if not isinstance(layer, (Linear, ReLU, Flatten)):
                raise TypeError(f"the tinydense backend supports Linear, ReLU and Flatten, not {layer!r}")
        self._params = {key: np.zeros(shape, self.dtype) for key, shape in model.param_shapes().items()}
        self._grads = {key: np.zeros_like(value) for key, value in self._params.items()}
        self._optimizer_state, self._steps = {}, 0

    def _run(self, x):
        inputs = []
        for name, layer in self._layers:
            inputs.append(x)
            if isinstance(layer, Linear):
                x = x @ self._params[f"{name}.weight"].T
                if layer.bias:
                    x = x + self._params[f"{name}.bias"]
            elif isinstance(layer, ReLU):
                x = np.maximum(x, 0)
            else:
                x = x.reshape(len(x), -1)
        return x, inputs

    def _set_training(self, mode):
        pass  # no layer behaves differently in training

    def _zero_grad(self):
        for grad in self._grads.values():
            grad.fill(0)

    def _forward(self, x):
        pred, self._inputs = self._run(x)
        return pred

    def _loss(self, pred, y):
        terms, grad = _loss_terms(self.loss_spec, pred, y)
        scale = 1 / terms.size if self.loss_spec.reduction == "mean" else 1
        # the core's LossExpression takes the arithmetic of the tutorial-shaped step (loss * 0.5, ...)
        return LossExpression(terms.sum() * self.dtype.type(scale), (grad * self.dtype.type(scale)).astype(self.dtype))

    def _backward(self, loss):
        grad = (loss.origin * self.dtype.type(loss.slope)).astype(self.dtype)
        for (name, layer), x in zip(reversed(self._layers), reversed(self._inputs), strict=True):
            if isinstance(layer, Linear):
                self._grads[f"{name}.weight"] += grad.T @ x
                if layer.bias:
                    self._grads[f"{name}.bias"] += grad.sum(0)
                grad = grad @ self._params[f"{name}.weight"]
            elif isinstance(layer, ReLU):
                grad = grad * (x > 0)
            else:
                grad = grad.reshape(x.shape)

    def _update(self):
        self._steps += 1
        spec, state = self.optimizer_spec, self._optimizer_state
        for name, param in self._params.items():
            grad = self._grads[name]
            if isinstance(spec, Adam):
                zeros = np.zeros_like(param)
                param[...], state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"] = adam_update(
                    param, grad, state.get(f"{name}.exp_avg", zeros), state.get(f"{name}.exp_avg_sq", zeros),
                    self._steps, spec, spec.lr, np.sqrt,
                )  # fmt: skip
            else:  # the buffer's name: PyTorch's momentum_buffer, or Chainer's and Keras' velocity
                key = f"{name}.{spec.state_names[0]}" if spec.state_names else None
                param[...], buf = sgd_update(param, grad, state.get(key), spec, spec.lr)
                if buf is not None:
                    state[key] = buf.copy()

    def _step(self, x, y):
        self._zero_grad()
        loss = self._loss(self._forward(x), y)
        self._backward(loss)
        self._update()
        return loss.value

    @staticmethod
    def to_float(value):
        return float(value)

    def _predict(self, x):
        return self._run(x)[0]

    def _evaluate_batch(self, x, y):
        pred = self._run(x)[0]
        correct = int((pred.argmax(1) == y).sum()) if self.loss_spec.class_targets else 0
        return float(_loss_terms(self.loss_spec, pred, y)[0].sum()), correct

    def _gradients(self):
        return {name: grad.copy() for name, grad in self._grads.items()}

    def _state_dict(self):
        return {name: value.copy() for name, value in self._params.items()}

    def _load_state_dict(self, state):
        for name, value in state.items():
            self._params[name][...] = value

    def _optimizer_state_dict(self):
        return {"step": np.array(self._steps, np.int64), **{k: v.copy() for k, v in self._optimizer_state.items()}}

    def _load_optimizer_state_dict(self, state):
        self._steps = int(state["step"])
        self._optimizer_state = {k: np.array(v, self.dtype) for k, v in state.items() if k != "step"}
