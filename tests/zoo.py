"""Small named models with one pathology each, and healthy controls on which no rule may fire.

Every model has a docstring naming what is wrong with it (or why it is healthy) and an `example_input()` giving a
batch it is meant to be inspected on. Widths are small so a test runs in a fraction of a second; where a pathology
depends on the per-layer gain sigma_w * sqrt(fan_in), the weights are scaled with the width so the gain matches the
classic full-size experiment.

`PATHOLOGIES` maps each model to the finding code it must produce; `HEALTHY` lists the controls.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(width: int, depth: int, act: type[nn.Module], std: float | None, init: str | None = None) -> nn.Sequential:
    """`depth` blocks of Linear(width, width) + activation; weights N(0, std^2) or a named init, zero biases."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            if init == "xavier":
                nn.init.xavier_normal_(lin.weight)
            elif init == "he":
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            elif std is not None:
                lin.weight.normal_(0.0, std)
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------------ pathologies
class DeadReluNet(nn.Module):
    """A ReLU layer whose pre-activations are pushed far negative by a bias of -10: every unit outputs zero for
    every sample, so nothing before it receives a gradient (dead_relu, an error)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(width, 4)
        with torch.no_grad():
            self.fc2.bias.fill_(-10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(32, 16, generator=_gen())


class SaturatedTanhNet(nn.Sequential):
    """Tanh MLP with weights N(0, (3.2 / sqrt(width))^2), i.e. N(0, 0.05^2) at width 4096: pre-activations have
    std ~3, a third of the tanh outputs sit at +-1 (saturation)."""

    def __init__(self, width: int = 128, depth: int = 6) -> None:
        super().__init__(*_mlp(width, depth, nn.Tanh, 3.2 / math.sqrt(width)))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class CollapsingTanhNet(nn.Sequential):
    """Tanh MLP with weights N(0, (0.64 / sqrt(width))^2), i.e. N(0, 0.01^2) at width 4096: each layer multiplies
    the spread by ~0.64, so after six layers the activations are a few percent of the input (activation_collapse,
    fixed by Xavier initialisation)."""

    def __init__(self, width: int = 128, depth: int = 6) -> None:
        super().__init__(*_mlp(width, depth, nn.Tanh, 0.64 / math.sqrt(width)))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class DeepXavierReluNet(nn.Sequential):
    """20 Linear+ReLU layers with Xavier initialisation: ReLU halves the second moment each layer and Xavier does not
    make up for it, so the spread falls ~0.71x per layer (activation_collapse, fixed by He initialisation)."""

    def __init__(self, width: int = 64, depth: int = 20) -> None:
        super().__init__(*_mlp(width, depth, nn.ReLU, None, init="xavier"))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class ExplodingReluNet(nn.Sequential):
    """ReLU MLP with weights N(0, (3 / sqrt(width))^2): each layer multiplies the spread by ~2.1
    (activation_explosion)."""

    def __init__(self, width: int = 64, depth: int = 8) -> None:
        super().__init__(*_mlp(width, depth, nn.ReLU, 3.0 / math.sqrt(width)))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class VanishingSigmoidNet(nn.Sequential):
    """Ten Xavier-initialised sigmoid layers: the sigmoid's slope is at most 1/4, so every layer divides the
    gradient by about four on its way back while the forward signal stays put (vanishing_gradient)."""

    def __init__(self, width: int = 64, depth: int = 10) -> None:
        super().__init__(*_mlp(width, depth, nn.Sigmoid, None, init="xavier"))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class ChaoticTanhNet(nn.Sequential):
    """Deep tanh MLP with weights N(0, (4 / sqrt(width))^2), in the chaotic phase of Poole et al. (2016): outputs
    stay bounded but each layer multiplies the backward gradient by ~1.5 (exploding_gradient)."""

    def __init__(self, width: int = 64, depth: int = 16) -> None:
        super().__init__(*_mlp(width, depth, nn.Tanh, 4.0 / math.sqrt(width)))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class DeepVanishingReluNet(nn.Sequential):
    """20 Linear+ReLU layers with weights N(0, (0.226 / sqrt(width))^2), the CS231n N(0, 0.01^2) experiment at width
    500: every layer shrinks the forward spread and the backward gradient ~6x, so the first layer's gradient is
    ~1e-16 of the last's (vanishing_gradient, caused by the activation_collapse it mirrors)."""

    def __init__(self, width: int = 64, depth: int = 20) -> None:
        super().__init__(*_mlp(width, depth, nn.ReLU, 0.226 / math.sqrt(width)))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class ExplodingRNN(nn.Module):
    """Embedding -> ReLU RNN -> linear head over 40 time steps, the recurrent weight orthogonal with gain 2: the
    gradient reaching the embedding of the early tokens grows ~1.4x per time step, ~1e5-1e6 over the sequence
    (exploding_gradient on a three-layer network)."""

    def __init__(self, vocab: int = 50, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.RNN(d, hidden, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(hidden, 5)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=2.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randint(0, 50, (8, 40), generator=_gen())


class Sqrt(nn.Module):
    """Elementwise square root: NaN for negative inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


class NaNNet(nn.Module):
    """Takes the square root of a pre-activation that is negative half the time: NaN first appears in `root`,
    and everything after it inherits the NaN (nonfinite at `root`)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.root = Sqrt()
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.root(self.fc2(self.act(self.fc1(x)))))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(8, 8, generator=_gen())


class HugeActivationNet(nn.Module):
    """A float32 model whose second layer outputs values around 1e6: fine in float32, but they would overflow
    float16 (fp16_overflow, info)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            self.fc2.weight.mul_(1e6)
            self.head.weight.mul_(1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.fc1(x)))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(8, 8, generator=_gen())


def tiny_loss(output: torch.Tensor, inputs: object) -> torch.Tensor:
    """A loss scaled so small that its gradients fall below float16's range (fp16_underflow)."""
    return output.pow(2).mean() * 1e-9


# ------------------------------------------------------------------------------------------------- healthy controls
class XavierTanhNet(nn.Sequential):
    """Healthy: tanh MLP with Xavier initialisation (Glorot & Bengio 2010)."""

    def __init__(self, width: int = 128, depth: int = 6) -> None:
        super().__init__(*_mlp(width, depth, nn.Tanh, None, init="xavier"))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class HeReluNet(nn.Sequential):
    """Healthy: ReLU MLP with He initialisation (He et al. 2015)."""

    def __init__(self, width: int = 128, depth: int = 6) -> None:
        super().__init__(*_mlp(width, depth, nn.ReLU, None, init="he"))
        self.width = width

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, self.width, generator=_gen())


