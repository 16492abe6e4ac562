"""Structural re-parameterization of a whole model, the timm way.

The fusing knowledge stays with each block (``reparameterize()`` on RepVGG's
block and any later block that can fold its branches); this walker only finds
those blocks. It works on a copy by default because fusing is one-way: the
training-form branches are gone afterwards.
"""
from __future__ import annotations

import copy

import torch.nn as nn


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every block that has ``reparameterize()``; the result is returned in eval mode,
    the only mode in which fused blocks reproduce the unfused ones (BN used running stats)."""
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return model.eval()
