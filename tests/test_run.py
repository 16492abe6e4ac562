"""`mdeploy run` end to end on a small config: every stage, every format, one run folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SMALL_RUN = """
name = "small"
stages = ["train", "export", "verify", "profile", "report"]
[train]
model = "mobilenet_v2"
model_kwargs = { width_mult = 0.35 }
data = "digits"
input_size = 16
epochs = 2
[export]
formats = ["onnx", "tflite", "coreml"]
tflite_precisions = ["fp32", "int8"]
coreml_precisions = ["fp32"]
calib_samples = 64
[verify]
samples = 64
[profile]
runs = 3
warmup = 1
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
            ("mlpackage", "fp32")} <= keys
    targets = {p["target"] for p in record["verify"]["pairs"]}
    assert len(targets) == len(manifest["artifacts"]) - 1          # every artifact but the reference
    assert all(p["passed"] for p in record["verify"]["pairs"]), record["verify"]["pairs"]
    assert record["profile"]["profiles"], "no artifact was profiled"
    for name in ("report.html", "report.md", "report.json", "plots/training.png", "plots/parity.png"):
        assert (run_dir / name).is_file(), name
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "onnx/fp32" in html


def test_run_rejects_bad_config_in_one_line(cli, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nepochs = 0\n")
    code, _, err = cli("run", "--config", str(cfg), "--out", str(tmp_path / "runs"))
    assert code == 2 and "train.epochs" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    cfg.write_text("[trian]\nepochs = 1\n")
    code, _, err = cli("run", "--config", str(cfg), "--out", str(tmp_path / "runs"))
    assert code == 2 and "trian" in err
