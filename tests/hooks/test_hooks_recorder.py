"""The recorder on real model shapes: every case records, nothing changes, nothing is left behind."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

import actdiag
from actdiag.hooks.recorder import first_tensor, select_modules


def hooks_left(model: nn.Module) -> int:
    """The model's hooks, and torch's global module hooks (ours while a step is recorded)."""
    n = len(_global_forward_hooks) + len(_global_forward_pre_hooks)
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out = first_tensor(out)
    assert out is not None
    loss = out.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


class InplaceNet(nn.Module):
    """Linear -> in-place ReLU -> Linear with a residual `x += y`: the cases full backward hooks get wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        y = self.fc2(h)
        y += h
        return self.head(y)


def test_stats_and_gradients_match_a_reference_pass() -> None:
    torch.manual_seed(1)
    model = InplaceNet()
    x = torch.randn(16, 6)
    # Reference: the same computation with retain_grad on every intermediate, no actdiag.
    pre = model.fc1(x)
    pre.retain_grad()
    h = torch.relu(pre)
    h.retain_grad()
    y = model.fc2(h)
    y.retain_grad()
    out = model.head(y + h)
    out.retain_grad()
    out.pow(2).mean().backward()
    ref = {"fc1": (pre, pre.grad), "fc2": (y, y.grad), "head": (out, out.grad)}
    model.zero_grad()
    with actdiag.watch(model, every=1) as mon:
        model(x).pow(2).mean().backward()
        mon.step()
    layers = {layer.name: layer for layer in mon.latest.layers}
    assert [layer.name for layer in mon.latest.layers] == ["fc1", "act", "fc2", "head"]
    for name, (value, grad) in ref.items():
        a, g = layers[name].activation, layers[name].gradient
        v64, g64 = value.detach().double(), grad.double()
        assert a.mean == pytest.approx(v64.mean().item(), abs=1e-6)
        assert a.std == pytest.approx(v64.std(unbiased=False).item(), rel=1e-5)
        assert g.norm == pytest.approx(g64.norm().item(), rel=1e-5), name
        assert g.abs_max == pytest.approx(g64.abs().max().item(), rel=1e-6)
    # fc1's output was overwritten in place by the ReLU: its record must describe the value before that.
    assert layers["fc1"].activation.min < 0
    assert layers["act"].activation.min >= 0
    # weight statistics come from the parameter itself
    w = model.fc1.weight.detach().double()
    assert layers["fc1"].weight.std == pytest.approx(w.std(unbiased=False).item(), rel=1e-5)
    assert layers["fc1"].weight_grad is not None and layers["fc1"].weight_name == "fc1.weight"
    # dead units of the ReLU: reference from the pre-activation
    dead_ref = ((pre.detach() > 0).sum(0) == 0).double().mean().item()
    assert layers["act"].dead_fraction == pytest.approx(dead_ref)


