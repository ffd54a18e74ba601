"""What low precision rounds away: updates of bfloat16/float16 weights below half an ulp (lost_updates), and float16
gradients flushed entirely to zero (fp16_underflow). Each label is proven in the test by plain torch: the weights
compared before and after the optimizer step, the float32 twin's gradients and loss."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

import actdiag
from actdiag.fixes import attach_fixes
from actdiag.records import LayerStats, LostUpdates, ParamStats
from actdiag.rules import diagnose
from actdiag.rules.rounding import FP16_NORMAL_MIN
from actdiag.rules.thresholds import DEFAULT_THRESHOLDS, Thresholds
from tests.rules.factory import linear, ts
from tests.zoo import ZeroInitHeadNet

Counts = dict[str, tuple[int, int]]  # parameter -> (unchanged with a non-zero gradient, non-zero gradient)


# --------------------------------------------------------------------------------------------- bfloat16 weights
def _mlp(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    # learnable labels: a fixed random linear map of the inputs
    y = (x @ torch.randn(32, 10, generator=g)).argmax(1)
    return x, y


def _measured_step(model: nn.Module, opt: torch.optim.Optimizer) -> Counts:
    """optimizer.step() with the weights compared before and after it, in plain torch: the independent count."""
    before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in model.named_parameters()}
    opt.step()
    out: Counts = {}
    for n, p in model.named_parameters():
        w0, g = before[n]
        moving = g != 0
        out[n] = (int(((p.detach() == w0) & moving).sum()), int(moving.sum()))
    return out


def train(
    model: nn.Module, lr: float, steps: int = 40, every: int = 10, **watch: Any
) -> tuple[actdiag.Monitor, Counts, float]:
    """Adam on a fixed small classification problem under `actdiag.watch`; the independent counts of the last
    recorded step, and the mean loss over the last ten steps."""
    x_all, y_all = _data()
    dtype = next(model.parameters()).dtype
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    counts: Counts = {}
    losses = []
    with actdiag.watch(model, every=every, **watch) as mon:
        for step in range(steps):
            i = (step * 32) % 256
            loss = nn.functional.cross_entropy(model(x_all[i : i + 32].to(dtype)).float(), y_all[i : i + 32])
            loss.backward()
            if step % every == 0:
                counts = _measured_step(model, opt)
            else:
                opt.step()
            opt.zero_grad()
            mon.step()
            losses.append(float(loss.detach()))
    return mon, counts, sum(losses[-10:]) / 10


def only(mon: actdiag.Monitor, code: str) -> Any:
    found = [f for f in mon.findings if f.code == code]
    assert len(found) == 1, [f.code for f in mon.findings]
    return found[0]


def test_bfloat16_weights_under_adam_at_1e_4_lose_their_updates() -> None:
    mon, counts, _ = train(_mlp(torch.bfloat16), lr=1e-4)
    # The recorder's counts are exactly the ones measured by comparing the weights in plain torch.
    assert mon.latest is not None
    got = {p.name: p.lost_updates for p in mon.latest.params}
    for name, (unchanged, nonzero) in counts.items():
        lost = got[name]
        assert lost is not None
        assert (lost.unchanged, lost.nonzero, lost.dtype, lost.estimated) == (unchanged, nonzero, "bfloat16", False)
    # The label, measured: most elements with a gradient did not move.
    shares = {n: u / z for n, (u, z) in counts.items() if z >= DEFAULT_THRESHOLDS.lost_updates_min_elements}
    assert min(shares.values()) > DEFAULT_THRESHOLDS.lost_updates_fraction_above
    f = only(mon, "lost_updates")
    assert f.severity == "warning"
    worst = max(shares, key=lambda n: shares[n])
    assert f.layer == worst.rsplit(".", 1)[0]
    assert f.evidence["fraction"] == pytest.approx(shares[worst])
    assert f.evidence["parameters"] == len(shares)
    assert f.evidence["bfloat16"] == 1.0
    assert "bfloat16" in f.message and f.message.endswith(".")
    assert [x.code for x in f.fixes] == ["fp32_master_weights"]
    assert "device_type=x.device.type, dtype=torch.bfloat16" in f.fixes[0].snippet


def test_the_float32_twin_learns_and_gets_no_finding() -> None:
    _, _, bf16_loss = train(_mlp(torch.bfloat16), lr=1e-4, steps=200, every=50)
    mon, counts, fp32_loss = train(_mlp(torch.float32), lr=1e-4, steps=200, every=50)
    assert fp32_loss < bf16_loss - 0.05  # what the lost updates cost, measured
    assert all(u == 0 for u, _ in counts.values())  # every element with a gradient moved
    assert mon.latest is not None and all(p.lost_updates is None for p in mon.latest.params)
    assert "lost_updates" not in [f.code for f in mon.findings]


def test_bfloat16_at_a_learning_rate_whose_updates_land_stays_quiet() -> None:
    mon, counts, _ = train(_mlp(torch.bfloat16), lr=3e-3)
    shares = [u / z for u, z in counts.values() if z >= DEFAULT_THRESHOLDS.lost_updates_min_elements]
    assert max(shares) <= DEFAULT_THRESHOLDS.lost_updates_fraction_above
    assert "lost_updates" not in [f.code for f in mon.findings]


def test_the_fp32_master_weights_snippet_cures_it() -> None:
    model = _mlp(torch.bfloat16)
    mon, _, _ = train(copy.deepcopy(model), lr=1e-4)
    fix = only(mon, "lost_updates").fixes[0]
    x_all, y_all = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scope: dict[str, Any] = {"model": model, "torch": torch, "nn": nn, "optimizer": opt}
    scope |= {"criterion": nn.functional.cross_entropy, "x": x_all[:32], "y": y_all[:32]}
    exec(fix.snippet, scope)  # noqa: S102 - as pasted: one step of the new loop
    model, opt = scope["model"], scope["optimizer"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    counts: Counts = {}
    with actdiag.watch(model, every=10) as mon2:
        for step in range(40):
            i = (step * 32) % 256
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x_all[i : i + 32]).float(), y_all[i : i + 32])
            loss.backward()
            counts = _measured_step(model, opt) if step % 10 == 0 else (opt.step() or counts)
            opt.zero_grad()
            mon2.step()
    assert sum(u for u, _ in counts.values()) == 0
    assert "lost_updates" not in [f.code for f in mon2.findings]


def test_a_recorded_step_without_an_optimizer_step_says_nothing() -> None:
    """Gradient accumulation: a recorded micro-batch whose optimizer step comes later leaves every weight as it was;
    that is no precision problem."""
    model = _mlp(torch.bfloat16)
    x_all, y_all = _data()
    with actdiag.watch(model, every=1) as mon:
        loss = nn.functional.cross_entropy(model(x_all[:32].bfloat16()).float(), y_all[:32])
        loss.backward()
        mon.step()
    assert mon.latest is not None
    lost = [p.lost_updates for p in mon.latest.params]
    assert all(x is not None and x.unchanged == x.nonzero > 0 for x in lost)
    assert "lost_updates" not in [f.code for f in mon.findings]


def test_recording_often_counts_over_the_fixed_sample() -> None:
    mon, counts, _ = train(_mlp(torch.bfloat16), lr=1e-4, steps=3, every=1, sample_cap=512)
    assert mon.latest is not None
    by_name = {p.name: p.lost_updates for p in mon.latest.params}
    big = by_name["2.weight"]  # 4096 elements: sampled
    assert big is not None and big.estimated and big.nonzero <= 512
    u, z = counts["2.weight"]
    assert big.fraction == pytest.approx(u / z, abs=0.06)  # a 512-element sample of a share
    small = by_name["0.bias"]
    assert small is not None and not small.estimated and (small.unchanged, small.nonzero) == counts["0.bias"]


def test_gradient_accumulation_counts_against_the_accumulated_gradient() -> None:
    """Elements whose gradient is zero on the first micro-batch but not on the second count: the copy is taken
    again when the gradient accumulates (the weight has not moved yet)."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16).to(torch.bfloat16)
    opt = torch.optim.SGD(emb.parameters(), lr=1e-5)
    with actdiag.watch(emb, every=1) as mon:
        emb(torch.arange(0, 10)).float().sum().backward()
        emb(torch.arange(10, 30)).float().sum().backward()
        counts = _measured_step(emb, opt)
        mon.step()
    assert mon.latest is not None
    (p,) = mon.latest.params
    assert p.lost_updates is not None
    assert (p.lost_updates.unchanged, p.lost_updates.nonzero) == counts["weight"]
    assert p.lost_updates.nonzero == 30 * 16  # not the first micro-batch's 10 rows


