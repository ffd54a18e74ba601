"""The output layer is found from the forward's output tensors and their autograd graph, not from list position:
every call of a head applied several times is the head, and a confident classifier's sigmoid output is no
saturation. Saturation is proven in each test by a plain forward hook, not by actdiag."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actdiag
from actdiag.hooks.modules import SATURATION_TOL
from actdiag.records import LayerStats
from actdiag.reports.json import layer_from_dict, layer_to_dict
from actdiag.rules import diagnose
from actdiag.rules._common import output_indices

THRESHOLD = actdiag.Thresholds().saturation_fraction_at_least


def _record(model: nn.Module, x: torch.Tensor, loss: Any = None, **watch: Any) -> actdiag.StepRecord:
    with actdiag.watch(model, every=1, strict=True, **watch) as monitor:
        out = model(x)
        (loss(out) if loss is not None else _first(out).float().pow(2).mean()).backward()
        monitor.step()
        record = monitor.latest
    assert record is not None
    return record


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"]


def _saturated_share(model: nn.Module, name: str, x: torch.Tensor) -> list[float]:
    """The share of each call's outputs within SATURATION_TOL of 0 or 1 (sigmoid) / -1 or 1 (tanh): plain hooks."""
    shares: list[float] = []

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        v = out.detach().double()
        lo = -1.0 if isinstance(mod, nn.Tanh) else 0.0
        shares.append(((v <= lo + SATURATION_TOL) | (v >= 1 - SATURATION_TOL)).double().mean().item())

    h = dict(model.named_modules())[name].register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    h.remove()
    return shares


class MultiStep(nn.Module):
    """A sigmoid head (Linear + Sigmoid) applied to each of three time steps; a saturated hidden tanh before it."""

    def __init__(self, hidden_gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(6, 16)
        self.act = nn.Tanh()
        self.head = nn.Sequential(nn.Linear(16, 4), nn.Sigmoid())
        with torch.no_grad():
            self.enc.weight.mul_(hidden_gain)
            self.head[0].weight.mul_(60.0)  # a confident head: its sigmoid sits at 0 or 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.enc(x))  # (batch, time, 16)
        return torch.stack([self.head(h[:, t]) for t in range(h.shape[1])], dim=1)


def test_every_call_of_a_multi_call_head_is_the_output_layer() -> None:
    model = MultiStep()
    x = torch.randn(64, 3, 6, generator=torch.Generator().manual_seed(1))
    shares = _saturated_share(model, "head.1", x)
    assert len(shares) == 3 and min(shares) >= THRESHOLD  # every call of the head saturates (plain hook)
    record = _record(model, x)
    flagged = [layer.label for layer in record.layers if layer.output]
    assert flagged == ["head.0", "head.1", "head.0#1", "head.1#1", "head.0#2", "head.1#2"]
    assert not [f for f in diagnose(record.layers, record.params) if f.code == "saturation"]
    # By list position only the last call would be exempt: the first two would be reported.
    unflagged = [_unflag(layer) for layer in record.layers]
    assert [f.layer for f in diagnose(unflagged, record.params) if f.code == "saturation"] == ["head.1"]


def test_a_saturated_hidden_layer_is_still_reported_beside_the_exempt_head() -> None:
    model = MultiStep(hidden_gain=30.0)
    x = torch.randn(64, 3, 6, generator=torch.Generator().manual_seed(1))
    assert _saturated_share(model, "act", x)[0] >= THRESHOLD
    record = _record(model, x)
    found = [f for f in diagnose(record.layers, record.params) if f.code == "saturation"]
    assert len(found) == 1 and found[0].layer == "act"
    assert not any(name.startswith("head") for name in found[0].related)


class Classifier(nn.Module):
    """A logistic classifier whose final op is a functional sigmoid (then a squeeze: the output is a view)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.body(x))).squeeze(-1)


def test_a_converged_classifiers_sigmoid_output_is_not_saturation() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).float()
    x = x + 1.5 * (2 * y[:, None] - 1)  # separable with a margin: training drives the outputs to 0 and 1
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with actdiag.watch(model, every=50, strict=True) as monitor:
        for _ in range(301):
            loss = F.binary_cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step()
        report = monitor.report()
    with torch.no_grad():
        p = model(x).double()
    share = ((p <= SATURATION_TOL) | (p >= 1 - SATURATION_TOL)).double().mean().item()
    assert share >= THRESHOLD and loss.item() < 0.05  # converged and saturated (measured directly)
    sig = [layer for layer in report.layers if layer.name == ":sigmoid"]
    assert len(sig) == 1 and sig[0].output and sig[0].saturation == pytest.approx(share, abs=1e-6)
    assert [layer.name for layer in report.layers if layer.output] == ["fc", ":sigmoid"]
    assert not [f for f in report.findings if f.code == "saturation"]


class DictOut(nn.Module):
    """HF-style output: a dict with the loss computed inside forward, the logits, and nested hidden states."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 8)
        self.l2 = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h1 = torch.tanh(self.l1(x))
        h2 = torch.tanh(self.l2(h1))
        logits = self.lm_head(h2)
        loss = F.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long))
        return {"loss": loss, "logits": logits, "hidden_states": (h1, h2)}


