"""Run the same inputs through several runners, then compare chosen pairs.

As in Polygraphy, running and comparing are separate steps: ``run_all(runners, inputs)``
returns every runner's outputs; ``compare(results, ref, target, tolerance)`` turns one
pair into a ``PairReport``; ``ParityReport`` gathers the pairs, JSON-serialisable. The
comparator never knows which runtime produced the numbers: every runner returns float32
NCHW, and a new runtime is a new runner, never an ``if`` here.

Metrics (``error_metrics``), with ``r`` the reference, ``t`` the target, ``d = t - r``:

* ``max_abs`` = max |d|, ``mean_abs`` = mean |d|;
* ``max_rel`` = max |d| / max |r|: the error relative to the tensor's range (an
  elementwise ratio is dominated by logits that happen to be near zero);
* ``cosine`` of the flattened tensors (per sample, then the minimum over samples);
* ``snr_db`` = 10 log10(sum r^2 / sum d^2) and ``psnr_db`` = 20 log10(max |r| / rms(d));
  infinite (identical outputs) is reported as ``None`` in JSON;
* ``top1_agreement``: the fraction of samples whose arg-max class is the same;
  ``top5_agreement`` (more than 5 classes): the fraction whose reference top-1 class is
  among the target's top 5; with labels, the accuracy of each side.

Default tolerances, by precision (``DEFAULT_TOLERANCES``; every field can be overridden):

=========  ======================================================  =========================
precision  pass when                                               per layer (divergence)
=========  ======================================================  =========================
fp32       max_abs <= 1e-5 + 1e-5 * max|ref| on the logits         max_rel <= 2e-5
fp16       SNR >= 40 dB and top-1 agreement >= 0.99                SNR >= 40 dB
w8a16      SNR >= 25 dB and top-1 agreement >= 0.98                SNR >= 25 dB
int8       SNR >= 15 dB and top-1 agreement >= 0.95                SNR >= 15 dB
=========  ======================================================  =========================

Why these figures:

* fp32: both sides compute in binary32, so they may differ only by summation order and
  kernel choice (Winograd/im2col, fused multiply-add, BatchNorm folded into the conv).
  Each op adds a relative error of a few ulp (2^-23 ~ 1.2e-7); through 20-100 layers
  that is 1e-7..1e-6 *of the logits' range*, so the bound is 1e-5 absolute for logits of
  unit scale plus 1e-5 relative to the largest logit (numpy ``allclose``-style, the
  standard fp32 atol/rtol of Polygraphy and ONNX Runtime's own tests). A trained model's
  logits reach several units, so a fixed 1e-5 would fail correct exports: hence the
  relative term. An error above the bound is not rounding any more, it is a different
  computation (a wrong epsilon, padding, layout or weight). The per-layer figure is
  range-relative (``max_rel``) since activations have any scale. The margins measured
  over the zoo, and what a wrong BatchNorm epsilon gives, are in README.md
  (``mdeploy verify``).
  A model can amplify rounding beyond this (a BatchNorm with near-zero running variance
  multiplies it by up to 1/sqrt(eps) ~ 316): ``verify`` then runs PyTorch in float64
  and says whether the target is as close to exact arithmetic as PyTorch fp32 is.
* fp16: 11 significant bits, a relative error of ~5e-4 per op, i.e. an SNR of about
  65 dB for one op that decreases by a few dB per layer in series; 40 dB is an error
  of 1% of the signal amplitude, which fp16 networks meet; top-1 may flip only where
  the two best logits are within the fp16 error of each other.
* int8: 8-bit activations give ~30-40 dB per tensor, and errors add up through the net;
  published PTQ results keep top-1 within ~1% of fp32 on CNNs; agreement on a small
  sample is noisier, hence 0.95; 15 dB (error amplitude 18% of the signal) flags a
  broken quantization (wrong scale, clipped range) and not the expected noise.
  ``w8a16`` (16-bit activations) sits between.

Unknown precisions use the int8 row: they are quantized if they are not fp32/fp16.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

import numpy as np

from device_tests.runners.base import Runner
from models.errors import InputError
from models.util import db


# -- tolerances ---------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one pair; ``None`` disables a criterion."""

    max_abs: float | None = None          # outputs: max |target - ref| <= max_abs + rtol * max |ref|
    rtol: float = 0.0
    min_cosine: float | None = None       # outputs: worst per-sample cosine similarity
    min_snr_db: float | None = None       # outputs: SNR over all samples
    min_top1: float | None = None         # outputs: top-1 agreement
    layer_max_rel: float | None = None    # per layer: max |d| / max |ref|
    layer_min_snr_db: float | None = None  # per layer: SNR

    def with_overrides(self, **overrides: float | None) -> "Tolerance":
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise InputError("--tolerance", f"keys among {', '.join(sorted(known))}", ", ".join(bad))
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def check(self, m: Mapping[str, Any]) -> list[str]:
        """Criteria this pair's metrics fail, as readable strings (empty: passed)."""
        fails = []
        if self.max_abs is not None:
            bound = self.max_abs + self.rtol * m.get("ref_max_abs", 0.0)
            if m["max_abs"] > bound:
                fails.append(f"max_abs {m['max_abs']:.3g} > {bound:.3g}")
        if self.min_cosine is not None and m["cosine"] < self.min_cosine:
            fails.append(f"cosine {m['cosine']:.6f} < {self.min_cosine}")
        if self.min_snr_db is not None and _lt(m["snr_db"], self.min_snr_db):
            fails.append(f"SNR {m['snr_db']:.1f} dB < {self.min_snr_db} dB")
        if self.min_top1 is not None and m.get("top1_agreement") is not None \
                and m["top1_agreement"] < self.min_top1:
            fails.append(f"top-1 agreement {m['top1_agreement']:.4f} < {self.min_top1}")
        return fails

    def layer_passes(self, m: Mapping[str, Any]) -> bool:
        if self.layer_max_rel is not None and m["max_rel"] > self.layer_max_rel:
            return False
        if self.layer_min_snr_db is not None and _lt(m["snr_db"], self.layer_min_snr_db):
            return False
        return True


