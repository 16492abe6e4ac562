"""PyTorch -> Core ML ML Program (``.mlpackage``), ready for an iOS app.

Route: ``torch.jit.trace`` -> ``coremltools.convert(convert_to="mlprogram")`` with a
minimum deployment target (default iOS 17) and a compute precision per artifact (fp32,
or fp16: weights and activations in float16, the precision the GPU and the Neural
Engine run). Weight compression (int8, palettization, pruning) is applied afterwards
to a converted program: ``quantize/coreml.py`` (its ``coreml`` exporter offers them).

What an app gets (``input_kind="image"``, the default):

* an **image input** (``ImageType``, ``RGB``/``BGR``/``GRAYSCALE`` as the model was
  trained), so ``VNCoreMLRequest`` feeds a ``CVPixelBuffer`` directly. The model's
  normalisation ``(pixel * pixel_scale - mean_c) / std_c`` is folded in. Core ML's
  image preprocessing is ``scale * pixel + bias_c`` with ONE scalar ``scale`` and a
  per-channel ``bias``, so a per-channel ``std`` cannot be folded entirely: with
  ``s0 = mean(std)`` the image type does ``pixel * pixel_scale / s0 - mean_c / s0`` and
  a first op of the model multiplies channel ``c`` by ``s0 / std_c`` (a ``mul`` by a
  constant, recorded as ``extra["image_input"]["channel_scale"]``; absent when all
  ``std`` are equal, e.g. grey or ``(0.5, 0.5, 0.5)``);
* with labels, a **classifier**: a ``classify`` op over ``softmax(logits)`` (so
  ``VNClassificationObservation.confidence`` is a probability in [0, 1]), outputs
  ``classLabel`` and ``classLabel_probs``, **plus** the raw ``logits`` as a third
  output so parity can be checked on the numbers the model computes;
* metadata: author, license, version, description, input/output descriptions, and
  the preprocessing and labels as user-defined metadata.

``input_kind="tensor"`` gives a float32 ``MultiArray`` input ``input`` (NCHW,
already normalised) for users who preprocess themselves.

Every artifact records ``extra["layer_map"]`` (MIL variable -> PyTorch module call key,
``exporters/layer_map.py``) from the module scopes coremltools keeps on each op, so the
first-divergent-layer search can name the PyTorch module behind a MIL variable.

coremltools quirks handled here (coremltools 9.0):

* a classifier with an extra output fails inside coremltools (``IndexError`` in
  ``get_func_output``: ``func.output_types`` has the pre-classifier length). A one-line
  graph pass appended to the pipeline clears ``output_types`` once the passes that need
  them have run;
* for deployment targets >= iOS 16 and fp16 compute, inputs and outputs default to
  float16; they are pinned to float32 here (what apps and runners expect);
* ``MLModel.save`` insists on a ``.mlpackage`` suffix, so the atomic write builds the
  package in a temporary folder beside the target and renames it;
* the default pass ``common::fuse_elementwise_to_batchnorm`` turns a ``mul`` + ``add``
  by per-channel constants (GroupNorm's affine after its normalisation, a folded scale
  and shift) into ``batch_norm(mean=0, variance=1)`` without setting ``epsilon``, so
  the default 1e-5 scales the output by ``1/sqrt(1.00001)``: 5e-6 relative, enough to
  miss the fp32 tolerance (1e-5 absolute) on logits of a few units. The pass is
  removed from the pipeline (``FP32_UNSAFE_PASSES``); the ``mul`` and ``add`` stay.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from exporters.artifact import Artifact, ModelCard, Preprocessing, TensorSpec, sha256_of, size_of
from exporters.base import ExportContext, Exporter, ExporterOptions, option
from exporters.layer_map import call_key
from models.errors import InputError
from models.util import error_line

COMPUTE_PRECISIONS = ("fp32", "fp16")
INPUT_KINDS = ("image", "tensor")
DEFAULT_TARGET = "iOS17"
TENSOR_INPUT = "input"
IMAGE_INPUT = "image"
OUTPUT_NAME = "logits"
PROBS_NAME = "probabilities"
LABEL_OUTPUT = "classLabel"
_PASS_NAME = "mdeploy::clear_output_types"
_PLACEHOLDER = "__COREML__::"


class _CoreMLWrapper(nn.Module):
    """What is traced: the per-channel std remainder first, the softmax for a classifier last.

    The user's model sits at ``self.model`` so its module paths appear under ``model.``
    in the scopes and map back by dropping that prefix.
    """

    def __init__(self, model: nn.Module, channel_scale: list[float] | None, softmax: bool) -> None:
        super().__init__()
        self.model = model
        self.softmax = softmax
        scale = torch.tensor(channel_scale, dtype=torch.float32).view(1, -1, 1, 1) if channel_scale else None
        self.register_buffer("channel_scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> Any:
        if self.channel_scale is not None:
            x = x * self.channel_scale
        y = self.model(x)
        if self.softmax:
            return y, torch.softmax(y, dim=1)
        return y


def _ct():
    """coremltools, imported on first use (it imports TensorFlow when present: ~7 s)."""
    with quiet_coremltools():
        import coremltools as ct
    return ct


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """coremltools draws tqdm bars on stderr for every pass and logs version warnings
    ("Torch version ... has not been tested"); below ``pipeline/`` nothing prints."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def deployment_target(name: str | None) -> Any:
    """``"iOS17"`` / ``"macOS14"`` / ... -> ``ct.target``; ML Programs need iOS 15+."""
    ct = _ct()
    name = name or DEFAULT_TARGET
    target = getattr(ct.target, name, None)
    if target is None or target.value < ct.target.iOS15.value:
        known = [t.name for t in ct.target if t.value >= ct.target.iOS15.value]
        raise InputError("minimum deployment target", f"one of {', '.join(known)} (ML Programs need iOS 15+)",
                         repr(name))
    return target


