"""What to try for each finding, with code that names the user's own layers, and checking it on a copy of the model.

`CATALOGUE` holds one entry per fix code: its text and snippet templates and whether `--try-fixes` can verify it by
re-running; `REMEDIES` says which fixes each finding code gets. `attach_fixes(findings, layers, model=...)` picks
the remedies for each finding by what surrounds the layers it names: He initialisation where a ReLU-family
activation follows a weight layer, Xavier where tanh/sigmoid (or nothing) does, BatchNorm for conv and MLP layers,
LayerNorm for sequences and single-sample batches, and so on. Each snippet can be pasted after the model is built
(`model` being the user's model; the training-loop ones name `optimizer`, `criterion`, `x`, `y` and `loss`). Layers
are named the way their containers index them (`model.features[3]`, `model.heads["0"]`), or through
`get_submodule`/`set_submodule` where the container is unknown; mixed-precision snippets take the device from the
batch (`x.device.type`). The rules never see fixes: they are attached after diagnosis, where the report is assembled.

`verify_fixes(model, report, rerun)` applies every verifiable fix (re-initialisation, inserting a normalisation
layer, swapping an activation) to a deep copy, re-runs the check through `rerun` (the caller's `actdiag.inspect`,
passed in so that this module never reaches up to the engine) and marks the fix verified when the finding went away
without a new warning taking its place, with the numbers before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import keyword
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from actdiag.formatting import format_number
from actdiag.records import Finding, Fix, LayerStats, Report
from actdiag.rules._common import (
    REINIT_TYPES,
    RELU_LIKE,
    SIGMOID_LIKE,
    TANH_LIKE,
    geo_mean,
    nonlinearity_after,
    usable,
    weight_layer_before,
)
from actdiag.rules.activations import already_initialised
from actdiag.rules.gradients import gradient_chain

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MAX_LINES = 6  # beyond this many layers a snippet loops over their names instead of one line each


# ------------------------------------------------------------------------------------------------------ catalogue
@dataclass(frozen=True, slots=True)
class FixEntry:
    """One fix code. `text` and `snippet` are `str.format` templates. In a snippet, `{layer}` is the expression of
    one layer (`model.features[3]`) and the snippet is repeated for each layer a fix names; `loop` takes its place
    for more than a few layers. `swap`: the snippet is the module put in place of each named layer (assigned as the
    layer's container allows). `then` is repeated for each weight layer re-initialised along with the fix.
    `{dtype}` is the low-precision dtype a finding names. `verifiable`:
    `--try-fixes` can apply the fix to a copy of the model and re-run it."""

    text: str
    snippet: str
    verifiable: bool = False
    loop: str = ""
    then: str = ""
    swap: bool = False


_EACH_LAYER = "for layer in (\n{layers}\n):\n    {body}"
_NORM_TEXT = (
    "Normalise the output of {n} layer(s) with {label}, which resets the spread of every layer whatever the "
    "initialisation (Ioffe & Szegedy 2015; Ba et al. 2016){why}."
)
_NORM_SNIPPET = "nn.Sequential({layer}, nn.{norm}({features}))"
_NORM_LOOP = (
    "for name in (\n{names}\n):\n    layer = model.get_submodule(name)\n"
    "    model.set_submodule(name, nn.Sequential(layer, nn.{norm}({features})))"
)
_LOWER_LR = 'for group in optimizer.param_groups:\n    group["lr"] *= 0.1'
# float32 weights (the parameters stay the same objects; a fresh optimizer keeps no low-precision state).
_MASTER = (
    "model.float()  # float32 weights, updated exactly\n"
    "optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)  # the same optimizer, over them\n"
)
_BACKWARD = "loss.backward()\noptimizer.step()\noptimizer.zero_grad()"
# Computing in float16 (not bfloat16) also needs loss scaling: `{scaler}` and `{backward}` of fp32_master_weights.
_SCALER = "scaler = torch.amp.GradScaler(x.device.type)\n"
_SCALED_BACKWARD = "scaler.scale(loss).backward()\nscaler.step(optimizer)\nscaler.update()\noptimizer.zero_grad()"

CATALOGUE: Mapping[str, FixEntry] = {
    "xavier_init": FixEntry(
        "Re-initialise {n} layer(s) with Xavier (Glorot) initialisation, which keeps the variance of {kind} layers "
        "constant with depth (Glorot & Bengio 2010){why}.",
        "nn.init.xavier_normal_({layer}.weight{gain})\nif {layer}.bias is not None:\n    nn.init.zeros_({layer}.bias)",
        verifiable=True,
        loop=_EACH_LAYER,
    ),
    "he_init": FixEntry(
        "Re-initialise {n} layer(s) with He (Kaiming) initialisation, which keeps the variance of ReLU-family "
        "activations constant with depth (He et al. 2015){why}.",
        'nn.init.kaiming_normal_({layer}.weight, nonlinearity="{nl}")\n'
        "if {layer}.bias is not None:\n    nn.init.zeros_({layer}.bias)",
        verifiable=True,
        loop=_EACH_LAYER,
    ),
    "batchnorm": FixEntry(_NORM_TEXT, _NORM_SNIPPET, verifiable=True, loop=_NORM_LOOP, swap=True),
    "layernorm": FixEntry(_NORM_TEXT, _NORM_SNIPPET, verifiable=True, loop=_NORM_LOOP, swap=True),
    "leaky_relu": FixEntry(
        "Use LeakyReLU: a small negative slope keeps a gradient flowing through units that are off, so they can "
        "come back (Maas et al. 2013).",
        "nn.LeakyReLU(0.01)",
        verifiable=True,
        swap=True,
    ),
    "relu_activation": FixEntry(
        # ReLU in place of a bounded activation needs He-scaled weights before it, or the signal explodes.
        "Use ReLU instead of the bounded activation, with He initialisation of the layers before it: ReLU does not "
        "saturate for positive inputs, so the gradient passes through at full strength (Glorot et al. 2011).",
        "nn.ReLU()",
        verifiable=True,
        then='nn.init.kaiming_normal_({layer}.weight, nonlinearity="relu")',
        swap=True,
    ),
    "lower_learning_rate": FixEntry(
        "Lower the learning rate (try 10x smaller), or warm it up over the first steps.", _LOWER_LR
    ),
    "gradient_clipping": FixEntry(
        "Clip the gradient norm before each optimizer step so one bad batch cannot blow the weights up.",
        "loss.backward()\ntorch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)\noptimizer.step()",
    ),
    "residual_connections": FixEntry(
        "Add residual (skip) connections around blocks of layers: the identity path carries signal and gradient "
        "past the layers that shrink it (He et al. 2016).",
        "class Residual(nn.Module):\n    def __init__(self, block: nn.Module) -> None:\n        super().__init__()\n"
        "        self.block = block\n\n    def forward(self, x):\n        return x + self.block(x)\n\n"
        "# wrap shape-preserving blocks, e.g. {layer} = Residual({layer})",
    ),
    "bf16_autocast": FixEntry(
        "Compute in bfloat16 instead of float16: it keeps float32's exponent range, so nothing overflows or "
        "flushes to zero, and needs no loss scaling.",
        "with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):\n"
        "    loss = criterion(model(x), y)\nloss.backward()",
    ),
    "loss_scaling": FixEntry(
        "Scale the loss before backward so small float16 gradients stay representable (dynamic loss scaling, "
        "Micikevicius et al. 2018).",
        "{master}scaler = torch.amp.GradScaler(x.device.type)\n"
        "with torch.autocast(device_type=x.device.type, dtype=torch.float16):\n"
        "    loss = criterion(model(x), y)\nscaler.scale(loss).backward()\nscaler.step(optimizer)\nscaler.update()",
    ),
    "fp32_master_weights": FixEntry(
        "Keep the weights in float32 and compute in {dtype} under autocast (or keep a float32 master copy for the "
        "optimizer): the update is then added to a float32 weight, where it lands, and only the forward and "
        "backward passes round to {dtype} (Micikevicius et al. 2018).",
        _MASTER + "{scaler}with torch.autocast(device_type=x.device.type, dtype=torch.{dtype}):\n"
        "    loss = criterion(model(x), y)\n{backward}",
    ),
    "check_inputs": FixEntry(
        "Check the data that reaches {layer}: NaN/Inf in the inputs (or a log/division of zero just before it) "
        "spreads to every later layer. Anomaly detection names the operation that produced it.",
        'assert torch.isfinite(x).all(), "input batch holds NaN/Inf"\n'
        "torch.autograd.set_detect_anomaly(True)  # while debugging: raises at the op that made the NaN",
    ),
    "raise_learning_rate": FixEntry(
        "Raise the learning rate (try 10x), or use a schedule that does not decay it this far.",
        'for group in optimizer.param_groups:\n    group["lr"] *= 10',
    ),
    "switch_optimizer": FixEntry(
        "Use an optimizer whose step size does not decay with the sum of all past gradients: Adam or RMSProp keep "
        "a moving average instead of AdaGrad's running sum (Zeiler 2012; Kingma & Ba 2015).",
        "optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)",
    ),
}
FIX_CODES = tuple(CATALOGUE)
VERIFIABLE = frozenset(code for code, entry in CATALOGUE.items() if entry.verifiable)


def _quote(text: str) -> str:
    """A string literal in the snippets' double quotes."""
    return f'"{text}"' if '"' not in text and "\\" not in text and text.isprintable() else repr(text)


def _access(name: str, model: nn.Module | None) -> str | None:
    """Python expression for submodule `name` of `model` by attribute and index, or None when none is certain to
    work: indices where the container takes them (Sequential and ModuleList by position, ModuleDict by key),
    attributes elsewhere. Without the model, digits and other non-identifiers cannot be told apart (a ModuleDict
    with key "0" takes ["0"], a Sequential [0]), so only a path of identifiers gets an expression."""
    expr = "model"
    module: nn.Module | None = model
    for part in name.split("."):
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and part.isdigit():
            expr += f"[{part}]"
        elif isinstance(module, nn.ModuleDict):
            expr += f"[{_quote(part)}]"
        elif _IDENT.match(part) and not keyword.iskeyword(part) and not hasattr(type(module), part):
            # (an attribute of the class, e.g. a child named "train", would shadow the child)
            expr += f".{part}"
        else:
            return None
        if module is not None:
            module = module._modules.get(part)
            if module is None:
                return None  # not a submodule of this model: say nothing certain
    return expr


def module_expr(name: str, root: str = "model", model: nn.Module | None = None) -> str:
    """Python expression for a submodule: "features.3.conv1" -> "model.features[3].conv1" (with `model`, whose
    containers say how each part is indexed), or `model.get_submodule("features.3.conv1")` where that is not
    certain. A functional activation's record ("mlp:relu", CONTRACT.md section 6) names the module whose forward
    applies it ("model.mlp")."""
    name = name.rpartition(":")[0] if ":" in name else name
    if not name:
        return root
    expr = _access(name, model)
    if expr is None:
        return f"{root}.get_submodule({_quote(name)})"
    return root + expr[len("model") :]


def module_assign(name: str, value: str, model: nn.Module | None = None) -> str:
    """A statement that puts module expression `value` in place of submodule `name`."""
    expr = _access(name, model) if name else None
    return f"{expr} = {value}" if expr is not None else f"model.set_submodule({_quote(name)}, {value})"


def _low_dtypes(model: nn.Module | None) -> frozenset[torch.dtype]:
    if model is None:
        return frozenset()
    return frozenset(p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16))


