"""The ONNX route's worker: onnx2tf makes a SavedModel, TensorFlow's ``TFLiteConverter``
turns it into one ``.tflite`` per precision, in one subprocess per graph.

Why a subprocess, and why both steps in it: onnx2tf's console output and global
TensorFlow state stay out of the caller's process (``exporters.tflite`` imports no
TensorFlow at all), and the integer kinds' calibration (the converter runs a float
interpreter over every calibration input, in one thread) then runs side by side for the
int8-io and uint8-pixels graphs, each in its own worker, instead of one after the other
(the README's `bench.ptq_real` section has the times).

The protocol is files in the worker's folder (its working directory): ``JOB_FILE`` (the
precisions, the layout), ``CALIBRATION_FILE`` (float32 NCHW model inputs) in; one
``<precision>.tflite`` per precision out, or ``ERROR_FILE`` (``tool``, ``expected``,
``found`` of a ``ConversionError``) and exit code ``ERROR_EXIT``. onnx2tf's own failures
are its exit code and log, read by the caller.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from exporters.native_output import captured_native_output

INTEGER_PRECISIONS = ("int8", "int8-io", "uint8-pixels")
PIXEL_PRECISION = "uint8-pixels"
JOB_FILE = "convert_job.json"
CALIBRATION_FILE = "calibration.npy"
ERROR_FILE = "convert_error.json"
ERROR_EXIT = 3
# ``python -c WORKER <onnx2tf arguments>`` in the worker's folder
WORKER = "from exporters.tflite_convert import worker_main; worker_main()"


class ConverterFailed(Exception):
    """TFLiteConverter refused the SavedModel; ``args``: tool, expected, found."""


def convert_saved_model(saved_model: Path, precision: str, calib: np.ndarray | None, layout: str) -> bytes:
    """One ``.tflite`` of ``precision`` from ``saved_model``, the integer kinds calibrated on
    ``calib`` (NCHW; transposed when the graph is ``NHWC``). Full-integer kinds fail rather
    than keep an op in float."""
    tf = _tf()
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if precision != "fp32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    if precision in INTEGER_PRECISIONS:
        assert calib is not None
        data = calib.transpose(0, 2, 3, 1) if layout == "NHWC" else calib

        def representative() -> Iterable[list[np.ndarray]]:
            for i in range(len(data)):
                yield [np.ascontiguousarray(data[i:i + 1])]

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]   # fail, never fall back to float
        if precision == "int8-io":
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        if precision == PIXEL_PRECISION:
            conv.inference_input_type = tf.uint8
            conv.inference_output_type = tf.int8
    try:
        with captured_native_output():       # the MLIR quantizer prints "fully_quantize: 0, ..." from C++
            return bytes(conv.convert())
    except Exception as exc:  # the converter raises ConverterError and friends
        raise ConverterFailed("tf.lite.TFLiteConverter", f"a {precision} conversion",
                              f"{type(exc).__name__}: {mlir_message(str(exc))}") from None


def mlir_message(text: str) -> str:
    """The converter's diagnosis without its MLIR dump: the unsupported-op summary if any,
    else the distinct ``error:`` messages (their source locations dropped)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    summary = [ln for ln in lines if ln.startswith(("TF Select ops:", "Flex ops:", "Custom ops:"))]
    if summary:
        return "ops TFLite has no builtin for: " + "; ".join(summary)
    errors = [re.sub(r"^.*?error: (loc\(.*?\)\): )?", "", ln) for ln in lines if "error:" in ln]
    return " | ".join(dict.fromkeys(errors))[:600] or " | ".join(lines[:3])[:600]


def write_job(work: Path, precisions: list[str], calib: np.ndarray | None, layout: str) -> None:
    """The worker's inputs, in the folder it will run in."""
    (work / JOB_FILE).write_text(json.dumps({"precisions": precisions, "layout": layout}))
    if calib is not None:
        np.save(work / CALIBRATION_FILE, np.ascontiguousarray(calib, dtype=np.float32))


def read_outputs(work: Path, precisions: list[str]) -> dict[str, bytes]:
    return {p: (work / f"{p}.tflite").read_bytes() for p in precisions}


def read_error(work: Path) -> tuple[str, str, str] | None:
    path = work / ERROR_FILE
    if not path.exists():
        return None
    err = json.loads(path.read_text())
    return err["tool"], err["expected"], err["found"]


def worker_main() -> None:
    """The subprocess: onnx2tf with ``sys.argv[1:]``, stopped once its SavedModel is written,
    then the job's conversions.

    onnx2tf always ends by writing its own float32 and float16 ``.tflite`` files through
    ``TFLiteConverter.from_keras_model``, which saves the Keras model again and serialises
    its config to JSON each time: most of onnx2tf's time on a large model, for files never
    used here. So the converter's two constructors raise a stop while onnx2tf runs;
    the SavedModel is the last thing it writes before them. A ``BaseException`` passes
    onnx2tf's ``except Exception`` fallbacks; if a future onnx2tf reached them earlier, the
    missing ``saved_model.pb`` is the error, and if it never reached them, it is only slower.
    """
    work = Path.cwd()
    job = json.loads((work / JOB_FILE).read_text())
    tf = _tf()

    class SavedModelWritten(BaseException):
        pass

    def stop(*args: Any, **kwargs: Any) -> None:
        raise SavedModelWritten()

    tf.lite.TFLiteConverter.from_keras_model = staticmethod(stop)        # the conversions below use
    tf.lite.TFLiteConverter.from_concrete_functions = staticmethod(stop)  # from_saved_model
    from onnx2tf import main
    try:
        main()
    except SavedModelWritten:
        pass
    saved = Path(sys.argv[sys.argv.index("-o") + 1])
    if not (saved / "saved_model.pb").exists():
        sys.exit(1)                      # onnx2tf's log says why
    calib = np.load(work / CALIBRATION_FILE) if (work / CALIBRATION_FILE).exists() else None
    for precision in job["precisions"]:
        try:
            data = convert_saved_model(saved, precision, calib, job["layout"])
        except ConverterFailed as exc:
            tool, expected, found = exc.args
            (work / ERROR_FILE).write_text(json.dumps({"tool": tool, "expected": expected, "found": found}))
            sys.exit(ERROR_EXIT)
        (work / f"{precision}.tflite").write_bytes(data)


def _tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with captured_native_output():           # absl's "log messages before InitializeLog", oneDNN notice
        import tensorflow as tf
    return tf
