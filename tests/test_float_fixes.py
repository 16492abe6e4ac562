"""Float-side fixes (quantize/float_fixes.py): BatchNorm folding and cross-layer equalization
are exact in float, equalization equalizes, high-bias absorption and bias correction do
what they claim. Whether they reduce the int8 drop is shown by ``python -m bench.ptq``
(a benchmark, not a test: on a small model the effect is real but not large enough to
assert without flakiness).

Exactness tolerance: the house's fp32 parity criterion (``device_tests.compare``),
``max|d| <= 1e-5 + 1e-5 * max|ref|`` on the logits. Folding rewrites each weight as
``w * gamma / sqrt(var + eps)`` and CLE as ``w / s`` or ``w * s``: the same function, but
every rewritten weight is rounded to float32 again (relative error 6e-8), and the model
then sums in a different order; over ~50 layers that is ~1e-6 of the logits' magnitude.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import create_model
from models.errors import InputError
from quantize.float_fixes import (FIXES, apply_float_fixes, correct_bias, equalize, fold_batchnorm,
                                  parse_fixes, quantize_weight)
from quantize import float_fixes as ff

FP32_ATOL, FP32_RTOL = 1e-5, 1e-5


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Trained-looking BatchNorm statistics and affine parameters (uneven across channels,
    which is what makes depthwise convolutions hard to quantize after folding)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            mod.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.05)
            mod.weight.data.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def mbv2():
    torch.manual_seed(0)
    return _randomize_bn(create_model("mobilenet_v2", num_classes=10, in_chans=1, width_mult=0.35))


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32)


def _logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(x))


def _assert_fp32_equal(got: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((got - ref).abs().max())
    bound = FP32_ATOL + FP32_RTOL * float(ref.abs().max())
    assert err <= bound, f"max abs {err:.3g} > {bound:.3g}"
    return err


def _relu_only(model: nn.Module) -> nn.Module:
    """The same network with ReLU instead of ReLU6, so that CLE has nothing to replace."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.ReLU6):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.ReLU())
    return model


def test_parse_fixes_orders_and_rejects_unknown():
    assert parse_fixes("bias, cle") == ("cle", "bias")
    assert parse_fixes(None) == () and parse_fixes(list(FIXES)) == FIXES
    with pytest.raises(InputError, match="--float-fixes"):
        parse_fixes("bn,magic")


def test_batchnorm_folding_is_exact_and_removes_every_batchnorm(mbv2, x):
    ref = _logits(mbv2, x)
    res = apply_float_fixes(mbv2, ["bn"], probe=x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in mbv2.modules())
    assert res.reports[0].name == "bn" and res.reports[0].applied == n_bn
    _assert_fp32_equal(_logits(res.model, x), ref)
    # the folded conv's output is what the BatchNorm used to output: the layer map follows
    assert res.renames["stem.0"] == "stem.1"
    assert res.remap_layer_map({"t0": "stem.0", "t1": "blocks.0.conv_dw.2"}) == \
        {"t0": "stem.1", "t1": "blocks.0.conv_dw.2"}
    assert any(isinstance(m, nn.BatchNorm2d) for m in mbv2.modules()), "the input model was modified"


def test_cross_layer_equalization_is_exact_and_equalizes_ranges(mbv2, x):
    relu_model = _relu_only(mbv2)
    folded = apply_float_fixes(relu_model, ["bn"]).model
    ref = _logits(folded, x)
    res = apply_float_fixes(folded, ["cle"], probe=x)
    cle = next(r for r in res.reports if r.name == "cle")
    assert cle.applied > 20 and cle.exact, cle
    _assert_fp32_equal(_logits(res.model, x), ref)
    # every equalized pair now has equal per-channel ranges on both sides (Nagel et al., eq. 8)
    mods = dict(res.model.named_modules())
    for p in ff._pairs(res.model):
        r1 = ff._out_ranges(mods[p.a].weight.detach())
        r2 = ff._in_ranges(mods[p.b].weight.detach(), ff._groups(mods[p.b]))
        np.testing.assert_allclose(r1.numpy(), r2.numpy(), rtol=5e-3)
    # the depthwise convs' channel ranges really were unequal before
    spreads = [float(d.split("spread ")[1].split("x")[0]) for d in cle.details if "spread" in d]
    assert max(spreads) > 5


