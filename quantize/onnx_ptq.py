"""ONNX Runtime static post-training quantization to QDQ models, generic and for Snapdragon.

A QDQ model keeps every op in float and marks each quantized tensor with a
``QuantizeLinear -> DequantizeLinear`` pair carrying its scale and zero point; a runtime
that knows integer kernels (ORT's CPU EP, the QNN execution provider on the Hexagon NPU)
fuses ``DQ -> op -> Q`` into one integer op, and any other runtime still runs it.

Per-target choices live in ``QuantProfile`` objects, never in flags threaded through:

=============  =========  =================  ===========================  ==================
profile        precision  activations        weights                      for
=============  =========  =================  ===========================  ==================
``int8``       int8       uint8, asymmetric  int8, symmetric per channel  ORT CPU (U8S8)
``qnn-w8a8``   w8a8       uint8, asymmetric  int8, symmetric per channel  QNN EP (HTP)
``qnn-w8a16``  w8a16      uint16, asym.      int8, symmetric per channel  QNN EP (HTP)
=============  =========  =================  ===========================  ==================

(``int8-per-tensor`` and ``int8-s8`` exist for accelerators and benchmarks that need them.)

The Snapdragon profiles go through ONNX Runtime's own QNN tooling,
``qnn_preprocess_model`` (fusions QNN wants) and ``get_qnn_qdq_config`` (the tensor
overrides that make the graph acceptable to the QNN EP: per-tensor MatMul weights, fixed
Sigmoid/Tanh output encodings, type converts around mixed-precision tensors); the QNN
EP itself only exists on a device, so here the model is checked by reading its graph
and run on the CPU EP, which executes the same QDQ arithmetic.

Calibration is ours, run once per float model and method through ORT's calibrators
and cached in ORT's own JSON format (``calibration_cache_path``), so every variant,
mixed-precision choice and per-layer sensitivity run reuses the same ranges:

* ``minmax``: the observed range;
* ``percentile``: 99.999th percentile of a 2,048-bin histogram (ORT's default);
* ``entropy``: TensorRT's KL-divergence threshold. Through ``quantize_static`` ORT builds
  it on a 128-bin histogram with 128 quantized bins, which leaves exactly one candidate
  threshold: the full range, i.e. MinMax under another name. We collect ORT's histogram
  with 2,048 bins and pick the threshold ourselves (``_entropy_range``: the same KL
  criterion, vectorised, with the level count of the real uint8 grid), clipped to the
  observed range as ORT's percentile calibrator does, so a ReLU output is not given a
  negative half it never uses.

16-bit activations use MinMax ranges whatever the method: with 65,536 levels the
rounding step is negligible and clipping is the only error a narrower range adds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from exporters.artifact import Artifact, TensorSpec, sha256_of, size_of
from models.errors import InputError
from models.util import layout_for_ndim, one_line
from quantize.calibration import CalibrationReader

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ENTROPY_BINS = 2048              # TensorRT's histogram size
ENTROPY_LEVELS = 256             # uint8: 256 levels over the clipped range
ENTROPY_CANDIDATES = 128         # thresholds tried per tensor (every k-th histogram edge)
PERCENTILE = 99.999
# Layers are the ops that own weights or mix activations; the activations ORT folds
# into the preceding Q/DQ (removable ones) belong to the layer before them.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
FOLDED_ACTIVATIONS = ("Relu", "Clip")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

_QTYPES = {"uint8": "QUInt8", "int8": "QInt8", "uint16": "QUInt16", "int16": "QInt16"}
_ONNX_DTYPES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32"}


@dataclass(frozen=True)
class QuantProfile:
    """Everything one target asks of a QDQ model."""

    name: str
    precision: str                   # Artifact.precision
    variant: str                     # Artifact.variant ("" -> key onnx/int8)
    activations: str                 # uint8 | int8 | uint16
    weights: str = "int8"
    per_channel: bool = True
    qnn: bool = False                # ORT's QNN preprocessing and config
    range_method: str | None = None  # forces a calibration method (16-bit: minmax)
    description: str = ""

    @property
    def file_stem(self) -> str:
        return "model_" + self.name.replace("-", "_")

    @property
    def activation_bits(self) -> int:
        return 16 if self.activations.endswith("16") else 8


GENERIC_INT8 = QuantProfile(
    "int8", "int8", "", "uint8",
    description="ONNX Runtime CPU and QDQ-aware EPs: uint8 activations, per-channel int8 weights (U8S8)")
GENERIC_INT8_S8 = QuantProfile(
    "int8-s8", "int8", "s8", "int8",
    description="int8 activations and weights (S8S8), for EPs that want signed activations")
GENERIC_INT8_PER_TENSOR = QuantProfile(
    "int8-per-tensor", "int8", "per-tensor", "uint8", per_channel=False,
    description="per-tensor int8 weights, for accelerators without per-channel support")
QNN_W8A8 = QuantProfile(
    "qnn-w8a8", "w8a8", "qnn", "uint8", qnn=True,
    description="Snapdragon HTP through the QNN EP: uint8 activations, per-channel int8 weights")
QNN_W8A16 = QuantProfile(
    "qnn-w8a16", "w8a16", "qnn", "uint16", qnn=True, range_method="minmax",
    description="Snapdragon HTP through the QNN EP: uint16 activations, per-channel int8 weights")

PROFILES: dict[str, QuantProfile] = {p.name: p for p in (
    GENERIC_INT8, GENERIC_INT8_S8, GENERIC_INT8_PER_TENSOR, QNN_W8A8, QNN_W8A16)}
TARGETS: dict[str, tuple[QuantProfile, ...]] = {
    "generic": (GENERIC_INT8,),
    "snapdragon": (QNN_W8A8, QNN_W8A16),
}


def target_profiles(target: str) -> tuple[QuantProfile, ...]:
    try:
        return TARGETS[target]
    except KeyError:
        raise InputError("--target", f"one of {', '.join(TARGETS)}", repr(target)) from None


def check_method(method: str) -> str:
    m = method.lower()
    if m not in CALIBRATION_METHODS:
        raise InputError("--method", f"one of {', '.join(CALIBRATION_METHODS)}", repr(method))
    return m


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """ORT's quantization tools print progress and log warnings; below pipeline/ nothing
    prints, so both are muted for the duration (errors still raise)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


