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
  negative half it never uses. KL compares distribution shapes and is blind to how far
  a clipped value moves, so on some trained models it cut a dozen activations to
  0.39-0.73 of their range (issue 14); a KL window is therefore kept only where its
  estimated quantization MSE is no larger than the observed range's, else the tensor
  gets its MinMax range;
* ``mse``: on the same histogram, the uint8 grid of least estimated quantization error
  (``_mse_range``: rounding error inside plus clipping error outside, integrated exactly
  over the histogram bins, clipping weighted 3x as in AIMET), as PyTorch's
  ``HistogramObserver`` does. It narrows a range only where that lowers the error.

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
from quantize.ort_memo import QuantizerMemo

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse")
ENTROPY_BINS = 2048              # TensorRT's histogram size (entropy and mse)
ENTROPY_LEVELS = 256             # uint8: 256 levels over the clipped range
ENTROPY_CANDIDATES = 128         # thresholds tried per tensor (every k-th histogram edge)
MSE_SCALES = 96                  # mse: step sizes tried per tensor (geometric) ...
MSE_MIN_FRACTION = 0.125         # ... from the observed range's down to this fraction of it
MSE_CLIP_WEIGHT = 3.0            # mse: clipping error counted 3x (AIMET's SQNR analyzer default)
# ORT's name for each method's ranges in its calibration cache (mse, like entropy, is ours
# over ORT's histogram; ORT checks the cache's name against the one quantize_static gets)
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "mse": "Entropy"}
PERCENTILE = 99.999
CALIBRATION_CHUNK = 16          # inputs per calibrator pass (memory: see PtqSession._collect)
# Layers are the ops that own weights or mix activations; the activations ORT folds
# into the preceding Q/DQ (removable ones) belong to the layer before them.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
FOLDED_ACTIVATIONS = ("Relu", "Clip")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# onnxruntime >= 1.21 quantizes, at session load, the float weight of every Conv /
# ConvTranspose / Gemm whose input 0 comes from a per-tensor DequantizeLinear, to
# *per-tensor* symmetric int8 (a Level-1 optimizer, so before partitioning: the QNN EP
# sees it too). A layer we keep in float must therefore not read a DQ output
# (``_float_layers_read_float``), and probes that quantize part of a graph run with it off.
ORT_REQUANTIZING_OPTIMIZERS = ("WeightBiasQuantization",)
_REQUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm")

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
                 calibration_source: str = "caller", layer_map: dict[str, str] | None = None,
                 original_onnx: str | Path | None = None) -> None:
        """``original_onnx``: the same network before its weights were rounded onto the int8
        grid (``quantize.weight_rounding``). A layer raised to 16-bit weights or kept in float
        takes its weights and bias from there: int16 or float of an int8-rounded weight would
        keep the int8 error the raise is meant to remove."""
        import onnx
        self.float_onnx = Path(float_onnx)
        self.qnn = qnn
        self.calibration_source = calibration_source
        self._work = Path(tempfile.mkdtemp(prefix="mdeploy-ptq-"))
        self._memo = QuantizerMemo()        # every write quantizes the same weights again
        self._ranges: dict[str, Ranges] = {}
        self._hist: dict[str, tuple] | None = None
        try:
            self.model_path = self._prepare()
            self.model = onnx.load(str(self.model_path))
            self.input_name, self.input_shape = _single_input(self.model, self.float_onnx)
            self.calibration = _check_calibration(calibration, self.input_shape)
            self.layer_map = dict(layer_map or {})
            self.layers = graph_layers(self.model, self.layer_map)
            self.original_weights = _original_weights(self.model, original_onnx) if original_onnx else {}
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

    def adopt_ranges(self, ranges: Ranges) -> bool:
        """Take ``ranges`` (another session's calibration) instead of calibrating, when every
        tensor they cover is a tensor of this session's prepared model; ``False`` otherwise.

        Why: the same graph with other weights (the model before weight rounding, next to the
        rounded one) would otherwise run the whole calibration again for activation ranges
        that differ in the last digits, and a comparison of the two roundings is cleaner with
        the activations quantized the same way."""
        from onnxruntime.quantization.calibrate import load_tensors_data, save_tensors_data
        data = load_tensors_data(ranges.path)
        names = {o for n in self.model.graph.node for o in n.output} | {i.name for i in self.model.graph.input}
        if not set(data.data) <= names:
            return False
        path = self._work / f"ranges_{ranges.method}.json"
        save_tensors_data(data, path)
        self._ranges[ranges.method] = Ranges(path, ranges.method, ranges.samples)
        return True

    def _calibrate(self, method: str) -> Ranges:
        from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
        cm = _ort_method(method)
        if method in ("entropy", "mse"):
            choose = _entropy_range if method == "entropy" else _mse_range
            outputs = {o.name for o in self.model.graph.output}
            data = TensorsData(cm, {name: TensorData(**choose(h, name in outputs))
                                    for name, h in self._histograms().items()})
        else:
            cal = self._collect(method)
            with quiet_ort():
                data = cal.compute_data()
            del cal
        path = self._work / f"ranges_{method}.json"
        save_tensors_data(data, path)
        return Ranges(path, method, int(len(self.calibration)))

    def _histograms(self) -> dict[str, tuple]:
        """ORT's 2,048-bin histograms of every tensor, collected once for entropy and mse."""
        if self._hist is None:
            self._hist = dict(self._collect("entropy").collector.histogram_dict)
        return self._hist

    def _collect(self, method: str) -> Any:
        from onnxruntime.quantization.calibrate import create_calibrator
        extra: dict[str, Any] = {}
        if method == "entropy":
            extra = {"num_bins": ENTROPY_BINS}
        elif method == "percentile":
            extra = {"percentile": PERCENTILE}
        aug = self._work / f"augmented_{method}.onnx"
        with quiet_ort():
            cal = create_calibrator(self.model_path, [], augmented_model_path=str(aug),
                                    calibrate_method=_ort_method(method),
                                    providers=["CPUExecutionProvider"], extra_options=extra)
            # ORT's calibrators keep every intermediate tensor of every input they are given
            # until the end of collect_data: 200 crops of EfficientNet-Lite1 at 240 px held
            # ~13 GB. Chunks bound that to CALIBRATION_CHUNK inputs; MinMax ranges are exact
            # across chunks, histograms are merged by ORT's own merge_histogram.
            for i in range(0, len(self.calibration), CALIBRATION_CHUNK):
                cal.collect_data(CalibrationReader(self.calibration[i:i + CALIBRATION_CHUNK], self.input_name))
        aug.unlink(missing_ok=True)
        return cal

    # -- quantization -------------------------------------------------------
    def quantize(self, profile: QuantProfile, out_path: str | Path, *, method: str = "minmax",
                 keep_float: Sequence[Layer] = (), w16_layers: Sequence[Layer] = (),
                 w16_weights: Sequence[Layer] = (),
                 only: Sequence[Layer] | None = None, root: str | Path | None = None) -> Artifact:
        """Write the QDQ model of ``profile`` to ``out_path`` and describe it.

        ``keep_float`` layers stay in float (under the QNN EP they fall back to the CPU);
        ``w16_layers`` get 16-bit activations (QNN's mixed precision, with the type converts
        ORT adds around them); ``w16_weights`` get symmetric per-channel int16 weights and
        16-bit activations (HTP runs 16-bit weights only with 16-bit activations); ``only``
        quantizes those layers and nothing else (the per-layer sensitivity probe).
        """
        out_path = Path(out_path)
        ranges = self.write(profile, out_path, method=method, keep_float=keep_float, w16_layers=w16_layers,
                            w16_weights=w16_weights, only=only)
        return self._artifact(profile, out_path, ranges, keep_float, w16_layers, root, w16_weights)

    def write(self, profile: QuantProfile, out_path: str | Path, *, method: str = "minmax",
              keep_float: Sequence[Layer] = (), w16_layers: Sequence[Layer] = (),
              w16_weights: Sequence[Layer] = (), only: Sequence[Layer] | None = None) -> Ranges:
        """``quantize`` without the artifact record: the QDQ file only (sensitivity probes)."""
        if profile.qnn != self.qnn:
            raise ValueError(f"profile {profile.name} needs a PtqSession with qnn={profile.qnn}")
        ranges = self.ranges(check_method(profile.range_method or method))
        exclude = [n for layer in keep_float for n in layer.nodes]
        overrides: dict[str, Any] = {}
        wide16 = "uint16" if profile.activations.startswith("u") else "int16"
        if profile.activation_bits == 8:
            # A layer in w8a16 reads and writes 16-bit activations: its inputs are 16-bit at
            # their producers (a convert up from 8 bits would not restore what 8 bits lost);
            # under QNN, ORT adds the converts its 8-bit neighbours need.
            overrides = {t: [{"quant_type": _qtype(wide16)}] for layer in (*w16_layers, *w16_weights)
                         for t in (*layer.inputs, layer.output)}
        floated = list(keep_float)
        for layer in w16_weights:
            if layer in floated:
                continue
            weight, axis = weight_input(self.model, layer)
            if weight is None:
                raise InputError("layer", "a Conv or Gemm layer with an initializer weight (for 16-bit weights)",
                                 f"{layer.module or layer.name} ({layer.op_type})")
            overrides[weight] = [{"quant_type": _qtype("int16"), "symmetric": True, "axis": axis}]
        if only is not None:
            nodes = {n for layer in only for n in layer.nodes}
            exclude = [n.name for n in self.model.graph.node if n.name and n.name not in nodes]
        # a probe of one layer (``only``) keeps its output Q/DQ in the path on purpose
        rewire = set() if only is not None else {n for layer in keep_float for n in layer.nodes}
        source = self._with_original_weights([*floated, *w16_weights])
        self._run_quantizer(profile, Path(out_path), ranges, exclude, overrides, rewire, source=source)
        return ranges

    def _with_original_weights(self, layers: Sequence[Layer]) -> Path:
        """The prepared model with ``layers``' weights and biases from ``original_onnx``
        (the prepared model itself when there is nothing to swap)."""
        names = {i for layer in layers for i in _node(self.model, layer.name).input[1:3]}
        swap = {n: a for n, a in self.original_weights.items() if n in names}
        if not swap:
            return self.model_path
        import onnx
        from onnx import numpy_helper
        edited = onnx.ModelProto()
        edited.CopyFrom(self.model)
        for t in edited.graph.initializer:
            if t.name in swap:
                t.CopyFrom(numpy_helper.from_array(swap[t.name], t.name))
        path = self._work / "with_original_weights.onnx"
        onnx.save(edited, str(path))
        return path

    def original_model(self) -> Path:
        """The prepared model with every weight ``original_onnx`` has (the weight-only
        probes' base when the session's weights were rounded)."""
        return self._with_original_weights(self.layers)

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
                       overrides: dict[str, Any], float_layers: set[str] = frozenset(),
                       source: Path | None = None) -> None:
        import onnx
        from onnxruntime.quantization import quantize_static

        from exporters.fileio import atomic_path
        from exporters.onnx import strip_metadata
        cfg = self._config(profile, exclude, overrides)
        method = _ort_method(ranges.method)
        tmp = self._work / "quantized.onnx"
        try:
            with quiet_ort(), self._memo.installed():
                quantize_static(str(source or self.model_path), str(tmp), None, quant_format=cfg.quant_format,
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
        _float_layers_read_float(proto, set(float_layers))
        # the float model's node scopes survive only on the nodes ORT did not rewrite, and
        # ORT adds its own model metadata: neither is needed (the layer map is in the
        # manifest) and both made equal-weight QDQ models differ in bytes and size
        strip_metadata(proto)
        proto.producer_name = f"mdeploy ptq ({profile.name}, onnxruntime.quantization)"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_path) as staged:
            onnx.save(proto, str(staged))

    def _artifact(self, profile: QuantProfile, path: Path, ranges: Ranges, keep_float: Sequence[Layer],
                  w16: Sequence[Layer], root: str | Path | None, w16_weights: Sequence[Layer] = ()) -> Artifact:
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
                                "w8a16": [l.module or l.name for l in w16] if profile.activation_bits == 8 else [],
                                "w16a16": [l.module or l.name for l in w16_weights if l not in keep_float]},
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