def _register_pass() -> None:
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass
    if _PASS_NAME in PASS_REGISTRY:
        return

    @register_pass(namespace="mdeploy")
    class clear_output_types(AbstractGraphPass):  # noqa: N801 (coremltools names passes so)
        """Forget the declared output types after the passes that used them, so that the
        classifier exporter can keep ``logits`` beside ``classLabel``/``classLabel_probs``
        (coremltools 9.0 indexes ``output_types`` past its end otherwise)."""

        def apply(self, prog: Any) -> None:
            for fn in prog.functions.values():
                fn.output_types = None


def _check_normalisation(pre: Preprocessing) -> None:
    if pre.channel_order not in ("RGB", "BGR", "GRAY"):
        raise InputError("preprocessing", "channel order RGB, BGR or GRAY", repr(pre.channel_order))
    if len(pre.std) != pre.channels or len(pre.mean) != pre.channels:
        raise InputError("preprocessing", f"{pre.channels} mean/std values for {pre.channel_order}",
                         f"mean {list(pre.mean)}, std {list(pre.std)}")
    if any(float(s) <= 0 for s in pre.std):
        raise InputError("preprocessing", "positive std values", f"std {list(pre.std)}")


def image_folding(pre: Preprocessing) -> dict[str, Any]:
    """Core ML ``ImageType(scale, bias)`` plus the per-channel remainder (see module doc)."""
    _check_normalisation(pre)
    std = [float(s) for s in pre.std]
    mean = [float(m) for m in pre.mean]
    s0 = float(np.mean(std))
    equal = all(abs(s - std[0]) <= 1e-12 * abs(std[0]) for s in std)
    if equal:
        s0 = std[0]
    return {
        "color_layout": {"RGB": "RGB", "BGR": "BGR", "GRAY": "GRAYSCALE"}[pre.channel_order],
        "scale": float(pre.pixel_scale) / s0,
        "bias": [-m / s0 for m in mean],
        "channel_scale": None if equal else [s0 / s for s in std],
        "mean": mean, "std": std, "pixel_scale": float(pre.pixel_scale),
    }


