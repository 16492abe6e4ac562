"""Weight-only int8 TFLite (``int8w``): the fp32 file with every convolution, depthwise and
fully connected weight stored as symmetric per-channel int8, a ``DEQUANTIZE`` op in front.

Why: TFLiteConverter's float16 kind does exactly this with float16 weights; for int8 it
offers only dynamic range, whose CPU kernels also quantize the *activations* per input
at run time (0.960 / 29.6 dB against the float model's 30.8 dB on EfficientNet-Lite1 with
``mdeploy quantize``'s weights). LiteRT and XNNPACK dequantize constant weights once, at
load, so this file computes in float32 at the float32 file's speed with the int8 file's
size. The scale is ``max|w| / 127`` per output channel, the grid every other int8 file of
this tool uses: weights already on it (``quantize.weight_rounding``) come back as
themselves, so the file computes what the fp32 file does (``quantize.grid_check`` reads
the integers back like any other int8 TFLite weight).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from exporters.int8_grid import symmetric_int8

# op -> (weight input, output-channel axis of that weight in TFLite's layout)
WEIGHT_OPS = {"CONV_2D": (1, 0), "DEPTHWISE_CONV_2D": (1, 3), "FULLY_CONNECTED": (1, 0)}
# DEQUANTIZE's op version for an int8 input: 5 when per-channel (more than one scale), 2
# when per-tensor (TFLite's tools/versioning/op_version.cc); a runtime older than the
# version refuses the file, so the file asks for no more than it uses
DEQUANTIZE_VERSION = {"per_channel": 5, "per_tensor": 2}


def int8_weight_only(fp32: bytes) -> bytes:
    """``fp32`` (a float ``.tflite``) with its conv / depthwise / fully connected float
    weights stored as per-channel int8 behind a ``DEQUANTIZE`` op (tensor names kept:
    the float weight becomes that op's output). LiteRT's own schema, no TensorFlow."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from exporters.tflite_ops import op_names
    names = op_names()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(fp32, 0))
    dequantize = _opcode(model, schema, names)
    scales: list[int] = []
    for sg in model.subgraphs:
        done: set[int] = set()
        operators = []
        for op in sg.operators:
            spec = WEIGHT_OPS.get(names.get(_builtin(model.operatorCodes[op.opcodeIndex]), ""))
            if spec is not None and op.inputs is not None and len(op.inputs) > spec[0]:
                index = int(op.inputs[spec[0]])
                if index >= 0 and index not in done and _float_constant(model, sg.tensors[index], schema):
                    operators.append(_dequantize_op(model, sg, index, spec[1], dequantize, schema))
                    scales.append(len(sg.tensors[-1].quantization.scale))
                    done.add(index)
            operators.append(op)
        sg.operators = operators
    if scales:
        code = model.operatorCodes[dequantize]
        kind = "per_channel" if max(scales) > 1 else "per_tensor"
        code.version = max(int(code.version or 1), DEQUANTIZE_VERSION[kind])
    builder = flatbuffers.Builder(len(fp32))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _builtin(code: Any) -> int:
    """An operator code's builtin (the schema keeps small codes in the deprecated field)."""
    return max(int(code.builtinCode or 0), int(code.deprecatedBuiltinCode or 0))


def _float_constant(model: Any, tensor: Any, schema: Any) -> bool:
    buf = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    return tensor.type == schema.TensorType.FLOAT32 and buf is not None and buf.data is not None \
        and len(buf.data) > 0 and tensor.shape is not None and len(tensor.shape) >= 2


def _dequantize_op(model: Any, sg: Any, index: int, axis: int, opcode: int, schema: Any) -> Any:
    """A new int8 tensor (and buffer) holding ``sg.tensors[index]``'s weight; that float
    tensor loses its buffer and becomes the returned DEQUANTIZE op's output."""
    weight = sg.tensors[index]
    shape = [int(d) for d in weight.shape]
    w = np.frombuffer(np.asarray(model.buffers[weight.buffer].data, dtype=np.uint8).tobytes(),
                      dtype="<f4").reshape(shape)
    q, scale = symmetric_int8(w, axis)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(q.astype(np.int8).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    params = schema.QuantizationParametersT()
    params.scale = [float(s) for s in scale.reshape(-1)]
    params.zeroPoint = [0] * scale.size
    params.quantizedDimension = axis
    qt = schema.TensorT()
    qt.shape = list(shape)
    qt.type = schema.TensorType.INT8
    qt.buffer = len(model.buffers) - 1
    name = weight.name.decode() if isinstance(weight.name, bytes) else str(weight.name)
    qt.name = f"{name}/int8"
    qt.quantization = params
    sg.tensors.append(qt)
    model.buffers[weight.buffer].data = None                     # computed now, not stored
    op = schema.OperatorT()
    op.opcodeIndex = opcode
    op.inputs = [len(sg.tensors) - 1]
    op.outputs = [index]
    return op


def _opcode(model: Any, schema: Any, names: dict[int, str]) -> int:
    for i, code in enumerate(model.operatorCodes):
        if names.get(_builtin(code)) == "DEQUANTIZE":
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.DEQUANTIZE
    code.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


__all__ = ["int8_weight_only"]