def test_dict_output_marks_the_head_not_the_nested_hidden_states() -> None:
    record = _record(DictOut(), torch.randn(16, 4), loss=lambda out: out["loss"])
    assert [layer.label for layer in record.layers if layer.output] == ["lm_head"]


def test_no_grad_forward_finds_the_head_by_identity() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Sigmoid())
    with actdiag.watch(model, every=1, strict=True) as monitor, torch.no_grad():
        model(torch.randn(8, 4))
        monitor.step()
        record = monitor.latest
    assert record is not None
    assert [layer.name for layer in record.layers if layer.output] == ["3"]


def test_output_flag_survives_json_and_falls_back_to_the_last_layer() -> None:
    layer = LayerStats(name="head", type="Linear", step=0, output=True)
    d = json.loads(json.dumps(layer_to_dict(layer)))
    assert d["output"] is True and layer_from_dict(d, 0).output
    assert "output" not in layer_to_dict(_unflag(layer))
    plain = [LayerStats(name=n, type="Linear", step=0) for n in "abc"]
    assert output_indices(plain) == {2}
    flagged = [plain[0], _flag(plain[1]), plain[2]]
    assert output_indices(flagged) == {1}


def _unflag(layer: LayerStats) -> LayerStats:
    from dataclasses import replace

    return replace(layer, output=False)


def _flag(layer: LayerStats) -> LayerStats:
    from dataclasses import replace

    return replace(layer, output=True)


class DeepSupervision(nn.Module):
    """Eight linear layers initialised N(0, 0.01^2) (the signal shrinks layer after layer) and one head applied to
    the output of every layer (deep supervision): the head's calls sit between the layers in execution order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(100, 100) for _ in range(8)])
        self.head = nn.Linear(100, 10)
        for layer in self.layers:
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for layer in self.layers:
            x = F.relu(layer(x))
            outs.append(self.head(x))
        return torch.stack(outs).sum(0)


def test_every_call_of_a_deep_supervision_head_is_left_out_of_the_collapse_chain() -> None:
    model = DeepSupervision()
    x = torch.randn(256, 100, generator=torch.Generator().manual_seed(3))
    stds: list[float] = []
    handles = [
        layer.register_forward_hook(lambda m, i, o: stds.append(o.detach().double().std(unbiased=False).item()))
        for layer in model.layers
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    steps = [b / a for a, b in zip(stds, stds[1:])]
    assert max(steps) < 0.8 and stds[-1] / stds[0] < 0.2  # the label: the spread collapses (plain hooks)
    record = _record(model, x)
    assert [layer.label for layer in record.layers if layer.output] == ["head"] + [f"head#{k}" for k in range(1, 8)]
    found = [f for f in diagnose(record.layers, record.params) if f.code == "activation_collapse"]
    assert len(found) == 1 and found[0].layer == "layers.7"
    assert found[0].evidence["layers"] == 8.0
    # By list position the head's calls would break the chain after every layer: no collapse would be seen.
    unflagged = [_unflag(layer) for layer in record.layers]
    assert not [f for f in diagnose(unflagged, record.params) if f.code == "activation_collapse"]
