"""MobileNet V1/V2: counts against papers and reference releases, multipliers, blocks, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models import InputError, create_model, model_entry
from models.complexity import count_complexity
from models.mobilenet import InvertedResidual
from tests.zoo_checks import check_forward, meta_complexity, train_losses

NAMES = ["mobilenet_v1", "mobilenet_v1_075", "mobilenet_v1_050", "mobilenet_v1_025",
         "mobilenet_v2", "mobilenet_v2_050", "mobilenet_v2_035"]


def _bn_params(name: str, **kw) -> int:
    with torch.device("meta"):
        model = create_model(name, **kw)
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())


# Exact counts. Keras applications MobileNet (alpha 1.0, with top): 4,231,976 trainable
# params (its 4,253,864 total adds BN moving statistics, buffers here); osmr/imgclsmob
# "MobileNet x0.75/x0.5/x0.25": 2,585,560 / 1,331,592 / 470,072.
# MobileNetV2: torchvision docs (MobileNet_V2_Weights.IMAGENET1K_V1) 3,504,872, and Keras
# MobileNetV2 alpha 1.0: 3,504,872 trainable.
@pytest.mark.parametrize("name,params", [
    ("mobilenet_v1", 4_231_976), ("mobilenet_v1_075", 2_585_560),
    ("mobilenet_v1_050", 1_331_592), ("mobilenet_v1_025", 470_072),
    ("mobilenet_v2", 3_504_872),
])
def test_exact_param_counts(name, params):
    assert meta_complexity(name).params == params


# MobileNet paper Table 6 (width, 224) and Table 7 (resolution, alpha 1.0):
# (alpha, resolution, million mult-adds, million params).
V1_PAPER = [
    (1.0, 224, 569, 4.2), (0.75, 224, 325, 2.6), (0.5, 224, 149, 1.3), (0.25, 224, 41, 0.5),
    (1.0, 192, 418, 4.2), (1.0, 160, 290, 4.2), (1.0, 128, 186, 4.2),
]


@pytest.mark.parametrize("alpha,res,mmacs,mparams", V1_PAPER)
def test_v1_width_and_resolution_multipliers_match_paper(alpha, res, mmacs, mparams):
    c = meta_complexity("mobilenet_v1", res, width_mult=alpha)
    assert abs(c.macs / 1e6 - mmacs) <= 0.01 * mmacs
    assert round(c.params / 1e6, 1) == mparams


def test_v1_macs_scale_with_alpha_squared_and_rho_squared():
    # Paper Sec. 3.3-3.4: cost falls roughly as alpha^2 and rho^2. Not exactly: the stem
    # conv is linear in alpha and the classifier does not depend on rho.
    base = meta_complexity("mobilenet_v1", 224).macs
    for alpha in (0.75, 0.5):
        ratio = meta_complexity("mobilenet_v1", 224, width_mult=alpha).macs / base
        assert alpha ** 2 < ratio < alpha ** 2 * 1.06
    for res in (192, 160, 128):
        ratio = meta_complexity("mobilenet_v1", res).macs / base
        assert (res / 224) ** 2 < ratio < (res / 224) ** 2 * 1.01


def test_v2_macs_match_paper():
    # MobileNetV2 paper Table 4: 300M multiply-adds at 224 (we count 300.77M).
    assert abs(meta_complexity("mobilenet_v2").macs / 1e6 - 300) <= 0.005 * 300


# TF-slim MobileNetV2 checkpoint table (tensorflow/models research/slim/nets/mobilenet/
# README.md), 224 px: (width, million MACs, million params). Its parameter column counts
# conv and FC weights without BN parameters: ours minus BN matches every row at its rounding.
TF_SLIM_V2 = [(1.4, 582, 6.06), (1.0, 300, 3.47), (0.75, 209, 2.61), (0.5, 97, 1.95),
              (0.35, 59, 1.66)]


@pytest.mark.parametrize("width,mmacs,mparams", TF_SLIM_V2)
def test_v2_widths_match_tf_slim_table(width, mmacs, mparams):
    c = meta_complexity("mobilenet_v2", width_mult=width)
    assert abs(c.macs / 1e6 - mmacs) <= 0.005 * mmacs
    assert round((c.params - _bn_params("mobilenet_v2", width_mult=width)) / 1e6, 2) == mparams


def test_v2_convenience_names_are_the_widths():
    for name, width in (("mobilenet_v2_050", 0.5), ("mobilenet_v2_035", 0.35)):
        same = meta_complexity("mobilenet_v2", width_mult=width)
        assert meta_complexity(name).params == same.params
    # the 0.35 model keeps the 1280-wide head (V2 paper Sec. 6.1) and a 16-channel stem
    m = create_model("mobilenet_v2_035")
    assert m.num_features == 1280 and m.stem[0].out_channels == 16


def test_meta_and_cpu_counts_agree():
    # the other tests count on the meta device; a real forward must give the same numbers
    real = count_complexity(create_model("mobilenet_v2"), 224)
    meta = meta_complexity("mobilenet_v2")
    assert (real.params, real.macs) == (meta.params, meta.macs)


def test_v2_se_sits_after_depthwise_and_adds_its_fcs():
    plain = create_model("mobilenet_v2")
    se = create_model("mobilenet_v2", se=True)
    names = [n for n, _ in se.blocks[3].named_children()]
    assert names == ["conv_pw", "conv_dw", "se", "conv_pwl"]
    expected = 0
    for block in se.blocks:
        mid = block.conv_dw[0].out_channels
        in_chs = block.conv_dw[0].in_channels if isinstance(block.conv_pw, nn.Identity) \
            else block.conv_pw[0].in_channels
        rd = int(in_chs * 0.25)                     # MnasNet: reduce to a quarter of the input
        assert block.se.fc1.out_channels == rd
        expected += mid * rd + rd + rd * mid + mid  # two biased 1x1 convs
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(se) - count(plain) == expected


def test_inverted_residual_skip_and_linear_bottleneck():
    torch.manual_seed(0)
    block = InvertedResidual(16, 16, stride=1, expand_ratio=6).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        branch = block.conv_pwl(block.se(block.conv_dw(block.conv_pw(x))))
        assert torch.allclose(block(x), x + branch)
    assert (branch < 0).any()                     # no ReLU after the projection
    assert len(block.conv_pwl) == 2               # conv + BN only
    assert not InvertedResidual(16, 24, stride=1).has_skip
    assert not InvertedResidual(16, 16, stride=2).has_skip
    assert isinstance(InvertedResidual(16, 16, expand_ratio=1).conv_pw, nn.Identity)


def test_bad_width_is_an_input_error():
    with pytest.raises(InputError, match="width_mult"):
        create_model("mobilenet_v1", width_mult=0)
    with pytest.raises(InputError):
        create_model("mobilenet_v2_050", width_mult=0.5)   # the name fixes the width


def test_registry_entries():
    for name in NAMES:
        e = model_entry(name)
        assert (e.input_size, e.small_input_size, e.family) == (224, 32, "mobilenet")
        assert "arXiv" in e.paper


@pytest.mark.parametrize("name", NAMES)
def test_small_input_forward(name):
    check_forward(name)


@pytest.mark.parametrize("name,kw", [("mobilenet_v1_025", {}), ("mobilenet_v2_035", {"se": True})])
def test_training_step_lowers_the_loss(name, kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, drop_rate=0.0, **kw)
    losses = train_losses(model, model_entry(name).small_input_size, steps=1, batch=4, lr=0.01)
    assert losses[-1] < losses[0]


def test_full_size_forward():
    model = create_model("mobilenet_v2").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_stem_stride_one_keeps_params_and_quadruples_macs():
    """The small-input variant used by `mdeploy run` on 28x28 MNIST."""
    from models import create_model
    from models.complexity import count_complexity
    a = count_complexity(create_model("mobilenet_v2", width_mult=0.35), 64)
    b = count_complexity(create_model("mobilenet_v2", width_mult=0.35, stem_stride=1), 64)
    assert a.params == b.params
    fc = 1280 * 1000                            # the classifier does not see the spatial size
    assert b.macs == 4 * (a.macs - fc) + fc     # every conv works on 4x the positions
    out = create_model("mobilenet_v2", num_classes=10, in_chans=1, width_mult=0.35, stem_stride=1)
    assert out.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
