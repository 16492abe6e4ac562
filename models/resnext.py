"""ResNet-50, ResNeXt (Xie et al., CVPR 2017) and their SE variants (Hu et al., CVPR 2018).

One bottleneck serves all four ImageNet models, because they differ only in
the 3x3 conv's groups (``cardinality``), its width (``base_width`` channels per
group at the first stage) and an optional Squeeze-Excitation gate applied to
the residual branch before the add:

* ``resnet50`` / ``resnext50_32x4d`` are laid out as torchvision builds them
  (stride on the 3x3 conv, "ResNet v1.5"), with torchvision's module names, so
  its state dicts load as they are.
* ``se_resnet50`` follows the SE paper's released Caffe model (ported by Cadene
  and timm as ``legacy_seresnet50``): the stride sits on the first 1x1 conv, as
  in the original ResNet paper, which is why it costs 3.86 GMACs where
  ``resnet50`` costs 4.09 (same parameters either way).
  ``se_resnext50_32x4d`` follows the same port, which strides the 3x3 conv.

``resnext_cifar`` is a small CIFAR ResNeXt-29 (3x3 stem, three stages of three
bottlenecks, no pooling until the head, as in the paper's section 5.3) at the
widths of the CIFAR bottleneck ResNets (He et al. 2016, "Identity Mappings":
16/32/64-wide bottlenecks, 64/128/256 outputs) with cardinality 4 and 4 channels
per group in the first stage: 0.2M parameters, 31M MACs, so it trains in a test.
The paper's own CIFAR models (8x64d, 16x64d) have 34-68M parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from models.layers import SqueezeExcite, he_init
from models.registry import register_model

_RESNET = "He et al. 2016, Deep Residual Learning for Image Recognition"
_RESNEXT = "Xie et al. 2017, Aggregated Residual Transformations for Deep Neural Networks"
_SENET = "Hu et al. 2018, Squeeze-and-Excitation Networks"


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (grouped) -> 1x1 expand, x4 expansion, optional SE, residual add."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, cardinality: int = 1,
                 base_width: int = 64, se: bool = False, se_reduction: int = 16,
                 stride_in_1x1: bool = False) -> None:
        super().__init__()
        width = int(planes * base_width / 64) * cardinality
        out_chs = planes * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_chs, width, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, groups=cardinality,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.se = SqueezeExcite(out_chs, rd_ratio=1 / se_reduction) if se else nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """Stem + stages of bottlenecks + pooled linear head.

    ``stem="imagenet"``: 7x7/2 conv, BN, ReLU, 3x3/2 max pool, four stages (64..512 planes).
    ``stem="cifar"``: 3x3/1 conv of ``stem_width`` channels, no pool, the stages as given.
    The first stage keeps the resolution; each later stage halves it.
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, in_chans: int = 3,
                 cardinality: int = 1, base_width: int = 64, se: bool = False,
                 stride_in_1x1: bool = False, stem: str = "imagenet", stem_width: int = 64,
                 stage_planes: Sequence[int] = (64, 128, 256, 512), drop_rate: float = 0.0,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if len(stage_planes) != len(layers):
            raise ValueError(f"{len(layers)} stage depths but {len(stage_planes)} stage widths")
        self.num_classes = num_classes
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', not {stem!r}")
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        in_chs = stem_width
        stages = []
        for i, (depth, planes) in enumerate(zip(layers, stage_planes)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(Bottleneck(in_chs, planes, stride, cardinality, base_width, se,
                                         stride_in_1x1=stride_in_1x1))
                in_chs = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        # torchvision's names (layer1..layer4) so its checkpoints load unchanged
        for i, stage in enumerate(stages):
            self.add_module(f"layer{i + 1}", stage)
        self.num_stages = len(stages)
        self.num_features = in_chs
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes)
        _init_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.avgpool(self.forward_features(x)), 1)))


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    he_init(model)
    if zero_init_residual:  # Goyal et al. 2017: each block starts as an identity
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)


@register_model(input_size=224, small_input_size=32, family="resnet", paper=_RESNET)
def resnet50(num_classes: int = 1000, in_chans: int = 3, **kw) -> ResNet:
    """ResNet-50 (torchvision v1.5): 25,557,032 params, 4.09 GMACs at 224."""
    return ResNet((3, 4, 6, 3), num_classes, in_chans, **kw)


@register_model(input_size=224, small_input_size=32, paper=_RESNEXT)
def resnext50_32x4d(num_classes: int = 1000, in_chans: int = 3, **kw) -> ResNet:
    """ResNeXt-50 32x4d: 25,028,904 params, 4.23 GMACs at 224."""
    return ResNet((3, 4, 6, 3), num_classes, in_chans, cardinality=32, base_width=4, **kw)


@register_model(input_size=224, small_input_size=32, family="senet", paper=_SENET)
def se_resnet50(num_classes: int = 1000, in_chans: int = 3, **kw) -> ResNet:
    """SE-ResNet-50 as released (stride in the first 1x1): 28,088,024 params, 3.86 GMACs."""
    kw.setdefault("stride_in_1x1", True)
    return ResNet((3, 4, 6, 3), num_classes, in_chans, se=True, **kw)


@register_model(input_size=224, small_input_size=32, family="senet", paper=_SENET)
def se_resnext50_32x4d(num_classes: int = 1000, in_chans: int = 3, **kw) -> ResNet:
    """SE-ResNeXt-50 32x4d: 27,559,896 params, 4.23 GMACs at 224."""
    return ResNet((3, 4, 6, 3), num_classes, in_chans, cardinality=32, base_width=4, se=True, **kw)


@register_model(input_size=32, small_input_size=32, paper=_RESNEXT)
def resnext_cifar(num_classes: int = 1000, in_chans: int = 3, **kw) -> ResNet:
    """ResNeXt-29, cardinality 4, 16/32/64-wide bottlenecks: a 32x32 model that trains fast."""
    kw.setdefault("cardinality", 4)
    kw.setdefault("base_width", 16)    # width = planes * 16/64 * 4: 4 channels a group at 16
    return ResNet((3, 3, 3), num_classes, in_chans, stem="cifar", stem_width=16,
                  stage_planes=(16, 32, 64), **kw)
