"""The export stage: one model in, an export folder out (``manifest.json`` + artifacts).

Used by ``mdeploy export`` and ``mdeploy run`` alike, without argparse: every choice is
an ``ExportOptions`` field. The folder is built in a staging sibling and swapped in
only when every format succeeded (``staged_output_dir``): a failure leaves the previous
folder (or nothing) behind, never half an export.

What is written:

* ``model.safetensors`` (format ``pt``): the weights plus the metadata that rebuilds
  the architecture (registry name and kwargs, or the absolute ``file.py:factory``), so
  ``verify`` has its PyTorch reference inside the folder;
* what each registered exporter of a requested format writes (``exporters.base``): the
  stage loops over them with no per-format code. An exporter that reads another
  format's file (TFLite reads the ONNX file) gets it, written to a temporary folder
  when that format itself was not asked for. Each exporter's options are its own typed
  object, built from the flat ``ExportOptions`` values its fields name (``coreml_input``,
  ``tflite_layout``, ...) or given directly in ``ExportOptions.exporter_options``;
* ``manifest.json``: preprocessing, labels, model card, every artifact, the versions.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from exporters.artifact import (Artifact, Manifest, ModelCard, Preprocessing, TensorSpec, layout_for_ndim,
                                library_versions, sha256_of, size_of)
from exporters.base import (MODULE, ExportContext, Exporter, ExporterOptions, check_precisions_known,
                            exporter_classes, import_exporter_module, precisions_for)
from exporters.fileio import (atomic_write_bytes, check_distinct_from_inputs, check_writable_output,
                             staged_output_dir)
from models.errors import InputError
from models.images import RESIZE_FILTERS, check_image_source
from models.util import error_line, is_utf8

PT_NAME = "model.safetensors"
# Exporters registered outside exporters/ (which may not import them): Core ML weight
# compression is quantization and lives in quantize/.
PLUGIN_MODULES = ("quantize.coreml",)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224                     # a factory model with no size anywhere: assumed, and said so
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
CARD_FIELDS = ("name", "description", "version", "author", "license")   # exporters.artifact.ModelCard


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ("onnx",)
    precisions: tuple[str, ...] | None = None     # one list for all formats; None: each exporter's default
    input_size: int | str | list[int] | None = None   # N, "HxW" or [H, W]; default: checkpoint, else the model's own
    preprocessing: PreprocessingChoice | None = None  # mean/std, channel order, resize/crop; None: the model's own
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
    card: dict[str, str] = field(default_factory=dict)   # model card fields (CARD_FIELDS) over the defaults
    # The flat spelling of exporters' options, as the CLI flags and the config name them;
    # the stage never reads them: each exporter's options type picks its own keys.
    coreml_input: str = "image"                   # exporters.coreml.CoreMLOptions.input
    coreml_target: str | None = None              # exporters.coreml.CoreMLOptions.target
    tflite_layout: str = "NHWC"                   # exporters.tflite.TFLiteOptions.layout
    tflite_converter: str = "auto"                # exporters.tflite.TFLiteOptions.converter
    executorch_backends: str | tuple[str, ...] = "xnnpack"   # exporters.executorch.ExecuTorchOptions.backends
    executorch_taps: bool = True                               # ... .taps: tap programs for per-layer divergence
    exporter_options: dict[str, ExporterOptions] = field(default_factory=dict)  # exporter name -> typed options


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)     # defaulted values, one line each (also in the manifest)


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
    """A ``file.py:factory`` or ``.pt2`` spec with its file made absolute (recorded in the
    checkpoint, so verify and quantize rebuild the same model from anywhere)."""
    from models.checkpoint import is_factory_spec, is_program_spec
    if spec and is_factory_spec(spec):
        file_part, _, func = spec.rpartition(":")
        return f"{Path(file_part).resolve()}:{func}"
    if spec and is_program_spec(spec):
        return str(Path(spec).resolve())
    return spec


def _display_name(spec: str) -> str:
    from models.checkpoint import is_factory_spec, is_program_spec
    if is_factory_spec(spec):
        file_part, _, func = spec.rpartition(":")
        return f"{Path(file_part).stem}:{func}"
    if is_program_spec(spec):
        return Path(spec).stem
    return spec


def _first_conv_channels(model: torch.nn.Module) -> int | None:
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            return int(mod.in_channels if isinstance(mod, torch.nn.Conv2d) else mod.in_features)
    return None


def _registry_cfg(spec: str) -> tuple[dict[str, Any], int | list[int] | None]:
    """A registry model's published preprocessing (its entry's ``pretrained_cfg``, e.g.
    EfficientNet-Lite's (x - 127.5) / 127.5) and its paper resolution; nothing for a factory."""
    from models.checkpoint import is_factory_spec, is_program_spec, load_program
    from models.registry import model_entry
    if is_factory_spec(spec):
        return {}, None
    if is_program_spec(spec):            # the size it was exported with (its guards hold it)
        _, shape = load_program(spec)
        return {}, (list(shape[-2:]) if shape and len(shape) == 4 else None)
    entry = model_entry(spec)
    return dict(entry.pretrained_cfg or {}), entry.input_size


