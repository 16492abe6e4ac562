"""Core ML weight compression: sizes, what the interpreter decompresses, sparsity, classifiers.

A net whose weights dominate its package (735k weights, 8x8 input) makes the size
ratios visible: a compressed weight costs ``bits / 32`` of its fp32 bytes, so int8
should come out near 4x smaller than fp32, 6-bit palettes near 5.3x, 4-bit near 8x,
less what stays uncompressed (tensors under coremltools' 2048-element threshold, kept
in fp16), the per-channel scales, LUTs, sparsity masks and the package's own files.
The expected ratio is computed from the tensor sizes; the measured one must be within
10 % of it.

Decompression (``constexpr_*`` ops) is checked value for value against coremltools'
own ``materialized_val_inference`` of the same program, for the iOS 16/17 and the iOS 18
forms of each op, and every blob (including 2- and 4-bit packed ones) against
coremltools' C++ blob reader.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from device_tests.compare import error_metrics
from device_tests.mil_interpreter import MILInterpreter
from device_tests.mil_program import load_program, load_spec
from exporters.artifact import ModelCard, Preprocessing
from exporters.coreml import export_coreml, save_mlpackage
from models.errors import InputError
from quantize.coreml import DEFAULT_WEIGHT_THRESHOLD, compress_mlmodel, compression, export_coreml_variants

PRE8 = Preprocessing([8, 8], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
SCHEMES = ["int8w", "palette4", "palette6", "prune50"]


class WideNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)       # 864 weights: under the threshold
        self.conv2 = nn.Conv2d(32, 256, 1)
        self.conv3 = nn.Conv2d(256, 256, 3, padding=1)    # 589,824 weights (> 65,504)
        self.fc1 = nn.Linear(256, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml_compress")
    torch.manual_seed(0)
    model = WideNet().eval()
    arts = export_coreml_variants(model, out, ["fp32", "fp16", *SCHEMES], preprocessing=PRE8,
                                  input_kind="tensor", card=ModelCard("widenet"))
    return model, out, {a.precision: a for a in arts}


def _weights(model: nn.Module) -> list[int]:
    return [p.numel() for n, p in model.named_parameters() if n.endswith("weight")]


def test_sizes_shrink_as_expected(wide):
    model, out, arts = wide
    fp32 = arts["fp32"].size_bytes
    big = [n for n in _weights(model) if n > DEFAULT_WEIGHT_THRESHOLD]
    rest = sum(p.numel() for p in model.parameters()) - sum(big)     # biases, small kernels: fp16
    bits = {"int8w": 8, "palette6": 6, "palette4": 4, "prune50": 0.5 * 16 + 1}   # prune: half fp16 + mask
    ratios = {}
    for scheme, b in bits.items():
        expected = fp32 / (sum(big) * b / 8 + rest * 2)
        ratios[scheme] = fp32 / arts[scheme].size_bytes
        assert abs(ratios[scheme] / expected - 1) < 0.10, f"{scheme}: {ratios[scheme]:.2f}x, expected ~{expected:.2f}x"
    assert ratios["int8w"] > 3.5 and ratios["palette4"] > 7.0           # the "about 4x" and "about 8x"
    assert ratios["palette4"] > ratios["palette6"] > ratios["int8w"] > ratios["prune50"] > 1.0
    assert fp32 / arts["fp16"].size_bytes > 1.9
    for scheme in SCHEMES:
        a = arts[scheme]
        assert a.key == f"mlpackage/{scheme}-tensor" and a.extra["base_precision"] == "fp16"
        assert a.extra["compression"]["compressed_tensors"] == len(big)
        assert a.extra["size_ratio_to_base"] == pytest.approx(arts["fp16"].size_bytes / a.size_bytes, rel=1e-3)
        assert a.extra["layer_map"] and a.tool == "coremltools.optimize.coreml"


def test_error_grows_as_bits_shrink(wide):
    """Same inputs through every variant: int8 weights keep ~40 dB (8-bit per-channel
    quantisation of Gaussian-like weights: step 8 sigma / 255, noise sigma / 110), and
    fewer bits or pruning cost more."""
    model, out, arts = wide
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    snr = {}
    for precision, art in arts.items():
        interp = MILInterpreter(load_program(out / art.path))
        got = np.concatenate([interp.run({"input": x[i:i + 1]})["logits"] for i in range(len(x))])
        snr[precision] = error_metrics(ref, got)["snr_db"] or float("inf")
    assert snr["fp32"] > 100 and snr["fp16"] > 50
    assert snr["int8w"] > 30
    assert snr["fp16"] > snr["int8w"] > snr["palette6"] > snr["palette4"]


def test_pruning_reaches_its_sparsity_on_every_tensor(wide):
    """Including the 589,824-weight fp16 conv that coremltools' own percentile misses."""
    _, out, arts = wide
    prog = load_program(out / arts["prune50"].path)
    interp = MILInterpreter(prog)
    sparse = [op.outputs[0].name for op in prog.ops if op.type == "constexpr_sparse_to_dense"]
    assert len(sparse) == 4
    for name in sparse:
        w = interp.consts[name]
        assert abs(float((w == 0).mean()) - 0.5) < 0.005, f"{name} {w.shape}: {(w == 0).mean():.3f} zeros"


