"""Float-side fixes that make a model easier to quantize, applied to the PyTorch model.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction" (ICCV, arXiv:1906.04721), the method behind Qualcomm AIMET's data-free
results (MobileNetV2 on ImageNet: 71.72% float -> 71.08% int8 per-tensor):

* ``bn``: fold BatchNorm into the convolution before it (exact in float). Every other
  fix works on folded weights, since those are the weights that get quantized.
* ``cle``: cross-layer equalization. For a pair ``conv A -> ReLU -> conv B`` the output
  channel i of A can be divided by ``s_i > 0`` and the matching input channel of B
  multiplied by it without changing the function (ReLU is positively homogeneous);
  ``s_i = sqrt(r_A,i / r_B,i)`` gives both channels the same weight range ``sqrt(r_A r_B)``,
  so one per-tensor (or per-channel) int8 grid fits all channels. Depthwise convolutions,
  whose channel ranges differ by orders of magnitude, are where this matters. ReLU6 is
  not homogeneous (``min(s x, 6) != s min(x, 6)``): inside a pair it is replaced by ReLU,
  as in the paper (Sec. 5) and AIMET; that step is reported with its effect on the logits.
* ``hba``: high-bias absorption. CLE can leave large biases in A; a constant
  ``c_i = max(0, beta_i - 3 gamma_i)`` (from A's folded BatchNorm: pre-activations are
  ~ N(beta, gamma^2)) is moved from A's bias through the ReLU into B's bias, exact
  whenever the pre-activation is above ``c_i`` (99.9% under that model). Applied only where
  B has no zero padding, where moving a constant through it is exact.
* ``bias``: empirical bias correction. Quantizing W shifts each output's mean by
  ``E[(Q(W) - W) * x]``; measured on calibration data with the target's weight grid
  (symmetric int8, per channel or per tensor) and subtracted from the bias.

Why on the PyTorch model rather than on the ONNX graph: the fixes need the network's
structure (which conv feeds which through which activation, the BatchNorm statistics
before folding) and per-layer statistics from real data, which ``torch.fx`` and forward
hooks give directly; and a fixed PyTorch model goes through the same exporters as any
other, so the ONNX QDQ and the TFLite int8 get the same fixes and the same layer map.

Every fix reports what it changed and its float effect on the logits
(``max_abs_change`` on probe inputs): ~1e-6 for ``bn`` and ``cle`` (exact up to float32
rounding), a real change for ReLU6 -> ReLU, ``hba`` and ``bias`` (by design).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.errors import InputError
from models.util import error_line

FIXES = ("bn", "cle", "hba", "bias")
NEEDS_BN = ("cle", "hba", "bias")
CLE_ITERATIONS = 50          # pairwise equalization of chains (A -> B -> C) converges geometrically
CLE_TOLERANCE = 1e-3         # stop when every scale is within 0.1% of 1 (an int8 step is 0.8%)
HBA_SIGMAS = 3.0             # the paper's choice: 99.87% of a Gaussian lies above beta - 3 gamma
PROBE_SAMPLES = 32

_WEIGHTED = (nn.Conv2d, nn.Linear)
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_FUNCTIONS = {torch.relu, F.relu, torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d,
              F.dropout}


@dataclass
class FixReport:
    """What one fix did."""

    name: str
    applied: int = 0                       # layers / pairs / BatchNorms changed
    details: list[str] = field(default_factory=list)
    max_abs_change: float | None = None    # on the logits, against the model before this fix
    exact: bool = True                     # expected to leave the float function unchanged
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FixResult:
    model: nn.Module
    reports: list[FixReport]
    renames: dict[str, str] = field(default_factory=dict)   # fixed module path -> reference path
    changed: set[str] = field(default_factory=set)           # modules whose outputs differ by design
    max_abs_change: float | None = None     # float32 logits, fixed vs original, on the probe inputs

    def remap_layer_map(self, layer_map: dict[str, str]) -> dict[str, str]:
        """A layer map of the fixed model, in the reference model's module paths, keeping
        only tensors whose float values the fixes left equal to the reference's."""
        out = {}
        for tensor, key in layer_map.items():
            path = key.split("#")[0]
            if path in self.changed:
                continue
            out[tensor] = self.renames.get(path, path) + key[len(path):]
        return out