def _module_cfg(model: torch.nn.Module) -> dict[str, Any]:
    """The model's own timm-style config: a ``pretrained_cfg`` or ``default_cfg`` dict
    attribute (``mean``, ``std``, ``input_size``, ``interpolation``, ``crop_pct``)."""
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, name, None)
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


@dataclass
class PreprocessingChoice:
    """Preprocessing values given explicitly (CLI flags, config file, Python callers);
    None = not given. ``mean``/``std`` on either scale (``canonical_mean_std``)."""

    input_size: int | str | list[int] | tuple[int, ...] | None = None
    mean: list[float] | tuple[float, ...] | None = None
    std: list[float] | tuple[float, ...] | None = None
    channel_order: str | None = None          # RGB | BGR
    resize: str | None = None                 # bilinear | bicubic | nearest
    crop_pct: float | None = None             # timm's: resize to size / crop_pct, centre crop

    def fields(self) -> dict[str, Any]:
        """The ``Preprocessing`` fields these values set, checked (one-line errors)."""
        from models.images import canonical_mean_std, check_crop_pct, parse_size
        out: dict[str, Any] = {}
        if self.input_size is not None:
            out["input_size"] = parse_size(self.input_size)
        if (self.mean is None) != (self.std is None):
            raise InputError("--mean/--std", "both --mean and --std (or neither)",
                             "only --mean" if self.std is None else "only --std")
        if self.mean is not None:
            out["mean"], out["std"] = canonical_mean_std(self.mean, self.std)
        if self.channel_order is not None:
            order = str(self.channel_order).upper()
            if order not in ("RGB", "BGR"):
                raise InputError("--channel-order", "RGB or BGR", repr(self.channel_order))
            out["channel_order"] = order
        if self.resize is not None:
            if self.resize not in RESIZE_FILTERS:
                raise InputError("--resize", f"one of {', '.join(RESIZE_FILTERS)}", repr(self.resize))
            out["resize"] = self.resize
        if self.crop_pct is not None:
            out["crop_pct"] = check_crop_pct(self.crop_pct)
        return out


