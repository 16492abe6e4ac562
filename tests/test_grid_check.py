"""The int8 weights the converters write are the optimised integers (issue 14): the
TFLite int8-io model of the quantize stage, and the Core ML int8w package of ``--coreml``,
read back and compared to ``round(w / (max|w| / 127))`` of the optimised float model."""
from __future__ import annotations

import pytest

from tests.parity_helpers import mnist_checkpoint


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """An export folder of a small MobileNetV2 (conv, depthwise and fully connected
    weights) and the quantize stage's output for it. GPTQ without the scale search: each
    row keeps its round-to-nearest scale and every weight moves by less than one step, so
    the un-optimised weights still pair with the quantized tensors and the negative
    controls below count integers (with ``mse`` a clipped row no longer pairs at all)."""
    from pipeline.stages.export import ExportOptions, export_model
    from pipeline.stages.quantize import QuantizeOptions, quantize_folder
    tmp = tmp_path_factory.mktemp("grid")
    ck = mnist_checkpoint(tmp / "model.safetensors")
    export_model(None, tmp / "export", checkpoint=ck, options=ExportOptions(formats=("onnx",)))
    opts = QuantizeOptions(samples=32, rounding_samples=32, sensitivity=False, eval_samples=40, coreml=True,
                           weight_rounding=("gptq", "bias"))
    result = quantize_folder(tmp / "export", tmp / "q", opts)
    return tmp, result


def test_the_int8_tflite_carries_the_optimised_integers(stage):
    tmp, result = stage
    tflites = [a for a in result.manifest.artifacts if a.format == "tflite"]
    assert sorted(a.precision for a in tflites) == ["int8-io", "int8w", "uint8-pixels"]     # all by default
    for tfl in tflites:     # the camera-ready one too (its pixel affine is an op of its own, not folded),
        # and the int8w one (int8 weights behind DEQUANTIZE, float compute)
        found = tfl.extra["weight_grid_mismatch"]
        assert len(found) >= 50 and not tfl.extra["weight_grid_unmatched"]    # every conv, depthwise and fc weight
        assert sum(found.values()) == 0, (tfl.key, {k: v for k, v in found.items() if v})
        assert result.report.weight_rounding["grid_mismatch"][tfl.key] == 0
        assert result.report.weight_rounding["grid_unmatched"][tfl.key] == 0


def test_the_tflite_check_fails_against_weights_off_the_grid(stage):
    """Negative control: the same .tflite against the exported model's own float weights
    (BatchNorm folded by the ONNX export, never rounded): its integers are not those."""
    from quantize.grid_check import tflite_weight_mismatch
    tmp, result = stage
    tfl = next(a for a in result.manifest.artifacts if a.key == "tflite/int8-io")
    check = tflite_weight_mismatch(tmp / "export" / "model.onnx", tmp / "q" / tfl.path)
    assert check.total > 0 and len(check.mismatch) >= 40


def test_coremltools_symmetric_int8_is_the_same_grid():
    """What the Core ML check relies on, read from coremltools itself: linear_symmetric int8
    spans [-127, 127] (scale 2 max|w| / 254 = max|w| / 127, no zero point); the affine
    ``linear`` mode spans [-128, 127] with a zero point, a different grid."""
    import numpy as np
    from coremltools.optimize._utils import get_quant_range, quantize_weight
    assert get_quant_range(8, True, "LINEAR_SYMMETRIC") == (-127, 127)
    assert get_quant_range(8, True, "LINEAR") == (-128, 127)
    w = np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32)
    q, scale, zp = quantize_weight(w, axes=(1,), nbits=8, signed=True, quantization_mode="LINEAR_SYMMETRIC",
                                   dtype=np.int8)
    from quantize.grid_check import grid_integers
    assert zp is None and np.array_equal(q.astype(np.int64), grid_integers(w, 0))


