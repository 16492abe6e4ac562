"""`mdeploy export` and `mdeploy verify` end to end: real export, real ONNX Runtime, real
MNIST images; faults edited into the exported file; bad inputs as one line and exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.artifact import Manifest
from tests.parity_helpers import (ILL_CONDITIONED_SOURCE, change_bn_epsilon, corrupt_layer,
                                  mnist_checkpoint, write_external_model)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return mnist_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> Path:
    """One export of the checkpoint (static batch), shared read-only: copy before editing."""
    from pipeline.cli import main
    out = tmp_path_factory.mktemp("exp") / "export"
    assert main(["-q", "export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _json(out: str) -> dict:
    return json.loads(out)


def _one_error_line(err: str) -> str:
    """Bad input: exactly one ``error:`` line on stderr (progress chatter aside), no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_export_writes_reference_onnx_and_manifest(exported, ckpt):
    m = Manifest.load(exported)
    assert sorted(p.name for p in exported.iterdir()) == ["manifest.json", "model.onnx", "model.safetensors"]
    assert [a.key for a in m.artifacts] == ["pt/fp32", "onnx/fp32"]
    pre = m.preprocessing
    assert pre.input_size == [28, 28] and pre.channel_order == "GRAY" and len(pre.mean) == 1
    assert m.labels == [str(i) for i in range(10)] and m.source["data"] == "mnist"
    assert m.source["checkpoint"] == str(ckpt.resolve())
    onnx_art = m.find("onnx")[0]
    assert onnx_art.inputs[0].name == "input" and onnx_art.inputs[0].shape == [1, 1, 28, 28]
    assert onnx_art.outputs[0].name == "logits" and onnx_art.outputs[0].shape == [1, 10]
    assert onnx_art.extra["layer_map"] and m.versions["onnxruntime"]
    assert m.card is not None and "mobilenet_v2" in m.card.name


def test_verify_passes_on_held_out_mnist(exported, cli):
    code, out, err = cli("verify", str(exported), "--samples", "40", "--json")
    assert code == 0, err
    doc = _json(out)
    assert doc["passed"] and doc["inputs"]["source"].startswith("mnist") and doc["inputs"]["samples"] == 40
    (pair,) = doc["pairs"]
    assert pair["reference"] == "pt/fp32" and pair["target"] == "onnx/fp32" and pair["passed"]
    assert pair["max_abs"] <= 1e-5 * (1 + pair["ref_max_abs"]) and pair["top1_agreement"] == 1.0
    assert pair["ref_max_abs"] > 1.0, "realistic logits, not 1e-8 from a random head"
    assert pair["accuracy_reference"] == pair["accuracy_target"]       # untrained: chance, equal
    assert pair["first_divergent"] is None and "onnxruntime" in pair["target_runner"]


def test_verify_human_output_and_runner_options(exported, cli):
    code, out, _ = cli("verify", str(exported), "--samples", "8", "--threads", "1",
                       "--runner-option", "onnxruntime.graph_optimization_level=disable")
    assert code == 0
    assert "onnx/fp32" in out and "pass" in out and "opt=disable" in out and "threads=1" in out


def test_verify_per_layer_gives_the_error_curve_of_a_passing_pair(exported, cli):
    code, out, err = cli("verify", str(exported), "--samples", "8", "--per-layer", "--json")
    assert code == 0, err
    (pair,) = _json(out)["pairs"]
    assert pair["passed"] and pair["first_divergent"] is None       # passing: nothing is "first divergent"
    layers = pair["layers"]
    assert len(layers) > 10 and [x["index"] for x in layers] == list(range(len(layers)))
    assert all(x["max_abs"] <= 1e-4 and x["cosine"] > 0.999999 for x in layers), layers
    code, out, _ = cli("verify", str(exported), "--samples", "8", "--per-layer")
    assert code == 0 and "lowest-SNR layer" in out
    code, out, _ = cli("verify", str(exported), "--samples", "8", "--json")
    assert _json(out)["pairs"][0]["layers"] is None                 # default: only failing pairs


