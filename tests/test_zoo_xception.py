"""Xception: reference counts, small-input forward, the pre-activation shortcut."""
from __future__ import annotations

import pytest
import torch

from models import create_model
from models.xception import XceptionBlock
from tests.zoo_checks import check_forward, meta_complexity


def test_xception_counts_match_references():
    c = meta_complexity("xception", 299)
    # Keras applications Xception with top: 22,855,952 trainable params (its 22,910,480
    # total adds BN moving statistics, buffers here); timm legacy_xception: 22,855,952.
    assert c.params == 22_855_952
    # timm model card legacy_xception.tf_in1k: 8.4 GMACs at 299.
    assert round(c.macs / 1e9, 1) == 8.4


def test_xception_small_input_forward():
    # no training test: 22.9M parameters and CPU depthwise backward are too slow for
    # the default run; the small models of the other zoo files cover training.
    check_forward("xception")


def test_block_shortcut_reads_the_input_before_relu():
    # Keras: residual = x, then ReLU on the main path. An in-place leading ReLU would
    # rectify the shortcut too and still run, silently changing the model.
    block = XceptionBlock(8, 8, reps=3).eval()
    x = torch.randn(1, 8, 5, 5)
    x0 = x.clone()
    with torch.no_grad():
        out = block(x)
    assert torch.equal(x, x0)
    with torch.no_grad():
        assert torch.allclose(out, block.rep(x0) + x0)


@pytest.mark.slow
def test_xception_full_size_forward():
    model = create_model("xception").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 299, 299))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
