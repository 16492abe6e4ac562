"""Qualcomm's encodings file for a QDQ model, and the QNN HTP rules checked on the written graph.

The encodings file
------------------
``qnn-onnx-converter --quantization_overrides FILE`` (and ``qairt-converter``) read the JSON
that AIMET exports next to a model (``.encodings``). We write it in **AIMET encoding format
version 0.6.1** (the "legacy" dictionary layout, spec: AIMET docs, *Encoding Format
Specification*, section "Version 0.6.1"; the version ``aimet_common.quantsim.encoding_version``
writes)::

    {"version": "0.6.1",
     "activation_encodings": {tensor: [Encoding]},
     "param_encodings": {initializer: [Encoding, one per output channel]},
     "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": "True",
                        "param_bitwidth": 8, "per_channel_quantization": "True", ...}}

    Encoding = {"bitwidth": 8, "dtype": "int", "is_symmetric": "False",
                "max": float, "min": float, "offset": int, "scale": float}

Conventions, as AIMET writes them (``AffineEncoding._to_legacy_format``,
``aimet_common.quantsim.recompute_grid_params``) and QNN reads them (``Qnn_ScaleOffset_t``:
``float = (q + offset) * scale``):

* the grid is the *unsigned* one, ``q`` in ``[0, 2**bitwidth - 1]``, so ``offset`` is minus
  the zero point on that grid: a uint8/uint16 activation with ONNX zero point ``z`` has
  ``offset = -z``; a signed tensor's ONNX zero point is first moved onto the unsigned grid
  (``+ 2**(bitwidth-1)``): our symmetric int8 weights (zero point 0) have ``offset = -128``;
* ``min = offset * scale`` and ``max = min + (2**bitwidth - 1) * scale``: for a symmetric
  weight ``[-128 * scale, 127 * scale]`` (AIMET's non-strict symmetric grid; ORT only uses
  the levels ``-127..127`` of it);
* ``is_symmetric`` is the string ``"True"``/``"False"``; activations are asymmetric.

Names are those of the float model, as the QDQ graph keeps them: an activation is the float
tensor a ``QuantizeLinear`` reads (ORT renames a quantized graph output's producer to
``<name>_QuantizeLinear_Input``; the float name is the one its ``DequantizeLinear`` gives
back), a parameter is the float initializer ORT quantized into ``<name>_quantized``. Int32
biases are left out, as in AIMET's default export (its config leaves biases unquantized):
the converter quantizes them itself (``--bias_bitwidth 32`` asks for the int32 biases at
``s_in * s_w[c]`` that ORT's graph has). ``quantizer_args.quant_scheme`` is written for the
calibration methods AIMET names (MinMax ``post_training_tf``, percentile), not for entropy.
The QNN SDK is not available here: the file is checked against the QDQ graph it came
from (tests/test_qnn_encodings.py), never fed to the converter.

The QNN rules
-------------
``check_qnn_rules`` reads the written graph back and returns what breaks the HTP profile:
weights symmetric int8 per output channel (zero point 0, levels within ``[-127, 127]``,
ORT's symmetric range), activations of the profile's unsigned type, one scale per
tensor, and int32 biases at ``s_in * s_w[c]`` that fit: a channel whose bias saturates
int32 (a tiny weight scale under a large bias, HTP's known overflow) is named, and so is one
where ORT avoided the overflow by raising that channel's weight scale (its weights then use
a few of the 127 levels). ``int32_bias_checks`` gives every layer's largest ``|bias_q|``
and the margin to ``2**31 - 1``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

ENCODING_VERSION = "0.6.1"
SUFFIX = ".encodings.json"
INT32_LIMIT = 2**31 - 1
WEIGHT_LEVELS = 127                   # ORT's symmetric int8 grid: -127..127
_WEIGHT_LEVELS = {"int8": WEIGHT_LEVELS, "int16": 32767}     # and int16 (mixed precision's 16-bit weights)
NEGLIGIBLE_ROW = 1e-3                 # an int16 row this far below its layer's largest weight carries nothing
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
_BITS = {"uint8": (8, False), "int8": (8, True), "uint16": (16, False), "int16": (16, True),
         "uint4": (4, False), "int4": (4, True), "int32": (32, True)}
_QUANT_SCHEMES = {"minmax": "post_training_tf", "percentile": "post_training_percentile"}
_Q_INPUT = "_QuantizeLinear_Input"
_QUANTIZED = "_quantized"
_DQ_OUTPUT = "_DequantizeLinear_Output"


# ----------------------------------------------------------------- reading the graph


class _Graph:
    """The QDQ graph's nodes, producers, consumers and constant values."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper
        g = model.graph
        self.nodes = list(g.node)
        self._to_array = numpy_helper.to_array
        self.inits = {t.name: t for t in g.initializer}
        self.consts = {n.output[0]: next(a.t for a in n.attribute if a.name == "value")
                       for n in g.node if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self._cache: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        if name not in self._cache:
            t = self.inits.get(name) or self.consts.get(name)
            self._cache[name] = None if t is None else self._to_array(t)
        return self._cache[name]

    def is_constant(self, name: str) -> bool:
        return name in self.inits or name in self.consts

    def qparams(self, node: Any) -> tuple[np.ndarray, np.ndarray, str]:
        """Scale, zero point (zeros if absent) and the quantized dtype of a Q or DQ node."""
        scale = self.value(node.input[1])
        if scale is None:
            raise ValueError(f"{node.name}: scale {node.input[1]!r} is not a constant")
        zp = self.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None:
            dtype = str(zp.dtype)
        elif node.op_type == "DequantizeLinear" and self.value(node.input[0]) is not None:
            dtype = str(self.value(node.input[0]).dtype)
        else:
            dtype = "uint8"                                   # ONNX's default without a zero point
        zp = np.zeros(scale.shape, np.int64) if zp is None else zp.astype(np.int64)
        return scale.astype(np.float64), zp, dtype

    def weight_dq(self, name: str) -> Any | None:
        """The DequantizeLinear of a quantized initializer that produces ``name``."""
        n = self.producer.get(name)
        if n is not None and n.op_type == "DequantizeLinear" and self.is_constant(n.input[0]):
            return n
        return None


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == 2 else a.f if a.type == 1 else default
    return default


def _float_param_name(dq: Any) -> str:
    """The float initializer ORT quantized into ``dq``'s input."""
    src = dq.input[0]
    if src.endswith(_QUANTIZED):
        return src[: -len(_QUANTIZED)]
    out = dq.output[0]
    return out[: -len(_DQ_OUTPUT)] if out.endswith(_DQ_OUTPUT) else src


def _float_tensor_name(g: _Graph, q: Any) -> str:
    """The float model's name of the tensor a QuantizeLinear reads."""
    name = q.input[0]
    if name.endswith(_Q_INPUT):
        original = name[: -len(_Q_INPUT)]
        dqs = [c for c in g.consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]
        if any(d.output[0] == original for d in dqs):
            return original
    return name


def _encoding(scale: float, zero_point: int, dtype: str, symmetric: bool) -> dict[str, Any]:
    bits, signed = _BITS[dtype]
    qmin = -(1 << (bits - 1)) if signed else 0
    offset = qmin - int(zero_point)                       # minus the zero point on the unsigned grid
    lo = offset * float(scale)
    return {"bitwidth": bits, "dtype": "int", "is_symmetric": "True" if symmetric else "False",
            "max": lo + ((1 << bits) - 1) * float(scale), "min": lo, "offset": offset,
            "scale": float(scale)}


def _activation_qs(g: _Graph) -> list[tuple[str, Any]]:
    """(float tensor name, QuantizeLinear) for every quantized activation, first Q per tensor.

    A Q that reads a DequantizeLinear output is one of ORT's type converts (mixed
    precision): its tensor has no name in the float model and is left out.
    """
    seen: dict[str, Any] = {}
    for n in g.nodes:
        if n.op_type != "QuantizeLinear" or g.is_constant(n.input[0]):
            continue
        src = g.producer.get(n.input[0])
        if src is not None and src.op_type == "DequantizeLinear":
            continue
        seen.setdefault(_float_tensor_name(g, n), n)
    return list(seen.items())


def _weight_dqs(g: _Graph) -> list[tuple[str, Any, list[Any]]]:
    """(float initializer name, DequantizeLinear, consumers) for every quantized non-bias constant."""
    out = []
    for n in g.nodes:
        if n.op_type != "DequantizeLinear" or not g.is_constant(n.input[0]):
            continue
        q = g.value(n.input[0])
        users = g.consumers.get(n.output[0], [])
        if q is None or str(q.dtype) == "int32" or any(
                u.op_type in BIAS_OPS and len(u.input) > 2 and u.input[2] == n.output[0] for u in users):
            continue                                          # an int32 bias
        out.append((_float_param_name(n), n, users))
    return out


# ----------------------------------------------------------------- the encodings file


def qnn_encodings(model: Any, *, method: str | None = None) -> dict[str, Any]:
    """The AIMET 0.6.1 encodings of a QDQ model (an ``onnx.ModelProto`` or a path)."""
    model = _load(model)
    g = _Graph(model)
    activations: dict[str, list[dict[str, Any]]] = {}
    for name, q in _activation_qs(g):
        scale, zp, dtype = g.qparams(q)
        activations[name] = [_encoding(s, z, dtype, False)
                             for s, z in zip(scale.reshape(-1), np.broadcast_to(zp, scale.shape).reshape(-1))]
    params: dict[str, list[dict[str, Any]]] = {}
    per_channel = []
    for name, dq, _ in _weight_dqs(g):
        scale, zp, dtype = g.qparams(dq)
        if dtype not in _BITS:
            continue
        zp = np.broadcast_to(zp, scale.shape).reshape(-1)
        symmetric = _BITS[dtype][1] and bool(np.all(zp == 0))
        params[name] = [_encoding(s, z, dtype, symmetric) for s, z in zip(scale.reshape(-1), zp)]
        per_channel.append(scale.size > 1)
    act_bits = sorted({e[0]["bitwidth"] for e in activations.values()})
    param_bits = sorted({e[0]["bitwidth"] for e in params.values()})
    args: dict[str, Any] = {
        "activation_bitwidth": act_bits[0] if len(act_bits) == 1 else act_bits,
        "dtype": "int",
        "is_symmetric": "True" if params and all(e[0]["is_symmetric"] == "True" for e in params.values())
        else "False",
        "param_bitwidth": param_bits[0] if len(param_bits) == 1 else param_bits,
        "per_channel_quantization": "True" if per_channel and any(per_channel) else "False",
    }
    if method in _QUANT_SCHEMES:
        args["quant_scheme"] = _QUANT_SCHEMES[method]
    return {"version": ENCODING_VERSION, "activation_encodings": activations, "param_encodings": params,
            "quantizer_args": args}


def encodings_path(model_path: str | Path) -> Path:
    """``<stem>.encodings.json`` next to the model."""
    p = Path(model_path)
    return p.with_name(p.stem + SUFFIX)


def write_encodings(model_path: str | Path, out_path: str | Path | None = None, *,
                    method: str | None = None, model: Any = None) -> Path:
    """Write the encodings of the QDQ model at ``model_path`` (atomically); returns the path."""
    from exporters.fileio import atomic_write_text
    out = Path(out_path) if out_path is not None else encodings_path(model_path)
    doc = qnn_encodings(model if model is not None else model_path, method=method)
    atomic_write_text(out, dumps(doc))
    return out


def dumps(doc: dict[str, Any]) -> str:
    """The encodings as JSON with one line per tensor (a per-channel list in ``indent=2`` JSON
    runs to seven lines a channel: 2.5x the size of the model it describes)."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, dict) and key.endswith("_encodings") and value:
            body = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            parts.append(f"  {json.dumps(key)}: {{\n{body}\n  }}")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


# ----------------------------------------------------------------- the QNN rules


@dataclass(frozen=True)
class Violation:
    """One broken rule. ``rule``: weight-dtype, weight-zero-point, weight-levels,
    weight-per-channel, activation-dtype, activation-per-tensor, bias-dtype, bias-scale,
    int32-bias-overflow, int32-bias-weight-scale-raised."""

    rule: str
    where: str          # layer (node name, op, tensor) or activation tensor
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail} [{self.rule}]"


@dataclass
class BiasCheck:
    """One layer's int32 bias, read back: ``bias_q = round(b / (s_in * s_w[c]))``."""

    layer: str                    # node name
    op: str
    bias: str                     # the float bias initializer
    channels: int
    max_abs_q: int                # largest |bias_q| over the channels
    channel: int                  # ... and its channel
    saturated: list[int] = field(default_factory=list)         # |bias_q| at the int32 limit: clipped
    weight_scale_raised: list[int] = field(default_factory=list)   # ORT raised s_w[c] to fit the bias
    weight_levels: dict[int, int] = field(default_factory=dict)    # those channels' max |w_q|
    scale_mismatch: float = 0.0   # max relative gap between the bias scale and s_in * s_w * beta
    weight_bits: int = 8
    # the raised channels that lost precision that matters: every one for int8 weights; for int16,
    # those left with fewer than int8's 127 levels whose weights are not negligible next to the
    # layer's largest (a row at under NEGLIGIBLE_ROW of it outputs its bias whatever its weights)
    weight_rows_weak: list[int] = field(default_factory=list)

    @property
    def headroom(self) -> float:
        """``(2**31 - 1) / max |bias_q|``: how much larger the bias could grow before overflowing."""
        return math.inf if self.max_abs_q == 0 else INT32_LIMIT / self.max_abs_q

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["headroom"] = None if math.isinf(self.headroom) else self.headroom
        d["weight_levels"] = {str(k): v for k, v in self.weight_levels.items()}
        return d


def int32_bias_checks(model: Any) -> list[BiasCheck]:
    """Every Conv/ConvTranspose/Gemm whose bias is an int32 initializer behind a DequantizeLinear."""
    model = _load(model)
    g = _Graph(model)
    out = []
    for node in g.nodes:
        if node.op_type not in BIAS_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        bdq = g.weight_dq(node.input[2])
        if bdq is None:
            continue
        bq = g.value(bdq.input[0])
        if bq is None or str(bq.dtype) != "int32":
            continue
        b_scale, _, _ = g.qparams(bdq)
        q = bq.astype(np.int64).reshape(-1)
        absq = np.abs(q)
        ch = int(absq.argmax()) if absq.size else 0
        check = BiasCheck(node.name, node.op_type, _float_param_name(bdq), int(q.size),
                          int(absq.max()) if absq.size else 0, ch)
        check.saturated = [int(c) for c in np.flatnonzero((q >= INT32_LIMIT) | (q <= -INT32_LIMIT))]
        wdq = g.weight_dq(node.input[1])
        idq = g.producer.get(node.input[0])
        if wdq is not None and idq is not None and idq.op_type == "DequantizeLinear":
            s_in = g.qparams(idq)[0].reshape(-1)
            s_w = g.qparams(wdq)[0].reshape(-1)
            beta = float(_attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
            expected = (s_in.astype(np.float32) * s_w.astype(np.float32) * np.float32(beta)).astype(np.float64)
            expected = np.broadcast_to(expected, b_scale.reshape(-1).shape) if expected.size == 1 else expected
            if expected.shape == b_scale.reshape(-1).shape:
                gap = np.abs(b_scale.reshape(-1) - expected) / np.maximum(np.abs(expected), 1e-45)
                check.scale_mismatch = float(gap.max())
            # ORT's default (unless QDQDisableWeightAdjustForInt32Bias) raises s_w[c] just enough
            # for b[c] / (s_in * s_w[c]) to fit: |bias_q[c]| lands at (2^32 - 2) / 2 / 1.0001, within
            # 0.01% of the limit, and channel c's weights use fewer than the 127 levels symmetric
            # quantization gives every other channel (often none). A weight scale raised by
            # QNN's MinimumRealRange (1e-4) alone leaves the bias far from the limit.
            w = g.value(wdq.input[0])
            w_scale = g.qparams(wdq)[0].reshape(-1)
            if w is not None and w_scale.size == q.size and q.size > 1:
                axis = int(_attr(wdq, "axis", 1))
                wmax = np.abs(np.moveaxis(w.astype(np.int64), axis, 0).reshape(q.size, -1)).max(axis=1)
                near = absq >= INT32_LIMIT / 1.001
                full = _WEIGHT_LEVELS.get(str(w.dtype), WEIGHT_LEVELS)
                raised = np.flatnonzero(near & (wmax < full) & (absq < INT32_LIMIT))
                check.weight_scale_raised = [int(c) for c in raised]
                check.weight_levels = {int(c): int(wmax[c]) for c in raised}
                check.weight_bits = 16 if full > WEIGHT_LEVELS else 8
                if check.weight_bits == 8:
                    check.weight_rows_weak = list(check.weight_scale_raised)
                else:
                    # a row's largest weight: levels * scale, under half a step when it rounds to 0
                    magnitude = np.maximum(wmax, 0.5) * w_scale
                    largest = float((wmax * w_scale).max())
                    check.weight_rows_weak = [int(c) for c in raised
                                              if wmax[c] < WEIGHT_LEVELS and magnitude[c] >= NEGLIGIBLE_ROW * largest]
        out.append(check)
    return out


def bias_margin(checks: Iterable[BiasCheck]) -> dict[str, Any]:
    """The layer with the largest ``|bias_q|``, and its margin to the int32 limit."""
    checks = list(checks)
    if not checks:
        return {"layers": 0, "max_abs_q": 0, "layer": None, "headroom": None, "limit": INT32_LIMIT}
    worst = max(checks, key=lambda c: c.max_abs_q)
    return {"layers": len(checks), "max_abs_q": worst.max_abs_q, "layer": worst.layer, "bias": worst.bias,
            "channel": worst.channel, "headroom": None if math.isinf(worst.headroom) else worst.headroom,
            "headroom_bits": None if math.isinf(worst.headroom) else math.log2(worst.headroom),
            "limit": INT32_LIMIT}


def check_qnn_rules(model: Any, activations: str | Iterable[str] = "uint8") -> list[Violation]:
    """What in a QDQ graph breaks the QNN HTP profile; empty when it follows it.

    ``activations``: the allowed activation dtype(s), ``uint8`` for w8a8, ``uint16`` for
    w8a16 (both for a w8a8 model with 16-bit layers). Layers left in float are not
    violations (the QNN EP runs them on the CPU; ``read_encodings`` lists them).
    """
    model = _load(model)
    g = _Graph(model)
    allowed = {activations} if isinstance(activations, str) else set(activations)
    found: list[Violation] = []
    # weights of the ops that own them
    for node in g.nodes:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        dq = g.weight_dq(node.input[1])
        if dq is None:
            continue                                          # float layer or activation x activation
        wname = _float_param_name(dq)
        where = f"{node.name} ({node.op_type}) weight {wname}"
        w = g.value(dq.input[0])
        scale, zp, dtype = g.qparams(dq)
        if dtype not in ("int8", "int16"):
            found.append(Violation("weight-dtype", where, f"{dtype}, QNN HTP wants symmetric int8 (or int16)"))
            continue
        if dtype == "int16":
            # HTP runs 16-bit weights only as w16a16: the layer's input must be 16-bit too
            idq = g.producer.get(node.input[0])
            in_dtype = g.qparams(idq)[2] if idq is not None and idq.op_type == "DequantizeLinear" else None
            if in_dtype not in ("uint16", "int16"):
                found.append(Violation("weight-16-needs-16-bit-activations", where,
                                       f"int16 weights read a {in_dtype or 'float'} input; HTP wants w16a16"))
        if np.any(zp != 0):
            found.append(Violation("weight-zero-point", where,
                                   f"zero points {sorted({int(z) for z in zp.reshape(-1)})[:4]}, not 0"))
        levels = _WEIGHT_LEVELS[dtype]
        lo, hi = int(w.min()), int(w.max())
        if lo < -levels or hi > levels:
            found.append(Violation("weight-levels", where,
                                   f"levels [{lo}, {hi}] outside the symmetric [-{levels}, {levels}] ORT writes"))
        if node.op_type != "MatMul":                          # QNN's config keeps MatMul weights per-tensor
            if node.op_type == "Conv":
                out_ch = w.shape[0]
            elif node.op_type == "ConvTranspose":
                out_ch = w.shape[1] * int(_attr(node, "group", 1))
            else:
                out_ch = w.shape[0] if _attr(node, "transB", 0) else w.shape[1]
            if scale.size != out_ch:
                found.append(Violation("weight-per-channel", where,
                                       f"{scale.size} scale(s) for {out_ch} output channels"))
    # activations
    for name, q in _activation_qs(g):
        scale, zp, dtype = g.qparams(q)
        if dtype not in allowed:
            found.append(Violation("activation-dtype", f"activation {name}",
                                   f"{dtype}, expected {' or '.join(sorted(allowed))} (asymmetric)"))
        if scale.size != 1:
            found.append(Violation("activation-per-tensor", f"activation {name}", f"{scale.size} scales"))
    # int32 biases
    for node in g.nodes:
        if node.op_type in BIAS_OPS and len(node.input) > 2 and node.input[2]:
            dq = g.weight_dq(node.input[2])
            if dq is not None and str(g.value(dq.input[0]).dtype) != "int32":
                found.append(Violation("bias-dtype", f"{node.name} ({node.op_type}) bias {_float_param_name(dq)}",
                                       f"{g.value(dq.input[0]).dtype}, QNN HTP wants int32"))
    for c in int32_bias_checks(model):
        where = f"{c.layer} ({c.op}) bias {c.bias}"
        if c.saturated:
            found.append(Violation("int32-bias-overflow", where,
                                   f"channel(s) {c.saturated[:8]} clipped at +-(2^31-1): b / (s_in * s_w[c]) "
                                   f"overflows int32 (tiny weight scale under a large bias)"))
        if c.weight_rows_weak:
            levels = ", ".join(f"{k}: {c.weight_levels[k]}" for k in c.weight_rows_weak[:8])
            found.append(Violation("int32-bias-weight-scale-raised", where,
                                   f"the bias would overflow int32 at s_in * s_w; ORT raised the weight scale "
                                   f"of channel(s) {c.weight_rows_weak[:8]}, whose weights now use at most "
                                   f"{{{levels}}} of their 127 (int8) or 32767 (int16) levels"))
        if c.scale_mismatch > 1e-5:
            found.append(Violation("bias-scale", where,
                                   f"bias scale differs from s_in * s_w by {c.scale_mismatch:.2g} (relative)"))
    return found


def qnn_sidecar(model_path: str | Path, activations: str | Iterable[str], *, method: str | None = None,
                root: str | Path | None = None) -> dict[str, Any]:
    """For the quantize stage: write ``<stem>.encodings.json`` next to a QNN QDQ model and
    return what goes in its artifact's ``extra``: ``encodings_file`` (relative to ``root``)
    and ``qnn_rules`` (violations and the int32 bias margin)."""
    model_path = Path(model_path)
    proto = _load(model_path)
    path = write_encodings(model_path, method=method, model=proto)
    rel = path.resolve().relative_to(Path(root).resolve()) if root is not None else Path(path.name)
    violations = check_qnn_rules(proto, activations)
    return {"encodings_file": str(rel),
            "qnn_rules": {"ok": not violations, "violations": [str(v) for v in violations],
                          "int32_bias": bias_margin(int32_bias_checks(proto))}}


def _load(model: Any) -> Any:
    if isinstance(model, (str, Path)):
        import onnx
        return onnx.load(str(model))
    return model


__all__ = ["BiasCheck", "ENCODING_VERSION", "INT32_LIMIT", "SUFFIX", "Violation", "bias_margin",
           "check_qnn_rules", "dumps", "encodings_path", "int32_bias_checks", "qnn_encodings", "qnn_sidecar",
           "write_encodings"]
