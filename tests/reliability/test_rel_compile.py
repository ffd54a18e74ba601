"""torch.compile: a compiled model can be watched. Recorded steps run the model eagerly with the hooks in place;
compiled graphs never contain actdiag code, so actdiag causes no graph break and no recompilation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

import actdiag

pytestmark = pytest.mark.slow  # compiling takes a few seconds; it still runs in CI

BACKEND = "aot_eager"  # dynamo + AOT autograd as in production, without inductor's code generation time


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _train(model: nn.Module, params: nn.Module, steps: int = 6) -> list[actdiag.StepRecord]:
    opt = torch.optim.SGD(params.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    records = []
    with actdiag.watch(model, every=2, strict=True) as monitor:
        for _ in range(steps):
            model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
            if monitor.latest is not None and (not records or records[-1] is not monitor.latest):
                records.append(monitor.latest)
    return records


@pytest.fixture
def dynamo():  # type: ignore[no-untyped-def]
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["torch_compile", "module_compile"])
def test_rel_compiled_model_same_stats_no_break_no_recompile(dynamo, how: str) -> None:  # type: ignore[no-untyped-def]
    from torch._dynamo.eval_frame import _stance

    eager = _net()
    inner = copy.deepcopy(eager)
    if how == "torch_compile":
        compiled: nn.Module = torch.compile(inner, backend=BACKEND)
    else:
        inner.compile(backend=BACKEND)
        compiled = inner
    want = _train(eager, eager)
    got = _train(compiled, inner)
    assert [r.step for r in got] == [r.step for r in want] == [0, 2, 4]
    for rg, rw in zip(got, want):
        assert [layer.label for layer in rg.layers] == ["0", "1", "2", "3", "4"]  # no "_orig_mod." prefix
        for a, b in zip(rg.layers, rw.layers):
            assert a.activation.mean == pytest.approx(b.activation.mean, rel=1e-6, abs=1e-9)
            assert a.activation.std == pytest.approx(b.activation.std, rel=1e-6)
            assert a.gradient.std == pytest.approx(b.gradient.std, rel=1e-6)
            assert a.dead_fraction == b.dead_fraction and a.saturation == b.saturation
    # the unrecorded steps ran the compiled graph: compiled once, never recompiled, never broken by actdiag
    # (model.compile() compiles Module._call_impl, which this torch runs without capturing a graph: at most one)
    assert dynamo["stats"]["unique_graphs"] == (1 if how == "torch_compile" else dynamo["stats"]["unique_graphs"])
    assert dynamo["stats"]["unique_graphs"] <= 1
    assert not dynamo["graph_break"]
    assert torch._dynamo.eval_frame._stance.stance == "default" == _stance.stance


def test_rel_explain_finds_no_graph_break_while_watched(dynamo) -> None:  # type: ignore[no-untyped-def]
    model = _net()
    x = torch.randn(8, 4)
    with actdiag.watch(model, every=2) as monitor:
        model(x).sum().backward()
        monitor.step()  # step 1 is not recorded: the model is as the compiler sees it between recorded steps
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_rel_compiled_model_on_old_torch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = torch.compile(_net(), backend=BACKEND)  # lazy: nothing is compiled here
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(TypeError, match="torch.compile"):
        actdiag.watch(compiled)


def test_rel_step_inside_a_compiled_function_is_a_clear_warning(dynamo) -> None:  # type: ignore[no-untyped-def]
    model = _net()
    x = torch.randn(8, 4)
    warns = pytest.warns(RuntimeWarning, match="call it outside compiled functions")
    with warns, actdiag.watch(model, every=2) as monitor:

        @torch.compile(backend=BACKEND)
        def train_step() -> None:
            model(x).sum().backward()
            monitor.step()

        for _ in range(3):
            train_step()
            model.zero_grad()
    assert monitor.recorded_steps == 1  # step 0 (begun before compilation); then recording stopped, training went on
    assert torch._dynamo.eval_frame._stance.stance == "default"
    assert all(not m._forward_hooks for m in model.modules())
    assert not _global_forward_hooks and not _global_forward_pre_hooks  # torch's global ones


def test_rel_overlapping_watches_give_the_stance_back() -> None:
    # Several watched models recording at overlapping times, ending in any order (each variant of
    # bench/bench_step.py does this): the user's stance is back once the last recording ends, not before.
    import torch._dynamo.eval_frame as ef  # the stance is only taken once dynamo is loaded

    models = [_net() for _ in range(3)]
    mons = [actdiag.watch(m, every=1).start() for m in models]  # each records step 0 from here on
    assert ef._stance.stance == "force_eager"
    for m in models:
        m(torch.randn(4, 4)).sum().backward()
    mons[1].close()
    mons[0].close()
    assert ef._stance.stance == "force_eager"  # one recording still open
    mons[2].close()
    assert ef._stance.stance == "default"
