"""Fix suggestions: snippets that name the user's layers and run as pasted; verification on a copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import actdiag
from actdiag.fixes import CATALOGUE, FIX_CODES, attach_fixes, module_assign, module_expr, verify_fixes
from actdiag.records import Finding, Fix, Report
from actdiag.rules import diagnose
from tests.zoo import CollapsingTanhNet, DeadReluNet, DeepXavierReluNet, SaturatedTanhNet, example

CONTRACT_FIX_CODES = {
    "xavier_init",
    "he_init",
    "batchnorm",
    "layernorm",
    "leaky_relu",
    "relu_activation",
    "lower_learning_rate",
    "gradient_clipping",
    "residual_connections",
    "bf16_autocast",
    "loss_scaling",
    "check_inputs",
}


class _Containers(nn.Module):
    """Every way a child is reached: attribute, Sequential/ModuleList position, ModuleDict key (digits and others)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
        self.layer1 = nn.ModuleList([nn.Sequential()])
        self.layer1[0].add_module("conv1", nn.Conv2d(1, 1, 1))
        self.blocks = nn.ModuleDict({"0": nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "my-key": nn.Module()})
        self.blocks["my-key"].add_module("proj", nn.Linear(4, 4))
        self.fc = nn.Linear(4, 4)


@pytest.mark.parametrize(
    ("name", "expr"),
    [
        ("features.3", "model.features[3]"),
        ("layer1.0.conv1", "model.layer1[0].conv1"),
        ("fc", "model.fc"),
        ("blocks.0.1", 'model.blocks["0"][1]'),
        ("blocks.my-key.proj", 'model.blocks["my-key"].proj'),
        ("", "model"),
    ],
)
def test_module_expr_indexes_as_each_container_does(name: str, expr: str) -> None:
    model = _Containers()
    assert module_expr(name, model=model) == expr
    assert eval(expr, {"model": model}) is model.get_submodule(name)  # noqa: S307 - the expression is the test


@pytest.mark.parametrize(
    ("name", "expr"),
    [
        ("fc", "model.fc"),
        ("encoder.proj", "model.encoder.proj"),
        ("blocks.0.1", 'model.get_submodule("blocks.0.1")'),  # a ModuleDict key or a position: unknown here
        ("blocks.my-key.proj", 'model.get_submodule("blocks.my-key.proj")'),
    ],
)
def test_module_expr_without_the_model_says_only_what_is_certain(name: str, expr: str) -> None:
    assert module_expr(name) == expr


@pytest.mark.parametrize("name", ["features.3", "layer1.0.conv1", "fc", "blocks.0.1", "blocks.my-key.proj"])
@pytest.mark.parametrize("known", [True, False])
def test_module_assign_replaces_the_child_in_every_container(name: str, known: bool) -> None:
    model = _Containers()
    statement = module_assign(name, "nn.Identity()", model if known else None)
    exec(statement, {"model": model, "nn": nn})  # noqa: S102
    assert isinstance(model.get_submodule(name), nn.Identity)


def test_every_contract_fix_code_is_known() -> None:
    assert set(FIX_CODES) >= CONTRACT_FIX_CODES


def test_catalogue_entries_have_text_and_a_snippet_and_say_whether_they_are_verifiable() -> None:
    assert set(CATALOGUE) == set(FIX_CODES)
    assert all(entry.text and entry.snippet for entry in CATALOGUE.values())
    # What --try-fixes can apply to a copy of the model: the fixes that change the model itself.
    assert {code for code, entry in CATALOGUE.items() if entry.verifiable} == {
        "xavier_init",
        "he_init",
        "batchnorm",
        "layernorm",
        "leaky_relu",
        "relu_activation",
    }


def test_the_rules_suggest_nothing_and_fixes_are_attached_after() -> None:
    model = CollapsingTanhNet()
    report = findings_of(model)
    bare = diagnose(report.layers, report.params)
    assert [f.code for f in bare] == [f.code for f in report.findings]
    assert all(f.fixes == () for f in bare)
    assert attach_fixes(bare, report.layers, model=model) == report.findings


def test_attach_fixes_keeps_the_order_and_the_findings() -> None:
    a = Finding(code="large_updates", severity="warning", layer=None, message="a", evidence={"update_ratio": 0.5})
    b = Finding(code="unknown_code", severity="info", layer="fc", message="b")
    got = attach_fixes([b, a], ())
    assert [f.message for f in got] == ["b", "a"]
    assert got[0].fixes == () and got[1].fixes


def test_verify_fixes_re_runs_through_the_function_it_is_given() -> None:
    model = CollapsingTanhNet()
    x = example(model)
    report = findings_of(model)
    patched: list[nn.Module] = []

    def rerun(copy_of_model: nn.Module) -> Report:
        patched.append(copy_of_model)
        return actdiag.inspect(copy_of_model, x)

    verify_fixes(model, report, rerun)
    assert patched and all(p is not model for p in patched)


def findings_of(model: nn.Module, **kw: object) -> Report:
    return actdiag.inspect(model, example(model), **kw)  # type: ignore[arg-type]