def test_cle_replaces_relu6_and_reports_its_float_effect(mbv2, x):
    res = apply_float_fixes(mbv2, ["cle"], probe=x)
    names = [r.name for r in res.reports]
    assert names == ["bn", "cle"] and "required by cle" in res.reports[0].note
    cle = res.reports[1]
    assert not cle.exact and "ReLU6 -> ReLU" in cle.details[0]
    assert not any(isinstance(m, nn.ReLU6) for m in res.model.get_submodule("blocks.1").modules())
    assert cle.max_abs_change is not None and res.max_abs_change is not None
    # the reported change is the real one on the probe inputs
    measured = float((_logits(res.model, x) - _logits(mbv2, x)).abs().max())
    assert abs(measured - res.max_abs_change) <= 1e-6 * max(1.0, measured)


def test_cle_handles_grouped_convs_and_a_linear_after_global_pooling(x):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    model = _randomize_bn(model, seed=4)
    ref = _logits(model, x)
    res = apply_float_fixes(model, ["bn", "cle"], probe=x)
    assert [r.applied for r in res.reports] == [3, 3]          # 3 folds; pairs 0-3, 3-6, 6-11
    _assert_fp32_equal(_logits(res.model, x), ref)


def test_high_bias_absorption_moves_bias_into_an_unpadded_next_layer(x):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.eval()
    with torch.no_grad():                   # pre-activations N(beta, gamma^2) with beta >> 3 gamma
        bn = model[1]
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(0.1)
        bn.bias.copy_(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0]))
    inputs = np.random.default_rng(1).normal(0, 1, (64, 1, 8, 8)).astype(np.float32) * 0.5
    ref = _logits(model, inputs)
    res = apply_float_fixes(model, ["bn", "hba"], probe=inputs)
    hba = res.reports[-1]
    assert hba.applied == 1, hba
    conv = res.model[0]
    # c = beta - 3 gamma for the channels where that is positive, moved out of the first bias
    assert float(conv.bias.detach().max()) < 1.0
    # pre-activations stay above c except in the far tail: the function is (almost) unchanged
    err = float((_logits(res.model, inputs) - ref).abs().max())
    assert err < 1e-3 * float(ref.abs().max()) + 1e-5, err


def test_bias_correction_removes_the_mean_shift_of_quantized_weights(mbv2):
    rng = np.random.default_rng(2)
    calib = rng.normal(size=(48, 1, 28, 28)).astype(np.float32)
    folded = apply_float_fixes(mbv2, ["bn"]).model
    corrected = copy.deepcopy(folded)
    report = correct_bias(corrected, calib, per_channel=False)
    assert report.applied == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in folded.modules())

    def with_quantized_weights(m: nn.Module) -> nn.Module:
        m = copy.deepcopy(m)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    mod.weight.copy_(quantize_weight(mod.weight, per_channel=False))
        return m

    x = torch.from_numpy(calib)
    with torch.no_grad():
        ref_mean = folded(x).mean(0)
        plain = (with_quantized_weights(folded)(x).mean(0) - ref_mean).abs().mean()
        fixed = (with_quantized_weights(corrected)(x).mean(0) - ref_mean).abs().mean()
    assert fixed < 0.5 * plain, (float(fixed), float(plain))


def test_quantize_weight_matches_the_symmetric_int8_grid():
    w = torch.tensor([[0.5, -1.27, 0.004], [2.0, 0.0, -0.3]])
    q = quantize_weight(w, per_channel=True)
    scale = torch.tensor([[1.27 / 127], [2.0 / 127]])
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and float(levels.abs().max()) <= 127 + 1e-4
    assert torch.allclose(q[:, 1], w[:, 1]) and float((q - w).abs().max()) <= float(scale.max()) / 2 + 1e-7


def test_bias_correction_needs_calibration_data(mbv2):
    with pytest.raises(InputError, match="calibration"):
        apply_float_fixes(mbv2, ["bias"])


def test_untraceable_model_is_reported_not_broken(x):
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, t):
            if t.sum() > 0:                     # data-dependent control flow: torch.fx cannot trace it
                return self.bn(self.conv(t))
            return self.conv(t)

    model = Dynamic().eval()
    res = apply_float_fixes(model, ["bn", "cle"], probe=x)
    assert "cannot trace" in res.reports[0].note and res.reports[0].applied == 0
    assert isinstance(res.model.bn, nn.BatchNorm2d)


def test_fold_and_equalize_are_usable_alone(mbv2, x):
    m = copy.deepcopy(_relu_only(mbv2))
    stats: dict = {}
    rep = fold_batchnorm(m, stats)
    assert rep.applied == len(stats) > 0
    rep = equalize(m, stats)
    assert rep.applied > 0 and "iteration" in rep.note
