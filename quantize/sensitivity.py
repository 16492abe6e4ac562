"""Per-layer quantization sensitivity, and the layers mixed precision should protect.

Two probes, as in AIMET's QuantAnalyzer (per-layer quantizer enablement/disablement):

* ``only`` (default): quantize one layer and leave the rest in float; the output SNR
  against the float model is the error that layer alone brings. Per-layer errors are
  far apart (40-60 dB for a harmless layer, 20 dB for a bad one), so the ranking is
  clear even on a hundred inputs, and, since independent quantization noises add in
  power, it is also the ranking of what each layer contributes to the full int8 model.
* ``exclude``: quantize everything but one layer; the SNR *gain* over the full int8
  model is what keeping that layer in float buys. Closer to the decision being made,
  but each gain is a small difference of two noisy figures.

Every probe reuses the session's calibration (the same ranges as the final model) and
ORT's quantizer restricted by ``nodes_to_quantize`` / ``nodes_to_exclude`` semantics, so
a probe is the real QDQ arithmetic, run on ONNX Runtime's CPU EP.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np

from models.errors import InputError
from quantize.onnx_ptq import ORT_REQUANTIZING_OPTIMIZERS, Layer, PtqSession, QuantProfile, resolve_layers
from quantize.report import accuracy, snr_db, top1_agreement

MODES = ("only", "exclude")
IDENTICAL_DB = 200.0      # what "identical to float" (an SNR of None) ranks as
DEFAULT_SAMPLES = 200

Progress = Callable[[int, int, str], None]


@dataclass
class LayerSensitivity:
    layer: str                    # PyTorch module path when known, else the ONNX node name
    node: str                     # ONNX node name
    op_type: str
    snr_db: float | None          # logits SNR vs float for this probe (None: identical)
    top1_agreement: float
    accuracy: float | None
    score_db: float               # what the ranking sorts on: error brought (only) / gained (exclude)


@dataclass
class SensitivityReport:
    mode: str
    profile: str
    method: str
    samples: int
    float_accuracy: float | None
    quantized: dict[str, Any]                       # the full model: snr_db, top1_agreement, accuracy
    layers: list[LayerSensitivity] = field(default_factory=list)   # most sensitive first
    seconds: float = 0.0

    def worst(self, n: int) -> list[str]:
        """ONNX node names of the ``n`` most sensitive layers."""
        return [x.node for x in self.layers[:max(0, n)]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranked_db(snr: float | None) -> float:
    """An SNR to sort on: "identical to float" (None) ranks past any real figure."""
    return IDENTICAL_DB if snr is None else snr


def _score(mode: str, snr: float | None, full_snr: float | None) -> float:
    """Higher = more sensitive. ``only``: minus the SNR (the lower, the worse);
    ``exclude``: the SNR gained by keeping the layer in float."""
    if mode == "only":
        return -ranked_db(snr)
    return ranked_db(snr) - ranked_db(full_snr)


def layer_sensitivity(session: PtqSession, profile: QuantProfile, x: np.ndarray,
                      labels: np.ndarray | None = None, *, method: str = "minmax", mode: str = "only",
                      layers: Sequence[Layer] | None = None, progress: Progress | None = None
                      ) -> SensitivityReport:
    """Rank ``layers`` (default: every layer of the session's model) by sensitivity."""
    if mode not in MODES:
        raise InputError("sensitivity mode", f"one of {', '.join(MODES)}", repr(mode))
    t0 = time.perf_counter()
    base = probe_baseline(session, profile, x, method, "sensitivity")
    layers = list(layers if layers is not None else session.layers)
    work, ref, full = base.work, base.reference, base.full
    full_snr = snr_db(ref, full)
    report = SensitivityReport(
        mode=mode, profile=profile.name, method=session.ranges(profile.range_method or method).method,
        samples=int(len(x)), float_accuracy=accuracy(ref, labels),
        quantized={"snr_db": full_snr, "top1_agreement": top1_agreement(ref, full),
                   "accuracy": accuracy(full, labels)})
    def writer(layer: Layer) -> Callable[[Path], None]:
        if mode == "only":
            return lambda path: session.write(profile, path, method=method, only=[layer])
        return lambda path: session.write(profile, path, method=method, keep_float=[layer])

    for i, out in pipelined_runs(((i, writer(layer)) for i, layer in enumerate(layers)), work,
                                 session.input_name, x):
        layer = layers[i]
        if progress:
            progress(i, len(layers), layer.module or layer.name)
        snr = snr_db(ref, out)
        report.layers.append(LayerSensitivity(
            layer=layer.module or layer.name, node=layer.name, op_type=layer.op_type, snr_db=snr,
            top1_agreement=top1_agreement(ref, out), accuracy=accuracy(out, labels),
            score_db=_score(mode, snr, full_snr)))
    if progress:
        progress(len(layers), len(layers), "")
    report.layers.sort(key=lambda r: -r.score_db)
    report.seconds = time.perf_counter() - t0
    return report


def layer_count(spec: str | int | Sequence[str] | None) -> int | None:
    """The N of a ``--keep-float`` / ``--w8a16-layers`` count (the N most sensitive layers,
    which only the ranking knows); None when the value names layers or is not given."""
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str) and spec.strip().isdigit():
        return int(spec)
    return None


