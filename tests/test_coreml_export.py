"""Core ML export: image input with folded normalisation, classifier, metadata, parity,
layer map, and a weight edited inside a saved package being seen and located.

A tiny CNN (BatchNorm with non-trivial statistics, a depthwise block, Hardswish, a
linear head) is converted once per configuration; one slow test takes the real
MobileNetV2 (width 0.35, 32x32) through the comparator. On Linux the numbers come from
the NumPy MIL interpreter (the runner's label says so); the macOS tests run the real
``MLModel.predict`` and are skipped elsewhere with the reason shown (``-ra``).

fp32 tolerance: the comparator's 1e-5 absolute on logits (``device_tests/compare.py``:
both sides compute in float32, so only summation order differs); fp16: its 40 dB SNR.
"""
from __future__ import annotations

import json
import platform
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

from device_tests.compare import compare, error_metrics, run_all, tolerance_for
from device_tests.divergence import find_first_divergent
from device_tests.mil_interpreter import MILInterpreter
from device_tests.mil_program import load_program, load_spec
from device_tests.runners.coreml import CoreMLRunner
from device_tests.runners.torch import TorchRunner
from exporters.artifact import Artifact, ModelCard, Preprocessing, TensorSpec, sha256_of
from exporters.coreml import export_coreml
from models.datasets import to_model_input
from models.errors import InputError

ON_MAC = platform.system() == "Darwin"
NOT_MAC = f"Core ML predict needs macOS; this is {platform.system()} (the NumPy MIL interpreter runs instead)"
FP32_ATOL = tolerance_for("fp32").max_abs
LABELS = ["zero", "one", "two", "three", "four"]
SIZE = 16
IMAGENET = Preprocessing([SIZE, SIZE], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "RGB")