def _lt(value: float | None, bound: float) -> bool:
    return value is not None and value < bound     # None = infinite (identical)


# Both sides of an fp32 pair round: a target within this factor of PyTorch's own fp32
# distance from a float64 forward is rounding, not a fault (verify's float64 check).
FP64_MARGIN = 2.0


def fp64_distances(reference: np.ndarray, target: np.ndarray, exact: np.ndarray,
                   in_order: np.ndarray | None = None) -> tuple[float, float, bool]:
    """The float64 rule, one place for verify and the zoo sweeps: the reference's and the
    target's max distance from a float64 forward ``exact``, and whether the target is within
    ``FP64_MARGIN`` of the reference (rounding, not a fault).

    ``in_order``: the same model in fp32 with every conv/linear summed one product at a time
    (``device_tests.accumulation``) on the *first* ``len(in_order)`` inputs. The reference
    distance is then the larger of PyTorch's and that order's: XNNPACK sums in order and
    rounds up to 7x more than PyTorch's blocked sums on long dot products, which is fp32
    arithmetic, not a fault."""
    e = np.asarray(exact, dtype=np.float64)
    own = float(np.abs(np.asarray(reference, dtype=np.float64) - e).max())
    if in_order is not None and len(in_order):
        own = max(own, float(np.abs(np.asarray(in_order, dtype=np.float64) - e[:len(in_order)]).max()))
    tgt = float(np.abs(np.asarray(target, dtype=np.float64) - e).max())
    return own, tgt, tgt <= FP64_MARGIN * own

DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-5, rtol=1e-5, layer_max_rel=2e-5),
    "fp16": Tolerance(min_snr_db=40.0, min_top1=0.99, layer_min_snr_db=40.0),
    "w8a16": Tolerance(min_snr_db=25.0, min_top1=0.98, layer_min_snr_db=25.0),
    "int8": Tolerance(min_snr_db=15.0, min_top1=0.95, layer_min_snr_db=15.0),
}


def tolerance_row(precision: str) -> str:
    """Which row of ``DEFAULT_TOLERANCES`` a precision label falls under."""
    p = precision.lower()
    if p in DEFAULT_TOLERANCES:
        return p
    if p.startswith(("fp32", "float32")):
        return "fp32"
    if p.startswith(("fp16", "float16")):
        return "fp16"
    if "a16" in p or "int16" in p:
        return "w8a16"
    return "int8"


def tolerance_for(precision: str, overrides: Mapping[str, Mapping[str, float | None]] | None = None
                  ) -> Tolerance:
    """The default row for ``precision`` (``fp16-io`` -> fp16, ``uint8`` -> int8, ...), then
    overrides: ``{"*": {...}}`` for every precision, ``{"fp16": {...}}`` for one."""
    p = precision.lower()
    key = tolerance_row(p)
    tol = DEFAULT_TOLERANCES[key]
    overrides = overrides or {}
    for scope in ("*", key, p):
        if scope in overrides:
            tol = tol.with_overrides(**overrides[scope])
    return tol


# -- metrics ------------------------------------------------------------------

