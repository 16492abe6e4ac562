"""Sparse Shift Layer (Chen et al. 2019): integer forward, straight-through gradients
checked against finite differences of the bilinear relaxation, L1 sparsity and freezing,
statistics, FE-Net, and deployment as pure data movement with exact parity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import create_model
from models.reparam import reparameterize_model
from models.shift import active_shift2d
from models.sparse_shift import FEBlock, SparseShift, shift_order, sparse_shift2d
from quantize.shift import (FORBIDDEN_ONNX, SparseShiftHook, check_shift_graph, freeze_shifts,
                            shift_l1_penalty, shift_statistics)
from tests.zoo_checks import shift_by_index

# What a standalone deployed shift compiles to (quantize.shift.DATA_MOVEMENT_ONNX allows a
# few more data-movement ops, e.g. a Gather with constant indices).
STANDALONE_SHIFT_ONNX = {"Pad", "Reshape", "Split", "Slice", "Concat"}
FORBIDDEN_TFLITE = {"MUL", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "GATHER", "GATHER_ND"}
FORBIDDEN_MIL = {"mul", "resize_bilinear", "upsample_bilinear", "resample", "gather", "gather_nd",
                 "gather_along_axis"}


def _layer(dy, dx, max_shift: int = 2) -> SparseShift:
    layer = SparseShift(len(dy), max_shift=max_shift)
    with torch.no_grad():
        layer.dy.copy_(torch.tensor(dy, dtype=torch.float32))
        layer.dx.copy_(torch.tensor(dx, dtype=torch.float32))
    return layer


# -- forward and gradients ---------------------------------------------------------------------
def test_forward_moves_each_channel_by_its_rounded_displacement():
    dy = [0.2, -0.7, 1.6, -2.4, 0.49, 3.7, -0.5, 1.5]    # rounds (half to even): 0 -1 2 -2 0 2* 0 2
    dx = [1.1, 0.3, -1.51, 0.0, -0.2, -9.0, 0.5, -0.5]   # * clamped to max_shift = 2
    layer = _layer(dy, dx)
    x = torch.randn(2, 8, 6, 7)
    out = layer(x)
    expected_disp = [(0, 1), (-1, 0), (2, -2), (-2, 0), (0, 0), (2, -2), (0, 0), (2, 0)]
    assert [tuple(d) for d in layer.displacements().tolist()] == expected_disp
    for c, (sy, sx) in enumerate(expected_disp):
        assert torch.equal(out[:, c], shift_by_index(x[:, c], sy, sx))
    assert torch.equal(out[:, 4], x[:, 4])                # zero-displacement channels: identity


def test_offset_gradients_match_finite_differences_of_the_bilinear_relaxation():
    """The STE offset gradient is d/d(dy, dx) of the bilinear shift at the real-valued
    position: central differences of ``active_shift2d`` (float64, away from integers where
    the relaxation has kinks, window wide enough that clamping plays no part)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    w = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    dy = torch.tensor([0.3, -1.7, 1.2, -0.25, 0.6, -0.85], dtype=torch.float64, requires_grad=True)
    dx = torch.tensor([-0.6, 0.4, 1.25, -1.4, -1.01, 0.75], dtype=torch.float64, requires_grad=True)
    (sparse_shift2d(x, dy, dx, 2) * w).sum().backward()

    def relaxed(ay: torch.Tensor, ax: torch.Tensor) -> float:
        return float((active_shift2d(x, ay, ax, 4) * w).sum())

    h = 1e-6
    for param, grad in ((dy, dy.grad), (dx, dx.grad)):
        for c in range(6):
            plus, minus = dy.detach().clone(), dy.detach().clone()
            plus_x, minus_x = dx.detach().clone(), dx.detach().clone()
            if param is dy:
                plus[c] += h
                minus[c] -= h
            else:
                plus_x[c] += h
                minus_x[c] -= h
            fd = (relaxed(plus, plus_x) - relaxed(minus, minus_x)) / (2 * h)
            assert abs(grad[c].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (c, grad[c].item(), fd)


def test_input_gradient_is_the_inverse_shift():
    """The forward is linear in x: its exact gradient (checked numerically) is the transpose
    of the integer shift, i.e. the shift by the opposite displacement."""
    torch.manual_seed(0)
    layer = _layer([1.2, -0.4, -2.0, 0.0], [-0.8, 1.9, 0.3, 0.0]).double()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), eps=1e-6, atol=1e-9)
    g = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(layer(x), x, g)
    for c, (sy, sx) in enumerate(layer.displacements().tolist()):
        assert torch.equal(grad[:, c], shift_by_index(g[:, c], -sy, -sx))


