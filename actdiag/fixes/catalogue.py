"""The fix catalogue: one entry per fix code with its text, its snippet template and whether `--try-fixes` can verify
it by re-running a copy of the model. Data only: which finding gets which fix is `actdiag.fixes.remedies`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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
MASTER = (
    "model.float()  # float32 weights, updated exactly\n"
    "optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)  # the same optimizer, over them\n"
)
BACKWARD = "loss.backward()\noptimizer.step()\noptimizer.zero_grad()"
# Computing in float16 (not bfloat16) also needs loss scaling: `{scaler}` and `{backward}` of fp32_master_weights.
SCALER = "scaler = torch.amp.GradScaler(x.device.type)\n"
SCALED_BACKWARD = "scaler.scale(loss).backward()\nscaler.step(optimizer)\nscaler.update()\noptimizer.zero_grad()"

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
        MASTER + "{scaler}with torch.autocast(device_type=x.device.type, dtype=torch.{dtype}):\n"
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
