"""TFLite (LiteRT): fp32, fp16 weights, dynamic-range int8, int8 weights with float compute
(``int8w``, made from the fp32 file: ``exporters.tflite_weights``), full-integer int8 (float
I/O) and full-integer int8 with int8 input and output.

Two routes, chosen per precision and recorded per artifact (``extra["converter"]``: route
and reason). ``--tflite-converter auto`` (the export default): the float kinds (fp32, fp16)
by litert-torch straight from the PyTorch model (``exporters.litert_torch``: no layout
guessing, seconds a model), falling back to the ONNX route with the reason when it fails;
the integer kinds by the ONNX route below. ``litert-torch`` makes its failure an error;
``onnx2tf`` is the ONNX route for everything (and the only one for an ONNX-only input).

The ONNX route: onnx2tf turns the ONNX graph into a TensorFlow SavedModel
with NHWC activations (its layout handling is the reason to use it); TensorFlow's
own ``TFLiteConverter.from_saved_model`` then writes every precision, with our
representative dataset for the integer kinds (onnx2tf's own quantized outputs were
wrong for dynamic range and take calibration data in its own format). Both run in a
worker subprocess per graph (``exporters.tflite_convert``, behind ``_onnx2tf``): onnx2tf's
many options, its console output and its global TensorFlow state stay out of this
process and out of our API, and the two graphs of a quantize run convert side by side.

Every ``.tflite`` carries TFLite app metadata (``exporters.tflite_metadata``), the
ONNX input/output names, and is described by an ``Artifact`` with the real input
layout (NHWC unless NCHW was asked for), dtypes, int8 scale/zero point, size, hash,
op list, delegate fallbacks and a ``layer_map`` for the first-divergent-layer search.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from exporters.artifact import (Artifact, ModelCard, Preprocessing, TensorSpec, check_calibration, layout_for_ndim,
                               sha256_of, size_of)
from exporters.base import ExportContext, Exporter, ExporterOptions, option
from exporters import litert_torch
from exporters.fileio import atomic_write_bytes
from exporters.layer_map import layer_map_from_onnx
from exporters.onnx import load_onnx
from exporters import tflite_convert
from exporters.tflite_convert import INTEGER_PRECISIONS, PIXEL_PRECISION
from exporters.tflite_metadata import TensorInfo, image_classifier_metadata, pack_model, populate
from exporters.tflite_ops import delegate_fallbacks, graph_ops, op_counts
from models.errors import InputError

PRECISIONS = ("fp32", "fp16", "dynamic", "int8", "int8-io", "uint8-pixels", "int8w")
# int8 weights behind DEQUANTIZE, float compute: made from the fp32 file (exporters.tflite_weights)
WEIGHT_ONLY_PRECISION = "int8w"
DEFAULT_PRECISIONS = ("fp32", "fp16")        # the integer kinds need calibration data: asked for explicitly
# INTEGER_PRECISIONS: the full-integer kinds (need calibration data). PIXEL_PRECISION: the
# camera-ready kind: uint8 pixels 0..255 in (scale 1, zero point 0: the byte *is* the
# pixel), the model's own (pixel * pixel_scale - mean) / std as its first ops, int8 out.
# An app feeds camera bytes as they are, as to TFLite Model Maker's quantized models.
LAYOUTS = ("NHWC", "NCHW")
CONVERTERS = ("auto", "litert-torch", "onnx2tf")
ONNX_ROUTE = "onnx2tf + tf.lite.TFLiteConverter"
ONNX2TF_TIMEOUT_S = 1800
# onnx2tf feeds this file (20 NHWC RGB images, downloaded if absent) through the ONNX
# and TF graphs to settle layouts for 3-channel inputs; we write it from real inputs.
ONNX2TF_SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"

# fp32 layer matching between ONNX Runtime and LiteRT: the same float32 math in a
# different order (NHWC kernels, fused BN) agrees to ~1e-6 of the tensor's own range;
# 1e-4 of that range separates "the same tensor" from "a different tensor" with a wide
# margin, whatever the scale (an untrained net's late activations can be ~1e-5).
MATCH_RTOL = 1e-4


class ConversionError(InputError):
    """The model could not be converted; ``found`` carries the converter's own message."""


