"""Shift, ActiveShift and the shift networks: exact shifts, bilinear sampling, gradients, counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model
from models.complexity import count_complexity
from models.shift import ActiveShift, Shift, active_shift2d, shift2d
from tests.zoo_checks import check_forward, meta_complexity, shift_by_index, train_losses


@pytest.mark.parametrize("dy,dx", [(0, 0), (1, 0), (0, -1), (-2, 1), (2, 3), (5, -7)])
def test_shift2d_matches_explicit_indexing(dy, dx):
    x = torch.randn(2, 3, 5, 6)
    assert torch.equal(shift2d(x, dy, dx), shift_by_index(x, dy, dx))


@pytest.mark.parametrize("channels,k,dilation", [(19, 3, 1), (27, 5, 1), (18, 3, 2)])
def test_shift_layer_matches_hand_computed_groups(channels, k, dilation):
    # the documented assignment: channels [g*s, (g+1)*s) take offset g of the k x k window in
    # raster order, (dy, dx) = (g // k - k // 2, g % k - k // 2) * dilation, s = C // k^2;
    # the remaining C % k^2 channels stay put
    x = torch.randn(2, channels, 6, 7)
    s = channels // (k * k)
    expected = x.clone()
    for c in range(s * k * k):
        g = c // s
        dy, dx = (g // k - k // 2) * dilation, (g % k - k // 2) * dilation
        expected[:, c] = shift_by_index(x[:, c], dy, dx)
    assert torch.equal(Shift(channels, k, dilation)(x), expected)


def test_shift_layer_has_no_params_and_no_macs():
    layer = Shift(18, 3)
    assert sum(p.numel() for p in layer.parameters()) == 0
    c = count_complexity(nn.Sequential(layer), (18, 8, 8))
    assert c.params == 0 and c.macs == 0


def test_active_shift_with_integer_shifts_is_the_exact_shift():
    torch.manual_seed(0)
    k, channels = 3, 18
    shift = Shift(channels, k)
    asl = ActiveShift(channels, max_shift=2)
    per_channel = [dydx for dydx in shift.shifts for _ in range(shift.group_size)]
    with torch.no_grad():
        asl.dy.copy_(torch.tensor([float(dy) for dy, _ in per_channel]))
        asl.dx.copy_(torch.tensor([float(dx) for _, dx in per_channel]))
        x = torch.randn(2, channels, 6, 7)
        assert torch.equal(asl(x), shift(x))
        # and two pixels away, the edge of its window
        asl.dy.fill_(-2.0)
        asl.dx.fill_(2.0)
        assert torch.equal(asl(x), shift2d(x, -2, 2))


def _grid_sample_shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Bilinear shift by grid_sample, one channel at a time: sample x at (i - dy, j - dx)."""
    n, c, h, w = x.shape
    ii, jj = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype),
                            indexing="ij")
    outs = []
    for ch in range(c):
        ys, xs = ii - dy[ch], jj - dx[ch]
        # align_corners=True: pixel index p maps to -1 + 2p / (size - 1)
        grid = torch.stack([2 * xs / (w - 1) - 1, 2 * ys / (h - 1) - 1], dim=-1)
        outs.append(F.grid_sample(x[:, ch:ch + 1], grid.expand(n, h, w, 2), mode="bilinear",
                                  padding_mode="zeros", align_corners=True))
    return torch.cat(outs, dim=1)


def test_active_shift_fractional_shifts_are_bilinear_interpolation():
    torch.manual_seed(0)
    dy = torch.tensor([0.3, -1.7, 1.5, -0.25, 1.99, 0.0], dtype=torch.float64)
    dx = torch.tensor([-0.6, 0.4, 1.25, -1.5, -1.01, 0.75], dtype=torch.float64)
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    expected = _grid_sample_shift(x, dy, dx)
    # float64: equal to rounding; the float32 layer: within float32 coordinate rounding
    assert (active_shift2d(x, dy, dx, 2) - expected).abs().max().item() <= 1e-12
    asl = ActiveShift(6, max_shift=2)
    with torch.no_grad():
        asl.dy.copy_(dy)
        asl.dx.copy_(dx)
        assert (asl(x.float()).double() - expected).abs().max().item() <= 1e-5


