"""The export stage: one model in, an export folder out (``manifest.json`` + artifacts).

Used by ``mdeploy export`` and ``mdeploy run`` alike, without argparse: every choice is
an ``ExportOptions`` field. The folder is built in a staging sibling and swapped in
only when every format succeeded (``staged_output_dir``): a failure leaves the previous
folder (or nothing) behind, never half an export.

What is written:

* ``model.safetensors`` (format ``pt``): the weights plus the metadata that rebuilds
  the architecture (registry name and kwargs, or the absolute ``file.py:factory``), so
  ``verify`` has its PyTorch reference inside the folder;
* ``model.onnx`` when ``onnx`` is asked for (and as the source of ``tflite``, in a
  temporary folder when ``onnx`` itself is not asked for);
* whatever ``exporters.tflite.export_tflite`` / ``exporters.coreml.export_coreml``
  write, per precision (the ``.tflite`` input NHWC unless ``tflite_layout="NCHW"``; Core
  ML with an image input, a tensor input, or one package of each: ``coreml_input``);
* ``manifest.json``: preprocessing, labels, model card, every artifact, the versions.
"""
from __future__ import annotations

import importlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from exporters.artifact import (Artifact, Manifest, ModelCard, Preprocessing, TensorSpec,
                                library_versions, sha256_of, size_of)
from exporters.fileio import atomic_write_bytes, check_writable_output, staged_output_dir
from models.errors import InputError
from models.util import error_line, layout_for_ndim

FORMATS = ("onnx", "tflite", "coreml")
PT_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
COREML_INPUTS = ("image", "tensor", "both")     # both: an image and a tensor package per precision
TFLITE_LAYOUTS = ("NHWC", "NCHW")
CARD_FIELDS = ("name", "description", "version", "author", "license")   # exporters.artifact.ModelCard
_EXPORTER_MODULES = {"tflite": ("exporters.tflite", "export_tflite"),
                     # compressed variants (int8w, palette4/6, pruneNN) live with quantization
                     "coreml": ("quantize.coreml", "export_coreml_variants")}


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] | None = None     # for tflite/coreml; None: each exporter's default
    input_size: int | None = None                 # default: checkpoint, else the model's own
    opset: int = 18
    dynamic_batch: bool = False
    simplify: bool = False
    labels: list[str] | None = None               # default: the checkpoint's
    num_classes: int | None = None                # registry models without a checkpoint
    in_chans: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None                # quantized tflite: data source (default: checkpoint's data)
    force: bool = False
    reparameterize: bool = True                   # export the deploy form (pipeline.stages.deploy_form)
    coreml_input: str = "image"                   # image | tensor | both
    coreml_target: str | None = None              # minimum deployment target; None: exporters.coreml's
    tflite_layout: str = "NHWC"                   # input layout of the .tflite (apps want NHWC)
    card: dict[str, str] = field(default_factory=dict)   # model card fields (CARD_FIELDS) over the defaults


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)


Progress = Callable[[str], None]


def read_labels(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "a labels file (one class name per line, or a JSON list)", "no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(path, "a JSON list of class names", f"invalid JSON ({exc.msg})") from None
        if not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels):
            raise InputError(path, "a JSON list of class names", f"a {type(labels).__name__}")
        return [str(x) for x in labels]
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise InputError(path, "one class name per line", "an empty file")
    return labels


def _resolve_spec(spec: str | None) -> str | None:
    """A ``file.py:factory`` spec with its file made absolute (recorded in the checkpoint)."""
    from models.checkpoint import is_factory_spec
    if spec and is_factory_spec(spec):
        file_part, _, func = spec.rpartition(":")
        return f"{Path(file_part).resolve()}:{func}"
    return spec


def _display_name(spec: str) -> str:
    from models.checkpoint import is_factory_spec
    if is_factory_spec(spec):
        file_part, _, func = spec.rpartition(":")
        return f"{Path(file_part).stem}:{func}"
    return spec


def _first_conv_channels(model: torch.nn.Module) -> int | None:
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            return int(mod.in_channels if isinstance(mod, torch.nn.Conv2d) else mod.in_features)
    return None


def _default_input_size(spec: str) -> int:
    from models.checkpoint import is_factory_spec
    from models.registry import model_entry
    if is_factory_spec(spec):
        return 224
    return model_entry(spec).input_size


