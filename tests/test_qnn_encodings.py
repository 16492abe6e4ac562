"""The Qualcomm encodings file and the QNN rules (quantize/qnn_encodings.py), on QDQ models
written by ONNX Runtime's own QNN tooling from the model trained on the bundled MNIST.

* the ``.encodings.json`` (AIMET format 0.6.1) round-trips: every activation's scale and
  offset are the graph's Q/DQ values (offset = -zero point on the unsigned grid), every
  weight has one symmetric entry per output channel, min/max follow from scale and offset,
  and every name is a tensor or initializer of the float model;
* the QNN rules read back from the graph hold for both Snapdragon profiles, and fail where
  they should: a wrong activation type, and a real int32 bias overflow (one channel's
  weights scaled by 1e-6 under a large bias, quantized by ORT) named by layer;
* the quantize stage writes the file next to each QNN model and lists it in the manifest.
The QNN SDK is not available here: nothing runs ``qnn-onnx-converter``.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.artifact import Preprocessing
from exporters.onnx import export_onnx
from models.checkpoint import build_model
from quantize.calibration import CalibrationReader, load_calibration
from quantize.onnx_ptq import QNN_W8A8, QNN_W8A16, PtqSession, target_profiles
from quantize.qnn_encodings import (ENCODING_VERSION, INT32_LIMIT, bias_margin, check_qnn_rules,
                                    encodings_path, int32_bias_checks, qnn_encodings, write_encodings)

CALIB_SAMPLES = 64


@pytest.fixture(scope="module")
def trained(trained_mnist, tmp_path_factory):
    """The float ONNX model of the trained MNIST network and real calibration inputs
    (the helpers tests/test_onnx_ptq.py uses)."""
    folder = tmp_path_factory.mktemp("qnn_encodings")
    model, meta = build_model(None, trained_mnist)
    size = meta["input_size"]
    size = [size, size] if isinstance(size, int) else list(size)
    pre = Preprocessing(size, meta["mean"], meta["std"], meta["channel_order"])
    export_onnx(model, folder / "model.onnx", (1, pre.channels, *size))
    return {"folder": folder, "onnx": folder / "model.onnx", "pre": pre,
            "calib": load_calibration("mnist", pre, CALIB_SAMPLES)}


@pytest.fixture(scope="module")
def qnn_models(trained):
    """model_qnn_w8a8.onnx and model_qnn_w8a16.onnx, as PtqSession.quantize writes them."""
    out = trained["folder"] / "qnn"
    with PtqSession(trained["onnx"], trained["calib"], qnn=True) as s:
        for p in target_profiles("snapdragon"):
            s.quantize(p, out / f"{p.file_stem}.onnx")
    return {p.name: out / f"{p.file_stem}.onnx" for p in target_profiles("snapdragon")}


def _graph(proto):
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return inits, producers, consumers


def _float_names(path):
    """Tensor and initializer names of the float model the converter would read."""
    proto = onnx.load(str(path))
    tensors = {i.name for i in proto.graph.input} | {o for n in proto.graph.node for o in n.output}
    return tensors, {t.name for t in proto.graph.initializer}


def test_encodings_round_trip_against_the_qdq_graph(trained, qnn_models):
    float_tensors, float_inits = _float_names(trained["onnx"])
    for profile, bits in ((QNN_W8A8, 8), (QNN_W8A16, 16)):
        path = qnn_models[profile.name]
        written = write_encodings(path, method="minmax")
        assert written == encodings_path(path) == path.with_name(f"{profile.file_stem}.encodings.json")
        doc = json.loads(written.read_text())
        assert doc == json.loads(json.dumps(qnn_encodings(path, method="minmax")))
        assert doc["version"] == ENCODING_VERSION == "0.6.1"
        assert doc["quantizer_args"] == {"activation_bitwidth": bits, "dtype": "int", "is_symmetric": "True",
                                         "param_bitwidth": 8, "per_channel_quantization": "True",
                                         "quant_scheme": "post_training_tf"}
        proto = onnx.load(str(path))
        inits, producers, consumers = _graph(proto)

        # activations: every Q on a float tensor has its entry, with the Q/DQ node's values
        acts = doc["activation_encodings"]
        q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
        assert len(acts) == len(q_nodes) > 50, profile.name
        for q in q_nodes:
            name = q.input[0].removesuffix("_QuantizeLinear_Input")      # a quantized graph output
            assert name in acts, name
            (enc,) = acts[name]
            scale, zp = inits[q.input[1]], inits[q.input[2]]
            dq = next(c for c in consumers[q.output[0]] if c.op_type == "DequantizeLinear")
            assert dq.input[1:] == q.input[1:]                               # the DQ undoes the same grid
            assert zp.dtype == np.dtype(f"uint{bits}")
            assert enc["scale"] == float(scale) and enc["offset"] == -int(zp)
            assert enc["bitwidth"] == bits and enc["dtype"] == "int" and enc["is_symmetric"] == "False"
            assert enc["min"] == pytest.approx(enc["offset"] * enc["scale"], rel=1e-12, abs=0)
            assert enc["max"] == pytest.approx(enc["min"] + (2**bits - 1) * enc["scale"], rel=1e-12)
            assert enc["min"] <= 0.0 <= enc["max"]
        assert set(acts) <= float_tensors, set(acts) - float_tensors
        assert "input" in acts and "logits" in acts

        # weights: one symmetric entry per output channel, scales equal to the graph's
        params = doc["param_encodings"]
        layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
        assert len(params) == len(layers) > 40
        for node in layers:
            dq = producers[node.input[1]]
            wname = dq.input[0].removesuffix("_quantized")
            q, scale, zp = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
            channels = q.shape[0]                                          # Conv (O, I, kH, kW); Gemm transB=1
            assert len(params[wname]) == channels == scale.size, wname
            assert q.dtype == np.int8 and not zp.any()
            for c, enc in enumerate(params[wname]):
                assert enc["is_symmetric"] == "True" and enc["bitwidth"] == 8 and enc["offset"] == -128
                assert enc["scale"] == float(scale[c])
                assert enc["min"] == pytest.approx(-128 * enc["scale"], rel=1e-12)
                assert enc["max"] == pytest.approx(127 * enc["scale"], rel=1e-12)
                # QNN's dequantization, (q_unsigned + offset) * scale, gives back the ORT weights
                q_unsigned = q[c].astype(np.int64) + 128
                assert np.array_equal((q_unsigned + enc["offset"]) * enc["scale"], q[c] * np.float64(scale[c]))
        assert set(params) <= float_inits, set(params) - float_inits
        assert not any("bias" in k or k.endswith("_quantized") for k in params)   # int32 biases: QNN derives them


def test_qnn_rules_hold_for_both_profiles_and_report_the_bias_margin(qnn_models):
    margins = {}
    for profile in (QNN_W8A8, QNN_W8A16):
        proto = onnx.load(str(qnn_models[profile.name]))
        assert check_qnn_rules(proto, profile.activations) == [], profile.name
        checks = int32_bias_checks(proto)
        # every Conv/Gemm of the trained model has a (BN-folded) bias, quantized to int32 at s_in * s_w[c]
        layers = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
        assert [c.layer for c in checks] == layers
        assert all(c.scale_mismatch <= 1e-6 and not c.saturated and not c.weight_scale_raised for c in checks)
        margins[profile.name] = bias_margin(checks)
        m = margins[profile.name]
        assert 0 < m["max_abs_q"] < INT32_LIMIT and m["layer"] in layers and m["headroom"] > 1
    # 16-bit activations have ~256x finer input scales, so the same biases take ~256x larger
    # int32 values: the w8a16 model is the one closer to the overflow
    assert margins["qnn-w8a16"]["max_abs_q"] > 50 * margins["qnn-w8a8"]["max_abs_q"]
    # the rules fail where they should: the w8a16 model against the w8a8 activation type
    wrong = check_qnn_rules(qnn_models["qnn-w8a16"], "uint8")
    assert wrong and {v.rule for v in wrong} == {"activation-dtype"}
    assert any(v.where == "activation logits" and "uint16" in v.detail for v in wrong)


def _with_overflowing_bias(src, dst):
    """A copy of the float model in which one mid-network Conv has a channel whose weights
    are scaled by 1e-6 and whose bias is large: b / (s_in * s_w[c]) exceeds 2^31. (QNN's
    config floors a weight range at 1e-4, so s_w >= ~7.9e-7 whatever the weights: the bias
    has to be in the thousands to overflow.)"""
    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits
             and numpy_helper.to_array(inits[n.input[1]]).shape[1] > 1]      # not a depthwise one
    node = convs[len(convs) // 2]
    w = numpy_helper.to_array(inits[node.input[1]]).copy()
    b = numpy_helper.to_array(inits[node.input[2]]).copy()
    c = int(np.abs(w).reshape(len(w), -1).max(axis=1).argmax())
    w[c] *= 1e-6
    b[c] = 2000.0 * max(1.0, float(np.abs(b).max()))
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    inits[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
    onnx.save(proto, str(dst))
    return node.name, node.input[2], c


def test_checker_names_the_layer_whose_int32_bias_overflows(trained, tmp_path):
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    layer, bias, channel = _with_overflowing_bias(trained["onnx"], tmp_path / "float.onnx")
    calib = trained["calib"][:32]

    # ORT's default: it sees the overflow coming and raises that channel's weight scale until
    # the bias fits, so the channel's weights collapse onto a few levels; the checker says so.
    with PtqSession(tmp_path / "float.onnx", calib, qnn=True) as s:
        s.quantize(QNN_W8A8, tmp_path / "adjusted.onnx")
    found = check_qnn_rules(tmp_path / "adjusted.onnx", "uint8")
    assert [v.rule for v in found] == ["int32-bias-weight-scale-raised"], found
    assert layer in found[0].where and bias in found[0].where and f"[{channel}]" in found[0].detail
    (check,) = [c for c in int32_bias_checks(tmp_path / "adjusted.onnx") if c.layer == layer]
    assert check.weight_scale_raised == [channel] and check.weight_levels[channel] < 8
    # ORT's adjustment lands the bias 0.01% under the limit; the weights paid for the fit
    assert INT32_LIMIT / 1.001 < check.max_abs_q < INT32_LIMIT and not check.saturated
    assert bias_margin(int32_bias_checks(tmp_path / "adjusted.onnx"))["layer"] == layer

    # The same model with ORT's adjustment turned off: the int32 bias is clipped (HTP's overflow).
    prepared = tmp_path / "prepared.onnx"
    if not qnn_preprocess_model(str(tmp_path / "float.onnx"), str(prepared)):    # nothing to fuse
        prepared.write_bytes((tmp_path / "float.onnx").read_bytes())
    cfg = get_qnn_qdq_config(str(prepared), CalibrationReader(calib, "input"), activation_type=QuantType.QUInt8,
                             weight_type=QuantType.QInt8, per_channel=True, weight_symmetric=True)
    cfg.extra_options["QDQDisableWeightAdjustForInt32Bias"] = True
    quantize(str(prepared), str(tmp_path / "clipped.onnx"), cfg)
    found = check_qnn_rules(tmp_path / "clipped.onnx", "uint8")
    assert [v.rule for v in found] == ["int32-bias-overflow"], found
    assert layer in found[0].where and bias in found[0].where and f"[{channel}]" in found[0].detail
    (check,) = [c for c in int32_bias_checks(tmp_path / "clipped.onnx") if c.layer == layer]
    assert check.saturated == [channel] and check.max_abs_q == INT32_LIMIT and check.channel == channel
    # every other layer is within the int32 range
    assert all(not c.saturated for c in int32_bias_checks(tmp_path / "clipped.onnx") if c.layer != layer)


@pytest.mark.slow
def test_quantize_stage_writes_the_encodings_next_to_each_qnn_model(trained_mnist, tmp_path):
    from exporters.artifact import Manifest
    from pipeline.stages.export import ExportOptions, export_model
    from pipeline.stages.quantize import QuantizeOptions, quantize_folder

    export_model(None, tmp_path / "export", checkpoint=trained_mnist, options=ExportOptions(formats=("onnx",)))
    opts = QuantizeOptions(target="snapdragon", samples=32, tflite=False, sensitivity=False, eval_samples=50)
    quantize_folder(tmp_path / "export", tmp_path / "q", opts)
    manifest = Manifest.load(tmp_path / "q")
    qnn = [a for a in manifest.artifacts if a.format == "onnx"]
    assert [a.key for a in qnn] == ["onnx/w8a8-qnn", "onnx/w8a16-qnn"]
    for art, bits in zip(qnn, (8, 16)):
        stem = art.path.removesuffix(".onnx")
        assert art.extra["encodings_file"] == f"{stem}.encodings.json"
        doc = json.loads((tmp_path / "q" / art.extra["encodings_file"]).read_text())
        assert doc == json.loads(json.dumps(qnn_encodings(tmp_path / "q" / art.path, method="minmax")))
        assert doc["quantizer_args"]["activation_bitwidth"] == bits
        rules = art.extra["qnn_rules"]
        assert rules["ok"] and rules["violations"] == []
        assert 0 < rules["int32_bias"]["max_abs_q"] < INT32_LIMIT