def error_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Elementwise error statistics of ``out`` against ``ref`` (any shape, batch first)."""
    r = np.asarray(ref, dtype=np.float64)
    t = np.asarray(out, dtype=np.float64)
    if r.shape != t.shape:
        if r.size != t.size:
            raise ValueError(f"shapes differ: reference {r.shape}, target {t.shape}")
        t = t.reshape(r.shape)
    d = t - r
    absd = np.abs(d)
    ref_max = float(np.abs(r).max()) if r.size else 0.0
    sq_r, sq_d = float((r * r).sum()), float((d * d).sum())
    n = r.shape[0] if r.ndim > 1 else 1
    rf, tf = r.reshape(n, -1), t.reshape(n, -1)
    norms = np.linalg.norm(rf, axis=1) * np.linalg.norm(tf, axis=1)
    dots = (rf * tf).sum(axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                   np.where(np.all(rf == tf, axis=1), 1.0, 0.0))
    rms = math.sqrt(sq_d / max(1, d.size))
    return {
        "max_abs": float(absd.max()) if d.size else 0.0,
        "mean_abs": float(absd.mean()) if d.size else 0.0,
        "max_rel": float(absd.max() / ref_max) if ref_max > 0 else (0.0 if not absd.any() else math.inf),
        "ref_max_abs": ref_max,
        "cosine": float(cos.min()) if cos.size else 1.0,
        "snr_db": db(sq_r, sq_d),
        "psnr_db": None if rms == 0 else (20.0 * math.log10(ref_max / rms) if ref_max > 0 else -math.inf),
    }


def class_agreement(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1/top-5 agreement of 2-D ``(N, classes)`` scores, and accuracy against labels."""
    res: dict[str, Any] = {"top1_agreement": None, "top5_agreement": None,
                           "accuracy_reference": None, "accuracy_target": None}
    if ref.ndim != 2 or ref.shape[1] < 2:
        return res
    r1, t1 = ref.argmax(1), out.argmax(1)
    res["top1_agreement"] = float((r1 == t1).mean())
    if ref.shape[1] > 5:
        top5 = np.argsort(-out, axis=1)[:, :5]
        res["top5_agreement"] = float((top5 == r1[:, None]).any(axis=1).mean())
    if labels is not None and len(labels) == len(r1):
        res["accuracy_reference"] = float((r1 == labels).mean())
        res["accuracy_target"] = float((t1 == labels).mean())
    return res


# -- running ------------------------------------------------------------------

@dataclass
class RunResults:
    """What ``run_all`` returns: per runner key, its outputs (name -> ``(N, ...)`` array,
    in the artifact's output order) and the wall time of its inference calls."""

    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def output(self, key: str, which: int | str = 0) -> tuple[str, np.ndarray]:
        outs = self.outputs[key]
        name = which if isinstance(which, str) else list(outs)[which]
        return name, outs[name]


def _batch_limit(runner: Runner, default: int) -> int:
    spec = runner.artifact.inputs[0] if runner.artifact and runner.artifact.inputs else None
    if spec and spec.shape and isinstance(spec.shape[0], int):
        return spec.shape[0]                       # a static batch: feed exactly that many
    return default


def feed_for(runner: Runner, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs renamed to the runner's artifact input names, by position."""
    if runner.artifact is None or not runner.artifact.inputs:
        return dict(inputs)
    names = [s.name for s in runner.artifact.inputs]
    if set(names) <= set(inputs):
        return {n: inputs[n] for n in names}
    if len(names) != len(inputs):
        raise InputError(runner.artifact.path, f"{len(names)} inputs ({', '.join(names)})",
                         f"{len(inputs)}")
    return {n: v for n, v in zip(names, inputs.values())}


def run_batched(runner: Runner, feeds: Mapping[str, np.ndarray], call: Any = None, *,
                batch_size: int = 32, progress: Any = None) -> dict[str, np.ndarray]:
    """``call(feed)`` (default ``runner.infer``) over ``feeds`` in batches the runner accepts:
    a static-batch artifact gets exactly its batch (a short last batch is padded and the
    padding dropped again), a dynamic one ``batch_size``. Results are concatenated."""
    call = call or runner.infer
    n = len(next(iter(feeds.values())))
    step = _batch_limit(runner, batch_size)
    static = _batch_limit(runner, 0) == step
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, step):
        batch = {k: v[start:start + step] for k, v in feeds.items()}
        real = len(next(iter(batch.values())))
        if static and real < step:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], step - real, 0)]) for k, v in batch.items()}
        for name, y in call(feed_for(runner, batch)).items():
            parts.setdefault(name, []).append(np.asarray(y)[:real])
        if progress:
            progress(min(n, start + step), n)
    return {name: np.concatenate(p) for name, p in parts.items()}