# -- sparsity: penalty, freezing, statistics ---------------------------------------------------
def test_penalty_freeze_and_statistics():
    model = nn.Sequential(_layer([0.2, -1.4, 0.6, 0.0], [0.1, 0.3, -0.2, 1.7]),
                          _layer([0.0, 0.0], [0.0, -0.6]))
    pen = shift_l1_penalty(model, 0.5)
    assert pen is not None and abs(pen.item() - 0.5 * (0.2 + 1.4 + 0.6 + 0.1 + 0.3 + 0.2 + 1.7 + 0.6)) < 1e-6
    assert shift_l1_penalty(model, 0.0) is None
    stats = shift_statistics(model)
    assert [s.zero for s in stats.layers] == [1, 1] and stats.zero_fraction == 2 / 6
    assert stats.layers[0].histogram == {"0,0": 1, "-1,0": 1, "1,0": 1, "0,2": 1}
    assert stats.histogram["0,0"] == 2 and stats.axis_histogram()[0] == 8
    assert freeze_shifts(model) == 2
    assert torch.equal(model[0].dy, torch.tensor([0.0, -1.0, 1.0, 0.0]))     # snapped
    assert shift_l1_penalty(model, 0.5) is None                              # frozen: no penalty
    hook = SparseShiftHook(0.5)
    (group,) = hook.param_groups(model)
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 4
    sum(layer(torch.randn(1, layer.channels, 4, 4)).sum() for layer in model).backward()
    hook.after_backward(model)
    assert all(p.grad is None for p in group["params"])


@pytest.mark.slow
def test_increasing_lambda_raises_sparsity(tmp_path):
    """Short identical runs of fe_net_tiny on 600 MNIST images, lambda swept."""
    from pipeline.stages.train import TrainConfig, train
    zero = {}
    for lam in (0.0, 5e-4, 5e-3):
        result = train(TrainConfig(model="fe_net_tiny", data="mnist", epochs=2, train_samples=600,
                                   batch_size=32, shift_l1=lam, threads=1), tmp_path / str(lam))
        zero[lam] = result.meta["sparse_shift"]["zero_fraction"]
        assert result.history[-1].extra["shift_zero_fraction"] >= 0
    assert zero[0.0] < zero[5e-4] < zero[5e-3], zero
    assert zero[5e-3] - zero[0.0] >= 0.3, zero


def test_train_cli_reports_sparsity_and_freezes(cli, tmp_path):
    code, out, err = cli("train", "fe_net_tiny", "--data", "mnist", "--epochs", "2", "--train-samples",
                         "200", "--batch-size", "32", "--shift-l1", "2e-3", "--freeze-shifts-after", "0",
                         "--threads", "1", "--out", str(tmp_path / "run"), "--json")
    assert code == 0, err
    stats = json.loads(out)["sparse_shift"]
    assert stats["lambda"] == 2e-3 and stats["freeze_after"] == 0
    assert stats["channels"] == sum(layer["channels"] for layer in stats["layers"]) > 0
    assert sum(stats["histogram"].values()) == stats["channels"]
    assert stats["zero"] == stats["histogram"].get("0,0", 0)
    # frozen from the first epoch on: snapped to integers, the displacements never change, so
    # the saved (best) weights have integer shifts whichever epoch was best
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["history"][0]["extra"] == log["history"][1]["extra"]
    from models.checkpoint import load_checkpoint
    state, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    shifts = [v for k, v in state.items() if k.endswith((".dy", ".dx"))]
    assert shifts and all(torch.equal(v, v.round()) for v in shifts)
    assert any(v.abs().sum() > 0 for v in shifts), "integer shifts, not all zero"
    code, _, err = cli("train", "mobilenet_v2", "--shift-l1", "1e-3", "--out", str(tmp_path / "x"))
    assert code == 2 and "sparse shift" in err


