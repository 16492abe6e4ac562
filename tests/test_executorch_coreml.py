"""ExecuTorch ``.pte`` files lowered with the Core ML partitioner, and the QNN refusal
(issue 16: "a Core ML / QNN partitioner export where it lowers on Linux, say plainly where
it does not").

Real converters throughout (torch.export, ExecuTorch's ``CoreMLPartitioner``, coremltools,
the ExecuTorch runtime): a tiny conv net at 32x32 keeps it fast. The Core ML program lowers
here but this runtime has no ``CoreMLBackend``; verify runs its delegate payload on the NumPy
MIL interpreter, profile and int8 (quantize ops the interpreter lacks) are skips with reasons.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TINY = ("import torch.nn as nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n")


@pytest.fixture(scope="module")
def cli(module_cli):
    """Module-scoped: the module's export fixtures call it."""
    return module_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny") / "tiny.py"
    path.write_text(TINY)
    return f"{path}:build"


@pytest.fixture(scope="module")
def coreml_export(tiny, tmp_path_factory, cli) -> Path:
    out = tmp_path_factory.mktemp("et_coreml") / "export"
    code, _, err = cli("-q", "export", tiny, "--input-size", "32", "--formats", "executorch",
                       "--executorch-backends", "xnnpack,coreml", "--precisions", "fp32,fp16", "--out", str(out))
    assert code == 0, err[-2000:]
    return out


def test_coreml_pte_files_manifest_and_split(coreml_export):
    names = sorted(p.name for p in coreml_export.glob("*.pte"))
    # xnnpack takes fp32 only (fp16 is Core ML's), its file name unchanged; only XNNPACK's
    # program has a tap program (a Core ML one cannot run here)
    assert names == ["model_fp16_coreml.pte", "model_fp32.pte", "model_fp32.taps.pte", "model_fp32_coreml.pte"]
    manifest = json.loads((coreml_export / "manifest.json").read_text())
    arts = {(a["precision"], a["variant"]): a for a in manifest["artifacts"] if a["format"] == "executorch"}
    assert arts[("fp32", "")]["extra"]["delegation"]["backend"] == "XNNPACK"
    for precision, compute in (("fp32", "float32"), ("fp16", "float16")):
        art = arts[(precision, "coreml")]
        extra = art["extra"]
        assert art["path"] == f"model_{precision}_coreml.pte" and "CoreMLPartitioner" in art["tool"]
        assert extra["backend"] == "coreml" and extra["minimum_deployment_target"] == "iOS17"
        assert extra["compute_precision"] == compute and "only on Apple platforms" in extra["runs_on"]
        split = extra["delegation"]
        assert split["backend"] == "CoreML" and split["delegated_subgraphs"] == 1
        assert split["non_delegated_ops"] == 0 and split["delegated"]["aten_conv2d_default"] == 1
        data = (coreml_export / art["path"]).read_bytes()
        assert data[4:6] == b"ET" and b"CoreMLBackend" in data
    assert manifest["source"]["executorch_backends"] == ["xnnpack", "coreml"]
    assert manifest["source"]["coreml_target"] == "iOS17"


def test_verify_runs_the_coreml_payload_on_the_mil_interpreter(coreml_export, tiny):
    from pipeline.stages.verify import VerifyOptions, verify_folder
    res = verify_folder(coreml_export, VerifyOptions(samples=4, random_inputs=True,
                                                     runner_options={"torch": {"model": tiny}}))
    pairs = {p.target: p for p in res.report.pairs}
    assert set(pairs) == {"executorch/fp32", "executorch/fp32-coreml", "executorch/fp16-coreml"}
    for key in ("executorch/fp32-coreml", "executorch/fp16-coreml"):
        assert pairs[key].passed, pairs[key].failures
        assert "numpy MIL interpreter" in pairs[key].target_runner and "no CoreMLBackend" in pairs[key].target_runner
    assert pairs["executorch/fp32-coreml"].max_abs < 1e-5


def test_profile_skips_the_coreml_pte_with_its_reason(coreml_export):
    from pipeline.stages.profile import ProfileOptions, profile_folder
    res = profile_folder(coreml_export, ProfileOptions(runs=2, warmup=1, threads=1, artifacts=["executorch"]))
    assert [p.artifact for p in res.profiles] == ["executorch/fp32"]
    skipped = {s.artifact: s.reason for s in res.skipped}
    assert set(skipped) == {"executorch/fp32-coreml", "executorch/fp16-coreml"}
    for reason in skipped.values():
        assert "CoreMLBackend" in reason and "runs only on iOS/macOS" in reason


def test_coreml_int8_lowers_and_verify_skips_it_saying_why(cli, tiny, tmp_path):
    """int8 (PT2E, CoreMLQuantizer) lowers; its payload has quantize/dequantize, which the MIL
    interpreter lacks, so nothing here can run it: verify lists it as skipped, never passed."""
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.uint8))
    out = tmp_path / "export"
    code, _, err = cli("-q", "export", tiny, "--input-size", "32", "--formats", "executorch",
                       "--executorch-backends", "coreml", "--precisions", "fp32,int8", "--calibration", str(calib),
                       "--out", str(out))
    assert code == 0, err[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    art = {a["path"]: a for a in manifest["artifacts"]}["model_int8_coreml.pte"]
    assert art["extra"]["quantization"]["quantizer"].endswith("CoreMLQuantizer")
    assert art["extra"]["delegation"]["backend"] == "CoreML" and art["extra"]["delegation"]["delegated_subgraphs"] == 1

    from pipeline.stages.verify import VerifyOptions, verify_folder
    res = verify_folder(out, VerifyOptions(samples=2, random_inputs=True, runner_options={"torch": {"model": tiny}}))
    assert [p.target for p in res.report.pairs] == ["executorch/fp32-coreml"] and res.report.pairs[0].passed
    (note,) = [n for n in res.notes if n.startswith("executorch/int8-coreml")]
    assert "skipped, not verified" in note and "CoreMLBackend" in note and "iOS/macOS" in note, note
    assert note in res.report.notes


def test_qnn_is_one_line_exit_2_saying_why(cli, tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    code, _, err = cli("-q", "export", tiny, "--input-size", "32", "--formats", "executorch",
                       "--executorch-backends", "qnn", "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "QNN_SDK_ROOT is not set" in err and "libQnnHtp.so" in err, err
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    code, _, err = cli("-q", "export", tiny, "--input-size", "32", "--formats", "executorch",
                       "--executorch-backends", "xnnpack,qnn", "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and f"under QNN_SDK_ROOT={tmp_path}" in err, err


def test_bad_backend_and_precision_are_one_line(cli, tiny, tmp_path):
    code, _, err = cli("-q", "export", tiny, "--input-size", "32", "--formats", "executorch",
                       "--executorch-backends", "metal", "--out", str(tmp_path / "a"))
    assert code == 2 and err.count("\n") == 1 and "--executorch-backends" in err and "metal" in err, err
    code, _, err = cli("-q", "export", tiny, "--input-size", "32", "--formats", "executorch",
                       "--precisions", "fp16", "--out", str(tmp_path / "b"))      # fp16 is Core ML's only
    assert code == 2 and err.count("\n") == 1 and "executorch (xnnpack)" in err and "fp16" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
