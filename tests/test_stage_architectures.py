"""The architecture stages of `mdeploy run` (pipeline/stages/repvgg.py, sparse_shift.py), each run
once with tiny options (1 epoch on 256 MNIST images): what they compute is checked
against the invariants of the deploy forms, and where cheap, recomputed independently
(op counts from the ONNX file, statistics from the checkpoint, the summary file)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from models.errors import InputError
from pipeline.stages.demonstration import SUMMARY_NAME
from pipeline.stages.repvgg import RepVGGOptions, RepVGGResult, repvgg_stage
from pipeline.stages.sparse_shift import SparseShiftOptions, SparseShiftResult, sparse_shift_stage


@pytest.fixture(scope="module")
def repvgg(tmp_path_factory):
    messages: list[str] = []
    opts = RepVGGOptions(epochs=1, train_samples=256, input_size=28, eval_samples=64, calibration_samples=32,
                         threads=1)
    return repvgg_stage(opts, tmp_path_factory.mktemp("arch") / "repvgg", messages.append), messages


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    messages: list[str] = []
    opts = SparseShiftOptions(epochs=2, freeze_shifts_after=1, train_samples=256, eval_samples=32,
                              compare_lambda0=True, threads=1)
    return sparse_shift_stage(opts, tmp_path_factory.mktemp("arch") / "shift", messages.append), messages


def _ops(path: str | Path) -> Counter:
    import onnx
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# -- RepVGG / QARepVGG ---------------------------------------------------------------------------
def test_repvgg_deploy_form_is_exact_with_one_conv_per_block(repvgg):
    result, messages = repvgg
    assert [v.model for v in result.variants] == ["repvgg_tiny", "qarepvgg_tiny"]
    assert [v.quant_friendly for v in result.variants] == [False, True]
    for v in result.variants:
        assert v.reparam_samples == 64
        assert v.reparam_max_abs <= 1e-5, (v.model, v.reparam_max_abs)
        assert v.blocks == 8
        ops = _ops(Path(v.export_dir) / "model.onnx")              # read back, not the stage's count
        assert ops["Conv"] == v.blocks == v.convs and "Add" not in ops and v.adds == 0, ops
        assert "BatchNormalization" not in ops and v.one_conv_per_block
        assert v.params_deploy < v.params_train
        assert v.fp32_parity["passed"] and v.fp32_parity["max_abs"] <= 1e-5, v.fp32_parity
    plain, qa = result.variants
    # QARepVGG trains with fewer parameters (no BN on its 1x1 and identity branches)
    # and deploys into the very same architecture as RepVGG
    assert qa.params_train < plain.params_train and qa.params_deploy == plain.params_deploy
    assert result.passed
    assert any("re-parameterized" in m for m in messages) and any("int8" in m for m in messages)


def test_repvgg_int8_figures_are_measured(repvgg):
    result, _ = repvgg
    for v in result.variants:
        q = v.int8
        assert q["samples"] == 64 and q["calibration_samples"] == 32
        assert 0 <= q["accuracy"] <= 1 and 0 <= q["float_accuracy"] <= 1 and 0 <= q["top1_agreement"] <= 1
        assert q["drop_points"] == pytest.approx(100 * (q["float_accuracy"] - q["accuracy"]), abs=1e-3)
        assert q["snr_db"] is not None and q["snr_db"] > 10, q           # int8 logits track fp32
        ops = _ops(q["path"])
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and ops["Conv"] == v.blocks


def test_repvgg_summary_is_the_json_of_the_result(repvgg):
    result, _ = repvgg
    on_disk = json.loads((Path(result.folder) / SUMMARY_NAME).read_text())
    assert on_disk == json.loads(json.dumps(result.to_dict()))
    v = on_disk["variants"][0]
    for key in ("reparam_max_abs", "params_train", "params_deploy", "convs", "adds", "one_conv_per_block",
                "fp32_parity", "int8", "train"):
        assert key in v
    # what `mdeploy run --resume` rebuilds from the summary is the result it was written from
    rebuilt = RepVGGResult.from_dict(on_disk)
    assert rebuilt.to_dict() == on_disk and rebuilt.passed == result.passed
    assert [(r.onnx_ops, r.trained.checkpoint, r.trained.history) for r in rebuilt.variants] == \
        [(r.onnx_ops, r.trained.checkpoint, r.trained.history) for r in result.variants]


def test_repvgg_stage_refuses_non_repvgg_models_and_used_folders(tmp_path):
    with pytest.raises(InputError, match="mobilenet_v2"):
        repvgg_stage(RepVGGOptions(models=["mobilenet_v2"]), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("earlier result")
    with pytest.raises(InputError, match="existing folder"):
        repvgg_stage(RepVGGOptions(), tmp_path / "b")


# -- sparse shift ------------------------------------------------------------------------------
def test_sparse_shift_statistics(shift):
    from models.checkpoint import load_checkpoint
    result, messages = shift
    stats = result.statistics
    assert 0 <= result.zero_fraction <= 1 and len(stats["layers"]) == 5
    assert sum(stats["histogram"].values()) == stats["channels"] == sum(s["channels"] for s in stats["layers"])
    assert stats["zero"] == stats["histogram"].get("0,0", 0)
    for layer in stats["layers"]:
        assert 0 <= layer["zero_fraction"] <= 1
        assert sum(layer["histogram"].values()) == layer["channels"]
        assert layer["max_abs"] <= 2                                   # fe_net_tiny's max_shift
    assert sum(result.axis_histogram.values()) == 2 * stats["channels"]
    # the figures the trainer itself recorded in the checkpoint
    _, meta = load_checkpoint(result.trained.checkpoint)
    assert meta["sparse_shift"]["zero_fraction"] == stats["zero_fraction"]
    assert meta["sparse_shift"]["lambda"] == result.shift_l1 == 2e-4 and result.freeze_shifts_after == 1
    assert any("do not move" in m for m in messages)


def test_sparse_shift_onnx_is_data_movement_and_exact(shift):
    from quantize.shift import FORBIDDEN_ONNX
    result, _ = shift
    graph = result.graph
    assert result.data_movement_only and len(graph["layers"]) == 5
    for layer in graph["layers"]:
        assert not set(layer["ops"]) & FORBIDDEN_ONNX, layer
        assert layer["ops"].get("Pad", 0) == layer["moves"], layer      # one Pad per displacement
    ops = _ops(Path(result.export_dir) / "model.onnx")
    assert not set(ops) & FORBIDDEN_ONNX and ops["Pad"] == graph["ops"].get("Pad", 0), ops
    # each shift's part run in ONNX Runtime moves values exactly as the PyTorch layer does
    moving = [layer["name"] for layer in graph["layers"] if layer["output"]]
    assert sorted(result.shift_exact) == sorted(moving) and moving
    assert all(err == 0.0 for err in result.shift_exact.values()) and result.shift_samples == 32


def test_sparse_shift_deploy_form_verifies_on_every_runtime(shift):
    result, _ = shift
    assert result.verify["passed"] and result.verify["samples"] == 32
    targets = {p["target"].split("/")[0] for p in result.verify["pairs"]}
    assert targets == {"onnx", "tflite", "mlpackage"}, result.verify["pairs"]
    assert all(p["passed"] and p["max_abs"] <= 1e-4 for p in result.verify["pairs"])
    assert result.passed


def test_sparse_shift_lambda0_comparison_and_summary(shift):
    result, _ = shift
    base = result.lambda0
    assert base is not None and 0 <= base["zero_fraction"] <= 1
    delta = 100 * (result.trained.test_acc - base["test_acc"])
    assert base["accuracy_delta_points"] == pytest.approx(delta, abs=1e-3)
    assert base["within_1_point"] == (delta >= -1.0)
    on_disk = json.loads((Path(result.folder) / SUMMARY_NAME).read_text())
    assert on_disk == json.loads(json.dumps(result.to_dict()))
    assert on_disk["lambda0"]["test_acc"] == base["test_acc"]
    rebuilt = SparseShiftResult.from_dict(on_disk)          # what `mdeploy run --resume` reuses
    assert rebuilt.to_dict() == on_disk and rebuilt.axis_histogram == result.axis_histogram
    assert rebuilt.passed == result.passed and rebuilt.freeze_shifts_after == result.freeze_shifts_after


def test_sparse_shift_options_need_onnx():
    with pytest.raises(ValueError, match="onnx"):
        SparseShiftOptions(formats=["tflite"])


def test_fusable_blocks_follow_the_reparameterize_protocol():
    """Blocks are found by ``reparameterize()``, not by class; a block that fuses its own
    fusable children counts once."""
    import torch
    import torch.nn as nn

    from models import create_model
    from pipeline.stages.repvgg import fusable_blocks

    class Fold(nn.Module):
        def __init__(self, *children: nn.Module) -> None:
            super().__init__()
            self.inner = nn.Sequential(*children)

        def reparameterize(self) -> None:
            pass

    model = nn.Sequential(Fold(), nn.Sequential(Fold(Fold())), nn.Conv2d(1, 1, 1))
    assert fusable_blocks(model) == ["0", "1.0"]
    with torch.device("meta"):
        assert len(fusable_blocks(create_model("repvgg_tiny", num_classes=10))) == 8
        assert fusable_blocks(create_model("mobilenet_v2", num_classes=10)) == []
