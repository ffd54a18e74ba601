"""Functional activations (`F.relu`, `torch.tanh`, `x.sigmoid()`, ... inside a forward) are recorded like
activation modules on recorded steps, as `<enclosing module>:<function>`, and watching them changes nothing.

Every label is proven in the test by plain PyTorch hooks on the enclosing module (whose forward returns the
activation), and every statistic is checked against a float64 numpy reference of what those hooks captured."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.overrides import TorchFunctionMode

import actdiag
from actdiag.hooks import functional
from actdiag.hooks.functional import FUNCTIONS, FunctionalProbe
from actdiag.hooks.modules import SATURATION_TOL
from actdiag.rules import diagnose

# ---------------------------------------------------------------------------------------------------- models


class Act(nn.Module):
    """A linear map and an activation applied as a function: the block's output is the activation's."""

    def __init__(self, n_in: int, n_out: int, fn: str, bias: float | None = None, gain: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.fn = fn
        with torch.no_grad():
            self.fc.weight.mul_(gain)
            if bias is not None:
                self.fc.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.fn == "relu":
            return F.relu(h)
        if self.fn == "relu_inplace":
            return F.relu(h, inplace=True)
        if self.fn == "relu_":
            return h.relu_()
        if self.fn == "tanh":
            return torch.tanh(h)
        if self.fn == "sigmoid_method":
            return h.sigmoid()
        if self.fn == "gelu":
            return F.gelu(h)
        if self.fn == "silu":
            return F.silu(h)
        if self.fn == "leaky_relu":
            return F.leaky_relu(h, 0.1)
        if self.fn == "hardtanh":
            return F.hardtanh(h, -0.5, 0.5)
        raise AssertionError(self.fn)


FNS = ["relu", "relu_inplace", "relu_", "tanh", "sigmoid_method", "gelu", "silu", "leaky_relu", "hardtanh"]
TYPES = {
    "relu": "ReLU",
    "relu_inplace": "ReLU",
    "relu_": "ReLU",
    "tanh": "Tanh",
    "sigmoid_method": "Sigmoid",
    "gelu": "GELU",
    "silu": "SiLU",
    "leaky_relu": "LeakyReLU",
    "hardtanh": "Hardtanh",
}
SHORT = {"relu_inplace": "relu", "relu_": "relu", "sigmoid_method": "sigmoid"}


class Stack(nn.Module):
    """Blocks in a ModuleList, a ModuleDict of heads (one called twice), and a root-level functional."""

    def __init__(self, fns: list[str], width: int = 16, **block: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Act(8 if i == 0 else width, width, fn, **block) for i, fn in enumerate(fns)])
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 3), "b": nn.Linear(width, 3)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        a = self.heads["a"](x)
        a2 = self.heads["a"](x * 0.5)
        return torch.tanh(a + a2) + self.heads["b"](x)


def _capture(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[Any]]:
    """Plain forward hooks on the named modules: their outputs (copied before any later in-place op) and, through a
    tensor hook, the gradients of the loss with respect to them."""
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(mod: nn.Module, inp: Any, out: torch.Tensor, name: str = name) -> None:
            acts[name] = out.detach().clone()
            out.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().clone()))

        handles.append(modules[name].register_forward_hook(hook))
    return acts, grads, handles


def _one_step(model: nn.Module, x: torch.Tensor, **watch: Any) -> actdiag.StepRecord:
    with actdiag.watch(model, every=1, strict=True, **watch) as monitor:
        model(x).pow(2).mean().backward()
        monitor.step()
        record = monitor.latest
    assert record is not None
    return record


def _check_stats(stats: actdiag.TensorStats | None, ref: torch.Tensor) -> None:
    assert stats is not None
    v = ref.double().cpu().numpy().reshape(-1)
    assert stats.count == v.size
    np.testing.assert_allclose(stats.mean, v.mean(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(stats.std, v.std(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(stats.min, v.min(), rtol=0, atol=0)
    np.testing.assert_allclose(stats.max, v.max(), rtol=0, atol=0)
    np.testing.assert_allclose(stats.zero_fraction, (v == 0).mean(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("fn", FNS)
def test_functional_record_stats_match_float64_reference(fn: str) -> None:
    model = Stack([fn, "relu"])
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    acts, grads, handles = _capture(model, ["blocks.0", "blocks.1"])
    record = _one_step(model, x)
    for h in handles:
        h.remove()
    by_label = {layer.label: layer for layer in record.layers}
    name = f"blocks.0:{SHORT.get(fn, fn)}"
    layer = by_label[name]
    assert layer.type == TYPES[fn]
    _check_stats(layer.activation, acts["blocks.0"])
    _check_stats(layer.gradient, grads["blocks.0"])
    _check_stats(by_label["blocks.1:relu"].activation, acts["blocks.1"])
    _check_stats(by_label["blocks.1:relu"].gradient, grads["blocks.1"])
    v = acts["blocks.0"].double().numpy()
    if TYPES[fn] == "Tanh":
        assert layer.bounds == (-1.0, 1.0)
        assert layer.saturation == pytest.approx((np.abs(v) >= 1 - SATURATION_TOL).mean(), abs=1e-12)
    if TYPES[fn] == "Hardtanh":
        assert layer.bounds == (-0.5, 0.5)  # the call's own bounds
        assert layer.saturation == pytest.approx(((v <= -0.5) | (v >= 0.5)).mean(), abs=1e-12)
    if TYPES[fn] == "ReLU":
        assert layer.units == 16
        assert layer.dead_fraction == pytest.approx(((v > 0).sum(0) == 0).mean(), abs=1e-12)


def test_names_order_and_call_index_in_module_dict_and_list() -> None:
    model = Stack(["relu", "tanh", "gelu"])
    record = _one_step(model, torch.randn(32, 8))
    assert [layer.label for layer in record.layers] == [
        "blocks.0.fc",
        "blocks.0:relu",
        "blocks.1.fc",
        "blocks.1:tanh",
        "blocks.2.fc",
        "blocks.2:gelu",
        "heads.a",
        "heads.a#1",
        ":tanh",  # applied in the root module's own forward
        "heads.b",
    ]


class TwiceInOneForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(F.relu(x)))


def test_second_call_in_one_module_gets_the_next_call_index() -> None:
    model = TwiceInOneForward()
    x = torch.randn(16, 4)
    record = _one_step(model, x)
    assert [layer.label for layer in record.layers] == [":relu", "fc", ":relu#1"]
    first = record.layers[0]
    _check_stats(first.activation, torch.relu(x))


class ModuleActs(nn.Module):
    """Activation modules, whose own forwards call F.relu, torch.tanh, F.gelu, F.hardtanh (nn.ReLU6)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.GELU(), nn.ReLU6(), nn.Sigmoid(), nn.SiLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_activation_modules_are_not_counted_twice() -> None:
    record = _one_step(ModuleActs(), torch.randn(16, 4))
    assert [layer.name for layer in record.layers] == [f"net.{i}" for i in range(8)]