def test_active_shift_gradients_match_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    dy = torch.tensor([0.3, -1.2, 0.7, -0.45], dtype=torch.float64, requires_grad=True)
    dx = torch.tensor([-0.6, 1.35, 0.2, -1.8], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: active_shift2d(x, a, b, 2), (dy, dx))
    # and through the module, in float32: the shift parameters do get gradients
    asl = ActiveShift(4)
    asl(x.float()).square().sum().backward()
    assert asl.dy.grad.abs().sum() > 0 and asl.dx.grad.abs().sum() > 0


def test_active_shift_has_two_params_per_channel_and_no_macs():
    c = count_complexity(nn.Sequential(ActiveShift(12)), (12, 8, 8))
    assert c.params == 2 * 12 and c.macs == 0


def test_network_counts():
    # ShiftResNet-20, expansion 6, CIFAR-10 (Wu et al. 2018, CIFAR results table): 0.19M
    c = meta_complexity("shift_resnet20", 32, num_classes=10)
    assert c.params == 186_746 and round(c.params / 1e6, 2) == 0.19
    # ShiftNet-A (Wu et al. 2018, ImageNet table): 4.1M params, 1.4G FLOPs (multiply-adds);
    # ours are 4.19M / 1.42G, which the paper's figures match truncated, not rounded
    c = meta_complexity("shiftnet_a", 224)
    assert int(c.params / 1e5) / 10 == 4.1 and int(c.macs / 1e8) / 10 == 1.4
    # ASNet here is our own stage plan (no published counts to compare)
    c = meta_complexity("asnet_base", 224)
    assert c.params == 3_065_128 and round(c.macs / 1e6) == 645


@pytest.mark.parametrize("name", ["shift_resnet20", "shiftnet_a", "asnet_base"])
def test_small_input_forward(name):
    check_forward(name)


def test_shift_resnet20_trains():
    torch.manual_seed(0)
    model = create_model("shift_resnet20", num_classes=10)
    losses = train_losses(model, 32, lr=0.05)
    assert losses[-1] < losses[0]


def test_asnet_trains_its_shifts():
    torch.manual_seed(0)
    model = create_model("asnet_base", num_classes=10, width=16)   # narrow: the point is the shifts
    before = model.stages[1][0].asl.dy.detach().clone()
    losses = train_losses(model, 32, lr=0.05)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.stages[1][0].asl.dy, before)


@pytest.mark.filterwarnings("ignore::FutureWarning")   # from torch.onnx internals
def test_shifts_export_to_onnx_as_data_movement(tmp_path):
    """Shift is data movement only (Pad, Reshape, Split, one Slice a group, Concat);
    ActiveShift adds the per-channel Mul/Add of its interpolation weights. Neither
    becomes a Conv, a Gather or a GridSample, and ONNX Runtime reproduces both."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cases = [(Shift(19, 3), {"Pad", "Reshape", "Split", "Slice", "Concat"}),
             (ActiveShift(6, max_shift=1), {"Pad", "Slice", "Mul", "Add"})]
    for i, (layer, allowed) in enumerate(cases):
        x = torch.randn(1, layer.channels, 6, 7)
        program = torch.onnx.export(layer.eval(), (x,), dynamo=True, opset_version=18,
                                    verbose=False)
        program.optimize()
        path = tmp_path / f"shift{i}.onnx"
        program.save(str(path))
        nodes = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert set(nodes) <= allowed, (type(layer).__name__, nodes)
        if isinstance(layer, Shift):
            assert nodes.count("Slice") == 9 + 1 + 1   # a group each, the rest, the padding
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert (torch.from_numpy(y) - layer(x)).abs().max().item() <= 1e-6