def resolve_preprocessing(model: torch.nn.Module, meta: dict[str, Any], spec: str,
                          input_size: int | list[int] | None = None,
                          given: PreprocessingChoice | None = None) -> tuple[Preprocessing, list[str]]:
    """The model's preprocessing and the list of values nobody gave (``assumed``).

    Each field comes from the first that has it: what the caller gives (``given``,
    ``input_size``), the checkpoint's metadata (mdeploy training records it), the
    module's own timm-style ``pretrained_cfg``/``default_cfg``, the registry entry's
    ``pretrained_cfg`` and paper resolution; only then a default, which is named in the
    returned list so the command can say it and the manifest can record it."""
    from models.images import canonical_mean_std, from_model_config, parse_size
    chans = int(meta.get("in_chans") or _first_conv_channels(model) or 3)
    gray = chans == 1
    reg_cfg, reg_size = _registry_cfg(spec)
    layers: list[dict[str, Any]] = []
    explicit = dict((given or PreprocessingChoice()).fields())
    if input_size is not None:
        explicit["input_size"] = parse_size(input_size)
    layers.append(explicit)
    ck: dict[str, Any] = {}
    if meta.get("input_size"):
        ck["input_size"] = parse_size(meta["input_size"], "checkpoint input_size")
    if meta.get("mean") and meta.get("std"):
        ck["mean"], ck["std"] = canonical_mean_std(meta["mean"], meta["std"], "checkpoint mean/std")
    for key in ("channel_order", "resize", "crop_pct"):
        if meta.get(key):
            ck[key] = meta[key]
    layers.append(ck)
    layers.append(from_model_config(_module_cfg(model)))
    reg = from_model_config(reg_cfg) if chans == 3 else {}
    if reg_size:
        reg.setdefault("input_size", parse_size(reg_size))
    layers.append(reg)

    def pick(key: str) -> Any:
        return next((layer[key] for layer in layers if layer.get(key) is not None), None)

    assumed: list[str] = []
    size = pick("input_size")
    if size is None:
        size = [DEFAULT_SIZE, DEFAULT_SIZE]
        assumed.append(f"input size = {DEFAULT_SIZE}x{DEFAULT_SIZE} (pass --input-size HxW if the model "
                       "was trained otherwise)")
    mean, std = pick("mean"), pick("std")
    if mean is None or std is None:
        mean, std = list(GRAY_MEAN if gray else IMAGENET_MEAN), list(GRAY_STD if gray else IMAGENET_STD)
        assumed.append(f"mean/std = {'(0.5)/(0.5)' if gray else 'ImageNet (0.485,0.456,0.406)/(0.229,0.224,0.225)'}"
                       " on 0-1 pixels (pass --mean/--std if the model was trained otherwise)")
    if len(mean) == 1 and chans == 3:
        mean, std = mean * 3, std * 3 if len(std) == 1 else std
    if len(std) == 1 and chans == 3:
        std = std * 3
    if len(mean) != chans or len(std) != chans:
        raise InputError("mean/std", f"{chans} values each (one per input channel) or one for all",
                         f"{len(mean)}/{len(std)}")
    order = pick("channel_order") or ("GRAY" if gray else "RGB")
    if gray:
        order = "GRAY"
    return Preprocessing(input_size=[int(v) for v in size], mean=[float(m) for m in mean],
                         std=[float(v) for v in std], channel_order=order,
                         resize=pick("resize") or "bilinear", crop_pct=pick("crop_pct")), assumed


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
    plan = _plan(formats, opts)                         # every choice checked before any work
    card_fields = _card(opts.card)
    if opts.preprocessing is not None:
        opts.preprocessing.fields()                     # bad --mean/--std/--input-size/...: before any work
    labels = list(opts.labels) if opts.labels else None
    check_writable_output(out_dir, opts.force)          # before minutes of work, not after
    from models.checkpoint import is_factory_spec, is_program_spec
    spec_file = (model_spec.rpartition(":")[0] if is_factory_spec(model_spec) else
                 model_spec if is_program_spec(model_spec) else None) if model_spec else None
    check_distinct_from_inputs(out_dir, checkpoint, spec_file)
    # the calibration images are read only when a quantized precision needs them, after the
    # float exports: their headers (a decompression bomb deep in the folder) are checked now
    check_image_source(opts.calibration)

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
    pre, assumed = resolve_preprocessing(model, meta, spec, opts.input_size, opts.preprocessing)
    shape = (1, pre.channels, *pre.input_size)
    outs = _probe_outputs(model, shape, spec)
    num_classes = int(outs[0].shape[-1])
    labels = labels or meta.get("labels")
    if labels is not None and len(labels) != num_classes:
        raise InputError("labels", f"{num_classes} labels (one per output class)", f"{len(labels)}")
    for label in labels or []:
        # TFLite and Core ML metadata are UTF-8: a lone surrogate (a non-UTF-8 folder name
        # read by Python) would fail deep inside their writers after minutes of converting
        if not isinstance(label, str) or not is_utf8(label):
            raise InputError(opts.labels and "--labels" or checkpoint or "labels",
                             "class names that are UTF-8 text", repr(label)[:60])
    if labels is None:
        assumed.append(f"labels = class indices 0..{num_classes - 1} (pass --labels FILE for class names)")

    meta = {**meta, "model": spec, "num_classes": num_classes, "in_chans": pre.channels,
            "input_size": pre.input_size[0] if pre.input_size[0] == pre.input_size[1] else pre.input_size,
            "mean": pre.mean, "std": pre.std, "channel_order": pre.channel_order,
            "resize": pre.resize, "crop_pct": pre.crop_pct, "labels": labels}
    name = _display_name(spec)
    default_card = {"name": name, "description": f"{name} image classifier ({num_classes} classes, "
                    f"{pre.channel_order} {pre.input_size[0]}x{pre.input_size[1]} input), exported by mdeploy"}
    card = ModelCard(**{**default_card, **card_fields})        # --name/--description/... win
    seconds: dict[str, float] = {}
    artifacts: list[Artifact] = []
    with staged_output_dir(out_dir, opts.force) as stage:
        from models.checkpoint import checkpoint_bytes
        say("writing the PyTorch reference")
        pt_path = atomic_write_bytes(stage / PT_NAME, checkpoint_bytes(model, meta))
        artifacts.append(_pt_artifact(pt_path, pre, outs, "batch"))     # eager takes any batch

        ctx = ExportContext(model=model, input_shape=shape, preprocessing=pre, root=stage, labels=labels,
                            card=card, calibration=_lazy(lambda: _calibration(opts.calibration or meta.get("data"),
                                                                              pre)),
                            artifacts=artifacts)
        with tempfile.TemporaryDirectory(prefix="mdeploy-export-") as tmp:
            files: dict[str, Path] = {}          # format -> its file, for the exporters that read it
            for step in plan.steps:
                cls = type(step.exporter)
                say(f"exporting {cls.name}" + (f" ({', '.join(step.precisions)})" if cls.takes_precisions else ""))
                dest = stage if step.wanted else Path(tmp)
                source_in = model if cls.needs == MODULE else files[cls.needs]
                t0 = time.perf_counter()
                made = step.exporter.export(source_in, dest, step.precisions,
                                            dataclasses.replace(ctx, root=dest))
                seconds[cls.format] = seconds.get(cls.format, 0.0) + time.perf_counter() - t0
                if made:
                    files.setdefault(cls.format, made[0].resolve(dest))
                if step.wanted:
                    artifacts.extend(_relative(a, stage) for a in made)

        source = {"model": spec, "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
                  "checkpoint_sha256": sha256_of(checkpoint) if checkpoint else None,
                  "data": meta.get("data"), "model_kwargs": meta.get("model_kwargs", {}),
                  "num_classes": num_classes, "in_chans": pre.channels, **deploy.source(),
                  "opset": opts.opset, "dynamic_batch": opts.dynamic_batch, **plan.source()}
        manifest = Manifest(model=name, preprocessing=pre, card=card, artifacts=artifacts,
                            labels=labels, source=source, versions=library_versions(), assumed=assumed)
        manifest.save(stage)
    return ExportResult(Path(out_dir), manifest, seconds, deploy.warnings + plan.warnings, assumed)