# ---------------------------------------------------------------------------------------------------- layer context
@dataclass(frozen=True, slots=True)
class _Context:
    layers: tuple[LayerStats, ...]
    index: dict[str, int]
    model: nn.Module | None = None  # the user's model: how its containers index their children
    low: frozenset[torch.dtype] = frozenset()  # float16/bfloat16 among the model's parameters

    @classmethod
    def of(cls, layers: Sequence[LayerStats], model: nn.Module | None = None) -> _Context:
        index: dict[str, int] = {}
        for i, layer in enumerate(layers):
            index.setdefault(layer.name, i)
        return cls(tuple(layers), index, model, _low_dtypes(model))

    def expr(self, name: str) -> str:
        return module_expr(name, model=self.model)

    def assign(self, name: str, value: str) -> str:
        return module_assign(name, value, self.model)

    def get(self, name: str | None) -> LayerStats | None:
        i = self.index.get(name) if name is not None else None
        return None if i is None else self.layers[i]

    def ordered(self, names: Sequence[str]) -> list[str]:
        known = [n for n in dict.fromkeys(names) if n in self.index]
        return sorted(known, key=lambda n: self.index[n])


def _finding_layers(f: Finding) -> list[str]:
    return [n for n in (f.layer, *f.related) if n is not None]


