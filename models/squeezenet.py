"""SqueezeNet 1.0 and 1.1 (Iandola et al. 2016), with the paper's bypass variants.

Layout as in the DeepScale Caffe release and torchvision (biased convs, no BN,
ceil-mode max pools, a 1x1 conv classifier followed by ReLU and global average
pooling), so the counts are torchvision's: 1,248,424 and 1,235,496 parameters.

Bypass (paper Sec. 6, Fig. 2): ``simple`` adds the input to the output of the
Fire modules whose input and output widths match (fire3, fire5, fire7, fire9 in
both versions); ``complex`` also gives the other Fire modules (fire2, fire4,
fire6, fire8) a bypass through a 1x1 conv with as many filters as the module has
output channels. Simple bypass adds no parameters; complex adds those convs.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from models.errors import InputError
from models.registry import register_model

__all__ = ["Fire", "SqueezeNet"]

_PAPER = ("Iandola et al. 2016, SqueezeNet: AlexNet-level accuracy with 50x fewer parameters "
          "and <0.5MB model size, arXiv:1602.07360")

Bypass = Literal["none", "simple", "complex"]


class Fire(nn.Module):
    """Squeeze (1x1) -> ReLU -> [expand 1x1 | expand 3x3] -> ReLU -> concat, optional bypass.

    The squeeze layer is the point of the design (paper Sec. 3.1): it limits how many
    channels the 3x3 filters see, and the 1x1 expand filters replace some 3x3 ones.

    ``bypass``: ``None``, ``"identity"`` (needs equal input and output widths) or
    ``"conv"`` (a biased 1x1 conv, the Caffe convolution default, no activation).
    """

    def __init__(self, in_chs: int, squeeze_chs: int, expand1x1_chs: int, expand3x3_chs: int,
                 bypass: Literal["identity", "conv"] | None = None) -> None:
        super().__init__()
        out_chs = expand1x1_chs + expand3x3_chs
        self.squeeze = nn.Conv2d(in_chs, squeeze_chs, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_chs, expand1x1_chs, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_chs, expand3x3_chs, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        self.out_channels = out_chs
        if bypass == "identity":
            if in_chs != out_chs:
                raise ValueError(
                    f"identity bypass needs in == out channels, got {in_chs} -> {out_chs}")
            self.bypass: nn.Module | None = nn.Identity()
        elif bypass == "conv":
            self.bypass = nn.Conv2d(in_chs, out_chs, 1)
        elif bypass is None:
            self.bypass = None
        else:
            raise ValueError(f"bypass must be None, 'identity' or 'conv', got {bypass!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze_activation(self.squeeze(x))
        out = torch.cat([self.expand1x1_activation(self.expand1x1(s)),
                         self.expand3x3_activation(self.expand3x3(s))], 1)
        if self.bypass is not None:
            out = out + self.bypass(x)
        return out


# Fire modules as (squeeze, expand1x1, expand3x3); "M" is a 3x3/2 ceil-mode max pool.
_CFGS: dict[str, tuple] = {
    # paper Table 1 / torchvision squeezenet1_0: conv1 96 x 7x7/2
    "1_0": (96, 7, ["M", (16, 64, 64), (16, 64, 64), (32, 128, 128), "M",
                    (32, 128, 128), (48, 192, 192), (48, 192, 192), (64, 256, 256), "M",
                    (64, 256, 256)]),
    # SqueezeNet v1.1 (DeepScale repo): conv1 64 x 3x3/2, pools moved earlier, 2.4x fewer MACs
    "1_1": (64, 3, ["M", (16, 64, 64), (16, 64, 64), "M", (32, 128, 128), (32, 128, 128), "M",
                    (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)]),
}


class SqueezeNet(nn.Module):
    def __init__(self, version: Literal["1_0", "1_1"] = "1_0", num_classes: int = 1000,
                 in_chans: int = 3, bypass: Bypass = "none", drop_rate: float = 0.5) -> None:
        super().__init__()
        if version not in _CFGS:
            raise InputError("squeezenet version", "'1_0' or '1_1'", repr(version))
        if bypass not in ("none", "simple", "complex"):
            raise InputError("squeezenet bypass", "'none', 'simple' or 'complex'", repr(bypass))
        stem_chs, stem_k, cfg = _CFGS[version]
        layers: list[nn.Module] = [nn.Conv2d(in_chans, stem_chs, stem_k, stride=2),
                                   nn.ReLU(inplace=True)]
        chs = stem_chs
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            out_chs = item[1] + item[2]
            kind: Literal["identity", "conv"] | None = None
            if bypass != "none" and chs == out_chs:
                kind = "identity"
            elif bypass == "complex":
                kind = "conv"
            layers.append(Fire(chs, *item, bypass=kind))
            chs = out_chs
        self.features = nn.Sequential(*layers)
        self.num_features = chs
        final_conv = nn.Conv2d(chs, num_classes, 1)
        self.classifier = nn.Sequential(
            nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity(),
            final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        # Reference init (DeepScale / torchvision): He-uniform convs, a small normal classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, 0, 0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def squeezenet1_0(num_classes: int = 1000, in_chans: int = 3, **kw) -> SqueezeNet:
    return SqueezeNet("1_0", num_classes, in_chans, **kw)


@register_model(input_size=224, small_input_size=32,
                paper=_PAPER + "; v1.1 from github.com/DeepScale/SqueezeNet")
def squeezenet1_1(num_classes: int = 1000, in_chans: int = 3, **kw) -> SqueezeNet:
    return SqueezeNet("1_1", num_classes, in_chans, **kw)
