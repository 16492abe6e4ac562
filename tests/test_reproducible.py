"""Reproducible files: the same model, options and library versions give byte-identical
ONNX, TFLite and QDQ ONNX, and the QDQ models carry no leftover metadata.

Each export runs in its own process with a different ``PYTHONHASHSEED``: Python salts
``hash()`` of strings per process, and a user's ``file.py:factory`` used to be imported
under a module name made with ``hash()``, which the dynamo exporter wrote into every
node's class-path metadata, so the sha256 of ``model.onnx`` changed on every export.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.onnx import strip_metadata

ROOT = Path(__file__).resolve().parents[1]

NET = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 2, 1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(width=8):
    torch.manual_seed(0)
    return Net(width).eval()
'''


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mdeploy(*args: str, seed: int) -> None:
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "-q", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def twice(tmp_path_factory) -> tuple[Path, Path]:
    """The same model exported (ONNX, TFLite fp32 + int8) and quantized (QDQ for QNN, w8a8
    and w8a16) twice, into two folders, by two processes with different hash seeds."""
    tmp = tmp_path_factory.mktemp("repro")
    (tmp / "net.py").write_text(NET)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.save(tmp / "calib.npy", images)
    for run in (1, 2):
        out = tmp / f"export{run}"
        _mdeploy("export", f"{tmp / 'net.py'}:build", "--input-size", "16", "--formats", "onnx,tflite",
                 "--precisions", "fp32,int8", "--calibration", str(tmp / "calib.npy"), "--out", str(out),
                 seed=run)
        _mdeploy("quantize", str(out), "--model", f"{tmp / 'net.py'}:build", "--target", "snapdragon", "--calib", str(tmp / "calib.npy"),
                 "--samples", "16", "--eval", str(tmp / "calib.npy"), "--eval-samples", "16", "--no-tflite",
                 "--no-sensitivity", "--no-plain-baseline", "--out", str(tmp / f"quant{run}"), seed=run)
    return tmp / "export1", tmp / "export2"


def test_reexport_is_byte_identical(twice):
    first, second = twice
    files = sorted(p.name for p in first.iterdir() if p.suffix in (".onnx", ".tflite"))
    assert "model.onnx" in files and sum(f.endswith(".tflite") for f in files) == 2, files
    for name in files:
        assert _sha(first / name) == _sha(second / name), f"{name} differs between two exports"


def test_requantize_is_byte_identical_and_carries_no_leftover_metadata(twice):
    q1, q2 = (p.with_name(p.name.replace("export", "quant")) for p in twice)
    qdq = sorted(p.name for p in q1.glob("*.onnx"))
    assert len(qdq) == 2, qdq                          # w8a8 and w8a16
    for name in qdq:
        assert _sha(q1 / name) == _sha(q2 / name), f"{name} differs between two quantizations"
        proto = onnx.load(str(q1 / name))
        assert not [p.key for n in proto.graph.node for p in n.metadata_props], name
        assert not any(n.doc_string for n in proto.graph.node) and not proto.doc_string
        assert "onnx.infer" not in {p.key for p in proto.metadata_props}
    sizes = {name: (q1 / name).stat().st_size for name in qdq}
    # same weights (int8), the w8a16 model has only wider activation encodings: sizes close
    assert max(sizes.values()) < 1.15 * min(sizes.values()), sizes


def test_float_onnx_keeps_only_module_scopes(twice):
    proto = onnx.load(str(twice[0] / "model.onnx"))
    keys = {p.key for n in proto.graph.node for p in n.metadata_props}
    assert keys == {"pkg.torch.onnx.name_scopes"}, keys
    assert "mdeploy_user" not in proto.SerializeToString().decode("latin-1")


def test_strip_metadata_keeps_our_own_model_metadata():
    from onnx import helper
    node = helper.make_node("Relu", ["x"], ["y"], doc_string="made at /home/someone/x.py:12")
    helper.set_metadata_props(node, {"pkg.torch.onnx.stack_trace": "...", "pkg.torch.onnx.name_scopes": "['', 'act']"})
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], doc_string="dump")
    model = helper.make_model(graph)
    helper.set_model_props(model, {"onnx.infer": "onnxruntime.quant", "labels": "a,b"})
    strip_metadata(model, keep_node_keys=("pkg.torch.onnx.name_scopes",))
    assert [p.key for p in model.graph.node[0].metadata_props] == ["pkg.torch.onnx.name_scopes"]
    assert not model.graph.node[0].doc_string and not model.graph.doc_string
    assert {p.key: p.value for p in model.metadata_props} == {"labels": "a,b"}
