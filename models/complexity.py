"""Parameters and multiply-accumulates, counted the way the papers count them.

* Parameters: ``sum(p.numel())`` over ``parameters()`` -- the PyTorch convention
  (BN affine weights counted, running statistics not, since they are buffers).
* MACs: multiply-accumulates of conv, linear and matmul only (the MobileNet /
  ShuffleNet papers' "mult-adds"); BN, activations, pooling, adds and shifts count 0.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (which counts aten
conv/mm/bmm/addmm/baddbmm/sdpa, so functional matmuls are seen too) divided by 2,
with the per-layer breakdown taken from the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerComplexity:
    name: str
    type: str
    params: int
    macs: int
    output_shape: list[int]


@dataclass
class Complexity:
    params: int
    macs: int
    input_size: tuple[int, ...]
    layers: list[LayerComplexity] = field(default_factory=list)

    @property
    def mmacs(self) -> float:
        return self.macs / 1e6


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_complexity(model: nn.Module, input_size: int | tuple[int, ...] = 224,
                     in_chans: int | None = None) -> Complexity:
    """Count params and MACs of one forward at batch 1, with a per-leaf-layer breakdown.

    ``input_size`` is the spatial size (int or (H, W)) or a full input shape without batch.
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if len(input_size) == 2:
        in_chans = in_chans or _guess_in_chans(model)
        shape = (1, in_chans, *input_size)
    else:
        shape = (1, *input_size)
    was_training = model.training
    model.eval()
    leaves = {name: m for name, m in model.named_modules()
              if not list(m.children()) or _counts_own_ops(m)}
    out_shapes: dict[str, list[int]] = {}
    hooks = [m.register_forward_hook(_shape_hook(out_shapes, name)) for name, m in leaves.items()]
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with counter:
            model(torch.zeros(shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    per_module = counter.get_flop_counts()   # keys: "<RootClass>.<module path>"
    root = type(model).__name__

    def flops_of(path: str) -> int:
        return int(sum(per_module.get(f"{root}.{path}" if path else root, {}).values()))

    layers = []
    for name, m in leaves.items():
        if name not in out_shapes:
            continue
        flops = flops_of(name)
        own_params = sum(p.numel() for p in m.parameters(recurse=False))
        if _counts_own_ops(m) and list(m.children()):
            # a container that also does its own matmuls: subtract its children's share
            flops -= sum(flops_of(f"{name}.{c}" if name else c) for c, _ in m.named_children())
        layers.append(LayerComplexity(name, type(m).__name__, own_params, int(flops) // 2,
                                      out_shapes[name]))
    return Complexity(count_params(model), int(counter.get_total_flops()) // 2,
                      tuple(shape[1:]), layers)


def _counts_own_ops(m: nn.Module) -> bool:
    """Modules that compute with their own parameters besides their children's."""
    return any(True for _ in m.parameters(recurse=False)) and bool(list(m.children()))


def _shape_hook(store: dict[str, list[int]], name: str):
    def hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            store[name] = list(out.shape)
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            store[name] = list(out[0].shape)
    return hook


def _guess_in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            break
    return 3
