"""ONNX -> TFLite through the real converters (onnx2tf, TFLiteConverter) and LiteRT.

One small MobileNetV2 (width 0.35, 32x32, grey, 10 classes) goes through every
precision once (module fixture); a model trained on the bundled MNIST checks int8
accuracy. Tolerances, and why:

* fp32, 1e-5 absolute on logits of order 1-10: the same float32 arithmetic as PyTorch in
  another order (NHWC kernels, BatchNorm folded into the convolution weights); float32
  rounding is ~6e-8 relative per operation and stays near 1e-6 after ~50 layers.
* fp16 (fp16 weights, float32 activations on CPU), 2e-3 x logit magnitude: each weight
  is rounded to 11 significant bits (relative error <= 2**-11 ~ 4.9e-4); in a dot
  product these errors partly cancel and across layers they add, so ~4x headroom.
* int8 on random weights is only checked for being a faithful quantization (cosine
  >= 0.99); its accuracy is measured on the trained model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from device_tests.runners.litert import LiteRTRunner
from exporters.artifact import ModelCard, Preprocessing, sha256_of
from exporters.onnx import export_onnx
from exporters.tflite import PRECISIONS, ConversionError, export_tflite
from exporters.tflite_metadata import read_metadata
from models import create_model
from models.datasets import load_dataset, to_model_input
from models.errors import InputError
from quantize.calibration import load_calibration

FP32_ATOL = 1e-5
FP16_RTOL = 2e-3
PRE = Preprocessing(input_size=[32, 32], mean=[0.1307], std=[0.3081], channel_order="GRAY")
LABELS = [str(i) for i in range(10)]
TINY_BRANCHES = ("blocks.4.conv_pwl.1", "blocks.5.conv_pwl.1")
CARD = ModelCard(name="tiny-mobilenet", description="MobileNetV2 0.35 on 32x32 digits",
                 version="0.3", author="mdeploy tests", license="Apache-2.0")


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("mobilenet_v2", num_classes=10, in_chans=1, width_mult=0.35).eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():   # trained-looking BN statistics, so activations are not all ~0
        if isinstance(mod, torch.nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    # Two residual branches scaled to ~1e-5 (as in an untrained net's deep layers): the
    # layer map must match tensors relative to their own range, not in absolute terms.
    for name in TINY_BRANCHES:
        bn = dict(m.named_modules())[name]
        bn.weight.data.mul_(1e-5)
        bn.bias.data.mul_(1e-5)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite_export")
    model = _tiny_model()
    export_onnx(model, folder / "model.onnx", (1, 1, 32, 32))
    calib = load_calibration("digits", PRE, samples=64)
    arts = export_tflite(folder / "model.onnx", folder, PRECISIONS, preprocessing=PRE, labels=LABELS,
                         card=CARD, calibration=calib)
    test = load_dataset("digits", "test").subset(32, seed=1)
    x = to_model_input(test.images, (32, 32), PRE.mean, PRE.std, 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return {"model": model, "folder": folder, "arts": {a.precision: a for a in arts}, "x": x, "ref": ref}


def _run(art, folder, x, **opts) -> np.ndarray:
    with LiteRTRunner(**opts) as r:
        r.load(art, folder)
        return r.infer({"input": x})["logits"]


def test_every_precision_is_described(tiny):
    arts, folder = tiny["arts"], tiny["folder"]
    assert list(arts) == list(PRECISIONS)
    for p, a in arts.items():
        path = a.resolve(folder)
        assert a.format == "tflite" and a.key == f"tflite/{p}"
        assert a.sha256 == sha256_of(path) and a.size_bytes == path.stat().st_size
        assert a.inputs[0].name == "input" and a.inputs[0].layout == "NHWC" and a.inputs[0].shape == [1, 32, 32, 1]
        assert a.outputs[0].name == "logits" and a.outputs[0].shape == [1, 10]
        assert a.extra["ops"]["CONV_2D"] > 0 and a.extra["ops"]["DEPTHWISE_CONV_2D"] > 0
        assert set(a.extra["delegates"]) >= {"gpu", "nnapi"}
        assert a.extra["layer_map"], "layer map for the divergence search"
        md = read_metadata(path)
        assert (md.name, md.version, md.labels) == (CARD.name, CARD.version, LABELS)
        json.dumps(a.to_dict())                      # the manifest can hold it
    sizes = {p: a.size_bytes for p, a in arts.items()}
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["int8"] < 0.45 * sizes["fp32"]
    assert sizes["dynamic"] < 0.45 * sizes["fp32"] and sizes["int8w"] < 0.45 * sizes["fp32"]
    float_io = {"fp32", "fp16", "dynamic", "int8", "int8w"}
    assert all(arts[p].inputs[0].dtype == "float32" and not arts[p].inputs[0].quantized for p in float_io)
    # NNAPI needs API 30 (NNAPI 1.3) for signed int8 activations; float models need less.
    assert arts["int8"].extra["delegates"]["nnapi"]["min_android_api"] == 30
    assert arts["fp32"].extra["delegates"]["nnapi"]["min_android_api"] < 30
    assert arts["int8"].extra["calibration"] == {"samples": 64, "source": "caller"}


@pytest.mark.parametrize("xnnpack", [True, False])
def test_fp32_parity_with_pytorch(tiny, xnnpack):
    y = _run(tiny["arts"]["fp32"], tiny["folder"], tiny["x"], xnnpack=xnnpack)
    err = np.abs(y - tiny["ref"]).max()
    assert err <= FP32_ATOL, f"fp32 max abs error {err:.3g}"


def test_fp16_within_documented_tolerance(tiny):
    ref = tiny["ref"]
    y = _run(tiny["arts"]["fp16"], tiny["folder"], tiny["x"])
    err = np.abs(y - ref).max()
    assert err <= FP16_RTOL * max(1.0, np.abs(ref).max()), f"fp16 max abs error {err:.3g}"
    assert err > 0      # the weights really are fp16 (an fp32 file would match exactly-ish)
    assert (y.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("precision", ["dynamic", "int8w", "int8", "int8-io", "uint8-pixels"])
def test_quantized_kinds_stay_faithful(tiny, precision):
    ref = tiny["ref"]
    y = _run(tiny["arts"][precision], tiny["folder"], tiny["x"])
    cos = (y * ref).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.99, f"{precision}: worst cosine {cos.min():.4f}"


def test_int8w_stores_int8_weights_and_computes_the_fp32_file_on_grid_weights(tiny, tmp_path):
    """int8w is the fp32 file with each conv / depthwise / fc weight stored as per-channel
    int8 (``max|w| / 127``) behind DEQUANTIZE: its integers are that grid of the fp32 file's
    weights, and a model whose weights already sit on it (what ``mdeploy quantize`` writes)
    gives the fp32 file's outputs exactly, at about a quarter of its size."""
    from exporters.tflite_ops import op_counts, graph_ops
    from exporters.tflite_weights import int8_weight_only
    from quantize.grid_check import tflite_weight_mismatch
    from quantize.weight_rounding import optimize_weights
    arts, folder = tiny["arts"], tiny["folder"]
    fp32 = arts["fp32"].resolve(folder).read_bytes()
    graph = graph_ops(arts["int8w"].resolve(folder).read_bytes())
    ops = op_counts(graph)
    assert ops["DEQUANTIZE"] == ops["CONV_2D"] + ops["DEPTHWISE_CONV_2D"] + ops["FULLY_CONNECTED"]
    # the op version TFLite's op_version table gives a per-channel int8 DEQUANTIZE (5), not more
    assert {o["version"] for o in graph if o["op"] == "DEQUANTIZE"} == {5}
    grid = tflite_weight_mismatch(folder / "model.onnx", arts["int8w"].resolve(folder))
    assert len(grid.mismatch) >= 50 and not grid.unmatched and sum(grid.mismatch.values()) == 0
    # weights on the grid: the same outputs as the fp32 file, to the bit
    from quantize.float_fixes import apply_float_fixes
    folded = apply_float_fixes(tiny["model"], ("bn",), calibration=tiny["x"][:8], per_channel=True).model
    rounded = optimize_weights(folded, tiny["x"][:8], ("rtn",)).model
    export_onnx(rounded, tmp_path / "model.onnx", (1, 1, 32, 32))
    (fp32_art,) = export_tflite(tmp_path / "model.onnx", tmp_path, ["fp32"], preprocessing=PRE)
    on_grid = fp32_art.resolve(tmp_path).read_bytes()
    (tmp_path / "w.tflite").write_bytes(int8_weight_only(on_grid))
    from ai_edge_litert.interpreter import Interpreter

    def run(path):
        it = Interpreter(model_path=str(path))
        it.allocate_tensors()
        i, o = it.get_input_details()[0], it.get_output_details()[0]
        out = []
        for k in range(8):
            it.set_tensor(i["index"], np.ascontiguousarray(tiny["x"][k:k + 1].transpose(0, 2, 3, 1)))
            it.invoke()
            out.append(it.get_tensor(o["index"]).copy())
        return np.concatenate(out)
    assert np.array_equal(run(tmp_path / "w.tflite"), run(fp32_art.resolve(tmp_path)))
    assert (tmp_path / "w.tflite").stat().st_size < 0.45 * len(on_grid) and len(fp32) > 0


