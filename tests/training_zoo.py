"""Training runs with one planted problem each (or none), for the rules that judge a model while it trains.

Each `Case` gives a seeded, deterministic run (`make()` -> `Run`: model, data, optimizer and schedule, `train()`),
its `Label` (what actdiag should report: code, layer, acceptable fixes, and for events in training the step they
happen at), and `measure()`: an INDEPENDENT measurement of that run with plain torch hooks (this module never
imports actdiag) from which `tests/test_training_zoo_labels.py` proves the label. `tests/test_training_zoo_actdiag.py`
then checks what actdiag says against the labels, and `bench/zoo_report.py` prints the table.

A run calls `monitor_step()` once per training step after the optimizer (and scheduler) stepped, exactly where a
user calls `monitor.step()` inside `actdiag.watch(model)`. Steps are counted from 0, so with `watch(every=1)` the
recorded step k is the k-th forward/backward pass, and `Label.step` is in those units.

The sizes are small so that a run takes well under a second on one thread; runs are meant to be made with
`torch.set_num_threads(1)` (the test suite's conftest does that), which keeps float sums in one order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.utils import parametrizations

MonitorStep = Callable[[], None] | None


# ------------------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class Label:
    """What actdiag should say about a run.

    `code` None marks a healthy control: no finding of severity warning or error may appear, nor any code in
    `absent`. Otherwise a finding with `code` must name one of `layers` (None in `layers` accepts a model-wide
    finding; an empty `layers` accepts any), carry at least one of `fixes` (empty: fixes are not judged) and none of
    `forbidden_fixes`. For events in training, `step` is the (0-based) step at which the problem first shows, and the
    finding's `evidence["first_step"]` must lie in [step, step + step_slack]; `pass_` is the nonfinite finding's
    `evidence["pass"]`.
    """

    item: int  # the Deliver item of issue 19 that this case checks (0: its Checks, healthy models stay quiet)
    code: str | None
    layers: tuple[str | None, ...] = ()
    fixes: tuple[str, ...] = ()
    forbidden_fixes: tuple[str, ...] = ()
    step: int | None = None
    step_slack: int = 0
    pass_: str | None = None
    absent: tuple[str, ...] = ()
    note: str = ""

    @property
    def healthy(self) -> bool:
        return self.code is None


# ---------------------------------------------------------------------------------------------------------- runs
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Run:
    """One training run: `model`, its `optimizers` (and `schedulers`), `steps`, and `train()`.

    Subclasses set the attributes in `__init__` and define `loss(i)`; a run with its own loop (the GAN) overrides
    `train`. Everything is built from fixed seeds, so two instances train identically.
    """

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]
    steps: int

    def loss(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def train(self, monitor_step: MonitorStep = None) -> list[float]:
        """Train `steps` steps; the loss of each step (NaN when it is not finite)."""
        self.model.train()
        losses = []
        for i in range(self.steps):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            loss = self.loss(i)
            loss.backward()
            for opt in self.optimizers:
                opt.step()
            for sched in self.schedulers:
                sched.step()
            losses.append(float(loss.detach().float()))
            if monitor_step is not None:
                monitor_step()
        return losses


def _regression_batches(
    n: int, batch: int, dim: int, out: int, seed: int, offset: float = 0.0, noise: float = 0.0, scale: float = 1.0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed linear teacher plus `offset` and label noise: the data of most runs."""
    g = _gen(seed)
    teacher = torch.randn(dim, out, generator=g) * scale
    data = []
    for _ in range(n):
        x = torch.randn(batch, dim, generator=g)
        y = x @ teacher + offset + noise * torch.randn(batch, out, generator=g)
        data.append((x, y))
    return data


def _classification_batches(n: int, x_shape: Sequence[int], classes: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Inputs whose class shifts their mean, so the task is learnable within a few dozen steps."""
    g = _gen(seed)
    centres = torch.randn(classes, *x_shape[1:], generator=g)
    data = []
    for _ in range(n):
        y = torch.randint(0, classes, (x_shape[0],), generator=g)
        x = centres[y] + torch.randn(*x_shape, generator=g)
        data.append((x, y))
    return data


# -------------------------------------------------------------------------------------- 1. units that die mid-run
class DeadMidRunNet(nn.Module):
    """Two Linear+ReLU layers and a head whose weights are all positive. The targets lie below what the net outputs,
    so the gradient of every alive `act2` unit pushes its pre-activation down; at a normal learning rate that is
    harmless, but one step at 200x the rate drives `fc2`'s biases and weights far negative and ~90% of `act2`'s
    units never fire again (they receive no gradient to come back)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(64, 4)
        with torch.no_grad():
            self.head.weight.abs_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


class DiesMidRun(Run):
    SPIKE_STEP = 10  # the optimizer step taken at 200x the learning rate; units are dead from the next forward on

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = DeadMidRunNet()
        self.data = _regression_batches(40, 64, 16, 4, seed=0, offset=-5.0, scale=0.5)
        opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        spike = self.SPIKE_STEP
        self.optimizers = [opt]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 200.0 if i == spike else 1.0)]
        self.steps = 40

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return F.mse_loss(self.model(x), y)


