"""Tiny real artifacts for the device and profiling tests (seconds to make, not minutes).

The ONNX model goes through the project's own exporter; the TFLite models are made with
TensorFlow's converter from a tiny Keras network (fp32, and full-integer int8 with int8
input and output calibrated on random data), each described by an ``Artifact`` read
from the interpreter itself, so the runners see exactly what an export would give them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exporters.artifact import Artifact, TensorSpec, sha256_of, size_of

INPUT_SHAPE = (1, 3, 16, 16)      # NCHW


def tiny_net():
    """A tiny conv net (conv, BN, ReLU6, depthwise conv, pooling, linear) in eval mode."""
    import torch
    import torch.nn as nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():       # non-trivial BN statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def tiny_onnx(folder: Path) -> Artifact:
    from exporters.onnx import export_onnx
    folder.mkdir(parents=True, exist_ok=True)
    return export_onnx(tiny_net(), folder / "tiny.onnx", INPUT_SHAPE)


def tiny_executorch(folder: Path) -> Artifact:
    """The same tiny net as an fp32 ``.pte`` lowered to XNNPACK, by the project's exporter."""
    from exporters.executorch import export_executorch
    folder.mkdir(parents=True, exist_ok=True)
    (art,) = export_executorch(tiny_net(), folder, ["fp32"], input_shape=INPUT_SHAPE, stem="tiny")
    return art


def tiny_tflite(folder: Path) -> list[Artifact]:
    """fp32 and int8 (int8 in/out) TFLite of a tiny conv net, NHWC."""
    import tensorflow as tf
    tf.keras.utils.set_random_seed(0)
    n, c, h, w = INPUT_SHAPE
    inp = tf.keras.Input((h, w, c), batch_size=1, name="input")
    x = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu6")(inp)
    x = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(5)(x)
    model = tf.keras.Model(inp, out)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def rep():
        for _ in range(16):
            yield [rng.standard_normal((1, h, w, c)).astype(np.float32)]

    arts = []
    for precision in ("fp32", "int8"):
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if precision == "int8":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = rep
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        path = folder / f"tiny_{precision}.tflite"
        path.write_bytes(conv.convert())
        arts.append(_tflite_artifact(path, precision))
    return arts


def _tflite_artifact(path: Path, precision: str) -> Artifact:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))

    def spec(d: dict, name: str, layout: str) -> TensorSpec:
        scale, zp = d["quantization"]
        q = np.dtype(d["dtype"]).kind in "iu"
        return TensorSpec(name, [int(v) for v in d["shape"]], np.dtype(d["dtype"]).name, layout,
                          float(scale) if q else None, int(zp) if q else None)

    return Artifact(path=path.name, format="tflite", precision=precision,
                    inputs=[spec(it.get_input_details()[0], "input", "NHWC")],
                    outputs=[spec(it.get_output_details()[0], "logits", "NC")],
                    sha256=sha256_of(path), size_bytes=size_of(path), tool="tf.lite.TFLiteConverter",
                    extra={"note": "test model made by tests/device_helpers.py"})


def sample_input(seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal(INPUT_SHAPE).astype(np.float32)}


def save_manifest(folder: Path, artifacts: list[Artifact]) -> None:
    from exporters.artifact import Manifest, Preprocessing
    Manifest(model="tiny", preprocessing=Preprocessing([16, 16], [0.5] * 3, [0.25] * 3),
             artifacts=artifacts).save(folder)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj))
