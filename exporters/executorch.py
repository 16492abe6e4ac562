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
  One pattern is added to the quantizer's (``exporters.executorch_quantizer``): conv +
  ReLU6 observed after the clamp, as it does conv + ReLU (without it, ReLU6 outputs are
  quantized over their conv's whole range: README, ExecuTorch section).

Input and output are what PyTorch takes: one float32 NCHW tensor ``input`` (normalised as
``manifest.json``'s ``preprocessing`` says), one float32 ``logits`` (more outputs are
``output_1``, ``output_2``, ...), fixed batch of one. A ``.pte`` has no metadata slot for
labels or normalisation: the app reads both from ``manifest.json`` next to it.

Each artifact records the ExecuTorch version, the export time and the **op split**:
how many ops run inside XNNPACK delegate subgraphs and which ones stay on ExecuTorch's
portable CPU kernels (``executorch.devtools.backend_debug.get_delegation_info``); an op
left outside the delegate is where a phone spends time XNNPACK would not.

Backends (``ExecuTorchOptions.backends``, ``--executorch-backends``): ``xnnpack`` (the
default, above) and ``coreml``: the same route with ExecuTorch's ``CoreMLPartitioner``,
written as ``<stem>_<precision>_coreml.pte`` (artifact variant ``coreml``). The Core ML
delegate's payload is an ML Program (``model.mlpackage``) converted by coremltools at the
minimum deployment target given (the Core ML exporter's default, ``iOS17``) with the
precision asked for as its compute precision (fp32 or fp16; int8 is PT2E with the
``CoreMLQuantizer``). It lowers on Linux, but only Apple's ExecuTorch runtime has the
``CoreMLBackend``: this one cannot load it (``Backend CoreMLBackend is not registered``),
so it is checked by reading the program back, not by loading it. ``qnn`` (Qualcomm's
``QnnPartitioner``) needs Qualcomm's QNN SDK libraries at export time, which no package
registry carries: asking for it is a one-line error saying what is missing.
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
from exporters.base import ExportContext, Exporter, ExporterOptions, option
from exporters.fileio import atomic_write_bytes
from exporters.native_output import quiet
from exporters.onnx import INPUT_NAME, OUTPUT_NAME, flatten_outputs, output_names
from models.errors import InputError
from models.sparse_shift import no_negative_pads
from models.util import error_line_with_cause

PRECISIONS = ("fp32", "fp16", "int8")  # of all backends; BACKEND_PRECISIONS says which takes which
DEFAULT_PRECISIONS = ("fp32",)          # int8 needs calibration images: asked for explicitly
FILE_SUFFIX = ".pte"
METHOD = "forward"
BACKEND = "XnnpackBackend"
BACKENDS = ("xnnpack", "coreml", "qnn")  # --executorch-backends; qnn only says why it cannot lower
DEFAULT_BACKENDS = ("xnnpack",)
BACKEND_PRECISIONS = {"xnnpack": ("fp32", "int8"), "coreml": ("fp32", "fp16", "int8")}
# The delegate's backend id (as in the program and the runtime's registry) and split label.
BACKEND_IDS = {"xnnpack": BACKEND, "coreml": "CoreMLBackend"}
SPLIT_LABELS = {"xnnpack": "XNNPACK", "coreml": "CoreML"}
APPLE_ONLY = ("runs only on Apple platforms (iOS/macOS): needs an ExecuTorch runtime built with the "
              "CoreMLBackend; the Linux/Android runtime (this one) cannot load it")
# What "int8" means here, recorded in the manifest beside the artifact.
QUANTIZER_CONFIG = {
    "quantizer": "executorch.backends.xnnpack.quantizer.xnnpack_quantizer.XNNPACKQuantizer",
    "config": "get_symmetric_quantization_config(is_per_channel=True)",
    "patterns": "the quantizer's own, plus conv->hardtanh (ReLU6) as one pattern observed after the clamp "
                "(exporters.executorch_quantizer)",
    "flow": "torchao PT2E: prepare_pt2e -> calibrate -> convert_pt2e",
    "weights": "int8 symmetric per output channel, [-127, 127]",
    "activations": "int8 per tensor, affine, [-128, 127], HistogramObserver",
    "io": "float32 in and out (quantize/dequantize inside the XNNPACK delegate)",
}
COREML_QUANTIZER_CONFIG = {
    "quantizer": "executorch.backends.apple.coreml.quantizer.CoreMLQuantizer",
    "config": "coremltools LinearQuantizerConfig(quantization_scheme=symmetric, weight_dtype=qint8, "
              "activation_dtype=quint8, weight_per_channel=True)",
    "flow": "torchao PT2E: prepare_pt2e -> calibrate -> convert_pt2e",
    "weights": "int8 symmetric per output channel",
    "activations": "uint8 per tensor",
    "io": "float32 in and out (quantize/dequantize inside the Core ML delegate)",
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


def _lower(exported: Any, backend: str = "xnnpack", precision: str = "fp32",
           coreml_target: str | None = None) -> Any:
    """An ``ExportedProgram`` -> the edge program with XNNPACK (or Core ML) delegates.

    Core ML gets explicit compile specs: its partitioner's default compute precision is
    fp16 (an "fp32" file would silently compute in half), and without a deployment target
    the spec version is whatever coremltools picks (the manifest records the one given)."""
    from executorch.exir import to_edge_transform_and_lower
    if backend == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        from exporters.coreml import DEFAULT_TARGET, deployment_target
        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=deployment_target(coreml_target or DEFAULT_TARGET),
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
        return to_edge_transform_and_lower(exported, partitioner=[CoreMLPartitioner(compile_specs=specs)])
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])


def _quantized(model: nn.Module, example: torch.Tensor, calibration: np.ndarray,
               backend: str = "xnnpack") -> nn.Module:
    """PT2E int8 with the backend's quantizer (XNNPACK's, or Core ML's: the delegate
    lowers only the quantize/dequantize patterns its own quantizer annotates), calibrated
    one sample at a time (the traced graph has the fixed batch of one that the program
    will have)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    graph = torch.export.export(model, (example,)).module()
    if backend == "coreml":
        from coremltools.optimize.torch.quantization.quantization_config import (LinearQuantizerConfig,
                                                                                 QuantizationScheme)
        from executorch.backends.apple.coreml.quantizer import CoreMLQuantizer
        quantizer: Any = CoreMLQuantizer(LinearQuantizerConfig.from_dict({"global_config": {
            "quantization_scheme": QuantizationScheme.symmetric, "activation_dtype": torch.quint8,
            "weight_dtype": torch.qint8, "weight_per_channel": True}}))
    else:
        from exporters.executorch_quantizer import xnnpack_quantizer
        quantizer = xnnpack_quantizer()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(len(calibration)):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[i:i + 1], dtype=np.float32)))
    return convert_pt2e(prepared)


def delegation_split(graph_module: Any, backend: str = "XNNPACK") -> dict[str, Any]:
    """Ops inside ``backend``'s delegate subgraphs (the program has one backend's) vs ops
    left on ExecuTorch's CPU kernels, from
    ``executorch.devtools.backend_debug.get_delegation_info`` (op names as ExecuTorch
    gives them, e.g. ``aten_convolution_default``; ``getitem`` is not counted)."""
    from executorch.devtools.backend_debug import get_delegation_info
    info = get_delegation_info(graph_module)
    by_op = {op: b for op, b in sorted(info.delegation_by_operator.items()) if op not in _NOT_OPS}
    delegated = {op: b.delegated for op, b in by_op.items() if b.delegated}
    portable = {op: b.non_delegated for op, b in by_op.items() if b.non_delegated}
    qdq = sum(n for op, n in delegated.items() if op.startswith("quantized_decomposed_"))
    return {"backend": backend, "delegated_subgraphs": int(info.num_delegated_subgraphs),
            "delegated_ops": int(sum(delegated.values())), "non_delegated_ops": int(sum(portable.values())),
            "delegated_quantize_dequantize": int(qdq), "delegated": delegated, "non_delegated": portable,
            "note": f"edge-dialect ops before {backend} fuses them (a BatchNorm after a conv counts apart); "
                    "non-delegated ops run on ExecuTorch's portable CPU kernels; getitem nodes not counted"}


def program_delegates(data: bytes) -> dict[str, Any]:
    """What a ``.pte`` holds, read from its flatbuffer without the runtime (which cannot
    load a program whose backend it lacks): the ``forward`` plan's delegate backend ids,
    its kernel ops (outside any delegate), input shapes, and the delegates' payloads."""
    with quiet():
        from executorch.exir._serialize._program import deserialize_pte_binary
        program = deserialize_pte_binary(data).program
    plan = next(p for p in program.execution_plan if p.name == METHOD)
    payloads = [program.backend_delegate_data[d.processed.index].data
                if d.processed.location.name == "INLINE" else None for d in plan.delegates]
    inputs = [list(plan.values[i].val.sizes) for i in plan.inputs]
    return {"backends": [d.id for d in plan.delegates], "operators": [o.name for o in plan.operators],
            "inputs": inputs, "payloads": payloads}


