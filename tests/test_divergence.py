"""First-divergent-layer search on real ONNX Runtime runs with faults edited into the file."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from device_tests.compare import Tolerance, compare, run_all, tolerance_for
from device_tests.divergence import find_first_divergent, layer_keys, worst_samples
from device_tests.runners.onnxruntime import OnnxRuntimeRunner
from device_tests.runners.torch import TorchRunner
from exporters.artifact import Artifact
from tests.parity_helpers import change_bn_epsilon, corrupt_layer, exported_small_net

FP32 = tolerance_for("fp32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("div")
    model, art, x = exported_small_net(folder, 6, dynamic_batch=True)
    return model, art, folder, x


def _variant(exported, tmp_path, edit=None):
    """A copy of the exported file, optionally edited, opened on ORT."""
    model, art, folder, x = exported
    shutil.copy(folder / art.path, tmp_path / art.path)
    if edit:
        edit(tmp_path / art.path)
    r = OnnxRuntimeRunner()
    r.load(art, tmp_path)
    return r


def _reference(exported):
    model, art, _, _ = exported
    return TorchRunner.from_module(model, Artifact("ref", "pt", "fp32", art.inputs, art.outputs))


def test_clean_export_has_no_divergent_layer(exported, tmp_path):
    _, art, _, x = exported
    with _variant(exported, tmp_path) as target:
        div = find_first_divergent(_reference(exported), target, {"input": x}, FP32)
    assert div.first is None and div.summary() is None
    assert [layer.module for layer in div.layers] == [m for t, m in art.extra["layer_map"].items()]
    assert all(layer.passed and layer.max_rel < FP32.layer_max_rel for layer in div.layers)


def test_corrupted_weights_are_named_by_module_and_tensor(exported, tmp_path):
    _, art, _, x = exported
    tensor = {}
    with _variant(exported, tmp_path,
                  lambda p: tensor.setdefault("t", corrupt_layer(p, art.extra["layer_map"], "dw.1"))) as target:
        ref = _reference(exported)
        res = run_all({"pt": ref, "onnx": target}, x)
        pair = compare(res, "pt", "onnx", FP32)
        assert not pair.passed
        div = find_first_divergent(ref, target, {"input": x[:2]}, FP32)
    assert div.first is not None
    assert div.first.module == "dw.1" and div.first.tensor == tensor["t"]
    assert div.summary()["layer"] == "dw.1"
    before = div.layers[: div.first.index]
    assert before and all(layer.passed for layer in before), "layers before the fault agree"
    assert div.first.max_rel > 100 * FP32.layer_max_rel


def test_subtle_bn_epsilon_fault_fails_only_at_the_tolerance(exported, tmp_path):
    """BatchNorm epsilon 1e-3 instead of 1e-5 in one layer: every prediction still agrees,
    cosine is ~1, yet the fp32 bound catches it, and the search pins the layer."""
    model, art, _, x = exported
    with _variant(exported, tmp_path,
                  lambda p: change_bn_epsilon(p, art.extra["layer_map"], "pw.1", model.pw[1])) as target:
        ref = _reference(exported)
        res = run_all({"pt": ref, "onnx": target}, x)
        pair = compare(res, "pt", "onnx", FP32)
        loose = compare(res, "pt", "onnx", FP32.with_overrides(max_abs=0.1))
        _, r = res.output("pt")
        _, t = res.output("onnx")
        div = find_first_divergent(ref, target, {"input": x[worst_samples(r, t, 2)]}, FP32)
    assert not pair.passed and pair.failures[0].startswith("max_abs")
    assert pair.top1_agreement == 1.0 and pair.cosine > 0.99999
    assert loose.passed, "a 0.1 bound (fp16-like) would have let it through"
    assert div.first is not None and div.first.module == "pw.1"
    assert all(layer.passed for layer in div.layers[: div.first.index])


def test_search_is_runtime_independent_onnx_vs_onnx(exported, tmp_path):
    """No torch in the pair: both sides are ORT sessions mapped through their layer maps."""
    _, art, folder, x = exported
    clean = OnnxRuntimeRunner(graph_optimization_level="disable")
    clean.load(art, folder)
    (tmp_path / "bad").mkdir()
    with clean, _variant(exported, tmp_path / "bad",
                         lambda p: corrupt_layer(p, art.extra["layer_map"], "pw.1")) as target:
        assert set(layer_keys(clean)) == set(art.extra["layer_map"].values())
        div = find_first_divergent(clean, target, {"input": x[:2]}, FP32)
    assert div.first is not None and div.first.module == "pw.1"


def test_no_layer_map_and_gradual_error_are_reported_as_notes(exported, tmp_path):
    model, art, folder, x = exported
    bare = replace(art, extra={})
    r = OnnxRuntimeRunner()
    r.load(bare, folder)
    with r:
        div = find_first_divergent(_reference(exported), r, {"input": x[:1]}, FP32)
        assert not div.layers and "layer map" in div.note
    with _variant(exported, tmp_path) as target:
        div = find_first_divergent(_reference(exported), target, {"input": x[:1]},
                                   Tolerance(max_abs=0.0, layer_max_rel=1.0))
    assert div.first is None and div.layers and div.step is None and "gradually" in div.note


def test_worst_samples_pick_the_largest_differences():
    ref = np.zeros((5, 3))
    out = ref.copy()
    out[1, 0], out[3, 2], out[4, 1] = 0.5, 2.0, 0.1
    assert worst_samples(ref, out, 2).tolist() == [1, 3]
