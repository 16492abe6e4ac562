"""DenseNet-BC (Huang et al. 2017): pre-activation dense layers with bottleneck and compression.

ImageNet models follow torchvision's layout (7x7/2 stem + max pool, BN-ReLU before
every conv, bias-free convs), so the counts are torchvision's. ``densenet_cifar``
is the paper's DenseNet-BC (L=100, k=12) for 32x32 inputs: a 3x3 stem of 2k
filters, three dense blocks of 16 bottleneck layers.

Every layer concatenates with plain ``torch.cat``: no checkpointed
"memory-efficient" variant, whose custom autograd does not export to ONNX.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from models.errors import InputError
from models.registry import register_model

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet"]

_PAPER = "Huang et al. 2017, Densely Connected Convolutional Networks, CVPR 2017, arXiv:1608.06993"


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (to ``bn_size * growth_rate``) -> BN-ReLU-Conv3x3 (to ``growth_rate``).

    Returns only the new ``growth_rate`` channels; the block does the concatenation.
    """

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int = 4,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        mid_chs = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid_chs, growth_rate, 3, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.drop(self.conv2(self.relu2(self.norm2(x))))


class DenseBlock(nn.ModuleDict):
    """Dense connectivity: every layer sees the block input and all earlier outputs (feature reuse).

    Concatenation is incremental, one two-input concat per layer, which keeps the
    exported graph small; the arithmetic is the same as concatenating the whole list.
    Layers are named ``denselayer1..N`` as in torchvision, so its state dicts load as they are.
    """

    def __init__(self, num_layers: int, in_chs: int, growth_rate: int, bn_size: int = 4,
                 drop_rate: float = 0.0) -> None:
        super().__init__({
            f"denselayer{i + 1}": DenseLayer(in_chs + i * growth_rate, growth_rate, bn_size,
                                             drop_rate)
            for i in range(num_layers)})
        self.out_channels = in_chs + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 then 2x2 average pool between blocks.

    The 1x1 conv is where compression happens: without it the concatenated width
    would keep growing from block to block.
    """

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """DenseNet-BC; ``compression`` is the paper's theta (a transition keeps floor(theta * m)).

    ``stem``: ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) or ``"cifar"`` (one 3x3
    conv, no downsampling), as in the paper's Sec. 3 "Implementation Details".
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        stem: Literal["imagenet", "cifar"] = "imagenet",
    ) -> None:
        super().__init__()
        if not 0 < compression <= 1:
            raise InputError("densenet compression", "a number in (0, 1]", repr(compression))
        if stem == "imagenet":
            stem_layers = [
                ("conv0", nn.Conv2d(in_chans, num_init_features, 7, 2, 3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(3, 2, 1)),
            ]
        elif stem == "cifar":
            stem_layers = [("conv0", nn.Conv2d(in_chans, num_init_features, 3, 1, 1, bias=False))]
        else:
            raise InputError("densenet stem", "'imagenet' or 'cifar'", repr(stem))
        self.features = nn.Sequential()
        for name, layer in stem_layers:
            self.features.add_module(name, layer)
        chs = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, chs, growth_rate, bn_size, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            chs = block.out_channels
            if i != len(block_config) - 1:
                out_chs = int(math.floor(chs * compression))
                self.features.add_module(f"transition{i + 1}", Transition(chs, out_chs))
                chs = out_chs
        # Pre-activation layers leave the last block un-normalised: one BN-ReLU before pooling.
        self.features.add_module(f"norm{len(block_config) + 1}", nn.BatchNorm2d(chs))
        self.features.add_module("relu", nn.ReLU(inplace=True))
        self.num_features = chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(chs, num_classes)

        # torchvision's init (the paper's Torch code: He-normal convs, BN at identity).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def densenet121(num_classes: int = 1000, in_chans: int = 3, **kw) -> DenseNet:
    return DenseNet(num_classes, in_chans, 32, (6, 12, 24, 16), 64, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def densenet169(num_classes: int = 1000, in_chans: int = 3, **kw) -> DenseNet:
    return DenseNet(num_classes, in_chans, 32, (6, 12, 32, 32), 64, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def densenet201(num_classes: int = 1000, in_chans: int = 3, **kw) -> DenseNet:
    return DenseNet(num_classes, in_chans, 32, (6, 12, 48, 32), 64, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def densenet161(num_classes: int = 1000, in_chans: int = 3, **kw) -> DenseNet:
    return DenseNet(num_classes, in_chans, 48, (6, 12, 36, 24), 96, **kw)


@register_model(input_size=32, small_input_size=32, paper=_PAPER + " (DenseNet-BC, L=100, k=12)")
def densenet_cifar(num_classes: int = 1000, in_chans: int = 3, **kw) -> DenseNet:
    """DenseNet-BC-100 with k=12 for CIFAR: (100 - 4) / 6 = 16 bottleneck layers per block."""
    kw = {"growth_rate": 12, "block_config": (16, 16, 16), "num_init_features": 24,
          "stem": "cifar", **kw}
    return DenseNet(num_classes, in_chans, **kw)