def _check_program(buffer: bytes, shape: Sequence[int], where: str, backend: str = "xnnpack") -> None:
    """Load the program with the runtime (XNNPACK initialises its delegate at method load)
    and check its one input is the shape it was exported for, before the file is kept. A
    Core ML program cannot be loaded here (no ``CoreMLBackend`` in this runtime): it is
    read back instead, and must hold a Core ML delegate."""
    if backend != "xnnpack":
        info = program_delegates(buffer)
        if BACKEND_IDS[backend] not in info["backends"] or info["inputs"] != [list(shape)]:
            raise InputError(where, f"a program with a {BACKEND_IDS[backend]} delegate and one input of shape "
                             f"{list(shape)}", f"delegates {info['backends']}, inputs {info['inputs']}")
        return
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
                      stem: str = "model", backend: str = "xnnpack",
                      coreml_target: str | None = None, taps: bool = False) -> list[Artifact]:
    """Write ``<stem>_<precision>.pte`` for each precision into ``out_dir``
    (``<stem>_<precision>_coreml.pte`` for ``backend="coreml"``, lowered for the
    ``coreml_target`` deployment target, default the Core ML exporter's). With ``taps``, an
    XNNPACK program also gets its tap program (``<stem>_<precision>.taps.pte``,
    ``exporters.executorch_taps``) and a layer map, for the first-divergent-layer search.

    ``input_shape`` is ``(1, C, H, W)``; ``calibration`` is float32 NCHW model inputs,
    already preprocessed (``int8`` refuses to run without them: random data would
    calibrate the ranges of noise). Artifact paths are relative to ``root`` (default:
    ``out_dir``). A model ``torch.export`` or the lowering cannot take is one
    ``InputError`` naming the model and the cause.
    """
    precisions = list(dict.fromkeys(precisions))
    if backend not in BACKEND_PRECISIONS:
        raise InputError("--executorch-backends", " or ".join(BACKEND_PRECISIONS), repr(backend))
    offered = BACKEND_PRECISIONS[backend]
    bad = [p for p in precisions if p not in offered]
    if bad or not precisions:
        raise InputError("--precisions", f"for executorch ({backend}), some of {', '.join(offered)}",
                         ", ".join(bad) or "none")
    if backend == "coreml":
        from exporters.coreml import DEFAULT_TARGET
        coreml_target = coreml_target or DEFAULT_TARGET
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
                source = _quantized(model, example, calib, backend) if precision == "int8" else model
                edge = _lower(torch.export.export(source, (example,)), backend, precision, coreml_target)
                split = delegation_split(edge.exported_program().graph_module, SPLIT_LABELS[backend])
                buffer = edge.to_executorch().buffer
                tapped = _tap_program(model, source, example, precision) if taps and backend == "xnnpack" else None
        except InputError:
            raise
        except Exception as exc:  # torch.export, PT2E and the lowering raise many types
            label = SPLIT_LABELS[backend]
            what = f"PT2E int8 quantization ({label}Quantizer) and " if precision == "int8" else ""
            raise InputError(where, f"a model torch.export, {what}ExecuTorch's {label} lowering can take",
                             error_line_with_cause(exc)) from exc
        seconds = time.perf_counter() - t0
        variant = "" if backend == "xnnpack" else backend         # XNNPACK's names are unchanged
        tail = f"_{variant}" if variant else ""
        _check_program(buffer, input_shape, f"{where} ({precision}{tail} .pte)", backend)
        path = atomic_write_bytes(out_dir / f"{stem}_{precision}{tail}{FILE_SUFFIX}", buffer)
        extra: dict[str, Any] = {
            "executorch_version": version, "export_seconds": round(seconds, 3),
            "method": METHOD, "delegation": split,
            "input": "float32 NCHW tensor, normalised as manifest.json preprocessing says (the app does it)",
            "metadata": "none in the .pte: labels and preprocessing are in manifest.json next to it",
            "backend": backend,
        }
        if tapped is not None:
            extra.update(_write_taps(tapped, buffer, path, root, example, len(out_specs)))
        if backend == "coreml":
            extra.update({"minimum_deployment_target": coreml_target, "runs_on": APPLE_ONLY,
                          "compute_precision": "float16" if precision == "fp16" else "float32",
                          "coremltools_version": _coremltools_version()})
        if precision == "int8":
            assert calib is not None
            from importlib import metadata
            config = COREML_QUANTIZER_CONFIG if backend == "coreml" else QUANTIZER_CONFIG
            extra["quantization"] = {**config, "torchao_version": metadata.version("torchao")}
            extra["calibration"] = {"samples": int(len(calib)), "source": calibration_source or "caller"}
        artifacts.append(Artifact(
            path=str(path.resolve().relative_to(root.resolve())), format="executorch", precision=precision,
            variant=variant,
            inputs=[TensorSpec(INPUT_NAME, list(input_shape), "float32", "NCHW")], outputs=out_specs,
            sha256=sha256_of(path), size_bytes=size_of(path),
            tool=f"torch.export + executorch.exir.to_edge_transform_and_lower({_partitioner_name(backend)})",
            tool_version=version, extra=extra))
    return artifacts


