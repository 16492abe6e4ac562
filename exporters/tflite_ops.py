"""What a ``.tflite`` runs: its op list, read from the flatbuffer, and the ops that
would fall back from an accelerator delegate to the CPU.

A delegate takes the ops it supports and leaves the rest on the CPU; every
hand-over costs a copy and a sync, so one unsupported op in the middle of a network
can cost more than it saves. The lists below are checked **by op type** (plus the
Android API level for NNAPI); per-op constraints (broadcast shapes, strides,
dilation) are not modelled, so "supported" means "not ruled out by type".

Sources (checked against these files, TensorFlow 2.21 era):

* GPU: ``tensorflow/lite/tools/versioning/gpu_compatibility.cc``,
  ``CheckGpuDelegateCompatibility`` (the builtin ops of its ``switch``; it is the
  check the GPU delegate itself runs, migrated from ``delegates/gpu/common/model_builder.cc``).
  The public "GPU delegate supported ops" page lists an older subset.
  (The analyzer's ``gpu_compatibility=True`` in ai_edge_litert 2.3 reported GATHER_ND,
  ARG_MAX and TOPK_V2 as compatible, so it is not used.)
* NNAPI: ``tensorflow/lite/delegates/nnapi/nnapi_delegate.cc``,
  ``NNAPIDelegateKernel::Validate`` (the ``case`` labels and their
  ``ExpectMinAndroidSdkVersion``: NNAPI 1.0 = API 27, 1.1 = 28, 1.2 = 29, 1.3 = 30;
  signed int8 activations need NNAPI 1.3). NNAPI is deprecated from Android 15.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

GPU_SOURCE = "tensorflow/lite/tools/versioning/gpu_compatibility.cc (CheckGpuDelegateCompatibility)"
NNAPI_SOURCE = "tensorflow/lite/delegates/nnapi/nnapi_delegate.cc (NNAPIDelegateKernel::Validate)"

GPU_OPS = frozenset("""
ADD ADD_N AVERAGE_POOL_2D BATCH_MATMUL CAST CONCATENATION CONV_2D CUMSUM DENSIFY DEPTHWISE_CONV_2D
DEPTH_TO_SPACE DEQUANTIZE DYNAMIC_UPDATE_SLICE EMBEDDING_LOOKUP FULLY_CONNECTED GATHER HARD_SWISH LSTM
MAX_POOL_2D MEAN MUL PACK ONE_HOT QUANTIZE RELU_N1_TO_1 PRELU RESHAPE SELECT SELECT_V2 SLICE SOFTMAX
SPACE_TO_DEPTH SPLIT SPLIT_V STRIDED_SLICE TILE TRANSPOSE TRANSPOSE_CONV RESIZE_BILINEAR
RESIZE_NEAREST_NEIGHBOR RELU RELU6 LEAKY_RELU REDUCE_MAX REDUCE_MIN REDUCE_PROD SUM PAD PADV2 MIRROR_PAD
ABS CEIL COS ELU EXP FLOOR GELU LOG LOGISTIC NEG RSQRT SIGN SIN SQRT SQUARE TANH ATAN2 DIV EQUAL
FLOOR_DIV FLOOR_MOD GREATER GREATER_EQUAL LOGICAL_AND LESS LESS_EQUAL MAXIMUM MINIMUM NOT_EQUAL POW
SQUARED_DIFFERENCE SUB STABLEHLO_CLAMP
""".split())

# op -> minimum Android API level at which NNAPI takes it (27 = NNAPI 1.0).
NNAPI_MIN_API: dict[str, int] = {
    **dict.fromkeys("""ADD MUL AVERAGE_POOL_2D MAX_POOL_2D L2_POOL_2D CONV_2D DEPTHWISE_CONV_2D
        FULLY_CONNECTED HARD_SWISH SOFTMAX RESHAPE RESIZE_BILINEAR L2_NORMALIZATION
        LOCAL_RESPONSE_NORMALIZATION LSH_PROJECTION CONCATENATION DEQUANTIZE FLOOR RELU RELU_N1_TO_1
        RELU6 LOGISTIC TANH SPACE_TO_DEPTH DEPTH_TO_SPACE RNN EMBEDDING_LOOKUP HASHTABLE_LOOKUP""".split(), 27),
    **dict.fromkeys("""SUB DIV PAD PADV2 SPACE_TO_BATCH_ND BATCH_TO_SPACE_ND STRIDED_SLICE TRANSPOSE
        SQUEEZE MEAN LSTM SQUARED_DIFFERENCE SVDF""".split(), 28),
    **dict.fromkeys("""ARG_MAX ARG_MIN RESIZE_NEAREST_NEIGHBOR UNIDIRECTIONAL_SEQUENCE_LSTM
        UNIDIRECTIONAL_SEQUENCE_RNN ABS EXP LOG RSQRT POW SLICE SIN TRANSPOSE_CONV SQRT MAXIMUM MINIMUM
        CAST LEAKY_RELU PRELU TILE LOGICAL_OR LOGICAL_AND LOGICAL_NOT LESS LESS_EQUAL GREATER
        GREATER_EQUAL EQUAL NOT_EQUAL NEG TOPK_V2 SELECT GATHER BIDIRECTIONAL_SEQUENCE_LSTM EXPAND_DIMS
        SPLIT LOG_SOFTMAX QUANTIZE REDUCE_ANY REDUCE_MIN REDUCE_MAX REDUCE_PROD SUM""".split(), 29),
    **dict.fromkeys("SPLIT_V ELU FILL PACK DENSIFY".split(), 30),
}
NNAPI_INT8_MIN_API = 30     # signed int8 (TFLite's default full-integer type) needs NNAPI 1.3


def _schema():
    from ai_edge_litert import schema_py_generated as fb
    return fb


def op_names() -> dict[int, str]:
    fb = _schema()
    return {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def graph_ops(model: bytes) -> list[dict[str, Any]]:
    """Ops of the main subgraph in execution order: ``{op, version, inputs, outputs}`` (tensor
    indices; ``version`` the operator code's, which a runtime checks against what it
    implements), with ``const_inputs`` flags (an input with data in the file is a weight)."""
    fb = _schema()
    names = op_names()
    m = fb.Model.GetRootAs(model, 0)
    codes, versions = [], []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        custom = oc.CustomCode()
        codes.append(custom.decode() if code == fb.BuiltinOperator.CUSTOM and custom else names.get(code, str(code)))
        versions.append(int(oc.Version()))
    sg = m.Subgraphs(0)

    def is_const(t: int) -> bool:
        if t < 0:
            return False
        buf = sg.Tensors(t).Buffer()
        return buf > 0 and m.Buffers(buf).DataLength() > 0

    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        ins = [int(x) for x in op.InputsAsNumpy()] if op.InputsLength() else []
        outs = [int(x) for x in op.OutputsAsNumpy()] if op.OutputsLength() else []
        k = op.OpcodeIndex()
        ops.append({"op": codes[k], "version": versions[k], "inputs": ins, "outputs": outs,
                    "const_inputs": [is_const(t) for t in ins]})
    return ops


def op_counts(ops: list[dict[str, Any]]) -> dict[str, int]:
    return dict(sorted(Counter(o["op"] for o in ops).items()))


def delegate_fallbacks(ops: list[dict[str, Any]], *, int8_activations: bool) -> dict[str, Any]:
    """Ops that would stay on the CPU under the GPU and NNAPI delegates.

    A DEQUANTIZE of a constant (fp16 or int8 weights) is evaluated once when the
    model loads, not per inference, so it is not counted as a fallback.
    """
    runtime = [o for o in ops if not (o["op"] == "DEQUANTIZE" and all(o["const_inputs"]))]
    gpu = sorted({o["op"] for o in runtime if o["op"] not in GPU_OPS})
    nnapi_missing = sorted({o["op"] for o in runtime if o["op"] not in NNAPI_MIN_API})
    levels = [NNAPI_MIN_API[o["op"]] for o in runtime if o["op"] in NNAPI_MIN_API]
    if int8_activations:
        levels.append(NNAPI_INT8_MIN_API)
    return {
        "gpu": {"unsupported_ops": gpu, "source": GPU_SOURCE},
        "nnapi": {"unsupported_ops": nnapi_missing, "min_android_api": max(levels, default=27),
                  "source": NNAPI_SOURCE},
        "checked": "by op type only; per-op constraints (shapes, strides, broadcast) not modelled",
    }
