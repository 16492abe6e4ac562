"""`mdeploy export` app options (issues #5/#6): Core ML input kind and deployment target,
TFLite input layout, and the model card, through the real converters.

One tiny 3-channel CNN (a ``file.py:build`` factory, trained-like statistics so logits
are a few units wide: a layout mix-up cannot hide in 1e-8 logits) in an mdeploy
checkpoint; one Core ML export (both inputs, iOS 16) and one TFLite export (NCHW input),
both with every card flag, shared by the tests; bad values as one line, exit 2, and no
output folder; the same options from a ``mdeploy run`` config section.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from exporters.artifact import Manifest
from models.errors import InputError
from tests.parity_helpers import make_realistic

SIZE, CLASSES = 16, 4
LABELS = ["cat", "dog", "bird", "fish"]
CARD = {"name": "Pet Classifier", "description": "Tells four pets apart (test model)",
        "version": "2.1.0", "author": "Jane Doe <jane@example.com>", "license": "Apache-2.0"}
CARD_FLAGS = [arg for key, value in CARD.items() for arg in (f"--{key}", value)]

MODEL_SOURCE = '''
import torch.nn as nn


class Pets(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.Hardswish())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.dw(x)
        return self.fc(self.pw(x).mean((2, 3)))


def build():
    return Pets()
'''


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An mdeploy checkpoint of the factory model: RGB 16x16, ImageNet normalisation, labels,
    no data set (verify feeds random pixels, which the BN statistics were measured on)."""
    from exporters.fileio import atomic_write_bytes
    from models.checkpoint import checkpoint_bytes, load_factory
    folder = tmp_path_factory.mktemp("pets")
    (folder / "pets.py").write_text(MODEL_SOURCE)
    spec = f"{folder / 'pets.py'}:build"
    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pixels = torch.rand(64, 3, SIZE, SIZE)
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model = make_realistic(load_factory(spec), x)
    meta = {"model": spec, "num_classes": CLASSES, "in_chans": 3, "input_size": SIZE, "mean": mean,
            "std": std, "channel_order": "RGB", "labels": LABELS}
    path = folder / "model.safetensors"
    atomic_write_bytes(path, checkpoint_bytes(model, meta))
    return path


def _factory(ckpt: Path) -> str:
    """The factory of the checkpoint, named by the user (the checkpoint's own record of it
    is never imported)."""
    return f"{ckpt.parent / 'pets.py'}:build"