# -- deploy form -------------------------------------------------------------------------------
def test_deploy_form_is_exact_and_loads_into_the_deploy_architecture():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    model = create_model("fe_net_tiny", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SparseShift):
                m.dy.mul_(1.5)                         # a mix of 0, +-1, +-2 displacements
    fused = reparameterize_model(model)
    rebuilt = create_model("fe_net_tiny", num_classes=10, in_chans=1, deploy=True)
    rebuilt.load_state_dict(fused.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        ref, out = model(x), fused(x)
        assert torch.equal(rebuilt(x), out)
    # the permutation folded into the 1x1 convs reorders a float32 sum: rounding only
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    for block in fused.modules():
        if isinstance(block, FEBlock):
            disp = block.shift.displacements()
            moving = (disp != 0).any(1).tolist()
            assert moving == sorted(moving, reverse=True)          # moving first, still last
            assert torch.equal(shift_order(disp), torch.arange(len(disp)))


def test_standalone_layer_deploys_exactly_and_an_all_zero_layer_is_a_no_op():
    layer = _layer([1.2, 0.1, -0.9, 0.3, 2.0], [0.0, 0.2, 1.4, -0.1, -1.6])
    x = torch.randn(2, 5, 6, 6)
    ref = layer(x)
    layer.reparameterize()
    assert not list(layer.parameters()) and torch.equal(layer(x), ref)
    still = _layer([0.1, -0.3], [0.4, 0.0])
    still.reparameterize()
    inp = x[:, :2]
    assert still(inp) is inp                 # no op at all: nothing in the exported graph


class _ShiftOnly(nn.Module):
    """A deployed sparse shift between pure data movement: 3 input channels tiled to 24,
    the shifted map flattened (so every runtime returns it in NCHW order)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shift = SparseShift(24, max_shift=2, init_range=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift(torch.cat([x] * 8, dim=1)).flatten(1)


def test_deployed_shift_exports_to_onnx_as_data_movement_with_zero_error(tmp_path):
    import onnxruntime as ort

    from exporters.onnx import export_onnx, op_counts
    model = reparameterize_model(_ShiftOnly())
    export_onnx(model, tmp_path / "shift.onnx", (1, 3, 9, 10))
    ops = op_counts(tmp_path / "shift.onnx")
    assert set(ops) <= STANDALONE_SHIFT_ONNX, ops
    x = np.random.default_rng(0).standard_normal((1, 3, 9, 10)).astype(np.float32)
    out = ort.InferenceSession(str(tmp_path / "shift.onnx")).run(None, {"input": x})[0]
    with torch.no_grad():
        assert np.array_equal(out, model(torch.from_numpy(x)).numpy())          # exactly 0 error

    # a whole FE-Net: convs, ReLU, pooling, data movement; nothing that multiplies or samples
    net = reparameterize_model(create_model("fe_net_tiny", num_classes=10, in_chans=1))
    art = export_onnx(net, tmp_path / "fe.onnx", (1, 1, 28, 28))
    ops = op_counts(tmp_path / "fe.onnx")
    assert not set(ops) & FORBIDDEN_ONNX, ops
    # each shift layer's own part of the graph (read back through the layer map): data
    # movement only, one Pad per displacement in use (channels are grouped by it), none
    # for still channels; every Pad of the graph is a shift's
    check = check_shift_graph(tmp_path / "fe.onnx", art.extra["layer_map"], net)
    assert len(check.layers) == 5 and check.data_movement_only, check.to_dict()
    assert all(layer.one_pad_per_move and layer.moves > 0 for layer in check.layers), check.to_dict()
    assert check.ops["Pad"] == ops["Pad"], (check.ops, ops)


def test_shift_graph_check_names_what_is_not_data_movement(tmp_path):
    """The check reads each layer's part of the graph: a multiply, or a Gather whose indices
    are computed, inside a shift's part is reported against that layer only."""
    import onnx

    from exporters.onnx import export_onnx
    net = reparameterize_model(create_model("fe_net_tiny", num_classes=10, in_chans=1))
    art = export_onnx(net, tmp_path / "fe.onnx", (1, 1, 28, 28))
    proto = onnx.load(str(tmp_path / "fe.onnx"))
    clean = check_shift_graph(proto, art.extra["layer_map"], net)
    assert clean.data_movement_only
    by_output = {o: n for n in proto.graph.node for o in n.output}
    concat0, concat1 = by_output[clean.layers[0].output], by_output[clean.layers[1].output]
    pad0 = by_output[concat0.input[0]]
    pad0.op_type = "Mul"                                       # a multiply in layer 0
    pad1 = by_output[concat1.input[0]]
    pad1.op_type, pad1.input[1] = "Gather", pad1.input[0]      # indices computed from activations
    pad2 = by_output[concat1.input[1]]
    pad2.op_type = "Gather"                                    # constant indices: a fixed pick
    check = check_shift_graph(proto, art.extra["layer_map"], net)
    assert not check.data_movement_only
    assert [layer.problems for layer in check.layers] == [["Mul"], ["Gather with computed indices"], [], [], []]


@pytest.mark.slow
def test_deployed_shift_in_tflite_and_coreml_is_data_movement_with_zero_error(tmp_path):
    from device_tests.mil_interpreter import MILInterpreter
    from device_tests.mil_program import load_program
    from device_tests.runners.litert import LiteRTRunner
    from exporters.artifact import ModelCard, Preprocessing
    from exporters.coreml import export_coreml
    from exporters.onnx import export_onnx
    from exporters.tflite import export_tflite
    model = reparameterize_model(_ShiftOnly())
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 10)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    pre = Preprocessing([9, 10], [0.0] * 3, [1.0] * 3, "RGB")
    export_onnx(model, tmp_path / "shift.onnx", (1, 3, 9, 10))
    (tfl,) = export_tflite(tmp_path / "shift.onnx", tmp_path, ["fp32"], preprocessing=pre)
    ops = tfl.extra["ops"]
    assert not set(ops) & FORBIDDEN_TFLITE and not {o for o in ops if "CONV" in o}, ops
    with LiteRTRunner() as r:
        r.load(tfl, tmp_path)
        for i in range(len(x)):
            assert np.array_equal(list(r.infer({"input": x[i:i + 1]}).values())[0], ref[i:i + 1])

    (cml,) = export_coreml(model, tmp_path / "cm", ["fp32"], preprocessing=pre, input_kind="tensor",
                           card=ModelCard("shift"))
    ops = {k for k in cml.extra["ops"] if k != "const"}
    assert ops <= {"pad", "reshape", "split", "slice_by_index", "concat"}, ops
    assert not ops & FORBIDDEN_MIL
    interp = MILInterpreter(load_program(str(tmp_path / "cm" / cml.path)))
    for i in range(len(x)):
        out = list(interp.run({"input": x[i:i + 1]}).values())[0]
        assert np.array_equal(out, ref[i:i + 1])


def test_export_refuses_the_training_form_of_sparse_shifts(cli, tmp_path):
    code, _, err = cli("export", "fe_net_tiny", "--num-classes", "10", "--in-chans", "1", "--no-reparam",
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "deploy form" in err