class TinyNet(nn.Module):
    def __init__(self, in_chans: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.pw = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.dw(x)
        return self.head(self.pw(x).mean((2, 3)))


def tiny(in_chans: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyNet(in_chans)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def pixels(n: int, channels: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC images, in the model's channel order."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, channels), dtype=np.uint8)


def torch_logits(model: nn.Module, images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    x = to_model_input(images, SIZE, pre.mean, pre.std, pre.channels)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def torch_runner(model: nn.Module, channels: int = 3) -> TorchRunner:
    art = Artifact("model.pt", "pt", "fp32", [TensorSpec("input", [1, channels, SIZE, SIZE])],
                   [TensorSpec("logits", [1, 5], "float32", "NC")])
    return TorchRunner.from_module(model, art)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """fp32 + fp16 image classifiers of the tiny net (ImageNet normalisation: per-channel std)."""
    out = tmp_path_factory.mktemp("coreml_classifier")
    model = tiny()
    card = ModelCard("tinynet", "A tiny test classifier", "2.1", "mdeploy tests", "Apache-2.0")
    arts = export_coreml(model, out, ["fp32", "fp16"], preprocessing=IMAGENET, labels=LABELS, card=card)
    return model, out, {a.precision: a for a in arts}


@pytest.fixture(scope="module")
def tensor_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml_tensor")
    model = tiny(seed=1)
    art, = export_coreml(model, out, ["fp32"], preprocessing=IMAGENET, input_kind="tensor",
                         card=ModelCard("tinynet"))
    return model, out, art


# -- the app-facing package --------------------------------------------------------------

@pytest.mark.parametrize("order, mean, std", [
    ("RGB", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),   # per-channel std: a first mul op
    ("BGR", [0.406, 0.456, 0.485], [0.25, 0.25, 0.25]),       # equal std: all in the ImageType
    ("GRAY", [0.1307], [0.3081]),                             # MNIST
])
def test_image_input_gives_pytorch_logits(tmp_path, order, mean, std):
    """The same 8-bit image through PyTorch's preprocessing and through the ImageType."""
    pre = Preprocessing([SIZE, SIZE], mean, std, order)
    model = tiny(pre.channels)
    art, = export_coreml(model, tmp_path, ["fp32"], preprocessing=pre)
    spec = load_spec(tmp_path / art.path)
    image_type = spec.description.input[0].type.imageType
    assert (image_type.width, image_type.height) == (SIZE, SIZE)
    assert spec.description.input[0].type.imageType.ColorSpace.Name(image_type.colorSpace) == \
        {"RGB": "RGB", "BGR": "BGR", "GRAY": "GRAYSCALE"}[order]
    fold = art.extra["image_input"]
    assert (fold["channel_scale"] is None) == (len(set(std)) == 1)

    images = pixels(3, pre.channels)
    ref = torch_logits(model, images, pre)
    interp = MILInterpreter(load_program(tmp_path / art.path))
    got = np.concatenate([interp.run({"image": img.transpose(2, 0, 1)[None].astype(np.float32)})["logits"]
                          for img in images])
    err = float(np.abs(got - ref).max())
    assert err <= FP32_ATOL, f"{order}: max abs {err:.3g}"


def test_classifier_spec_carries_labels(classifier):
    model, out, arts = classifier
    for art in arts.values():
        spec = load_spec(out / art.path)
        d = spec.description
        assert (d.predictedFeatureName, d.predictedProbabilitiesName) == ("classLabel", "classLabel_probs")
        assert [o.name for o in d.output] == ["classLabel", "classLabel_probs", "logits"]
        prog = load_program(out / art.path, spec=spec)
        classify = next(op for op in prog.ops if op.type == "classify")
        assert [str(c) for c in classify.inputs["classes"][0].value] == LABELS
        assert json.loads(d.metadata.userDefined["mdeploy.labels"]) == LABELS

    interp = MILInterpreter(load_program(out / arts["fp32"].path))
    res = interp.run({"image": pixels(1, 3)[0].transpose(2, 0, 1)[None].astype(np.float32)})
    logits = res["logits"][0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert res["classLabel"] == LABELS[int(logits.argmax())]
    assert np.allclose([res["classLabel_probs"][k] for k in LABELS], probs, atol=1e-6)


def test_metadata_for_apps(classifier):
    _, out, arts = classifier
    d = load_spec(out / arts["fp16"].path).description
    assert d.metadata.author == "mdeploy tests"
    assert d.metadata.license == "Apache-2.0"
    assert d.metadata.versionString == "2.1"
    assert d.metadata.shortDescription == "A tiny test classifier"
    assert "0.229" in d.input[0].shortDescription and "RGB" in d.input[0].shortDescription
    assert {o.name: o.shortDescription for o in d.output}["logits"].startswith("raw class scores")
    user = d.metadata.userDefined
    assert user["com.apple.coreml.model.preview.type"] == "imageClassifier"
    assert json.loads(user["mdeploy.preprocessing"])["std"] == [0.229, 0.224, 0.225]
    art = arts["fp16"]
    assert art.format == "mlpackage" and art.variant == "image" and art.key == "mlpackage/fp16-image"
    assert art.inputs[0].name == "image" and art.inputs[0].dtype == "uint8" and art.inputs[0].layout == "NHWC"
    assert art.outputs[0].name == "logits" and art.extra["compute_precision"] == "fp16"
    assert art.extra["minimum_deployment_target"] == "iOS17" and art.sha256 == sha256_of(out / art.path)


def test_runner_parity_through_the_image_input(classifier):
    """Normalised inputs in, the runner inverts them to pixels: fp32 and fp16 vs PyTorch."""
    model, out, arts = classifier
    images = pixels(6, 3, seed=2)
    x = to_model_input(images, SIZE, IMAGENET.mean, IMAGENET.std)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for precision, art in arts.items():
        with CoreMLRunner() as runner:
            runner.load(art, out)
            assert ("macOS predict" if ON_MAC else "numpy MIL interpreter") in runner.label
            got = runner.infer({"image": x})["logits"]
        m = error_metrics(ref, got)
        tol = tolerance_for(precision)
        assert not tol.check({**m, "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}), \
            f"{precision}: {m}"
        if precision == "fp16":
            assert m["max_abs"] > 0, "an fp16 program must show fp16 rounding"


def test_layer_map_matches_pytorch_modules(tensor_fp32):
    model, out, art = tensor_fp32
    names = dict(model.named_modules())
    lmap = art.extra["layer_map"]
    assert {"stem.1", "stem.2", "dw.1", "dw.2", "pw"} <= set(lmap.values()), lmap
    assert all(k.split("#")[0] in names for k in lmap.values())
    with CoreMLRunner() as runner:
        runner.load(art, out)
        x = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
        div = find_first_divergent(torch_runner(model), runner, {"input": x}, tolerance_for("fp32"))
    assert div.first is None, div.summary()
    assert len(div.layers) >= 5 and all(layer.max_rel <= 1e-5 for layer in div.layers)


def test_edited_weight_changes_output_and_is_located(tensor_fp32, tmp_path):
    """Change one weight inside weight.bin of a saved package: the interpreter's output
    moves, and the divergence search names the layer whose weight was edited."""
    model, out, art = tensor_fp32
    shutil.copytree(out / art.path, tmp_path / art.path)
    prog = load_program(tmp_path / art.path)
    lmap = art.extra["layer_map"]
    # the depthwise conv (BatchNorm folded in, so it carries dw.1's output)
    conv = next(op for op in prog.ops if op.type == "conv" and lmap.get(op.outputs[0].name) == "dw.1")
    ref = prog.blobs[conv.inputs["weight"][0]]
    assert ref.dtype == "fp32"
    with open(ref.file, "r+b") as fh:
        fh.seek(ref.data_offset + 4 * 5)                      # channel 0, kernel position (1, 2)
        old, = struct.unpack("<f", fh.read(4))
        fh.seek(ref.data_offset + 4 * 5)
        fh.write(struct.pack("<f", old * -4.0 + 0.5))
    edited = Artifact(art.path, art.format, art.precision, art.inputs, art.outputs, extra=art.extra)
    assert sha256_of(tmp_path / art.path) != art.sha256

    x = np.random.default_rng(4).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    with CoreMLRunner(backend="interpreter") as original, CoreMLRunner(backend="interpreter") as changed:
        original.load(art, out)
        changed.load(edited, tmp_path)
        before, after = original.infer({"input": x})["logits"], changed.infer({"input": x})["logits"]
        assert np.abs(after - before).max() > 1e-3
        div = find_first_divergent(torch_runner(model), changed, {"input": x}, tolerance_for("fp32"))
    assert div.first is not None
    assert (div.first.module, div.first.tensor) == ("dw.1", conv.outputs[0].name)
    assert all(layer.passed for layer in div.layers[:div.first.index])      # the stem still matches


@pytest.mark.slow
def test_mobilenet_v2_through_the_comparator(tmp_path):
    """The real zoo model on real (bundled) digits, through run_all/compare like verify."""
    from models import create_model
    from models.datasets import load_dataset
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_035", num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    pre = Preprocessing([32, 32], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
    # fp32 only here (fp16 of every zoo model: tests/test_zoo_coreml.py); one conversion is ~10 s
    arts = export_coreml(model, tmp_path, ["fp32"], preprocessing=pre,
                         labels=[str(i) for i in range(10)], card=ModelCard("mobilenet_v2_035"))
    data = load_dataset("digits", "test").subset(16)
    x = to_model_input(data.images, 32, pre.mean, pre.std, 3)
    ref_art = Artifact("m.pt", "pt", "fp32", [TensorSpec("input", [1, 3, 32, 32])],
                       [TensorSpec("logits", [1, 10], "float32", "NC")])
    runners = {"torch": TorchRunner.from_module(model, ref_art)}
    for a in arts:
        r = CoreMLRunner()
        r.load(a, tmp_path)
        runners[a.key] = r
    results = run_all(runners, {"input": x})
    for a in arts:
        report = compare(results, "torch", a.key, tolerance_for(a.precision), labels=data.labels,
                         precision=a.precision)
        assert report.passed, (a.key, report.failures, report.max_abs)
        assert report.samples == 16


# -- errors and files -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"precisions": ["int8"]}, "Core ML precisions"),
    ({"labels": ["a", "b"]}, "5 labels"),
    ({"labels": ["a", "a", "b", "c", "d"]}, "distinct labels"),
    ({"minimum_deployment_target": "iOS14"}, "iOS 15"),
    ({"input_kind": "pixels"}, "input_kind"),
])
def test_bad_arguments_are_input_errors(tmp_path, kwargs, match):
    args = {"precisions": ["fp32"], "preprocessing": IMAGENET, **kwargs}
    with pytest.raises(InputError, match=match):
        export_coreml(tiny(), tmp_path, args.pop("precisions"), **args)
    assert not any(tmp_path.iterdir()), "a failed export leaves nothing behind"


def test_preprocessing_must_fit_the_model(tmp_path):
    with pytest.raises(InputError, match=r"a model taking \(1, 1, 16, 16\)"):
        export_coreml(tiny(3), tmp_path, ["fp32"], preprocessing=Preprocessing([SIZE, SIZE], [0.5], [0.5], "GRAY"))
    with pytest.raises(InputError, match="3 mean/std values"):
        export_coreml(tiny(3), tmp_path, ["fp32"], preprocessing=Preprocessing([SIZE, SIZE], [0.5], [0.5], "RGB"))
    assert not any(tmp_path.iterdir())


def test_packages_are_written_whole(tensor_fp32, tmp_path):
    model = tensor_fp32[0]
    for _ in range(2):          # the second export replaces the first in place
        art, = export_coreml(model, tmp_path, ["fp32"], preprocessing=IMAGENET, input_kind="tensor",
                             card=ModelCard("tiny net/1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_net_1_fp32_tensor.mlpackage"]
    assert art.path == "tiny_net_1_fp32_tensor.mlpackage"
    assert (tmp_path / art.path / "Manifest.json").exists()


def test_runner_backends(classifier):
    _, out, arts = classifier
    if not ON_MAC:
        with pytest.raises(InputError, match="macOS"):
            CoreMLRunner(backend="predict").load(arts["fp32"], out)
    with pytest.raises(InputError, match="compute units"):
        CoreMLRunner(compute_units="GPU_ONLY")
    with CoreMLRunner(backend="interpreter") as r:
        r.load(arts["fp32"], out)
        names = r.intermediate_names()
        assert "classLabel" not in names and "logits" in names
        assert r.label.startswith("coreml (numpy MIL interpreter")


# -- macOS: the real Core ML --------------------------------------------------------------

@pytest.mark.skipif(not ON_MAC, reason=NOT_MAC)
@pytest.mark.parametrize("units", ["CPU_ONLY", "ALL"])
def test_macos_predict_matches_pytorch_and_interpreter(classifier, units):
    model, out, arts = classifier
    images = pixels(4, 3, seed=5)
    x = to_model_input(images, SIZE, IMAGENET.mean, IMAGENET.std)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for precision, art in arts.items():
        with CoreMLRunner(backend="predict", compute_units=units) as device, \
                CoreMLRunner(backend="interpreter") as interp:
            device.load(art, out)
            interp.load(art, out)
            assert "macOS predict" in device.label
            got, mine = device.infer({"image": x})["logits"], interp.infer({"image": x})["logits"]
        # On the CPU the program's precision holds; the GPU and Neural Engine compute in fp16.
        row = tolerance_for(precision if units == "CPU_ONLY" else "fp16")
        top1 = float((got.argmax(1) == ref.argmax(1)).mean())
        assert not row.check({**error_metrics(ref, got), "top1_agreement": top1}), (precision, units)
        if units == "CPU_ONLY":
            assert not row.check({**error_metrics(mine, got), "top1_agreement": 1.0}), "interpreter vs device"