def test_switch_off_gives_no_functional_records() -> None:
    model = Stack(["relu", "tanh"])
    on = _one_step(model, torch.randn(16, 8))
    off = _one_step(model, torch.randn(16, 8), functional=False)
    assert any(":" in layer.name for layer in on.layers)
    assert not any(":" in layer.name for layer in off.layers)
    report = actdiag.inspect(model, torch.randn(16, 8), functional=False)
    assert not any(":" in layer.name for layer in report.layers)
    report = actdiag.inspect(model, torch.randn(16, 8))
    assert "blocks.1:tanh" in [layer.name for layer in report.layers]


def test_mode_and_hooks_only_while_a_recorded_step_runs() -> None:
    model = Stack(["relu"])
    seen: list[int] = []
    after: list[int] = []  # in the user's forward hook: the mode is left while forward hooks run
    model.blocks[0].fc.register_forward_pre_hook(lambda m, i: seen.append(torch._C._len_torch_function_stack()))
    model.blocks[0].fc.register_forward_hook(lambda m, i, o: after.append(torch._C._len_torch_function_stack()))
    with actdiag.watch(model, every=2, strict=True) as monitor:
        for _ in range(4):
            model(torch.randn(4, 8)).sum().backward()
            # After the forward: our pre-hook (torch's global one) present only on recorded steps.
            hooked = len(_global_forward_pre_hooks) + sum(len(m._forward_pre_hooks) for m in model.modules()) - 1
            seen.append(-1 - hooked)
            monitor.step()
    assert torch._C._len_torch_function_stack() == 0
    recorded_inside, recorded_after = seen[0], seen[1]
    assert recorded_inside == 1 and recorded_after < -1
    assert seen[2:4] == [0, -1]  # step 1 is not recorded: no mode, no pre-hook
    assert seen[4] == 1 and seen[6:8] == [0, -1]
    assert after == [0, 0, 0, 0]


