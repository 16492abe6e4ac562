"""Checks shared by the zoo test files: counts on the meta device, small forward, a short training run.

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