def _nonlinearity(ctx: _Context, name: str) -> str:
    """The `nonlinearity` argument of nn.init for the activation after weight layer `name`."""
    i = ctx.index[name]
    after = nonlinearity_after(ctx.layers, i)
    if after is None:
        return "linear"
    if after in ("LeakyReLU", "RReLU", "PReLU"):
        return "leaky_relu"
    if after in RELU_LIKE:
        return "relu"
    if after in TANH_LIKE:
        return "tanh"
    if after in SIGMOID_LIKE:
        return "sigmoid"
    return "linear"


def _reinit_targets(ctx: _Context, names: Sequence[str]) -> list[str]:
    return [n for n in ctx.ordered(names) if ctx.layers[ctx.index[n]].type in REINIT_TYPES]


def _feeding(ctx: _Context, names: Sequence[str]) -> list[str]:
    """The weight layers that feed the named (activation) layers."""
    out = []
    for n in ctx.ordered(names):
        j = weight_layer_before(ctx.layers, ctx.index[n])
        if j is not None:
            out.append(ctx.layers[j].name)
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True, slots=True)
class _Plan:
    """A fix and, for the verifiable ones, how to apply it to a copy."""

    fix: Fix
    targets: tuple[str, ...] = ()
    nonlinearity: tuple[str, ...] = ()
    norm: tuple[tuple[str, int], ...] = ()  # (kind, features) per target for normalisation fixes
    reinit: tuple[str, ...] = ()  # weight layers to He-initialise along with an activation swap