def _node(model: Any, name: str) -> Any:
    return next(n for n in model.graph.node if n.name == name)


def weight_input(model: Any, layer: Layer) -> tuple[str | None, int]:
    """The weight initializer of a Conv/Gemm layer and its output-channel axis (the axis
    per-channel scales run along); ``(None, 0)`` for any other layer."""
    node = _node(model, layer.name)
    inits = {t.name for t in model.graph.initializer}
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None, 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return node.input[1], 0 if trans_b else 1
    return node.input[1], 0


def _original_weights(model: Any, original_onnx: str | Path) -> dict[str, np.ndarray]:
    """Initializers of ``original_onnx`` that the prepared model has under the same name and
    shape but with other values (the rounded weights and corrected biases)."""
    import onnx
    from onnx import numpy_helper
    mine = {t.name: t for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for t in onnx.load(str(original_onnx)).graph.initializer:
        own = mine.get(t.name)
        if own is None or tuple(own.dims) != tuple(t.dims) or own.data_type != t.data_type:
            continue
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f" and not np.array_equal(a, numpy_helper.to_array(own)):
            out[t.name] = a
    return out


def _float_layers_read_float(proto: Any, float_nodes: set[str]) -> None:
    """Let each float Conv/Gemm read its input unrounded: ``Clip(x, lo, hi)`` of the float
    tensor its input Q/DQ pair was made from, with the range that Q/DQ represents.

    ORT's quantizer leaves a layer it was told to skip between a ``Q -> DQ`` on its input
    and one on its output, and onnxruntime >= 1.21 then re-quantizes that layer's float
    weights per-tensor at load (``ORT_REQUANTIZING_OPTIMIZERS``), so the float fallback
    would silently be a worse int8 layer. The Clip keeps what the Q/DQ did besides
    rounding: where ORT folded a ReLU/ReLU6 into the Q/DQ, the tensor before it is the
    unclamped Conv output and the Q's range is that activation.
    """
    from onnx import helper, numpy_helper
    g = proto.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    clipped: dict[str, str] = {}
    added = []
    for node in g.node:
        if node.name not in float_nodes or node.op_type not in _REQUANTIZED_OPS or not node.input:
            continue
        dq = producers.get(node.input[0])
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[1] not in inits \
                or q.input[2] not in inits:
            continue
        if q.output[0] not in clipped:
            scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float64)
            zp = numpy_helper.to_array(inits[q.input[2]])
            if scale.size != 1 or zp.size != 1:
                continue
            info = np.iinfo(zp.dtype)
            z = float(zp.reshape(()))
            lo, hi = (info.min - z) * float(scale.reshape(())), (info.max - z) * float(scale.reshape(()))
            base = f"{q.input[0]}_float_range"
            g.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), base + "_min"),
                                  numpy_helper.from_array(np.array(hi, np.float32), base + "_max")])
            added.append(helper.make_node("Clip", [q.input[0], base + "_min", base + "_max"], [base],
                                          name=base))
            clipped[q.output[0]] = base
        node.input[0] = clipped[q.output[0]]
    if added:
        # keep the node list topologically sorted: each Clip right after its tensor's producer
        order = list(g.node)
        for clip in added:
            src = producers.get(clip.input[0])
            at = order.index(src) + 1 if src is not None else 0
            order.insert(at, clip)
        del g.node[:]
        g.node.extend(order)


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
    """KL-divergence range of one tensor from ORT's histogram ``(hist, edges, min, max, _)``,
    kept only where it does not cost more squared error than the observed range.

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

    Why KL alone clips too much: neither of its two terms measures an error the next
    layer sees. Clipped values are folded into the edge bin of ``p``, so they cost by
    their mass, not by how far they move: a 6 clipped to 2.3 costs no more than a 2.4.
    Rounding costs by how much spreading each level's mass evenly over its histogram bins
    changes the histogram's *shape*: on spiky histograms (MNIST's constant backgrounds)
    that is large whatever the step, while the real rounding error, ``step**2 / 12``, is
    tiny. So KL trades a shape cost unrelated to the error for a clipping cost blind to
    distance, and the error it lets in goes unseen. The next layer sums
    ``w * x``: what it sees is the displacement of each value, squared in the error. On
    the default MNIST MobileNetV2 (24 epochs, 64 calibration images), the stem's second
    ReLU6 scores KL 0.30 at ``[0, 2.35]`` (5.6% of its values clipped, estimated MSE
    0.037) against 0.58 at ``[0, 6]`` (MSE 0.000024); KL alone cut a dozen tensors to
    0.37-0.74 of their range (ReLU6 outputs 6 -> 2.4, pre-activations +-8.7 -> +-3.2),
    11 of them at 10-1,400x MinMax's estimated MSE, and the logit SNR fell to 11 dB (33
    dB for MinMax); on bench.ptq's 4-epoch model, to 2 dB and -45 points. A thin distant
    tail is cut the same way: unit-normal values with 1 in 5,000 at +-8 get a KL window
    of +-4.5 at 10x MinMax's MSE
    (``test_entropy_falls_back_to_minmax_where_kl_cuts_distant_outliers``). So the
    KL window is kept only if its histogram-estimated quantization MSE (``_window_mse``:
    rounding error inside plus squared displacement of the clipped values, on ORT's real
    grid) is no larger than the observed range's; otherwise the tensor falls back to its
    MinMax range. (``mse`` goes further and minimises that error directly.)
    """
    hist, edges, lo_obs, hi_obs = histogram[0], histogram[1], histogram[2], histogram[3]
    dtype = edges.dtype
    lo_obs, hi_obs = np.asarray(lo_obs, dtype), np.asarray(hi_obs, dtype)
    if is_output or hist.sum() == 0:
        return _tensor_range(lo_obs, hi_obs, hist, edges)
    lo, hi = _kl_window(histogram)
    kl_mse, obs_mse = _window_mse(histogram, np.array([lo, lo_obs]), np.array([hi, hi_obs]))
    if kl_mse > obs_mse:
        lo, hi = lo_obs, hi_obs
    return _tensor_range(lo, hi, hist, edges)


