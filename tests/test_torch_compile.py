"""``loop.compile()`` on the torch backend (``torch.compile``; ``Run(compile=True)``, ``--compile``): the
same training as eager PyTorch, and without a C++ compiler one line and an eager loop. The compiled
case takes tens of seconds to compile on two cores, so it is ``slow``."""

import numpy as np
import pytest
from torch_reference import float64_tolerances, random_batches
from unitrain.backends.torch import TorchLoop
from unitrain.conformance.tolerances import tolerance

import unitrain
from unitrain import Run


def _model():
    return unitrain.Sequential(unitrain.Linear(8, 16), unitrain.ReLU(), unitrain.Linear(16, 3))


def _train(loop, batches):
    losses = [float(loop.step(batch)) for batch in batches]
    return losses, loop.state_dict()


@pytest.mark.slow
def test_compiled_steps_train_as_eager_ones():
    batches = random_batches((8,), 3, 3)
    options = {"seed": 0, "dtype": "float64", "optimizer": unitrain.SGD(lr=0.1, momentum=0.9)}
    eager_losses, eager = _train(TorchLoop(_model(), **options), batches)
    compiled_loop = TorchLoop(_model(), **options)
    compiled_loop.compile()
    assert compiled_loop._forward_module is not compiled_loop.model  # torch.compile's wrapper
    losses, state = _train(compiled_loop, batches)
    tolerances = float64_tolerances(eager, size=4 * 16)  # the longest sum: a batch of 4 times 16 features
    for key, value in eager.items():
        assert np.abs(state[key] - value).max() <= tolerances[key], key
    # the losses: the same longest sum, then the mean adds the batch's softmax over 3 classes
    allowed = tolerance(np.float64, 4 * 16 + 3, float(np.abs(eager_losses).max()))
    np.testing.assert_allclose(losses, eager_losses, rtol=0, atol=allowed)


def test_without_a_cpp_compiler_the_loop_says_so_and_runs_eagerly(monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    batches = random_batches((8,), 3, 2)
    loop = Run(model="mlp", compile=True).make_loop("torch")
    assert capsys.readouterr().err == (
        "unitrain: no C++ compiler (no-such-compiler-here) for torch.compile on the CPU; training eagerly\n"
    )
    assert loop._forward_module is loop.model
    loop = TorchLoop(_model())
    loop.compile()
    eager = TorchLoop(_model())
    assert _train(loop, batches)[0] == _train(eager, batches)[0]


def test_compile_is_a_run_setting_other_backends_leave_alone():
    run = Run(compile=True)
    assert Run.from_dict(run.to_dict()) == run and "compile" not in Run().to_dict()
    numpy_loop = unitrain.make_loop("numpy", unitrain.mlp())
    assert run.compiled(numpy_loop) is numpy_loop  # nothing to compile, nothing said
    with pytest.raises(ValueError, match="compile"):
        Run(compile="yes")
