"""The symmetric per-channel int8 grid: ``s = max|w| / 127`` per output channel, levels
``[-127, 127]``, round half to even, no zero point.

Why one function: it is the grid ONNX Runtime's symmetric int8, TFLite's converter and
coremltools' ``linear_symmetric`` all take, so it is both what ``exporters.tflite_weights``
writes into an ``int8w`` file and what ``quantize.grid_check`` compares every converter's
integers with. Computed in float64: a float32 division can move a weight that sits half a
step between two integers (which ``quantize.weight_rounding``'s ``q * s`` weights do, up
to float32 rounding) to the other one.
"""
from __future__ import annotations

import numpy as np

QMAX = 127


def symmetric_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)``: the integers (int64, ``w``'s shape) and the float64 scales (``w``'s rank,
    size 1 but along ``axis``) of ``w`` per slice along ``axis``. An all-zero slice gets
    scale 1 and stays zero."""
    w = np.asarray(w, dtype=np.float64)
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w).max(axis=other, keepdims=True)
    scale = np.where(amax > 0, amax / QMAX, 1.0)
    return np.clip(np.round(w / scale), -QMAX, QMAX).astype(np.int64), scale


__all__ = ["QMAX", "symmetric_int8"]