def export_tflite(onnx_path: str | Path, out_dir: str | Path, precisions: Iterable[str], *,
                  preprocessing: Preprocessing, labels: list[str] | None = None,
                  card: ModelCard | None = None, calibration: np.ndarray | None = None,
                  layout: str = "NHWC", random_calibration: bool = False,
                  root: str | Path | None = None, module: Any = None,
                  converter: str = "onnx2tf") -> list[Artifact]:
    """Convert ``onnx_path`` into one ``.tflite`` per precision in ``out_dir``.

    ``calibration`` is float32 NCHW model inputs, already preprocessed (see
    ``quantize.calibration.load_calibration``); the integer precisions refuse to run
    without it unless ``random_calibration`` is set (then uniform random pixels,
    normalised, are used and the artifact says so). ``layout`` is the input layout of
    the ``.tflite`` (apps want NHWC). Artifact paths are relative to ``root``
    (default: ``out_dir``). ``module`` is the PyTorch model the ONNX file came from, for
    ``converter`` ``auto`` / ``litert-torch`` (see the module docstring).
    """
    precisions = _check_precisions(precisions)
    if layout not in LAYOUTS:
        raise InputError("layout", " or ".join(LAYOUTS), repr(layout))
    if converter not in CONVERTERS:
        raise InputError("--tflite-converter", " or ".join(CONVERTERS), repr(converter))
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    root = Path(root) if root is not None else out_dir
    card = card or ModelCard(name=onnx_path.stem)

    model = load_onnx(onnx_path)
    in_name, in_shape, out_names = _io_signature(model, onnx_path, preprocessing)
    calib, calib_source = _calibration(calibration, in_shape, preprocessing, precisions, random_calibration)

    raw, reasons, fallback = _direct_float(module, converter, in_shape, precisions, layout)
    raw = {p: _rename_io(d, [in_name], out_names) for p, d in raw.items()}
    # fp32 always (the layer map needs one); the pixel kind is converted from its own graph below
    onnx_route = [p for p in dict.fromkeys(["fp32", *precisions])
                  if p not in raw and p not in (PIXEL_PRECISION, WEIGHT_ONLY_PRECISION)]
    with tempfile.TemporaryDirectory(prefix="mdeploy-tflite-") as tmp:
        work = Path(tmp)
        onnx_fp32 = None
        jobs: dict[str, Onnx2tfJob] = {}
        if onnx_route and "fp32" in raw and any(p != "fp32" for p in onnx_route):
            # the ONNX-route files share their tensor names with the ONNX-route fp32, not
            # with litert-torch's: their layer map comes from that fp32
            onnx_route.insert(0, "fp32")
        if onnx_route:
            jobs["main"] = Onnx2tfJob(model, work, calib, onnx_route)
        if PIXEL_PRECISION in precisions:
            assert calib is not None
            (work / "pixels").mkdir()
            jobs["pixels"] = Onnx2tfJob(with_pixel_input(model, preprocessing), work / "pixels",
                                        pixel_calibration(calib, preprocessing), [PIXEL_PRECISION])
        made = _onnx2tf_all(jobs, input_name=in_name, input_shape=in_shape, layout=layout)
        if onnx_route:
            converted = {p: _rename_io(d, [in_name], out_names) for p, d in made["main"].items()}
            onnx_fp32 = converted.pop("fp32", None) if "fp32" in raw else converted.get("fp32")
            raw.update(converted)
        if PIXEL_PRECISION in precisions:
            raw[PIXEL_PRECISION] = _check_pixel_input(_rename_io(made["pixels"][PIXEL_PRECISION],
                                                                 [in_name], out_names))
    if WEIGHT_ONLY_PRECISION in precisions:        # from the fp32 file its layer map is made from
        from exporters.tflite_weights import int8_weight_only
        raw[WEIGHT_ONLY_PRECISION] = int8_weight_only(onnx_fp32 if onnx_fp32 is not None else raw["fp32"])
        if onnx_fp32 is None and "fp32" in reasons:
            reasons[WEIGHT_ONLY_PRECISION] = reasons["fp32"] + ", weights stored as int8"
    sample = calib[:1] if calib is not None else _sample_input(in_shape, preprocessing)
    layer_map = _layer_map(model, raw["fp32"], sample, layout)
    onnx_layer_map = _layer_map(model, onnx_fp32, sample, layout) if onnx_fp32 is not None and \
        onnx_fp32 is not raw["fp32"] else layer_map
    tool_version = _tool_version()
    artifacts = []
    for precision in precisions:
        data = raw[precision]
        direct = precision in reasons
        route = "litert-torch" if direct else ONNX_ROUTE
        reason = reasons[precision] if direct else _onnx_reason(precision, converter, fallback)
        # litert-torch moves only the input to channels-last; a 4-D output keeps NCHW
        ins, outs = _tensor_specs(data, layout, output_layout="NCHW" if direct else "NHWC")
        md = image_classifier_metadata(card, preprocessing, input_name=in_name, output_name=out_names[0],
                                       input_dtype=ins[0].dtype, labels=labels,
                                       normalised_inside=(precision == PIXEL_PRECISION))
        md.outputs += [TensorInfo(name) for name in out_names[1:]]     # extra outputs: named, no labels
        data = populate(data, md)
        path = out_dir / f"{onnx_path.stem}_{precision}.tflite"
        atomic_write_bytes(path, data)
        ops = graph_ops(data)
        names = _tensor_names(data)
        extra: dict[str, Any] = {
            "ops": op_counts(ops),
            "delegates": delegate_fallbacks(ops, int8_activations=precision in INTEGER_PRECISIONS),
            "layer_map": {k: v for k, v in (layer_map if direct else onnx_layer_map).items() if k in names},
            "intermediate_layout": "NHWC",
            "metadata": {"schema": "TFLite Metadata (tflite-support metadata_schema.fbs)",
                         "associated_files": sorted(md.file_contents)},
            "weights": {"fp32": "float32", "fp16": "float16", "dynamic": "int8", WEIGHT_ONLY_PRECISION: "int8",
                        "int8": "int8", "int8-io": "int8", PIXEL_PRECISION: "int8"}[precision],
            "converter": {"route": "litert-torch" if direct else "onnx2tf", "reason": reason},
        }
        if precision == PIXEL_PRECISION:
            # The runners' input edge turns normalised NCHW back into these pixels
            # (device_tests.runners.base.to_pixels), the same record Core ML's image input has.
            extra["image_input"] = {"mean": [float(m) for m in preprocessing.mean],
                                    "std": [float(v) for v in preprocessing.std],
                                    "pixel_scale": float(preprocessing.pixel_scale),
                                    "pixels": "uint8 0..255, normalised inside the model"}
        if precision in INTEGER_PRECISIONS:
            extra["calibration"] = {"samples": int(len(calib)), "source": calib_source}
        artifacts.append(Artifact(
            path=str(path.resolve().relative_to(root.resolve())), format="tflite", precision=precision,
            inputs=ins, outputs=outs, sha256=sha256_of(path), size_bytes=size_of(path),
            tool=route, tool_version=litert_torch.version() if direct else tool_version, extra=extra))
    return artifacts


