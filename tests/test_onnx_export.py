"""PyTorch -> ONNX export and the torch / ONNX Runtime runners, on real runtimes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from device_tests.compare import DEFAULT_TOLERANCES, error_metrics
from device_tests.runners.base import runner_class
from device_tests.runners.onnxruntime import OnnxRuntimeRunner
from device_tests.runners.torch import TorchRunner
from exporters.artifact import Artifact, TensorSpec
from exporters.layer_map import layer_map_from_onnx
from exporters.onnx import export_onnx, load_onnx, reweighted_onnx
from models.errors import InputError
from tests.parity_helpers import SmallNet, make_realistic

FP32 = DEFAULT_TOLERANCES["fp32"]


def _within_fp32(ref: np.ndarray, out: np.ndarray) -> bool:
    m = error_metrics(ref, out)
    return not FP32.check(m)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    return make_realistic(SmallNet(), x), x.numpy()


@pytest.fixture(scope="module")
def static_export(small, tmp_path_factory):
    model, _ = small
    folder = tmp_path_factory.mktemp("static")
    art = export_onnx(model, folder / "model.onnx", (1, 3, 32, 32))
    return folder, art


def _ort(art: Artifact, folder, **opts) -> OnnxRuntimeRunner:
    r = OnnxRuntimeRunner(**opts)
    r.load(art, folder)
    return r


def _torch(model: nn.Module, art: Artifact) -> TorchRunner:
    return TorchRunner.from_module(model, Artifact("ref.safetensors", "pt", "fp32", art.inputs, art.outputs))


def test_export_is_checked_named_and_matches_torch(small, static_export):
    model, x = small
    folder, art = static_export
    path = folder / art.path
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    assert art.inputs[0].shape == [1, 3, 32, 32] and art.outputs[0].shape == [1, 10]
    assert art.format == "onnx" and art.precision == "fp32" and art.size_bytes == path.stat().st_size
    assert not (folder / "model.onnx.data").exists(), "small models embed their weights"
    # Shape inference ran: intermediate tensors carry their types in the file.
    assert len(proto.graph.value_info) >= len(proto.graph.node) - 1
    # No machine paths or FX dumps shipped in node metadata; module scopes kept.
    keys = {p.key for n in proto.graph.node for p in n.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys and "pkg.torch.onnx.name_scopes" in keys
    with _ort(art, folder) as ort_runner:
        for i in range(2):
            got = ort_runner.infer({"input": x[i:i + 1]})["logits"]
            with torch.no_grad():
                want = model(torch.from_numpy(x[i:i + 1])).numpy()
            assert np.abs(want).max() > 1.0, "logits of a realistic scale"
            assert _within_fp32(want, got)


def test_layer_map_names_real_modules_and_repeated_calls(small, static_export):
    model, _ = small
    folder, art = static_export
    lmap = art.extra["layer_map"]
    assert lmap == layer_map_from_onnx(onnx.load(str(folder / art.path))), "rebuildable from the file"
    modules = dict(model.named_modules())
    for tensor, key in lmap.items():
        assert key.partition("#")[0] in modules, f"{tensor} -> {key}: not a module of the model"
    # BatchNorm folded into its conv: the BN names the tensor; `act` runs twice.
    assert {"stem.1", "stem.2", "dw.1", "act", "act#1", "pw.1", "fc"} <= set(lmap.values())
    assert "stem.0" not in lmap.values()
    # The torch runner names its hook outputs with the same keys.
    ref = _torch(model, art)
    assert set(lmap.values()) <= set(ref.intermediate_names())


def test_reweighted_graph_equals_a_fresh_export_of_the_new_weights(small, static_export, tmp_path):
    """Quantize swaps the rounded weights into one export instead of exporting twice: the
    swapped graph must hold exactly what exporting the changed model would, and its
    outputs must be the changed model's (fp32 tolerance), not the old one's."""
    import copy

    from quantize.float_fixes import apply_float_fixes
    small_model, x = small
    _, art = static_export
    model = apply_float_fixes(small_model, ("bn",)).model     # what quantize exports: BN folded
    export_onnx(model, tmp_path / "model.onnx", (1, 3, 32, 32))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert reweighted_onnx(tmp_path / "model.onnx", tmp_path / "swapped.onnx", model, changed)
    fresh = export_onnx(changed, tmp_path / "fresh.onnx", (1, 3, 32, 32))
    assert fresh.path == "fresh.onnx"
    swapped = {t.name: onnx.numpy_helper.to_array(t) for t in load_onnx(tmp_path / "swapped.onnx").graph.initializer}
    exported = {t.name: onnx.numpy_helper.to_array(t) for t in load_onnx(tmp_path / "fresh.onnx").graph.initializer}
    assert swapped.keys() == exported.keys()
    assert all(np.array_equal(swapped[k], exported[k]) for k in exported)
    with torch.no_grad():
        ref, old = changed(torch.from_numpy(x[:1])).numpy(), model(torch.from_numpy(x[:1])).numpy()
    swapped_art = Artifact("swapped.onnx", "onnx", "fp32", art.inputs, art.outputs)
    with _ort(swapped_art, tmp_path) as runner:
        out = runner.infer({"input": x[:1]})["logits"]
    assert _within_fp32(ref, out) and not _within_fp32(old, out)


def test_reweighting_refuses_a_weight_the_exporter_folded(small, static_export, tmp_path):
    """A weight that reaches the graph only through a folded op (a flip; a BatchNorm the
    exporter's optimizer fused into its conv) is not an initializer of its own: swapping
    would leave the old values in, so it says no and writes nothing (the caller exports
    again)."""
    import copy
    import torch.nn.functional as F

    small_model, _ = small
    folder, _ = static_export
    bn_changed = copy.deepcopy(small_model)
    with torch.no_grad():
        bn_changed.stem[0].weight.add_(0.01)
    assert not reweighted_onnx(folder / "model.onnx", tmp_path / "b.onnx", small_model, bn_changed)
    assert not (tmp_path / "b.onnx").exists()

    class Flipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.w.flip(0)).mean((2, 3))

    model = Flipped().eval()
    export_onnx(model, tmp_path / "a.onnx", (1, 3, 8, 8))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.w.add_(0.01)
    assert not reweighted_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", model, changed)
    assert not (tmp_path / "b.onnx").exists()


def test_dynamic_batch_runs_batch_1_and_3(small, tmp_path):
    model, x = small
    art = export_onnx(model, tmp_path / "dyn.onnx", (1, 3, 32, 32), dynamic_batch=True)
    proto = onnx.load(str(tmp_path / "dyn.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert art.inputs[0].shape[0] == "batch" and art.outputs[0].shape[0] == "batch"
    with _ort(art, tmp_path) as r:
        for n in (1, 3):
            got = r.infer({"input": x[:n]})["logits"]
            with torch.no_grad():
                want = model(torch.from_numpy(x[:n])).numpy()
            assert got.shape == (n, 10)
            assert _within_fp32(want, got)


def test_static_batch_refuses_other_batch_with_one_line(static_export, small):
    folder, art = static_export
    _, x = small
    with _ort(art, folder) as r, pytest.raises(InputError) as exc:
        r.infer({"input": x[:3]})
    assert "shape [1, 3, 32, 32]" in str(exc.value) and "\n" not in str(exc.value)


def test_simplify_keeps_numbers_and_layer_map(small, tmp_path):
    model, x = small
    art = export_onnx(model, tmp_path / "s.onnx", (1, 3, 32, 32), simplify=True)
    proto = onnx.load(str(tmp_path / "s.onnx"))
    assert art.extra["simplified"]
    produced = {o for n in proto.graph.node for o in n.output}
    assert art.extra["layer_map"] and set(art.extra["layer_map"]) <= produced
    with _ort(art, tmp_path) as r, torch.no_grad():
        assert _within_fp32(model(torch.from_numpy(x[:1])).numpy(), r.infer({"input": x[:1]})["logits"])


def test_opset_below_18_converted_or_refused(tmp_path):
    """The dynamo exporter writes opset 18+; lower opsets go through ONNX's converter,
    and a model it cannot convert is a one-line error, never a silent opset 18 file."""
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    art = export_onnx(plain, tmp_path / "o17.onnx", (1, 3, 8, 8), opset=17)
    proto = onnx.load(str(tmp_path / "o17.onnx"))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert art.extra["opset"] == 17 and set(art.extra["layer_map"].values()) == {"1", "2", "3", "4"}
    with pytest.raises(InputError) as exc:       # ReduceMean has no 18 -> 17 adapter
        export_onnx(SmallNet().eval(), tmp_path / "small17.onnx", (1, 3, 32, 32), opset=17)
    assert "opset" in str(exc.value) and not (tmp_path / "small17.onnx").exists()


def test_untraceable_model_is_an_input_error(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:                   # a branch on data: torch.export cannot trace it
                return x * 2
            return x

    with pytest.raises(InputError) as exc:
        export_onnx(DataDependent(), tmp_path / "bad.onnx", (1, 3, 8, 8))
    assert "DataDependent" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "bad.onnx").exists()


def test_truncated_and_missing_onnx_are_input_errors(static_export, tmp_path):
    folder, art = static_export
    data = (folder / art.path).read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) // 3])
    for path in (tmp_path / "model.onnx", tmp_path / "missing.onnx"):
        with pytest.raises(InputError):
            load_onnx(path)
        r = OnnxRuntimeRunner()
        with pytest.raises(InputError) as exc:
            r.load(Artifact(path.name, "onnx", "fp32", art.inputs, art.outputs), tmp_path)
        assert "\n" not in str(exc.value)


def test_ort_intermediates_and_optimization_levels(small, static_export):
    model, x = small
    folder, art = static_export
    with _ort(art, folder, graph_optimization_level="disable", threads=1) as plain, \
            _ort(art, folder, graph_optimization_level="all") as opt:
        assert "opt=disable" in plain.label and "threads=1" in plain.label
        a = plain.infer({"input": x[:1]})["logits"]
        b = opt.infer({"input": x[:1]})["logits"]
        assert _within_fp32(a, b)
        names = plain.intermediate_names()
        wanted = list(art.extra["layer_map"])
        assert set(wanted) <= set(names)
        vals = plain.infer_intermediates({"input": x[:1]}, wanted)
        ref = _torch(model, art).infer_intermediates({"input": x[:1]},
                                                      [art.extra["layer_map"][t] for t in wanted])
        for t in wanted:
            r = ref[art.extra["layer_map"][t]]
            assert vals[t].shape == r.shape
            assert error_metrics(r, vals[t])["max_rel"] < FP32.layer_max_rel
    with pytest.raises(InputError):
        OnnxRuntimeRunner(graph_optimization_level="fastest")


def test_quantized_io_uses_scale_and_zero_point(tmp_path):
    """A QDQ graph with uint8 input and int8 output: the runner quantizes and dequantizes
    at its edge with the manifest's scale/zero point; ORT does the integer work."""
    from onnx import TensorProto, helper, numpy_helper
    s_in, zp_in, s_out, zp_out = 0.02, 128, 0.01, -5
    inits = [numpy_helper.from_array(np.array(s_in, np.float32), "s_in"),
             numpy_helper.from_array(np.array(zp_in, np.uint8), "zp_in"),
             numpy_helper.from_array(np.array(s_out, np.float32), "s_out"),
             numpy_helper.from_array(np.array(zp_out, np.int8), "zp_out")]
    nodes = [helper.make_node("DequantizeLinear", ["input", "s_in", "zp_in"], ["x"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s_out", "zp_out"], ["logits"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.UINT8, [1, 2, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT8, [1, 2, 2, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "q.onnx"))
    art = Artifact("q.onnx", "onnx", "int8",
                   [TensorSpec("input", [1, 2, 2, 2], "uint8", "NCHW", s_in, zp_in)],
                   [TensorSpec("logits", [1, 2, 2, 2], "int8", "NCHW", s_out, zp_out)])
    x = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(1, 2, 2, 2)
    with _ort(art, tmp_path) as r:
        y = r.infer({"input": x})["logits"]
        inter = r.infer_intermediates({"input": x}, ["r"])
    q_in = np.clip(np.round(x / s_in) + zp_in, 0, 255)
    relu = np.maximum((q_in - zp_in) * s_in, 0)
    want = (np.clip(np.round(relu / s_out) + zp_out, -128, 127) - zp_out) * s_out
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, atol=1e-7)
    np.testing.assert_allclose(inter["r"], relu, atol=1e-7)


def test_runner_registry_knows_both_kinds():
    assert runner_class("torch") is TorchRunner
    assert runner_class("onnxruntime") is OnnxRuntimeRunner
