"""`mdeploy quantize` end to end on the model trained on the bundled MNIST: the Snapdragon
QDQ models and the full-integer TFLite each within 1 point of float accuracy with top-1
agreement >= 98% on held-out images (ONNX Runtime CPU EP and LiteRT, real runtimes), a
folder `mdeploy verify` accepts, and one-line errors (exit 2) for bad calibration data.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporters.artifact import Manifest

MAX_DROP_POINTS = 1.0
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def export_dir(trained_mnist, tmp_path_factory) -> Path:
    from pipeline.stages.export import ExportOptions, export_model
    out = tmp_path_factory.mktemp("quantize_cli") / "export"
    export_model(None, out, checkpoint=trained_mnist, options=ExportOptions(formats=("onnx",)))
    return out


@pytest.mark.slow
def test_snapdragon_target_writes_qnn_models_and_tflite_within_one_point(cli, export_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", str(export_dir), "--target", "snapdragon", "--samples", "128",
                            "--no-sensitivity", "--eval-samples", "500", "--out", str(out), "--json", "-q")
    assert code == 0, err
    doc = json.loads(stdout)
    report = doc["report"]
    keys = [v["key"] for v in report["variants"]]
    assert keys == ["onnx/w8a8-qnn", "onnx/w8a16-qnn", "tflite/int8-io", "tflite/uint8-pixels", "tflite/int8w"]
    assert report["eval_samples"] == 500 and report["float_accuracy"] > 0.9
    for v in report["variants"]:
        assert v["drop_points"] <= MAX_DROP_POINTS, v
        assert v["top1_agreement"] >= MIN_AGREEMENT, v
        assert v["size_ratio"] > 2.5, v                      # int8 weights: ~4x smaller than float32
    # the manifest of the new folder: reference + 5 artifacts, encodings recorded
    manifest = Manifest.load(out)
    assert [a.key for a in manifest.artifacts] == ["pt/fp32", *keys]
    w8a8 = manifest.artifacts[1]
    enc = w8a8.extra["encodings"]
    assert set(enc["activation_dtypes"]) == {"uint8"} and set(enc["weight_dtypes"]) == {"int8"}
    assert enc["weights_per_channel"] == enc["weights_symmetric"] == len(enc["weights"])
    assert set(manifest.artifacts[2].extra["encodings"]["activation_dtypes"]) == {"uint16"}
    tfl, pixels = manifest.artifacts[3], manifest.artifacts[4]
    assert tfl.inputs[0].dtype == "int8" and tfl.outputs[0].dtype == "int8"
    # camera-ready by default: uint8 bytes in (scale 1, zero point 0), the normalisation inside
    assert (pixels.inputs[0].dtype, pixels.inputs[0].scale, pixels.inputs[0].zero_point) == ("uint8", 1.0, 0)
    # and the int8w one: float in and out, int8 weights, no calibration of its own
    int8w = manifest.artifacts[5]
    assert int8w.inputs[0].dtype == int8w.outputs[0].dtype == "float32" and int8w.extra["weights"] == "int8"
    assert "calibration" not in int8w.extra
    assert manifest.source["quantization"]["target"] == "snapdragon"
    assert json.loads((out / "quantization_report.json").read_text())["variants"] == report["variants"]
    for a in manifest.artifacts:
        assert (out / a.path).is_file()
    # the default weight rounding: every written model carries the optimised integers, and the
    # plain round-to-nearest w8a8 model is measured beside them (not written)
    assert report["weight_rounding"]["grid_mismatch"] == {k: 0 for k in keys}
    assert report["weight_rounding"]["grid_unmatched"] == {"tflite/int8-io": 0, "tflite/uint8-pixels": 0,
                                                           "tflite/int8w": 0}
    plain = report["plain_route"]
    assert plain["key"] == "onnx/w8a8-qnn (plain rtn, not written)" and plain["samples"] == 500
    assert not any("plain" in p.name for p in out.iterdir())
    # the comparison with Qualcomm's published figures is in the data
    assert {r["reference"] for r in report["comparison"]} == {r["name"] for r in report["references"]}
    # and `mdeploy verify` accepts the folder: every quantized file against the PyTorch model
    code, stdout, err = cli("verify", str(out), "--samples", "50", "--json", "-q")
    assert code == 0, err
    pairs = json.loads(stdout)["pairs"]
    assert len(pairs) == 5 and all(p["passed"] for p in pairs)


@pytest.mark.slow
def test_generic_target_with_float_fixes_mixed_precision_and_tables(cli, export_dir, tmp_path):
    out = tmp_path / "g"
    code, stdout, err = cli("quantize", str(export_dir), "--target", "generic", "--samples", "64",
                            "--float-fixes", "bn,cle,bias", "--keep-float", "1", "--sensitivity-samples", "8",
                            "--no-tflite", "--eval-samples", "200", "--top", "3", "--out", str(out))
    assert code == 0, err
    for text in ("onnx/int8", "float fixes", "cle", "most sensitive layers", "AIMET data-free W8A8",
                 "AI Hub w8a8 TFLite", "ours: onnx/int8", "mdeploy verify", "(plain rtn, not written)",
                 "Grid check", "onnx/int8 0 integer(s) differ"):
        assert text in stdout, text
    report = json.loads((out / "quantization_report.json").read_text())
    assert [f["name"] for f in report["float_fixes"]] == ["bn", "cle", "bias"]
    sens = report["sensitivity"]
    # --keep-float 1 needs the worst layer: the whole-layer ranking runs (on half of
    # --sensitivity-samples), the split figures beside it
    assert sens["mode"] == "only" and sens["samples"] == 4 and len(sens["layers"]) > 50
    assert all(l["snr_db"] is not None and "activation_only_snr_db" in l for l in sens["layers"])
    kept = Manifest.load(out).artifacts[1].extra["mixed_precision"]["float"]
    assert kept == [sens["layers"][0]["layer"]]
    v = report["variants"][0]
    assert v["drop_points"] <= MAX_DROP_POINTS and v["top1_agreement"] >= MIN_AGREEMENT, v
    # the output folder exists now: a second run refuses to overwrite it without --force
    code, _, err = cli("quantize", str(export_dir), "--target", "generic", "--out", str(out), "--no-tflite",
                       "--no-sensitivity")
    assert code == 2 and "--force" in err


def _bad_png_folder(root: Path) -> Path:
    root.mkdir()
    (root / "a.png").write_text("not an image")
    return root


@pytest.mark.parametrize("kind,expected", [
    ("wrong-shape", "shape (N, 1, 28, 28)"),
    ("wrong-channels", "shape (N, 1, 28, 28)"),
    ("four-channel-images", "(N, H, W, 3)"),
    ("empty-folder", "no images"),
    ("non-images", "a readable image"),
    ("missing", "no such file"),
])
def test_bad_calibration_data_is_a_one_line_error(cli, export_dir, tmp_path, kind, expected):
    data = {
        "wrong-shape": lambda: _save(tmp_path / "x.npy", np.zeros((4, 1, 32, 32), np.float32)),
        "wrong-channels": lambda: _save(tmp_path / "x.npy", np.zeros((4, 3, 28, 28), np.float32)),
        "four-channel-images": lambda: _save(tmp_path / "x.npy", np.zeros((4, 28, 28, 4), np.uint8)),
        "empty-folder": lambda: _mkdir(tmp_path / "empty"),
        "non-images": lambda: _bad_png_folder(tmp_path / "bad"),
        "missing": lambda: tmp_path / "nothing-here",
    }[kind]()
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", str(export_dir), "--calib", str(data), "--out", str(out), "-q")
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert "Traceback" not in err and not out.exists()


def _save(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_quantize_rejects_bad_options_before_any_work(cli, tmp_path):
    code, _, err = cli("quantize", str(tmp_path), "--out", str(tmp_path / "q"), "--float-fixes", "bn,nope")
    assert code == 2 and "--float-fixes" in err
    code, _, err = cli("quantize", str(tmp_path / "none"), "--out", str(tmp_path / "q"))
    assert code == 2 and "manifest.json" in err