def _tap_program(model: nn.Module, source: nn.Module, example: torch.Tensor,
                 precision: str) -> tuple[bytes, dict[str, str]] | str:
    """The tap program of the XNNPACK program just lowered from ``source`` (for int8, the
    converted PT2E graph itself, changed in place: call this after the shipped lowering),
    or the one-line reason it could not be built (the shipped file does not depend on it)."""
    from exporters.executorch_taps import folded_convolutions, tap_program
    try:
        # one float export serves both: its conv -> BatchNorm pairs (gone from an int8 graph,
        # whose node names are this export's) and, for fp32, the graph the taps are added to
        float_graph = torch.export.export(model, (example,)).module()
        folded = folded_convolutions(float_graph.graph)
        graph = source if precision == "int8" else float_graph
        return tap_program(graph, folded, example, _lower, quantized=precision == "int8")
    except Exception as exc:  # noqa: BLE001 -- torch.export and the lowering raise many types
        return error_line_with_cause(exc)


def _write_taps(tapped: tuple[bytes, dict[str, str]] | str, shipped: bytes, path: Path, root: Path,
                example: torch.Tensor, outputs: int) -> dict[str, Any]:
    """Write the tap program beside ``path`` and return the manifest's ``layer_map`` and
    ``taps`` entries. Its first outputs are run against the shipped program's on the
    example input: the taps must not change what the program computes (0.0 when the
    added outputs left every kernel as it was; recorded, so a fusion the taps broke shows)."""
    from exporters.executorch_taps import taps_path
    if isinstance(tapped, str):
        return {"taps": {"error": tapped}}
    buffer, layer_map = tapped
    with quiet():
        from executorch.runtime import Runtime
    where = f"{path.name} (tap program)"
    runs = [runtime_call(lambda b=b: Runtime.get().load_program(b).load_method(METHOD).execute([example]), where,
                         "a program the ExecuTorch runtime runs") for b in (shipped, buffer)]
    diff = max(float((a - b).abs().max()) for a, b in zip(runs[0][:outputs], runs[1][:outputs]))
    written = atomic_write_bytes(taps_path(path), buffer)
    return {"layer_map": layer_map,
            "taps": {"file": str(written.resolve().relative_to(root.resolve())), "layers": len(layer_map),
                     "size_bytes": size_of(written), "final_max_abs_vs_shipped": diff,
                     "note": "the same graph with each module's output as a program output, lowered the "
                             "same way: what the first-divergent-layer search compares (not for apps)"}}


