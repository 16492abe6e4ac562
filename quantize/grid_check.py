"""Do the converters' int8 weights carry the optimised integers? Checked, not assumed.

``quantize.weight_rounding`` writes every optimised weight back into the float model as
``q * s``, exactly on its symmetric per-channel grid with one ``+-127`` level per output
channel, so a converter that takes ``s = max|w| / 127`` recovers the same ``q``. This
module reads the integers each converter actually wrote and counts those that differ
from ``round(w / (max|w| / 127))`` of the float model's own weights (per output channel):

* ``tflite_weight_mismatch``: the int8 weight tensors of a full-integer ``.tflite``
  (LiteRT's ``Interpreter``: ``get_tensor_details()`` for the per-axis scales,
  ``get_tensor()`` for the integers). Layouts: convolutions OHWI (axis 0), depthwise
  1HWC (axis 3), fully connected (out, in) (axis 0). Weights are matched to the float
  model's by shape after transposition and by value (the dequantized tensor within one
  step of the float one); a float weight no TFLite tensor matches (split, fused or
  per-tensor in a way the check cannot pair) is counted as unmatched, not as agreeing.
* ``coreml_weight_mismatch``: the ``constexpr_affine_dequantize`` /
  ``constexpr_blockwise_shift_scale`` ops of a Core ML ML Program, read with coremltools
  on any OS (``MLModel(path, skip_model_load=True)``, the MIL program's op inputs and
  the package's weight file). coremltools' ``linear_quantize_weights`` with
  ``mode="linear_symmetric", dtype="int8", granularity="per_channel"`` uses the same grid:
  range ``[-127, 127]`` (its ``get_quant_range`` drops -128 in symmetric mode), scale
  ``2 max|w| / 254 = max|w| / 127``, round half to even, no zero point. Its
  ``mode="linear"`` (affine) would not: range ``[-128, 127]``, scale
  ``(max - min) / 255`` and a zero point per channel, so it re-rounds every weight. The
  scale is computed in the weight's own dtype: from an fp16 program the divisions happen
  in float16 and can move an integer, which is why the quantize stage compresses the
  fp32 program.

A model whose weights are not on their grid (round to nearest never applied) shows
mismatches wherever the converter's rounding disagrees with ours, which is the negative
control of the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from exporters.int8_grid import symmetric_int8


@dataclass
class GridCheck:
    """Per float weight, the integers that differ (``mismatch``); weights no quantized
    tensor matched (``unmatched``); quantized int8 tensors left without a float weight."""

    mismatch: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    extra_tensors: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)    # below the converter's size threshold: not int8

    @property
    def total(self) -> int:
        return int(sum(self.mismatch.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"mismatch": dict(self.mismatch), "total": self.total, "checked": len(self.mismatch),
                "unmatched": list(self.unmatched), "extra_tensors": list(self.extra_tensors),
                "kept_float": list(self.kept_float)}


def float_weights(source: Any) -> dict[str, np.ndarray]:
    """The weights that get quantized, by name: conv kernels (O, I/g, kh, kw) and
    fully-connected matrices (out, in), from a float ONNX file or a ``torch.nn.Module``.
    ONNX ``MatMul`` / ``Gemm(transB=0)`` matrices are (in, out) and are transposed here."""
    if isinstance(source, (str, Path)):
        import onnx
        from onnx import numpy_helper
        model = onnx.load(str(source))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        out: dict[str, np.ndarray] = {}
        for n in model.graph.node:
            if len(n.input) < 2 or n.input[1] not in inits:
                continue
            w = np.asarray(inits[n.input[1]], dtype=np.float32)
            if n.op_type == "Conv" and w.ndim >= 3:
                out[n.input[1]] = w
            elif n.op_type == "Gemm" and w.ndim == 2:
                trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
                out[n.input[1]] = w if trans_b else w.T
            elif n.op_type == "MatMul" and w.ndim == 2:
                out[n.input[1]] = w.T
        return out
    import torch.nn as nn
    return {f"{name}.weight": m.weight.detach().float().numpy().copy() for name, m in source.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))}


def grid_integers(w: np.ndarray, axis: int) -> np.ndarray:
    """``round(w / (max|w| / 127))`` per slice along ``axis``, clipped to [-127, 127]."""
    return symmetric_int8(w, axis)[0]


def _layouts(w: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """The float weight as TFLite stores it, with its quantized axis: conv OHWI, depthwise
    1HWC, fully connected (out, in)."""
    if w.ndim == 4:
        yield w.transpose(0, 2, 3, 1), 0            # Conv2D: OIHW -> OHWI
        if w.shape[1] == 1:
            yield w.transpose(1, 2, 3, 0), 3        # DepthwiseConv2D: (O,1,kh,kw) -> (1,kh,kw,O)
    elif w.ndim == 3:
        yield w.transpose(0, 2, 1)[:, None], 0      # Conv1D as Conv2D: (O, 1, k, I)
    elif w.ndim == 2:
        yield w, 0


def tflite_int8_weights(tflite_path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Every int8 tensor of rank >= 2 with per-axis scales (the weights): name ->
    (integers, scales, quantized dimension). Activations carry one scale, weights one per
    output channel; a per-tensor weight of rank >= 2 is included when its buffer is
    readable before inference (a constant)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:   # tflite-runtime as a fallback
        from tflite_runtime.interpreter import Interpreter  # type: ignore
    interp = Interpreter(model_path=str(tflite_path))
    interp.allocate_tensors()
    io = {d["index"] for d in interp.get_input_details() + interp.get_output_details()}
    out: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for d in interp.get_tensor_details():
        if d["dtype"] != np.int8 or len(d["shape"]) < 2 or d["index"] in io:
            continue
        qp = d.get("quantization_parameters") or {}
        scales = np.asarray(qp.get("scales", []), dtype=np.float64)
        if scales.size == 0:
            continue
        try:
            q = np.array(interp.get_tensor(d["index"]))
        except ValueError:
            continue
        if scales.size == 1 and not np.any(q):    # an activation buffer, not yet written
            continue
        out[d["name"]] = (q.astype(np.int64), scales, int(qp.get("quantized_dimension", 0)))
    return out


def tflite_weight_mismatch(float_source: Any, tflite_path: str | Path) -> GridCheck:
    """Per float weight (ONNX file or ``nn.Module``), how many of the int8 integers in the
    ``.tflite`` differ from ``round(w / (max|w| / 127))`` on the float weight's own
    per-output-channel grid; float weights no TFLite tensor matches are listed in
    ``unmatched``."""
    weights = float_weights(float_source)
    tensors = tflite_int8_weights(tflite_path)
    check = GridCheck()
    used: set[str] = set()
    for name, w in weights.items():
        best: tuple[float, str, np.ndarray, int] | None = None
        for layout, axis in _layouts(w):
            for tname, (q, scales, qdim) in tensors.items():
                if tname in used or q.shape != layout.shape:
                    continue
                shape = [1] * q.ndim
                shape[qdim] = -1
                s = scales.reshape(shape) if scales.size > 1 else scales.reshape([1] * q.ndim)
                err = float(np.abs(q * s - layout).max())
                step = float(scales.max())
                # the same tensor: every value within one step (a re-rounded weight moves by
                # less than one) plus float slack
                if err <= step * (1 + 1e-3) + 1e-7 * float(np.abs(layout).max()):
                    if best is None or err < best[0]:
                        best = (err, tname, layout, axis)
        if best is None:
            check.unmatched.append(name)
            continue
        _, tname, layout, axis = best
        used.add(tname)
        check.mismatch[name] = int((grid_integers(layout, axis) != tensors[tname][0]).sum())
    check.extra_tensors = sorted(set(tensors) - used)
    return check


# ------------------------------------------------------------------ Core ML

_DEQUANT_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")


def coreml_int8_weights(mlpackage: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, int]]:
    """The int8 weights of a Core ML ML Program, without loading it for prediction (works
    on Linux): op output name -> (integers, scale, zero point or None, axis)."""
    from exporters.coreml import quiet_coremltools
    with quiet_coremltools():
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    mlmodel = ct.models.MLModel(str(mlpackage), skip_model_load=True)
    spec = mlmodel.get_spec()
    with quiet_coremltools():
        prog = milproto_load(spec, specification_version=spec.specificationVersion,
                             file_weights_dir=mlmodel.weights_dir)
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, int]] = {}
    for fn in prog.functions.values():
        for op in [op for kind in _DEQUANT_OPS for op in fn.find_ops(op_type=kind)]:
            if op.op_type == "constexpr_affine_dequantize":
                q = np.asarray(op.quantized_data.val)
                zp = np.asarray(op.zero_point.val) if op.zero_point is not None else None
                out[op.outputs[0].name] = (q.astype(np.int64), np.asarray(op.scale.val, dtype=np.float64),
                                           zp, int(op.axis.val))
            elif op.op_type == "constexpr_blockwise_shift_scale":
                q = np.asarray(op.data.val)
                scale = np.asarray(op.scale.val, dtype=np.float64)
                off = np.asarray(op.offset.val) if getattr(op, "offset", None) is not None else None
                axis = int(np.argmax([a == b and a > 1 for a, b in zip(scale.shape, q.shape)])) \
                    if scale.ndim == q.ndim else 0
                out[op.outputs[0].name] = (q.astype(np.int64), scale, off, axis)
    return out


def coreml_weight_mismatch(float_source: Any, mlpackage: str | Path, weight_threshold: int = 2048) -> GridCheck:
    """Per float weight, how many integers of the package's int8 weights differ from
    ``round(w / (max|w| / 127))``; a nonzero zero point counts every integer of its channel
    as a mismatch (it is a different grid). Matching is by shape (Core ML keeps PyTorch's
    OIHW and (out, in) layouts) and value. Weights under ``weight_threshold`` elements
    (coremltools' default: it leaves them in float) go to ``kept_float`` when unmatched."""
    weights = float_weights(float_source)
    tensors = coreml_int8_weights(mlpackage)
    check = GridCheck()
    used: set[str] = set()
    for name, w in weights.items():
        best: tuple[float, str] | None = None
        for tname, (q, scale, zp, axis) in tensors.items():
            if tname in used or q.shape != w.shape:
                continue
            shape = [1] * q.ndim
            if scale.size > 1:
                shape[axis] = -1
            deq = (q - (zp.reshape(shape) if zp is not None and zp.size > 1 else (zp if zp is not None else 0))) \
                * scale.reshape(shape)
            err = float(np.abs(deq - w).max())
            if err <= float(scale.max()) * (1 + 1e-2) + 1e-6 * float(np.abs(w).max()):
                if best is None or err < best[0]:
                    best = (err, tname)
        if best is None:
            (check.kept_float if w.size < weight_threshold else check.unmatched).append(name)
            continue
        tname = best[1]
        used.add(tname)
        q, scale, zp, axis = tensors[tname]
        mine = grid_integers(w, axis)
        differs = mine != q
        if zp is not None and np.any(zp):
            differs = np.ones_like(differs)
        check.mismatch[name] = int(differs.sum())
    check.extra_tensors = sorted(set(tensors) - used)
    return check


__all__ = ["GridCheck", "coreml_int8_weights", "coreml_weight_mismatch", "float_weights", "grid_integers",
           "tflite_int8_weights", "tflite_weight_mismatch"]
