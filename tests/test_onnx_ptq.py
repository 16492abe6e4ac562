"""ONNX Runtime static quantization (quantize/onnx_ptq.py) on the model trained on the
bundled MNIST, run on ONNX Runtime's CPU EP.

The bar (issue 7): the generic QDQ int8 model and the Snapdragon QDQ models each within
1 point of float accuracy on the 1,000 held-out images, top-1 agreement >= 98%; the
Snapdragon model is what ORT's QNN tooling makes (its preprocessing and config run) and
its graph says what the QNN EP's HTP backend wants: every Conv/Gemm weight symmetric
per-channel int8 (zero point 0), activations uint8 (w8a8) or uint16 (w8a16). The QNN EP
itself only exists on a device; the CPU EP runs the same QDQ arithmetic.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from exporters.artifact import Preprocessing
from exporters.onnx import export_onnx
from models.checkpoint import build_model
from models.datasets import load_dataset, to_model_input
from models.errors import InputError
from quantize.calibration import load_calibration
from quantize.onnx_ptq import (GENERIC_INT8, GENERIC_INT8_PER_TENSOR, QNN_W8A8, QNN_W8A16, PtqSession,
                               read_encodings, resolve_layers, target_profiles)
from quantize.report import accuracy, snr_db, top1_agreement
from quantize.sensitivity import run_onnx

CALIB_SAMPLES = 128
MAX_DROP = 0.01          # 1 point of accuracy
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def trained(trained_mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx_ptq")
    model, meta = build_model(None, trained_mnist)
    size = meta["input_size"]
    size = [size, size] if isinstance(size, int) else list(size)
    pre = Preprocessing(size, meta["mean"], meta["std"], meta["channel_order"])
    art = export_onnx(model, folder / "model.onnx", (1, pre.channels, *size))
    test = load_dataset("mnist", "test")
    x = to_model_input(test.images, tuple(size), pre.mean, pre.std, pre.channels)
    ref = run_onnx(folder / "model.onnx", "input", x)
    with torch.no_grad():           # the float ONNX model is the PyTorch model (parity is tested elsewhere)
        assert np.abs(ref[:8] - model(torch.from_numpy(x[:8])).numpy()).max() < 1e-4
    return {"folder": folder, "onnx": folder / "model.onnx", "layer_map": art.extra["layer_map"], "pre": pre,
            "calib": load_calibration("mnist", pre, CALIB_SAMPLES), "x": x, "y": test.labels, "ref": ref}


def _check_accuracy(trained, out: np.ndarray, what: str) -> None:
    drop = accuracy(trained["ref"], trained["y"]) - accuracy(out, trained["y"])
    agree = top1_agreement(trained["ref"], out)
    assert drop <= MAX_DROP, f"{what}: accuracy drop {100 * drop:.2f} points"
    assert agree >= MIN_AGREEMENT, f"{what}: top-1 agreement {agree:.4f}"


def _weights_are_symmetric_per_channel_int8(proto) -> dict:
    """Read every Conv/MatMul/Gemm weight's DequantizeLinear straight from the graph."""
    from onnx import numpy_helper
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    checked = {}
    for node in g.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        dq = producers.get(node.input[1])
        assert dq is not None and dq.op_type == "DequantizeLinear", f"{node.name}: weight not quantized"
        q = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zp = numpy_helper.to_array(inits[dq.input[2]])
        out_channels = q.shape[0] if node.op_type == "Conv" else q.shape[0]   # Gemm transB=1: (out, in)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert q.dtype == np.int8 and zp.dtype == np.int8, f"{node.name}: {q.dtype}"
        assert np.all(zp == 0), f"{node.name}: zero points {np.unique(zp)}"
        assert scale.size == out_channels and axis == 0, f"{node.name}: {scale.size} scales, axis {axis}"
        assert int(np.abs(q).max()) <= 127                      # symmetric grid, -128 unused
        checked[node.name] = scale.size
    assert checked
    return checked


