"""What several rule families share: which layer types are which, and small numeric helpers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from actdiag.formatting import format_number
from actdiag.records import LayerStats, TensorStats

# Layers whose output is a fresh linear map of their input: the spread of their outputs is what Xavier/He theory
# predicts layer by layer. Normalisation layers own weights too and are kept in the chain on purpose: they reset
# the spread, which is exactly why a normalised network never shows a sustained collapse.
NORM_TYPES = frozenset(
    {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "SyncBatchNorm",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "RMSNorm",
        "LocalResponseNorm",
    }
)

# ReLU-family units that really are dead when they never fire: their gradient is exactly zero for x <= 0.
# LeakyReLU/PReLU/ELU/GELU/SiLU... pass gradient for negative inputs, so "no positive output" is not death there.
DEAD_CAPABLE = frozenset({"ReLU", "ReLU6"})

RELU_LIKE = frozenset(
    {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish", "Hardswish"}
)
TANH_LIKE = frozenset({"Tanh", "Hardtanh", "Softsign", "Tanhshrink"})
SIGMOID_LIKE = frozenset({"Sigmoid", "Hardsigmoid", "LogSigmoid"})
ACTIVATION_TYPES = RELU_LIKE | TANH_LIKE | SIGMOID_LIKE

# Linear maps whose weight `nn.init.kaiming_normal_` / `xavier_normal_` can re-initialise (weight with >= 2 dims).
REINIT_TYPES = frozenset(
    {
        "Linear",
        "Bilinear",
        "LazyLinear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "LazyConv1d",
        "LazyConv2d",
        "LazyConv3d",
        "NonDynamicallyQuantizableLinear",
    }
)


def others_than(layer: str, names: Iterable[str]) -> tuple[str, ...]:
    """A finding's `related`: the layers it names besides its own `layer`, in order, each once."""
    return tuple(dict.fromkeys(n for n in names if n != layer))


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def usable(stats: TensorStats | None) -> bool:
    """Stats with at least one finite value and a finite, non-zero spread."""
    return stats is not None and stats.count > 0 and finite(stats.std) and stats.std > 0


def nonlinearity_after(layers: Sequence[LayerStats], index: int) -> str | None:
    """The type of the activation that follows the weight layer at `index` (skipping normalisation, dropout and
    pooling), or None when another weight layer comes first (functional activations are invisible to hooks)."""
    for layer in layers[index + 1 :]:
        if layer.type in ACTIVATION_TYPES:
            return layer.type
        if layer.weight_name is not None and layer.type not in NORM_TYPES:
            return None
    return None


def output_indices(layers: Sequence[LayerStats]) -> frozenset[int]:
    """Positions of the model's output layer: the records the recorder flagged from the forward's output tensors
    (`LayerStats.output`: every call of a head, an output sigmoid and the linear map before it), or the last layer
    when none is flagged (records from an older report, or built by hand)."""
    flagged = frozenset(i for i, layer in enumerate(layers) if layer.output)
    return flagged or frozenset({len(layers) - 1})


def weight_layer_before(layers: Sequence[LayerStats], index: int) -> int | None:
    """Index of the nearest re-initialisable weight layer before `index` (what feeds an activation)."""
    for i in range(index - 1, -1, -1):
        if layers[i].type in REINIT_TYPES and layers[i].weight_name is not None:
            return i
    return None


def geo_mean(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


# The rules' short name for the one number formatter: messages read like every other number actdiag shows.
fmt = format_number