def pick_layers(session: PtqSession, spec: str | int | Sequence[str] | None,
                sensitivity: SensitivityReport | None) -> list[Layer]:
    """Layers for mixed precision: a count (the most sensitive N) or names (ONNX nodes,
    output tensors or PyTorch module paths)."""
    if spec is None or spec == "" or spec == 0:
        return []
    n = layer_count(spec)
    if n is not None:
        if n < 0:
            raise InputError("layer count", "a non-negative number", str(n))
        if sensitivity is None:
            raise InputError("layer count", "a per-layer sensitivity run to pick the worst layers", "none")
        return resolve_layers(sensitivity.worst(n), session.layers)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    return resolve_layers([n for n in names if n], session.layers)


@dataclass
class ProbeBaseline:
    """What every per-layer probe is compared with: the float model's and the fully
    quantized model's outputs on the probe inputs, and a scratch folder for the probes."""

    work: Path
    reference: np.ndarray          # float model
    full_path: Path                # the fully quantized QDQ model
    full: np.ndarray               # its outputs
    ranges: Any                    # the calibration ranges it used (onnx_ptq.Ranges)


def probe_baseline(session: PtqSession, profile: QuantProfile, x: np.ndarray, method: str,
                   folder: str) -> ProbeBaseline:
    """Run the float model and write and run the fully quantized one, for a probe family
    (``folder`` under the session's scratch folder)."""
    if len(x) == 0:
        raise InputError("sensitivity inputs", "at least one input", "none")
    work = session.work_dir / folder
    work.mkdir(exist_ok=True)
    ref = run_onnx(session.model_path, session.input_name, x)
    full_path = work / "full.onnx"
    ranges = session.write(profile, full_path, method=method)
    return ProbeBaseline(work, ref, full_path, run_onnx(full_path, session.input_name, x), ranges)


def pipelined_runs(jobs: Iterable[tuple[Hashable, Callable[[Path], None]]], folder: Path, input_name: str,
                   x: np.ndarray) -> Iterator[tuple[Hashable, np.ndarray]]:
    """``(tag, outputs)`` of each job's probe model on ``x`` (``run_onnx(as_written=True)``),
    in job order; a job is ``(tag, write)``, ``write(path)`` writing its probe model there.

    Why: a probe is a Python half (ORT's quantizer or an ONNX edit, then serialising the
    model: one core) and an ONNX Runtime half (both cores, the GIL released). Each probe is
    written here while the previous one runs in a worker thread, so the Python half no
    longer leaves a core idle; each probe's outputs are what it gives run alone. Two probe
    files alternate: the one being written is never the one being read."""
    from concurrent.futures import ThreadPoolExecutor
    paths = (folder / "probe_a.onnx", folder / "probe_b.onnx")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdeploy-probe") as pool:
        pending = None
        for n, (tag, write) in enumerate(jobs):
            path = paths[n % 2]
            write(path)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (tag, pool.submit(run_onnx, path, input_name, x, as_written=True))
        if pending is not None:
            yield pending[0], pending[1].result()


def run_onnx(path: str | Path, input_name: str, x: np.ndarray, *, as_written: bool = False) -> np.ndarray:
    """The first output of an ONNX model on ``x`` (batch 1 at a time: exported mobile models
    have a fixed batch), on ONNX Runtime's CPU EP with its default optimisations.

    ``as_written=True`` turns off ORT's ``WeightBiasQuantization`` (onnxruntime >= 1.21), which
    at load time quantizes the float weights of any Conv/Gemm whose input comes from a
    DequantizeLinear to **per-tensor** int8. A probe that quantizes part of a model (one
    layer, or only the activations) has exactly that pattern, so without this flag it
    measures per-tensor weight rounding of its neighbours, not what it claims: on
    EfficientNet-Lite1 the activation-only model read 5.4 dB instead of 16.1 dB.
    """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.inter_op_num_threads = 1
    extra = {"disabled_optimizers": list(ORT_REQUANTIZING_OPTIMIZERS)} if as_written else {}
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **extra)
    batch = sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) and batch > 0 else len(x)
    outs = [sess.run(None, {input_name: np.ascontiguousarray(x[i:i + step], dtype=np.float32)})[0]
            for i in range(0, len(x), step)]
    return np.concatenate(outs)