def _direct_float(module: Any, converter: str, in_shape: list[int], precisions: list[str],
                  layout: str) -> tuple[dict[str, bytes], dict[str, str], str]:
    """The float kinds by litert-torch where ``converter`` allows it: ``(bytes, reasons,
    fallback)``, bytes per precision converted (fp32 always, the layer map needs it),
    the reason per precision asked, and why the ONNX route took the float kinds instead
    (``auto`` only, else empty; ``litert-torch`` raises)."""
    floats = [p for p in precisions if p in litert_torch.FLOAT_PRECISIONS]
    if converter == "onnx2tf" or not floats:
        return {}, {}, ""
    why_not = ("no PyTorch model (an ONNX file was given)" if module is None else
               "litert-torch is not installed" if not litert_torch.available() else "")
    if why_not:
        if converter == "litert-torch":
            raise InputError("--tflite-converter", "litert-torch and the PyTorch model to convert", why_not)
        return {}, {}, why_not
    try:
        raw = litert_torch.convert_float(module, in_shape, floats, layout=layout)
    except ConversionError as exc:
        if converter == "litert-torch":
            raise
        return {}, {}, f"litert-torch failed: {exc.found}"
    reason = ("asked for (--tflite-converter litert-torch)" if converter == "litert-torch" else
              "float kinds convert straight from PyTorch (no ONNX layout guessing)")
    reasons = {p: reason + (", weights cast to float16 by ai-edge-quantizer" if p == "fp16" else "")
               for p in floats}
    return raw, reasons, ""


