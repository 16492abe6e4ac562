"""The in-order fp32 reference of verify's float64 rule (``device_tests.accumulation``).

Two claims, each measured: the in-order forward computes the same function as PyTorch's
(grouped, strided, dilated, padded convs and linear layers, to fp32 rounding), and on a
wide convolution it rounds like LiteRT's XNNPACK kernels (a real runtime, a real file),
several times more than PyTorch's blocked sums: the reason the rule takes the worse order.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from device_tests.accumulation import sequential_fp32
from device_tests.compare import FP64_MARGIN, fp64_distances


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2), (2, 8, 9, 9)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), (2, 6, 7, 7)),
    (nn.Conv2d(4, 5, (3, 5), padding=(1, 2), dilation=(1, 2)), (1, 4, 10, 12)),
    (nn.Conv2d(3, 7, 1), (3, 3, 4, 4)),
    (nn.Linear(20, 7), (3, 20)),
    (nn.Linear(6, 4), (2, 5, 6)),
])
def test_in_order_sums_compute_the_same_function(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    with torch.no_grad():
        blocked = layer(x)
        with sequential_fp32(layer):
            in_order = layer(x)
        exact = layer.double()(x.double())
    assert in_order.shape == blocked.shape
    scale = float(exact.abs().max())
    assert float((in_order.double() - exact).abs().max()) <= 1e-6 * scale
    assert float((blocked.double() - exact).abs().max()) <= 1e-6 * scale


def test_the_block_ends_cleanly():
    layer = nn.Linear(3, 2)
    with sequential_fp32(layer):
        pass
    assert not layer._forward_hooks


def test_a_wide_conv_on_xnnpack_rounds_like_in_order_sums_not_like_pytorch(tmp_path):
    """One 3x3 conv, 1,280 channels in and out (11,520 products an output), converted by
    litert-torch and run by LiteRT with XNNPACK: its distance from float64 is close to the
    in-order forward's and well beyond PyTorch's; the float64 rule with the in-order
    reference calls it rounding, without it a divergence."""
    from ai_edge_litert.interpreter import Interpreter

    from exporters.litert_torch import convert_float
    rng = np.random.default_rng(0)
    c, h = 1280, 6
    conv = nn.Conv2d(c, c, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(rng.standard_normal(conv.weight.shape).astype(np.float32) / np.sqrt(9 * c)))
    x = np.abs(rng.standard_normal((1, c, h, h))).astype(np.float32)          # post-ReLU inputs
    data = convert_float(conv, (1, c, h, h), ["fp32"], layout="NCHW")["fp32"]
    it = Interpreter(model_content=data, num_threads=1)                      # XNNPACK: the default
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    xnnpack = it.get_tensor(it.get_output_details()[0]["index"]).astype(np.float64)
    with torch.no_grad():
        exact = conv.double()(torch.from_numpy(x).double()).numpy()
        conv.float()
        blocked = conv(torch.from_numpy(x)).numpy()
        with sequential_fp32(conv):
            in_order = conv(torch.from_numpy(x)).numpy()

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(((a.astype(np.float64) - exact) ** 2).mean()))
    assert rms(xnnpack) > 3 * rms(blocked)                         # measured 7x
    assert 0.5 * rms(in_order) < rms(xnnpack) < 2 * rms(in_order)   # measured 1.0x
    own, tgt, rounding = fp64_distances(blocked, xnnpack, exact)
    assert not rounding and tgt > FP64_MARGIN * own                # PyTorch's order alone: a false alarm
    own, tgt, rounding = fp64_distances(blocked, xnnpack, exact, in_order)
    assert rounding
