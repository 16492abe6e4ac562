"""Every zoo model through ``export_onnx`` and ONNX Runtime: fp32 parity and the layer map.

Marked ``zoo`` (``make test-zoo``): minutes of exporting. Each model is built at its
registered small input size, re-parameterized into its deploy form where it has one
(as ``mdeploy export`` does), exported with dynamic batch, and run at batch 3.

Weights: ``tests.zoo_checks.trained_like``, the recipe every zoo parity sweep uses
(zero-initialised tensors made non-zero, BatchNorm statistics as trained networks show
them, logits of a few units). This tests the *conversion* (every op mapped, every layout
and padding right).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from device_tests.compare import compare, run_all, tolerance_for
from device_tests.divergence import find_first_divergent
from device_tests.runners.onnxruntime import OnnxRuntimeRunner
from device_tests.runners.torch import TorchRunner
from exporters.artifact import Artifact
from exporters.onnx import export_onnx
from models import create_model, list_models, model_entry
from models.reparam import is_reparameterizable, reparameterize_model
from tests.zoo_checks import fp32_parity_failure, fp32_rounding_allowance, trained_like

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_exports_and_matches_on_onnxruntime(name, tmp_path, record_property):
    size = model_entry(name).small_input_size
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=10), size)
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
        _, out = res.output("onnx")
        failure = fp32_parity_failure(model, x, out, name)
        assert failure is None, failure
        assert not [f for f in pair.failures if not f.startswith("max_abs")], f"{name}: {pair.failures}"
        assert pair.top1_agreement == 1.0
        # a model that rounds beyond the bound in PyTorch itself: the layers get the float64
        # rule's allowance too (their bound scaled by PyTorch's own measured rounding)
        allowance = fp32_rounding_allowance(model, x[:1])
        layer_tol = tol.with_overrides(layer_max_rel=tol.layer_max_rel * allowance) if allowance > 1 else tol
        div = find_first_divergent(ref, target, {"input": x[:1]}, layer_tol)
    assert len(div.layers) >= 5, f"{name}: layer map covers {len(div.layers)} layers"
    assert div.first is None, f"{name}: layer {div.summary()} over the per-layer tolerance"
