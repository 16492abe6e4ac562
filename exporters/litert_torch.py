"""PyTorch -> float TFLite directly, by Google's litert-torch (formerly ai-edge-torch).

Why a second route to TFLite: the ONNX route (``exporters.tflite``: onnx2tf -> SavedModel
-> TFLiteConverter) guesses an NHWC layout for every ONNX tensor from its shape, and at
small inputs or across transposes the guess fails (``mixer_b16_224``'s token-mixing
transpose, 1x1 maps before a flatten at 32x32) or differs with the weights; it is also
the slow step (tens of seconds to minutes a model, in a subprocess). litert-torch lowers
the ``torch.export`` graph itself: no layout guessing, the model's own NCHW semantics with
transposes where needed, in seconds.

What it writes here: ``fp32`` (the converted graph) and ``fp16`` (its float weights cast to
float16 with a DEQUANTIZE before their op, as TFLiteConverter's float16 option does, by
ai-edge-quantizer's ``FLOAT_CASTING``). The app-facing input is NHWC unless NCHW is asked
for (``to_channel_last_io``: the transpose sits inside the file). The integer kinds stay on
the ONNX route, calibrated by TFLiteConverter, which is what the QNN/ORT path is measured
against (``exporters.tflite`` records the route and why per artifact).

Nothing here prints: litert-torch's progress lines are switched off, its native output
captured; a failure is one ``ConversionError`` line naming the converter.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from exporters.native_output import quiet
from models.errors import InputError
from models.util import one_line

FLOAT_PRECISIONS = ("fp32", "fp16")
DIST = "litert-torch"


def available() -> bool:
    """Whether the converter is installed (it is pinned; a trimmed install may lack it)."""
    try:
        metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return False
    return True


def version() -> str:
    parts = []
    for dist in (DIST, "ai-edge-quantizer"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(parts)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """``quiet`` with Python's stdout captured too, litert-torch's progress lines off and
    TensorFlow's C++ log down (what was printed is not used)."""
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet(python_stdout=True):
        yield


def convert_float(model, input_shape: Sequence[int], precisions: Sequence[str], *,
                  layout: str = "NHWC") -> dict[str, bytes]:
    """``model`` (an ``nn.Module`` taking one NCHW tensor) -> ``{precision: .tflite bytes}``
    for the float ``precisions`` asked (``fp32`` is always converted: fp16 is made from it).

    The input and output names are the converter's (``args_0`` / ``output_0``); the
    caller renames them. Raises ``ConversionError`` with the converter's own message.
    """
    import torch

    from exporters.tflite import ConversionError   # the route's error type is the TFLite exporter's
    bad = [p for p in precisions if p not in FLOAT_PRECISIONS]
    if bad:
        raise InputError("precision", f"one of {', '.join(FLOAT_PRECISIONS)} for litert-torch", ", ".join(bad))
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    out: dict[str, bytes] = {}
    try:
        with _quiet(), torch.no_grad():
            import litert_torch
            module = model.eval()
            if layout == "NHWC":
                module = litert_torch.to_channel_last_io(module, args=[0])
                x = x.permute(0, 2, 3, 1).contiguous()
            edge = litert_torch.convert(module, (x,))
            with tempfile.TemporaryDirectory(prefix="mdeploy-litert-torch-") as tmp:
                edge.export(str(Path(tmp) / "model.tflite"))          # its public way out
                out["fp32"] = (Path(tmp) / "model.tflite").read_bytes()
    except InputError:
        raise
    except Exception as exc:   # torch.export and the MLIR lowering raise many types
        raise ConversionError("litert-torch", "a model litert-torch can convert", one_line(exc, 400)) from None
    if "fp16" in precisions:
        out["fp16"] = float16_weights(out["fp32"])
    return {p: out[p] for p in dict.fromkeys(["fp32", *precisions])}


def float16_weights(fp32: bytes) -> bytes:
    """Every float weight of a float TFLite model stored as float16 and dequantized before
    its op (ai-edge-quantizer's FLOAT_CASTING, weight-only): half the file, float math."""
    from exporters.tflite import ConversionError
    try:
        with _quiet():
            from ai_edge_quantizer import qtyping, quantizer
            from ai_edge_quantizer.algorithm_manager import AlgorithmName
            q = quantizer.Quantizer(bytearray(fp32))
            q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                     num_bits=16, granularity=qtyping.QuantGranularity.TENSORWISE,
                                     algorithm_key=AlgorithmName.FLOAT_CASTING)
            return inline_buffers(bytes(q.quantize().quantized_model))
    except Exception as exc:
        raise ConversionError("ai-edge-quantizer", "float16 weights for the litert-torch model",
                              one_line(exc, 400)) from None


def inline_buffers(data: bytes) -> bytes:
    """The same model with every weight buffer inside the flatbuffer.

    ai-edge-quantizer writes weights *after* the flatbuffer (``Buffer.offset``/``size``, the
    layout for models over 2 GB); the metadata and renaming steps repack the flatbuffer,
    which moves that tail and breaks every offset ("Constant buffer specified an out of
    range offset"). Inline data is what TFLiteConverter writes for models of this size.
    """
    from ai_edge_litert import schema_py_generated as fb

    from exporters.tflite_metadata import pack_model
    m = fb.ModelT.InitFromPackedBuf(bytearray(data), 0)
    moved = False
    for buf in m.buffers or []:
        if buf.offset and buf.offset > 1 and buf.size:
            buf.data = np.frombuffer(data[buf.offset:buf.offset + buf.size], dtype=np.uint8).copy()
            buf.offset, buf.size = 0, 0
            moved = True
    return pack_model(m) if moved else data


__all__ = ["FLOAT_PRECISIONS", "available", "convert_float", "float16_weights", "inline_buffers", "version"]
