"""The LiteRT runner at its edges: layouts, quantized I/O, batches, XNNPACK on/off,
intermediates. Models come straight from TensorFlow (a conv net written as a
``tf.function``), so the reference is TensorFlow itself running the same graph."""
from __future__ import annotations

import os

import numpy as np
import pytest

from device_tests.runners import runner_class, runner_for
from device_tests.runners.litert import LiteRTRunner
from exporters.artifact import Artifact, TensorSpec
from models.errors import InputError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((3, 3, 3, 8)).astype(np.float32) * 0.3
W2 = RNG.standard_normal((8, 5)).astype(np.float32) * 0.3


def _net(layout: str):
    import tensorflow as tf
    shape = [1, 12, 12, 3] if layout == "NHWC" else [1, 3, 12, 12]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="input")])
    def f(x):
        if layout == "NCHW":
            x = tf.transpose(x, [0, 2, 3, 1])
        y = tf.nn.relu6(tf.nn.conv2d(x, W1, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(y, axis=[1, 2]), W2)
    return f


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import tensorflow as tf
    folder = tmp_path_factory.mktemp("litert_runner")
    calib = RNG.standard_normal((32, 12, 12, 3)).astype(np.float32)
    out = {}
    for name, layout, int8 in (("nhwc", "NHWC", False), ("nchw", "NCHW", False), ("int8io", "NHWC", True)):
        f = _net(layout)
        conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
        if int8:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = conv.inference_output_type = tf.int8
        (folder / f"{name}.tflite").write_bytes(conv.convert())
        in_shape = [1, 12, 12, 3] if layout == "NHWC" else [1, 3, 12, 12]
        dtype = "int8" if int8 else "float32"
        out[name] = Artifact(f"{name}.tflite", "tflite", "int8-io" if int8 else "fp32",
                             [TensorSpec("input", in_shape, dtype, layout)], [TensorSpec("logits", [1, 5], dtype, "NC")],
                             extra={"intermediate_layout": "NHWC"})
    return folder, out


def _reference(x_nchw: np.ndarray) -> np.ndarray:
    f = _net("NHWC")
    return np.concatenate([f(x.transpose(1, 2, 0)[None]).numpy() for x in x_nchw])


def test_registered_for_tflite(models):
    folder, arts = models
    assert runner_class("litert") is LiteRTRunner
    assert runner_for(arts["nhwc"]) is LiteRTRunner


@pytest.mark.parametrize("name", ["nhwc", "nchw"])
def test_float_nchw_in_and_out_either_layout(models, name):
    folder, arts = models
    x = RNG.standard_normal((3, 3, 12, 12)).astype(np.float32)     # a batch of 3: run one by one
    with LiteRTRunner(threads=1) as r:
        r.load(arts[name], folder)
        y = r.infer({"input": x})["logits"]
    assert y.shape == (3, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, _reference(x), atol=1e-5)


def test_xnnpack_off_matches_on(models):
    folder, arts = models
    x = RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)
    outs = {}
    for on in (True, False):
        r = LiteRTRunner(xnnpack=on)
        r.load(arts["nhwc"], folder)
        outs[on] = r.infer({"input": x})["logits"]
        assert ("XNNPACK on" if on else "XNNPACK off") in r.label
    np.testing.assert_allclose(outs[True], outs[False], atol=1e-5)


def test_int8_io_uses_the_tensors_own_scale_and_zero_point(models):
    from ai_edge_litert.interpreter import Interpreter
    folder, arts = models
    x = RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)
    it = Interpreter(model_path=str(folder / "int8io.tflite"))
    it.allocate_tensors()
    d_in, d_out = it.get_input_details()[0], it.get_output_details()[0]
    (si, zi), (so, zo) = d_in["quantization"], d_out["quantization"]
    assert d_in["dtype"] == np.int8 and si > 0
    by_hand = []
    for xi in x:
        q = np.clip(np.round(xi.transpose(1, 2, 0)[None] / si) + zi, -128, 127).astype(np.int8)
        it.set_tensor(d_in["index"], q)
        it.invoke()
        by_hand.append((it.get_tensor(d_out["index"]).astype(np.float32) - zo) * so)
    with LiteRTRunner() as r:
        r.load(arts["int8io"], folder)
        y = r.infer({"input": x})["logits"]
    np.testing.assert_array_equal(y, np.concatenate(by_hand))
    assert np.abs(y - _reference(x)).max() < 0.1 * np.abs(_reference(x)).max()   # and it is the same net


def test_intermediates_are_nchw_and_dequantized(models):
    folder, arts = models
    x = RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)
    conv = np.stack([np.maximum(0, np.minimum(6, _conv_nchw(xi))) for xi in x])
    for name in ("nhwc", "int8io"):
        with LiteRTRunner() as r:
            r.load(arts[name], folder)
            names = r.intermediate_names()
            vals = r.infer_intermediates({"input": x})
        assert set(vals) == set(names) and len(names) >= 3
        four_d = [v for v in vals.values() if v.ndim == 4 and v.shape[1] == 8]
        assert four_d and all(v.dtype == np.float32 and v.shape == (2, 8, 12, 12) for v in four_d)
        err = min(np.abs(v - conv).max() for v in four_d)
        assert err < (1e-4 if name == "nhwc" else 0.1), (name, err)     # int8: within a few steps


def _conv_nchw(x: np.ndarray) -> np.ndarray:
    """3x3 SAME convolution of one CHW image with W1 (HWIO), in plain NumPy."""
    c, h, w = x.shape
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((W1.shape[3], h, w), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("chw,co->ohw", pad[:, dy:dy + h, dx:dx + w], W1[dy, dx])
    return out


def test_bad_inputs_are_one_line_errors(models, tmp_path):
    folder, arts = models
    with LiteRTRunner() as r:
        r.load(arts["nhwc"], folder)
        with pytest.raises(InputError, match=r"\[N, 3, 12, 12\]"):
            r.infer({"input": np.zeros((1, 12, 12, 3), np.float32)})      # NHWC given instead of NCHW
        with pytest.raises(InputError, match="'input'"):
            r.infer({"image": np.zeros((1, 3, 12, 12), np.float32)})
    with pytest.raises(InputError, match="no such file"):
        LiteRTRunner().load(Artifact("missing.tflite", "tflite", "fp32", [], []), tmp_path)
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(InputError, match="LiteRT can load"):
        LiteRTRunner().load(Artifact("junk.tflite", "tflite", "fp32", [], []), tmp_path)
