"""Gradient findings stand on their own: reported whenever the measured ratio crosses its threshold, beside (and
linked to) the spread finding that causes them. Each label is measured here with plain tensor hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actdiag
from tests.zoo import DeepVanishingReluNet, ExplodingRNN, VanishingSigmoidNet, example


def output_grads(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """d(random unit gradient . output)/d(module output) for the named modules, with plain hooks (float64)."""
    grads: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod: nn.Module, inputs: object, out: object, name: str = name) -> None:
            t = out[0] if isinstance(out, tuple) else out
            assert isinstance(t, torch.Tensor)
            t.register_hook(lambda g: grads.__setitem__(name, g.detach().double()))

        handles.append(module.register_forward_hook(hook))
    try:
        inputs = example(model)
        out = model(inputs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return grads


def test_vanishing_gradient_beside_the_collapse_that_causes_it() -> None:
    """20 ReLU layers: the first layer's gradient is ~1e-16 of the last's. The collapse is reported and so is the
    vanishing gradient, naming the collapse as its cause."""
    model = DeepVanishingReluNet()
    g = output_grads(model, ["0", "38"])
    measured = (g["0"].norm() / g["38"].norm()).item()
    assert measured < 1e-12
    report = actdiag.inspect(model, example(model))
    found = {f.code: f for f in report.findings}
    assert {"activation_collapse", "vanishing_gradient"} <= set(found)
    v = found["vanishing_gradient"]
    assert v.layer == "0"
    assert "activation_collapse" in v.related
    assert v.evidence["ratio"] == pytest.approx(measured, rel=0.5)  # same direction and order; another random grad
    assert v.fixes[0].code == "he_init"


def test_exploding_gradient_in_a_three_layer_rnn() -> None:
    model = ExplodingRNN()
    g = output_grads(model, ["embed", "head"])
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    measured = rms(g["embed"]) / rms(g["head"])
    assert measured > 1e4
    report = actdiag.inspect(model, example(model))
    (f,) = [f for f in report.findings if f.code == "exploding_gradient"]
    assert f.layer == "embed"
    assert f.evidence["rms_ratio"] > 1e4
    assert {"gradient_clipping", "lower_learning_rate"} <= {x.code for x in f.fixes}


def test_sigmoid_gradient_shrink_gets_no_init_it_already_has() -> None:
    """Ten Xavier sigmoid layers: the gradient shrinks by sigmoid's slope (at most 1/4) a layer. The fix is another
    activation or normalisation, never Xavier (measured: weight std x sqrt(fan_in) is Xavier's gain 1)."""
    model = VanishingSigmoidNet()
    gains = [(m.weight.std() * m.weight.shape[1] ** 0.5).item() for m in model if isinstance(m, nn.Linear)]
    assert all(abs(g - 1.0) < 0.06 for g in gains)
    (f,) = [f for f in actdiag.inspect(model, example(model)).findings if f.code == "vanishing_gradient"]
    codes = [x.code for x in f.fixes]
    assert codes[0] in ("relu_activation", "batchnorm")
    assert "xavier_init" not in codes