def parse_fixes(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"bn,cle,bias"`` -> the fixes in their order of application (bn first)."""
    if not spec:
        return ()
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in items if s not in FIXES]
    if bad:
        raise InputError("--float-fixes", f"a comma list of {', '.join(FIXES)}", ", ".join(bad))
    return tuple(f for f in FIXES if f in items)


def apply_float_fixes(model: nn.Module, fixes: Sequence[str], *, calibration: np.ndarray | None = None,
                      per_channel: bool = True, weight_bits: int = 8,
                      probe: np.ndarray | None = None) -> FixResult:
    """Apply ``fixes`` (names from ``FIXES``) to a copy of ``model`` in eval mode.

    ``calibration`` (float32 NCHW model inputs) is needed by ``bias``; ``probe`` inputs
    measure each step's effect on the logits (default: the first calibration samples).
    ``per_channel``/``weight_bits`` describe the target's weight grid for ``bias``.
    """
    fixes = parse_fixes(list(fixes))
    original = model
    model = copy.deepcopy(model).eval()
    result = FixResult(model, [])
    if not fixes:
        return result
    if "bias" in fixes and calibration is None:
        raise InputError("--float-fixes bias", "calibration data (bias correction is empirical)", "none")
    if probe is None and calibration is not None:
        probe = calibration[:PROBE_SAMPLES]
    x_probe = torch.from_numpy(np.ascontiguousarray(probe, dtype=np.float32)) if probe is not None else None
    try:
        _trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NotImplementedError...
        result.reports.append(FixReport(",".join(fixes), note=f"skipped: torch.fx cannot trace the model "
                                                              f"({error_line(exc)})"))
        return result
    steps: list[tuple[str, Callable[[], FixReport]]] = []
    bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if "bn" in fixes or any(f in fixes for f in NEEDS_BN):
        steps.append(("bn", lambda: fold_batchnorm(model, bn_stats, result.renames)))
    if "cle" in fixes:
        steps.append(("cle", lambda: equalize(model, bn_stats, result.changed)))
    if "hba" in fixes:
        steps.append(("hba", lambda: absorb_high_bias(model, bn_stats, result.changed)))
    if "bias" in fixes:
        steps.append(("bias", lambda: correct_bias(model, calibration, per_channel=per_channel,
                                                     bits=weight_bits)))
    for name, step in steps:
        before = _logits(model, x_probe)
        report = step()
        if name == "bn" and "bn" not in fixes:
            report.note = (report.note + " " if report.note else "") + \
                f"(required by {', '.join(f for f in fixes if f in NEEDS_BN)})"
        after = _logits(model, x_probe)
        if before is not None and after is not None:
            report.max_abs_change = float((after - before).abs().max())
        result.reports.append(report)
    if x_probe is not None:
        ref = _logits(original.eval(), x_probe)
        result.max_abs_change = float((_logits(model, x_probe) - ref).abs().max())
    return result


def _logits(model: nn.Module, x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------- graph helpers


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(model)


def _module_calls(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


# --------------------------------------------------------------------- BatchNorm folding


def fold_batchnorm(model: nn.Module, bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   renames: dict[str, str] | None = None) -> FixReport:
    """Fold every ``BatchNorm`` that is the only consumer of a conv/linear into it.

    ``bn_stats`` receives, per folded layer, the BatchNorm's ``(beta, |gamma|)``: the mean
    and spread of the folded layer's outputs, which high-bias absorption needs later.
    ``renames`` receives layer path -> BatchNorm path (the folded layer's output is what
    the BatchNorm used to output).
    """
    report = FixReport("bn")
    gm = _trace(model)
    calls = _module_calls(gm)
    mods = dict(model.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), _WEIGHTED):
            continue
        user = _single_user(node)
        if user is None or user.op != "call_module":
            continue
        bn = mods.get(user.target)
        if not isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm1d)) or calls[node.target] > 1 or calls[user.target] > 1:
            continue
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        layer = mods[node.target]
        _fold(layer, bn)
        gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_mean)
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
        if bn_stats is not None:
            bn_stats[node.target] = (beta.clone().float(), gamma.abs().clone().float())
        if renames is not None:
            renames[node.target] = user.target
        _set_module(model, user.target, nn.Identity())
        report.applied += 1
        report.details.append(f"{user.target} -> {node.target}")
    return report


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """In float64, rounded to the layer's dtype once (as an exporter's folding does)."""
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    w = layer.weight.double()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    layer.weight.copy_(w * scale.reshape(-1, *([1] * (w.ndim - 1))))
    new_bias = ((bias - mean) * scale + beta).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


# --------------------------------------------------------------------- pairs A -> ... -> B


@dataclass
class _Pair:
    a: str
    b: str
    between: list[torch.fx.Node]        # the nodes between A and B (activations, pools...)
    relu6: list[str]                    # ReLU6 modules in between (replaced by ReLU)


def _pairs(model: nn.Module) -> list[_Pair]:
    """Weight layers A whose output reaches exactly one weight layer B through a chain of
    single-consumer, per-channel positively homogeneous ops (ReLU, ReLU6, pooling,
    flatten of a 1x1 map, dropout, identity)."""
    gm = _trace(model)
    calls = _module_calls(gm)
    mods = dict(model.named_modules())
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _WEIGHTED) or calls[node.target] > 1:
            continue
        between, relu6 = [], []
        cur = _single_user(node)
        while cur is not None:
            if cur.op == "call_module":
                m = mods.get(cur.target)
                if isinstance(m, _WEIGHTED):
                    break
                if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0):
                    relu6.append(cur.target)
                elif not isinstance(m, _HOMOGENEOUS) or isinstance(m, nn.Dropout) and m.training:
                    cur = None
                    break
            elif cur.op == "call_function" and cur.target in _FUNCTIONS:
                pass
            elif cur.op == "call_method" and cur.target in ("relu", "flatten"):
                pass
            else:
                cur = None
                break
            between.append(cur)
            cur = _single_user(cur)
        if cur is None or cur.op != "call_module" or calls.get(cur.target, 0) > 1:
            continue
        a, b = mods[node.target], mods[cur.target]
        if not _channels_match(a, b, between, mods):
            continue
        out.append(_Pair(node.target, cur.target, between, relu6))
    return out


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _in_channels(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def _channels_match(a: nn.Module, b: nn.Module, between: list[torch.fx.Node], mods: dict[str, nn.Module]) -> bool:
    """A's output channel i must be B's input channel i: equal counts, and a flatten in
    between only of a 1x1 map (a global pool before it)."""
    if _out_channels(a) != _in_channels(b):
        return False
    if isinstance(a, nn.Linear) and isinstance(b, nn.Conv2d):
        return False
    flattens = [n for n in between if (n.op == "call_module" and isinstance(mods.get(n.target), nn.Flatten))
                or n.target in (torch.flatten, "flatten")]
    if isinstance(b, nn.Linear) and isinstance(a, nn.Conv2d):
        pools = [n for n in between if n.op == "call_module" and isinstance(
            mods.get(n.target), (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
            and mods[n.target].output_size in (1, (1, 1))]
        return bool(flattens) and bool(pools)
    return not flattens


def _groups(m: nn.Module) -> int:
    return m.groups if isinstance(m, nn.Conv2d) else 1


def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    """Range of each output channel's weights."""
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _in_ranges(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Range of the weights each input channel meets (grouped and depthwise convs included)."""
    w = w.abs()
    if w.ndim == 2:                                                  # Linear: (out, in)
        return w.amax(0)
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    return w.reshape(groups, cout_g, cin_g, -1).amax(dim=(1, 3)).reshape(-1)


def _scale_in(w: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    """``w`` with the weights of input channel i multiplied by s_i."""
    if w.ndim == 2:
        return w * s.reshape(1, -1)
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    return (w.reshape(groups, cout_g, cin_g, *w.shape[2:]) * s.reshape(groups, 1, cin_g, 1, 1)).reshape(w.shape)


# --------------------------------------------------------------------- CLE


def equalize(model: nn.Module, bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
             changed: set[str] | None = None) -> FixReport:
    """Cross-layer equalization of every pair, iterated so chains (A -> B -> C) settle.

    The scales are applied to float64 copies of the weights and written back once, so
    the float32 model carries one rounding, not one per iteration.
    """
    report = FixReport("cle")
    pairs = _pairs(model)
    replaced = 0
    for p in pairs:
        for path in p.relu6:
            old = model.get_submodule(path)
            _set_module(model, path, nn.ReLU(inplace=getattr(old, "inplace", False)))
            replaced += 1
    if replaced:
        report.exact = False
        report.details.append(f"ReLU6 -> ReLU in {replaced} place(s) between equalized layers "
                              "(ReLU6 does not commute with per-channel scaling)")
    if not pairs:
        report.note = "no equalizable layer pairs (conv -> ReLU -> conv with one consumer)"
        return report
    mods = dict(model.named_modules())
    names = sorted({n for p in pairs for n in (p.a, p.b)})
    w = {n: mods[n].weight.detach().double().clone() for n in names}
    b = {n: mods[n].bias.detach().double().clone() for n in names if mods[n].bias is not None}
    g = {n: _groups(mods[n]) for n in names}

    def spread(p: _Pair) -> float:
        r = torch.cat([_out_ranges(w[p.a]), _in_ranges(w[p.b], g[p.b])])
        r = r[r > 0]
        return float(r.max() / r.min()) if r.numel() else 1.0

    before = {p.a: spread(p) for p in pairs}
    iterations = 0
    for iterations in range(1, CLE_ITERATIONS + 1):
        worst = 0.0
        for p in pairs:
            r1, r2 = _out_ranges(w[p.a]), _in_ranges(w[p.b], g[p.b])
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
            w[p.a] = w[p.a] / s.reshape(-1, *([1] * (w[p.a].ndim - 1)))
            if p.a in b:
                b[p.a] = b[p.a] / s
            w[p.b] = _scale_in(w[p.b], s, g[p.b])
            if bn_stats is not None and p.a in bn_stats:
                beta, gamma = bn_stats[p.a]
                bn_stats[p.a] = (beta / s.to(beta.dtype), gamma / s.to(gamma.dtype))
            worst = max(worst, float(s.log().abs().max()))
        if worst < CLE_TOLERANCE:
            break
    with torch.no_grad():
        for n in names:
            mods[n].weight.copy_(w[n])
            if n in b:
                mods[n].bias.copy_(b[n])
    for p in pairs:
        report.details.append(f"{p.a} -> {p.b}: channel range spread {before[p.a]:.1f}x -> {spread(p):.1f}x")
        if changed is not None:
            changed.add(p.a)
            changed.update(n.target for n in p.between if n.op == "call_module")
    report.applied = len(pairs)
    report.note = f"{len(pairs)} pairs, {iterations} iteration(s)"
    return report


# --------------------------------------------------------------------- high-bias absorption


@torch.no_grad()
def absorb_high_bias(model: nn.Module, bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     changed: set[str] | None = None) -> FixReport:
    """Move ``c = max(0, beta - 3 gamma)`` from A's bias through a ReLU into B's bias."""
    report = FixReport("hba", exact=False)
    mods = dict(model.named_modules())
    candidates = 0
    for p in _pairs(model):
        if p.a not in bn_stats or p.relu6:
            continue
        acts = [n for n in p.between if n.op == "call_module"
                and not isinstance(mods[n.target], (nn.Identity, nn.Dropout))]
        if [type(mods[n.target]) for n in acts] != [nn.ReLU] or len(acts) != sum(
                1 for n in p.between if n.op != "call_module"
                or not isinstance(mods[n.target], (nn.Identity, nn.Dropout))):
            continue
        a, b = mods[p.a], mods[p.b]
        if isinstance(b, nn.Conv2d) and any(int(x) != 0 for x in _pads(b)):
            continue                      # a constant through zero padding is not a constant
        candidates += 1
        beta, gamma = bn_stats[p.a]
        c = torch.clamp(beta.double() - HBA_SIGMAS * gamma.double(), min=0)
        if not bool((c > 0).any()) or a.bias is None:
            continue
        a.bias.copy_(a.bias.double() - c)
        shift = _response_to_constant(b.weight.detach().double(), _groups(b), c)
        if b.bias is None:
            b.bias = nn.Parameter(shift.to(b.weight.dtype))
        else:
            b.bias.copy_(b.bias.double() + shift)
        bn_stats[p.a] = (beta - c, gamma)
        report.applied += 1
        report.details.append(f"{p.a} -> {p.b}: absorbed {int((c > 0).sum())} channel(s), "
                              f"max {float(c.max()):.3g}")
        if changed is not None:
            changed.update([p.a, *(n.target for n in acts)])
    if not candidates:
        report.note = "no conv -> ReLU -> unpadded conv pair after a folded BatchNorm"
    elif not report.applied:
        report.note = (f"{candidates} candidate pair(s), no channel with beta > {HBA_SIGMAS:g} gamma "
                       "(nothing to absorb)")
    return report


def _pads(b: nn.Conv2d) -> tuple[int, ...]:
    if isinstance(b.padding, str):
        return (0,) if b.padding == "valid" else (1,)
    return tuple(b.padding)


def _response_to_constant(w: torch.Tensor, groups: int, c: torch.Tensor) -> torch.Tensor:
    """A layer with weights ``w`` applied to a constant input ``c`` (per input channel), no bias."""
    if w.ndim == 2:
        return w @ c
    cin_g, cout_g = w.shape[1], w.shape[0] // groups
    wsum = w.reshape(groups, cout_g, cin_g, -1).sum(-1)            # (groups, cout_g, cin_g)
    return torch.einsum("goi,gi->go", wsum, c.reshape(groups, cin_g)).reshape(-1)


# --------------------------------------------------------------------- bias correction


def quantize_weight(w: torch.Tensor, *, per_channel: bool = True, bits: int = 8) -> torch.Tensor:
    """Symmetric signed grid of ONNX Runtime and TFLite: scale = max|w| / (2^(bits-1) - 1),
    round half to even, levels in [-(2^(bits-1) - 1), 2^(bits-1) - 1]; the dequantized
    weights (what the int8 kernel effectively multiplies by)."""
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(1).reshape(-1, *([1] * (w.ndim - 1)))
    else:
        amax = w.abs().max()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


@torch.no_grad()
def correct_bias(model: nn.Module, calibration: np.ndarray | None, *, per_channel: bool = True,
                 bits: int = 8, batch_size: int = 32) -> FixReport:
    """Subtract ``E[(Q(W) - W) * x]`` (per output channel, over calibration inputs) from
    every conv/linear bias: the mean shift weight quantization would add."""
    report = FixReport("bias", exact=False)
    if calibration is None or len(calibration) == 0:
        report.note = "no calibration data"
        return report
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _WEIGHTED)}
    deltas = {n: quantize_weight(m.weight.detach(), per_channel=per_channel, bits=bits) - m.weight.detach()
              for n, m in layers.items()}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            if isinstance(mod, nn.Conv2d):
                y = F.conv2d(x, deltas[name], None, mod.stride, mod.padding, mod.dilation, mod.groups)
                s, n = y.sum(dim=(0, 2, 3)), y.shape[0] * y.shape[2] * y.shape[3]
            else:
                y = F.linear(x, deltas[name])
                s, n = y.reshape(-1, y.shape[-1]).sum(0), y.reshape(-1, y.shape[-1]).shape[0]
            sums[name] = sums.get(name, 0) + s.double()
            counts[name] = counts.get(name, 0) + n
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        x_all = torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.float32))
        for i in range(0, len(x_all), batch_size):
            model(x_all[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    for name, m in layers.items():
        if name not in sums:
            continue
        shift = (sums[name] / counts[name]).float()
        if m.bias is None:
            m.bias = nn.Parameter(-shift)
        else:
            m.bias.sub_(shift)
        report.applied += 1
        rel = float(shift.abs().max())
        report.details.append(f"{name}: max |shift| {rel:.3g}")
    report.note = (f"weights on the {'per-channel' if per_channel else 'per-tensor'} symmetric int{bits} grid, "
                   f"{len(calibration)} calibration inputs")
    return report


def describe(reports: Iterable[FixReport]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in reports]
