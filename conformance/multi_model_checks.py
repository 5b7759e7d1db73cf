"""The check of multi-model steps (:mod:`unitrain.steps`, capability ``multi-model``): a tiny GAN
whose two phases use ``detach`` both ways, against a float64 reference written here by hand
(no code shared with any backend's evaluator or with the core's noise stream).

Tolerance size: the longest sum of a step is a weight gradient over the batch (``N`` times the
widest layer, 3), and each value passes through a few layers; 8 times the batch's elements of the
widest value bounds it, as for the layer checks' gradients.
"""

from __future__ import annotations

import numpy as np

from unitrain import layers as L
from unitrain import steps
from unitrain.optim import SGD

from .checks import check, compare, state_of

N, NOISE, FEATURES, LR, STEPS, SEED = 4, 2, 3, 0.1, 2, 5


def gan_step() -> steps.MultiStep:
    """G: Linear(2, 3) and Tanh; D: Linear(3, 1) and Sigmoid. The discriminator's phase sees the
    fake batch detached; the generator's loss adds ``0.5 * mean(fake * detach(fake))``, whose
    gradient with respect to the fake batch is half the detached factor alone."""
    gen, disc = steps.Model("generator"), steps.Model("discriminator")
    fake = gen(steps.normal(NOISE))
    real_loss = steps.bce(disc(steps.batch()), 1.0) + steps.bce(disc(steps.detach(fake)), 0.0)
    return steps.MultiStep(
        models={"generator": L.Sequential(L.Linear(NOISE, FEATURES), L.Tanh()),
                "discriminator": L.Sequential(L.Linear(FEATURES, 1), L.Sigmoid())},
        optimizers={"d": steps.OptimizerOver(SGD(LR), ["discriminator"]),
                    "g": steps.OptimizerOver(SGD(LR), ["generator"])},
        phases=[steps.Phase("discriminator", real_loss, "d"),
                steps.Phase("generator", steps.bce(disc(fake), 1.0) + 0.5 * (fake * steps.detach(fake)).mean(), "g")],
    )  # fmt: skip


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def reference_run(weights: dict, batches) -> tuple[dict, list[tuple[float, float]]]:
    """The two phases by hand in float64: the models' weights after each step and each phase's loss."""
    g = {key: np.asarray(value, np.float64).copy() for key, value in weights["generator"].items()}
    d = {key: np.asarray(value, np.float64).copy() for key, value in weights["discriminator"].items()}
    noise = np.random.Generator(np.random.PCG64(SEED))  # the documented stream: PCG64(seed), float64 draws
    losses = []
    for x in batches:
        z = noise.standard_normal((len(x), NOISE))
        fake = np.tanh(z @ g["0.weight"].T + g["0.bias"])
        # discriminator: -mean(log p_real) - mean(log(1 - p_fake)), no gradient into the generator
        p_real = _sigmoid(x @ d["0.weight"].T + d["0.bias"])
        p_fake = _sigmoid(fake @ d["0.weight"].T + d["0.bias"])
        loss_d = -np.log(p_real).mean() - np.log(1 - p_fake).mean()
        d_real, d_fake = (p_real - 1) / len(x), p_fake / len(x)  # d loss / d logit
        d["0.weight"] -= LR * (d_real.T @ x + d_fake.T @ fake)
        d["0.bias"] -= LR * (d_real.sum(0) + d_fake.sum(0))
        # generator: the discriminator as just updated, the same fake batch
        p = _sigmoid(fake @ d["0.weight"].T + d["0.bias"])
        loss_g = -np.log(p).mean() + 0.5 * (fake * fake).mean()
        d_fake = ((p - 1) / len(x)) @ d["0.weight"] + 0.5 * fake / fake.size  # the detached factor: no term
        d_pre = d_fake * (1 - fake * fake)
        g["0.weight"] -= LR * (d_pre.T @ z)
        g["0.bias"] -= LR * d_pre.sum(0)
        losses.append((loss_d, loss_g))
    return {"generator": g, "discriminator": d}, losses


@check("multi-model")
def check_multi_model_step(adapter):
    """A GAN step of two phases over two models and two SGD optimizers: each phase's loss, and both
    models' weights after two steps, match the float64 reference; this catches a detach that lets
    the gradient through, a phase that updates a model its optimizer does not hold, and noise that
    is not the step's seeded stream."""
    step = gan_step()
    dtype = "float64" if "float64" in adapter.capabilities else "float32"
    loop = steps.MultiModelLoop(step, adapter, seed=SEED, dtype=dtype)
    weights = {name: state_of(spec, seed) for seed, (name, spec) in enumerate(step.models)}
    for name, state in weights.items():
        loop.loops[name].load_state_dict(state)
    batches = [np.random.default_rng(index).normal(size=(N, FEATURES)) for index in range(STEPS)]
    expected_states, expected_losses = reference_run(weights, batches)
    size = 8 * N * FEATURES
    for index, (x, expected) in enumerate(zip(batches, expected_losses, strict=True)):
        got = loop.step(x.astype(dtype))
        for phase, value in zip(("discriminator", "generator"), expected, strict=True):
            compare(f"GAN step {index}: the {phase} phase's loss", got[phase], value, dtype=loop.dtype, size=size)
    for name, state in expected_states.items():
        for key, value in state.items():
            compare(f"GAN after {STEPS} steps: {name}.{key}", loop.loops[name].state_dict()[key], value,
                    dtype=loop.dtype, size=size)  # fmt: skip