# ----------------------------------------------------------------- layers of a graph


@dataclass
class Layer:
    """A unit of mixed precision and sensitivity: an op with weights (or an Add) plus
    the activation ORT folds into its output quantization."""

    name: str                  # the anchor node's name
    op_type: str
    nodes: list[str]           # anchor + folded activations
    output: str                # the tensor carrying the layer's (quantized) activation
    module: str | None = None  # PyTorch module path, from the export's layer map
    inputs: list[str] = field(default_factory=list)   # activation (non-weight) inputs of the anchor


def graph_layers(model: Any, layer_map: dict[str, str] | None = None) -> list[Layer]:
    """The layers of a float ONNX model, in graph order."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    layers = []
    for n in model.graph.node:
        if n.op_type not in LAYER_OPS or not n.name:
            continue
        nodes, out = [n.name], n.output[0]
        while out not in outputs:
            users = consumers.get(out, [])
            if len(users) != 1 or users[0].op_type not in FOLDED_ACTIVATIONS:
                break
            nodes.append(users[0].name)
            out = users[0].output[0]
        module = None
        if layer_map:
            module = layer_map.get(n.output[0]) or layer_map.get(out)
        layers.append(Layer(n.name, n.op_type, nodes, out, module,
                            [i for i in n.input if i and i not in constants]))
    return layers


def resolve_layers(names: Iterable[str], layers: Sequence[Layer]) -> list[Layer]:
    """Layers named by ONNX node name, output tensor or PyTorch module path."""
    by_key: dict[str, Layer] = {}
    for layer in layers:
        for key in (layer.name, layer.output, layer.module):
            if key:
                by_key.setdefault(key, layer)
    out: list[Layer] = []
    for name in names:
        layer = by_key.get(name)
        if layer is None:
            shown = ", ".join(sorted(l.module or l.name for l in layers)[:6])
            raise InputError("layer", f"a layer of the model (ONNX node, tensor or module path, e.g. {shown})",
                             repr(name))
        if layer not in out:
            out.append(layer)
    return out


# ----------------------------------------------------------------- calibration


@dataclass
class Ranges:
    """Activation ranges of one prepared float model, in ORT's cache format."""

    path: Path
    method: str
    samples: int