def run_all(runners: Mapping[str, Runner], inputs: np.ndarray | Mapping[str, np.ndarray], *,
            batch_size: int = 32, progress: Any = None) -> RunResults:
    """Every runner on the same inputs (``run_batched``); ``progress(key, done, total)``
    is called after each batch, if given. Input shapes are checked against every
    artifact first (the runner's own check; the batch is free since ``run_batched`` feeds
    each artifact its own batch), so a mismatch is one ``InputError`` before any runtime
    starts."""
    feeds = {"input": inputs} if isinstance(inputs, np.ndarray) else dict(inputs)
    for runner in runners.values():
        runner.check_inputs(feed_for(runner, feeds), batch=False)
    results = RunResults()
    for key, runner in runners.items():
        t0 = time.perf_counter()
        step = (lambda done, n, key=key: progress(key, done, n)) if progress else None
        results.outputs[key] = run_batched(runner, feeds, batch_size=batch_size, progress=step)
        results.seconds[key] = time.perf_counter() - t0
    return results


# -- reports ------------------------------------------------------------------

@dataclass
class LayerError:
    """One compared layer: the module (PyTorch path), the artifact's tensor, the errors."""

    index: int
    module: str
    tensor: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    snr_db: float | None
    passed: bool


@dataclass
class PairReport:
    reference: str
    target: str
    precision: str
    samples: int
    max_abs: float
    mean_abs: float
    max_rel: float
    ref_max_abs: float
    cosine: float
    snr_db: float | None
    psnr_db: float | None
    top1_agreement: float | None
    top5_agreement: float | None
    accuracy_reference: float | None
    accuracy_target: float | None
    passed: bool
    failures: list[str]
    tolerance: dict[str, float | None]
    output: str = ""
    reference_runner: str = ""
    target_runner: str = ""
    target_path: str = ""
    seconds_reference: float | None = None
    seconds_target: float | None = None
    first_divergent: dict[str, Any] | None = None
    layers: list[LayerError] | None = None
    divergence_note: str = ""
    fp64_check: dict[str, float] | None = None   # failing fp32 pairs: distance of each side to float64
    diagnosis: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


@dataclass
class ParityReport:
    pairs: list[PairReport] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)    # source, samples, shape, labels
    runners: dict[str, str] = field(default_factory=dict)   # key -> label (what produced numbers)
    notes: list[str] = field(default_factory=list)          # changed files, random inputs, skips

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "pairs": [p.to_dict() for p in self.pairs],
                "inputs": _finite(self.inputs), "runners": dict(self.runners), "notes": list(self.notes)}


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: an infinite SNR (identical outputs) becomes null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def non_finite_failures(ref: np.ndarray, out: np.ndarray) -> list[str]:
    """NaN or Inf in either output is a failure of its own: every comparison with NaN is
    False, so a tolerance check alone would let an all-NaN pair "pass"."""
    fails = []
    for who, arr in (("reference", ref), ("target", out)):
        a = np.asarray(arr)
        if a.dtype.kind in "fc":
            nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            if nan or inf:
                fails.append(f"{who} output not finite ({nan} NaN, {inf} Inf of {a.size} values)")
    return fails


def compare(results: RunResults, ref: str, target: str, tolerance: Tolerance, *,
            labels: np.ndarray | None = None, precision: str = "",
            output: int | str = 0) -> PairReport:
    """Compare one output (by position or name) of ``target`` against ``ref``."""
    _, r = results.output(ref, output)
    out_name, t = results.output(target, output)
    m = error_metrics(r, t)
    agree = class_agreement(r.reshape(len(r), -1) if r.ndim > 2 else r,
                            t.reshape(len(t), -1) if t.ndim > 2 else t, labels)
    if r.ndim != 2:
        agree["top1_agreement"] = agree["top5_agreement"] = None
    metrics = {**m, **agree}
    failures = non_finite_failures(r, t) + tolerance.check(metrics)
    return PairReport(
        reference=ref, target=target, precision=precision, samples=int(len(r)),
        max_abs=m["max_abs"], mean_abs=m["mean_abs"], max_rel=m["max_rel"],
        ref_max_abs=m["ref_max_abs"], cosine=m["cosine"], snr_db=m["snr_db"], psnr_db=m["psnr_db"], output=out_name, **agree,
        passed=not failures, failures=failures, tolerance=tolerance.to_dict(),
        seconds_reference=results.seconds.get(ref), seconds_target=results.seconds.get(target))
