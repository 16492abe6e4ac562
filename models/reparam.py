"""Structural re-parameterization of a whole model, the timm way.

The fusing knowledge stays with each block: a module that can fold its training-time
structure into a cheaper deploy-time one has a ``reparameterize()`` method that does it
in place and is a no-op once done (RepVGG/QARepVGG blocks fold their branches into one
3x3 conv; the sparse shift layer freezes its displacements into a static plan of pure
data movement). This walker only finds those blocks, so it works for any model, in the
zoo or not, that follows the protocol. It works on a copy by default because fusing is
one-way: the training-form branches are gone afterwards.

A module is visited before its children; a parent's ``reparameterize()`` may rewrite its
children (e.g. fold a channel permutation into the convs around a shift layer), so the
children's own ``reparameterize()`` must be a no-op when already fused.
"""
from __future__ import annotations

import copy

import torch.nn as nn


def reparameterizable_modules(model: nn.Module) -> list[str]:
    """Names of the modules that would change under ``reparameterize_model`` (not yet fused)."""
    return [name for name, m in model.named_modules()
            if callable(getattr(m, "reparameterize", None)) and not getattr(m, "deploy", False)]


def is_reparameterizable(model: nn.Module) -> bool:
    return bool(reparameterizable_modules(model))


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every block that has ``reparameterize()``; the result is returned in eval mode,
    the only mode in which fused blocks reproduce the unfused ones (BN used running stats).

    The deploy-form state dict loads into the same architecture built with ``deploy=True``
    (for the zoo's RepVGG and FE-Net factories), or into a freshly built training-form
    model after this same call (what ``models.checkpoint.build_model`` does for a
    checkpoint marked ``reparameterized``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for module in list(model.modules()):
        fuse = getattr(module, "reparameterize", None)
        if callable(fuse):
            fuse()
    return model.eval()