def resolve_preprocessing(model: torch.nn.Module, meta: dict[str, Any], spec: str,
                          input_size: int | None) -> Preprocessing:
    """From the checkpoint's metadata where present, else defaults that fit the model."""
    size = input_size or meta.get("input_size") or _default_input_size(spec)
    chans = int(meta.get("in_chans") or _first_conv_channels(model) or 3)
    gray = chans == 1
    mean = meta.get("mean") or list(GRAY_MEAN if gray else IMAGENET_MEAN)
    std = meta.get("std") or list(GRAY_STD if gray else IMAGENET_STD)
    if len(mean) != chans or len(std) != chans:
        raise InputError("checkpoint metadata", f"mean/std with {chans} values (one per input channel)",
                         f"{len(mean)}/{len(std)}")
    order = meta.get("channel_order") or ("GRAY" if gray else "RGB")
    hw = list(size) if isinstance(size, (list, tuple)) else [int(size), int(size)]
    return Preprocessing(input_size=hw, mean=[float(m) for m in mean], std=[float(s) for s in std],
                         channel_order=order)


def _probe_outputs(model: torch.nn.Module, shape: tuple[int, ...], spec: str) -> list[torch.Tensor]:
    from exporters.onnx import flatten_outputs
    try:
        with torch.no_grad():
            outs = flatten_outputs(model(torch.zeros(shape)))
    except Exception as exc:  # a model that cannot take this input: say which input
        raise InputError(spec, f"a model accepting inputs of shape {list(shape)}", error_line(exc)) from None
    if not outs or any(o.ndim < 2 for o in outs):
        raise InputError(spec, "a model returning (batch, ...) tensors",
                         f"outputs of shapes {[list(o.shape) for o in outs]}")
    return outs


def _exporter(fmt: str) -> Callable[..., list[Artifact]]:
    mod_name, func = _EXPORTER_MODULES[fmt]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name != mod_name:
            raise
        raise InputError("--formats", f"a format whose exporter is installed ({mod_name} missing)",
                         repr(fmt)) from None
    return getattr(mod, func)


def _is_quantized(precision: str) -> bool:
    return not precision.lower().startswith(("fp32", "fp16", "float"))


def _calibration(source: str | None, pre: Preprocessing) -> np.ndarray | None:
    if not source:
        return None
    from quantize.calibration import load_calibration
    return load_calibration(source, pre)


