"""PyTorch -> ExecuTorch program (``.pte``), lowered to the XNNPACK delegate.

Why this target: ExecuTorch is PyTorch's own on-device runtime; an app links its runtime
and loads the ``.pte`` with ``Module("model_fp32.pte").forward(tensor)``. The file is
written without leaving PyTorch (no ONNX, no TensorFlow): ``torch.export.export`` ->
``executorch.exir.to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` (every op
XNNPACK supports goes into its delegate; the rest stays on ExecuTorch's CPU kernels) ->
``to_executorch()`` -> the program's bytes.

Precisions:

* ``fp32``: the float model, lowered as it is;
* ``int8``: PT2E post-training quantization with the XNNPACK quantizer (the recipe the
  ExecuTorch XNNPACK docs give): ``torch.export.export(model).module()`` ->
  ``prepare_pt2e(XNNPACKQuantizer().set_global(get_symmetric_quantization_config(
  is_per_channel=True)))`` -> the calibration inputs (real preprocessed images, the same
  data the int8 TFLite kinds calibrate on) -> ``convert_pt2e`` -> export -> lower. Weights
  are int8 symmetric per channel, activations int8 per tensor (histogram observer); the
  program still takes and returns float32 (quantize and dequantize run inside the delegate).

Input and output are what PyTorch takes: one float32 NCHW tensor ``input`` (normalised as
``manifest.json``'s ``preprocessing`` says), one float32 ``logits`` (more outputs are
``output_1``, ``output_2``, ...), fixed batch of one. A ``.pte`` has no metadata slot for
labels or normalisation: the app reads both from ``manifest.json`` next to it.

Each artifact records the ExecuTorch version, the export time and the **op split**:
how many ops run inside XNNPACK delegate subgraphs and which ones stay on ExecuTorch's
portable CPU kernels (``executorch.devtools.backend_debug.get_delegation_info``); an op
left outside the delegate is where a phone spends time XNNPACK would not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from exporters.artifact import Artifact, TensorSpec, check_calibration, layout_for_ndim, sha256_of, size_of
from exporters.base import ExportContext, Exporter, ExporterOptions
from exporters.fileio import atomic_write_bytes
from exporters.native_output import quiet
from exporters.onnx import INPUT_NAME, OUTPUT_NAME, flatten_outputs, output_names
from models.errors import InputError
from models.sparse_shift import no_negative_pads
from models.util import error_line_with_cause

PRECISIONS = ("fp32", "int8")
DEFAULT_PRECISIONS = ("fp32",)          # int8 needs calibration images: asked for explicitly
FILE_SUFFIX = ".pte"
METHOD = "forward"
BACKEND = "XnnpackBackend"
# What "int8" means here, recorded in the manifest beside the artifact.
QUANTIZER_CONFIG = {
    "quantizer": "executorch.backends.xnnpack.quantizer.xnnpack_quantizer.XNNPACKQuantizer",
    "config": "get_symmetric_quantization_config(is_per_channel=True)",
    "flow": "torchao PT2E: prepare_pt2e -> calibrate -> convert_pt2e",
    "weights": "int8 symmetric per output channel, [-127, 127]",
    "activations": "int8 per tensor, affine, [-128, 127], HistogramObserver",
    "io": "float32 in and out (quantize/dequantize inside the XNNPACK delegate)",
}
CALIBRATION_SOURCE = "the export's calibration images (--calibration, else the training split of source.data)"
# The tuple unpacking of a delegate's (or a multi-output op's) results is a graph node, not
# a kernel: it is left out of the op split.
_NOT_OPS = ("getitem",)


def runtime_call(fn: Callable[[], Any], where: str | Path, expected: str, *, running: bool = False) -> Any:
    """``fn()`` (a runtime load, or with ``running`` an ``execute``) with its output
    captured; a failure is one ``InputError`` quoting the runtime's own reason, which it
    prints while its exception says only ``Failed to load program, error: 0x:23``.

    ExecuTorch and torchao log FutureWarnings, torch.export logs graph breaks, and the
    runtime prints cpuinfo lines and its load errors from C++ (through Python's
    ``sys.stderr``, by pybind11 stream redirection): ``quiet`` catches all of it, except
    ``sys.stderr`` around ``execute`` (a Python object there hung or aborted it when
    XNNPACK ran on more than one thread); the descriptors still catch that."""
    error: Exception | None = None
    with quiet(python_stderr=not running) as native:
        try:
            return fn()
        except Exception as exc:  # RuntimeError from the C++ runtime
            error = exc
    raise InputError(where, expected, native.tail(2) or error_line_with_cause(error)) from None


def executorch_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("executorch")
    except metadata.PackageNotFoundError:
        return "?"


def _import_executorch() -> None:
    """ExecuTorch is a pinned dependency, but an install without it must say so in one line."""
    try:
        with quiet():
            import executorch.exir  # noqa: F401
    except ImportError as exc:
        raise InputError("--formats executorch", "the executorch package (make venv installs it)",
                         f"ImportError: {exc}") from None


def _lower(exported: Any) -> Any:
    """An ``ExportedProgram`` -> the edge program with XNNPACK delegates."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])