def test_int8_io_round_trip(tiny):
    """int8 in and out, scale/zero point in the manifest = the model's own; the runner
    quantizes/dequantizes exactly as a hand-written app would."""
    from ai_edge_litert.interpreter import Interpreter
    art, folder, x = tiny["arts"]["int8-io"], tiny["folder"], tiny["x"][:4]
    ins, outs = art.inputs[0], art.outputs[0]
    assert ins.dtype == outs.dtype == "int8" and ins.quantized and outs.quantized
    it = Interpreter(model_path=str(art.resolve(folder)))
    it.allocate_tensors()
    d_in, d_out = it.get_input_details()[0], it.get_output_details()[0]
    assert (ins.scale, ins.zero_point) == pytest.approx(d_in["quantization"])
    assert (outs.scale, outs.zero_point) == pytest.approx(d_out["quantization"])
    by_hand = []
    for xi in x:
        q = np.clip(np.round(xi.transpose(1, 2, 0)[None] / ins.scale) + ins.zero_point, -128, 127).astype(np.int8)
        it.set_tensor(d_in["index"], q)
        it.invoke()
        by_hand.append((it.get_tensor(d_out["index"]).astype(np.float32) - outs.zero_point) * outs.scale)
    y = _run(art, folder, x)
    np.testing.assert_array_equal(y, np.concatenate(by_hand))
    # Same quantized graph as int8 with float I/O (which quantizes inside): within one output step.
    y_float_io = _run(tiny["arts"]["int8"], folder, x)
    assert np.abs(y - y_float_io).max() <= outs.scale * 1.001