def test_verify_reads_an_image_folder_with_labels(exported, tmp_path, cli):
    """ImageFolder layout (one sub-folder per class): RGB files, resized and turned grey
    by the same preprocessing as training; labels come from the folder names."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("3", "7"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    code, out, err = cli("verify", str(exported), "--inputs", str(tmp_path / "imgs"), "--runners", "onnxruntime",
                         "--json")
    assert code == 0, err
    doc = _json(out)
    assert doc["inputs"]["samples"] == 4 and doc["inputs"]["labels"] and doc["inputs"]["shape"] == [4, 1, 28, 28]
    assert doc["pairs"][0]["accuracy_reference"] is not None
    from pipeline.stages.verify import load_inputs
    inputs = load_inputs(str(tmp_path / "imgs"), Manifest.load(exported), None)
    assert inputs.labels.tolist() == [3, 3, 7, 7], "folder names are the model's class names"
    (tmp_path / "imgs" / "7").rename(tmp_path / "imgs" / "seven")
    assert load_inputs(str(tmp_path / "imgs"), Manifest.load(exported), None).labels is None


@pytest.mark.slow
def test_gross_fault_exits_1_and_names_the_layer(exported, tmp_path, cli):
    folder = _copy(exported, tmp_path)
    lmap = Manifest.load(folder).find("onnx")[0].extra["layer_map"]
    module = "blocks.3.conv_dw.1"           # a depthwise conv's (folded) BatchNorm, mid-network
    assert module in lmap.values()
    tensor = corrupt_layer(folder / "model.onnx", lmap, module)
    code, out, err = cli("verify", str(folder), "--samples", "20", "--json")
    assert code == 1
    pair = _json(out)["pairs"][0]
    assert not pair["passed"]
    assert pair["first_divergent"]["layer"] == module and pair["first_divergent"]["tensor"] == tensor
    assert "changed since export" in " ".join(_json(out)["notes"])
    assert "real divergence" in pair["diagnosis"], "float64 check: not rounding"
    idx = pair["first_divergent"]["index"]
    assert idx > 0 and all(layer["passed"] for layer in pair["layers"][:idx])
    code, out, _ = cli("verify", str(folder), "--samples", "20")
    assert code == 1 and "FAIL" in out and module in out and "first divergent" in out


@pytest.mark.slow
def test_subtle_fault_fails_at_the_tolerance_only(exported, tmp_path, cli):
    """One BatchNorm's epsilon 1e-3 instead of 1e-5: predictions unchanged, caught by fp32 bound."""
    from models.checkpoint import build_model
    folder = _copy(exported, tmp_path)
    model, _ = build_model(None, folder / "model.safetensors")
    lmap = Manifest.load(folder).find("onnx")[0].extra["layer_map"]
    module = "blocks.7.conv_pw.1"           # an expansion BatchNorm, mid-network
    bn = model.get_submodule(module)
    change_bn_epsilon(folder / "model.onnx", lmap, module, bn)
    code, out, _ = cli("verify", str(folder), "--samples", "40", "--json")
    assert code == 1
    pair = _json(out)["pairs"][0]
    assert pair["top1_agreement"] == 1.0 and pair["cosine"] > 0.9999
    assert pair["failures"] and all(f.startswith("max_abs") for f in pair["failures"])
    assert pair["first_divergent"]["layer"] == module
    assert "real divergence" in pair["diagnosis"]
    code, _, _ = cli("verify", str(folder), "--samples", "40", "--tolerance", "fp32:max_abs=0.05,rtol=0")
    assert code == 0, "within a looser bound: the fault is only visible at the fp32 tolerance"


def test_external_py_model_exports_and_verifies(tmp_path, cli):
    spec = write_external_model(tmp_path / "user")
    out = tmp_path / "ext"
    code, _, err = cli("-q", "export", spec, "--input-size", "32", "--dynamic-batch", "--out", str(out))
    assert code == 0, err
    m = Manifest.load(out)
    assert m.model == "tiny_mnv3:build" and m.source["model"] == spec
    assert m.find("onnx")[0].inputs[0].shape == ["batch", 3, 32, 32]
    assert {"blocks.0.se", "blocks.0.se.gate", "stem.2", "classifier"} <= set(m.find("onnx")[0].extra["layer_map"].values())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)       # raw images: resized by verify
    np.save(tmp_path / "imgs.npy", images)
    code, stdout, err = cli("verify", str(out), "--inputs", str(tmp_path / "imgs.npy"), "--json",
                            "--model", spec)         # the user names the code; the folder never does
    assert code == 0, err
    doc = _json(stdout)
    assert doc["pairs"][0]["passed"] and doc["inputs"]["samples"] == 6 and doc["inputs"]["shape"] == [6, 3, 32, 32]


def test_ill_conditioned_model_fails_fp32_with_a_rounding_diagnosis(tmp_path, cli):
    """The fp32 bound is not relaxed for a model that amplifies rounding; the float64 run
    says that the runtime is not at fault (here ORT is closer to exact than PyTorch)."""
    (tmp_path / "ill.py").write_text(ILL_CONDITIONED_SOURCE)
    out = tmp_path / "ill"
    assert cli("-q", "export", f"{tmp_path / 'ill.py'}:build", "--input-size", "8", "--out", str(out))[0] == 0
    code, stdout, _ = cli("verify", str(out), "--samples", "8", "--random-inputs", "--json",
                          "--model", f"{tmp_path / 'ill.py'}:build")
    assert code == 1
    pair = _json(stdout)["pairs"][0]
    check = pair["fp64_check"]
    assert check["target_vs_fp64"] < check["reference_vs_fp64"]
    assert pair["diagnosis"].startswith("fp32 rounding, not a fault")
    assert pair["first_divergent"]["layer"] == "bn"