def _onnx_reason(precision: str, converter: str, fallback: str) -> str:
    if precision == WEIGHT_ONLY_PRECISION:
        return "the ONNX-route fp32 file with its weights stored as per-channel int8 (exporters.tflite_weights)"
    if converter == "onnx2tf":
        return "asked for (--tflite-converter onnx2tf)"
    if precision in litert_torch.FLOAT_PRECISIONS:
        return f"fallback: {fallback}" if fallback else "fallback"
    return ("integer kinds: calibrated by TFLiteConverter on the onnx2tf SavedModel, the route their "
            "accuracy is measured on")


# ---------------------------------------------------------------- arguments


def _check_precisions(precisions: Iterable[str]) -> list[str]:
    out = []
    for p in precisions:
        if p not in PRECISIONS:
            raise InputError("precision", f"one of {', '.join(PRECISIONS)} for tflite", repr(p))
        if p not in out:
            out.append(p)
    if not out:
        raise InputError("precisions", f"at least one of {', '.join(PRECISIONS)}", "none")
    return out


def _io_signature(model: Any, path: Path, pre: Preprocessing) -> tuple[str, list[int], list[str]]:
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise InputError(path, "an image model with one input", f"{len(inputs)} inputs")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise InputError(path, "a 4-D (N, C, H, W) image input", f"{len(dims)}-D input {inputs[0].name!r}")
    want = [1, pre.channels, *pre.input_size]
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else want[i] for i, d in enumerate(dims)]
    if shape[0] != 1:
        raise InputError(path, "batch size 1 (or a dynamic batch) for a mobile model", f"batch {shape[0]}")
    if shape[1:] != want[1:]:
        raise InputError(path, f"an input of shape (N, {', '.join(map(str, want[1:]))}) as the preprocessing says",
                         f"(N, {', '.join(map(str, shape[1:]))})")
    return inputs[0].name, shape, [o.name for o in model.graph.output]


def _calibration(calibration: np.ndarray | None, shape: list[int], pre: Preprocessing, precisions: list[str],
                 random_calibration: bool) -> tuple[np.ndarray | None, str]:
    needs = any(p in INTEGER_PRECISIONS for p in precisions)
    if calibration is None:
        if needs and not random_calibration:
            raise InputError("--calibration", f"calibration images for {', '.join(p for p in precisions if p in INTEGER_PRECISIONS)} "
                             "(a data set, an image folder or .npy; random data only when asked for)", "none")
        if needs:
            rng = np.random.default_rng(0)
            pixels = rng.uniform(0, 1, (64, *shape[1:])).astype(np.float32)
            m = np.asarray(pre.mean, np.float32).reshape(1, -1, 1, 1)
            s = np.asarray(pre.std, np.float32).reshape(1, -1, 1, 1)
            return (pixels - m) / s, "random uniform pixels (explicitly requested)"
        return None, ""
    return check_calibration(calibration, shape), "caller"


