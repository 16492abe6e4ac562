"""PyTorch -> ONNX through ``torch.onnx.export(dynamo=True)``, checked before it is kept.

Why the dynamo exporter: it is the supported path in torch 2.x (the TorchScript one is
frozen), it emits opset 18 cleanly, folds BatchNorm into the convolution, and records
for every node the module scope it came from; that scope is what lets the parity check
name the PyTorch module behind a diverging ONNX tensor (``exporters/layer_map.py``).

Names are part of the contract and stable: one input ``"input"`` (float32 NCHW) and one
output ``"logits"`` (float32, ``[batch, classes]``); a model with several outputs gets
``"logits"``, ``"output_1"``, ``"output_2"``, ... With ``dynamic_batch`` the first
dimension is the symbol ``"batch"``; every other dimension is fixed at export.

A file is written only after ``onnx.checker.check_model(full_check=True)`` (which also
runs strict shape inference) accepts it; the saved graph carries the inferred shapes
(``value_info``) so that runners can expose any intermediate tensor with its type.
Weights are embedded; only a model over protobuf's 2 GB limit gets an external data file,
``<name>.data`` beside the ``.onnx``, referenced by a relative path inside the folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from exporters.artifact import Artifact, TensorSpec, layout_for_ndim, sha256_of, size_of
from exporters.base import ExportContext, Exporter, ExporterOptions, option
from exporters.fileio import atomic_write_bytes
from exporters.layer_map import NAME_SCOPES_KEY, layer_map_from_onnx
from exporters.native_output import quiet
from models.errors import InputError
from models.util import error_line, error_line_with_cause, first_line

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
_PROTOBUF_LIMIT = 2_000_000_000 - 64_000_000   # headroom for the graph itself


def _example_input(input_shape: Sequence[int], dynamic_batch: bool) -> torch.Tensor:
    shape = list(input_shape)
    if dynamic_batch and shape[0] == 1:
        # torch.export specialises size-1 dimensions; trace with 2 so "batch" stays symbolic.
        shape[0] = 2
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen)


def output_names(n: int, output_name: str) -> list[str]:
    """The graph output names of a model with ``n`` outputs: ``output_name``, ``output_1``, ..."""
    return [output_name] + [f"output_{i}" for i in range(1, n)]


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in the order the exporter numbers graph outputs
    (nested tuples/lists/dicts depth-first)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten_outputs(o)]
    return []


def export_onnx(model: nn.Module, out_path: str | Path, input_shape: Sequence[int], *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, simplify: bool = False,
                input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> Artifact:
    """Export ``model`` (any ``nn.Module`` taking one NCHW tensor) to ``out_path``.

    ``input_shape`` is ``(N, C, H, W)``; N is the fixed batch unless ``dynamic_batch``.
    The returned ``Artifact.path`` is the file name: the caller's export folder is the
    file's folder. ``extra`` records the opset, the export time and the ``layer_map``.
    A model that ``torch.export`` cannot trace raises ``InputError`` naming the cause.
    """
    import onnx

    out_path = Path(out_path)
    if len(input_shape) != 4:
        raise InputError("input shape", "(N, C, H, W)", repr(tuple(input_shape)))
    model = model.eval()
    x = _example_input(input_shape, dynamic_batch)
    with torch.no_grad():
        outputs = flatten_outputs(model(x))
    if not outputs:
        raise InputError(type(model).__name__, "a model returning tensors", "no tensor output")
    out_names = output_names(len(outputs), output_name)
    dyn = ({0: torch.export.Dim(BATCH_DIM, min=1, max=4096)},) if dynamic_batch else None

    t0 = time.perf_counter()
    try:
        # the exporter logs warnings (torchvision ops it skips, FutureWarnings) and, when
        # tracing fails, dumps whole FX graphs to stderr: the failure becomes one line
        with quiet(native=False), torch.no_grad():
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=max(opset, DEFAULT_OPSET),
                                        input_names=[input_name], output_names=out_names,
                                        dynamic_shapes=dyn, optimize=True, verbose=False)
    except Exception as exc:  # torch.export / onnxscript raise many types
        raise InputError(type(model).__name__, "a model torch.onnx.export(dynamo=True) can export",
                         error_line_with_cause(exc)) from exc
    proto = program.model_proto
    layer_map = layer_map_from_onnx(proto)
    _strip_node_metadata(proto)
    if opset < DEFAULT_OPSET:
        proto = _downgrade(proto, opset)
    if simplify:
        proto = _simplify(proto)
    names = {o for n in proto.graph.node for o in n.output}
    layer_map = {t: m for t, m in layer_map.items() if t in names}
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise InputError("--opset", f"an opset the exporter writes for this model (asked {opset})",
                         f"opset {written} written")
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    proto.producer_name = "mdeploy (torch.onnx dynamo)"
    export_seconds = time.perf_counter() - t0

    _save_checked(proto, out_path)

    in_shape: list[int | str] = list(input_shape)
    if dynamic_batch:
        in_shape[0] = BATCH_DIM
    out_specs = []
    for name, t in zip(out_names, outputs):
        shape: list[int | str] = list(t.shape)
        if dynamic_batch and shape:
            shape[0] = BATCH_DIM
        out_specs.append(TensorSpec(name, shape, "float32", layout_for_ndim(t.ndim)))
    return Artifact(
        path=out_path.name, format="onnx", precision="fp32",
        inputs=[TensorSpec(input_name, in_shape, "float32", "NCHW")], outputs=out_specs,
        sha256=sha256_of(out_path), size_bytes=_size_with_data(out_path),
        tool="torch.onnx.export(dynamo=True)", tool_version=torch.__version__,
        extra={"opset": opset, "dynamic_batch": dynamic_batch, "simplified": simplify,
               "onnx_version": onnx.__version__, "export_seconds": round(export_seconds, 3),
               "external_data": _data_file(out_path).exists(), "layer_map": layer_map},
    )


def reweighted_onnx(src: str | Path, dst: str | Path, exported_from: nn.Module, model: nn.Module) -> bool:
    """Write ``src`` (exported from ``exported_from``) to ``dst`` with ``model``'s weights;
    ``False``, and nothing written, when the graph does not hold them one-to-one.

    Why: a torch ONNX export costs seconds even for a tiny network (tens of seconds for an
    EfficientNet), and quantization needs the same graph twice, before and after weight
    rounding. Swapping initializers is exact only where each changed tensor is one
    initializer of its own name, shape and old value; a tensor the exporter folded into
    another constant (a transpose, a fused scale) is not, so any float initializer outside
    the state dict with the element count of a changed tensor makes the answer ``False``
    (the caller exports again) rather than risk a graph half on the old weights.
    """
    import onnx
    from onnx import numpy_helper
    old = {k: v.detach().cpu() for k, v in exported_from.state_dict().items()}
    new = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if old.keys() != new.keys() or any(old[k].shape != new[k].shape for k in old):
        return False
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    proto = load_onnx(src)
    inits = {t.name: t for t in proto.graph.initializer}
    sizes = {old[k].numel() for k in changed}
    for t in proto.graph.initializer:
        if t.name not in old and t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) in sizes:
            return False
    for k in changed:
        t = inits.get(k)
        if t is None or t.data_type != onnx.TensorProto.FLOAT or tuple(t.dims) != tuple(old[k].shape) \
                or not np.array_equal(numpy_helper.to_array(t), old[k].numpy()):
            return False
    for k in changed:
        inits[k].CopyFrom(numpy_helper.from_array(new[k].numpy().astype(np.float32), k))
    _save_checked(proto, Path(dst))
    return True


def _downgrade(proto: Any, opset: int) -> Any:
    """Opsets below 18: the dynamo exporter only writes 18+, so convert with ONNX's version
    converter (tensor names survive, so the layer map does). Some ops have no adapter
    (ReduceMean 18 -> 17 fails in onnx 1.23): then say so rather than keep 18 silently,
    which is what ``torch.onnx.export`` itself does."""
    import onnx
    from onnx import version_converter
    try:
        converted = version_converter.convert_version(proto, opset)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # RuntimeError from the C++ adapters, ValidationError
        raise InputError("opset", f"an opset this model converts to ({DEFAULT_OPSET} or later always "
                         "works)", f"{opset}: {first_line(exc)}") from None
    return converted


def _simplify(proto: Any) -> Any:
    """onnxsim: constant folding and redundant-node removal, checked by onnxsim itself on
    random inputs; a failed check keeps the unsimplified graph out of the folder."""
    import onnxsim
    with quiet(native=False, python_stdout=True):   # it prints progress
        simplified, ok = onnxsim.simplify(proto, check_n=1)
    if not ok:
        raise RuntimeError("onnxsim produced a graph whose outputs differ from the original")
    return simplified


def _strip_node_metadata(proto: Any) -> None:
    """Drop the exporter's per-node stack traces, FX dumps and class paths: they hold the
    exporting machine's file paths and the Python module names of the user's code (a
    ``file.py:factory`` is imported under a generated module name), nothing an app needs,
    they make two exports of the same model differ, and they triple a small model's size.
    The module scopes stay, so the layer map can be rebuilt from the file alone."""
    strip_metadata(proto, keep_node_keys=_KEPT_NODE_METADATA)


_KEPT_NODE_METADATA = (NAME_SCOPES_KEY,)
# model-level metadata written by tools on the way, not by us: ORT's quantizer records
# that it ran shape inference ("onnx.infer": "onnxruntime.quant")
_LEFTOVER_MODEL_METADATA = ("onnx.infer",)


def strip_metadata(proto: Any, keep_node_keys: Sequence[str] = ()) -> None:
    """Make an ONNX file a function of the model, its options and the tool versions only:
    node ``metadata_props`` other than ``keep_node_keys``, the ``metadata_props`` the
    exporter puts on inputs, outputs, initializers and ``value_info`` (graph-signature
    kinds, original FX names), every ``doc_string``, ``value_info`` of tensors no node
    produces any more (left over after ORT's quantizer replaced them) and the tools'
    leftover model metadata are removed in place. Inputs, outputs, weights, opsets, the
    shapes of live tensors and our own model ``metadata_props`` stay. Used on exported and
    on quantized models, so equal weights give equal bytes (reproducible sha256)."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        _clear(graph, "doc_string")
        produced: set[str] = set()
        for node in graph.node:
            _clear(node, "doc_string")
            produced.update(o for o in node.output if o)
            keep = [(p.key, p.value) for p in node.metadata_props if p.key in keep_node_keys]
            del node.metadata_props[:]
            for k, v in keep:
                entry = node.metadata_props.add()
                entry.key, entry.value = k, v
            for attr in node.attribute:               # If/Loop/Scan bodies
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
        live = [v for v in graph.value_info if v.name in produced]
        if len(live) != len(graph.value_info):
            kept = [type(v)() for v in live]
            for new, old in zip(kept, live):
                new.CopyFrom(old)
            del graph.value_info[:]
            graph.value_info.extend(kept)
        for info in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            _clear(info, "doc_string")
            if hasattr(info, "metadata_props"):
                del info.metadata_props[:]
    _clear(proto, "doc_string")
    keep_model = [(p.key, p.value) for p in proto.metadata_props if p.key not in _LEFTOVER_MODEL_METADATA]
    del proto.metadata_props[:]
    for k, v in keep_model:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def _clear(message: Any, name: str) -> None:
    """Unset a proto2 field (an empty string assigned would still be written)."""
    if message.HasField(name):
        message.ClearField(name)


def _data_file(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".data")


def _size_with_data(onnx_path: Path) -> int:
    data = _data_file(onnx_path)
    return size_of(onnx_path) + (size_of(data) if data.exists() else 0)


def _save_checked(proto: Any, out_path: Path) -> None:
    """Check, then write atomically; over 2 GB, weights go to ``<name>.data`` beside it."""
    import onnx
    weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer)
    if weight_bytes < _PROTOBUF_LIMIT:
        onnx.checker.check_model(proto, full_check=True)
        atomic_write_bytes(out_path, proto.SerializeToString())
        return
    # Too large for one protobuf: save into a temporary sibling folder under the final
    # names (the .onnx refers to its data file by name), check from disk, move both in.
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = tmp / out_path.name
        onnx.save_model(proto, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=_data_file(out_path).name, size_threshold=1024)
        onnx.checker.check_model(str(staged), full_check=True)
        os.replace(tmp / _data_file(out_path).name, _data_file(out_path))
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_onnx(path: str | Path, *, load_weights: bool = True) -> Any:
    """Read an ONNX file; a missing, truncated or foreign file is an ``InputError``.

    External data is only read from inside the model's folder (``onnx.load`` refuses
    locations that escape it, and ``checker`` is not needed to enforce that).
    """
    import onnx
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "an ONNX model file", "no such file")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # DecodeError, ValidationError, OSError
        raise InputError(path, "a valid ONNX model", error_line(exc)) from None


