"""Weight rounding beyond round-to-nearest, on the PyTorch model, for any int8 target.

Why: on a real ImageNet network (EfficientNet-Lite) the int8 error is dominated by the
weights, not the activations: rounding every folded weight to the nearest point of its
symmetric per-channel int8 grid already costs most of the logit SQNR, so 16-bit
activations cannot help and only a better choice of the integer weights can. What
matters is not how close ``q * s`` is to ``w`` but how close the layer's *output* is,
``(Q(W) - W) x`` on real inputs ``x``: per layer that error is ``d^T H d`` for each
output row's weight error ``d`` with ``H = E[x x^T]``, the (uncentred) second moment of
the layer's inputs over the calibration set. Every technique here minimises it:

* ``rtn``: round to nearest, scale ``max|w| / 127`` (what ORT's and TFLite's quantizers
  do on their own). The baseline.
* ``mse`` (per-channel scale search): each output channel's clipping ratio
  ``s = r max|w| / 127`` is chosen from a grid of ``r`` to minimise its ``d^T H d``.
  Clipping a rare large weight buys a finer step for all the others.
* ``gptq``: the optimal-brain-quantization update (Frantar et al., "GPTQ", 2023; OBQ,
  2022): the input columns of ``W`` are rounded one at a time, and each rounding error is
  pushed onto the columns not yet rounded through ``H^-1``, the least-squares
  compensation for that error. Rows keep their scales, so the result is still a plain
  symmetric per-channel int8 tensor. It does what AdaRound (Nagel et al. 2020) does,
  choose each weight's rounding from the layer's output error, in closed form per column
  instead of thousands of gradient steps per layer, which is what makes a real network fit
  in minutes on two CPU cores.
* ``sequential`` (with either): each layer's ``H`` is collected on inputs that went
  through the layers already quantized, so a layer also corrects the error of those
  before it (AIMET's Sequential MSE does the same for scales).
* ``bias`` (bias correction, Nagel et al. 2019): whatever mean shift the chosen weights
  still leave, ``E[(Q(W) - W) x]`` per output channel, is subtracted from the bias.

The result is the same float model with every optimised weight replaced by ``q * s``,
exactly on its int8 grid, and each row keeping one weight at ``+-127 s``: any quantizer
that takes ``max|w| / 127`` as the scale (ONNX Runtime's symmetric int8, TFLite's
converter, coremltools' linear int8) recovers exactly these integers. That is how one
optimisation serves the QDQ ONNX, the int8 TFLite and the Core ML int8 weights alike, and
it is checked after quantization (``grid_mismatch``), not assumed.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.errors import InputError

TECHNIQUES = ("rtn", "mse", "gptq", "sequential", "bias")
DEFAULT_TECHNIQUES = ("mse", "gptq", "bias")
NEGLIGIBLE_ROW = 1e-5   # a row this small against its layer's largest is written as zeros (see _on_grid)
SCALE_GRID = tuple(float(r) for r in np.linspace(0.70, 1.0, 16))   # clipping ratios tried per channel
DAMPING = 0.1             # GPTQ's Tikhonov term, as a fraction of the mean diagonal of H: 0.1 held out
                          # better than GPTQ's 0.01 on EfficientNet-Lite1 (+0.3..1.0 dB, README)
MAX_POSITIONS = 65_536    # input positions per layer used for H (spatial subsample)
MAX_GATHER = 1 << 23      # floats gathered per layer and batch (a 1152-channel 5x5 depthwise input
                          # has 28,800 values per position: a few hundred positions a batch suffice)
MIN_POSITIONS_PER_COL = 4  # GPTQ fits H's inverse: with fewer samples than this per column it
                           # overfits the calibration set (a classifier on 128 images): mse only
SEQUENTIAL_GROUP = 6      # layers whose inputs are collected in one forward when sequential
BATCH = 16

Progress = Callable[[int, int, str], None]


@dataclass
class LayerRounding:
    """What the optimisation did to one layer, with the output error it targets measured
    before (round to nearest) and after, relative to the layer's output energy."""

    name: str
    kind: str                 # conv | depthwise | grouped | linear
    shape: list[int]
    rtn_error: float          # E||(Q_rtn(W) - W) x||^2 / E||W x||^2 on the layer's inputs
    error: float              # the same for the chosen weights
    mean_clip: float          # mean chosen ratio (1.0 = no clipping)
    rows_fallback: int = 0    # rows where GPTQ could not keep a +-127 level (rounded to nearest)

    @property
    def gain_db(self) -> float:
        return 10 * float(np.log10(max(self.rtn_error, 1e-30) / max(self.error, 1e-30)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gain_db": round(self.gain_db, 2)}


@dataclass
class RoundingResult:
    model: nn.Module
    techniques: tuple[str, ...]
    layers: list[LayerRounding] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        gains = [l.gain_db for l in self.layers]
        return {"techniques": list(self.techniques), "samples": self.samples, "seconds": round(self.seconds, 1),
                "layers": [l.to_dict() for l in self.layers],
                "median_gain_db": round(float(np.median(gains)), 2) if gains else None}


def parse_techniques(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"gptq,bias"`` -> ordered tuple; ``rtn`` alone means no optimisation."""
    if spec is None:
        return DEFAULT_TECHNIQUES
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in items if s not in TECHNIQUES]
    if bad:
        raise InputError("--weight-rounding", f"a comma list of {', '.join(TECHNIQUES)}", ", ".join(bad))
    if "rtn" in items and len(items) > 1:
        raise InputError("--weight-rounding", "rtn alone, or a list of techniques without it", ", ".join(items))
    return tuple(t for t in TECHNIQUES if t in items)


def symmetric_scale(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-row ``max|w| / qmax`` (rows = output channels), the scale every int8 converter takes."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().reshape(w.shape[0], -1).amax(1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _quant(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integers of ``w`` (rows x cols) on per-row ``scale``: round half to even, clamped."""
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)


# ------------------------------------------------------------------ layer input statistics


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups == 1:
        return "conv"
    return "depthwise" if m.groups == m.in_channels == m.out_channels else "grouped"


def _groups(m: nn.Module) -> int:
    return m.groups if isinstance(m, nn.Conv2d) else 1


def _columns(m: nn.Module, x: torch.Tensor, budget: int, rng: torch.Generator) -> torch.Tensor:
    """At most ``budget`` of the layer's input patches, as ``(groups, positions, cols)``:
    a row of ``W`` (one output channel, ``cols`` = in/groups * kh * kw values) meets each.

    Patches are gathered only at randomly chosen output positions, never unfolded whole:
    an early layer of a 240 px network has millions of positions per batch, and its
    second moment is estimated as well from a few tens of thousands.
    """
    if isinstance(m, nn.Linear):
        cols = x.reshape(-1, x.shape[-1])
        if cols.shape[0] > budget:
            cols = cols[torch.randperm(cols.shape[0], generator=rng)[:budget]]
        return cols[None].float()
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    idx = torch.randperm(total, generator=rng)[:budget] if total > budget else torch.arange(total)
    b, rest = idx // (oh * ow), idx % (oh * ow)
    oy, ox = rest // ow, rest % ow
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    xp = xp.permute(0, 2, 3, 1)                                                 # N, H, W, C
    # every tap of every chosen position in one gather (tap t = ky * kw + kx)
    ky = torch.arange(kh).repeat_interleave(kw) * dh
    kx = torch.arange(kw).repeat(kh) * dw
    patches = xp[b[:, None], (oy * sh)[:, None] + ky, (ox * sw)[:, None] + kx]     # P, kh*kw, C
    patches = patches.transpose(1, 2).contiguous()      # P, C, kh*kw: the layout H's matmul always had
    g = m.groups
    return patches.reshape(len(idx), g, (c // g) * kh * kw).transpose(0, 1).float()


class _Moments:
    """Running ``sum x x^T`` (per group) of one layer's inputs, spatially subsampled;
    products in float32, accumulated in float64."""

    def __init__(self, m: nn.Module, budget: int, seed: int) -> None:
        self.m, self.budget = m, budget
        self.h: torch.Tensor | None = None
        self.count = 0
        self.rng = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        m = self.m
        per_position = m.in_features if isinstance(m, nn.Linear) else \
            m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        cols = _columns(m, x.detach(), max(64, min(self.budget, MAX_GATHER // per_position)), self.rng)
        h = (cols.transpose(1, 2) @ cols).double()
        self.h = h if self.h is None else self.h + h
        self.count += cols.shape[1]

    def mean(self) -> torch.Tensor:
        assert self.h is not None
        return self.h / max(self.count, 1)


class _Stop(Exception):
    pass


def _batches(x: np.ndarray, batch: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch):
        yield torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))


@torch.no_grad()
def _collect(model: nn.Module, names: Sequence[str], x: np.ndarray, stop_after: str | None,
             per_batch_budget: int, seed: int) -> dict[str, _Moments]:
    """Input moments of ``names`` over ``x``; the forward stops after ``stop_after``'s input
    is seen (the rest of the network is not needed for it)."""
    mods = dict(model.named_modules())
    moments = {n: _Moments(mods[n], per_batch_budget, seed) for n in names}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple) -> None:
            moments[name].add(args[0])
            if name == stop_after:
                raise _Stop
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for xb in _batches(x, BATCH):
            try:
                model(xb)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return moments


# ------------------------------------------------------------------ the per-layer solvers


def _output_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per group and row ``d^T H d``: d (g, rows, cols), h (g, cols, cols) -> (g, rows)."""
    return torch.einsum("grc,gcd,grd->gr", d, h, d)


def _search_scales(w: torch.Tensor, h: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per row the clipping ratio of ``SCALE_GRID`` with the least output error (RTN)."""
    g, rows, _ = w.shape
    w, h = w.float(), h.float()          # comparisons between candidates: float32 is plenty
    base = symmetric_scale(w.reshape(g * rows, -1), bits=8 if qmax == 127 else 16).reshape(g, rows)
    best_err = torch.full((g, rows), float("inf"))
    best = base.clone()
    for r in SCALE_GRID:
        s = base * r
        q = torch.clamp(torch.round(w / s[..., None]), -qmax, qmax) * s[..., None]
        err = _output_error(q - w, h)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.double()


def _gptq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """GPTQ over all groups at once: integers (g, rows, cols) for weights (g, rows, cols).

    Columns are visited in order of decreasing ``diag(H)`` (most energetic inputs first,
    GPTQ's "act-order"), each rounded, its error spread over the remaining columns with
    the upper Cholesky factor of ``H^-1``. Each row's largest weight is pinned to
    ``+-qmax``: that level is what lets a converter's ``max|w| / qmax`` recover the
    row's scale, and the pinned error is compensated like any other.
    """
    g, rows, cols = w.shape
    w = w.clone()
    h = h.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0
    diag_mean = diag.mean(1, keepdim=True).clamp_min(1e-12)
    # An input never active on the calibration set (a channel a ReLU kept at zero there)
    # gets a unit diagonal: rounded to nearest, no error pushed onto it. GPTQ's own code
    # zeroes such weights, which fits the calibration set and breaks every input where
    # the channel does fire.
    h = h + torch.diag_embed(torch.where(dead, torch.ones_like(diag), DAMPING * diag_mean.expand_as(diag)))
    perm = torch.argsort(torch.diagonal(h, dim1=1, dim2=2), dim=1, descending=True)
    inv = torch.argsort(perm, dim=1)
    w = torch.gather(w, 2, perm[:, None, :].expand(g, rows, cols))
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(g, cols, cols)), 2,
                     perm[:, None, :].expand(g, cols, cols))
    pin_col = w.abs().argmax(2)                                                   # g, rows
    pin_val = torch.sign(torch.gather(w, 2, pin_col[..., None])[..., 0]) * qmax
    # AdaRound's search space: each weight rounds down or up from its own value, never
    # further; the compensation only chooses between the two (unbounded, GPTQ moves
    # weights along directions a few hundred calibration patches barely see, and the
    # layer fits its calibration set at the cost of held-out inputs)
    floor = torch.floor(w / scale[..., None])
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u = torch.linalg.cholesky(hinv, upper=True)                                   # g, cols, cols
    q = torch.empty_like(w)
    for i in range(cols):
        col = w[:, :, i]
        qi = torch.clamp(torch.round(col / scale), floor[:, :, i], floor[:, :, i] + 1).clamp(-qmax, qmax)
        qi = torch.where(pin_col == i, pin_val, qi)
        q[:, :, i] = qi
        err = (col - qi * scale) / u[:, i, i][:, None]
        w[:, :, i + 1:] -= err[:, :, None] * u[:, i, i + 1:][:, None, :]
    return torch.gather(q, 2, inv[:, None, :].expand(g, rows, cols))


@torch.no_grad()
def _round_layer(m: nn.Module, h: torch.Tensor, techniques: Sequence[str], bits: int, name: str,
                 positions: int) -> LayerRounding:
    """Replace ``m.weight`` by its optimised grid values; report the output error."""
    qmax = 2 ** (bits - 1) - 1
    g = _groups(m)
    w32 = m.weight.detach()
    w = w32.double().reshape(g, w32.shape[0] // g, -1)
    base = symmetric_scale(w.reshape(w32.shape[0], -1), bits).reshape(g, -1)
    rtn = torch.clamp(torch.round(w / base[..., None]), -qmax, qmax) * base[..., None]
    energy = torch.einsum("grc,gcd,grd->", w, h, w).clamp_min(1e-30)
    rtn_err = float(_output_error(rtn - w, h).sum() / energy)
    scale = _search_scales(w, h, qmax) if "mse" in techniques else base
    fallback = 0
    if "gptq" in techniques and positions >= MIN_POSITIONS_PER_COL * w.shape[2]:
        q = _gptq(w, h, scale, qmax)
        # every row must keep a level at +-qmax so a converter's max|w|/qmax scale finds
        # ``scale`` again; a row that lost it (rare) is rounded to nearest instead
        lost = q.abs().amax(2) < qmax
        if bool(lost.any()):
            fallback = int(lost.sum())
            q = torch.where(lost[..., None], torch.clamp(torch.round(w / scale[..., None]), -qmax, qmax), q)
    else:
        q = torch.clamp(torch.round(w / scale[..., None]), -qmax, qmax)
    new = q * scale[..., None]
    err = float(_output_error(new - w, h).sum() / energy)
    if err > rtn_err:                      # never worse than round-to-nearest on its own data
        new, err, scale = rtn, rtn_err, base
    ratio = float((scale / base).mean())
    m.weight.copy_(_on_grid(new.reshape(w32.shape), bits).to(w32.dtype))
    return LayerRounding(name, _kind(m), list(w32.shape), rtn_err, err, ratio, fallback)


def _on_grid(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``q * s`` in float32 such that ``max|w| / qmax`` per row gives back ``s``: scale and
    integers are recomputed from the float32 tensor itself, so what is stored is exactly
    what a converter will read.

    Rows whose largest weight is under ``NEGLIGIBLE_ROW`` of the layer's largest become
    exact zeros. They are channels BatchNorm folding all but switched off (EfficientNet-Lite1
    has rows at 1e-9 of their layer): their own scale falls below the quantizers' floor
    (ONNX Runtime clamps it and writes zeros), so without this the QDQ model and the
    TFLite file would not hold the integers written here (11,007 re-rounded weights).
    """
    qmax = 2 ** (bits - 1) - 1
    w32 = w.float()
    amax = w32.abs().reshape(w32.shape[0], -1).amax(1)
    live = (amax >= NEGLIGIBLE_ROW * amax.max()).reshape(-1, *([1] * (w32.ndim - 1)))
    s = symmetric_scale(w32, bits).reshape(-1, *([1] * (w32.ndim - 1)))
    return torch.where(live, torch.clamp(torch.round(w32 / s), -qmax, qmax) * s, torch.zeros_like(w32))


@torch.no_grad()
def _bias_correct(model: nn.Module, reference: nn.Module, names: Sequence[str], x: np.ndarray) -> None:
    """Subtract the per-channel mean output shift of every optimised layer, measured layer by
    layer (the float reference's output vs the quantized-weight layer on the same input)."""
    mods = dict(model.named_modules())
    ref_mods = dict(reference.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            ref = ref_mods[name]
            delta = out - ref._conv_forward(args[0], ref.weight, ref.bias) if isinstance(mod, nn.Conv2d) \
                else out - F.linear(args[0], ref.weight, ref.bias)
            dims = [0] + list(range(2, delta.ndim)) if delta.ndim > 2 else [0]
            sums[name] = sums.get(name, 0) + delta.sum(dims, dtype=torch.float64)
            counts[name] = counts.get(name, 0) + int(delta.numel() // delta.shape[1])
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        for xb in _batches(x, BATCH):
            model(xb)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        m = mods[n]
        shift = (sums[n] / max(counts[n], 1)).to(m.weight.dtype)
        if m.bias is None:
            m.bias = nn.Parameter(-shift)
        else:
            m.bias.sub_(shift)


def weight_layers(model: nn.Module) -> list[str]:
    """Conv and linear layers in the order their forward runs (module order as fallback)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def optimize_weights(model: nn.Module, calibration: np.ndarray, techniques: Sequence[str] = DEFAULT_TECHNIQUES,
                     *, bits: int = 8, skip: Sequence[str] = (), progress: Progress | None = None,
                     seed: int = 0) -> RoundingResult:
    """A copy of ``model`` (BatchNorm already folded: these are the weights that get
    quantized) whose conv/linear weights sit on their optimised symmetric per-channel grid.

    ``calibration`` is float32 NCHW model input; ``skip`` names layers left in float
    (mixed precision keeps them so).
    """
    techniques = parse_techniques(list(techniques))
    t0 = time.perf_counter()
    reference = copy.deepcopy(model).eval()
    out = copy.deepcopy(model).eval()
    result = RoundingResult(out, techniques, samples=int(len(calibration)))
    if techniques == ("rtn",):
        names = [n for n in weight_layers(out) if n not in skip]
        mods = dict(out.named_modules())
        with torch.no_grad():
            for n in names:
                mods[n].weight.copy_(_on_grid(mods[n].weight, bits))
        result.seconds = time.perf_counter() - t0
        return result
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim < 2 or len(calibration) == 0:
        raise InputError("calibration data", "a batch of model inputs", f"shape {calibration.shape}")
    names = [n for n in weight_layers(out) if n not in skip]
    if not names:       # no conv/linear modules (a torch.export .pt2 graph): nothing to round here
        result.seconds = time.perf_counter() - t0
        return result
    mods = dict(out.named_modules())
    budget = max(1, MAX_POSITIONS // max(1, -(-len(calibration) // BATCH)))
    sequential = "sequential" in techniques
    # Sequential: the moments of each group of layers are collected on the network whose
    # earlier layers are already quantized (one forward per group, stopped after the
    # group's last layer); without it, one forward of the float network serves all.
    group = SEQUENTIAL_GROUP if sequential else len(names)
    for start in range(0, len(names), group):
        chunk = names[start:start + group]
        stats = _collect(out if sequential else reference, chunk, calibration, chunk[-1], budget, seed)
        for i, n in enumerate(chunk, start):
            if progress:
                progress(i, len(names), n)
            result.layers.append(_round_layer(mods[n], stats[n].mean(), techniques, bits, n, stats[n].count))
    if "bias" in techniques:
        _bias_correct(out, reference, names, calibration)
    if progress:
        progress(len(names), len(names), "")
    result.seconds = time.perf_counter() - t0
    return result


def grid_mismatch(model: nn.Module, quantized: dict[str, np.ndarray], bits: int = 8) -> dict[str, int]:
    """Per layer, how many integers a converter wrote differ from the optimised ones
    (``quantized``: layer name -> the int weights read back from an artifact). Zero
    everywhere is the proof that the artifact carries the optimisation."""
    out = {}
    mods = dict(model.named_modules())
    for name, q in quantized.items():
        w = mods[name].weight.detach().float()
        s = symmetric_scale(w, bits).reshape(-1, *([1] * (w.ndim - 1)))
        mine = torch.round(w / s).numpy().astype(np.int64)
        out[name] = int((mine.reshape(q.shape) != q.astype(np.int64)).sum())
    return out


__all__ = ["DEFAULT_TECHNIQUES", "LayerRounding", "RoundingResult", "TECHNIQUES", "grid_mismatch",
           "optimize_weights", "parse_techniques", "symmetric_scale", "weight_layers"]
