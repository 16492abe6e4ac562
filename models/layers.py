"""Building blocks shared by the zoo.

Each block is written the way the reference implementations write it (layer
order, bias/no-bias, BN placement), because parameter counts are how we check an
architecture against its paper: a block that is "almost" the same gives a count
that is wrong, and an exported graph that differs from what users expect.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

ActLayer = Callable[..., nn.Module]


def he_init(model: nn.Module) -> None:
    """torchvision's ResNet init, which the ResNet-derived papers here (ResNeXt, Xception's
    Cadene port, ShiftNet, the sparse-shift FE-Net) all use: He-normal (fan_out) convs, unit
    BatchNorm; Linear keeps PyTorch's default. One copy, so they cannot drift apart."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10%.

    The rule of the TF MobileNet reference code: accelerators want channel counts
    in multiples of 8, and width multipliers would otherwise give odd counts.
    """
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> activation; ``act_layer=None`` for a linear bottleneck."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act_layer: ActLayer | None = nn.ReLU,
        padding: int | None = None,
        dilation: int = 1,
    ) -> None:
        if padding is None:
            padding = ((kernel_size - 1) // 2) * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        if act_layer is not None:
            layers.append(act_layer(inplace=True) if _takes_inplace(act_layer) else act_layer())
        super().__init__(*layers)
        self.out_channels = out_chs


def _takes_inplace(act_layer: ActLayer) -> bool:
    return act_layer in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): global pool -> FC -> ReLU -> FC -> gate -> scale.

    The FCs are 1x1 convs with bias, as in the paper's Caffe/PyTorch releases, so
    SE-ResNet-50 comes out at its published 28,088,024 parameters.
    """

    def __init__(self, channels: int, rd_ratio: float = 1 / 16, rd_channels: int | None = None,
                 act_layer: ActLayer = nn.ReLU, gate_layer: ActLayer = nn.Sigmoid) -> None:
        super().__init__()
        rd = rd_channels or max(1, int(round(channels * rd_ratio)))
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.act = act_layer(inplace=True) if _takes_inplace(act_layer) else act_layer()
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.fc1(s)))
        return x * self.gate(s)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle as reshape/transpose/reshape: pure data movement."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> dropout -> linear: the head of most of the zoo."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.flatten(self.pool(x))))