def export_model(model_spec: str | None, out_dir: str | Path, *, checkpoint: str | Path | None = None,
                 options: ExportOptions | None = None, progress: Progress | None = None) -> ExportResult:
    """Build the model (registry name, ``file.py:factory``, or the checkpoint's own), then
    write the reference ``pt`` artifact, each requested format and ``manifest.json``."""
    opts = options or ExportOptions()
    say = progress or (lambda msg: None)
    formats = tuple(dict.fromkeys(f.strip().lower() for f in opts.formats if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError("--formats", f"a comma list of {', '.join(FORMATS)}", ", ".join(bad) or "nothing")
    exporters = {f: _exporter(f) for f in formats if f in _EXPORTER_MODULES}   # fail before work
    _check_precisions_known(exporters, opts.precisions)
    for fmt in exporters:
        _precisions_for(fmt, opts.precisions)
    app = _app_options(opts, formats)
    labels = list(opts.labels) if opts.labels else None
    check_writable_output(out_dir, opts.force)          # before minutes of work, not after

    from models.checkpoint import build_model
    say("building the model")
    overrides: dict[str, Any] = {"num_classes": opts.num_classes, "in_chans": opts.in_chans}
    if opts.model_kwargs:
        overrides["model_kwargs"] = dict(opts.model_kwargs)
    model, meta = build_model(_resolve_spec(model_spec), checkpoint, **overrides)
    spec = meta["model"]
    from pipeline.stages.deploy_form import deploy_form
    deploy = deploy_form(model, meta, reparameterize=opts.reparameterize, spec=spec)
    model, meta = deploy.model, deploy.meta
    if deploy.reparameterized:
        say(f"re-parameterized {len(deploy.modules)} modules into the deploy form")
    pre = resolve_preprocessing(model, meta, spec, opts.input_size)
    shape = (1, pre.channels, *pre.input_size)
    outs = _probe_outputs(model, shape, spec)
    num_classes = int(outs[0].shape[-1])
    labels = labels or meta.get("labels")
    if labels is not None and len(labels) != num_classes:
        raise InputError("labels", f"{num_classes} labels (one per output class)", f"{len(labels)}")

    meta = {**meta, "model": spec, "num_classes": num_classes, "in_chans": pre.channels,
            "input_size": pre.input_size[0] if pre.input_size[0] == pre.input_size[1] else pre.input_size,
            "mean": pre.mean, "std": pre.std, "channel_order": pre.channel_order,
            "labels": labels}
    name = _display_name(spec)
    default_card = {"name": name, "description": f"{name} image classifier ({num_classes} classes, "
                    f"{pre.channel_order} {pre.input_size[0]}x{pre.input_size[1]} input), exported by mdeploy"}
    card = ModelCard(**{**default_card, **app.card})          # --name/--description/... win
    seconds: dict[str, float] = {}
    artifacts: list[Artifact] = []
    with staged_output_dir(out_dir, opts.force) as stage:
        from models.checkpoint import checkpoint_bytes
        say("writing the PyTorch reference")
        pt_path = atomic_write_bytes(stage / PT_NAME, checkpoint_bytes(model, meta))
        artifacts.append(_pt_artifact(pt_path, pre, outs, "batch"))     # eager takes any batch

        with tempfile.TemporaryDirectory(prefix="mdeploy-onnx-") as tmp:
            onnx_path = None
            if "onnx" in formats or "tflite" in formats:
                say(f"exporting ONNX (opset {opts.opset})")
                t0 = time.perf_counter()
                onnx_path = (stage if "onnx" in formats else Path(tmp)) / ONNX_NAME
                from exporters.onnx import export_onnx
                art = export_onnx(model, onnx_path, shape, opset=opts.opset,
                                  dynamic_batch=opts.dynamic_batch, simplify=opts.simplify)
                seconds["onnx"] = time.perf_counter() - t0
                if "onnx" in formats:
                    artifacts.append(art)
            for fmt, func in exporters.items():
                say(f"exporting {fmt}")
                t0 = time.perf_counter()
                precisions = _precisions_for(fmt, opts.precisions)
                if fmt == "tflite":
                    calib = None
                    if precisions and any(_is_quantized(p) for p in precisions):
                        calib = _calibration(opts.calibration or meta.get("data"), pre)
                    made = func(onnx_path, stage, precisions or _default_precisions(fmt),
                                preprocessing=pre, labels=labels, card=card, calibration=calib,
                                layout=app.tflite_layout)
                else:
                    made = []
                    for kind in app.coreml_kinds:           # "both": the image package, then the tensor one
                        made += func(model, stage, precisions or _default_precisions(fmt),
                                     preprocessing=pre, labels=labels, card=card, input_kind=kind,
                                     minimum_deployment_target=app.coreml_target)
                seconds[fmt] = time.perf_counter() - t0
                artifacts.extend(_relative(a, stage) for a in made)

        source = {"model": spec, "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
                  "checkpoint_sha256": sha256_of(checkpoint) if checkpoint else None,
                  "data": meta.get("data"), "model_kwargs": meta.get("model_kwargs", {}),
                  "num_classes": num_classes, "in_chans": pre.channels, **deploy.source(),
                  "opset": opts.opset, "dynamic_batch": opts.dynamic_batch, **app.source(formats)}
        manifest = Manifest(model=name, preprocessing=pre, card=card, artifacts=artifacts,
                            labels=labels, source=source, versions=library_versions())
        manifest.save(stage)
    return ExportResult(Path(out_dir), manifest, seconds, deploy.warnings + app.warnings)


@dataclass
class _AppOptions:
    """``ExportOptions``' per-format app choices, checked and spelled as the exporters want."""
    coreml_kinds: tuple[str, ...]
    coreml_target: str | None
    tflite_layout: str
    card: dict[str, str]
    warnings: list[str]

    def source(self, formats: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "tflite" in formats:
            out["tflite_layout"] = self.tflite_layout
        if "coreml" in formats:
            out["coreml_input"] = "both" if len(self.coreml_kinds) > 1 else self.coreml_kinds[0]
            out["coreml_target"] = self.coreml_target
        return out


def _app_options(opts: ExportOptions, formats: tuple[str, ...]) -> _AppOptions:
    """Check ``coreml_input``, ``coreml_target``, ``tflite_layout`` and ``card`` before any work
    (one-line errors named after the CLI flags); options for a format not exported are
    ignored with a warning."""
    notes: list[str] = []
    kind = str(opts.coreml_input or "image").strip().lower()
    if kind not in COREML_INPUTS:
        raise InputError("--coreml-input", " or ".join(COREML_INPUTS), repr(opts.coreml_input))
    layout = str(opts.tflite_layout or "NHWC").strip().upper()
    if layout not in TFLITE_LAYOUTS:
        raise InputError("--tflite-layout", " or ".join(t.lower() for t in TFLITE_LAYOUTS),
                         repr(opts.tflite_layout))
    target = opts.coreml_target.strip() if opts.coreml_target else None
    if "coreml" in formats:
        from exporters.coreml import DEFAULT_TARGET
        target = _coreml_target(target) if target else DEFAULT_TARGET
    else:
        notes += [f"{flag} is ignored: coreml is not in --formats" for flag, on in
                  (("--coreml-input", kind != "image"), ("--coreml-target", target is not None)) if on]
        target = None
    if "tflite" not in formats and layout != "NHWC":
        notes.append("--tflite-layout is ignored: tflite is not in --formats")
    unknown = sorted(set(opts.card) - set(CARD_FIELDS))
    if unknown:
        raise InputError("model card", f"fields among {', '.join(CARD_FIELDS)}", ", ".join(unknown))
    card: dict[str, str] = {}
    for key, value in opts.card.items():
        if value is None:
            continue
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(f"--{key}", "text", f"a {type(value).__name__}")
        text = str(value).strip()
        if "\n" in text or "\r" in text:
            raise InputError(f"--{key}", "one line of text", "a line break")
        if key == "name" and not text:
            raise InputError("--name", "a non-empty model name", "an empty string")
        card[key] = text
    kinds = ("image", "tensor") if kind == "both" else (kind,)
    return _AppOptions(kinds, target, layout, card, notes)


def _coreml_target(name: str) -> str:
    """coremltools' spelling of a deployment target (``ios16`` -> ``iOS16``), checked by
    ``exporters.coreml.deployment_target`` (ML Programs: iOS 15 / macOS 12 and later)."""
    from exporters.coreml import deployment_target, quiet_coremltools
    with quiet_coremltools():
        import coremltools as ct
    canonical = {n.lower(): n for n in ct.target.__members__}.get(name.lower(), name)
    try:
        deployment_target(canonical)
    except InputError as exc:
        raise InputError("--coreml-target", f"{exc.expected}, or macOS12+, tvOS15+, watchOS8+",
                         repr(name)) from None
    return canonical


def _default_precisions(fmt: str) -> tuple[str, ...]:
    mod = importlib.import_module(_EXPORTER_MODULES[fmt][0])
    return tuple(getattr(mod, "DEFAULT_PRECISIONS", ("fp32",)))


def _supported_precisions(fmt: str) -> tuple[str, ...] | None:
    mod = importlib.import_module(_EXPORTER_MODULES[fmt][0])
    found = getattr(mod, "PRECISIONS", None) or getattr(mod, "COMPUTE_PRECISIONS", None)
    return tuple(found) if found else None


def _precisions_for(fmt: str, asked: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """``--precisions`` is one list for every format: each gets the ones it supports
    (``fp32,fp16,int8`` -> TFLite all three, Core ML fp32 and fp16)."""
    if not asked:
        return None
    supported = _supported_precisions(fmt)
    if supported is None:
        return tuple(asked)
    mine = tuple(p for p in asked if p in supported)
    if not mine:
        raise InputError("--precisions", f"for {fmt}, some of {', '.join(supported)}", ", ".join(asked))
    return mine


def _check_precisions_known(formats: dict[str, Any], asked: tuple[str, ...] | None) -> None:
    if not asked or not formats:
        return
    known: set[str] = set()
    for fmt in formats:
        supported = _supported_precisions(fmt)
        if supported is None:
            return
        known.update(supported)
    unknown = [p for p in asked if p not in known]
    if unknown:
        raise InputError("--precisions", f"some of {', '.join(sorted(known))}", ", ".join(unknown))


def _relative(a: Artifact, stage: Path) -> Artifact:
    """Exporters are asked for paths relative to the folder; make sure of it."""
    p = Path(a.path)
    if p.is_absolute():
        a.path = str(p.resolve().relative_to(stage.resolve()))
    return a


def _pt_artifact(path: Path, pre: Preprocessing, outs: list[torch.Tensor], batch: int | str) -> Artifact:
    import safetensors
    out_specs = [TensorSpec("logits" if i == 0 else f"output_{i}", [batch, *list(o.shape[1:])], "float32",
                            layout_for_ndim(o.ndim)) for i, o in enumerate(outs)]
    return Artifact(path=path.name, format="pt", precision="fp32",
                    inputs=[TensorSpec("input", [batch, pre.channels, *pre.input_size], "float32", "NCHW")],
                    outputs=out_specs, sha256=sha256_of(path), size_bytes=size_of(path),
                    tool="safetensors", tool_version=safetensors.__version__,
                    extra={"role": "reference"})