class PassThroughNet(nn.Module):
    """fc1 -> BatchNorm -> in-place ReLU, then an Identity shortcut and a Dropout(p=0) on the ReLU's output: the two
    pass-through modules return the very tensor the ReLU returned, and each registers a gradient hook on it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, width)
        self.bn = nn.BatchNorm1d(width)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.0)
        self.short = nn.Identity()
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.fc1(x)))
        return self.head(self.fc2(self.drop(h)) + self.short(h))


@pytest.mark.parametrize("batch", [16, 128], ids=["small tensors (batched)", "large tensors (per tensor)"])
def test_a_tensor_seen_twice_in_one_state_is_measured_once(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    from actdiag.hooks import host as host_mod
    from actdiag.hooks import recorder as rec_mod

    torch.manual_seed(3)
    width = 96  # batch 128: 12288 elements per activation, over the 8192-element sample; batch 16: 1536, under
    model = PassThroughNet(width)
    x = torch.randn(batch, 6)
    # Reference: the same computation with retain_grad on every intermediate, float64 statistics, no actdiag.
    pre = model.fc1(x)
    b = model.bn(pre)
    h = torch.relu(b)
    for t in (pre, b, h):
        t.retain_grad()
    y = model.fc2(h)
    y.retain_grad()
    out = model.head(y + h)
    out.pow(2).mean().backward()
    ref = {"fc1": (pre, pre.grad), "bn": (b, b.grad), "act": (h, h.grad), "fc2": (y, y.grad)}
    ref["drop"] = ref["short"] = ref["act"]  # the same tensor, and autograd's one gradient for it
    model.zero_grad()

    measured = []
    real_stats, real_take = rec_mod.tensor_stats, host_mod.HostBatch.take

    def count_stats(t: torch.Tensor, **kw: object) -> object:
        measured.append(t.numel())
        return real_stats(t, **kw)

    def count_take(self: host_mod.HostBatch, key: object, t: torch.Tensor, estimate: bool = False) -> object:
        meta = real_take(self, key, t, estimate)
        if meta is not None:
            measured.append(t.numel())
        return meta

    real_take_many = host_mod.HostBatch.take_many

    def count_take_many(self: host_mod.HostBatch, keys: list[object], ts: list[torch.Tensor]) -> object:
        kept = real_take_many(self, keys, ts)
        if kept is not None:
            measured.extend(t.numel() for t in ts)
        return kept

    monkeypatch.setattr(rec_mod, "tensor_stats", count_stats)
    monkeypatch.setattr(host_mod.HostBatch, "take", count_take)
    monkeypatch.setattr(host_mod.HostBatch, "take_many", count_take_many)
    with actdiag.watch(model, every=1, accuracy="exact") as mon:
        model(x).pow(2).mean().backward()
        mon.step()
        n_measured = len(measured)
    layers = {layer.name: layer for layer in mon.latest.layers}
    assert list(layers) == ["fc1", "bn", "act", "drop", "fc2", "short", "head"]
    for name, (value, grad) in ref.items():
        a, g = layers[name].activation, layers[name].gradient
        v64, g64 = value.detach().double(), grad.double()
        assert a.numel == v64.numel() and a.mean == pytest.approx(v64.mean().item(), abs=1e-6), name
        assert a.std == pytest.approx(v64.std(unbiased=False).item(), rel=1e-5), name
        assert (a.min, a.max) == pytest.approx((v64.min().item(), v64.max().item()), rel=1e-6), name
        assert g.norm == pytest.approx(g64.norm().item(), rel=1e-5), name
    for name in ("drop", "short"):  # one measurement, shared
        assert layers[name].activation is layers["act"].activation
        assert layers[name].gradient is layers["act"].gradient
    # BatchNorm's output was overwritten in place by the ReLU (same object, new version): measured twice, apart.
    assert layers["bn"].activation.min < 0 <= layers["act"].activation.min
    # Measured in the step: activations and gradients of fc1, bn, act, fc2 and head (the pass-through layers take
    # act's), and the eight parameters with their gradients. Without the check, drop and short would add four more.
    assert n_measured == 5 * 2 + 8 * 2
    assert measured[:n_measured].count(batch * width) == 4 * 2
    # The step begun by the last step() saw no forward pass: closing measures nothing more.
    assert len(measured) == n_measured


def test_hooks_are_removed_on_exit_and_after_exceptions() -> None:
    model = InplaceNet()
    with actdiag.watch(model, every=1) as mon:
        assert hooks_left(model) > 0
        model(torch.randn(2, 6)).sum().backward()
        mon.step()
    assert hooks_left(model) == 0
    with pytest.raises(ZeroDivisionError), actdiag.watch(model, every=1):
        model(torch.randn(2, 6))
        raise ZeroDivisionError
    assert hooks_left(model) == 0


def test_unrecorded_steps_have_no_hooks() -> None:
    model = InplaceNet()
    with actdiag.watch(model, every=3) as mon:
        seen = []
        for _ in range(7):
            seen.append(hooks_left(model) > 0)
            model(torch.randn(2, 6)).sum().backward()
            mon.step()
    assert seen == [True, False, False, True, False, False, True]
    assert mon.recorded_steps == 3 and mon.steps == 7
    assert mon.history.steps == (0, 3, 6)


def hook_ids(model: nn.Module) -> set[tuple[str, int]]:
    ids = set()
    ids |= {("", k) for k in (*_global_forward_hooks, *_global_forward_pre_hooks)}
    for name, m in model.named_modules():
        ids |= {(name, k) for k in (*m._forward_hooks, *m._forward_pre_hooks)}
    for name, p in model.named_parameters():
        ids |= {(name, k) for k in getattr(p, "_post_accumulate_grad_hooks", None) or {}}
    return ids


def test_consecutive_recorded_steps_keep_their_hooks() -> None:
    """At every=1 the hooks of one step serve the next (none removed and made again); each step still records
    all of its own statistics, a parameter unfrozen between steps gets a hook, and closing removes them all."""
    torch.manual_seed(0)
    model = InplaceNet()
    model.fc2.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    ids, grads, acts = [], [], []
    with actdiag.watch(model, every=1) as mon:
        for step in range(4):
            if step == 2:
                model.fc2.requires_grad_(True)
            ids.append(hook_ids(model))
            with torch.no_grad():  # what this step's forward gives fc1 (not through the module: no extra call)
                expected = x.double() @ model.fc1.weight.double().T + model.fc1.bias.double()
            train_step(model, opt, x)
            mon.step()
            assert mon.latest is not None
            grads.append({p.name for p in mon.latest.params if p.grad is not None})
            fc1 = next(layer for layer in mon.latest.layers if layer.name == "fc1")
            assert fc1.activation is not None and fc1.gradient is not None
            acts.append((fc1.activation.max, float(expected.max())))
    # Step 2 began (in the previous mon.step()) before fc2 was unfrozen: new hooks from step 3 on.
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert "fc2.weight" not in grads[1] and "fc2.weight" in grads[3]
    assert all(math.isclose(got, want, rel_tol=1e-6) for got, want in acts)
    assert mon.history.steps == (0, 1, 2, 3)
    assert hooks_left(model) == 0


def test_hooks_kept_for_a_recorded_step_are_removed_when_the_next_is_not() -> None:
    model = InplaceNet()
    with actdiag.watch(model, every=2) as mon:
        for _ in range(2):
            model(torch.randn(2, 6)).sum().backward()
            mon.end_step()  # a framework callback: the next step is begun separately
            assert hooks_left(model) == 0
            mon.begin_step()
    assert mon.recorded_steps == 1


class Multi(nn.Module):
    """Tuple, dict and nested outputs; a shared module called three times; a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.split = Splitter()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for _ in range(3):
            x = torch.tanh(self.shared(x))
        a, rest = self.split(self.frozen(x))
        return {"a": a, "b": rest["b"]}


