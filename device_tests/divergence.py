"""First-divergent-layer search: which layer's output first leaves the tolerance.

Runtime-independent by construction: it needs from each side only the ``Runner``
interface (``intermediate_names()`` in execution order, ``infer_intermediates()``) and a
*layer map* from that runner's tensor names to PyTorch module call keys
(``exporters/layer_map.py``), found in ``runner.artifact.extra["layer_map"]``. A runner
whose artifact has no layer map (the torch runner) is taken to name its intermediates by
module call key already. So the same search works for torch vs ONNX Runtime, torch vs
LiteRT, ONNX fp32 vs ONNX int8, and any runtime added later, with no ``if`` on kinds.

The layers compared are those both sides can expose (a Conv folded into its BatchNorm
has no tensor of its own; the BatchNorm does), walked in the target's execution order.
Each gets the ``error_metrics`` of the comparator; a layer fails when it breaks the
per-layer criteria of the pair's ``Tolerance`` (range-relative error for fp32, SNR for
quantized). The first failing layer is *the first divergent layer*: its PyTorch module
path and its tensor name in the artifact are what a user needs to find the cause. When
no single layer fails although the outputs do, the curve still tells two cases apart:

* a **step**: the per-layer SNR falls by ``STEP_DB`` or more below every earlier layer at
  one layer (``Divergence.step``). That layer computes something slightly different (a
  converter's epsilon, e.g. coremltools fusing GroupNorm's affine into a ``batch_norm``
  with eps 1e-5: 5e-6 relative, below the per-layer bound, but later layers amplify it);
  the note names it;
* no step: the error builds up gradually over many layers (e.g. fp16 over a deep net),
  and the note says so, never both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from device_tests.compare import LayerError, Tolerance, error_metrics, run_batched
from device_tests.runners.base import Runner


@dataclass
class Divergence:
    """The per-layer error curve of one pair, and its first failing layer (if any)."""

    layers: list[LayerError] = field(default_factory=list)
    first: LayerError | None = None
    samples: int = 0
    note: str = ""
    step: LayerError | None = None   # no layer failed, but the SNR steps down here (see above)

    def summary(self) -> dict[str, Any] | None:
        """The ``first_divergent`` entry of a ``PairReport``."""
        if self.first is None:
            return None
        f = self.first
        return {"layer": f.module, "tensor": f.tensor, "index": f.index, "max_abs": f.max_abs,
                "max_rel": f.max_rel, "cosine": f.cosine, "snr_db": f.snr_db}

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.summary(), "samples": self.samples, "note": self.note,
                "step": asdict(self.step) if self.step is not None else None,
                "layers": [asdict(x) for x in self.layers]}


STEP_DB = 10.0   # an SNR fall of 10 dB (3.2x the error amplitude) at one layer is a step, not drift
# What an identical layer counts as in the floor: fp32's own rounding (one ulp, 2**-23 relative).
# Not infinite, or the first layer with any rounding after an exact prefix would always be a
# step; not ignored, or a layer that adds real error right after exact ones could never be one
# (a Core ML GroupNorm's 5e-6 epsilon change at 106 dB after a bit-exact conv).
IDENTICAL_DB = 20 * float(np.log10(2.0 ** 23))


def snr_step(layers: list[LayerError], min_drop_db: float = STEP_DB) -> tuple[LayerError, float, float] | None:
    """The layer where the SNR falls furthest below the lowest SNR of all earlier layers,
    with that earlier floor and its own SNR, when the fall is at least ``min_drop_db``.

    Why below the floor and not below the previous layer: SNR wobbles from layer to layer
    (a ReLU after a conv, a pooling), but error does not heal; a new low by a wide margin
    is where a layer added error of its own. An identical layer (no SNR) adds nothing and
    counts as ``IDENTICAL_DB`` in the floor."""
    floor: float | None = None       # None: no earlier layer
    best: tuple[LayerError, float, float] | None = None
    for layer in layers:
        snr = layer.snr_db
        if snr is None:
            floor = IDENTICAL_DB if floor is None else min(floor, IDENTICAL_DB)
            continue
        if floor is not None:
            drop = floor - snr
            if drop >= min_drop_db and (best is None or drop > best[1] - best[2]):
                best = (layer, floor, snr)
        floor = snr if floor is None else min(floor, snr)
    return best


def layer_keys(runner: Runner) -> dict[str, str]:
    """Module call key -> this runner's tensor name, for the tensors it can expose."""
    available = runner.intermediate_names()
    lmap = (runner.artifact.extra.get("layer_map") if runner.artifact is not None else None) or None
    if lmap is None:
        return {n: n for n in available}
    have = set(available)
    out: dict[str, str] = {}
    for tensor, key in lmap.items():
        if tensor in have and key not in out:
            out[key] = tensor
    return out


