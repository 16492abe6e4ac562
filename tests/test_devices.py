"""Device specs, the local device, and the qemu pieces that need no emulator."""
from __future__ import annotations

import numpy as np
import pytest

from models.errors import InputError
from tests import device_helpers as h


@pytest.mark.parametrize("spec, cls, canonical", [
    ("local", "LocalDevice", "local"),
    ("qemu-aarch64", "QemuDevice", "qemu-aarch64:cortex-a76"),
    ("qemu-aarch64:cortex-a53", "QemuDevice", "qemu-aarch64:cortex-a53"),
    ("adb://R5CT1234ABC", "AdbDevice", "adb://R5CT1234ABC"),
    ("adb://emulator-5554?benchmark_model=/tmp/bm", "AdbDevice", "adb://emulator-5554"),
    ("ssh://pi@raspberrypi.local", "SshDevice", "ssh://pi@raspberrypi.local"),
    ("ssh://ubuntu@10.0.0.7:2222?python=/opt/venv/bin/python3", "SshDevice", "ssh://ubuntu@10.0.0.7:2222"),
    ("ssh://board", "SshDevice", "ssh://board"),
])
def test_parse_device(spec, cls, canonical):
    from device_tests.devices import parse_device
    dev = parse_device(spec)
    assert type(dev).__name__ == cls and dev.spec == canonical


def test_parse_device_options_reach_the_device():
    from device_tests.devices import parse_device
    ssh = parse_device("ssh://ubuntu@host:2200?python=/opt/py/bin/python3&identity=/keys/id")
    assert (ssh.user, ssh.host, ssh.port, ssh.python, ssh.identity) == \
        ("ubuntu", "host", 2200, "/opt/py/bin/python3", "/keys/id")
    assert parse_device("adb://X?benchmark_model=/b/bm").benchmark_model == "/b/bm"


@pytest.mark.parametrize("spec, found", [
    ("phone", "'phone'"),
    ("qemu-aarch64:max", "wrong int8"),
    ("qemu-aarch64:cortex-x9", "'cortex-x9'"),
    ("adb://", "no serial"),
    ("ssh://", "no host"),
    ("ssh://host:port", "numeric port"),
    ("ssh://host/path", "a path"),
    ("ssh://host?pyton=x", "pyton"),
])
def test_bad_specs_are_one_line_input_errors(spec, found):
    from device_tests.devices import parse_device
    with pytest.raises(InputError) as err:
        parse_device(spec)
    assert found in str(err.value) and "\n" not in str(err.value)


def test_local_device_runs_the_real_runner(tmp_path):
    from device_tests.devices.local import LocalDevice
    from device_tests.runners import runner_class
    art = h.tiny_onnx(tmp_path)
    batches = [h.sample_input(0), h.sample_input(1)]
    out = LocalDevice().run_batches("onnxruntime", art, tmp_path, batches)
    with runner_class("onnxruntime")() as r:
        r.load(art, tmp_path)
        direct = [r.infer(b) for b in batches]
    for a, b in zip(out, direct):
        np.testing.assert_array_equal(a["logits"], b["logits"])
    assert LocalDevice().describe()["machine"]


def test_unprovisioned_qemu_says_how_to_fix(tmp_path):
    from device_tests.devices.base import DeviceUnavailable
    from device_tests.devices.qemu import QemuDevice
    dev = QemuDevice("cortex-a53", cache=tmp_path / "empty")
    with pytest.raises(DeviceUnavailable) as err:
        dev.run("onnxruntime", h.tiny_onnx(tmp_path), tmp_path, h.sample_input())
    assert "make arm-env" in str(err.value) and "no aarch64 Python" in str(err.value)


def test_parse_counts_pairs_markers():
    from device_tests.devices.qemu import parse_counts
    from device_tests.devices.base import DeviceError
    text = "1 1000\n2 5000\n3 6000\n4 9000\n3 9100\n4 11100\n3 11200\n4 13300\ntotal 20000\n"
    c = parse_counts(text, "cortex-a76")
    assert (c.init, c.first_inference, c.per_inference, c.mean) == (4000, 3000, [2000, 2100], 2050.0)
    with pytest.raises(DeviceError):
        parse_counts("total 5\n", "cortex-a76")


def test_cpuinfo_matches_hwcaps():
    from device_tests.devices.aarch64_env import cpuinfo_text
    # HWCAP bits qemu 7.2 reports for cortex-a76: fp asimd aes pmull sha1 sha2 crc32 atomics
    # fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
    text = cpuinfo_text("cortex-a76", 0x119FFB, 2)
    assert text.count("processor\t:") == 2 and "CPU part\t: 0xd0b" in text
    assert "Features\t: fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm " \
           "lrcpc dcpop asimddp\n" in text


def test_bundle_imports_without_torch(tmp_path):
    """The runner bundle must import under a Python that has no torch and no model zoo."""
    import subprocess
    import sys
    from device_tests.devices.bundle import build_bundle
    b = build_bundle(tmp_path / "b")
    code = ("import sys; sys.modules['torch'] = None; "
            "import device_tests.runners.onnxruntime, device_tests.runners.litert, device_tests.profile; "
            "import device_tests.devices.remote_main; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(b), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "ok", out.stderr
