"""Every registered model through ONNX -> TFLite (onnx2tf + TFLiteConverter), fp32 and
fp16, checked against PyTorch on LiteRT. ``make test-zoo`` (marker ``zoo``).

Each model is built at its registered small input size with 3 channels and 10
classes, random weights, eval mode. Tolerances (see tests/test_tflite_export.py):
fp32 1e-5 x max(1, |logit|) (float32 rounding grows with the magnitude of the
values, which random-weight deep nets make larger than 1); fp16 weights
2e-3 x max(1, |logit|).

A model the converter cannot take is listed in ``KNOWN_FAILURES`` with the
converter's own message, as a strict expected failure (it must keep failing with
``ConversionError``; when a new onnx2tf fixes it, the test says so).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from device_tests.runners.litert import LiteRTRunner
from exporters.artifact import Preprocessing
from exporters.onnx import export_onnx
from exporters.tflite import ConversionError, export_tflite
from models import create_model, list_models, model_entry
from models.reparam import is_reparameterizable, reparameterize_model

pytestmark = pytest.mark.zoo

FP32_RTOL = 1e-5
FP16_RTOL = 2e-3

# name -> the converter's message (onnx2tf 1.29.24, TF 2.21), filled from `make test-zoo`.
KNOWN_FAILURES: dict[str, str] = {}


def _params() -> list:
    out = []
    for name in list_models():
        marks = [pytest.mark.xfail(raises=ConversionError, strict=True, reason=KNOWN_FAILURES[name])] \
            if name in KNOWN_FAILURES else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params())
def test_fp32_and_fp16_parity(name, tmp_path):
    size = model_entry(name).small_input_size
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3).eval()
    if is_reparameterizable(model):       # what `mdeploy export` ships: the deploy form
        model = reparameterize_model(model)
    pre = Preprocessing([size, size], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
    export_onnx(model, tmp_path / "model.onnx", (1, 3, size, size))
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    arts = export_tflite(tmp_path / "model.onnx", tmp_path, ["fp32", "fp16"], preprocessing=pre,
                         calibration=x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    errs = {}
    for a in arts:
        with LiteRTRunner() as r:
            r.load(a, tmp_path)
            errs[a.precision] = float(np.abs(r.infer({"input": x})["logits"] - ref).max())
    assert errs["fp32"] <= FP32_RTOL * scale, f"{name} fp32: max abs {errs['fp32']:.3g} (logits up to {scale:.3g})"
    assert errs["fp16"] <= FP16_RTOL * scale, f"{name} fp16: max abs {errs['fp16']:.3g} (logits up to {scale:.3g})"