def _train(model: nn.Module, steps: int, watch: dict[str, Any] | None) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(5)
    monitor = actdiag.watch(model, every=1, strict=True, **watch) if watch is not None else None
    if monitor is not None:
        monitor.start()
    try:
        for _ in range(steps):
            x = torch.randn(16, 8, generator=g)
            loss = F.dropout(model(x), 0.2).pow(2).mean()  # the user's RNG is drawn from: it must not move
            opt.zero_grad()
            loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step()
    finally:
        if monitor is not None:
            monitor.close()
    return model


@pytest.mark.parametrize("fns", [["relu_inplace", "tanh", "relu_"], ["gelu", "sigmoid_method", "hardtanh"]])
def test_training_is_bit_identical_with_functional_records(fns: list[str]) -> None:
    base = Stack(fns)
    plain = _train(copy.deepcopy(base), 6, None)
    watched = _train(copy.deepcopy(base), 6, {})
    off = _train(copy.deepcopy(base), 6, {"functional": False})
    for other in (watched, off):
        for (n, p), (_, q) in zip(plain.state_dict().items(), other.state_dict().items(), strict=True):
            assert torch.equal(p, q), n


def test_table_covers_every_spelling_of_the_common_activations() -> None:
    shorts: dict[str, set[Any]] = {}
    for fn, entry in FUNCTIONS.items():
        shorts.setdefault(entry.short, set()).add(fn)
    assert {F.relu, torch.relu, torch.Tensor.relu, torch.Tensor.relu_, F.relu_} <= shorts["relu"]
    assert {F.tanh, torch.tanh, torch.Tensor.tanh} <= shorts["tanh"]
    assert {F.sigmoid, torch.sigmoid, torch.Tensor.sigmoid} <= shorts["sigmoid"]
    assert {F.gelu} <= shorts["gelu"] and {F.silu} <= shorts["silu"] and {F.leaky_relu} <= shorts["leaky_relu"]


# ---------------------------------------------------------------------------------------------------- the probe


class Counting(TorchFunctionMode):
    """A bare mode counting the torch calls made under it (the reference for what actdiag's mode sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _count_mode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls that reach actdiag's mode: `counts[0]` goes up by one per call."""
    counts = [0]
    handler = functional._Mode.__torch_function__

    def counted(self: Any, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        counts[0] += 1
        return handler(self, func, types, args, kwargs)

    monkeypatch.setattr(functional._Mode, "__torch_function__", counted)
    return counts


def _per_step(
    model: nn.Module, x: torch.Tensor | list[torch.Tensor], steps: int, counts: list[int]
) -> tuple[list[int], list[actdiag.StepRecord]]:
    """Train `steps` steps watched at every=1 (input `x`, or `x[i]` on step i): the calls that reached the mode
    and the record, per step."""
    calls, records = [], []
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with actdiag.watch(model, every=1, strict=True) as monitor:
        for i in range(steps):
            counts[0] = 0
            opt.zero_grad()
            model(x[i] if isinstance(x, list) else x).pow(2).mean().backward()
            opt.step()
            monitor.step()
            calls.append(counts[0])
            assert monitor.latest is not None
            records.append(monitor.latest)
    return calls, records


def _labels(record: actdiag.StepRecord) -> list[str]:
    return [layer.label for layer in record.layers]


def test_functional_relu_is_recorded_on_every_recorded_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Stack(["relu", "relu_"])
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(6))
    with Counting() as bare:
        model(x)
    counts = _count_mode_calls(monkeypatch)
    acts, grads, handles = _capture(model, ["blocks.0", "blocks.1"])  # hold the last step's tensors
    calls, records = _per_step(model, x, 10, counts)
    for h in handles:
        h.remove()
    # Every step under the mode, which sees the model's own torch calls and none of the forward hooks' (actdiag's
    # or the capture's above).
    assert calls == [bare.calls] * 10
    for record in records:
        assert _labels(record)[:4] == ["blocks.0.fc", "blocks.0:relu", "blocks.1.fc", "blocks.1:relu"]
    last = {layer.label: layer for layer in records[-1].layers}
    for block in ("blocks.0", "blocks.1"):
        _check_stats(last[f"{block}:relu"].activation, acts[block])
        _check_stats(last[f"{block}:relu"].gradient, grads[block])