def test_lost_updates_is_saved_in_the_json_report(tmp_path: Any) -> None:
    from actdiag.reports.json import load_json

    mon, _, _ = train(_mlp(torch.bfloat16), lr=1e-4, steps=11)
    path = mon.save_json(tmp_path / "run.json")
    report = load_json(path)
    assert mon.latest is not None
    assert [p.lost_updates for p in report.params] == [p.lost_updates for p in mon.latest.params]


# ------------------------------------------------------------------------------------- thresholds, by hand
def _param(name: str, unchanged: int, nonzero: int, dtype: str = "bfloat16", ratio: float = 1e-4) -> ParamStats:
    lost = LostUpdates(unchanged, nonzero, dtype)
    return ParamStats(name, (nonzero,), True, ts(0.1, count=nonzero), update_ratio=ratio, lost_updates=lost)


@pytest.mark.parametrize(
    ("share", "fires"), [(0.74, False), (0.75, False), (0.76, True), (1.0, True)]
)  # `*_above`: strictly above
def test_lost_updates_fraction_threshold(share: float, fires: bool) -> None:
    p = _param("fc.weight", round(share * 1000), 1000)
    found = [f for f in diagnose([linear("fc", 1.0, 1.0)], [p]) if f.code == "lost_updates"]
    assert bool(found) is fires
    if fires:
        assert found[0].layer == "fc"


