"""Small library-default architectures, built from configs with random initialisation (nothing downloaded).

Each entry gives the model as its library builds it (every size shrunk, nothing else changed: initialisation,
normalisation, activations, zero-initialised branches stay the library's own), a batch, and the loss the library
trains it with. These are healthy by construction: none of actdiag's rules may speak about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

Batch = dict[str, torch.Tensor] | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class RealModel:
    """A model, a function giving its i-th training batch, and its loss on (output, batch)."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], Any]
    loss: Callable[[Any, Any], torch.Tensor]


def _gen(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + i)


def _hf_loss(output: Any, batch: Any) -> torch.Tensor:
    return output.loss


# ------------------------------------------------------------------------------------------------ transformers
def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _tokens(i: int, batch: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (batch, length), generator=_gen(i))
    return {"input_ids": ids, "labels": ids}


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def _t5_batch(i: int) -> dict[str, torch.Tensor]:
    g = _gen(i)
    return {
        "input_ids": torch.randint(1, 128, (4, 16), generator=g),
        "labels": torch.randint(1, 128, (4, 8), generator=g),
    }


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return ViTForImageClassification(cfg)


def _images(i: int, batch: int = 8, size: int = 32) -> dict[str, torch.Tensor]:
    g = _gen(i)
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "labels": torch.randint(0, 10, (batch,), generator=g),
    }


def _whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=128,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=32,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    return WhisperForConditionalGeneration(cfg)


def _audio(i: int) -> dict[str, torch.Tensor]:
    g = _gen(i)
    return {
        "input_features": torch.randn(4, 16, 64, generator=g),
        "labels": torch.randint(3, 128, (4, 8), generator=g),
    }


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=32,
    )
    return CLIPModel(cfg)


def _pairs(i: int) -> dict[str, Any]:
    g = _gen(i)
    return {
        "input_ids": torch.randint(0, 128, (8, 12), generator=g),
        "pixel_values": torch.randn(8, 3, 32, 32, generator=g),
        "return_loss": True,
    }


def _convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_stages=3, hidden_sizes=[16, 32, 64], depths=[1, 1, 2], num_labels=10, image_size=32)
    return ConvNextForImageClassification(cfg)


# ---------------------------------------------------------------------------------------------------- plain torch
class _Basic(nn.Module):
    """torchvision's BasicBlock: He init (fan_out), BatchNorm, and the last BatchNorm's gamma at zero
    (`zero_init_residual=True`), so each block starts as the identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """A ResNet-18 (four stages of two basic blocks) at a quarter of the width, initialised as torchvision does
    with `zero_init_residual=True`."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = width
        for k, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if k == 0 else 2
            stages.append(nn.Sequential(_Basic(cin, cout, stride), _Basic(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, _Basic):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. (2015) as it is usually written in PyTorch (double conv + BatchNorm, max-pool
    down, transposed conv up, skip concatenations), three levels deep, PyTorch's default initialisation."""

    def __init__(self, cin: int = 3, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        w = width
        self.inc = _double_conv(cin, w)
        self.down1 = nn.Sequential(nn.MaxPool2d(2), _double_conv(w, 2 * w))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), _double_conv(2 * w, 4 * w))
        self.up1 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.conv1 = _double_conv(4 * w, 2 * w)
        self.up2 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.conv2 = _double_conv(2 * w, w)
        self.outc = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.conv1(torch.cat([x2, self.up1(x3)], dim=1))
        y = self.conv2(torch.cat([x1, self.up2(y)], dim=1))
        return self.outc(y)


def _classify(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(i)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _segment(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(i)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 2, (4, 32, 32), generator=g)


def _ce(output: torch.Tensor, batch: Any) -> torch.Tensor:
    return F.cross_entropy(output, batch[1])


REAL_MODELS: tuple[RealModel, ...] = (
    RealModel("llama", _llama, _tokens, _hf_loss),
    RealModel("t5", _t5, _t5_batch, _hf_loss),
    RealModel("vit", _vit, _images, _hf_loss),
    RealModel("whisper", _whisper, _audio, _hf_loss),
    RealModel("clip", _clip, _pairs, _hf_loss),
    RealModel("convnext", _convnext, _images, _hf_loss),
    RealModel("resnet18", ResNet18, _classify, _ce),
    RealModel("unet", UNet, _segment, _ce),
)


def call(model: nn.Module, batch: Any) -> Any:
    """The model's output on a batch: keyword arguments for a dict, the first tensor of a tuple."""
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch[0])