def test_model_without_functional_activations_runs_without_the_mode_between_probes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = ModuleActs()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))
    with Counting() as bare:
        model(x)
    assert bare.calls == 8  # one torch call per activation module and linear map
    counts = _count_mode_calls(monkeypatch)
    calls, records = _per_step(model, x, 40, counts)
    # The first recorded step probes and finds none; probes follow after 1, 2, 4, 8, 16 skipped recorded steps.
    probes = [0, 2, 5, 10, 19, 36]
    assert calls == [bare.calls if step in probes else 0 for step in range(40)]
    for record in records:
        assert _labels(record) == [f"net.{i}" for i in range(8)]


class Sometimes(nn.Module):
    """A functional tanh that only some inputs reach (data-dependent control flow): a wide batch goes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        return torch.tanh(h) if x.shape[0] > 8 else h


def test_data_dependent_functional_is_recorded_on_probes_and_every_step_after_one_finds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = Sometimes()
    g = torch.Generator().manual_seed(8)
    wide = [1, 2, 4, 6]  # the steps whose batch reaches the tanh
    xs = [torch.randn(16 if step in wide else 4, 4, generator=g) for step in range(8)]
    counts = _count_mode_calls(monkeypatch)
    calls, records = _per_step(model, xs, 8, counts)
    # Step 0 probes (finds none), step 1 runs without the mode and misses its tanh (the documented limit), step 2
    # probes and finds it: from then on every recorded step runs under the mode.
    under = [calls[step] > 0 for step in range(8)]
    assert under == [True, False, True, True, True, True, True, True]
    has_tanh = [":tanh" in _labels(record) for record in records]
    assert has_tanh == [False, False, True, False, True, False, True, False]


def test_probe_schedule_doubles_up_to_its_cap_and_stays_on_once_found() -> None:
    probe = FunctionalProbe(cap=4)
    on = [probe.wants(step) and probe.wants(step) for step in range(20)]  # asked twice a step: the same answer
    assert [step for step, yes in enumerate(on) if yes] == [0, 2, 5, 10, 15]
    assert probe.wants(20) and not probe.wants(21)
    probe.found = True  # what the tracker sets when it records a functional activation
    assert not probe.wants(21)  # a step keeps its answer
    assert all(probe.wants(step) for step in range(22, 30))
    with pytest.raises(ValueError, match="at least 1"):
        FunctionalProbe(cap=0)


# ---------------------------------------------------------------------------------------------------- diagnosis


def test_saturated_functional_tanh_is_reported() -> None:
    model = Stack(["relu", "tanh", "relu"], gain=1.0)
    with torch.no_grad():
        model.blocks[1].fc.weight.mul_(40.0)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(2))
    acts, _, handles = _capture(model, ["blocks.1"])
    on = _one_step(model, x)
    for h in handles:
        h.remove()
    share = (acts["blocks.1"].double().abs() >= 1 - SATURATION_TOL).double().mean().item()
    assert share >= 0.5  # the label, measured with a plain hook
    found = diagnose(on.layers, on.params)
    sat = [f for f in found if f.code == "saturation"]
    assert sat and sat[0].layer == "blocks.1:tanh"
    assert sat[0].evidence["saturation"] == pytest.approx(share, abs=1e-12)
    off = _one_step(model, x, functional=False)
    assert not [f for f in diagnose(off.layers, off.params) if f.code == "saturation"]  # the blind spot


def test_dead_functional_relu_is_reported_with_a_fix_that_names_its_module() -> None:
    model = Stack(["relu", "relu", "relu"])
    with torch.no_grad():
        model.blocks[1].fc.bias.fill_(-50.0)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(2))
    acts, _, handles = _capture(model, ["blocks.1"])
    report = actdiag.inspect(model, x)
    for h in handles:
        h.remove()
    assert torch.all(acts["blocks.1"] == 0)  # the label: every unit off for every sample (plain hook)
    dead = [f for f in report.findings if f.code == "dead_relu"]
    assert dead and dead[0].layer == "blocks.1:relu"
    assert dead[0].evidence["dead_fraction"] == 1.0
    codes = [fix.code for fix in dead[0].fixes]
    assert "leaky_relu" not in codes  # F.relu is code in a forward: no snippet can assign a module to it
    assert codes[0] == "he_init" and "model.blocks[1].fc.bias" in dead[0].fixes[0].snippet
    for fix in dead[0].fixes:
        if fix.code in ("he_init", "xavier_init", "batchnorm", "layernorm"):
            exec(fix.snippet, {"model": copy.deepcopy(model), "nn": nn, "torch": torch})  # it runs as pasted
    assert report.findings[0].code == "dead_relu"


def test_compiled_model_records_the_same_functional_stats() -> None:
    eager = Stack(["relu", "tanh"])
    compiled = torch.compile(copy.deepcopy(eager), backend="eager")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(4))
    compiled(x)  # compiled before the watch: recorded steps run it eagerly, with the mode
    a = _one_step(eager, x)
    b = _one_step(compiled, x)
    assert [layer.label for layer in a.layers] == [layer.label for layer in b.layers]
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.activation == lb.activation and la.gradient == lb.gradient, la.label
    assert torch._C._len_torch_function_stack() == 0


class Checkpointed(nn.Module):
    """A block with functional activations run under activation checkpointing (recomputed in backward)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reentrant = reentrant
        self.stem = nn.Linear(6, 8)
        self.block = Stack(["relu", "tanh"]).blocks
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def run(h: torch.Tensor) -> torch.Tensor:
            for b in self.block:
                h = b(h)
            return h

        h = self.stem(x)
        if self.reentrant is None:
            return self.head(run(h))
        h = torch.utils.checkpoint.checkpoint(run, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_functional_records_counted_once_with_their_gradient(reentrant: bool) -> None:
    plain = Checkpointed(None)
    ckpt = copy.deepcopy(plain)
    ckpt.reentrant = reentrant
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    want, got = _one_step(plain, x), _one_step(ckpt, x)
    assert [layer.label for layer in got.layers] == [layer.label for layer in want.layers]
    assert "block.1:tanh" in [layer.label for layer in got.layers]
    for a, b in zip(got.layers, want.layers, strict=True):
        assert a.activation is not None and b.activation is not None
        assert a.activation.mean == pytest.approx(b.activation.mean, rel=1e-6, abs=1e-9), a.label
        assert a.gradient is not None and b.gradient is not None, a.label
        assert a.gradient.std == pytest.approx(b.gradient.std, rel=1e-6), a.label


def test_relu_inside_a_training_transformer_layer_is_recorded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0))
    acts, grads, handles = _capture(model, ["1.linear1"])
    record = _one_step(model, torch.randn(4, 5, 8))
    for h in handles:
        h.remove()
    relu = [layer for layer in record.layers if layer.name == "1:relu"]  # F.relu, the layer's default activation
    assert len(relu) == 1
    _check_stats(relu[0].activation, torch.relu(acts["1.linear1"]))