@pytest.mark.parametrize(("nonzero", "fires"), [(99, False), (100, True)])
def test_lost_updates_needs_enough_elements(nonzero: int, fires: bool) -> None:
    p = _param("fc.bias", nonzero, nonzero)
    assert ("lost_updates" in [f.code for f in diagnose([linear("fc", 1.0, 1.0)], [p])]) is fires


def test_lost_updates_thresholds_are_settable() -> None:
    p = _param("fc.weight", 600, 1000)
    layers = [linear("fc", 1.0, 1.0)]
    assert "lost_updates" not in [f.code for f in diagnose(layers, [p])]
    t = Thresholds(lost_updates_fraction_above=0.5)
    assert "lost_updates" in [f.code for f in diagnose(layers, [p], thresholds=t)]


def test_lost_updates_folds_every_parameter_into_one_finding_at_the_worst() -> None:
    params = [_param("a.weight", 800, 1000), _param("b.weight", 990, 1000), _param("c.weight", 100, 1000)]
    layers = [linear(n, 1.0, 1.0) for n in "abc"]
    (f,) = [f for f in diagnose(layers, params) if f.code == "lost_updates"]
    assert (f.layer, f.related) == ("b", ("a",))
    assert f.evidence["fraction"] == pytest.approx(0.99)
    assert f.evidence["fraction_all"] == pytest.approx(1790 / 2000)


def test_float16_lost_updates_suggest_loss_scaling_with_the_float32_weights() -> None:
    layers = [linear("fc", 1.0, 1.0)]
    (f,) = [f for f in diagnose(layers, [_param("fc.weight", 900, 1000, "float16")]) if f.code == "lost_updates"]
    assert "float16 keeps 11 significant bits" in f.message
    (got,) = attach_fixes([f], layers, model=nn.Linear(4, 4).half())
    snippet = got.fixes[0].snippet
    assert "model.float()" in snippet and "GradScaler(x.device.type)" in snippet and "dtype=torch.float16" in snippet


# ----------------------------------------------------------------------------------- float16 flushed to zero
def _tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _grads(model: nn.Module, x: torch.Tensor, scale: float, autocast: bool) -> list[torch.Tensor]:
    """The gradient at every module's output, by plain tensor hooks (the independent measurement)."""
    grads: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in model]
    try:
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            out = model(x)
        (out.float().pow(2).mean() * scale).backward()
    finally:
        for h in handles:
            h.remove()
    return grads


def test_float16_gradients_flushed_entirely_to_zero_are_a_warning_with_loss_scaling() -> None:
    model, x = _tanh_mlp(), torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    half = _grads(copy.deepcopy(model), x, 1e-9, autocast=True)
    full = _grads(copy.deepcopy(model), x, 1e-9, autocast=False)
    assert all(g.dtype == torch.float16 and not g.any() for g in half)  # every float16 gradient is zero ...
    assert all(g.abs().max() > 0 for g in full)  # ... where float32 keeps them

    def loss_fn(out: torch.Tensor, inputs: object) -> torch.Tensor:
        return out.float().pow(2).mean() * 1e-9

    with torch.autocast("cpu", dtype=torch.float16):
        report = actdiag.inspect(model, x, loss_fn=loss_fn)
    (f,) = [f for f in report.findings if f.code == "fp16_underflow"]
    assert (f.severity, f.layer) == ("warning", "4")  # the last layer: the loss's own gradient flushed
    assert set(f.related) == {"0", "1", "2", "3"}
    assert f.evidence["flushed"] == 1.0 and f.evidence["next_abs_max"] == 0.0
    assert [x.code for x in f.fixes] == ["loss_scaling", "bf16_autocast"]
    assert "GradScaler(x.device.type)" in f.fixes[0].snippet