def _wrapped(items: list[str], indent: str = "    ", width: int = 100) -> str:
    """Comma-separated items, several per line, each line under `width` characters."""
    lines: list[str] = []
    line = ""
    for item in items:
        piece = f"{item},"
        if line and len(indent) + len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}" if line else piece
    if line:
        lines.append(line)
    return "\n".join(indent + ln for ln in lines)


def _line(ctx: _Context, entry: FixEntry, name: str, **words: str) -> str:
    """The entry's snippet for one layer: the statement itself, or for a swap the assignment of its module."""
    code = entry.snippet.format(layer=ctx.expr(name), **words)
    return ctx.assign(name, code) if entry.swap else code


def _snippet(ctx: _Context, entry: FixEntry, names: Sequence[str], **words: str) -> str:
    """The entry's snippet for layers `names`: one block per layer, or its loop over them when there are many."""
    if entry.loop and len(names) > _MAX_LINES:
        body = entry.snippet.format(layer="layer", **words).replace("\n", "\n    ")
        names_listed = _wrapped([repr(n) for n in names])
        exprs = _wrapped([ctx.expr(n) for n in names])
        code = entry.loop.format(layers=exprs, names=names_listed, body=body, **words)
    else:
        code = "\n".join(_line(ctx, entry, n, **words) for n in names)
    return "from torch import nn\n\n" + code