# ------------------------------------------------------------------------------ 2./3. NaN mid-run, forward or backward
class SqrtRoot(nn.Module):
    """sqrt of its input. `masked=True` is the well-known `torch.where(z > 0, z.sqrt(), 0)`: the forward is finite
    for any z, but where z < 0 the discarded branch's derivative is NaN and 0 * NaN = NaN in the backward."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.masked = masked

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.masked:
            return torch.where(z > 0, z.sqrt(), torch.zeros_like(z))
        return z.sqrt()


class SqrtNet(nn.Module):
    """Linear -> sqrt -> a fixed head with positive weights and no bias. `fc1`'s bias starts at 1 so every
    pre-activation is positive; the head's output cannot go below 0 and the targets are negative, so training keeps
    pushing the pre-activations down, faster as they near 0 (the derivative of sqrt is 1 / (2 sqrt z)), until some
    cross 0 at a step fixed by the seed."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.root = SqrtRoot(masked)
        self.head = nn.Linear(16, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.mul_(0.3)
            self.fc1.bias.fill_(1.0)
            self.head.weight.abs_()
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.root(self.fc1(x)))


class NanMidRun(Run):
    """SGD on SqrtNet; the run goes on for a while after the first NaN, so that NaN has spread everywhere (weights,
    every layer's output) by the end."""

    def __init__(self, masked: bool) -> None:
        torch.manual_seed(0)
        self.model = SqrtNet(masked)
        self.data = _regression_batches(40, 32, 8, 1, seed=1, offset=-3.0, scale=0.2)
        self.optimizers = [torch.optim.SGD(self.model.parameters(), lr=0.02)]
        self.schedulers = []
        self.steps = 40

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return F.mse_loss(self.model(x), y)


# ------------------------------------------------------------------------------- 4. NaN from the optimizer's updates
class BlowUpRun(Run):
    """A tanh MLP whose learning rate doubles every step (a warm-up gone wrong): the updates grow until the weights
    overflow float32. The inputs stay finite throughout; the update ratio is huge the step before the first NaN."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Linear(32, 4)
        )
        self.data = _regression_batches(40, 32, 16, 4, seed=2)
        opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.optimizers = [opt]
        self.schedulers = [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=2.0)]
        self.steps = 40

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return F.mse_loss(self.model(x), y)


# --------------------------------------------------------------------------- 5./6. optimizer and schedule to zero
class MlpRun(Run):
    """A small tanh or ReLU MLP on a noisy regression (label noise keeps the gradient from dying out), with the
    optimizer and schedule of the case."""

    def __init__(
        self,
        make_opt: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        steps: int,
        lr_lambda: Callable[[int], float] | None = None,
        act: type[nn.Module] = nn.Tanh,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(16, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 4)).to(dtype)
        self.data = [
            (x.to(dtype), y.to(dtype)) for x, y in _regression_batches(steps, 32, 16, 4, seed=seed + 3, noise=0.5)
        ]
        opt = make_opt(list(self.model.parameters()))
        self.optimizers = [opt]
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)] if lr_lambda else []
        self.steps = steps

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return F.mse_loss(self.model(x).float(), y.float())


# ------------------------------------------------------------------------------------------ 7. zero-init branches
class ZeroGammaBlock(nn.Module):
    """A residual block whose last BatchNorm starts with gamma = 0 (Goyal et al. 2017): it starts as the identity."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class LayerScaleBlock(nn.Module):
    """ConvNeXt's layer scale: the branch is multiplied by a per-channel parameter that starts at 1e-6, owned by
    this module directly."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pwconv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.full((c,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma[:, None, None] * self.pwconv(F.gelu(self.dwconv(x)))


class ZeroInitNet(nn.Module):
    """Healthy: parameters that start at or near zero by design. A zero-gamma residual block, a layer scale of 1e-6,
    and a 1x1 conv under weight_norm whose only direct parameter is its zero bias (the weight lives in
    `parametrizations.weight.original0/1`). After k Adam steps such a parameter has moved by ~k * lr, so its update
    ratio ||dW|| / ||W|| is ~1/k whatever the learning rate: large, and normal."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = ZeroGammaBlock(8)
        self.scaled = LayerScaleBlock(8)
        self.proj = parametrizations.weight_norm(nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.scaled(self.block(F.relu(self.stem(x)))))
        return self.head(h.mean(dim=(2, 3)))


class ClassifierRun(Run):
    """Cross-entropy classification with AdamW for `steps` steps: the zero-init net and the healthy controls."""

    def __init__(self, model: Callable[[], nn.Module], x_shape: Sequence[int], steps: int = 40, lr: float = 1e-3):
        torch.manual_seed(0)
        self.model = model()
        self.data = _classification_batches(steps, x_shape, 4, seed=5)
        self.optimizers = [torch.optim.AdamW(self.model.parameters(), lr=lr)]
        self.schedulers = []
        self.steps = steps

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return F.cross_entropy(self.model(x), y)


