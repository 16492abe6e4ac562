"""The quantize stage: an export folder in, a folder of quantized artifacts out.

Used by ``mdeploy quantize`` and ``mdeploy run``, without argparse: every choice is a
``QuantizeOptions`` field. Reads the export folder's manifest, its PyTorch reference
(``model.safetensors``) and its float ONNX; writes, in a new folder built atomically
(``staged_output_dir``):

* the QDQ ONNX model of each profile of the target (``quantize.onnx_ptq.TARGETS``):
  ``snapdragon`` -> ``model_qnn_w8a8.onnx`` and ``model_qnn_w8a16.onnx`` (QNN EP),
  ``generic`` -> ``model_int8.onnx`` (ORT CPU);
* the full-integer TFLite models (``exporters.tflite``): ``int8-io`` (int8 in the normalised
  domain, for NPU/DSP pipelines) and ``uint8-pixels`` (the camera's uint8 bytes in, the
  normalisation inside), both by default; and the ``int8w`` TFLite (the same int8 weights
  stored behind ``DEQUANTIZE``, float compute: the TFLite file with the mixed w8a8 model's
  fidelity, which an all-8-bit TFLite cannot reach);
* with ``coreml`` (``--coreml``), an ``int8w`` ``.mlpackage``: the registered Core ML exporters,
  per-channel symmetric int8 weights compressed from the fp32 program (``quantize.coreml``);
* a copy of the PyTorch reference, so ``mdeploy verify DIR2`` checks every quantized file
  against the model the user trained (not against a float-fixed variant of it);
* ``manifest.json`` (the encodings of each QDQ model in its ``extra``) and
  ``quantization_report.json`` (``quantize.report.QuantReport``).

Data: calibration from ``--calib`` (default: the data set the checkpoint was trained
on, its train split); accuracy on the held-out split (the verify stage's loader, the
same preprocessing); per-layer sensitivity on calibration inputs, so the held-out split
never influences a choice that is then measured on it. ``target_sqnr`` (``--target-sqnr``)
raises layers of one profile's model (the first, or ``target_profile``) until its logit SQNR
on those inputs gets there (``quantize.mixed_precision``: 16-bit activations, 16-bit
weights, float); the chosen layers apply to that model only. With the default (``"auto"``)
every profile with a default of the target (``DEFAULT_TARGET_SQNR_DB``) is searched to its
own, the target profile first (``report.mixed_precision``, the others in
``mixed_precision_others``). A layer raised to 16-bit weights or float takes its weights
from before the int8 weight rounding.

With weight rounding other than ``rtn``, every written model's int8 weights are read back
and compared with the optimised float weights' own grid (``weight_grid_mismatch`` for the
QDQ ONNX, ``quantize.grid_check`` for the TFLite and Core ML files), and, unless
``plain_baseline`` is off, the first profile is also quantized with round-to-nearest
weights in the temporary folder and measured on the same held-out inputs
(``report.plain_route``), so the report shows what the rounding bought.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.artifact import Artifact, Manifest, library_versions, size_of
from exporters.fileio import atomic_write_text, staged_output_dir
from models.errors import InputError

REPORT_NAME = "quantization_report.json"
DEFAULT_CALIBRATION_SAMPLES = 256     # weight rounding generalises with more (see README, Weight rounding)
DEFAULT_SENSITIVITY_SAMPLES = 32      # probes and the --target-sqnr search: see README (time bound)
DEFAULT_EVAL_SAMPLES = 1000
DEFAULT_ROUNDING_SAMPLES = 256

# The default --target-sqnr of each target's profiles (by precision), searched on the
# calibration inputs; a profile without one stays as quantized. snapdragon, on
# EfficientNet-Lite1/Lite2 (ImageNet weights, held-out photos; README, "Weight rounding"):
# - w8a8: the all-8-bit model is at 15.7 / 13.3 dB and 0.86-0.88 top-1 agreement whatever the
#   rounding and calibration (the stem's 8-bit ReLU6 output alone costs 20 dB). 30 dB on the
#   calibration inputs measured 30.3 / 29.4 dB and 0.971 / 0.971 held out, at the same size.
# - w8a16: the int8 weights bound it (30.8 / 28.5 dB, 0.967 / 0.980 held out), and held-out
#   photos land 4-6 dB below the search's inputs (40 dB gave 0.978 / 0.987); 44 dB raises the
#   layers whose int8 weights carry the error to 16-bit weights (HTP's w16a16): 38.8 / 37.8 dB
#   and 0.998 / 0.991 held out, at 9.1 / 9.6 MB instead of 5.9 / 6.7.
# HTP runs 16-bit activations and w16a16 natively, so the mixed models stay on the
# accelerator. generic (ORT CPU): none.
DEFAULT_TARGET_SQNR_DB: dict[str, dict[str, float]] = {"snapdragon": {"w8a8": 30.0, "w8a16": 44.0},
                                                       "generic": {}}

Progress = Callable[[str], None]
LayerProgress = Callable[[int, int, str], None]


TFLITE_INPUTS = ("int8-io", "uint8-pixels")     # the full-integer TFLite kinds the stage writes


@dataclass
class QuantizeOptions:
    target: str = "snapdragon"                 # snapdragon | generic
    calibration: str | None = None             # data set name, folder, .npy/.npz; None: the checkpoint's
    method: str = "minmax"                     # minmax | entropy | percentile | mse
    samples: int = DEFAULT_CALIBRATION_SAMPLES
    float_fixes: tuple[str, ...] = ()          # from quantize.float_fixes.FIXES
    weight_rounding: tuple[str, ...] | None = None   # quantize.weight_rounding.TECHNIQUES; None: the default set
    rounding_samples: int = DEFAULT_ROUNDING_SAMPLES
    keep_float: str | int | None = None        # N most sensitive layers, or names
    w8a16_layers: str | int | None = None      # N most sensitive layers, or names
    # dB: raise layers of one profile until its logit SQNR gets there; "auto": the target's
    # default (DEFAULT_TARGET_SQNR_DB), None / "off": all-8-bit models
    target_sqnr: float | str | None = "auto"
    target_profile: str | None = None          # the profile --target-sqnr applies to (w8a8, w8a16...); None: the first
    tflite: bool = True
    # which full-integer TFLite inputs: "int8-io" (normalised int8, for NPU/DSP pipelines) and
    # "uint8-pixels" (the camera's bytes, normalisation inside): both unless one is asked for
    tflite_inputs: tuple[str, ...] = TFLITE_INPUTS
    # also the int8w TFLite (the optimised int8 weights behind DEQUANTIZE, float compute): the
    # TFLite file with the mixed w8a8 model's fidelity, which no full-integer TFLite reaches (README)
    tflite_int8w: bool = True
    coreml: bool = False                       # also an int8w .mlpackage (per-channel symmetric int8 weights)
    plain_baseline: bool = True                # measure the first profile with round-to-nearest weights too
    sensitivity: bool = True                   # per layer: weight-only and activation-only SNR (the split probes)
    # also the whole-layer ranking (each layer quantized alone: "only", or all but it:
    # "exclude"), one more probe per layer; None: not unless a layer count needs it
    sensitivity_mode: str | None = None
    sensitivity_samples: int = DEFAULT_SENSITIVITY_SAMPLES
    eval_data: str | None = None               # None: the held-out split of the checkpoint's data
    eval_samples: int | None = DEFAULT_EVAL_SAMPLES
    force: bool = False
    seed: int = 0
    model: str | None = None                   # the user's file.py:factory when only code defines the architecture
    random_inputs: bool = False                # explicitly calibrate and evaluate on random pixels


@dataclass
class QuantizeResult:
    folder: Path
    manifest: Manifest
    report: Any                                # quantize.report.QuantReport
    seconds: dict[str, float] = field(default_factory=dict)


def _target_profile(profiles: list[Any], name: str | None) -> Any:
    """The profile ``--target-sqnr`` applies to: named in full (``qnn-w8a16``) or by its
    precision (``w8a16``); the first profile when not named."""
    if name is None:
        return profiles[0]
    for p in profiles:
        if name in (p.name, p.precision):
            return p
    raise InputError("--target-profile", "one of " + ", ".join(p.precision for p in profiles)
                     + " (the target's profiles)", repr(name))


def resolve_target_sqnr(value: float | str | None, target: str, precision: str = "w8a8"
                        ) -> tuple[float | None, bool]:
    """``(dB or None, whether it is the target's default)`` for a ``target_sqnr`` option on the
    profile of ``precision``: a number, ``"auto"`` (the target's default for that profile) or
    ``None`` / ``"off"`` (no search)."""
    if value is None:
        return None, False
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "auto":
            return DEFAULT_TARGET_SQNR_DB.get(target, {}).get(precision), True
        if word in ("off", "none"):
            return None, False
        try:
            value = float(word)
        except ValueError:
            raise InputError("--target-sqnr", "a number of dB, auto or off", repr(value)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError("--target-sqnr", "a finite number of dB, auto or off", repr(value))
    return float(value), False


def _count_or_names(value: str | int | None) -> str | int | None:
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else (text or None)


def _check_options(opts: QuantizeOptions) -> None:
    from quantize.float_fixes import parse_fixes
    from quantize.onnx_ptq import check_method, target_profiles
    from quantize.sensitivity import MODES
    target_profiles(opts.target)
    check_method(opts.method)
    parse_fixes(list(opts.float_fixes))
    from quantize.weight_rounding import parse_techniques
    parse_techniques(opts.weight_rounding)
    if opts.rounding_samples < 1:
        raise InputError("--rounding-samples", "a positive number of calibration inputs", str(opts.rounding_samples))
    if opts.samples < 1:
        raise InputError("--samples", "a positive number of calibration inputs", str(opts.samples))
    if opts.sensitivity_samples < 1:
        raise InputError("--sensitivity-samples", "a positive number", str(opts.sensitivity_samples))
    if opts.eval_samples is not None and opts.eval_samples < 1:
        raise InputError("--eval-samples", "a positive number", str(opts.eval_samples))
    if opts.sensitivity_mode is not None and opts.sensitivity_mode not in MODES:
        raise InputError("--sensitivity-mode", f"one of {', '.join(MODES)}", repr(opts.sensitivity_mode))
    resolve_target_sqnr(opts.target_sqnr, opts.target)
    if opts.target_profile is not None:
        _target_profile(target_profiles(opts.target), opts.target_profile)
    for flag, value in (("--keep-float", opts.keep_float), ("--w8a16-layers", opts.w8a16_layers)):
        if isinstance(value, int) and value < 0:
            raise InputError(flag, "a count or a comma list of layer names", str(value))
    if not opts.tflite_inputs or set(opts.tflite_inputs) - set(TFLITE_INPUTS):
        raise InputError("--tflite-input", f"one or more of {', '.join(TFLITE_INPUTS)}",
                         ",".join(opts.tflite_inputs) or "nothing")


def quantize_folder(folder: str | Path, out_dir: str | Path, options: QuantizeOptions | None = None,
                    progress: Progress | None = None, layer_progress: LayerProgress | None = None
                    ) -> QuantizeResult:
    """Quantize the model of export folder ``folder`` into ``out_dir`` for ``options.target``."""
    from exporters.onnx import export_onnx, reweighted_onnx
    from models.checkpoint import build_model
    from quantize.calibration import load_calibration
    from quantize.float_fixes import apply_float_fixes, parse_fixes
    from quantize.onnx_ptq import (PtqSession, check_method, target_profiles, weight_grid_mismatch,
                                   weight_rows_rescaled)
    from quantize.sensitivity import layer_count, layer_sensitivity, pick_layers

    opts = options or QuantizeOptions()
    opts.keep_float = _count_or_names(opts.keep_float)
    opts.w8a16_layers = _count_or_names(opts.w8a16_layers)
    _check_options(opts)
    from exporters.fileio import check_distinct_from_inputs, check_writable_output
    # out == the export folder would swap the input away (its model.onnx deleted) with --force
    check_distinct_from_inputs(out_dir, folder, opts.calibration, opts.eval_data)
    check_writable_output(out_dir, opts.force)          # before calibration, not after it
    say = progress or (lambda msg: None)
    seconds: dict[str, float] = {}
    root = Path(folder)
    manifest = Manifest.load(root)
    pre = manifest.preprocessing
    refs = manifest.find("pt")
    if not refs:
        raise InputError(root / "manifest.json", "a pt reference artifact (written by mdeploy export)", "none")
    ref_art = refs[0]
    ref_path = ref_art.resolve(root)
    if not ref_path.is_file():
        raise InputError(ref_path, "the PyTorch reference listed in the manifest", "no such file")
    profiles = target_profiles(opts.target)
    primary = _target_profile(profiles, opts.target_profile)        # the one --target-sqnr applies to
    target_db, target_default = resolve_target_sqnr(opts.target_sqnr, opts.target, primary.precision)
    method = check_method(opts.method)
    fixes = parse_fixes(list(opts.float_fixes))
    from quantize.weight_rounding import optimize_weights, parse_techniques
    rounding = parse_techniques(opts.weight_rounding)
    optimized = rounding != ("rtn",)

    from pipeline.stages.verify import has_held_out, load_inputs, require_real_inputs
    notes: list[str] = []
    if opts.random_inputs:
        if opts.calibration or opts.eval_data:
            raise InputError("--random-inputs", "either --calib/--eval or --random-inputs", "both")
        calib_source = "random pixels"
        say(f"generating {opts.samples} random calibration inputs (--random-inputs)")
        calib = load_inputs(None, manifest, opts.samples, opts.seed, random_inputs=True).x
        evaluation = load_inputs(None, manifest, opts.eval_samples, opts.seed + 1, random_inputs=True)
        notes.append("NOT EVIDENCE: calibrated and measured on random pixels (--random-inputs); activation "
                     "ranges and accuracy on noise say nothing about real images")
    else:
        calib_source = opts.calibration or manifest.source.get("data")
        if not calib_source:
            raise require_real_inputs("--calib", "calibration images")
        say(f"reading {opts.samples} calibration inputs from {calib_source}")
        calib = load_calibration(calib_source, pre, opts.samples, seed=opts.seed)
        eval_source = opts.eval_data or (None if manifest.source.get("data") else calib_source)
        t0 = time.perf_counter()
        evaluation = load_inputs(eval_source, manifest, opts.eval_samples, opts.seed)
        seconds["evaluation_data"] = time.perf_counter() - t0
        if eval_source is not None and not opts.eval_data and not has_held_out(eval_source):
            notes.append(f"no held-out data recorded and no --eval: measured on the calibration source "
                         f"({calib_source}), so agreement and accuracy are optimistic; pass --eval for held-out data")
    if evaluation.note:
        notes.append(evaluation.note)

    model, meta = build_model(opts.model, ref_path)
    shape = (1, pre.channels, *pre.input_size)
    from quantize.weight_rounding import weight_layers
    if (fixes or optimized) and not weight_layers(model):
        notes.append("the PyTorch model has no Conv2d/Linear modules (a torch.export .pt2 graph): float fixes "
                     "and weight rounding leave it unchanged; the quantizer rounds its weights to nearest")
    with tempfile.TemporaryDirectory(prefix="mdeploy-quantize-") as tmp_name:
        tmp = Path(tmp_name)
        fix_result = None
        rounding_result = None
        original_onnx = None
        unrounded_onnx = None
        onnx_arts = [a for a in manifest.find("onnx", "fp32") if not a.variant]
        if fixes or optimized:
            # weight rounding works on the weights that get quantized: BatchNorm folded first
            applied = tuple(dict.fromkeys(fixes + (("bn",) if optimized else ())))
            say(f"applying float fixes: {', '.join(applied)}")
            t0 = time.perf_counter()
            fix_result = apply_float_fixes(model, applied, calibration=calib,
                                           per_channel=all(p.per_channel for p in profiles))
            seconds["float_fixes"] = time.perf_counter() - t0
            fixed = unrounded = fix_result.model
            if optimized:
                n_round = min(opts.rounding_samples, len(calib))
                say(f"optimizing weight rounding ({', '.join(rounding)}) on {n_round} calibration inputs")
                t0 = time.perf_counter()
                rounding_result = optimize_weights(fixed, calib[:n_round], rounding, progress=layer_progress,
                                                   seed=opts.seed)
                fixed = rounding_result.model
                seconds["weight_rounding"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            float_art = export_onnx(fixed, tmp / "model.onnx", shape)
            float_onnx = tmp / "model.onnx"
            if optimized and (target_db is not None or opts.keep_float or opts.plain_baseline):
                # the same graph before the int8 rounding: a layer raised to 16-bit weights or
                # float takes its weights from it (PtqSession(original_onnx=...)), and the plain
                # route quantizes it; one export with the weights swapped, a second only if the
                # exporter folded a rounded weight into another constant
                unrounded_onnx = tmp / "original.onnx"
                if not reweighted_onnx(float_onnx, unrounded_onnx, fixed, unrounded):
                    export_onnx(unrounded, unrounded_onnx, shape)
                if target_db is not None or opts.keep_float:
                    original_onnx = unrounded_onnx
            seconds["float_export"] = time.perf_counter() - t0
            layer_map = fix_result.remap_layer_map(float_art.extra.get("layer_map", {}))
        elif onnx_arts and onnx_arts[0].resolve(root).is_file():
            float_art, float_onnx = onnx_arts[0], onnx_arts[0].resolve(root)
            layer_map = dict(float_art.extra.get("layer_map", {}))
        else:
            say("exporting the float ONNX model from the PyTorch reference")
            float_art = export_onnx(model, tmp / "model.onnx", shape)
            float_onnx = tmp / "model.onnx"
            layer_map = dict(float_art.extra.get("layer_map", {}))
        float_size = size_of(float_onnx)

        with staged_output_dir(out_dir, opts.force) as stage:
            shutil.copyfile(ref_path, stage / ref_path.name)
            pt_copy = Artifact.from_dict(ref_art.to_dict())
            pt_copy.path = ref_path.name
            artifacts: list[Artifact] = [pt_copy]
            sensitivity = None
            probe = calib[:opts.sensitivity_samples]
            say("preparing and calibrating" + (" (ONNX Runtime QNN tooling)" if profiles[0].qnn else ""))
            t0 = time.perf_counter()
            with PtqSession(float_onnx, calib, qnn=profiles[0].qnn, calibration_source=str(calib_source),
                            layer_map=layer_map, original_onnx=original_onnx) as session:
                session_ranges = session.ranges(method)
                if optimized and opts.plain_baseline:     # for the plain route, after the session is closed
                    ranges_copy = tmp / f"plain_{session_ranges.path.name}"
                    shutil.copyfile(session_ranges.path, ranges_copy)
                    session_ranges = replace(session_ranges, path=ranges_copy)
                seconds["calibration"] = time.perf_counter() - t0
                needs_rank = any((layer_count(v) or 0) > 0 for v in (opts.keep_float, opts.w8a16_layers))
                if opts.sensitivity and opts.sensitivity_mode or needs_rank:
                    # the ranking (each layer quantized alone) on the first half of the probe
                    # inputs: its per-layer figures lie tens of dB apart. It decides nothing
                    # unless a layer count asks for the N worst, so it is opt-in (a probe per
                    # layer: 25 s of Lite2's 5-minute budget); the split probes and the
                    # search, which decide, run by default and use all the probe inputs
                    ranking = probe[:max(1, len(probe) // 2)]
                    say(f"per-layer sensitivity ({len(session.layers)} layers, "
                        f"{len(ranking)} inputs)")
                    t0 = time.perf_counter()
                    sensitivity = layer_sensitivity(session, profiles[0], ranking,
                                                    method=method, mode=opts.sensitivity_mode or "only",
                                                    progress=layer_progress)
                    seconds["sensitivity"] = time.perf_counter() - t0
                keep = pick_layers(session, opts.keep_float, sensitivity)
                wide = pick_layers(session, opts.w8a16_layers, sensitivity)
                split, searches = _mixed_precision(session, profiles, primary, probe, opts, target_db, target_default,
                                                   method, keep, wide, say, layer_progress, seconds,
                                                   model if fix_result is not None else None)
                mixed = searches[0] if searches else None
                by_profile = {m.profile: m for m in searches}
                kept = list({id(l): l for m in searches for l in m.keep_float}.values()) if searches else keep
                if kept and profiles[0].qnn:
                    notes.append(f"{len(kept)} layer(s) kept in float: the QNN EP runs them on the CPU, "
                                 "outside the HTP graph")
                for profile in profiles:
                    say(f"quantizing {profile.name}")
                    t0 = time.perf_counter()
                    searched = by_profile.get(profile.name)     # this profile's search, if it had one
                    art = session.quantize(profile, stage / f"{profile.file_stem}.onnx", method=method,
                                           keep_float=searched.keep_float if searched else keep,
                                           w16_layers=searched.w16_layers if searched else wide,
                                           w16_weights=searched.w16_weights if searched else (), root=stage)
                    if profile.qnn:     # <stem>.encodings.json for qnn-onnx-converter, and the QNN rules
                        from quantize.qnn_encodings import qnn_sidecar
                        raised = [*searched.w16_layers, *searched.w16_weights] if searched else wide
                        acts = (profile.activations, "uint16") if raised else profile.activations
                        art.extra.update(qnn_sidecar(stage / art.path, acts, method=profile.range_method or method,
                                                     root=stage))
                    seconds[profile.name] = time.perf_counter() - t0
                    if optimized:
                        art.extra["weight_grid_mismatch"] = weight_grid_mismatch(float_onnx, stage / art.path)
                        art.extra["weight_rows_rescaled"] = weight_rows_rescaled(float_onnx, stage / art.path)
                    artifacts.append(art)
            if opts.tflite:
                from exporters.tflite import export_tflite
                kinds = {"int8-io": "full integer, int8 input", "uint8-pixels": "full integer, uint8 camera pixels in",
                         "int8w": "int8 weights, float compute"}
                wanted = [*opts.tflite_inputs, *(["int8w"] if opts.tflite_int8w else [])]
                say("converting the TFLite models (" + "; ".join(kinds[k] for k in wanted) + ")")
                t0 = time.perf_counter()
                made = export_tflite(float_onnx, stage, wanted, preprocessing=pre,
                                     labels=manifest.labels, card=manifest.card, calibration=calib, root=stage)
                for a in made:
                    if optimized:
                        from quantize.grid_check import tflite_weight_mismatch
                        grid = tflite_weight_mismatch(float_onnx, stage / a.path)
                        a.extra["weight_grid_mismatch"] = grid.mismatch
                        a.extra["weight_grid_unmatched"] = grid.unmatched
                    if fix_result is not None:
                        a.extra["layer_map"] = fix_result.remap_layer_map(a.extra.get("layer_map", {}))
                    a.extra["float_fixes"] = list(fixes)
                    if a.precision != "int8w":          # no activation quantization, no calibration
                        a.extra["calibration"] = {**a.extra.get("calibration", {}), "source": str(calib_source),
                                                  "method": "minmax (TFLiteConverter)"}
                artifacts.extend(made)
                seconds["tflite"] = time.perf_counter() - t0
                if keep or wide or any(m.keep_float or m.w16_layers or m.w16_weights for m in searches):
                    notes.append("mixed precision applies to the ONNX models only: the full-integer TFLite "
                                 "models are all 8-bit (TFLite's integer modes set 16-bit activations for the "
                                 "whole model, not per layer), so they miss what the raised layers buy"
                                 + ("; the int8w TFLite (the same int8 weights, float compute) is the TFLite "
                                    "file with the w8a8 model's fidelity" if opts.tflite_int8w else ""))
            if opts.coreml:
                say("converting the Core ML package with int8 weights (int8w, from the fp32 program)")
                t0 = time.perf_counter()
                made = _coreml_int8w(fixed if fix_result is not None else model, shape, pre, manifest, stage)
                for a in made:
                    a.extra["float_fixes"] = list(fixes)
                    if optimized:
                        from quantize.grid_check import coreml_weight_mismatch
                        grid = coreml_weight_mismatch(float_onnx, stage / a.path)
                        a.extra["weight_grid_mismatch"] = grid.mismatch
                        a.extra["weight_grid_unmatched"] = grid.unmatched
                        a.extra["weight_grid_kept_float"] = grid.kept_float
                        if grid.kept_float:
                            notes.append(f"{a.key}: {len(grid.kept_float)} weight(s) under 2,048 elements stay "
                                         "float (coremltools' weight_threshold); the grid check covers the "
                                         f"{len(grid.mismatch)} int8 ones")
                artifacts.extend(made)
                seconds["coreml"] = time.perf_counter() - t0
            for a in artifacts[1:]:
                if a.format == "onnx":
                    a.extra["float_fixes"] = list(fixes)
            plain = None
            if optimized and opts.plain_baseline:
                say(f"quantizing {profiles[0].name} with round-to-nearest weights (for comparison, not written)")
                t0 = time.perf_counter()
                same_fixes = profiles[0].per_channel == all(p.per_channel for p in profiles)
                plain = _plain_route(model, fixes, calib, profiles[0], method, shape, calib_source, tmp,
                                     float_onnx=unrounded_onnx if same_fixes else None,
                                     ranges=session_ranges if same_fixes else None)
                seconds["plain_route"] = time.perf_counter() - t0
                if keep or wide or any(m.keep_float or m.w16_layers or m.w16_weights for m in searches):
                    notes.append(f"the plain round-to-nearest {profiles[0].name} row has no layers kept in float "
                                 "or raised to 16 bits: it compares the weight rounding, not the mixed precision")

            say(f"measuring accuracy on {len(evaluation.x)} held-out inputs")
            t0 = time.perf_counter()
            report = _measure(stage, artifacts, evaluation, manifest, opts, float_size, notes, plain)
            seconds["evaluation"] = time.perf_counter() - t0
            report.calibration = {"source": str(calib_source), "samples": int(len(calib)), "method": method,
                                  "seed": opts.seed}
            if fix_result is not None:
                report.float_fixes = [r.to_dict() for r in fix_result.reports]
            if fix_result is not None and fix_result.max_abs_change is not None:
                report.notes.append(f"float fixes changed the float32 logits by at most "
                                    f"{fix_result.max_abs_change:.3g} on {min(32, len(calib))} calibration inputs")
            if sensitivity is not None:
                report.sensitivity = sensitivity.to_dict()
            if split is not None and report.sensitivity is not None:
                from quantize.mixed_precision import merge_into_sensitivity
                merge_into_sensitivity(report.sensitivity, split)
            elif split is not None and opts.sensitivity:        # the split probes are the per-layer figures
                report.sensitivity = split.as_sensitivity()
            if mixed is not None or split is not None:
                report.mixed_precision = mixed.to_dict() if mixed is not None else {"split": split.to_dict()}
            # the further profiles' default searches, each as mixed_precision without the shared split
            report.mixed_precision_others = [{**m.to_dict(), "split": None} for m in searches[1:]]
            for m in searches:
                notes.append(m.note or _reached_note(m))
            if rounding_result is not None:
                report.weight_rounding = rounding_result.to_dict()
                moved = {a.key: sum(a.extra.get("weight_grid_mismatch", {}).values())
                         for a in artifacts if "weight_grid_mismatch" in a.extra}
                report.weight_rounding["grid_mismatch"] = moved
                unmatched = {a.key: len(a.extra["weight_grid_unmatched"]) for a in artifacts
                             if "weight_grid_unmatched" in a.extra}
                report.weight_rounding["grid_unmatched"] = unmatched
                if any(unmatched.values()):
                    notes.append("weights the grid check could not pair with a quantized tensor: "
                                 + ", ".join(f"{k}: {v}" for k, v in unmatched.items() if v))
                if any(moved.values()):
                    notes.append("the quantizer re-rounded some optimized weights: "
                                 + ", ".join(f"{k}: {v}" for k, v in moved.items() if v))
                rescaled = {a.key: sum(a.extra.get("weight_rows_rescaled", {}).values())
                            for a in artifacts if "weight_rows_rescaled" in a.extra}
                report.weight_rounding["rows_rescaled"] = rescaled
                if any(rescaled.values()):
                    notes.append("ONNX Runtime gave some near-zero weight rows a larger scale to keep their int32 "
                                 "bias in range (the QNN rule), so their integers differ from the optimized ones: "
                                 + ", ".join(f"{k}: {v} rows" for k, v in rescaled.items() if v))
            report.notes.extend(notes)
            source = {**manifest.source, "quantized_from": str(root.resolve()),
                      "quantization": {"target": opts.target, "method": method, "samples": int(len(calib)),
                                       "calibration": str(calib_source), "float_fixes": list(fixes),
                                  "weight_rounding": list(rounding),
                                       "keep_float": [l.module or l.name for l in keep],
                                       "w8a16_layers": [l.module or l.name for l in wide]}}
            summaries = [{k: v for k, v in m.to_dict().items()
                          if k in ("target_sqnr_db", "default_target", "profile", "reached", "sqnr_db", "w8a16_layers",
                                   "w16a16_layers", "keep_float", "note")} for m in searches]
            if summaries:
                source["quantization"]["target_sqnr"] = summaries[0]
                source["quantization"]["target_sqnr_others"] = summaries[1:]
            out_manifest = Manifest(model=manifest.model, preprocessing=pre, card=manifest.card,
                                    artifacts=artifacts, labels=manifest.labels, source=source,
                                    versions=library_versions(), assumed=list(manifest.assumed))
            import json
            atomic_write_text(stage / REPORT_NAME, json.dumps(report.to_dict(), indent=2, default=_json) + "\n")
            out_manifest.save(stage)
    return QuantizeResult(Path(out_dir), out_manifest, report, seconds)


def _mixed_precision(session: Any, profiles: list[Any], primary: Any, x: np.ndarray, opts: QuantizeOptions,
                     target_db: float | None, default: bool, method: str, keep: list[Any], wide: list[Any],
                     say: Progress, layer_progress: LayerProgress | None, seconds: dict[str, float],
                     original: Any = None) -> tuple[Any, list[Any]]:
    """Weight-only / activation-only sensitivity (with the sensitivity pass) and the
    ``--target-sqnr`` searches (``quantize.mixed_precision``): ``target_db`` on the target
    profile first, then, when the target is the default, every other profile to its own
    default (``DEFAULT_TARGET_SQNR_DB``), sharing the split probes (a layer's int8 weights are
    the same in every profile). The SQNR is against the user's model (``original``) when float
    fixes or weight rounding changed it. Without the sensitivity pass a search runs the split
    probes itself, only when the 8-bit model misses its target."""
    if not (opts.sensitivity or target_db is not None):
        return None, []
    from quantize.mixed_precision import search_mixed_precision, split_sensitivity
    split = None
    if opts.sensitivity:
        say(f"weight-only and activation-only sensitivity ({len(session.layers)} layers, {len(x)} inputs)")
        t0 = time.perf_counter()
        split = split_sensitivity(session, primary, x, method=method, progress=layer_progress)
        seconds["split_sensitivity"] = time.perf_counter() - t0
    if target_db is None:
        return split, []
    reference = None
    if original is not None:
        import torch
        with torch.no_grad():
            out = original.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        reference = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    goals = [(primary, target_db)]
    if default:
        goals += [(p, DEFAULT_TARGET_SQNR_DB[opts.target][p.precision]) for p in profiles
                  if p is not primary and p.precision in DEFAULT_TARGET_SQNR_DB.get(opts.target, {})]
    why = (f"the {opts.target} default; --target-sqnr off for all-8-bit models" if default
           else "--target-sqnr")
    searches = []
    for profile, db in goals:
        say(f"mixed precision to {db:g} dB logit SQNR ({profile.name}, {len(x)} inputs; {why})")
        t0 = time.perf_counter()
        mixed = search_mixed_precision(session, profile, x, db, method=method, split=split,
                                       keep_float=keep, w16_layers=wide, reference=reference,
                                       progress=layer_progress)
        mixed.default = default
        split = split or mixed.split
        seconds["mixed_precision" + ("" if profile is primary else f"_{profile.precision}")] = \
            time.perf_counter() - t0
        searches.append(mixed)
    return split, searches


def _reached_note(mixed: Any) -> str:
    sq = "inf" if mixed.sqnr_db is None else f"{mixed.sqnr_db:.1f}"
    start = "inf" if mixed.start_sqnr_db is None else f"{mixed.start_sqnr_db:.1f}"
    which = f"target SQNR {mixed.target_db:g} dB" + (" (the target's default)" if mixed.default else "")
    if mixed.chosen_step == 0 and not mixed.w16_layers and not mixed.keep_float:
        return f"{which}: the {mixed.profile} model as quantized already reaches it ({start} dB on " \
               f"{mixed.samples} calibration inputs); nothing raised"
    return (f"{which} reached on {mixed.samples} calibration inputs: {sq} dB "
            f"({mixed.profile} {start} dB) with {mixed.path[mixed.chosen_step].w16} layer(s) at 16-bit "
            f"activations, {mixed.path[mixed.chosen_step].w16w} at 16-bit weights and activations and "
            f"{len(mixed.keep_float)} in float, applied to {mixed.profile}")


def _coreml_int8w(model: Any, shape: tuple[int, ...], pre: Any, manifest: Manifest, stage: Path) -> list[Artifact]:
    """The ``int8w`` package through the registered Core ML exporters, compressed from the
    **fp32** program: coremltools computes the per-channel scale in the weight's dtype, and
    from fp16 weights that division can move an integer off the optimised grid
    (``quantize.grid_check``)."""
    from exporters.base import ExportContext, exporters_for, import_exporter_module
    from exporters.coreml import CoreMLOptions
    import_exporter_module("quantize.coreml")           # registers the compressed Core ML exporter
    cls = next((c for c in exporters_for("coreml") if c.supports("int8w")), None)
    if cls is None:
        raise InputError("--coreml", "a registered Core ML exporter offering int8w (quantize.coreml)", "none")
    exporter = cls(CoreMLOptions().checked())
    exporter.compress_from = "fp32"
    ctx = ExportContext(model=model.eval(), input_shape=shape, preprocessing=pre, root=stage,
                        labels=manifest.labels, card=manifest.card)
    return exporter.export(model.eval(), stage, ["int8w"], ctx)


def _plain_route(model: Any, fixes: tuple[str, ...], calib: np.ndarray, profile: Any, method: str,
                 shape: tuple[int, ...], calib_source: Any, tmp: Path,
                 float_onnx: Path | None = None, ranges: Any = None) -> tuple[Artifact, Path]:
    """The first profile quantized the plain way: the user's model with the same float
    fixes (BatchNorm folded) but round-to-nearest weights, calibrated the same way, in the
    temporary folder (not shipped). The report measures it on the same held-out inputs.
    ``float_onnx``: that fixed model already exported (the graph before weight rounding);
    ``ranges``: the rounded model's activation ranges, taken when that graph has their
    tensors (it is the same export with other weights), so the row differs in the weights only."""
    from exporters.onnx import export_onnx
    from quantize.float_fixes import apply_float_fixes
    from quantize.onnx_ptq import PtqSession
    plain_dir = tmp / "plain"
    plain_dir.mkdir(exist_ok=True)
    if float_onnx is None:
        applied = tuple(dict.fromkeys(fixes + ("bn",)))
        fixed = apply_float_fixes(model, applied, calibration=calib, per_channel=profile.per_channel)
        float_onnx = plain_dir / "float.onnx"
        export_onnx(fixed.model, float_onnx, shape)
    with PtqSession(float_onnx, calib, qnn=profile.qnn, calibration_source=str(calib_source)) as s:
        if ranges is None or ranges.method != method or not s.adopt_ranges(ranges):
            s.ranges(method)
        art = s.quantize(profile, plain_dir / f"{profile.file_stem}.onnx", method=method, root=plain_dir)
    return art, plain_dir


def _measure(stage: Path, artifacts: list[Artifact], evaluation: Any, manifest: Manifest,
             opts: QuantizeOptions, float_size: int, notes: list[str],
             plain: tuple[Artifact, Path] | None = None) -> Any:
    """Run the reference and every quantized artifact on the held-out inputs (and the
    plain round-to-nearest model, from the temporary folder, when there is one)."""
    from device_tests.compare import run_all
    from pipeline.stages.verify import open_runner
    from quantize.report import QuantReport, accuracy, measure_variant, references_for

    runners = {}
    plain, plain_root = plain if plain is not None else (None, None)
    plain_key = f"{plain.key} (plain rtn, not written)" if plain is not None else None
    # the PyTorch reference of a model only the user's code defines needs that code
    options = {"torch": {"model": opts.model}} if opts.model else {}
    try:
        for art in artifacts:
            runners[art.key] = open_runner(art, stage, options)
        if plain is not None:
            runners[plain_key] = open_runner(plain, plain_root, options)
        results = run_all(runners, {artifacts[0].inputs[0].name: evaluation.x}, batch_size=32)
    finally:
        for r in runners.values():
            r.close()
    ref_key = artifacts[0].key
    ref = results.outputs[ref_key]
    report = QuantReport(model=manifest.model, target=opts.target,
                         float_accuracy=accuracy(next(iter(ref.values())), evaluation.labels),
                         float_size_bytes=float_size, eval_source=evaluation.source,
                         eval_samples=int(len(evaluation.x)), calibration={},
                         references=references_for(manifest.source.get("model")))
    for art in artifacts[1:]:
        report.variants.append(measure_variant(art.key, art.path, art.precision, art.size_bytes, ref,
                                               results.outputs[art.key], evaluation.labels, float_size))
    if plain is not None:
        report.plain_route = measure_variant(plain_key, "", plain.precision, plain.size_bytes, ref,
                                             results.outputs[plain_key], evaluation.labels, float_size)
    return report


def _json(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = ["QuantizeOptions", "QuantizeResult", "REPORT_NAME", "quantize_folder"]