def _export(ckpt: Path, out: Path, *args: str) -> Path:
    from pipeline.cli import main
    assert main(["-q", "export", _factory(ckpt), "--checkpoint", str(ckpt), "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def coreml_both(ckpt, tmp_path_factory) -> Path:
    return _export(ckpt, tmp_path_factory.mktemp("cm") / "export", "--formats", "coreml", "--precisions",
                   "fp32", "--coreml-input", "both", "--coreml-target", "iOS16", *CARD_FLAGS)


@pytest.fixture(scope="module")
def tflite_nchw(ckpt, tmp_path_factory) -> Path:
    return _export(ckpt, tmp_path_factory.mktemp("tfl") / "export", "--formats", "tflite", "--precisions",
                   "fp32", "--tflite-layout", "nchw", *CARD_FLAGS)


def _spec(folder: Path, art):
    import coremltools as ct
    return ct.utils.load_spec(str(art.resolve(folder)))


def test_coreml_both_inputs_for_ios16(coreml_both, ckpt, cli):
    m = Manifest.load(coreml_both)
    arts = {a.variant: a for a in m.find("mlpackage")}
    assert sorted(arts) == ["image", "tensor"] and [a.precision for a in arts.values()] == ["fp32", "fp32"]
    assert sorted(p.name for p in coreml_both.glob("*.mlpackage")) == [
        "Pet_Classifier_fp32.mlpackage", "Pet_Classifier_fp32_tensor.mlpackage"]
    assert m.source["coreml_input"] == "both" and m.source["coreml_target"] == "iOS16"
    for kind, art in arts.items():
        spec = _spec(coreml_both, art)
        # iOS16 = Core ML specification 7, ML Program opset CoreML6 (the default iOS17 gives 8 / CoreML7)
        assert spec.specificationVersion == 7, kind
        assert spec.mlProgram.functions["main"].opset == "CoreML6", kind
        assert art.extra["minimum_deployment_target"] == "iOS16" and art.extra["input_kind"] == kind
        (inp,) = spec.description.input
        if kind == "image":
            assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
            assert (inp.type.imageType.width, inp.type.imageType.height) == (SIZE, SIZE)
            assert art.inputs[0].dtype == "uint8" and art.inputs[0].layout == "NHWC"
        else:
            assert inp.name == "input" and inp.type.WhichOneof("Type") == "multiArrayType"
            assert list(inp.type.multiArrayType.shape) == [1, 3, SIZE, SIZE]
            assert art.inputs[0].dtype == "float32" and art.inputs[0].layout == "NCHW"
            assert art.inputs[0].shape == [1, 3, SIZE, SIZE]
    # both packages compute what PyTorch computes (Linux: the NumPy MIL interpreter)
    code, out, err = cli("verify", str(coreml_both), "--samples", "4", "--random-inputs", "--json",
                         "--model", _factory(ckpt))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["passed"] and sorted(p["target"] for p in doc["pairs"]) == [
        "mlpackage/fp32-image", "mlpackage/fp32-tensor"]
    assert all(p["ref_max_abs"] > 1.0 for p in doc["pairs"]), "realistic logits"


def test_tflite_nchw_input_recorded_and_verified(tflite_nchw, ckpt, cli):
    from ai_edge_litert.interpreter import Interpreter
    m = Manifest.load(tflite_nchw)
    (art,) = m.find("tflite")
    assert art.inputs[0].layout == "NCHW" and art.inputs[0].shape == [1, 3, SIZE, SIZE]
    assert art.outputs[0].shape == [1, CLASSES] and m.source["tflite_layout"] == "NCHW"
    it = Interpreter(model_path=str(art.resolve(tflite_nchw)))
    assert list(it.get_input_details()[0]["shape"]) == [1, 3, SIZE, SIZE]      # the file itself, not just the record
    code, out, err = cli("verify", str(tflite_nchw), "--samples", "8", "--random-inputs", "--json",
                         "--model", _factory(ckpt))
    assert code == 0, err
    (pair,) = json.loads(out)["pairs"]
    assert pair["target"] == "tflite/fp32" and pair["passed"] and pair["top1_agreement"] == 1.0
    assert pair["ref_max_abs"] > 1.0 and pair["max_abs"] <= 1e-5 * (1 + pair["ref_max_abs"])


def test_card_flags_in_tflite_and_coreml_metadata(tflite_nchw, coreml_both):
    from exporters.tflite_metadata import read_metadata
    (art,) = Manifest.load(tflite_nchw).find("tflite")
    md = read_metadata(art.resolve(tflite_nchw))
    assert (md.name, md.description, md.version, md.author, md.license) == tuple(CARD.values())
    assert md.labels == LABELS                                   # the rest of the metadata still there
    for folder in (tflite_nchw, coreml_both):
        assert Manifest.load(folder).card.__dict__ == CARD
    for art in Manifest.load(coreml_both).find("mlpackage"):
        meta = _spec(coreml_both, art).description.metadata
        assert (meta.author, meta.license, meta.versionString, meta.shortDescription) == (
            CARD["author"], CARD["license"], CARD["version"], CARD["description"])
        assert meta.userDefined["mdeploy.model"] == CARD["name"]


@pytest.mark.parametrize("args, flag", [
    (["--formats", "coreml", "--coreml-target", "iOS9"], "--coreml-target"),
    (["--formats", "coreml", "--coreml-target", "iOS14"], "--coreml-target"),    # no ML Programs before 15
    (["--formats", "coreml", "--coreml-input", "video"], "--coreml-input"),
    (["--formats", "tflite", "--tflite-layout", "xyz"], "--tflite-layout"),
    (["--formats", "onnx", "--name", " "], "--name"),
])
def test_bad_values_one_line_exit_2_nothing_written(ckpt, cli, tmp_path, args, flag):
    out = tmp_path / "export"
    code, _, err = cli("export", _factory(ckpt), "--checkpoint", str(ckpt), "--out", str(out), *args)
    line = _one_error_line(err)
    assert code == 2 and line.startswith(f"error: {flag}: expected"), line
    assert repr(args[-1]) in line or "empty" in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_defaults_and_config_section(ckpt, tmp_path):
    """Without the flags the card is the one export always wrote; a ``mdeploy run`` config
    sets the same options (checked on load), and options for formats not exported warn."""
    from pipeline.config import ExportSection, load_config
    from pipeline.stages.export import ExportOptions, export_model
    plain = export_model(_factory(ckpt), tmp_path / "plain", checkpoint=ckpt, options=ExportOptions())
    card = plain.manifest.card
    assert card.name == "pets:build" and card.description.startswith("pets:build image classifier (4 classes")
    assert (card.version, card.author, card.license) == ("1.0", "", "")
    assert "tflite_layout" not in plain.manifest.source and not plain.warnings

    assert ExportSection().app_options() == {"coreml_input": "image", "coreml_target": None,
                                             "tflite_layout": "NHWC", "tflite_converter": "auto",
                                             "executorch_backends": ("xnnpack",), "executorch_taps": True,
                                             "card": {}}
    good = tmp_path / "run.toml"
    good.write_text('[export]\ncoreml_input = "both"\ncoreml_target = "iOS18"\ntflite_layout = "nchw"\n'
                    'tflite_converter = "onnx2tf"\n[export.card]\nauthor = "Jane Doe"\nversion = "3"\n')
    section = load_config(good).export
    assert section.app_options() == {"coreml_input": "both", "coreml_target": "iOS18", "tflite_layout": "nchw",
                                     "tflite_converter": "onnx2tf", "executorch_backends": ("xnnpack",),
                                     "executorch_taps": True,
                                     "card": {"author": "Jane Doe", "version": "3"}}
    res = export_model(_factory(ckpt), tmp_path / "cfg", checkpoint=ckpt,
                       options=ExportOptions(formats=("onnx",), **section.app_options()))
    assert res.manifest.card.author == "Jane Doe" and res.manifest.card.version == "3"
    assert res.manifest.card.name == "pets:build"                       # unset fields keep their defaults
    assert sorted(w.split()[0] for w in res.warnings) == ["--coreml-input", "--coreml-target",
                                                          "--tflite-converter", "--tflite-layout"]
    for bad in ('tflite_layout = "xyz"', 'tflite_converter = "tf2onnx"', 'coreml_input = "video"',
                '[export.card]\nowner = "x"'):
        path = tmp_path / "bad.toml"
        path.write_text(f"[export]\n{bad}\n")
        with pytest.raises(InputError) as exc:
            load_config(path)
        assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)
