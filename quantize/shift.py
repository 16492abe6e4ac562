"""Training side of the sparse shift method (Chen et al. 2019, "All You Need is a Few
Shifts"): the L1 shift penalty, freezing, and the sparsity statistics.

The layer itself (integer forward, straight-through bilinear backward, deploy plan) is
``models.sparse_shift.SparseShift``: models cannot import this package. Here:

* ``shift_l1_penalty(model, lam)``: lambda * sum(|dy| + |dx|) over every sparse shift
  layer. Displacements that shrink below 0.5 round to 0, and a channel with (0, 0) is
  an identity that costs nothing at inference: the penalty buys sparsity, the
  rounded forward makes the network train with the shifts it will deploy.
* ``freeze_shifts(model)``: snap the displacements to their integers and stop updating
  them, so the last epochs train the convs around the final, deployed shifts.
* ``shift_statistics(model)``: per layer and overall, the fraction of channels with zero
  displacement and the histogram of displacements.
* ``SparseShiftHook``: all of the above as a training hook (``pipeline.stages.train``
  calls ``loss``, ``on_epoch_start``, ``after_backward``, ``on_epoch_end``, ``summary``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from models.sparse_shift import SparseShift

# The suggested lambda: the largest of `python -m bench.sparse_shift`'s sweep whose
# held-out accuracy stays within 1 point of lambda = 0 (fe_net_tiny, MNIST, 4 epochs:
# 94.8% with 12.8% zero shifts at 0; 93.9%, 42.7% zero at 2e-4; 93.0%, 52.9% at 2.5e-4;
# 91.3%, 82.6% at 1e-3). Larger lambdas buy more sparsity for accuracy.
DEFAULT_SHIFT_L1 = 2e-4
SHIFT_LR_SCALE = 10.0


def shift_layers(model: nn.Module) -> list[tuple[str, SparseShift]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseShift)]


def has_sparse_shifts(model: nn.Module) -> bool:
    return any(isinstance(m, SparseShift) for m in model.modules())


def shift_l1_penalty(model: nn.Module, lam: float) -> torch.Tensor | None:
    """lambda * sum(|dy| + |dx|) over the trainable sparse shift layers (None if none)."""
    terms = [m.dy.abs().sum() + m.dx.abs().sum() for _, m in shift_layers(model)
             if not m.deploy and not m.frozen]
    if not terms or lam == 0:
        return None
    return lam * torch.stack(terms).sum()


@torch.no_grad()
def freeze_shifts(model: nn.Module) -> int:
    """Snap every trainable displacement to its rounded value and mark it frozen; returns
    the number of layers frozen. Frozen displacements get no updates (``SparseShiftHook``
    drops their gradients, which also keeps DDP's set of gradients unchanged)."""
    count = 0
    for _, m in shift_layers(model):
        if m.deploy or m.frozen:
            continue
        disp = m.displacements().to(m.dy.dtype)
        m.dy.copy_(disp[:, 0])
        m.dx.copy_(disp[:, 1])
        m.frozen = True
        count += 1
    return count


def drop_frozen_grads(model: nn.Module) -> None:
    for _, m in shift_layers(model):
        if m.frozen and not m.deploy:
            m.dy.grad = None
            m.dx.grad = None


@dataclass
class ShiftLayerStats:
    name: str
    channels: int
    zero: int                           # channels with displacement (0, 0)
    histogram: dict[str, int]           # "dy,dx" -> channels, most common first
    max_abs: int                        # largest |dy| or |dx|

    @property
    def zero_fraction(self) -> float:
        return self.zero / self.channels if self.channels else 1.0


@dataclass
class ShiftStats:
    layers: list[ShiftLayerStats] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return sum(s.channels for s in self.layers)

    @property
    def zero(self) -> int:
        return sum(s.zero for s in self.layers)

    @property
    def zero_fraction(self) -> float:
        return self.zero / self.channels if self.channels else 1.0

    @property
    def histogram(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.layers:
            total.update(s.histogram)
        return dict(total.most_common())

    def axis_histogram(self) -> dict[int, int]:
        """Displacement values along either axis -> count (each channel counted twice)."""
        total: Counter[int] = Counter()
        for key, n in self.histogram.items():
            dy, dx = (int(v) for v in key.split(","))
            total[dy] += n
            total[dx] += n
        return dict(sorted(total.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "zero": self.zero,
                "zero_fraction": round(self.zero_fraction, 6), "histogram": self.histogram,
                "layers": [{**asdict(s), "zero_fraction": round(s.zero_fraction, 6)}
                           for s in self.layers]}


def _key(dy: int, dx: int) -> str:
    return f"{dy},{dx}"


def shift_statistics(model: nn.Module) -> ShiftStats:
    """The displacements every sparse shift layer applies now (rounded, as deployed)."""
    layers = []
    for name, m in shift_layers(model):
        disp = m.displacements().tolist()
        hist = Counter(_key(dy, dx) for dy, dx in disp)
        layers.append(ShiftLayerStats(
            name=name, channels=len(disp), zero=hist.get(_key(0, 0), 0),
            histogram=dict(hist.most_common()),
            max_abs=max((max(abs(dy), abs(dx)) for dy, dx in disp), default=0)))
    return ShiftStats(layers)


class SparseShiftHook:
    """Training hook: L1 penalty ``lam``, freezing from epoch ``freeze_after`` (1-based:
    ``freeze_after=3`` trains displacements in epochs 1-3 and freezes them for the rest),
    statistics after every epoch and at the end.

    Displacements get their own optimizer group: no weight decay (with lambda = 0 nothing
    should pull them to zero, as in the active shift paper) and ``lr_scale`` times the
    learning rate: an adaptive optimizer moves each parameter by about the learning rate a
    step, and a displacement has to travel about 0.5 pixel before its rounded value
    changes, which at the convs' rate takes more steps than a short run has.
    """

    name = "sparse_shift"

    def __init__(self, lam: float = 0.0, freeze_after: int | None = None,
                 lr_scale: float = SHIFT_LR_SCALE) -> None:
        if lam < 0:
            raise ValueError(f"the L1 shift penalty must be >= 0, not {lam}")
        self.lam, self.freeze_after, self.lr_scale = lam, freeze_after, lr_scale

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        params = [p for _, m in shift_layers(model) if not m.deploy for p in (m.dy, m.dx)]
        return [{"params": params, "lr_scale": self.lr_scale, "weight_decay": 0.0}] if params else []

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """``epoch`` is 0-based."""
        if self.freeze_after is not None and epoch >= self.freeze_after:
            freeze_shifts(model)

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        return shift_l1_penalty(model, self.lam)

    def after_backward(self, model: nn.Module) -> None:
        drop_frozen_grads(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        stats = shift_statistics(model)
        return {"shift_zero_fraction": round(stats.zero_fraction, 6)}

    def summary(self, model: nn.Module) -> dict[str, Any]:
        return {self.name: {"lambda": self.lam, "freeze_after": self.freeze_after,
                            **shift_statistics(model).to_dict()}}


# -- the deployed graph -----------------------------------------------------------------------
# What a deployed shift may compile to in ONNX: data movement only. A Gather counts as
# data movement when its indices are constants (a fixed channel pick); with computed
# indices it is a sampler, as are the ops below.
DATA_MOVEMENT_ONNX = frozenset({"Pad", "Reshape", "Split", "Slice", "Concat", "Identity", "Transpose",
                                "Squeeze", "Unsqueeze", "Gather"})
FORBIDDEN_ONNX = frozenset({"Mul", "Resize", "GridSample", "Gather", "GatherElements", "GatherND",
                            "ScatterND", "ScatterElements", "Upsample", "Einsum", "MatMul"})


@dataclass
class ShiftGraphLayer:
    name: str                           # module path of the sparse shift layer
    moves: int                          # distinct non-zero displacements (one Pad each)
    ops: dict[str, int]                 # op type -> nodes of this layer's part of the graph
    inputs: list[str]                   # activation tensors the part reads
    output: str | None                  # the tensor it writes (None: an identity, no nodes)
    problems: list[str]                 # ops that are not data movement, or why it could not be read

    @property
    def data_movement_only(self) -> bool:
        return not self.problems

    @property
    def one_pad_per_move(self) -> bool:
        """Channels grouped by displacement (``models.sparse_shift.shift_order``): one Pad each."""
        return self.ops.get("Pad", 0) == self.moves


@dataclass
class ShiftGraphCheck:
    layers: list[ShiftGraphLayer] = field(default_factory=list)

    @property
    def data_movement_only(self) -> bool:
        return all(s.data_movement_only for s in self.layers)

    @property
    def ops(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.layers:
            total.update(s.ops)
        return dict(sorted(total.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"data_movement_only": self.data_movement_only, "ops": self.ops,
                "layers": [{**asdict(s), "data_movement_only": s.data_movement_only,
                            "one_pad_per_move": s.one_pad_per_move} for s in self.layers]}


def check_shift_graph(onnx_model: Any, layer_map: dict[str, str], model: nn.Module) -> ShiftGraphCheck:
    """Read the part of an exported ONNX graph that each sparse shift layer of ``model`` (the
    deployed model it was exported from) became, and say whether it is data movement only:
    no multiply, resampling or computed-index gather (``FORBIDDEN_ONNX``), only
    ``DATA_MOVEMENT_ONNX`` ops. ``layer_map`` is the ONNX artifact's (``extra["layer_map"]``);
    ``onnx_model`` a ``ModelProto`` or a path."""
    from exporters.layer_map import module_nodes
    from exporters.onnx import load_onnx
    proto = onnx_model if hasattr(onnx_model, "graph") else load_onnx(onnx_model, load_weights=False)
    constants = {t.name for t in proto.graph.initializer} | {
        o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    check = ShiftGraphCheck()
    for name, layer in shift_layers(model):
        moves = len({tuple(d) for d in layer.displacements().tolist()} - {(0, 0)})
        found = module_nodes(proto, layer_map, name)
        if found is None:
            problems = [f"moves {moves} channel groups but the layer map has no output for it"] if moves else []
            check.layers.append(ShiftGraphLayer(name, moves, {}, [], None, problems))
            continue
        problems = []
        for n in found.nodes:
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in constants:
                continue                                    # a fixed pick: data movement
            if n.op_type in FORBIDDEN_ONNX or n.op_type not in DATA_MOVEMENT_ONNX:
                what = "Gather with computed indices" if n.op_type == "Gather" else n.op_type
                if what not in problems:
                    problems.append(what)
        ops = dict(sorted(Counter(n.op_type for n in found.nodes).items()))
        check.layers.append(ShiftGraphLayer(name, moves, ops, found.inputs, found.output, problems))
    return check
