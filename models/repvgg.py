"""RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021).

Trained as a multi-branch net, deployed as a plain stack of 3x3 conv + ReLU:
each block sums a 3x3 conv+BN, a 1x1 conv+BN and (when shapes allow) an
identity BN, and since all three are linear in the input they fold into one
3x3 conv with bias after training (``RepVGGBlock.reparameterize``). The fusing
knowledge lives with the block; ``models.reparam.reparameterize_model`` walks a
whole model.

Module names follow the authors' code (``stage0..4``, ``rbr_dense``,
``rbr_1x1``, ``rbr_identity``, ``rbr_reparam``, ``linear``) so their released
training-form and deploy-form checkpoints load as they are. The ``g2``/``g4``
variants use grouped 3x3 and 1x1 convs on the layers the official code lists as
``optional_groupwise_layers`` (layer indices 2, 4, ..., 26; the stem is 0).

``quant_friendly=True`` (or the ``qarepvgg_*`` names) builds QARepVGG blocks
(Chu et al. 2022, "Make RepVGG Greater Again: A Quantization-aware Approach"):
plain RepVGG loses badly under int8 post-training quantization (ImageNet
RepVGG-A0: 72.4% fp32, 52.2% int8 PTQ; QARepVGG-A0: 72.2% / 70.4%, their Table 1
and Fig. 1) because the identity and 1x1 branches' BNs scale each branch by an
unbounded gamma/std, which after fusion puts outlier values into the 3x3 kernel
and widens the activation range. QARepVGG removes the BN from the identity and
1x1 branches and adds one BN after the sum (module names as in the authors'
YOLOv6 ``QARepVGGBlock``: ``rbr_1x1`` a bias-free conv, ``rbr_identity`` an
``nn.Identity``, ``bn`` the post-sum BN). A bias on the 1x1 conv (the paper's
intermediate variant) is omitted: the post-BN subtracts the batch mean and so
cancels any per-channel constant before it. The deploy form is the same single
3x3 conv with bias as plain RepVGG's (the post-BN folds into it), so a deployed
QARepVGG loads into ``create_model("repvgg_*", deploy=True)``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

from models.registry import register_model

_PAPER = "Ding et al. 2021, RepVGG: Making VGG-style ConvNets Great Again"

_GROUPWISE_LAYERS = tuple(range(2, 27, 2))
_G2 = {layer: 2 for layer in _GROUPWISE_LAYERS}
_G4 = {layer: 4 for layer in _GROUPWISE_LAYERS}


def _conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int,
             groups: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False),
        bn=nn.BatchNorm2d(out_chs),
    ))


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BN into the preceding bias-free conv: W*g/s, b - m*g/s."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ identity BN if in == out and stride 1), then ReLU.

    Built with ``deploy=True`` it holds only ``rbr_reparam``, the fused 3x3 conv
    with bias; ``reparameterize()`` turns a trained block into that form in place.
    With ``quant_friendly=True`` it is a QARepVGG block: ReLU(BN(3x3 conv+BN +
    1x1 conv + identity)), see the module docstring.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, groups: int = 1,
                 deploy: bool = False, quant_friendly: bool = False) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.stride, self.groups = in_chs, out_chs, stride, groups
        self.deploy, self.quant_friendly = deploy, quant_friendly
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_chs, out_chs, 3, stride, 1, groups=groups, bias=True)
            return
        has_identity = in_chs == out_chs and stride == 1
        self.rbr_dense = _conv_bn(in_chs, out_chs, 3, stride, 1, groups)
        if quant_friendly:
            self.rbr_1x1: nn.Module = nn.Conv2d(in_chs, out_chs, 1, stride, 0, groups=groups,
                                                bias=False)
            self.rbr_identity: nn.Module | None = nn.Identity() if has_identity else None
            self.bn = nn.BatchNorm2d(out_chs)
        else:
            self.rbr_identity = nn.BatchNorm2d(in_chs) if has_identity else None
            self.rbr_1x1 = _conv_bn(in_chs, out_chs, 1, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        if self.quant_friendly:
            out = self.bn(out)
        return self.nonlinearity(out)

    def _identity_kernel(self, like: torch.Tensor) -> torch.Tensor:
        """The identity as a (grouped) 3x3 kernel: channel i reads its own index in its group."""
        in_per_group = self.in_chs // self.groups
        ident = torch.zeros_like(like)
        idx = torch.arange(self.in_chs, device=like.device)
        ident[idx, idx % in_per_group, 1, 1] = 1.0
        return ident

    @torch.no_grad()
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and bias equal to the block's branches with BN in eval mode."""
        kernel, bias = _fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        if self.quant_friendly:
            kernel = kernel + nn.functional.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
            if self.rbr_identity is not None:
                kernel = kernel + self._identity_kernel(kernel)
            # post-BN: y = (k * x + b - mean) * g / s + beta
            std = (self.bn.running_var + self.bn.eps).sqrt()
            scale = self.bn.weight / std
            return (kernel * scale.reshape(-1, 1, 1, 1),
                    (bias - self.bn.running_mean) * scale + self.bn.bias)
        k1, b1 = _fuse_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel = kernel + nn.functional.pad(k1, [1, 1, 1, 1])   # 1x1 at the centre tap
        bias = bias + b1
        if self.rbr_identity is not None:
            ki, bi = _fuse_bn(self._identity_kernel(kernel), self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch to deploy form in place: one 3x3 conv with bias, same eval-mode output."""
        if self.deploy:
            return
        kernel, bias = self.fused_kernel_bias()
        conv = nn.Conv2d(self.in_chs, self.out_chs, 3, self.stride, 1, groups=self.groups,
                         bias=True).to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        if self.quant_friendly:
            del self.bn
        self.rbr_reparam = conv
        self.deploy = True

    def extra_repr(self) -> str:
        return (f"{self.in_chs}, {self.out_chs}, stride={self.stride}, groups={self.groups}, "
                f"deploy={self.deploy}" + (", quant_friendly=True" if self.quant_friendly else ""))


class RepVGG(nn.Module):
    """Stem block (stride 2) + four stages whose first block has stride 2 + pool + linear.

    Stage widths are ``int(64 a), int(128 a), int(256 a), int(512 b)`` for the paper's
    width multipliers ``(a, a, a, b)``; the stem has ``min(64, int(64 a))`` channels.
    ``groups_map`` maps a layer index (stem = 0) to the groups of that block's convs;
    ``quant_friendly`` makes every block a QARepVGG block.
    """

    def __init__(self, num_blocks: Sequence[int], width_multiplier: Sequence[float],
                 num_classes: int = 1000, in_chans: int = 3,
                 groups_map: dict[int, int] | None = None,
                 deploy: bool = False, drop_rate: float = 0.0,
                 quant_friendly: bool = False) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(width_multiplier) != 4:
            raise ValueError("RepVGG takes four stage depths and four width multipliers")
        groups_map = groups_map or {}
        if 0 in groups_map:
            raise ValueError("the stem block (layer 0) cannot be grouped")
        self.num_classes = num_classes
        in_planes = min(64, int(64 * width_multiplier[0]))
        self.quant_friendly = quant_friendly
        self.stage0 = RepVGGBlock(in_chans, in_planes, stride=2, deploy=deploy,
                                  quant_friendly=quant_friendly)
        layer_idx = 1
        stage_bases = (64, 128, 256, 512)
        for s, (depth, base, mult) in enumerate(zip(num_blocks, stage_bases, width_multiplier)):
            planes = int(base * mult)
            blocks = []
            for j in range(depth):
                blocks.append(RepVGGBlock(in_planes, planes, stride=2 if j == 0 else 1,
                                          groups=groups_map.get(layer_idx, 1), deploy=deploy,
                                          quant_friendly=quant_friendly))
                in_planes = planes
                layer_idx += 1
            self.add_module(f"stage{s + 1}", nn.Sequential(*blocks))
        self.num_features = in_planes
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.linear = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(torch.flatten(self.gap(self.forward_features(x)), 1)))


def _repvgg(num_blocks: Sequence[int], widths: Sequence[float], groups_map: dict[int, int] | None,
            num_classes: int, in_chans: int, deploy: bool, **kw) -> RepVGG:
    return RepVGG(num_blocks, widths, num_classes, in_chans, groups_map, deploy, **kw)


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)


# MACs are of the deploy form at 224 (the training form adds the 1x1 branches' MACs).
@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_a0(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-A0: 9,108,968 params (deployed 8,309,384), 1.36 GMACs."""
    return _repvgg(_A, (0.75, 0.75, 0.75, 2.5), None, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_a1(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-A1: 14,092,264 params (deployed 12,789,864), 2.36 GMACs."""
    return _repvgg(_A, (1, 1, 1, 2.5), None, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_a2(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-A2: 28,210,600 params (deployed 25,499,944), 5.12 GMACs."""
    return _repvgg(_A, (1.5, 1.5, 1.5, 2.75), None, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_b0(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-B0: 15,817,960 params (deployed 14,339,048), 3.06 GMACs."""
    return _repvgg(_B, (1, 1, 1, 2.5), None, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_b1(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-B1: 57,415,016 params (deployed 51,829,480), 11.82 GMACs."""
    return _repvgg(_B, (2, 2, 2, 4), None, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_b1g2(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-B1g2: 45,782,376 params (deployed 41,360,104), 8.81 GMACs."""
    return _repvgg(_B, (2, 2, 2, 4), _G2, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_b1g4(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-B1g4: 39,966,056 params (deployed 36,125,416), 7.31 GMACs."""
    return _repvgg(_B, (2, 2, 2, 4), _G4, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_b2(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-B2: 89,022,376 params (deployed 80,315,112), 18.38 GMACs."""
    return _repvgg(_B, (2.5, 2.5, 2.5, 5), None, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_b2g4(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-B2g4: 61,758,376 params (deployed 55,777,512), 11.33 GMACs."""
    return _repvgg(_B, (2.5, 2.5, 2.5, 5), _G4, num_classes, in_chans, deploy, **kw)


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def repvgg_b3(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """RepVGG-B3: 123,085,288 params (deployed 110,960,872), 26.21 GMACs."""
    return _repvgg(_B, (3, 3, 3, 5), None, num_classes, in_chans, deploy, **kw)


@register_model(input_size=32, small_input_size=32, paper=_PAPER)
def repvgg_tiny(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False, **kw) -> RepVGG:
    """Not from the paper: a 32x32-input RepVGG (16-16-32-64-128 wide, 2-2-2-1 deep).

    Layers 2, 4 and 6 are grouped (g2), and each of them also has the identity
    branch, so re-parameterizing this model exercises every kind of fusion.
    """
    return _repvgg((2, 2, 2, 1), (0.25, 0.25, 0.25, 0.25), {2: 2, 4: 2, 6: 2}, num_classes,
                   in_chans, deploy, **kw)


_QA_PAPER = "Chu et al. 2022, Make RepVGG Greater Again: A Quantization-aware Approach"


@register_model(input_size=224, small_input_size=32, paper=_QA_PAPER)
def qarepvgg_a0(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False,
                **kw) -> RepVGG:
    """QARepVGG-A0: RepVGG-A0 with QARepVGG blocks; deploys to RepVGG-A0's 8,309,384 params.

    Training form 9,103,304 params (RepVGG-A0: 9,108,968; the blocks with an identity
    branch have two BNs instead of three). Published ImageNet top-1 (Chu et al. 2022, Table 1): 72.2% fp32,
    70.4% int8 PTQ, against RepVGG-A0's 72.4% and 52.2%.
    """
    return _repvgg(_A, (0.75, 0.75, 0.75, 2.5), None, num_classes, in_chans, deploy,
                   quant_friendly=True, **kw)


@register_model(input_size=32, small_input_size=32, paper=_QA_PAPER)
def qarepvgg_tiny(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False,
                  **kw) -> RepVGG:
    """``repvgg_tiny`` with QARepVGG blocks (same deploy form), for fast int8 comparisons."""
    return _repvgg((2, 2, 2, 1), (0.25, 0.25, 0.25, 0.25), {2: 2, 4: 2, 6: 2}, num_classes,
                   in_chans, deploy, quant_friendly=True, **kw)
