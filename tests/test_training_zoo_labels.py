"""The training zoo's labels, proven by plain-hook measurements of each run (tests/training_zoo.py), not by actdiag.

These test the test bed: if one fails, a label in the zoo is wrong, whatever actdiag says.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import training_zoo as zoo
from tests.training_zoo import BY_NAME, CASES


def test_every_case_is_labelled_once() -> None:
    assert len(BY_NAME) == len(CASES)
    for case in CASES:
        label = case.label
        assert label.healthy or label.layers or label.code in ("fp16_underflow",), case
        assert label.pass_ in (None, "forward", "backward")
        assert not set(label.fixes) & set(label.forbidden_fixes)


@pytest.mark.parametrize("name", ["dies_mid_run", "nan_backward_mid_run", "gan_healthy", "bf16_weights_adam"])
def test_runs_are_deterministic(name: str) -> None:
    """Two instances of a run train identically (what lets a label name a step)."""
    a, b = BY_NAME[name].make().train(), BY_NAME[name].make().train()
    assert a == b or all((x == y) or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def test_dies_mid_run() -> None:
    """act2 is alive at step 0, every unit fires until the spike; from the step after the 200x step on, ~90% of its
    units never fire again (and act1, before it, stays alive: the damage is local)."""
    m = BY_NAME["dies_mid_run"].measure()
    label = BY_NAME["dies_mid_run"].label
    assert m["lr_spike"] == 200.0
    assert m["dead_at_start"] == 0.0
    assert m["dead_before_spike"] == 0.0
    assert m["dead_after"] > 0.8
    assert m["dead_last3"] > 0.8
    assert m["act1_dead_after"] < 0.1
    assert m["first_step_over_80"] == label.step == zoo.DiesMidRun.SPIKE_STEP + 1


def test_dead_since_init() -> None:
    """act2 is entirely dead at every step from step 0 on (act1 before it is alive): no learning rate made it so."""
    m = BY_NAME["dead_since_init"].measure()
    assert m["dead_each_step"][0] == 1.0
    assert all(d == 1.0 for d in m["dead_each_step"])
    assert m["act1_dead"] == 0.0


@pytest.mark.parametrize("name", ["nan_forward_mid_run", "nan_backward_mid_run"])
def test_nan_mid_run(name: str) -> None:
    """The first non-finite value appears at the labelled step, in the labelled module and pass; in the backward
    case the forward of that step is still finite. By the end NaN has reached other layers too (in the forward
    case every layer), so a rule that looks only at the latest step would blame `fc1`."""
    case = BY_NAME[name]
    m = case.measure()
    assert m["first"] == (case.label.step, case.label.layers[0], case.label.pass_)
    if case.label.pass_ == "backward":
        assert m["forward_finite_at_first"]
        assert m["nonfinite_at_end"] == ["fc1"]
    else:
        assert m["nonfinite_at_end"] == ["fc1", "root", "head"]
    assert math.isfinite(m["losses"][0])


def test_nan_from_updates() -> None:
    """The inputs are finite; the step before the first NaN, one optimizer step changed a parameter by far more
    than its own norm (the first step changed each by under 10%)."""
    case = BY_NAME["nan_from_updates"]
    m = case.measure()
    assert m["first"] == (case.label.step, case.label.layers[0], case.label.pass_)
    assert m["inputs_finite"]
    assert m["first_ratio"] < 0.1
    assert m["max_ratio_before"] > 1e3


def test_adagrad_stall() -> None:
    """Within 200 steps AdaGrad's effective step ||dW|| / ||grad|| of the first and last layers falls more than
    10x, while their gradients keep most of their size (the label noise keeps them up): the optimizer stalls, the
    problem has not gone away."""
    m = BY_NAME["adagrad_stall"].measure()
    for name in ("0.weight", "4.weight"):
        assert m["effective_step_decay"][name] < 0.1, m
        assert m["grad_norm_change"][name] > 0.4, m
    assert m["effective_step_decay"]["2.weight"] < 0.5


def test_adam_lr_too_small_stalls() -> None:
    """Adam at lr 1e-8 changes no weight by more than 1e-6 of its norm in any step, although gradients are large
    (norm > 0.1), and its effective step does not decay by 10x: the learning rate is too small, the optimizer is
    fine (switching it would not help)."""
    m = BY_NAME["adam_lr_too_small"].measure()
    assert m["max_ratio"] < 1e-6
    assert m["min_grad_norm"] > 0.1
    assert all(d > 0.1 for d in m["effective_step_decay"].values())


def test_linear_decay_to_zero_is_healthy() -> None:
    """The learning rate falls 40x and the effective step with it, but each update stays within Adam's usual size
    for the learning rate in force (its RMS between 0.5 and 1 lr), and the loss halves: a schedule, not a stall."""
    m = BY_NAME["linear_decay_to_zero"].measure()
    lr0, lr1 = m["lr_first_last"]
    assert lr0 / lr1 == pytest.approx(40.0)
    lo, hi = m["update_rms_per_lr"]
    assert lo > 0.5 and hi <= 1.0 + 1e-6
    assert m["effective_step_decay"] < 0.05  # what a rule blind to the schedule sees
    losses = m["losses"]
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])


def test_zero_init_branches_are_healthy() -> None:
    """Each zero- or near-zero-initialised parameter keeps an update ratio above 10% after 5 steps (what a ratio
    rule blind to the initial value sees), while its update RMS stays at Adam's usual ~lr, and the loss on the
    run's batches falls."""
    m = BY_NAME["zero_init_branches"].measure()
    for name in zoo.ZERO_INIT_PARAMS:
        assert m[name]["max_ratio_after_5"] > 0.1, (name, m[name])
        assert m[name]["max_update_rms_per_lr"] < 1.5, (name, m[name])
    assert m["loss_drop"] > 0.01