def _init_plan(ctx: _Context, targets: list[str], why: str) -> _Plan | None:
    if not targets:
        return None
    nls = tuple(_nonlinearity(ctx, n) for n in targets)
    relu = sum(nl in ("relu", "leaky_relu") for nl in nls)
    he_fix = relu * 2 >= len(nls) and relu > 0
    if already_initialised([ctx.layers[ctx.index[n]] for n in targets], "he_init" if he_fix else "xavier_init", nls):
        return None  # never suggest the initialisation the model already has
    if he_fix:
        nl = "leaky_relu" if "leaky_relu" in nls and "relu" not in nls else "relu"
        he = CATALOGUE["he_init"]
        fix = Fix("he_init", he.text.format(n=len(targets), why=why), _snippet(ctx, he, targets, nl=nl))
        return _Plan(fix, tuple(targets), tuple(nl for _ in targets))
    non_linear = [nl for nl in nls if nl in ("tanh", "sigmoid")]
    nl = max(set(non_linear), key=non_linear.count) if non_linear else "linear"
    gain = f', gain=nn.init.calculate_gain("{nl}")' if nl == "tanh" else ""
    kind = "tanh/sigmoid" if nl != "linear" else "linear"
    xavier = CATALOGUE["xavier_init"]
    text = xavier.text.format(n=len(targets), kind=kind, why=why)
    fix = Fix("xavier_init", text, _snippet(ctx, xavier, targets, gain=gain))
    return _Plan(fix, tuple(targets), tuple(nl for _ in targets))


def _norm_kind(layer: LayerStats) -> tuple[str, int] | None:
    shape = layer.shape
    if len(shape) < 2:
        return None
    if len(shape) == 2:
        # BatchNorm needs more than one sample per channel in training mode.
        return ("BatchNorm1d", shape[1]) if shape[0] > 1 else ("LayerNorm", shape[1])
    if len(shape) == 3:
        if layer.type.startswith("Conv"):
            return ("BatchNorm1d", shape[1])
        return ("LayerNorm", shape[2])
    if len(shape) == 4:
        return ("BatchNorm2d", shape[1])
    if len(shape) == 5:
        return ("BatchNorm3d", shape[1])
    return None


def _norm_plan(ctx: _Context, targets: list[str], why: str) -> _Plan | None:
    kinds = []
    names = []
    for n in targets:
        k = _norm_kind(ctx.layers[ctx.index[n]])
        if k is not None:
            kinds.append(k)
            names.append(n)
    if not names:
        return None
    batch = sum(k[0].startswith("BatchNorm") for k in kinds) * 2 >= len(kinds)
    code = "batchnorm" if batch else "layernorm"
    entry = CATALOGUE[code]
    if len(names) > _MAX_LINES:
        # The loop builds each norm from the layer itself, so it names the layer's width, not a number.
        k0 = kinds[0][0]
        feat = "layer.out_channels" if k0.startswith("BatchNorm") and k0 != "BatchNorm1d" else "layer.out_features"
        if k0 == "BatchNorm1d" and ctx.layers[ctx.index[names[0]]].type.startswith("Conv"):
            feat = "layer.out_channels"
        snippet = _snippet(ctx, entry, names, norm=k0, features=feat)
    else:
        lines = [_line(ctx, entry, n, norm=k, features=str(f)) for n, (k, f) in zip(names, kinds)]
        snippet = "from torch import nn\n\n" + "\n".join(lines)
    label = "BatchNorm" if batch else "LayerNorm"
    fix = Fix(code, entry.text.format(n=len(names), label=label, why=why), snippet)
    return _Plan(fix, tuple(names), norm=tuple(kinds))


def _swap_plan(ctx: _Context, targets: list[str], code: str) -> _Plan | None:
    # A functional activation's record ("block:tanh") is a call inside a forward, not a module that can be swapped.
    targets = [n for n in targets if ":" not in n]
    if not targets:
        return None
    entry = CATALOGUE[code]
    feeding = _feeding(ctx, targets) if entry.then else []
    lines = [_line(ctx, entry, n) for n in targets]
    lines += [entry.then.format(layer=ctx.expr(n)) for n in feeding]
    fix = Fix(code, entry.text, "from torch import nn\n\n" + "\n".join(lines))
    return _Plan(fix, tuple(targets), reinit=tuple(feeding))


