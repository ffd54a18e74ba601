"""Time full training steps (forward, backward, optimizer) with and without monitoring.

    python bench/bench_step.py                      # the full CPU run behind BENCHMARKS.md
    python bench/bench_step.py --write BENCHMARKS.md
    python bench/bench_step.py --smoke              # seconds; what tests/bench/test_bench_smoke.py runs
    python bench/bench_step.py --device cuda --write BENCHMARKS.md   # on a GPU: GPT-2 small, the GPU targets
    python bench/bench_step.py --device cuda --amp bf16 --models gpt  # the same under bf16 autocast

Every variant trains its own copy of the model (same seed, same data) and they all live in one process. The run is
a series of rounds; in each round every variant runs one block of `--block` consecutive steps, in an order that
rotates from round to round. Machine drift (other people's jobs on a shared box) therefore hits all variants alike,
and each round gives a paired ratio to the unmonitored copy measured minutes, not hours, apart. Ratios are the
median over rounds of (block time / unmonitored block time); the spread is their interquartile range.

Variants:
  none            no monitoring
  none-copy       a second, unmonitored copy: a control, its ratio shows how much two copies differ by themselves
  floor           the least any every=1 tool must do: hooks on the tensors actdiag measures (its module selection,
                  each output and output gradient, each parameter and its gradient), each read once by one
                  reduction (torch.sum). actdiag's every=1 extra time is judged against this one's
  stats-only      the floor's hooks, each tensor handed to actdiag's host batch (hooks.host.HostBatch, as at
                  every=1) and the step's statistics computed by its batched pass when the step ends: the same
                  numbers as actdiag-every1's for these tensors, with no record, unit count, update ratio or
                  history. What the statistics themselves cost, apart from the bookkeeping around them (CPU)
  stats-only-exact  the same with the default interval's statistics (every element of every small tensor, the
                  exact path): what a recorded step's statistics cost there
  actdiag-every1  actdiag.watch(model, every=1): every step recorded, all statistics and histograms (by default
                  at every=1 the spread, zeros and histograms of tensors over the sample (SMALL_SAMPLE elements
                  for the CPU's small tensors, sample_cap for the rest) are estimated from their sample; see
                  actdiag.monitor.EXACT_FROM_EVERY)
  actdiag-every1-exact  the same with exact=True: every element of every tensor read for every statistic
  actdiag-default actdiag.watch(model) at DEFAULT_EVERY; its recorded and unrecorded steps are also shown apart.
                  Unrecorded steps run no hook, only monitor.step(): the target is judged on that call's own
                  time (1 + its mean over the plain step); their ratio against the unmonitored copy, paired by
                  round, is shown beside it, to be read against the control (two copies differ by a few percent).
                  The default interval is judged likewise from its parts (a recorded step's extra time and the
                  own call of the DEFAULT_EVERY - 1 others, over DEFAULT_EVERY plain steps), its paired
                  ratio beside it.
  tb-hooks        forward hooks calling SummaryWriter.add_histogram on every leaf output (what users write by hand)
  tb-all          the same loop at actdiag's content: leaf outputs, their gradients, every weight and weight gradient
  wandb           wandb.watch(model, log="all", log_freq=1) in offline mode (skipped with a note if not installed)

On a GPU (`--device cuda`) the transformer is GPT-2 small (12 layers, d=768, 12 heads, context 1024, vocab 50257,
batch 8); the MLP and the CNN keep their CPU sizes. The hand-written add_histogram loops are left out by default
there (`--variants` brings them back): they copy every tensor to the host and bin it with numpy (GPT-2 small's
logits alone are 1.6 GB a step), and the GPU targets do not compare with them. `--peer-block` gives the peers fewer
steps per round. Each timed step ends with `torch.cuda.synchronize()`, so its time is the device's, and peak memory
is the device allocator's. After the timed rounds the unmonitored copies and actdiag's run DEFAULT_EVERY more steps
under `torch.cuda.set_sync_debug_mode("warn")`, counting the host synchronisations of each step, recorded and
unrecorded apart (an unrecorded step of a watched model must make none; a recorded one makes the one read-back of
its statistics). The floor beside the ratios is the bytes the statistics pass must read (every element of every
measured tensor, once) over the device's read bandwidth (`torch.sum` over 1 GiB), as a share of the unmonitored
step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common  # noqa: I001 - puts the checkout on sys.path before actdiag is imported
import torch
import torch.nn.functional as F
from torch import nn

import actdiag
from actdiag.monitor import DEFAULT_EVERY
from actdiag.records import measured_stats

VARIANTS = (
    "none", "none-copy", "floor", "stats-only", "stats-only-exact", "actdiag-every1", "actdiag-every1-exact",
    "actdiag-default", "tb-hooks", "tb-all", "wandb",
)  # fmt: skip
MODELS = ("mlp", "cnn", "gpt", "deep")  # the table in BENCHMARKS.md
PEERS = ("tb-hooks", "tb-all", "wandb")  # the other tools: every step recorded
# --device cuda's default, see __doc__ (the stats-only variants time the host path)
GPU_VARIANTS = tuple(v for v in VARIANTS if v not in ("tb-hooks", "tb-all", "stats-only", "stats-only-exact"))
EXTRA_MODELS = ("vit",)  # on request (--models vit): see its workload
ALL_MODELS = MODELS + EXTRA_MODELS


# The clock the timed steps read (--clock): wall time, or the process's CPU time, which on a shared machine leaves
# out the time other processes held the cores (for a one-thread workload it is the step's own work).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


# --section: (steps marker, targets marker) of the BENCHMARKS.md sections a partial run writes instead of the
# full run's.
SECTIONS = {"pertensor": ("bench:pertensor-steps", "bench:pertensor-targets")}


class UsageError(ValueError):
    """A model, variant or device this script does not know or this machine lacks."""


# ============================================================================================== models
class ResBlock(nn.Module):
    """A ResNet basic block: in-place ReLUs and an in-place residual add, the cases that break module hooks."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu2(out)


