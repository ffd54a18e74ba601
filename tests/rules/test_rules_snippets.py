"""Every fix snippet runs as pasted: for every model of the test zoo (and a few whose layers sit in ModuleDicts), each
finding's snippets are executed against a copy of that model, and each is checked to have done what it says (the
weights re-initialised with the named scheme, the norms inserted, the activations swapped, the learning rate
changed, ...), measured here in plain torch."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import actdiag
from actdiag.fixes import CATALOGUE, REMEDIES, attach_fixes
from actdiag.records import Finding, Fix
from tests.training_zoo import CASES, Case
from tests.zoo import HEALTHY, PATHOLOGIES, example

BOUNDED = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Softsign)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


# --------------------------------------------------------------------------------------- models in ModuleDicts
class DictDeadReluNet(nn.Module):
    """A dead ReLU (bias -10 before it) inside an nn.ModuleDict with digit keys: `blocks.0.1` is reached as
    `model.blocks["0"][1]`, never `model.blocks[0][1]` (a KeyError)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(
            {
                "0": nn.Sequential(nn.Linear(16, 32), nn.ReLU()),
                "1": nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
            }
        )
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.blocks["1"][0].bias.fill_(-10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return self.head(x)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(32, 16, generator=torch.Generator().manual_seed(0))


class DictCollapsingTanhNet(nn.Module):
    """Six tanh layers with weights N(0, (0.64 / sqrt(64))^2) in a ModuleDict with digit keys, over sequences
    (activation_collapse): the init and norm snippets name `model.layers["3"]`, and the norm is a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(64, 64) for i in range(6)})
        self.acts = nn.ModuleList([nn.Tanh() for _ in range(6)])
        with torch.no_grad():
            for lin in self.layers.values():
                lin.weight.normal_(0.0, 0.64 / 8.0, generator=torch.Generator().manual_seed(len(lin.weight)))
                lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, act in zip(self.layers.values(), self.acts):
            x = act(lin(x))
        return x

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(4, 12, 64, generator=torch.Generator().manual_seed(0))


EXTRA: dict[type[nn.Module], str] = {DictDeadReluNet: "dead_relu", DictCollapsingTanhNet: "activation_collapse"}
ZOO = [*PATHOLOGIES, *HEALTHY, *EXTRA]


# ------------------------------------------------------------------------------------------------- running one
def _first(x: object) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]  # type: ignore[index,return-value]


def _criterion(out: object, y: torch.Tensor) -> torch.Tensor:
    return (_first(out).float() - y).pow(2).mean()


def _scope(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """What a training loop around the pasted snippet holds: the model, its optimizer, a batch, a loss."""
    y = torch.zeros_like(_first(model(x)), dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return {
        "model": model,
        "torch": torch,
        "nn": nn,
        "x": x,
        "y": y,
        "criterion": _criterion,
        "optimizer": optimizer,
        "loss": _criterion(model(x), y),
    }


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _count(model: nn.Module, kinds: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


def _number(text: str, pattern: str) -> int:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in {text!r}"
    return int(m.group(1))


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad.detach().double().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


# What each fix must have done, measured on the model (and the loop's names) before and after the snippet ran.
Check = Callable[[Fix, nn.Module, dict[str, Any], dict[str, Any]], None]


def _check_init(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    n = _number(fix.text, r"Re-initialise (\d+) layer")
    was, now = old["weights"], _weights(scope["model"])
    changed = [name for name, w in now.items() if not torch.equal(w, was[name])]
    assert len(changed) == n, (changed, n)
    # Re-drawn with the named scheme: He keeps std * sqrt(fan_in) at sqrt(2) (ReLU) or ~sqrt(2) (leaky), Xavier
    # std * sqrt((fan_in + fan_out) / 2) at the gain (1 or tanh's 5/3).
    for name in changed:
        w = now[name].double()
        fan_out, fan_in = w.shape[0], w[0].numel()
        if fix.code == "he_init":
            got, want = float(w.std()) * math.sqrt(fan_in), math.sqrt(2.0)
        else:
            got = float(w.std()) * math.sqrt((fan_in + fan_out) / 2)
            want = 5.0 / 3.0 if "tanh" in fix.snippet else 1.0
        assert got == pytest.approx(want, rel=0.25 if w.numel() >= 256 else 0.6), name


def _check_norm(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    n = _number(fix.text, r"Normalise the output of (\d+) layer")
    assert _count(scope["model"], NORMS) - old["norms"] == n
    _first(scope["model"](scope["x"]))  # still runs


def _check_leaky(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    assert _count(scope["model"], nn.LeakyReLU) > old["leaky"]
    _first(scope["model"](scope["x"]))


def _check_relu(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    assert _count(scope["model"], BOUNDED) < old["bounded"]
    assert _count(scope["model"], nn.ReLU) > old["relu"]
    _first(scope["model"](scope["x"]))


def _lr_times(factor: float) -> Check:
    def check(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
        assert [g["lr"] for g in scope["optimizer"].param_groups] == pytest.approx([0.1 * factor])

    return check


def _check_clipping(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    grad = _grad_norm(scope["model"])
    assert 0 < grad <= 1.0 + 1e-4 or not math.isfinite(grad)


def _check_residual(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    t = torch.randn(3, 4)
    assert torch.equal(scope["Residual"](nn.Identity())(t), 2 * t)


def _check_backward_ran(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    assert any(p.grad is not None for p in scope["model"].parameters())


def _check_switch(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    assert isinstance(scope["optimizer"], torch.optim.Adam)


def _check_inputs(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    assert torch.is_anomaly_enabled()


def _check_master(fix: Fix, before: nn.Module, scope: dict[str, Any], old: dict[str, Any]) -> None:
    assert {p.dtype for p in scope["model"].parameters()} == {torch.float32}
    assert all(p.dtype == torch.float32 for g in scope["optimizer"].param_groups for p in g["params"])
    # the weights moved: the step ran on the float32 weights
    now = scope["model"].state_dict()
    assert any(not torch.equal(v.float(), now[k]) for k, v in before.state_dict().items() if v.is_floating_point())


CHECKS: dict[str, Check] = {
    "he_init": _check_init,
    "xavier_init": _check_init,
    "batchnorm": _check_norm,
    "layernorm": _check_norm,
    "leaky_relu": _check_leaky,
    "relu_activation": _check_relu,
    "lower_learning_rate": _lr_times(0.1),
    "raise_learning_rate": _lr_times(10.0),
    "gradient_clipping": _check_clipping,
    "residual_connections": _check_residual,
    "bf16_autocast": _check_backward_ran,
    "loss_scaling": _check_backward_ran,
    "switch_optimizer": _check_switch,
    "check_inputs": _check_inputs,
    "fp32_master_weights": _check_master,
}


def run_fix(model: nn.Module, x: torch.Tensor, fix: Fix) -> None:
    """Paste `fix.snippet` into a loop around a copy of `model` and check it did what it says."""
    assert fix.code in CHECKS, f"no check for what {fix.code} does: add one"
    assert '"cuda"' not in fix.snippet or next(model.parameters()).is_cuda, fix.snippet
    before = copy.deepcopy(model)
    target = copy.deepcopy(model)
    torch.manual_seed(0)
    scope = _scope(target, x)
    old = {
        "weights": _weights(target),
        "norms": _count(target, NORMS),
        "leaky": _count(target, nn.LeakyReLU),
        "bounded": _count(target, BOUNDED),
        "relu": _count(target, nn.ReLU),
    }
    try:
        try:
            exec(fix.snippet, scope)  # noqa: S102 - the point is that it runs as pasted
        except Exception as exc:  # noqa: BLE001 - say which snippet failed, and how
            pytest.fail(f"{fix.code} snippet raised {type(exc).__name__}: {exc}\n{fix.snippet}")
        CHECKS[fix.code](fix, before, scope, old)
    finally:
        torch.autograd.set_detect_anomaly(False)  # check_inputs turns it on, as it tells the user to


@pytest.mark.parametrize("cls", ZOO, ids=lambda c: c.__name__)
def test_every_snippet_of_every_zoo_model_runs_and_does_what_it_says(cls: type[nn.Module]) -> None:
    model = cls()
    x = example(model)
    report = actdiag.inspect(model, x)
    want = PATHOLOGIES.get(cls) or EXTRA.get(cls)
    if want is not None:
        assert want in [f.code for f in report.findings]
    assert isinstance(x, torch.Tensor) or not report.findings  # the loop's `x` is one tensor
    for finding in report.findings:
        assert finding.fixes, finding.code
        for fix in finding.fixes:
            run_fix(model, x, fix)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_snippet_of_every_training_zoo_run_runs_and_does_what_it_says(case: Case) -> None:
    """The training zoo's runs, watched as their labels say, then each finding's snippets pasted into a loop around
    a copy of the trained model (a batch of the run's own data, in the model's dtype)."""
    run = case.make()
    with actdiag.watch(run.model, every=case.every) as monitor:
        run.train(monitor.step)
    findings = monitor.findings
    data = getattr(run, "data", None)
    assert data or not findings, "a run with findings needs a batch to paste its snippets against"
    if not findings:
        return
    x = data[0][0]
    dtype = next(run.model.parameters()).dtype
    x = x.to(dtype) if x.is_floating_point() else x
    for finding in findings:
        for fix in finding.fixes:
            run_fix(run.model, x, fix)


def test_snippets_for_digit_keys_of_a_module_dict_index_them_as_strings() -> None:
    model = DictDeadReluNet()
    (f,) = [f for f in actdiag.inspect(model, example(model)).findings if f.code == "dead_relu"]
    by_code = {x.code: x.snippet for x in f.fixes}
    assert 'model.blocks["1"][1] = nn.LeakyReLU(0.01)' in by_code["leaky_relu"]
    assert 'model.blocks["1"][0].weight' in by_code["he_init"]


# ------------------------------------------------------------------------- every catalogue entry, every branch
def _findings(layer: str) -> list[tuple[Finding, torch.dtype]]:
    """One finding per branch of REMEDIES that the zoo's one-shot runs do not reach (training-time and precision
    findings), with the dtype its model is kept in."""

    def f(code: str, **evidence: float) -> Finding:
        return Finding(code=code, severity="warning", layer=layer, message="m", evidence=evidence)

    return [
        (f("nonfinite", float16=1.0, gradient=1.0), torch.float32),
        (f("nonfinite", float16=1.0, gradient=1.0), torch.float16),
        (f("nonfinite"), torch.float32),
        (f("fp16_overflow", gradient=1.0), torch.float32),
        (f("fp16_underflow", gradient=1.0, flushed=1.0), torch.float32),
        (f("fp16_underflow", gradient=1.0), torch.float16),
        (f("large_updates", update_ratio=0.5), torch.float32),
        (f("stalled_updates", effective_step_decay=0.01), torch.float32),
        (f("lost_updates", bfloat16=1.0), torch.bfloat16),
        (f("lost_updates", float16=1.0), torch.float16),
    ]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_every_catalogue_entry_is_reached_and_its_snippet_runs() -> None:
    base = _mlp()
    layers = actdiag.inspect(base, torch.randn(8, 16)).layers
    seen: set[str] = set()
    for cls in ZOO:
        model = cls()
        seen |= {x.code for f in actdiag.inspect(model, example(model)).findings for x in f.fixes}
    for finding, dtype in _findings("0"):
        model = _mlp().to(dtype)
        (got,) = attach_fixes([finding], layers, model=model)
        assert got.fixes, finding.code
        for fix in got.fixes:
            run_fix(model, torch.randn(8, 16).to(dtype), fix)
            seen.add(fix.code)
    assert seen == set(CATALOGUE)
    assert {f.code for f, _ in _findings("0")} | {*PATHOLOGIES.values()} >= set(REMEDIES) - {"activation_explosion"}


def test_mixed_precision_snippets_take_the_device_from_the_batch() -> None:
    """No CUDA-only snippet on a CPU: autocast and GradScaler are told the batch's device type (the snippets ran on
    the CPU above)."""
    finding = Finding(code="fp16_underflow", severity="warning", layer="0", message="m", evidence={"gradient": 1.0})
    layers = actdiag.inspect(_mlp(), torch.randn(8, 16)).layers
    (got,) = attach_fixes([finding], layers, model=_mlp())
    assert [x.code for x in got.fixes] == ["loss_scaling", "bf16_autocast"]
    assert all('"cuda"' not in x.snippet for x in got.fixes)
    assert "torch.amp.GradScaler(x.device.type)" in got.fixes[0].snippet
    assert all("torch.autocast(device_type=x.device.type" in x.snippet for x in got.fixes)


def test_loss_scaling_on_a_float16_model_first_gives_it_float32_weights() -> None:
    """GradScaler refuses to unscale float16 gradients: the snippet for a model kept in float16 starts with
    float32 weights (and runs, above)."""
    finding = Finding(code="fp16_underflow", severity="warning", layer="0", message="m", evidence={"gradient": 1.0})
    layers = actdiag.inspect(_mlp(), torch.randn(8, 16)).layers
    (half,) = attach_fixes([finding], layers, model=_mlp().half())
    assert half.fixes[0].snippet.startswith("model.float()")
    (full,) = attach_fixes([finding], layers, model=_mlp())
    assert "model.float()" not in full.fixes[0].snippet


def test_a_functional_activation_is_not_swapped_as_if_it_were_a_module() -> None:
    """Records of functional activations are named "<module>:<function>": no snippet may set or get them as
    submodules (the weight layer feeding them is still re-initialised or normalised)."""
    from tests.rules.factory import bounded, linear

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(100, 100)

    layers = [linear("fc", 1.0), bounded("fc:tanh", 0.5)]
    finding = Finding(code="saturation", severity="warning", layer="fc:tanh", message="m")
    (got,) = attach_fixes([finding], layers, model=Net())
    assert got.fixes and "relu_activation" not in [x.code for x in got.fixes]
    assert all("fc:tanh" not in x.snippet for x in got.fixes)