def _activation_dtypes(proto) -> set[str]:
    from onnx import numpy_helper
    inits = {t.name: t for t in proto.graph.initializer}
    return {str(numpy_helper.to_array(inits[n.input[2]]).dtype) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_generic_int8_keeps_accuracy_on_ort_cpu(trained, tmp_path):
    with PtqSession(trained["onnx"], trained["calib"], qnn=False, layer_map=trained["layer_map"]) as s:
        art = s.quantize(GENERIC_INT8, tmp_path / "model_int8.onnx")
    assert art.key == "onnx/int8" and art.size_bytes < 0.4 * trained["onnx"].stat().st_size
    proto = onnx.load(str(tmp_path / "model_int8.onnx"))
    _weights_are_symmetric_per_channel_int8(proto)
    assert _activation_dtypes(proto) == {"uint8"}
    enc = art.extra["encodings"]
    assert enc["activation_dtypes"] == {"uint8": len(enc["activations"])} and not enc["float_layers"]
    assert art.extra["calibration"] == {"method": "minmax", "samples": CALIB_SAMPLES, "source": "caller"}
    # the layer map names what the next layer reads: a quantized tensor's DequantizeLinear output
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    quantized = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    lmap = art.extra["layer_map"]
    assert sum(producers.get(t) == "DequantizeLinear" for t in lmap) > 50
    assert not set(lmap) & quantized, set(lmap) & quantized
    _check_accuracy(trained, run_onnx(tmp_path / "model_int8.onnx", "input", trained["x"]), "int8 QDQ")


@pytest.mark.slow
def test_snapdragon_qdq_models_follow_the_qnn_rules_and_keep_accuracy(trained, tmp_path):
    with PtqSession(trained["onnx"], trained["calib"], qnn=True, layer_map=trained["layer_map"]) as s:
        arts = {p.name: s.quantize(p, tmp_path / f"{p.file_stem}.onnx") for p in target_profiles("snapdragon")}
    assert [a.key for a in arts.values()] == ["onnx/w8a8-qnn", "onnx/w8a16-qnn"]
    for profile, act in ((QNN_W8A8, "uint8"), (QNN_W8A16, "uint16")):
        path = tmp_path / f"{profile.file_stem}.onnx"
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        convs = _weights_are_symmetric_per_channel_int8(proto)
        assert _activation_dtypes(proto) == {act}, profile.name
        enc = arts[profile.name].extra["encodings"]
        assert enc["weights_per_channel"] == enc["weights_symmetric"] == len(convs)
        assert arts[profile.name].extra["execution_provider"].startswith("QNNExecutionProvider")
        _check_accuracy(trained, run_onnx(path, "input", trained["x"]), profile.name)
    # 16-bit activations are measurably closer to float than 8-bit ones
    snr8 = snr_db(trained["ref"][:200], run_onnx(tmp_path / "model_qnn_w8a8.onnx", "input", trained["x"][:200]))
    snr16 = snr_db(trained["ref"][:200], run_onnx(tmp_path / "model_qnn_w8a16.onnx", "input", trained["x"][:200]))
    assert snr8 is not None and snr16 is not None and snr16 > snr8 + 3


def _ranges(session: PtqSession, method: str) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data
    data = load_tensors_data(session.ranges(method).path)
    return {k: tuple(float(np.asarray(v).reshape(-1)[0]) for v in data[k].range_value) for k in data}


def test_calibration_methods_give_narrower_ranges_and_working_models(trained, tmp_path):
    methods = ("minmax", "entropy", "percentile", "mse")
    with PtqSession(trained["onnx"], trained["calib"], qnn=False) as s:
        ranges = {m: _ranges(s, m) for m in methods}
        for m in methods:
            s.quantize(GENERIC_INT8, tmp_path / f"{m}.onnx", method=m)
    snrs = {m: snr_db(trained["ref"], run_onnx(tmp_path / f"{m}.onnx", "input", trained["x"])) for m in methods}
    mm = ranges["minmax"]
    for method in ("entropy", "percentile", "mse"):
        # mse returns its grid's exact window, which may pass an observed extreme by < 1 level
        slack = {k: (1e-5 + (hi - lo) / 255 if method == "mse" else 1e-5) for k, (lo, hi) in mm.items()}
        inside = [k for k, (lo, hi) in ranges[method].items()
                  if not (lo >= min(mm[k][0], 0) - slack[k] and hi <= max(mm[k][1], 0) + slack[k])]
        narrower = sum(hi - lo < 0.99 * (mm[k][1] - mm[k][0]) for k, (lo, hi) in ranges[method].items())
        assert not inside and narrower >= 5, (method, inside[:5], narrower)
    # the graph output keeps its observed range (clipping logits changes the class)
    assert ranges["entropy"]["logits"] == pytest.approx(mm["logits"])
    assert ranges["mse"]["logits"] == pytest.approx(mm["logits"])
    # Issue 14: KL windows alone kept 0.39-0.73 of the observed range of a dozen activations
    # of a 24-epoch default model (logit SNR 8-10 dB against 34 for MinMax). Entropy now
    # keeps a KL window only where it does not raise the estimated MSE, and mse minimises
    # it: both are held to MinMax's logit SNR less 1 dB on the 1,000 held-out digits.
    assert all(snrs[m] is not None and snrs[m] > 25 for m in methods), snrs
    for m in ("entropy", "mse"):
        assert snrs[m] >= snrs["minmax"] - 1.0, snrs


RELU6_MIN_FRACTION = 0.9     # of a ReLU6 output's observed range, unless narrower lowers the error


def _tensor_values(session: PtqSession, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The named tensors of the prepared float model on ``x``, computed by ONNX Runtime."""
    import onnxruntime as ort
    proto = onnx.ModelProto()
    proto.CopyFrom(session.model)
    for n in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(len(x)):
        res = dict(zip(outs, sess.run(None, {session.input_name: x[i:i + 1]})))
        for n in names:
            got[n].append(res[n].ravel())
    return {n: np.concatenate(v).astype(np.float64) for n, v in got.items()}


def _uint8_qdq_mse(v: np.ndarray, lo: float, hi: float) -> float:
    """Mean squared error of ONNX Runtime's uint8 QuantizeLinear -> DequantizeLinear for
    the range [lo, hi] (widened to contain 0, integer zero point), computed directly."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32(max(hi - lo, 1e-4) / 255.0)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    q = np.clip(np.round(v / scale) + zp, 0, 255)
    return float(np.mean(((q - zp) * scale - v) ** 2))


def test_mse_and_entropy_narrow_relu6_outputs_only_where_that_lowers_the_error(trained):
    """Every ReLU6 output keeps at least RELU6_MIN_FRACTION of its observed range under mse
    and entropy, unless the narrower range has a lower quantization MSE: estimated from
    ORT's histogram and measured on the calibration activations themselves (ORT computes
    them; the uint8 Q/DQ is applied to them directly)."""
    from quantize.onnx_ptq import _window_mse
    with PtqSession(trained["onnx"], trained["calib"], qnn=False) as s:
        ranges = {m: _ranges(s, m) for m in ("minmax", "entropy", "mse")}
        hists = s._histograms()
        relu6 = [n.output[0] for n in s.model.graph.node if n.op_type == "Clip"]
        values = _tensor_values(s, relu6, trained["calib"])
    assert len(relu6) >= 20, relu6
    mm = ranges["minmax"]
    report = {}
    for method in ("mse", "entropy"):
        narrowed = []
        for t in relu6:
            (lo, hi), (lo0, hi0) = ranges[method][t], mm[t]
            assert lo0 >= 0 and hi0 <= 6 + 1e-6, (t, lo0, hi0)
            fraction = (hi - lo) / (hi0 - lo0)
            if fraction >= RELU6_MIN_FRACTION:
                continue
            est, est0 = _window_mse(hists[t], np.array([lo, lo0]), np.array([hi, hi0]))
            real, real0 = _uint8_qdq_mse(values[t], lo, hi), _uint8_qdq_mse(values[t], lo0, hi0)
            narrowed.append((t, round(fraction, 3), real / real0))
            assert est < est0 and real < real0, (method, t, fraction, est, est0, real, real0)
        report[method] = narrowed
    # mse's own search: what it saves is real, on every ReLU6 output together
    total = {m: sum(_uint8_qdq_mse(values[t], *ranges[m][t]) for t in relu6) for m in ("minmax", "mse")}
    assert total["mse"] <= total["minmax"], (total, report)

def test_mixed_precision_keeps_named_layers_float_or_16_bit(trained, tmp_path):
    with PtqSession(trained["onnx"], trained["calib"][:32], qnn=True, layer_map=trained["layer_map"]) as s:
        keep = resolve_layers([s.layers[0].module], s.layers)         # by PyTorch module path
        wide = resolve_layers([s.layers[3].name, s.layers[5].output], s.layers)   # by node / tensor
        art = s.quantize(QNN_W8A8, tmp_path / "mixed.onnx", keep_float=keep, w16_layers=wide)
        with pytest.raises(InputError, match="layer of the model"):
            resolve_layers(["no.such.layer"], s.layers)
    enc = art.extra["encodings"]
    assert enc["float_layers"] == [keep[0].name]
    assert enc["activation_dtypes"].get("uint16", 0) >= 2 and enc["activation_dtypes"]["uint8"] > 10
    for layer in wide:
        assert enc["activations"][layer.output]["dtype"] == "uint16", layer
    assert art.extra["mixed_precision"] == {"float": [keep[0].module],
                                            "w8a16": [w.module or w.name for w in wide], "w16a16": []}
    out = run_onnx(tmp_path / "mixed.onnx", "input", trained["x"][:100])
    assert top1_agreement(trained["ref"][:100], out) >= MIN_AGREEMENT


def test_per_tensor_profile_and_encodings_summary(trained, tmp_path):
    with PtqSession(trained["onnx"], trained["calib"][:32], qnn=False) as s:
        art = s.quantize(GENERIC_INT8_PER_TENSOR, tmp_path / "pt.onnx")
    enc = read_encodings(onnx.load(str(tmp_path / "pt.onnx")))
    assert enc == art.extra["encodings"]
    assert enc["weights_per_channel"] == 0 and all(w["channels"] == 1 for w in enc["weights"].values())
    assert art.key == "onnx/int8-per-tensor"


def test_bad_calibration_arrays_and_profiles_are_input_errors(trained):
    with pytest.raises(InputError, match=r"shape \(N, 1, 28, 28\)"):
        PtqSession(trained["onnx"], np.zeros((4, 3, 28, 28), np.float32), qnn=False)
    with pytest.raises(InputError, match="finite"):
        PtqSession(trained["onnx"], np.full((4, 1, 28, 28), np.nan, np.float32), qnn=False)
    with pytest.raises(InputError, match="--target"):
        target_profiles("hexagon-v99")
    with PtqSession(trained["onnx"], trained["calib"][:4], qnn=False) as s:
        with pytest.raises(InputError, match="--method"):
            s.ranges("kl")


def test_entropy_falls_back_to_minmax_where_kl_cuts_distant_outliers(tmp_path):
    """Why KL clips: it weighs clipped values by their mass, not by how far they move. A
    tensor of unit-normal values with 1 in 5,000 at +-8 (real ORT calibration of a small
    two-convolution model) gets a KL window of +-4.5, whose quantization error, measured
    on the tensor itself, is 10x MinMax's; entropy must fall back to
    MinMax there, mse must keep the range, and both must keep the output's SNR."""
    from quantize.onnx_ptq import _kl_window, _window_mse
    rng = np.random.default_rng(0)

    def inputs(n: int) -> np.ndarray:
        x = rng.normal(0.0, 1.0, (n, 1, 28, 28))
        outlier = rng.random(x.shape) < 2e-4
        return np.where(outlier, 8.0 * np.sign(x), x).astype(np.float32)

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 4, 1)).eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[1].weight.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]).view(4, 1, 1, 1))
        net[1].bias.zero_()
    export_onnx(net, tmp_path / "net.onnx", (1, 1, 28, 28))
    calib, held_out = inputs(64), inputs(200)
    ref = run_onnx(tmp_path / "net.onnx", "input", held_out)
    methods = ("minmax", "entropy", "mse")
    with PtqSession(tmp_path / "net.onnx", calib, qnn=False) as s:
        ranges = {m: _ranges(s, m) for m in methods}
        first = s.model.graph.node[0]
        assert first.op_type == "Conv"
        t = first.output[0]
        hist = s._histograms()[t]
        values = _tensor_values(s, [t], calib)[t]
        for m in methods:
            s.quantize(GENERIC_INT8, tmp_path / f"{m}.onnx", method=m)
    (lo0, hi0), span = ranges["minmax"][t], ranges["minmax"][t][1] - ranges["minmax"][t][0]
    assert lo0 == pytest.approx(-8) and hi0 == pytest.approx(8)
    lo_kl, hi_kl = (float(v) for v in _kl_window(hist))
    assert (hi_kl - lo_kl) / span < 0.7, (lo_kl, hi_kl)
    real_kl, real0 = _uint8_qdq_mse(values, lo_kl, hi_kl), _uint8_qdq_mse(values, lo0, hi0)
    est_kl, est0 = _window_mse(hist, np.array([lo_kl, lo0]), np.array([hi_kl, hi0]))
    assert real_kl > 2 * real0 and est_kl > 2 * est0, (real_kl, real0, est_kl, est0)
    assert ranges["entropy"][t] == pytest.approx(ranges["minmax"][t])
    lo, hi = ranges["mse"][t]
    assert (hi - lo) / span >= 0.9 and _uint8_qdq_mse(values, lo, hi) <= real0, (lo, hi)
    snrs = {m: snr_db(ref, run_onnx(tmp_path / f"{m}.onnx", "input", held_out)) for m in methods}
    assert all(snrs[m] >= snrs["minmax"] - 1.0 for m in methods), snrs