def _partitioner_name(backend: str) -> str:
    return {"xnnpack": "XnnpackPartitioner", "coreml": "CoreMLPartitioner"}[backend]


def _coremltools_version() -> str:
    from importlib import metadata
    return metadata.version("coremltools")


def _check_calibration(calibration: np.ndarray | None, shape: Sequence[int]) -> np.ndarray:
    if calibration is None:
        raise InputError("--calibration", "calibration images for executorch int8 (a data set, an image "
                         "folder or .npy; the checkpoint's data set by default)", "none")
    return check_calibration(calibration, shape)


# -- the registered exporter -------------------------------------------------------------


@dataclass
class ExecuTorchOptions(ExporterOptions):
    """Which partitioners lower the program (one ``.pte`` per backend and precision), and
    the Core ML deployment target (shared with the Core ML exporter's ``--coreml-target``:
    one app, one minimum OS)."""
    backends: tuple[str, ...] | str = option(DEFAULT_BACKENDS, key="executorch_backends",
                                             flag="--executorch-backends")   # BACKENDS, a comma list
    coreml_target: str | None = option(None, key="coreml_target", flag="--coreml-target")
    # the tap program beside each XNNPACK .pte (per-layer divergence; a second copy of the weights)
    taps: bool = option(True, key="executorch_taps", flag="--executorch-taps")

    def checked(self) -> "ExecuTorchOptions":
        given = self.backends.split(",") if isinstance(self.backends, str) else list(self.backends or ())
        backends = tuple(dict.fromkeys(b.strip().lower() for b in given if b.strip()))
        bad = [b for b in backends if b not in BACKENDS]
        if bad or not backends:
            raise InputError("--executorch-backends", f"a comma list of {', '.join(BACKENDS)}",
                             ", ".join(bad) or "nothing")
        return ExecuTorchOptions(backends, self.coreml_target.strip() if self.coreml_target else None,
                                 bool(self.taps))

    def resolved(self) -> "ExecuTorchOptions":
        if "qnn" in self.backends:
            raise _qnn_refusal()
        from exporters.coreml import DEFAULT_TARGET, coreml_target
        return ExecuTorchOptions(self.backends, coreml_target(self.coreml_target) if self.coreml_target
                                 else DEFAULT_TARGET, self.taps)

    def changed_flags(self) -> list[str]:
        # --coreml-target is the Core ML exporter's flag too: never "ignored" on ExecuTorch's account
        return [f for f in super().changed_flags() if f != "--coreml-target"]

    def source(self) -> dict[str, Any]:
        # the target is recorded (by this exporter) only when a Core ML program was lowered for it
        return {k: v for k, v in super().source().items() if k != "coreml_target" or "coreml" in self.backends}


