"""`verify_fixes`: each verifiable fix tried on a deep copy of the model, checked by re-running it through the
function the caller passes in (so this package never reaches up to the engine)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from actdiag.fixes.catalogue import VERIFIABLE
from actdiag.fixes.plans import Context, Plan, finding_layers
from actdiag.fixes.remedies import plans_for
from actdiag.formatting import format_number
from actdiag.records import Finding, Fix, LayerStats, Report
from actdiag.rules._common import geo_mean, usable
from actdiag.rules.gradients import gradient_chain


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        head, last = name.rsplit(".", 1)
        return model.get_submodule(head), last
    return model, name


def _apply(model: nn.Module, plan: Plan, generator_seed: int) -> None:
    code = plan.fix.code
    torch.manual_seed(generator_seed)
    with torch.no_grad():
        for i, name in enumerate(plan.targets):
            module = model.get_submodule(name)
            if code in ("he_init", "xavier_init"):
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                    continue
                nl = plan.nonlinearity[i] if i < len(plan.nonlinearity) else "linear"
                if code == "he_init":
                    nn.init.kaiming_normal_(weight, nonlinearity="leaky_relu" if nl == "leaky_relu" else "relu")
                else:
                    gain = nn.init.calculate_gain("tanh") if nl == "tanh" else 1.0
                    nn.init.xavier_normal_(weight, gain=gain)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)
            elif code in ("batchnorm", "layernorm"):
                kind, features = plan.norm[i]
                norm: nn.Module = getattr(nn, kind)(features)
                ref = next(iter(module.parameters()), None)
                if ref is not None:
                    norm = norm.to(device=ref.device, dtype=ref.dtype)
                parent, last = _parent(model, name)
                setattr(parent, last, nn.Sequential(module, norm))
            elif code in ("leaky_relu", "relu_activation"):
                parent, last = _parent(model, name)
                setattr(parent, last, nn.LeakyReLU(0.01) if code == "leaky_relu" else nn.ReLU())
        for name in plan.reinit:
            weight = getattr(model.get_submodule(name), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                nn.init.kaiming_normal_(weight, nonlinearity="relu")


def _renamed(name: str, plan: Plan) -> str:
    """Where a layer's output is found in the patched copy: a wrapped layer's output is its norm's input."""
    return f"{name}.0" if plan.fix.code in ("batchnorm", "layernorm") and name in plan.targets else name


def _measure(f: Finding, layers: Sequence[LayerStats], plan: Plan | None) -> dict[str, float]:
    """The numbers behind finding `f`, measured on a (possibly patched) run, for before/after evidence."""
    by_name: dict[str, LayerStats] = {}
    for layer in layers:
        by_name.setdefault(layer.name, layer)

    def find(name: str) -> LayerStats | None:
        if plan is not None:
            got = by_name.get(_renamed(name, plan))
            if got is not None:
                return got
        return by_name.get(name)

    out: dict[str, float] = {}
    names = finding_layers(f)
    if f.code in ("activation_collapse", "activation_explosion"):
        chain = [find(n) for n in names[1:] + names[:1]]  # related are in order and the finding's layer is last
        stds = [c.activation.std for c in chain if c is not None and usable(c.activation)]  # type: ignore[union-attr]
        if len(stds) >= 2:
            out["first_std"] = stds[0]
            out["last_std"] = stds[-1]
            out["gain_per_layer"] = geo_mean([b / a for a, b in zip(stds, stds[1:])])
    elif f.code == "saturation":
        sats = [c.saturation for c in (find(n) for n in names) if c is not None and c.saturation is not None]
        if sats:
            out["saturation"] = max(sats)
    elif f.code == "dead_relu":
        dead = [c.dead_fraction for c in (find(n) for n in names) if c is not None and c.dead_fraction is not None]
        if dead:
            out["dead_fraction"] = max(dead)
    elif f.code in ("vanishing_gradient", "exploding_gradient"):
        chain2 = gradient_chain(layers)
        if len(chain2) >= 2 and chain2[-1].gradient is not None and chain2[0].gradient is not None:
            g0, g1 = chain2[0].gradient, chain2[-1].gradient
            if g1.norm > 0:
                out["ratio"] = g0.norm / g1.norm
                out["rms_ratio"] = g0.rms / g1.rms
    return out


