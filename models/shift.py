"""Shift layers and the networks built on them.

* ``shift2d``: an integer shift of a feature map with zero fill, like
  ``torch.roll`` but without wrap-around, done as Pad + Slice so that it is pure
  data movement in every exported graph (no conv, no gather with computed
  indices), for the Sparse Shift layer to reuse; ``shift_channel_groups`` does
  many such shifts in one pass.
* ``Shift`` (Wu et al. 2018, "Shift: A Zero FLOP, Zero Parameter Alternative to
  Spatial Convolutions"): channels split into k*k groups, each moved by a fixed
  offset of the k x k window. 0 parameters, 0 MACs.
* ``ActiveShift`` (Jeon & Kim 2018, "Constructing Fast Network through
  Deconstruction of Convolution"): a learnable real-valued shift per channel with
  bilinear interpolation and zero padding. 2*C parameters; 0 MACs in our
  convention (only conv/linear/matmul count, as for BN), though it does cost
  2*(2*max_shift+1) multiply-adds per output element.

Networks: ``shift_resnet20`` (CIFAR), ``shiftnet_a`` (ImageNet) and
``asnet_base`` (ImageNet, active shift); each factory's docstring says what it
reproduces and how closely.

Shift convention everywhere: a shift of (dy, dx) moves the content down by dy
rows and right by dx columns, ``out[..., i, j] = x[..., i - dy, j - dx]``, and
reads zero outside the input.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import he_init
from models.registry import register_model

_SHIFT_PAPER = ("Wu et al. 2018, Shift: A Zero FLOP, Zero Parameter Alternative to "
                "Spatial Convolutions")
_ASL_PAPER = "Jeon & Kim 2018, Constructing Fast Network through Deconstruction of Convolution"


# -- the shift operations ------------------------------------------------------------------
def shift2d(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift the last two dims by integers, zero fill: ``out[i, j] = x[i - dy, j - dx]``."""
    dy, dx = int(dy), int(dx)
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + h, left:left + w]


def shift_channel_groups(x: torch.Tensor, shifts: Sequence[tuple[int, int]],
                         sizes: Sequence[int]) -> torch.Tensor:
    """Shift consecutive channel groups of an NCHW tensor by their own integer offsets.

    Channels after the last group pass through unshifted. Written for a small
    exported graph: one Pad, the padded image flattened so that a 2-D offset is a
    single 1-D offset (row stride = padded width), one Split into groups, one Slice
    per group, one Concat, and one final Slice dropping the padding columns --
    where slicing rows and columns per group would cost three Slices a group.
    """
    if len(shifts) != len(sizes):
        raise ValueError(f"{len(shifts)} shifts for {len(sizes)} channel groups")
    channels, h, w = x.shape[-3:]
    py = max(abs(dy) for dy, _ in shifts)
    px = max(abs(dx) for _, dx in shifts)
    if py == 0 and px == 0:
        return x
    wp = w + 2 * px
    # one spare row at the bottom: a group's window of h*wp elements starts up to
    # 2*py rows + 2*px columns in, and so runs up to 2*px past the last padded row
    flat = F.pad(x, (px, px, py, py + 1)).flatten(-2)
    groups = [(dydx, n) for dydx, n in zip(shifts, sizes) if n]
    rest = channels - sum(n for _, n in groups)
    if rest:
        groups.append(((0, 0), rest))
    chunks = torch.split(flat, [n for _, n in groups], dim=-2)
    parts = []
    for ((dy, dx), _), chunk in zip(groups, chunks):
        start = (py - dy) * wp + (px - dx)
        parts.append(chunk[..., start:start + h * wp])
    out = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
    return out.unflatten(-1, (h, wp))[..., :w]