def test_no_overwrite_without_force(exported, ckpt, tmp_path, cli):
    folder = _copy(exported, tmp_path)
    before = (folder / "manifest.json").read_bytes()
    code, out, err = cli("export", "--checkpoint", str(ckpt), "--out", str(folder))
    assert code == 2 and "--force" in _one_error_line(err)
    assert (folder / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("case", ["missing_checkpoint", "missing_keys", "labels_count", "unknown_format",
                                  "missing_exporter"])
def test_bad_export_inputs_are_one_line_exit_2_nothing_written(case, ckpt, tmp_path, cli, monkeypatch):
    out = tmp_path / "out"
    args = ["export", "--checkpoint", str(ckpt), "--out", str(out)]
    if case == "missing_checkpoint":
        args[2] = str(tmp_path / "nope.safetensors")
    elif case == "missing_keys":
        from safetensors.numpy import load_file, save_file
        from safetensors import safe_open
        with safe_open(str(ckpt), framework="np") as f:
            meta = f.metadata()
        state = load_file(str(ckpt))
        state.pop(sorted(state)[0])
        bad = tmp_path / "bad.safetensors"
        save_file(state, str(bad), metadata=meta)
        args[2] = str(bad)
    elif case == "labels_count":
        (tmp_path / "labels.txt").write_text("cat\ndog\n")
        args += ["--labels", str(tmp_path / "labels.txt")]
    elif case == "unknown_format":
        args += ["--formats", "onnx,caffe"]
    elif case == "missing_exporter":
        import pipeline.stages.export as stage
        monkeypatch.setattr(stage, "PLUGIN_MODULES", (*stage.PLUGIN_MODULES, "exporters.not_written_yet"))
        args += ["--formats", "onnx,coreml"]
    code, stdout, err = cli(*args)
    assert code == 2
    _one_error_line(err)
    assert not out.exists(), "nothing written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "no staging left behind"


def test_bad_verify_inputs_are_one_line_exit_2(exported, tmp_path, cli):
    folder = _copy(exported, tmp_path)
    cases = {}
    cases["missing folder"] = [str(tmp_path / "nowhere")]
    np.save(tmp_path / "wrong.npy", np.zeros((2, 1, 32, 32), np.float32))
    cases["wrong input shape"] = [str(folder), "--inputs", str(tmp_path / "wrong.npy")]
    np.save(tmp_path / "chans.npy", np.zeros((2, 3, 28, 28), np.float32))
    cases["wrong channels"] = [str(folder), "--inputs", str(tmp_path / "chans.npy")]
    cases["missing inputs file"] = [str(folder), "--inputs", str(tmp_path / "none.npz")]
    cases["bad tolerance key"] = [str(folder), "--tolerance", "atoll=1"]
    for name, args in cases.items():
        code, out, err = cli("verify", *args)
        assert code == 2, name
        _one_error_line(err)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    code, out, err = cli("verify", str(folder), "--samples", "4")
    assert code == 2 and "model.onnx" in _one_error_line(err)


def test_onnx_whose_input_shape_differs_from_the_inputs(exported, tmp_path, cli):
    """The manifest says 28x28, the file was replaced by a 32x32 export: caught before running."""
    from pipeline.cli import main
    other = tmp_path / "other"
    assert main(["-q", "export", "mobilenet_v2", "--model-arg", "width_mult=0.35", "--in-chans", "1",
                 "--num-classes", "10", "--input-size", "32", "--out", str(other)]) == 0
    folder = _copy(exported, tmp_path)
    shutil.copy(other / "model.onnx", folder / "model.onnx")
    code, out, err = cli("verify", str(folder), "--samples", "4")
    line = _one_error_line(err)
    assert code == 2 and "model.onnx" in line and "28" in line and "32" in line


@pytest.mark.slow
def test_console_script_subprocess(ckpt, tmp_path):
    """The installed `mdeploy` entry point, as a user runs it."""
    exe = Path(sys.executable).parent / "mdeploy"
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "sub"
    r = subprocess.run([str(exe), "export", "--checkpoint", str(ckpt), "--out", str(out), "--simplify"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "onnx/fp32" in r.stdout and "manifest.json" in r.stdout
    r = subprocess.run([str(exe), "verify", str(out), "--samples", "10", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
