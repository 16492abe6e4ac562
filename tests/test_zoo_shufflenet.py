"""ShuffleNet V1/V2: counts against the papers and reference releases, unit structure, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models import InputError, create_model, model_entry
from models.shufflenet import ShuffleV1Unit, ShuffleV2Unit
from tests.zoo_checks import check_forward, meta_complexity, train_losses

V1_NAMES = [f"shufflenet_v1_g{g}" for g in (1, 2, 3, 4, 8)]
V2_NAMES = ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"]


# ShuffleNet paper Table 1: complexity of ShuffleNet 1x at 224 by group count (MFLOPs, which
# the paper counts as multiply-adds). We land within 1.1% (g4: 134.3 vs 133, g8: 138.4 vs
# 137): the paper does not say how it counts the stem and classifier; 1.5% allows for that.
@pytest.mark.parametrize("groups,mmacs", [(1, 143), (2, 140), (3, 137), (4, 133), (8, 137)])
def test_v1_macs_match_paper_table_1(groups, mmacs):
    assert abs(meta_complexity(f"shufflenet_v1_g{groups}").macs / 1e6 - mmacs) <= 0.015 * mmacs


# Megvii's official release (megvii-model/ShuffleNet-Series, ShuffleNetV1/README.md):
# (groups, scale, MFLOPs, million params). Its counts print to 1M MACs and 0.1M params;
# the 0.5x g3 model is 37.6M against its 38M, hence the same 1.5%.
MEGVII_V1 = [(3, 2.0, 524, 5.4), (8, 2.0, 522, 6.5), (3, 1.5, 292, 3.4), (8, 1.5, 290, 4.3),
             (3, 1.0, 138, 1.9), (8, 1.0, 138, 2.4), (3, 0.5, 38, 0.7), (8, 0.5, 40, 1.0)]


@pytest.mark.parametrize("groups,scale,mmacs,mparams", MEGVII_V1)
def test_v1_counts_match_megvii_release(groups, scale, mmacs, mparams):
    c = meta_complexity(f"shufflenet_v1_g{groups}", scale=scale)
    assert abs(c.macs / 1e6 - mmacs) <= 0.015 * mmacs
    assert round(c.params / 1e6, 1) == mparams


# osmr/imgclsmob (PyTorch model zoo table) "ShuffleNet x<scale> (g=<groups>)": exact counts.
# Its classifier has a bias (num_classes more weights); Megvii's, like ours, has none.
OSMR_V1 = [(1, 1.0, 1_531_936), (2, 1.0, 1_733_848), (3, 1.0, 1_865_728), (4, 1.0, 1_968_344),
           (8, 1.0, 2_434_768), (1, 0.5, 534_484), (3, 0.5, 718_324), (1, 0.25, 209_746),
           (3, 0.25, 305_902)]


@pytest.mark.parametrize("groups,scale,params", OSMR_V1)
def test_v1_exact_params_match_osmr(groups, scale, params):
    assert meta_complexity(f"shufflenet_v1_g{groups}", scale=scale).params + 1000 == params


def test_v1_unit_structure():
    model = create_model("shufflenet_v1_g3")
    units = [m for m in model.modules() if isinstance(m, ShuffleV1Unit)]
    assert len(units) == 4 + 8 + 4
    # only the very first pointwise conv (24 input channels) is ungrouped (paper Sec. 3.3)
    assert [u.conv_pw[0].groups for u in units] == [1] + [3] * 15
    assert all(u.conv_pwl[0].groups == 3 for u in units)
    # bottleneck = a quarter of the unit's output width; stride-2 branch makes out - in
    first = units[0]
    assert first.conv_pw[0].out_channels == 240 // 4
    assert first.conv_pwl[0].out_channels == 240 - 24
    assert model.num_features == 960


def test_v1_stride2_unit_concats_avgpool_shortcut():
    torch.manual_seed(0)
    unit = ShuffleV1Unit(24, 240, stride=2, groups=3, group_first_pw=False).eval()
    x = torch.rand(1, 24, 8, 8)
    with torch.no_grad():
        out = unit(x)
    assert out.shape == (1, 240, 4, 4)
    # the first 24 channels are the 3x3/2 average pool of the (non-negative) input
    assert torch.allclose(out[:, :24], nn.functional.avg_pool2d(x, 3, 2, 1))


def test_v1_scale_rounding_keeps_groups_divisible():
    # 0.5x g2 asks for 100 channels: rounded to 104 so the 26-wide bottleneck splits in 2 groups
    model = create_model("shufflenet_v1_g2", scale=0.5, num_classes=10)
    assert model.stages[0][0].conv_pwl[0].out_channels + model.stem[0].out_channels == 104
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_v1_bad_groups_is_an_input_error():
    with pytest.raises(InputError, match="groups"):
        create_model("shufflenet_v1_g3", groups=5)


# torchvision docs (ShuffleNet_V2_X*_Weights): params exact, "GFLOPS" (multiply-adds) to 2
# decimals. ShuffleNet V2 paper Table 5: 41 / 146 / 299 / 591 MFLOPs; we count 40.5 / 144.9 /
# 295.8 / 583.3 (torchvision's layout gives the same), within 1.5%.
V2_REFERENCES = [("shufflenet_v2_x0_5", 1_366_792, 0.04, 41),
                 ("shufflenet_v2_x1_0", 2_278_604, 0.14, 146),
                 ("shufflenet_v2_x1_5", 3_503_624, 0.30, 299),
                 ("shufflenet_v2_x2_0", 7_393_996, 0.58, 591)]


@pytest.mark.parametrize("name,params,gmacs,paper_mmacs", V2_REFERENCES)
def test_v2_counts_match_torchvision_and_paper(name, params, gmacs, paper_mmacs):
    c = meta_complexity(name)
    assert c.params == params
    assert round(c.macs / 1e9, 2) == gmacs
    assert abs(c.macs / 1e6 - paper_mmacs) <= 0.015 * paper_mmacs


def test_v2_unit_splits_and_shuffles():
    torch.manual_seed(0)
    unit = ShuffleV2Unit(16, 16, stride=1).eval()
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        out = unit(x)
        branch = unit.branch2(x[:, 8:])
    # after the shuffle the untouched half sits at even channels, the branch at odd ones
    assert torch.equal(out[:, 0::2], x[:, :8])
    assert torch.allclose(out[:, 1::2], branch)
    assert ShuffleV2Unit(24, 116, stride=2)(torch.randn(1, 24, 8, 8)).shape == (1, 116, 4, 4)


def test_registry_entries():
    for name in V1_NAMES + V2_NAMES:
        e = model_entry(name)
        assert (e.input_size, e.small_input_size, e.family) == (224, 32, "shufflenet")


@pytest.mark.parametrize("name", V1_NAMES + V2_NAMES)
def test_small_input_forward(name):
    check_forward(name)


@pytest.mark.parametrize("name", ["shufflenet_v1_g8", "shufflenet_v2_x0_5"])
def test_training_step_lowers_the_loss(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, scale=0.5) if "v1" in name \
        else create_model(name, num_classes=10)
    losses = train_losses(model, 32, steps=1, batch=4, lr=0.01)
    assert losses[-1] < losses[0]


def test_full_size_forward():
    model = create_model("shufflenet_v1_g3").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
