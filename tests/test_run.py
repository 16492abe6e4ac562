"""`mdeploy run` end to end on a small config: every stage, every format, one run folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SMALL_RUN = """
name = "small"
stages = ["train", "export", "verify", "quantize", "profile", "repvgg", "sparse_shift", "report"]
[train]
model = "mobilenet_v2"
model_kwargs = { width_mult = 0.35 }
data = "digits"
input_size = 16
epochs = 2
[export]
formats = ["onnx", "tflite", "coreml", "executorch"]
tflite_precisions = ["fp32", "int8"]
coreml_precisions = ["fp32"]
calib_samples = 64
[verify]
samples = 64
[quantize]
target = "snapdragon"
samples = 32
eval_samples = 128
[profile]
runs = 3
warmup = 1
[repvgg]
epochs = 1
train_samples = 256
input_size = 16
eval_samples = 64
calibration_samples = 32
[sparse_shift]
epochs = 1
train_samples = 256
freeze_shifts_after = 0
formats = ["onnx"]
eval_samples = 32
"""


@pytest.mark.slow
def test_run_small_config_end_to_end(cli, tmp_path):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL_RUN)
    code, out, err = cli("run", "--config", str(cfg), "--out", str(tmp_path / "runs"), "--json", "-q")
    assert code == 0, err[-3000:]
    record = json.loads(out)
    run_dir = Path(record["run_dir"])
    assert (tmp_path / "runs" / "latest").resolve() == run_dir.resolve()
    assert (run_dir / "train" / "model.safetensors").is_file()
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    keys = {(a["format"], a["precision"]) for a in manifest["artifacts"]}
    assert {("pt", "fp32"), ("onnx", "fp32"), ("tflite", "fp32"), ("tflite", "int8"),
            ("mlpackage", "fp32"), ("executorch", "fp32"), ("executorch", "int8")} <= keys
    targets = {p["target"] for p in record["verify"]["pairs"]}
    assert len(targets) == len(manifest["artifacts"]) - 1          # every artifact but the reference
    assert all(p["passed"] for p in record["verify"]["pairs"]), record["verify"]["pairs"]
    assert record["profile"]["profiles"], "no artifact was profiled"
    # per-layer error curves for every pair, passing ones included (the report plots them)
    assert all(p["layers"] for p in record["verify"]["pairs"] if p["target"].startswith(("onnx", "tflite")))
    # quantize: the Snapdragon QDQ models and int8-io TFLite, measured and verified against PyTorch
    q = record["quantize"]
    assert {v["precision"] for v in q["variants"]} >= {"w8a8", "w8a16"}, q["variants"]
    assert all(v["top1_agreement"] >= 0.9 for v in q["variants"]), q["variants"]
    assert record["verify_quantized"]["pairs"] and all(p["passed"] for p in record["verify_quantized"]["pairs"])
    assert any(p["artifact"].startswith("quantized ") for p in record["profile"]["profiles"])
    # repvgg: deploy form exact, one conv per block, both variants quantized
    rep = record["repvgg"]
    assert rep["passed"] and len(rep["variants"]) == 2
    assert all(v["reparam_max_abs"] <= 1e-5 and v["adds"] == 0 and v["int8"]["accuracy"] is not None
               for v in rep["variants"])
    # sparse shift: trained, exported as data movement, exact
    sh = record["sparse_shift"]
    assert sh["passed"] and sh["data_movement_only"] and sh["shift_parts_exact"]
    assert sum(sh["statistics"]["histogram"].values()) == sh["statistics"]["channels"]
    for name in ("report.html", "report.md", "report.json", "plots/training.png", "plots/parity.png",
                 "plots/per_layer_error.png", "plots/accuracy_size_latency.png", "plots/int8_sensitivity.png",
                 "plots/repvgg_int8.png", "plots/sparse_shifts.png"):
        assert (run_dir / name).is_file(), name
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "onnx/fp32" in html and "<table>" in html
    assert "executorch/int8" in html and "op split" in html          # the .pte beside the other targets
    assert {"executorch/fp32", "executorch/int8"} <= {p["artifact"] for p in record["profile"]["profiles"]}
    assert "qarepvgg_tiny" in html and "Sparse shifts" in html
    # the --json document is the documented schema, and report.json is the same document
    from pipeline.report import SCHEMA_PATH
    from tests.json_schema import validate
    assert validate(record, json.loads(SCHEMA_PATH.read_text())) == []
    assert json.loads((run_dir / "report.json").read_text()) == record


def test_run_rejects_bad_config_in_one_line(cli, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nepochs = 0\n")
    code, _, err = cli("run", "--config", str(cfg), "--out", str(tmp_path / "runs"))
    assert code == 2 and "train.epochs" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    cfg.write_text("[trian]\nepochs = 1\n")
    code, _, err = cli("run", "--config", str(cfg), "--out", str(tmp_path / "runs"))
    assert code == 2 and "trian" in err


def test_readme_config_example_is_a_valid_config(tmp_path):
    """The TOML shown in the README is what users copy: it must load as it is."""
    import re

    from pipeline.config import load_config
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, re.S)
    (tmp_path / "readme.toml").write_text(block)
    cfg = load_config(tmp_path / "readme.toml")
    assert cfg.train.epochs == 24 and cfg.quantize.target == "snapdragon" and cfg.export.card.license