def run_snippet(model: nn.Module, snippet: str) -> None:
    exec(snippet, {"model": model, "torch": torch, "nn": nn})  # noqa: S102 - the point is that it runs as pasted


@pytest.mark.parametrize(
    ("cls", "code", "fix"),
    [
        (CollapsingTanhNet, "activation_collapse", "xavier_init"),
        (CollapsingTanhNet, "activation_collapse", "batchnorm"),
        (DeepXavierReluNet, "activation_collapse", "he_init"),
        (DeepXavierReluNet, "activation_collapse", "batchnorm"),  # the looped form, via set_submodule
        (SaturatedTanhNet, "saturation", "xavier_init"),
        (DeadReluNet, "dead_relu", "leaky_relu"),
        (DeadReluNet, "dead_relu", "he_init"),
    ],
)
def test_snippet_pasted_into_the_users_model_cures_it(cls: type[nn.Module], code: str, fix: str) -> None:
    model = cls()
    report = findings_of(model)
    (finding,) = [f for f in report.findings if f.code == code]
    (chosen,) = [x for x in finding.fixes if x.code == fix]
    torch.manual_seed(0)
    run_snippet(model, chosen.snippet)
    after = findings_of(model)
    assert code not in [f.code for f in after.findings]


def test_try_fixes_verifies_the_suggested_init_with_before_after_evidence() -> None:
    model = DeepXavierReluNet()
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    report = findings_of(model, try_fixes=True)
    (f,) = [x for x in report.findings if x.code == "activation_collapse"]
    he = f.fixes[0]
    assert (he.code, he.verified) == ("he_init", True)
    assert he.before["last_std"] == pytest.approx(f.evidence["last_std"])
    assert he.after["last_std"] > 100 * he.before["last_std"]
    assert he.after["findings"] == 0.0
    assert "goes" in he.text and "->" in he.text
    # the user's model and RNG are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_try_fixes_leaves_non_model_fixes_unverified() -> None:
    report = findings_of(DeadReluNet(), try_fixes=True)
    (f,) = report.findings
    by_code = {x.code: x for x in f.fixes}
    assert by_code["leaky_relu"].verified is True
    assert by_code["he_init"].verified is True  # re-init also zeroes the -10 bias that kept the units off
    assert all(x.verified is None for x in f.fixes if x.code not in ("leaky_relu", "he_init", "batchnorm"))


class Halve(nn.Module):
    """Multiplies by 0.5: a weightless module that shrinks the signal whatever the weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


class HalvingNet(nn.Sequential):
    """Eight Linear layers with He init separated by Halve: the collapse is not the initialisation's fault."""

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        for _ in range(8):
            lin = nn.Linear(64, 64)
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            layers += [lin, Halve()]
        super().__init__(*layers)

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, 64, generator=torch.Generator().manual_seed(0))


def test_a_fix_that_does_not_cure_is_marked_false() -> None:
    report = findings_of(HalvingNet(), try_fixes=True)
    (f,) = report.findings
    assert f.code == "activation_collapse"
    init = f.fixes[0]
    assert init.code == "xavier_init"
    assert init.verified is False
    assert init.after["findings"] == 1.0
    assert "remains" in init.text
    norm = [x for x in f.fixes if x.code == "batchnorm"][0]
    assert norm.verified is True  # normalising after each Linear does undo the halving


def test_verify_fixes_keeps_a_fix_unverified_when_the_copy_cannot_run() -> None:
    """A model whose forward depends on the exact type of a layer breaks when the layer is wrapped: the fix is
    left unverified (None) instead of raising."""

    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fcs = nn.ModuleList([nn.Linear(64, 64) for _ in range(8)])
            for fc in self.fcs:
                nn.init.normal_(fc.weight, 0.0, 0.4 / 64**0.5)
                nn.init.zeros_(fc.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for fc in self.fcs:
                if not isinstance(fc, nn.Linear):
                    raise TypeError("this model only takes nn.Linear layers")
                x = torch.tanh(fc(x))
            return x

    model = Picky()
    report = actdiag.inspect(model, torch.randn(16, 64), try_fixes=True)
    (f,) = [f for f in report.findings if f.code == "activation_collapse"]
    by_code = {x.code: x for x in f.fixes}
    assert by_code["batchnorm"].verified is None
    assert by_code["xavier_init"].verified is True


def test_attach_fixes_for_codes_without_layers() -> None:
    f = Finding(code="large_updates", severity="warning", layer=None, message="m", evidence={"update_ratio": 0.5})
    (got,) = attach_fixes([f], ())
    assert [x.code for x in got.fixes] == ["lower_learning_rate", "gradient_clipping"]
    assert all(x.verified is None for x in got.fixes)


def test_verify_fixes_returns_a_new_report() -> None:
    model = CollapsingTanhNet()
    report = findings_of(model)
    assert all(x.verified is None for f in report.findings for x in f.fixes)
    x = example(model)
    verified = verify_fixes(model, report, lambda patched: actdiag.inspect(patched, x), seed=0)
    assert verified is not report
    assert verified.layers == report.layers
    assert [f.code for f in verified.findings] == [f.code for f in report.findings]
    assert verified.findings[0].fixes[0].verified is True
    assert isinstance(verified.findings[0].fixes[0], Fix)