def op_counts(model: Any) -> dict[str, int]:
    """Node count per op type of an ONNX ``ModelProto`` (or the file at a path), sorted by op."""
    from collections import Counter
    proto = model if hasattr(model, "graph") else load_onnx(model, load_weights=False)
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


# -- the registered exporter -------------------------------------------------------------

MIN_OPSET, MAX_OPSET = 7, 23          # what torch.onnx writes (torch.onnx._constants)

@dataclass
class OnnxOptions(ExporterOptions):
    opset: int = option(DEFAULT_OPSET, key="opset", flag="--opset")
    dynamic_batch: bool = option(False, key="dynamic_batch", flag="--dynamic-batch")
    simplify: bool = option(False, key="simplify", flag="--simplify")

    def checked(self) -> "OnnxOptions":
        """An opset the exporter can write: out of range it used to be recorded in the
        manifest while a different opset was written."""
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InputError("--opset", f"an ONNX opset from {MIN_OPSET} to {MAX_OPSET}", repr(self.opset))
        return self

    def changed_flags(self) -> list[str]:
        return []                   # the ONNX file is written whenever any format needs it

    def source(self) -> dict[str, Any]:
        return {}                   # opset and dynamic_batch are recorded with every export


class OnnxExporter(Exporter):
    """``model.onnx``: fp32, one precision, so ``--precisions`` does not apply."""

    name = "onnx"
    format = "onnx"
    takes_precisions = False
    options_type = OnnxOptions
    file_name = "model.onnx"

    def export(self, source: nn.Module, out_dir: Path, precisions: Sequence[str],
               ctx: ExportContext) -> list[Artifact]:
        o = self.options
        assert isinstance(o, OnnxOptions)
        return [export_onnx(source, Path(out_dir) / self.file_name, ctx.input_shape, opset=o.opset,
                            dynamic_batch=o.dynamic_batch, simplify=o.simplify)]