# -------------------------------------------------------------------------------------- 8. functional activations
class TanhBlock(nn.Module):
    """Linear then `torch.tanh` called as a function (no activation module): weights N(0, (3.2/sqrt(fan_in))^2)
    drive the pre-activations to std ~3, so a third or more of the outputs sit at +-1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        with torch.no_grad():
            self.fc.weight.normal_(0.0, 12.0 / math.sqrt(64))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


class FunctionalTanhNet(nn.Module):
    """A healthy first layer (`x.sigmoid()` gate, a method call) and the saturated `block:tanh`."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.block = TanhBlock()
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(self.block(h * h.sigmoid()))


class ReluBlock(nn.Module):
    """Linear then `F.relu`; the Linear's bias of -10 keeps every unit off for every sample (dead since
    initialisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        with torch.no_grad():
            self.fc.bias.fill_(-10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class FunctionalReluNet(nn.Module):
    """`inp` (Linear + F.relu, healthy), `block:relu` dead, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.block = ReluBlock()
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(F.relu(self.inp(x))))


# -------------------------------------------------------------------------------------------------------- 9. GAN
class Gan(nn.Module):
    """A generator and a discriminator in one module (what a user would watch)."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        self.disc = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))


class GanRun(Run):
    """Non-saturating GAN on a 2-D Gaussian, Adam(0.5, 0.999) as usual for GANs. One training step is a
    discriminator step (real vs detached fakes) then a generator step, whose backward runs through the
    discriminator and leaves gradients in it that its optimizer never uses (they are zeroed before its next step)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = Gan()
        g = _gen(6)
        self.steps = 40
        self.real = [torch.randn(64, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0]) for _ in range(self.steps)]
        self.noise = [torch.randn(64, 8, generator=g) for _ in range(self.steps)]
        self.opt_d = torch.optim.Adam(self.model.disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
        self.opt_g = torch.optim.Adam(self.model.gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
        self.optimizers = [self.opt_d, self.opt_g]
        self.schedulers = []
        self.d_losses: list[float] = []
        self.d_real: list[float] = []

    def train(self, monitor_step: MonitorStep = None) -> list[float]:
        gen, disc = self.model.gen, self.model.disc
        bce = F.binary_cross_entropy_with_logits
        g_losses = []
        for i in range(self.steps):
            real, z = self.real[i], self.noise[i]
            self.opt_d.zero_grad(set_to_none=True)
            fake = gen(z)
            d_real = disc(real)
            d_loss = bce(d_real, torch.ones_like(d_real)) + bce(disc(fake.detach()), torch.zeros(64, 1))
            d_loss.backward()
            self.opt_d.step()
            self.opt_g.zero_grad(set_to_none=True)
            g_loss = bce(disc(fake), torch.ones(64, 1))
            g_loss.backward()
            self.opt_g.step()
            self.d_losses.append(float(d_loss.detach()))
            self.d_real.append(float(torch.sigmoid(d_real.detach()).mean()))
            g_losses.append(float(g_loss.detach()))
            if monitor_step is not None:
                monitor_step()
        return g_losses


# ------------------------------------------------------------------------------------- 11. fp16 gradients to zero
class Fp16UnderflowRun(Run):
    """A float16 MLP trained with a loss scale of 2**-20 (a scaler that backed off far too much): the gradient of
    the mean at the output is 2**-20 / 512 = 2**-29, below float16's smallest subnormal 2**-24, so it and every
    gradient after it flush to exactly zero. Nothing learns; nothing is NaN."""

    SCALE = 2.0**-20

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        self.model.half()
        self.data = [(x.half(), y.half()) for x, y in _regression_batches(12, 128, 16, 4, seed=7)]
        self.optimizers = [torch.optim.SGD(self.model.parameters(), lr=0.01)]
        self.schedulers = []
        self.steps = 12

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return (self.model(x) - y).pow(2).mean() * self.SCALE


# ---------------------------------------------------------------- more contrasts: dead at init, tiny Adam, sigmoid out
class DeadSinceInit(Run):
    """DeadMidRunNet with `fc2`'s biases at -10 from the start and no spike: `act2` is dead at step 0 already, the
    case that `he_init` and the biases fix (not the learning rate)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = DeadMidRunNet()
        with torch.no_grad():
            self.model.fc2.bias.fill_(-10.0)
        self.data = _regression_batches(20, 64, 16, 4, seed=0, offset=-5.0, scale=0.5)
        self.optimizers = [torch.optim.SGD(self.model.parameters(), lr=0.01)]
        self.schedulers = []
        self.steps = 20

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return F.mse_loss(self.model(x), y)


class SigmoidClassifierRun(Run):
    """A binary classifier with an `nn.Sigmoid` output module and BCELoss on separable data, trained with Adam until
    it is confident: most outputs end within 0.01 of 0 or 1, which is what a converged classifier does, not
    saturation."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
        g = _gen(9)
        direction = torch.randn(8, generator=g)
        self.data = []
        for _ in range(60):
            x = torch.randn(64, 8, generator=g)
            self.data.append((x, (x @ direction > 0).float()[:, None]))
        self.optimizers = [torch.optim.Adam(self.model.parameters(), lr=3e-2)]
        self.schedulers = []
        self.steps = 60

    def loss(self, i: int) -> torch.Tensor:
        x, y = self.data[i]
        return F.binary_cross_entropy(self.model(x), y)


# ------------------------------------------------------------------------------------------- 12. healthy controls
def _he_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


class TinyTransformer(nn.Module):
    """Pre-LN transformer encoder over a sequence of feature vectors, mean-pooled into a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(x))).mean(dim=1))


# ---------------------------------------------------------------------------------- independent measurement
def _nonfinite(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())


def _first(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first(v)
            if t is not None:
                return t
    return None


@dataclass
class StepTrace:
    """What the probe saw in one training step."""

    forward: list[tuple[str, bool]] = field(default_factory=list)  # (module, output non-finite), execution order
    backward: list[tuple[str, bool, bool]] = field(default_factory=list)  # (module, grad out / grad in non-finite)
    fires: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> bool per unit: some output > 0
    saturated: dict[str, float] = field(default_factory=dict)  # module -> share of outputs with |y| >= 0.99
    updates: dict[str, dict[str, float]] = field(default_factory=dict)  # param -> numbers of the optimizer step
    lr: float = math.nan


def _watched(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules and modules owning parameters directly (the root only if it is itself a leaf)."""
    out = []
    for name, m in model.named_modules():
        leaf = next(m.children(), None) is None
        owns = any(True for _ in m.parameters(recurse=False))
        if (leaf or owns) and (name or leaf):
            out.append((name, m))
    return out


class Probe:
    """Plain torch hooks (no actdiag): per step, each watched module's output and gradients checked for NaN/Inf,
    which units of `units` modules fired, the saturated share of `bounded` modules' outputs, and for every
    parameter what the optimizer step did to it. Use as `probe.step` in place of `monitor.step`."""

    def __init__(
        self,
        run: Run,
        *,
        units: Sequence[str] = (),
        bounded: Sequence[str] = (),
        backward: bool = True,
    ) -> None:
        self.run = run
        self.units = set(units)
        self.bounded = set(bounded)
        self.backward = backward
        self.trace: list[StepTrace] = [StepTrace()]
        self._handles: list[Any] = []
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def now(self) -> StepTrace:
        return self.trace[-1]

    def step(self) -> None:
        self.trace.append(StepTrace())

    @contextmanager
    def attached(self) -> Iterator[Probe]:
        modules = dict(_watched(self.run.model))
        for name in (*self.units, *self.bounded):
            modules.setdefault(name, self.run.model.get_submodule(name))
        for name, m in modules.items():
            self._handles.append(m.register_forward_hook(self._forward(name)))
            if self.backward:
                self._handles.append(m.register_full_backward_hook(self._backward(name)))
        names = {id(p): n for n, p in self.run.model.named_parameters()}
        for opt in self.run.optimizers:
            self._handles.append(opt.register_step_pre_hook(self._pre_step(names)))
            self._handles.append(opt.register_step_post_hook(self._post_step(names)))
        try:
            with warnings.catch_warnings():
                # The first layer's input needs no gradient; its hook reports the output gradient, which is all
                # that is read there.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            # The last StepTrace was opened by the last probe.step() and saw nothing.
            if len(self.trace) > 1 and not self.trace[-1].forward:
                self.trace.pop()

    def _forward(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            y = _first(output)
            if y is None:
                return
            y = y.detach()
            self.now.forward.append((name, _nonfinite(y)))
            if name in self.units:
                dims = [d for d in range(y.dim()) if d != 1] if y.dim() > 1 else [0]
                fired = (y > 0).amax(dim=dims) if y.dim() > 1 else (y > 0)
                prev = self.now.fires.get(name)
                self.now.fires[name] = fired if prev is None else prev | fired
            if name in self.bounded:
                self.now.saturated[name] = float((y.float().abs() >= 0.99).float().mean())

        return hook

    def _backward(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, grad_in: Any, grad_out: Any) -> None:
            out_bad = any(_nonfinite(g) for g in grad_out)
            in_bad = any(_nonfinite(g) for g in grad_in)
            self.now.backward.append((name, out_bad, in_bad))

        return hook

    def _pre_step(self, names: dict[int, str]) -> Callable[..., None]:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.now.lr = float(opt.param_groups[0]["lr"])
            for group in opt.param_groups:
                for p in group["params"]:
                    grad = None if p.grad is None else p.grad.detach().clone()
                    self._before[names[id(p)]] = (p.detach().clone(), grad)

        return hook

    def _post_step(self, names: dict[int, str]) -> Callable[..., None]:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group in opt.param_groups:
                for p in group["params"]:
                    name = names[id(p)]
                    before, grad = self._before.pop(name)
                    after = p.detach()
                    delta = (after.double() - before.double()).flatten()
                    w_norm = float(before.double().norm())
                    d_norm = float(delta.norm())
                    row = {
                        "update_norm": d_norm,
                        "weight_norm": w_norm,
                        "ratio": d_norm / w_norm if w_norm > 0 else math.inf,
                        "update_rms": d_norm / math.sqrt(max(delta.numel(), 1)),
                        "lr": float(group["lr"]),
                    }
                    if grad is not None:
                        g_norm = float(grad.double().norm())
                        moving = (grad != 0).flatten()
                        unchanged = (after == before).flatten() & moving
                        row["grad_norm"] = g_norm
                        row["grad_nonzero"] = float(moving.sum())
                        row["unchanged_share"] = float(unchanged.sum()) / max(float(moving.sum()), 1.0)
                        row["effective_step"] = d_norm / g_norm if g_norm > 0 else math.nan
                    self.now.updates[name] = row

        return hook

    # ---------------------------------------------------------------------------------------------- readings
    def first_nonfinite(self) -> tuple[int, str, str] | None:
        """(step, module, pass) of the first NaN/Inf: in a step, the forward pass comes first (in execution order);
        in the backward, the culprit is the module whose input gradient is non-finite while its output gradient is
        finite."""
        for s, t in enumerate(self.trace):
            for name, bad in t.forward:
                if bad:
                    return s, name, "forward"
            for name, out_bad, in_bad in t.backward:
                if in_bad and not out_bad:
                    return s, name, "backward"
                if out_bad:  # non-finite from the loss itself: the module it reached first
                    return s, name, "backward"
        return None

    def dead_share(self, module: str, start: int, stop: int) -> float:
        """Share of `module`'s units with no positive output on any sample of steps [start, stop)."""
        fired = [t.fires[module] for t in self.trace[start:stop] if module in t.fires]
        alive = torch.stack(fired).any(dim=0)
        return 1.0 - float(alive.float().mean())

    def series(self, param: str, key: str) -> list[float]:
        return [t.updates[param][key] for t in self.trace if param in t.updates and key in t.updates[param]]


def measure_run(run: Run, **probe: Any) -> tuple[Probe, list[float]]:
    """Train `run` under a Probe; the probe and the losses."""
    p = Probe(run, **probe)
    with p.attached():
        losses = run.train(p.step)
    return p, losses


# ------------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """A named run, its label, how to watch it, and its independent measurement."""

    name: str
    make: Callable[[], Run]
    label: Label
    measure: Callable[[], dict[str, Any]]
    every: int = 1  # the watch interval the label is stated for

    def __repr__(self) -> str:
        return f"Case({self.name})"


def _m_dies_mid_run() -> dict[str, Any]:
    p, losses = measure_run(DiesMidRun(), units=["act1", "act2"])
    s = DiesMidRun.SPIKE_STEP
    per_step = [p.dead_share("act2", i, i + 1) for i in range(len(p.trace))]
    return {
        "dead_at_start": p.dead_share("act2", 0, 3),
        "dead_before_spike": p.dead_share("act2", s - 2, s + 1),
        "dead_after": p.dead_share("act2", s + 1, len(p.trace)),
        "dead_last3": p.dead_share("act2", len(p.trace) - 3, len(p.trace)),
        "act1_dead_after": p.dead_share("act1", s + 1, len(p.trace)),
        "first_step_over_80": next((i for i, d in enumerate(per_step) if d > 0.8), None),
        "lr_spike": p.trace[s].lr / p.trace[s - 1].lr,
        "losses": losses,
    }


def _m_nan(masked: bool) -> Callable[[], dict[str, Any]]:
    def measure() -> dict[str, Any]:
        p, losses = measure_run(NanMidRun(masked))
        first = p.first_nonfinite()
        last = p.trace[-1]
        return {
            "first": first,
            "forward_finite_at_first": first is not None and not any(b for _, b in p.trace[first[0]].forward),
            "nonfinite_at_end": [n for n, b in last.forward if b],
            "losses": losses,
        }

    return measure


def _m_blow_up() -> dict[str, Any]:
    run = BlowUpRun()
    p, losses = measure_run(run)
    first = p.first_nonfinite()
    ratios = []
    if first is not None and first[0] > 0:
        prev = p.trace[first[0] - 1].updates
        ratios = [row["ratio"] for row in prev.values()]
    inputs_finite = all(bool(torch.isfinite(x).all()) for x, _ in run.data)
    return {
        "first": first,
        "max_ratio_before": max(ratios) if ratios else math.nan,
        "first_ratio": max(r["ratio"] for r in p.trace[0].updates.values()),
        "inputs_finite": inputs_finite,
        "losses": losses,
    }


def _adagrad() -> Run:
    return MlpRun(lambda ps: torch.optim.Adagrad(ps, lr=0.01), steps=200)


def _m_adagrad() -> dict[str, Any]:
    p, losses = measure_run(_adagrad(), backward=False)
    eff = {name: p.series(name, "effective_step") for name in ("0.weight", "2.weight", "4.weight")}
    ratio = {name: p.series(name, "ratio") for name in eff}
    return {
        "effective_step_decay": {n: e[-1] / e[0] for n, e in eff.items()},
        "final_ratio": {n: r[-1] for n, r in ratio.items()},
        "grad_norm_change": {n: p.series(n, "grad_norm")[-1] / p.series(n, "grad_norm")[0] for n in eff},
        "losses": losses,
    }


def _decay_to_zero() -> Run:
    steps = 40
    return MlpRun(lambda ps: torch.optim.AdamW(ps, lr=3e-3), steps=steps, lr_lambda=lambda i: 1.0 - i / steps)


def _m_decay_to_zero() -> dict[str, Any]:
    p, losses = measure_run(_decay_to_zero(), backward=False)
    name = "2.weight"
    upd, lr = p.series(name, "update_rms"), p.series(name, "lr")
    per_lr = [u / r for u, r in zip(upd, lr)]
    eff = p.series(name, "effective_step")
    return {
        "lr_first_last": (lr[0], lr[-1]),
        "update_rms_per_lr": (min(per_lr), max(per_lr)),
        "effective_step_decay": eff[-1] / eff[0],
        "final_ratio": p.series(name, "ratio")[-1],
        "losses": losses,
    }


ZERO_INIT_PARAMS = ("block.bn2.weight", "scaled.gamma", "proj.bias")


def _zero_init() -> Run:
    # Short, as in `actdiag inspect --steps 5 --optimizer adam`: the ratio of a parameter that started at zero is
    # ~1/k after k steps, so it is early in a run that a ratio rule blind to the initial value goes wrong.
    return ClassifierRun(ZeroInitNet, (16, 3, 8, 8), steps=8, lr=3e-3)


def _m_zero_init() -> dict[str, Any]:
    run = _zero_init()

    def held_out() -> float:
        # Training mode (batch statistics), as the run itself; only BatchNorm's running buffers notice.
        with torch.no_grad():
            return sum(float(run.loss(i)) for i in range(run.steps)) / run.steps

    before = held_out()
    p, losses = measure_run(run, backward=False)
    out: dict[str, Any] = {"losses": losses, "loss_drop": before - held_out()}
    for name in ZERO_INIT_PARAMS:
        out[name] = {
            "max_ratio_after_5": max(p.series(name, "ratio")[5:]),
            "max_update_rms_per_lr": max(u / r for u, r in zip(p.series(name, "update_rms"), p.series(name, "lr"))),
        }
    return out


def _functional_tanh() -> Run:
    return ClassifierRun(FunctionalTanhNet, (32, 16), steps=20, lr=1e-3)


def _m_functional_tanh() -> dict[str, Any]:
    p, losses = measure_run(_functional_tanh(), bounded=["block"], backward=False)
    sat = [t.saturated["block"] for t in p.trace]
    return {"saturated": (min(sat), max(sat)), "losses": losses}


def _functional_relu() -> Run:
    return ClassifierRun(FunctionalReluNet, (32, 16), steps=20, lr=1e-3)


def _m_functional_relu() -> dict[str, Any]:
    p, losses = measure_run(_functional_relu(), units=["block", "inp"], backward=False)
    n = len(p.trace)
    return {
        "block_dead": p.dead_share("block", 0, n),
        "inp_dead": p.dead_share("inp", 0, n),
        "losses": losses,
    }


def _m_gan() -> dict[str, Any]:
    run = GanRun()
    p, g_losses = measure_run(run, units=["gen.1"], backward=False)
    disc = [n for n, _ in run.model.disc.named_parameters()]
    ratios = [t.updates[f"disc.{n}"]["ratio"] for t in p.trace for n in disc]
    n = len(p.trace)
    return {
        "d_update_ratio": (min(ratios), max(ratios)),
        "d_real_prob_end": run.d_real[-1],
        "d_losses": run.d_losses,
        "g_losses": g_losses,
        "dead_gen": p.dead_share("gen.1", n - 3, n),
    }


def _bf16(dtype: torch.dtype) -> Callable[[], Run]:
    return lambda: MlpRun(lambda ps: torch.optim.Adam(ps, lr=1e-4), steps=60, act=nn.ReLU, dtype=dtype, seed=8)


def _m_bf16(dtype: torch.dtype) -> Callable[[], dict[str, Any]]:
    def measure() -> dict[str, Any]:
        run = _bf16(dtype)()

        def held_out() -> float:
            with torch.no_grad():
                return sum(float(run.loss(i)) for i in range(8)) / 8

        before = held_out()
        p, losses = measure_run(run, backward=False)
        shares = {name: p.series(name, "unchanged_share") for name in ("0.weight", "2.weight", "4.weight")}
        return {
            "unchanged": {n: (min(s[1:]), max(s[1:])) for n, s in shares.items()},
            "loss_drop": before - held_out(),
            "losses": losses,
        }

    return measure


def _m_fp16() -> dict[str, Any]:
    run = Fp16UnderflowRun()
    p, losses = measure_run(run, backward=False)
    nonzero = max(t.updates[name]["grad_nonzero"] for t in p.trace for name in t.updates)
    moved = max(t.updates[name]["update_norm"] for t in p.trace for name in t.updates)
    # The float64 value of the first gradient the backward computes: d(scale * mean((y - t)^2)) / d(mean) = scale,
    # then d(mean)/d(each element) = 1 / numel.
    x, y = run.data[0]
    out_numel = y.numel()
    return {
        "grad_nonzero": nonzero,
        "update_norm": moved,
        "true_output_grad_scale": run.SCALE / out_numel,
        "fp16_smallest_subnormal": 2.0**-24,
        "losses": losses,
    }


def _healthy(make: Callable[[], Run], units: Sequence[str] = ()) -> Callable[[], dict[str, Any]]:
    def measure() -> dict[str, Any]:
        p, losses = measure_run(make(), units=units, backward=False)
        n = len(p.trace)
        return {
            "losses": losses,
            "nonfinite": p.first_nonfinite(),
            "dead": {u: p.dead_share(u, n - 3, n) for u in units},
            "max_weight_ratio_after_5": max(
                r["ratio"] for t in p.trace[5:] for name, r in t.updates.items() if name.endswith("weight")
            ),
        }

    return measure


def _m_dead_since_init() -> dict[str, Any]:
    p, losses = measure_run(DeadSinceInit(), units=["act1", "act2"], backward=False)
    n = len(p.trace)
    return {
        "dead_each_step": [p.dead_share("act2", i, i + 1) for i in range(n)],
        "act1_dead": p.dead_share("act1", 0, n),
        "losses": losses,
    }


def _tiny_adam() -> Run:
    return MlpRun(lambda ps: torch.optim.Adam(ps, lr=1e-8), steps=30)


def _m_tiny_adam() -> dict[str, Any]:
    p, losses = measure_run(_tiny_adam(), backward=False)
    names = ("0.weight", "2.weight", "4.weight")
    return {
        "max_ratio": max(max(p.series(n, "ratio")) for n in names),
        "min_grad_norm": min(min(p.series(n, "grad_norm")) for n in names),
        "effective_step_decay": {
            n: p.series(n, "effective_step")[-1] / p.series(n, "effective_step")[0] for n in names
        },
        "losses": losses,
    }


def _m_sigmoid_classifier() -> dict[str, Any]:
    run = SigmoidClassifierRun()
    p, losses = measure_run(run, bounded=["3"], backward=False)
    with torch.no_grad():
        x, y = run.data[-1]
        accuracy = float(((run.model(x) > 0.5).float() == y).float().mean())
    return {"at_bounds_end": p.trace[-1].saturated["3"], "accuracy": accuracy, "losses": losses}


def _mlp_control() -> Run:
    return ClassifierRun(_he_mlp, (32, 16))


def _cnn_control() -> Run:
    return ClassifierRun(_small_cnn, (16, 3, 8, 8))


def _transformer_control() -> Run:
    return ClassifierRun(TinyTransformer, (16, 6, 8))


LR_FIXES = ("lower_learning_rate", "gradient_clipping")

CASES: tuple[Case, ...] = (
    Case(
        "dies_mid_run",
        DiesMidRun,
        Label(
            1,
            "dead_relu",
            ("act2",),
            fixes=("lower_learning_rate", "leaky_relu", "gradient_clipping"),
            forbidden_fixes=("he_init",),
            step=DiesMidRun.SPIKE_STEP + 1,
            step_slack=3,
            note="alive at step 0; one step at 200x the learning rate kills ~90% of act2",
        ),
        _m_dies_mid_run,
    ),
    Case(
        "nan_forward_mid_run",
        lambda: NanMidRun(masked=False),
        Label(2, "nonfinite", ("root",), step=16, pass_="forward", note="sqrt of a pre-activation that went negative"),
        _m_nan(False),
    ),
    Case(
        "nan_backward_mid_run",
        lambda: NanMidRun(masked=True),
        Label(
            2,
            "nonfinite",
            ("root",),
            step=16,
            pass_="backward",
            note="torch.where(z > 0, z.sqrt(), 0): finite forward, NaN input gradient once z < 0",
        ),
        _m_nan(True),
    ),
    Case(
        "nan_from_updates",
        BlowUpRun,
        Label(
            2,
            "nonfinite",
            ("5",),
            fixes=LR_FIXES,
            forbidden_fixes=("check_inputs",),
            step=11,
            pass_="forward",
            note="learning rate doubling every step until the weights overflow",
        ),
        _m_blow_up,
    ),
    Case(
        "adagrad_stall",
        _adagrad,
        Label(5, "stalled_updates", ("0", "2", "4"), fixes=("switch_optimizer",)),
        _m_adagrad,
        every=5,
    ),
    Case(
        "linear_decay_to_zero",
        _decay_to_zero,
        Label(5, None, absent=("stalled_updates",), note="AdamW, lr decayed linearly to 0 (HF Trainer default)"),
        _m_decay_to_zero,
    ),
    Case(
        "zero_init_branches",
        _zero_init,
        Label(5, None, absent=("large_updates",), note="zero BN gamma, layer scale 1e-6, weight_norm zero bias"),
        _m_zero_init,
    ),
    Case(
        "functional_tanh_saturated",
        _functional_tanh,
        Label(7, "saturation", ("block:tanh",)),
        _m_functional_tanh,
    ),
    Case(
        "functional_relu_dead",
        _functional_relu,
        Label(7, "dead_relu", ("block:relu",), fixes=("he_init", "leaky_relu", "batchnorm")),
        _m_functional_relu,
    ),
    Case("gan_healthy", GanRun, Label(5, None, note="discriminator judged on its own step"), _m_gan),
    Case(
        "bf16_weights_adam",
        _bf16(torch.bfloat16),
        Label(6, "lost_updates", ("0", "2", "4"), fixes=("fp32_master_weights",)),
        _m_bf16(torch.bfloat16),
    ),
    Case("fp32_twin_adam", _bf16(torch.float32), Label(6, None, absent=("lost_updates",)), _m_bf16(torch.float32)),
    Case(
        "fp16_grads_flushed",
        Fp16UnderflowRun,
        Label(6, "fp16_underflow", (), fixes=("loss_scaling",), note="loss scale 2**-20 in float16"),
        _m_fp16,
    ),
    Case(
        "dead_since_init",
        DeadSinceInit,
        Label(
            1,
            "dead_relu",
            ("act2",),
            fixes=("he_init", "leaky_relu", "batchnorm"),
            forbidden_fixes=("lower_learning_rate", "gradient_clipping"),
            step=0,
            step_slack=0,
            note="fc2 biases at -10 from the start: dead since initialisation, not from training",
        ),
        _m_dead_since_init,
    ),
    Case(
        "adam_lr_too_small",
        _tiny_adam,
        Label(
            5,
            "stalled_updates",
            ("0", "2", "4"),
            fixes=("raise_learning_rate",),
            forbidden_fixes=("switch_optimizer",),
            note="Adam at lr 1e-8: the advice is a larger learning rate, not another optimizer",
        ),
        _m_tiny_adam,
    ),
    Case(
        "converged_sigmoid_classifier",
        SigmoidClassifierRun,
        Label(8, None, absent=("saturation",), note="confident outputs of a trained classifier"),
        _m_sigmoid_classifier,
    ),
    Case("healthy_mlp", _mlp_control, Label(0, None), _healthy(_mlp_control, units=["1", "3"])),
    Case("healthy_cnn", _cnn_control, Label(0, None), _healthy(_cnn_control, units=["2", "5"])),
    Case("healthy_transformer", _transformer_control, Label(0, None), _healthy(_transformer_control)),
)

BY_NAME = {c.name: c for c in CASES}
PLANTED = tuple(c for c in CASES if not c.label.healthy)
HEALTHY = tuple(c for c in CASES if c.label.healthy)


# ------------------------------------------------------------------------------------------------------- judging
@dataclass(frozen=True)
class Verdict:
    """How a list of findings compares with a label. `detected` is for planted cases (None on controls);
    `false_alarms` lists what a control must not have (warnings, errors, codes in `absent`), `others` the
    warnings and errors beside the planted finding, `why` what was wrong with the closest match."""

    detected: bool | None
    false_alarms: tuple[str, ...]
    others: tuple[str, ...]
    why: str


def describe(f: Any) -> str:
    """`code@layer[fix,fix]` of a finding (duck-typed: this module does not import actdiag)."""
    fixes = ",".join(x.code for x in f.fixes)
    step = f.evidence.get("first_step") if hasattr(f.evidence, "get") else None
    extra = "" if step is None else f"#{step}"
    pas = f.evidence.get("pass") if hasattr(f.evidence, "get") else None
    extra += "" if pas is None else f"/{pas}"
    return f"{f.code}@{f.layer}{extra}[{fixes}]"


def _mismatch(label: Label, f: Any) -> str:
    """Empty when finding `f` satisfies `label`, else what is wrong with it."""
    if label.layers and f.layer not in label.layers:
        return f"names {f.layer!r}, not {' or '.join(map(repr, label.layers))}"
    fixes = {x.code for x in f.fixes}
    if label.fixes and not fixes & set(label.fixes):
        return f"fixes {sorted(fixes)} hold none of {list(label.fixes)}"
    if fixes & set(label.forbidden_fixes):
        return f"suggests {sorted(fixes & set(label.forbidden_fixes))}"
    evidence = f.evidence
    if label.step is not None:
        first = evidence.get("first_step")
        if first is None:
            return "no evidence['first_step']"
        if not label.step <= first <= label.step + label.step_slack:
            return f"first_step {first}, not in [{label.step}, {label.step + label.step_slack}]"
    if label.pass_ is not None and evidence.get("pass") != label.pass_:
        return f"pass {evidence.get('pass')!r}, not {label.pass_!r}"
    return ""


def judge(label: Label, findings: Sequence[Any]) -> Verdict:
    loud = [f for f in findings if f.severity in ("warning", "error")]
    if label.healthy:
        alarms = [describe(f) for f in findings if f in loud or f.code in label.absent]
        return Verdict(None, tuple(alarms), (), "")
    matches = [f for f in findings if f.code == label.code]
    problems = [_mismatch(label, f) for f in matches]
    detected = any(p == "" for p in problems)
    why = "" if detected else ("; ".join(problems) if problems else f"no {label.code}")
    others = tuple(describe(f) for f in loud if f.code != label.code)
    return Verdict(detected, (), others, why)