class Splitter(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return x * 2, {"b": x - 1}


def test_repeated_calls_tuple_dict_outputs_and_frozen_layers() -> None:
    model = Multi()
    x = torch.randn(5, 4)
    with actdiag.watch(model, every=1, functional=False) as mon:  # module records only (torch.tanh: its own test)
        out = model(x)
        (out["a"].sum() + out["b"].sum()).backward()
        mon.step()
    labels = [layer.label for layer in mon.latest.layers]
    assert labels == ["shared", "shared#1", "shared#2", "frozen", "split"]
    # every call recorded separately, none overwritten: three different activations
    stds = [layer.activation.std for layer in mon.latest.layers[:3]]
    assert len(set(stds)) == 3
    h = x
    for i in range(3):
        h_lin = model.shared(h)
        assert mon.latest.layers[i].activation.mean == pytest.approx(h_lin.mean().item(), abs=1e-6)
        h = torch.tanh(h_lin)
    frozen = mon.latest.layers[3]
    assert frozen.weight is not None and frozen.weight_grad is None
    assert frozen.gradient is not None  # the activation still carries a gradient to the splitter's inputs
    split = mon.latest.layers[4]
    assert split.activation.mean == pytest.approx((model.frozen(h) * 2).mean().item(), abs=1e-6)


def test_embeddings_lstm_eval_no_grad() -> None:
    model = nn.ModuleDict(
        {"emb": nn.Embedding(50, 8), "lstm": nn.LSTM(8, 16, batch_first=True), "out": nn.Linear(16, 2)}
    )

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        seq, _ = model["lstm"](model["emb"](tokens))
        return model["out"](seq[:, -1])

    tokens = torch.randint(0, 50, (3, 7))
    with actdiag.watch(model, every=1) as mon:
        forward(tokens).sum().backward()
        mon.step()
        model.eval()
        with torch.no_grad():
            forward(tokens)
        mon.step()
    layers = {layer.name: layer for layer in mon.latest.layers}
    assert set(layers) == {"emb", "lstm", "out"}
    assert layers["lstm"].activation.numel == 3 * 7 * 16
    assert all(layer.gradient is None for layer in mon.latest.layers)  # eval under no_grad: no backward
    assert mon.recorded_steps == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_records_half_outputs_in_float32(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with actdiag.watch(model, every=1) as mon:
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        out.float().sum().backward()
        mon.step()
    with torch.autocast("cpu", dtype=dtype):
        ref = model[0](x)
    first = mon.latest.layers[0]
    assert first.dtype == str(dtype).replace("torch.", "")
    assert first.activation.mean == pytest.approx(ref.double().mean().item(), abs=1e-6)
    assert first.gradient is not None


class DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(8 * 6 * 6, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def run_training(watched: bool, steps: int = 20) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(123)
    model = DropNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [torch.randn(4, 3, 6, 6) for _ in range(steps)]
    losses = []
    if watched:
        with actdiag.watch(model, every=1) as mon:
            for x in data:
                losses.append(train_step(model, opt, x))
                mon.step()
        assert mon.recorded_steps == steps
    else:
        for x in data:
            losses.append(train_step(model, opt, x))
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()


def test_training_is_bit_identical_with_and_without_watch() -> None:
    l0, s0, rng0 = run_training(False)
    l1, s1, rng1 = run_training(True)
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert torch.equal(rng0, rng1)


def test_update_ratio_matches_the_optimizer_step() -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(10, 4)
    with actdiag.watch(model, every=1) as mon:
        before = model.weight.detach().clone()
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    expected = ((model.weight.detach() - before).norm() / before.norm()).item()
    params = {p.name: p for p in mon.latest.params}
    assert params["weight"].update_ratio == pytest.approx(expected, rel=1e-5)
    assert mon.latest.layers[0].update_ratio == pytest.approx(expected, rel=1e-5)


def test_include_exclude_by_pattern_and_type() -> None:
    model = DropNet()
    assert [n for n, _ in select_modules(model, include=[nn.Conv2d])] == ["body.0", "body.4"]
    assert [n for n, _ in select_modules(model, include="body.[67]")] == ["body.6", "body.7"]
    names = [n for n, _ in select_modules(model, exclude=["body.3", nn.ReLU])]
    assert names == ["body.0", "body.1", "body.4", "body.6", "body.7"]
    with pytest.raises(TypeError, match="include"):
        select_modules(model, include=[3])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="every"):
        actdiag.watch(nn.Linear(2, 2), every=0)
    with pytest.raises(TypeError, match="nn.Module"):
        actdiag.watch("not a model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not writable"):
        actdiag.watch(nn.Linear(2, 2), logdir="/proc/actdiag-cannot-write-here")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_long_run_keeps_no_tensors() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    counts, rss = [], []
    with actdiag.watch(model, every=1, max_history=64) as mon:
        for i in range(1000):
            train_step(model, opt, x)
            mon.step()
            if i in (99, 999):
                counts.append(live_tensors())
                rss.append(rss_bytes())
    assert counts[1] <= counts[0], counts
    # Process memory: allowance for allocator noise, far below what keeping 900 steps of statistics would take.
    assert rss[1] - rss[0] < 8 * 2**20, rss
    assert len(mon.history.steps) < 64
    assert mon.recorded_steps == 1000


def test_json_document_has_the_contract_shape(tmp_path) -> None:  # noqa: ANN001
    import json

    model = DropNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with actdiag.watch(model, every=2) as mon:
        for _ in range(4):
            train_step(model, opt, torch.randn(2, 3, 6, 6))
            mon.step()
    path = mon.save_json(tmp_path / "r.json")
    doc = json.loads(path.read_text())
    assert doc["schema"] == "actdiag.report/1"
    assert doc["model"] == {"name": "DropNet", "parameters": sum(p.numel() for p in model.parameters())}
    assert doc["run"]["steps"] == 4 and doc["run"]["device"] == "cpu" and doc["run"]["torch"] == torch.__version__
    names = [layer["name"] for layer in doc["layers"]]
    assert names == [n for n, _ in model.named_modules() if n.startswith("body.")]
    keys = {"count", "mean", "std", "min", "max", "abs_max", "zero_fraction", "nonfinite_count", "histogram"}
    conv = doc["layers"][0]
    for part in ("activation", "gradient", "weight", "weight_grad"):
        assert keys <= set(conv[part])
        assert sum(conv[part]["histogram"]["counts"]) == conv[part]["count"]
        assert len(conv[part]["histogram"]["edges"]) == len(conv[part]["histogram"]["counts"]) + 1
    relu = doc["layers"][2]
    assert "weight" not in relu and "dead_fraction" in relu  # absent, not null, where it does not apply
    assert doc["history"]["steps"] == [0, 2]
    assert not math.isnan(np.sum(doc["history"]["layers"]["body.0"]["act_std"]))
    assert not list(tmp_path.glob(".*.tmp"))


def test_sync_free_path_reads_nothing_back_until_the_step_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA code path (forced here on the CPU) must not read a value back inside a hook: every host read
    happens once, in Recorder.end(). On a GPU, torch.cuda.set_sync_debug_mode("error") checks the same."""
    from actdiag.hooks.recorder import Recorder

    model = DropNet()
    x = torch.randn(3, 3, 6, 6)
    rec = Recorder(model, path="device", sample_cap=16)
    model(x).sum().backward()  # warm the sample-index cache outside the check too
    rec.begin(0)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host read inside a recorded step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
            m.setattr(torch.Tensor, name, forbidden)
        out = model(x)
        out.sum().backward()
    record = rec.end()
    assert record is not None
    assert all(layer.activation is not None for layer in record.layers)
    assert all(layer.gradient is not None for layer in record.layers if layer.type != "Dropout")


@pytest.mark.parametrize("exact", [True, False])
def test_device_path_records_what_the_host_path_records(exact: bool) -> None:
    """The device path (CUDA's, here on the CPU with path="device": its batch of rows, its estimated large tensors)
    and the host path give one model's step the same statistics, an in-place ReLU after a BatchNorm and a NaN
    included."""
    from actdiag.hooks.recorder import Recorder

    def record(path: str) -> object:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(),
            nn.Linear(8 * 12 * 12, 16), nn.Tanh(), nn.Linear(16, 2),
        )  # fmt: skip
        x = torch.randn(20, 3, 12, 12, generator=torch.Generator().manual_seed(1))
        x[0, 0, 0, 0] = math.nan  # one NaN: counted exactly on both paths
        rec = Recorder(model, path=path, sample_cap=512, exact=exact)
        rec.begin(0)
        model(x).nan_to_num().sum().backward()
        return rec.end()

    host, device = record("host"), record("device")
    assert [layer.name for layer in host.layers] == [layer.name for layer in device.layers]
    pairs = [(h.activation, d.activation) for h, d in zip(host.layers, device.layers, strict=True)]
    pairs += [(h.gradient, d.gradient) for h, d in zip(host.layers, device.layers, strict=True)]
    pairs += [(h.weight, d.weight) for h, d in zip(host.params, device.params, strict=True)]
    pairs += [(h.grad, d.grad) for h, d in zip(host.params, device.params, strict=True)]
    assert sum(1 for h, _ in pairs if h is not None and h.numel > 512) >= 4, "large tensors are among them"
    for h, d in pairs:
        if h is None:
            assert d is None
            continue
        label = (h.numel, h.estimated)
        assert (d.numel, d.count, d.nonfinite_count) == (h.numel, h.count, h.nonfinite_count), label
        if h.count:
            assert d.mean == pytest.approx(h.mean, rel=1e-5, abs=1e-7 * h.abs_max), label
        if not exact and h.nonfinite_count and h.numel > 512:
            # The host path measures a large tensor holding a NaN exactly (it can branch on what its one pass saw);
            # the device path cannot, and estimates it like any other, keeping count, non-finite count and mean exact.
            assert d.estimated and not h.estimated, label
            continue
        assert (d.estimated, d.histogram.sampled, d.zero_count) == (h.estimated, h.histogram.sampled, h.zero_count)
        if not h.count:
            continue
        assert d.std == pytest.approx(h.std, rel=1e-4, abs=1e-7 * h.abs_max), label
        assert (d.min, d.max) == (h.min, h.max), label
        assert d.histogram.total == h.histogram.total, label


def test_exactness_follows_the_interval_unless_told(tmp_path) -> None:  # noqa: ANN001
    import json

    from actdiag.monitor import EXACT_FROM_EVERY

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))
    x = torch.randn(64, 256)

    def run(**kw: object) -> actdiag.Monitor:
        with actdiag.watch(model, sample_cap=1000, **kw) as mon:
            model(x).pow(2).sum().backward()
            model.zero_grad()
            mon.step()
        return mon

    often, rare = run(every=1), run(every=EXACT_FROM_EVERY)
    forced = run(every=1, accuracy="exact")
    big = often.latest.layers[0]  # 64 x 256 outputs and a 256 x 256 weight: over the cap of 1000
    small = often.latest.layers[2]  # 64 x 4 outputs, under the cap: exact whatever the mode
    assert big.activation.estimated and big.gradient.estimated and big.weight.estimated
    assert not small.activation.estimated
    for mon in (rare, forced):
        layer = mon.latest.layers[0]
        assert not (layer.activation.estimated or layer.gradient.estimated or layer.weight.estimated)
    # Exact and estimated agree on what is exact in both (count, mean) and closely on the rest.
    a_est, a_ex = big.activation, rare.latest.layers[0].activation
    assert a_est.count == a_ex.count and a_est.mean == pytest.approx(a_ex.mean, rel=1e-5, abs=1e-7)
    assert (a_est.min, a_est.max) == (a_ex.min, a_ex.max)  # extremes are exact at every interval
    assert a_est.std == pytest.approx(a_ex.std, rel=0.1)
    doc = json.loads(often.save_json(tmp_path / "r.json").read_text())
    assert doc["layers"][0]["activation"]["estimated"] == ["std", "zero_fraction", "histogram"]
    assert doc["layers"][2]["activation"]["estimated"] == []
    # A one-shot inspect is always exact.
    report = actdiag.inspect(model, x)
    assert report.layers[0].activation.numel > 8192  # over the default cap, so estimable
    assert not any(s.estimated for la in report.layers for s in (la.activation, la.gradient, la.weight) if s)


def test_the_sample_follows_the_interval_unless_told() -> None:
    """Recording more often than EXACT_FROM_EVERY, a large tensor's histograms come from FREQUENT_SAMPLE_CAP
    elements (half the default); at the default interval from DEFAULT_SAMPLE_CAP; `sample_cap=` overrides both.
    Tensors under the sample are counted whole either way."""
    from actdiag.hooks.stats import DEFAULT_SAMPLE_CAP
    from actdiag.monitor import EXACT_FROM_EVERY, FREQUENT_SAMPLE_CAP

    assert FREQUENT_SAMPLE_CAP < DEFAULT_SAMPLE_CAP
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    x = torch.randn(64, 256)  # 16384 outputs: over both samples

    def sample_size(**kw: object) -> int:
        with actdiag.watch(model, **kw) as mon:
            model(x).pow(2).sum().backward()
            model.zero_grad()
            mon.step()
        big, small = mon.latest.layers[0], mon.latest.layers[2]
        assert big.activation.histogram.sampled and not small.activation.histogram.sampled
        assert small.activation.histogram.total == small.activation.count == 64 * 4
        assert big.gradient.histogram.total == big.activation.histogram.total
        return big.activation.histogram.total

    assert sample_size(every=1) == FREQUENT_SAMPLE_CAP
    assert sample_size(every=EXACT_FROM_EVERY - 1) == FREQUENT_SAMPLE_CAP
    assert sample_size(every=EXACT_FROM_EVERY) == DEFAULT_SAMPLE_CAP
    assert sample_size(every=1, accuracy="exact") == FREQUENT_SAMPLE_CAP  # exactness and the sample are set apart
    assert sample_size(every=1, sample_cap=5000) == 5000
    assert sample_size(every=EXACT_FROM_EVERY, sample_cap=3000) == 3000