def test_the_coreml_int8w_package_carries_the_optimised_integers(stage):
    from quantize.grid_check import coreml_weight_mismatch
    tmp, result = stage
    (pkg,) = [a for a in result.manifest.artifacts if a.format == "mlpackage"]
    assert pkg.precision == "int8w" and (tmp / "q" / pkg.path).is_dir()
    found = pkg.extra["weight_grid_mismatch"]
    assert len(found) >= 20 and not pkg.extra["weight_grid_unmatched"]   # the rest: under 2,048 elements, float
    assert sum(found.values()) == 0, {k: v for k, v in found.items() if v}
    assert result.report.weight_rounding["grid_mismatch"][pkg.key] == 0
    # negative control: the exported model's own (never rounded) weights are not these integers
    assert coreml_weight_mismatch(tmp / "export" / "model.onnx", tmp / "q" / pkg.path).total > 0
    # and the package runs (numpy MIL interpreter off macOS) close to float on held-out digits
    (v,) = [v for v in result.report.variants if v.key == pkg.key]
    assert v.top1_agreement >= 0.9 and min(v.snr_db.values()) > 20
    # `mdeploy verify DIR2` checks it like the other quantized files
    from pipeline.stages.verify import VerifyOptions, verify_folder
    pairs = {p["target"]: p for p in verify_folder(tmp / "q", VerifyOptions(samples=8)).report.to_dict()["pairs"]}
    assert pairs[pkg.key]["passed"], pairs[pkg.key]


def test_the_plain_route_is_measured_shown_and_not_written(stage):
    import json
    from pathlib import Path as P
    from pipeline.commands.quantize import rounding_summary
    from pipeline.report.sections import QuantizeRecord
    from tests.json_schema import validate
    tmp, result = stage
    plain = result.report.plain_route
    assert plain is not None and plain.key == "onnx/w8a8-qnn (plain rtn, not written)"
    assert plain.samples == result.report.eval_samples and plain.path == ""
    assert not any("plain" in p.name for p in (tmp / "q").iterdir())
    q = result.report.to_dict()
    assert q["plain_route"]["key"] == plain.key
    text = rounding_summary(q)
    assert "GPTQ" in text and "tflite/int8-io 0 integer(s) differ" in text and plain.key in text
    rec = QuantizeRecord(str(tmp / "q"), result.report, result.seconds)
    md = "\n".join(rec.markdown(None, lambda name: []))
    assert plain.key in md and "Grid check" in md
    root = P(__file__).resolve().parents[1]
    schema = json.loads((root / "pipeline/report/run_record.schema.json").read_text())
    sub = dict(schema["properties"]["quantize"], **{"$defs": schema["$defs"]})
    assert validate(json.loads(json.dumps(rec.to_dict(), default=str)), sub) == []


def test_no_plain_baseline_skips_it(stage, tmp_path):
    from pipeline.stages.quantize import QuantizeOptions, quantize_folder
    tmp, _ = stage
    opts = QuantizeOptions(samples=16, rounding_samples=16, sensitivity=False, eval_samples=20, tflite=False,
                           plain_baseline=False, target="generic")
    result = quantize_folder(tmp / "export", tmp_path / "q", opts)
    assert result.report.plain_route is None and "plain_route" not in result.seconds


def test_rows_onnx_runtime_rescales_for_the_int32_bias_are_not_counted_as_re_rounded(tmp_path):
    """A row of near-zero weights with a real bias (what BatchNorm folding leaves of a
    switched-off channel) cannot keep its own scale under the QNN rules: ``bias / (s_in *
    s_w)`` would overflow int32, so ONNX Runtime raises that row's scale. The check counts
    it as rescaled; the other rows, on their grid, still match integer for integer."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from quantize.onnx_ptq import QNN_W8A8, PtqSession, weight_grid_mismatch, weight_rows_rescaled
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.float32)
    q.reshape(4, -1)[:, 0] = 127                               # each row keeps its +-127 level
    w = q * np.array([0.01, 0.02, 0.005, 1e-9], np.float32)[:, None, None, None]
    b = np.array([0.1, -0.2, 0.0, 5.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "float.onnx"))
    calib = rng.uniform(-1, 1, (8, 3, 8, 8)).astype(np.float32)
    with PtqSession(tmp_path / "float.onnx", calib, qnn=True) as s:
        s.write(QNN_W8A8, tmp_path / "q.onnx")
    assert weight_rows_rescaled(tmp_path / "float.onnx", tmp_path / "q.onnx") == {"W": 1}
    assert weight_grid_mismatch(tmp_path / "float.onnx", tmp_path / "q.onnx") == {"W": 0}
    # negative control: weights moved off their grid (by 0.6 of a step, the +-127 levels kept) are counted
    off = w.copy()
    off.reshape(4, -1)[:3, 1:] += 0.6 * np.array([0.01, 0.02, 0.005], np.float32)[:, None]
    onnx.save(helper.make_model(helper.make_graph(
        graph.node, "g", graph.input, graph.output,
        [numpy_helper.from_array(off, "W"), numpy_helper.from_array(b, "B")]),
        opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "off.onnx"))
    assert weight_grid_mismatch(tmp_path / "off.onnx", tmp_path / "q.onnx")["W"] > 0