@dataclass
class _Step:
    exporter: Exporter
    precisions: tuple[str, ...]
    wanted: bool                       # False: only the input of a later exporter (temporary folder)


@dataclass
class _Plan:
    steps: list[_Step]
    warnings: list[str]

    def source(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for step in self.steps:
            if step.wanted:
                out.update(step.exporter.options.source())
        return out


def registered_exporters() -> list[type[Exporter]]:
    """Every exporter: the built-ins, then those registered above exporters/."""
    exporter_classes()
    for mod in PLUGIN_MODULES:
        import_exporter_module(mod)
    return exporter_classes()


def _plan(formats: tuple[str, ...], opts: ExportOptions) -> _Plan:
    """Which exporters run, in which order, with which precisions and options: all of it
    checked before any work (one-line errors named after the CLI flags). Options of an
    exporter whose format is not exported are still checked, and ignored with a warning
    when set."""
    classes = registered_exporters()
    known = tuple(dict.fromkeys(cls.format for cls in classes))
    bad = [f for f in formats if f not in known]
    if bad or not formats:
        raise InputError("--formats", f"a comma list of {', '.join(known)}", ", ".join(bad) or "nothing")
    chosen = [cls for cls in classes if cls.format in formats]
    check_precisions_known(chosen, opts.precisions)
    precisions: dict[type[Exporter], tuple[str, ...]] = {}
    for fmt in formats:
        precisions.update(precisions_for([c for c in chosen if c.format == fmt], fmt, opts.precisions))
    values = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    options: dict[type[Exporter], ExporterOptions] = {}
    notes: list[str] = []
    for cls in classes:
        given = opts.exporter_options.get(cls.name)
        options[cls] = o = given.checked() if given is not None else cls.options_type.from_values(values)
        if cls.format not in formats:
            notes += [f"{flag} is ignored: {cls.format} is not in --formats" for flag in o.changed_flags()]
    steps: list[_Step] = []

    def add(cls: type[Exporter], wanted: bool) -> None:
        if any(type(s.exporter) is cls for s in steps):
            return
        if cls.needs != MODULE:
            makers = [c for c in classes if c.format == cls.needs and c.needs == MODULE]
            if not makers:
                raise InputError("--formats", f"an exporter writing {cls.needs} (which {cls.name} reads)", "none")
            add(makers[0], makers[0] in precisions)
        steps.append(_Step(cls(options[cls].resolved()), precisions.get(cls, tuple(cls.default_precisions)),
                           wanted))

    for cls in precisions:
        add(cls, True)
    return _Plan(steps, list(dict.fromkeys(notes)))


def _card(fields: dict[str, Any]) -> dict[str, str]:
    """Check the model card fields before any work; one-line errors named after the flags."""
    unknown = sorted(set(fields) - set(CARD_FIELDS))
    if unknown:
        raise InputError("model card", f"fields among {', '.join(CARD_FIELDS)}", ", ".join(unknown))
    card: dict[str, str] = {}
    for key, value in fields.items():
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
    return card


def _lazy(load: Callable[[], Any]) -> Callable[[], Any]:
    """``load()`` once, on first call (calibration data only when a precision needs it)."""
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            cache.append(load())
        return cache[0]
    return get


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
