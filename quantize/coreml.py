"""Core ML weight compression with ``coremltools.optimize.coreml``: smaller apps, same graph.

Post-training, data-free compression of the *weights* of a converted ML Program; the
activations keep the program's compute precision. Each scheme is a precision name of
the artifact:

==========  ===============================================================  ===========
precision   what is stored                                                   vs fp32
==========  ===============================================================  ===========
int8w       int8 weights, linear symmetric, one scale per output channel     ~4x smaller
palette6    6-bit indices into a 64-entry k-means LUT per tensor (palettize)  ~5.3x
palette4    4-bit indices into a 16-entry k-means LUT per tensor              ~8x
prune<NN>   magnitude pruning to NN% zeros, stored sparse (bit mask + values) depends
==========  ===============================================================  ===========

Core ML decompresses these at load time or on the fly (``constexpr_affine_dequantize``,
``constexpr_lut_to_dense``, ``constexpr_sparse_to_dense``; on iOS 18+ targets the
``constexpr_blockwise_shift_scale`` form), so the gain is download and disk size, and
memory bandwidth on the Neural Engine, not arithmetic. The compressed program is made
from the **fp16** program by default (Apple's recommended starting point: the Neural
Engine computes in fp16 anyway, and LUT entries / scales are then stored in fp16),
so an ``int8w`` artifact's error is int8 weights *plus* fp16 activations.

Only weights with at least ``weight_threshold`` elements (coremltools' default, 2048)
are compressed: biases and tiny kernels stay as they are, which is why a small model
shrinks less than the table says.

Palettization runs k-means (scikit-learn) per weight tensor: the slowest scheme, a few
seconds for a mobile CNN.
"""
from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch.nn as nn

from exporters.artifact import Artifact, ModelCard, Preprocessing, sha256_of, size_of
from exporters.base import ExportContext, Exporter
from exporters.coreml import (COMPUTE_PRECISIONS, CoreMLOptions, artifact_extra, export_coreml, program_ops,
                              quiet_coremltools, save_mlpackage)
from models.errors import InputError

DEFAULT_WEIGHT_THRESHOLD = 2048
_PRUNE = re.compile(r"^prune(\d{1,2})$")


@dataclass(frozen=True)
class Compression:
    name: str
    kind: str                  # "linear" | "palettize" | "prune"
    nbits: int | None = None
    sparsity: float | None = None

    def describe(self) -> dict[str, Any]:
        if self.kind == "linear":
            return {"method": "linear_quantize_weights", "mode": "linear_symmetric", "dtype": "int8",
                    "granularity": "per_channel"}
        if self.kind == "palettize":
            return {"method": "palettize_weights", "mode": "kmeans", "nbits": self.nbits,
                    "granularity": "per_tensor"}
        return {"method": "prune_weights", "mode": "magnitude", "target_sparsity": self.sparsity}


COMPRESSIONS: dict[str, Compression] = {
    "int8w": Compression("int8w", "linear", nbits=8),
    "palette4": Compression("palette4", "palettize", nbits=4),
    "palette6": Compression("palette6", "palettize", nbits=6),
    "prune50": Compression("prune50", "prune", sparsity=0.5),
}


def compression(name: str) -> Compression:
    """A scheme by precision name; ``prune<NN>`` for any sparsity from 1 to 99 %."""
    if name in COMPRESSIONS:
        return COMPRESSIONS[name]
    m = _PRUNE.match(name)
    if m and 0 < int(m.group(1)) < 100:
        return Compression(name, "prune", sparsity=int(m.group(1)) / 100)
    raise InputError("Core ML precision", f"one of {', '.join([*COMPUTE_PRECISIONS, *COMPRESSIONS])} "
                     "or prune<NN>", repr(name))


def is_compression(name: str) -> bool:
    try:
        compression(name)
        return True
    except InputError:
        return False


