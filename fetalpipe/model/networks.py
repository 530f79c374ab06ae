"""The heatmap U-Net. `seed` is the report's lightweight U-Net; other named configs trade width,
depth and input stride for CPU cost, and one adds attention gates on the skips (Attention U-Net).
With ``head="coordinates"`` only the encoder is kept and regresses the 8 endpoint coordinates (the
seed report's §d baseline)."""

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
    out_maps: int = 4  # outputs: 4 ordered maps, 2 order-free pair maps, 1 ellipse map or 8 coordinates
    max_width: int = 0  # caps the channel doubling (0 = no cap): deep, cheap levels for global context
    head: str = "heatmap"  # or "coordinates": encoder, global average pool, linear -> out_maps numbers in [0, 1]
    output: str = "sigmoid"  # or "logits": raw scores (the refinement stage takes a softmax over each row itself)

    def widths(self) -> list[int]:
        widths = [self.base_width * 2**level for level in range(self.depth + 1)]
        return [min(width, self.max_width) for width in widths] if self.max_width else widths

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


MODEL_CONFIGS = {
    "seed": ModelConfig(),
    "attention": ModelConfig(attention=True),
    "fast": ModelConfig(base_width=16, depth=3, stem_stride=2),
    # `fast` with two more levels capped at 128 channels: the bottleneck sees the whole 256² input
    # (large late-pregnancy heads fill most of the frame), for a few % more compute.
    "fast_deep": ModelConfig(base_width=16, depth=5, stem_stride=2, max_width=128),
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
    """[B, 1, H, W] image in [0, 1] -> [B, out_maps, H/stem_stride, W/stem_stride] heatmaps in [0, 1] (or logits with
    ``output="logits"``; or [B, out_maps] coordinates in [0, 1] with the ``coordinates`` head). H and W: multiples of
    stem_stride × 2**depth."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        widths = config.widths()
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
        if config.head not in ("heatmap", "coordinates"):
            raise ValueError(f"model head must be 'heatmap' or 'coordinates', got {config.head!r}")
        if config.head == "coordinates":  # no decoder: its parameters would sit unused (and DDP refuses those)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[config.depth], config.out_maps))
            return
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
        if self.config.head == "coordinates":
            return torch.sigmoid(self.head(features).float())
        for upsample, gate, decoder, skip in zip(self.upsamplers, self.gates, self.decoders, reversed(skips)):
            features = upsample(features)
            skip = gate(skip, features) if self.config.attention else skip
            features = decoder(torch.cat([skip, features], dim=1))
        scores = self.head(features).float()
        return scores if self.config.output == "logits" else torch.sigmoid(scores)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Inference only: fold every BatchNorm into the convolution before it, and remove it. Same outputs (to float
    rounding), one memory-bound pass fewer per block, and each conv directly followed by its ReLU (which the int8
    quantizer fuses into one op). The model must be in eval mode and is changed in place."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (it uses the running statistics)")
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequence._modules)
        folded = []
        for conv_name, norm_name in zip(names, names[1:]):
            conv, norm = sequence._modules[conv_name], sequence._modules[norm_name]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None])
                conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)
                folded.append(norm_name)
        for norm_name in folded:
            del sequence._modules[norm_name]
    return model


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, BatchNorm folded, channels_last weights (on AVX2 CPUs ~1.5x faster forward with
    channels_last input; `bench/infer_bench.py`). Feed it `to_model_input(...)`."""
    return fold_batchnorm(model.eval()).to(memory_format=torch.channels_last)


def to_model_input(images) -> torch.Tensor:
    """float32 [B, H, W] images in [0, 1] -> the [B, 1, H, W] channels_last tensor a prepared model expects."""
    import numpy as np

    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)[:, None])
    return tensor.contiguous(memory_format=torch.channels_last)