def test_a_float_layer_stays_float_under_ort_load_time_requantization(trained, tmp_path):
    """onnxruntime >= 1.21 quantizes, at load, the float weights of any Conv that reads a
    DequantizeLinear to per-tensor int8 (its WeightBiasQuantization optimizer). A layer kept
    in float therefore reads the float tensor, and ORT must leave it as written."""
    x = trained["x"][:64]
    with PtqSession(trained["onnx"], trained["calib"][:32], qnn=True, layer_map=trained["layer_map"]) as s:
        conv = next(l for l in s.layers[1:] if l.op_type == "Conv")
        s.quantize(QNN_W8A8, tmp_path / "mixed.onnx", keep_float=[conv])
    proto = onnx.load(str(tmp_path / "mixed.onnx"))
    producers = {o: n for n in proto.graph.node for o in n.output}
    node = next(n for n in proto.graph.node if n.name == conv.name)
    assert producers[node.input[0]].op_type == "Clip"      # the Q/DQ's range, without its rounding
    default = run_onnx(tmp_path / "mixed.onnx", "input", x)
    np.testing.assert_array_equal(default, run_onnx(tmp_path / "mixed.onnx", "input", x, as_written=True))
    assert top1_agreement(trained["ref"][:64], default) >= MIN_AGREEMENT

    # negative control: the same layer reading the DQ, as ORT's quantizer writes it, is re-quantized
    clip = producers[node.input[0]]
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == clip.input[0])
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    node.input[0] = dq.output[0]
    onnx.save(proto, str(tmp_path / "as_ort_writes_it.onnx"))
    changed = run_onnx(tmp_path / "as_ort_writes_it.onnx", "input", x)
    kept = run_onnx(tmp_path / "as_ort_writes_it.onnx", "input", x, as_written=True)
    assert np.abs(changed - kept).max() > 1e-3