def test_a_gradient_flushed_on_its_way_back_is_named_where_it_vanished() -> None:
    """Layer 2 shrinks the gradient 1000x: the gradient after layer 1 is already subnormal in float16 and becomes
    zero there. The vanishing gradient that follows is its consequence, not a finding with architecture fixes."""
    model = _tanh_mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    half = _grads(copy.deepcopy(model).half(), x.half(), 1e-4, autocast=False)
    full = _grads(copy.deepcopy(model), x, 1e-4, autocast=False)
    # hooks fire in backward order: half[0] is the last layer's gradient
    flushed = [4 - i for i, g in enumerate(half) if not g.any()]
    assert flushed == [1, 0]
    assert 0 < float(half[2].abs().max()) < FP16_NORMAL_MIN  # layer 2's gradient: subnormal
    assert all(g.abs().max() > 0 for g in full)

    def loss_fn(out: torch.Tensor, inputs: object) -> torch.Tensor:
        return out.float().pow(2).mean() * 1e-4

    report = actdiag.inspect(model.half(), x.half(), loss_fn=loss_fn)
    codes = [f.code for f in report.findings]
    assert "vanishing_gradient" not in codes
    (f,) = [f for f in report.findings if f.code == "fp16_underflow"]
    assert (f.severity, f.layer) == ("warning", "1")
    assert f.evidence["next_abs_max"] == pytest.approx(float(half[2].abs().max()))
    assert "vanishing_gradient" in f.related and "0" in f.related


def _fp16(layer: LayerStats, grad_abs_max: float) -> LayerStats:
    """`layer` in float16 with an all-zero gradient (0) or one whose largest value is `grad_abs_max`."""
    g = ts(0.0, count=1000, zero_count=1000) if grad_abs_max == 0 else ts(grad_abs_max / 2, count=1000)
    if grad_abs_max:
        g = dataclasses.replace(g, min=-grad_abs_max, max=grad_abs_max)
    return dataclasses.replace(layer, dtype="float16", gradient=g)


@pytest.mark.parametrize(
    ("after", "fires"),
    [
        (FP16_NORMAL_MIN / 2, True),  # the gradient after it was subnormal: flushed on its way back
        (FP16_NORMAL_MIN * 2, False),  # a gradient of ordinary size turned exactly zero: structural, not rounding
        (0.0, True),  # nothing after it has a gradient either: the loss's gradient flushed
    ],
)
def test_flush_rule_by_the_gradient_after_the_zero(after: float, fires: bool) -> None:
    layers = [_fp16(linear("a", 1.0, 1.0), 0.0), _fp16(linear("b", 1.0, 1.0), after)]
    found = [f for f in diagnose(layers) if f.code == "fp16_underflow" and f.evidence.get("flushed")]
    assert bool(found) is fires


def test_a_float32_all_zero_gradient_is_no_float16_finding() -> None:
    zero = dataclasses.replace(linear("a", 1.0, 1.0), gradient=ts(0.0, count=1000, zero_count=1000))
    assert not [f for f in diagnose([zero, linear("b", 1.0, 1e-9)]) if f.evidence.get("flushed")]


def test_a_zero_initialised_head_in_float16_is_no_flush() -> None:
    """ZeroInitHeadNet's body gets exactly zero gradient by design (the head's weights are zero), behind a head
    whose own gradient is of ordinary size."""
    model = ZeroInitHeadNet().half()
    x = ZeroInitHeadNet.example_input().half()
    report = actdiag.inspect(model, x)
    assert not [f for f in report.findings if f.code == "fp16_underflow" and f.evidence.get("flushed")]
    body = [lay for lay in report.layers if lay.name.startswith("body")]
    assert body and all(lay.gradient is not None and lay.gradient.abs_max == 0 for lay in body)


# ------------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
def test_lost_updates_on_cuda_match_the_plain_torch_count() -> None:
    """The device path: counted with device ops, read back with the step's other vectors."""
    model = _mlp(torch.bfloat16).cuda()
    x_all, y_all = (t.cuda() for t in _data())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    with actdiag.watch(model, every=1) as mon:
        loss = nn.functional.cross_entropy(model(x_all[:32].bfloat16()).float(), y_all[:32])
        loss.backward()
        counts = _measured_step(model, opt)
        opt.zero_grad()
        mon.step()
    assert mon.latest is not None
    for p in mon.latest.params:
        assert p.lost_updates is not None
        assert (p.lost_updates.unchanged, p.lost_updates.nonzero) == counts[p.name]
    assert "lost_updates" in [f.code for f in mon.findings]