def _qnn_refusal() -> InputError:
    """Why ``qnn`` cannot lower here, found rather than assumed: ExecuTorch's Qualcomm
    partitioner imports (its ``PyQnnManagerAdaptor`` is in the wheel), but partitioning
    opens a QnnManager on the QNN SDK's HTP library (``libQnnHtp.so``), which only
    Qualcomm's SDK download carries. Without ``QNN_SDK_ROOT`` ExecuTorch would try to
    download that SDK in the middle of an export (here, offline: "Failed to set up QNN SDK"),
    so it is not attempted."""
    import os
    expected = "Qualcomm's QNN SDK for the QnnPartitioner (not on any package registry: download it, set QNN_SDK_ROOT)"
    try:
        with quiet():
            from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner  # noqa: F401
            from executorch.backends.qualcomm.python import PyQnnManagerAdaptor  # noqa: F401
    except ImportError as exc:
        return InputError("--executorch-backends qnn", expected, f"ImportError: {exc}")
    root = os.environ.get("QNN_SDK_ROOT")
    if not root:
        found = ("QNN_SDK_ROOT is not set (PyQnnManagerAdaptor imports, but lowering loads the SDK's "
                 "libQnnHtp.so); a .pte for Qualcomm NPUs is not written on this machine")
    elif not (Path(root) / "lib" / "x86_64-linux-clang" / "libQnnHtp.so").is_file():
        found = f"no lib/x86_64-linux-clang/libQnnHtp.so under QNN_SDK_ROOT={root}"
    else:
        found = (f"an SDK at QNN_SDK_ROOT={root}, but mdeploy's QNN lowering is not built: never run with "
                 "an SDK here (ExecuTorch's to_edge_transform_and_lower_to_qnn is the route)")
    return InputError("--executorch-backends qnn", expected, found)


class ExecuTorchExporter(Exporter):
    """``model_<precision>.pte``: fp32, and int8 (PT2E, XNNPACK quantizer) when asked;
    ``model_<precision>_coreml.pte`` (fp32, fp16, int8) with the ``coreml`` backend."""

    name = "executorch"
    format = "executorch"
    precisions = PRECISIONS
    default_precisions = DEFAULT_PRECISIONS
    options_type = ExecuTorchOptions

    def export(self, source: nn.Module, out_dir: Path, precisions: Sequence[str],
               ctx: ExportContext) -> list[Artifact]:
        o = self.options
        assert isinstance(o, ExecuTorchOptions)
        # --precisions is one list for every format: each backend takes the ones it lowers
        # (fp16 is Core ML's only); a backend with none of them is left out, all none is an error
        plan = {b: [p for p in precisions if p in BACKEND_PRECISIONS.get(b, ())] for b in o.backends}
        plan = {b: ps for b, ps in plan.items() if ps} or {o.backends[0]: list(precisions)}
        calib = ctx.calibration() if any("int8" in ps for ps in plan.values()) else None
        artifacts: list[Artifact] = []
        for backend, ps in plan.items():
            artifacts += export_executorch(
                source, out_dir, ps, input_shape=ctx.input_shape, calibration=calib,
                calibration_source=CALIBRATION_SOURCE if calib is not None else "", root=ctx.root,
                backend=backend, coreml_target=o.coreml_target, taps=o.taps)
        return artifacts
