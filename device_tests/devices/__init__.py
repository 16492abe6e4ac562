"""Devices: where runners run and artifacts are profiled.

    parse_device("local")
    parse_device("qemu-aarch64")                 # cortex-a76
    parse_device("qemu-aarch64:cortex-a53")
    parse_device("adb://SERIAL")                 # or adb://SERIAL?benchmark_model=/path/to/binary
    parse_device("ssh://user@host:2222")         # or ...?python=/opt/venv/bin/python3&identity=~/.ssh/id

A bad spec is an ``InputError`` (one line, exit code 2 in the CLI).
"""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from device_tests.devices.base import Device, DeviceError, DeviceUnavailable  # noqa: F401
from models.errors import InputError

SPEC_FORMS = "local | qemu-aarch64[:CPU] | adb://SERIAL | ssh://[user@]host[:port]"


def _query(spec: str, raw: str, allowed: tuple[str, ...]) -> dict[str, str]:
    q = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
    unknown = sorted(set(q) - set(allowed))
    if unknown:
        raise InputError(spec, f"options among {', '.join(allowed)}", f"{', '.join(unknown)}")
    return q


def parse_device(spec: str) -> Device:
    spec = spec.strip()
    if spec == "local":
        from device_tests.devices.local import LocalDevice
        return LocalDevice()
    if spec == "qemu-aarch64" or spec.startswith("qemu-aarch64:"):
        from device_tests.devices.qemu import QemuDevice
        cpu = spec.partition(":")[2] or "cortex-a76"
        return QemuDevice(cpu)
    if spec.startswith("adb://"):
        from device_tests.devices.adb import AdbDevice
        parts = urlsplit(spec)
        serial = spec[len("adb://"):].split("?", 1)[0]
        if not serial or any(c.isspace() for c in serial):
            raise InputError(spec, "adb://SERIAL (as `adb devices` lists it)", "no serial")
        q = _query(spec, parts.query, ("benchmark_model",))
        return AdbDevice(serial, benchmark_model=q.get("benchmark_model"))
    if spec.startswith("ssh://"):
        from device_tests.devices.ssh import SshDevice
        parts = urlsplit(spec)
        try:
            port = parts.port
        except ValueError:
            raise InputError(spec, "ssh://[user@]host[:port] with a numeric port", "a bad port") from None
        if not parts.hostname or parts.path not in ("", "/"):
            raise InputError(spec, "ssh://[user@]host[:port]", "no host" if not parts.hostname else
                             f"a path {parts.path!r}")
        q = _query(spec, parts.query, ("python", "identity", "known_hosts"))
        return SshDevice(parts.hostname, user=parts.username, port=port or 22,
                         python=q.get("python", "python3"), identity=q.get("identity"),
                         known_hosts=q.get("known_hosts"))
    raise InputError("--device", SPEC_FORMS, repr(spec))
