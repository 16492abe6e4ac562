"""Checks shared by the zoo test files: counts on the meta device, small forward, a short
training run, and the one trained-like weight recipe of the parity sweeps (ONNX, TFLite, Core ML).

MACs and parameter counts depend on shapes only, so ``meta_complexity`` builds
the model and runs the counting forward on the meta device: the same modules
and the same forward, without the arithmetic or the memory (DenseNet-161 at 224
is 7.7 GMACs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model, model_entry
from models.complexity import Complexity, count_complexity


def meta_complexity(name: str, size: int = 224, **kw) -> Complexity:
    """Params and MACs of ``create_model(name, **kw)`` at ``size``, counted on the meta device."""
    with torch.device("meta"):
        return count_complexity(create_model(name, **kw), size)


def trained_like(model: nn.Module, size: int, in_chans: int = 3, seed: int = 0,
                 logit_std: float = 3.0) -> nn.Module:
    """Trained-like random weights, the same for every zoo parity sweep; returns ``model`` in eval mode.

    Random init leaves heads and residual gammas at zero (logits of 1e-8, where any two
    runtimes "agree"), so every all-zero tensor gets small random values (std 0.05);
    BatchNorm statistics and affine terms are drawn in the range trained networks show
    (running mean within +-0.2, variance 0.5..2, gamma 0.5..1.5, beta within +-0.2); the
    classifier (the last Linear, or the last conv of an all-conv head such as SqueezeNet's:
    ReLU and average pooling after it are positively homogeneous, so scaling carries) is
    scaled to logits of standard deviation ``logit_std`` on random inputs of ``size``.
    This tests the *conversion*; how a trained model's conditioning amplifies fp32
    rounding is what ``verify``'s float64 check reports.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                n = m.num_features
                m.running_mean.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)
        model.eval()
        heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        std = float(model(torch.randn(4, in_chans, size, size, generator=gen)).std())
        if heads and std > 0:
            heads[-1].weight.mul_(logit_std / std)
            if heads[-1].bias is not None:
                heads[-1].bias.mul_(logit_std / std)
    return model


def random_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (gammas of either sign), so that
    fusing them into convolutions is really tested; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


def shift_by_index(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i - dy, j - dx], zero outside: the reference shift, written
    out element by element."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[..., i, j] = x[..., i - dy, j - dx]
    return out


def check_forward(name: str, num_classes: int = 10, batch: int = 2,
                  size: int | None = None) -> None:
    """Eval forward at the registered small size, 1 and 3 input channels: shape, finite, deterministic."""
    size = size or model_entry(name).small_input_size
    for in_chans in (1, 3):
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
        x = torch.randn(batch, in_chans, size, size)
        with torch.no_grad():
            y1, y2 = model(x), model(x)
        assert y1.shape == (batch, num_classes), f"{name}: output {tuple(y1.shape)}"
        assert torch.isfinite(y1).all(), f"{name}: non-finite output"
        assert torch.equal(y1, y2), f"{name}: eval forward is not deterministic"


def train_losses(model: nn.Module, size: int, steps: int = 3, batch: int = 4,
                 lr: float = 0.05, in_chans: int = 3, seed: int = 0) -> list[float]:
    """SGD steps on one fixed random batch; returns the loss before each step and after the last.

    The last entry is measured after the final update, so ``losses[-1] < losses[0]``
    means the updates lowered the loss on that batch.
    """
    torch.manual_seed(seed)
    x = torch.randn(batch, in_chans, size, size)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses: list[float] = []
    y = None
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        if y is None:
            y = torch.arange(batch) % out.shape[1]
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(F.cross_entropy(model(x), y).item())
    return losses