def _quantized(model: nn.Module, example: torch.Tensor, calibration: np.ndarray) -> nn.Module:
    """PT2E int8 with the XNNPACK quantizer, calibrated one sample at a time (the traced
    graph has the fixed batch of one that the program will have)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    graph = torch.export.export(model, (example,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(len(calibration)):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[i:i + 1], dtype=np.float32)))
    return convert_pt2e(prepared)


def delegation_split(graph_module: Any) -> dict[str, Any]:
    """Ops inside XNNPACK delegate subgraphs vs ops left on ExecuTorch's CPU kernels, from
    ``executorch.devtools.backend_debug.get_delegation_info`` (op names as ExecuTorch
    gives them, e.g. ``aten_convolution_default``; ``getitem`` is not counted)."""
    from executorch.devtools.backend_debug import get_delegation_info
    info = get_delegation_info(graph_module)
    by_op = {op: b for op, b in sorted(info.delegation_by_operator.items()) if op not in _NOT_OPS}
    delegated = {op: b.delegated for op, b in by_op.items() if b.delegated}
    portable = {op: b.non_delegated for op, b in by_op.items() if b.non_delegated}
    qdq = sum(n for op, n in delegated.items() if op.startswith("quantized_decomposed_"))
    return {"backend": "XNNPACK", "delegated_subgraphs": int(info.num_delegated_subgraphs),
            "delegated_ops": int(sum(delegated.values())), "non_delegated_ops": int(sum(portable.values())),
            "delegated_quantize_dequantize": int(qdq), "delegated": delegated, "non_delegated": portable,
            "note": "edge-dialect ops before XNNPACK fuses them (a BatchNorm after a conv counts apart); "
                    "non-delegated ops run on ExecuTorch's portable CPU kernels; getitem nodes not counted"}


def _check_program(buffer: bytes, shape: Sequence[int], where: str) -> None:
    """Load the program with the runtime (XNNPACK initialises its delegate at method load)
    and check its one input is the shape it was exported for, before the file is kept."""
    with quiet():
        from executorch.runtime import Runtime
    method = runtime_call(lambda: Runtime.get().load_program(buffer).load_method(METHOD), where,
                          "a program the ExecuTorch runtime loads")
    meta = method.metadata
    got = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
    if got != [list(shape)]:
        raise InputError(where, f"one input of shape {list(shape)}", f"inputs {got}")


def export_executorch(model: nn.Module, out_dir: str | Path, precisions: Sequence[str], *,
                      input_shape: Sequence[int], calibration: np.ndarray | None = None,
                      calibration_source: str = "", root: str | Path | None = None,
                      stem: str = "model") -> list[Artifact]:
    """Write ``<stem>_<precision>.pte`` for each precision into ``out_dir``.

    ``input_shape`` is ``(1, C, H, W)``; ``calibration`` is float32 NCHW model inputs,
    already preprocessed (``int8`` refuses to run without them: random data would
    calibrate the ranges of noise). Artifact paths are relative to ``root`` (default:
    ``out_dir``). A model ``torch.export`` or the lowering cannot take is one
    ``InputError`` naming the model and the cause.
    """
    precisions = list(dict.fromkeys(precisions))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise InputError("--precisions", f"for executorch, some of {', '.join(PRECISIONS)}",
                         ", ".join(bad) or "none")
    if len(input_shape) != 4 or input_shape[0] != 1:
        raise InputError("input shape", "(1, C, H, W): a .pte has a fixed batch of one", repr(tuple(input_shape)))
    calib = _check_calibration(calibration, input_shape) if "int8" in precisions else None
    _import_executorch()
    out_dir = Path(out_dir)
    root = Path(root) if root is not None else out_dir
    where = type(model).__name__
    model = model.eval()
    example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = flatten_outputs(model(example))
    if not outputs:
        raise InputError(where, "a model returning tensors", "no tensor output")
    out_specs = [TensorSpec(name, list(t.shape), "float32", layout_for_ndim(t.ndim))
                 for name, t in zip(output_names(len(outputs), OUTPUT_NAME), outputs)]
    version = executorch_version()
    artifacts = []
    for precision in precisions:
        t0 = time.perf_counter()
        try:
            # ExecuTorch's portable constant_pad_nd refuses negative pads: sparse shifts as Pad + Slice
            with quiet(), torch.no_grad(), no_negative_pads():
                source = _quantized(model, example, calib) if precision == "int8" else model
                edge = _lower(torch.export.export(source, (example,)))
                split = delegation_split(edge.exported_program().graph_module)
                buffer = edge.to_executorch().buffer
        except InputError:
            raise
        except Exception as exc:  # torch.export, PT2E and the lowering raise many types
            what = "PT2E int8 quantization (XNNPACKQuantizer) and " if precision == "int8" else ""
            raise InputError(where, f"a model torch.export, {what}ExecuTorch's XNNPACK lowering can take",
                             error_line_with_cause(exc)) from exc
        seconds = time.perf_counter() - t0
        _check_program(buffer, input_shape, f"{where} ({precision} .pte)")
        path = atomic_write_bytes(out_dir / f"{stem}_{precision}{FILE_SUFFIX}", buffer)
        extra: dict[str, Any] = {
            "executorch_version": version, "export_seconds": round(seconds, 3),
            "method": METHOD, "delegation": split,
            "input": "float32 NCHW tensor, normalised as manifest.json preprocessing says (the app does it)",
            "metadata": "none in the .pte: labels and preprocessing are in manifest.json next to it",
        }
        if precision == "int8":
            assert calib is not None
            from importlib import metadata
            extra["quantization"] = {**QUANTIZER_CONFIG, "torchao_version": metadata.version("torchao")}
            extra["calibration"] = {"samples": int(len(calib)), "source": calibration_source or "caller"}
        artifacts.append(Artifact(
            path=str(path.resolve().relative_to(root.resolve())), format="executorch", precision=precision,
            inputs=[TensorSpec(INPUT_NAME, list(input_shape), "float32", "NCHW")], outputs=out_specs,
            sha256=sha256_of(path), size_bytes=size_of(path),
            tool="torch.export + executorch.exir.to_edge_transform_and_lower(XnnpackPartitioner)",
            tool_version=version, extra=extra))
    return artifacts


def _check_calibration(calibration: np.ndarray | None, shape: Sequence[int]) -> np.ndarray:
    if calibration is None:
        raise InputError("--calibration", "calibration images for executorch int8 (a data set, an image "
                         "folder or .npy; the checkpoint's data set by default)", "none")
    return check_calibration(calibration, shape)


# -- the registered exporter -------------------------------------------------------------


@dataclass
class ExecuTorchOptions(ExporterOptions):
    """No options yet: the XNNPACK partitioner is the only backend lowered on Linux here."""


class ExecuTorchExporter(Exporter):
    """``model_<precision>.pte``: fp32, and int8 (PT2E, XNNPACK quantizer) when asked."""

    name = "executorch"
    format = "executorch"
    precisions = PRECISIONS
    default_precisions = DEFAULT_PRECISIONS
    options_type = ExecuTorchOptions

    def export(self, source: nn.Module, out_dir: Path, precisions: Sequence[str],
               ctx: ExportContext) -> list[Artifact]:
        calib = ctx.calibration() if "int8" in precisions else None
        return export_executorch(source, out_dir, precisions, input_shape=ctx.input_shape, calibration=calib,
                                 calibration_source=CALIBRATION_SOURCE if calib is not None else "",
                                 root=ctx.root)