def test_calibration_in_chunks_keeps_minmax_exact_and_histograms_close(trained, monkeypatch):
    """ORT's calibrators hold every intermediate tensor of the inputs they are given, so
    calibration runs in chunks (memory); MinMax ranges must not depend on the chunking, and
    the percentile ranges (merged histograms) stay within a few histogram bins."""
    import quantize.onnx_ptq as onnx_ptq
    calib = trained["calib"][:48]
    got = {}
    for chunk in (16, 48):
        monkeypatch.setattr(onnx_ptq, "CALIBRATION_CHUNK", chunk)
        with PtqSession(trained["onnx"], calib, qnn=True) as s:
            got[chunk] = {m: _ranges(s, m) for m in ("minmax", "percentile")}
    assert got[16]["minmax"] == got[48]["minmax"]
    for t, (lo, hi) in got[48]["percentile"].items():
        lo16, hi16 = got[16]["percentile"][t]
        width = max(hi - lo, 1e-6)
        assert abs(lo16 - lo) <= 0.02 * width and abs(hi16 - hi) <= 0.02 * width, t


def test_a_session_adopts_the_ranges_of_the_same_graph_and_refuses_another(trained, tmp_path):
    """The plain comparison row quantizes the same export with the unrounded weights swapped
    back: it takes the rounded model's activation ranges instead of calibrating again. Here
    the donor calibrates on other inputs than the receiver holds, so its ranges are told
    apart from the receiver's own: the adopted model has the donor's activation scales, not
    those its own calibration gives. A graph whose tensors differ keeps its own calibration."""
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))
    donor_calib, own_calib = trained["calib"][:32], trained["calib"][32:48]
    export_onnx(Other().eval(), tmp_path / "other.onnx", (1, *donor_calib.shape[1:]))
    with PtqSession(trained["onnx"], donor_calib, qnn=True) as donor:
        ranges = donor.ranges("minmax")
        donor.quantize(QNN_W8A8, tmp_path / "donor.onnx", method="minmax", root=tmp_path)
        with PtqSession(trained["onnx"], own_calib, qnn=True) as receiver:
            assert receiver.adopt_ranges(ranges)
            receiver.quantize(QNN_W8A8, tmp_path / "adopted.onnx", method="minmax", root=tmp_path)
        with PtqSession(trained["onnx"], own_calib, qnn=True) as itself:
            itself.quantize(QNN_W8A8, tmp_path / "own.onnx", method="minmax", root=tmp_path)
        with PtqSession(tmp_path / "other.onnx", donor_calib, qnn=True) as foreign:
            assert not foreign.adopt_ranges(ranges)
    scales = {}
    for name in ("donor", "adopted", "own"):
        g = onnx.load(str(tmp_path / f"{name}.onnx")).graph
        scales[name] = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in g.initializer
                        if t.name.endswith("_scale")}
    assert scales["adopted"] == scales["donor"] and scales["donor"]
    assert scales["own"] != scales["donor"], "the two calibrations should differ for this test to mean anything"
