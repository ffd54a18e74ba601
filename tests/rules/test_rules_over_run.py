"""Findings over a whole run: units that die in training, and where a NaN/Inf first appeared.

Each label is proven in the test by plain PyTorch hooks (a forward hook per module, tensor hooks for gradients),
never by actdiag, and then compared with what actdiag reports at the end of the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import actdiag
from actdiag.hooks.stats import decode_tensor_stats, tensor_stats
from actdiag.records import LayerStats, StepRecord, TensorStats, UnitActivity
from actdiag.rules import DEFAULT_THRESHOLDS, diagnose
from actdiag.rules.run import dead_unit_findings, nonfinite_event

# ------------------------------------------------------------------------------------------------ models


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


class Temperature(nn.Module):
    """Divides by a temperature the training loop anneals; at zero the logits become Inf/NaN (0/0)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("t", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.t


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, broken: bool) -> torch.Tensor:
        ctx.broken = broken
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (torch.full_like(grad, float("nan")) if ctx.broken else grad), None


class FragileBackward(nn.Module):
    """Identity in the forward pass; once `broken`, its backward returns NaN for a finite incoming gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NaNBackward.apply(x, self.broken)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------ plain proof


class PlainProbe:
    """Independent measurements with plain hooks: per step, each module's output finiteness and (for ReLUs) which
    units fired; gradient finiteness of each module's output and input through tensor hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.step = 0
        self.order: dict[int, list[str]] = {}
        self.fwd_bad: dict[int, list[str]] = {}
        self.out_grad_bad: dict[int, set[str]] = {}
        self.in_grad_bad: dict[int, set[str]] = {}
        self.fired: dict[str, list[torch.Tensor]] = {}
        self.handles = [
            m.register_forward_hook(self._hook(name))
            for name, m in model.named_modules()
            if name and not list(m.children())
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            s = self.step
            self.order.setdefault(s, []).append(name)
            if not torch.isfinite(out).all():
                self.fwd_bad.setdefault(s, []).append(name)
            if isinstance(module, nn.ReLU):
                self.fired.setdefault(name, []).append((out > 0).flatten(0, -2).any(0))
            if out.requires_grad:
                out.register_hook(lambda g: self._grad(self.out_grad_bad, s, name, g))
            x = inputs[0]
            if x.requires_grad and x is not out:
                x.register_hook(lambda g: self._grad(self.in_grad_bad, s, name, g))

        return hook

    @staticmethod
    def _grad(table: dict[int, set[str]], s: int, name: str, g: torch.Tensor) -> None:
        if not torch.isfinite(g).all():
            table.setdefault(s, set()).add(name)

    def first_bad_step(self) -> int:
        steps = set(self.fwd_bad) | set(self.out_grad_bad) | set(self.in_grad_bad)
        return min(steps)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def train(
    model: nn.Module,
    steps: int,
    every: int = 1,
    lr: Callable[[int], float] = lambda s: 1e-3,
    before: Callable[[int], None] = lambda s: None,
    target_scale: float = 1.0,
    x_of: Callable[[int, torch.Tensor], torch.Tensor] = lambda s, x: x,
) -> tuple[actdiag.Monitor, PlainProbe]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = torch.randn(64, 1, generator=g) * target_scale
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    probe = PlainProbe(model)
    with actdiag.watch(model, every=every, strict=True) as monitor:
        for s in range(steps):
            probe.step = s
            before(s)
            for group in opt.param_groups:
                group["lr"] = lr(s)
            loss = (model(x_of(s, x)) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    probe.close()
    return monitor, probe


def only(monitor: actdiag.Monitor, code: str) -> actdiag.Finding:
    found = [f for f in monitor.findings if f.code == code]
    assert len(found) == 1, [(f.code, f.layer) for f in monitor.findings]
    return found[0]


def fix_codes(f: actdiag.Finding) -> list[str]:
    return [x.code for x in f.fixes]


# ------------------------------------------------------------------------------------------------ dead units


def expected_since(fired: list[torch.Tensor], recorded: list[int], window: int, share: float) -> tuple[int, int]:
    """(dead units, since step) from plain per-step masks, by the definition: a unit is dead when silent in its last
    `window` recorded steps; the since step is the recorded step from which more than `share` of the units have
    been silent."""
    masks = torch.stack([fired[s] for s in recorded])  # [recorded, units]
    units = masks.shape[1]
    streak = torch.zeros(units, dtype=torch.int64)
    for row in masks:
        streak = torch.where(row, torch.zeros_like(streak), streak + 1)
    dead = int((streak >= window).sum())
    order = sorted(streak.tolist(), reverse=True)
    since_streak = order[int(share * units)]  # the streak of the unit that takes the silent ones past the share
    return dead, recorded[len(recorded) - since_streak]


def test_units_that_die_after_a_too_large_step_are_dead_in_training() -> None:
    """Alive at step 0 (every unit of the second ReLU fires at least once, proven by a plain hook); one step with
    learning rate 1.0 on large targets pushes most of them below zero for good."""
    model = mlp()
    monitor, probe = train(model, 14, lr=lambda s: 1.0 if s == 4 else 1e-3, target_scale=100.0)
    fired = probe.fired["3"]
    assert fired[0].float().mean() >= 0.95  # alive at initialisation
    dead, since = expected_since(fired, list(range(14)), DEFAULT_THRESHOLDS.dead_window, 0.5)
    assert dead / 32 > 0.5
    f = only(monitor, "dead_relu")
    assert f.layer == "3"
    assert f.evidence["dead_units"] == dead
    assert f.evidence["since_init"] == 0.0
    assert f.evidence["first_step"] == since > 4
    assert f.evidence["never_active"] == int((~torch.stack(fired).any(0)).sum())
    assert "died in training" in f.message
    codes = fix_codes(f)
    assert codes[0] == "lower_learning_rate"
    assert {"leaky_relu", "gradient_clipping"} <= set(codes)
    assert "he_init" not in codes
    # no vanishing gradient at the first layer with an init fix as the headline
    assert all(g.code != "vanishing_gradient" for g in monitor.findings)


def test_dead_since_initialisation_is_told_apart() -> None:
    """A bias of -10 before the second ReLU: its units never fire (plain hook), from the first step on."""
    model = mlp()
    with torch.no_grad():
        model[2].bias.fill_(-10.0)
    monitor, probe = train(model, 6, every=2)
    assert not torch.stack(probe.fired["3"]).any()
    f = only(monitor, "dead_relu")
    assert (f.layer, f.severity) == ("3", "error")
    assert f.evidence["since_init"] == 1.0
    assert f.evidence["first_step"] == 0.0
    assert f.evidence["never_active"] == 32.0
    assert "he_init" in fix_codes(f)[:2]
    assert "lower_learning_rate" not in fix_codes(f)
    assert "vanishing_gradient" in f.related  # the consequence, linked to its cause


def test_healthy_relu_net_has_no_dead_units() -> None:
    monitor, probe = train(mlp(), 12)
    assert all(torch.stack(m).any(0).float().mean() > 0.9 for m in probe.fired.values())
    assert [f.code for f in monitor.findings if f.code in ("dead_relu", "nonfinite")] == []


def _relu_layer(silent: tuple[int, ...], since: tuple[int, ...], never: int, units: int = 10) -> LayerStats:
    act = UnitActivity(silent=silent, since=since, never=never, calls=len(silent) - 1)
    return LayerStats(name="act", type="ReLU", step=since[1], shape=(16, units), units=units, activity=act)


@pytest.mark.parametrize(("streak", "fires"), [(2, False), (3, True)])
def test_dead_window_is_k_recorded_steps(streak: int, fires: bool) -> None:
    # 6 of 10 units silent for `streak` recorded calls (of 5), the other 4 active now.
    silent = tuple(6 if s == streak else (4 if s == 0 else 0) for s in range(6))
    layer = _relu_layer(silent, since=(40, 40, 30, 20, 10, 0), never=0)
    found = dead_unit_findings([layer], DEFAULT_THRESHOLDS)
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["first_step"] == 20.0
        assert found[0].evidence["dead_units"] == 6.0


def test_dead_window_needs_its_sample_floor() -> None:
    act = UnitActivity(silent=(0, 0, 0, 10), since=(3, 3, 2, 1), never=10, calls=3)
    layer = LayerStats(name="act", type="ReLU", step=3, shape=(2, 10), units=10, activity=act)  # 2 x 3 < 8 samples
    assert dead_unit_findings([layer], DEFAULT_THRESHOLDS) == []
    t = dataclasses.replace(DEFAULT_THRESHOLDS, dead_min_samples=6)
    assert dead_unit_findings([layer], t)[0].evidence["since_init"] == 1.0


# ------------------------------------------------------------------------------------------------ NaN / Inf


def test_nan_first_in_the_logits_mid_run_is_still_named_at_the_end() -> None:
    """The temperature is set to zero at step 6: the last module's output is the first non-finite one (plain hook),
    and NaN then reaches every weight; the finding still names the temperature at step 6, forward."""
    model = nn.Sequential(*mlp(), Temperature())

    def anneal(s: int) -> None:
        if s == 6:
            model[5].t.zero_()

    monitor, probe = train(model, 12, before=anneal)
    assert probe.first_bad_step() == 6
    assert probe.fwd_bad[6][0] == "5"
    assert probe.fwd_bad[11][0] == "0"  # by the end NaN is everywhere, from the first layer on
    f = only(monitor, "nonfinite")
    assert f.layer == "5"
    assert (f.evidence["pass"], f.evidence["first_step"]) == ("forward", 6.0)
    assert fix_codes(f) == ["check_inputs"]
    assert monitor.latest is not None and monitor.latest.step == 11


def test_nan_in_the_inputs_names_the_inputs() -> None:
    def poison(s: int, x: torch.Tensor) -> torch.Tensor:
        if s < 5:
            return x
        x = x.clone()
        x[3, 2] = float("nan")
        return x

    monitor, probe = train(mlp(), 8, x_of=poison)
    assert probe.first_bad_step() == 5 and probe.fwd_bad[5][0] == "0"
    f = only(monitor, "nonfinite")
    assert (f.layer, f.evidence["pass"], f.evidence["first_step"]) == ("0", "forward", 5.0)
    assert f.evidence["cause_inputs"] == 1.0
    assert fix_codes(f) == ["check_inputs"]


def _fragile_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), FragileBackward(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def _break_at(model: nn.Sequential, step: int) -> Callable[[int], None]:
    def before(s: int) -> None:
        model[2].broken = s == step

    return before


def test_nan_made_in_a_backward_pass_names_the_module_whose_backward_made_it() -> None:
    """Forward finite at step 4, the backward of module 2 turns its finite output gradient into NaN (plain tensor
    hooks: output gradient finite, input gradient not); the layer before it must not be blamed."""
    model = _fragile_model()
    monitor, probe = train(model, 9, before=_break_at(model, 4))
    assert probe.first_bad_step() == 4 and 4 not in probe.fwd_bad
    culprits = [n for n in probe.in_grad_bad[4] if n not in probe.out_grad_bad[4]]
    assert culprits == ["2"]
    f = only(monitor, "nonfinite")
    assert f.layer == "2"
    assert (f.evidence["pass"], f.evidence["first_step"]) == ("backward", 4.0)
    assert fix_codes(f) == ["check_inputs"]


def test_nan_at_an_unrecorded_step_is_seen_at_the_next_recorded_one() -> None:
    model = _fragile_model()
    monitor, probe = train(model, 9, every=3, before=_break_at(model, 4))
    assert probe.first_bad_step() == 4
    f = only(monitor, "nonfinite")
    # Step 4 is not recorded: at step 6 the update of step 4 has put NaN in the first layer's weights.
    assert (f.layer, f.evidence["pass"], f.evidence["first_step"]) == ("0", "forward", 6.0)
    assert f.evidence["previous_recorded_step"] == 3.0
    assert "unrecorded step after recorded step 3" in f.message
    # A NaN gradient or a blow-up, unseen: anomaly detection finds the op, clipping and a lower rate the blow-up.
    assert f.evidence["cause_unseen_update"] == 1.0
    assert fix_codes(f) == ["check_inputs", "gradient_clipping", "lower_learning_rate"]


def test_nan_after_blown_up_updates_advises_clipping_and_a_lower_rate() -> None:
    """Learning rate 3 on targets of scale 100: the update ratio of the step before explodes, then NaN/Inf."""
    model = mlp()
    ratios: list[float] = []
    before_w: list[torch.Tensor] = []

    def watch_updates(s: int) -> None:
        w = model[2].weight.detach()
        if before_w:
            ratios.append(float((w - before_w[-1]).norm() / before_w[-1].norm()))
        before_w.append(w.clone())

    monitor, probe = train(model, 10, lr=lambda s: 3.0, target_scale=100.0, before=watch_updates)
    first = probe.first_bad_step()
    assert ratios[first - 2] > 1.0  # the update just before the first NaN/Inf rewrote the weights
    f = only(monitor, "nonfinite")
    assert f.evidence["first_step"] == first
    if first in probe.fwd_bad:
        assert (f.evidence["pass"], f.layer) == ("forward", probe.fwd_bad[first][0])
    else:
        assert f.evidence["pass"] == "backward"
    assert f.evidence["update_ratio_before"] > DEFAULT_THRESHOLDS.update_ratio_above
    assert fix_codes(f) == ["gradient_clipping", "lower_learning_rate"]


def test_healthy_run_has_no_nonfinite_finding() -> None:
    model = _fragile_model()
    monitor, probe = train(model, 8)
    assert not probe.fwd_bad and not probe.out_grad_bad and not probe.in_grad_bad
    assert all(f.code != "nonfinite" for f in monitor.findings)


def _stats(bad: int) -> TensorStats:
    x = torch.ones(8)
    x[:bad] = float("nan")
    vec, meta = tensor_stats(x)
    return decode_tensor_stats(vec.numpy(), meta)


def test_a_run_that_recovers_drops_its_nan() -> None:
    """A loss scaler skips an overflowing step and the run goes on finite: the latest step has no NaN, so the
    kept first occurrence is not reported."""
    bad = StepRecord(step=2, layers=(LayerStats(name="a", type="Linear", step=2, activation=_stats(3)),))
    good = StepRecord(step=3, layers=(LayerStats(name="a", type="Linear", step=3, activation=_stats(0)),))
    kept = nonfinite_event(bad, None, DEFAULT_THRESHOLDS)
    assert kept is not None and kept.evidence["first_step"] == 2.0
    assert nonfinite_event(good, bad, DEFAULT_THRESHOLDS) is None
    assert [f.code for f in diagnose(good.layers, first_nonfinite=kept)] == []
    assert [f.layer for f in diagnose(bad.layers, first_nonfinite=kept)] == ["a"]


class Gain(nn.Module):
    """Multiplies by a gain the training loop raises; in float16, finite values times 1e5 overflow to Inf."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_float16_overflow_of_finite_values_advises_bf16_and_loss_scaling() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Gain(), nn.Linear(16, 1)).half()
    x = torch.randn(32, 8).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    first_inf: list[int] = []
    model[2].register_forward_hook(lambda m, i, o: None if torch.isfinite(o).all() else first_inf.append(step))
    with actdiag.watch(model, every=1, strict=True) as monitor:
        for step in range(6):
            if step == 3:
                model[2].gain.fill_(1e5)
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    assert first_inf[0] == 3
    f = only(monitor, "nonfinite")
    assert (f.layer, f.evidence["pass"], f.evidence["first_step"]) == ("2", "forward", 3.0)
    assert fix_codes(f) == ["bf16_autocast", "loss_scaling"]
