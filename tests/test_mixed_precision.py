"""Mixed precision to a target (quantize/mixed_precision.py): weight-only and
activation-only sensitivity per layer, and the ``--target-sqnr`` search, on real QDQ
models run by ONNX Runtime.

The library tests reuse test_sensitivity's network with a planted activation outlier
(conv2's output channel 0 scaled up 1000x): its damage is in an *activation*, so the
activation-only probe must find it and the weight-only probe must not; a 16-bit
activation there repairs it. The CLI tests quantize an untrained (but realistically
scaled) MobileNetV2 for MNIST with ``mdeploy quantize --target-sqnr``.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from exporters.artifact import Manifest
from quantize.mixed_precision import search_mixed_precision, split_sensitivity
from quantize.onnx_ptq import GENERIC_INT8, QNN_W8A8, PtqSession
from quantize.report import snr_db
from quantize.sensitivity import run_onnx
from tests.test_sensitivity import planted  # noqa: F401  (module fixture)


def _session(planted, qnn: bool) -> PtqSession:  # noqa: F811
    return PtqSession(planted["onnx"], planted["calib"], qnn=qnn, layer_map=planted["layer_map"])


@pytest.mark.parametrize("profile", [QNN_W8A8, GENERIC_INT8], ids=lambda p: p.name)
def test_split_sensitivity_finds_the_planted_activation(planted, profile):  # noqa: F811
    x = planted["calib"]
    with _session(planted, profile.qnn) as s:
        rep = split_sensitivity(s, profile, x)
    assert [l.layer for l in rep.layers] == ["0", "2", "4", "8"] and rep.samples == len(x)
    for l in rep.layers:
        assert l.has_weights
        assert l.weight_only_snr_db is not None and math.isfinite(l.weight_only_snr_db), l
        assert l.activation_only_snr_db is not None and math.isfinite(l.activation_only_snr_db), l
    by = {l.layer: l for l in rep.layers}
    # conv2 writes the tensor with the outlier channel: its activation is the worst by far,
    # its weights (per-channel scales) are harmless
    assert by["2"].activation_only_snr_db < min(by[k].activation_only_snr_db for k in "048") - 15, rep.layers
    assert by["2"].weight_only_snr_db > by["2"].activation_only_snr_db + 20, by["2"]
    # the whole model carries every error: worse than the best single-layer figure
    best = max(v for l in rep.layers for v in (l.weight_only_snr_db, l.activation_only_snr_db))
    assert rep.quantized_snr_db < best
    assert rep.quantized_snr_db <= min(l.activation_only_snr_db for l in rep.layers) + 0.5
    # as the report's per-layer sensitivity (no whole-layer ranking): the planted layer
    # first, ranked by the worse of its two figures, both kept, no whole-layer figure
    sens = rep.as_sensitivity()
    assert sens["mode"] == "split" and sens["layers"][0]["layer"] == "2", sens["layers"]
    worse = [min(l["weight_only_snr_db"], l["activation_only_snr_db"]) for l in sens["layers"]]
    assert worse == sorted(worse) and all(l["snr_db"] is None for l in sens["layers"])
    assert sens["quantized"]["snr_db"] == rep.quantized_snr_db and sens["samples"] == len(x)


@pytest.mark.parametrize("profile,target", [(QNN_W8A8, 45.0), (GENERIC_INT8, 60.0)], ids=["qnn-45dB", "int8-60dB"])
def test_target_sqnr_is_reached_by_the_written_model(planted, profile, target, tmp_path):  # noqa: F811
    x = planted["calib"]
    with _session(planted, profile.qnn) as s:
        res = search_mixed_precision(s, profile, x, target)
        art = s.quantize(profile, tmp_path / "mixed.onnx", keep_float=res.keep_float, w16_layers=res.w16_layers)
    assert res.reached and res.note is None and res.sqnr_db >= target, res.to_dict()
    assert res.start_sqnr_db < target and res.path[0].action == "start"
    assert res.path[res.chosen_step].sqnr_db == res.sqnr_db
    assert "2" in [l.module for l in res.w16_layers]              # the planted activation, raised to 16 bits
    if target > 55:                                              # 16-bit activations alone stop near 55 dB here:
        assert res.keep_float and any(p.action == "float" for p in res.path)       # the float fallback was needed
    # the model written with the chosen layers, measured again: the target holds
    measured = snr_db(run_onnx(planted["onnx"], "input", x),
                      run_onnx(tmp_path / "mixed.onnx", "input", x))
    assert measured >= target, (measured, res.to_dict()["path"])
    assert art.extra["mixed_precision"]["float"] == [l.module for l in res.keep_float]
    assert art.extra["mixed_precision"]["w8a16"] == [l.module for l in res.w16_layers]
    d = res.to_dict()
    assert json.loads(json.dumps(d))["w8a16_layers"] == [l.module for l in res.w16_layers]
    assert all(p["size_bytes"] > 0 and 0 < p["weight_bytes"] < p["size_bytes"] for p in d["path"])


def test_a_batch_that_crosses_the_target_is_bisected_to_its_fewest_layers(planted, monkeypatch):  # noqa: F811
    """One batch for all the candidates (``MAX_BATCHES = 1``): it crosses 45 dB, and the
    bisection comes back to the one layer that does it (the planted activation) in
    ceil(log2(batch)) more measurements. This network has two candidates, where that count
    equals the old one-at-a-time refinement's: the test holds the fewest-layers result and
    the count, not the saving, which only a larger batch shows."""
    import quantize.mixed_precision as mp
    monkeypatch.setattr(mp, "MAX_BATCHES", 1)
    x = planted["calib"]
    with _session(planted, True) as s:
        res = search_mixed_precision(s, QNN_W8A8, x, 45.0)
    path = res.to_dict()["path"]
    batch = res.path[1]
    assert batch.action == "w16" and len(batch.added) >= 2 and batch.sqnr_db >= 45.0, path
    assert len(res.path) == 2 + math.ceil(math.log2(len(batch.added))), path
    assert res.reached and res.path[res.chosen_step].added == ["2"], path
    assert [l.module for l in res.w16_layers] == ["2"]


def test_unreachable_target_ends_with_a_note(planted):  # noqa: F811
    with _session(planted, True) as s:
        res = search_mixed_precision(s, QNN_W8A8, planted["calib"], 200.0)
    assert not res.reached and res.note.startswith("target SQNR 200 dB not reached")
    assert res.unfixed and all(name.split(" ")[0] in {"0", "2", "4", "8"} for name in res.unfixed)
    assert all(name.split(" ")[0] in res.note for name in res.unfixed)
    # the best measured configuration is the one chosen, and it is not all-float
    assert res.sqnr_db == max(p.sqnr_db for p in res.path)
    assert len(res.keep_float) < len(s.layers)


def test_sqnr_against_the_users_model_names_the_float_floor(planted):  # noqa: F811
    """When the float model being quantized is itself a variant (float fixes, weight rounding),
    the target is against the user's logits, and the note says how far the variant already is."""
    x = planted["calib"]
    own = run_onnx(planted["onnx"], "input", x)
    rng = np.random.default_rng(1)
    users = own + rng.normal(size=own.shape).astype(np.float32) * np.sqrt((own ** 2).mean() * 10 ** -5)  # 50 dB away
    with _session(planted, False) as s:
        res = search_mixed_precision(s, GENERIC_INT8, x, 55.0, reference=users)
    assert res.float_sqnr_db == pytest.approx(50.0, abs=1.0)
    assert not res.reached and "is itself at 50." in res.note, res.note