def test_functional_tanh_is_saturated() -> None:
    """At every step over 40% of `torch.tanh`'s outputs inside `block` are within 0.01 of +-1."""
    m = BY_NAME["functional_tanh_saturated"].measure()
    assert m["saturated"][0] > 0.4


def test_functional_relu_is_dead() -> None:
    """Every unit of `F.relu` inside `block` outputs zero for every sample of the run; the F.relu before it (inside
    the root's forward, on `inp`) is alive."""
    m = BY_NAME["functional_relu_dead"].measure()
    assert m["block_dead"] == 1.0
    assert m["inp_dead"] == 0.0


def test_gan_is_healthy() -> None:
    """The discriminator's own optimizer steps change it by 1e-5 to 1e-1 of its norm; it is neither beaten nor
    winning (probability on real data near 0.5); both losses stay finite and bounded; the generator's ReLU is alive."""
    m = BY_NAME["gan_healthy"].measure()
    lo, hi = m["d_update_ratio"]
    assert lo > 1e-5 and hi < 0.1
    assert 0.3 < m["d_real_prob_end"] < 0.8
    assert all(0.1 < v < 3.0 for v in m["d_losses"] + m["g_losses"])
    assert m["dead_gen"] < 0.1


def test_bf16_weights_lose_their_updates() -> None:
    """At every step after the first, more than 75% of each weight's elements with a non-zero gradient are left
    exactly unchanged by Adam at lr 1e-4 in bfloat16; in the float32 twin under 1%, and the twin learns more."""
    bf16 = BY_NAME["bf16_weights_adam"].measure()
    fp32 = BY_NAME["fp32_twin_adam"].measure()
    for name in ("0.weight", "2.weight", "4.weight"):
        assert bf16["unchanged"][name][0] > 0.75, bf16["unchanged"]
        assert fp32["unchanged"][name][1] < 0.01, fp32["unchanged"]
    assert fp32["loss_drop"] > 2 * bf16["loss_drop"] > 0


def test_fp16_gradients_flush_to_zero() -> None:
    """Every gradient element of every step is exactly zero and no weight moves, although the true (float64)
    gradient at the output is non-zero: it lies below float16's smallest subnormal."""
    m = BY_NAME["fp16_grads_flushed"].measure()
    assert m["grad_nonzero"] == 0.0
    assert m["update_norm"] == 0.0
    assert 0 < m["true_output_grad_scale"] < m["fp16_smallest_subnormal"]
    assert torch.tensor(m["true_output_grad_scale"], dtype=torch.float16).item() == 0.0


@pytest.mark.parametrize("name", ["healthy_mlp", "healthy_cnn", "healthy_transformer"])
def test_controls_are_healthy(name: str) -> None:
    """Loss falls, nothing is non-finite, ReLUs are alive, weight updates stay under 5% of the weights."""
    m = BY_NAME[name].measure()
    losses = m["losses"]
    assert sum(losses[-5:]) < 0.95 * sum(losses[:5])
    assert m["nonfinite"] is None
    assert all(d < 0.1 for d in m["dead"].values())
    assert m["max_weight_ratio_after_5"] < 0.05


def test_converged_sigmoid_classifier() -> None:
    """The classifier is right on every sample of its last batch and over a third of its sigmoid outputs are within
    0.01 of 0 or 1: confidence earned by training, at the output, which is no saturation to report."""
    m = BY_NAME["converged_sigmoid_classifier"].measure()
    assert m["accuracy"] == 1.0
    assert m["at_bounds_end"] > 0.3
    assert m["losses"][-1] < 0.1 < m["losses"][0]
