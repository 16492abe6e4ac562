"""Every registered model to TFLite by both routes, fp32 and fp16, checked against PyTorch
on LiteRT; on the ONNX route also ``int8w``, whose int8 weights are checked against the
grid of the ONNX model's weights (``quantize.grid_check``). ``make test-zoo`` (marker
``zoo``). Routes: ``onnx2tf`` (ONNX -> onnx2tf -> TFLiteConverter) and ``litert-torch``
(PyTorch -> LiteRT directly, fp16 weights cast by ai-edge-quantizer), the default for the
float kinds (``exporters.tflite``).

Each model is built at its registered small input size with 3 channels and 10
classes, trained-like random weights (``tests.zoo_checks.trained_like``, the recipe of
every zoo sweep), eval mode. Tolerances: verify's own rows. fp32 holds
``1e-5 + 1e-5 * max|logit|``, or, where a deep net rounds further than that in fp32,
stays within 2x of PyTorch's own fp32 distance from a float64 forward
(``tests.zoo_checks.fp32_parity_failure``, verify's float64 check); fp16 weights:
SNR >= 40 dB and top-1 agreement >= 0.99, or, for a model whose own PyTorch fp16 forward
is under that, within 2x (6 dB) of it (``fp16_parity_failure``).

A model that cannot be converted is listed in ``KNOWN_FAILURES`` (per route) with the
converter's own message, as a strict expected failure (``InputError``, of which the
converters' ``ConversionError`` is one: when a new onnx2tf fixes it, the test says so).
The onnx2tf failures seen all come from its shape-based NCHW->NHWC inference at 32x32,
where the deepest feature maps are 1x1 or 2x2 and dimensions collide (2x2 maps in a
2-group convolution, a 1x1 map before a flatten); ``test_converts_at_64`` shows those
models convert with parity at 64x64.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from device_tests.runners.litert import LiteRTRunner
from exporters.artifact import Preprocessing
from exporters.onnx import export_onnx
from exporters.tflite import export_tflite
from models.errors import InputError
from models import create_model, list_models, model_entry
from models.reparam import is_reparameterizable, reparameterize_model
from quantize.grid_check import tflite_weight_mismatch
from tests.zoo_checks import fp16_parity_failure, fp32_parity_failure, trained_like

pytestmark = pytest.mark.zoo

# name -> the converter's message (onnx2tf 1.29.24, TF 2.21, torch 2.13), from `make test-zoo`.
KNOWN_FAILURES: dict[str, str] = {
    "asnet_base": "onnx2tf at ONNX node node_view_170: Cannot reshape a tensor with 262144 elements "
                  "to shape [1,512] (input shapes: [1,512,512,1]) -- 1x1 map before the flatten at 32x32",
    "mixer_b16_224": "onnx2tf at ONNX node node_add_1: Dimensions must be equal, but are 768 and 196 "
                     "(input shapes: [1,768,196], [1,196,768]) -- layout inference across the token-mixing "
                     "transpose, 196 tokens x 768 channels",
    "shiftnet_a": "onnx2tf at ONNX node node_view_23: Cannot reshape a tensor with 9072 elements to shape "
                  "[1,384,4,6] (input shapes: [1,42,216]) -- layout inference at 32x32",
    # onnx2tf checks its layout guesses on a sample forward, so these depend on the weights.
    # (repvgg_b3, "its Keras graph fails to build ... at the classifier", was here: that build was
    # onnx2tf's own float .tflite step, which exporters/tflite_convert.py now stops before; it
    # XPASSed in the 2026-12-05 sweep.)
    "shufflenet_v1_g2": "onnx2tf at ONNX node node_Conv_943: tf.math.add_31 Dimensions must be equal, but are "
                        "20000 and ... -- layout inference at 32x32 with the zoo weights",
    "shufflenet_v1_g4": "onnx2tf at ONNX node node_Conv_919: tf.math.add_10 Dimensions must be equal, but are "
                        "4624 and ... -- layout inference at 32x32 with the zoo weights",
}

# name -> the measured miss (make test-zoo): the file converts, the numbers are off beyond the rule.
# (RepVGG-B fp32 on XNNPACK was here: 9.6e-5 from float64 where PyTorch is 2.5e-5. XNNPACK sums each
# output's products in order, PyTorch in blocks; summed in order, PyTorch itself is 1.1e-4 from float64
# (repvgg_b0), and the float64 rule now takes the worse of the two orders: device_tests.accumulation.)
KNOWN_MISSES: dict[str, str] = {
    "densenet_cifar": "fp16 file 31.9 dB where PyTorch's own fp16 forward is 39.6 dB and Core ML fp16 35.9 dB "
                      "(not investigated; the litert-torch route's fp16 file passes)",
}
# repvgg_tiny (like qarepvgg_tiny before it) converts at 32x32 since the zoo weights carry a real
# signal: onnx2tf checks its layout guesses on a sample forward, so what it picks depends on them.
SIZE_SPECIFIC = ("asnet_base", "qarepvgg_tiny", "repvgg_tiny", "shiftnet_a")


# The same for the litert-torch route (litert-torch 0.10.0, ai-edge-quantizer 0.10.0), from `make test-zoo`:
# every model converts, the six onnx2tf failures included (mixer_b16_224 at 224).
LITERT_TORCH_FAILURES: dict[str, str] = {}
LITERT_TORCH_MISSES: dict[str, str] = {}
ROUTES = {"onnx2tf": (KNOWN_FAILURES, KNOWN_MISSES), "litert-torch": (LITERT_TORCH_FAILURES, LITERT_TORCH_MISSES)}


def _params() -> list:
    out = []
    for route, (failures, misses) in ROUTES.items():
        for name in list_models():
            marks = [pytest.mark.xfail(raises=InputError, strict=True, reason=failures[name])] \
                if name in failures else []
            if name in misses:
                marks = [pytest.mark.xfail(raises=AssertionError, strict=True, reason=misses[name])]
            out.append(pytest.param(route, name, marks=marks, id=f"{route}-{name}"))
    return out


@pytest.mark.parametrize("route,name", _params())
def test_fp32_and_fp16_parity(route, name, tmp_path):
    _check_parity(name, model_entry(name).small_input_size, tmp_path, route)


@pytest.mark.parametrize("name", SIZE_SPECIFIC)
def test_converts_at_64(name, tmp_path):
    _check_parity(name, 64, tmp_path, "onnx2tf")


def _check_parity(name: str, size: int, tmp_path, route: str) -> None:
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=10, in_chans=3), size)
    if is_reparameterizable(model):       # what `mdeploy export` ships: the deploy form
        model = reparameterize_model(model)
    pre = Preprocessing([size, size], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
    export_onnx(model, tmp_path / "model.onnx", (1, 3, size, size))
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    # int8w on the ONNX route, the one `mdeploy quantize` writes it by
    precisions = ["fp32", "fp16", *(["int8w"] if route == "onnx2tf" else [])]
    arts = export_tflite(tmp_path / "model.onnx", tmp_path, precisions, preprocessing=pre,
                         calibration=x, module=model, converter=route)
    assert {a.extra["converter"]["route"] for a in arts} == {route}
    outs = {}
    for a in arts:
        with LiteRTRunner() as r:
            r.load(a, tmp_path)
            outs[a.precision] = r.infer({"input": x})["logits"]
    failure = fp32_parity_failure(model, x, outs["fp32"], name)
    assert failure is None, failure
    failure = fp16_parity_failure(model, x, outs["fp16"], name)
    assert failure is None, failure
    if "int8w" in outs:
        # every conv / depthwise / fc weight int8, on exactly the grid of the ONNX model's weight
        # (tests/test_tflite_export.py shows the file then computes the fp32 one's outputs)
        (int8w,) = [a for a in arts if a.precision == "int8w"]
        grid = tflite_weight_mismatch(tmp_path / "model.onnx", int8w.resolve(tmp_path))
        assert grid.mismatch and not grid.unmatched and grid.total == 0, grid.to_dict()
        assert np.isfinite(outs["int8w"]).all()


def test_int8_model_xnnpack_refuses_runs_on_builtin_kernels(tmp_path):
    """The pinned LiteRT's XNNPACK fails to prepare the int8 ShuffleNetV2 ("Node number N
    (TfLiteXNNPackDelegate) failed to prepare"); the runner falls back to the builtin
    kernels, says so in its label, and gives exactly what an XNNPACK-off runner gives."""
    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=10, in_chans=1).eval()
    pre = Preprocessing([32, 32], [0.5], [0.25], "GRAY")
    export_onnx(model, tmp_path / "model.onnx", (1, 1, 32, 32))
    x = np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32)
    (art,) = export_tflite(tmp_path / "model.onnx", tmp_path, ["int8"], preprocessing=pre, calibration=x)
    outs = {}
    for xnnpack in (True, False):
        with LiteRTRunner(xnnpack=xnnpack) as r:
            r.load(art, tmp_path)
            outs[xnnpack] = r.infer({"input": x})["logits"]
            if xnnpack:
                if r.xnnpack_refused is None:
                    pytest.fail("XNNPACK now takes the int8 ShuffleNetV2: drop this test's premise")
                assert "XNNPACK refused the model" in r.label and "failed to prepare" in r.xnnpack_refused
    np.testing.assert_array_equal(outs[True], outs[False])
