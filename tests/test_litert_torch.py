"""The direct PyTorch -> TFLite route (litert-torch), the default for the float kinds.

Real conversions and real LiteRT runs: the default model's fp32/fp16 files by litert-torch
pass ``verify`` at the fp32 bound; the manifest says which route wrote each file and why;
a model onnx2tf cannot convert (``shiftnet_a`` at 32x32, see ``tests/test_zoo_tflite.py``)
converts by the default route with fp32 parity; without a PyTorch model the ONNX route
takes over and says why.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from device_tests.runners.litert import LiteRTRunner
from exporters.artifact import Preprocessing
from exporters.onnx import export_onnx
from exporters.tflite import ConversionError, export_tflite
from exporters.tflite_ops import graph_ops, op_counts
from models import create_model
from models.errors import InputError
from tests.zoo_checks import fp32_parity_failure, trained_like


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _routes(folder) -> dict[str, dict]:
    return {a["precision"]: a for a in _manifest(folder)["artifacts"] if a["format"] == "tflite"}


def test_default_route_writes_fp32_and_fp16_by_litert_torch_and_they_pass_verify(cli, trained_mnist, tmp_path):
    out = tmp_path / "app"
    code, _, err = cli("export", "--checkpoint", str(trained_mnist), "--formats", "tflite",
                       "--precisions", "fp32,fp16", "--out", str(out), "-q")
    assert code == 0, err
    arts = _routes(out)
    for precision in ("fp32", "fp16"):
        a = arts[precision]
        assert a["extra"]["converter"]["route"] == "litert-torch", a["extra"]["converter"]
        assert a["tool"] == "litert-torch" and "litert-torch 0.10.0" in a["tool_version"]
        assert a["inputs"][0]["layout"] == "NHWC" and a["inputs"][0]["shape"] == [1, 28, 28, 1]
        assert a["inputs"][0]["name"] == "input" and a["outputs"][0]["name"] == "logits"
        assert a["extra"]["metadata"]["associated_files"] == ["labels.txt"]
        assert len(a["extra"]["layer_map"]) > 20           # per-layer divergence works on these files
    fp16 = (out / arts["fp16"]["path"]).read_bytes()
    fp32 = (out / arts["fp32"]["path"]).read_bytes()
    assert op_counts(graph_ops(fp16)).get("DEQUANTIZE", 0) >= 20          # float16 weights, float math
    assert "DEQUANTIZE" not in op_counts(graph_ops(fp32))
    assert len(fp16) < 0.6 * len(fp32)
    code, stdout, err = cli("verify", str(out), "--samples", "50")
    assert code == 0, stdout + err
    assert "2/2 pairs pass" in stdout


def test_onnx2tf_route_when_asked_and_the_integer_kinds_always(cli, trained_mnist, tmp_path):
    out = tmp_path / "app"
    code, _, err = cli("export", "--checkpoint", str(trained_mnist), "--formats", "tflite",
                       "--precisions", "fp32", "--tflite-converter", "onnx2tf", "--out", str(out), "-q")
    assert code == 0, err
    conv = _routes(out)["fp32"]["extra"]["converter"]
    assert conv == {"route": "onnx2tf", "reason": "asked for (--tflite-converter onnx2tf)"}
    assert _routes(out)["fp32"]["tool"] == "onnx2tf + tf.lite.TFLiteConverter"


def test_bad_converter_name_is_one_line_error(cli, trained_mnist, tmp_path):
    code, _, err = cli("export", "--checkpoint", str(trained_mnist), "--formats", "tflite",
                       "--tflite-converter", "tflite2onnx", "--out", str(tmp_path / "app"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--tflite-converter" in err and "tflite2onnx" in err
    assert not (tmp_path / "app").exists()


def test_a_model_onnx2tf_cannot_convert_converts_by_litert_torch_with_parity(tmp_path):
    """``shiftnet_a`` at 32x32: onnx2tf's layout inference fails on its reshape (a strict
    xfail of the ONNX route in the zoo sweep); the default route converts it, fp32 within
    the project's bound (or its float64 rule)."""
    torch.manual_seed(0)
    model = trained_like(create_model("shiftnet_a", num_classes=10, in_chans=3), 32)
    pre = Preprocessing([32, 32], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
    export_onnx(model, tmp_path / "model.onnx", (1, 3, 32, 32))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with pytest.raises(ConversionError, match="onnx2tf"):
        export_tflite(tmp_path / "model.onnx", tmp_path / "onnx2tf", ["fp32"], preprocessing=pre,
                      module=model, converter="onnx2tf")
    (art,) = export_tflite(tmp_path / "model.onnx", tmp_path, ["fp32"], preprocessing=pre,
                           module=model, converter="auto")
    assert art.extra["converter"]["route"] == "litert-torch"
    with LiteRTRunner() as r:
        r.load(art, tmp_path)
        out = r.infer({"input": x})["logits"]
    failure = fp32_parity_failure(model, x, out, "shiftnet_a")
    assert failure is None, failure


def test_without_a_pytorch_model_the_onnx_route_takes_over_and_says_why(tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_035", num_classes=10, in_chans=1).eval()
    pre = Preprocessing([16, 16], [0.5], [0.25], "GRAY")
    export_onnx(model, tmp_path / "model.onnx", (1, 1, 16, 16))
    (art,) = export_tflite(tmp_path / "model.onnx", tmp_path, ["fp32"], preprocessing=pre, converter="auto")
    assert art.extra["converter"]["route"] == "onnx2tf"
    assert "no PyTorch model" in art.extra["converter"]["reason"]
    with pytest.raises(InputError, match="--tflite-converter"):
        export_tflite(tmp_path / "model.onnx", tmp_path / "x", ["fp32"], preprocessing=pre, converter="litert-torch")
