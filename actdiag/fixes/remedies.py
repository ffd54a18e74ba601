"""Which fixes each finding gets (`REMEDIES`, most promising first), read from the finding and the layers around
it, and `attach_fixes`, which the report step calls after diagnosis (the rules never see fixes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from actdiag.fixes.catalogue import BACKWARD, SCALED_BACKWARD, SCALER
from actdiag.fixes.plans import (
    Context,
    Plan,
    feeding_layers,
    finding_layers,
    init_plan,
    norm_plan,
    reinit_targets,
    setup_plan,
    swap_plan,
)
from actdiag.records import Finding, LayerStats
from actdiag.rules._common import SIGMOID_LIKE, TANH_LIKE


# What to try for each finding code, most promising first: each function reads the finding and the layers around it.
def _for_spread(f: Finding, ctx: Context) -> list[Plan | None]:
    targets = reinit_targets(ctx, finding_layers(f))
    return [init_plan(ctx, targets, ""), norm_plan(ctx, targets, "")]


def _for_saturation(f: Finding, ctx: Context) -> list[Plan | None]:
    names = finding_layers(f)
    feeding = feeding_layers(ctx, names)
    return [
        init_plan(ctx, feeding, ", so that pre-activations stay in the bounded activation's linear range"),
        norm_plan(ctx, feeding, ", keeping pre-activations near zero"),
        swap_plan(ctx, ctx.ordered(names), "relu_activation"),
    ]


def _for_gradient(f: Finding, ctx: Context) -> list[Plan | None]:
    start = ctx.index.get(f.layer or "", 0)
    span = [lay.name for lay in ctx.layers[start:]]
    targets = reinit_targets(ctx, span)[:-1] or reinit_targets(ctx, span)
    bounded = [lay.name for lay in ctx.layers[start:] if lay.type in TANH_LIKE | SIGMOID_LIKE]
    plans: list[Plan | None] = []
    # A gradient that mirrors a collapse of the activations is cured by the collapse's cure (the init), not by
    # another activation (tanh near zero is already linear).
    if f.code == "vanishing_gradient" and bounded and "activation_collapse" not in f.related:
        plans.append(swap_plan(ctx, ctx.ordered(bounded), "relu_activation"))
    plans += [init_plan(ctx, targets, ""), norm_plan(ctx, targets, "")]
    if f.code == "vanishing_gradient":
        return [*plans, setup_plan("residual_connections", f, ctx)]
    return [*plans, setup_plan("gradient_clipping", f, ctx), setup_plan("lower_learning_rate", f, ctx)]


def _for_dead_relu(f: Finding, ctx: Context) -> list[Plan | None]:
    dead = ctx.ordered(finding_layers(f))
    if f.evidence.get("since_init") == 0.0:
        # Died in training (rules/run.py): the units fired at first, so the init is not the cause; a too large
        # step pushed them off. Gentler steps keep the others alive; a leaky slope lets the dead ones recover.
        return [
            setup_plan("lower_learning_rate", f, ctx),
            swap_plan(ctx, dead, "leaky_relu"),
            setup_plan("gradient_clipping", f, ctx),
        ]
    if f.evidence.get("since_init") == 1.0:
        return [
            swap_plan(ctx, dead, "leaky_relu"),
            init_plan(ctx, feeding_layers(ctx, dead), " and zeroes the biases that keep the units off"),
            norm_plan(ctx, feeding_layers(ctx, dead), ", centring the pre-activations so about half the units fire"),
        ]
    plans = [
        swap_plan(ctx, dead, "leaky_relu"),
        init_plan(ctx, feeding_layers(ctx, dead), " and zeroes the biases that keep the units off"),
        norm_plan(ctx, feeding_layers(ctx, dead), ", centring the pre-activations so about half the units fire"),
    ]
    if f.evidence.get("steps", 1.0) > 1:
        plans.append(setup_plan("lower_learning_rate", f, ctx))
    return plans


# What the run's first NaN/Inf points to (rules/run.py, evidence flag "cause_*") -> what to try.
_NONFINITE_CAUSES: Mapping[str, tuple[str, ...]] = {
    "cause_updates": ("gradient_clipping", "lower_learning_rate"),
    "cause_unseen_update": ("check_inputs", "gradient_clipping", "lower_learning_rate"),
    "cause_inputs": ("check_inputs",),
    "cause_overflow": ("bf16_autocast", "loss_scaling"),
    "cause_operation": ("check_inputs",),
}


def _for_nonfinite(f: Finding, ctx: Context) -> list[Plan | None]:
    for cause, codes in _NONFINITE_CAUSES.items():
        if f.evidence.get(cause):
            return [setup_plan(code, f, ctx) for code in codes]
    plans: list[Plan | None] = []
    if f.evidence.get("float16"):
        plans += [setup_plan("bf16_autocast", f, ctx), setup_plan("loss_scaling", f, ctx)]
    weights_bad = f.evidence.get("weight_nonfinite", 0.0) > 0 or "parameters" in f.evidence
    if f.evidence.get("gradient") or weights_bad:
        plans += [setup_plan("lower_learning_rate", f, ctx), setup_plan("gradient_clipping", f, ctx)]
    if not weights_bad:
        plans.append(setup_plan("check_inputs", f, ctx))
    return plans


def _for_fp16_overflow(f: Finding, ctx: Context) -> list[Plan | None]:
    # Normalising after the layer would not help: the value overflows in the layer's own output.
    extra = [setup_plan("gradient_clipping", f, ctx)] if f.evidence.get("gradient") else []
    return [setup_plan("bf16_autocast", f, ctx), *extra]


def _for_fp16_underflow(f: Finding, ctx: Context) -> list[Plan | None]:
    # A float32 gradient is reported only when loss scaling could not save it (it spans more than float16 can).
    if f.evidence.get("gradient") and f.evidence.get("float16", 1.0):
        return [setup_plan("loss_scaling", f, ctx), setup_plan("bf16_autocast", f, ctx)]
    return [setup_plan("bf16_autocast", f, ctx)]


def _for_large_updates(f: Finding, ctx: Context) -> list[Plan | None]:
    return [setup_plan("lower_learning_rate", f, ctx), setup_plan("gradient_clipping", f, ctx)]


def _for_stalled_updates(f: Finding, ctx: Context) -> list[Plan | None]:
    first = [setup_plan("switch_optimizer", f, ctx)] if "effective_step_decay" in f.evidence else []
    return [*first, setup_plan("raise_learning_rate", f, ctx)]


def _for_lost_updates(f: Finding, ctx: Context) -> list[Plan | None]:
    half = bool(f.evidence.get("float16"))
    scaler = SCALER if half else ""
    backward = SCALED_BACKWARD if half else BACKWARD
    dtype = "float16" if half else "bfloat16"
    return [setup_plan("fp32_master_weights", f, ctx, dtype=dtype, scaler=scaler, backward=backward)]


REMEDIES: Mapping[str, Callable[[Finding, Context], list[Plan | None]]] = {
    "activation_collapse": _for_spread,
    "activation_explosion": _for_spread,
    "saturation": _for_saturation,
    "vanishing_gradient": _for_gradient,
    "exploding_gradient": _for_gradient,
    "dead_relu": _for_dead_relu,
    "nonfinite": _for_nonfinite,
    "fp16_overflow": _for_fp16_overflow,
    "fp16_underflow": _for_fp16_underflow,
    "large_updates": _for_large_updates,
    "stalled_updates": _for_stalled_updates,
    "lost_updates": _for_lost_updates,
}


def plans_for(f: Finding, ctx: Context) -> list[Plan]:
    remedies = REMEDIES.get(f.code)
    return [] if remedies is None else [p for p in remedies(f, ctx) if p is not None]


def attach_fixes(
    findings: Sequence[Finding],
    layers: Sequence[LayerStats],
    *,
    model: nn.Module | None = None,
) -> tuple[Finding, ...]:
    """The findings, in the same order, each with its suggested fixes (most promising first) for these layers.
    `model`: the model the layers belong to, so that snippets index its containers as they allow and fit its dtype
    (a model kept in float16 gets float32 weights before loss scaling)."""
    ctx = Context.of(layers, model)
    return tuple(dataclasses.replace(f, fixes=tuple(p.fix for p in plans_for(f, ctx))) for f in findings)