def pixel_calibration(calib: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Normalised calibration inputs -> the pixels they came from (float, 0..255, NCHW).

    The converter sets the input's quantization from the observed min/max, so the first
    image gets a 0 and a 255 in every channel: the range is then exactly [0, 255], the
    scale exactly 1 and the zero point 0 (``_check_pixel_input`` holds it to that).
    """
    c = calib.shape[1]
    mean = np.asarray(pre.mean, np.float64).reshape(1, c, 1, 1)
    std = np.asarray(pre.std, np.float64).reshape(1, c, 1, 1)
    # float64 (resized crops sit at exact halves, where float32 would round some the other
    # way), a crop at a time so the temporaries stay in cache: 256 crops of 260 px took 9 s
    # as whole-array operations
    pix = np.empty(calib.shape, np.float32)
    for i in range(len(calib)):
        pix[i] = np.clip(np.rint((calib[i:i + 1].astype(np.float64) * std + mean) / float(pre.pixel_scale)), 0, 255)
    pix[0, :, 0, 0] = 0.0
    pix[0, :, -1, -1] = 255.0
    return pix


def with_pixel_input(model: Any, pre: Preprocessing) -> Any:
    """A copy of ``model`` taking pixels: its input (same name) goes through
    ``Mul(pixel_scale / std) -> Add(-mean / std)`` per channel before the original graph.

    An exact per-channel affine of its own, not folded into the first convolution: a
    fold would be wrong at zero-padded borders (padding a pixel 0 is not padding a
    normalised 0).
    """
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    init = {t.name for t in g.initializer}
    inp = next(i for i in g.input if i.name not in init)
    name, inner = inp.name, inp.name + "__normalised"
    for node in g.node:
        node.input[:] = [inner if x == name else x for x in node.input]
    for out in g.output:
        if out.name == name:
            raise InputError("model", "an output that is not the input", name)
    c = pre.channels
    std = np.asarray(pre.std, np.float64).reshape(1, c, 1, 1)
    mean = np.asarray(pre.mean, np.float64).reshape(1, c, 1, 1)
    g.initializer.extend([numpy_helper.from_array((float(pre.pixel_scale) / std).astype(np.float32), name + "__scale"),
                          numpy_helper.from_array((-mean / std).astype(np.float32), name + "__bias")])
    pre_nodes = [helper.make_node("Mul", [name, name + "__scale"], [name + "__scaled"], name="pixels_scale"),
                 helper.make_node("Add", [name + "__scaled", name + "__bias"], [inner], name="pixels_normalise")]
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(pre_nodes + nodes)
    return m


def _check_pixel_input(data: bytes) -> bytes:
    """The camera-ready file must take uint8 with scale 1 and zero point 0 exactly, or the
    app's bytes are not the pixels; anything else is a conversion error, never a silent
    rescale."""
    from ai_edge_litert.interpreter import Interpreter
    d = Interpreter(model_content=data).get_input_details()[0]
    scale, zp = d["quantization"]
    if d["dtype"] != np.uint8 or scale != 1.0 or zp != 0:
        raise ConversionError("tf.lite.TFLiteConverter", "a uint8 pixel input with scale 1 and zero point 0",
                              f"{np.dtype(d['dtype']).name} scale {scale!r} zero point {zp!r}")
    return data


def _sample_input(shape: list[int], pre: Preprocessing) -> np.ndarray:
    """A deterministic mid-grey-ish input for layer matching when no real image is given."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, shape).astype(np.float32)
    m = np.asarray(pre.mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(pre.std, np.float32).reshape(1, -1, 1, 1)
    return (pixels - m) / s


# ---------------------------------------------------------------- onnx2tf


@dataclass
class Onnx2tfJob:
    """One graph through the ONNX route: ``model`` converted in ``work`` (its own folder),
    ``calib`` (NCHW model inputs: onnx2tf's layout sample and the integer kinds'
    calibration; None: random pixels for the sample), then ``precisions`` written."""
    model: Any
    work: Path
    calib: np.ndarray | None
    precisions: list[str]


def _onnx2tf_all(jobs: dict[str, Onnx2tfJob], *, input_name: str, input_shape: list[int],
                 layout: str) -> dict[str, dict[str, bytes]]:
    """Each job's ``.tflite`` files by precision, the jobs run at the same time.

    The int8-io and uint8-pixels kinds need two graphs converted (the pixel one has the
    normalisation in front), and both onnx2tf and the converter's calibration spend
    their time in one thread. Two worker subprocesses side by side share two cores
    instead; a failure of either is raised once both have ended (they run in the same
    temporary folder, removed after).
    """
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial
    convert = partial(_onnx2tf, input_name=input_name, input_shape=input_shape, layout=layout)
    if len(jobs) < 2:
        return {k: convert(job) for k, job in jobs.items()}
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="onnx2tf") as pool:
        futures = {k: pool.submit(convert, job) for k, job in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def _onnx2tf(job: Onnx2tfJob, *, input_name: str, input_shape: list[int], layout: str) -> dict[str, bytes]:
    """Runs the worker (``exporters.tflite_convert``) on ``job``: onnx2tf, then the
    TFLiteConverter; raises ``ConversionError`` with either tool's own message.

    onnx2tf overwrites the ONNX file it reads, so it gets its own single-file copy; it
    runs ``onnxsim`` from PATH, so this interpreter's ``bin`` goes first on PATH.
    """
    import onnx
    model, work = job.model, job.work
    src = work / "model.onnx"
    onnx.save(model, str(src))
    out = work / "saved_model"
    if input_shape[1] == 3:
        imgs = job.calib if job.calib is not None else \
            np.random.default_rng(0).uniform(0, 1, (20, *input_shape[1:]))
        imgs = np.resize(imgs.astype(np.float32), (20, *input_shape[1:]))   # repeats to 20 images
        np.save(work / ONNX2TF_SAMPLE_FILE, imgs.transpose(0, 2, 3, 1))
    tflite_convert.write_job(work, job.precisions, job.calib, layout)
    cmd = [sys.executable, "-c", tflite_convert.WORKER, "-i", str(src), "-o", str(out), "-osd", "-n",
           "-ois", f"{input_name}:{','.join(map(str, input_shape))}"]
    if layout == "NCHW":
        cmd += ["-k", input_name]
    if any(n.op_type == "Erf" for n in model.graph.node):
        # Exact GELU reaches onnx2tf as Erf, which it emits as tf.math.erf: no TFLite builtin
        # has it ("'tf.Erf' op is neither a custom op nor a flex op"). onnx2tf's pseudo-Erf is
        # Abramowitz & Stegun 7.1.26 in builtin ops, max abs error 1.5e-7 on erf.
        cmd += ["-rtpo", "erf"]
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["CUDA_VISIBLE_DEVICES"] = "-1"
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=ONNX2TF_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConversionError("onnx2tf", f"a conversion within {ONNX2TF_TIMEOUT_S} s", "a timeout") from None
    failed = tflite_convert.read_error(work)
    if proc.returncode == tflite_convert.ERROR_EXIT and failed is not None:
        raise ConversionError(*failed)
    if proc.returncode != 0 or not (out / "saved_model.pb").exists():
        raise ConversionError("onnx2tf", "a model onnx2tf can convert", _converter_message(proc.stdout + proc.stderr))
    return tflite_convert.read_outputs(work, job.precisions)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ONNX2TF_HINTS = ("The trace log", "input_onnx_file_path", "onnx_op_name", "Read this", "Alternatively",
                  "If the input OP", "Also, for models")


def _converter_message(log: str) -> str:
    """The converter's own words in one line: the ONNX node it failed on, its specific
    ERROR lines (not its generic hints) and the final exception with its detail line."""
    lines = [_ANSI.sub("", ln).strip() for ln in log.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("W0000", "I0000", "WARNING: All log"))]
    node = next((m.group(1) for ln in lines if (m := re.search(r"onnx_op_name:\s*(\S+)", ln))), None)
    errors = [ln.removeprefix("ERROR:").strip() for ln in lines
              if ln.startswith("ERROR:") and not ln.removeprefix("ERROR:").strip().startswith(_ONNX2TF_HINTS)]
    exc = [k for k, ln in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    parts = [f"at ONNX node {node}"] if node else []
    parts += errors[-2:]
    if exc:
        k = exc[-1]
        parts.append(lines[k])
        if lines[k].endswith(").") and k + 1 < len(lines) and not lines[k + 1].startswith("Call arguments"):
            parts.append(lines[k + 1])                # Keras wraps the real reason on the next line
    if not parts:
        parts = lines[-3:]
    return " | ".join(dict.fromkeys(parts))[:600] or "onnx2tf failed without a message"


def _tool_version() -> str:
    from importlib import metadata
    parts = []
    for dist, label in (("onnx2tf", "onnx2tf"), ("tensorflow-cpu", "tensorflow"), ("tensorflow", "tensorflow")):
        try:
            v = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if not any(p.startswith(label + " ") for p in parts):
            parts.append(f"{label} {v}")
    return ", ".join(parts)


# ---------------------------------------------------------------- flatbuffer edits and specs


def _rename_io(model: bytes, in_names: list[str], out_names: list[str]) -> bytes:
    """Give the input/output tensors and the signature the ONNX names (``input``,
    ``logits``), as apps and our manifest call them; the converter's names are
    ``serving_default_input:0`` / ``PartitionedCall:0`` / ``output_0``."""
    from ai_edge_litert import schema_py_generated as fb
    m = fb.ModelT.InitFromPackedBuf(bytearray(model), 0)
    sg = m.subgraphs[0]
    if len(sg.inputs) != len(in_names) or len(sg.outputs) != len(out_names):
        raise ConversionError("tflite", f"{len(in_names)} inputs and {len(out_names)} outputs",
                              f"{len(sg.inputs)} and {len(sg.outputs)}")
    for idx, name in zip(list(sg.inputs) + list(sg.outputs), in_names + out_names):
        sg.tensors[idx].name = name
    for sig in m.signatureDefs or []:
        for tmap, names in ((sig.inputs, in_names), (sig.outputs, out_names)):
            for tm in tmap or []:
                pos = (list(sg.inputs) if tmap is sig.inputs else list(sg.outputs)).index(tm.tensorIndex)
                tm.name = names[pos]
    return pack_model(m)


_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 9: "int8", 7: "int16"}


def _tensor_specs(model: bytes, layout: str, output_layout: str = "NHWC") -> tuple[list[TensorSpec], list[TensorSpec]]:
    from ai_edge_litert import schema_py_generated as fb
    m = fb.Model.GetRootAs(model, 0)
    sg = m.Subgraphs(0)

    def spec(idx: int, is_input: bool) -> TensorSpec:
        t = sg.Tensors(idx)
        shape = [int(d) for d in t.ShapeAsNumpy()] if t.ShapeLength() else []
        q = t.Quantization()
        scale = zp = None
        if q is not None and q.ScaleLength() == 1:
            scale, zp = float(q.Scale(0)), int(q.ZeroPoint(0))
        lay = layout_for_ndim(len(shape), layout if is_input else output_layout)
        return TensorSpec(t.Name().decode(), shape, _DTYPES.get(t.Type(), str(t.Type())), lay, scale, zp)

    ins = [spec(int(i), True) for i in sg.InputsAsNumpy()]
    outs = [spec(int(i), False) for i in sg.OutputsAsNumpy()]
    return ins, outs


def _tensor_names(model: bytes) -> set[str]:
    from ai_edge_litert import schema_py_generated as fb
    sg = fb.Model.GetRootAs(model, 0).Subgraphs(0)
    return {sg.Tensors(i).Name().decode() for i in range(sg.TensorsLength())}


# ---------------------------------------------------------------- layer map


def _layer_map(model: Any, tflite: bytes, sample: np.ndarray, layout: str) -> dict[str, str]:
    """TFLite tensor name -> torch module call key (``exporters.layer_map``), by
    matching values against ONNX Runtime.

    onnx2tf renames, fuses (conv+BN+ReLU6 is one tensor) and transposes (NHWC), so
    names cannot be matched; values can: a TFLite op output (NHWC -> NCHW when 4-D)
    that equals a module's ONNX output on a real input *is* that module's output.
    """
    targets = layer_map_from_onnx(model)        # ONNX tensor -> module call key
    if not targets:
        return {}
    onnx_vals = _onnx_values(model, sample, list(targets))
    tfl_vals = _tflite_values(tflite, sample, layout)
    return {t: targets[o] for t, o in match_tensors(tfl_vals, onnx_vals).items()}


def match_tensors(candidates: dict[str, np.ndarray], references: dict[str, np.ndarray],
                  rtol: float = MATCH_RTOL) -> dict[str, str]:
    """candidate name -> reference name for values equal within ``rtol`` of the
    reference's own range; greedy in candidate order, each reference used once, the
    closest one winning. Constant references (all one value) match nothing: they
    cannot tell tensors apart."""
    scale = {n: float(np.max(np.abs(r))) if r.size else 0.0 for n, r in references.items()}
    out: dict[str, str] = {}
    used: set[str] = set()
    for cname, v in candidates.items():
        best, best_err = None, None
        for rname, ref in references.items():
            if rname in used or ref.shape != v.shape or scale[rname] == 0.0 or float(ref.std()) == 0.0:
                continue
            err = float(np.max(np.abs(ref - v))) / scale[rname]
            if err <= rtol and (best_err is None or err < best_err):
                best, best_err = rname, err
        if best is not None:
            used.add(best)
            out[cname] = best
    return out


def _onnx_values(model: Any, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort
    m = onnx.shape_inference.infer_shapes(model)
    known = {vi.name: vi for vi in list(m.graph.value_info) + list(m.graph.output)}
    have = {o.name for o in m.graph.output}
    names = [n for n in names if n in known and known[n].type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if not names:
        return {}
    for n in names:
        if n not in have:
            m.graph.output.append(known[n])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(names, {sess.get_inputs()[0].name: x.astype(np.float32)})
    return {n: v for n, v in zip(names, outs) if isinstance(v, np.ndarray) and v.dtype == np.float32}


def _tflite_values(model: bytes, x: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """Every float op output of ``model`` on ``x`` (4-D ones as NCHW), in execution order."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    it = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1) if layout == "NHWC" else x))
    it.invoke()
    details = {t["index"]: t for t in it.get_tensor_details()}
    out: dict[str, np.ndarray] = {}
    for op in graph_ops(model):
        for idx in op["outputs"]:
            t = details.get(idx)
            if t is None or t["dtype"] != np.float32:
                continue
            v = it.get_tensor(idx)
            out[t["name"]] = v.transpose(0, 3, 1, 2) if v.ndim == 4 else v
    return out


# ---------------------------------------------------------------- the registered exporter


@dataclass
class TFLiteOptions(ExporterOptions):
    layout: str = option("NHWC", key="tflite_layout", flag="--tflite-layout")   # apps want NHWC
    converter: str = option("auto", key="tflite_converter", flag="--tflite-converter")

    def checked(self) -> "TFLiteOptions":
        layout = str(self.layout or "NHWC").strip().upper()
        if layout not in LAYOUTS:
            raise InputError("--tflite-layout", " or ".join(t.lower() for t in LAYOUTS), repr(self.layout))
        converter = str(self.converter or "auto").strip().lower()
        if converter not in CONVERTERS:
            raise InputError("--tflite-converter", " or ".join(CONVERTERS), repr(self.converter))
        return TFLiteOptions(layout, converter)


class TFLiteExporter(Exporter):
    """One ``.tflite`` per precision, converted from the ONNX file."""

    name = "tflite"
    format = "tflite"
    precisions = PRECISIONS
    default_precisions = DEFAULT_PRECISIONS
    needs = "onnx"
    options_type = TFLiteOptions

    def export(self, source: Path, out_dir: Path, precisions: Sequence[str],
               ctx: ExportContext) -> list[Artifact]:
        assert isinstance(self.options, TFLiteOptions)
        calib = ctx.calibration() if any(p in INTEGER_PRECISIONS for p in precisions) else None
        return export_tflite(source, out_dir, precisions, preprocessing=ctx.preprocessing, labels=ctx.labels,
                             card=ctx.card, calibration=calib, layout=self.options.layout, root=ctx.root,
                             module=ctx.model, converter=self.options.converter)