class LeNet5(nn.Sequential):
    """Healthy: LeNet-5 with PyTorch's default initialisation. Each layer shrinks the spread ~0.6x, but over five
    weight layers that is the everyday baseline, not a pathology."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def example_input(self) -> torch.Tensor:
        return torch.randn(16, 1, 28, 28, generator=_gen())


class SmallDefaultMLP(nn.Module):
    """Healthy: the everyday three-layer MLP with PyTorch's default initialisation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(16, 20, generator=_gen())


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepBNCNN(nn.Module):
    """Healthy: a VGG-style CNN, eight He-initialised conv layers each followed by BatchNorm and ReLU."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3, 16, 16, 32, 32, 32, 64, 64, 64]
        blocks: list[nn.Module] = []
        for i in range(8):
            blocks.append(_conv_bn(chans[i], chans[i + 1]))
            if i in (1, 3, 5):
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(4, 3, 16, 16, generator=_gen())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """Healthy: a small ResNet (torchvision-style basic blocks with BatchNorm, He init, skip connections)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(4, 3, 16, 16, generator=_gen())


class PreLNTransformer(nn.Module):
    """Healthy: a pre-LayerNorm transformer encoder (norm_first=True) on token embeddings, with a classifier."""

    def __init__(self, vocab: int = 100, d_model: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens))))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randint(0, 100, (8, 12), generator=_gen())


class LSTMNet(nn.Module):
    """Healthy: a two-layer LSTM over a sequence with a linear read-out of the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(8, 20, 16, generator=_gen())


class FrozenBackboneNet(nn.Module):
    """Healthy: a frozen convolutional backbone (requires_grad=False, as when fine-tuning a pretrained model) and a
    trainable head. The backbone has no gradients at all, which must not read as vanishing."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_conv_bn(3, 16), _conv_bn(16, 32), nn.MaxPool2d(2), _conv_bn(32, 32))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.backbone(x)), 1))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(4, 3, 12, 12, generator=_gen())


class TiedEmbeddingLM(nn.Module):
    """Healthy: a small language model whose output projection shares its weight with the input embedding (weight
    tying, Press & Wolf 2017), with a LayerNorm'd MLP in between."""

    def __init__(self, vocab: int = 200, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.out_norm = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.mlp(self.norm(h))
        return self.decoder(self.out_norm(h))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randint(0, 200, (8, 10), generator=_gen())


class SiameseNet(nn.Module):
    """Healthy: one encoder applied to both inputs (shared weights, every module called twice per step)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(64, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.encoder(a), self.encoder(b)], dim=1))

    @staticmethod
    def example_input() -> tuple[torch.Tensor, torch.Tensor]:
        g = _gen()
        return torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)


class ZeroInitHeadNet(nn.Module):
    """Healthy: an MLP whose classifier head starts at exactly zero (as in ViT): until the first update no gradient
    reaches the layers behind it, by design."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 10)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(16, 20, generator=_gen())


class GatedConvNet(nn.Module):
    """Healthy: a 1-D conv net with sigmoid gates (GLU-style) and GroupNorm, the kind of bounded activation that is
    part of the design rather than a mistake."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 64, 3, padding=1)
        self.norm = nn.GroupNorm(8, 32)
        self.gate = nn.Sigmoid()
        self.conv2 = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        h = self.norm(a) * self.gate(b)
        h = F.relu(self.conv2(h))
        return self.head(h.mean(dim=2))

    @staticmethod
    def example_input() -> torch.Tensor:
        return torch.randn(8, 8, 50, generator=_gen())


PATHOLOGIES: dict[type[nn.Module], str] = {
    DeadReluNet: "dead_relu",
    SaturatedTanhNet: "saturation",
    CollapsingTanhNet: "activation_collapse",
    DeepXavierReluNet: "activation_collapse",
    ExplodingReluNet: "activation_explosion",
    VanishingSigmoidNet: "vanishing_gradient",
    ChaoticTanhNet: "exploding_gradient",
    DeepVanishingReluNet: "vanishing_gradient",
    ExplodingRNN: "exploding_gradient",
    NaNNet: "nonfinite",
    HugeActivationNet: "fp16_overflow",
}

HEALTHY: tuple[type[nn.Module], ...] = (
    XavierTanhNet,
    HeReluNet,
    SmallDefaultMLP,
    LeNet5,
    DeepBNCNN,
    SmallResNet,
    PreLNTransformer,
    LSTMNet,
    FrozenBackboneNet,
    TiedEmbeddingLM,
    SiameseNet,
    GatedConvNet,
    ZeroInitHeadNet,
)


def example(model: nn.Module) -> object:
    """The model's example input (a tensor, or a tuple of positional tensors)."""
    return model.example_input()  # type: ignore[operator]