def _input_type(kind: str, shape: tuple[int, ...], pre: Preprocessing) -> tuple[Any, dict[str, Any] | None]:
    ct = _ct()
    if kind == "tensor":
        return ct.TensorType(name=TENSOR_INPUT, shape=shape, dtype=np.float32), None
    if shape[1] not in (1, 3) or shape[1] != pre.channels:
        raise InputError("input_kind image", f"a 1- or 3-channel model matching {pre.channel_order}",
                         f"{shape[1]} input channels (use input_kind='tensor')")
    fold = image_folding(pre)
    layout = getattr(ct.colorlayout, fold["color_layout"])
    return ct.ImageType(name=IMAGE_INPUT, shape=shape, scale=fold["scale"], bias=fold["bias"],
                        color_layout=layout), fold


def _check_labels(labels: Sequence[str] | None, classes: int) -> list[str] | None:
    if labels is None:
        return None
    labels = [str(x) for x in labels]
    if len(labels) != classes:
        raise InputError("labels", f"{classes} labels (one per model output)", f"{len(labels)}")
    if len(set(labels)) != len(labels):
        raise InputError("labels", "distinct labels (a classifier maps label -> probability)", "duplicates")
    return labels


def export_coreml(model: nn.Module, out_dir: str | Path, precisions: Iterable[str], *,
                  preprocessing: Preprocessing, labels: Sequence[str] | None = None,
                  card: ModelCard | None = None, input_kind: str = "image",
                  minimum_deployment_target: str | None = None, batch_size: int = 1,
                  root: str | Path | None = None) -> list[Artifact]:
    """Convert ``model`` to one ``.mlpackage`` per compute precision (``fp32``, ``fp16``).

    ``preprocessing`` gives the input size, channel order and normalisation; ``labels``
    make the artifact a classifier. Files are ``<name>_<precision>.mlpackage`` (image
    input) or ``<name>_<precision>_tensor.mlpackage`` in ``out_dir``; artifact paths are
    relative to ``root`` (default ``out_dir``). Weight-compressed variants: see
    ``quantize.coreml.export_coreml_variants``.
    """
    precisions = list(dict.fromkeys(precisions))
    bad = [p for p in precisions if p not in COMPUTE_PRECISIONS]
    if bad or not precisions:
        raise InputError("Core ML precisions", f"some of {', '.join(COMPUTE_PRECISIONS)} "
                         "(weight compression: quantize.coreml.export_coreml_variants)", ", ".join(bad) or "none")
    if input_kind not in INPUT_KINDS:
        raise InputError("input_kind", " or ".join(INPUT_KINDS), repr(input_kind))
    if input_kind == "image" and batch_size != 1:
        raise InputError("batch_size", "1 for an image input (Core ML images are single)", str(batch_size))
    out_dir = Path(out_dir)
    root = Path(root) if root is not None else out_dir
    card = card or ModelCard(name=type(model).__name__)
    target_name = minimum_deployment_target or DEFAULT_TARGET
    target = deployment_target(target_name)

    h, w = (int(preprocessing.input_size[0]), int(preprocessing.input_size[1]))
    shape = (batch_size, preprocessing.channels, h, w)
    _check_normalisation(preprocessing)
    model = model.eval().float()
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = model(example)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise InputError(type(model).__name__, f"a model taking {shape} ({preprocessing.channel_order} "
                         f"{h}x{w}, from the preprocessing)", error_line(exc, 300)) from None
    if not isinstance(y, torch.Tensor) or y.ndim != 2:
        raise InputError(type(model).__name__, "a model returning one (N, classes) logits tensor",
                         f"{type(y).__name__}{' of shape ' + str(list(y.shape)) if isinstance(y, torch.Tensor) else ''}")
    classes = int(y.shape[1])
    labels = _check_labels(labels, classes)
    input_type, fold = _input_type(input_kind, shape, preprocessing)
    wrapper = _CoreMLWrapper(model, fold["channel_scale"] if fold else None, softmax=labels is not None).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")                    # TracerWarnings about Python ints
        traced = torch.jit.trace(wrapper, example, check_trace=False)

    artifacts = []
    for precision in precisions:
        t0 = time.perf_counter()
        mlmodel = _convert(traced, input_type, precision, target, labels)
        seconds = time.perf_counter() - t0
        layer_map = layer_map_from_mil(mlmodel._mil_program)
        _describe(mlmodel, card, preprocessing, labels, input_kind, fold, classes)
        stem = _safe_stem(card.name)
        path = out_dir / f"{stem}_{precision}{'' if input_kind == 'image' else '_tensor'}.mlpackage"
        save_mlpackage(mlmodel, path)
        spec = mlmodel.get_spec()
        artifacts.append(Artifact(
            path=str(path.resolve().relative_to(root.resolve())), format="mlpackage", precision=precision,
            inputs=[_input_spec(input_kind, shape)], outputs=[TensorSpec(OUTPUT_NAME, [batch_size, classes],
                                                                         "float32", "NC")],
            sha256=sha256_of(path), size_bytes=size_of(path), tool="coremltools",
            tool_version=_ct().__version__, variant=input_kind,
            extra=artifact_extra(spec, layer_map=layer_map, precision=precision, target=target_name,
                                 input_kind=input_kind, fold=fold, labels=labels, seconds=seconds),
        ))
    return artifacts


