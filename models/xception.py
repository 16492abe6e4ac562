"""Xception (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017).

Laid out as the Keras reference (``keras.applications.Xception``) and the PyTorch
port timm ships as ``legacy_xception``: an entry flow of three downsampling
blocks, a middle flow of eight 728-channel blocks and an exit flow; every block
is ReLU -> separable conv -> BN repeated, with a 1x1 stride-2 conv + BN on the
shortcut wherever the shape changes. Both references count 22,855,952
parameters, which is what this module builds (the stem convs are unpadded as in
Keras, so a 299 input becomes 10x10 before the pool).

The separable conv has no BN or ReLU between its depthwise and pointwise halves,
as in the paper (section 4.7 reports that an intermediate activation hurt).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.layers import ClassifierHead, he_init
from models.registry import register_model

_PAPER = "Chollet 2017, Xception: Deep Learning with Depthwise Separable Convolutions"


class SeparableConv2d(nn.Sequential):
    """Depthwise kxk conv then pointwise 1x1 conv, both bias-free (BN follows)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, kernel_size, padding=kernel_size // 2,
                                 groups=in_chs, bias=False)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU -> SeparableConv -> BN), optional 3x3/2 max pool, residual add.

    ``grow_first`` puts the channel change in the first separable conv (entry
    flow) or the last one (the exit-flow block 728 -> 1024). The leading ReLU is
    not in-place: the shortcut reads the same tensor, pre-activation, as in Keras.
    """

    def __init__(self, in_chs: int, out_chs: int, reps: int, stride: int = 1,
                 start_with_relu: bool = True, grow_first: bool = True) -> None:
        super().__init__()
        if out_chs != in_chs or stride != 1:
            self.skip = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out_chs))
        else:
            self.skip = nn.Identity()
        chans = [in_chs] + [out_chs if grow_first else in_chs] * (reps - 1) + [out_chs]
        layers: list[nn.Module] = []
        for i in range(reps):
            if i > 0 or start_with_relu:
                layers.append(nn.ReLU(inplace=i > 0))
            layers += [SeparableConv2d(chans[i], chans[i + 1]), nn.BatchNorm2d(chans[i + 1])]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, padding=1))
        self.rep = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rep(x) + self.skip(x)


class Xception(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        # entry flow
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, stride=2, bias=False), nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        blocks = [
            XceptionBlock(64, 128, 2, stride=2, start_with_relu=False),
            XceptionBlock(128, 256, 2, stride=2),
            XceptionBlock(256, 728, 2, stride=2),
        ]
        # middle flow
        blocks += [XceptionBlock(728, 728, 3) for _ in range(8)]
        # exit flow
        blocks.append(XceptionBlock(728, 1024, 2, stride=2, grow_first=False))
        self.blocks = nn.Sequential(*blocks)
        self.head_convs = nn.Sequential(
            SeparableConv2d(1024, 1536), nn.BatchNorm2d(1536), nn.ReLU(inplace=True),
            SeparableConv2d(1536, 2048), nn.BatchNorm2d(2048), nn.ReLU(inplace=True),
        )
        self.num_features = 2048
        self.head = ClassifierHead(2048, num_classes, drop_rate)
        he_init(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_convs(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model(input_size=299, small_input_size=32, paper=_PAPER)
def xception(num_classes: int = 1000, in_chans: int = 3, **kw) -> Xception:
    """Xception: 22,855,952 params, 8.36 GMACs at 299x299."""
    return Xception(num_classes=num_classes, in_chans=in_chans, **kw)