class PtqSession:
    """One float model prepared for one family of targets (generic or QNN), calibrated
    lazily per method, quantized into any number of variants.

    ``with PtqSession(onnx_path, calibration, qnn=True) as s: s.quantize(QNN_W8A8, out)``.
    """

    def __init__(self, float_onnx: str | Path, calibration: np.ndarray, *, qnn: bool,
                 calibration_source: str = "caller", layer_map: dict[str, str] | None = None) -> None:
        import onnx
        self.float_onnx = Path(float_onnx)
        self.qnn = qnn
        self.calibration_source = calibration_source
        self._work = Path(tempfile.mkdtemp(prefix="mdeploy-ptq-"))
        self._ranges: dict[str, Ranges] = {}
        try:
            self.model_path = self._prepare()
            self.model = onnx.load(str(self.model_path))
            self.input_name, self.input_shape = _single_input(self.model, self.float_onnx)
            self.calibration = _check_calibration(calibration, self.input_shape)
            self.layer_map = dict(layer_map or {})
            self.layers = graph_layers(self.model, self.layer_map)
        except BaseException:
            self.close()
            raise

    @property
    def work_dir(self) -> Path:
        """A private scratch folder, removed by ``close()``."""
        return self._work

    def __enter__(self) -> "PtqSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)

    # -- preparation and calibration ----------------------------------------
    def _prepare(self) -> Path:
        """ORT's pre-processing for the family: QNN fusions and node names, or the CPU
        quantizer's shape inference and basic graph optimisation."""
        from exporters.onnx import load_onnx
        load_onnx(self.float_onnx, load_weights=False)       # a one-line error for a bad file
        out = self._work / "prepared.onnx"
        try:
            with quiet_ort():
                if self.qnn:
                    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model
                    if not qnn_preprocess_model(str(self.float_onnx), str(out)):
                        shutil.copyfile(self.float_onnx, out)
                else:
                    from onnxruntime.quantization.shape_inference import quant_pre_process
                    quant_pre_process(str(self.float_onnx), str(out), skip_symbolic_shape=True)
        except Exception as exc:  # ORT's tools raise Fail, ValueError, onnx errors...
            msg = one_line(exc)
            tool = "qnn_preprocess_model" if self.qnn else "quant_pre_process"
            raise InputError(self.float_onnx, f"a model ONNX Runtime's {tool} accepts",
                             f"{type(exc).__name__}: {msg}") from None
        return out

    def ranges(self, method: str) -> Ranges:
        method = check_method(method)
        if method not in self._ranges:
            self._ranges[method] = self._calibrate(method)
        return self._ranges[method]

    def _calibrate(self, method: str) -> Ranges:
        from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData,
                                                        create_calibrator, save_tensors_data)
        cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[method]
        extra: dict[str, Any] = {}
        if method == "entropy":
            extra = {"num_bins": ENTROPY_BINS}
        elif method == "percentile":
            extra = {"percentile": PERCENTILE}
        aug = self._work / f"augmented_{method}.onnx"
        with quiet_ort():
            cal = create_calibrator(self.model_path, [], augmented_model_path=str(aug), calibrate_method=cm,
                                    providers=["CPUExecutionProvider"], extra_options=extra)
            cal.collect_data(CalibrationReader(self.calibration, self.input_name))
            if method == "entropy":
                outputs = {o.name for o in self.model.graph.output}
                data = TensorsData(cm, {
                    name: TensorData(**_entropy_range(h, name in outputs))
                    for name, h in cal.collector.histogram_dict.items()})
            else:
                data = cal.compute_data()
            del cal
        path = self._work / f"ranges_{method}.json"
        save_tensors_data(data, path)
        aug.unlink(missing_ok=True)
        return Ranges(path, method, int(len(self.calibration)))

    # -- quantization -------------------------------------------------------
    def quantize(self, profile: QuantProfile, out_path: str | Path, *, method: str = "minmax",
                 keep_float: Sequence[Layer] = (), w16_layers: Sequence[Layer] = (),
                 only: Sequence[Layer] | None = None, root: str | Path | None = None) -> Artifact:
        """Write the QDQ model of ``profile`` to ``out_path`` and describe it.

        ``keep_float`` layers stay in float (under the QNN EP they fall back to the CPU);
        ``w16_layers`` get 16-bit activations (QNN's mixed precision, with the type converts
        ORT adds around them); ``only`` quantizes those layers and nothing else (the
        per-layer sensitivity probe).
        """
        out_path = Path(out_path)
        ranges = self.write(profile, out_path, method=method, keep_float=keep_float, w16_layers=w16_layers,
                            only=only)
        return self._artifact(profile, out_path, ranges, keep_float, w16_layers, root)

    def write(self, profile: QuantProfile, out_path: str | Path, *, method: str = "minmax",
              keep_float: Sequence[Layer] = (), w16_layers: Sequence[Layer] = (),
              only: Sequence[Layer] | None = None) -> Ranges:
        """``quantize`` without the artifact record: the QDQ file only (sensitivity probes)."""
        if profile.qnn != self.qnn:
            raise ValueError(f"profile {profile.name} needs a PtqSession with qnn={profile.qnn}")
        ranges = self.ranges(check_method(profile.range_method or method))
        exclude = [n for layer in keep_float for n in layer.nodes]
        overrides = {}
        if profile.activation_bits == 8:
            # A layer in w8a16 reads and writes 16-bit activations: its inputs are 16-bit at
            # their producers (a convert up from 8 bits would not restore what 8 bits lost);
            # under QNN, ORT adds the converts its 8-bit neighbours need.
            wide = "uint16" if profile.activations.startswith("u") else "int16"
            overrides = {t: [{"quant_type": _qtype(wide)}] for layer in w16_layers
                         for t in (*layer.inputs, layer.output)}
        if only is not None:
            nodes = {n for layer in only for n in layer.nodes}
            exclude = [n.name for n in self.model.graph.node if n.name and n.name not in nodes]
        self._run_quantizer(profile, Path(out_path), ranges, exclude, overrides)
        return ranges

    def _config(self, profile: QuantProfile, exclude: list[str], overrides: dict[str, Any]) -> Any:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, StaticQuantConfig
        act, wt = _qtype(profile.activations), _qtype(profile.weights)
        if profile.qnn:
            from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
            cfg = get_qnn_qdq_config(str(self.model_path), _NoData(), activation_type=act, weight_type=wt,
                                     per_channel=profile.per_channel, weight_symmetric=True,
                                     init_overrides=overrides or None, add_qtype_converts=True,
                                     nodes_to_exclude=exclude or None)
            return cfg
        extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": profile.activations == "int8",
                                 "MinimumRealRange": 1e-4}
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        if profile.activation_bits == 16 or overrides:
            extra["UseQDQContribOps"] = True       # 16-bit Q/DQ before opset 21
        return StaticQuantConfig(_NoData(), calibrate_method=CalibrationMethod.MinMax,
                                 quant_format=QuantFormat.QDQ, activation_type=act, weight_type=wt,
                                 nodes_to_exclude=exclude, per_channel=profile.per_channel,
                                 extra_options=extra)

    def _run_quantizer(self, profile: QuantProfile, out_path: Path, ranges: Ranges, exclude: list[str],
                       overrides: dict[str, Any]) -> None:
        import onnx
        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.calibrate import CalibrationMethod

        from exporters.fileio import atomic_path
        cfg = self._config(profile, exclude, overrides)
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[ranges.method]
        tmp = self._work / "quantized.onnx"
        try:
            with quiet_ort():
                quantize_static(str(self.model_path), str(tmp), None, quant_format=cfg.quant_format,
                                op_types_to_quantize=cfg.op_types_to_quantize,
                                per_channel=cfg.per_channel, reduce_range=False,
                                activation_type=cfg.activation_type, weight_type=cfg.weight_type,
                                nodes_to_quantize=cfg.nodes_to_quantize, nodes_to_exclude=cfg.nodes_to_exclude,
                                calibrate_method=method, extra_options=cfg.extra_options,
                                calibration_cache_path=str(ranges.path))
        except (ValueError, RuntimeError, KeyError) as exc:
            msg = one_line(exc)
            raise InputError(self.float_onnx, f"a model ONNX Runtime can quantize ({profile.name})",
                             f"{type(exc).__name__}: {msg}") from None
        proto = onnx.load(str(tmp))
        proto.producer_name = f"mdeploy ptq ({profile.name}, onnxruntime.quantization)"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_path) as staged:
            onnx.save(proto, str(staged))

    def _artifact(self, profile: QuantProfile, path: Path, ranges: Ranges, keep_float: Sequence[Layer],
                  w16: Sequence[Layer], root: str | Path | None) -> Artifact:
        import onnx
        import onnxruntime
        proto = onnx.load(str(path))
        enc = read_encodings(proto)
        root = Path(root) if root is not None else path.parent
        extra: dict[str, Any] = {
            "profile": profile.name,
            "profile_description": profile.description,
            "execution_provider": "QNNExecutionProvider (HTP)" if profile.qnn else "CPUExecutionProvider",
            "encodings": enc,
            "calibration": {"method": ranges.method, "samples": ranges.samples,
                            "source": self.calibration_source},
            "mixed_precision": {"float": [l.module or l.name for l in keep_float],
                                "w8a16": [l.module or l.name for l in w16] if profile.activation_bits == 8 else []},
            "layer_map": qdq_layer_map(proto, self.layer_map),
            "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        }
        ins = [TensorSpec(self.input_name, list(self.input_shape), "float32", "NCHW")]
        outs = []
        for o in proto.graph.output:
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "N")
                    for d in o.type.tensor_type.shape.dim]
            outs.append(TensorSpec(o.name, dims, "float32", layout_for_ndim(len(dims))))
        return Artifact(path=str(path.resolve().relative_to(root.resolve())), format="onnx",
                        precision=profile.precision, inputs=ins, outputs=outs, sha256=sha256_of(path),
                        size_bytes=size_of(path), tool="onnxruntime.quantization (QDQ)"
                        + (" + execution_providers.qnn" if profile.qnn else ""),
                        tool_version=onnxruntime.__version__, variant=profile.variant, extra=extra)