def _headline(f: Finding, before: Mapping[str, float], after: Mapping[str, float]) -> str:
    key = {
        "activation_collapse": ("last_std", "activation std at {layer}"),
        "activation_explosion": ("last_std", "activation std at {layer}"),
        "saturation": ("saturation", "saturated share at {layer}"),
        "dead_relu": ("dead_fraction", "dead share at {layer}"),
        "vanishing_gradient": ("ratio", "first/last gradient ratio"),
        "exploding_gradient": ("rms_ratio", "first/last gradient ratio"),
    }.get(f.code)
    if key is None or key[0] not in before or key[0] not in after:
        return ""
    what = key[1].format(layer=f"layer {f.layer}")
    return f"{what} goes {format_number(before[key[0]])} -> {format_number(after[key[0]])}"


def verify_fixes(model: nn.Module, report: Report, rerun: Callable[[nn.Module], Report], *, seed: int = 0) -> Report:
    """A copy of `report` whose verifiable fixes were each tried on a deep copy of `model`, checked by
    `rerun(patched_copy)` (the same check that produced `report`, e.g. `actdiag.inspect` on the same inputs).

    A fix is `verified=True` when, on the patched copy, its finding's code no longer fires and no warning or error
    of a code absent before appeared (a cure that causes a new problem is not a cure); `False` otherwise. Fixes
    that cannot be applied automatically (learning rate, clipping, precision) stay `None`, as does a fix whose
    patched copy could not be built or run. The user's model, its weights and the global RNG state are untouched.
    """
    ctx = Context.of(report.layers, model)
    before_codes = {f.code for f in report.findings}
    cache: dict[tuple[str, str], tuple[bool | None, tuple[LayerStats, ...], tuple[Finding, ...]]] = {}
    out: list[Finding] = []
    for finding in report.findings:
        plans = {p.fix.code: p for p in plans_for(finding, ctx)}
        fixes: list[Fix] = []
        for fix in finding.fixes:
            plan = plans.get(fix.code)
            if fix.code not in VERIFIABLE or plan is None or not plan.targets:
                fixes.append(fix)
                continue
            key = (fix.code, fix.snippet)
            if key not in cache:
                cache[key] = _rerun(model, plan, rerun, seed)
            ok, new_layers, new_findings = cache[key]
            if ok is None:
                fixes.append(fix)
                continue
            gone = not any(nf.code == finding.code for nf in new_findings)
            new_bad = sorted({nf.code for nf in new_findings if nf.rank >= 1 and nf.code not in before_codes})
            verified = gone and not new_bad
            before = {**_measure(finding, report.layers, None), "findings": 1.0}
            after = {
                **_measure(finding, new_layers, plan),
                "findings": float(sum(nf.code == finding.code for nf in new_findings)),
                "new_findings": float(len(new_bad)),
            }
            headline = _headline(finding, before, after)
            result = "Verified on a copy of the model" if verified else "Tried on a copy of the model"
            detail = f": {headline}" if headline else ""
            if not gone:
                detail += f"; {finding.code} remains"
            if new_bad:
                detail += f"; it introduces {', '.join(new_bad)}"
            fixes.append(
                dataclasses.replace(
                    fix, verified=verified, before=before, after=after, text=f"{fix.text} {result}{detail}."
                )
            )
        out.append(dataclasses.replace(finding, fixes=tuple(fixes)))
    return dataclasses.replace(report, findings=tuple(out))


def _rerun(
    model: nn.Module, plan: Plan, rerun: Callable[[nn.Module], Report], seed: int
) -> tuple[bool | None, tuple[LayerStats, ...], tuple[Finding, ...]]:
    """Patch a deep copy and check it again; (None, (), ()) when the copy cannot be made or run."""
    try:
        patched = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model that cannot be copied cannot be tried; the fix stays unverified
        return None, (), ()
    # The re-initialisation draws from the global RNG (seeded, for a reproducible verdict); fork_rng hands the
    # user's RNG state back untouched afterwards.
    with torch.random.fork_rng():
        try:
            _apply(patched, plan, seed)
            again = rerun(patched)
        except Exception:  # noqa: BLE001 - e.g. the patched layer no longer fits the model's own forward code
            return None, (), ()
    return True, again.layers, again.findings