def _plain(code: str, f: Finding, ctx: _Context, **words: str) -> _Plan:
    """A fix that changes the training setup, not the model: its text and snippet name at most the finding's layer,
    and the model's dtype."""
    entry = CATALOGUE[code]
    layer = ctx.expr(f.layer) if f.layer else "model"
    # GradScaler refuses float16 weights: loss scaling on a model kept in float16 starts with float32 weights.
    master = _MASTER if torch.float16 in ctx.low else ""
    words = {"layer": layer, "master": master, **words}
    return _Plan(Fix(code, entry.text.format(**words), entry.snippet.format(**words)))


# What to try for each finding code, most promising first: each function reads the finding and the layers around it.
def _for_spread(f: Finding, ctx: _Context) -> list[_Plan | None]:
    targets = _reinit_targets(ctx, _finding_layers(f))
    return [_init_plan(ctx, targets, ""), _norm_plan(ctx, targets, "")]


def _for_saturation(f: Finding, ctx: _Context) -> list[_Plan | None]:
    names = _finding_layers(f)
    feeding = _feeding(ctx, names)
    return [
        _init_plan(ctx, feeding, ", so that pre-activations stay in the bounded activation's linear range"),
        _norm_plan(ctx, feeding, ", keeping pre-activations near zero"),
        _swap_plan(ctx, ctx.ordered(names), "relu_activation"),
    ]


def _for_gradient(f: Finding, ctx: _Context) -> list[_Plan | None]:
    start = ctx.index.get(f.layer or "", 0)
    span = [lay.name for lay in ctx.layers[start:]]
    targets = _reinit_targets(ctx, span)[:-1] or _reinit_targets(ctx, span)
    bounded = [lay.name for lay in ctx.layers[start:] if lay.type in TANH_LIKE | SIGMOID_LIKE]
    plans: list[_Plan | None] = []
    # A gradient that mirrors a collapse of the activations is cured by the collapse's cure (the init), not by
    # another activation (tanh near zero is already linear).
    if f.code == "vanishing_gradient" and bounded and "activation_collapse" not in f.related:
        plans.append(_swap_plan(ctx, ctx.ordered(bounded), "relu_activation"))
    plans += [_init_plan(ctx, targets, ""), _norm_plan(ctx, targets, "")]
    if f.code == "vanishing_gradient":
        return [*plans, _plain("residual_connections", f, ctx)]
    return [*plans, _plain("gradient_clipping", f, ctx), _plain("lower_learning_rate", f, ctx)]


def _for_dead_relu(f: Finding, ctx: _Context) -> list[_Plan | None]:
    dead = ctx.ordered(_finding_layers(f))
    if f.evidence.get("since_init") == 0.0:
        # Died in training (rules/run.py): the units fired at first, so the init is not the cause; a too large
        # step pushed them off. Gentler steps keep the others alive; a leaky slope lets the dead ones recover.
        return [
            _plain("lower_learning_rate", f, ctx),
            _swap_plan(ctx, dead, "leaky_relu"),
            _plain("gradient_clipping", f, ctx),
        ]
    if f.evidence.get("since_init") == 1.0:
        return [
            _swap_plan(ctx, dead, "leaky_relu"),
            _init_plan(ctx, _feeding(ctx, dead), " and zeroes the biases that keep the units off"),
            _norm_plan(ctx, _feeding(ctx, dead), ", centring the pre-activations so about half the units fire"),
        ]
    plans = [
        _swap_plan(ctx, dead, "leaky_relu"),
        _init_plan(ctx, _feeding(ctx, dead), " and zeroes the biases that keep the units off"),
        _norm_plan(ctx, _feeding(ctx, dead), ", centring the pre-activations so about half the units fire"),
    ]
    if f.evidence.get("steps", 1.0) > 1:
        plans.append(_plain("lower_learning_rate", f, ctx))
    return plans


# What the run's first NaN/Inf points to (rules/run.py, evidence flag "cause_*") -> what to try.
_NONFINITE_CAUSES: Mapping[str, tuple[str, ...]] = {
    "cause_updates": ("gradient_clipping", "lower_learning_rate"),
    "cause_unseen_update": ("check_inputs", "gradient_clipping", "lower_learning_rate"),
    "cause_inputs": ("check_inputs",),
    "cause_overflow": ("bf16_autocast", "loss_scaling"),
    "cause_operation": ("check_inputs",),
}


