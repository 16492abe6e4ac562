"""Emulated aarch64 (qemu-user): the real aarch64 ONNX Runtime, LiteRT and ExecuTorch wheels
run the artifacts, parity against this x86 host, and instruction counts that repeat exactly.

Marked ``arm``: run by ``make test-arm``, which first provisions the environment
(``make arm-env``). Tolerances: int8 outputs must be bit-identical (integer kernels on
both ISAs compute the same integers, and dequantization is the same float op), fp32
within 1e-5 absolute on logits (the house fp32 tolerance: NEON and AVX kernels sum in
different orders, a few ulps on values of order 1; observed here ~1e-7 or less).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests import device_helpers as h

pytestmark = [pytest.mark.arm, pytest.mark.slow]

FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def env_ready():
    from device_tests.devices import aarch64_env as env
    st = env.status()
    if not st.ready:
        pytest.skip(f"aarch64 environment not provisioned ({'; '.join(st.problems())}); "
                    f"fix: {env.FIX_COMMAND}")
    return st


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arm")
    onnx_art = h.tiny_onnx(folder)
    fp32, int8 = h.tiny_tflite(folder)
    return {"onnx": onnx_art, "fp32": fp32, "int8": int8}, folder


@pytest.fixture(scope="module")
def a76(env_ready):
    from device_tests.devices.qemu import QemuDevice
    return QemuDevice("cortex-a76")


def _max_abs(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_onnxruntime_parity(a76, arts):
    from device_tests.devices.local import LocalDevice
    art, folder = arts[0]["onnx"], arts[1]
    batches = [h.sample_input(0), h.sample_input(1)]
    arm = a76.run_batches("onnxruntime", art, folder, batches)
    x86 = LocalDevice().run_batches("onnxruntime", art, folder, batches)
    errs = [_max_abs(a, x) for a, x in zip(arm, x86)]
    print(f"onnxruntime fp32 aarch64 (cortex-a76) vs x86: max abs {max(errs):.3g}")
    assert max(errs) <= FP32_ATOL


def test_litert_parity_fp32_close_int8_identical(a76, arts):
    from device_tests.devices.local import LocalDevice
    folder = arts[1]
    batches = [h.sample_input(0), h.sample_input(1)]
    for key in ("fp32", "int8"):
        art = arts[0][key]
        arm = a76.run_batches("litert", art, folder, batches)
        x86 = LocalDevice().run_batches("litert", art, folder, batches)
        err = max(_max_abs(a, x) for a, x in zip(arm, x86))
        print(f"litert {key} aarch64 (cortex-a76) vs x86: max abs {err:.3g}")
        if key == "int8":
            for a, x in zip(arm, x86):
                np.testing.assert_array_equal(a["logits"], x["logits"])
        else:
            assert err <= FP32_ATOL


@pytest.mark.parametrize("key, cpu", [("onnx", "cortex-a76"), ("int8", "cortex-a53")])
def test_instruction_counts_repeat_exactly(env_ready, arts, key, cpu):
    from device_tests.devices.qemu import QemuDevice
    art, folder = arts[0][key], arts[1]
    dev = QemuDevice(cpu)
    p1 = dev.profile(art, folder, runs=2)
    p2 = dev.profile(art, folder, runs=2)
    c1, c2 = p1.instructions, p2.instructions
    print(f"{art.key} on {cpu}: init {c1.init:,}, first {c1.first_inference:,}, "
          f"then {c1.per_inference}")
    assert c1.first_inference > 0 and len(c1.per_inference) == 2
    assert (c1.init, c1.first_inference, c1.per_inference) == (c2.init, c2.first_inference, c2.per_inference)
    assert p1.latency is None and "not a device latency" in p1.measured_on
    assert p1.device_info["guest"]["machine"] == "aarch64"


@pytest.fixture(scope="module")
def pte(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arm-pte")
    return h.tiny_executorch(folder), folder


def test_executorch_pte_parity_and_counts(a76, pte):
    """A ``.pte`` on the emulated cortex-a76: the aarch64 ExecuTorch runtime's XNNPACK
    delegate (NEON kernels) against the x86 one (AVX), then its instruction counts. Every
    op of the tiny net is inside the delegate, and the method only loads if XNNPACK
    initialises on the emulated CPU, so the numbers are XNNPACK's on aarch64."""
    from device_tests.devices.local import LocalDevice
    art, folder = pte
    split = art.extra["delegation"]
    assert split["delegated_ops"] > 0 and split["non_delegated_ops"] == 0, split
    batches = [h.sample_input(0), h.sample_input(1)]
    arm = a76.run_batches("executorch", art, folder, batches)
    x86 = LocalDevice().run_batches("executorch", art, folder, batches)
    err = max(_max_abs(a, x) for a, x in zip(arm, x86))
    print(f"executorch fp32 aarch64 (cortex-a76) vs x86: max abs {err:.3g}")
    assert err <= FP32_ATOL
    assert float(np.abs(arm[0]["logits"]).max()) > 1e-3      # real logits, not zeros
    prof = a76.profile(art, folder, runs=2)
    c = prof.instructions
    print(f"{art.key} on cortex-a76: {prof.runtime}; init {c.init:,}, first {c.first_inference:,}, "
          f"then {c.per_inference}; {prof.notes}")
    assert prof.runtime.startswith("ExecuTorch") and "XNNPACK" in prof.runtime
    assert c.init and c.first_inference > 0 and len(c.per_inference) == 2
    # The counted call is Python's ``method.execute`` (tensor wrapping and output allocation
    # around the delegate), whose count moves by under 1% call to call here (and repeats
    # exactly job to job: 135,281 then 135,665, twice).
    assert max(c.per_inference) - min(c.per_inference) <= 0.02 * max(c.per_inference)
    assert prof.latency is None and prof.device_info["guest"]["machine"] == "aarch64"
    assert prof.device_info["guest_versions"]["executorch"] == art.tool_version
