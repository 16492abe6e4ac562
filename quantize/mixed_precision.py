"""Mixed precision to a target: weight-only and activation-only sensitivity per layer, and
a greedy search (in the spirit of AIMET's AMP) for the fewest layers to raise until the
logit SQNR of the quantized model reaches a target.

**Split probes.** The "only this layer quantized" probe (``quantize.sensitivity``) mixes a
layer's weight error with the error of its input and output activations. Two more probes
tell them apart, both run by ONNX Runtime on the session's prepared float model with one
edit each, so they cost one inference pass per probe (no quantizer run):

* *weight-only*: the layer's weight initializer replaced by what the quantized model
  computes with, ``(q - zero_point) * scale`` read from the DequantizeLinear of the real
  QDQ model of the profile (so the integers and scales are the quantizer's own, per
  channel or per tensor as the profile says, and any optimised rounding is included);
  everything else float. Layers without weights (Add) have no weight-only figure. When
  the weights were already optimised onto their int8 grid (``quantize.weight_rounding``),
  the float model carries them and the figure is exact (no error left to find).
* *activation-only*: a ``QuantizeLinear -> DequantizeLinear`` pair on the layer's output
  activation (after its folded ReLU/Clip) with the scale and zero point the QDQ model uses
  there (the calibrated range of the session's cache); weights float. Input activations
  that no layer produces (the model input, a pooling or reshape output) belong to the
  probe of the layer reading them, so every quantized activation a 16-bit layer would
  widen is in some probe.

**Search.** Starting from the 8-bit model of the profile (plus any layers the caller
already raised), layers are raised greedily, most sensitive first, and the *real* QDQ
model (``PtqSession.write``) is re-measured on ONNX Runtime after each small batch:

1. 16-bit activations (``w16_layers``: QNN's mixed precision; ORT adds the converts), in
   order of activation-only sensitivity, until the target is met or the activation error
   left is too small to matter (under 5% of the measured error, by the split probes);
2. then 16-bit weights (``w16_weights``: symmetric per-channel int16, with 16-bit
   activations, HTP's w16a16) for the Conv/Gemm layers whose weight-only error is not
   negligible next to the target's noise budget, the most error per weight first (a 16-bit weight costs its size twice, so a small early layer that carries
   a tenth of the error is raised before a large late one that carries as much). A layer
   whose int32 bias would force ONNX Runtime to coarsen a row of its int16 weights below
   int8's 127 levels, where its int8 weights kept them, is left out (``w16a16_ineligible``);
3. then float (``keep_float``), in order of weight-only sensitivity, for the weight-problem
   layers: first those still at 8-bit weights (not a Conv/Gemm), then, if the target is
   still out of reach, those at 16-bit weights. The
   fallback never turns the whole model back into float; what it leaves is named in the
   note when the target is out of reach.

When the session's float model carries weights already rounded onto the int8 grid
(``quantize.weight_rounding``), the session also holds the weights from before that
rounding (``PtqSession(original_onnx=...)``): the weight-only probe measures each layer's
rounded weights against them, and a layer raised to 16-bit weights or float takes them
back, so the raise removes the int8 error instead of re-encoding it.

Candidates are the layers whose probe errors (as noise powers, which add) are not
negligible next to the target's noise budget. When a batch crosses the target, the fewest
of its layers (in the greedy order) that still reach it are found by bisection, so the set
is as small as the greedy order allows, at log2 of the batch in measurements. Every
measurement is a point (model size, SQNR) of the returned path; when the target is not
reached, the best configuration measured is the one chosen.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from models.errors import InputError
from quantize.onnx_ptq import Layer, PtqSession, QuantProfile, read_encodings, weight_input
from quantize.report import snr_db
from quantize.sensitivity import ranked_db

Progress = Callable[[int, int, str], None]

MAX_BATCHES = 6           # re-measurements per phase at most, plus log2(batch) to bisect the crossing batch
NEGLIGIBLE = 0.1          # candidates' tail: errors summing to under 10% of the target budget are left
ACT_LEFT = 0.05           # phase 1 stops when the activation error left is under 5% of the measured error
FLOAT_SHARE = 0.9         # float fallback: the layers carrying 90% of the summed weight-only error
NAMES_SHOWN = 8


def _noise(snr: float | None) -> float:
    """Noise power relative to the signal for an SNR in dB (None: identical, no noise)."""
    return 0.0 if snr is None else 10.0 ** (-snr / 10.0)


def _key(layer: Layer) -> str:
    return layer.module or layer.name


# ----------------------------------------------------------------- split probes


@dataclass
class SplitSensitivity:
    layer: str                          # PyTorch module path when known, else the ONNX node name
    node: str
    op_type: str
    weight_only_snr_db: float | None    # None: identical to float (or no weights: see has_weights)
    activation_only_snr_db: float | None
    has_weights: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SplitReport:
    profile: str
    method: str
    samples: int
    quantized_snr_db: float | None      # the whole model of the profile, same inputs
    layers: list[SplitSensitivity] = field(default_factory=list)   # graph order
    seconds: float = 0.0

    def by_node(self) -> dict[str, SplitSensitivity]:
        return {s.node: s for s in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "method": self.method, "samples": self.samples,
                "quantized_snr_db": self.quantized_snr_db, "layers": [s.to_dict() for s in self.layers],
                "seconds": self.seconds}

    def as_sensitivity(self) -> dict[str, Any]:
        """The report's per-layer sensitivity (``SensitivityReport.to_dict()``'s shape, mode
        ``split``) when no whole-layer ranking ran: the layers ranked by the worse of their
        weight-only and activation-only SNR, both figures kept. ``snr_db`` (the layer
        quantized whole) is None here: only the ranking measures it."""
        def worst(s: SplitSensitivity) -> float:
            figures = [s.activation_only_snr_db] + ([s.weight_only_snr_db] if s.has_weights else [])
            return min(ranked_db(f) for f in figures)

        layers = [{"layer": s.layer, "node": s.node, "op_type": s.op_type, "snr_db": None, "top1_agreement": None,
                   "accuracy": None, "score_db": -worst(s), "weight_only_snr_db": s.weight_only_snr_db,
                   "activation_only_snr_db": s.activation_only_snr_db, "has_weights": s.has_weights}
                  for s in sorted(self.layers, key=worst)]
        return {"mode": "split", "profile": self.profile, "method": self.method, "samples": self.samples,
                "float_accuracy": None, "quantized": {"snr_db": self.quantized_snr_db, "top1_agreement": None,
                                                     "accuracy": None},
                "layers": layers, "seconds": self.seconds}


def _dequantized_weights(qdq: Any) -> dict[str, np.ndarray]:
    """Anchor node name -> the weight it computes with in a QDQ model (DQ of an initializer)."""
    from onnx import numpy_helper
    g = qdq.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    out: dict[str, np.ndarray] = {}
    for n in g.node:
        if len(n.input) < 2:
            continue
        dq = producers.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
              if len(dq.input) > 2 and dq.input[2] in inits else np.zeros_like(scale))
        if scale.size > 1:
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        out[n.name] = ((q - zp) * scale).astype(np.float32)
    return out


def _activation_encoding(enc: dict[str, Any], tensor: str, ranges_path: Path, dtype: str) -> tuple[float, int] | None:
    """Scale and zero point of an activation in the QDQ model; else from the range cache."""
    acts = enc["activations"]
    for name in (tensor, f"{tensor}_QuantizeLinear_Input"):
        if name in acts:
            return acts[name]["scale"], acts[name]["zero_point"]
    import json
    data = json.loads(Path(ranges_path).read_text()).get("data", {})
    r = data.get(tensor)
    if not r:
        return None
    lo, hi = min(float(r["lowest"]["data"][0]), 0.0), max(float(r["highest"]["data"][0]), 0.0)
    info = np.iinfo(np.dtype(dtype))
    scale = max(hi - lo, 1e-4) / (info.max - info.min)
    return scale, int(round(info.min - lo / scale))


def _insert_qdq(model: Any, tensor: str, qp: tuple[float, int], dtype: str) -> None:
    """``tensor -> QuantizeLinear -> DequantizeLinear`` in a float model, every reader of
    ``tensor`` (or the graph output of that name) reading the dequantized value."""
    from onnx import helper, numpy_helper
    g = model.graph
    pre, post = f"{tensor}__mdeploy_float", f"{tensor}__mdeploy_dq"
    g.initializer.extend([numpy_helper.from_array(np.array(qp[0], np.float32), f"{pre}_scale"),
                          numpy_helper.from_array(np.array(qp[1], np.dtype(dtype)), f"{pre}_zp")])
    # 16-bit Q/DQ before opset 21: ONNX Runtime's contrib ops, as its quantizer writes them
    domain = "com.microsoft" if np.dtype(dtype).itemsize == 2 else ""
    if domain and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
    if tensor in {o.name for o in g.output}:
        # a graph output keeps its name: the producer writes ``pre`` and the DQ writes ``tensor``
        producer = next(n for n in g.node if tensor in n.output)
        producer.output[list(producer.output).index(tensor)] = pre
        src, dst = pre, tensor
    else:
        for n in g.node:
            for i, name in enumerate(n.input):
                if name == tensor:
                    n.input[i] = post
        src, dst = tensor, post
    g.node.extend([helper.make_node("QuantizeLinear", [src, f"{pre}_scale", f"{pre}_zp"], [f"{pre}_q"],
                                    name=f"{pre}_Q", domain=domain),
                   helper.make_node("DequantizeLinear", [f"{pre}_q", f"{pre}_scale", f"{pre}_zp"], [dst],
                                    name=f"{pre}_DQ", domain=domain)])


def split_sensitivity(session: PtqSession, profile: QuantProfile, x: np.ndarray, *, method: str = "minmax",
                      layers: Sequence[Layer] | None = None, progress: Progress | None = None) -> SplitReport:
    """Weight-only and activation-only logit SNR of every layer (default: all of the session's)."""
    import onnx
    from onnx import numpy_helper

    from quantize.sensitivity import pipelined_runs, probe_baseline, run_onnx
    t0 = time.perf_counter()
    base = probe_baseline(session, profile, x, method, "split")
    layers = list(layers if layers is not None else session.layers)
    work, ref, ranges = base.work, base.reference, base.ranges
    qdq = onnx.load(str(base.full_path))
    full_snr = snr_db(ref, base.full)
    weights = _dequantized_weights(qdq)
    enc = read_encodings(qdq)
    act_dtype = profile.activations           # the dtype the profile's model gives its activations
    model = onnx.load(str(session.model_path))
    g = model.graph
    nodes = {n.name: n for n in g.node}
    # weight-only probes edit the model with the weights from before any rounding (the
    # session's own model when it has none), against that model's own logits
    wmodel, wref = model, ref
    if session.original_weights:
        original = session.original_model()
        wmodel, wref = onnx.load(str(original)), run_onnx(original, session.input_name, x)
    inits = {t.name: t for t in wmodel.graph.initializer}
    rounded = {t.name: t for t in g.initializer}
    layer_outputs = {l.output for l in session.layers}
    report = SplitReport(profile.name, ranges.method, int(len(x)), full_snr)
    def weight_only(layer: Layer, wname: str) -> Callable[[Path], None]:
        """The model with the anchor's weight replaced by its dequantized int8 value."""
        anchor = nodes[layer.name]
        # the bias goes with its weight: bias correction compensates that weight's rounding
        bname = anchor.input[2] if len(anchor.input) > 2 and anchor.input[2] in inits else ""

        def write(path: Path) -> None:
            saved = {n: onnx.TensorProto() for n in (wname, bname) if n}
            for n, t in saved.items():
                t.CopyFrom(inits[n])
            inits[wname].CopyFrom(numpy_helper.from_array(weights[layer.name], wname))
            if bname and bname in rounded:
                inits[bname].CopyFrom(rounded[bname])
            onnx.save(wmodel, str(path))
            for n, t in saved.items():
                inits[n].CopyFrom(t)
        return write

    def activation_only(encodings: list[tuple[str, Any]]) -> Callable[[Path], None]:
        """Q -> DQ on the layer's activations with the model's own encodings."""
        def write(path: Path) -> None:
            edited = onnx.ModelProto()
            edited.CopyFrom(model)
            for t, qp in encodings:
                _insert_qdq(edited, t, qp, act_dtype)
            onnx.save(edited, str(path))
        return write

    jobs: list[tuple[tuple[str, int], Callable[[Path], None]]] = []
    for i, layer in enumerate(layers):
        anchor = nodes[layer.name]
        wname = anchor.input[1] if len(anchor.input) > 1 else ""
        if layer.name in weights and wname in inits and tuple(inits[wname].dims) == weights[layer.name].shape:
            jobs.append((("w", i), weight_only(layer, wname)))
        tensors = [layer.output] + [t for t in layer.inputs if t not in layer_outputs]
        encodings = [(t, _activation_encoding(enc, t, ranges.path, act_dtype)) for t in tensors]
        encodings = [(t, qp) for t, qp in encodings if qp is not None]
        if encodings:
            jobs.append((("a", i), activation_only(encodings)))
    snrs: dict[tuple[str, int], float | None] = {}
    for (kind, i), out in pipelined_runs(jobs, work, session.input_name, x):
        if progress:
            progress(i, len(layers), _key(layers[i]))
        snrs[(kind, i)] = snr_db(wref if kind == "w" else ref, out)
    weighted = {i for (kind, i), _ in jobs if kind == "w"}
    for i, layer in enumerate(layers):
        report.layers.append(SplitSensitivity(_key(layer), layer.name, layer.op_type, snrs.get(("w", i)),
                                              snrs.get(("a", i)), i in weighted))
    if progress:
        progress(len(layers), len(layers), "")
    report.seconds = time.perf_counter() - t0
    return report


def merge_into_sensitivity(sensitivity: dict[str, Any] | None, split: SplitReport) -> None:
    """Add ``weight_only_snr_db`` and ``activation_only_snr_db`` to each layer of a
    sensitivity report's ``to_dict()`` (matched by ONNX node)."""
    if not sensitivity:
        return
    by_node = split.by_node()
    for entry in sensitivity.get("layers", []):
        s = by_node.get(entry.get("node"))
        if s is not None:
            entry["weight_only_snr_db"] = s.weight_only_snr_db
            entry["activation_only_snr_db"] = s.activation_only_snr_db
            entry["has_weights"] = s.has_weights


# ----------------------------------------------------------------- the search


@dataclass
class ParetoPoint:
    step: int
    action: str                 # start | w16 | w16w | float
    added: list[str]            # layers raised at this step
    w16: int                    # layers at 16-bit activations (not in float, not at 16-bit weights)
    float: int                  # layers kept in float
    size_bytes: int             # the QDQ file
    sqnr_db: float | None       # None: identical to float
    weight_bytes: int = 0       # its initializers' payload (ORT serialises some of them as varints: the file
                                # size moves with that encoding, this does not)
    w16w: int = 0               # layers at 16-bit weights and activations (not in float)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class MixedPrecisionResult:
    target_db: float
    profile: str
    method: str
    samples: int
    reached: bool
    start_sqnr_db: float | None
    sqnr_db: float | None                  # of the chosen configuration
    size_bytes: int
    w16_layers: list[Layer] = field(default_factory=list)   # as written: a float layer may be here too
    keep_float: list[Layer] = field(default_factory=list)   # (16-bit activations around it)
    w16_weights: list[Layer] = field(default_factory=list)  # 16-bit weights and activations
    w16_ineligible: list[str] = field(default_factory=list)  # weight-problem layers 16-bit weights would not help
    path: list[ParetoPoint] = field(default_factory=list)
    chosen_step: int = 0
    unfixed: list[str] = field(default_factory=list)
    note: str | None = None
    split: SplitReport | None = None
    float_sqnr_db: float | None = None     # the session's float model against the reference (None: it is the reference)
    seconds: float = 0.0
    default: bool = False                  # the target is the caller's default, not asked for

    def to_dict(self) -> dict[str, Any]:
        return {"target_sqnr_db": self.target_db, "profile": self.profile, "method": self.method,
                "float_sqnr_db": self.float_sqnr_db, "samples": self.samples, "reached": self.reached,
                "start_sqnr_db": self.start_sqnr_db, "sqnr_db": self.sqnr_db, "size_bytes": self.size_bytes,
                "w8a16_layers": [_key(l) for l in self.w16_layers], "keep_float": [_key(l) for l in self.keep_float],
                "w16a16_layers": [_key(l) for l in self.w16_weights if l not in self.keep_float],
                "w16a16_ineligible": self.w16_ineligible,
                "path": [p.to_dict() for p in self.path], "chosen_step": self.chosen_step,
                "unfixed": self.unfixed, "note": self.note,
                "split": self.split.to_dict() if self.split is not None else None, "seconds": self.seconds,
                "default_target": self.default}


def _candidates(layers: list[Layer], noise: dict[str, float], budget: float) -> list[Layer]:
    """Layers by their probe noise, largest first, without the tail that sums under
    ``NEGLIGIBLE`` of the noise budget."""
    ranked = sorted((l for l in layers if noise.get(l.name, 0.0) > 0), key=lambda l: -noise[l.name])
    tail, keep = 0.0, len(ranked)
    for i in range(len(ranked) - 1, -1, -1):
        if tail + noise[ranked[i].name] > NEGLIGIBLE * budget:
            break
        tail += noise[ranked[i].name]
        keep = i
    return ranked[:keep]


def _weight_problem(layers: list[Layer], noise: dict[str, float], budget: float) -> list[Layer]:
    """The float fallback's candidates: the largest weight errors, up to ``FLOAT_SHARE`` of
    their sum (at least one layer), and not past the negligible tail."""
    ranked = _candidates(layers, noise, budget)
    total = sum(noise.get(l.name, 0.0) for l in layers)
    out, acc = [], 0.0
    for layer in ranked:
        if out and acc >= FLOAT_SHARE * total:
            break
        out.append(layer)
        acc += noise[layer.name]
    return out


def search_mixed_precision(session: PtqSession, profile: QuantProfile, x: np.ndarray, target_db: float, *,
                           method: str = "minmax", split: SplitReport | None = None,
                           keep_float: Sequence[Layer] = (), w16_layers: Sequence[Layer] = (),
                           reference: np.ndarray | None = None,
                           progress: Progress | None = None) -> MixedPrecisionResult:
    """The fewest layers to raise (16-bit activations, then 16-bit weights, then float) for a
    logit SQNR of ``target_db`` on ``x``, re-measuring the real QDQ model of ``profile`` at
    each step.

    The SQNR is against ``reference`` (the logits of the model the user trained, when the
    session's float model is a fixed or weight-rounded variant of it), by default against
    the session's own float model. Without ``split``, the split probes run only when the
    8-bit model misses the target (a default target on a model that already meets it costs
    one measurement).
    """
    from quantize.sensitivity import run_onnx
    if not math.isfinite(target_db):
        raise InputError("--target-sqnr", "a finite number of dB", repr(target_db))
    if len(x) == 0:
        raise InputError("sensitivity inputs", "at least one input", "none")
    t0 = time.perf_counter()
    layers = list(session.layers)
    budget = _noise(target_db)
    own = run_onnx(session.model_path, session.input_name, x)
    ref = own if reference is None else np.asarray(reference, np.float32).reshape(own.shape)
    floor = None if reference is None else snr_db(ref, own)      # the float model being quantized, vs reference
    work = session.work_dir / "mixed"
    work.mkdir(exist_ok=True)
    w16: list[Layer] = list(w16_layers)
    w16w: list[Layer] = []
    keep: list[Layer] = list(keep_float)
    path: list[ParetoPoint] = []
    configs: list[tuple[list[Layer], list[Layer], list[Layer]]] = []

    def measure(action: str, added: list[Layer]) -> float | None:
        out = work / f"step{len(path)}.onnx"
        session.write(profile, out, method=method, keep_float=keep, w16_layers=w16, w16_weights=w16w)
        snr = snr_db(ref, run_onnx(out, session.input_name, x))
        path.append(ParetoPoint(len(path), action, [_key(l) for l in added],
                                len([l for l in w16 if l not in keep and l not in w16w]),
                                len(keep), int(out.stat().st_size), snr, _payload(out),
                                len([l for l in w16w if l not in keep])))
        configs.append((list(w16), list(keep), list(w16w)))
        out.unlink(missing_ok=True)
        if progress:
            progress(len(path), len(path) + 1, f"{action} {', '.join(_key(l) for l in added)[:60]}".strip())
        return snr

    def reached(snr: float | None) -> bool:
        return snr is None or snr >= target_db

    def raise_layers(action: str, added: list[Layer], chosen: list[Layer]) -> None:
        nonlocal snr
        chosen.extend(added)
        snr = measure(action, added)

    def phase(action: str, cands: list[Layer], chosen: list[Layer], stop: Callable[[float | None, int], bool]
              ) -> None:
        nonlocal snr
        # Steps are kept even when one lowers the SQNR: raised layers interact (one layer in float
        # can cost SQNR that the next one more than wins back), and every step is a measured point
        # the final choice can fall back to.
        size = max(1, math.ceil(len(cands) / MAX_BATCHES))
        for i in range(0, len(cands), size):
            if reached(snr) or stop(snr, i):
                return
            batch = cands[i:i + size]
            raise_layers(action, batch, chosen)
            if reached(snr) and len(batch) > 1:
                # the batch crossed the target: the fewest of its layers (in the greedy order)
                # that still reach it, by bisection on how many (log2 of the batch in
                # measurements instead of up to one per layer; if only the whole batch does it,
                # the final choice takes the batch's own point)
                base = len(chosen) - len(batch)
                enough, short, at = len(batch), 0, {len(batch): snr}
                while enough - short > 1:
                    mid = (enough + short) // 2
                    del chosen[base:]
                    chosen.extend(batch[:mid])
                    at[mid] = measure(action, batch[:mid])
                    if reached(at[mid]):
                        enough = mid
                    else:
                        short = mid
                del chosen[base:]
                chosen.extend(batch[:enough])
                snr = at[enough]

    snr: float | None = None
    snr = measure("start", [])
    start = snr
    if reached(snr) and split is None:
        # nothing to raise: the split probes (two inference passes per layer) are not needed
        return MixedPrecisionResult(
            target_db=float(target_db), profile=profile.name, method=method, samples=int(len(x)), reached=True,
            start_sqnr_db=start, sqnr_db=snr, size_bytes=path[0].size_bytes, w16_layers=list(w16),
            keep_float=list(keep), path=path, float_sqnr_db=floor, seconds=time.perf_counter() - t0)
    if split is None:
        split = split_sensitivity(session, profile, x, method=method)
    by_node = split.by_node()
    act_noise = {l.name: _noise(by_node[l.name].activation_only_snr_db) for l in layers if l.name in by_node}
    w_noise = {l.name: _noise(by_node[l.name].weight_only_snr_db) for l in layers
               if l.name in by_node and by_node[l.name].has_weights}
    if profile.activation_bits == 8:
        cands = [l for l in _candidates(layers, act_noise, budget) if l not in w16 and l not in keep]

        def acts_spent(current: float | None, i: int) -> bool:
            """The activation error of the candidates not tried yet is too small to matter."""
            return sum(act_noise[l.name] for l in cands[i:]) < ACT_LEFT * _noise(current)
        phase("w16", cands, w16, acts_spent)
    weighted = [l for l in layers if l.name in w_noise]
    problem = _weight_problem(weighted, w_noise, budget)
    ineligible: list[Layer] = []
    if session.qnn:             # HTP's w16a16; the CPU EP profiles have no 16-bit weight kernels to target
        # every layer whose weight error matters next to the target (16-bit weights stay on the
        # accelerator, so unlike float they are not held to the layers carrying FLOAT_SHARE of it)
        size = _weight_sizes(session)
        wide_w = sorted((l for l in _candidates(weighted, w_noise, budget) if l not in keep and l.name in size),
                        key=lambda l: -w_noise[l.name] / max(size[l.name], 1))
        weak = _weak_at_16_bits(session, profile, wide_w, method, work)
        ineligible = [l for l in wide_w if l.name in weak]
        wide_w = [l for l in wide_w if l.name not in weak]
        phase("w16w", wide_w, w16w, lambda current, i: False)
    # float last: the layers 16-bit weights did not reach (not Conv/Gemm), then those they did
    fallback = sorted((l for l in problem if l not in keep), key=lambda l: l in w16w)
    phase("float", fallback, keep, lambda current, i: False)

    ok = [i for i, p in enumerate(path) if reached(p.sqnr_db)]
    if ok:
        # the fewest raised layers (float first: it costs size and leaves the accelerator), then size
        best = min(ok, key=lambda i: (path[i].float, path[i].w16w, path[i].w16, path[i].weight_bytes, i))
    else:
        best = max(range(len(path)), key=lambda i: (path[i].sqnr_db, -path[i].weight_bytes))
    w16_final, keep_final, w16w_final = configs[best]
    point = path[best]
    result = MixedPrecisionResult(
        target_db=float(target_db), profile=profile.name, method=split.method, samples=int(len(x)),
        reached=reached(point.sqnr_db), start_sqnr_db=start, sqnr_db=point.sqnr_db, size_bytes=point.size_bytes,
        w16_layers=w16_final, keep_float=keep_final, w16_weights=w16w_final, path=path,
        chosen_step=best, split=split, float_sqnr_db=floor,
        w16_ineligible=[_key(l) for l in (ineligible if session.qnn else [])])
    if not result.reached:
        # what is still quantized and alone below the target: the layers it could not fix
        unfixed = []
        for layer in layers:
            s = by_node.get(layer.name)
            if layer in keep_final or s is None:
                continue
            if layer in w16w_final:
                # at 16 bits throughout, its error is no longer measured by the 8-bit probes: it is
                # named after the others, as what only float could still remove
                unfixed.append((math.inf, _key(layer) + " (16-bit weights)"))
                continue
            wide = layer in w16_final           # its activations are 16-bit: its weights are what is left
            probes = (s.weight_only_snr_db,) if wide else (s.weight_only_snr_db, s.activation_only_snr_db)
            worst = min((v for v in probes if v is not None), default=None)
            if worst is not None and worst < target_db:
                unfixed.append((worst, _key(layer) + (" (weights)" if wide else "")))
        result.unfixed = [name for _, name in sorted(unfixed, key=lambda u: u[0])]
        shown = ", ".join(result.unfixed[:NAMES_SHOWN]) + (
            f" (+{len(result.unfixed) - NAMES_SHOWN} more)" if len(result.unfixed) > NAMES_SHOWN else "")
        result.note = (f"target SQNR {target_db:g} dB not reached: best {_fmt(point.sqnr_db)} dB "
                       f"({profile.name} {_fmt(start)} dB) with {point.w16} layer(s) at 16-bit activations, "
                       f"{point.w16w} at 16-bit weights and {len(keep_final)} in float; "
                       + (f"the float model it quantizes (float fixes, weight rounding) is itself at {_fmt(floor)} "
                          "dB; " if floor is not None and floor < target_db and not session.original_weights
                          else "")
                       + "could not fix: "
                       + (shown or "the quantized tensors between layers (model input, pooling, reshapes)"))
    result.seconds = time.perf_counter() - t0
    return result


def _weak_at_16_bits(session: PtqSession, profile: QuantProfile, layers: list[Layer], method: str,
                     work: Path) -> set[str]:
    """Layers whose int16 weights would lose precision to the int32 bias rule that their int8
    weights in the profile's own model do not lose.

    QNN computes a bias in int32 at ``s_in * s_w``; where ``|b| / (s_in * s_w)`` would overflow,
    ONNX Runtime raises that row's weight scale until it fits, and the row keeps fewer levels.
    The bound ``s_w >= |b| / (s_in (2^31 - 1))`` does not depend on the weights' bits, so at
    w8a16 (a 16-bit input either way) int16 rows lose no more than int8 ones; raising a w8a8
    layer to w16a16 makes ``s_in`` 257x finer, and a row that fitted at 8 bits can be left with
    fewer than int8's 127 levels. A layer is left out when such a row (whose weights are not
    negligible) appears at 16 bits and was not already raised in the profile's model. Measured
    on two QDQ models: the profile's own, and one with all of ``layers`` at 16 bits."""
    if not layers:
        return set()
    from quantize.qnn_encodings import int32_bias_checks
    out = work / "w16w_probe.onnx"
    session.write(profile, out, method=method)
    before = {(c.layer, r) for c in int32_bias_checks(out) for r in c.weight_scale_raised}
    session.write(profile, out, method=method, w16_weights=layers)
    weak = {c.layer for c in int32_bias_checks(out) if c.weight_bits == 16
            and any((c.layer, r) not in before for r in c.weight_rows_weak)}
    out.unlink(missing_ok=True)
    return weak


def _weight_sizes(session: PtqSession) -> dict[str, int]:
    """Elements of each Conv/Gemm layer's weight (what a 16-bit weight costs twice)."""
    dims = {t.name: int(np.prod(t.dims)) for t in session.model.graph.initializer}
    out = {}
    for layer in session.layers:
        name, _ = weight_input(session.model, layer)
        if name is not None:
            out[layer.name] = dims[name]
    return out


def _payload(path: Path) -> int:
    """Bytes of a model's initializers as arrays (what the weights weigh, whatever the encoding)."""
    import onnx
    from onnx import numpy_helper
    return int(sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer))


def _fmt(snr: float | None) -> str:
    return "inf" if snr is None else f"{snr:.1f}"


__all__ = ["MixedPrecisionResult", "ParetoPoint", "SplitReport", "SplitSensitivity", "merge_into_sensitivity",
           "search_mixed_precision", "split_sensitivity"]
