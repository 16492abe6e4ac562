"""The comparator: metrics by their definitions, tolerances, run_all with real runtimes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from device_tests.compare import (DEFAULT_TOLERANCES, ParityReport, Tolerance, class_agreement, compare,
                                  error_metrics, run_all, tolerance_for)
from device_tests.runners.onnxruntime import OnnxRuntimeRunner
from device_tests.runners.torch import TorchRunner
from exporters.artifact import Artifact
from models.errors import InputError
from tests.parity_helpers import exported_small_net


def test_error_metrics_follow_their_definitions():
    ref = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = ref + np.array([[0.0, 0.5], [0.0, 0.0]])
    m = error_metrics(ref, out)
    assert m["max_abs"] == 0.5 and m["mean_abs"] == 0.125
    assert m["max_rel"] == 0.5 / 4.0 and m["ref_max_abs"] == 4.0
    assert m["snr_db"] == pytest.approx(10 * math.log10(30 / 0.25))       # sum r^2 / sum d^2
    assert m["psnr_db"] == pytest.approx(20 * math.log10(4 / math.sqrt(0.25 / 4)))
    cos0 = (1 * 1 + 2 * 2.5) / (math.hypot(1, 2) * math.hypot(1, 2.5))   # worst sample's cosine
    assert m["cosine"] == pytest.approx(cos0)
    same = error_metrics(ref, ref)
    assert same["max_abs"] == 0 and same["snr_db"] is None and same["psnr_db"] is None   # infinite
    assert same["cosine"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        error_metrics(ref, np.zeros(3))


def test_class_agreement_top1_top5_and_accuracy():
    ref = np.array([[9, 1, 0, 0, 0, 0, 0], [0, 9, 1, 0, 0, 0, 0], [0, 0, 9, 1, 0, 0, 0]], float)
    out = ref.copy()
    out[1] = [0, 5, 9, 0, 0, 0, 0]        # top-1 flips to 2; reference's 1 still in top 5
    out[2] = [9, 8, 0, 7, 6, 5, 4]        # reference's 2 falls out of the top 5
    a = class_agreement(ref, out, labels=np.array([0, 1, 3]))
    assert a["top1_agreement"] == pytest.approx(1 / 3)
    assert a["top5_agreement"] == pytest.approx(2 / 3)
    assert a["accuracy_reference"] == pytest.approx(2 / 3) and a["accuracy_target"] == pytest.approx(1 / 3)
    assert class_agreement(ref[:, :4], out[:, :4])["top5_agreement"] is None   # <= 5 classes


def test_tolerance_rows_overrides_and_bad_keys():
    assert tolerance_for("fp32") == DEFAULT_TOLERANCES["fp32"]
    assert tolerance_for("fp16") == DEFAULT_TOLERANCES["fp16"]
    assert tolerance_for("int8-io") == DEFAULT_TOLERANCES["int8"]
    assert tolerance_for("dynamic") == DEFAULT_TOLERANCES["int8"]
    assert tolerance_for("w8a16") == DEFAULT_TOLERANCES["w8a16"]
    t = tolerance_for("fp16", {"*": {"min_top1": 0.5}, "fp16": {"min_snr_db": 20.0}})
    assert t.min_top1 == 0.5 and t.min_snr_db == 20.0
    assert tolerance_for("fp32", {"fp16": {"min_snr_db": 1.0}}) == DEFAULT_TOLERANCES["fp32"]
    with pytest.raises(InputError):
        tolerance_for("fp32", {"*": {"atoll": 1.0}})


def test_tolerance_check_names_the_failed_criteria():
    tol = Tolerance(max_abs=1e-5, rtol=1e-5, min_top1=0.99, min_snr_db=30)
    m = {"max_abs": 2e-5, "ref_max_abs": 0.5, "cosine": 1.0, "snr_db": 20.0, "top1_agreement": 0.9}
    fails = tol.check(m)
    assert len(fails) == 3 and fails[0].startswith("max_abs")
    # The bound grows with the logits' scale: 2e-5 at |logits| = 10 is rounding.
    assert not Tolerance(max_abs=1e-5, rtol=1e-5).check({**m, "ref_max_abs": 10.0})
    assert not tol.check({"max_abs": 0.0, "ref_max_abs": 1.0, "cosine": 1.0, "snr_db": None,
                          "top1_agreement": 1.0})      # identical: infinite SNR passes


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    """The same SmallNet as a static-batch ONNX on ORT and as eager PyTorch."""
    folder = tmp_path_factory.mktemp("cmp")
    model, art, x = exported_small_net(folder, 7)
    ort_runner = OnnxRuntimeRunner()
    ort_runner.load(art, folder)
    ref = TorchRunner.from_module(model, Artifact("r", "pt", "fp32", [_dyn(art.inputs[0])], art.outputs))
    yield {"pt/fp32": ref, "onnx/fp32": ort_runner}, x
    ort_runner.close()


def _dyn(spec):
    from dataclasses import replace
    return replace(spec, shape=["batch", *spec.shape[1:]])


def test_run_all_batches_per_runner_and_compare_passes(runners):
    rs, x = runners
    seen = []
    res = run_all(rs, x, batch_size=4, progress=lambda k, done, n: seen.append((k, done)))
    assert res.outputs["pt/fp32"]["logits"].shape == (7, 10)
    assert res.outputs["onnx/fp32"]["logits"].shape == (7, 10)       # fed one at a time (static batch 1)
    assert ("pt/fp32", 7) in seen and ("onnx/fp32", 7) in seen and len(seen) == 2 + 7
    labels = res.outputs["pt/fp32"]["logits"].argmax(1)
    pair = compare(res, "pt/fp32", "onnx/fp32", tolerance_for("fp32"), labels=labels, precision="fp32")
    assert pair.passed, pair.failures
    assert pair.max_abs <= 1e-5 and pair.top1_agreement == 1.0 and pair.accuracy_reference == 1.0
    assert pair.samples == 7 and pair.output == "logits" and pair.seconds_target is not None
    # A bound below the difference fails and says why: the ONNX Runtime logits with one value
    # moved by 1e-3, so the difference is certain (not left to rounding).
    _, moved = res.output("onnx/fp32")
    moved = moved.copy()
    moved[3, 2] += 1e-3
    res.outputs["moved"] = {"logits": moved}
    strict = compare(res, "pt/fp32", "moved", Tolerance(max_abs=1e-4), precision="fp32")
    assert strict.max_abs == pytest.approx(1e-3, abs=2e-5)
    assert not strict.passed and strict.failures[0].startswith("max_abs 0.00") \
        and strict.failures[0].endswith("> 0.0001"), strict.failures
    assert not compare(res, "pt/fp32", "moved", tolerance_for("fp32"), precision="fp32").passed
    assert compare(res, "pt/fp32", "moved", Tolerance(max_abs=2e-3), precision="fp32").passed


def test_parity_report_is_strict_json(runners):
    rs, x = runners
    res = run_all(rs, x[:2])
    pair = compare(res, "pt/fp32", "pt/fp32", tolerance_for("fp32"))
    report = ParityReport(pairs=[pair], inputs={"source": "random", "samples": 2})
    text = json.dumps(report.to_dict(), allow_nan=False)        # inf SNR of identical outputs -> null
    doc = json.loads(text)
    assert doc["passed"] is True and doc["pairs"][0]["snr_db"] is None
    for key in ("reference", "target", "max_abs", "mean_abs", "cosine", "top1_agreement", "passed",
                "first_divergent"):
        assert key in doc["pairs"][0]


def test_wrong_input_shape_is_one_line_input_error(runners):
    rs, x = runners
    bad = np.zeros((2, 3, 28, 28), np.float32)
    with pytest.raises(InputError) as exc:
        run_all(rs, bad)
    assert "[N, 3, 32, 32]" in str(exc.value) and "28" in str(exc.value) and "\n" not in str(exc.value)
