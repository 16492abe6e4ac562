"""MobileNet V1 (Howard et al. 2017) and V2 (Sandler et al. 2018).

V1 follows the paper's Table 1 with TF-slim's channel rule (``max(int(c * alpha), 8)``),
which is what the published 0.75/0.5/0.25 checkpoints were built with. V2 follows
torchvision's layout (the one most exported PyTorch MobileNetV2 checkpoints have),
so its parameter count is torchvision's 3,504,872 at width 1.0.

``InvertedResidual`` is the block other families (MnasNet-, EfficientNet-style
networks) import: expansion, depthwise, optional squeeze-excite, linear projection.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.errors import InputError
from models.layers import ActLayer, ClassifierHead, ConvBNAct, SqueezeExcite, make_divisible
from models.registry import register_model

__all__ = ["DepthwiseSeparable", "InvertedResidual", "MobileNetV1", "MobileNetV2"]

_V1_PAPER = ("Howard et al. 2017, MobileNets: Efficient Convolutional Neural Networks for "
             "Mobile Vision Applications, arXiv:1704.04861")
_V2_PAPER = ("Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks, "
             "CVPR 2018, arXiv:1801.04381")


def _check_width(name: str, width_mult: float) -> None:
    if not width_mult > 0:
        raise InputError(f"{name} width_mult", "a positive number", repr(width_mult))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv -> BN -> ReLU, then 1x1 pointwise conv -> BN -> ReLU (V1, Fig. 3 right).

    Two separate ConvBNAct units rather than one fused op so that BN folding and
    per-layer parity checks see the two convolutions the paper counts.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1,
                 act_layer: ActLayer = nn.ReLU) -> None:
        super().__init__()
        self.conv_dw = ConvBNAct(in_chs, in_chs, 3, stride, groups=in_chs, act_layer=act_layer)
        self.conv_pw = ConvBNAct(in_chs, out_chs, 1, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (kxk) -> [SE] -> linear 1x1 projection, skip when shapes match.

    The projection has no activation: the V2 paper's "linear bottleneck" (Sec. 3.2),
    since a ReLU on the narrow tensor destroys information. SE sits after the
    depthwise conv on the expanded channels, reduced to ``in_chs * se_ratio``
    channels, as in MnasNet and EfficientNet; the skip is added without an
    activation after it.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        expand_ratio: float = 6.0,
        kernel_size: int = 3,
        se_ratio: float = 0.0,
        act_layer: ActLayer = nn.ReLU6,
        se_act_layer: ActLayer = nn.ReLU,
        se_gate_layer: ActLayer = nn.Sigmoid,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        mid_chs = int(round(in_chs * expand_ratio))
        self.has_skip = stride == 1 and in_chs == out_chs
        # With expansion 1 the block starts directly at the depthwise conv (V2's first block).
        self.conv_pw = (ConvBNAct(in_chs, mid_chs, 1, act_layer=act_layer)
                        if mid_chs != in_chs else nn.Identity())
        self.conv_dw = ConvBNAct(mid_chs, mid_chs, kernel_size, stride, groups=mid_chs,
                                 act_layer=act_layer, dilation=dilation)
        self.se = (SqueezeExcite(mid_chs, rd_channels=max(1, int(in_chs * se_ratio)),
                                 act_layer=se_act_layer, gate_layer=se_gate_layer)
                   if se_ratio > 0 else nn.Identity())
        self.conv_pwl = ConvBNAct(mid_chs, out_chs, 1, act_layer=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return x + out if self.has_skip else out


def _init_weights(model: nn.Module) -> None:
    """torchvision's MobileNet init: He (fan-out) convs, BN at identity, small-normal classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# (output channels, stride) of the 13 depthwise-separable blocks, paper Table 1.
_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class MobileNetV1(nn.Module):
    """MobileNet V1 with the width multiplier alpha; resolution is just the input size.

    ``drop_rate`` defaults to TF-slim's ``dropout_keep_prob=0.999``, the setting
    its ImageNet checkpoints were trained with.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 drop_rate: float = 0.001, min_depth: int = 8, stem_stride: int = 2) -> None:
        super().__init__()
        _check_width("mobilenet_v1", width_mult)

        def depth(c: int) -> int:
            return max(int(c * width_mult), min_depth)

        chs = depth(32)
        self.stem = ConvBNAct(in_chans, chs, 3, stride=stem_stride)
        blocks = []
        for out_chs, stride in _V1_BLOCKS:
            blocks.append(DepthwiseSeparable(chs, depth(out_chs), stride))
            chs = depth(out_chs)
        self.blocks = nn.Sequential(*blocks)
        self.num_features = chs
        self.head = ClassifierHead(chs, num_classes, drop_rate)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# (expansion t, output channels c, repeats n, first stride s), V2 paper Table 2.
_V2_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNet V2; ``se=True`` puts squeeze-excite in every inverted residual.

    Channels round to multiples of 8; the 1280-channel head is not narrowed below
    width 1.0 (the paper, Sec. 6.1: it keeps the small models' accuracy up).
    ``stem_stride=1`` is the usual small-input (CIFAR/MNIST) adaptation: the network's
    output stride drops from 32 to 16, so a 28x28 digit still has 2x2 features at the
    end; parameters are unchanged, MACs grow about 4x.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width_mult: float = 1.0,
                 se: bool = False, se_ratio: float = 0.25, drop_rate: float = 0.2,
                 round_nearest: int = 8, stem_stride: int = 2) -> None:
        super().__init__()
        _check_width("mobilenet_v2", width_mult)
        chs = make_divisible(32 * width_mult, round_nearest)
        self.stem = ConvBNAct(in_chans, chs, 3, stride=stem_stride, act_layer=nn.ReLU6)
        blocks = []
        for t, c, n, s in _V2_BLOCKS:
            out_chs = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                blocks.append(InvertedResidual(chs, out_chs, s if i == 0 else 1, t,
                                               se_ratio=se_ratio if se else 0.0))
                chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        self.conv_head = ConvBNAct(chs, self.num_features, 1, act_layer=nn.ReLU6)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def mobilenet_v1(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV1:
    return MobileNetV1(num_classes, in_chans, **kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def mobilenet_v1_075(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV1:
    return MobileNetV1(num_classes, in_chans, width_mult=0.75, **kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def mobilenet_v1_050(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV1:
    return MobileNetV1(num_classes, in_chans, width_mult=0.5, **kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def mobilenet_v1_025(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV1:
    return MobileNetV1(num_classes, in_chans, width_mult=0.25, **kw)


@register_model(input_size=224, small_input_size=32, paper=_V2_PAPER)
def mobilenet_v2(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV2:
    return MobileNetV2(num_classes, in_chans, **kw)


@register_model(input_size=224, small_input_size=32, paper=_V2_PAPER)
def mobilenet_v2_050(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV2:
    return MobileNetV2(num_classes, in_chans, width_mult=0.5, **kw)


@register_model(input_size=224, small_input_size=32, paper=_V2_PAPER)
def mobilenet_v2_035(num_classes: int = 1000, in_chans: int = 3, **kw) -> MobileNetV2:
    return MobileNetV2(num_classes, in_chans, width_mult=0.35, **kw)
