"""ShuffleNet V1 (Zhang et al. 2017) and V2 (Ma et al. 2018).

V1: stage widths from the paper's Table 1, scaled by ``scale`` ("ShuffleNet s×");
units and head follow Megvii's official release (github.com/megvii-model/
ShuffleNet-Series), including its stem widths per scale and its bias-free
classifier, so its checkpoints fit. The first pointwise conv of stage 2 is not
grouped (paper Sec. 3.3: its input has only 24 channels).

V2: torchvision's layout (1,366,792 / 2,278,604 / 3,503,624 / 7,393,996 params for
x0.5 / x1.0 / x1.5 / x2.0). Both use Megvii's weight init.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.errors import InputError
from models.layers import ChannelShuffle, ConvBNAct, channel_shuffle, make_divisible
from models.registry import register_model

__all__ = ["ShuffleV1Unit", "ShuffleNetV1", "ShuffleV2Unit", "ShuffleNetV2"]

_V1_PAPER = ("Zhang et al. 2017, ShuffleNet: An Extremely Efficient Convolutional Neural "
             "Network for Mobile Devices, CVPR 2018, arXiv:1707.01083")
_V2_PAPER = ("Ma et al. 2018, ShuffleNet V2: Practical Guidelines for Efficient CNN "
             "Architecture Design, ECCV 2018, arXiv:1807.11164")


def _init_weights(model: nn.Module, stem: nn.Module) -> None:
    """Megvii's init: N(0, 1/fan_in_per_group) convs, N(0, 0.01) for the stem and classifier."""
    stem_convs = {id(m) for m in stem.modules()}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            std = 0.01 if id(m) in stem_convs else 1.0 / m.weight.shape[1]
            nn.init.normal_(m.weight, 0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.constant_(m.bias, 0.0001)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ShuffleV1Unit(nn.Module):
    """Paper Fig. 2(b)/(c): 1x1 GConv -> shuffle -> 3x3 DWConv -> 1x1 GConv, then add or concat.

    The bottleneck is a quarter of the unit's output width. A stride-2 unit's
    main branch makes ``out - in`` channels and is concatenated with a 3x3/2
    average pool of the input, so the width grows without a projection conv.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int,
                 group_first_pw: bool = True) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV1Unit stride must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"a stride-1 unit keeps its width, got {in_chs} -> {out_chs}")
        mid_chs = out_chs // 4
        branch_out = out_chs - in_chs if stride == 2 else out_chs
        self.stride = stride
        self.conv_pw = ConvBNAct(in_chs, mid_chs, 1, groups=groups if group_first_pw else 1)
        self.shuffle = ChannelShuffle(groups) if groups > 1 else nn.Identity()
        self.conv_dw = ConvBNAct(mid_chs, mid_chs, 3, stride, groups=mid_chs, act_layer=None)
        self.conv_pwl = ConvBNAct(mid_chs, branch_out, 1, groups=groups, act_layer=None)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_pwl(self.conv_dw(self.shuffle(self.conv_pw(x))))
        if self.stride == 2:
            return self.act(torch.cat([self.shortcut(x), out], 1))
        return self.act(x + out)


# Stage 2-4 output widths at 1x, paper Table 1.
_V1_STAGE_CHS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                 4: (272, 544, 1088), 8: (384, 768, 1536)}
# Stem widths of Megvii's released models per scale (not a formula: 1.5x keeps 24).
_V1_STEM_CHS = {0.5: 12, 1.0: 24, 1.5: 24, 2.0: 48}


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 with ``groups`` in {1, 2, 3, 4, 8} and width ``scale``.

    Stage widths round to multiples of ``4 * groups`` so that every grouped conv,
    including the bottleneck (a quarter of the width), divides evenly; at the
    paper's and Megvii's scales the rounding changes nothing.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, groups: int = 3,
                 scale: float = 1.0, stem_chs: int | None = None, drop_rate: float = 0.0) -> None:
        super().__init__()
        if groups not in _V1_STAGE_CHS:
            raise InputError("shufflenet_v1 groups", f"one of {sorted(_V1_STAGE_CHS)}",
                             repr(groups))
        if not scale > 0:
            raise InputError("shufflenet_v1 scale", "a positive number", repr(scale))
        stage_chs = [make_divisible(c * scale, 4 * groups) for c in _V1_STAGE_CHS[groups]]
        if stem_chs is None:
            stem_chs = make_divisible(_V1_STEM_CHS.get(scale, 24 * scale), groups)
        self.stem = ConvBNAct(in_chans, stem_chs, 3, stride=2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chs = stem_chs
        stages = []
        for stage_idx, (out_chs, repeats) in enumerate(zip(stage_chs, (4, 8, 4))):
            units = []
            for i in range(repeats):
                units.append(ShuffleV1Unit(chs, out_chs, 2 if i == 0 else 1, groups,
                                           group_first_pw=not (stage_idx == 0 and i == 0)))
                chs = out_chs
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.num_features = chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(chs, num_classes, bias=False)
        _init_weights(self, self.stem)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.maxpool(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.flatten(self.pool(self.forward_features(x)))))


class ShuffleV2Unit(nn.Module):
    """Paper Fig. 3(c)/(d): channel split, one branch transformed, concat, shuffle.

    Stride 1 sends half the channels through untouched; stride 2 feeds the whole
    input to both branches, doubling the width. The depthwise convs have no ReLU.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV2Unit stride must be 1 or 2, got {stride}")
        branch_chs = out_chs // 2
        if stride == 1 and in_chs != 2 * branch_chs:
            raise ValueError(f"a stride-1 unit keeps its width, got {in_chs} -> {out_chs}")
        self.stride = stride
        if stride == 2:
            self.branch1: nn.Module = nn.Sequential(
                ConvBNAct(in_chs, in_chs, 3, stride, groups=in_chs, act_layer=None),
                ConvBNAct(in_chs, branch_chs, 1))
        else:
            self.branch1 = nn.Identity()
        b2_in = in_chs if stride == 2 else branch_chs
        self.branch2 = nn.Sequential(
            ConvBNAct(b2_in, branch_chs, 1),
            ConvBNAct(branch_chs, branch_chs, 3, stride, groups=branch_chs, act_layer=None),
            ConvBNAct(branch_chs, branch_chs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


# Stem, stage 2-4 and conv5 widths, paper Table 5.
_V2_CHS = {0.5: (24, 48, 96, 192, 1024), 1.0: (24, 116, 232, 464, 1024),
           1.5: (24, 176, 352, 704, 1024), 2.0: (24, 244, 488, 976, 2048)}


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 stage_chs: tuple[int, int, int, int, int] = _V2_CHS[1.0],
                 stage_repeats: tuple[int, int, int] = (4, 8, 4), drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(stage_chs) != len(stage_repeats) + 2:
            raise InputError("shufflenet_v2 stage_chs", f"{len(stage_repeats) + 2} widths",
                             repr(stage_chs))
        self.stem = ConvBNAct(in_chans, stage_chs[0], 3, stride=2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chs = stage_chs[0]
        stages = []
        for out_chs, repeats in zip(stage_chs[1:-1], stage_repeats):
            units = []
            for i in range(repeats):
                units.append(ShuffleV2Unit(chs, out_chs, 2 if i == 0 else 1))
                chs = out_chs
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.num_features = stage_chs[-1]
        self.conv_head = ConvBNAct(chs, self.num_features, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)
        _init_weights(self, self.stem)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.stages(self.maxpool(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.flatten(self.pool(self.forward_features(x)))))


def _v1(groups: int, num_classes: int, in_chans: int, kw: dict) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes, in_chans, groups=groups, **kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def shufflenet_v1_g1(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV1:
    return _v1(1, num_classes, in_chans, kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def shufflenet_v1_g2(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV1:
    return _v1(2, num_classes, in_chans, kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def shufflenet_v1_g3(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV1:
    return _v1(3, num_classes, in_chans, kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def shufflenet_v1_g4(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV1:
    return _v1(4, num_classes, in_chans, kw)


@register_model(input_size=224, small_input_size=32, paper=_V1_PAPER)
def shufflenet_v1_g8(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV1:
    return _v1(8, num_classes, in_chans, kw)


@register_model(input_size=224, small_input_size=32, paper=_V2_PAPER)
def shufflenet_v2_x0_5(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_chans, _V2_CHS[0.5], **kw)


@register_model(input_size=224, small_input_size=32, paper=_V2_PAPER)
def shufflenet_v2_x1_0(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_chans, _V2_CHS[1.0], **kw)


@register_model(input_size=224, small_input_size=32, paper=_V2_PAPER)
def shufflenet_v2_x1_5(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_chans, _V2_CHS[1.5], **kw)


@register_model(input_size=224, small_input_size=32, paper=_V2_PAPER)
def shufflenet_v2_x2_0(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, in_chans, _V2_CHS[2.0], **kw)