class ResNet(nn.Module):
    def __init__(self, widths: Sequence[int], classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)
        )
        blocks = []
        c = widths[0]
        for i, w in enumerate(widths):
            blocks.append(ResBlock(c, w, 1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2 layout (pre-norm blocks, learned positions, causal attention); shrunk to CPU size on the CPU."""

    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*(GPTBlock(d, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln_f(self.blocks(self.tok(idx) + self.pos(pos))))


class ViTAttention(nn.Module):
    """timm's Attention with its defaults: q/k norms and dropouts present as placeholders that pass tensors on."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj = nn.Linear(d, d)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class ViTBlock(nn.Module):
    """timm's VisionTransformer Block with its defaults (no layer scale, no drop path, no dropout): those options are
    then nn.Identity / nn.Dropout(0.0) modules, called on every forward, returning their input unchanged."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = ViTAttention(d, heads)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.0), nn.Identity(), nn.Linear(4 * d, d), nn.Dropout(0.0)
        )
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ViT(nn.Module):
    """A ViT-Tiny-width vision transformer in timm's layout, for 32x32 images in 4x4 patches."""

    def __init__(self, d: int, depth: int, heads: int, patch: int, side: int, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        tokens = (side // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*(ViTBlock(d, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(self.pos_drop(x + self.pos_embed))
        return self.head(self.norm(x)[:, 0])


@dataclass
class Workload:
    name: str
    description: str
    build: Callable[[], nn.Module]  # a fresh model on `device`
    inputs: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: torch.dtype | None = None  # forward and loss under torch.autocast in this dtype (--amp)
    threads: int | None = None  # torch threads while this workload runs (None: as the run was started)


def _image_task(
    g: torch.Generator, batch: int, side: int, device: torch.device
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Random RGB images of side x side pixels and a 10-class classification loss on random labels."""
    x = torch.randn(batch, 3, side, side, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, lambda out: F.cross_entropy(out.float(), labels)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, load: Workload) -> torch.Tensor:
    """One full training step of `model` on the workload: forward, backward, optimizer; returns the loss."""
    opt.zero_grad(set_to_none=True)
    if load.autocast is None:
        loss = load.loss(model(load.inputs))
    else:
        with torch.autocast(load.device.type, dtype=load.autocast):
            loss = load.loss(model(load.inputs))
    loss.backward()
    opt.step()
    return loss


def timed_steps(model: nn.Module, opt: torch.optim.Optimizer, load: Workload, n: int, after: Any = None) -> float:
    """Seconds per step of `n` training steps, calling `after.step()` (a monitor, say) after each when given."""
    t0 = time.perf_counter()
    for _ in range(n):
        train_step(model, opt, load)
        if after is not None:
            after.step()
    return (time.perf_counter() - t0) / n


def workload(
    name: str, smoke: bool, device: str | torch.device = "cpu", autocast: torch.dtype | None = None
) -> Workload:
    """The benchmark's model `name` (see MODELS) with its data and loss, on `device`; tiny when `smoke`. On a GPU the
    transformer is GPT-2 small; every other model keeps its CPU size."""
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    g = torch.Generator().manual_seed(1)  # the data are drawn on the CPU, the same on every device, then moved
    load: Workload
    if name == "mlp":
        width, depth, batch = (32, 2, 4) if smoke else (1024, 8, 256)
        x = torch.randn(batch, width, generator=g).to(dev)
        target = torch.randn(batch, width, generator=g).to(dev)

        def build_mlp() -> nn.Module:
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            return nn.Sequential(*layers).to(dev)

        load = Workload(
            "mlp", f"MLP {depth} x (Linear({width}) + ReLU), batch {batch}", build_mlp, x,
            lambda out: F.mse_loss(out.float(), target),
        )  # fmt: skip
    elif name == "cnn":
        widths, batch, side = ((4, 8), 2, 8) if smoke else ((32, 64, 128), 32, 32)
        load = Workload(
            "cnn",
            f"ResNet-style CNN, {len(widths)} basic blocks {'/'.join(map(str, widths))} ch, BatchNorm, in-place ReLU, "
            f"batch {batch}x3x{side}x{side}",
            lambda: ResNet(widths).to(dev),
            *_image_task(g, batch, side, dev),
        )
    elif name == "gpt":
        if smoke:
            vocab, ctx, d, layers, heads, batch = 64, 8, 16, 1, 2, 2
        elif gpu:  # GPT-2 small
            vocab, ctx, d, layers, heads, batch = 50257, 1024, 768, 12, 12, 8
        else:
            vocab, ctx, d, layers, heads, batch = 2048, 128, 256, 4, 4, 8
        idx = torch.randint(0, vocab, (batch, ctx + 1), generator=g)
        inp, tgt = idx[:, :-1].contiguous().to(dev), idx[:, 1:].contiguous().to(dev)
        load = Workload(
            "gpt",
            ("GPT-2 small: " if gpu and not smoke else "GPT-style transformer, ")
            + f"{layers} layers, d={d}, {heads} heads, context {ctx}, vocab {vocab}, batch {batch}",
            lambda: GPT(vocab, ctx, d, layers, heads).to(dev),
            inp,
            lambda out: F.cross_entropy(out.reshape(-1, vocab).float(), tgt.reshape(-1)),
        )
    elif name == "deep":
        # Many small tensors: a recorded step's fixed cost per tensor, not its bytes, sets what it costs.
        width, depth, batch = (16, 4, 4) if smoke else (64, 200, 32)
        x = torch.randn(batch, width, generator=g).to(dev)
        target = torch.randn(batch, width, generator=g).to(dev)

        def build_deep() -> nn.Module:
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            return nn.Sequential(*layers).to(dev)

        load = Workload(
            "deep", f"deep narrow MLP {depth} x (Linear({width}) + ReLU), batch {batch}, one torch thread", build_deep,
            x, lambda out: F.mse_loss(out.float(), target), threads=1,
        )  # fmt: skip
    elif name == "vit":
        d, depth, heads, batch, side = (16, 1, 2, 2, 8) if smoke else (192, 4, 3, 32, 32)
        load = Workload(
            "vit",
            f"ViT in timm's layout, {depth} blocks, d={d}, {heads} heads, 4x4 patches of {side}x{side} images, "
            f"batch {batch}; its unused options are nn.Identity / nn.Dropout(0.0) modules, as timm builds them",
            lambda: ViT(d, depth, heads, 4, side).to(dev),
            *_image_task(g, batch, side, dev),
        )
    else:
        raise UsageError(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")
    load.device = dev
    load.autocast = autocast
    if autocast is not None:
        load.description += f", under torch.autocast({str(autocast).replace('torch.', '')})"
    return load


# ============================================================================================== variants
class Variant:
    """One way of monitoring a model. `recording()` says whether the coming step is recorded."""

    name = "none"

    def attach(self, model: nn.Module, tmp: Path) -> None:
        self.model = model

    def recording(self) -> bool:
        return False

    def tensors(self) -> int:
        """Tensors measured in the last recorded step."""
        return 0

    def recorded_bytes(self) -> int:
        """Bytes of the tensors measured in the last recorded step (float32: 4 per element)."""
        return 0

    def after_step(self, loss: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


def _element_size(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given as torch's or as a record's name of it ("float32", "bfloat16")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def _distinct(stats: Sequence[Any]) -> list[Any]:
    """Statistics measured once and shared by several records (a pass-through module's output is its input)
    count once."""
    return list({id(s): s for s in stats}.values())


class ActdiagVariant(Variant):
    def __init__(self, name: str, every: int, exact: bool | None = None) -> None:
        self.name = name
        self.every = every
        self.exact = exact

    def attach(self, model: nn.Module, tmp: Path) -> None:
        self.model = model
        accuracy = "exact" if self.exact else "auto"
        self.monitor = actdiag.watch(model, every=self.every, accuracy=accuracy).start()

    def recording(self) -> bool:
        return self.monitor.recorder.recording

    def tensors(self) -> int:
        rec = self.monitor.latest
        if rec is None:
            return 0
        return len(_distinct(measured_stats(rec.layers, rec.params)))

    def recorded_bytes(self) -> int:
        rec = self.monitor.latest
        if rec is None:
            return 0
        # Each tensor at its own element size: an output (and its gradient) in the layer's dtype, which autocast may
        # have lowered; a weight (and its gradient) in the parameter's.
        size: dict[int, int] = {}
        for layer in rec.layers:
            for s in (layer.activation, layer.gradient):
                if s is not None:
                    size[id(s)] = _element_size(layer.dtype)
        dtypes = {name: p.dtype for name, p in self.model.named_parameters()}
        for ps in rec.params:
            for s in (ps.weight, ps.grad):
                if s is not None:
                    size[id(s)] = _element_size(dtypes.get(ps.name, torch.float32))
        return sum(s.numel * size.get(id(s), 4) for s in _distinct(measured_stats(rec.layers, rec.params)))

    def after_step(self, loss: torch.Tensor) -> None:
        self.monitor.step()

    def close(self) -> None:
        self.monitor.close()


class FloorVariant(Variant):
    """Every tensor actdiag measures at every=1, read once by one reduction each: the hooks stay registered (none
    is added or removed per step) and each keeps a 0-d sum, dropped at the end of the step. No statistic, no
    record: the least an every=1 tool over these tensors does."""

    name = "floor"

    def attach(self, model: nn.Module, tmp: Path) -> None:
        self.sums: list[torch.Tensor] = []
        keep = self.sums.append

        def measure(t: torch.Tensor) -> None:
            keep(t.detach().sum())

        self._hook(model, measure)

    def _hook(self, model: nn.Module, measure: Callable[[torch.Tensor], None]) -> None:
        """`measure` each tensor actdiag measures at every=1, from hooks registered once: each selected module's
        output and (a tensor hook) its gradient, each trainable parameter and its gradient when accumulated."""
        from actdiag.hooks.modules import first_tensor, select_modules

        self.model = model
        self.last_count = 0
        self.handles = []

        def forward_hook(module: nn.Module, inputs: Any, output: Any) -> None:
            t = first_tensor(output)
            if t is None:
                return
            measure(t)
            if t.requires_grad and t.is_floating_point():
                t.register_hook(measure)

        def param_hook(p: torch.Tensor) -> None:
            measure(p)
            if p.grad is not None:
                measure(p.grad)

        for _, module in select_modules(model, None, None):
            self.handles.append(module.register_forward_hook(forward_hook))
        for p in model.parameters():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(param_hook))

    def recording(self) -> bool:
        return True

    def tensors(self) -> int:
        return self.last_count

    def after_step(self, loss: torch.Tensor) -> None:
        self.last_count = len(self.sums)
        self.sums.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class StatsOnlyVariant(FloorVariant):
    """The floor's hooks, each tensor's statistics as actdiag's every=1 computes them on the host (HostBatch.take in
    the hook, one batched pass in `after_step`); tensors the batch does not take are measured alone
    (stats.tensor_stats). The results are dropped: no record is built. `exact`: as at the default interval instead
    (every element of a small tensor; a large one measured alone, exactly)."""

    def __init__(self, exact: bool = False) -> None:
        self.exact = exact
        self.name = "stats-only-exact" if exact else "stats-only"

    def attach(self, model: nn.Module, tmp: Path) -> None:
        from actdiag.hooks.host import HostBatch
        from actdiag.hooks.sampling import SMALL_SAMPLE
        from actdiag.hooks.stats import DEFAULT_BINS, tensor_stats
        from actdiag.monitor import sample_cap_for

        exact = self.exact
        cap = sample_cap_for(DEFAULT_EVERY if exact else 1)
        batch = self.batch = HostBatch(DEFAULT_BINS, cap, None if exact else min(SMALL_SAMPLE, cap))
        self.alone: list[Any] = []
        self.count = [0]
        count, alone = self.count, self.alone

        def measure(t: torch.Tensor) -> None:
            count[0] += 1
            if batch.take(count[0], t, not exact) is None:
                alone.append(tensor_stats(t.detach(), bins=DEFAULT_BINS, sample_cap=cap, exact=exact))

        self._hook(model, measure)

    def after_step(self, loss: torch.Tensor) -> None:
        if len(self.batch):
            self.batch.finish()
        self.last_count = self.count[0]
        self.count[0] = 0
        self.alone.clear()

    def close(self) -> None:
        super().close()
        self.batch.release()


class TensorBoardHooks(Variant):
    """The hand-written peer: a forward hook on every leaf module writing its output's histogram each step; with
    `everything`, also each output's gradient (a tensor hook) and every weight and weight gradient (a
    post-accumulate-grad hook, before the optimizer moves the weight), i.e. the tensors actdiag measures."""

    def __init__(self, name: str, everything: bool) -> None:
        self.name = name
        self.everything = everything

    def attach(self, model: nn.Module, tmp: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(tmp / "tb"))
        self.step = 0
        self.count = self.last_count = 0
        self.handles = []
        for name, module in model.named_modules():
            if next(module.children(), None) is None:
                self.handles.append(module.register_forward_hook(self._hook(name)))
        if self.everything:
            for pname, p in model.named_parameters():
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._param_hook(pname)))

    def _add(self, tag: str, t: torch.Tensor) -> None:
        self.writer.add_histogram(tag, t.detach(), self.step)
        self.count += 1

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._add(f"activations/{name}", output)
                if self.everything and output.requires_grad:
                    output.register_hook(lambda g: self._add(f"gradients/{name}", g))

        return hook

    def _param_hook(self, pname: str) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self._add(f"weights/{pname}", p)
            if p.grad is not None:
                self._add(f"weight_grads/{pname}", p.grad)

        return hook

    def recording(self) -> bool:
        return True

    def tensors(self) -> int:
        return self.last_count

    def after_step(self, loss: torch.Tensor) -> None:
        self.step += 1
        self.last_count, self.count = self.count, 0

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.writer.close()


class WandbWatch(Variant):
    name = "wandb"

    def attach(self, model: nn.Module, tmp: Path) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            mode="offline", dir=str(tmp), project="actdiag-bench", settings=wandb.Settings(silent=True, console="off")
        )
        self.model = model
        wandb.watch(model, log="all", log_freq=1)

    def recording(self) -> bool:
        return True

    def tensors(self) -> int:
        # log="all": a histogram of every trainable parameter and of its gradient
        return 2 * sum(1 for p in self.model.parameters() if p.requires_grad)

    def after_step(self, loss: torch.Tensor) -> None:
        # wandb.watch stages its histograms; they are committed with the step's log call, as in any wandb loop.
        self.run.log({"loss": loss.detach().item()})

    def close(self) -> None:
        self.wandb.unwatch(self.model)
        self.run.finish()


def wandb_status() -> str | None:
    """None when wandb can run here, else why not."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return "wandb is not installed (pip install wandb, if `pip install --dry-run wandb` pulls no torch)"
    return None


def make_variant(name: str) -> Variant:
    if name == "none":
        return Variant()
    if name == "none-copy":
        control = Variant()
        control.name = name
        return control
    if name == "floor":
        return FloorVariant()
    if name in ("stats-only", "stats-only-exact"):
        return StatsOnlyVariant(exact=name == "stats-only-exact")
    if name == "actdiag-every1":
        return ActdiagVariant(name, 1)
    if name == "actdiag-every1-exact":
        return ActdiagVariant(name, 1, exact=True)
    if name == "actdiag-default":
        return ActdiagVariant(name, DEFAULT_EVERY)
    if name == "tb-hooks":
        return TensorBoardHooks(name, everything=False)
    if name == "tb-all":
        return TensorBoardHooks(name, everything=True)
    if name == "wandb":
        return WandbWatch()
    raise UsageError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


# ============================================================================================== timing
def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a step's time is the device's, not the time to queue it); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    variant: Variant
    model: nn.Module
    opt: torch.optim.Optimizer
    load: Workload
    times: list[float] = field(default_factory=list)  # seconds per timed step
    recorded: list[bool] = field(default_factory=list)
    blocks: list[float] = field(default_factory=list)  # mean seconds per step of each block, aligned with rounds
    # Mean seconds per unrecorded step of each block (NaN: none in it), aligned with rounds like `blocks`.
    unrecorded_blocks: list[float] = field(default_factory=list)
    # Seconds spent in the variant's own per-step call (`after_step`: monitor.step() for actdiag) on unrecorded steps.
    own_unrecorded: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)  # minor page faults per step, one entry per block
    peak_extra_mb: float | None = None
    syncs: dict[bool, list[int]] = field(default_factory=dict)  # recorded? -> host synchronisations per step (GPU)

    def step(self) -> tuple[float, bool]:
        rec = self.variant.recording()
        _synchronize(self.load.device)
        t0 = CLOCK[0]()
        loss = train_step(self.model, self.opt, self.load)
        t1 = CLOCK[0]()
        self.variant.after_step(loss)
        if not rec:  # host time of the variant's own call: all the code an unrecorded step of a watch runs
            self.own_unrecorded.append(CLOCK[0]() - t1)
        _synchronize(self.load.device)
        return CLOCK[0]() - t0, rec

    def counted_step(self) -> None:
        """One step (training and the variant's own work) under torch.cuda.set_sync_debug_mode("warn"), adding the
        host synchronisations it made to `syncs`; the device is drained before, outside the counted region."""
        rec = self.variant.recording()
        _synchronize(self.load.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss = train_step(self.model, self.opt, self.load)
                self.variant.after_step(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        n = sum(1 for w in caught if "synchronizing" in str(w.message))
        self.syncs.setdefault(rec, []).append(n)

    def block(self, n: int) -> None:
        total = 0.0
        unrec: list[float] = []
        f0 = _common.minor_faults()
        for _ in range(n):
            dt, rec = self.step()
            self.times.append(dt)
            self.recorded.append(rec)
            total += dt
            if not rec:
                unrec.append(dt)
        self.blocks.append(total / n)
        self.unrecorded_blocks.append(sum(unrec) / len(unrec) if unrec else math.nan)
        f1 = _common.minor_faults()
        if f0 is not None and f1 is not None:
            self.faults.append((f1 - f0) / n)


def build_runners(load: Workload, variants: Sequence[str], tmp: Path) -> list[Runner]:
    runners = []
    for name in variants:
        torch.manual_seed(0)  # every copy starts from the same weights
        model = load.build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        v = make_variant(name)
        sub = tmp / f"{load.name}-{name}"
        sub.mkdir(parents=True, exist_ok=True)
        v.attach(model, sub)
        runners.append(Runner(v, model, opt, load))
    return runners


def measure_memory(runners: Sequence[Runner], steps: int) -> None:
    """Peak memory above the resident level while a variant runs `steps` steps (activations, gradients, and whatever
    monitoring allocates), one variant at a time after the timed rounds: the process's RSS on the CPU, the device
    allocator's peak on a GPU."""
    for r in runners:
        if r.load.device.type == "cuda":
            _synchronize(r.load.device)
            torch.cuda.reset_peak_memory_stats(r.load.device)
            base_bytes = torch.cuda.memory_allocated(r.load.device)
            for _ in range(steps):
                r.step()
            r.peak_extra_mb = (torch.cuda.max_memory_allocated(r.load.device) - base_bytes) / 2**20
            continue
        if not _common.reset_peak_rss():
            return
        base = _common.rss_mb()
        for _ in range(steps):
            r.step()
        peak = _common.peak_rss_mb()
        if base is not None and peak is not None:
            r.peak_extra_mb = peak - base


def count_syncs(runners: Sequence[Runner], steps: int) -> None:
    """On a GPU: `steps` more steps of the unmonitored copies and actdiag's variants, counting each step's host
    synchronisations (`Runner.syncs`). The peers are left out: their histograms go to the host by design."""
    for r in runners:
        if r.load.device.type != "cuda":
            return
        if r.variant.name in PEERS:
            continue
        for _ in range(steps):
            r.counted_step()


@contextlib.contextmanager
def attached(load: Workload, variants: Sequence[str]) -> Iterator[list[Runner]]:
    tmp = Path(tempfile.mkdtemp(prefix="actdiag-bench-"))
    runners: list[Runner] = []
    try:
        runners = build_runners(load, variants, tmp)
        yield runners
    finally:
        for r in runners:
            try:
                r.variant.close()
            except Exception as exc:  # noqa: BLE001 - a peer failing to shut down must not lose the measurements
                print(f"[bench] closing {r.variant.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


def run_workload(
    load: Workload,
    variants: Sequence[str],
    rounds: int,
    block: int,
    warmup: int,
    smoke: bool = False,
    peer_block: int | None = None,
) -> list[Runner]:
    """The interleaved rounds. Each round runs `block` steps of every variant, the peers `peer_block` (they record
    every step alike, so fewer steps tell their time; their warm-up is capped to it too). Ratios compare each
    block's mean step time with the unmonitored block of the same round."""
    peer_block = block if peer_block is None else peer_block

    def steps(r: Runner) -> int:
        return peer_block if r.variant.name in PEERS else block

    with attached(load, variants) as runners:
        for r in runners:  # warm-up: allocator, first-call caches, the sample index of each tensor size
            for _ in range(min(warmup, peer_block) if r.variant.name in PEERS else warmup):
                r.step()
        for i in range(rounds):
            k = i % len(runners)
            for r in runners[k:] + runners[:k]:
                r.block(steps(r))
        measure_memory(runners, steps=1 if smoke else 2)
        # DEFAULT_EVERY steps hold exactly one recorded step of the default interval.
        count_syncs(runners, steps=2 if smoke else DEFAULT_EVERY)
    return runners


# ============================================================================================== report
def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x * 1e3:.1f}"


def _ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def summarise(runners: Sequence[Runner], bandwidth: float = 0.0) -> list[dict[str, Any]]:
    base = next(r for r in runners if r.variant.name == "none")
    base_med = _common.median(base.times)
    rows = []
    for r in runners:
        ratios = [b / b0 for b, b0 in zip(r.blocks, base.blocks) if b0 > 0]
        q1, q3 = _common.quartiles(ratios)
        rec = [t for t, f in zip(r.times, r.recorded) if f]
        rec_med = _common.median(rec)
        # Unrecorded steps against the unmonitored block of the same round, like `ratios`.
        unrec_ratios = [u / b0 for u, b0 in zip(r.unrecorded_blocks, base.blocks) if b0 > 0 and not math.isnan(u)]
        own = r.own_unrecorded
        own_mean = sum(own) / len(own) if own and r is not base else math.nan
        every = getattr(r.variant, "every", None)
        # Extra time per recorded step: the recorded steps' median over the unmonitored median, from the same rounds.
        extra = rec_med - base_med if rec else math.nan
        floor = r.variant.recorded_bytes() / bandwidth if bandwidth else math.nan  # seconds to read them once
        rows.append(
            {
                "variant": r.variant.name,
                "median_ms": _common.median(r.times) * 1e3,
                "ratio": _common.median(ratios),
                "ratio_q1": q1,
                "ratio_q3": q3,
                "recorded_ms": rec_med * 1e3,
                "unrecorded_ratio": _common.median(unrec_ratios) if r is not base else math.nan,
                # 1 + the mean host time of the variant's own call on an unrecorded step over the unmonitored step.
                "unrecorded_own_ratio": 1 + own_mean / base_med,
                "unrecorded_own_us": own_mean * 1e6,
                # A watch recording every `every` steps, from its parts: a recorded step's extra time and its own
                # call on the other every - 1, over `every` unmonitored steps. Unlike the paired ratio, no difference
                # between two copies of the model is in it (see the control); what actdiag's code would leave behind
                # for the steps after it (caches, garbage) is not in it either.
                "parts_ratio": (
                    1 + (extra + (every - 1) * own_mean) / (every * base_med)
                    if every and every > 1 and rec and own
                    else math.nan
                ),
                "extra_ms": extra * 1e3,
                "peak_extra_mb": r.peak_extra_mb,
                "tensors": r.variant.tensors(),
                "floor_ms": floor * 1e3,
                "steps": len(r.times),
                "faults": _common.median(r.faults) if r.faults else math.nan,
                "floor_share": floor / base_med if base_med > 0 else math.nan,
                # Host synchronisations per step, the most any one step made: unrecorded, recorded (None: not counted)
                "syncs_unrecorded": max(r.syncs[False]) if r.syncs.get(False) else None,
                "syncs_recorded": max(r.syncs[True]) if r.syncs.get(True) else None,
            }
        )
    return rows


def _syncs_cell(row: dict[str, Any]) -> str:
    def one(n: int | None) -> str:
        return "-" if n is None else str(n)

    return f"{one(row['syncs_unrecorded'])} / {one(row['syncs_recorded'])}"


def _unrecorded_cell(row: dict[str, Any]) -> str:
    """The unrecorded steps' paired ratio, and the host time of the variant's own call in them (actdiag's code)."""
    us = row["unrecorded_own_us"]
    own = "" if math.isnan(us) or row["variant"] in PEERS else f" ({us:.0f} us)"
    return _ratio(row["unrecorded_ratio"]) + own


def table_lines(model: str, rows: Sequence[dict[str, Any]], gpu: bool = False) -> list[str]:
    header = [
        "variant",
        "median step ms",
        "ratio to none (IQR)",
        "unrecorded steps ratio (actdiag's own us / step)",
        "recorded step ms",
        "extra ms / recorded step",
        "tensors / recorded step",
        "extra us / tensor",
        "one-pass read floor ms",
        "peak device memory above resident, MB" if gpu else "peak RSS above resident, MB",
        "host syncs / step (unrecorded / recorded)" if gpu else "page faults / step",
    ]
    body = []
    for row in rows:
        mem = row["peak_extra_mb"]
        body.append(
            [
                f"{model} / {row['variant']}",
                _ms(row["median_ms"] / 1e3),
                f"{_ratio(row['ratio'])} ({_ratio(row['ratio_q1'])}-{_ratio(row['ratio_q3'])})",
                _unrecorded_cell(row),
                _ms(row["recorded_ms"] / 1e3),
                _ms(row["extra_ms"] / 1e3),
                str(row["tensors"]) if row["tensors"] else "",
                f"{row['extra_ms'] * 1e3 / row['tensors']:.0f}" if row["tensors"] and row["extra_ms"] > -1e9 else "",
                f"{row['floor_ms']:.1f}" if row["floor_ms"] > 0 else "",
                "n/a" if mem is None else f"{mem:.0f}",
                _syncs_cell(row) if gpu else "n/a" if math.isnan(row["faults"]) else f"{row['faults']:.0f}",
            ]
        )
    return _common.markdown_table(header, body)


TARGETS: tuple[tuple[str, str, float], ...] = (
    # (label, how it is computed, bound)
    ("unrecorded steps <= 1.02x: their actdiag code (monitor.step()), 1 + its time / the plain step", "own", 1.02),
    (
        "unrecorded steps against the unmonitored copy, paired by round (no target; read against the control)",
        "unrecorded",
        math.nan,
    ),
    (
        f"default interval (every={DEFAULT_EVERY}) <= 1.03x, from its parts (paired against the unmonitored copy)",
        "default",
        1.03,
    ),
    ("recorded step (every=1) <= 15 us extra per measured tensor", "per-tensor", 15.0),
    ("every=1: extra time <= 2x the floor's (each measured tensor read once)", "floorx", 2.0),
    (
        "stats-only (the statistics without the bookkeeping): extra time over the floor's (no target)",
        "statsx",
        math.nan,
    ),
    ("every=1: extra time over stats-only's (no target; the rest is records, units, update ratios)", "bookx", math.nan),
    (
        f"default interval, statistics alone: 1 + stats-only-exact's extra / {DEFAULT_EVERY} plain steps (no target)",
        "statsdefault",
        math.nan,
    ),
    ("every=1 <= 1.25x (retired by issue 20 for the floor above; shown for reference)", "every1", math.nan),
    ("every=1, exact=True <= 1.25x (every element read for every statistic)", "every1-exact", 1.25),
    ("extra per recorded step >= 5x below tb-hooks (activations only)", "vs-tb", 5.0),
    ("extra per recorded step >= 5x below tb-all (same tensors as actdiag)", "vs-tball", 5.0),
    ("extra per recorded step below wandb.watch", "vs-wandb", 1.0),
    ("control: a second unmonitored copy (no target; shows the noise)", "control", math.nan),
)
GPU_TARGETS: tuple[tuple[str, str, float], ...] = (
    ("unrecorded steps <= 1.01x: their actdiag code (monitor.step()), 1 + its host time / the plain step", "own", 1.01),
    (
        "unrecorded steps against the unmonitored copy, paired by round (no target; read against the control)",
        "unrecorded",
        math.nan,
    ),
    ("host synchronisations in an unrecorded step = 0 (set_sync_debug_mode)", "syncs", 0.0),
    (
        f"default interval (every={DEFAULT_EVERY}) <= 1.01x, from its parts (paired against the unmonitored copy)",
        "default",
        1.01,
    ),
    ("every=1 <= 1.15x (the target is the transformer's)", "every1", 1.15),
    ("every=1: extra time <= 2x the floor's (each measured tensor read once)", "floorx", 2.0),
    ("every=1, exact=True (every element read for every statistic; no target)", "every1-exact", math.nan),
    ("statistics floor: bytes read / device bandwidth, share of the plain step (no target)", "floor", math.nan),
    ("extra per recorded step >= 5x below tb-hooks (activations only)", "vs-tb", 5.0),
    ("extra per recorded step >= 5x below tb-all (same tensors as actdiag)", "vs-tball", 5.0),
    ("extra per recorded step below wandb.watch", "vs-wandb", 1.0),
    ("control: a second unmonitored copy (no target; shows the noise)", "control", math.nan),
)


def read_bandwidth(smoke: bool, device: torch.device | None = None) -> float:
    """Bytes per second a read of memory reaches (median of 5): on the CPU one thread summing a 64 MB float32 array,
    on a GPU `torch.sum` over 1 GiB. What a statistics pass over the recorded tensors cannot beat on this machine."""
    if device is not None and device.type == "cuda":
        x = torch.ones((1 << 14) if smoke else (1 << 28), device=device)
        x.sum()  # the kernel loaded, the memory touched
        times = []
        for _ in range(5):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            x.sum()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        nbytes = x.numel() * x.element_size()
        del x
        return nbytes / max(_common.median(times), 1e-9)
    import numpy as np

    a = np.ones((1 << 14) if smoke else (1 << 24), dtype=np.float32)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.nbytes / _common.median(times)


def target_lines(results: dict[str, list[dict[str, Any]]], gpu: bool = False) -> list[str]:
    """One row per target, one column per model: the measured figure and whether it meets the target."""
    header = ["target (GPU)" if gpu else "target (CPU)", *results]
    body = []
    for label, how, bound in GPU_TARGETS if gpu else TARGETS:
        row = [label]
        for rows in results.values():
            by = {r["variant"]: r for r in rows}
            value = paired = math.nan
            if how == "control" and "none-copy" in by:
                value = by["none-copy"]["ratio"]
            elif how == "unrecorded" and "actdiag-default" in by:
                value = by["actdiag-default"]["unrecorded_ratio"]
            elif how == "own" and "actdiag-default" in by:
                value = by["actdiag-default"]["unrecorded_own_ratio"]
            elif how == "syncs" and "actdiag-default" in by:
                n = by["actdiag-default"]["syncs_unrecorded"]
                value = math.nan if n is None else float(n)
            elif how == "default" and "actdiag-default" in by:
                value = by["actdiag-default"]["parts_ratio"]
                paired = by["actdiag-default"]["ratio"]
            elif how == "every1" and "actdiag-every1" in by:
                value = by["actdiag-every1"]["ratio"]
            elif how == "per-tensor" and "actdiag-every1" in by and by["actdiag-every1"].get("tensors"):
                value = by["actdiag-every1"]["extra_ms"] * 1e3 / by["actdiag-every1"]["tensors"]
            elif how == "floorx" and "actdiag-every1" in by and "floor" in by and by["floor"]["extra_ms"] > 0:
                value = by["actdiag-every1"]["extra_ms"] / by["floor"]["extra_ms"]
            elif how == "statsx" and "stats-only" in by and "floor" in by and by["floor"]["extra_ms"] > 0:
                value = by["stats-only"]["extra_ms"] / by["floor"]["extra_ms"]
            elif how == "bookx" and "stats-only" in by and "actdiag-every1" in by and by["stats-only"]["extra_ms"] > 0:
                value = by["actdiag-every1"]["extra_ms"] / by["stats-only"]["extra_ms"]
            elif how == "statsdefault" and "stats-only-exact" in by and "none" in by:
                value = 1 + by["stats-only-exact"]["extra_ms"] / (DEFAULT_EVERY * by["none"]["median_ms"])
            elif how == "every1-exact" and "actdiag-every1-exact" in by:
                value = by["actdiag-every1-exact"]["ratio"]
            elif how == "floor" and "actdiag-every1" in by:
                value = by["actdiag-every1"]["floor_share"]
            elif how.startswith("vs-") and "actdiag-every1" in by:
                peer = by.get({"vs-tb": "tb-hooks", "vs-tball": "tb-all", "vs-wandb": "wandb"}[how])
                ours = by["actdiag-every1"]["extra_ms"]
                if peer is not None and ours > 0:
                    value = peer["extra_ms"] / ours
            if math.isnan(value):
                row.append("n/a")
            elif how == "syncs":
                row.append(f"{value:.0f} {'met' if value <= bound else 'MISSED'}")
            elif how == "floor":
                row.append(f"{100 * value:.1f} %")
            elif how == "per-tensor":
                row.append(f"{value:.1f} us {'met' if value <= bound else 'MISSED'}")
            elif math.isnan(bound):
                row.append(f"{value:.3f}x")
            elif how.startswith("vs-"):
                row.append(f"{value:.1f}x {'met' if value >= bound else 'MISSED'}")
            else:
                digits = 4 if how == "own" else 3
                also = "" if math.isnan(paired) else f" (paired: {paired:.3f}x)"
                row.append(f"{value:.{digits}f}x {'met' if value <= bound else 'MISSED'}{also}")
        body.append(row)
    return _common.markdown_table(header, body)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated: " + ", ".join(ALL_MODELS) + " (default: the first three)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated: " + ", ".join(VARIANTS) + " (default: all; with --device cuda all but tb-hooks, tb-all)",
    )
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    p.add_argument("--block", type=int, default=DEFAULT_EVERY, help="steps per variant per round (default: every)")
    p.add_argument("--warmup", type=int, default=DEFAULT_EVERY, help="untimed steps per variant first")
    p.add_argument(
        "--peer-block",
        type=int,
        default=None,
        help="steps per round of the peers (tb-hooks, tb-all, wandb), which record every step alike; default: --block",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the models train (default cpu); cuda: GPT-2 small, the GPU targets, and the tables go to their "
        "own sections of --write's file",
    )
    p.add_argument(
        "--amp",
        choices=("none", "bf16"),
        default="none",
        help="forward and loss under torch.autocast(bfloat16) (default none: float32)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 rounds: checks the script, times nothing")
    p.add_argument("--write", type=Path, default=None, help="replace the step table in this Markdown file")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what a step's time is: wall time (default), or the process's CPU time (time.process_time), which on a "
        "loaded shared machine leaves out the time other processes held the cores; meant for one-thread workloads",
    )
    p.add_argument(
        "--section",
        choices=tuple(SECTIONS),
        default=None,
        help="with --write: write the tables between this section's markers instead of bench:steps and "
        "bench:targets (a run over some models or variants beside the full one)",
    )
    p.add_argument(
        "--malloc-fixed",
        action="store_true",
        help="fix glibc's mmap/trim thresholds first (mallopt), so that no variant pays for page faults that the "
        "allocator's moving thresholds cause (see BENCHMARKS.md)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = parse_args(argv)
    return _common.with_threads(args.threads, lambda: run(args, argv))


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> list[str]:
    if args.smoke:
        # Smoke mode checks that the script works and times nothing: one thread keeps it quick on a busy machine.
        args.rounds, args.block, args.warmup = 1, 2, 1
        torch.set_num_threads(1)
    models = [m for m in args.models.split(",") if m]
    default_variants = GPU_VARIANTS if args.device == "cuda" else VARIANTS
    variants = [v for v in (args.variants or ",".join(default_variants)).split(",") if v]
    for m in models:
        if m not in ALL_MODELS:
            raise UsageError(f"unknown model {m!r}; choose from {', '.join(ALL_MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            raise UsageError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if "none" not in variants:
        variants.insert(0, "none")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    gpu = device.type == "cuda"
    autocast = torch.bfloat16 if args.amp == "bf16" else None
    steps_marker, targets_marker = ("bench:gpu-steps", "bench:gpu-targets") if gpu else ("bench:steps", "bench:targets")
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.section:
        steps_marker, targets_marker = SECTIONS[args.section]
    notes = []
    if "wandb" in variants and (why := wandb_status()) is not None:
        variants.remove("wandb")
        notes.append(f"- wandb skipped: {why}.")
    cmd = _common.command(__file__, argv)
    lines = [f"Command: `{cmd}`", ""]
    lines += _common.machine_lines()
    if args.malloc_fixed:
        fixed = _common.fix_malloc()
        lines.append(
            f"- allocator: glibc mmap and trim thresholds fixed at {_common.FIXED_MALLOC_BYTES >> 20} MiB (mallopt)"
            if fixed
            else "- allocator: --malloc-fixed asked for, but mallopt is not available here: the system's defaults"
        )
    else:
        lines.append("- allocator: the system's defaults (glibc: mmap and trim thresholds that move at run time)")
    peers = ""
    if args.peer_block is not None and any(v in PEERS for v in variants):
        peers = f" ({args.peer_block} for the peers, whose warm-up is capped to as many)"
    if args.clock == "cpu":
        lines.append("- clock: the process's CPU time (time.process_time), not wall time")
    lines += [
        f"- {args.rounds} interleaved rounds x {args.block} steps per variant{peers}, after {args.warmup} warm-up "
        f"steps; actdiag DEFAULT_EVERY = {DEFAULT_EVERY}; optimizer AdamW",
        "",
    ]
    bandwidth = read_bandwidth(args.smoke, device)
    how = "torch.sum over 1 GiB on the device" if gpu else "one thread, numpy sum over 64 MB"
    lines.insert(-1, f"- read bandwidth ({how}): {bandwidth / 1e9:.1f} GB/s")
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        load = workload(m, args.smoke, device, autocast)
        print(f"[bench] {load.description}: {', '.join(variants)}", file=sys.stderr, flush=True)
        work = functools.partial(
            run_workload, load, variants, args.rounds, args.block, args.warmup, args.smoke, args.peer_block
        )
        runners = _common.with_threads(load.threads or 0, work)
        results[m] = summarise(runners, bandwidth)
        lines += [f"**{m}**: {load.description}", ""]
        del runners, load, work  # the models' memory back before the next workload (a GPU holds one model at a time)
        lines += table_lines(m, results[m], gpu)
        lines.append("")
        print("\n".join(table_lines(m, results[m], gpu)), file=sys.stderr, flush=True)
        if args.write is not None:  # after each model, so a long run that is cut short keeps what it measured
            _common.replace_section(args.write, steps_marker, lines)
    lines += notes
    lines.append(f"- wall time of the benchmark: {time.perf_counter() - started:.0f} s")
    targets = target_lines(results, gpu)
    print("\n".join(lines + ["", *targets]))
    if args.write is not None:
        _common.replace_section(args.write, steps_marker, lines)
        _common.replace_section(args.write, targets_marker, [*targets, "", f"From `{cmd}`; details below."])
    return lines + ["", *targets]


if __name__ == "__main__":
    try:
        main()
    except UsageError as exc:  # one line, no traceback
        sys.exit(f"bench_step.py: error: {exc}")