@pytest.mark.parametrize("target", ["iOS17", "iOS18"])
def test_decompression_matches_coremltools(tmp_path, target):
    """Every constexpr op, decompressed by the interpreter from the saved package, equals
    coremltools' own decompression of the same program (iOS 17: affine / LUT / sparse
    ops; iOS 18: blockwise shift-scale, n-bit LUT indices, uint1 masks)."""
    from coremltools.libmilstoragepython import _BlobStorageReader
    torch.manual_seed(1)
    base, = export_coreml(WideNet().eval(), tmp_path, ["fp16"], preprocessing=PRE8, input_kind="tensor",
                          minimum_deployment_target=target, card=ModelCard("w"))
    import coremltools as ct
    mlmodel = ct.models.MLModel(str(tmp_path / base.path), skip_model_load=True)
    seen_ops = set()
    for scheme in ("int8w", "palette4", "palette6", "prune50"):
        compressed = compress_mlmodel(mlmodel, scheme)
        theirs = {op.outputs[0].name: op.materialized_val_inference()
                  for op in compressed._mil_program.functions["main"].operations
                  if op.op_type.startswith("constexpr_")}
        path = save_mlpackage(compressed, tmp_path / f"{scheme}.mlpackage")
        prog = load_program(path)
        consts = MILInterpreter(prog).consts
        assert theirs, scheme
        for name, value in theirs.items():
            np.testing.assert_array_equal(consts[name], value, err_msg=f"{target} {scheme} {name}")
        seen_ops |= {op.type for op in prog.ops if op.type.startswith("constexpr_")}
        for key, ref in prog.blobs.items():
            reader = _BlobStorageReader(str(ref.file))
            method = {"fp32": "read_float_data", "fp16": "read_fp16_data"}.get(ref.dtype, f"read_{ref.dtype}_data")
            raw = np.asarray(getattr(reader, method)(ref.metadata_offset))
            want = raw.view(np.float16) if ref.dtype == "fp16" else raw
            from device_tests.mil_program import BlobFile
            mine = BlobFile(ref.file).read(ref.metadata_offset, ref.dtype, (want.size,))
            np.testing.assert_array_equal(mine.reshape(-1), want.reshape(-1), err_msg=f"{scheme} blob {key}")
    expected = ({"constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_sparse_to_dense"}
                if target == "iOS17" else
                {"constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_sparse_to_dense"})
    assert seen_ops == expected


def test_compressed_classifier_keeps_its_labels(tmp_path):
    """The classify op is set aside while coremltools compresses, then put back."""
    torch.manual_seed(2)
    labels = [f"class {i}" for i in range(10)]
    art, = export_coreml_variants(WideNet().eval(), tmp_path, ["int8w"], preprocessing=PRE8, labels=labels,
                                  card=ModelCard("wide classifier"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide_classifier_int8w.mlpackage"]   # no fp16 kept
    spec = load_spec(tmp_path / art.path)
    d = spec.description
    assert [o.name for o in d.output] == ["classLabel", "classLabel_probs", "logits"]
    assert (d.predictedFeatureName, d.predictedProbabilitiesName) == ("classLabel", "classLabel_probs")
    assert d.input[0].type.WhichOneof("Type") == "imageType"
    prog = load_program(tmp_path / art.path, spec=spec)
    assert "constexpr_affine_dequantize" in prog.op_types() and prog.op_types()[-1] == "classify"
    pix = np.random.default_rng(0).integers(0, 256, (1, 3, 8, 8)).astype(np.float32)
    res = MILInterpreter(prog).run({"image": pix})
    assert res["classLabel"] == labels[int(res["logits"].argmax())]
    assert art.extra["classifier"]["classes"] == 10 and art.precision == "int8w"


@pytest.mark.parametrize("name", ["int4", "prune0", "prune100", "palette3"])
def test_unknown_schemes_are_input_errors(name):
    with pytest.raises(InputError, match="Core ML precision"):
        compression(name)


def test_prune_accepts_any_percentage():
    c = compression("prune75")
    assert (c.kind, c.sparsity) == ("prune", 0.75)