def _input_spec(kind: str, shape: tuple[int, ...]) -> TensorSpec:
    n, c, h, w = shape
    if kind == "image":      # what the app passes: an 8-bit image (CVPixelBuffer), not a tensor
        return TensorSpec(IMAGE_INPUT, [n, h, w, c], "uint8", "NHWC")
    return TensorSpec(TENSOR_INPUT, [n, c, h, w], "float32", "NCHW")


# Default coremltools passes that change fp32 numbers beyond summation order (see the
# module docstring): fuse_elementwise_to_batchnorm adds an epsilon of 1e-5 to a variance of 1.
FP32_UNSAFE_PASSES = ("common::fuse_elementwise_to_batchnorm",)


def _convert(traced: Any, input_type: Any, precision: str, target: Any, labels: list[str] | None) -> Any:
    ct = _ct()
    outputs = [ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)]
    kwargs: dict[str, Any] = {}
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(set(FP32_UNSAFE_PASSES))
    kwargs["pass_pipeline"] = pipeline
    if labels is not None:
        _register_pass()
        outputs.append(ct.TensorType(name=PROBS_NAME, dtype=np.float32))
        pipeline.append_pass(_PASS_NAME)
        kwargs["classifier_config"] = ct.ClassifierConfig(labels, predicted_feature_name=LABEL_OUTPUT,
                                                          predicted_probabilities_output=PROBS_NAME)
    compute = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    try:
        with quiet_coremltools():
            return ct.convert(traced, inputs=[input_type], outputs=outputs, convert_to="mlprogram",
                              compute_precision=compute, minimum_deployment_target=target,
                              skip_model_load=True, **kwargs)
    except (RuntimeError, ValueError, NotImplementedError, TypeError, KeyError) as exc:
        raise InputError("model", "a model coremltools can convert to an ML Program",
                         error_line(exc, 300)) from exc


