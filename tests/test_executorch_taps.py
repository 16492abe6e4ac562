"""Per-layer divergence for ExecuTorch ``.pte`` files through their tap programs.

Real ``executorch.runtime`` runs of a trained-like ``SmallNet`` (folded BN, depthwise,
hardswish, a module called twice, a residual add): the tap program's layers are the same
module call keys PyTorch's hooks give, a clean fp32 export has no divergent layer at the
project's fp32 per-layer bound, a fault in one layer is named by that layer, and an int8
program's taps come from the same quantized graph as the shipped file (its first output
is bit-identical to the shipped program's).
"""
from __future__ import annotations

import copy

import pytest
import torch

from device_tests.compare import tolerance_for
from device_tests.divergence import find_first_divergent
from device_tests.runners.executorch import ExecuTorchRunner
from device_tests.runners.torch import TorchRunner
from exporters.artifact import Artifact
from exporters.executorch import export_executorch
from exporters.executorch_taps import TAPS_SUFFIX
from tests.parity_helpers import SmallNet, make_realistic

FP32 = tolerance_for("fp32")
INT8 = tolerance_for("int8")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    return make_realistic(SmallNet(), x).eval(), x.numpy()


def _export(model, folder, precisions, calibration=None):
    return export_executorch(model, folder, precisions, input_shape=(1, 3, 32, 32), calibration=calibration,
                             taps=True)


def _reference(model, art):
    return TorchRunner.from_module(model, Artifact("ref", "pt", "fp32", art.inputs, art.outputs))


@pytest.fixture(scope="module")
def fp32_export(net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("taps")
    (art,) = _export(net[0], folder, ["fp32"])
    return art, folder


def test_tap_program_is_written_beside_the_pte_with_a_layer_map(fp32_export, net):
    art, folder = fp32_export
    taps = art.extra["taps"]
    assert (folder / (art.path[: -len(".pte")] + TAPS_SUFFIX)).is_file()
    assert taps["file"] == art.path[: -len(".pte")] + TAPS_SUFFIX
    assert taps["final_max_abs_vs_shipped"] == 0.0          # the taps do not change the computation
    # The same keys PyTorch's hooks give, in execution order: the folded BN names the
    # conv+BN pair, the module called twice has two keys, the residual add (no module) none.
    assert list(art.extra["layer_map"].values()) == ["stem.1", "stem.2", "dw.1", "act", "pw.1", "act#1", "fc"]
    ref = _reference(net[0], art)
    assert set(art.extra["layer_map"].values()) <= set(ref.intermediate_names())


def test_clean_fp32_pte_has_no_divergent_layer(fp32_export, net):
    art, folder = fp32_export
    model, x = net
    with ExecuTorchRunner() as target:
        target.load(art, folder)
        assert target.intermediate_names() == list(art.extra["layer_map"])
        div = find_first_divergent(_reference(model, art), target, {"input": x[:4]}, FP32)
    assert div.first is None and len(div.layers) == 7
    assert all(layer.passed and layer.max_rel < FP32.layer_max_rel for layer in div.layers)


def test_a_fault_in_one_layer_is_named_by_that_layer(net, tmp_path):
    """The ``.pte`` of a model whose ``dw.1`` computes something else (a converter bug
    would look like this), checked against the true model."""
    model, x = net
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.dw[1].weight.mul_(1.5)
    (art,) = _export(broken, tmp_path, ["fp32"])
    with ExecuTorchRunner() as target:
        target.load(art, tmp_path)
        div = find_first_divergent(_reference(model, art), target, {"input": x[:4]}, FP32)
    assert div.first is not None and div.first.module == "dw.1" and div.first.tensor == "tap_2"
    assert [layer.passed for layer in div.layers[:2]] == [True, True], "layers before the fault agree"
    assert div.first.max_rel > 100 * FP32.layer_max_rel


def test_int8_taps_come_from_the_shipped_quantized_graph(net, tmp_path):
    model, x = net
    (art,) = _export(model, tmp_path, ["int8"], calibration=x)
    assert art.extra["taps"]["final_max_abs_vs_shipped"] == 0.0
    keys = list(art.extra["layer_map"].values())
    # int8: a layer has a tensor only where a quantize follows it; a BN whose activation
    # XNNPACK fuses into it (stem.1 before hardswish is not fused; dw.1/pw.1 before ReLU are)
    assert "fc" in keys and "dw.1" not in keys and "pw.1" not in keys
    with ExecuTorchRunner() as target:
        target.load(art, tmp_path)
        div = find_first_divergent(_reference(model, art), target, {"input": x[:4]}, INT8)
    assert [layer.module for layer in div.layers] == keys
    snrs = [layer.snr_db for layer in div.layers]
    assert all(s is not None and 10 < s < 60 for s in snrs), snrs     # int8 error, measured per layer


def test_without_taps_the_search_says_why(net, tmp_path):
    model, x = net
    (art,) = export_executorch(model, tmp_path, ["fp32"], input_shape=(1, 3, 32, 32))
    assert "taps" not in art.extra and not list(tmp_path.glob("*" + TAPS_SUFFIX))
    with ExecuTorchRunner() as target:
        target.load(art, tmp_path)
        assert target.intermediate_names() == []
        div = find_first_divergent(_reference(model, art), target, {"input": x[:2]}, FP32)
    assert not div.layers and "layer map" in div.note
