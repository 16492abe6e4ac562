"""Sparse Shift Layer and FE-Net (Chen et al., "All You Need is a Few Shifts: Designing
Efficient Convolutional Neural Networks for Image Classification", CVPR 2019).

* ``SparseShift``: a learnable displacement (dy, dx) per channel, like Jeon & Kim's
  active shift, but *quantization-aware*: the forward pass moves each channel by the
  integer ``(round(dy), round(dx))`` with zero fill (pure data movement, exactly what
  is deployed), and the backward pass is a straight-through estimator: the gradient
  w.r.t. the displacement is the bilinear (active-shift) derivative at the real-valued
  position, the gradient w.r.t. the input the inverse integer shift (the exact
  transpose of the forward map). An L1 penalty on the displacements
  (``quantize.shift``) drives most of them to zero, and a channel whose displacement
  rounds to (0, 0) is the identity: it costs nothing at inference.
* ``reparameterize()`` freezes the rounded displacements into a static plan, the deploy
  form: channels split into runs of one displacement, each moved by one Pad (negative on
  the side it leaves, i.e. a crop), still channels passed through untouched, one Concat.
  The exported graph of a deployed layer has no multiply, no interpolation and no gather.
  The plan is the module's extra state (an int64 (C, 2) tensor in the state dict), so a
  deploy-form state dict loads into a model built with ``deploy=True``.
* ``FEBlock``/``FENet``: the paper's fully-exploited computational block, made of 1x1
  convs with a sparse shift between them. Only part of the channels is computed in a
  block, and the computed ones are appended after the untouched ones, so the next block
  computes on the channels that have waited longest: every channel is processed once
  every ``1 / split_ratio`` blocks ("fully exploited"), where a random split would leave
  some channels unprocessed for many blocks. ``FEBlock.reparameterize()`` also folds a
  channel permutation into the 1x1 conv (and BN) before the shift and the 1x1 conv after
  it, so that moving channels are consecutive and grouped by displacement, and the still
  ones come last and emit nothing.

The paper's exact FE-Net table was not available to check: ``fe_net_1_0`` is our layout
of its block at a similar budget (its counts are in its docstring), ``fe_net_tiny`` a
small one for the bundled 28x28 data. Shift convention as in ``models.shift``: a
displacement (dy, dx) gives ``out[..., i, j] = x[..., i - dy, j - dx]``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import he_init
from models.registry import register_model
from models.shift import shift2d, shift_channel_groups

_PAPER = ("Chen et al. 2019, All You Need is a Few Shifts: Designing Efficient "
          "Convolutional Neural Networks for Image Classification")


# -- the integer per-channel shift and its straight-through autograd Function ----------------
_NO_NEGATIVE_PADS = False


@contextlib.contextmanager
def no_negative_pads() -> Iterator[None]:
    """Within the block, deploy-form sparse shifts trace to non-negative Pads and Slices
    (for a converter or runtime whose pad cannot crop, as ExecuTorch's portable kernel)."""
    global _NO_NEGATIVE_PADS
    previous, _NO_NEGATIVE_PADS = _NO_NEGATIVE_PADS, True
    try:
        yield
    finally:
        _NO_NEGATIVE_PADS = previous


def shift_per_channel(x: torch.Tensor, dy: Sequence[int], dx: Sequence[int]) -> torch.Tensor:
    """Move channel c of an NCHW tensor by the integers (dy[c], dx[c]), zero fill.

    Channels are gathered by displacement and each group is shifted once, so the cost is
    one copy per distinct displacement; still channels are copied as they are.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for c, key in enumerate(zip(dy, dx)):
        groups.setdefault((int(key[0]), int(key[1])), []).append(c)
    out = x.clone()
    for (sy, sx), chans in groups.items():
        if sy == 0 and sx == 0:
            continue
        idx = torch.tensor(chans, device=x.device)
        out.index_copy_(-3, idx, shift2d(x.index_select(-3, idx), sy, sx))
    return out


def rounded_displacements(dy: torch.Tensor, dx: torch.Tensor, max_shift: int) -> torch.Tensor:
    """(C, 2) int64: the integer shift each channel applies (round half to even, clamped)."""
    d = torch.stack([dy.detach(), dx.detach()], dim=1).clamp(-max_shift, max_shift)
    return torch.round(d).to(torch.int64)


def bilinear_offset_grads(x: torch.Tensor, grad_out: torch.Tensor, dy: torch.Tensor,
                          dx: torch.Tensor, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient w.r.t. (dy, dx) of the bilinear relaxation, at the real-valued displacement.

    With dy = n + fy, dx = m + fx (n, m = floor) the relaxation is
    (1-fy)(1-fx) S(n,m) + fy(1-fx) S(n+1,m) + (1-fy)fx S(n,m+1) + fy fx S(n+1,m+1)
    applied to x (S an integer shift with zero fill), so
    d/d dy = (1-fx) (S(n+1,m) - S(n,m)) + fx (S(n+1,m+1) - S(n,m+1)), and likewise for dx.
    Each term is an integer shift of x dotted with ``grad_out``: four shifts in all, no
    interpolation. Beyond the clamp to [-max_shift, max_shift] the gradient is 0.
    """
    d = torch.stack([dy.detach(), dx.detach()], dim=1)
    inside = ((d >= -max_shift) & (d <= max_shift)).to(d.dtype)
    d = d.clamp(-max_shift, max_shift)
    n = torch.floor(d)
    fy, fx = (d - n).unbind(1)
    ny, nx = n[:, 0].long().tolist(), n[:, 1].long().tolist()
    dims = [i for i in range(x.ndim) if i != x.ndim - 3]

    def dot(oy: int, ox: int) -> torch.Tensor:
        moved = shift_per_channel(x, [v + oy for v in ny], [v + ox for v in nx])
        return (moved * grad_out).sum(dim=dims)

    p00, p10, p01, p11 = dot(0, 0), dot(1, 0), dot(0, 1), dot(1, 1)
    gy = (1 - fx) * (p10 - p00) + fx * (p11 - p01)
    gx = (1 - fy) * (p01 - p00) + fy * (p11 - p10)
    return (gy * inside[:, 0]).to(dy.dtype), (gx * inside[:, 1]).to(dx.dtype)


class _SparseShiftFn(torch.autograd.Function):
    """Forward: integer shift by the rounded displacement. Backward: straight-through.

    d out / d x is the inverse integer shift (the exact transpose of the forward map);
    d out / d (dy, dx) is the slope of the bilinear relaxation at the real-valued
    displacement (``bilinear_offset_grads``), as active shift would have it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,  # type: ignore[override]
                max_shift: int) -> torch.Tensor:
        disp = rounded_displacements(dy, dx, max_shift).tolist()
        iy, ix = [d[0] for d in disp], [d[1] for d in disp]
        ctx.ints = (iy, ix)
        ctx.max_shift = max_shift
        ctx.save_for_backward(x, dy, dx)
        return shift_per_channel(x, iy, ix)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, dy, dx = ctx.saved_tensors
        iy, ix = ctx.ints
        grad_x = grad_dy = grad_dx = None
        if ctx.needs_input_grad[0]:
            grad_x = shift_per_channel(grad_out, [-v for v in iy], [-v for v in ix])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_dy, grad_dx = bilinear_offset_grads(x, grad_out, dy, dx, ctx.max_shift)
        return grad_x, grad_dy, grad_dx, None


def sparse_shift2d(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                   max_shift: int) -> torch.Tensor:
    """Quantization-aware shift: integer forward, bilinear straight-through backward."""
    return _SparseShiftFn.apply(x, dy, dx, max_shift)


# -- the layer ---------------------------------------------------------------------------------
class SparseShift(nn.Module):
    """Sparse Shift Layer: learnable per-channel displacement, integer at inference.

    ``dy``/``dx`` (the paper's alpha/beta) start uniform in [-init_range, init_range]
    (1, as for active shift) and are clamped to [-max_shift, max_shift]. ``frozen`` is set
    by ``quantize.shift.freeze_shifts``: the trainer then stops updating them.
    """

    export_needs_deploy = True      # real-valued displacements cannot be traced into a graph

    def __init__(self, channels: int, max_shift: int = 2, init_range: float = 1.0,
                 deploy: bool = False) -> None:
        super().__init__()
        if max_shift < 1:
            raise ValueError(f"max_shift must be >= 1, not {max_shift}")
        self.channels, self.max_shift, self.init_range = channels, max_shift, init_range
        self.deploy = deploy
        self.frozen = False
        if deploy:
            self._set_plan(torch.zeros(channels, 2, dtype=torch.int64))
        else:
            self.dy = nn.Parameter(torch.empty(channels).uniform_(-init_range, init_range))
            self.dx = nn.Parameter(torch.empty(channels).uniform_(-init_range, init_range))

    def displacements(self) -> torch.Tensor:
        """(C, 2) int64: the (dy, dx) each channel moves by, as the forward applies it."""
        if self.deploy:
            return self._disp.clone()
        return rounded_displacements(self.dy, self.dx, self.max_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:                   # shape-only passes (complexity counting)
            return torch.empty_like(x)
        if self.deploy:
            return self._deploy_forward(x)
        return sparse_shift2d(x, self.dy, self.dx, self.max_shift)

    # deploy form
    @torch.no_grad()
    def reparameterize(self, displacements: torch.Tensor | None = None) -> None:
        """Freeze into the deploy form (the rounded displacements, or the ones given,
        e.g. permuted by a block that folds a channel order into its convs)."""
        if self.deploy:
            return
        disp = self.displacements() if displacements is None else displacements
        del self.dy, self.dx
        self.deploy = True
        self._set_plan(disp)

    def _set_plan(self, disp: torch.Tensor) -> None:
        disp = torch.as_tensor(disp, dtype=torch.int64).reshape(self.channels, 2).cpu()
        if disp.numel() and disp.abs().max().item() > self.max_shift:
            raise ValueError(f"displacements beyond max_shift={self.max_shift}")
        self._disp = disp.clone()
        # runs of consecutive channels with one displacement, then segments of runs that
        # move (shifted together from one padded tensor) or stay (passed through)
        runs: list[tuple[tuple[int, int], int]] = []
        for dy, dx in disp.tolist():
            if runs and runs[-1][0] == (dy, dx):
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append(((dy, dx), 1))
        segments: list[tuple[bool, list[tuple[tuple[int, int], int]]]] = []
        for key, n in runs:
            moving = key != (0, 0)
            if segments and segments[-1][0] == moving:
                segments[-1][1].append((key, n))
            else:
                segments.append((moving, [(key, n)]))
        self._segments = segments

    def _deploy_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels split into runs of one displacement; a run moves by one Pad whose
        padding is negative on the side it leaves (a crop), a still run passes through;
        one Concat. Under ``torch.jit.trace`` (Core ML's route: its ``pad`` takes no
        negative padding) or inside ``no_negative_pads()`` (ExecuTorch's portable
        ``constant_pad_nd`` refuses them too) a moving segment is shifted by
        ``shift_channel_groups`` (one Pad, Slices) instead. Both are exact: data movement only."""
        if not any(moving for moving, _ in self._segments):
            return x
        if torch.jit.is_tracing() or _NO_NEGATIVE_PADS:
            sizes = [sum(n for _, n in runs) for _, runs in self._segments]
            parts = torch.split(x, sizes, dim=-3) if len(sizes) > 1 else (x,)
            out = [shift_channel_groups(part, [k for k, _ in runs], [n for _, n in runs])
                   if moving else part for (moving, runs), part in zip(self._segments, parts)]
        else:
            runs = [run for _, seg in self._segments for run in seg]
            parts = torch.split(x, [n for _, n in runs], dim=-3) if len(runs) > 1 else (x,)
            out = [F.pad(part, (dx, -dx, dy, -dy)) if (dy, dx) != (0, 0) else part
                   for ((dy, dx), _), part in zip(runs, parts)]
        return torch.cat(out, dim=-3) if len(out) > 1 else out[0]

    def get_extra_state(self) -> torch.Tensor:
        return self.displacements()

    def set_extra_state(self, state: torch.Tensor) -> None:
        if self.deploy:                 # the training form derives it from dy/dx
            self._set_plan(state)

    def extra_repr(self) -> str:
        return f"{self.channels}, max_shift={self.max_shift}, deploy={self.deploy}"


# -- folding a channel order into the convs around a shift ------------------------------------
@torch.no_grad()
def _permute_out(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the output channels of a conv or BN (and its running statistics)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(module, name, None)
        if t is not None:
            t.copy_(t[perm])


@torch.no_grad()
def _permute_in(conv: nn.Conv2d, perm: torch.Tensor) -> None:
    if conv.groups != 1:
        raise ValueError("cannot fold a channel permutation into a grouped conv's input")
    conv.weight.copy_(conv.weight[:, perm])


def shift_order(disp: torch.Tensor) -> torch.Tensor:
    """A channel order with moving channels first, grouped by displacement, still ones last.

    Stable, so channels with one displacement keep their relative order.
    """
    still = (disp == 0).all(dim=1)
    key = torch.where(still, torch.full_like(disp[:, 0], 10 ** 6),
                      (disp[:, 0] + 512) * 1024 + (disp[:, 1] + 512))
    return torch.sort(key, stable=True).indices


@torch.no_grad()
def fold_shift_order(before: Sequence[nn.Module], shift: SparseShift, after: nn.Conv2d) -> None:
    """Deploy ``shift`` with its channels reordered by ``shift_order``, the order folded
    into the modules producing its input (``before``: conv, BN; elementwise activations
    in between commute with it) and the 1x1/dense conv consuming its output (``after``)."""
    if shift.deploy:
        return
    disp = shift.displacements()
    perm = shift_order(disp)
    for m in before:
        _permute_out(m, perm)
    _permute_in(after, perm)
    shift.reparameterize(disp[perm])


# -- FE-Net ------------------------------------------------------------------------------------
class FEBlock(nn.Module):
    """Fully-exploited block: 1x1 conv-BN-ReLU, sparse shift, 1x1 conv(stride)-BN-ReLU.

    Stride 1: the first ``round(C * split_ratio)`` channels are computed and appended
    after the other ones (width kept). Stride 2: every channel is computed into
    ``out_chs - in_chs`` new ones, appended after a 3x3/2 average pool of the input.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion: float = 3.0,
                 split_ratio: float = 0.5, max_shift: int = 2, deploy: bool = False) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        if stride == 1:
            if in_chs != out_chs:
                raise ValueError(f"a stride-1 FE block keeps the width ({in_chs} -> {out_chs})")
            self.split = max(1, min(in_chs, int(round(in_chs * split_ratio))))
            produce = self.split
            self.pool: nn.Module = nn.Identity()
        else:
            if out_chs <= in_chs:
                raise ValueError(f"a downsampling FE block must widen ({in_chs} -> {out_chs})")
            self.split = in_chs
            produce = out_chs - in_chs
            self.pool = nn.AvgPool2d(3, stride, padding=1)
        mid = int(round(self.split * expansion))
        self.conv1 = nn.Conv2d(self.split, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shift = SparseShift(mid, max_shift, deploy=deploy)
        self.conv2 = nn.Conv2d(mid, produce, 1, stride=stride, bias=False)
        self.bn2 = nn.BatchNorm2d(produce)
        self.relu = nn.ReLU()
        self.deploy = deploy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            computed, kept = x[:, :self.split], x[:, self.split:]
        else:
            computed, kept = x, self.pool(x)
        y = self.shift(self.relu(self.bn1(self.conv1(computed))))
        y = self.relu(self.bn2(self.conv2(y)))
        return torch.cat([kept, y], dim=1) if kept.shape[1] else y

    def reparameterize(self) -> None:
        fold_shift_order([self.conv1, self.bn1], self.shift, self.conv2)
        self.deploy = True

    def extra_repr(self) -> str:
        return f"{self.in_chs}, {self.out_chs}, stride={self.stride}, computed={self.split}"


class FENet(nn.Module):
    """3x3 stem conv, stages of FE blocks (each opened by a stride-2 block), 1x1 head conv,
    global pool, linear."""

    def __init__(self, stem: int, stages: Sequence[tuple[int, int]], head: int,
                 num_classes: int = 1000, in_chans: int = 3, stem_stride: int = 2,
                 expansion: float = 3.0, split_ratio: float = 0.5, max_shift: int = 2,
                 deploy: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU())
        in_chs, blocks = stem, []
        for width, depth in stages:
            blocks.append(FEBlock(in_chs, width, 2, expansion, split_ratio, max_shift, deploy))
            blocks += [FEBlock(width, width, 1, expansion, split_ratio, max_shift, deploy)
                       for _ in range(depth - 1)]
            in_chs = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_chs, head, 1, bias=False), nn.BatchNorm2d(head),
                                  nn.ReLU())
        self.num_features = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(head, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


@register_model(input_size=224, small_input_size=32, paper=_PAPER)
def fe_net_1_0(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False,
               **kw) -> FENet:
    """An ImageNet FE-Net of our layout, 4,055,304 params and 500.0M MACs at 224 (the
    paper's FE-Net 1.0: 563M MACs, 75.0% top-1; its exact table is not reproduced).

    3x3/2 stem of 32; stages of 2/4/8/4 FE blocks 64/128/256/512 wide (the first block of
    each has stride 2); expansion 3, half the channels computed per block; 1x1 head to 1024.
    """
    return FENet(32, ((64, 2), (128, 4), (256, 8), (512, 4)), 1024, num_classes, in_chans,
                 deploy=deploy, **kw)


@register_model(input_size=28, small_input_size=28, paper=_PAPER)
def fe_net_tiny(num_classes: int = 1000, in_chans: int = 3, deploy: bool = False,
                **kw) -> FENet:
    """A small FE-Net for 28x28 inputs (MNIST): stride-1 stem of 16, stages 32 (x2) and
    64 (x3) at 14x14 and 7x7, head 128. Not from the paper."""
    return FENet(16, ((32, 2), (64, 3)), 128, num_classes, in_chans, stem_stride=1,
                 deploy=deploy, **kw)
