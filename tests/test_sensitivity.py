"""Per-layer sensitivity and mixed precision (quantize/sensitivity.py) on a small network
with one planted outlier: conv2's output channel 0 is scaled up 1000x and the depthwise
conv3's matching channel down 1000x. The float function is unchanged (ReLU is positively
homogeneous) and no weight grid suffers (per-channel scales), but one channel now sets
the per-tensor uint8 range of that activation and the other channels round to zero.
The probes must find the two layers touching it, and 16-bit activations or float for
them must repair the damage: the numbers come from ONNX Runtime running real QDQ models.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from exporters.onnx import export_onnx
from models.errors import InputError
from quantize.onnx_ptq import GENERIC_INT8, QNN_W8A8, PtqSession
from quantize.report import snr_db
from quantize.sensitivity import layer_sensitivity, pick_layers, run_onnx

OUTLIER = 1000.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    with torch.no_grad():
        net[2].weight[0] *= OUTLIER
        net[2].bias[0] = net[2].bias[0].abs() * OUTLIER
        net[4].weight[0] /= OUTLIER
    return net.eval()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sensitivity")
    art = export_onnx(_net(), folder / "net.onnx", (1, 1, 16, 16))
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(64, 1, 16, 16)).astype(np.float32)
    x = rng.normal(size=(64, 1, 16, 16)).astype(np.float32)
    return {"onnx": folder / "net.onnx", "layer_map": art.extra["layer_map"], "calib": calib, "x": x,
            "ref": run_onnx(folder / "net.onnx", "input", x)}


def test_only_mode_finds_the_planted_layer(planted):
    with PtqSession(planted["onnx"], planted["calib"], qnn=False, layer_map=planted["layer_map"]) as s:
        calls = []
        rep = layer_sensitivity(s, GENERIC_INT8, planted["x"], mode="only",
                                progress=lambda i, n, name: calls.append((i, n)))
    assert [l.op_type for l in s.layers] == ["Conv", "Conv", "Conv", "Gemm"]
    assert calls[-1] == (4, 4) and len(rep.layers) == 4
    # conv2 produces the outlier tensor and conv3 reads it: both carry its quantization
    worst_two = {l.layer for l in rep.layers[:2]}
    assert worst_two == {"2", "4"}, [(l.layer, l.snr_db) for l in rep.layers]
    others = [l.snr_db for l in rep.layers[2:]]
    assert max(l.snr_db for l in rep.layers[:2]) < min(others) - 10, rep.layers
    assert rep.quantized["snr_db"] <= min(l.snr_db for l in rep.layers) + 0.5
    assert rep.mode == "only" and rep.samples == 64 and rep.float_accuracy is None
    assert rep.to_dict()["layers"][0]["node"] == rep.layers[0].node


def test_w8a16_on_the_worst_layer_repairs_the_model(planted, tmp_path):
    ref, x = planted["ref"], planted["x"]
    with PtqSession(planted["onnx"], planted["calib"], qnn=True, layer_map=planted["layer_map"]) as s:
        rep = layer_sensitivity(s, QNN_W8A8, x)
        s.quantize(QNN_W8A8, tmp_path / "plain.onnx")
        wide = pick_layers(s, "1", rep)                          # the single most sensitive layer
        art = s.quantize(QNN_W8A8, tmp_path / "w16.onnx", w16_layers=wide)
        keep = pick_layers(s, 2, rep)
        s.quantize(QNN_W8A8, tmp_path / "float2.onnx", keep_float=keep)
    plain = snr_db(ref, run_onnx(tmp_path / "plain.onnx", "input", x))
    w16 = snr_db(ref, run_onnx(tmp_path / "w16.onnx", "input", x))
    float2 = snr_db(ref, run_onnx(tmp_path / "float2.onnx", "input", x))
    assert w16 > plain + 10 and float2 > plain + 10, (plain, w16, float2)
    assert art.extra["encodings"]["activation_dtypes"].get("uint16", 0) >= 1
    assert art.extra["mixed_precision"]["w8a16"] == [wide[0].module]


def test_exclude_mode_scores_against_the_full_model(planted):
    with PtqSession(planted["onnx"], planted["calib"][:16], qnn=False) as s:
        rep = layer_sensitivity(s, GENERIC_INT8, planted["x"][:16], mode="exclude", layers=s.layers[:2])
    full = rep.quantized["snr_db"]
    assert len(rep.layers) == 2
    for layer in rep.layers:
        assert layer.score_db == pytest.approx(layer.snr_db - full)
    assert rep.layers[0].score_db >= rep.layers[1].score_db


def test_pick_layers_needs_a_ranking_for_a_count(planted):
    with PtqSession(planted["onnx"], planted["calib"][:8], qnn=False, layer_map=planted["layer_map"]) as s:
        assert pick_layers(s, None, None) == [] and pick_layers(s, 0, None) == []
        with pytest.raises(InputError, match="sensitivity"):
            pick_layers(s, 2, None)
        named = pick_layers(s, "2, 4", None)                  # PyTorch module paths
        assert [l.module for l in named] == ["2", "4"]
        with pytest.raises(InputError, match="sensitivity mode"):
            layer_sensitivity(s, GENERIC_INT8, planted["x"][:2], mode="random")


def test_pipelined_probes_give_each_probe_its_own_outputs_in_order(tmp_path):
    """``pipelined_runs`` writes probe n+1 while probe n runs; each result must be that
    probe's model run alone (two files alternate: a write over the file being read would
    hand one probe another's outputs). Five different models, one per job."""
    import onnx
    from onnx import numpy_helper

    from quantize.sensitivity import pipelined_runs
    net = _net()
    export_onnx(net, tmp_path / "net.onnx", (1, 1, 8, 8))
    base = onnx.load(str(tmp_path / "net.onnx"))
    weight = next(t for t in base.graph.initializer if len(t.dims) == 4)
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)

    def write(scale: float):
        def fn(path):
            m = onnx.ModelProto()
            m.CopyFrom(base)
            t = next(t for t in m.graph.initializer if t.name == weight.name)
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * scale, weight.name))
            onnx.save(m, str(path))
            onnx.save(m, str(tmp_path / f"alone_{scale}.onnx"))
        return fn

    scales = [1.0, -2.0, 0.5, 3.0, -1.0]
    got = list(pipelined_runs(((s, write(s)) for s in scales), tmp_path, "input", x))
    assert [tag for tag, _ in got] == scales
    outs = [out for _, out in got]
    for s, out in zip(scales, outs):
        assert np.array_equal(out, run_onnx(tmp_path / f"alone_{s}.onnx", "input", x, as_written=True)), s
    assert not any(np.array_equal(outs[0], o) for o in outs[1:])     # the models do differ