def qdq_layer_map(proto: Any, layer_map: dict[str, str]) -> dict[str, str]:
    """The float model's layer map, moved onto what a QDQ graph's consumers see.

    In a QDQ graph a layer's float tensor ``T`` is followed by ``Q -> DQ``; the value the
    next layer reads (and the one to compare with PyTorch) is the DequantizeLinear output,
    which also carries the clipping of a removed ReLU/Clip (ORT folds it into the range and
    names the convolution's own output ``T``, so ``T`` itself is unclipped). Tensors left
    in float keep their names.
    """
    consumers: dict[str, list[Any]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names = {o for n in proto.graph.node for o in n.output}
    out: dict[str, str] = {}
    for tensor, module in layer_map.items():
        if tensor not in names:
            continue
        q = next((c for c in consumers.get(tensor, []) if c.op_type == "QuantizeLinear"), None)
        dq = next((c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"), None) if q else None
        out[dq.output[0] if dq is not None else tensor] = module
    return out


def _entropy_range(histogram: tuple, is_output: bool) -> dict[str, np.ndarray]:
    """KL-divergence range of one tensor from ORT's histogram ``(hist, edges, min, max, _)``.

    The criterion of TensorRT's int8 calibration (Migacz, GTC 2017) on ORT's histogram,
    which is symmetric about zero: for each candidate window ``[-t, t]``, the reference
    ``p`` (outliers folded into the edge bins) is compared with ``q``, the same window
    merged into as many levels as the real quantizer will have there, and the window of
    smallest KL(p || q) wins. ORT models 128 levels over the whole window; a uint8 grid
    has 256 levels over the clipped range, i.e. over ``[0, t]`` alone for a post-ReLU
    tensor (512 over the symmetric window), so that is what is modelled here; 128 made
    the criterion clip far too much. Written with ``bincount`` instead of ORT's Python
    loops. The window is then clipped to the observed range, and a graph output keeps
    its observed range: clipping the logits changes which class wins, which no
    histogram criterion sees.
    """
    hist, edges, lo_obs, hi_obs = histogram[0], histogram[1], histogram[2], histogram[3]
    dtype = edges.dtype
    lo_obs, hi_obs = np.asarray(lo_obs, dtype), np.asarray(hi_obs, dtype)
    if is_output or hist.sum() == 0:
        return {"lowest": lo_obs, "highest": hi_obs, "hist": hist, "bins": edges}
    h = hist.astype(np.float64)
    n = h.size
    zero = n // 2
    one_sided = float(lo_obs) >= 0 or float(hi_obs) <= 0
    nq = 2 * ENTROPY_LEVELS if one_sided else ENTROPY_LEVELS
    if one_sided:
        # The spike of exact zeros after a ReLU sits on a grid point (zero point 0): it costs
        # nothing whatever the range, but merged with its neighbours in q it dominates the
        # KL and drags the threshold down; it is left out of the criterion.
        h[zero if float(lo_obs) >= 0 else zero - 1] = 0.0
    csum = np.concatenate([[0.0], np.cumsum(h)])
    best, best_window = np.inf, (0, n)
    first = min(nq // 2, zero)
    step = max(1, (zero - first) // ENTROPY_CANDIDATES)
    for i in range(first, zero + 1, step):
        s, e = zero - i, min(zero + i + 1, n)
        sliced = h[s:e]
        p = sliced.copy()
        p[0] += csum[s]
        p[-1] += csum[n] - csum[e]
        levels_n = min(nq, sliced.size)
        merged = max(1, sliced.size // levels_n)
        idx = np.minimum(np.arange(sliced.size) // merged, levels_n - 1)   # the last level takes the rest
        nonzero = p != 0
        levels = np.bincount(idx, weights=sliced, minlength=levels_n)
        counts = np.bincount(idx, weights=nonzero, minlength=levels_n)
        q = np.where(nonzero, levels[idx] / np.maximum(counts[idx], 1), 0.0)
        kl = _kl(p, q)
        if kl < best:
            best, best_window = kl, (s, e)
    lo = np.maximum(np.asarray(edges[best_window[0]], dtype), lo_obs)
    hi = np.minimum(np.asarray(edges[best_window[1]], dtype), hi_obs)
    return {"lowest": np.asarray(lo, dtype), "highest": np.asarray(hi, dtype), "hist": hist, "bins": edges}


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p || q) after ORT's smoothing (zeros get ``eps``, taken from the non-zeros)."""
    ps, qs = _smooth(p, eps), _smooth(q, eps)
    if ps is None or qs is None:
        return float("inf")
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


def _smooth(p: np.ndarray, eps: float) -> np.ndarray | None:
    zeros = p == 0
    n_zeros, n_nonzeros = int(zeros.sum()), int(p.size - zeros.sum())
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    if eps1 >= 1.0:
        return None
    return p.astype(np.float64) + np.where(zeros, eps, -eps1)


class _NoData:
    """The configs want a reader; the ranges come from the cache, so it is never read."""

    def get_next(self) -> None:
        return None


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType
    return getattr(QuantType, _QTYPES[name])


def _single_input(model: Any, path: Path) -> tuple[str, list[int | str]]:
    """The image input's name and shape (a dynamic dimension by its symbol)."""
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise InputError(path, "a model with one image input", f"{len(inputs)} inputs")
    dims = inputs[0].type.tensor_type.shape.dim
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "N")
                              for d in dims]
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise InputError(path, "a 4-D (N, C, H, W) image input with fixed C, H, W", f"shape {shape}")
    return inputs[0].name, shape


def _check_calibration(x: np.ndarray, shape: list[int | str]) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != len(shape) or list(x.shape[1:]) != list(shape[1:]) or len(x) == 0:
        raise InputError("calibration data", f"model inputs of shape (N, {', '.join(map(str, shape[1:]))})",
                         f"shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise InputError("calibration data", "finite float model inputs", f"dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------- reading the encodings


def read_encodings(model: Any) -> dict[str, Any]:
    """What a QDQ graph says about its own quantization, read from its Q/DQ nodes.

    ``weights``: per weight initializer the consuming op, dtype, per-channel axis, channel
    count, scale range and whether every zero point is 0 (symmetric); ``activations``:
    per activation tensor its dtype, scale and zero point; ``float_layers``: ops with
    weights that have no quantized weight (kept in float). Also counts by dtype.
    """
    from onnx import numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: next(a.t for a in n.attribute if a.name == "value")
              for n in g.node if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)}

    def value(name: str) -> np.ndarray | None:
        t = inits.get(name) or consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights: dict[str, Any] = {}
    activations: dict[str, Any] = {}
    quantized_weight_of: set[str] = set()
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 2:
            continue
        scale = value(n.input[1])
        zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q = value(n.input[0])
            users = consumers.get(n.output[0], [])
            op = users[0].op_type if users else ""
            slot = list(users[0].input).index(n.output[0]) if users else -1
            if q is None or scale is None:
                continue
            dtype = str(q.dtype)
            if dtype == "int32" or slot == 2:
                continue                                   # a bias: int32 at scale s_in * s_w
            name = n.output[0].removesuffix("_DequantizeLinear_Output")
            zps = np.zeros_like(scale) if zp is None else zp
            per_channel = scale.size > 1
            weights[name] = {
                "op": op, "node": users[0].name if users else "", "dtype": dtype,
                "axis": (axis if axis is not None else 1) if per_channel else None,
                "channels": int(scale.size), "shape": list(q.shape),
                "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                "symmetric": bool(np.all(zps == 0)) if dtype.startswith("int") else False,
                "zero_points": sorted({int(z) for z in np.asarray(zps).reshape(-1)})[:4],
            }
            if users:
                quantized_weight_of.add(users[0].name)
        elif n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            if scale is None or scale.size != 1:
                continue
            dtype = str(zp.dtype) if zp is not None else "uint8"
            activations[n.input[0]] = {"dtype": dtype, "scale": float(scale.reshape(())),
                                       "zero_point": int(np.asarray(zp).reshape(())) if zp is not None else 0}
    float_layers = [n.name for n in g.node if n.op_type in WEIGHT_OPS and n.name not in quantized_weight_of
                    and len(n.input) > 1 and n.input[1] in inits]
    return {
        "weight_dtypes": _count(w["dtype"] for w in weights.values()),
        "activation_dtypes": _count(a["dtype"] for a in activations.values()),
        "weights_per_channel": sum(1 for w in weights.values() if w["axis"] is not None),
        "weights_symmetric": sum(1 for w in weights.values() if w["symmetric"]),
        "weights": weights,
        "activations": activations,
        "float_layers": float_layers,
    }


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


__all__ = ["CALIBRATION_METHODS", "GENERIC_INT8", "GENERIC_INT8_PER_TENSOR", "GENERIC_INT8_S8", "Layer",
           "PROFILES", "PtqSession", "QNN_W8A16", "QNN_W8A8", "QuantProfile", "Ranges", "TARGETS",
           "check_method", "graph_layers", "read_encodings", "resolve_layers", "target_profiles"]
