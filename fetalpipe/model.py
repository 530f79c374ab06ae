"""The heatmap U-Net. `seed` is the report's lightweight U-Net; other named configs trade width,
depth and input stride for CPU cost, and one adds attention gates on the skips (Attention U-Net)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    base_width: int = 32  # channels of the first encoder block; doubles per level
    depth: int = 2  # encoder blocks (each followed by 2x down-sampling) before the bottleneck
    stem_stride: int = 1  # 2 = a strided stem conv: the U-Net runs at half resolution, 4x cheaper
    attention: bool = False  # attention gates on the skip connections
    out_maps: int = 4  # heatmaps produced (4 ordered landmarks or 2 order-free pairs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


MODEL_CONFIGS = {
    "seed": ModelConfig(),
    "attention": ModelConfig(attention=True),
    "fast": ModelConfig(base_width=16, depth=3, stem_stride=2),
}


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class AttentionGate(nn.Module):
    """Additive attention (Oktay et al. 2018): the decoder signal decides which skip pixels pass."""

    def __init__(self, skip_channels: int, gate_channels: int, inner_channels: int):
        super().__init__()
        self.skip_proj = nn.Conv2d(skip_channels, inner_channels, 1)
        self.gate_proj = nn.Conv2d(gate_channels, inner_channels, 1)
        self.score = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(inner_channels, 1, 1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.score(self.skip_proj(skip) + self.gate_proj(gate))


class HeatmapUNet(nn.Module):
    """[B, 1, S, S] image in [0, 1] -> [B, out_maps, S/stem_stride, S/stem_stride] heatmaps in [0, 1]."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        widths = [config.base_width * 2**level for level in range(config.depth + 1)]
        self.stem = (
            nn.Sequential(nn.Conv2d(1, widths[0], 3, stride=2, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
            if config.stem_stride == 2
            else nn.Identity()
        )
        first_in = widths[0] if config.stem_stride == 2 else 1
        self.encoders = nn.ModuleList(
            conv_block(first_in if level == 0 else widths[level - 1], widths[level]) for level in range(config.depth)
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = conv_block(widths[config.depth - 1], widths[config.depth])
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2) for level in reversed(range(config.depth))
        )
        self.gates = nn.ModuleList(
            AttentionGate(widths[level], widths[level], max(widths[level] // 2, 8)) if config.attention else nn.Identity()
            for level in reversed(range(config.depth))
        )
        self.decoders = nn.ModuleList(conv_block(2 * widths[level], widths[level]) for level in reversed(range(config.depth)))
        self.head = nn.Conv2d(widths[0], config.out_maps, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)
        skips = []
        for encoder in self.encoders:
            features = encoder(features)
            skips.append(features)
            features = self.pool(features)
        features = self.bottleneck(features)
        for upsample, gate, decoder, skip in zip(self.upsamplers, self.gates, self.decoders, reversed(skips)):
            features = upsample(features)
            skip = gate(skip, features) if self.config.attention else skip
            features = decoder(torch.cat([skip, features], dim=1))
        return torch.sigmoid(self.head(features).float())


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