def test_layer_map_names_torch_modules(tiny):
    """Every mapped TFLite tensor equals its PyTorch module's output (forward hooks)."""
    art, model, x = tiny["arts"]["fp32"], tiny["model"], tiny["x"][:2]
    lmap = art.extra["layer_map"]
    modules = dict(model.named_modules())
    got: dict[str, np.ndarray] = {}
    hooks = [modules[k].register_forward_hook(lambda _m, _i, o, k=k: got.__setitem__(k, o.detach().numpy()))
             for k in set(lmap.values()) if "#" not in k]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    with LiteRTRunner() as r:
        r.load(art, tiny["folder"])
        names = r.intermediate_names()
        vals = r.infer_intermediates({"input": x}, [n for n in names if n in lmap])
    assert len(vals) == len(lmap) >= 30
    assert set(TINY_BRANCHES) <= set(lmap.values())
    for tensor, key in lmap.items():
        if key in got:     # each within 1e-5 of its own range (the fp32 argument, per tensor)
            assert vals[tensor].shape == got[key].shape, key
            assert np.abs(vals[tensor] - got[key]).max() <= FP32_ATOL * np.abs(got[key]).max(), key
    # quantized intermediates come back dequantized, NCHW, under the same names
    with LiteRTRunner() as r:
        r.load(tiny["arts"]["int8"], tiny["folder"])
        q = r.infer_intermediates({"input": x}, list(tiny["arts"]["int8"].extra["layer_map"]))
    some = next(t for t in q if q[t].ndim == 4)
    assert q[some].dtype == np.float32 and q[some].shape == vals[some].shape


def test_tensor_matching_is_relative_to_each_tensors_range():
    """Layer matching must not pair tiny unrelated tensors (an untrained net's deep
    activations are ~1e-5: any absolute tolerance would pair them all)."""
    from exporters.tflite import match_tensors
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 1, 4, 4, 4)).astype(np.float32) * 1e-5
    big = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    refs = {"onnx_a": a, "onnx_b": b, "onnx_big": big, "onnx_const": np.full_like(big, 3.0)}
    cands = {"tfl_unrelated": rng.standard_normal((1, 4, 4, 4)).astype(np.float32) * 1e-5,
             "tfl_b": b * (1 + 1e-6), "tfl_big": big + 1e-7, "tfl_a": a + 1e-12,
             "tfl_const": np.full_like(big, 3.0)}
    assert match_tensors(cands, refs) == {"tfl_b": "onnx_b", "tfl_big": "onnx_big", "tfl_a": "onnx_a"}


