"""Model sources a new user brings: ``file.py:factory`` with ``--model-arg`` keywords, a
factory that raises (a one-line error naming file, factory and exception, exit 2), and a
``torch.export`` program (``.pt2``) exported, verified and quantized like any model.
Real ONNX Runtime throughout; models are a few layers at 16x16 so each test takes seconds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.artifact import Manifest
from pipeline.commands.train import _kv

FACTORY_SOURCE = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, width, num_classes, bias):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 2, 1, bias=bias)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(width, num_classes=10, bias=True, act="relu"):
    """Needs ``width``: a factory with a required argument."""
    if act != "relu":
        raise ValueError(f"unknown activation {act!r}")
    torch.manual_seed(0)
    return Net(width, num_classes, bias).eval()


def broken():
    raise RuntimeError("weights server unreachable")
'''


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def factory_file(tmp_path) -> Path:
    path = tmp_path / "user_net.py"
    path.write_text(FACTORY_SOURCE)
    return path


@pytest.mark.parametrize("text, value", [
    ("width=8", 8), ("width_mult=0.35", 0.35), ("bias=False", False), ("bias=false", False),
    ("bias=TRUE", True), ("pretrained=None", None), ("act=relu", "relu"), ("act='relu'", "relu"),
    ("kernel=(3, 5)", (3, 5)), ("name=1e", "1e"), ("path=/tmp/x.bin", "/tmp/x.bin"),
])
def test_model_arg_values_are_typed(text, value):
    key, got = _kv(text)
    assert key == text.partition("=")[0] and got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["width", "=3", "not a name=3"])
def test_model_arg_without_a_key_is_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _kv(text)


def test_factory_kwargs_reach_the_factory_and_the_rebuilt_reference(factory_file, tmp_path, cli):
    out = tmp_path / "exp"
    code, _, err = cli("-q", "export", f"{factory_file}:build", "--model-arg", "width=12",
                       "--model-arg", "num_classes=4", "--model-arg", "bias=False", "--input-size", "16",
                       "--out", str(out))
    assert code == 0, err
    m = Manifest.load(out)
    assert m.source["model_kwargs"] == {"width": 12, "num_classes": 4, "bias": False}
    assert m.find("onnx")[0].outputs[0].shape[-1] == 4
    from models.checkpoint import build_model
    model, meta = build_model(f"{factory_file}:build", out / "model.safetensors")   # what verify/quantize do
    assert model.conv.out_channels == 12 and model.conv.bias is None
    code, stdout, err = cli("verify", str(out), "--samples", "4", "--json", "--random-inputs",
                            "--model", f"{factory_file}:build")
    assert code == 0, err
    assert json.loads(stdout)["pairs"][0]["passed"]


@pytest.mark.parametrize("spec, args, expect", [
    ("build", [], ["build()", "TypeError", "missing 1 required positional argument: 'width'", "--model-arg"]),
    ("build", ["--model-arg", "width=8", "--model-arg", "act=gelu"],
     ["build(width=8, act='gelu')", "ValueError: unknown activation 'gelu'"]),
    ("build", ["--model-arg", "widht=8"], ["unexpected keyword argument 'widht'"]),
    ("broken", [], ["broken()", "RuntimeError: weights server unreachable"]),
])
def test_raising_factory_is_one_line_exit_2(factory_file, tmp_path, cli, spec, args, expect):
    out = tmp_path / "exp"
    code, _, err = cli("export", f"{factory_file}:{spec}", *args, "--input-size", "16", "--out", str(out))
    assert code == 2
    line = _one_error_line(err)
    assert str(factory_file) in line, line
    for part in expect:
        assert part in line, line
    assert not out.exists()


def _save_program(tmp_path: Path, batch: int = 1) -> tuple[Path, torch.nn.Module]:
    import importlib.util
    src = tmp_path / "prog_src.py"
    src.write_text(FACTORY_SOURCE)
    spec = importlib.util.spec_from_file_location("prog_src", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build(8, num_classes=5)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    program = torch.export.export(model, (torch.randn(batch, 3, 20, 20),))
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    src.unlink()                              # the program stands alone: no Python source needed
    return path, model


def test_pt2_program_exports_verifies_and_quantizes(tmp_path, cli):
    path, model = _save_program(tmp_path)
    out = tmp_path / "exp"
    code, _, err = cli("-q", "export", str(path), "--out", str(out))
    assert code == 0, err
    m = Manifest.load(out)
    assert m.model == "net" and m.source["model"] == str(path.resolve())
    assert m.preprocessing.input_size == [20, 20], "the size the program was exported with"
    import onnxruntime as ort
    x = np.random.default_rng(0).standard_normal((1, 3, 20, 20)).astype(np.float32)
    sess = ort.InferenceSession(str(out / m.find("onnx")[0].path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - ref).max() <= 1e-5
    # verify runs batches through the reference: a batch-1 program is run one sample at a time
    code, stdout, err = cli("verify", str(out), "--samples", "6", "--json", "--random-inputs")
    assert code == 2 and "--model" in err                       # a .pt2 named by a manifest is never loaded
    code, stdout, err = cli("verify", str(out), "--samples", "6", "--json", "--random-inputs", "--model", str(path))
    assert code == 0, err
    assert json.loads(stdout)["pairs"][0]["passed"]
    images = np.random.default_rng(1).integers(0, 256, (16, 20, 20, 3), dtype=np.uint8)
    np.save(tmp_path / "calib.npy", images)
    code, stdout, err = cli("-q", "quantize", str(out), "--target", "generic", "--calib", str(tmp_path / "calib.npy"),
                            "--samples", "16", "--eval", str(tmp_path / "calib.npy"), "--eval-samples", "16",
                            "--no-tflite", "--no-sensitivity", "--no-plain-baseline", "--json",
                            "--model", str(path), "--out", str(tmp_path / "q"))
    assert code == 0, err
    assert Manifest.load(tmp_path / "q").find("onnx"), "a quantized ONNX of the program"
    assert any("no Conv2d/Linear modules" in n for n in json.loads(stdout)["report"]["notes"]), \
        "PyTorch-side weight rounding cannot touch a graph: said, not silently skipped"


def test_pt2_bad_file_is_one_line_exit_2(tmp_path, cli):
    bad = tmp_path / "junk.pt2"
    bad.write_bytes(b"not a zip")
    code, _, err = cli("export", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2
    line = _one_error_line(err)
    assert "junk.pt2" in line and "torch.export program" in line