def _config(c: Compression, weight_threshold: int, mlmodel: Any) -> Any:
    import coremltools.optimize.coreml as cto
    if c.kind == "linear":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=weight_threshold)
    elif c.kind == "palettize":
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=c.nbits, granularity="per_tensor",
                                    weight_threshold=weight_threshold)
    else:
        return _magnitude_prune_config(mlmodel, c.sparsity or 0.0, weight_threshold)
    return cto.OptimizationConfig(global_config=op)


def _magnitude_prune_config(mlmodel: Any, sparsity: float, weight_threshold: int) -> Any:
    """Magnitude pruning as per-tensor thresholds computed here, in float32.

    coremltools' ``OpMagnitudePrunerConfig`` takes ``np.percentile`` of the weights in
    their own dtype; with NumPy 2 and fp16 weights the percentile's index arithmetic is
    done in float16 and overflows for tensors above 65,504 elements, so the largest
    layers silently stay dense (seen: a 143,360-weight 1x1 conv at 0 % sparsity). The
    same rule, ``|w| <= percentile(|w|, sparsity)``, applied through the threshold
    pruner with each tensor's own threshold gives the requested sparsity everywhere.
    """
    import coremltools.optimize.coreml as cto
    configs = {}
    for name, meta in cto.get_weights_metadata(mlmodel, weight_threshold=weight_threshold).items():
        mag = np.abs(np.asarray(meta.val, dtype=np.float32))
        configs[name] = cto.OpThresholdPrunerConfig(
            threshold=float(np.percentile(mag, sparsity * 100.0)), minimum_sparsity_percentile=0.0,
            weight_threshold=weight_threshold)
    return cto.OptimizationConfig(op_name_configs=configs)