def _describe(mlmodel: Any, card: ModelCard, pre: Preprocessing, labels: list[str] | None,
              kind: str, fold: dict[str, Any] | None, classes: int) -> None:
    """Model card, input/output descriptions and user metadata: what Xcode shows."""
    mlmodel.author = card.author or "mdeploy"
    mlmodel.license = card.license or "unspecified"
    mlmodel.version = card.version
    mlmodel.short_description = card.description or (
        f"{card.name}: image classifier, {classes} classes" + (f" ({', '.join(labels[:5])}"
                                                               f"{', ...' if len(labels) > 5 else ''})" if labels else ""))
    h, w = pre.input_size
    norm = f"(pixel * {pre.pixel_scale:.6g} - mean) / std with mean {list(pre.mean)}, std {list(pre.std)}"
    if kind == "image":
        mlmodel.input_description[IMAGE_INPUT] = (
            f"{fold['color_layout']} image, {w}x{h} pixels ({pre.resize_note()}); normalised inside the model "
            f"as {norm}")
    else:
        mlmodel.input_description[TENSOR_INPUT] = (
            f"float32 NCHW tensor (1, {pre.channels}, {h}, {w}), channels {pre.channel_order}, "
            f"already normalised: {norm}")
    mlmodel.output_description[OUTPUT_NAME] = f"raw class scores (logits), shape (1, {classes})"
    if labels is not None:
        mlmodel.output_description[LABEL_OUTPUT] = "most likely label"
        mlmodel.output_description[LABEL_OUTPUT + "_probs"] = "label -> probability (softmax of the logits)"
    meta = mlmodel.user_defined_metadata
    meta["mdeploy.model"] = card.name
    meta["mdeploy.preprocessing"] = json.dumps({
        "input_size": list(pre.input_size), "mean": list(pre.mean), "std": list(pre.std),
        "channel_order": pre.channel_order, "pixel_scale": pre.pixel_scale, "resize": pre.resize})
    if labels is not None:
        meta["mdeploy.labels"] = json.dumps(labels)
        if kind == "image":
            meta["com.apple.coreml.model.preview.type"] = "imageClassifier"   # Xcode's preview tab


def _safe_stem(name: str) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._")
    return stem or "model"


def save_mlpackage(mlmodel: Any, path: str | Path) -> Path:
    """Write the package beside ``path`` under a temporary name, then rename it in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / "model.mlpackage"
        mlmodel.save(str(tmp))
        if path.exists():
            old = path.parent / f".{path.name}.old{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


# -- what the artifact records ---------------------------------------------------------------

def program_ops(spec: Any) -> list[Any]:
    """The main function's operations of an ML Program spec (proto messages)."""
    fn = spec.mlProgram.functions["main"]
    return list(fn.block_specializations[fn.opset].operations)


def op_counts(spec: Any) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for op in program_ops(spec):
        counts[op.type] += 1
    return dict(sorted(counts.items()))


def program_var_names(spec: Any) -> set[str]:
    return {o.name for op in program_ops(spec) for o in op.outputs}


def artifact_extra(spec: Any, *, layer_map: dict[str, str], precision: str, target: str, input_kind: str,
                   fold: dict[str, Any] | None, labels: list[str] | None, seconds: float | None = None
                   ) -> dict[str, Any]:
    names = program_var_names(spec)
    extra: dict[str, Any] = {
        "compute_precision": precision,
        "minimum_deployment_target": target,
        "specification_version": int(spec.specificationVersion),
        "opset": spec.mlProgram.functions["main"].opset,
        "input_kind": input_kind,
        "weights": {"fp32": "float32", "fp16": "float16"}.get(precision, precision),
        "ops": op_counts(spec),
        "intermediate_layout": "NCHW",
        "layer_map": {t: k for t, k in layer_map.items() if t in names},
    }
    if fold is not None:
        extra["image_input"] = fold
    if labels is not None:
        extra["classifier"] = {"label_output": LABEL_OUTPUT, "probabilities_output": LABEL_OUTPUT + "_probs",
                               "probabilities": "softmax(logits)", "classes": len(labels)}
    if seconds is not None:
        extra["convert_seconds"] = round(seconds, 3)
    return extra


def _module_chain(op: Any) -> list[str] | None:
    """Module paths enclosing a pymil op (outermost first, the wrapper's ``model`` prefix
    dropped); None when the op has no TorchScript scope (made by a graph pass)."""
    from coremltools.converters.mil.mil.scope import ScopeSource
    names = list(op.scopes.get(ScopeSource.TORCHSCRIPT_MODULE_NAME, []))
    if not names or any(str(n).startswith(_PLACEHOLDER) for n in names):
        return None
    names = names[:-1]                     # the last entry is the TorchScript value, not a module
    if not names or names[0] != "model":
        return []                          # the wrapper's own ops (channel scale, softmax)
    chain, path = [], ""
    for n in names[1:]:
        path = f"{path}.{n}" if path else str(n)
        chain.append(path)
    return chain


