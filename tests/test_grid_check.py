"""The int8 weights the converters write are the optimised integers (issue 14): the
TFLite int8-io model of the quantize stage, and the Core ML int8w package of ``--coreml``,
read back and compared to ``round(w / (max|w| / 127))`` of the optimised float model."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.parity_helpers import mnist_checkpoint


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """An export folder of a small MobileNetV2 (conv, depthwise and fully connected
    weights) and the quantize stage's output for it (default weight rounding)."""
    from pipeline.stages.export import ExportOptions, export_model
    from pipeline.stages.quantize import QuantizeOptions, quantize_folder
    tmp = tmp_path_factory.mktemp("grid")
    ck = mnist_checkpoint(tmp / "model.safetensors")
    export_model(None, tmp / "export", checkpoint=ck, options=ExportOptions(formats=("onnx",)))
    opts = QuantizeOptions(samples=32, rounding_samples=32, sensitivity=False, eval_samples=40, coreml=True)
    result = quantize_folder(tmp / "export", tmp / "q", opts)
    return tmp, result


def test_the_int8_tflite_carries_the_optimised_integers(stage):
    tmp, result = stage
    (tfl,) = [a for a in result.manifest.artifacts if a.format == "tflite"]
    found = tfl.extra["weight_grid_mismatch"]
    assert len(found) >= 50 and not tfl.extra["weight_grid_unmatched"]    # every conv, depthwise and fc weight
    assert sum(found.values()) == 0, {k: v for k, v in found.items() if v}
    assert result.report.weight_rounding["grid_mismatch"][tfl.key] == 0
    assert result.report.weight_rounding["grid_unmatched"][tfl.key] == 0


def test_the_tflite_check_fails_against_weights_off_the_grid(stage):
    """Negative control: the same .tflite against the exported model's own float weights
    (BatchNorm folded by the ONNX export, never rounded): its integers are not those."""
    from quantize.grid_check import tflite_weight_mismatch
    tmp, result = stage
    (tfl,) = [a for a in result.manifest.artifacts if a.format == "tflite"]
    check = tflite_weight_mismatch(tmp / "export" / "model.onnx", tmp / "q" / tfl.path)
    assert check.total > 0 and check.mismatch
