"""RepVGG: training- and deploy-form counts, re-parameterization equivalence, forward, training."""
from __future__ import annotations

import pytest
import torch

from models import create_model
from models.complexity import count_params
from models.reparam import reparameterize_model
from models.repvgg import RepVGGBlock
from tests.zoo_checks import check_forward, meta_complexity, random_bn, train_losses

# Deploy form, paper Table 4 ("Params (M)", "Theo FLOPs (B)", FLOPs being multiply-adds).
# The paper's parameter figures are truncated, not rounded, to two decimals:
# A0's 8,309,384 is printed 8.30, B0's 14,339,048 is 14.33, B1's 51,829,480 is 51.82.
DEPLOY = {
    "repvgg_a0": (8.30, 1.4), "repvgg_a1": (12.78, 2.4), "repvgg_a2": (25.49, 5.1),
    "repvgg_b0": (14.33, 3.1), "repvgg_b1": (51.82, 11.8), "repvgg_b1g2": (41.36, 8.8),
    "repvgg_b1g4": (36.12, 7.3), "repvgg_b2": (80.31, 18.4), "repvgg_b2g4": (55.77, 11.3),
    "repvgg_b3": (110.96, 26.2),
}
# Training form, as published with the official code (DingXiaoH/RepVGG), rounded.
TRAIN = {
    "repvgg_a0": 9.11, "repvgg_a1": 14.09, "repvgg_a2": 28.21, "repvgg_b0": 15.82,
    "repvgg_b1": 57.42, "repvgg_b2": 89.02, "repvgg_b3": 123.09,
}


@pytest.mark.parametrize("name", sorted(DEPLOY))
def test_counts_match_paper(name):
    params_m, gmacs = DEPLOY[name]
    deploy = meta_complexity(name, 224, deploy=True)
    assert int(deploy.params / 1e4) / 100 == params_m
    assert round(deploy.macs / 1e9, 1) == gmacs
    if name in TRAIN:
        assert round(meta_complexity(name, 224).params / 1e6, 2) == TRAIN[name]


def test_a0_exact_counts():
    # 9,108,968 training form: the figure quoted in the issue (README: 9.11M);
    # 8,309,384 deployed (paper Table 4: 8.30M).
    assert meta_complexity("repvgg_a0", 224).params == 9_108_968
    assert meta_complexity("repvgg_a0", 224, deploy=True).params == 8_309_384


@pytest.mark.parametrize("in_chs,out_chs,stride,groups", [
    (8, 8, 1, 1),      # all three branches
    (8, 16, 2, 1),     # no identity branch
    (8, 8, 1, 2),      # grouped, identity kernel per group
    (16, 16, 1, 4),
    (8, 16, 1, 4),     # grouped, widening: no identity
])
def test_block_reparameterize_is_equivalent(in_chs, out_chs, stride, groups):
    torch.manual_seed(0)
    block = RepVGGBlock(in_chs, out_chs, stride, groups)
    random_bn(block)
    block.eval()
    x = torch.randn(2, in_chs, 9, 9)
    with torch.no_grad():
        ref = block(x)
        block.reparameterize()
        out = block(x)
    assert block.deploy and not hasattr(block, "rbr_dense") and not hasattr(block, "rbr_identity")
    assert [n for n, _ in block.named_children()] == ["nonlinearity", "rbr_reparam"]
    assert (out - ref).abs().max().item() <= 1e-5


def test_reparameterize_model_matches_a_deploy_built_model():
    torch.manual_seed(0)
    model = create_model("repvgg_tiny", num_classes=10)   # grouped blocks with identity
    random_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    fused = reparameterize_model(model)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() <= 1e-5
    assert hasattr(model.stage1[1], "rbr_identity")          # the original is untouched
    deploy_built = create_model("repvgg_tiny", num_classes=10, deploy=True)
    assert count_params(fused) == count_params(deploy_built)
    deploy_built.load_state_dict(fused.state_dict())          # same names and shapes


def test_small_input_forward():
    check_forward("repvgg_tiny")
    check_forward("repvgg_a0")


def test_repvgg_tiny_trains():
    torch.manual_seed(0)
    model = create_model("repvgg_tiny", num_classes=10)
    losses = train_losses(model, 32)
    assert losses[-1] < losses[0]