def layer_map_from_mil(prog: Any) -> dict[str, str]:
    """MIL variable -> module call key, from the scopes coremltools keeps on each op.

    Same rule as for ONNX (``exporters/layer_map.py``): a variable is the output of module
    M when an op inside M produces it and an op outside M (or the program output) reads
    it; the innermost such module names it, and the k-th such variable of M is call k.
    """
    fn = prog.functions["main"]
    produced: list[tuple[str, list[str]]] = []
    consumers: dict[str, list[list[str]]] = defaultdict(list)
    for op in fn.operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            continue
        chain = _module_chain(op)
        for v in op.inputs.values():
            for var in (v if isinstance(v, (list, tuple)) else [v]):
                if getattr(var, "op", None) is not None or var.name in fn.inputs:
                    consumers[var.name].append(chain or [])
        if chain is None:
            continue
        for out in op.outputs:
            produced.append((out.name, chain))
    for out in fn.outputs:
        consumers[out.name].append([])
    counts: dict[str, int] = defaultdict(int)
    result: dict[str, str] = {}
    for name, chain in produced:
        users = consumers.get(name, [])
        if not chain or not users:
            continue
        owner = next((m for m in reversed(chain) if any(m not in u for u in users)), None)
        if owner is None:
            continue
        result[name] = call_key(owner, counts[owner])
        counts[owner] += 1
    return result


# -- the registered exporter -----------------------------------------------------------------

INPUT_CHOICES = (*INPUT_KINDS, "both")     # both: one package of each per precision


@dataclass
class CoreMLOptions(ExporterOptions):
    input: str = option("image", key="coreml_input", flag="--coreml-input")           # INPUT_CHOICES
    target: str | None = option(None, key="coreml_target", flag="--coreml-target")  # None: DEFAULT_TARGET

    def checked(self) -> "CoreMLOptions":
        kind = str(self.input or "image").strip().lower()
        if kind not in INPUT_CHOICES:
            raise InputError("--coreml-input", " or ".join(INPUT_CHOICES), repr(self.input))
        target = self.target.strip() if self.target else None
        return CoreMLOptions(kind, target or None)

    def resolved(self) -> "CoreMLOptions":
        return CoreMLOptions(self.input, coreml_target(self.target) if self.target else DEFAULT_TARGET)

    @property
    def input_kinds(self) -> tuple[str, ...]:
        """"both": the image package, then the tensor one."""
        return INPUT_KINDS if self.input == "both" else (self.input,)


def coreml_target(name: str) -> str:
    """coremltools' spelling of a deployment target (``ios16`` -> ``iOS16``), checked by
    ``deployment_target`` (ML Programs: iOS 15 / macOS 12 and later)."""
    with quiet_coremltools():
        import coremltools as ct
    canonical = {n.lower(): n for n in ct.target.__members__}.get(name.lower(), name)
    try:
        deployment_target(canonical)
    except InputError as exc:
        raise InputError("--coreml-target", f"{exc.expected}, or macOS12+, tvOS15+, watchOS8+",
                         repr(name)) from None
    return canonical


class CoreMLExporter(Exporter):
    """One ``.mlpackage`` per compute precision and input kind. Weight-compressed
    variants are a second ``coreml`` exporter, in ``quantize.coreml``."""

    name = "coreml"
    format = "coreml"
    precisions = COMPUTE_PRECISIONS
    default_precisions = COMPUTE_PRECISIONS
    options_type = CoreMLOptions

    def export(self, source: nn.Module, out_dir: Path, precisions: Sequence[str],
               ctx: ExportContext) -> list[Artifact]:
        o = self.options
        assert isinstance(o, CoreMLOptions)
        made: list[Artifact] = []
        for kind in o.input_kinds:
            made += export_coreml(source, out_dir, precisions, preprocessing=ctx.preprocessing,
                                  labels=ctx.labels, card=ctx.card, input_kind=kind,
                                  minimum_deployment_target=o.target, root=ctx.root)
        return made