def find_first_divergent(reference: Runner, target: Runner, inputs: Mapping[str, np.ndarray],
                         tolerance: Tolerance) -> Divergence:
    """Compare every matched layer of ``target`` against ``reference`` on ``inputs``."""
    ref_keys = layer_keys(reference)
    tgt_keys = layer_keys(target)
    tensor_to_key = {t: k for k, t in tgt_keys.items()}
    order = [t for t in target.intermediate_names() if t in tensor_to_key and tensor_to_key[t] in ref_keys]
    samples = len(next(iter(inputs.values()))) if inputs else 0
    if not order:
        has_map = bool(target.artifact is not None and target.artifact.extra.get("layer_map"))
        why = ("no layer of the target matches a module of the reference" if has_map
               else "the target's artifact records no layer map (extra['layer_map'])")
        return Divergence(samples=samples, note=f"no layers to compare: {why}")
    ref_names = [ref_keys[tensor_to_key[t]] for t in order]
    ref_vals = run_batched(reference, inputs, lambda f: reference.infer_intermediates(f, ref_names))
    tgt_vals = run_batched(target, inputs, lambda f: target.infer_intermediates(f, order))

    div = Divergence(samples=samples)
    skipped = 0
    for tensor in order:
        key = tensor_to_key[tensor]
        r, t = ref_vals.get(ref_keys[key]), tgt_vals.get(tensor)
        if r is None or t is None or r.size != t.size:
            skipped += 1
            continue
        m = error_metrics(r, t)
        layer = LayerError(index=len(div.layers), module=key, tensor=tensor, shape=list(r.shape),
                           max_abs=m["max_abs"], mean_abs=m["mean_abs"], max_rel=m["max_rel"],
                           cosine=m["cosine"], snr_db=m["snr_db"], passed=tolerance.layer_passes(m))
        div.layers.append(layer)
        if div.first is None and not layer.passed:
            div.first = layer
    notes = []
    if skipped:
        notes.append(f"{skipped} matched layer(s) skipped (value missing or size differs)")
    # Where the SNR steps down: before the first layer beyond the bound (which may only
    # amplify an error an earlier, passing layer introduced, e.g. a 5e-6 epsilon change
    # before a cancelling head), or anywhere when no layer is beyond it.
    scope = div.layers[: div.first.index + 1] if div.first is not None else div.layers
    step = snr_step(scope) if scope else None
    if step is not None and div.first is not None and step[0].index >= div.first.index:
        step = None                          # the failing layer itself: nothing earlier to name
    if step is not None:
        layer, before, after = step
        div.step = layer
        earlier = ("every layer before it identical or within fp32 rounding" if before >= IDENTICAL_DB
                   else f"{before:.1f} dB at worst before it")
        where = f"{layer.module} ({layer.tensor}): {earlier}, {after:.1f} dB there"
        if div.first is not None:
            notes.append(f"the first layer beyond the per-layer tolerance is {div.first.module}, but the "
                         f"SNR steps down earlier, at {where}; the error starts there and "
                         f"{div.first.module} amplifies it")
        else:
            notes.append(f"no layer exceeds the per-layer tolerance, but the SNR steps down at {where}; "
                         f"look there first (a slightly different formula or epsilon, or an output that "
                         f"cancels and so amplifies rounding)")
    elif div.first is None and div.layers:
        notes.append("no layer exceeds the per-layer tolerance and the SNR has no step of "
                     f"{STEP_DB:.0f} dB: the error builds up gradually over the layers")
    div.note = "; ".join(notes)
    return div


def worst_samples(ref: np.ndarray, out: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` samples whose outputs differ most: where to look for a cause."""
    d = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64)).reshape(len(ref), -1).max(1)
    return np.sort(np.argsort(-d, kind="stable")[:k])