def compress_mlmodel(mlmodel: Any, scheme: str, weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> Any:
    """Apply one scheme to an ML Program ``MLModel``; returns the compressed ``MLModel``.

    A classifier's ``classify`` op is set aside during compression and put back after
    (see ``_ClassifierHead``): coremltools 9.0 re-runs its pass pipeline on the
    program, which may move an output ``cast`` after ``classify``; its exporter then
    fails on the label list ("Unknown map from SSA type ... list ... to Proto type").
    """
    import coremltools.optimize.coreml as cto
    c = compression(scheme)
    fn = {"linear": cto.linear_quantize_weights, "palettize": cto.palettize_weights,
          "prune": cto.prune_weights}[c.kind]
    with quiet_coremltools():
        head = _ClassifierHead.detach(mlmodel)
        plain = head.model if head is not None else mlmodel
        out = fn(plain, _config(c, weight_threshold, plain))
        return head.attach(out) if head is not None else out


class _ClassifierHead:
    """The ``classify`` op of an ML Program classifier, taken off and put back on.

    Off: the op is removed, the variable it reads becomes a plain float32 output, the
    classifier outputs leave the description. On: the saved op is appended again and
    the outputs and predicted-feature names restored, unchanged.
    """

    def __init__(self, model: Any, op: Any, prob_var: str, block_outputs: list[str],
                 outputs: list[Any], predicted: tuple[str, str]) -> None:
        self.model, self.op, self.prob_var = model, op, prob_var
        self.block_outputs, self.outputs, self.predicted = block_outputs, outputs, predicted

    @staticmethod
    def _block(spec: Any) -> Any:
        fn = spec.mlProgram.functions["main"]
        return fn.block_specializations[fn.opset]

    @classmethod
    def detach(cls, mlmodel: Any) -> "_ClassifierHead | None":
        import coremltools as ct
        spec = mlmodel.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            return None
        block = cls._block(spec)
        idx = [i for i, op in enumerate(block.operations) if op.type == "classify"]
        if not idx:
            return None
        op = type(block.operations[idx[0]])()
        op.CopyFrom(block.operations[idx[0]])
        prob_var = op.inputs["probabilities"].arguments[0].name
        label_names = {o.name for o in op.outputs}
        saved_block_outputs = list(block.outputs)
        saved_outputs = [type(o)() for o in spec.description.output]
        for dst, src in zip(saved_outputs, spec.description.output):
            dst.CopyFrom(src)
        predicted = (spec.description.predictedFeatureName, spec.description.predictedProbabilitiesName)

        del block.operations[idx[0]]
        keep = [n for n in saved_block_outputs if n not in label_names]
        del block.outputs[:]
        block.outputs.extend([prob_var] + keep)
        template = next(o for o in saved_outputs if o.type.WhichOneof("Type") == "multiArrayType")
        kept = [o for o in saved_outputs if o.name not in label_names]
        del spec.description.output[:]
        prob = spec.description.output.add()
        prob.CopyFrom(template)
        prob.name = prob_var
        prob.shortDescription = ""
        spec.description.output.extend(kept)
        spec.description.predictedFeatureName = ""
        spec.description.predictedProbabilitiesName = ""
        model = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
        return cls(model, op, prob_var, saved_block_outputs, saved_outputs, predicted)

    def attach(self, compressed: Any) -> Any:
        import coremltools as ct
        spec = compressed.get_spec()
        block = self._block(spec)
        names = {o.name for op in block.operations for o in op.outputs}
        if self.prob_var not in names:
            raise RuntimeError(f"compression renamed the classifier's input {self.prob_var!r}")
        block.operations.append(self.op)
        del block.outputs[:]
        block.outputs.extend(self.block_outputs)
        del spec.description.output[:]
        spec.description.output.extend(self.outputs)
        spec.description.predictedFeatureName, spec.description.predictedProbabilitiesName = self.predicted
        return ct.models.MLModel(spec, weights_dir=compressed.weights_dir, skip_model_load=True)


def compress_coreml(base: Artifact, root: str | Path, schemes: Iterable[str], *,
                    out_dir: str | Path | None = None, out_root: str | Path | None = None,
                    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> list[Artifact]:
    """Compressed variants of a Core ML artifact (``base.path`` relative to ``root``).

    One ``.mlpackage`` per scheme in ``out_dir`` (default: beside the base), with paths
    relative to ``out_root`` (default ``root``). The base artifact's input, outputs,
    metadata and layer map carry over; ``extra`` records the scheme, the base precision
    and the size ratio to the base.
    """
    with quiet_coremltools():
        import coremltools as ct
    root = Path(root)
    src = base.resolve(root)
    out_dir = Path(out_dir) if out_dir is not None else src.parent
    out_root = Path(out_root) if out_root is not None else root
    mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
    stem = src.name[:-len(".mlpackage")] if src.name.endswith(".mlpackage") else src.name
    base_tag = f"_{base.precision}"
    artifacts = []
    for scheme in dict.fromkeys(schemes):
        c = compression(scheme)
        t0 = time.perf_counter()
        out = compress_mlmodel(mlmodel, scheme, weight_threshold)
        seconds = time.perf_counter() - t0
        name = stem.replace(base_tag, f"_{scheme}", 1) if base_tag in stem else f"{stem}_{scheme}"
        path = out_dir / f"{name}.mlpackage"
        save_mlpackage(out, path)
        spec = out.get_spec()
        extra = artifact_extra(spec, layer_map=base.extra.get("layer_map", {}), precision=base.precision,
                               target=base.extra.get("minimum_deployment_target", ""),
                               input_kind=base.extra.get("input_kind", base.variant),
                               fold=base.extra.get("image_input"), labels=None, seconds=None)
        if "classifier" in base.extra:
            extra["classifier"] = base.extra["classifier"]
        size = size_of(path)
        extra.update({
            "weights": _weights_label(c),
            "compression": {**c.describe(), "weight_threshold": weight_threshold,
                            "compressed_tensors": _compressed_tensors(spec),
                            "seconds": round(seconds, 3)},
            "base_precision": base.precision,
            "size_ratio_to_base": round(base.size_bytes / size, 3) if size else None,
        })
        artifacts.append(Artifact(
            path=str(path.resolve().relative_to(out_root.resolve())), format="mlpackage", precision=scheme,
            inputs=base.inputs, outputs=base.outputs, sha256=sha256_of(path), size_bytes=size,
            tool="coremltools.optimize.coreml", tool_version=ct.__version__, variant=base.variant,
            extra=extra))
    return artifacts


def _weights_label(c: Compression) -> str:
    if c.kind == "linear":
        return "int8"
    if c.kind == "palettize":
        return f"{c.nbits}-bit LUT"
    return f"sparse {c.sparsity:.0%}"


def _compressed_tensors(spec: Any) -> int:
    return sum(1 for op in program_ops(spec) if op.type.startswith("constexpr_"))


def export_coreml_variants(model: nn.Module, out_dir: str | Path, precisions: Sequence[str], *,
                           preprocessing: Preprocessing, labels: Sequence[str] | None = None,
                           card: ModelCard | None = None, input_kind: str = "image",
                           minimum_deployment_target: str | None = None, compress_from: str = "fp16",
                           weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD,
                           root: str | Path | None = None) -> list[Artifact]:
    """``export_coreml`` for fp32/fp16 plus compressed variants (int8w, palette4/6, pruneNN).

    Compressed variants are made from the ``compress_from`` program (fp16 by default);
    when that precision was not asked for itself, it is converted in a temporary folder
    and not kept.
    """
    precisions = list(dict.fromkeys(precisions))
    for p in precisions:
        if p not in COMPUTE_PRECISIONS:
            compression(p)                     # validates, one-line error naming the bad one
    if compress_from not in COMPUTE_PRECISIONS:
        raise InputError("compress_from", " or ".join(COMPUTE_PRECISIONS), repr(compress_from))
    plain = [p for p in precisions if p in COMPUTE_PRECISIONS]
    schemes = [p for p in precisions if p not in COMPUTE_PRECISIONS]
    out_dir = Path(out_dir)
    root = Path(root) if root is not None else out_dir
    common = dict(preprocessing=preprocessing, labels=labels, card=card, input_kind=input_kind,
                  minimum_deployment_target=minimum_deployment_target)
    arts = export_coreml(model, out_dir, plain, root=root, **common) if plain else []
    if not schemes:
        return arts
    base = next((a for a in arts if a.precision == compress_from), None)
    if base is not None:
        return arts + compress_coreml(base, root, schemes, out_dir=out_dir, weight_threshold=weight_threshold)
    with tempfile.TemporaryDirectory(prefix="mdeploy-coreml-base-") as tmp:
        base = export_coreml(model, tmp, [compress_from], **common)[0]
        return arts + compress_coreml(base, tmp, schemes, out_dir=out_dir, out_root=root,
                                      weight_threshold=weight_threshold)


class CoreMLCompressedExporter(Exporter):
    """The ``coreml`` precisions that are weight compression (int8w, palette4/6, prune50).

    A second ``coreml`` exporter beside ``exporters.coreml.CoreMLExporter``, registered
    here because compression is quantization (exporters never import quantize/). Each
    variant is made from the fp16 program: the one this export already wrote for the
    same input kind when there is one, else one converted in a temporary folder.
    """

    name = "coreml-compressed"
    format = "coreml"
    precisions = tuple(COMPRESSIONS)
    default_precisions = ()
    options_type = CoreMLOptions
    compress_from = "fp16"

    def export(self, source: nn.Module, out_dir: Path, precisions: Sequence[str],
               ctx: ExportContext) -> list[Artifact]:
        o = self.options
        assert isinstance(o, CoreMLOptions)
        made: list[Artifact] = []
        for kind in o.input_kinds:
            base = next((a for a in ctx.artifacts if a.format == "mlpackage" and a.variant == kind
                         and a.precision == self.compress_from and "compression" not in a.extra), None)
            if base is not None:
                made += compress_coreml(base, ctx.root, precisions, out_dir=out_dir)
                continue
            with tempfile.TemporaryDirectory(prefix="mdeploy-coreml-base-") as tmp:
                base = export_coreml(source, tmp, [self.compress_from], preprocessing=ctx.preprocessing,
                                     labels=ctx.labels, card=ctx.card, input_kind=kind,
                                     minimum_deployment_target=o.target)[0]
                made += compress_coreml(base, tmp, precisions, out_dir=out_dir, out_root=ctx.root)
        return made