def _kl_window(histogram: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The KL-divergence window of ``_entropy_range``, clipped to the observed range."""
    hist, edges, lo_obs, hi_obs = histogram[0], histogram[1], histogram[2], histogram[3]
    dtype = edges.dtype
    lo_obs, hi_obs = np.asarray(lo_obs, dtype), np.asarray(hi_obs, dtype)
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
    return lo, hi


def _mse_range(histogram: tuple, is_output: bool) -> dict[str, np.ndarray]:
    """The uint8 grid of least histogram-estimated quantization error (``_grid_error``)
    for one tensor, from ORT's histogram ``(hist, edges, min, max, _)``.

    What PyTorch's ``HistogramObserver`` (``_non_linear_param_search``) and AIMET's SQNR
    analyzer do, as an exhaustive search over ORT's own grids: ``MSE_SCALES`` step sizes
    from the observed range's down to ``MSE_MIN_FRACTION`` of it, and for each every
    integer zero point whose window ``[-zp * s, (255 - zp) * s]`` stays within a step of
    the observed range (a post-ReLU tensor keeps zero point 0). Each grid is scored by the
    rounding error it leaves inside plus ``MSE_CLIP_WEIGHT`` times the squared
    displacement of what it clips, and the cheapest wins; the window is returned exactly,
    so ORT rebuilds the same grid from it. A window narrower than the observed range is
    chosen only when the rounding error it saves outweighs the (weighted) clipping error
    it adds, so a long tail of large activations, the ones KL cuts, keeps its range
    unless it holds too little mass to matter. Clipping is weighted 3x, as AIMET does by
    default (``gamma``): a clipped value always moves towards zero, an error the next
    layer sums coherently where rounding errors average out, and the calibration set
    under-samples the tail that new inputs will reach. A graph output keeps its observed
    range (see ``_entropy_range``).
    """
    hist, edges, lo_obs, hi_obs = histogram[0], histogram[1], histogram[2], histogram[3]
    dtype = edges.dtype
    lo_obs, hi_obs = np.asarray(lo_obs, dtype), np.asarray(hi_obs, dtype)
    top = ENTROPY_LEVELS - 1
    lo0, hi0 = min(float(lo_obs), 0.0), max(float(hi_obs), 0.0)
    if is_output or hist.sum() == 0 or hi0 - lo0 <= 0:
        return _tensor_range(lo_obs, hi_obs, hist, edges)
    step = (hi0 - lo0) / top * np.geomspace(1.0, MSE_MIN_FRACTION, MSE_SCALES)          # (S,)
    if lo0 == 0:
        zp = np.zeros((step.size, 1))
    elif hi0 == 0:
        zp = np.full((step.size, 1), float(top))
    else:
        zp = np.broadcast_to(np.arange(top + 1, dtype=np.float64), (step.size, top + 1))
    lo, hi = -zp * step[:, None], (top - zp) * step[:, None]
    valid = (lo >= lo0 - step[:, None]) & (hi <= hi0 + step[:, None])
    err = np.where(valid, _grid_error(histogram, step, zp, MSE_CLIP_WEIGHT), np.inf)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return _tensor_range(lo[i, j] + 0.0, hi[i, j], hist, edges)      # + 0.0: no -0.0


def _window_mse(histogram: tuple, lo: Any, hi: Any, levels: int = ENTROPY_LEVELS) -> np.ndarray:
    """Histogram-estimated mean squared quantization error of the tensor under the grid
    ONNX Runtime builds from each range ``[lo, hi]`` (arrays of one shape): widened to
    contain zero, ``scale = (hi - lo) / (levels - 1)``, zero point rounded to an integer,
    values beyond the grid's ends clipped to them."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    shape = np.broadcast(lo, hi).shape
    lo, hi = np.broadcast_to(lo, shape).ravel(), np.broadcast_to(hi, shape).ravel()
    step = np.maximum(hi - lo, 1e-12) / (levels - 1)
    zp = np.clip(np.round(-lo / step), 0, levels - 1)
    return _grid_error(histogram, step, zp[:, None], 1.0, levels)[:, 0].reshape(shape)


def _grid_error(histogram: tuple, step: np.ndarray, zp: np.ndarray, clip_weight: float,
                levels: int = ENTROPY_LEVELS) -> np.ndarray:
    """Expected squared error per value of quantizing the histogrammed tensor to the grids
    ``(k - zp) * step``, ``k = 0..levels-1``: ``step`` of shape (S,), ``zp`` (S, Z) -> (S, Z).

    Values are taken uniform within each histogram bin (bins clamped to the observed
    range, so the end bins hold nothing beyond the extremes) and the error is integrated
    exactly: inside the grid, the squared distance to the nearest level (the periodic
    sawtooth, whose integral ``_sawtooth`` has in closed form), so a narrow spike of equal
    values costs what it costs on that grid, not an average ``step**2 / 12``; the bin of
    a one-sided tensor at zero is left out (the exact zeros after a ReLU sit on a level
    and are never clipped, whatever the grid); beyond the ends, the squared
    displacement to the end, times ``clip_weight``. Full bins come from prefix sums, the
    two bins a window's ends cut are integrated piecewise.
    """
    hist, edges, lo_obs, hi_obs = histogram[0], histogram[1], float(histogram[2]), float(histogram[3])
    n = hist.astype(np.float64)
    total = n.sum()
    if lo_obs >= 0 or hi_obs <= 0:      # the exact zeros after a ReLU: on a level, never clipped
        n = n.copy()
        n[n.size // 2 if lo_obs >= 0 else n.size // 2 - 1] = 0.0
    e = np.clip(edges.astype(np.float64), lo_obs, hi_obs)
    a, b = e[:-1], e[1:]
    w = b - a
    c = 0.5 * (a + b)
    step = np.asarray(step, np.float64)
    st = step[:, None]
    # rounding error of every bin on every grid, assuming the bin lies inside it
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = np.where(w > 0, (_sawtooth(b / st) - _sawtooth(a / st)) / (w / st),
                          _sawtooth_sq(a / st)) * st * st * n                               # (S, B)
    pin = np.concatenate([np.zeros((step.size, 1)), np.cumsum(inside, axis=1)], axis=1)
    def cum(x: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(x)])
    n0, n1, n2 = cum(n), cum(n * c), cum(n * (c * c + w * w / 12.0))
    lo, hi = -zp * st, (levels - 1 - zp) * st                                              # (S, Z)
    i_in = np.searchsorted(a, lo, side="left")          # first bin starting at or above lo
    j_in = np.searchsorted(b, hi, side="right")         # bins before j_in end at or below hi
    j_in = np.maximum(j_in, i_in)
    rows = np.arange(step.size)[:, None]
    err = pin[rows, j_in] - pin[rows, i_in]
    # bins wholly beyond an end
    k_hi = np.searchsorted(a, hi, side="left")          # bins from k_hi on start at or above hi
    k_lo = np.searchsorted(b, lo, side="right")         # bins before k_lo end at or below lo
    above = (n2[-1] - n2[k_hi]) - 2 * hi * (n1[-1] - n1[k_hi]) + hi * hi * (n0[-1] - n0[k_hi])
    below = n2[k_lo] - 2 * lo * n1[k_lo] + lo * lo * n0[k_lo]
    clipped = np.maximum(above, 0.0) + np.maximum(below, 0.0)
    # the bin an end cuts: rounding error on its inner part, clipping error on its outer part
    nb = n.size
    for cut, end, sign in ((j_in, hi, 1.0), (np.maximum(i_in - 1, 0), lo, -1.0)):
        k = np.minimum(cut, nb - 1)
        ak, bk, nk = a[k], b[k], n[k]
        cuts = (ak < end) & (end < bk) & (nk > 0)
        wk = np.where(cuts, bk - ak, 1.0)
        if sign > 0:
            inner = _sawtooth(end / st) - _sawtooth(ak / st)
            outer = (bk - end) ** 3 / 3.0
        else:
            inner = _sawtooth(bk / st) - _sawtooth(end / st)
            outer = (end - ak) ** 3 / 3.0
        err = err + np.where(cuts, nk * inner * st ** 3 / wk, 0.0)
        clipped = clipped + np.where(cuts, nk * outer / wk, 0.0)
    return (err + clip_weight * clipped) / max(total, 1.0)


def _sawtooth(v: np.ndarray) -> np.ndarray:
    """Integral from 0 to ``v`` of ``(y - round(y))**2``: 1/12 per whole period plus the
    cube of the remainder over 3."""
    k = np.floor(v + 0.5)
    r = v - k
    return k / 12.0 + r ** 3 / 3.0


def _sawtooth_sq(v: np.ndarray) -> np.ndarray:
    return (v - np.floor(v + 0.5)) ** 2


def _tensor_range(lo: Any, hi: Any, hist: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    dtype = edges.dtype
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


def _ort_method(method: str) -> Any:
    from onnxruntime.quantization.calibrate import CalibrationMethod
    return getattr(CalibrationMethod, _ORT_METHODS[method])


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


def weight_grid_mismatch(float_onnx: str | Path, qdq_onnx: str | Path) -> dict[str, int]:
    """Per quantized weight, how many integers the quantizer wrote differ from
    ``round(w / (max|w| / qmax))`` of the float model's own weights, in the rows where the
    quantizer kept that scale (see ``weight_rows_rescaled`` for the others).

    For a float model whose weights were optimised onto their int8 grid
    (``quantize.weight_rounding``), all zeros proves the QDQ model carries the optimised
    integers rather than a fresh round-to-nearest of something else.
    """
    return {name: mismatch for name, (mismatch, _) in _weight_grid(float_onnx, qdq_onnx).items()}


def weight_rows_rescaled(float_onnx: str | Path, qdq_onnx: str | Path) -> dict[str, int]:
    """Per quantized weight, the rows (output channels) the quantizer gave a scale other
    than ``max|w| / qmax``.

    ONNX Runtime's QDQ quantizer raises a row's weight scale where the int32 bias would
    otherwise overflow (``bias / (s_in * s_w) > 2**31``, the QNN rule) and clamps scales
    below its floor. Both only happen to rows of near-zero weights whose output is their
    bias (on EfficientNet-Lite1: rows at 1e-4 of their layer's largest), so those integers
    legitimately differ from ours and are counted here, not as re-rounded weights.
    """
    return {name: rows for name, (_, rows) in _weight_grid(float_onnx, qdq_onnx).items()}


def _weight_grid(float_onnx: str | Path, qdq_onnx: str | Path) -> dict[str, tuple[int, int]]:
    """``{weight: (integers differing in same-scale rows, rows with another scale)}``."""
    import onnx
    from onnx import numpy_helper
    fm, qm = onnx.load(str(float_onnx)), onnx.load(str(qdq_onnx))
    floats = {t.name: numpy_helper.to_array(t) for t in fm.graph.initializer}
    inits = {t.name: t for t in qm.graph.initializer}
    out: dict[str, tuple[int, int]] = {}
    for n in qm.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[n.input[0]])
        if q.dtype != np.int8:          # 16-bit weights (mixed precision) come from the unrounded model
            continue
        name = n.input[0].removesuffix("_quantized")
        w = floats.get(name)
        if w is None or w.shape != q.shape or w.ndim < 2:
            continue
        qmax = np.iinfo(q.dtype).max
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if axis != 0 and w.ndim == 2:     # Gemm/MatMul weights: output channel last
            w, q = w.T, q.T
        rows_w = w.reshape(w.shape[0], -1).astype(np.float64)
        rows_q = q.reshape(q.shape[0], -1).astype(np.int64)
        scale = np.abs(rows_w).max(1) / qmax
        mine = np.clip(np.round(rows_w / np.where(scale > 0, scale, 1)[:, None]), -qmax, qmax).astype(np.int64)
        theirs = _dq_scale(n, inits, rows_w.shape[0])
        # a row the quantizer *raised* (never lowered) is rescaled; any other row is compared
        same = (theirs <= scale * (1 + 1e-4)) | (scale == 0) if theirs is not None else np.ones(len(scale), bool)
        out[name] = (int((mine[same] != rows_q[same]).sum()), int((~same).sum()))
    return out


def _dq_scale(node: Any, inits: dict[str, Any], rows: int) -> np.ndarray | None:
    """The per-row scales of a weight's DequantizeLinear (None when not one per row)."""
    from onnx import numpy_helper
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64).reshape(-1)
    if scale.size == 1:
        return np.full(rows, float(scale[0]))
    return scale if scale.size == rows else None


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


__all__ = ["CALIBRATION_METHODS", "GENERIC_INT8", "GENERIC_INT8_PER_TENSOR", "GENERIC_INT8_S8", "Layer",
           "PROFILES", "PtqSession", "QNN_W8A16", "QNN_W8A8", "QuantProfile", "Ranges", "TARGETS",
           "check_method", "graph_layers", "read_encodings", "resolve_layers", "target_profiles",
           "weight_grid_mismatch", "weight_input", "weight_rows_rescaled"]