# ------------------------------------------------- 16-bit weights from the unrounded model


def _rounded_copy(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """``src`` with every Conv/Gemm weight moved onto its symmetric per-channel int8 grid
    (what ``quantize.weight_rounding`` leaves in the float model); returns the originals."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(src))
    originals = {}
    for t in model.graph.initializer:
        w = numpy_helper.to_array(t)
        if w.ndim < 2:
            continue
        rows = w.reshape(w.shape[0], -1)
        scale = np.abs(rows).max(1, keepdims=True) / 127
        t.CopyFrom(numpy_helper.from_array((np.round(rows / scale) * scale).reshape(w.shape).astype(w.dtype), t.name))
        originals[t.name] = w
    onnx.save(model, str(dst))
    return originals


def test_16_bit_weights_come_from_the_unrounded_model_and_follow_the_qnn_rules(planted, tmp_path):  # noqa: F811
    """A layer raised to 16-bit weights takes its weights from ``original_onnx`` (int16 of
    an int8-rounded weight would keep the int8 error), written as symmetric per-channel
    int16 with 16-bit activations around it (HTP's w16a16), which the QNN rules accept;
    int16 weights behind an 8-bit input are flagged."""
    import onnx
    from onnx import numpy_helper

    from quantize.mixed_precision import _dequantized_weights
    from quantize.qnn_encodings import check_qnn_rules
    from quantize.onnx_ptq import QNN_W8A16
    rounded = tmp_path / "rounded.onnx"
    originals = _rounded_copy(planted["onnx"], rounded)
    with PtqSession(rounded, planted["calib"], qnn=True, layer_map=planted["layer_map"],
                    original_onnx=planted["onnx"]) as s:
        assert set(s.original_weights) == set(originals)         # every rounded weight, nothing else
        layer = next(l for l in s.layers if l.module == "4")
        wname = s.model.graph.node[[n.name for n in s.model.graph.node].index(layer.name)].input[1]
        plain = s.quantize(QNN_W8A16, tmp_path / "w8a16.onnx")
        art = s.quantize(QNN_W8A16, tmp_path / "w16.onnx", w16_weights=[layer])
        s.quantize(QNN_W8A8, tmp_path / "w8a8_w16.onnx", w16_weights=[layer])
    assert plain.extra["mixed_precision"]["w16a16"] == [] and art.extra["mixed_precision"]["w16a16"] == ["4"]
    proto = onnx.load(str(tmp_path / "w16.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits[wname + "_quantized"].dtype == np.int16
    assert inits[wname + "_scale"].size == inits[wname + "_quantized"].shape[0] > 1        # per output channel
    assert not inits[wname + "_zero_point"].any()
    dq = _dequantized_weights(proto)[layer.name]
    orig, on_grid = originals[wname], numpy_helper.to_array(
        next(t for t in onnx.load(str(rounded)).graph.initializer if t.name == wname))
    step = inits[wname + "_scale"].reshape(-1, 1, 1, 1)
    assert np.all(np.abs(dq - orig) <= step / 2 * 1.001)          # int16 of the original weight...
    assert np.abs(dq - orig).max() < np.abs(on_grid - orig).max() / 50   # ...not of the int8-rounded one
    # the other layers keep the rounded int8 weights
    assert all(v.dtype != np.int16 for k, v in inits.items() if k.endswith("_quantized") and not k.startswith(wname))
    assert check_qnn_rules(proto, "uint16") == []
    # the encodings Qualcomm's converter reads: 16-bit for this weight, 8-bit for the others
    from quantize.qnn_encodings import qnn_encodings
    enc = qnn_encodings(proto)
    assert {e["bitwidth"] for e in enc["param_encodings"][wname]} == {16}
    assert enc["quantizer_args"]["param_bitwidth"] == [8, 16]
    assert all(e["is_symmetric"] == "True" and e["offset"] == -32768 for e in enc["param_encodings"][wname])
    mixed8 = onnx.load(str(tmp_path / "w8a8_w16.onnx"))
    assert check_qnn_rules(mixed8, ("uint8", "uint16")) == []
    # int16 weights behind an 8-bit input: HTP has no w16a8, the rule says so
    consumers = [n for n in mixed8.graph.node if n.name == layer.name]
    producer = {o: n for n in mixed8.graph.node for o in n.output}[consumers[0].input[0]]
    for t in mixed8.graph.initializer:
        if t.name == producer.input[2]:
            t.CopyFrom(numpy_helper.from_array(np.array(128, np.uint8), t.name))
    rules = [v.rule for v in check_qnn_rules(mixed8, ("uint8", "uint16"))]
    assert "weight-16-needs-16-bit-activations" in rules, rules


def test_w8a16_target_is_reached_with_16_bit_weights_of_the_unrounded_model(planted, tmp_path):  # noqa: F811
    """On rounded weights (the session's float model on the int8 grid), the weight-only
    probe still measures each layer's rounding against the original weights, and a w8a16
    target beyond what int8 weights give is reached by raising weights to 16 bits, with no
    float layer; the written model holds it against the user's logits."""
    from quantize.onnx_ptq import QNN_W8A16
    rounded = tmp_path / "rounded.onnx"
    _rounded_copy(planted["onnx"], rounded)
    x = planted["calib"]
    ref = run_onnx(planted["onnx"], "input", x)
    with PtqSession(rounded, x, qnn=True, layer_map=planted["layer_map"], original_onnx=planted["onnx"]) as s:
        split = split_sensitivity(s, QNN_W8A16, x)
        assert all(l.weight_only_snr_db is not None and math.isfinite(l.weight_only_snr_db) for l in split.layers)
        s.write(QNN_W8A16, tmp_path / "start.onnx")
        start = snr_db(ref, run_onnx(tmp_path / "start.onnx", "input", x))
        target = start + 8
        res = search_mixed_precision(s, QNN_W8A16, x, target, split=split, reference=ref)
        s.quantize(QNN_W8A16, tmp_path / "mixed.onnx", keep_float=res.keep_float, w16_layers=res.w16_layers,
                   w16_weights=res.w16_weights)
    assert res.reached and not res.keep_float and res.w16_weights, res.to_dict()["path"]
    assert [p.action for p in res.path][:2] == ["start", "w16w"]     # w8a16: no activation phase
    assert res.path[res.chosen_step].w16w == len(res.w16_weights)
    assert snr_db(ref, run_onnx(tmp_path / "mixed.onnx", "input", x)) >= target
    assert res.to_dict()["w16a16_layers"] == [l.module for l in res.w16_weights]


def test_16_bit_weights_the_int32_bias_would_coarsen_are_left_out(planted, tmp_path):  # noqa: F811
    """A w8a8 layer raised to w16a16 computes its int32 bias at ``s_in * s_w`` ~65,000x finer:
    a bias that fits at w8a8 with 1% of int32's range overflows, and ONNX Runtime raises
    that row's weight scale until it fits, leaving it fewer levels than int8's 127. Such a
    layer gains nothing from 16-bit weights: the QNN rules flag it, and the search leaves
    it out (the bound does not depend on the weights' bits, so at w8a16, where the input
    is 16-bit either way, int16 weights lose no more to it than int8 ones)."""
    import onnx
    from onnx import numpy_helper

    from quantize.mixed_precision import _weak_at_16_bits
    from quantize.qnn_encodings import check_qnn_rules
    x = planted["calib"]
    with PtqSession(planted["onnx"], x, qnn=True, layer_map=planted["layer_map"]) as s:
        layer = next(l for l in s.layers if l.module == "4")
        _, weight, bias = next(n for n in s.model.graph.node if n.name == layer.name).input[:3]
        s.write(QNN_W8A8, tmp_path / "plain.onnx")
    bias_scale = next(numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "plain.onnx")).graph.initializer
                      if t.name == bias + "_quantized_scale").reshape(-1)
    model = onnx.load(str(planted["onnx"]))
    inits = {t.name: t for t in model.graph.initializer}
    w = numpy_helper.to_array(inits[weight])
    row = int(np.abs(w.reshape(len(w), -1)).max(1).argmax())     # the row with the largest weights
    b = numpy_helper.to_array(inits[bias]).copy()
    b[row] = 0.01 * 2 ** 31 * float(bias_scale[row])             # 1% of int32 at w8a8's s_in * s_w
    inits[bias].CopyFrom(numpy_helper.from_array(b, bias))
    big = tmp_path / "big_bias.onnx"
    onnx.save(model, str(big))
    with PtqSession(big, x, qnn=True, layer_map=planted["layer_map"]) as s:
        assert _weak_at_16_bits(s, QNN_W8A8, list(s.layers), "minmax", tmp_path) == {layer.name}
        s.write(QNN_W8A8, tmp_path / "w8a8.onnx")
        s.write(QNN_W8A8, tmp_path / "w16.onnx", w16_weights=[layer])
        res = search_mixed_precision(s, QNN_W8A8, x, 200.0)
    assert check_qnn_rules(onnx.load(str(tmp_path / "w8a8.onnx")), "uint8") == []
    rules = check_qnn_rules(onnx.load(str(tmp_path / "w16.onnx")), ("uint8", "uint16"))
    assert [v.rule for v in rules] == ["int32-bias-weight-scale-raised"] and layer.name in rules[0].where, rules
    # the search never raises it (it is left out when it is a candidate at all)
    assert layer not in res.w16_weights and set(res.w16_ineligible) <= {"4"}, res.to_dict()["path"]
    assert not any(v.rule.startswith("int32") for v in check_qnn_rules(onnx.load(str(tmp_path / "w8a8.onnx")),
                                                                        "uint8"))


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from pipeline.stages.export import ExportOptions, export_model
    from tests.parity_helpers import mnist_checkpoint
    root = tmp_path_factory.mktemp("mixed_cli")
    ckpt = mnist_checkpoint(root / "ckpt" / "model.safetensors")
    out = root / "export"
    export_model(None, out, checkpoint=ckpt, options=ExportOptions(formats=("onnx",)))
    return out


ARGS = ("--samples", "32", "--sensitivity-samples", "16", "--weight-rounding", "rtn", "--no-tflite",
        "--eval-samples", "50", "--json", "-q")


def _calibration(folder: Path) -> np.ndarray:
    from quantize.calibration import load_calibration
    return load_calibration("mnist", Manifest.load(folder).preprocessing, 32, seed=0)[:16]


def test_cli_target_sqnr_writes_a_w8a8_model_that_reaches_it(cli, export_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", str(export_dir), "--target-sqnr", "40", "--out", str(out), *ARGS)
    assert code == 0, err
    report = json.loads(stdout)["report"]
    mixed = report["mixed_precision"]
    assert mixed["reached"] and mixed["sqnr_db"] >= 40 > mixed["start_sqnr_db"], mixed["path"]
    assert mixed["profile"] == "qnn-w8a8" and len(mixed["path"]) >= 2
    # per layer by default: the weight-only and activation-only figures (the split probes),
    # no whole-layer ranking (--sensitivity-mode asks for it)
    assert report["sensitivity"]["mode"] == "split" and "sensitivity" not in json.loads(stdout)["seconds"]
    layers = report["sensitivity"]["layers"]
    assert all(math.isfinite(l["activation_only_snr_db"]) for l in layers)
    assert all(math.isfinite(l["weight_only_snr_db"]) for l in layers if l["has_weights"])
    assert all(l["snr_db"] is None for l in layers)
    # recorded in the manifest, applied to the w8a8 model only
    manifest = Manifest.load(out)
    w8a8 = next(a for a in manifest.artifacts if a.key == "onnx/w8a8-qnn")
    w8a16 = next(a for a in manifest.artifacts if a.key == "onnx/w8a16-qnn")
    assert w8a8.extra["mixed_precision"] == {"float": mixed["keep_float"], "w8a16": mixed["w8a16_layers"],
                                             "w16a16": mixed["w16a16_layers"]}
    assert w8a16.extra["mixed_precision"] == {"float": [], "w8a16": [], "w16a16": []}
    assert report["mixed_precision_others"] == [], "a number asked for applies to --target-profile only"
    assert manifest.source["quantization"]["target_sqnr"]["reached"] is True
    assert any("target SQNR 40 dB reached" in n for n in report["notes"])
    # the written file, run again on the same calibration inputs: the target holds
    x = _calibration(export_dir)
    measured = snr_db(run_onnx(export_dir / "model.onnx", "input", x), run_onnx(out / w8a8.path, "input", x))
    assert measured >= 40, measured
    # the report section draws the size-vs-SQNR plot and names the layers
    from pipeline.report import QuantizeRecord
    from pipeline.report.plots import plot_mixed_precision

    class _Report:
        def to_dict(self):
            return report
    rec = QuantizeRecord(str(out), _Report(), {})
    plots = rec.plots(None)
    assert plots["mixed_precision_pareto"][:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_mixed_precision(mixed)[:4] == b"\x89PNG"
    md = "\n".join(rec.markdown(None, lambda name: [f"![{name}]"]))
    assert "![mixed_precision_pareto]" in md and "Mixed precision to 40 dB" in md and "weights only" in md
    # the per-layer figures without the ranking: the plot (two bars a layer), the report's
    # table and the command's table say what they rank by and show no whole-layer column
    assert plots["int8_sensitivity"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "ranked by the worse of the two" in md
    md_header = next(ln for ln in md.splitlines() if ln.startswith("| layer") and "weights only" in ln)
    assert "activations only" in md_header and "layer quantized" not in md_header, md_header
    from rich.console import Console
    from pipeline.commands.quantize import show_report
    from pipeline.ui import UI
    from quantize.report import QuantReport
    ui = UI()
    ui.out = Console(record=True, width=200, file=io.StringIO())
    show_report(ui, QuantReport.from_dict(report))
    text = ui.out.export_text()
    assert "most sensitive layers (qnn-w8a8, by the worse of its weight-only and activation-only SNR" \
        in " ".join(text.split()), text                 # the title, however rich wraps it
    header = next(ln for ln in text.splitlines() if "weights only dB" in ln)
    assert "activations only dB" in header and "top-1 agree" not in header, header
    # and the run record's quantize section, with the new keys, still matches the documented schema
    from tests.json_schema import validate
    root = Path(__file__).resolve().parents[1]
    schema = json.loads((root / "pipeline/report/run_record.schema.json").read_text())
    sub = dict(schema["properties"]["quantize"], **{"$defs": schema["$defs"]})
    assert validate(json.loads(json.dumps(rec.to_dict())), sub) == []


def test_cli_unreachable_target_is_a_note_not_a_failure(cli, export_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", str(export_dir), "--target-sqnr", "200", "--out", str(out),
                            "--no-sensitivity", *ARGS)
    assert code == 0, err
    report = json.loads(stdout)["report"]
    mixed = report["mixed_precision"]
    assert not mixed["reached"] and mixed["unfixed"]
    note = next(n for n in report["notes"] if n.startswith("target SQNR 200 dB not reached"))
    assert mixed["unfixed"][0].split(" ")[0] in note
    assert report["sensitivity"] is None and mixed["split"]["layers"]     # split probes run for the search anyway
    assert (out / "model_qnn_w8a8.onnx").is_file()


def test_cli_rejects_a_non_finite_target(cli, export_dir, tmp_path):
    code, _, err = cli("quantize", str(export_dir), "--target-sqnr", "nan", "--out", str(tmp_path / "q"), *ARGS)
    assert code == 2 and "--target-sqnr" in err and "Traceback" not in err


def test_cli_target_profile_w8a16_raises_weights_to_16_bits(cli, export_dir, tmp_path):
    """``--target-profile w8a16``: the search runs on the w8a16 model (no activation phase:
    it is 16-bit already), raising weight-limited layers to int16 weights taken from before
    the default weight rounding; the manifest records them on that model only, and its QNN
    rules accept them."""
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", str(export_dir), "--target-sqnr", "200", "--target-profile", "w8a16",
                            "--out", str(out), "--samples", "32", "--rounding-samples", "32",
                            "--sensitivity-samples", "16", "--no-tflite", "--no-sensitivity",
                            "--no-plain-baseline", "--eval-samples", "50", "--json", "-q")
    assert code == 0, err
    report = json.loads(stdout)["report"]
    mixed = report["mixed_precision"]
    assert mixed["profile"] == "qnn-w8a16" and not mixed["reached"]
    actions = [p["action"] for p in mixed["path"]]
    assert actions[0] == "start" and "w16" not in actions and "w16w" in actions, actions
    best = mixed["path"][mixed["chosen_step"]]
    assert best["sqnr_db"] > mixed["path"][0]["sqnr_db"] + 3, mixed["path"]     # 16-bit weights help here
    manifest = Manifest.load(out)
    w8a8 = next(a for a in manifest.artifacts if a.key == "onnx/w8a8-qnn")
    w8a16 = next(a for a in manifest.artifacts if a.key == "onnx/w8a16-qnn")
    assert w8a8.extra["mixed_precision"] == {"float": [], "w8a16": [], "w16a16": []}
    assert w8a16.extra["mixed_precision"]["w16a16"] == mixed["w16a16_layers"] != []
    assert not [v for v in w8a16.extra["qnn_rules"]["violations"] if "weight-dtype" in v]
    assert manifest.source["quantization"]["target_sqnr"]["w16a16_layers"] == mixed["w16a16_layers"]


def test_cli_rejects_an_unknown_target_profile(cli, export_dir, tmp_path):
    code, _, err = cli("quantize", str(export_dir), "--target-sqnr", "40", "--target-profile", "w4a4",
                       "--out", str(tmp_path / "q"), *ARGS)
    assert code == 2 and "--target-profile" in err and "w8a16" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_a_target_the_8_bit_model_already_meets_skips_the_split_probes(planted):  # noqa: F811
    """A default target on a model that is already there costs one measurement: no split
    probes, nothing raised, the 8-bit model's own figure as the result."""
    x = planted["calib"]
    with _session(planted, True) as s:
        start = search_mixed_precision(s, QNN_W8A8, x, 200.0).start_sqnr_db
        res = search_mixed_precision(s, QNN_W8A8, x, start - 1.0)
    assert res.reached and res.split is None and len(res.path) == 1 and res.chosen_step == 0
    assert res.sqnr_db == pytest.approx(start) and not res.w16_layers and not res.keep_float
    assert res.to_dict()["split"] is None


def test_cli_snapdragon_searches_to_its_default_target_unless_off(cli, export_dir, tmp_path):
    """``--target snapdragon`` with no --target-sqnr: the w8a8 model is searched to 30 dB and
    the w8a16 one to 44 dB (the defaults, said so in the notes and the manifest), each written
    model holding its own on the search's inputs; ``--target-sqnr off`` writes all-8-bit
    models; ``--target generic`` has no default target."""
    from pipeline.stages.quantize import DEFAULT_TARGET_SQNR_DB
    code, stdout, err = cli("quantize", str(export_dir), "--out", str(tmp_path / "auto"), "--no-sensitivity", *ARGS)
    assert code == 0, err
    report = json.loads(stdout)["report"]
    mixed = report["mixed_precision"]
    assert mixed["target_sqnr_db"] == DEFAULT_TARGET_SQNR_DB["snapdragon"]["w8a8"] == 30.0
    assert mixed["default_target"] is True and mixed["profile"] == "qnn-w8a8" and mixed["reached"]
    assert any(n.startswith("target SQNR 30 dB (the target's default)") for n in report["notes"]), report["notes"]
    recorded = Manifest.load(tmp_path / "auto").source["quantization"]["target_sqnr"]
    assert recorded["default_target"] is True and recorded["target_sqnr_db"] == 30.0
    # the written w8a8 model, measured again on the search's inputs, holds the default
    w8a8 = next(a for a in Manifest.load(tmp_path / "auto").artifacts if a.key == "onnx/w8a8-qnn")
    x = _calibration(export_dir)
    assert snr_db(run_onnx(export_dir / "model.onnx", "input", x),
                  run_onnx(tmp_path / "auto" / w8a8.path, "input", x)) >= 30.0
    # the w8a16 model: its own default search, after the w8a8 one
    others = report["mixed_precision_others"]
    assert [(m["profile"], m["target_sqnr_db"], m["default_target"], m["reached"]) for m in others] == \
        [("qnn-w8a16", DEFAULT_TARGET_SQNR_DB["snapdragon"]["w8a16"], True, True)]
    assert any(n.startswith("target SQNR 44 dB (the target's default)") for n in report["notes"]), report["notes"]
    others_recorded = Manifest.load(tmp_path / "auto").source["quantization"]["target_sqnr_others"]
    assert [(m["profile"], m["target_sqnr_db"]) for m in others_recorded] == [("qnn-w8a16", 44.0)]
    w8a16 = next(a for a in Manifest.load(tmp_path / "auto").artifacts if a.key == "onnx/w8a16-qnn")
    assert w8a16.extra["mixed_precision"]["w16a16"] == others[0]["w16a16_layers"]
    assert snr_db(run_onnx(export_dir / "model.onnx", "input", x),
                  run_onnx(tmp_path / "auto" / w8a16.path, "input", x)) >= 44.0

    code, stdout, err = cli("quantize", str(export_dir), "--out", str(tmp_path / "off"), "--target-sqnr", "off",
                            "--no-sensitivity", *ARGS)
    assert code == 0, err
    report = json.loads(stdout)["report"]
    assert report["mixed_precision"] is None and report["mixed_precision_others"] == []
    manifest = Manifest.load(tmp_path / "off")
    assert "target_sqnr" not in manifest.source["quantization"]
    assert "target_sqnr_others" not in manifest.source["quantization"]
    assert all(a.extra["mixed_precision"] == {"float": [], "w8a16": [], "w16a16": []}
               for a in manifest.artifacts if a.format == "onnx")

    code, stdout, err = cli("quantize", str(export_dir), "--out", str(tmp_path / "generic"), "--target", "generic",
                            "--no-sensitivity", *ARGS)
    assert code == 0, err
    assert json.loads(stdout)["report"]["mixed_precision"] is None


def test_cli_rejects_a_target_that_is_not_a_number_auto_or_off(cli, export_dir, tmp_path):
    code, _, err = cli("quantize", str(export_dir), "--target-sqnr", "loud", "--out", str(tmp_path / "q"), *ARGS)
    assert code == 2 and "--target-sqnr" in err and "auto or off" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_report_section_says_when_the_target_is_the_default():
    """The run report's quantize section names a default target as such (the user did not
    ask for mixed precision, so the report says where it came from and how to turn it off)."""
    from pipeline.report import QuantizeRecord
    mixed = {"target_sqnr_db": 30.0, "default_target": True, "profile": "qnn-w8a8", "samples": 32, "reached": True,
             "sqnr_db": 32.6, "start_sqnr_db": 32.6, "note": None, "w8a16_layers": [], "w16a16_layers": [],
             "keep_float": [], "chosen_step": 0,
             "path": [{"step": 0, "action": "start", "added": [], "w16": 0, "w16w": 0, "float": 0,
                       "size_bytes": 1000, "weight_bytes": 500, "sqnr_db": 32.6}]}

    class _Report:
        def to_dict(self):
            variant = {"key": "onnx/w8a8-qnn", "accuracy": None, "drop_points": None, "top1_agreement": 1.0,
                       "snr_db": {"logits": 32.6}, "size_bytes": 1000, "size_ratio": 0.25}
            return {"target": "snapdragon", "variants": [variant], "notes": [], "mixed_precision": mixed}
    md = "\n".join(QuantizeRecord("q", _Report(), {}).markdown(None, lambda name: [f"![{name}]"]))
    assert "Mixed precision to 30 dB logit SQNR (the default of `--target snapdragon`; `--target-sqnr off`" in md
    mixed["default_target"] = False
    md = "\n".join(QuantizeRecord("q", _Report(), {}).markdown(None, lambda name: [f"![{name}]"]))
    assert "Mixed precision to 30 dB logit SQNR (qnn-w8a8" in md and "default of" not in md
