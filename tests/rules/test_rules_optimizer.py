"""Update rules that read the optimizer: the learning rate in force, near-zero parameters, AdaGrad's own decay.

Every label is measured in the test with plain torch (weights copied around `optimizer.step()`), not by actdiag.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import actdiag
from actdiag.monitor import Monitor


class Plain:
    """Update ratios ||W_after - W_before|| / ||W_before|| of one parameter, measured around each optimizer step."""

    def __init__(self, p: torch.Tensor) -> None:
        self.p = p
        self.ratios: list[float] = []
        self.steps: list[float] = []  # ||dW|| / ||grad W||
        self._before: torch.Tensor | None = None

    def before(self) -> None:
        self._before = self.p.detach().clone().double()
        self._grad = self.p.grad.detach().clone().double() if self.p.grad is not None else None

    def after(self) -> None:
        assert self._before is not None
        d = (self.p.detach().double() - self._before).norm().item()
        n = self._before.norm().item()
        self.ratios.append(d / n if n > 0 else math.inf)
        g = self._grad.norm().item() if self._grad is not None else 0.0
        self.steps.append(d / g if g > 0 else math.nan)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    every: int,
    watched: torch.Tensor,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    **kw: object,
) -> tuple[Monitor, Plain, list[float]]:
    plain = Plain(watched)
    lrs: list[float] = []
    with actdiag.watch(model, every=every, **kw) as monitor:  # type: ignore[arg-type]
        for i in range(steps):
            x, y = batch(i)
            nn.functional.mse_loss(model(x), y).backward()
            plain.before()
            opt.step()
            plain.after()
            lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            if sched is not None:
                sched.step()
            monitor.step()
    return monitor, plain, lrs


def regression(i: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear target with unit label noise: the gradient never dies out."""
    g = torch.Generator().manual_seed(i)
    w = torch.linspace(-1, 1, dim).unsqueeze(1)
    x = torch.randn(16, dim, generator=g)
    return x, x @ w + torch.randn(16, 1, generator=g)


def codes_by_layer(monitor: Monitor) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in monitor.findings:
        for name in (f.layer, *f.related):
            if name is not None:
                out.setdefault(name, set()).add(f.code)
    return out


def test_learning_rate_read_at_each_recorded_step_through_a_schedule() -> None:
    """The lr the optimizer used at a recorded step (before scheduler.step() changes it) is kept per parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / 10)
    monitor, _, lrs = train(model, opt, regression, 10, 3, model[0].weight, sched)
    assert monitor.history.steps == (0, 3, 6, 9)
    assert monitor.history.params["0.weight"]["lr"] == pytest.approx([lrs[0], lrs[3], lrs[6], lrs[9]])
    p = {q.name: q for q in monitor.report().params}["2.bias"]
    assert (p.lr, p.optimizer) == (pytest.approx(lrs[9]), "SGD")


def test_watch_reads_only_the_optimizer_it_is_given() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.Adam(model.parameters(), lr=0.5)
    with actdiag.watch(model, every=1, optimizer=opt) as monitor:
        x, y = regression(0)
        nn.functional.mse_loss(model(x), y).backward()
        other.step()
        opt.step()
        monitor.step()
    assert {(p.lr, p.optimizer) for p in monitor.report().params} == {(0.1, "SGD")}
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        actdiag.watch(model, optimizer="adam")


def test_linear_decay_to_zero_is_not_a_stall() -> None:
    """AdamW with the lr decayed linearly to zero (the Hugging Face default schedule): by the end each step moves
    the weights far less than at the start, because the schedule says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1.0 - k / 40))
    monitor, plain, lrs = train(model, opt, regression, 40, 4, model[0].weight, sched)
    assert lrs[-1] < lrs[0] / 30
    assert plain.ratios[36] < plain.ratios[0] / 10  # the step has fallen tenfold: what a stall would look like
    assert [f.code for f in monitor.findings] == []


def test_adagrad_stall_found_within_200_steps() -> None:
    """AdaGrad divides its step by the root of the running sum of squared gradients: with steady gradients its
    effective step falls like 1/sqrt(steps), about tenfold by step 150, and keeps falling."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.003)
    monitor, plain, _ = train(model, opt, regression, 200, 40, model[0].weight)
    assert plain.steps[120] / plain.steps[0] < 0.2 and plain.steps[160] / plain.steps[0] < 0.2
    assert plain.ratios[160] < plain.ratios[0] / 5
    (f,) = [f for f in monitor.findings if f.code == "stalled_updates"]
    assert f.layer == "0"
    assert f.evidence["effective_step_decay"] == pytest.approx(plain.steps[120] / plain.steps[0], rel=0.2)
    assert [x.code for x in f.fixes] == ["switch_optimizer", "raise_learning_rate"]
    assert "Adagrad" in f.message


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.RMSprop(p, lr=3e-4),
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    ],
    ids=["rmsprop", "adam", "momentum"],
)
def test_moving_averages_and_sgd_do_not_stall(make: Callable[..., torch.optim.Optimizer]) -> None:
    """Same task, same length: RMSProp's first step is ~10x its later ones (its average starts cold), yet no
    optimizer here shrinks its own step by construction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1))
    monitor, plain, _ = train(model, make(model.parameters()), regression, 200, 50, model[0].weight)
    assert min(plain.ratios) > 1e-4  # every step still moves the weights
    assert "stalled_updates" not in [f.code for f in monitor.findings]