def test_integer_kinds_refuse_missing_or_bad_calibration(tiny, tmp_path):
    onnx_path = tiny["folder"] / "model.onnx"
    with pytest.raises(InputError, match="calibration"):
        export_tflite(onnx_path, tmp_path, ["int8"], preprocessing=PRE)
    with pytest.raises(InputError, match=r"shape \(8, 3, 32, 32\)"):
        export_tflite(onnx_path, tmp_path, ["int8-io"], preprocessing=PRE,
                      calibration=np.zeros((8, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="int4"):
        export_tflite(onnx_path, tmp_path, ["int4"], preprocessing=PRE)
    with pytest.raises(InputError, match=r"\(N, 3, 32, 32\)"):
        export_tflite(onnx_path, tmp_path, ["fp32"], preprocessing=Preprocessing([32, 32], [0.5] * 3, [0.5] * 3))
    assert not list(tmp_path.iterdir())


def test_converter_failure_is_one_line_with_its_message(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    # An op onnx2tf has no converter for (a made-up domain op) fails with onnx2tf's words.
    node = helper.make_node("FancyOp", ["input"], ["logits"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ConversionError) as info:
        export_tflite(tmp_path / "bad.onnx", tmp_path / "out", ["fp32"],
                      preprocessing=Preprocessing([8, 8], [0.0], [1.0], "GRAY"))
    assert "\n" not in str(info.value) and info.value.found
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_tflite_converter_failure_names_the_op(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    # onnx2tf converts Acosh (tf.math.acosh); TFLite has no builtin for it, so the failure is
    # the TFLiteConverter's, raised from the conversion worker with the op it could not take.
    node = helper.make_node("Acosh", ["input"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "acosh.onnx")
    with pytest.raises(ConversionError) as info:
        export_tflite(tmp_path / "acosh.onnx", tmp_path / "out", ["fp32"],
                      preprocessing=Preprocessing([4, 4], [0.0], [1.0], "GRAY"))
    assert info.value.source == "tf.lite.TFLiteConverter" and "fp32" in info.value.expected
    assert "Acosh" in info.value.found and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_nchw_input_kept_on_request(tiny, tmp_path):
    arts = export_tflite(tiny["folder"] / "model.onnx", tmp_path, ["fp32"], preprocessing=PRE, layout="NCHW",
                         calibration=load_calibration("digits", PRE, samples=8))
    a = arts[0]
    assert a.inputs[0].layout == "NCHW" and a.inputs[0].shape == [1, 1, 32, 32]
    assert np.abs(_run(a, tmp_path, tiny["x"]) - tiny["ref"]).max() <= FP32_ATOL


def _train_small_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 4, seed: int = 0) -> torch.nn.Module:
    """A small conv net trained on the bundled MNIST in seconds (about 97.5% held out).

    One thread: on a shared 2-core machine, PyTorch's default threads spin against
    each other and the same loop runs ~20x slower."""
    import torch.nn as nn
    import torch.nn.functional as F
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 16, 5, 2, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = 32
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(yt) // batch))
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            net.train()
            for idx in torch.randperm(len(yt), generator=gen).split(batch):
                opt.zero_grad()
                F.cross_entropy(net(xt[idx]), yt[idx]).backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@pytest.mark.slow
def test_int8_on_trained_mnist_keeps_accuracy(tmp_path):
    """Full-integer int8 (float I/O and int8 I/O) of a net trained on the bundled MNIST,
    calibrated on 200 train images: top-1 agreement with float >= 98% and accuracy drop
    <= 1 point on the 1,000 held-out images."""
    from models.datasets import dataset_stats
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    mean, std = dataset_stats(train.images)
    pre = Preprocessing([28, 28], mean, std, "GRAY")
    model = _train_small_cnn(to_model_input(train.images, 28, mean, std, 1), train.labels)
    export_onnx(model, tmp_path / "model.onnx", (1, 1, 28, 28))
    arts = export_tflite(tmp_path / "model.onnx", tmp_path, ["int8", "int8-io"], preprocessing=pre,
                         calibration=load_calibration("mnist", pre, samples=200), labels=train.classes)
    x = to_model_input(test.images, 28, mean, std, 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().argmax(1)
    float_acc = float((ref == test.labels).mean())
    assert float_acc >= 0.95, f"the float model itself only reached {float_acc:.3f}"
    for a in arts:
        got = _run(a, tmp_path, x).argmax(1)
        agreement = float((got == ref).mean())
        drop = float_acc - float((got == test.labels).mean())
        assert agreement >= 0.98, f"{a.key}: top-1 agreement {agreement:.4f}"
        assert drop <= 0.01, f"{a.key}: accuracy drop {drop * 100:.2f} points"