@pytest.mark.gpu
def test_functional_records_on_cuda_match_the_float64_reference() -> None:
    model = Stack(["relu_inplace", "tanh", "sigmoid_method"]).cuda()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)).cuda()
    acts, grads, handles = _capture(model, ["blocks.0", "blocks.1", "blocks.2"])
    record = _one_step(model, x)
    for h in handles:
        h.remove()
    by_label = {layer.label: layer for layer in record.layers}
    for block, short in (("blocks.0", "relu"), ("blocks.1", "tanh"), ("blocks.2", "sigmoid")):
        _check_stats(by_label[f"{block}:{short}"].activation, acts[block])
        _check_stats(by_label[f"{block}:{short}"].gradient, grads[block])
    assert [layer.label for layer in record.layers if layer.output] == ["heads.a", "heads.a#1", ":tanh", "heads.b"]


# ---------------------------------------------------------------------------------------------------- global hooks


def test_modules_of_another_model_called_in_a_recorded_step_are_not_recorded() -> None:
    """The recorded step's hooks are torch's global ones: another model's modules (with their own F.relu) called
    before, after and between the watched model's calls pass through them and are neither recorded nor counted."""
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    alone = _one_step(Stack(["relu", "tanh"]), x)
    model, other = Stack(["relu", "tanh"]), Stack(["relu", "gelu"])
    with actdiag.watch(model, every=1, strict=True) as monitor:
        other(x)
        loss = model(x).pow(2).mean() + other(x).sum() * 0
        loss.backward()
        monitor.step()
        record = monitor.latest
    assert record is not None
    assert [layer.label for layer in record.layers] == [layer.label for layer in alone.layers]
    for got, want in zip(record.layers, alone.layers, strict=True):
        assert got.activation == want.activation and got.gradient == want.gradient, got.label
    assert not _global_forward_hooks and not _global_forward_pre_hooks