class Shift(nn.Module):
    """Wu et al.'s grouped shift: the k*k offsets of a k x k window, one per channel group.

    The first ``(C // k**2) * k**2`` channels form k*k consecutive groups of equal
    size taking the offsets in raster order, ``(dy, dx) = (g // k - k // 2,
    g % k - k // 2) * dilation`` for group g; the remaining ``C % k**2`` channels are
    not shifted. The authors' CUDA kernel assigns offsets to channels round-robin
    (channel c takes offset c mod k*k) and also leaves the remainder unshifted; the
    two differ by a fixed channel permutation, which the surrounding 1x1 convs
    absorb, and consecutive groups make the exported graph one Slice per group.
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, not {kernel_size}")
        if channels < kernel_size ** 2:
            raise ValueError(f"Shift with kernel_size {kernel_size} needs at least "
                             f"{kernel_size ** 2} channels, got {channels}")
        self.channels, self.kernel_size, self.dilation = channels, kernel_size, dilation
        half = kernel_size // 2
        self.shifts = [((g // kernel_size - half) * dilation, (g % kernel_size - half) * dilation)
                       for g in range(kernel_size ** 2)]
        self.group_size = channels // kernel_size ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shift_channel_groups(x, self.shifts, [self.group_size] * len(self.shifts))

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}"


def _interp_shift_1d(x: torch.Tensor, s: torch.Tensor, max_shift: int, dim: int) -> torch.Tensor:
    """Shift each channel by a real amount along H (dim=-2) or W (dim=-1), linear interpolation.

    A shift by s = n + f (n = floor(s), 0 <= f < 1) is (1 - f) * shift(n) + f * shift(n + 1).
    Since n differs per channel and must not turn into data-dependent slicing, every
    integer candidate a in [-max_shift, max_shift] is sliced once from a single padded
    tensor and weighted per channel by (1 - f)[n == a] + f[n + 1 == a]: at most two
    weights per channel are non-zero. The weights depend on s through f only, so the
    gradient w.r.t. s is the interpolation slope (floor's gradient is 0).
    """
    size = x.shape[dim]
    r = max_shift
    n = torch.floor(s)
    f = s - n
    pad = (0, 0, r, r) if dim == -2 else (r, r)
    padded = F.pad(x, pad)
    out = None
    for a in range(-r, r + 1):
        wa = (1 - f) * (n == a).to(x.dtype) + f * (n + 1 == a).to(x.dtype)
        sl = padded.narrow(dim, r - a, size)
        term = wa.reshape(-1, 1, 1) * sl
        out = term if out is None else out + term
    return out


def active_shift2d(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                   max_shift: int) -> torch.Tensor:
    """Per-channel real-valued shift with bilinear interpolation and zero fill.

    ``dy``, ``dx`` are (C,) tensors, clamped to [-max_shift, max_shift] (their gradient
    stops at the bound). Bilinear = linear in H, then linear in W; both passes fill
    with zeros, so samples outside the input read 0 as in ``grid_sample(padding_mode=
    "zeros")``. Integer shifts give exactly ``shift2d``'s result.
    """
    if max_shift < 1:
        raise ValueError(f"max_shift must be >= 1, not {max_shift}")
    dy = dy.clamp(-max_shift, max_shift)
    dx = dx.clamp(-max_shift, max_shift)
    return _interp_shift_1d(_interp_shift_1d(x, dy, max_shift, -2), dx, max_shift, -1)


class ActiveShift(nn.Module):
    """Jeon & Kim's active shift layer: a learnable (dy, dx) per channel, bilinear sampling.

    The paper's per-channel shift pair (alpha, beta) is ``dy`` (rows), ``dx``
    (columns) here, initialized uniform in [-init_range, init_range] (1, as public
    ASL implementations do). ``max_shift`` bounds the window the exported graph
    covers: 2*max_shift+1 slices per axis; shifts are clamped to it.
    """

    def __init__(self, channels: int, max_shift: int = 2, init_range: float = 1.0) -> None:
        super().__init__()
        self.channels, self.max_shift = channels, max_shift
        self.dy = nn.Parameter(torch.empty(channels).uniform_(-init_range, init_range))
        self.dx = nn.Parameter(torch.empty(channels).uniform_(-init_range, init_range))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return active_shift2d(x, self.dy, self.dx, self.max_shift)

    def extra_repr(self) -> str:
        return f"{self.channels}, max_shift={self.max_shift}"


# -- ShiftResNet (CIFAR) ---------------------------------------------------------------------
class ShiftConvBlock(nn.Module):
    """CSC module as a residual block: 1x1, BN, ReLU, Shift, 1x1 (stride), BN; add; ReLU.

    As in the authors' ShiftResNet code: the middle width is ``out_chs * expansion``,
    the stride sits on the second 1x1 conv (after the shift has mixed neighbours in)
    and the shortcut is a 1x1 conv + BN when the shape changes.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion: float = 6,
                 kernel_size: int = 3) -> None:
        super().__init__()
        mid = int(out_chs * expansion)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shift = Shift(mid, kernel_size)
        self.conv2 = nn.Conv2d(mid, out_chs, 1, stride=stride, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_chs != out_chs:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shift(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _PooledHead(nn.Module):
    """Global average pool -> dropout -> linear, as the three shift networks end. A mixin
    rather than a ``ClassifierHead`` module so the state-dict keys stay ``pool``/``drop``/``fc``
    (checkpoints trained before it still load)."""

    def _init_head(self, in_chs: int, num_classes: int, drop_rate: float) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


class ShiftResNetCifar(_PooledHead):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, sec. 4.2), CSC blocks for the 3x3 pairs."""

    def __init__(self, depth: int = 20, num_classes: int = 1000, in_chans: int = 3,
                 expansion: float = 6, widths: Sequence[int] = (16, 32, 64),
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, not {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, in_chs = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(ShiftConvBlock(in_chs, w, 2 if i > 0 and j == 0 else 1, expansion))
                in_chs = w
        self.layers = nn.Sequential(*layers)
        self.num_features = in_chs
        self._init_head(in_chs, num_classes, drop_rate)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.forward_head(x)


# -- ShiftNet-A (ImageNet) -------------------------------------------------------------------
class PreActShiftBlock(nn.Module):
    """Pre-activation CSC: BN -> ReLU -> 1x1 -> Shift -> BN -> ReLU -> 1x1 (stride).

    A stride-2 block concatenates a 3x3/2 average pool of its input to its
    ``out_chs - in_chs`` new channels (as ShuffleNet does); other blocks add.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: float,
                 kernel_size: int) -> None:
        super().__init__()
        self.concat = stride != 1
        if self.concat:
            if out_chs <= in_chs:
                raise ValueError(f"a downsampling block must widen ({in_chs} -> {out_chs})")
            branch = out_chs - in_chs
            self.pool: nn.Module = nn.AvgPool2d(3, stride, padding=1)
        else:
            if in_chs != out_chs:
                raise ValueError(f"a stride-1 block must keep the width ({in_chs} -> {out_chs})")
            branch = out_chs
            self.pool = nn.Identity()
        mid = int(branch * expansion)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.shift = Shift(mid, kernel_size)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, branch, 1, stride=stride, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shift(self.conv1(self.relu(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        if self.concat:
            return torch.cat([out, self.pool(x)], dim=1)
        return out + x


class ShiftNet(_PooledHead):
    """7x7/2 stem conv, four stride-2 stages of pre-activation CSC blocks, BN-ReLU, pool, linear."""

    def __init__(self, depths: Sequence[int], widths: Sequence[int], kernels: Sequence[int],
                 expansions: Sequence[tuple[float, float]], num_classes: int = 1000,
                 in_chans: int = 3, stem_width: int = 32, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        in_chs, stages = stem_width, []
        for depth, width, k, (e_first, e_rest) in zip(depths, widths, kernels, expansions):
            blocks = [PreActShiftBlock(in_chs, width, 2, e_first, k)]
            blocks += [PreActShiftBlock(width, width, 1, e_rest, k) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = in_chs
        self._init_head(in_chs, num_classes, drop_rate)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.stages(self.conv1(x))))
        return self.forward_head(x)


# -- ASNet (ImageNet, active shift) ----------------------------------------------------------
class ActiveShiftBlock(nn.Module):
    """Jeon & Kim's block: BN -> ReLU -> 1x1 -> BN -> ReLU -> ASL -> 1x1 (stride), residual add.

    The shortcut is the identity, or a 1x1 conv (stride) on the pre-activated input
    when the shape changes, as in pre-activation ResNets.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, max_shift: int = 2) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.asl = ActiveShift(out_chs, max_shift)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 1, stride=stride, bias=False)
        self.relu = nn.ReLU()
        self.project = stride != 1 or in_chs != out_chs
        self.shortcut = (nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if self.project
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.asl(self.relu(self.bn2(self.conv1(pre)))))
        return out + (self.shortcut(pre) if self.project else x)


class ASNet(_PooledHead):
    """3x3/2 stem, five stages of active-shift blocks (strides 1, 2, 2, 2, 2), BN-ReLU, pool, FC."""

    def __init__(self, depths: Sequence[int] = (1, 3, 4, 6, 3), width: int = 64,
                 width_mults: Sequence[int] = (1, 1, 2, 4, 8), num_classes: int = 1000,
                 in_chans: int = 3, max_shift: int = 2, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False)
        in_chs, stages = width, []
        for i, (depth, mult) in enumerate(zip(depths, width_mults)):
            out_chs = width * mult
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(ActiveShiftBlock(in_chs, out_chs, stride, max_shift))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = in_chs
        self._init_head(in_chs, num_classes, drop_rate)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.stages(self.conv1(x))))
        return self.forward_head(x)


# -- registered networks ---------------------------------------------------------------------
@register_model(input_size=32, small_input_size=32, paper=_SHIFT_PAPER)
def shift_resnet20(num_classes: int = 1000, in_chans: int = 3, expansion: float = 6,
                   **kw) -> ShiftResNetCifar:
    """ShiftResNet-20, expansion 6: 186,746 params with a 10-class head (paper: 0.19M), 32.2M MACs.

    The authors' code (alvinwan/shiftresnet-cifar, ``ShiftResNet20``): ResNet-20's
    3x3 convs replaced by CSC modules of 3x3 shifts.
    """
    return ShiftResNetCifar(20, num_classes, in_chans, expansion, **kw)


@register_model(input_size=224, small_input_size=32, paper=_SHIFT_PAPER)
def shiftnet_a(num_classes: int = 1000, in_chans: int = 3, **kw) -> ShiftNet:
    """ShiftNet-A, reconstructed: 4,188,680 params, 1.42 GMACs at 224 (paper: 4.1M, 1.4G).

    The paper's table gives stages, widths, shift kernel sizes and expansions but
    not every detail; this follows the layout a public reimplementation uses for
    it: 7x7/2 stem of 32, stages of 5/6/7/3 pre-activation CSC blocks, 64/128/256/512
    wide, 5x5/5x5/3x3/3x3 shifts, expansions 4/4, 4/3, 3/2, 2/1 (first block/rest),
    each stage opened by a stride-2 block that concatenates an average-pooled
    shortcut. Treat it as a faithful approximation, not the authors' exact net: its
    counts match the paper's if the paper truncates to one decimal, as RepVGG's does
    (4.19M -> 4.1M); rounded they would read 4.2M.
    """
    return ShiftNet((5, 6, 7, 3), (64, 128, 256, 512), (5, 5, 3, 3),
                    ((4, 4), (4, 3), (3, 2), (2, 1)), num_classes, in_chans, **kw)


@register_model(input_size=224, small_input_size=32, paper=_ASL_PAPER)
def asnet_base(num_classes: int = 1000, in_chans: int = 3, **kw) -> ASNet:
    """An ImageNet network of Jeon & Kim's active-shift blocks; our layout, not the paper's table.

    The block is the paper's (BN-ReLU-1x1-BN-ReLU-ASL-1x1, residual). The stage
    plan (3x3/2 stem of 64, stages of 1/3/4/6/3 blocks, 64/64/128/256/512 wide) is
    ours: the paper's exact ImageNet configurations were not available to check.
    3,065,128 params, 645M MACs at 224 (active shifts not counted, see ActiveShift).
    """
    return ASNet(num_classes=num_classes, in_chans=in_chans, **kw)
