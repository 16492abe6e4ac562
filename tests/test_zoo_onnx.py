"""Every zoo model through ``export_onnx`` and ONNX Runtime: fp32 parity and the layer map.

Marked ``zoo`` (``make test-zoo``): minutes of exporting. Each model is built at its
registered small input size, re-parameterized into its deploy form where it has one
(as ``mdeploy export`` does), exported with dynamic batch, and run at batch 3.

Weights: random init leaves heads and residual gammas at zero (logits of 1e-8, where
any two runtimes "agree"), so every all-zero tensor gets small random values, BatchNorm
running statistics are drawn in the range trained networks show (mean within +-0.2,
variance 0.5..2) and the classifier is scaled to logits of a few units. This tests the
*conversion* (every op mapped, every layout and padding right); how a given trained
model's conditioning amplifies fp32 rounding is what ``verify``'s float64 check reports.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from device_tests.compare import compare, run_all, tolerance_for
from device_tests.divergence import find_first_divergent
from device_tests.runners.onnxruntime import OnnxRuntimeRunner
from device_tests.runners.torch import TorchRunner
from exporters.artifact import Artifact
from exporters.onnx import export_onnx
from models import create_model, list_models, model_entry
from models.reparam import is_reparameterizable, reparameterize_model

pytestmark = pytest.mark.zoo


def _trained_like(model: nn.Module, size: int, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.copy_(0.4 * torch.rand(m.running_mean.shape, generator=gen) - 0.2)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))
        model.eval()
        # The classifier: the last Linear, or the last conv of an all-conv head (SqueezeNet;
        # ReLU and average pooling after it are positively homogeneous, so scaling carries).
        heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        std = float(model(torch.randn(4, 3, size, size, generator=gen)).std())
        if heads and std > 0:
            heads[-1].weight.mul_(3.0 / std)
            if heads[-1].bias is not None:
                heads[-1].bias.mul_(3.0 / std)
    return model


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_exports_and_matches_on_onnxruntime(name, tmp_path, record_property):
    size = model_entry(name).small_input_size
    torch.manual_seed(0)
    model = _trained_like(create_model(name, num_classes=10), size)
    if is_reparameterizable(model):       # what `mdeploy export` ships: the deploy form
        model = reparameterize_model(model)
    art = export_onnx(model, tmp_path / "model.onnx", (1, 3, size, size), dynamic_batch=True)
    ref = TorchRunner.from_module(model, Artifact("ref", "pt", "fp32", art.inputs, art.outputs))
    target = OnnxRuntimeRunner()
    target.load(art, tmp_path)
    x = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    with target:
        res = run_all({"pt": ref, "onnx": target}, x, batch_size=3)
        tol = tolerance_for("fp32")
        pair = compare(res, "pt", "onnx", tol)
        record_property("max_abs", pair.max_abs)
        record_property("ref_max_abs", pair.ref_max_abs)
        assert pair.ref_max_abs > 0.5, "non-trivial logits"
        assert pair.passed, f"{name}: {pair.failures}"
        assert pair.top1_agreement == 1.0
        div = find_first_divergent(ref, target, {"input": x[:1]}, tol)
    assert len(div.layers) >= 5, f"{name}: layer map covers {len(div.layers)} layers"
    assert div.first is None, f"{name}: layer {div.summary()} over the per-layer tolerance"
