"""What this machine can and cannot run, each with the one command that would fix it.

Used by ``mdeploy doctor`` and by tests that must say *why* they skip (Core ML
prediction needs macOS, an Android run needs adb and a device, ...).
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""          # one command (or step) that would make it ok


PACKAGES = (("torch", "torch"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
            ("tensorflow", "tensorflow-cpu"), ("LiteRT", "ai-edge-litert"),
            ("coremltools", "coremltools"), ("onnx2tf", "onnx2tf"), ("onnxsim", "onnxsim"),
            ("ExecuTorch", "executorch"), ("torchao", "torchao"), ("litert-torch", "litert-torch"),
            ("ai-edge-quantizer", "ai-edge-quantizer"), ("numpy", "numpy"))
# Converters that are not (yet) in the pinned set: their absence is said, with how to add them.
NOT_PINNED: dict[str, str] = {}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for label, dist in PACKAGES:
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[label] = None
    return out


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _which(name: str) -> str | None:
    return shutil.which(name) or (str(_venv_bin() / name) if (_venv_bin() / name).exists() else None)


def is_macos() -> bool:
    return platform.system() == "Darwin"


def adb_devices(adb: str) -> list[str]:
    try:
        out = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.splitlines()[1:]
            if line.strip() and line.split()[-1] == "device"]


def probe() -> list[Check]:
    checks = []
    for label, version in package_versions().items():
        fix = NOT_PINNED.get(label, "make venv  (installs the pinned requirements)")
        checks.append(Check(f"python package {label}", version is not None, version or "not installed",
                            "" if version else fix))
    checks.append(Check("ONNX -> TFLite (onnx2tf needs onnxsim on PATH)", _which("onnxsim") is not None,
                        _which("onnxsim") or "onnxsim not found",
                        "" if _which("onnxsim") else "make venv"))
    checks.append(Check("Core ML prediction", is_macos(),
                        "macOS: real MLModel.predict" if is_macos() else
                        f"{platform.system()}: Core ML cannot predict here; the numpy MIL interpreter "
                        "stands in and reports say so",
                        "" if is_macos() else "run on macOS for device-faithful Core ML numbers"))
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    checks.append(Check("emulated ARM (qemu-aarch64)", qemu is not None, qemu or "not found",
                        "" if qemu else "apt-get install -y qemu-user qemu-user-static"))
    checks.append(_aarch64_env_check())
    adb = shutil.which("adb")
    devices = adb_devices(adb) if adb else []
    checks.append(Check("Android over adb", bool(devices),
                        f"devices: {', '.join(devices)}" if devices else
                        ("adb found, no device attached" if adb else "adb not found"),
                        "" if devices else ("connect a phone with USB debugging on, then `adb devices`"
                                            if adb else "apt-get install -y adb")))
    ssh = shutil.which("ssh")
    checks.append(Check("ARM Linux over ssh", ssh is not None, ssh or "ssh client not found",
                        "" if ssh else "apt-get install -y openssh-client"))
    return checks


def _aarch64_env_check() -> Check:
    """The emulated aarch64 Python, its runtime wheels and the instruction-count plugin."""
    from device_tests.devices import aarch64_env as env
    st = env.status()
    if st.ready:
        wheels = ", ".join(f"{k} {v}" for k, v in st.wheels.items())
        return Check("aarch64 Python for qemu (runtimes + counter plugin)", True,
                     f"Python {st.python}, {wheels} in {st.cache}")
    return Check("aarch64 Python for qemu (runtimes + counter plugin)", False,
                 "; ".join(st.problems()), f"{env.FIX_COMMAND}  (or: mdeploy doctor --fix arm)")