def test_adam_with_a_learning_rate_far_too_small_is_told_to_raise_it() -> None:
    """lr 1e-10: each step moves the weights ~1e-9 of their norm. The advice fits Adam: raise the learning rate,
    not "switch to Adam"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-10)
    monitor, plain, _ = train(model, opt, regression, 5, 1, model[0].weight)
    assert max(plain.ratios) < 1e-6
    (f,) = [f for f in monitor.findings if f.code == "stalled_updates"]
    assert [x.code for x in f.fixes] == ["raise_learning_rate"]


class ZeroGainBlock(nn.Module):
    """A residual block whose last BatchNorm starts at gamma = 0 (Goyal et al. 2017) and a layer scale of 1e-6
    (ConvNeXt): the block starts as the identity. A stem before it and a head after it, as in those networks."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, width)
        self.bn1 = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width)
        self.bn2 = nn.BatchNorm1d(width)
        self.scale = nn.Parameter(torch.full((width,), 1e-6))
        self.head = nn.Linear(width, 1)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = x + self.scale * self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))
        return self.head(h)


def test_near_zero_parameters_are_judged_by_absolute_step() -> None:
    """With Adam at 1e-3 the zero-initialised gamma moves ~1e-3 per element per step: its update ratio is ~1/k
    after k steps (far above 0.1), yet its steps are small."""
    torch.manual_seed(0)
    model = ZeroGainBlock()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(32, 32, generator=g), torch.randn(32, 1, generator=g)

    monitor, plain, _ = train(model, opt, batch, 6, 1, model.bn2.weight)
    assert plain.ratios[0] == math.inf and plain.ratios[5] > 0.1
    step = (model.bn2.weight.detach().norm() / math.sqrt(32) / 6).item()
    assert step < 2e-3
    assert [f.code for f in monitor.findings] == []


def test_a_near_zero_parameter_with_steps_too_large() -> None:
    """The same block under SGD at lr 30: the zero-initialised gamma jumps by far more than 0.1 a step."""
    torch.manual_seed(0)
    model = ZeroGainBlock()
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    monitor, plain, _ = train(model, opt, lambda i: (x, y), 3, 1, model.bn2.weight)
    by_layer = codes_by_layer(monitor)
    assert "large_updates" in by_layer.get("bn2", set())


@pytest.mark.parametrize("lr", [1e-10, 3.0])
def test_large_and_stalled_never_on_one_layer(lr: float) -> None:
    torch.manual_seed(0)
    model = ZeroGainBlock()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(32, 32), torch.randn(32, 1)
    monitor, _, _ = train(model, opt, lambda i: (x, y), 6, 1, model.bn2.weight)
    for name, found in codes_by_layer(monitor).items():
        assert not {"large_updates", "stalled_updates"} <= found, name


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))


def test_each_optimizer_is_judged_with_the_gradient_it_stepped_with() -> None:
    """A GAN step: the discriminator steps on its own loss, then the generator's loss backpropagates through the
    discriminator too (accumulating into its .grad, which nobody zeroes until the next step). The discriminator's
    recorded gradient is the one its optimizer used, measured here by copying .grad just before each step."""
    torch.manual_seed(0)
    gan = GAN()
    opt_d = torch.optim.Adam(gan.D.parameters(), lr=1e-3)
    opt_g = torch.optim.Adam(gan.G.parameters(), lr=1e-3)
    bce = nn.functional.binary_cross_entropy_with_logits
    used: dict[str, float] = {}
    with actdiag.watch(gan, every=1) as monitor:
        z, real = torch.randn(32, 4), torch.randn(32, 8)
        opt_d.zero_grad()
        fake = gan.G(z)
        d_loss = bce(gan.D(real), torch.ones(32, 1)) + bce(gan.D(fake.detach()), torch.zeros(32, 1))
        d_loss.backward()
        used["D.0.weight"] = gan.D[0].weight.grad.double().norm().item()
        opt_d.step()
        opt_g.zero_grad()
        bce(gan.D(fake), torch.ones(32, 1)).backward()
        used["G.0.weight"] = gan.G[0].weight.grad.double().norm().item()
        after_g = gan.D[0].weight.grad.double().norm().item()
        opt_g.step()
        monitor.step()
    assert abs(after_g - used["D.0.weight"]) > 0.01 * used["D.0.weight"]  # the generator's pass changed D's .grad
    recorded = {p.name: p for p in monitor.report().params}
    for name, norm in used.items():
        grad = recorded[name].grad
        assert grad is not None
        assert grad.norm == pytest.approx(norm, rel=1e-4), name
    assert (recorded["D.0.weight"].optimizer, recorded["G.0.weight"].optimizer) == ("Adam", "Adam")