def _for_nonfinite(f: Finding, ctx: _Context) -> list[_Plan | None]:
    for cause, codes in _NONFINITE_CAUSES.items():
        if f.evidence.get(cause):
            return [_plain(code, f, ctx) for code in codes]
    plans: list[_Plan | None] = []
    if f.evidence.get("float16"):
        plans += [_plain("bf16_autocast", f, ctx), _plain("loss_scaling", f, ctx)]
    weights_bad = f.evidence.get("weight_nonfinite", 0.0) > 0 or "parameters" in f.evidence
    if f.evidence.get("gradient") or weights_bad:
        plans += [_plain("lower_learning_rate", f, ctx), _plain("gradient_clipping", f, ctx)]
    if not weights_bad:
        plans.append(_plain("check_inputs", f, ctx))
    return plans


def _for_fp16_overflow(f: Finding, ctx: _Context) -> list[_Plan | None]:
    # Normalising after the layer would not help: the value overflows in the layer's own output.
    extra = [_plain("gradient_clipping", f, ctx)] if f.evidence.get("gradient") else []
    return [_plain("bf16_autocast", f, ctx), *extra]


def _for_fp16_underflow(f: Finding, ctx: _Context) -> list[_Plan | None]:
    # A float32 gradient is reported only when loss scaling could not save it (it spans more than float16 can).
    if f.evidence.get("gradient") and f.evidence.get("float16", 1.0):
        return [_plain("loss_scaling", f, ctx), _plain("bf16_autocast", f, ctx)]
    return [_plain("bf16_autocast", f, ctx)]


def _for_large_updates(f: Finding, ctx: _Context) -> list[_Plan | None]:
    return [_plain("lower_learning_rate", f, ctx), _plain("gradient_clipping", f, ctx)]


def _for_stalled_updates(f: Finding, ctx: _Context) -> list[_Plan | None]:
    first = [_plain("switch_optimizer", f, ctx)] if "effective_step_decay" in f.evidence else []
    return [*first, _plain("raise_learning_rate", f, ctx)]


def _for_lost_updates(f: Finding, ctx: _Context) -> list[_Plan | None]:
    half = bool(f.evidence.get("float16"))
    scaler = _SCALER if half else ""
    backward = _SCALED_BACKWARD if half else _BACKWARD
    dtype = "float16" if half else "bfloat16"
    return [_plain("fp32_master_weights", f, ctx, dtype=dtype, scaler=scaler, backward=backward)]


REMEDIES: Mapping[str, Callable[[Finding, _Context], list[_Plan | None]]] = {
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


def _plans(f: Finding, ctx: _Context) -> list[_Plan]:
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
    ctx = _Context.of(layers, model)
    return tuple(dataclasses.replace(f, fixes=tuple(p.fix for p in _plans(f, ctx))) for f in findings)


# ------------------------------------------------------------------------------------------------ verification
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        head, last = name.rsplit(".", 1)
        return model.get_submodule(head), last
    return model, name


def _apply(model: nn.Module, plan: _Plan, generator_seed: int) -> None:
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


def _renamed(name: str, plan: _Plan) -> str:
    """Where a layer's output is found in the patched copy: a wrapped layer's output is its norm's input."""
    return f"{name}.0" if plan.fix.code in ("batchnorm", "layernorm") and name in plan.targets else name


def _measure(f: Finding, layers: Sequence[LayerStats], plan: _Plan | None) -> dict[str, float]:
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
    names = _finding_layers(f)
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
    ctx = _Context.of(report.layers, model)
    before_codes = {f.code for f in report.findings}
    cache: dict[tuple[str, str], tuple[bool | None, tuple[LayerStats, ...], tuple[Finding, ...]]] = {}
    out: list[Finding] = []
    for finding in report.findings:
        plans = {p.fix.code: p for p in _plans(finding, ctx)}
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
    model: nn.Module, plan: _Plan, rerun: Callable[[nn.Module], Report], seed: int
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