def test_user_forward_hook_that_replaces_an_output_runs_after_ours() -> None:
    """Ours run before the module's own hooks: the module's own output is measured, the parent computes with the
    user's replacement, and the user's hook runs without the mode."""
    model = Stack(["relu"])
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(6))
    fc = model.blocks[0].fc
    with torch.no_grad():
        own = F.linear(x, fc.weight, fc.bias)
    modes: list[int] = []

    def double(m: nn.Module, i: Any, out: torch.Tensor) -> torch.Tensor:
        modes.append(torch._C._len_torch_function_stack())
        return F.relu(out) * 2  # a torch call of the user's hook: not the model's, not recorded

    handle = fc.register_forward_hook(double)
    try:
        record = _one_step(model, x)
    finally:
        handle.remove()
    layers = {layer.name: layer for layer in record.layers}
    _check_stats(layers["blocks.0.fc"].activation, own)
    _check_stats(layers["blocks.0:relu"].activation, F.relu(F.relu(own) * 2))
    assert "blocks.0.fc:relu" not in layers and modes == [0]
    assert not fc._forward_hooks and not _global_forward_hooks  # our last hook on fc is removed with the rest


def test_compile_warning_about_global_hooks_silenced_only_while_a_step_is_recorded() -> None:
    compiled = torch.compile(Stack(["relu"]), backend="eager")
    x = torch.randn(4, 8)
    compiled(x)
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with actdiag.watch(compiled, every=1, strict=True) as monitor:
            compiled(x).sum().backward()
            monitor.step()
        assert not [w for w in caught if "global hooks" in str(w.message)]
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            compiled(x)  # someone else's global hook: torch's warning is theirs to see
        finally:
            handle.remove()
        assert [w for w in caught if "global hooks" in str(w.message)]
    assert warnings.filters == before


def test_forward_that_raises_in_a_recorded_step_leaves_no_mode_and_no_hooks() -> None:
    model = Stack(["relu", "tanh"])
    x = torch.randn(4, 8)
    fail = {"on": True}

    def boom(m: nn.Module, i: Any) -> None:
        if fail["on"]:
            raise ZeroDivisionError

    model.blocks[1].fc.register_forward_pre_hook(boom)
    with actdiag.watch(model, every=1, strict=True) as monitor:
        with pytest.raises(ZeroDivisionError):
            model(x)
        assert torch._C._len_torch_function_stack() == 0  # the mode entered for the forward was left
        fail["on"] = False
        monitor.step()
        model(x).pow(2).mean().backward()
        monitor.step()
        record = monitor.latest
    assert record is not None and "blocks.1:tanh" in {layer.name for layer in record.layers}
    assert torch._C._len_torch_function_stack() == 0
    assert not _global_forward_hooks and not _global_forward_pre_hooks
